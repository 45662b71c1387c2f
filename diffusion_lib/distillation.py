"""Progressive distillation: a student that takes one step where its teacher took two.

Salimans & Ho (2022) train a student network so that one deterministic sampling step of the
student lands where two steps of its teacher land. The student of one round teaches the next,
so every round halves the number of steps: 64, 32, ..., 1.

On the straight path ``x_t = (1 - t) x_0 + t eps`` of :mod:`diffusion_lib.flow_matching`, the
deterministic DDIM step is Euler's method, ``x_{t-h} = x_t - h v(x_t, t)``. With the student's
step ``h = 1 / N``, the teacher takes two half steps from a point ``x_t`` of the student's grid
``t in {1/N, 2/N, ..., 1}``::

    x_{t-h/2} = x_t - (h/2) v_teacher(x_t, t),
    x_{t-h}   = x_{t-h/2} - (h/2) v_teacher(x_{t-h/2}, t - h/2),

and the one Euler step from ``x_t`` that lands on ``x_{t-h}`` has the slope ::

    v_target = (x_t - x_{t-h}) / h = (v_teacher(x_t, t) + v_teacher(x_{t-h/2}, t - h/2)) / 2.

This is Salimans & Ho's target (Algorithm 2, ``x~`` written for ``alpha_t = 1 - t``,
``sigma_t = t``; ``x~ = x_t - t v_target``). Their loss weights ``||x~ - x_hat||^2 = t^2
||v_target - v||^2`` by ``max(SNR, 1)``, ``SNR = (1 - t)^2 / t^2``, which is
``max((1 - t)^2, t^2) ||v_target - v||^2``: the plain velocity error used here up to a weight
between 1/4 and 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.flow_matching import RectifiedFlow, flow_sample
from diffusion_lib.sampler_inputs import NoisePredictor, _evaluating, _model_device, _randn
from diffusion_lib.validation import check_positive_int, check_same_shape


def _velocity(
    model: NoisePredictor, flow: RectifiedFlow, x: Tensor, t: Tensor, labels: Tensor | None
) -> Tensor:
    time = flow.model_time(t)
    v = model(x, time) if labels is None else model(x, time, labels)
    check_same_shape("the model's output", v, "x_t", x)
    return v


def _check_teacher_device(teacher: NoisePredictor, device: torch.device) -> None:
    """Raise unless a teacher network is on ``device``, where the training data are."""
    teacher_device = _model_device(teacher) if isinstance(teacher, nn.Module) else None
    if teacher_device is not None and teacher_device != device:
        raise ValueError(
            f"the teacher is on {teacher_device} but the data are on {device}; "
            "move the teacher to the training device first (teacher.to(device))"
        )


def _check_grid_times(t: Tensor, batch_size: int, steps: int, grid: str) -> None:
    """Raise unless ``t`` is a (batch_size,) float tensor of times ``i / steps``, i in 1..steps."""
    if not isinstance(t, Tensor) or t.shape != (batch_size,) or not t.is_floating_point():
        raise ValueError(f"t must be a float tensor of shape ({batch_size},)")
    index = t.double().cpu() * steps
    off_grid = (index - index.round()).abs().max() > 1e-6
    if bool(off_grid) or index.round().min() < 1 or index.round().max() > steps:
        raise ValueError(
            f"t must lie on {grid} i / {steps} with i in 1..{steps}, got values from "
            f"{float(t.min())} to {float(t.max())}"
        )


def _noised_on_grid(
    flow: RectifiedFlow,
    x0: Tensor,
    t: Tensor | None,
    noise: Tensor | None,
    generator: torch.Generator | None,
    steps: int,
    grid: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, noise, x_t)`` for a batch ``x0``: times ``i / steps`` (i uniform in 1..steps) and
    noise drawn unless given, and the points ``x_t = (1 - t) x_0 + t eps`` of the straight path.

    Drawn times are on the grid by construction; checking them would make every training step
    wait for the GPU, so only times passed in are checked.
    """
    if not isinstance(flow, RectifiedFlow):
        raise ValueError(
            "this objective works on the straight path of flow matching; the path must be a "
            f"RectifiedFlow, got {type(flow).__name__}"
        )
    if t is not None:
        _check_grid_times(t, x0.shape[0], steps, grid)
        t = t.to(x0.device)
    else:
        source = generator.device if generator is not None else x0.device
        index = torch.randint(1, steps + 1, (x0.shape[0],), generator=generator, device=source)
        t = index.to(x0.device, torch.float64) / steps
    if noise is None:
        noise = _randn(tuple(x0.shape), generator, x0.device, x0.dtype)
    return t, noise, flow.interpolate(x0, noise, t)


class ProgressiveDistillation:
    """The objective of one round of progressive distillation (Salimans & Ho 2022, Algorithm 2).

    Args:
        teacher: a velocity model ``teacher(x_t, time)`` (or ``teacher(x_t, time, labels)``)
            for :class:`~diffusion_lib.flow_matching.RectifiedFlow`, on the device the training
            runs on; it is only evaluated, never trained.
        student_steps: N, the number of Euler steps the student will sample with; the teacher
            is imitated at 2N.

    Called with the signature of :func:`~diffusion_lib.flow_matching.flow_matching_loss`, so it
    can be passed to :func:`~diffusion_lib.training.train` as ``loss=``. Each sample gets a
    time ``t = i / N`` with ``i`` uniform in ``1..N``, fresh noise and ``x_t = (1 - t) x_0 +
    t eps``; the loss is ``mean ||v_student(x_t, t) - v_target||^2`` (module docstring).
    """

    def __init__(self, teacher: NoisePredictor, student_steps: int) -> None:
        if not callable(teacher):
            raise ValueError(f"teacher must be a velocity model, got {type(teacher).__name__}")
        self.teacher = teacher
        self.student_steps = check_positive_int("student_steps", student_steps)

    def __repr__(self) -> str:
        return f"ProgressiveDistillation(student_steps={self.student_steps})"

    def student_times(self) -> Tensor:
        """The N times the student steps from, ``1/N, 2/N, ..., 1``: (N,) float64."""
        steps = self.student_steps
        return torch.arange(1, steps + 1, dtype=torch.float64) / steps

    def target(
        self, flow: RectifiedFlow, x_t: Tensor, t: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """``v_target``: the slope of one student step that lands where two teacher steps land.

        ``x_t``: (B, ...) points at times ``t`` (B,) of the student's grid. Returns (B, ...)
        in ``x_t``'s dtype, computed without gradients.
        """
        _check_grid_times(t, x_t.shape[0], self.student_steps, "the student's grid")
        return self._target(flow, x_t, t, labels)

    def _target(self, flow: RectifiedFlow, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        half_step = 0.5 / self.student_steps
        _check_teacher_device(self.teacher, x_t.device)
        with _evaluating(self.teacher):  # no gradients, and no dropout in the targets
            first = _velocity(self.teacher, flow, x_t, t, labels).to(x_t.dtype)
            x_mid = x_t - half_step * first
            second = _velocity(self.teacher, flow, x_mid, t - half_step, labels).to(x_t.dtype)
        return 0.5 * (first + second)

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
        """``mean ||v_student(x_t, t) - v_target(x_t, t)||^2``: a scalar float32 tensor.

        ``x0``: (B, ...) data. ``t`` (B,) on the student's grid and ``noise`` (like ``x0``) are
        drawn unless given; ``labels`` (B,) go to both models.
        """
        t, noise, x_t = _noised_on_grid(
            flow, x0, t, noise, generator, self.student_steps, "the student's grid"
        )
        target = self._target(flow, x_t, t, labels)
        v = _velocity(model, flow, x_t, t, labels)
        return F.mse_loss(v.float(), target.float())


def distillation_error(
    student: NoisePredictor,
    teacher: NoisePredictor,
    flow: RectifiedFlow,
    x_1: Tensor,
    student_steps: int,
    labels: Tensor | None = None,
) -> Tensor:
    """RMS distance per sample between N Euler steps of the student and 2N of the teacher.

    Both start from the same noise ``x_1`` (B, ...); returns (B,). Zero means the round
    succeeded exactly: the student's sampler reproduces its teacher's in half the steps.
    """
    steps = check_positive_int("student_steps", student_steps)
    student_samples = flow_sample(student, flow, x_1.shape, steps=steps, x_1=x_1, labels=labels)
    teacher_samples = flow_sample(teacher, flow, x_1.shape, steps=2 * steps, x_1=x_1, labels=labels)
    return (student_samples - teacher_samples).flatten(1).pow(2).mean(1).sqrt()
