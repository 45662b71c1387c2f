"""Checkpoints: written atomically, read back safely, and checked against the model they load into.

A checkpoint is one file made by ``torch.save`` that holds only tensors, dicts, lists,
numbers and strings, so that it loads with ``torch.load(..., weights_only=True)``, which
never runs code stored in the file. Its entries::

    format_version  int
    step            int, optimisation steps taken
    model           state dict of the trained network
    ema             state dict of its exponential moving average (what sampling uses)
    optimizer       AdamW state
    lr_scheduler    learning-rate warmup state
    rng             {"torch": CPU generator state, "cuda": state of the GPU's generator}
    data_order      {"seed", "dataset_size", "batch_size", "world_size"}: with the step, this
                    fixes which images every later batch holds
    history         {"loss": [float, ...]} up to ``step``
    config          JSON-able dict describing how to rebuild model and schedule, or None
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "step", "model", "ema", "optimizer", "lr_scheduler", "history")
WEIGHTS = ("ema", "model")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, incomplete, or does not fit the model."""


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Create or replace the file at ``path`` with the bytes ``write(file)`` writes, atomically.

    The bytes go to a temporary file in the same folder, are flushed to disk (fsync), and the
    file is then renamed over ``path`` in one step (``os.replace``). A crash or a full disk
    midway leaves the previous file untouched, never a half-written one, and no temporary file
    behind. The new file gets the permissions a plain ``open`` would give it (0666 less the
    umask), not the 0600 of the temporary file. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`write_atomically`) and return the path.

    A crash or a full disk midway leaves the previous checkpoint untouched, never a
    half-written one.
    """
    return write_atomically(path, lambda file: torch.save(state, file))


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened this way on Windows."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load and validate a checkpoint file; raise :class:`CheckpointError` naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder; pass the checkpoint file inside it, {path / CHECKPOINT_NAME}"
        )
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, garbage bytes, disallowed pickled objects
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated, corrupt or not a "
            f"diffusion_lib checkpoint ({type(error).__name__}: {_first_line(error)})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a diffusion_lib checkpoint dict"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the entries {', '.join(missing)}")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['format_version']!r}; "
            f"this diffusion_lib reads version {FORMAT_VERSION}"
        )
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


def check_state_dict_fits(
    path: str | os.PathLike, state_dict: dict[str, Any], model: nn.Module
) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly ``model``'s entries and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    resized = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if resized:
        problems.append(f"different shapes (checkpoint vs model) {_some(resized)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} was written for a different architecture than "
            f"{type(model).__name__}: " + "; ".join(problems)
        )


def _some(items: list[str], shown: int = 4) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    weights: str = "ema",
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`diffusion_lib.training.train`, optionally into a model.

    Args:
        path: the checkpoint file (``<checkpoint_dir>/checkpoint.pt``).
        model: if given, its weights are replaced by the checkpoint's; the architecture must
            match exactly (same parameter names and shapes).
        weights: ``"ema"`` (the moving average, which is what sampling should use) or
            ``"model"`` (the raw trained weights).
        map_location: where tensors are loaded; the CPU by default.

    Returns the checkpoint as a dict (entries listed in this module's docstring). Raises
    :class:`CheckpointError` (a ``ValueError``) for a missing, corrupt or mismatched file.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    state = read_checkpoint(path, map_location)
    if model is not None:
        check_state_dict_fits(path, state[weights], model)
        model.load_state_dict(state[weights])
    return state


def capture_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global random generators' states: the CPU's and, on CUDA, that of ``device``."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Undo :func:`capture_rng_state`: continue the random streams where the checkpoint left them."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def training_state(
    *,
    step: int,
    model: nn.Module,
    ema_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    data_order: dict[str, int],
    losses: list[float],
    config: dict[str, Any] | None,
) -> dict[str, Any]:
    """Everything a run needs to continue exactly where it stopped, as a checkpoint dict."""
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "model": model.state_dict(),
        "ema": ema_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "rng": capture_rng_state(device),
        "data_order": dict(data_order),
        "history": {"loss": list(losses)},
        "config": config,
    }


START_AFRESH = (
    "start afresh with resume=False (--no-resume on the command line) or another checkpoint folder"
)


def _config_differences(stored: dict[str, Any], current: dict[str, Any]) -> str:
    """The keys of two run configs that differ, as ``key: stored -> this run`` (JSON values)."""
    keys = sorted(set(stored) | set(current))
    return ", ".join(
        f"{key}: {json.dumps(stored.get(key))} in the checkpoint, {json.dumps(current.get(key))} now"
        for key in keys
        if stored.get(key) != current.get(key)
    )


def restore_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    ema_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    config: dict[str, Any] | None,
) -> tuple[int, list[float]]:
    """Load a checkpoint written by :func:`training_state` into a run; return its step and losses.

    The weights and the random streams are loaded last, after every check has passed and the
    optimiser and scheduler have accepted their states, so a rejected checkpoint leaves the
    model, its moving average and the random streams untouched. The optimiser's implementation
    flags (fused, foreach) follow this run's device, so a checkpoint written on a GPU resumes on
    a CPU and back.
    """
    state = read_checkpoint(path)
    try:
        check_state_dict_fits(path, state["model"], model)
        check_state_dict_fits(path, state["ema"], ema_model)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {START_AFRESH}") from None
    stored = state.get("config")
    if stored is not None and config is not None and stored != config:
        raise CheckpointError(
            f"checkpoint {path} was written for another run: {_config_differences(stored, config)}; "
            f"{START_AFRESH}"
        )
    if "torch" not in state.get("rng", {}):
        raise CheckpointError(f"checkpoint {path} lacks the random state that resuming needs")
    losses = state["history"]["loss"]
    if len(losses) != state["step"]:
        raise CheckpointError(
            f"checkpoint {path} is inconsistent: step {state['step']} but {len(losses)} recorded losses"
        )
    current = optimizer.param_groups[0]
    for group in state["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = current.get("fused"), current.get("foreach")
    try:
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint {path} has an unusable optimiser state: {error}"
        ) from None
    model.load_state_dict(state["model"])
    ema_model.load_state_dict(state["ema"])
    restore_rng_state(state["rng"], device)
    return int(state["step"]), [float(value) for value in losses]
