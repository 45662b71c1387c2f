"""The training engine: Ho et al.'s Algorithm 1, run fast on a GPU and safe to interrupt.

Algorithm 1 of Ho et al. (2020) repeats: take a batch x_0, draw t ~ Uniform{0..T-1} and
eps ~ N(0, I), and step on the gradient of ``||eps - eps_theta(x_t, t)||^2``. :func:`train`
adds what makes that loop practical:

* The whole dataset lives on the device as one tensor; a batch is a slice of a random
  permutation of its rows, so no data loader sits between the GPU and its work.
* bf16 autocast and fused AdamW on CUDA, channels-last weights, and ``torch.compile`` with
  CUDA graphs for long runs on one GPU.
* An exponential moving average (EMA) of the weights, which is what sampling uses.
* Linear learning-rate warmup and gradient-norm clipping.
* Losses stay on the device and are read in chunks, so the GPU never waits for Python.
* Atomic checkpoints and exact resumption: the data order and every random draw depend
  only on ``seed`` and the step number, so a resumed run repeats the uninterrupted one. Ctrl-C
  finishes the step in flight and saves it before it stops the run.
* Several processes under ``torchrun``, with DistributedDataParallel.

Given a :class:`~diffusion_lib.flow_matching.RectifiedFlow` instead of a noise schedule, the
same loop trains a velocity model by flow matching.

The engine's pieces live in their own modules: :mod:`diffusion_lib.trainer` holds one run's
state and its step, :mod:`diffusion_lib.training_setup` checks the arguments, and
:mod:`diffusion_lib.batches` fixes the data order and the seeds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusion_lib.batches import _seed_global_generators
from diffusion_lib.checkpoints import CheckpointError, load_checkpoint
from diffusion_lib.devices import (
    ProcessGroup,
    join_process_group,
    leave_process_group,
    select_device,
)
from diffusion_lib.ema import ExponentialMovingAverage
from diffusion_lib.flow_matching import RectifiedFlow
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_dataset_size
from diffusion_lib.trainer import NonFiniteLossError, TrainingHistory, _Trainer
from diffusion_lib.training_loop import run_loop
from diffusion_lib.training_setup import (
    AUTO_COMPILE,
    _check_compile,
    _check_data,
    _check_dtypes,
    _check_integer,
    _check_label_dropout,
    _check_objective,
    _check_trainable,
    _checkpoint_path,
    _global_batch_size,
    _json_config,
    _Settings,
    _total_steps,
)
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
        start_step: the step this call resumed from (0 for a fresh run); this call took
            ``steps - start_step`` steps.
    """

    model: nn.Module
    ema_model: nn.Module
    history: TrainingHistory
    seconds: float
    steps: int
    checkpoint_path: Path | None
    device: torch.device
    start_step: int = 0


def train(
    model: nn.Module,
    schedule: NoiseSchedule | RectifiedFlow | Any,
    images: Tensor,
    *,
    labels: Tensor | None = None,
    noise: Tensor | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    time_limit: float | None = None,
    batch_size: int = 128,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 100,
    grad_clip: float | None = 1.0,
    ema_decay: float = 0.999,
    label_dropout: float = 0.0,
    device: str | torch.device | None = None,
    compile: bool | str = AUTO_COMPILE,
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
            :class:`~diffusion_lib.flow_matching.RectifiedFlow` for flow matching. With a
            custom ``loss``, any object with a ``.to(device)`` method that the loss reads.
        images: (N, C, H, W) float data, already scaled as the model expects (e.g. to [-1, 1]),
            or (N, D) points for a model of points such as
            :class:`~diffusion_lib.models.toy_mlp.ToyMLP`.
        labels: (N,) int64 class labels for a conditional model.
        noise: a fixed noise partner for every image, shaped like ``images``, used instead of
            fresh noise at each step: the coupling that reflow trains on (Liu et al. 2023).
        steps, epochs: the length of the run; give exactly one. ``epochs`` may be fractional.
        time_limit: seconds after which this call stops early, counted from its start
            (compilation included), at the first loss read after the limit (every step on a
            CPU, every 50 on a GPU). It saves a checkpoint there, so a later call with the same
            ``checkpoint_dir`` goes on; ``steps`` of the result says how far it got.
        batch_size: the global batch: images per optimisation step over all processes (each of
            W processes takes ``batch_size / W``). Capped at the dataset size.
        lr, weight_decay: AdamW's learning rate and decoupled weight decay.
        warmup_steps: the learning rate rises linearly from ``lr / warmup_steps`` to ``lr``.
        grad_clip: largest gradient norm; ``None`` or 0 turns clipping off.
        ema_decay: decay of the weights' moving average (see :class:`ExponentialMovingAverage`).
        label_dropout: probability of replacing a label by ``model.null_label``, which trains
            the unconditional model needed for classifier-free guidance (Ho & Salimans 2021).
        device: default :func:`select_device` (CUDA, else MPS, else CPU).
        compile: ``True`` runs the model through ``torch.compile``: on a single CUDA device in
            its ``"reduce-overhead"`` mode, which replays each step's kernels as CUDA graphs.
            The book's networks are small enough that launching kernels, not the GPU, limits an
            eager step: on an H100 this made ``AttentionUNet`` at batch 128 train 5.6x faster
            (11,300 against 2,000 images/s), after about a minute of compilation
            (``benchmarks/PROFILE.md``). ``"auto"`` (the default) does so only where that can
            pay: on a single CUDA device, with an objective that calls the model once per step
            (the default, or :func:`~diffusion_lib.losses.diffusion_loss` with another
            ``prediction`` or ``snr_gamma``), when the first eager steps say the rest of the
            run would take over five minutes; should compiling fail, it warns and goes on
            eagerly. ``False`` never compiles.
        amp: bf16 autocast, on CUDA only.
        checkpoint_dir: folder for ``checkpoint.pt``, written every ``checkpoint_every`` steps
            and at the end (see :mod:`diffusion_lib.checkpoints`); ``None`` writes nothing. It
            is created before the first step, and a file in its place raises ``ValueError``.
            With a checkpoint folder, in a single process, Ctrl-C (or Jupyter's "interrupt
            kernel") lets the step in flight finish, saves it, and then raises
            ``KeyboardInterrupt``, so that the same call goes on from there; a second Ctrl-C
            stops at once, leaving the last checkpoint whole.
        resume: continue from an existing checkpoint in ``checkpoint_dir``. ``steps`` counts
            the checkpoint's steps too; ``lr`` and ``weight_decay`` are this call's, with a
            warning when they differ from the checkpoint's. ``seed``, ``batch_size`` and the
            number of images fix the batches, so a checkpoint trained with others is refused
            (a ``CheckpointError``), as is one of another model or ``config``.
        seed: fixes the data order, timesteps, noise and label dropout of every step; the same
            seed on a CPU gives the same losses, and a resumed run those of an uninterrupted one.
        progress: show a progress bar with the loss and images per second.
        config: JSON-able description of the run (model and schedule names and arguments,
            dataset, value range) stored in the checkpoint so it can be rebuilt later.
        loss: another objective with the signature of :func:`~diffusion_lib.losses.diffusion_loss`,
            ``loss(model, schedule, x0, *, noise, labels, generator) -> scalar``, such as
            :class:`~diffusion_lib.distillation.ProgressiveDistillation`. By default
            :func:`~diffusion_lib.losses.diffusion_loss`, or
            :func:`~diffusion_lib.flow_matching.flow_matching_loss` for a ``RectifiedFlow``.

    Returns a :class:`TrainingResult`. Raises ``ValueError`` for bad arguments (among them
    images whose dtype is not that of the model's weights, such as float64 images for a float32
    model: pass ``images.float()``), :class:`~diffusion_lib.checkpoints.CheckpointError` for
    an unusable checkpoint, :class:`NonFiniteLossError` when the loss diverges and
    ``KeyboardInterrupt`` after saving the step that Ctrl-C interrupted. In smoke mode the
    dataset and the number of steps are capped. Under ``torchrun`` every process calls
    ``train`` alike.
    """
    started = time.perf_counter()
    _check_objective(schedule, loss)
    _check_data(images, labels, noise)
    _check_dtypes(model, images, noise)
    _check_trainable(model)
    label_dropout = _check_label_dropout(label_dropout, model, labels)
    options = {
        "lr": check_number("lr", lr, 0.0, low_open=True),
        "weight_decay": check_number("weight_decay", weight_decay, 0.0, low_open=False),
        "warmup_steps": _check_integer("warmup_steps", warmup_steps, 0),
        "grad_clip": check_number("grad_clip", grad_clip, 0.0, low_open=True)
        if grad_clip
        else None,
        "ema_decay": check_number("ema_decay", ema_decay, 0.0, 1.0, low_open=False),
        "label_dropout": label_dropout,
        "compile": _check_compile(compile),
        "time_limit": None
        if time_limit is None
        else check_number("time_limit", time_limit, 0.0, low_open=True),
        "amp": bool(amp),
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
        checkpoint_path = _checkpoint_path(checkpoint_dir)
        settings = _Settings(
            total_steps=total_steps, batch_size=batch, checkpoint_path=checkpoint_path, **options
        )
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
        start_step = trainer.step
        trainer.wrap()
        bar = tqdm(
            total=settings.total_steps,
            initial=min(trainer.step, settings.total_steps),
            desc="training",
            unit="step",
            disable=not (settings.progress and group.is_main),
        )
        with contextlib.closing(bar):
            deadline = None if settings.time_limit is None else started + settings.time_limit
            images_per_second = run_loop(trainer, bar, deadline)
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
        start_step=start_step,
    )
