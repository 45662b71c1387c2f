"""The training engine: Ho et al.'s Algorithm 1, run fast on a GPU and safe to interrupt.

Algorithm 1 of Ho et al. (2020) repeats: take a batch x_0, draw t ~ Uniform{0..T-1} and
eps ~ N(0, I), and step on the gradient of ``||eps - eps_theta(x_t, t)||^2``. :func:`train`
adds what makes that loop practical:

* The whole dataset lives on the device as one tensor; a batch is a slice of a random
  permutation of its rows, so no data loader sits between the GPU and its work.
* bf16 autocast and fused AdamW on CUDA, optional ``torch.compile``, channels-last weights.
* An exponential moving average (EMA) of the weights, which is what sampling uses.
* Linear learning-rate warmup and gradient-norm clipping.
* Losses stay on the device and are read in chunks, so the GPU never waits for Python.
* Atomic checkpoints and exact resumption: the data order and every random draw depend
  only on ``seed`` and the step number, so a resumed run repeats the uninterrupted one.
* Several processes under ``torchrun``, with DistributedDataParallel.

Given a :class:`~diffusion_lib.flow_matching.RectifiedFlow` instead of a noise schedule, the
same loop trains a velocity model by flow matching.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from diffusion_lib.checkpoints import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from diffusion_lib.devices import (
    ProcessGroup,
    join_process_group,
    leave_process_group,
    select_device,
    synchronize,
)
from diffusion_lib.ema import ExponentialMovingAverage
from diffusion_lib.flow_matching import RectifiedFlow, flow_matching_loss
from diffusion_lib.losses import diffusion_loss
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_dataset_size, cap_training_steps
from diffusion_lib.validation import check_number

__all__ = [
    "CheckpointError",
    "ExponentialMovingAverage",
    "NonFiniteLossError",
    "TrainingHistory",
    "TrainingResult",
    "load_checkpoint",
    "select_device",
    "train",
]

# Steps between two reads of the losses from an accelerator; each read waits for the GPU.
LOSS_READ_INTERVAL = 50


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped and no checkpoint of that state was written."""


@dataclass
class TrainingHistory:
    """What a run measured.

    Attributes:
        loss: one value of the simplified loss per optimisation step, from the first step of
            the run (a resumed run includes the steps before the interruption).
        images_per_second: training throughput of this call, over all processes, not counting
            the first step (where ``torch.compile`` does its work) nor checkpoint writes.
    """

    loss: list[float] = field(default_factory=list)
    images_per_second: float = float("nan")


@dataclass
class TrainingResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained network (the module that was passed in), on ``device``.
        ema_model: a copy holding the moving average of its weights, in eval mode; sample with it.
        history: losses and throughput, see :class:`TrainingHistory`.
        seconds: wall-clock time of this call.
        steps: optimisation steps taken in total (including those before a resume).
        checkpoint_path: the checkpoint file, or None when ``checkpoint_dir`` was not given.
        device: where the model lives.
    """

    model: nn.Module
    ema_model: nn.Module
    history: TrainingHistory
    seconds: float
    steps: int
    checkpoint_path: Path | None
    device: torch.device


def _derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed determined by ``seed`` and ``parts`` only (e.g. a purpose and a step)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: rises linearly to 1 over ``warmup_steps`` steps, then stays."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


class _BatchPlan:
    """Which dataset rows each step uses: epoch e visits a permutation seeded by (seed, e).

    ``batch_size`` is global; the process of rank r takes rows ``[r b, (r + 1) b)`` of every
    global batch, with ``b = batch_size / world_size``. Incomplete batches at an epoch's end
    are skipped, so each step has exactly ``batch_size`` images. Permutations are drawn on
    the CPU, so the data order is the same on every device.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, group: ProcessGroup) -> None:
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.steps_per_epoch = dataset_size // batch_size
        self._epoch = -1
        self._permutation: Tensor | None = None

    def indices(self, step: int, device: torch.device) -> Tensor:
        """This process's rows of the dataset for ``step``, shape (batch_size / world_size,)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch or self._permutation is None:
            generator = torch.Generator().manual_seed(_derived_seed(self.seed, "order", epoch))
            self._permutation = torch.randperm(self.dataset_size, generator=generator).to(device)
            self._epoch = epoch
        shard = self.batch_size // self.group.world_size
        start = position * self.batch_size + self.group.rank * shard
        return self._permutation[start : start + shard]


@dataclass(frozen=True)
class _Settings:
    """The checked arguments of :func:`train` that the loop reads."""

    total_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float | None
    ema_decay: float
    label_dropout: float
    compile: bool
    amp: bool
    checkpoint_path: Path | None
    checkpoint_every: int
    resume: bool
    seed: int
    progress: bool
    config: dict[str, Any] | None
    loss: Callable[..., Tensor] | None = None


class _Trainer:
    """Model, optimiser, EMA and data of one run, with the step, read and save operations."""

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule | RectifiedFlow,
        images: Tensor,
        labels: Tensor | None,
        noise: Tensor | None,
        settings: _Settings,
        device: torch.device,
        group: ProcessGroup,
    ) -> None:
        self.settings, self.device, self.group = settings, device, group
        on_cuda = device.type == "cuda"
        # Channels-last lets cuDNN's bf16 convolutions run without layout transposes.
        images_4d = images.dim() == 4
        self.memory_format = torch.channels_last if on_cuda and images_4d else torch.preserve_format
        self.model = model.to(device=device, memory_format=self.memory_format).train()
        self.schedule = schedule.to(device)
        default_loss = flow_matching_loss if isinstance(schedule, RectifiedFlow) else diffusion_loss
        self.loss = settings.loss or default_loss
        self.images = images.to(device)
        self.noise = None if noise is None else noise.to(device)
        self.labels = labels.to(device, torch.long) if labels is not None else None
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            fused=True if on_cuda else None,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(_warmup_factor, warmup_steps=settings.warmup_steps)
        )
        self.ema = ExponentialMovingAverage(self.model, settings.ema_decay)
        self.plan = _BatchPlan(len(images), settings.batch_size, settings.seed, group)
        # Noise is drawn where the model runs; a seeded CPU generator serves MPS.
        self.generator = torch.Generator(device=device if on_cuda else "cpu")
        self.forward_model: nn.Module = self.model
        self.step = 0
        self.last_saved_step: int | None = None
        self.history = TrainingHistory()
        self.pending: list[Tensor] = []

    def wrap(self) -> None:
        """Wrap the model for several processes and compile it; done after any resume."""
        if self.group.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=device_ids)
            # DDP gave every process rank 0's weights; the averages must agree as well.
            for tensor in self.ema.module.state_dict().values():
                dist.broadcast(tensor, src=0)
        if self.settings.compile:
            self.forward_model = torch.compile(self.forward_model)

    def _batch_labels(self, indices: Tensor) -> Tensor | None:
        """Class labels of the batch, each replaced by the null label with probability p_uncond."""
        if self.labels is None:
            return None
        labels = self.labels[indices]
        if self.settings.label_dropout > 0:
            uniform = torch.rand(
                labels.shape, generator=self.generator, device=self.generator.device
            )
            dropped = uniform.to(self.device) < self.settings.label_dropout
            labels = labels.masked_fill(dropped, self.model.null_label)
        return labels

    def train_step(self) -> None:
        """One step of Algorithm 1 (Ho et al. 2020), or of flow matching; the loss stays on the device."""
        settings = self.settings
        indices = self.plan.indices(self.step, self.device)
        x0 = self.images[indices].contiguous(memory_format=self.memory_format)
        self.generator.manual_seed(
            _derived_seed(settings.seed, "noise", self.step, self.group.rank)
        )
        labels = self._batch_labels(indices)
        noise = (
            None
            if self.noise is None
            else self.noise[indices].contiguous(memory_format=self.memory_format)
        )
        amp = settings.amp and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = self.loss(
                self.forward_model,
                self.schedule,
                x0,
                noise=noise,
                labels=labels,
                generator=self.generator,
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.ema.update(self.step)
        self.pending.append(loss.detach())
        self.step += 1

    def read_losses(self) -> list[float]:
        """Fetch the pending losses (averaged over processes) in one transfer and check them."""
        if not self.pending:
            return []
        chunk = torch.stack(self.pending).float()
        self.pending.clear()
        if self.group.is_distributed:
            dist.all_reduce(chunk)
            chunk /= self.group.world_size
        values = chunk.tolist()
        first_step = self.step - len(values) + 1
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(self._non_finite_message(value, first_step + offset))
        self.history.loss.extend(values)
        return values

    def _non_finite_message(self, value: float, step: int) -> str:
        if self.last_saved_step is None:
            kept = "No checkpoint had been written."
        else:
            kept = (
                f"The last good checkpoint, from step {self.last_saved_step}, is kept at "
                f"{self.settings.checkpoint_path}."
            )
        return (
            f"the loss became {value} at step {step}, so training stopped. {kept} Try a lower "
            f"learning rate (lr={self.settings.lr}), gradient clipping, or check the data for "
            "NaN or huge values."
        )

    def save(self) -> None:
        """Write the checkpoint (rank 0 only); call right after :meth:`read_losses`."""
        path = self.settings.checkpoint_path
        if path is None:
            return
        if self.group.is_main:
            self._write(path)
        self.last_saved_step = self.step

    def _write(self, path: Path) -> None:
        data_order = {
            "seed": self.settings.seed,
            "dataset_size": self.plan.dataset_size,
            "batch_size": self.settings.batch_size,
            "world_size": self.group.world_size,
        }
        state = training_state(
            step=self.step,
            model=self.model,
            ema_model=self.ema.module,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            device=self.device,
            data_order=data_order,
            losses=self.history.loss,
            config=self.settings.config,
        )
        save_checkpoint(path, state)

    def resume(self) -> None:
        """Continue from the checkpoint if there is one and ``resume`` is set."""
        path = self.settings.checkpoint_path
        if path is None or not self.settings.resume or not path.exists():
            return
        self.step, self.history.loss = restore_training_state(
            path,
            model=self.model,
            ema_model=self.ema.module,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            device=self.device,
            config=self.settings.config,
        )
        self.last_saved_step = self.step


def _check_data(images: Tensor, labels: Tensor | None, noise: Tensor | None) -> None:
    if not isinstance(images, Tensor) or images.dim() not in (2, 4):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"images must be a 4-D tensor of images (N, C, H, W) or a 2-D tensor of points "
            f"(N, D), got {shape}"
        )
    if not images.dtype.is_floating_point:
        raise ValueError(
            f"images must be floating point, scaled as the model expects; got {images.dtype}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty: the dataset needs at least one image")
    if noise is not None and (not isinstance(noise, Tensor) or noise.shape != images.shape):
        shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(
            f"noise must pair one noise tensor with each image, shape {tuple(images.shape)}; "
            f"got {shape}"
        )
    if labels is None:
        return
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
        raise ValueError("labels must be a 1-D integer tensor (N,) of class indices")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but images has {images.shape[0]}; give one per image"
        )


def _check_integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _total_steps(steps: int | None, epochs: float | None, steps_per_epoch: int) -> int:
    """Steps of the run from exactly one of ``steps`` and ``epochs``, capped in smoke mode."""
    if (steps is None) == (epochs is None):
        raise ValueError(
            "give exactly one of steps (optimisation steps) and epochs (passes over the data)"
        )
    if steps is not None:
        total = _check_integer("steps", steps, 1)
    else:
        epochs = check_number("epochs", epochs, 0.0, low_open=True)
        total = max(1, math.ceil(epochs * steps_per_epoch))
    return cap_training_steps(total)


def _json_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``config`` as it reads back from JSON (tuples become lists), or ValueError."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(config))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"config must hold only JSON values (dicts, lists, numbers, strings): {error}"
        ) from None


def _global_batch_size(batch_size: int, dataset_size: int, group: ProcessGroup) -> int:
    batch_size = _check_integer("batch_size", batch_size, 1)
    if batch_size % group.world_size:
        raise ValueError(
            f"batch_size={batch_size} is the global batch and must divide evenly among the "
            f"{group.world_size} processes"
        )
    # A batch larger than the dataset becomes the whole dataset (rounded to the processes).
    usable = min(batch_size, dataset_size) // group.world_size * group.world_size
    if usable < 1:
        raise ValueError(
            f"{dataset_size} images cannot be shared among {group.world_size} processes"
        )
    return usable


def _seed_global_generators(seed: int, rank: int, device: torch.device) -> None:
    """Seed the generators that layers such as dropout draw from (restored when train returns)."""
    torch.default_generator.manual_seed(_derived_seed(seed, "global", rank))
    if device.type == "cuda":
        torch.cuda.default_generators[device.index].manual_seed(_derived_seed(seed, "cuda", rank))


def _run_loop(trainer: _Trainer, bar: tqdm) -> float:
    """Train up to ``total_steps``; return the throughput in images per second (all processes)."""
    settings = trainer.settings
    read_interval = 1 if trainer.device.type == "cpu" else LOSS_READ_INTERVAL
    first_step = trainer.step
    started = time.perf_counter()
    timed_from, saving_seconds = started, 0.0
    while trainer.step < settings.total_steps:
        trainer.train_step()
        if trainer.step == first_step + 1 and settings.total_steps > trainer.step:
            synchronize(trainer.device)  # the first step compiles; time the rest
            timed_from = time.perf_counter()
        checkpoint_due = (
            trainer.step % settings.checkpoint_every == 0 or trainer.step == settings.total_steps
        )
        if checkpoint_due or len(trainer.pending) >= read_interval:
            values = trainer.read_losses()
            timed_seconds = time.perf_counter() - timed_from - saving_seconds
            rate = (trainer.step - first_step - 1) * settings.batch_size / max(timed_seconds, 1e-9)
            bar.set_postfix(
                loss=f"{sum(values) / len(values):.4f}", images_per_s=f"{rate:.0f}", refresh=False
            )
            bar.update(len(values))
        if checkpoint_due:
            before = time.perf_counter()
            trainer.save()
            saving_seconds += time.perf_counter() - before
    synchronize(trainer.device)
    timed_steps = trainer.step - first_step - (1 if trainer.step - first_step > 1 else 0)
    seconds = time.perf_counter() - timed_from - saving_seconds
    return timed_steps * settings.batch_size / seconds if timed_steps > 0 else float("nan")


def train(
    model: nn.Module,
    schedule: NoiseSchedule | RectifiedFlow,
    images: Tensor,
    *,
    labels: Tensor | None = None,
    noise: Tensor | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 128,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 100,
    grad_clip: float | None = 1.0,
    ema_decay: float = 0.999,
    label_dropout: float = 0.0,
    device: str | torch.device | None = None,
    compile: bool = False,
    amp: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    config: dict[str, Any] | None = None,
    loss: Callable[..., Tensor] | None = None,
) -> TrainingResult:
    """Train a noise predictor with the simplified loss (Ho et al. 2020, Algorithm 1, eq. 14),
    or a velocity model with the flow-matching loss when ``schedule`` is a :class:`RectifiedFlow`.

    Args:
        model: ``model(x_t, t) -> eps``, or ``model(x_t, t, labels)`` when ``labels`` are given.
            It is moved to the device and trained in place.
        schedule: the noise schedule, moved to the device; or a
            :class:`~diffusion_lib.flow_matching.RectifiedFlow` for flow matching.
        images: (N, C, H, W) float data, already scaled as the model expects (e.g. to [-1, 1]),
            or (N, D) points for a model of points such as :class:`~diffusion_lib.ToyMLP`.
        labels: (N,) int64 class labels for a conditional model.
        noise: a fixed noise partner for every image, shaped like ``images``, used instead of
            fresh noise at each step: the coupling that reflow trains on (Liu et al. 2023).
        steps, epochs: the length of the run; give exactly one. ``epochs`` may be fractional.
        batch_size: the global batch: images per optimisation step over all processes (each of
            W processes takes ``batch_size / W``). Capped at the dataset size.
        lr, weight_decay: AdamW's learning rate and decoupled weight decay.
        warmup_steps: the learning rate rises linearly from ``lr / warmup_steps`` to ``lr``.
        grad_clip: largest gradient norm; ``None`` or 0 turns clipping off.
        ema_decay: decay of the weights' moving average (see :class:`ExponentialMovingAverage`).
        label_dropout: probability of replacing a label by ``model.null_label``, which trains
            the unconditional model needed for classifier-free guidance (Ho & Salimans 2021).
        device: default :func:`select_device` (CUDA, else MPS, else CPU).
        compile: run the model through ``torch.compile``.
        amp: bf16 autocast, on CUDA only.
        checkpoint_dir: folder for ``checkpoint.pt``, written every ``checkpoint_every`` steps
            and at the end (see :mod:`diffusion_lib.checkpoints`); ``None`` writes nothing.
        resume: continue from an existing checkpoint in ``checkpoint_dir``.
        seed: fixes the data order, timesteps, noise and label dropout of every step; the same
            seed on a CPU gives the same losses, and a resumed run those of an uninterrupted one.
        progress: show a progress bar with the loss and images per second.
        config: JSON-able description of the run (model and schedule names and arguments,
            dataset, value range) stored in the checkpoint so it can be rebuilt later.
        loss: another objective with the signature of :func:`diffusion_loss`,
            ``loss(model, schedule, x0, *, noise, labels, generator) -> scalar``, such as
            :class:`~diffusion_lib.distillation.ProgressiveDistillation`. By default
            :func:`diffusion_loss`, or :func:`flow_matching_loss` for a ``RectifiedFlow``.

    Returns a :class:`TrainingResult`. Raises ``ValueError`` for bad arguments,
    :class:`~diffusion_lib.checkpoints.CheckpointError` for an unusable checkpoint and
    :class:`NonFiniteLossError` when the loss diverges. In smoke mode the dataset and the
    number of steps are capped. Under ``torchrun`` every process calls ``train`` alike.
    """
    started = time.perf_counter()
    if not isinstance(schedule, NoiseSchedule | RectifiedFlow):
        raise ValueError(
            "schedule must be a NoiseSchedule (noise prediction) or a RectifiedFlow (flow "
            f"matching), got {type(schedule).__name__}"
        )
    _check_data(images, labels, noise)
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ValueError(
            "the model has no parameters that require gradients (an EMA copy is frozen): "
            "load its weights into a new model, or call model.requires_grad_() first"
        )
    if loss is not None and not callable(loss):
        raise ValueError(
            "loss must be None (the default objective) or a callable "
            f"loss(model, schedule, x0, *, noise, labels, generator), got {type(loss).__name__}"
        )
    label_dropout = check_number("label_dropout", label_dropout, 0.0, 1.0, low_open=False)
    if label_dropout > 0 and (labels is None or getattr(model, "null_label", None) is None):
        raise ValueError(
            "label_dropout > 0 needs labels and a conditional model with a null_label attribute "
            "(the class index that means 'no label')"
        )
    options = {
        "lr": check_number("lr", lr, 0.0, low_open=True),
        "weight_decay": check_number("weight_decay", weight_decay, 0.0, low_open=False),
        "warmup_steps": _check_integer("warmup_steps", warmup_steps, 0),
        "grad_clip": check_number("grad_clip", grad_clip, 0.0, low_open=True)
        if grad_clip
        else None,
        "ema_decay": check_number("ema_decay", ema_decay, 0.0, 1.0, low_open=False),
        "label_dropout": label_dropout,
        "compile": bool(compile),
        "amp": bool(amp),
        "checkpoint_path": None
        if checkpoint_dir is None
        else Path(checkpoint_dir) / CHECKPOINT_NAME,
        "checkpoint_every": _check_integer("checkpoint_every", checkpoint_every, 1),
        "resume": bool(resume),
        "seed": _check_integer("seed", seed, 0),
        "progress": bool(progress),
        "config": _json_config(config),
        "loss": loss,
    }
    images = images[: cap_dataset_size(images.shape[0])]
    labels = labels[: images.shape[0]] if labels is not None else None
    noise = noise[: images.shape[0]] if noise is not None else None
    device = select_device(device)
    group = join_process_group(device)
    try:
        batch = _global_batch_size(batch_size, images.shape[0], group)
        total_steps = _total_steps(steps, epochs, images.shape[0] // batch)
        settings = _Settings(total_steps=total_steps, batch_size=batch, **options)
        data = (images, labels, noise)
        return _train(model, schedule, data, settings, device, group, started)
    finally:
        leave_process_group(group)


def _train(
    model: nn.Module,
    schedule: NoiseSchedule | RectifiedFlow,
    data: tuple[Tensor, Tensor | None, Tensor | None],
    settings: _Settings,
    device: torch.device,
    group: ProcessGroup,
    started: float,
) -> TrainingResult:
    cuda_devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
        _seed_global_generators(settings.seed, group.rank, device)
        trainer = _Trainer(model, schedule, *data, settings, device, group)
        trainer.resume()
        trainer.wrap()
        bar = tqdm(
            total=settings.total_steps,
            initial=min(trainer.step, settings.total_steps),
            desc="training",
            unit="step",
            disable=not (settings.progress and group.is_main),
        )
        with contextlib.closing(bar):
            images_per_second = _run_loop(trainer, bar)
        if group.is_distributed:
            dist.barrier()  # every process returns only once the checkpoint is on disk
    trainer.history.images_per_second = images_per_second
    return TrainingResult(
        model=trainer.model,
        ema_model=trainer.ema.module,
        history=trainer.history,
        seconds=time.perf_counter() - started,
        steps=trainer.step,
        checkpoint_path=settings.checkpoint_path,
        device=device,
    )
