"""Figures for the chapters: image grids, schedules, loss curves, trajectories and pixel histograms.

Every function takes what it draws as arguments and returns the matplotlib ``Figure`` it drew
on. Images are tensors of shape (N, C, H, W) with C = 1 or 3, in ``value_range`` (the book's
default is (-1, 1)).

The timestep slider (:mod:`diffusion_lib.slider`) and the figures of points in the plane
(:mod:`diffusion_lib.plane`) live in their own modules and are importable from here as well.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from torch import Tensor
from torchvision.utils import make_grid

from diffusion_lib.data import to_unit_interval
from diffusion_lib.drawing import (
    HISTOGRAM_LIMITS,
    _check_images,
    _density,
    _hide_ticks,
    _image_display,
    _new_axes,
    _schedules_by_name,
    _setup_histogram,
)
from diffusion_lib.plane import plot_paths, plot_points, plot_score_field
from diffusion_lib.sampling import Trajectory
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.slider import slider_timesteps, timestep_slider
from diffusion_lib.validation import check_positive_int

__all__ = [
    "moving_average",
    "pixel_histogram",
    "plot_loss",
    "plot_paths",
    "plot_points",
    "plot_schedules",
    "plot_score_field",
    "plot_trajectory",
    "show_grid",
    "slider_timesteps",
    "timestep_slider",
]


def show_grid(
    images: Tensor,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    nrow: int = 8,
    title: str | None = None,
    ax: Axes | None = None,
    pad_value: float = 1.0,
) -> Figure:
    """Draw images (N, C, H, W) as one grid, ``nrow`` images per row (torchvision's ``make_grid``).

    Pixels are mapped from ``value_range`` onto grey levels. The images are separated by lines
    of grey level ``pad_value`` in [0, 1] (white by default; 0.5 keeps them apart from white
    strokes when the tiles are pieces of one image). Draws on ``ax`` when given. Returns the
    figure.
    """
    images = _check_images(images)
    if images.shape[0] == 0:
        raise ValueError("show_grid needs at least one image, got a batch of 0")
    nrow = check_positive_int("nrow", nrow)
    if not 0.0 <= pad_value <= 1.0:
        raise ValueError(f"pad_value is a grey level in [0, 1], got {pad_value}")
    unit_images = to_unit_interval(images, value_range)
    grid = make_grid(unit_images, nrow=nrow, padding=2, pad_value=pad_value)
    rows = math.ceil(images.shape[0] / nrow)
    figure, ax = _new_axes(ax, (min(nrow, images.shape[0]) * 0.9 + 0.4, rows * 0.9 + 0.6))
    ax.imshow(grid.permute(1, 2, 0).numpy(), vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title if title is not None else f"{images.shape[0]} images")
    _hide_ticks(ax)
    return figure


def plot_schedules(schedules: NoiseSchedule | Mapping[str, NoiseSchedule]) -> Figure:
    """Three panels against the timestep t: beta_t and SNR(t) on log scales, alpha-bar_t linear.

    ``schedules``: one :class:`~diffusion_lib.schedules.NoiseSchedule`, or a mapping from a
    label (``"linear"``, ...) to each schedule, named in a legend. Returns the figure.
    """
    schedules = _schedules_by_name(schedules)
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.4), layout="constrained")
    panels = [
        (r"$\beta_t$", "noise variance added per step", lambda s: s.betas),
        (r"$\bar\alpha_t$", "signal kept", lambda s: s.alphas_cumprod),
        (r"SNR$(t) = \bar\alpha_t / (1 - \bar\alpha_t)$", "signal-to-noise ratio", None),
    ]
    for ax, (ylabel, title, values) in zip(axes, panels, strict=True):
        for name, schedule in schedules.items():
            y = schedule.signal_to_noise_ratio if values is None else values(schedule)
            ax.plot(np.arange(schedule.timesteps), y.cpu().numpy(), label=name)
        ax.set_xlabel("timestep t")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    axes[1].set_ylim(-0.02, 1.02)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    if any(name != "" for name in schedules):  # a single schedule has no name to show
        axes[0].legend()
    return figure


def _losses_and_steps(history_or_losses: Any) -> tuple[np.ndarray, np.ndarray]:
    """Losses and step numbers from a training result or history, a dict, or a plain sequence."""
    history = getattr(history_or_losses, "history", history_or_losses)  # a TrainingResult
    steps = None
    if isinstance(history, Mapping):
        key = next((k for k in ("loss", "losses") if k in history), None)
        if key is None:
            raise ValueError(
                f"a loss history needs a 'loss' or 'losses' entry; got keys {list(history)}"
            )
        losses, steps = history[key], history.get("step")
    elif hasattr(history, "loss"):  # a TrainingHistory
        losses = history.loss
    else:
        losses = history
    losses = np.asarray(torch.as_tensor(losses, dtype=torch.float64).cpu()).reshape(-1)
    if losses.size == 0:
        raise ValueError("there are no losses to plot")
    steps = np.arange(1, losses.size + 1) if steps is None else np.asarray(steps).reshape(-1)
    if steps.size != losses.size:
        raise ValueError(f"got {steps.size} steps for {losses.size} losses")
    return losses, steps


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Means of ``window`` consecutive values, shape (len(values) - window + 1,)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return (sums[window:] - sums[:-window]) / window


def plot_loss(
    history_or_losses: Any,
    *,
    smoothing: int = 100,
    ax: Axes | None = None,
    label: str | None = None,
) -> Figure:
    """Training loss against the step on a log scale: raw values, faint, and a moving average.

    ``history_or_losses``: a sequence or 1-D tensor of losses; a mapping with a ``"loss"`` (or
    ``"losses"``) entry and optionally ``"step"``; a
    :class:`~diffusion_lib.trainer.TrainingHistory` (an object with a ``loss`` attribute); or a
    :class:`~diffusion_lib.training.TrainingResult`, read through its ``history``.
    ``smoothing`` is the window of the moving average in steps (shortened for short runs). Draws on ``ax`` when given. Returns the figure.
    """
    losses, steps = _losses_and_steps(history_or_losses)
    window = min(check_positive_int("smoothing", smoothing), max(1, losses.size // 5))
    figure, ax = _new_axes(ax, (6, 3.5))
    raw = ax.plot(steps, losses, alpha=0.3, linewidth=0.8)[0]
    name = label if label is not None else "loss"
    if window > 1:
        average = moving_average(losses, window)
        label = f"{name} (mean of {window} steps)"
        ax.plot(steps[window - 1 :], average, color=raw.get_color(), label=label)
    else:
        raw.set_label(name)
    ax.set_yscale("log")
    _label_log_axis(ax)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend()
    return figure


_LOG_TICK_MULTIPLES = ((1.0, 2.0, 5.0), tuple(float(k) for k in range(1, 10)))


def _label_log_axis(ax: Axes) -> None:
    """Give a log-scaled y axis at least three labelled ticks where its data allow.

    Matplotlib labels only the powers of ten, which leaves one labelled tick, or none, on the
    loss curves of short runs. Where fewer than three powers of ten lie within the data on
    ``ax``, ticks go at 1, 2 and 5 times each power of ten, or at every multiple from 1 to 9.
    """
    low, high = ax.dataLim.intervaly
    if not 0 < low < high:
        return
    exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)

    def ticks_inside(multiples: tuple[float, ...]) -> int:
        return sum(low <= m * 10.0**e <= high for e in exponents for m in multiples)

    if ticks_inside((1.0,)) >= 3:
        return
    multiples = next(
        (m for m in _LOG_TICK_MULTIPLES if ticks_inside(m) >= 3), _LOG_TICK_MULTIPLES[-1]
    )
    ax.yaxis.set_major_locator(LogLocator(subs=multiples))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _state_title(timesteps: Tensor, index: int) -> str:
    """ "t = 250" for a diffusion timestep, "t = 0.25" for a flow's time, "sample" at the end."""
    if timesteps.dtype.is_floating_point:
        last = index == len(timesteps) - 1
        return "sample" if last else f"t = {float(timesteps[index]):.2f}"
    step = int(timesteps[index])
    return "sample" if step < 0 else f"t = {step}"


def plot_trajectory(
    trajectory: Trajectory,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    num_frames: int = 10,
    sample_index: int = 0,
    label: str = r"$x_t$",
) -> Figure:
    """One sample's way from noise to image: ``num_frames`` evenly spaced states in a row.

    ``trajectory.states``: (S + 1, B, C, H, W), ``trajectory.timesteps``: (S + 1,) with -1 for
    the finished sample, or float times in [0, 1] from a flow sampler. Each frame is titled by
    its timestep, and ``label`` names the row (e.g. the decoder's image of a latent ``z_t``).
    Returns the figure.
    """
    if not (hasattr(trajectory, "states") and hasattr(trajectory, "timesteps")):
        raise TypeError(
            f"expected a Trajectory, got {type(trajectory).__name__}; "
            "ddpm_sample(..., return_trajectory=True) returns (samples, trajectory): pass the second"
        )
    states, timesteps = trajectory.states, trajectory.timesteps
    if not 0 <= sample_index < states.shape[1]:
        raise ValueError(f"sample_index must lie in 0..{states.shape[1] - 1}, got {sample_index}")
    count = min(check_positive_int("num_frames", num_frames), states.shape[0])
    chosen = np.unique(np.linspace(0, states.shape[0] - 1, count).round().astype(int))
    frames = _check_images(states[chosen.tolist(), sample_index])
    figure, axes = plt.subplots(1, len(chosen), figsize=(1.3 * len(chosen), 1.9), squeeze=False)
    for ax, frame, index in zip(axes[0], frames, chosen, strict=True):
        array, options = _image_display(frame, value_range)
        ax.imshow(array, **options)
        ax.set_title(_state_title(timesteps, index), fontsize=10)
        _hide_ticks(ax)
    axes[0, 0].set_ylabel(label)
    figure.suptitle("from noise to image", y=1.02)
    return figure


def pixel_histogram(
    images: Tensor | Mapping[str, Tensor],
    *,
    bins: int = 60,
    ylim: float = 1.0,
    ax: Axes | None = None,
    title: str | None = None,
    label: str = "pixels",
) -> Figure:
    """Histogram of pixel values against the N(0, 1) density on [-4, 4].

    ``images``: a tensor of any shape, or a mapping from a panel title to a tensor, which draws
    one panel per entry side by side. The density axis is cut at ``ylim`` so that panels
    compare (the background spike of clean images rises above it). ``label`` names the
    histogram in the legend, e.g. ``"values"`` for latents. Returns the figure.
    """
    panels = images if isinstance(images, Mapping) else {title or "pixel values": images}
    if ax is not None and len(panels) != 1:
        raise ValueError("ax draws one panel; pass a single tensor, not a mapping, with ax")
    if ax is None:
        size = (3 * len(panels), 2.8)
        figure, grid = plt.subplots(1, len(panels), figsize=size, sharey=True, squeeze=False)
        figure.set_layout_engine("constrained")
        axes = list(grid[0])
    else:
        figure, axes = ax.figure, [ax]
    edges = np.linspace(*HISTOGRAM_LIMITS, check_positive_int("bins", bins) + 1)
    for ax_, (name, values) in zip(axes, panels.items(), strict=True):
        stairs = _setup_histogram(ax_, edges, ylim, label)
        stairs.set_data(values=_density(values.detach().cpu().double().reshape(-1).numpy(), edges))
        ax_.set_title(name)
    axes[0].legend(loc="upper right", fontsize=8)
    return figure
