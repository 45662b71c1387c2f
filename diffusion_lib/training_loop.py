"""The loop that drives a ``_Trainer`` (:mod:`diffusion_lib.trainer`) to the end of a run.

It takes the steps, reads the losses back in chunks, writes checkpoints, times the run for
its throughput, stops at a time limit, and, under ``compile="auto"``, decides after timing a
few eager steps whether the rest of the run is long enough for compilation to pay. With a
checkpoint folder, Ctrl-C finishes the step in flight and saves it before it stops the run
(``_InterruptCatcher``).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from diffusion_lib.devices import synchronize
from diffusion_lib.trainer import _Trainer

# Steps between two reads of the losses from an accelerator; each read waits for the GPU.
LOSS_READ_INTERVAL = 50
# compile="auto": eager steps timed before deciding, and the eager time left that makes
# compiling worth its minute (at worst, a run where graphs gain nothing takes 20% longer).
AUTO_COMPILE_PROBE_STEPS = 20
AUTO_COMPILE_SECONDS = 300.0


class _Clock:
    """Wall time of the loop, less the steps and writes left out of the throughput."""

    def __init__(self, device: torch.device, deadline: float | None) -> None:
        self.device, self.deadline = device, deadline
        self.started = time.perf_counter()
        self.untimed_seconds, self.untimed_steps = 0.0, 0

    def untimed(self, work: Callable[[], None], is_step: bool) -> None:
        """Run ``work`` (a warm-up or compiling step, a checkpoint write) off the clock."""
        synchronize(self.device)
        before = time.perf_counter()
        work()
        synchronize(self.device)
        self.untimed_seconds += time.perf_counter() - before
        self.untimed_steps += int(is_step)

    def images_per_second(self, steps: int, batch_size: int) -> float:
        timed_steps = steps - self.untimed_steps
        seconds = time.perf_counter() - self.started - self.untimed_seconds
        return timed_steps * batch_size / max(seconds, 1e-9) if timed_steps > 0 else math.nan

    def seconds_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()


class _InterruptCatcher:
    """While active, Ctrl-C (SIGINT, which is also what Jupyter's "interrupt kernel" sends) only
    sets ``requested``: the loop finishes the step in flight, saves a checkpoint of it and then
    raises ``KeyboardInterrupt``, so that an interrupted run resumes where it stopped. A second
    Ctrl-C interrupts at once, as usual; the last checkpoint stays whole, since checkpoints are
    replaced atomically.

    It acts only when ``enabled`` (a checkpoint to write, in a single process), in the main
    thread, and where Ctrl-C raises ``KeyboardInterrupt`` (Python's default handler): a handler
    someone else installed keeps deciding what Ctrl-C does.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = (
            enabled
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        )
        self.requested = False

    def __enter__(self) -> _InterruptCatcher:
        if self.enabled:
            signal.signal(signal.SIGINT, self._catch)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _catch(self, number: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        print(
            "\ninterrupted: finishing this step and saving a checkpoint "
            "(Ctrl-C again stops at once)",
            file=sys.stderr,
        )


def _save_and_stop(trainer: _Trainer, clock: _Clock, bar: tqdm, first_step: int) -> None:
    """After Ctrl-C: read the pending losses, save the step just taken unless it is saved
    already, and raise ``KeyboardInterrupt`` saying where the run can go on from."""
    losses = trainer.read_losses()
    if losses:
        steps = trainer.step - first_step
        _show_progress(bar, losses, clock.images_per_second(steps, trainer.settings.batch_size))
    if trainer.last_saved_step != trainer.step:
        trainer.save()
    raise KeyboardInterrupt(
        f"training interrupted after step {trainer.step}, saved to "
        f"{trainer.settings.checkpoint_path}; the same call (or command) goes on from there"
    )


def _out_of_time(trainer: _Trainer, clock: _Clock) -> bool:
    """Whether the time limit has passed; under torchrun, rank 0's clock decides for all."""
    if clock.deadline is None:
        return False
    over = clock.seconds_left() <= 0
    if trainer.group.is_distributed:
        flag = torch.tensor([float(over)], device=trainer.device)
        dist.broadcast(flag, src=0)
        over = bool(flag.item())
    return over


def _compiling_pays(trainer: _Trainer, clock: _Clock, probe_started: float) -> bool:
    """Whether the rest of the run, at the pace of the probe's eager steps, would take longer
    than ``AUTO_COMPILE_SECONDS``."""
    synchronize(trainer.device)
    seconds_per_step = (time.perf_counter() - probe_started) / AUTO_COMPILE_PROBE_STEPS
    eager_seconds = seconds_per_step * (trainer.settings.total_steps - trainer.step)
    return min(eager_seconds, clock.seconds_left()) > AUTO_COMPILE_SECONDS


def _show_progress(bar: tqdm, losses: list[float], images_per_second: float) -> None:
    bar.set_postfix(
        loss=f"{sum(losses) / len(losses):.4f}",
        images_per_s=f"{images_per_second:.0f}",
        refresh=False,
    )
    bar.update(len(losses))


def run_loop(trainer: _Trainer, bar: tqdm, deadline: float | None = None) -> float:
    """Train up to ``total_steps``, or until ``deadline`` (a ``time.perf_counter()`` value,
    checked whenever the losses are read); return the throughput in images per second over
    all processes, leaving out the first step (unless it is the only one), the compiling step and
    checkpoint writes. With a checkpoint to write in a single process, Ctrl-C saves the step
    in flight and then raises ``KeyboardInterrupt`` (``_InterruptCatcher``).
    """
    catchable = trainer.settings.checkpoint_path is not None and not trainer.group.is_distributed
    with _InterruptCatcher(catchable) as interrupt:
        return _run_steps(trainer, bar, deadline, interrupt)


def _run_steps(
    trainer: _Trainer, bar: tqdm, deadline: float | None, interrupt: _InterruptCatcher
) -> float:
    """The loop of :func:`run_loop`, which stops at a step boundary once ``interrupt`` is set."""
    settings = trainer.settings
    read_interval = 1 if trainer.device.type == "cpu" else LOSS_READ_INTERVAL
    first_step = trainer.step
    clock = _Clock(trainer.device, deadline)
    probe_end = first_step + 1 + AUTO_COMPILE_PROBE_STEPS if trainer.may_compile_later else None
    probe_started, compile_next = clock.started, False
    while trainer.step < settings.total_steps:
        if compile_next:
            bar.set_description("compiling (about a minute)", refresh=True)
            clock.untimed(trainer.compiling_step, is_step=True)
            bar.set_description("training", refresh=False)
            compile_next = False
        elif trainer.step == first_step and settings.total_steps > first_step + 1:
            clock.untimed(trainer.train_step, is_step=True)  # warm-up, or compilation
            probe_started = time.perf_counter()
        else:
            trainer.train_step()
        if trainer.step == probe_end and trainer.step < settings.total_steps:
            compile_next = _compiling_pays(trainer, clock, probe_started)
            if compile_next:
                trainer.compile()
        checkpoint_due = (
            trainer.step % settings.checkpoint_every == 0 or trainer.step == settings.total_steps
        )
        out_of_time = False
        if checkpoint_due or len(trainer.pending) >= read_interval:
            losses = trainer.read_losses()
            steps = trainer.step - first_step
            _show_progress(bar, losses, clock.images_per_second(steps, settings.batch_size))
            out_of_time = _out_of_time(trainer, clock)
        if checkpoint_due or out_of_time:
            clock.untimed(trainer.save, is_step=False)
        if interrupt.requested:
            _save_and_stop(trainer, clock, bar, first_step)
        if out_of_time:
            break
    synchronize(trainer.device)
    if interrupt.requested:  # during the last step: it is saved, but the caller asked to stop
        _save_and_stop(trainer, clock, bar, first_step)
    return clock.images_per_second(trainer.step - first_step, settings.batch_size)
