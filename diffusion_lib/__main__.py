"""Command line: ``python -m diffusion_lib train ...`` trains a model, ``... sample ...`` draws from
it, and ``... distill ...`` halves the sampling steps of a flow model (progressive distillation).

A checkpoint written by ``train`` records the model's name and arguments, the schedule, the
dataset and its value range, so ``sample`` and ``distill`` rebuild everything from the file alone.
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
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
from diffusion_lib.data import (
    CLASS_NAMES,
    DATASETS,
    DataNotFoundError,
    load_images,
    to_unit_interval,
)
from diffusion_lib.devices import select_device
from diffusion_lib.distillation import ProgressiveDistillation
from diffusion_lib.flow_matching import RectifiedFlow, flow_sample
from diffusion_lib.losses import diffusion_loss
from diffusion_lib.models import MODELS, build_model, count_parameters
from diffusion_lib.predictions import PREDICTIONS, NoiseFromPrediction
from diffusion_lib.sampling import ddim_sample, ddpm_sample
from diffusion_lib.schedules import SCHEDULES, NoiseSchedule
from diffusion_lib.smoke import cap_samples
from diffusion_lib.solvers import dpm_solver_sample, heun_sample
from diffusion_lib.training import train

OBJECTIVES = ("noise", "flow")  # L_simple with a noise schedule, or flow matching
SAMPLERS = {"noise": ("ddpm", "ddim", "dpm-solver", "heun"), "flow": ("euler", "heun")}
NOISE_SAMPLERS = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpm-solver": dpm_solver_sample,
    "heun": heun_sample,
}
IMAGE_SIZE, IMAGE_CHANNELS = 28, 1  # MNIST and Fashion-MNIST

EPILOG = """\
examples:
  python -m diffusion_lib train --model fc_unet --dataset mnist --steps 5000 --output runs/fc_unet
  python -m diffusion_lib train --model attention_unet --dataset fashion_mnist \\
      --schedule cosine --steps 20000 --batch-size 256 --conditional --output runs/fashion
  python -m diffusion_lib sample --checkpoint runs/fc_unet/checkpoint.pt --sampler ddim \\
      --steps 50 --num 64 --output samples.png
  python -m diffusion_lib sample --checkpoint runs/fc_unet/checkpoint.pt --sampler dpm-solver \\
      --steps 10 --output fast.png
  python -m diffusion_lib sample --checkpoint runs/fashion/checkpoint.pt --label 7 \\
      --guidance 3 --output sneakers.png
  python -m diffusion_lib train --model fc_unet --dataset mnist --prediction v --snr-gamma 5 \\
      --steps 5000 --output runs/v
  python -m diffusion_lib train --model fc_unet --dataset mnist --objective flow --steps 5000 \\
      --output runs/flow
  python -m diffusion_lib sample --checkpoint runs/flow/checkpoint.pt --sampler euler --steps 20
  python -m diffusion_lib distill --checkpoint runs/flow/checkpoint.pt --student-steps 16 \\
      --steps 2000 --output runs/flow16
  python -m diffusion_lib distill --checkpoint runs/flow16/checkpoint.pt --student-steps 8 \\
      --steps 2000 --output runs/flow8
  python -m diffusion_lib sample --checkpoint runs/flow8/checkpoint.pt --output eight_steps.png

Datasets are read from $DIFFUSION_LIB_DATA (torchvision layout). Set DIFFUSION_LIB_SMOKE=1
for a quick run with capped steps, data and samples.
"""


class CommandError(Exception):
    """A problem with the command's inputs, reported as one line on stderr (exit status 1)."""


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON where it parses (numbers, lists, true), else a string."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_model_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--model", required=True, choices=sorted(MODELS), help="network")
    group.add_argument(
        "--model-arg",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra model argument, VALUE as JSON, e.g. --model-arg widths=[512,256] (repeatable)",
    )
    group.add_argument(
        "--schedule", default="linear", choices=list(SCHEDULES), help="(default: linear)"
    )
    group.add_argument("--timesteps", type=int, default=1000, help="T (default: 1000)")
    group.add_argument(
        "--objective",
        default="noise",
        choices=OBJECTIVES,
        help="noise: predict the noise (L_simple); flow: predict the velocity of the straight "
        "path (flow matching, sampled with euler or heun) (default: noise)",
    )
    group.add_argument(
        "--prediction",
        default="epsilon",
        choices=PREDICTIONS,
        help="with --objective noise, the network's target: epsilon, the noise (Ho et al. 2020); "
        "x0, the clean image; v, the velocity alpha eps - sigma x0 (Salimans & Ho 2022) "
        "(default: epsilon)",
    )
    group.add_argument(
        "--snr-gamma",
        type=float,
        metavar="G",
        help="with --objective noise, Min-SNR-gamma weighting (Hang et al. 2023): each step's "
        "error on x0 weighs min(SNR, G), so nearly clean steps do not dominate; 5 is typical "
        "(default: none, the plain mean squared error)",
    )
    group.add_argument("--conditional", action="store_true", help="condition on class labels")
    group.add_argument(
        "--label-dropout",
        type=float,
        default=0.1,
        help="with --conditional: share of labels dropped, for classifier-free guidance "
        "(default: 0.1)",
    )


def _add_data_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--dataset", required=True, choices=list(DATASETS), help="training images")
    group.add_argument(
        "--value-range",
        type=float,
        nargs=2,
        default=(-1.0, 1.0),
        metavar=("LOW", "HIGH"),
        help="pixel range the model sees (default: -1 1)",
    )
    group.add_argument("--limit", type=int, metavar="N", help="use only the first N images")


_COMPILE_CHOICES = {"auto": "auto", "on": True, "off": False}


def _add_optimisation_options(group: argparse._ArgumentGroup) -> None:
    length = group.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimisation steps")
    length.add_argument("--epochs", type=float, help="passes over the data (may be fractional)")
    group.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    group.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="auto",
        choices=sorted(_COMPILE_CHOICES),
        help="torch.compile, with CUDA graphs on one GPU: about a minute to compile, then several "
        "times faster. 'auto' (the default) compiles when the run would take over five minutes "
        "eagerly; a bare --compile means 'on'",
    )
    group.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="stop after this long, at a checkpoint that the same command continues from",
    )
    group.add_argument("--device", help="cuda, mps or cpu (default: the fastest present)")


def _add_output_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--output", required=True, type=Path, metavar="DIR", help="folder for checkpoint.pt"
    )
    group.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from DIR/checkpoint.pt if it exists (default: yes)",
    )
    group.add_argument(
        "--checkpoint-every",
        type=int,
        default=1000,
        help="steps between checkpoints (default: 1000)",
    )
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train a noise predictor and write DIR/checkpoint.pt",
        description="Train a noise predictor with the simplified loss (Ho et al. 2020).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_options(parser.add_argument_group("model and diffusion"))
    _add_data_options(parser.add_argument_group("data"))
    _add_optimisation_options(parser.add_argument_group("optimisation"))
    _add_output_options(parser.add_argument_group("checkpoint"))
    parser.set_defaults(run=run_train)


def _add_sample_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sample",
        help="draw images from a checkpoint and save them as a grid",
        description="Draw samples with the EMA weights of a checkpoint and save them as one image.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="a checkpoint.pt written by train"
    )
    parser.add_argument(
        "--sampler",
        choices=sorted({name for names in SAMPLERS.values() for name in names}),
        help="ddpm, ddim, dpm-solver (DPM-Solver++(2M)) or heun for a noise model, euler or "
        "heun for a flow (default: ddim, or euler for a flow)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="denoising steps, at most T for a noise model (default: T for ddpm, else 50)",
    )
    parser.add_argument(
        "--eta", type=float, default=0.0, help="ddim noise: 0 deterministic, 1 DDPM-like"
    )
    parser.add_argument("--num", type=int, default=64, help="number of images (default: 64)")
    parser.add_argument("--output", type=Path, default=Path("samples.png"), help="PNG to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--label", type=int, help="class to draw (conditional checkpoints)")
    parser.add_argument(
        "--guidance", type=float, default=0.0, help="classifier-free guidance weight w"
    )
    parser.add_argument("--device", help="cuda, mps or cpu (default: the fastest present)")
    parser.set_defaults(run=run_sample)


def _add_distill_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "distill",
        help="train a student that samples in N steps where a flow checkpoint took 2N",
        description="One round of progressive distillation (Salimans & Ho 2022) of a checkpoint "
        "trained with --objective flow: the student starts from the teacher's weights and learns "
        "to land in one Euler step where the teacher lands in two. Pass each round's output as "
        "the next round's --checkpoint to halve the steps again.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="the teacher: trained with --objective flow, or the output of an earlier round",
    )
    parser.add_argument(
        "--student-steps",
        required=True,
        type=int,
        metavar="N",
        help="Euler steps the student samples with; the teacher is followed for 2N steps, so a "
        "teacher that is itself a student must have sampled with 2N",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="use only the first N images")
    _add_optimisation_options(parser.add_argument_group("optimisation"))
    _add_output_options(parser.add_argument_group("checkpoint"))
    parser.set_defaults(run=run_distill)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m diffusion_lib`` argument parser: ``train``, ``sample`` and ``distill``."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_lib",
        description="Train denoising diffusion models on MNIST-like data and sample from them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", dest="command", required=True)
    _add_train_parser(commands)
    _add_sample_parser(commands)
    _add_distill_parser(commands)
    return parser


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
    return kwargs


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of :func:`train` that the optimisation and checkpoint options set."""
    return {
        "steps": args.steps,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "compile": _COMPILE_CHOICES[args.compile],
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
            "predicts the velocity of the straight path, with the plain flow-matching loss"
        )
    if args.snr_gamma is not None and not 0 < args.snr_gamma < math.inf:
        raise CommandError(f"--snr-gamma must be a number > 0 (5 is typical), got {args.snr_gamma}")
    return functools.partial(diffusion_loss, prediction=args.prediction, snr_gamma=args.snr_gamma)


def run_train(args: argparse.Namespace) -> None:
    """``train``: load the dataset, build model and schedule, train, report the checkpoint."""
    low, high = args.value_range
    loss = _noise_loss(args)
    kwargs = _model_kwargs(args)
    try:
        model = build_model(args.model, **kwargs)
    except TypeError as error:
        raise CommandError(f"bad --model-arg for {args.model}: {error}") from None
    schedule = NoiseSchedule.from_name(args.schedule, args.timesteps)
    process = schedule if args.objective == "noise" else RectifiedFlow(args.timesteps)
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
    if loss is not None:
        # Absent keys mean epsilon and plain MSE: a default run writes the config it always did.
        config.update(prediction=args.prediction, snr_gamma=args.snr_gamma)
    print(f"{args.model}: {count_parameters(model):,} trainable parameters; {len(images):,} images")
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
    """The sampler asked for, or the checkpoint's default: ddim for noise, euler for a flow."""
    objective = config.get("objective", "noise")
    allowed = SAMPLERS[objective]
    sampler = args.sampler or {"noise": "ddim", "flow": "euler"}[objective]
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
    default_steps = timesteps if sampler == "ddpm" else min(50, timesteps)
    # A distilled student samples with the steps it was trained for.
    steps = args.steps if args.steps is not None else config.get("distilled_steps", default_steps)
    if objective == "flow" and steps < 1:
        raise CommandError(f"--steps must be >= 1, got {steps}")
    if objective == "noise" and not 1 <= steps <= timesteps:
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
    check_state_dict_fits(path, state["ema"], model)
    model.load_state_dict(state["ema"])
    schedule = NoiseSchedule.from_name(config["schedule"]["name"], config["schedule"]["timesteps"])
    return model.to(device).eval(), schedule


def run_sample(args: argparse.Namespace) -> None:
    """``sample``: rebuild model and schedule from the checkpoint and save a grid of samples."""
    path, state = _read_checkpoint(args.checkpoint)
    config = state["config"]
    sampler = _sampler(args, config)
    steps = _check_sampling_args(args, config, sampler)
    device = select_device(args.device)
    model, schedule = _rebuild(path, state, device)
    prediction = config.get("prediction", "epsilon")
    if prediction != "epsilon":
        # The samplers ask for the noise; the wrapper derives it from an x0 or v output.
        model = NoiseFromPrediction(model, schedule, prediction)
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
        options.update(guidance=args.guidance, null_label=model.null_label)
    if sampler == "ddim":
        options["eta"] = args.eta
    if config.get("objective", "noise") == "flow":
        flow = RectifiedFlow(config["schedule"]["timesteps"])
        samples = flow_sample(model, flow, shape, solver=sampler, **options)
    else:
        samples = NOISE_SAMPLERS[sampler](model, schedule, shape, **options)
    pictures = to_unit_interval(samples.float().cpu(), tuple(config["value_range"]))
    grid = make_grid(pictures, nrow=math.ceil(math.sqrt(num)), padding=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, args.output)
    width, height = grid.shape[2], grid.shape[1]
    print(f"saved {num} samples ({sampler}, {steps} steps) to {args.output} ({width}x{height})")


def _check_teacher(config: dict[str, Any], student_steps: int) -> None:
    """A flow checkpoint can teach any N; a student that samples in M steps can teach only M / 2."""
    if config.get("objective", "noise") != "flow":
        raise CommandError(
            "distill needs a checkpoint trained with --objective flow (a velocity model); "
            "this one predicts noise"
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


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 failure, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (CommandError, CheckpointError, DataNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
