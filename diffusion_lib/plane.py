"""Figures of points in the plane: 2-D samples, a score or velocity field, and sampler paths.

The toy chapters train on points (N, 2) rather than images; these figures draw them in a
square with labelled axes ``x_1`` and ``x_2``, so that a model's samples, the field it
learned and the paths of a sampler can be compared panel by panel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from diffusion_lib.drawing import _new_axes
from diffusion_lib.sampling import Trajectory
from diffusion_lib.validation import check_positive_int


def _check_points_2d(name: str, points: Tensor) -> np.ndarray:
    if not isinstance(points, Tensor) or points.dim() != 2 or points.shape[1] != 2:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"{name} must be 2-D points of shape (N, 2), got {shape}")
    return points.detach().cpu().double().numpy()


def _plane_axes(ax: Axes, limits: tuple[float, float], title: str | None) -> None:
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    if title:
        ax.set_title(title)


def plot_points(
    points: Tensor,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    limits: tuple[float, float] = (-2.0, 2.0),
    color: str = "C0",
) -> Figure:
    """A scatter plot of points (N, 2) in the square ``limits`` x ``limits``. Returns the figure."""
    array = _check_points_2d("points", points)
    figure, ax = _new_axes(ax, (3.2, 3.2))
    ax.scatter(array[:, 0], array[:, 1], s=2, alpha=0.4, color=color, linewidths=0)
    _plane_axes(ax, limits, title)
    return figure


def plot_score_field(
    score: Any,
    *,
    log_density: Any = None,
    ax: Axes | None = None,
    title: str | None = None,
    limits: tuple[float, float] = (-2.0, 2.0),
    arrows: int = 21,
    directions_only: bool = False,
) -> Figure:
    """Arrows of a vector field ``score((N, 2) points) -> (N, 2)`` on an ``arrows`` x ``arrows``
    grid, over the filled contours of the density ``exp(log_density(points))`` when
    ``log_density((N, 2)) -> (N,)`` is given.

    Arrows are scaled together so that the longest spans one grid cell, or, with
    ``directions_only``, all drawn at one length. Returns the figure.
    """
    count = check_positive_int("arrows", arrows)
    figure, ax = _new_axes(ax, (3.2, 3.2))
    if log_density is not None:
        fine = torch.linspace(*limits, 200, dtype=torch.float64)
        x, y = torch.meshgrid(fine, fine, indexing="xy")
        values = log_density(torch.stack([x.flatten(), y.flatten()], dim=1)).exp()
        ax.contourf(
            x.numpy(), y.numpy(), values.reshape(x.shape).detach().cpu().numpy(), 20, cmap="Greys"
        )
    coarse = torch.linspace(*limits, count, dtype=torch.float64)
    x, y = torch.meshgrid(coarse, coarse, indexing="xy")
    grid = torch.stack([x.flatten(), y.flatten()], dim=1)
    vectors = _check_points_2d("score(points)", score(grid))
    lengths = np.linalg.norm(vectors, axis=1, keepdims=True)
    cell = (limits[1] - limits[0]) / max(count - 1, 1)
    if directions_only:
        vectors = vectors / np.maximum(lengths, 1e-12) * 0.8 * cell
    else:
        vectors = vectors / max(lengths.max(), 1e-12) * cell
    ax.quiver(
        grid[:, 0].numpy(),
        grid[:, 1].numpy(),
        vectors[:, 0],
        vectors[:, 1],
        color="C1",
        angles="xy",
        scale_units="xy",
        scale=1.0,
        width=0.004,
    )
    _plane_axes(ax, limits, title)
    return figure


def plot_paths(
    trajectory: Trajectory,
    *,
    count: int = 200,
    ax: Axes | None = None,
    title: str | None = None,
    limits: tuple[float, float] = (-2.5, 2.5),
) -> Figure:
    """The paths of the first ``count`` points of a 2-D sampler run, from noise to sample.

    ``trajectory.states``: (S + 1, N, 2). Each path is a thin line; its start (the noise) is a
    grey dot and its end (the sample) a coloured one. Returns the figure.
    """
    states = trajectory.states
    if states.dim() != 3 or states.shape[2] != 2:
        raise ValueError(
            f"trajectory.states must have shape (S + 1, N, 2), got {tuple(states.shape)}"
        )
    shown = states[:, : check_positive_int("count", count)].detach().cpu().double().numpy()
    figure, ax = _new_axes(ax, (3.6, 3.6))
    ax.plot(shown[:, :, 0], shown[:, :, 1], color="C0", alpha=0.35, linewidth=0.7)
    ax.scatter(shown[0, :, 0], shown[0, :, 1], s=5, color="grey", label="noise")
    ax.scatter(shown[-1, :, 0], shown[-1, :, 1], s=5, color="C3", label="sample", zorder=3)
    ax.legend(loc="lower right", fontsize=8, markerscale=2)
    _plane_axes(ax, limits, title)
    return figure
