"""Figures for the chapters: image grids, schedules, loss curves, trajectories and the timestep slider.

Every function takes what it draws as arguments and returns the matplotlib ``Figure`` it drew
on (the timestep slider returns something a notebook can display). Images are tensors of
shape (N, C, H, W) with C = 1 or 3, in ``value_range`` (the book's default is (-1, 1)).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import StepPatch
from torch import Tensor
from torchvision.utils import make_grid

from diffusion_lib.data import to_unit_interval
from diffusion_lib.sampling import Trajectory
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.validation import check_choice, check_positive_int

HISTOGRAM_LIMITS = (-4.0, 4.0)
MAX_SLIDER_IMAGES = 12


def _check_images(images: Tensor) -> Tensor:
    """Return ``images`` (N, C, H, W) on the CPU, detached, or raise ``ValueError``."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"images must be a tensor of shape (N, C, H, W) with C = 1 or 3, got {shape}"
        )
    return images.detach().cpu().float()


def _image_display(image: Tensor, value_range: tuple[float, float]) -> tuple[np.ndarray, dict]:
    """One (C, H, W) image as an array for ``imshow`` and its keyword arguments.

    Grey images keep their values (so a drawn image can be compared with the tensor) and are
    mapped to grey levels through ``vmin``/``vmax``; colour images are mapped onto [0, 1].
    """
    options = {"interpolation": "nearest"}  # crisp pixels, and PNGs that compress well
    if image.shape[0] == 1:
        low, high = value_range
        return image[0].numpy(), {**options, "cmap": "gray", "vmin": low, "vmax": high}
    return to_unit_interval(image, value_range).permute(1, 2, 0).numpy(), options


def _hide_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    figure, ax = plt.subplots(figsize=figsize, layout="constrained")
    return figure, ax


def show_grid(
    images: Tensor,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    nrow: int = 8,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Draw images (N, C, H, W) as one grid, ``nrow`` images per row (torchvision's ``make_grid``).

    Pixels are mapped from ``value_range`` onto grey levels. Draws on ``ax`` when given.
    Returns the figure.
    """
    images = _check_images(images)
    nrow = check_positive_int("nrow", nrow)
    grid = make_grid(to_unit_interval(images, value_range), nrow=nrow, padding=2, pad_value=1.0)
    rows = math.ceil(images.shape[0] / nrow)
    figure, ax = _new_axes(ax, (min(nrow, images.shape[0]) * 0.9 + 0.4, rows * 0.9 + 0.6))
    ax.imshow(grid.permute(1, 2, 0).numpy(), vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title if title is not None else f"{images.shape[0]} images")
    _hide_ticks(ax)
    return figure


def plot_schedules(schedules: Mapping[str, NoiseSchedule]) -> Figure:
    """Three panels against the timestep t: beta_t and SNR(t) on log scales, alpha-bar_t linear.

    ``schedules`` maps a label (``"linear"``, ...) to a :class:`NoiseSchedule`. Returns the figure.
    """
    if not schedules:
        raise ValueError("schedules must map at least one name to a NoiseSchedule")
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
    ``"losses"``) entry and optionally ``"step"``; or an object with a ``losses`` attribute
    (and optionally ``steps``). ``smoothing`` is the window of the moving average in steps
    (shortened for short runs). Draws on ``ax`` when given. Returns the figure.
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
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend()
    return figure


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
) -> Figure:
    """One sample's way from noise to image: ``num_frames`` evenly spaced states in a row.

    ``trajectory.states``: (S + 1, B, C, H, W), ``trajectory.timesteps``: (S + 1,) with -1 for
    the finished sample, or float times in [0, 1] from a flow sampler. Each frame is titled by
    its timestep. Returns the figure.
    """
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
    axes[0, 0].set_ylabel(r"$x_t$")
    figure.suptitle("from noise to image", y=1.02)
    return figure


def _normal_density(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


def _density(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Histogram heights normalised by all values (those outside the edges included)."""
    counts, _ = np.histogram(values, bins=edges)
    return counts / (values.size * np.diff(edges))


def _setup_histogram(ax: Axes, edges: np.ndarray, ylim: float) -> StepPatch:
    """Empty pixel histogram with the N(0, 1) density on ``ax``; returns the bars' artist."""
    stairs = ax.stairs(np.zeros(len(edges) - 1), edges, fill=True, alpha=0.7, label="pixels")
    grid = np.linspace(edges[0], edges[-1], 200)
    ax.plot(grid, _normal_density(grid), color="black", linewidth=1.2, label="N(0, 1)")
    ax.set(xlim=(edges[0], edges[-1]), ylim=(0, ylim), xlabel="pixel value", ylabel="density")
    return stairs


def pixel_histogram(
    images: Tensor | Mapping[str, Tensor],
    *,
    bins: int = 60,
    ylim: float = 1.0,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Histogram of pixel values against the N(0, 1) density on [-4, 4].

    ``images``: a tensor of any shape, or a mapping from a panel title to a tensor, which draws
    one panel per entry side by side. The density axis is cut at ``ylim`` so that panels
    compare (the background spike of clean images rises above it). Returns the figure.
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
        stairs = _setup_histogram(ax_, edges, ylim)
        stairs.set_data(values=_density(values.detach().cpu().double().reshape(-1).numpy(), edges))
        ax_.set_title(name)
    axes[0].legend(loc="upper right", fontsize=8)
    return figure


# ---------------------------------------------------------------------------- timestep slider
def slider_timesteps(timesteps: int, count: int = 24) -> list[int]:
    """``count`` timesteps from 0 to T - 1, denser at small t (t grows with the square of the index).

    The forward process changes the image fastest early on, so a static slider spends more
    frames there. Returns a sorted list of distinct 0-based timesteps.
    """
    check_positive_int("count", count)
    fractions = np.linspace(0.0, 1.0, count) ** 2
    return sorted({int(round(f * (timesteps - 1))) for f in fractions})


class _ForwardProcessDrawing:
    """The drawing both sliders share: a row of x_t ~ q(x_t | x_0) and its pixel histogram.

    Built once; :meth:`draw` updates the artists in place for a new timestep or schedule, so
    an animation frame and a widget redraw are the same code.
    """

    def __init__(self, images: Tensor, noise: Tensor, value_range: tuple[float, float], dpi: int):
        self.images, self.noise, self.value_range = images, noise, value_range
        count = images.shape[0]
        # Whole, even pixel counts: the animation writer would otherwise resize the figure.
        width, height = (2 * math.ceil(size * dpi / 2) / dpi for size in (1.1 * count + 3.45, 1.65))
        self.figure = Figure(figsize=(width, height), dpi=dpi)

        def inches(left: float, bottom: float, w: float, h: float) -> Axes:
            # Fixed rectangles (no automatic layout), so panels never move between frames.
            return self.figure.add_axes((left / width, bottom / height, w / width, h / height))

        self.image_axes = [inches(0.35 + 1.1 * i, 0.15, 1.0, 1.0) for i in range(count)]
        self.image_artists = []
        for ax, image in zip(self.image_axes, images, strict=True):
            array, options = _image_display(image, value_range)
            self.image_artists.append(ax.imshow(array, **options))
            _hide_ticks(ax)
        self.image_axes[0].set_ylabel(r"$x_t$")
        self.histogram_axes = inches(1.1 * count + 1.0, 0.45, 2.3, 0.75)
        self.edges = np.linspace(*HISTOGRAM_LIMITS, 61)
        self.stairs = _setup_histogram(self.histogram_axes, self.edges, ylim=1.0)
        self.histogram_axes.legend(loc="upper right", fontsize=7)
        self.title = self.figure.suptitle("", x=0.35 / width, y=0.98, ha="left", fontsize=11)

    def noisy(self, schedule: NoiseSchedule, t: int) -> Tensor:
        """x_t = q_sample(x_0, t) with the fixed noise, shape (N, C, H, W)."""
        steps = torch.full((self.images.shape[0],), int(t), dtype=torch.long)
        return schedule.q_sample(self.images, steps, self.noise)

    def draw(self, schedule: NoiseSchedule, t: int, name: str) -> None:
        x_t = self.noisy(schedule, t)
        for artist, image in zip(self.image_artists, x_t, strict=True):
            artist.set_data(_image_display(image, self.value_range)[0])
        values = x_t.double().reshape(-1).numpy()
        self.stairs.set_data(values=_density(values, self.edges))
        alpha_bar = float(schedule.alphas_cumprod[t])
        label = f"{name} schedule, " if name else ""
        self.title.set_text(rf"{label}t = {t}:  $\bar\alpha_t$ = {alpha_bar:.3f}")
        self.histogram_axes.set_title(
            f"mean {values.mean():+.2f}, std {values.std():.2f}", fontsize=9
        )

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png")
        return buffer.getvalue()


def _static_slider(
    drawing: _ForwardProcessDrawing,
    schedule: NoiseSchedule,
    name: str,
    timesteps: Sequence[int],
    embed_limit_mb: float,
) -> Any:
    """Precomputed frames in an HTML page element whose slider needs no running kernel."""
    from IPython.display import HTML
    from matplotlib import rc_context
    from matplotlib.animation import FuncAnimation

    def draw_frame(t: int) -> None:
        drawing.draw(schedule, int(t), name)

    animation = FuncAnimation(drawing.figure, draw_frame, frames=list(timesteps), interval=400)
    with rc_context({"animation.embed_limit": embed_limit_mb, "animation.frame_format": "png"}):
        html = animation.to_jshtml(default_mode="once")
    frames = html.count("data:image/png;base64,")
    if frames != len(timesteps):
        raise ValueError(
            f"only {frames} of {len(timesteps)} frames fit in embed_limit_mb={embed_limit_mb}; "
            "show fewer timesteps or images, or lower dpi"
        )
    return HTML(html)


def _live_slider(
    drawing: _ForwardProcessDrawing, schedules: Mapping[str, NoiseSchedule], name: str
) -> Any:
    """An ipywidgets UI: a schedule dropdown and a timestep slider that redraw the figure.

    The returned ``VBox`` also exposes its parts as ``.slider``, ``.dropdown``, ``.picture``
    (the ``Image`` widget showing the PNG) and ``.figure`` (the matplotlib figure drawn on).
    """
    import ipywidgets as widgets

    dropdown = widgets.Dropdown(options=list(schedules), value=name, description="schedule")
    slider = widgets.IntSlider(value=0, min=0, max=schedules[name].timesteps - 1, description="t")
    picture = widgets.Image(format="png")

    def redraw(_change: object = None) -> None:
        schedule = schedules[dropdown.value]
        slider.max = schedule.timesteps - 1
        drawing.draw(schedule, slider.value, dropdown.value)
        picture.value = drawing.png()

    slider.observe(redraw, names="value")
    dropdown.observe(redraw, names="value")
    redraw()
    ui = widgets.VBox([widgets.HBox([dropdown, slider]), picture])
    ui.slider, ui.dropdown, ui.picture, ui.figure = slider, dropdown, picture, drawing.figure
    return ui


def timestep_slider(
    images: Tensor,
    schedules: NoiseSchedule | Mapping[str, NoiseSchedule],
    *,
    schedule: str | None = None,
    timesteps_to_show: Sequence[int] | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    interactive: bool | None = None,
    noise: Tensor | None = None,
    seed: int = 0,
    dpi: int = 72,
    embed_limit_mb: float = 3.0,
) -> Any:
    """Watch q(x_t | x_0) destroy a few images as t grows, with their pixel histogram.

    Each view draws ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` (Ho et al.
    2020, eq. 4, via :meth:`NoiseSchedule.q_sample`) with one fixed ``noise`` (N, C, H, W),
    drawn from ``seed`` when omitted, so that moving the slider changes only t.

    Args:
        images: x_0, a few images (N, C, H, W), say 4 to 8, in ``value_range``.
        schedules: one schedule, or a mapping from names to schedules.
        schedule: the name shown first (default: the first in ``schedules``).
        timesteps_to_show: the static version's frames (default: 24 timesteps, denser at small
            t, from :func:`slider_timesteps`).
        interactive: ``True`` returns an ipywidgets UI (a timestep ``IntSlider`` over 0..T-1 and a
            schedule ``Dropdown``) for a running kernel. ``False`` or ``None`` (the default)
            returns ``IPython.display.HTML`` holding precomputed PNG frames of ``schedule`` and a
            slider that works in a static page (matplotlib's ``to_jshtml``). The static version
            is the default because it displays everywhere: in the built book, in saved
            notebooks, and in a live kernel.
        dpi, embed_limit_mb: size of the static frames and the cap on their total size in MB.
    """
    if isinstance(schedules, NoiseSchedule):
        schedules = {"": schedules}
    if not schedules:
        raise ValueError("schedules must hold at least one NoiseSchedule")
    name = (
        check_choice("schedule", schedule, list(schedules)) if schedule else next(iter(schedules))
    )
    images = _check_images(images)
    if images.shape[0] > MAX_SLIDER_IMAGES:
        raise ValueError(f"show a few images (at most {MAX_SLIDER_IMAGES}), got {images.shape[0]}")
    if noise is None:
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    drawing = _ForwardProcessDrawing(images, noise.detach().cpu().float(), value_range, dpi)
    if interactive:
        return _live_slider(drawing, schedules, name)
    last = schedules[name].timesteps - 1
    timesteps = [int(t) for t in (timesteps_to_show or slider_timesteps(last + 1))]
    if not all(0 <= t <= last for t in timesteps):
        raise ValueError(f"timesteps_to_show must lie in 0..{last} (0-based), got {timesteps}")
    return _static_slider(drawing, schedules[name], name, timesteps, embed_limit_mb)


__all__ = [
    "moving_average",
    "pixel_histogram",
    "plot_loss",
    "plot_schedules",
    "plot_trajectory",
    "show_grid",
    "slider_timesteps",
    "timestep_slider",
]


# ------------------------------------------------------------------ points in the plane
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
    grid, over the filled contours of ``log_density((N, 2)) -> (N,)`` when given.

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
