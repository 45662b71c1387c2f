"""The arguments of :func:`~diffusion_lib.training.train`, checked, and the settings its loop reads.

Each check raises ``ValueError`` saying what was wrong and what is allowed, before the model
is moved to a device or trained.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lib.checkpoints import CHECKPOINT_NAME
from diffusion_lib.devices import ProcessGroup
from diffusion_lib.flow_matching import RectifiedFlow
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_training_steps
from diffusion_lib.validation import check_number, is_integer

AUTO_COMPILE = "auto"  # train(compile=...): compile where CUDA graphs apply, if the run is long


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
    compile: bool | str  # True, False or AUTO_COMPILE
    amp: bool
    checkpoint_path: Path | None
    checkpoint_every: int
    resume: bool
    seed: int
    progress: bool
    config: dict[str, Any] | None
    loss: Callable[..., Tensor] | None = None
    time_limit: float | None = None  # seconds


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


def _check_dtypes(model: nn.Module, images: Tensor, noise: Tensor | None) -> None:
    """The images (and their noise partners) must have a dtype of the model's weights: torch
    does not mix them, and would fail deep inside the first layer."""
    weights = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    if weights and images.dtype not in weights:
        target = torch.float32 if torch.float32 in weights else min(weights, key=str)
        cast = "images.float()" if target == torch.float32 else f"images.to({target})"
        raise ValueError(
            f"images are {images.dtype} but the model's weights are "
            f"{' and '.join(sorted(map(str, weights)))}; pass {cast}, or convert the model with "
            f"model.to({images.dtype})"
        )
    if noise is not None and noise.dtype != images.dtype:
        raise ValueError(f"noise must have the images' dtype {images.dtype}; got {noise.dtype}")


def _checkpoint_path(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """``checkpoint_dir / checkpoint.pt``, after making sure the folder exists and is writable,
    so that a bad folder fails before the first step rather than at the first save."""
    if checkpoint_dir is None:
        return None
    folder = Path(checkpoint_dir)
    if folder.exists() and not folder.is_dir():
        hint = f", e.g. {folder.parent}" if folder.name == CHECKPOINT_NAME else ""
        raise ValueError(
            f"checkpoint_dir {folder} is a file; pass the folder that holds {CHECKPOINT_NAME}{hint}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"checkpoint_dir {folder} cannot be created ({error.strerror or error}); pass a "
            f"folder that can hold {CHECKPOINT_NAME}"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"checkpoint_dir {folder} is not writable; pass a folder you can write to")
    return folder / CHECKPOINT_NAME


def _check_integer(name: str, value: Any, minimum: int) -> int:
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


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


def _check_compile(compile: object) -> bool | str:
    if compile is True or compile is False or compile == AUTO_COMPILE:
        return compile  # type: ignore[return-value]
    raise ValueError(f"compile must be True, False or {AUTO_COMPILE!r}, got {compile!r}")


def _check_objective(schedule: object, loss: Callable[..., Tensor] | None) -> None:
    """Refuse a ``schedule`` that no objective can use and a ``loss`` that is not callable."""
    known_schedule = isinstance(schedule, NoiseSchedule | RectifiedFlow)
    if not known_schedule and (loss is None or not callable(getattr(schedule, "to", None))):
        raise ValueError(
            "schedule must be a NoiseSchedule (noise prediction) or a RectifiedFlow (flow "
            "matching); with a custom loss, any object with a .to(device) method that the loss "
            f"understands. Got {type(schedule).__name__}"
        )
    if loss is not None and not callable(loss):
        raise ValueError(
            "loss must be None (the default objective) or a callable "
            f"loss(model, schedule, x0, *, noise, labels, generator), got {type(loss).__name__}"
        )


def _check_trainable(model: nn.Module) -> None:
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ValueError(
            "the model has no parameters that require gradients (an EMA copy is frozen): "
            "load its weights into a new model, or call model.requires_grad_() first"
        )


def _check_label_dropout(label_dropout: float, model: nn.Module, labels: Tensor | None) -> float:
    """``label_dropout`` in [0, 1]; above 0 only with labels and a model that has a null label."""
    label_dropout = check_number("label_dropout", label_dropout, 0.0, 1.0, low_open=False)
    if label_dropout > 0 and (labels is None or getattr(model, "null_label", None) is None):
        raise ValueError(
            "label_dropout > 0 needs labels and a conditional model with a null_label attribute "
            "(the class index that means 'no label')"
        )
    return label_dropout
