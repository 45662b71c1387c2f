"""Input checks shared by the public functions: each failure says what was wrong and what is allowed."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

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
    if not is_integer_tensor(t) or t.dtype == torch.uint8:
        # Indexing with a uint8 tensor selects by mask, so it cannot stand for timesteps either.
        mask = (
            " (a uint8 tensor indexes as a mask); pass t.long()" if t.dtype == torch.uint8 else ""
        )
        raise ValueError(f"t must hold integer timesteps (int64), got dtype {t.dtype}{mask}")
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


def check_model_times(
    t: Tensor, timesteps: int, batch_size: int, *, values: bool | None = True
) -> None:
    """What a network accepts as its time input: 0-based integer timesteps (see
    :func:`check_timesteps`) or real times in [0, T], such as a flow's ``1000 t``.

    ``values`` as for :func:`check_timesteps`: ``None`` reads the values on the CPU only.
    """
    if not isinstance(t, Tensor):
        raise ValueError(
            f"t must be a tensor of shape (B,), one timestep per image, e.g. "
            f"torch.full(({batch_size},), {timesteps // 2}); got {type(t).__name__}"
        )
    if not t.dtype.is_floating_point:
        check_timesteps(t, timesteps, batch_size, values=values)
        return
    if t.shape != (batch_size,):
        raise ValueError(
            f"t must have shape ({batch_size},), one time per sample; got {tuple(t.shape)}"
        )
    if values is None:
        values = t.device.type == "cpu"
    if values and t.numel() and (float(t.min()) < 0 or float(t.max()) > timesteps):
        raise ValueError(
            f"real-valued times must lie in [0, {timesteps}]; "
            f"got values from {float(t.min())} to {float(t.max())}"
        )


def check_model_timesteps(model: object, timesteps: int) -> None:
    """Raise ``ValueError`` if ``model`` was built for fewer timesteps than the schedule has.

    Only networks that record their T (an int attribute ``timesteps``) are checked; wrappers
    without one pass. Such a network refuses every t >= its T, so a longer schedule cannot
    work. A shorter schedule runs (chapter 3 samples a toy network on a 10-step schedule).
    """
    built_for = getattr(model, "timesteps", None)
    if is_integer(built_for) and built_for < timesteps:
        raise ValueError(
            f"the model was built for T={built_for} timesteps but the schedule has "
            f"T={timesteps}; build both with the same timesteps"
        )


def check_schedule(schedule: object, expected: type, *, name: str = "schedule", hint: str) -> None:
    """Raise ``ValueError`` unless ``schedule`` is an ``expected``; ``hint`` says what else to use.

    The type is passed in, so that this module imports none of the ones it checks.
    """
    if not isinstance(schedule, expected):
        raise ValueError(
            f"{name} must be a {expected.__name__} ({hint}); got {type(schedule).__name__}"
        )


def check_generator(generator: object) -> None:
    """Raise ``ValueError`` unless ``generator`` is ``None`` or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            "generator must be a torch.Generator, e.g. torch.Generator().manual_seed(0); "
            f"got {type(generator).__name__}"
        )


def check_floating(name: str, x: object) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating-point tensor, as data to be noised is."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a floating-point tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be floating point (pixels scaled to [-1, 1], as load_images gives "
            f"them); got {x.dtype}"
        )


def check_noise(noise: object, x0: Tensor) -> None:
    """Raise ``ValueError`` unless ``noise`` is a tensor of ``x0``'s shape."""
    if not isinstance(noise, Tensor):
        hint = (
            "; pass a generator by keyword, generator=..."
            if isinstance(noise, torch.Generator)
            else ""
        )
        raise ValueError(
            f"noise must be a tensor of x0's shape {tuple(x0.shape)}, got "
            f"{type(noise).__name__}{hint}"
        )
    check_same_shape("noise", noise, "x0", x0)


def is_autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (never on devices without autocast, like meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


_CASTS = {
    torch.float32: "float()",
    torch.float64: "double()",
    torch.float16: "half()",
    torch.bfloat16: "bfloat16()",
}


def check_weights_dtype(owner: str, name: str, x: Tensor, weights: torch.dtype) -> None:
    """Raise ``ValueError`` unless ``x`` has the dtype of ``owner``'s weights.

    Under autocast, which casts inputs and weights itself, anything goes.
    """
    if x.dtype == weights or is_autocasting(x.device.type):
        return
    numpy = " (NumPy arrays become float64)" if x.dtype == torch.float64 else ""
    cast = _CASTS.get(weights, f"to({weights})")
    raise ValueError(
        f"{owner}'s weights are {str(weights).removeprefix('torch.')} but {name} is "
        f"{str(x.dtype).removeprefix('torch.')}{numpy}; pass {name}.{cast}"
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


def check_tuple(name: str, value: object, example: str) -> tuple:
    """``value`` as a tuple if it is a tuple, a list or another iterable other than a string,
    else ``ValueError`` showing ``example``, such as ``"(2000, 1000, 500)"``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a tuple such as {example}; got {value!r}")
    return tuple(value)


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False``, else ``ValueError``: a string such as ``"no"``
    would otherwise count as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


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
