"""The argument parser of ``python -m diffusion_lib``: its commands, options and help text, the
choices that the commands share (objectives, samplers, image size), and :class:`CommandError`,
which a command raises when its inputs are wrong.

The commands themselves (what ``train``, ``sample``, ``evaluate``, ``distill`` and ``restore``
do with the parsed arguments) are in :mod:`diffusion_lib.cli_train`,
:mod:`diffusion_lib.cli_sample`, :mod:`diffusion_lib.cli_evaluate`,
:mod:`diffusion_lib.cli_distill` and :mod:`diffusion_lib.cli_restore`; the entry point,
:mod:`diffusion_lib.__main__`, runs the one asked for.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from diffusion_lib.checkpoints import CHECKPOINT_NAME
from diffusion_lib.data import DATASETS
from diffusion_lib.masked_diffusion import MASKING_SCHEDULES, REVEAL_ORDERS
from diffusion_lib.models import MODELS
from diffusion_lib.predictions import PREDICTIONS
from diffusion_lib.respacing import DDIM_SPACINGS
from diffusion_lib.schedules import SCHEDULES

# L_simple with a noise schedule, flow matching, EDM's preconditioned denoiser, L_hybrid (the
# noise and a learned variance, Nichol & Dhariwal 2021) with a noise schedule, or masked
# diffusion of images quantised to a few grey levels (the order-agnostic bound)
OBJECTIVES = ("noise", "flow", "edm", "hybrid", "masked")
SAMPLERS = {
    "noise": ("ddpm", "ddim", "dpm-solver", "heun"),
    "flow": ("euler", "heun"),
    "edm": ("heun", "euler"),
    "hybrid": ("ddpm", "ddim", "dpm-solver", "heun"),
    "masked": ("masked",),
}
DEFAULT_SAMPLERS = {
    "noise": "ddim",
    "flow": "euler",
    "edm": "heun",
    "hybrid": "ddpm",
    "masked": "masked",
}
# The objectives whose models are sampled on the training schedule's T timesteps
SCHEDULE_OBJECTIVES = ("noise", "hybrid")
IMAGE_SIZE, IMAGE_CHANNELS = 28, 1  # MNIST and Fashion-MNIST
# Defaults of train's options that --objective masked rejects when given: their parser default
# is None, so that a given value can be told from the default.
DEFAULT_SCHEDULE, DEFAULT_TIMESTEPS, DEFAULT_SIGMA_DATA = "linear", 1000, 0.5
# The default of --label-dropout, which applies to --conditional only: its parser default is None
# too, so that a value given without --conditional is refused
DEFAULT_LABEL_DROPOUT = 0.1
# --objective masked: the grey levels K by default (black and white), and the most allowed
# (the 256 of an 8-bit image)
DEFAULT_MASKED_CLASSES, MAX_MASKED_CLASSES = 2, 256
# sample and evaluate for a masked checkpoint: the sampling steps, the masking schedule (in
# chapter 19 the cosine one drew better digits than the linear one at every step count) and the
# order in which masked pixels are revealed
DEFAULT_MASKED_STEPS, DEFAULT_MASKING_SCHEDULE, DEFAULT_REVEAL_ORDER = 100, "cosine", "random"
# restore: the tasks, the regions --hide can hide, and the methods
RESTORE_TASKS = ("super-resolution", "inpainting")
INPAINTING_REGIONS = ("bottom", "top", "left", "right", "center")
RESTORE_METHODS = ("pigdm", "dps", "repaint")
# restore's default chain lengths: the likelihood methods step through a respaced chain,
# RePaint walks each stretch of JUMP steps of a shorter one RESAMPLINGS times (chapter 21)
DEFAULT_RESTORE_STEPS = {"pigdm": 250, "dps": 250, "repaint": 100}
REPAINT_JUMP, REPAINT_RESAMPLINGS = 10, 10
# evaluate --bound-images for a masked checkpoint: unbiased draws of the bound averaged per image
MASKED_BOUND_DRAWS = 4


# sample and evaluate: --label all draws the classes in turn
ALL_LABELS = "all"


class CommandError(Exception):
    """A problem with the command's inputs, reported as one line on stderr (exit status 1)."""


def check_output_file(option: str, path: Path, example: str, *, image: bool = False) -> None:
    """Raise :class:`CommandError` unless the file ``path`` of ``option`` can be written: not a
    folder, for an image with an extension that PIL writes, and under folders that exist or can
    be made. Commands check their outputs before their work, which a late failure would waste."""
    kind = "an image file" if image else "a file"
    if path.is_dir():
        raise CommandError(f"{option} must name {kind} such as {example}; got {path} (a folder)")
    suffix = path.suffix.lower()
    if image and Image.registered_extensions().get(suffix) not in Image.SAVE:
        found = f"{suffix} is not an image format" if suffix else "no extension"
        raise CommandError(
            f"{option} must name {kind} such as {example}; got {path} ({found}; "
            ".png keeps every pixel)"
        )
    _check_folders_on_the_way(option, path, path.parent)


def check_output_folder(option: str, folder: Path) -> None:
    """Raise :class:`CommandError` unless ``folder``, where ``option`` has train or distill write
    checkpoint.pt, is a folder or can be made one; checked before the data are loaded."""
    if folder.exists() and not folder.is_dir():
        hint = f", e.g. {folder.parent}" if folder.name == CHECKPOINT_NAME else ""
        raise CommandError(
            f"{option} {folder} is a file; pass the folder that holds {CHECKPOINT_NAME}{hint}"
        )
    _check_folders_on_the_way(option, folder, folder)


def _check_folders_on_the_way(option: str, path: Path, folder: Path) -> None:
    """``folder`` (where ``path`` goes) must exist or be creatable: its nearest existing
    ancestor must be a writable folder."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the first folder on the way that exists: the rest is made
    if not folder.is_dir():
        raise CommandError(f"{option} {path} cannot be written: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {path} cannot be written: {folder} is not writable")


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
  python -m diffusion_lib sample --checkpoint runs/fashion/checkpoint.pt --label 7 \\
      --guidance 3 --guidance-interval 500 999 --output sneakers_interval.png
  python -m diffusion_lib sample --checkpoint runs/fc_unet/checkpoint.pt --guidance 1 \\
      --reference-checkpoint runs/fc_unet_early/checkpoint.pt --output autoguided.png
  python -m diffusion_lib evaluate --checkpoint runs/fc_unet/checkpoint.pt --num 1000 \\
      --json scores.json
  python -m diffusion_lib train --model fc_unet --dataset mnist --prediction v --snr-gamma 5 \\
      --steps 5000 --output runs/v
  python -m diffusion_lib train --model fc_unet --dataset mnist --objective flow --steps 5000 \\
      --output runs/flow
  python -m diffusion_lib sample --checkpoint runs/flow/checkpoint.pt --sampler euler --steps 20
  python -m diffusion_lib train --model fc_unet --dataset fashion_mnist --prediction v \\
      --zero-terminal-snr --steps 5000 --output runs/zero_snr
  python -m diffusion_lib train --model attention_unet --dataset mnist --objective edm \\
      --steps 20000 --output runs/edm
  python -m diffusion_lib sample --checkpoint runs/edm/checkpoint.pt --steps 18 --output edm.png
  python -m diffusion_lib train --model attention_unet --dataset mnist --objective hybrid \\
      --schedule cosine --steps 20000 --output runs/hybrid
  python -m diffusion_lib sample --checkpoint runs/hybrid/checkpoint.pt --steps 100 \\
      --output hybrid.png
  python -m diffusion_lib evaluate --checkpoint runs/hybrid/checkpoint.pt --steps 100 \\
      --bound-images 100 --ode-steps 100
  python -m diffusion_lib train --model attention_unet --dataset mnist --objective masked \\
      --steps 20000 --output runs/masked
  python -m diffusion_lib sample --checkpoint runs/masked/checkpoint.pt --steps 100 \\
      --masking-schedule cosine --output masked.png
  python -m diffusion_lib evaluate --checkpoint runs/masked/checkpoint.pt --bound-images 1000
  python -m diffusion_lib distill --checkpoint runs/flow/checkpoint.pt --student-steps 16 \\
      --steps 2000 --output runs/flow16
  python -m diffusion_lib distill --checkpoint runs/flow16/checkpoint.pt --student-steps 8 \\
      --steps 2000 --output runs/flow8
  python -m diffusion_lib sample --checkpoint runs/flow8/checkpoint.pt --output eight_steps.png
  python -m diffusion_lib restore --checkpoint runs/fc_unet/checkpoint.pt \\
      --task super-resolution --factor 4 --noise 0.05 --method pigdm --data-std 0.6
  python -m diffusion_lib restore --checkpoint runs/fc_unet/checkpoint.pt --task inpainting \\
      --hide bottom --method dps --step-size 0.3 --num 100 --json restored.json

Datasets are read from $DIFFUSION_LIB_DATA (torchvision layout). evaluate trains the reference
classifier of a dataset once and caches it in $DIFFUSION_LIB_CACHE (default
~/.cache/diffusion_lib). Set DIFFUSION_LIB_SMOKE=1 for a quick run with capped steps, data and
samples.
"""


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


COMPILE_CHOICES = {"auto": "auto", "on": True, "off": False}


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


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
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


def parse_label(text: str) -> int | str:
    """--label's value: a class index, or ``all`` for the classes in turn."""
    if text == ALL_LABELS:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a class number or '{ALL_LABELS}' (the classes in turn), not {text!r}"
        ) from None


def _add_sampling_options(parser: argparse.ArgumentParser, default_num: int) -> None:
    """The options that rebuild a checkpoint and draw from it, shared by sample and evaluate."""
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="a checkpoint.pt written by train"
    )
    parser.add_argument(
        "--sampler",
        choices=sorted({name for names in SAMPLERS.values() for name in names}),
        help="ddpm, ddim, dpm-solver (DPM-Solver++(2M)) or heun for a noise or a hybrid model, "
        "euler or heun for a flow or an edm model, masked for a masked model; ddpm draws each "
        "step of a hybrid model with its learned variance, the others read only its noise "
        "(default: ddim for noise, ddpm for hybrid, euler for a flow, heun for edm, masked for "
        "masked)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="denoising steps, at most T for a noise or a hybrid model, where ddpm respaces the "
        "schedule to visit fewer; for a masked model, the steps in which its pixels are "
        f"revealed (default: T for ddpm, 18 for edm, {DEFAULT_MASKED_STEPS} for masked, else 50)",
    )
    parser.add_argument(
        "--masking-schedule",
        choices=MASKING_SCHEDULES,
        help="for a masked model, how fast pixels are revealed: linear reveals as many at every "
        "step, cosine few at the first steps, which see the least, and more towards the end; "
        "in chapter 19 cosine drew better digits at every step count "
        f"(default: {DEFAULT_MASKING_SCHEDULE})",
    )
    parser.add_argument(
        "--order",
        choices=REVEAL_ORDERS,
        help="for a masked model, which masked pixels a step reveals: random, each with the "
        "reverse process's probability; confidence, those whose drawn values the model is "
        "surest of (MaskGIT's decoding, without its noise), which is no longer the process the "
        "bound describes and on black-and-white digits collapses to strokes and blank images "
        f"(default: {DEFAULT_REVEAL_ORDER})",
    )
    parser.add_argument(
        "--spacing",
        choices=DDIM_SPACINGS,
        help="which timesteps ddim visits: leading, 0, T/steps, 2T/steps, ... as in the DDIM "
        "paper; trailing, the same stride counted down from T - 1; linspace, evenly from 0 to "
        "T - 1 (Lin et al. 2024) (default: trailing for a checkpoint trained with "
        "--zero-terminal-snr, which must start at T - 1, else leading)",
    )
    parser.add_argument(
        "--eta", type=float, default=0.0, help="ddim noise in [0, 1]: 0 deterministic, 1 DDPM-like"
    )
    parser.add_argument(
        "--num", type=int, default=default_num, help=f"number of images (default: {default_num})"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--label",
        type=parse_label,
        help="class to draw (conditional checkpoints), or all: the classes in turn, 0, 1, ..., "
        "K-1, 0, ..., which evaluate scores as a class-balanced set and by the share read as "
        "their class",
    )
    parser.add_argument("--device", help="cuda, mps or cpu (default: the fastest present)")
    _add_guidance_options(parser.add_argument_group("guidance (chapters 7 and 28)"))


def _add_guidance_options(group: argparse._ArgumentGroup) -> None:
    """The guidance options of sample and evaluate (diffusion_lib.cli_guidance)."""
    group.add_argument(
        "--guidance",
        type=float,
        default=0.0,
        metavar="W",
        help="guidance weight w: the model's estimate eps(c) becomes eps(c) + w (eps(c) - "
        "eps_ref), with eps_ref the estimate without a label (classifier-free guidance, with "
        "--label), for --negative-label, or of --reference-checkpoint (default: 0, none)",
    )
    group.add_argument(
        "--negative-label",
        type=int,
        metavar="K",
        help="steer away from class K: eps_ref is the model's estimate for K; without --label "
        "the samples are drawn without a class, away from K (conditional checkpoints trained "
        "with label dropout)",
    )
    group.add_argument(
        "--reference-checkpoint",
        type=Path,
        metavar="PATH",
        help="autoguidance (Karras et al. 2024): eps_ref is the estimate of this weaker "
        "checkpoint, of the same objective, schedule and data (an earlier save of the same "
        "run, or a smaller network); it needs no label, so it guides unconditional models too",
    )
    group.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("FIRST", "LAST"),
        help="guide only from FIRST to LAST (Kynkäänniemi et al. 2024), elsewhere draw with the "
        "model's own estimate: timesteps 0..T-1 for a noise or a hybrid checkpoint (chapter 28 "
        "found the noisier half best on digits), the time t in [0, 1] for a flow, sigma for "
        "edm (default: every step)",
    )
    group.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        metavar="PHI",
        help="rescale each guided estimate towards the standard deviation of the conditional "
        "one, with weight PHI in [0, 1] (Lin et al. 2024; they use 0.7), in the unit the "
        "network predicts: the noise, x0 or v, a flow's velocity, edm's clean image "
        "(default: 0, none)",
    )


def _add_sample_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sample",
        help="draw images from a checkpoint and save them as a grid",
        description="Draw samples with the EMA weights of a checkpoint and save them as one image.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_sampling_options(parser, default_num=64)
    parser.add_argument("--output", type=Path, default=Path("samples.png"), help="PNG to write")
    parser.add_argument(
        "--nearest",
        type=Path,
        metavar="PNG",
        help="also write the nearest training image of each sample, in pixels and in the same "
        "grid layout, and count the copies among the samples: those much closer to one training "
        "image than to any other (chapter 30). Compares with the images the checkpoint was "
        "trained on, the first N of train --limit N",
    )


def _add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="score a checkpoint's samples against real test images, and its variational bound",
        description="Draw --num samples as sample does and score them with the reference "
        "classifier of the checkpoint's dataset (diffusion_lib.metrics): the Fréchet distance "
        "of its features to those of the test set, the share of confidently classified "
        "samples and the entropy of their classes. The first --num real test images are "
        "scored beside them, because the Fréchet distance of a finite sample is biased "
        "upwards and compares only with a reference of the same size. Both rows are also "
        "checked for copies of the images the checkpoint was trained on.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_sampling_options(parser, default_num=1000)
    parser.add_argument(
        "--bound-images",
        type=int,
        default=0,
        metavar="M",
        help="also compute the variational bound (the negative ELBO of Ho et al. 2020, eq. 5) "
        "in bits per dimension on the first M test images, which takes T network calls on "
        "them: for a noise or a hybrid checkpoint trained on [-1, 1], with the learned "
        "variance of a hybrid model and the posterior variance beta_tilde otherwise; a "
        "conditional model is bounded without labels. For a masked checkpoint, the "
        "order-agnostic bound on the test images quantised to its K grey levels, in nats per "
        "image and in bits per dimension (of K-level pixels, so not comparable with the "
        f"8-bit bound of a noise model), each image's bound the mean of {MASKED_BOUND_DRAWS} "
        "random draws of one network call each (default: 0, no bound)",
    )
    parser.add_argument(
        "--ode-steps",
        type=int,
        default=0,
        metavar="N",
        help="with --bound-images, also bound the same test images through the probability-flow "
        "ODE (diffusion_lib.likelihood, chapter 23): the exact log-likelihood of uniformly "
        "dequantised images, by Heun's method on N timesteps from t = 0 to T - 1 (N - 1 steps) "
        "with Hutchinson's divergence, 2N - 2 network calls each with a backward pass. Too few "
        "steps make it optimistic; on MNIST it settled from 100. Not for masked or zero-terminal-SNR checkpoints "
        "(default: 0, no ODE bound)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the numbers to this JSON file",
    )


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


def _add_restore_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "restore",
        help="restore damaged test images with a checkpoint as the prior, and score them",
        description="Measure the first --num test images of the checkpoint's dataset, y = A x + "
        "noise, with A a low-resolution copy (--task super-resolution) or the pixels outside a "
        "hidden region (--task inpainting); restore them with the checkpoint's model as the "
        "prior, without retraining (chapter 21); print the root-mean-square of A x - y, the "
        "share of restorations the reference classifier reads as the original digit, the "
        "distance to the originals and the Fréchet distance, for the originals, the "
        "pseudo-inverse A+y and the restorations; and save the three as rows of one picture. "
        "DPS and PiGDM differentiate through the network, so a step costs about three network "
        "calls.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="a checkpoint.pt written by train"
    )
    parser.add_argument("--task", required=True, choices=RESTORE_TASKS, help="what A does")
    parser.add_argument(
        "--factor",
        type=int,
        help="super-resolution: average FACTOR x FACTOR blocks, which must tile the 28 x 28 "
        "image (default: 4, a 7 x 7 copy)",
    )
    parser.add_argument(
        "--hide",
        choices=INPAINTING_REGIONS,
        help="inpainting: the region to hide, a half or the central square of half the side "
        "(default: bottom)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="standard deviation of the Gaussian noise added to the measurement, in pixel "
        "units of the checkpoint (default: 0)",
    )
    parser.add_argument(
        "--method",
        choices=RESTORE_METHODS,
        default="pigdm",
        help="pigdm: the Gaussian likelihood of Song et al. 2023, told --noise; dps: diffusion "
        "posterior sampling (Chung et al. 2023), steps of a fixed size towards the measurement; "
        "repaint (inpainting only): RePaint (Lugmayr et al. 2022), which takes the seen "
        "pixels as exact (default: pigdm)",
    )
    parser.add_argument(
        "--step-size",
        type=float,
        help="dps: the step size zeta' (default: 1.0; chapter 21 found 0.3 better for inpainting)",
    )
    parser.add_argument(
        "--data-std",
        type=float,
        help="pigdm: the pixel standard deviation s assumed for the data (default: 1.0, as in "
        "the paper; about 0.6 for MNIST in [-1, 1])",
    )
    parser.add_argument(
        "--eta",
        type=float,
        help="pigdm: take DDIM steps with this eta instead of ancestral steps (0: deterministic "
        "given the starting noise; 1: the same draws as the ancestral steps)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="steps of the respaced reverse chain, at most T (default: 250, or 100 for repaint, "
        f"which walks each stretch of {REPAINT_JUMP} steps {REPAINT_RESAMPLINGS} times)",
    )
    parser.add_argument("--num", type=int, default=16, help="test images to restore (default: 16)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the measurement noise and the sampler"
    )
    parser.add_argument("--device", help="cuda, mps or cpu (default: the fastest present)")
    parser.add_argument("--output", type=Path, default=Path("restored.png"), help="PNG to write")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m diffusion_lib`` argument parser: ``train``, ``sample``, ``evaluate``,
    ``distill`` and ``restore``."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_lib",
        description="Train denoising diffusion models on MNIST-like data, sample from them and "
        "score the samples.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", dest="command", required=True)
    _add_train_parser(commands)
    _add_sample_parser(commands)
    _add_evaluate_parser(commands)
    _add_distill_parser(commands)
    _add_restore_parser(commands)
    return parser
