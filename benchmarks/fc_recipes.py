"""Training recipes for the fully connected U-net at an equal number of training images.

Each recipe trains a fresh ``FCUNet`` on MNIST for ``--steps`` steps of ``--batch-size`` images,
then draws ``--samples`` images with ancestral sampling over the chain respaced to 100 steps
(the quality section's default sampler) from the EMA weights and scores them with
:func:`diffusion_lib.metrics.score_samples`. One JSON line per recipe goes to ``--output``.
It answers, on any device, which target, learning rate and batch make the network learn
fastest per image seen; ``benchmark.py`` then asks what a time budget buys on a GPU.

    python benchmarks/fc_recipes.py --prediction x0 --batch-size 1024 --lr 1e-3 --steps 1000
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from diffusion_lib import FCUNet, NoiseSchedule, ddpm_sample, load_images, train
from diffusion_lib.losses import diffusion_loss
from diffusion_lib.metrics import score_samples
from diffusion_lib.predictions import NoiseFromPrediction

SAMPLING_STEPS = 100


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
    schedule = NoiseSchedule.from_name("linear", 1000)
    torch.manual_seed(0)
    model = FCUNet(time_embedding=args.time_embedding, layer_norm=args.layer_norm)
    loss = None
    if args.prediction != "epsilon":
        loss = functools.partial(diffusion_loss, prediction=args.prediction)
    images, _ = load_images("mnist")
    result = train(model, schedule, images, steps=args.steps, batch_size=args.batch_size,
                   lr=args.lr, loss=loss, device=args.device, progress=False)  # fmt: skip
    noise_predictor = result.ema_model
    if args.prediction != "epsilon":
        noise_predictor = NoiseFromPrediction(noise_predictor, schedule, args.prediction)
    generator = torch.Generator(device=result.device).manual_seed(2)
    samples = ddpm_sample(noise_predictor, schedule, (args.samples, 1, 28, 28),
                          steps=SAMPLING_STEPS, generator=generator)  # fmt: skip
    score = score_samples(samples.cpu())
    return {
        **{key: value for key, value in vars(args).items() if key != "output"},
        "device": str(result.device),
        "images_seen": result.steps * args.batch_size,
        "train_seconds": round(result.seconds, 1),
        "last_loss": sum(result.history.loss[-50:]) / len(result.history.loss[-50:]),
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
