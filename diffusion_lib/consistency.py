"""Consistency models: a network that maps every point of an ODE trajectory to its start.

The probability-flow ODE carries each noise sample ``x_1`` along one trajectory to a data
point ``x_0``. A consistency function (Song et al. 2023) returns that end point from *any*
point of the trajectory, ``f(x_t, t) = x_0`` for all t, so that a single evaluation at t = 1
samples. It is characterised by two properties: the boundary condition ``f(x, 0) = x``, and
self-consistency, ``f(x_t, t) = f(x_s, s)`` for two points of the same trajectory.

On the straight path ``x_t = (1 - t) x_0 + t eps`` of :mod:`diffusion_lib.flow_matching` we
write the function through a velocity network, ::

    f_theta(x_t, t) = x_t - t v_theta(x_t, t),

the point that one Euler step from t lands on at t = 0. The boundary condition then holds for
every network (the role of Song et al.'s ``c_skip`` and ``c_out``), and a flow-matching model is
a natural starting point: its single Euler step is already a (poor) consistency function.

Self-consistency is enforced between neighbouring times of a grid ``t_n = n / N``. A point
``x_{t_n} = (1 - t_n) x_0 + t_n eps`` is moved to ``t_{n-1}``:

* consistency distillation (Song et al. 2023, Algorithm 2) takes one Euler step of a trained
  teacher, ``x_{t_{n-1}} = x_{t_n} - v_teacher(x_{t_n}, t_n) / N``;
* consistency training (Algorithm 3) needs no teacher: it uses the same ``x_0`` and ``eps``,
  ``x_{t_{n-1}} = (1 - t_{n-1}) x_0 + t_{n-1} eps``, which is the Euler step along the
  conditional velocity ``eps - x_0``, an unbiased one-sample estimate of the flow's velocity.

The loss is ``mean ||f_theta(x_{t_n}, t_n) - sg(f_theta(x_{t_{n-1}}, t_{n-1}))||^2``, where
``sg`` stops the gradient: the target comes from the network's current weights without a
moving average, as Song & Dhariwal (2024) recommend. At n = 1 the target is ``x_0`` itself,
by the boundary condition, and the constraint propagates from there up the grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lib.distillation import _check_teacher_device, _noised_on_grid, _velocity
from diffusion_lib.flow_matching import RectifiedFlow
from diffusion_lib.sampler_inputs import NoisePredictor, _check_labels, _evaluating, _randn, _start
from diffusion_lib.validation import check_positive_int


def consistency_function(
    model: NoisePredictor,
    flow: RectifiedFlow,
    x_t: Tensor,
    t: Tensor,
    labels: Tensor | None = None,
) -> Tensor:
    """``f(x_t, t) = x_t - t v(x_t, t)``: the network's estimate of the trajectory's start.

    ``model`` is a velocity network ``model(x_t, time)`` (``time = flow.model_time(t)``), or
    ``model(x_t, time, labels)``; ``x_t`` (B, ...) and ``t`` (B,) floats in [0, 1]. Returns
    (B, ...) in ``x_t``'s dtype, with gradients if the model has them.
    """
    v = _velocity(model, flow, x_t, t, labels).to(x_t.dtype)
    return flow.x0_from_velocity(x_t, t, v)


class _ConsistencyObjective:
    """What consistency distillation and training share: the grid, the times, the loss."""

    def __init__(self, steps: int) -> None:
        self.steps = check_positive_int("steps", steps)

    def _previous_point(
        self,
        flow: RectifiedFlow,
        x0: Tensor,
        noise: Tensor,
        x_t: Tensor,
        t: Tensor,
        labels: Tensor | None,
    ) -> Tensor:
        """The point at ``t - 1/N`` that the objective pairs with ``x_t``."""
        raise NotImplementedError

    def __call__(
        self,
        model: NoisePredictor,
        flow: RectifiedFlow,
        x0: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``mean ||f(x_{t_n}, t_n) - sg(f(x_{t_{n-1}}, t_{n-1}))||^2``: a scalar float32 tensor.

        ``x0``: (B, ...) data. ``t`` (B,) on the grid ``n / N`` and ``noise`` (like ``x0``)
        are drawn unless given; ``labels`` (B,) go to every network call.
        """
        t, noise, x_t = _noised_on_grid(flow, x0, t, noise, generator, self.steps, "the grid")
        s = t - 1.0 / self.steps
        x_s = self._previous_point(flow, x0, noise, x_t, t, labels)
        with _evaluating(model):  # the target: current weights, no gradient
            target = consistency_function(model, flow, x_s, s, labels)
        estimate = consistency_function(model, flow, x_t, t, labels)
        return F.mse_loss(estimate.float(), target.float())


class ConsistencyDistillation(_ConsistencyObjective):
    """Consistency distillation (Song et al. 2023, Algorithm 2) of a flow-matching teacher.

    Args:
        teacher: a velocity model for :class:`~diffusion_lib.flow_matching.RectifiedFlow`, on
            the training device; it is only evaluated.
        steps: N, the grid ``t_n = n / N`` on which neighbouring points are made consistent;
            the teacher takes one Euler step of ``1 / N`` between them.

    Called with the signature of :func:`~diffusion_lib.flow_matching.flow_matching_loss`, so
    it is passed to :func:`~diffusion_lib.training.train` as ``loss=`` (module docstring).
    """

    def __init__(self, teacher: NoisePredictor, steps: int) -> None:
        if not callable(teacher):
            raise ValueError(f"teacher must be a velocity model, got {type(teacher).__name__}")
        super().__init__(steps)
        self.teacher = teacher

    def __repr__(self) -> str:
        return f"ConsistencyDistillation(steps={self.steps})"

    def _previous_point(self, flow, x0, noise, x_t, t, labels) -> Tensor:
        _check_teacher_device(self.teacher, x_t.device)
        with _evaluating(self.teacher):
            v = _velocity(self.teacher, flow, x_t, t, labels).to(x_t.dtype)
        return x_t - v / self.steps


class ConsistencyTraining(_ConsistencyObjective):
    """Consistency training (Song et al. 2023, Algorithm 3): no teacher, only data and noise.

    Args:
        steps: N, the grid ``t_n = n / N``. The neighbouring point shares ``x_0`` and ``eps``
            with ``x_{t_n}``. Its error as an estimate of the ODE's neighbour shrinks with
            ``1 / N``, so larger N give a less biased but slower-to-learn objective.

    Passed to :func:`~diffusion_lib.training.train` as ``loss=`` (module docstring).
    """

    def __repr__(self) -> str:
        return f"ConsistencyTraining(steps={self.steps})"

    def _previous_point(self, flow, x0, noise, x_t, t, labels) -> Tensor:
        return flow.interpolate(x0, noise, t - 1.0 / self.steps)


def consistency_sample(
    model: NoisePredictor,
    flow: RectifiedFlow,
    shape: tuple[int, ...],
    *,
    times: Sequence[float] = (1.0,),
    x_1: Tensor | None = None,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) on the straight path.

    ``x_0 = f(x_1, 1)``; then, for each further time ``t`` of ``times``, the estimate is noised
    again, ``x_t = (1 - t) x_0 + t z`` with fresh ``z``, and ``x_0 = f(x_t, t)``. ``times`` must
    start at 1.0 and decrease within (0, 1]; one entry gives one network call per sample.
    ``x_1`` (shape ``shape``) fixes the starting noise. Returns (shape) samples.
    """
    times = [float(time) for time in times]
    if (
        not times
        or times[0] != 1.0
        or any(not 0.0 < time <= 1.0 for time in times)
        or any(later >= earlier for earlier, later in zip(times, times[1:], strict=False))
    ):
        raise ValueError(
            f"times must start at 1.0 and decrease strictly within (0, 1], got {times}"
        )
    x = _start(model, shape, x_1, generator, device, name="x_1")
    labels = _check_labels(labels, x.shape[0], x.device)
    with _evaluating(model):
        x0 = consistency_function(model, flow, x, torch.ones(x.shape[0], device=x.device), labels)
        for time in times[1:]:
            z = _randn(tuple(x.shape), generator, x.device, x.dtype)
            t = torch.full((x.shape[0],), time, device=x.device)
            x0 = consistency_function(model, flow, flow.interpolate(x0, z, t), t, labels)
    return x0
