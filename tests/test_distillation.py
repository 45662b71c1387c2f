"""Progressive distillation: the target, the loss, the grid, a trained round and bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from diffusion_lib.distillation import ProgressiveDistillation, distillation_error
from diffusion_lib.flow_matching import RectifiedFlow, flow_sample
from diffusion_lib.models import ToyMLP
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.toy import GaussianMixture
from diffusion_lib.training import train

FLOW = RectifiedFlow()
MIXTURE = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), 0.2, torch.tensor([1.0, 2.0]))
EXACT_TEACHER = MIXTURE.optimal_velocity(FLOW)


class TargetFollower:
    """A 'student' whose velocity is the distillation target itself: a perfect round."""

    def __init__(self, objective: ProgressiveDistillation) -> None:
        self.objective = objective

    def __call__(self, x_t: Tensor, time: Tensor) -> Tensor:
        steps = self.objective.student_steps
        t = (time.double() / FLOW.time_scale * steps).round() / steps
        return self.objective.target(FLOW, x_t, t)


class RecordingVelocity(torch.nn.Module):
    """v = -x, remembering the times (and labels) of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls: list[tuple[Tensor, Tensor | None]] = []

    def forward(self, x_t: Tensor, time: Tensor, labels: Tensor | None = None) -> Tensor:
        self.calls.append((time.detach() / FLOW.time_scale, labels))
        return -self.scale * x_t


def noise(count: int, seed: int = 0) -> Tensor:
    return torch.randn(count, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("student_steps", [1, 2, 5])
def test_one_step_along_the_target_lands_where_two_teacher_steps_land(student_steps) -> None:
    """N Euler steps along v_target reproduce 2N Euler steps of the (exact, curved) teacher,
    while N steps of the teacher itself end far away."""
    x_1 = noise(500)
    objective = ProgressiveDistillation(EXACT_TEACHER, student_steps)
    gap = distillation_error(TargetFollower(objective), EXACT_TEACHER, FLOW, x_1, student_steps)
    teacher_gap = distillation_error(EXACT_TEACHER, EXACT_TEACHER, FLOW, x_1, student_steps)
    assert gap.max() < 1e-6
    assert teacher_gap.mean() > 1e-3


def test_the_loss_is_the_mean_squared_gap_to_two_hand_written_half_steps() -> None:
    torch.manual_seed(0)
    teacher, student = ToyMLP(hidden=16, blocks=1), ToyMLP(hidden=16, blocks=1)
    x0, eps = noise(64, 1).float(), noise(64, 2).float()
    t = torch.randint(1, 5, (64,)).double() / 4
    loss = ProgressiveDistillation(teacher, 4)(student, FLOW, x0, t=t, noise=eps)

    x_t = (1 - t.float()[:, None]) * x0 + t.float()[:, None] * eps
    with torch.no_grad():
        x_mid = x_t - 0.125 * teacher(x_t, 1000 * t.float())
        x_end = x_mid - 0.125 * teacher(x_mid, 1000 * (t.float() - 0.125))
        expected = (student(x_t, 1000 * t.float()) - (x_t - x_end) / 0.25).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_times_are_drawn_evenly_from_the_student_grid_and_the_teacher_halves_them() -> None:
    teacher = RecordingVelocity()
    objective = ProgressiveDistillation(teacher, 4)
    objective(RecordingVelocity(), FLOW, noise(8000).float(), generator=torch.Generator())
    (first, _), (second, _) = teacher.calls
    grid = objective.student_times().float()
    torch.testing.assert_close(grid, torch.tensor([0.25, 0.5, 0.75, 1.0]))
    counts = (first[:, None] == grid[None]).sum(0)
    assert counts.sum() == 8000
    assert ((counts - 2000).abs() < 200).all()  # 4.5 standard deviations of a binomial count
    torch.testing.assert_close(second, first - 0.125)


def test_labels_reach_teacher_and_student() -> None:
    teacher, student = RecordingVelocity(), RecordingVelocity()
    labels = torch.arange(6) % 3
    ProgressiveDistillation(teacher, 2)(student, FLOW, noise(6).float(), labels=labels)
    assert all(seen is labels for _, seen in teacher.calls + student.calls)
    assert len(teacher.calls) == 2 and len(student.calls) == 1


def test_one_trained_round_halves_the_steps_of_an_exact_teacher() -> None:
    """A small network trained by train(loss=...) for one round (2 teacher steps -> 1) lands
    far closer to the teacher's two-step samples than the teacher's own single step does."""
    torch.manual_seed(0)
    objective = ProgressiveDistillation(EXACT_TEACHER, 1)
    points = MIXTURE.sample(8192, torch.Generator().manual_seed(3))
    result = train(
        ToyMLP(hidden=64, blocks=2), FLOW, points, loss=objective, steps=600, batch_size=256,
        lr=3e-3, warmup_steps=20, progress=False,
    )  # fmt: skip
    x_1 = noise(2000, 4).float()
    student_gap = distillation_error(result.ema_model, EXACT_TEACHER, FLOW, x_1, 1).mean()
    teacher_gap = distillation_error(EXACT_TEACHER, EXACT_TEACHER, FLOW, x_1, 1).mean()
    assert student_gap < 0.05 * teacher_gap  # measured: 0.0044


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"student_steps": 0}, "student_steps"),
        ({"student_steps": 2.5}, "student_steps"),
        ({"teacher": "teacher"}, "teacher must be a velocity model"),
    ],
)
def test_bad_construction_raises(arguments, message) -> None:
    options = {"teacher": EXACT_TEACHER, "student_steps": 2} | arguments
    with pytest.raises(ValueError, match=message):
        ProgressiveDistillation(**options)


@pytest.mark.parametrize(
    "t", [torch.full((4,), 0.0), torch.full((4,), 0.3), torch.full((4,), 1.5), torch.ones(3)]
)
def test_times_off_the_student_grid_raise(t) -> None:
    objective = ProgressiveDistillation(EXACT_TEACHER, 2)
    with pytest.raises(ValueError, match="t must"):
        objective(RecordingVelocity(), FLOW, noise(4).float(), t=t.double())


def test_a_noise_schedule_or_a_teacher_elsewhere_raises() -> None:
    objective = ProgressiveDistillation(RecordingVelocity().to("meta"), 2)
    with pytest.raises(ValueError, match="RectifiedFlow"):
        objective(RecordingVelocity(), NoiseSchedule.from_name("linear"), noise(4).float())
    with pytest.raises(ValueError, match="teacher is on meta"):
        objective(RecordingVelocity(), FLOW, noise(4).float())


def test_the_flow_sampler_visits_exactly_the_times_the_student_was_trained_at() -> None:
    """The student is an ordinary velocity model: flow_sample with N steps calls it at the N
    times of its training grid, from 1 down to 1 / N."""
    student = RecordingVelocity()
    flow_sample(student, FLOW, (3, 2), steps=4, x_1=noise(3).float())
    times = torch.stack([t for t, _ in student.calls])[:, 0]
    trained_at = ProgressiveDistillation(EXACT_TEACHER, 4).student_times().flip(0)
    torch.testing.assert_close(times, trained_at.float())


def test_a_teacher_in_training_mode_gives_targets_without_dropout_and_keeps_its_mode() -> None:
    class DroppingVelocity(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dropout = torch.nn.Dropout(0.5)

        def forward(self, x_t: Tensor, time: Tensor) -> Tensor:
            return self.dropout(-x_t)

    teacher = DroppingVelocity().train()
    objective = ProgressiveDistillation(teacher, 2)
    x_t, t = noise(256).float(), torch.full((256,), 0.5)
    first, second = objective.target(FLOW, x_t, t), objective.target(FLOW, x_t, t)
    torch.testing.assert_close(first, second)
    # v = -x: the half step of 1/4 goes to x_half = 1.25 x, and the mean slope is -1.125 x.
    torch.testing.assert_close(first, -1.125 * x_t)
    assert teacher.training


def test_distillation_error_is_the_rms_gap_between_constant_velocity_flows() -> None:
    """With a constant velocity c every Euler step count carries x_1 to x_1 - c exactly, so the
    error is RMS(c_teacher - c_student) = sqrt((0.3^2 + 0.6^2) / 2) for every sample."""

    def student(x: Tensor, time: Tensor) -> Tensor:
        return torch.tensor([0.3, -0.2], dtype=x.dtype).expand_as(x)

    def teacher(x: Tensor, time: Tensor) -> Tensor:
        return torch.tensor([0.0, 0.4], dtype=x.dtype).expand_as(x)

    error = distillation_error(student, teacher, FLOW, noise(5, 1), 3)
    expected = torch.full((5,), 0.225**0.5, dtype=torch.float64)
    torch.testing.assert_close(error, expected, rtol=1e-12, atol=1e-12)
