"""One training run's state and what it does at each step: ``_Trainer``.

It holds the model, the optimiser with its warmup, the moving average of the weights and the
data on the device; it takes a step of Algorithm 1 (Ho et al. 2020) or of flow matching,
reads the losses back in chunks, and writes or resumes checkpoints. The loop that drives it
is :func:`diffusion_lib.training.train`.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from diffusion_lib.batches import _BatchPlan, _derived_seed
from diffusion_lib.checkpoints import save_checkpoint
from diffusion_lib.devices import ProcessGroup
from diffusion_lib.ema import ExponentialMovingAverage
from diffusion_lib.flow_matching import RectifiedFlow, flow_matching_loss
from diffusion_lib.losses import diffusion_loss
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.training_setup import AUTO_COMPILE, _Settings
from diffusion_lib.training_state import restore_training_state, training_state


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped and no checkpoint of that state was written."""


@dataclass
class TrainingHistory:
    """What a run measured.

    Attributes:
        loss: one value of the simplified loss per optimisation step, from the first step of
            the run (a resumed run includes the steps before the interruption).
        images_per_second: training throughput of this call, over all processes, not counting
            the first step, the step where ``torch.compile`` does its work, nor checkpoint writes.
        compiled: whether the steps ran through ``torch.compile`` (with ``compile="auto"``, from
            the step where the engine decided to compile on).
    """

    loss: list[float] = field(default_factory=list)
    images_per_second: float = float("nan")
    compiled: bool = False


def _warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: rises linearly to 1 over ``warmup_steps`` steps, then stays."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def _calls_the_model_once(loss: object) -> bool:
    """Whether the objective is a default one, possibly with other options (such as
    ``functools.partial(diffusion_loss, prediction="x0")``): one model call per step."""
    while isinstance(loss, functools.partial):
        loss = loss.func
    return loss is None or loss is diffusion_loss or loss is flow_matching_loss


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
        self.eager_model: nn.Module = self.model
        self.compile_mode: str | None = None  # the mode of torch.compile, once compiled
        # "auto" considers only objectives that call the model once per step, as the default
        # ones measured under CUDA graphs do; it decides after timing some eager steps.
        self.may_compile_later = (
            settings.compile == AUTO_COMPILE
            and _calls_the_model_once(settings.loss)
            and _compile_mode(device, group) == "reduce-overhead"
        )
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
        self.eager_model = self.forward_model
        if self.settings.compile is True:
            self.compile()

    def compile(self) -> None:
        """Run the model through ``torch.compile`` from the next step on (see _compile_mode)."""
        self.compile_mode = _compile_mode(self.device, self.group)
        self.forward_model = torch.compile(self.eager_model, mode=self.compile_mode)
        self.history.compiled = True

    def compiling_step(self) -> None:
        """The first step after ``compile="auto"`` chose to compile. The user did not ask for
        compilation, so a compiler failure warns and the step is retried eagerly."""
        try:
            self.train_step()
        except Exception as error:  # noqa: BLE001 - any compiler failure; eager retries
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            warnings.warn(
                f"torch.compile failed ({type(error).__name__}: {reason}); training goes on "
                "without it. Pass compile=False to skip the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
            self.forward_model, self.compile_mode = self.eager_model, None
            self.history.compiled = False
            self.train_step()  # nothing was updated: the optimiser steps after backward

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
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are spent
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

    def _data_order(self) -> dict[str, int]:
        """What fixes the batches of every step (see :class:`~diffusion_lib.batches._BatchPlan`)."""
        return {
            "seed": self.settings.seed,
            "dataset_size": self.plan.dataset_size,
            "batch_size": self.settings.batch_size,
            "world_size": self.group.world_size,
        }

    def _write(self, path: Path) -> None:
        state = training_state(
            step=self.step,
            model=self.model,
            ema_model=self.ema.module,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            device=self.device,
            data_order=self._data_order(),
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
            data_order=self._data_order(),
        )
        self.last_saved_step = self.step
        self._use_this_calls_optimiser_settings(path)

    def _use_this_calls_optimiser_settings(self, path: Path) -> None:
        """A checkpoint's optimiser state carries the learning rate and weight decay it was
        trained with; the values this call asked for replace them, with a warning if they
        differ, so that a resumed run can go on with, say, a smaller learning rate."""
        lr, weight_decay = self.settings.lr, self.settings.weight_decay
        saved_lr = self.lr_scheduler.base_lrs[0]
        saved_decay = self.optimizer.param_groups[0]["weight_decay"]
        if (saved_lr, saved_decay) != (lr, weight_decay):
            warnings.warn(
                f"resuming {path} with lr={lr:g} and weight_decay={weight_decay:g}; the checkpoint "
                f"was trained with lr={saved_lr:g} and weight_decay={saved_decay:g}",
                stacklevel=5,  # the caller of train()
            )
        factor = _warmup_factor(self.lr_scheduler.last_epoch, self.settings.warmup_steps)
        self.lr_scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group.update(initial_lr=lr, lr=lr * factor, weight_decay=weight_decay)


def _compile_mode(device: torch.device, group: ProcessGroup) -> str | None:
    """The ``torch.compile`` mode: CUDA graphs on a single CUDA device, else the default.

    The small networks of this book are limited by the host launching kernels, not by the GPU:
    on an H100, a step of ``AttentionUNet`` at batch 128 took 55 ms eager and 42 ms compiled
    with the default mode, of which the GPU was busy about 14 ms. Replaying the step as a CUDA
    graph ("reduce-overhead") took 8.8 ms (see benchmarks/PROFILE.md). Graphs are not
    combined with DistributedDataParallel, whose gradient hooks run between the kernels.
    """
    if device.type == "cuda" and not group.is_distributed:
        return "reduce-overhead"
    return None
