"""The timestep slider: watch q(x_t | x_0) turn a few images into noise as t grows.

:func:`timestep_slider` draws a row of noisy images x_t and their pixel histogram for one t
at a time, either as precomputed frames with a slider that works in a static page (the built
book, a saved notebook) or as ipywidgets that redraw in a running kernel. Both draw with the
same ``_ForwardProcessDrawing``, so they show the same picture.
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from diffusion_lib.drawing import (
    HISTOGRAM_LIMITS,
    _check_images,
    _density,
    _hide_ticks,
    _image_display,
    _schedules_by_name,
    _setup_histogram,
)
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.validation import (
    check_choice,
    check_number,
    check_positive_int,
    is_integer_tensor,
)

MAX_SLIDER_IMAGES = 12


def slider_timesteps(timesteps: int, count: int = 24) -> list[int]:
    """``count`` timesteps from 0 to T - 1, denser at small t (t grows with the square of the index).

    The forward process changes the image fastest early on, so a static slider spends more
    frames there. Returns a sorted list of distinct 0-based timesteps.
    """
    check_positive_int("count", count)
    fractions = np.linspace(0.0, 1.0, count) ** 2
    return sorted({int(round(f * (timesteps - 1))) for f in fractions})


def _frame_timesteps(timesteps_to_show: object, timesteps: int) -> list[int]:
    """The static slider's frames: ``timesteps_to_show`` (one timestep, or a sequence, array or
    tensor of them) as a list of ints in 0..T-1, or :func:`slider_timesteps` when ``None``."""
    if timesteps_to_show is None:
        return slider_timesteps(timesteps)
    allowed = f"integers in 0..{timesteps - 1} (0-based), such as [0, {timesteps // 4}]"
    try:
        if not isinstance(timesteps_to_show, (Tensor, np.ndarray, numbers.Number)):
            timesteps_to_show = list(timesteps_to_show)  # a range, a set, a generator
        shown = torch.as_tensor(timesteps_to_show).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"timesteps_to_show must hold {allowed}; got {timesteps_to_show!r}"
        ) from None
    # Whole numbers such as 250.0 are timesteps too; 0.5 is not, and int() would make it 0.
    whole = is_integer_tensor(shown) or (
        shown.dtype.is_floating_point and bool((shown == shown.round()).all())
    )
    if not whole:
        raise ValueError(f"timesteps_to_show must hold {allowed}; got {shown.tolist()}")
    if shown.numel() == 0:
        raise ValueError(f"timesteps_to_show must hold at least one timestep, {allowed}")
    steps = [int(t) for t in shown.tolist()]
    if not all(0 <= t < timesteps for t in steps):
        raise ValueError(f"timesteps_to_show must lie in 0..{timesteps - 1} (0-based), got {steps}")
    return steps


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
    timesteps_to_show: int | Sequence[int] | Tensor | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    interactive: bool | None = None,
    noise: Tensor | None = None,
    seed: int = 0,
    dpi: int = 72,
    embed_limit_mb: float = 3.0,
) -> Any:
    """Watch q(x_t | x_0) destroy a few images as t grows, with their pixel histogram.

    Each view draws ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` (Ho et al.
    2020, eq. 4, via :meth:`~diffusion_lib.schedules.NoiseSchedule.q_sample`) with one fixed ``noise`` (N, C, H, W),
    drawn from ``seed`` when omitted, so that moving the slider changes only t.

    Args:
        images: x_0, a few images (N, C, H, W), say 4 to 8, in ``value_range``.
        schedules: one schedule, or a mapping from names to schedules.
        schedule: the name shown first (default: the first in ``schedules``).
        timesteps_to_show: the static version's frames, integers in 0..T-1 in a sequence,
            array or tensor, or one integer (default: 24 timesteps, denser at small t, from
            :func:`slider_timesteps`).
        interactive: ``True`` returns an ipywidgets UI (a timestep ``IntSlider`` over 0..T-1 and a
            schedule ``Dropdown``) for a running kernel. ``False`` or ``None`` (the default)
            returns ``IPython.display.HTML`` holding precomputed PNG frames of ``schedule`` and a
            slider that works in a static page (matplotlib's ``to_jshtml``). The static version
            is the default because it displays everywhere: in the built book, in saved
            notebooks, and in a live kernel.
        dpi, embed_limit_mb: size of the static frames and the cap on their total size in MB.
    """
    schedules = _schedules_by_name(schedules)
    name = (
        check_choice("schedule", schedule, list(schedules)) if schedule else next(iter(schedules))
    )
    images = _check_images(images)
    if images.shape[0] == 0:
        raise ValueError("timestep_slider needs at least one image, got a batch of 0")
    if images.shape[0] > MAX_SLIDER_IMAGES:
        raise ValueError(f"show a few images (at most {MAX_SLIDER_IMAGES}), got {images.shape[0]}")
    check_number("dpi", dpi, 0.0, low_open=True)
    if not interactive:
        timesteps = _frame_timesteps(timesteps_to_show, schedules[name].timesteps)
    if noise is None:
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    drawing = _ForwardProcessDrawing(images, noise.detach().cpu().float(), value_range, dpi)
    if interactive:
        return _live_slider(drawing, schedules, name)
    return _static_slider(drawing, schedules[name], name, timesteps, embed_limit_mb)
