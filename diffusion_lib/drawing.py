"""The pieces the figures share: checked image tensors and schedules, one image on an axes,
fresh axes, and the bars of a pixel histogram against the N(0, 1) density.

:mod:`diffusion_lib.plotting`, :mod:`diffusion_lib.slider` and :mod:`diffusion_lib.plane`
draw with these, so an image looks the same in a grid, a trajectory and the timestep slider.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import StepPatch
from torch import Tensor

from diffusion_lib.data import to_unit_interval
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.validation import check_range

HISTOGRAM_LIMITS = (-4.0, 4.0)


def _check_images(images: Tensor) -> Tensor:
    """Return ``images`` (N, C, H, W) on the CPU, detached, or raise ``ValueError``."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"images must be a tensor of shape (N, C, H, W) with C = 1 or 3, got {shape}"
        )
    return images.detach().cpu().float()


def _schedules_by_name(
    schedules: NoiseSchedule | Mapping[str, NoiseSchedule],
) -> dict[str, NoiseSchedule]:
    """``schedules`` as a dict {name: NoiseSchedule}, a single schedule under the name ""; else
    ``TypeError`` (a wrong kind of argument) or ``ValueError`` (an empty mapping)."""
    if isinstance(schedules, NoiseSchedule):
        return {"": schedules}
    if not isinstance(schedules, Mapping):
        raise TypeError(
            "schedules must be a NoiseSchedule or a dict {name: NoiseSchedule}; "
            f"got {type(schedules).__name__}"
        )
    if not schedules:
        raise ValueError("schedules must hold at least one NoiseSchedule")
    for name, schedule in schedules.items():
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(
                f"schedules[{name!r}] must be a NoiseSchedule, got {type(schedule).__name__}"
            )
    return dict(schedules)


def _image_display(image: Tensor, value_range: tuple[float, float]) -> tuple[np.ndarray, dict]:
    """One (C, H, W) image as an array for ``imshow`` and its keyword arguments.

    Grey images keep their values (so a drawn image can be compared with the tensor) and are
    mapped to grey levels through ``vmin``/``vmax``; colour images are mapped onto [0, 1].
    """
    options = {"interpolation": "nearest"}  # crisp pixels, and PNGs that compress well
    if image.shape[0] == 1:
        low, high = check_range("value_range", value_range)
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


def _normal_density(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


def _density(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Histogram heights normalised by all values (those outside the edges included)."""
    counts, _ = np.histogram(values, bins=edges)
    return counts / (values.size * np.diff(edges))


def _setup_histogram(ax: Axes, edges: np.ndarray, ylim: float, label: str = "pixels") -> StepPatch:
    """Empty histogram of ``label`` with the N(0, 1) density on ``ax``; returns the bars' artist."""
    stairs = ax.stairs(np.zeros(len(edges) - 1), edges, fill=True, alpha=0.7, label=label)
    grid = np.linspace(edges[0], edges[-1], 200)
    ax.plot(grid, _normal_density(grid), color="black", linewidth=1.2, label="N(0, 1)")
    ax.set(xlim=(edges[0], edges[-1]), ylim=(0, ylim), xlabel="pixel value", ylabel="density")
    return stairs
