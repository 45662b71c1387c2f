"""The ``train`` command: build the model, the noise process and the loss that the options ask
for, load the dataset and run :func:`diffusion_lib.training.train`, whose checkpoint records the
config that ``sample``, ``evaluate`` and ``distill`` rebuild everything from.

The options of the training engine (steps, batch size, learning rate, checkpoints) come from
:func:`engine_options`, which ``distill`` uses too.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffusion_lib.command_line import (
    COMPILE_CHOICES,
    DEFAULT_LABEL_DROPOUT,
    DEFAULT_MASKED_CLASSES,
    DEFAULT_SCHEDULE,
    DEFAULT_SIGMA_DATA,
    DEFAULT_TIMESTEPS,
    IMAGE_CHANNELS,
    IMAGE_SIZE,
    MAX_MASKED_CLASSES,
    CommandError,
    check_output_folder,
)
from diffusion_lib.data import CLASS_NAMES, load_images
from diffusion_lib.edm import EDMNoiseLevels, PreconditionedDenoiser, edm_loss
from diffusion_lib.flow_matching import RectifiedFlow
from diffusion_lib.losses import diffusion_loss, hybrid_loss
from diffusion_lib.masked_diffusion import MaskedDiffusion, TokenDenoiser, masked_diffusion_loss
from diffusion_lib.models import MODELS, build_model, count_parameters
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.training import TrainingResult, train


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    set_by_options: dict[str, Any] = {
        "image_size": IMAGE_SIZE,
        # A masked model reads each image channel as K + 1 one-hot channels (levels and mask).
        "channels": IMAGE_CHANNELS * (args.classes + 1 if args.objective == "masked" else 1),
        "timesteps": args.timesteps,
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
        set_by_options["num_classes"] = len(CLASS_NAMES[args.dataset])
    _check_model_args(args, set_by_options)
    kwargs = {**set_by_options, **dict(args.model_arg)}
    if args.objective == "masked":
        return _masked_channels(kwargs, args.classes)
    return _with_output_channels(kwargs, args.objective)


def _check_model_args(args: argparse.Namespace, set_by_options: dict[str, Any]) -> None:
    """Refuse a --model-arg that contradicts what the options set: T, the image size, the
    channels and the classes. A masked model's channels have their own check
    (``_masked_channels``), and it is called at t = 0, so its T does not matter."""
    conflicts = {
        "timesteps": f"conflicts with --timesteps (T = {args.timesteps}); use --timesteps",
        "image_size": f"conflicts with the dataset, whose images are {IMAGE_SIZE} x {IMAGE_SIZE}",
        "channels": f"conflicts with the dataset, whose images have {IMAGE_CHANNELS} channel",
        "num_classes": (
            f"conflicts with --conditional, which gives the model the "
            f"{set_by_options.get('num_classes')} classes of {args.dataset}"
            if args.conditional
            else "makes a class-conditional model; use --conditional"
        ),
    }
    if args.objective == "masked":
        del conflicts["channels"], conflicts["timesteps"]
    for key, value in args.model_arg:
        if key in conflicts and value != set_by_options.get(key):
            raise CommandError(f"--model-arg {key}={json.dumps(value)} {conflicts[key]}")


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


def _masked_channels(kwargs: dict[str, Any], classes: int) -> dict[str, Any]:
    """The model arguments of a masked model, which reads C (K + 1) channels, the one-hot levels
    and the mask of each image channel, and writes C K, the logits of the K levels."""
    needed = {"channels": IMAGE_CHANNELS * (classes + 1), "out_channels": IMAGE_CHANNELS * classes}
    if kwargs["channels"] != needed["channels"]:
        raise CommandError(
            f"--objective masked needs channels={needed['channels']} (K + 1 one-hot channels "
            f"per image channel, for K = {classes} levels and the mask); leave out --model-arg "
            f"channels={kwargs['channels']}"
        )
    given = kwargs.get("out_channels", needed["out_channels"])
    if given != needed["out_channels"]:
        raise CommandError(
            f"--objective masked needs out_channels={needed['out_channels']} (the logits of the "
            f"K = {classes} levels per image channel); leave out --model-arg out_channels={given}"
        )
    return {**kwargs, "out_channels": needed["out_channels"]}


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
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
    if args.objective == "masked":
        # The loss is the order-agnostic bound, the same for every masking schedule: the
        # schedule is chosen when sampling.
        process = MaskedDiffusion(args.classes)
        return TokenDenoiser(network, args.classes), process, masked_diffusion_loss
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
    schedule = NoiseSchedule.from_name(
        args.schedule,
        args.timesteps,
        snr_scale=1.0 if args.snr_scale is None else args.snr_scale,
        zero_terminal_snr=args.zero_terminal_snr,
    )
    return network, schedule, _hybrid_loss(args) if args.objective == "hybrid" else loss


def _check_schedule_options(args: argparse.Namespace) -> None:
    """--snr-scale and --zero-terminal-snr change the noise schedule of a noise or hybrid model;
    at zero terminal SNR the noise says nothing about x0, so the target must be v or x0."""
    given = "--snr-scale" if args.snr_scale is not None else "--zero-terminal-snr"
    if (args.snr_scale is not None or args.zero_terminal_snr) and args.objective in ("flow", "edm"):
        raise CommandError(
            f"{given} changes the noise schedule of --objective noise or hybrid; "
            f"--objective {args.objective} has its own noise levels"
        )
    if args.snr_scale is not None and not 0 < args.snr_scale < math.inf:
        raise CommandError(
            f"--snr-scale must be a number > 0 (2 for images twice as wide), got {args.snr_scale}"
        )
    if args.zero_terminal_snr and (args.objective != "noise" or args.prediction == "epsilon"):
        raise CommandError(
            "--zero-terminal-snr needs --objective noise with --prediction v or x0: at the last "
            "step x_T is the noise itself, so a noise (or learned-variance) network cannot tell "
            "anything of x0 there (Lin et al. 2024)"
        )


def _hybrid_loss(args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """hybrid_loss, with --vlb-weight as its lambda when given."""
    if args.vlb_weight is None:
        return hybrid_loss
    if not 0 <= args.vlb_weight < math.inf:
        raise CommandError(
            f"--vlb-weight must be a number >= 0 (0.001 is typical), got {args.vlb_weight}"
        )
    return functools.partial(hybrid_loss, vlb_weight=args.vlb_weight)


def _check_masked_options(args: argparse.Namespace) -> None:
    """--classes applies to --objective masked only, and masked takes none of the options of
    the Gaussian objectives: a masked model has no noise schedule, no timesteps, no prediction
    target and no labels."""
    if args.objective != "masked":
        if args.classes is not None:
            raise CommandError(
                "--classes applies to --objective masked only: the other objectives model "
                "continuous pixels, not a few grey levels"
            )
        return
    # Each option that a masked run rejects, whether it was given, and why it does not apply.
    inapplicable = {
        "--schedule": (
            args.schedule is not None,
            "it has no noise schedule; sample picks how fast pixels are revealed with "
            "--masking-schedule",
        ),
        "--timesteps": (
            args.timesteps is not None,
            "its network takes no time: the masked pixels say how far the process has gone",
        ),
        "--prediction": (
            args.prediction != "epsilon",
            "its network predicts the levels of the hidden pixels",
        ),
        "--snr-gamma": (args.snr_gamma is not None, "its loss is the bound, with its own weights"),
        "--snr-scale": (args.snr_scale is not None, "it adds no Gaussian noise"),
        "--zero-terminal-snr": (args.zero_terminal_snr, "it adds no Gaussian noise"),
        "--vlb-weight": (args.vlb_weight is not None, "its loss is the bound itself"),
        "--sigma-data": (args.sigma_data is not None, "it adds no Gaussian noise"),
        "--conditional": (args.conditional, "a masked model is unconditional"),
    }
    for option, (given, reason) in inapplicable.items():
        if given:
            raise CommandError(
                f"{option} does not apply to --objective masked ({reason}); a masked run takes "
                "--classes besides the model, data and optimisation options"
            )
    if [float(value) for value in args.value_range] != [-1.0, 1.0]:
        raise CommandError(
            "--objective masked quantises images in [-1, 1] to --classes grey levels; leave "
            "--value-range at -1 1"
        )
    if args.classes is None:
        args.classes = DEFAULT_MASKED_CLASSES
    if not 2 <= args.classes <= MAX_MASKED_CLASSES:
        raise CommandError(
            f"--classes must lie in 2..{MAX_MASKED_CLASSES} (2 is black and white, "
            f"{MAX_MASKED_CLASSES} the levels of an 8-bit image); got {args.classes}"
        )


def _check_objective_options(args: argparse.Namespace) -> None:
    """Refuse the options given for an objective that has no use for them: --schedule without a
    noise schedule, --sigma-data and --vlb-weight outside edm and hybrid, --label-dropout
    without --conditional (or outside [0, 1))."""
    if args.schedule is not None and args.objective in ("flow", "edm"):
        raise CommandError(
            f"--schedule applies to --objective noise or hybrid only; --objective "
            f"{args.objective} has its own noise levels"
        )
    if args.sigma_data is not None and args.objective != "edm":
        raise CommandError("--sigma-data applies to --objective edm only")
    if args.vlb_weight is not None and args.objective != "hybrid":
        raise CommandError("--vlb-weight applies to --objective hybrid only")
    if args.label_dropout is None:
        return
    if not args.conditional:
        raise CommandError(
            "--label-dropout applies to --conditional only: it drops class labels, which an "
            "unconditional model does not see"
        )
    if not 0 <= args.label_dropout < 1:
        raise CommandError(
            f"--label-dropout must lie in [0, 1) (0.1 is typical), got {args.label_dropout}"
        )


def check_options(args: argparse.Namespace) -> None:
    """Refuse the options that do not apply to this run's objective, before any work is done."""
    _check_masked_options(args)
    _check_objective_options(args)
    _check_schedule_options(args)


def _fill_in_defaults(args: argparse.Namespace) -> None:
    """The defaults of the options that the parser leaves at None, so that a given value can be
    told from the default (and refused where it does not apply)."""
    if args.schedule is None:
        args.schedule = DEFAULT_SCHEDULE
    if args.timesteps is None:
        args.timesteps = DEFAULT_TIMESTEPS
    if args.sigma_data is None:
        args.sigma_data = DEFAULT_SIGMA_DATA
    if args.label_dropout is None:
        args.label_dropout = DEFAULT_LABEL_DROPOUT


def run_train(args: argparse.Namespace) -> None:
    """``train``: load the dataset, build model and schedule, train, report the checkpoint."""
    low, high = args.value_range
    check_output_folder("--output", args.output)
    check_options(args)
    _fill_in_defaults(args)
    loss = _noise_loss(args)
    kwargs = _model_kwargs(args)
    torch.manual_seed(args.seed)  # the initial weights, so that --seed repeats a run exactly
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
    if args.limit is not None:
        # Recorded only when set: evaluate checks samples for copies of exactly these images.
        config["limit"] = args.limit
    if args.objective == "masked":
        # No noise schedule: the masking schedule is sample's choice.
        del config["schedule"]
        config["classes"] = args.classes
    else:
        # Recorded only when set, so that a default run writes the config it always did.
        if args.snr_scale is not None:
            config["schedule"]["snr_scale"] = args.snr_scale
        if args.zero_terminal_snr:
            config["schedule"]["zero_terminal_snr"] = True
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
        **engine_options(args),
        config=config,
    )
    report_training(result, args.time_limit)


def report_training(
    result: TrainingResult, time_limit: float | None, done: str = "trained", note: str = ""
) -> None:
    """What this call did: trained from scratch, resumed and went on, or found nothing to do.
    ``done`` names the work ("trained", "distilled"); ``note`` ends its line."""
    taken = result.steps - result.start_step
    if taken == 0:
        print(f"nothing to do: {result.checkpoint_path} is already at step {result.steps}")
        return
    resumed = f"resumed at step {result.start_step}, " if result.start_step else ""
    print(
        f"{resumed}{done} {taken} step{'s' if taken != 1 else ''} in {result.seconds:.1f} s "
        f"(now at step {result.steps}), final loss {result.history.loss[-1]:.4g}{note}"
    )
    print(f"checkpoint written to {result.checkpoint_path}")
    if time_limit is not None and result.seconds >= time_limit:
        print("stopped at the time limit; the same command continues from the checkpoint")
