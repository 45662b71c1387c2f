"""Where training runs: the device, and the process group when several processes share the work.

A run started as ``torchrun --nproc_per_node N script.py`` sets the environment variables
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`join_process_group`
reads them, so the same script runs unchanged with one process or many.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

DEVICE_TYPES = ("cuda", "mps", "cpu")
Result = TypeVar("Result")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def select_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``preferred`` if given, else CUDA, else Apple MPS, else the CPU.

    Under ``torchrun`` each process takes the GPU of its ``LOCAL_RANK``. A preferred device
    type that is not present (CUDA or MPS) raises ``ValueError`` rather than silently falling
    back; the index of a CUDA device is left to PyTorch to check.
    """
    if preferred is not None:
        try:
            device = torch.device(preferred)
        except RuntimeError:
            device = None
        if device is None or device.type not in DEVICE_TYPES:
            raise ValueError(
                f"unknown device {str(preferred)!r}; choose one of {', '.join(DEVICE_TYPES)}"
            )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was requested but CUDA is not available")
        if device.type == "mps" and not _mps_available():
            raise ValueError(f"device {str(device)!r} was requested but Apple MPS is not available")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the processes that train together.

    Attributes:
        rank: 0 for the process that writes checkpoints and shows progress.
        world_size: number of processes; 1 when training alone.
        created_here: True when :func:`join_process_group` initialised the group, so
            :func:`leave_process_group` should tear it down.
    """

    rank: int = 0
    world_size: int = 1
    created_here: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_process_group(device: torch.device) -> ProcessGroup:
    """Join the process group when the run is distributed; a no-op for a single process.

    Uses an already initialised ``torch.distributed`` group if there is one; otherwise, when
    ``WORLD_SIZE > 1``, initialises one from the environment with NCCL on CUDA and gloo
    elsewhere.
    """
    if dist.is_available() and dist.is_initialized():
        return ProcessGroup(dist.get_rank(), dist.get_world_size(), created_here=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but this PyTorch build has no torch.distributed"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), created_here=True)


def leave_process_group(group: ProcessGroup) -> None:
    """Destroy the process group if :func:`join_process_group` created it."""
    if group.created_here and dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings measure finished computation."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(
    work: Callable[[], Result], device: str | torch.device, warm_up: bool | None = None
) -> tuple[Result, float]:
    """Run ``work()`` once and return its result and the wall-clock seconds it took.

    The device is synchronised before the clock starts and after ``work`` returns, so the
    figure counts the GPU work that ``work`` queued, and none queued before it. With
    ``warm_up``, ``work`` first runs once untimed: the first call of a computation on a GPU
    also pays one-off costs (loading kernels, growing the memory pool, choosing algorithms for
    a new shape) that would otherwise be charged to whatever is timed first. The random state
    of the CPU and of a CUDA ``device`` is put back after the warm-up, so the timed call draws the
    same numbers as a lone call would (generators created inside ``work`` are fresh each time;
    one created outside is advanced by the warm-up). ``None`` (the default) warms up on an
    accelerator only: on a CPU the first call costs no more than the others, and a warm-up
    would double the time taken.
    """
    device = torch.device(device)
    if warm_up is None:
        warm_up = device.type != "cpu"
    if warm_up:
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked, device_type=device.type):
            work()
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - start


def _precision_switches() -> list[tuple[object, str, object]]:
    """(backend, attribute, full-precision value) for cuDNN convolutions and CUDA matmuls."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):  # PyTorch 2.9 and later
        return [(cudnn.conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    return [(cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Compute float32 convolutions and matrix products in full float32 inside the block.

    On NVIDIA GPUs since Ampere, cuDNN runs float32 convolutions in TF32 by default, which keeps
    10 of float32's 23 mantissa bits: two computations that agree to 1e-6 on a CPU can then
    differ by 1e-3 on a GPU. Checks that compare two ways of computing the same thing run inside
    this block. The previous settings come back on leaving it; on a CPU nothing changes.
    """
    switches = _precision_switches()
    saved = [getattr(backend, name) for backend, name, _ in switches]
    try:
        for backend, name, exact in switches:
            setattr(backend, name, exact)
        yield
    finally:
        for (backend, name, _), value in zip(switches, saved, strict=True):
            setattr(backend, name, value)
