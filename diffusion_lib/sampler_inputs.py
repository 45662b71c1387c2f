"""What every sampler does before its first step: find where the model computes, put it in
eval mode, draw or check the starting state, and check the class labels.

A model is any callable ``model(x_t, t) -> eps`` with ``x_t`` of shape (B, C, H, W) and ``t`` an
int64 tensor of shape (B,) holding 0-based timesteps; conditional models take a third argument,
``model(x_t, t, labels)``. A sampler computes on ``device`` when it is given, else where the
model's parameters are (for a plain function, where ``x_T`` is, or the CPU). Noise from a
``generator`` is drawn on the generator's device and then moved, so a seed gives the same noise
on every device.

These helpers are shared by the samplers of :mod:`diffusion_lib.sampling` and of the later
chapters' modules (flow matching, EDM, inverse problems and others); they are not part of the
public API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.validation import (
    check_generator,
    check_model_timesteps,
    check_schedule,
    check_weights_dtype,
    is_integer,
)

NoisePredictor = Callable[..., Tensor]


_SCHEDULE_HINT = (
    "the second argument, after the model; for a flow model use flow_sample with a RectifiedFlow"
)


@contextlib.contextmanager
def _evaluating(model: NoisePredictor) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode for sampling and restore its mode afterwards."""
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _parameter_device(model: NoisePredictor) -> torch.device | None:
    """Where the model's parameters are; ``None`` for a function or a module without any."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return None


def _model_device(model: NoisePredictor) -> torch.device:
    return _parameter_device(model) or torch.device("cpu")


def _parameter_dtype(model: NoisePredictor) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter; ``None`` if it has none."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            if parameter.dtype.is_floating_point:
                return parameter.dtype
    return None


def _check_network_dtype(model: NoisePredictor, name: str, x: Tensor | None) -> None:
    """Refuse ``x`` in another dtype than the weights of one of the library's networks.

    Those record their T (an int ``timesteps``) and need their inputs in their weights' dtype;
    other callables, and modules whose scalar parameters promote a float64 input, are left
    alone, as is an ``x`` that is not a floating-point tensor (``None``: not given). ``name``
    is the argument ``x`` came in as.
    """
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        return
    if not is_integer(getattr(model, "timesteps", None)):
        return
    weights = _parameter_dtype(model)
    if weights is not None:
        check_weights_dtype(type(model).__name__, name, x, weights)


def _check_model_and_schedule(model: NoisePredictor, schedule: NoiseSchedule) -> None:
    """Refuse what is not a :class:`NoiseSchedule` as ``schedule``, and a network built for
    fewer timesteps than it has; called before any respacing, on the pair the user gave."""
    check_schedule(schedule, NoiseSchedule, hint=_SCHEDULE_HINT)
    check_model_timesteps(model, schedule.timesteps)


def _randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise drawn on the generator's device, so a seed gives the same images anywhere."""
    check_generator(generator)
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def _start(
    model: NoisePredictor,
    shape: tuple[int, ...],
    x_T: Tensor | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    name: str = "x_T",
) -> Tensor:
    """The starting state: ``x_T`` checked and moved to the sampling device, or standard
    normal noise of ``shape`` drawn from ``generator``. ``name`` is what the sampler calls it."""
    if not isinstance(shape, (tuple, list)):
        raise ValueError(f"shape must be a tuple such as (16, 1, 28, 28); got {shape!r}")
    check_generator(generator)
    if x_T is not None:
        if not isinstance(x_T, Tensor) or not x_T.dtype.is_floating_point:
            kind = x_T.dtype if isinstance(x_T, Tensor) else type(x_T).__name__
            raise ValueError(f"{name} must be a floating-point tensor, got {kind}")
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(
                f"{name} must have the requested shape {tuple(shape)}, got {tuple(x_T.shape)}"
            )
        _check_network_dtype(model, name, x_T)
        device = device if device is not None else _parameter_device(model)
        return x_T.to(device) if device is not None else x_T
    if len(shape) < 2 or any(not is_integer(n) or n < 1 for n in shape):
        raise ValueError(f"shape must be positive integers (B, C, H, W), got {tuple(shape)}")
    device = torch.device(device) if device is not None else _model_device(model)
    return _randn(tuple(int(n) for n in shape), generator, device)


def _check_labels(labels: Tensor | None, batch_size: int, device: torch.device) -> Tensor | None:
    if labels is None:
        return None
    labels = torch.as_tensor(labels, device=device).long().reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(batch_size)
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"labels must hold one class per sample ({batch_size}), got {labels.shape[0]}"
        )
    return labels
