"""Command line: ``python -m diffusion_lib train ...`` trains a model, ``... sample ...`` draws from
it, and ``... distill ...`` halves the sampling steps of a flow model (progressive distillation).

A checkpoint written by ``train`` records the model's name and arguments, the schedule, the
dataset and its value range, so ``sample`` and ``distill`` rebuild everything from the file alone.
The options and the help text are defined in :mod:`diffusion_lib.command_line`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from diffusion_lib.checkpoints import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_state_dict_fits,
    load_checkpoint,
)
from diffusion_lib.command_line import (
    COMPILE_CHOICES,
    DEFAULT_SAMPLERS,
    IMAGE_CHANNELS,
    IMAGE_SIZE,
    SAMPLERS,
    SCHEDULE_OBJECTIVES,
    build_parser,
)
from diffusion_lib.data import (
    CLASS_NAMES,
    DataNotFoundError,
    load_images,
    to_unit_interval,
)
from diffusion_lib.devices import select_device
from diffusion_lib.distillation import ProgressiveDistillation
from diffusion_lib.edm import EDMNoiseLevels, PreconditionedDenoiser, edm_loss, edm_sample
from diffusion_lib.flow_matching import RectifiedFlow, flow_sample
from diffusion_lib.learned_variance import NoiseOnly
from diffusion_lib.losses import diffusion_loss, hybrid_loss
from diffusion_lib.models import MODELS, build_model, count_parameters
from diffusion_lib.predictions import NoiseFromPrediction
from diffusion_lib.sampling import ddim_sample, ddpm_sample
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_samples
from diffusion_lib.solvers import dpm_solver_sample, heun_sample
from diffusion_lib.training import train

NOISE_SAMPLERS = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpm-solver": dpm_solver_sample,
    "heun": heun_sample,
}


class CommandError(Exception):
    """A problem with the command's inputs, reported as one line on stderr (exit status 1)."""


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "image_size": IMAGE_SIZE,
        "channels": IMAGE_CHANNELS,
        "timesteps": args.timesteps,
        **dict(args.model_arg),
    }
    if args.conditional:
        if "num_classes" not in inspect.signature(MODELS[args.model]).parameters:
            conditional = [
                name
                for name, cls in MODELS.items()
                if "num_classes" in inspect.signature(cls).parameters
            ]
            raise CommandError(
                f"--conditional needs a model that takes class labels; {args.model} does not "
                f"(choose one of {', '.join(conditional) or 'none'})"
            )
        kwargs["num_classes"] = len(CLASS_NAMES[args.dataset])
    return _with_output_channels(kwargs, args.objective)


def _with_output_channels(kwargs: dict[str, Any], objective: str) -> dict[str, Any]:
    """The model arguments with the output channels that --objective needs: 2C for hybrid (the
    noise, then the variance), else C, left to the model's default."""
    channels = kwargs["channels"]
    needed = 2 * channels if objective == "hybrid" else channels
    given = kwargs.get("out_channels", needed)
    if given != needed:
        hint = (
            "the noise, then the variance"
            if objective == "hybrid"
            else "one per image channel; --objective hybrid trains 2C, the noise and its variance"
        )
        raise CommandError(
            f"--objective {objective} needs out_channels={needed} ({hint}); leave out "
            f"--model-arg out_channels={given}"
        )
    if objective == "hybrid":
        kwargs["out_channels"] = needed
    return kwargs


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of :func:`train` that the optimisation and checkpoint options set."""
    return {
        "steps": args.steps,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "compile": COMPILE_CHOICES[args.compile],
        "time_limit": args.time_limit,
        "checkpoint_dir": args.output,
        "checkpoint_every": args.checkpoint_every,
        "resume": args.resume,
        "seed": args.seed,
        "progress": not args.no_progress,
    }


def _noise_loss(args: argparse.Namespace) -> Callable[..., torch.Tensor] | None:
    """The objective that --prediction and --snr-gamma ask for; ``None`` (the engine's default,
    L_simple on the noise) when they keep their defaults."""
    if args.prediction == "epsilon" and args.snr_gamma is None:
        return None
    if args.objective != "noise":
        raise CommandError(
            "--prediction and --snr-gamma apply to --objective noise only: a flow model always "
            "predicts the velocity of the straight path, with the plain flow-matching loss, an "
            "edm model its preconditioned target, with EDM's weight, and a hybrid model the "
            "noise and its variance, with L_hybrid"
        )
    if args.snr_gamma is not None and not 0 < args.snr_gamma < math.inf:
        raise CommandError(f"--snr-gamma must be a number > 0 (5 is typical), got {args.snr_gamma}")
    return functools.partial(diffusion_loss, prediction=args.prediction, snr_gamma=args.snr_gamma)


def _objective(
    args: argparse.Namespace, network: nn.Module, loss: Callable[..., torch.Tensor] | None
) -> tuple[nn.Module, Any, Callable[..., torch.Tensor] | None]:
    """The module the engine trains, the process it noises with, and the loss, for --objective."""
    if args.objective == "edm":
        if args.timesteps != 1000:
            raise CommandError(
                "--objective edm gives the network noise levels mapped onto the time range "
                "[0, 1000]; leave --timesteps at 1000"
            )
        denoiser = PreconditionedDenoiser(network, args.sigma_data)
        return denoiser, EDMNoiseLevels(sigma_data=args.sigma_data), edm_loss
    if args.objective == "flow":
        return network, RectifiedFlow(args.timesteps), loss
    schedule = NoiseSchedule.from_name(args.schedule, args.timesteps)
    return network, schedule, _hybrid_loss(args) if args.objective == "hybrid" else loss


def _hybrid_loss(args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """hybrid_loss, with --vlb-weight as its lambda when given."""
    if args.vlb_weight is None:
        return hybrid_loss
    if not 0 <= args.vlb_weight < math.inf:
        raise CommandError(
            f"--vlb-weight must be a number >= 0 (0.001 is typical), got {args.vlb_weight}"
        )
    return functools.partial(hybrid_loss, vlb_weight=args.vlb_weight)


def run_train(args: argparse.Namespace) -> None:
    """``train``: load the dataset, build model and schedule, train, report the checkpoint."""
    low, high = args.value_range
    if args.vlb_weight is not None and args.objective != "hybrid":
        raise CommandError("--vlb-weight applies to --objective hybrid only")
    loss = _noise_loss(args)
    kwargs = _model_kwargs(args)
    try:
        network = build_model(args.model, **kwargs)
    except TypeError as error:
        raise CommandError(f"bad --model-arg for {args.model}: {error}") from None
    model, process, loss = _objective(args, network, loss)
    images, labels = load_images(
        args.dataset, train=True, value_range=(low, high), limit=args.limit
    )
    config = {
        "model": {"name": args.model, "kwargs": kwargs},
        "schedule": {"name": args.schedule, "timesteps": args.timesteps},
        "dataset": args.dataset,
        "value_range": [low, high],
        "conditional": args.conditional,
        "objective": args.objective,
    }
    if args.objective == "edm":
        config["sigma_data"] = args.sigma_data
    elif args.objective == "hybrid":
        config["vlb_weight"] = 0.001 if args.vlb_weight is None else args.vlb_weight
    elif args.objective == "noise" and loss is not None:
        # Absent keys mean epsilon and plain MSE: a default run writes the config it always did.
        config.update(prediction=args.prediction, snr_gamma=args.snr_gamma)
    print(
        f"{args.model}: {count_parameters(network):,} trainable parameters; {len(images):,} images"
    )
    result = train(
        model,
        process,
        images,
        labels=labels if args.conditional else None,
        label_dropout=args.label_dropout if args.conditional else 0.0,
        device=args.device,
        loss=loss,
        **_engine_options(args),
        config=config,
    )
    final = result.history.loss[-1] if result.history.loss else float("nan")
    print(f"trained {result.steps} steps in {result.seconds:.1f} s, final loss {final:.4f}")
    print(f"checkpoint written to {result.checkpoint_path}")
    if args.time_limit is not None and result.seconds >= args.time_limit:
        print("stopped at the time limit; the same command continues from the checkpoint")


def _read_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CommandError(
            f"no checkpoint at {path}; write one with: python -m diffusion_lib train ... --output DIR"
        )
    state = load_checkpoint(path)
    if not state.get("config"):
        raise CommandError(
            f"checkpoint {path} has no config (model and schedule), so it cannot be rebuilt here; "
            "load it in Python with diffusion_lib.training.load_checkpoint(path, model)"
        )
    return path, state


def _sampler(args: argparse.Namespace, config: dict[str, Any]) -> str:
    """The sampler asked for, or the checkpoint's default for its objective (DEFAULT_SAMPLERS)."""
    objective = config.get("objective", "noise")
    allowed = SAMPLERS[objective]
    sampler = args.sampler or DEFAULT_SAMPLERS[objective]
    if sampler not in allowed:
        raise CommandError(
            f"--sampler {sampler} does not fit this checkpoint, trained with --objective "
            f"{objective}; choose {', '.join(allowed[:-1])} or {allowed[-1]}"
        )
    return sampler


def _check_sampling_args(args: argparse.Namespace, config: dict[str, Any], sampler: str) -> int:
    """Validate the sampling options against the checkpoint; return the number of steps."""
    objective = config.get("objective", "noise")
    timesteps = config["schedule"]["timesteps"]
    default_steps = {"ddpm": timesteps}.get(
        sampler, 18 if objective == "edm" else min(50, timesteps)
    )
    # A distilled student samples with the steps it was trained for.
    steps = args.steps if args.steps is not None else config.get("distilled_steps", default_steps)
    if objective in ("flow", "edm") and steps < 1:
        raise CommandError(f"--steps must be >= 1, got {steps}")
    if objective in SCHEDULE_OBJECTIVES and not 1 <= steps <= timesteps:
        raise CommandError(
            f"--steps must lie in 1..{timesteps} (T of this checkpoint), got {steps}"
        )
    if args.num < 1:
        raise CommandError(f"--num must be >= 1, got {args.num}")
    if args.eta < 0:
        raise CommandError(f"--eta must be >= 0, got {args.eta}")
    if args.eta > 0 and sampler != "ddim":
        raise CommandError("--eta applies to --sampler ddim only")
    if args.guidance < 0:
        raise CommandError(f"--guidance must be >= 0 (0 means no guidance), got {args.guidance}")
    num_classes = config["model"]["kwargs"].get("num_classes")
    if args.label is None:
        if args.guidance > 0:
            raise CommandError("--guidance needs --label: guidance steers towards a class")
        return steps
    if not num_classes:
        raise CommandError(
            "--label needs a conditional checkpoint (trained with --conditional); this one is unconditional"
        )
    if not 0 <= args.label < num_classes:
        names = CLASS_NAMES.get(config.get("dataset"), [str(k) for k in range(num_classes)])
        choices = ", ".join(f"{k} ({name})" for k, name in enumerate(names))
        raise CommandError(f"--label must be one of {choices}; got {args.label}")
    return steps


def _rebuild(
    path: Path, state: dict[str, Any], device: torch.device
) -> tuple[nn.Module, NoiseSchedule]:
    """The model (with the EMA weights, in eval mode) and the schedule described by the checkpoint."""
    config = state["config"]
    model = build_model(config["model"]["name"], **config["model"]["kwargs"])
    if config.get("objective") == "edm":
        model = PreconditionedDenoiser(model, config["sigma_data"])
    check_state_dict_fits(path, state["ema"], model)
    model.load_state_dict(state["ema"])
    schedule = NoiseSchedule.from_name(config["schedule"]["name"], config["schedule"]["timesteps"])
    return model.to(device).eval(), schedule


def _as_noise_sampler_reads_it(
    network: nn.Module, schedule: NoiseSchedule, config: dict[str, Any], sampler: str
) -> tuple[nn.Module, str | None]:
    """The model a noise sampler calls, and the ddpm variance it asks for (``None``: the default).

    An x0 or v network goes through the noise it implies. A hybrid network's learned variance
    sets each ddpm step's variance; the other samplers read only its noise channels.
    """
    prediction = config.get("prediction", "epsilon")
    if prediction != "epsilon":
        return NoiseFromPrediction(network, schedule, prediction), None
    if config.get("objective") != "hybrid":
        return network, None
    if sampler == "ddpm":
        return network, "learned"
    return NoiseOnly(network), None


def run_sample(args: argparse.Namespace) -> None:
    """``sample``: rebuild model and schedule from the checkpoint and save a grid of samples."""
    path, state = _read_checkpoint(args.checkpoint)
    config = state["config"]
    sampler = _sampler(args, config)
    steps = _check_sampling_args(args, config, sampler)
    device = select_device(args.device)
    network, schedule = _rebuild(path, state, device)
    model, variance = _as_noise_sampler_reads_it(network, schedule, config, sampler)
    num = cap_samples(args.num)
    kwargs = config["model"]["kwargs"]
    size = kwargs.get("image_size", IMAGE_SIZE)
    shape = (num, kwargs.get("channels", IMAGE_CHANNELS), size, size)
    # Noise comes from a CPU generator, so a seed gives the same images on every device.
    options: dict[str, Any] = {
        "steps": steps,
        "generator": torch.Generator().manual_seed(args.seed),
        "device": device,
    }
    if args.label is not None:
        options["labels"] = torch.full((num,), args.label, dtype=torch.long, device=device)
        options.update(guidance=args.guidance, null_label=network.null_label)
    if sampler == "ddim":
        options["eta"] = args.eta
    if variance is not None:
        options["variance"] = variance
    if config.get("objective", "noise") == "flow":
        flow = RectifiedFlow(config["schedule"]["timesteps"])
        samples = flow_sample(model, flow, shape, solver=sampler, **options)
    elif config.get("objective") == "edm":
        samples = edm_sample(model, shape, solver=sampler, **options)
    else:
        samples = NOISE_SAMPLERS[sampler](model, schedule, shape, **options)
    pictures = to_unit_interval(samples.float().cpu(), tuple(config["value_range"]))
    grid = make_grid(pictures, nrow=math.ceil(math.sqrt(num)), padding=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, args.output)
    width, height = grid.shape[2], grid.shape[1]
    method = sampler if variance is None else f"{sampler}, {variance} variance"
    print(f"saved {num} samples ({method}, {steps} steps) to {args.output} ({width}x{height})")


def _check_teacher(config: dict[str, Any], student_steps: int) -> None:
    """A flow checkpoint can teach any N; a student that samples in M steps can teach only M / 2."""
    if config.get("objective", "noise") != "flow":
        raise CommandError(
            "distill needs a checkpoint trained with --objective flow (a velocity model); "
            f"this one was trained with --objective {config.get('objective', 'noise')}"
        )
    if student_steps < 1:
        raise CommandError(f"--student-steps must be >= 1, got {student_steps}")
    teacher_steps = config.get("distilled_steps")
    if teacher_steps is not None and teacher_steps != 2 * student_steps:
        hint = (
            f"choose --student-steps {teacher_steps // 2}"
            if teacher_steps % 2 == 0
            else "its steps cannot be halved"
        )
        raise CommandError(
            f"the teacher is a student that samples in {teacher_steps} steps, so the next "
            f"round must halve that: {hint}"
        )


def run_distill(args: argparse.Namespace) -> None:
    """``distill``: one round of progressive distillation from a flow checkpoint."""
    path, state = _read_checkpoint(args.checkpoint)
    config = state["config"]
    _check_teacher(config, args.student_steps)
    device = select_device(args.device)
    teacher, _ = _rebuild(path, state, device)
    student = copy.deepcopy(teacher).train().requires_grad_()
    images, labels = load_images(
        config["dataset"], train=True, value_range=tuple(config["value_range"]), limit=args.limit
    )
    conditional = bool(config.get("conditional"))
    result = train(
        student,
        RectifiedFlow(config["schedule"]["timesteps"]),
        images,
        labels=labels if conditional else None,
        label_dropout=0.1 if conditional else 0.0,  # the student keeps its unconditional half
        loss=ProgressiveDistillation(teacher, args.student_steps),
        device=device,
        **_engine_options(args),
        config={**config, "distilled_steps": args.student_steps},
    )
    final = result.history.loss[-1] if result.history.loss else float("nan")
    print(
        f"distilled {result.steps} steps in {result.seconds:.1f} s, final loss {final:.3g}; "
        f"the student samples in {args.student_steps} steps"
    )
    print(f"checkpoint written to {result.checkpoint_path}")


COMMANDS = {"train": run_train, "sample": run_sample, "distill": run_distill}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 failure, 2 usage error)."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (CommandError, CheckpointError, DataNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
