"""The ``evaluate`` command: score a checkpoint's samples with the reference classifier beside as
many real test images and, with --bound-images, its variational bound in bits/dim; --json writes
the numbers atomically. The checkpoint is rebuilt and sampled as ``sample`` does it, through
:mod:`diffusion_lib.cli_sample`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from diffusion_lib.checkpoints import write_atomically
from diffusion_lib.cli_sample import (
    SamplingPlan,
    as_noise_sampler_reads_it,
    draw_samples,
    plan_sampling,
    sampling_method,
)
from diffusion_lib.command_line import SCHEDULE_OBJECTIVES, CommandError
from diffusion_lib.data import load_images
from diffusion_lib.losses import elbo_bits_per_dim
from diffusion_lib.metrics import (
    CLASSIFIER_VERSION,
    SPLIT_SIZES,
    QualityScore,
    ReferenceClassifier,
    get_classifier,
    score_samples,
)
from diffusion_lib.smoke import cap_samples

# The rows of evaluate's table: JSON key, then the label printed.
SCORE_ROWS = {"samples": "samples", "real_test_images": "real test images"}
# Test images per batch of the bound: T network calls each, without gradients.
BOUND_BATCH_SIZE = 256


def _check_evaluation_args(args: argparse.Namespace) -> None:
    """The checks on evaluate's own options that need no checkpoint."""
    test_images = SPLIT_SIZES[False]
    if not 2 <= args.num <= test_images:
        raise CommandError(
            f"--num must lie in 2..{test_images} (the Fréchet distance fits a covariance to at "
            f"least 2 samples, and as many real test images are scored beside them); got {args.num}"
        )
    if not 0 <= args.bound_images <= test_images:
        raise CommandError(
            f"--bound-images must lie in 0..{test_images} (0 skips the bound); "
            f"got {args.bound_images}"
        )
    if args.json is not None and args.json.is_dir():
        raise CommandError(f"--json names a file to write; {args.json} is a folder")


def _check_bound_fits(config: dict[str, Any], bound_images: int) -> None:
    """--bound-images needs a model with a noise schedule, trained on data in [-1, 1]."""
    if bound_images == 0:
        return
    objective = config.get("objective", "noise")
    if objective not in SCHEDULE_OBJECTIVES:
        allowed = " or ".join(f"--objective {name}" for name in SCHEDULE_OBJECTIVES)
        raise CommandError(
            f"--bound-images needs a checkpoint trained with {allowed}, whose noise schedule "
            f"defines the variational bound; this one was trained with --objective {objective}"
        )
    if [float(value) for value in config["value_range"]] != [-1.0, 1.0]:
        raise CommandError(
            "--bound-images needs a checkpoint trained on images in [-1, 1], where the bound's "
            "decoder scores 8-bit pixels; this one was trained with --value-range "
            f"{' '.join(str(value) for value in config['value_range'])}"
        )


def _quality_scores(
    samples: torch.Tensor, plan: SamplingPlan, classifier: ReferenceClassifier
) -> dict[str, QualityScore]:
    """Scores of ``samples`` (N, 1, 28, 28) and of the first N real test images, by SCORE_ROWS key.

    The Fréchet distance of N images is biased upwards, the more so the smaller N, so the
    samples' distance compares with the real images' distance at the same N, not with 0.
    """
    dataset = plan.config["dataset"]
    real_images, _ = load_images(dataset, train=False, limit=len(samples))
    value_range = tuple(plan.config["value_range"])
    return {
        "samples": score_samples(samples, dataset, value_range=value_range, classifier=classifier),
        "real_test_images": score_samples(real_images, dataset, classifier=classifier),
    }


def _variational_bound(plan: SamplingPlan, num_images: int, seed: int) -> dict[str, Any]:
    """The negative ELBO (Ho et al. 2020, eq. 5) in bits per dimension, averaged over the first
    ``cap_samples(num_images)`` test images.

    The reverse process is the one ddpm samples: a hybrid model's learned variance, otherwise
    the posterior variance beta_tilde ("small"); an x0 or v model through the noise it implies.
    A conditional model is called without labels (its null label). Each x_t's noise comes from
    a CPU generator seeded with ``seed``, which runs on through batches of BOUND_BATCH_SIZE.
    """
    model, variance = as_noise_sampler_reads_it(plan.network, plan.schedule, plan.config, "ddpm")
    variance = variance or "small"
    x0, _ = load_images(plan.config["dataset"], train=False, limit=cap_samples(num_images))
    generator = torch.Generator().manual_seed(seed)
    totals = [
        elbo_bits_per_dim(
            model, plan.schedule, batch.to(plan.device), variance=variance, generator=generator
        ).total
        for batch in x0.split(BOUND_BATCH_SIZE)
    ]
    bits_per_dim = float(torch.cat(totals).mean())
    return {"bits_per_dim": bits_per_dim, "images": len(x0), "variance": variance}


def _score_table(scores: dict[str, QualityScore]) -> str:
    """The scores as a table of aligned columns, one row per SCORE_ROWS entry."""
    lines = [f"{'':<18}{'n':>6}{'Fréchet distance':>18}{'confident':>11}{'class entropy':>15}"]
    for key, score in scores.items():
        lines.append(
            f"{SCORE_ROWS[key]:<18}{score.n:>6}{score.frechet_distance:>18.2f}"
            f"{score.confident_share:>11.1%}{score.class_entropy:>15.3f}"
        )
    return "\n".join(lines)


def _evaluation_record(
    args: argparse.Namespace,
    plan: SamplingPlan,
    variance: str | None,
    scores: dict[str, QualityScore],
    bound: dict[str, Any] | None,
) -> dict[str, Any]:
    """Everything evaluate measured, and how, as a JSON-ready dict."""
    return {
        "checkpoint": str(plan.path),
        "dataset": plan.config["dataset"],
        "sampler": plan.sampler,
        "variance": variance,
        "steps": plan.steps,
        "seed": args.seed,
        "label": args.label,
        "guidance": args.guidance,
        "classifier_version": CLASSIFIER_VERSION,
        **{
            key: {**score.as_row(), "class_counts": list(score.class_counts)}
            for key, score in scores.items()
        },
        "bound": bound,
    }


def run_evaluate(args: argparse.Namespace) -> None:
    """``evaluate``: score samples of a checkpoint beside as many real test images, and with
    --bound-images its variational bound."""
    _check_evaluation_args(args)
    plan = plan_sampling(args)
    _check_bound_fits(plan.config, args.bound_images)
    classifier = get_classifier(plan.config["dataset"], device=plan.device)
    samples, variance = draw_samples(plan, args)
    scores = _quality_scores(samples, plan, classifier)
    bound = _variational_bound(plan, args.bound_images, args.seed) if args.bound_images else None
    guided = "" if args.label is None else f", label {args.label}, guidance {args.guidance:g}"
    print(
        f"{plan.path}: {len(samples)} samples of {plan.config['dataset']} "
        f"({sampling_method(plan.sampler, variance, plan.steps)}{guided}, seed {args.seed})"
    )
    print(_score_table(scores))
    if bound is not None:
        print(
            f"variational bound: {bound['bits_per_dim']:.4f} bits/dim on {bound['images']} "
            f"test images ({bound['variance']} variance)"
        )
    if args.json is not None:
        record = _evaluation_record(args, plan, variance, scores, bound)
        text = json.dumps(record, indent=2) + "\n"
        write_atomically(args.json, lambda file: file.write(text.encode("utf-8")))
        print(f"scores written to {args.json}")
