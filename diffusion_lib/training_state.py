"""Resuming a run exactly: the training state a checkpoint holds, and the checks before it is
loaded back.

:func:`training_state` gathers what :mod:`diffusion_lib.checkpoints` writes for a run (weights,
moving average, optimiser, warm-up, random streams, the order of the data and the losses);
:func:`restore_training_state` refuses a checkpoint of another run, network or data order with
a message that says what differs, and only then loads it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from diffusion_lib.checkpoints import (
    FORMAT_VERSION,
    CheckpointError,
    check_state_dict_fits,
    read_checkpoint,
)


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


def _describe_data_order(order: dict[str, int]) -> str:
    """``"seed 0 and batch_size 128 on 60000 images"``: what fixes a run's batches."""
    seed, batch_size, images = order["seed"], order["batch_size"], order["dataset_size"]
    return f"seed {seed} and batch_size {batch_size} on {images} images"


def _check_same_data_order(
    path: str | os.PathLike, stored: dict[str, int] | None, current: dict[str, int] | None
) -> None:
    """Refuse to resume with another seed, batch size or number of images than the checkpoint's.
    The number of processes may change: the global batches stay the same."""
    keys = ("seed", "batch_size", "dataset_size")
    if stored is None or current is None or any(key not in stored for key in keys):
        return
    if any(stored[key] != current[key] for key in keys):
        raise CheckpointError(
            f"checkpoint {path} was trained with {_describe_data_order(stored)}; this call has "
            f"{_describe_data_order(current)}, so the resumed run could not take the batches of "
            f"the uninterrupted one; keep the checkpoint's settings, or {START_AFRESH}"
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
    data_order: dict[str, int] | None = None,
) -> tuple[int, list[float]]:
    """Load a checkpoint written by :func:`training_state` into a run; return its step and losses.

    ``data_order`` is this run's (see :func:`training_state`): a checkpoint trained with another
    seed, batch size or number of images is refused, since the resumed run could not take the
    batches of the uninterrupted one. The weights and the random streams are loaded last, after
    every check has passed and the optimiser and scheduler have accepted their states, so a
    rejected checkpoint leaves the model, its moving average and the random streams untouched.
    The optimiser's implementation flags (fused, foreach) follow this run's device, so a
    checkpoint written on a GPU resumes on a CPU and back.
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
    _check_same_data_order(path, state.get("data_order"), data_order)
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
