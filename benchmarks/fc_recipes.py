"""Training recipes for the fully connected U-net at an equal number of training images.

Each recipe trains a fresh ``FCUNet`` on MNIST for ``--steps`` steps of ``--batch-size`` images,
then draws ``--samples`` images from the EMA weights with ancestral sampling over the chain
respaced to 100 steps, as the quality section of ``benchmark.py`` does (its ``generate``, bf16
autocast on CUDA), and scores them with :func:`diffusion_lib.metrics.score_samples`. One JSON
line per recipe goes to ``--output``.
It answers, on any device, which target, learning rate and batch make the network learn
fastest per image seen; ``benchmark.py`` then asks what a time budget buys on a GPU.

    python benchmarks/fc_recipes.py --prediction x0 --batch-size 1024 --lr 1e-3 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmark import generate, parse_sampler
from contenders import EngineContender, RunSettings

from diffusion_lib import load_images, select_device
from diffusion_lib.metrics import score_samples

SAMPLER = "ddpm-100"  # the quality section's default
SAMPLING_SEED = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prediction", choices=("epsilon", "x0", "v"), default="epsilon")
    parser.add_argument("--time-embedding", choices=("scalar", "sinusoidal"), default="scalar")
    parser.add_argument("--layer-norm", action="store_true", help="LayerNorm in every layer")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--device", default=None, help="default: CUDA, else MPS, else the CPU")
    parser.add_argument("--output", type=Path, default=Path("fc_recipes.jsonl"))
    return parser


def run_recipe(args: argparse.Namespace) -> dict:
    """Train one recipe, sample it and score it; the row that goes to the output."""
    contender = EngineContender(
        "fc_unet",
        compile="auto",
        prediction=args.prediction,
        batch_size=args.batch_size,
        lr=args.lr,
        time_embedding=args.time_embedding,
        layer_norm=args.layer_norm,
    )
    settings = RunSettings(device=select_device(args.device))
    images, _ = load_images("mnist")
    result = contender.train_steps(args.steps, images, settings)
    samples, _ = generate(contender.noise_predictor(result), parse_sampler(SAMPLER), args.samples,
                          args.samples, settings.device, SAMPLING_SEED)  # fmt: skip
    score = score_samples(samples)
    last_losses = result.history.loss[-50:]
    return {
        **{key: value for key, value in vars(args).items() if key != "output"},
        "device": str(result.device),
        "images_seen": result.steps * args.batch_size,
        "train_seconds": round(result.seconds, 1),
        "last_loss": sum(last_losses) / len(last_losses),
        "frechet_distance": score.frechet_distance,
        "confident_share": score.confident_share,
        "class_entropy": score.class_entropy,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    row = run_recipe(args)
    line = json.dumps(row)
    print(line)
    with args.output.open("a", encoding="utf-8") as file:
        file.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
