"""The options of ``sample`` and ``evaluate``: the checkpoint and how to draw from it, the
guidance (:mod:`diffusion_lib.cli_guidance`), and each command's outputs and extra scores."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion_lib.command_line import (
    ALL_LABELS,
    DEFAULT_MASKED_STEPS,
    DEFAULT_MASKING_SCHEDULE,
    DEFAULT_REVEAL_ORDER,
    EPILOG,
    MASKED_BOUND_DRAWS,
    SAMPLERS,
)
from diffusion_lib.masked_diffusion import MASKING_SCHEDULES, REVEAL_ORDERS
from diffusion_lib.respacing import DDIM_SPACINGS


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


def add_sample_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``sample`` to ``commands``."""
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


def add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``evaluate`` to ``commands``."""
    parser = commands.add_parser(
        "evaluate",
        help="score a checkpoint's samples against real test images, and its variational bound",
        description="Draw --num samples as sample does and score them with the reference "
        "classifier of the checkpoint's dataset (diffusion_lib.reference_classifier): the "
        "Fréchet distance of its features to those of the test set, the share of confidently "
        "classified samples and the entropy of their classes. The first --num real test images are "
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
