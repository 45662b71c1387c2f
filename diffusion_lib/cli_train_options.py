"""The options of ``train``: the model and its diffusion, the data, the optimisation and the
checkpoint folder; and those of ``distill``, which shares the last two."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from diffusion_lib.command_line import (
    COMPILE_CHOICES,
    DEFAULT_LABEL_DROPOUT,
    DEFAULT_MASKED_CLASSES,
    DEFAULT_SCHEDULE,
    DEFAULT_SIGMA_DATA,
    DEFAULT_TIMESTEPS,
    EPILOG,
    OBJECTIVES,
)
from diffusion_lib.data import DATASETS
from diffusion_lib.models import MODELS
from diffusion_lib.predictions import PREDICTIONS
from diffusion_lib.schedules import SCHEDULES


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
        "--schedule",
        choices=list(SCHEDULES),
        help=f"the noise schedule of a noise or a hybrid model (default: {DEFAULT_SCHEDULE})",
    )
    group.add_argument(
        "--timesteps", type=int, help=f"T, the number of timesteps (default: {DEFAULT_TIMESTEPS})"
    )
    group.add_argument(
        "--objective",
        default="noise",
        choices=OBJECTIVES,
        help="noise: predict the noise (L_simple); flow: predict the velocity of the straight "
        "path (flow matching, sampled with euler or heun); edm: the preconditioned denoiser of "
        "Karras et al. 2022 with log-normal noise levels, sampled with heun or euler on their "
        "noise levels; hybrid: predict the noise and, in C more output channels, the variance "
        "of each reverse step, trained with L_hybrid (Nichol & Dhariwal 2021) and sampled "
        "with ddpm on the learned variance, or with ddim, dpm-solver or heun on the noise "
        "alone; masked: quantise the images to --classes grey levels and learn to fill in "
        "pixels hidden behind a mask symbol (masked diffusion, chapter 19), sampled by "
        "revealing them step by step (default: noise)",
    )
    group.add_argument(
        "--classes",
        type=int,
        metavar="K",
        help="with --objective masked, the grey levels the images are quantised to, K >= 2: 2 "
        "is black and white, and the network reads K + 1 channels (one-hot levels and the "
        f"mask) and writes K (default: {DEFAULT_MASKED_CLASSES})",
    )
    group.add_argument(
        "--sigma-data",
        type=float,
        help="with --objective edm, the data's standard deviation (default: "
        f"{DEFAULT_SIGMA_DATA}, for images in [-1, 1])",
    )
    group.add_argument(
        "--vlb-weight",
        type=float,
        default=None,
        help="with --objective hybrid, lambda in L_hybrid = L_simple + lambda L_vlb, the weight "
        "of the bound that trains the variance (default: 0.001, Nichol & Dhariwal's value)",
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
        "--snr-scale",
        type=float,
        metavar="S",
        help="divide every step's signal-to-noise ratio by S^2: the shift Hoogeboom et al. (2023) "
        "recommend for images S times wider than the schedule was made for (default: 1)",
    )
    group.add_argument(
        "--zero-terminal-snr",
        action="store_true",
        help="rescale the schedule so that its last step leaves pure noise (Lin et al. 2024); "
        "needs --prediction v or x0, and sample then starts ddim at T - 1",
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
        help="with --conditional: share of labels dropped, in [0, 1), for classifier-free "
        f"guidance (default: {DEFAULT_LABEL_DROPOUT})",
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


def _add_optimisation_options(group: argparse._ArgumentGroup) -> None:
    length = group.add_mutually_exclusive_group(required=True)
    length.add_argument(
        "--steps",
        type=int,
        help="optimisation steps in all, counting those of a resumed checkpoint",
    )
    length.add_argument("--epochs", type=float, help="passes over the data (may be fractional)")
    group.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    group.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of the data order, the timesteps and the noise, and in train of the "
        "initial weights (default: 0)",
    )
    group.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="auto",
        choices=sorted(COMPILE_CHOICES),
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
        help="continue from DIR/checkpoint.pt if it exists, with this command's learning rate "
        "(default: yes)",
    )
    group.add_argument(
        "--checkpoint-every",
        type=int,
        default=1000,
        help="steps between checkpoints (default: 1000)",
    )
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``train`` to ``commands``."""
    parser = commands.add_parser(
        "train",
        help="train a diffusion model and write DIR/checkpoint.pt",
        description="Train a diffusion model: a noise predictor with the simplified loss (Ho et al. "
        "2020) by default, or a flow, EDM, hybrid or masked model (--objective).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_options(parser.add_argument_group("model and diffusion"))
    _add_data_options(parser.add_argument_group("data"))
    _add_optimisation_options(parser.add_argument_group("optimisation"))
    _add_output_options(parser.add_argument_group("checkpoint"))


def add_distill_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``distill`` to ``commands``."""
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
