"""Input checks shared by the public functions: each failure says what was wrong and what is allowed."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer, a Python or a NumPy one, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_integer_tensor(x: Tensor) -> bool:
    """Whether ``x`` holds integers: neither floating-point, complex nor bool."""
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def check_timesteps(
    t: Tensor, timesteps: int, batch_size: int | None = None, *, values: bool | None = True
) -> None:
    """Raise ``ValueError`` unless ``t`` is an integer tensor of shape (B,) with values in 0..T-1.

    ``values=False`` checks only dtype and shape: reading the values of a GPU tensor makes the
    CPU wait for the GPU, which a model's forward pass should not do at every training step.
    ``values=None`` reads them only where that costs nothing, on the CPU.
    """
    if not isinstance(t, Tensor):
        raise ValueError(f"t must be an int64 tensor of shape (B,), got {type(t).__name__}")
    if not is_integer_tensor(t):
        raise ValueError(f"t must hold integer timesteps (int64), got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got shape {tuple(t.shape)}")
    if batch_size is not None and t.shape[0] != batch_size:
        raise ValueError(
            f"t has {t.shape[0]} entries but the batch has {batch_size}; give one timestep per sample"
        )
    if values is None:
        values = t.device.type == "cpu"
    if values and t.numel() and (int(t.min()) < 0 or int(t.max()) >= timesteps):
        raise ValueError(
            f"timesteps must lie in 0..{timesteps - 1} (0-based, T={timesteps}); "
            f"got values from {int(t.min())} to {int(t.max())}"
        )


def check_model_times(t: Tensor, timesteps: int, batch_size: int, *, values: bool = True) -> None:
    """What a network accepts as its time input: 0-based integer timesteps (see
    :func:`check_timesteps`) or real times in [0, T], such as a flow's ``1000 t``."""
    if not (isinstance(t, Tensor) and t.dtype.is_floating_point):
        check_timesteps(t, timesteps, batch_size, values=values)
        return
    if t.shape != (batch_size,):
        raise ValueError(
            f"t must have shape ({batch_size},), one time per sample; got {tuple(t.shape)}"
        )
    if values and t.numel() and (float(t.min()) < 0 or float(t.max()) > timesteps):
        raise ValueError(
            f"real-valued times must lie in [0, {timesteps}]; "
            f"got values from {float(t.min())} to {float(t.max())}"
        )


def check_finite(name: str, x: Tensor) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinite values."""
    if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} must be finite, but {bad} of its {x.numel()} values are NaN or inf"
        )


def check_same_shape(
    name: str, x: Tensor, reference_name: str, reference: Tensor, *, hint: str = ""
) -> None:
    """Raise ``ValueError`` unless ``x`` has the shape of ``reference``; ``hint`` ends the message."""
    if x.shape != reference.shape:
        raise ValueError(
            f"{name} must have the shape of {reference_name}, {tuple(reference.shape)}; "
            f"got {tuple(x.shape)}" + (f" ({hint})" if hint else "")
        )


def check_number(
    name: str,
    value: object,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool,
    high_open: bool = True,
) -> float:
    """``value`` as a float if it is a finite number between ``low`` and ``high``, else
    ``ValueError``; ``low_open`` and ``high_open`` say whether each end is excluded."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number and finite, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


def check_range(name: str, value: object) -> tuple[float, float]:
    """``value`` as ``(low, high)`` if it is a pair of finite numbers with high > low, such as a
    pixel range or the range x_0 is clipped to; else ``ValueError``."""
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a pair (low, high) such as (-1.0, 1.0); got {value!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(
            f"{name} must be (low, high) with high > low, both finite, such as (-1.0, 1.0); "
            f"got {value!r}"
        )
    return low, high


def check_positive_int(name: str, value: object, maximum: int | None = None) -> int:
    """``value`` as an int if it is an integer >= 1 (and <= ``maximum``), else ``ValueError``."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return int(value)


def check_choice(name: str, value: object, choices: tuple[str, ...] | list[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")
    return value  # type: ignore[return-value]
