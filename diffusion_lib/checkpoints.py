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

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "step", "model", "ema", "optimizer", "lr_scheduler", "history")
WEIGHTS = ("ema", "model")
# Arguments of a network that its checkpoint's config records (config["model"]["kwargs"]) and the
# book's networks keep as attributes: they change what it computes, often not its weights' shapes.
MODEL_ARGUMENTS = ("image_size", "channels", "out_channels", "timesteps", "num_classes")
# What a network trained with another objective than noise prediction computes, and how to use it
OBJECTIVE_HINTS = {
    "flow": "predicts a velocity: sample it with flow_sample on RectifiedFlow(T), not with a "
    "noise sampler",
    "edm": "is EDM's preconditioned denoiser (a PreconditionedDenoiser): sample it with edm_sample",
    "hybrid": "predicts the noise and, in C more channels, its variance: sample it with "
    'ddpm_sample(..., variance="learned"), or wrap it in NoiseOnly for the other samplers',
    "masked": "fills in masked pixels (a TokenDenoiser): sample it with masked_sample",
}


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
        check_model_arguments_fit(path, state.get("config"), model)
        model.load_state_dict(state[weights])
        _warn_unless_noise_prediction(path, state.get("config"))
    return state


def _innermost_network(model: nn.Module) -> nn.Module:
    """The network inside wrappers such as PreconditionedDenoiser and TokenDenoiser, which keep
    it as ``.network``: the module that the config's model arguments describe."""
    while isinstance(getattr(model, "network", None), nn.Module):
        model = model.network
    return model


def check_model_arguments_fit(path: str | os.PathLike, config: Any, model: nn.Module) -> None:
    """Raise :class:`CheckpointError` if the config's model arguments (MODEL_ARGUMENTS, such as
    T) differ from the model's attributes of the same names: with T = 100 in the checkpoint and
    1000 in the model, the weights fit but every time input means another step."""
    described = config.get("model") if isinstance(config, dict) else None
    kwargs = described.get("kwargs") if isinstance(described, dict) else None
    if not isinstance(kwargs, dict):
        return
    network = _innermost_network(model)
    differences = [
        f"{key} {kwargs[key]!r} in the checkpoint, {getattr(network, key)!r} in the model"
        for key in MODEL_ARGUMENTS
        if kwargs.get(key) is not None
        and hasattr(network, key)
        and getattr(network, key) != kwargs[key]
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was written for a {type(network).__name__} with other arguments: "
            f"{'; '.join(differences)}; build the model with the checkpoint's "
            "config['model']['kwargs']"
        )


def _warn_unless_noise_prediction(path: str | os.PathLike, config: Any) -> None:
    """Warn when the config says the network does not predict the noise, so that the caller
    samples it with the sampler or wrapper it needs rather than a noise sampler."""
    if not isinstance(config, dict):
        return
    objective, prediction = config.get("objective", "noise"), config.get("prediction", "epsilon")
    if objective in OBJECTIVE_HINTS:
        hint = OBJECTIVE_HINTS[objective]
    elif prediction not in (None, "epsilon"):
        hint = (
            f"predicts {prediction}, not the noise: wrap it in NoiseFromPrediction(model, "
            f"schedule, {prediction!r}) for a noise sampler"
        )
    else:
        return
    warnings.warn(
        f"checkpoint {path} was trained with objective {objective!r}; its network {hint}",
        stacklevel=3,  # the caller of load_checkpoint
    )
