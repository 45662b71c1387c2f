"""Figures of points in the plane: each draws the points, the field or the paths it is given."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from diffusion_lib import GaussianMixture, Trajectory
from diffusion_lib.plane import plot_paths, plot_points, plot_score_field


@pytest.fixture(autouse=True)
def _agg_and_close():
    plt.switch_backend("Agg")
    yield
    plt.close("all")


def test_plot_points_draws_every_point_with_labelled_axes():
    points = torch.tensor([[0.0, 1.0], [-1.0, 0.5], [1.5, -1.5]])
    figure = plot_points(points, title="three", limits=(-3.0, 3.0))
    ax = figure.axes[0]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), points.numpy())
    assert ax.get_xlim() == (-3.0, 3.0) and ax.get_xlabel() == "$x_1$" and ax.get_title() == "three"
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot_points(torch.zeros(4, 3))
    plt.close("all")


def test_plot_score_field_scales_arrows_to_the_grid():
    field = lambda x: torch.stack([x[:, 0], 2 * x[:, 1]], dim=1)  # noqa: E731
    figure = plot_score_field(field, limits=(-1.0, 1.0), arrows=5)
    quiver = figure.axes[0].collections[-1]
    lengths = np.hypot(quiver.U, quiver.V)
    assert quiver.N == 25
    np.testing.assert_allclose(lengths.max(), 0.5)  # one grid cell of 2 / (5 - 1)
    np.testing.assert_allclose(quiver.U * 2 * quiver.Y, quiver.V * quiver.X, atol=1e-12)
    mixture = GaussianMixture(torch.zeros(1, 2), 0.5)
    figure = plot_score_field(
        mixture.score, log_density=mixture.log_prob, arrows=5, directions_only=True
    )
    quiver = figure.axes[0].collections[-1]
    np.testing.assert_allclose(np.hypot(quiver.U, quiver.V)[quiver.X**2 + quiver.Y**2 > 0], 0.8)
    assert len(figure.axes[0].collections) > 1, "the density is drawn under the arrows"
    plt.close("all")


def test_plot_paths_draws_each_path_from_noise_to_sample():
    states = torch.cumsum(torch.randn(6, 10, 2), dim=0)
    figure = plot_paths(Trajectory(states, torch.linspace(1, 0, 6)), count=4)
    ax = figure.axes[0]
    assert len(ax.lines) == 4
    for index, line in enumerate(ax.lines):
        np.testing.assert_allclose(line.get_xydata(), states[:, index].double().numpy())
    starts, ends = ax.collections
    np.testing.assert_allclose(starts.get_offsets(), states[0, :4].double().numpy())
    np.testing.assert_allclose(ends.get_offsets(), states[-1, :4].double().numpy())
    with pytest.raises(ValueError, match=r"shape \(S \+ 1, N, 2\)"):
        plot_paths(Trajectory(torch.zeros(3, 4, 1, 2, 2), torch.zeros(3)))
    plt.close("all")
