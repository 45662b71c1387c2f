"""The training engine: learning, reproducibility, exact resumption, EMA, warmup, bad inputs."""

from __future__ import annotations

import functools
import math
import os
import signal
import time

import pytest
import torch
from torch import Tensor, nn

from diffusion_lib import devices
from diffusion_lib import trainer as trainer_module
from diffusion_lib import training_loop as loop_module
from diffusion_lib.devices import ProcessGroup, exact_float32, timed
from diffusion_lib.flow_matching import RectifiedFlow
from diffusion_lib.losses import diffusion_loss
from diffusion_lib.models import ToyMLP
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import MAX_TRAINING_STEPS, SMOKE_VARIABLE
from diffusion_lib.toy import GaussianMixture
from diffusion_lib.trainer import _compile_mode
from diffusion_lib.training import (
    ExponentialMovingAverage,
    NonFiniteLossError,
    TrainingResult,
    select_device,
    train,
)

IMAGE_SHAPE = (1, 4, 4)
TIMESTEPS = 50


class TinyDenoiser(nn.Module):
    """An MLP on the flattened image and t / T; dropout exercises the global random stream."""

    def __init__(self, hidden: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        pixels = math.prod(IMAGE_SHAPE)
        self.net = nn.Sequential(
            nn.Linear(pixels + 1, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, pixels)
        )

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        features = torch.cat([x_t.flatten(1), t[:, None].float() / TIMESTEPS], dim=1)
        return self.net(features).reshape(x_t.shape)


class TinyConditionalDenoiser(TinyDenoiser):
    """Adds a label embedding; label ``null_label`` means "no label". Records the labels it sees."""

    null_label = 3

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.label_embedding = nn.Embedding(self.null_label + 1, math.prod(IMAGE_SHAPE))
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        self.seen.append((x_t.detach().clone(), labels.detach().clone()))
        shift = self.label_embedding(labels).reshape(x_t.shape)
        return super().forward(x_t, t) + shift


def toy_images(count: int = 64, seed: int = 0) -> Tensor:
    """A learnable toy: one fixed pattern plus a little noise, shape (count, 1, 4, 4)."""
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.linspace(-1, 1, math.prod(IMAGE_SHAPE)).reshape(1, *IMAGE_SHAPE)
    return pattern + 0.05 * torch.randn(count, *IMAGE_SHAPE, generator=generator)


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", TIMESTEPS)


def quick_train(
    schedule: NoiseSchedule, model: nn.Module | None = None, **kwargs
) -> TrainingResult:
    options = {"steps": 30, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "progress": False}
    options.update(kwargs)
    images = options.pop("images", toy_images())
    torch.manual_seed(1)  # the model's initial weights
    return train(
        model if model is not None else TinyDenoiser(), schedule, images, device="cpu", **options
    )


def test_loss_falls_on_a_learnable_toy(schedule: NoiseSchedule) -> None:
    result = quick_train(schedule, steps=200)
    losses = result.history.loss
    assert len(losses) == result.steps == 200
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # The optimal denoiser of a single pattern removes most of the unit-variance noise.
    assert last < 0.6 * first
    assert result.ema_model.training is False
    assert result.history.images_per_second > 0


def test_points_train_towards_the_optimal_loss() -> None:
    """(N, D) points train like images; on a Gaussian mixture the loss approaches the loss of
    the exact optimal predictor, measured on the same held-out batch."""
    schedule = NoiseSchedule.from_name("linear")
    mixture = GaussianMixture.ring(components=4, radius=1.0, std=0.1)
    generator = torch.Generator().manual_seed(0)
    model = ToyMLP(hidden=64, blocks=2)
    result = train(
        model,
        schedule,
        mixture.sample(20_000, generator),
        steps=1500,
        batch_size=256,
        lr=1e-3,
        progress=False,
    )
    x0 = mixture.sample(20_000, generator)
    t = torch.randint(0, schedule.timesteps, (20_000,), generator=generator)
    eps = torch.randn(20_000, 2, generator=generator)
    x_t = schedule.q_sample(x0, t, noise=eps)
    optimal = (mixture.optimal_noise_predictor(schedule)(x_t, t) - eps).pow(2).mean()
    with torch.no_grad():
        learned = (result.ema_model(x_t, t) - eps).pow(2).mean()
        untrained = (ToyMLP(hidden=64, blocks=2)(x_t, t) - eps).pow(2).mean()
    assert learned < optimal * 1.1 < untrained


def test_flow_matching_trains_towards_the_optimal_velocity_loss() -> None:
    """With a RectifiedFlow, train regresses on eps - x_0; the held-out loss nears the loss of
    the exact velocity of the mixture."""
    flow = RectifiedFlow()
    mixture = GaussianMixture.ring(components=4, radius=1.0, std=0.1)
    generator = torch.Generator().manual_seed(0)
    result = train(
        ToyMLP(hidden=64, blocks=2),
        flow,
        mixture.sample(20_000, generator),
        steps=1500,
        batch_size=256,
        lr=1e-3,
        progress=False,
    )
    x0, eps = mixture.sample(20_000, generator), torch.randn(20_000, 2, generator=generator)
    t = torch.rand(20_000, generator=generator)
    x_t, target = flow.interpolate(x0, eps, t), flow.velocity_target(x0, eps)
    optimal = (mixture.optimal_velocity(flow)(x_t, flow.model_time(t)) - target).pow(2).mean()
    with torch.no_grad():
        learned = (result.ema_model(x_t, flow.model_time(t)) - target).pow(2).mean()
        untrained = (ToyMLP(hidden=64, blocks=2)(x_t, flow.model_time(t)) - target).pow(2).mean()
    assert learned < optimal * 1.1 < untrained


def test_a_fixed_noise_coupling_replaces_fresh_noise() -> None:
    """Pairing every point x with the noise x + 1 makes the target velocity 1 everywhere, which
    a network learns almost exactly; with fresh noise the loss cannot fall below about 2."""
    points = GaussianMixture.ring(components=4, std=0.1).sample(4096, torch.Generator())

    def final_loss(noise: torch.Tensor | None) -> float:
        result = train(
            ToyMLP(hidden=32, blocks=1),
            RectifiedFlow(),
            points,
            noise=noise,
            steps=400,
            batch_size=256,
            lr=3e-3,
            progress=False,
        )
        return sum(result.history.loss[-50:]) / 50

    assert final_loss(points + 1.0) < 0.02
    assert final_loss(None) > 1.0


def test_a_custom_loss_replaces_the_default_objective(schedule: NoiseSchedule) -> None:
    """``loss=`` receives the training model, the schedule, the batch and the step's generator;
    passing the default objective itself repeats the default run exactly."""
    seen = []

    def shrink_output(model, schedule_seen, x0, *, noise, labels, generator) -> Tensor:
        seen.append((schedule_seen is schedule, x0.shape, labels, generator is not None))
        t = torch.zeros(x0.shape[0], dtype=torch.long)
        return model(x0, t).pow(2).mean()

    result = quick_train(schedule, loss=shrink_output, steps=60)
    assert seen[0] == (True, (16, *IMAGE_SHAPE), None, True) and len(seen) == 60
    assert result.history.loss[-1] < 0.1 * result.history.loss[0]
    assert quick_train(schedule, loss=diffusion_loss).history.loss == (
        quick_train(schedule).history.loss
    )


def test_same_seed_gives_identical_losses_and_another_seed_does_not(
    schedule: NoiseSchedule,
) -> None:
    first = quick_train(schedule, seed=3).history.loss
    again = quick_train(schedule, seed=3).history.loss
    other = quick_train(schedule, seed=4).history.loss
    assert first == again
    assert first != other


def test_training_does_not_disturb_the_callers_random_stream(schedule: NoiseSchedule) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(
        TinyDenoiser(), schedule, toy_images(), steps=3, batch_size=8, progress=False, device="cpu"
    )
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("conditional", [False, True])
def test_interrupted_and_resumed_run_repeats_the_uninterrupted_one(
    schedule: NoiseSchedule, tmp_path, conditional: bool
) -> None:
    def run(folder: str, steps: int) -> TrainingResult:
        torch.manual_seed(1)
        model = TinyConditionalDenoiser() if conditional else TinyDenoiser()
        extra = {"labels": torch.arange(64) % 3, "label_dropout": 0.3} if conditional else {}
        return quick_train(
            schedule,
            model,
            steps=steps,
            checkpoint_dir=tmp_path / folder,
            checkpoint_every=7,
            **extra,
        )

    uninterrupted = run("whole", 30)
    run("pieces", 14)  # stops mid-epoch (4 steps per epoch), after a checkpoint at step 7
    resumed = run("pieces", 30)
    assert resumed.steps == 30
    assert resumed.history.loss == uninterrupted.history.loss
    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    for name, tensor in uninterrupted.ema_model.state_dict().items():
        assert torch.equal(resumed.ema_model.state_dict()[name], tensor), name


def test_resume_false_starts_afresh_and_finished_runs_return_at_once(schedule, tmp_path) -> None:
    finished = quick_train(schedule, steps=10, checkpoint_dir=tmp_path)
    again = quick_train(schedule, steps=10, checkpoint_dir=tmp_path)
    assert again.steps == 10 and again.history.loss == finished.history.loss
    longer = quick_train(schedule, steps=12, checkpoint_dir=tmp_path)
    assert longer.history.loss[:10] == finished.history.loss
    fresh = quick_train(schedule, steps=4, checkpoint_dir=tmp_path, resume=False)
    assert fresh.steps == 4 and fresh.history.loss == finished.history.loss[:4]


def test_epochs_are_converted_to_steps_with_whole_batches(schedule: NoiseSchedule) -> None:
    # 64 images in batches of 16 make 4 steps per epoch, so 1.5 epochs take 6 steps.
    result = quick_train(schedule, steps=None, epochs=1.5)
    assert result.steps == 6 and len(result.history.loss) == 6


def test_smoke_mode_caps_the_steps(schedule, monkeypatch) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    result = quick_train(schedule, steps=MAX_TRAINING_STEPS + 15)
    assert result.steps == MAX_TRAINING_STEPS


def test_first_update_moves_weights_by_lr_over_warmup_steps(schedule: NoiseSchedule) -> None:
    # Adam's first step moves every weight with a non-zero gradient by lr * g / |g| = lr
    # (up to eps), so the size of the move reveals the warmed-up learning rate lr / warmup.
    torch.manual_seed(1)
    model = TinyDenoiser(dropout=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, schedule, toy_images(), steps=1, batch_size=16, lr=1e-2, warmup_steps=4,
          grad_clip=None, progress=False, device="cpu")  # fmt: skip
    moves = torch.cat(
        [(p.detach() - b).abs().flatten() for p, b in zip(model.parameters(), before, strict=True)]
    )
    moved = moves[moves > 0]
    # rtol allows for Adam's eps where a gradient is tiny; lr / 3 or lr would be far off.
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-2 / 4), rtol=1e-2, atol=0)


def test_moving_average_follows_its_closed_form() -> None:
    model = nn.Linear(2, 1)
    average = ExponentialMovingAverage(model, decay=0.9)
    expected = model.weight.detach().clone()
    for step in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * model.weight.detach()
        average.update(step)
    torch.testing.assert_close(average.module.weight, expected)
    assert not average.module.weight.requires_grad


def test_label_dropout_replaces_a_share_of_labels_by_the_null_label(schedule) -> None:
    # Tiny betas keep x_t close to x_0, so each image (filled with its label) shows which label
    # the engine paired it with.
    faint = NoiseSchedule(torch.full((TIMESTEPS,), 1e-7))
    labels = torch.arange(64) % 3
    images = labels.float().reshape(-1, 1, 1, 1).expand(-1, *IMAGE_SHAPE).clone()
    model = TinyConditionalDenoiser()
    quick_train(faint, model, images=images, labels=labels, label_dropout=0.5, steps=40)
    x_t = torch.cat([x for x, _ in model.seen])
    seen_labels = torch.cat([y for _, y in model.seen])
    kept = seen_labels != model.null_label
    assert 0.4 < 1 - kept.float().mean().item() < 0.6
    image_labels = x_t.flatten(1).mean(1).round().long()
    assert torch.equal(image_labels[kept], seen_labels[kept])


def test_a_diverging_loss_stops_training_and_keeps_the_last_good_checkpoint(
    schedule, tmp_path
) -> None:
    class Diverging(TinyDenoiser):
        calls = 0

        def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
            Diverging.calls += 1
            eps = super().forward(x_t, t)
            return eps * float("nan") if Diverging.calls > 12 else eps

    with pytest.raises(NonFiniteLossError, match=r"step 13.*from step 10") as caught:
        quick_train(schedule, Diverging(), checkpoint_dir=tmp_path, checkpoint_every=5)
    assert isinstance(caught.value, FloatingPointError)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 10
    assert all(math.isfinite(value) for value in saved["history"]["loss"])
    assert all(torch.isfinite(tensor).all() for tensor in saved["model"].values())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"steps": 5, "epochs": 1.0}, "exactly one of steps"),
        ({"steps": None}, "exactly one of steps"),
        ({"steps": 0}, "steps"),
        ({"epochs": -1.0, "steps": None}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"labels": torch.zeros(5, dtype=torch.long)}, "labels has 5 entries"),
        ({"labels": torch.zeros(64, dtype=torch.long), "label_dropout": 0.1}, "null_label"),
        ({"label_dropout": 1.5}, "label_dropout"),
        ({"images": torch.zeros(0, *IMAGE_SHAPE)}, "empty"),
        ({"images": torch.zeros(8, 4, 4)}, "4-D"),
        ({"images": torch.zeros(8, *IMAGE_SHAPE, dtype=torch.long)}, "floating"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"config": {"schedule": object()}}, "JSON"),
        ({"noise": torch.zeros(5, *IMAGE_SHAPE)}, "noise must pair one noise tensor"),
        ({"loss": "mse"}, "loss must be None .* or a callable"),
        ({"images": toy_images().double()}, r"images are torch.float64 .* images\.float\(\)"),
        ({"images": toy_images().half()}, r"images are torch.float16 .* images\.float\(\)"),
        (
            {"noise": torch.zeros(64, *IMAGE_SHAPE, dtype=torch.float64)},
            "noise must have the images' dtype torch.float32",
        ),
    ],
)
def test_bad_arguments_raise_value_errors(schedule, arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        quick_train(schedule, **arguments)


def test_a_float64_model_trains_on_float64_images(schedule: NoiseSchedule) -> None:
    result = quick_train(schedule, TinyDenoiser().double(), images=toy_images().double(), steps=3)
    assert result.steps == 3 and all(math.isfinite(value) for value in result.history.loss)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("checkpoint.pt", r"checkpoint_dir .*checkpoint.pt is a file; pass the folder that holds "
         r"checkpoint.pt, e.g. "),
        ("checkpoint.pt/run", r"checkpoint_dir .*run cannot be created"),
    ],
)  # fmt: skip
def test_a_checkpoint_dir_that_is_no_folder_fails_before_the_first_step(
    schedule, tmp_path, where, message
) -> None:
    # The natural slip: the file that sample --checkpoint takes, given as the folder.
    (tmp_path / "checkpoint.pt").write_bytes(b"a checkpoint")
    model = _InterruptingDenoiser(interrupt_at=[])
    with pytest.raises(ValueError, match=message):
        quick_train(schedule, model, checkpoint_dir=tmp_path / where)
    assert model.calls == 0
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"a checkpoint"


def test_a_frozen_model_raises(schedule: NoiseSchedule) -> None:
    frozen = TinyDenoiser().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require gradients"):
        quick_train(schedule, model=frozen)


def test_a_schedule_of_another_kind_raises() -> None:
    with pytest.raises(ValueError, match="NoiseSchedule .* or a RectifiedFlow"):
        quick_train("linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"with a custom loss, any object with a .to\(device\)"):
        quick_train("linear", loss=diffusion_loss)  # type: ignore[arg-type]


def test_a_custom_loss_may_bring_its_own_kind_of_schedule() -> None:
    """Any object with ``.to(device)`` reaches a custom loss, moved to the training device."""

    class NoiseLevels:
        def __init__(self, sigma: float, moved_to: str | None = None) -> None:
            self.sigma, self.moved_to = sigma, moved_to

        def to(self, device: torch.device) -> NoiseLevels:
            return NoiseLevels(self.sigma, str(device))

    seen = []

    def denoise_at_one_level(model, levels, x0, *, noise, labels, generator) -> Tensor:
        seen.append(levels.moved_to)
        x_t = x0 + levels.sigma * torch.randn(x0.shape, generator=generator)
        t = torch.zeros(x0.shape[0], dtype=torch.long)
        return (model(x_t, t) - x0).pow(2).mean()

    result = quick_train(NoiseLevels(0.5), loss=denoise_at_one_level, steps=5)
    assert seen == ["cpu"] * 5 and len(result.history.loss) == 5


def test_select_device_prefers_what_is_asked_and_rejects_what_is_absent() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device().type in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


def test_a_batch_larger_than_the_dataset_uses_the_whole_dataset(schedule: NoiseSchedule) -> None:
    batch_sizes = []

    class Recording(TinyDenoiser):
        def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
            batch_sizes.append(x_t.shape[0])
            return super().forward(x_t, t)

    quick_train(schedule, Recording(), images=toy_images(10), batch_size=32, steps=3)
    assert batch_sizes == [10, 10, 10]


@pytest.mark.parametrize(
    ("device", "world_size", "mode"),
    [("cuda", 1, "reduce-overhead"), ("cuda", 2, None), ("cpu", 1, None), ("mps", 1, None)],
)
def test_compile_uses_cuda_graphs_on_one_cuda_device_only(device, world_size, mode) -> None:
    group = ProcessGroup(rank=0, world_size=world_size)
    assert _compile_mode(torch.device(device), group) == mode


def _spy_on_compilation(monkeypatch, mode: str | None) -> tuple[list, list]:
    """Replace torch.compile by the identity and count step marks; force ``mode``."""
    modes, marks = [], []

    def fake_compile(module, *, mode=None):
        modes.append(mode)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(trainer_module, "_compile_mode", lambda device, group: mode)
    return modes, marks


@pytest.mark.parametrize("mode", ["reduce-overhead", None])
def test_cuda_graph_mode_marks_the_start_of_every_step(schedule, monkeypatch, mode) -> None:
    modes, marks = _spy_on_compilation(monkeypatch, mode)
    result = quick_train(schedule, steps=7, compile=True)
    assert modes == [mode]
    # Without the mark, a replay would overwrite the outputs the last step still reads.
    assert len(marks) == (7 if mode == "reduce-overhead" else 0)
    assert len(result.history.loss) == 7


def test_without_compile_nothing_is_compiled(schedule, monkeypatch) -> None:
    modes, marks = _spy_on_compilation(monkeypatch, "reduce-overhead")
    quick_train(schedule, steps=3)
    assert modes == [] and marks == []


class _FailingCompiledModel(nn.Module):
    """What a compiler that cannot build the graph behaves like: the first call raises."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Tensor) -> Tensor:
        raise RuntimeError("no C compiler found\nsecond line of the report")


class _SlowFirstCallModel(nn.Module):
    """A stand-in for compilation: the first call takes an extra second."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, *args: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == 1:
            time.sleep(1.0)
        return self.module(*args)


def _auto_compile_on(monkeypatch, threshold: float, wrapper=None) -> tuple[list, list]:
    """CUDA graphs available (as on one GPU), a chosen threshold, and a stand-in compiler."""
    modes, marks = _spy_on_compilation(monkeypatch, "reduce-overhead")
    if wrapper is not None:

        def wrapping_compile(module, *, mode=None):
            modes.append(mode)
            return wrapper(module)

        monkeypatch.setattr(torch, "compile", wrapping_compile)
    monkeypatch.setattr(loop_module, "AUTO_COMPILE_SECONDS", threshold)
    return modes, marks


def test_auto_compiles_after_the_probe_when_the_run_is_long(schedule, monkeypatch) -> None:
    """Step 1 warms up, 20 eager steps are timed, and the remaining 9 run compiled; the switch
    leaves the data order and the draws as they were."""
    eager = quick_train(schedule, compile=False).history
    modes, marks = _auto_compile_on(monkeypatch, threshold=0.0)
    result = quick_train(schedule)  # compile="auto" is the default
    assert modes == ["reduce-overhead"]
    assert len(marks) == 30 - 1 - loop_module.AUTO_COMPILE_PROBE_STEPS
    assert result.history.compiled and not eager.compiled
    assert result.history.loss == eager.loss


@pytest.mark.parametrize(
    "loss",
    [diffusion_loss, functools.partial(diffusion_loss, prediction="x0", snr_gamma=5.0)],
    ids=["diffusion_loss", "x0 target, Min-SNR"],
)
def test_auto_compiles_diffusion_loss_with_any_target(schedule, monkeypatch, loss) -> None:
    """Another target or weighting still calls the model once per step, so "auto" may compile."""
    eager = quick_train(schedule, compile=False, loss=loss).history
    modes, _ = _auto_compile_on(monkeypatch, threshold=0.0)
    result = quick_train(schedule, loss=loss)
    assert modes == ["reduce-overhead"] and result.history.compiled
    assert result.history.loss == eager.loss


def test_the_progress_bar_says_when_the_engine_compiles(schedule, monkeypatch, capsys) -> None:
    _auto_compile_on(monkeypatch, threshold=0.0)
    quick_train(schedule, progress=True)
    assert "compiling (about a minute)" in capsys.readouterr().err


def test_auto_stays_eager_for_short_runs_and_custom_objectives(schedule, monkeypatch) -> None:
    modes, marks = _auto_compile_on(monkeypatch, threshold=math.inf)
    assert not quick_train(schedule).history.compiled
    monkeypatch.setattr(loop_module, "AUTO_COMPILE_SECONDS", 0.0)

    # A custom objective may call the model twice in a step, which was not measured with graphs.
    def wrapped_loss(*args, **options):
        return diffusion_loss(*args, **options)

    assert not quick_train(schedule, loss=wrapped_loss).history.compiled
    assert not quick_train(schedule, steps=loop_module.AUTO_COMPILE_PROBE_STEPS).history.compiled
    assert modes == [] and marks == []


def test_auto_does_nothing_on_a_cpu(schedule, monkeypatch) -> None:
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, *, mode=None: modes.append(mode) or module)
    monkeypatch.setattr(loop_module, "AUTO_COMPILE_SECONDS", 0.0)
    assert not quick_train(schedule).history.compiled and modes == []


def test_auto_falls_back_to_eager_when_compiling_fails(schedule, monkeypatch) -> None:
    eager = quick_train(schedule, compile=False).history.loss
    _auto_compile_on(monkeypatch, threshold=0.0, wrapper=_FailingCompiledModel)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: no C compiler "
                      r"found\); training goes on without it"):  # fmt: skip
        result = quick_train(schedule)
    assert not result.history.compiled
    assert result.history.loss == eager  # the failed step was retried, not skipped or doubled


def test_an_explicit_compile_does_not_hide_a_failure(schedule, monkeypatch) -> None:
    _auto_compile_on(monkeypatch, threshold=0.0, wrapper=_FailingCompiledModel)
    with pytest.raises(RuntimeError, match="no C compiler"):
        quick_train(schedule, compile=True)


def test_the_compiling_step_is_left_out_of_the_throughput(schedule, monkeypatch) -> None:
    _auto_compile_on(monkeypatch, threshold=0.0, wrapper=_SlowFirstCallModel)
    result = quick_train(schedule)
    # Counting the one-second step would cap the rate at 30 steps x 16 images per second.
    assert result.history.compiled and result.history.images_per_second > 30 * 16


@pytest.mark.parametrize("value", ["yes", 1, None, "Auto"])
def test_compile_takes_true_false_or_auto(schedule, value) -> None:
    with pytest.raises(ValueError, match=r"compile must be True, False or 'auto', got"):
        quick_train(schedule, compile=value)


class _SlowDenoiser(TinyDenoiser):
    """Each call takes at least 20 ms, so a time limit falls well inside a long run."""

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        time.sleep(0.02)
        return super().forward(x_t, t)


def test_a_time_limit_stops_early_saves_and_resumes_exactly(schedule, tmp_path) -> None:
    def run(folder: str, steps: int, **options) -> TrainingResult:
        torch.manual_seed(1)
        return quick_train(schedule, _SlowDenoiser(), steps=steps, checkpoint_dir=tmp_path / folder,
                           checkpoint_every=1000, **options)  # fmt: skip

    stopped = run("pieces", 1000, time_limit=0.5)
    # At least 20 ms a step: about 25 steps fit, and never all 1000.
    assert 1 <= stopped.steps < 100 and len(stopped.history.loss) == stopped.steps
    assert 0.5 <= stopped.seconds < 5.0
    saved = torch.load(stopped.checkpoint_path, weights_only=False)
    assert saved["step"] == stopped.steps  # the stop was saved, though no checkpoint was due
    finished = run("pieces", stopped.steps + 5)
    uninterrupted = run("whole", stopped.steps + 5)
    assert finished.history.loss == uninterrupted.history.loss


class _InterruptingDenoiser(TinyDenoiser):
    """Sends its own process Ctrl-C (SIGINT) during the calls listed in ``interrupt_at``, once
    for each time a call is listed, as a user pressing Ctrl-C mid-step would."""

    def __init__(self, interrupt_at: list[int]) -> None:
        super().__init__()
        self.interrupt_at, self.calls = interrupt_at, 0

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        for _ in range(self.interrupt_at.count(self.calls)):
            os.kill(os.getpid(), signal.SIGINT)
        return super().forward(x_t, t)


@pytest.fixture
def default_ctrl_c():
    """Python's own SIGINT handler, which raises KeyboardInterrupt, for the tests of Ctrl-C. A
    process that a non-interactive shell starts in the background inherits SIGINT ignored, and
    then train() rightly leaves Ctrl-C alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("default_ctrl_c")
@pytest.mark.parametrize(
    ("interrupt_at", "checkpoint_every", "saved_step", "message"),
    [
        # Ctrl-C in step 6: the step finishes and is saved, though no checkpoint was due.
        ([6], 1000, 6, "training interrupted after step 6, saved to .*checkpoint.pt"),
        # Twice: the second stops at once, and the checkpoint of step 4 stays whole.
        ([6, 6], 4, 4, "^$"),
    ],
)
def test_ctrl_c_saves_the_last_step_and_the_run_resumes_exactly(
    schedule, tmp_path, interrupt_at, checkpoint_every, saved_step, message
) -> None:
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def run(folder: str, model_class=TinyDenoiser) -> TrainingResult:
        torch.manual_seed(1)
        return quick_train(schedule, model_class(), checkpoint_dir=tmp_path / folder,
                           checkpoint_every=checkpoint_every)  # fmt: skip

    interrupting = functools.partial(_InterruptingDenoiser, interrupt_at)
    with pytest.raises(KeyboardInterrupt, match=message):
        run("pieces", interrupting)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    saved = torch.load(tmp_path / "pieces" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == saved_step == len(saved["history"]["loss"])
    resumed = run("pieces")
    uninterrupted = run("whole")
    assert resumed.start_step == saved_step and resumed.steps == 30
    assert resumed.history.loss == uninterrupted.history.loss
    for name, tensor in uninterrupted.ema_model.state_dict().items():
        assert torch.equal(resumed.ema_model.state_dict()[name], tensor), name


@pytest.mark.usefixtures("default_ctrl_c")
def test_without_a_checkpoint_dir_ctrl_c_stops_at_once(schedule) -> None:
    model = _InterruptingDenoiser(interrupt_at=[3])
    with pytest.raises(KeyboardInterrupt, match="^$"):
        quick_train(schedule, model)
    assert model.calls == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_generous_time_limit_changes_nothing(schedule) -> None:
    assert quick_train(schedule, time_limit=3600).history.loss == quick_train(schedule).history.loss


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "10"])
def test_a_time_limit_must_be_a_positive_number_of_seconds(schedule, value) -> None:
    with pytest.raises(ValueError, match="time_limit"):
        quick_train(schedule, time_limit=value)


def test_exact_float32_turns_tf32_off_inside_the_block_and_restores_the_settings() -> None:
    switches = devices._precision_switches()
    before = [getattr(backend, name) for backend, name, _ in switches]
    with exact_float32():
        assert [getattr(backend, name) for backend, name, _ in switches] == [
            exact for _, _, exact in switches
        ]
    assert [getattr(backend, name) for backend, name, _ in switches] == before
    with pytest.raises(RuntimeError, match="inside"), exact_float32():
        raise RuntimeError("raised inside the block")
    assert [getattr(backend, name) for backend, name, _ in switches] == before


def test_timed_returns_the_result_and_the_seconds_of_the_timed_call_only() -> None:
    calls = []

    def work() -> int:
        calls.append(time.perf_counter())
        time.sleep(0.3 if len(calls) == 1 else 0.05)  # only the first call is slow
        return len(calls)

    result, seconds = timed(work, "cpu", warm_up=True)
    assert result == 2 and len(calls) == 2  # the warm-up ran, then the timed call
    assert 0.05 <= seconds < 0.25  # the slow first call is not counted
    calls.clear()
    result, seconds = timed(work, "cpu")  # on a CPU no warm-up by default
    assert result == 1 and seconds >= 0.3
    calls.clear()
    result, seconds = timed(work, "meta")  # elsewhere (the meta device stands in for a GPU) one
    assert result == 2 and seconds < 0.25


def test_timed_puts_the_random_state_back_after_the_warm_up() -> None:
    torch.manual_seed(3)
    alone = torch.rand(4)
    torch.manual_seed(3)
    drawn, _ = timed(lambda: torch.rand(4), "cpu", warm_up=True)
    torch.testing.assert_close(drawn, alone, rtol=0, atol=0)
    after = torch.rand(1)  # the warm-up's draws were undone: the timed call's were not
    torch.manual_seed(3)
    torch.testing.assert_close(after, torch.rand(5)[4:], rtol=0, atol=0)
