"""The ``evaluate`` command: score a checkpoint's samples with the reference classifier beside as
many real test images, compare both sets with as many training images (kernel distance,
precision, recall, density, coverage), check both for copies of the images the checkpoint was
trained on (the nearest-neighbour ratio of chapter 30) and, with --bound-images, report the
variational bound in bits/dim, and with --ode-steps also the bound through the probability-flow
ODE (both computed in :mod:`diffusion_lib.cli_bounds`); --json writes the numbers atomically.
The checkpoint is rebuilt and sampled as ``sample`` does it, through
:mod:`diffusion_lib.cli_sample`.

A masked checkpoint draws images of K grey levels, so the test images beside them are quantised
to the same levels, and its bound is the order-agnostic bound of masked diffusion on the
quantised test images.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from diffusion_lib.checkpoints import write_atomically
from diffusion_lib.cli_bounds import bound_lines, check_bound_fits, likelihood_bound
from diffusion_lib.cli_guidance import describe_guidance, guidance_record, sampling_labels
from diffusion_lib.cli_sample import (
    SamplingPlan,
    draw_samples,
    plan_sampling,
    real_images,
    sampling_method,
    training_images,
)
from diffusion_lib.command_line import CommandError, check_output_file
from diffusion_lib.data import load_images
from diffusion_lib.feature_metrics import (
    COPY_RATIO,
    kernel_distance,
    manifold_scores,
    nearest_neighbour_ratios,
)
from diffusion_lib.masked_diffusion import MaskedDiffusion
from diffusion_lib.metrics import QualityScore, score_samples, to_classifier_range
from diffusion_lib.reference_classifier import (
    CLASSIFIER_VERSION,
    SPLIT_SIZES,
    ReferenceClassifier,
    get_classifier,
)

# The rows of evaluate's table: JSON key, then the label printed. A masked checkpoint's reference
# row holds the test images quantised to its grey levels.
SCORE_ROWS = {
    "samples": "samples",
    "real_test_images": "real test images",
    "quantised_test_images": "quantised test images",
}
# The set scores: balls to the k-th nearest neighbour, and disjoint subsets for the kernel
# distance's standard error (10 subsets of 1000 for 10,000 samples, as Bińkowski et al. used).
SET_SCORE_K = 5
KERNEL_SUBSETS = 10


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
    if args.ode_steps != 0 and (args.ode_steps < 2 or args.bound_images == 0):
        raise CommandError(
            "--ode-steps must be 0 (no ODE bound) or at least 2 (Heun steps from t = 0 to "
            f"T - 1), and it needs --bound-images M > 0, the test images it bounds; got "
            f"--ode-steps {args.ode_steps} with --bound-images {args.bound_images}"
        )
    if args.json is not None:
        check_output_file("--json", args.json, "scores.json")


def _rows(samples: torch.Tensor, plan: SamplingPlan) -> dict[str, torch.Tensor]:
    """The images of each row, by SCORE_ROWS key, in [-1, 1]: the samples, and the first N real
    test images (quantised for a masked checkpoint)."""
    masked = isinstance(plan.schedule, MaskedDiffusion)
    reference = "quantised_test_images" if masked else "real_test_images"
    value_range = tuple(plan.config["value_range"])
    return {
        "samples": to_classifier_range(samples, value_range),
        reference: real_images(plan, len(samples), train=False),
    }


def _quality_scores(
    rows: dict[str, torch.Tensor], dataset: str, classifier: ReferenceClassifier
) -> dict[str, QualityScore]:
    """score_samples of each row.

    The Fréchet distance of N images is biased upwards, the more so the smaller N, so the
    samples' distance compares with the real images' distance at the same N, not with 0.
    """
    return {
        key: score_samples(images, dataset, classifier=classifier) for key, images in rows.items()
    }


def _set_scores(
    rows: dict[str, torch.Tensor],
    reference: torch.Tensor,
    classifier: ReferenceClassifier,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """The kernel distance (Bińkowski et al. 2018) and precision, recall, density and coverage
    (Kynkäänniemi et al. 2019; Naeem et al. 2020) of each row against ``reference`` images, in
    the classifier's feature space.

    The reference is as many training images as there are samples, so that the real test row
    shows what a perfect model scores at this N. Balls reach the SET_SCORE_K-th neighbour (fewer
    for tiny N); the kernel distance's standard error comes from up to KERNEL_SUBSETS disjoint
    subsets (none for N < 4), drawn with ``seed``.
    """
    reference_features, _ = classifier.embed(reference)
    k = min(SET_SCORE_K, len(reference) - 1)
    subsets = max(1, min(KERNEL_SUBSETS, len(reference) // 2))
    scores = {}
    for key, images in rows.items():
        features, _ = classifier.embed(images)
        kernel = kernel_distance(
            features,
            reference_features,
            num_subsets=subsets,
            generator=torch.Generator().manual_seed(seed),
        )
        manifold = manifold_scores(reference_features, features, k=k)
        error = kernel.standard_error
        scores[key] = {
            "kernel_distance": kernel.mean,
            "kernel_distance_standard_error": None if math.isnan(error) else error,
            "precision": manifold.precision,
            "recall": manifold.recall,
            "density": manifold.density,
            "coverage": manifold.coverage,
            "k": k,
        }
    return scores


def _add_label_shares(
    set_scores: dict[str, dict[str, Any]],
    rows: dict[str, torch.Tensor],
    args: argparse.Namespace,
    plan: SamplingPlan,
    classifier: ReferenceClassifier,
) -> None:
    """Add ``read_as_label`` to each row of ``set_scores``: the share of the samples that the
    classifier reads as the class they were drawn for, and of the real test images, as their
    own labels (what a perfect generator would score)."""
    count = len(rows["samples"])
    _, test_labels = load_images(plan.config["dataset"], train=False, limit=count)
    labels = {
        "samples": sampling_labels(args, plan.network, count),
        "real_test_images": test_labels,
    }
    for key, images in rows.items():
        _, probabilities = classifier.embed(images)
        read = probabilities.argmax(dim=1).cpu() == labels[key].cpu()
        set_scores[key]["read_as_label"] = float(read.float().mean())


def _add_copy_scores(
    set_scores: dict[str, dict[str, Any]],
    rows: dict[str, torch.Tensor],
    training: torch.Tensor,
    plan: SamplingPlan,
) -> int:
    """Add ``copied_share`` (the share of ratios below COPY_RATIO) and ``median_nearest_ratio``
    to each row of ``set_scores``: the distance of each image to its nearest training image over
    that to the second nearest, in pixels of [-1, 1], against every image the checkpoint was
    trained on, ``training``. Returns that number of images; with fewer than 2 there is no
    second nearest, and both scores are None.
    """
    training = training.flatten(1)
    for key, images in rows.items():
        copied, median = None, None
        if len(training) >= 2:
            ratios, _ = nearest_neighbour_ratios(
                images.flatten(1).to(plan.device), training.to(plan.device)
            )
            copied, median = float((ratios < COPY_RATIO).double().mean()), float(ratios.median())
        set_scores[key].update(copied_share=copied, median_nearest_ratio=median)
    return len(training)


def _copy_line(scores: dict[str, dict[str, Any]], training_count: int) -> str:
    """One line with each row's share of copies and median nearest-neighbour ratio."""
    if training_count < 2:
        return "copies: not checked (the checkpoint was trained on fewer than 2 images)"
    parts = [
        f"{SCORE_ROWS[key]} {row['copied_share']:.1%} (median ratio "
        f"{row['median_nearest_ratio']:.3f})"
        for key, row in scores.items()
    ]
    return (
        f"copies of the {training_count} training images (nearest over second-nearest distance "
        f"in pixels below {COPY_RATIO:.3g}): {', '.join(parts)}"
    )


def _score_table(scores: dict[str, QualityScore]) -> str:
    """The scores as a table of aligned columns, one row per SCORE_ROWS entry."""
    width = max(18, *(len(SCORE_ROWS[key]) + 2 for key in scores))
    lines = [f"{'':<{width}}{'n':>6}{'Fréchet distance':>18}{'confident':>11}{'class entropy':>15}"]
    for key, score in scores.items():
        lines.append(
            f"{SCORE_ROWS[key]:<{width}}{score.n:>6}{score.frechet_distance:>18.2f}"
            f"{score.confident_share:>11.1%}{score.class_entropy:>15.3f}"
        )
    return "\n".join(lines)


def _set_score_table(scores: dict[str, dict[str, Any]], reference_count: int) -> str:
    """The set scores as a table of aligned columns, one row per SCORE_ROWS entry."""
    width = max(18, *(len(SCORE_ROWS[key]) + 2 for key in scores))
    lines = [
        f"{'':<{width}}{'kernel distance':>22}{'precision':>11}{'recall':>8}{'density':>9}"
        f"{'coverage':>10}"
    ]
    for key, row in scores.items():
        error = row["kernel_distance_standard_error"]
        kernel = f"{row['kernel_distance']:.3f}" + (f" ± {error:.3f}" if error is not None else "")
        lines.append(
            f"{SCORE_ROWS[key]:<{width}}{kernel:>22}{row['precision']:>11.3f}"
            f"{row['recall']:>8.3f}{row['density']:>9.3f}{row['coverage']:>10.3f}"
        )
    k = next(iter(scores.values()))["k"]
    lines.append(
        f"(each row against the first {reference_count} training images; ball radii to the "
        f"k-th nearest neighbour, k = {k})"
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class _Measured:
    """What evaluate measured, for its report and its JSON record: the sampler's variance, the
    quality scores and set scores of each row, the number of training images the copies were
    sought among, and the bound (``None`` without --bound-images)."""

    variance: str | None
    scores: dict[str, QualityScore]
    set_scores: dict[str, dict[str, Any]]
    training_count: int
    bound: dict[str, Any] | None


def _evaluation_record(
    args: argparse.Namespace,
    plan: SamplingPlan,
    measured: _Measured,
) -> dict[str, Any]:
    """Everything evaluate measured, and how, as a JSON-ready dict."""
    variance, scores, set_scores = measured.variance, measured.scores, measured.set_scores
    training_count, bound = measured.training_count, measured.bound
    masked = {}
    if isinstance(plan.schedule, MaskedDiffusion):
        masked = {
            "classes": plan.schedule.num_classes,
            "masking_schedule": plan.schedule.schedule,
            "order": plan.order,
        }
    return {
        "checkpoint": str(plan.path),
        "dataset": plan.config["dataset"],
        "sampler": plan.sampler,
        "variance": variance,
        **masked,
        "steps": plan.steps,
        "seed": args.seed,
        **guidance_record(args),
        "classifier_version": CLASSIFIER_VERSION,
        **{
            key: {**score.as_row(), "class_counts": list(score.class_counts), **set_scores[key]}
            for key, score in scores.items()
        },
        "set_score_reference": f"the first {scores['samples'].n} training images",
        "copy_reference": f"the {training_count} image{'s' * (training_count != 1)} the "
        "checkpoint was trained on",
        "bound": bound,
    }


def _set_scores_against_training(
    rows: dict[str, torch.Tensor],
    args: argparse.Namespace,
    plan: SamplingPlan,
    classifier: ReferenceClassifier,
) -> tuple[dict[str, dict[str, Any]], int]:
    """The set scores of each row against the training split, with the share read as the label
    asked for (with --label) and the copy scores against the images the checkpoint was trained
    on; and the number of those images."""
    training_split = real_images(plan, None, train=True)  # read once for both comparisons
    set_scores = _set_scores(rows, training_split[: len(rows["samples"])], classifier, args.seed)
    if args.label is not None:
        _add_label_shares(set_scores, rows, args, plan, classifier)
    trained_on = training_images(plan, training_split)
    training_count = _add_copy_scores(set_scores, rows, trained_on, plan)
    return set_scores, training_count


def _print_report(
    args: argparse.Namespace,
    plan: SamplingPlan,
    measured: _Measured,
) -> None:
    """Print what evaluate measured: what was sampled, the tables, the copies, the shares read
    as the label asked for and the bound, where there are any."""
    variance, scores, set_scores = measured.variance, measured.scores, measured.set_scores
    training_count, bound = measured.training_count, measured.bound
    count = scores["samples"].n
    masked = isinstance(plan.schedule, MaskedDiffusion)
    guided = describe_guidance(args)
    guided = f", {guided}" if guided else ""
    print(
        f"{plan.path}: {count} samples of {plan.config['dataset']} "
        f"({sampling_method(plan, variance)}{guided}, seed {args.seed})"
    )
    print(_score_table(scores))
    print(_set_score_table(set_scores, count))
    print(_copy_line(set_scores, training_count))
    if args.label is not None:
        print(
            f"read as the class asked for: {set_scores['samples']['read_as_label']:.1%} of the "
            f"samples ({set_scores['real_test_images']['read_as_label']:.1%} of the real test "
            "images are read as their own labels)"
        )
    if masked:
        print(
            f"(quantised test images: the first {count} test images rounded to the "
            f"{plan.schedule.num_classes} grey levels the model draws)"
        )
    if bound is not None:
        print(bound_lines(bound, masked))


def run_evaluate(args: argparse.Namespace) -> None:
    """``evaluate``: score samples of a checkpoint beside as many real test images, and with
    --bound-images its variational bound."""
    _check_evaluation_args(args)
    plan = plan_sampling(args)
    check_bound_fits(plan.config, args.bound_images, args.ode_steps)
    classifier = get_classifier(plan.config["dataset"], device=plan.device)
    samples, variance = draw_samples(plan, args)
    rows = _rows(samples, plan)
    scores = _quality_scores(rows, plan.config["dataset"], classifier)
    set_scores, training_count = _set_scores_against_training(rows, args, plan, classifier)
    bound = likelihood_bound(plan, args.bound_images, args.ode_steps, args.seed)
    measured = _Measured(variance, scores, set_scores, training_count, bound)
    _print_report(args, plan, measured)
    if args.json is not None:
        record = _evaluation_record(args, plan, measured)
        text = json.dumps(record, indent=2) + "\n"
        write_atomically(args.json, lambda file: file.write(text.encode("utf-8")))
        print(f"scores written to {args.json}")
