"""The options of ``restore``: the checkpoint, the measurement (what A does and the noise added
to it), the method that restores the images, and the outputs."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion_lib.command_line import (
    EPILOG,
    INPAINTING_REGIONS,
    REPAINT_JUMP,
    REPAINT_RESAMPLINGS,
    RESTORE_METHODS,
    RESTORE_TASKS,
)


def add_restore_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``restore`` to ``commands``."""
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
