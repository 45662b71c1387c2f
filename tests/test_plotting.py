"""Figures: each draws what it says, labelled: grids, schedules, losses, trajectories, histograms."""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from diffusion_lib import NoiseSchedule, Trajectory, plane, plotting, slider
from diffusion_lib.plotting import (
    pixel_histogram,
    plot_loss,
    plot_schedules,
    plot_trajectory,
    show_grid,
)


@pytest.fixture(autouse=True)
def _agg_and_close():
    plt.switch_backend("Agg")
    yield
    plt.close("all")


@pytest.fixture
def images() -> torch.Tensor:
    """Four 12x12 'images' in [-1, 1]: one ramp of grey levels over all their pixels."""
    return torch.linspace(-1, 1, 4 * 12 * 12).reshape(4, 1, 12, 12)


def _alpha_bar(schedule: NoiseSchedule) -> np.ndarray:
    """alpha-bar computed here, independently of the library: a running product of 1 - beta."""
    return np.cumprod(1.0 - schedule.betas.numpy())


def test_show_grid_tiles_images_with_make_grid_layout(images):
    many = torch.cat([images] * 5)  # 20 images
    figure = show_grid(many, nrow=8, title="ramps")
    (ax,) = figure.axes
    (artist,) = ax.images
    drawn = np.asarray(artist.get_array())
    # 3 rows and 8 columns of 12-pixel tiles with 2-pixel padding around each.
    assert drawn.shape == (3 * 12 + 4 * 2, 8 * 12 + 9 * 2, 3)
    np.testing.assert_allclose(drawn[2:14, 2:14, 0], (many[0, 0].numpy() + 1) / 2)
    np.testing.assert_allclose(drawn[16:28, 2:14, 0], (many[8, 0].numpy() + 1) / 2)
    assert ax.get_title() == "ramps"


def test_show_grid_draws_on_given_axes_and_rejects_bad_shapes(images):
    figure, (left, right) = plt.subplots(1, 2)
    assert show_grid(images, ax=right) is figure
    assert len(right.images) == 1 and not left.images
    assert right.get_title() == "4 images"
    with pytest.raises(ValueError, match="N, C, H, W"):
        show_grid(images[0])
    with pytest.raises(ValueError, match="show_grid needs at least one image"):
        show_grid(images[:0])


def test_show_grid_pads_with_the_grey_level_asked_for(images):
    drawn = np.asarray(show_grid(images, nrow=2, pad_value=0.5).axes[0].images[0].get_array())
    assert np.all(drawn[:2] == 0.5) and np.all(drawn[:, 14:16] == 0.5)  # border, gap between
    assert np.all(np.asarray(show_grid(images).axes[0].images[0].get_array())[:2] == 1.0)
    with pytest.raises(ValueError, match=r"pad_value is a grey level in \[0, 1\], got 2"):
        show_grid(images, pad_value=2)


def test_plot_schedules_draws_three_labelled_panels():
    schedules = {
        name: NoiseSchedule.from_name(name, 200) for name in ("linear", "quadratic", "cosine")
    }
    figure = plot_schedules(schedules)
    assert len(figure.axes) == 3
    for ax in figure.axes:
        assert ax.get_xlabel() == "timestep t"
        assert ax.get_ylabel() and ax.get_title()
        assert len(ax.get_lines()) == len(schedules)
    beta_ax, alpha_ax, snr_ax = figure.axes
    assert beta_ax.get_yscale() == "log" and snr_ax.get_yscale() == "log"
    for line, schedule in zip(alpha_ax.get_lines(), schedules.values(), strict=True):
        np.testing.assert_allclose(line.get_ydata(), _alpha_bar(schedule), rtol=1e-12)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(200))
    alpha_bar = _alpha_bar(schedules["cosine"])
    np.testing.assert_allclose(snr_ax.get_lines()[2].get_ydata(), alpha_bar / (1 - alpha_bar))
    labels = [text.get_text() for text in beta_ax.get_legend().get_texts()]
    assert labels == list(schedules)


def test_plot_schedules_draws_a_single_schedule_without_a_legend():
    schedule = NoiseSchedule.from_name("cosine", 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns about a legend with no labels
        figure = plot_schedules(schedule)
    alpha_ax = figure.axes[1]
    (line,) = alpha_ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), _alpha_bar(schedule), rtol=1e-12)
    assert all(ax.get_legend() is None for ax in figure.axes)


@pytest.mark.parametrize(
    ("schedules", "error", "message"),
    [
        (
            [NoiseSchedule.from_name("linear", 20)],
            TypeError,
            r"dict \{name: NoiseSchedule\}; got list",
        ),
        ("linear", TypeError, "NoiseSchedule or a dict .*; got str"),
        (
            {"linear": "linear"},
            TypeError,
            r"schedules\['linear'\] must be a NoiseSchedule, got str",
        ),
        ({}, ValueError, "at least one NoiseSchedule"),
    ],
)
def test_plot_schedules_rejects_what_is_not_a_schedule(schedules, error, message):
    with pytest.raises(error, match=message):
        plot_schedules(schedules)


def test_plot_loss_draws_raw_values_and_moving_average():
    losses = np.exp(-np.linspace(0, 3, 500)) + 0.1 * np.random.default_rng(0).random(500)
    figure = plot_loss(list(losses), smoothing=50)
    (ax,) = figure.axes
    raw, smooth = ax.get_lines()
    np.testing.assert_allclose(raw.get_ydata(), losses)
    np.testing.assert_allclose(smooth.get_ydata(), np.convolve(losses, np.ones(50) / 50, "valid"))
    np.testing.assert_array_equal(smooth.get_xdata(), np.arange(50, 501))
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "loss"


def _labelled_y_ticks(ax):
    ax.figure.canvas.draw()
    low, high = ax.get_ylim()
    return [
        tick.get_text()
        for tick in ax.get_yticklabels() + ax.get_yticklabels(minor=True)
        if tick.get_text() and low <= tick.get_position()[1] <= high
    ]


def test_plot_loss_labels_several_ticks_on_a_short_log_axis():
    # A short run's noisy losses between 0.3 and 6 span 1.3 decades: matplotlib alone labels
    # only the tick at 1.
    losses = np.exp(np.linspace(np.log(6.0), np.log(0.3), 400))
    labels = _labelled_y_ticks(plot_loss(losses).axes[0])
    assert labels == ["0.5", "1", "2", "5"]


def test_plot_loss_labels_every_multiple_when_one_power_of_ten_is_in_sight():
    # Losses between 0.75 and 1.6: of 0.5, 1, 2 and 5 only 1 is inside.
    losses = np.exp(np.linspace(np.log(1.6), np.log(0.75), 400))
    assert _labelled_y_ticks(plot_loss(losses).axes[0]) == ["0.8", "0.9", "1"]


def test_plot_loss_keeps_decade_labels_on_a_long_log_axis():
    losses = np.exp(np.linspace(np.log(10.0), np.log(1e-5), 400))
    labels = _labelled_y_ticks(plot_loss(losses).axes[0])
    assert len(labels) >= 5 and all("10^" in label for label in labels)


def test_plot_loss_reads_histories_and_shares_axes():
    figure, ax = plt.subplots()
    history = {"step": [10, 20, 30, 40, 50], "loss": [1.0, 0.5, 0.4, 0.3, 0.2]}
    assert plot_loss(history, ax=ax, label="run A") is figure
    np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), history["step"])
    plot_loss(torch.tensor([2.0, 1.0, 0.5, 0.2, 0.1]), ax=ax, label="run B")
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["run A", "run B"]
    with pytest.raises(ValueError, match="'loss'"):
        plot_loss({"accuracy": [1.0]})


def test_plot_trajectory_titles_frames_by_timestep():
    states = torch.randn(11, 2, 1, 6, 6)
    trajectory = Trajectory(states, torch.tensor([*range(90, -1, -10), -1]))
    figure = plot_trajectory(trajectory, num_frames=5, sample_index=1)
    assert len(figure.axes) == 5
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["t = 90", "t = 70", "t = 40", "t = 10", "sample"]
    for ax, index in zip(figure.axes, [0, 2, 5, 8, 10], strict=True):
        np.testing.assert_array_equal(ax.images[0].get_array(), states[index, 1, 0].numpy())
    assert figure.axes[0].get_ylabel() == r"$x_t$"
    labelled = plot_trajectory(trajectory, num_frames=5, label=r"$D(z_t)$")
    assert labelled.axes[0].get_ylabel() == r"$D(z_t)$"
    with pytest.raises(ValueError, match="sample_index"):
        plot_trajectory(trajectory, sample_index=2)


@pytest.mark.parametrize(
    "not_a_trajectory",
    [
        (torch.zeros(2, 1, 4, 4), Trajectory(torch.zeros(3, 2, 1, 4, 4), torch.tensor([2, 1, -1]))),
        torch.zeros(3, 2, 1, 4, 4),
    ],
    ids=["the pair a sampler returns", "a tensor"],
)
def test_plot_trajectory_asks_for_a_trajectory(not_a_trajectory):
    with pytest.raises(TypeError, match=r"expected a Trajectory.*: pass the second"):
        plot_trajectory(not_a_trajectory)


def test_plot_trajectory_titles_flow_times():
    trajectory = Trajectory(torch.randn(5, 1, 1, 4, 4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    figure = plot_trajectory(trajectory, num_frames=5)
    assert [ax.get_title() for ax in figure.axes] == [
        "t = 1.00",
        "t = 0.75",
        "t = 0.50",
        "t = 0.25",
        "sample",
    ]
    plt.close("all")


def test_pixel_histogram_matches_numpy_and_the_normal_density():
    noise = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    figure = pixel_histogram({"t = 0": noise * 0.1, "t = T": noise}, bins=40)
    assert [ax.get_title() for ax in figure.axes] == ["t = 0", "t = T"]
    ax = figure.axes[1]
    assert ax.get_xlabel() == "pixel value" and ax.get_ylabel() == "density"
    (stairs,) = ax.patches
    counts, edges = np.histogram(noise.numpy(), bins=40, range=(-4, 4))
    np.testing.assert_allclose(stairs.get_data().values, counts / (noise.numel() * 0.2))
    # Standard normal samples: the bars follow the drawn N(0, 1) curve at the bin centres.
    centres = (edges[:-1] + edges[1:]) / 2
    normal = np.exp(-0.5 * centres**2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(stairs.get_data().values, normal, atol=0.02)


def test_pixel_histogram_legend_names_what_it_counts():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    default = pixel_histogram(values).axes[0].get_legend()
    assert [text.get_text() for text in default.get_texts()] == ["pixels", "N(0, 1)"]
    latents = pixel_histogram({"latents": values}, label="values").axes[0].get_legend()
    assert [text.get_text() for text in latents.get_texts()] == ["values", "N(0, 1)"]
    plt.close("all")


def test_plot_loss_reads_a_training_result() -> None:
    from diffusion_lib.training import TrainingHistory

    history = TrainingHistory(loss=[1.0, 0.5, 0.25, 0.2], images_per_second=100.0)

    class Result:
        pass

    result = Result()
    result.history = history
    for source in (history, result, {"loss": history.loss}):
        figure = plot_loss(source, smoothing=2)
        raw = figure.axes[0].get_lines()[0]
        np.testing.assert_allclose(raw.get_ydata(), history.loss)
        plt.close(figure)


def test_the_slider_and_the_plane_figures_are_importable_from_plotting_too():
    assert plotting.timestep_slider is slider.timestep_slider
    assert plotting.slider_timesteps is slider.slider_timesteps
    for name in ("plot_points", "plot_score_field", "plot_paths"):
        assert getattr(plotting, name) is getattr(plane, name)
    assert all(hasattr(plotting, name) for name in plotting.__all__)


@pytest.mark.parametrize("value_range", [(1.0, -1.0), (0.0, 0.0)])
def test_a_reversed_or_empty_value_range_is_refused(value_range) -> None:
    images = torch.zeros(2, 1, 4, 4)
    trajectory = Trajectory(torch.zeros(3, 1, 1, 4, 4), torch.tensor([2, 1, -1]))
    with pytest.raises(ValueError, match=r"value_range must be \(low, high\) with high > low"):
        show_grid(images, value_range=value_range)
    with pytest.raises(ValueError, match=r"value_range must be \(low, high\) with high > low"):
        plot_trajectory(trajectory, value_range=value_range)
