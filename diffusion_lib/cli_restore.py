"""The ``restore`` command: damage the first test images of a checkpoint's dataset with a known
measurement (a low-resolution copy, or a hidden part), restore them with the checkpoint as the
prior (:mod:`diffusion_lib.inverse`, or RePaint), and report how well the restorations agree
with the measurement, keep the digit and match the originals. --output saves the originals,
the measurements (as the pseudo-inverse A^+ y) and the restorations as one picture.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from diffusion_lib.checkpoints import write_atomically
from diffusion_lib.cli_sample import as_noise_sampler_reads_it, read_checkpoint, rebuild
from diffusion_lib.command_line import (
    DEFAULT_RESTORE_STEPS,
    IMAGE_SIZE,
    INPAINTING_REGIONS,
    REPAINT_JUMP,
    REPAINT_RESAMPLINGS,
    SCHEDULE_OBJECTIVES,
    CommandError,
    check_output_file,
)
from diffusion_lib.data import load_images, to_unit_interval
from diffusion_lib.devices import select_device
from diffusion_lib.editing import repaint
from diffusion_lib.inverse import (
    Downsampling,
    Inpainting,
    LinearMeasurement,
    dps_sample,
    pigdm_sample,
)
from diffusion_lib.metrics import score_samples
from diffusion_lib.reference_classifier import (
    CLASSIFIER_VERSION,
    ReferenceClassifier,
    get_classifier,
)
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_samples, cap_sampling_steps
from diffusion_lib.validation import check_choice

# Columns of the saved picture: each of its three rows shows this many images at most.
SHOWN = 16


def hidden_region(region: str, size: int = IMAGE_SIZE) -> Tensor:
    """The mask (1, 1, size, size) of --hide: 0 on the hidden ``region``, 1 where pixels are seen.
    ``"center"`` hides the middle square of half the side."""
    check_choice("region", region, INPAINTING_REGIONS)
    mask = torch.ones(1, 1, size, size)
    half, quarter = size // 2, size // 4
    hidden = {
        "bottom": (slice(half, None), slice(None)),
        "top": (slice(None, half), slice(None)),
        "left": (slice(None), slice(None, half)),
        "right": (slice(None), slice(half, None)),
        "center": (slice(quarter, quarter + half), slice(quarter, quarter + half)),
    }[region]
    mask[0, 0][hidden] = 0
    return mask


def _check_options_apply(args: argparse.Namespace) -> None:
    """Refuse an option given for a task or a method it does not belong to."""
    given = {
        "--factor": args.factor is not None,
        "--hide": args.hide is not None,
        "--step-size": args.step_size is not None,
        "--data-std": args.data_std is not None,
        "--eta": args.eta is not None,
    }
    applies = {
        "--factor": (args.task == "super-resolution", "--task super-resolution"),
        "--hide": (args.task == "inpainting", "--task inpainting"),
        "--step-size": (args.method == "dps", "--method dps"),
        "--data-std": (args.method == "pigdm", "--method pigdm"),
        "--eta": (args.method == "pigdm", "--method pigdm"),
    }
    for option, (fits, where) in applies.items():
        if given[option] and not fits:
            raise CommandError(f"{option} applies to {where} only")


def _check_restore_args(args: argparse.Namespace, config: dict[str, Any]) -> int:
    """Validate the options against each other and the checkpoint; return the chain's steps
    (after smoke mode's cap)."""
    objective = config.get("objective", "noise")
    if objective not in SCHEDULE_OBJECTIVES:
        raise CommandError(
            f"restore needs a checkpoint trained on a noise schedule (--objective noise or "
            f"hybrid); this one was trained with --objective {objective}"
        )
    _check_options_apply(args)
    if args.method == "repaint" and args.task != "inpainting":
        raise CommandError("--method repaint fills hidden pixels: it needs --task inpainting")
    factor = 4 if args.factor is None else args.factor
    if args.task == "super-resolution" and (factor < 2 or IMAGE_SIZE % factor):
        divisors = [f for f in range(2, IMAGE_SIZE + 1) if IMAGE_SIZE % f == 0]
        raise CommandError(
            f"--factor must divide the image size {IMAGE_SIZE}: one of {divisors}; got {factor}"
        )
    lower_bounds = (
        ("--noise", args.noise, 0.0),
        ("--step-size", args.step_size, 0.0),
        ("--eta", args.eta, 0.0),
    )
    for option, value, low in lower_bounds:
        if value is not None and not value >= low:
            raise CommandError(f"{option} must be >= {low:g}, got {value}")
    if args.data_std is not None and not args.data_std > 0:
        raise CommandError(f"--data-std must be > 0, got {args.data_std}")
    if args.num < 1:
        raise CommandError(f"--num must be >= 1, got {args.num}")
    timesteps = config["schedule"]["timesteps"]
    steps = min(DEFAULT_RESTORE_STEPS[args.method], timesteps) if args.steps is None else args.steps
    if not 1 <= steps <= timesteps:
        raise CommandError(
            f"--steps must lie in 1..{timesteps} (T of this checkpoint), got {steps}"
        )
    return cap_sampling_steps(steps)


def _measurement(args: argparse.Namespace) -> tuple[LinearMeasurement, str]:
    """The operator of --task, and a description of it in words."""
    if args.task == "super-resolution":
        factor = 4 if args.factor is None else args.factor
        size = IMAGE_SIZE // factor
        return Downsampling(factor), f"super-resolution from {size}x{size} (factor {factor})"
    region = args.hide or "bottom"
    return Inpainting(hidden_region(region)), f"inpainting, {region} hidden"


def _restore(
    args: argparse.Namespace,
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    value_range: tuple[float, float],
    problem: tuple[LinearMeasurement, Tensor, tuple[int, ...]],
    steps: int,
    generator: torch.Generator,
) -> tuple[Tensor, str]:
    """The restorations by --method of the measurement ``y`` of images of ``shape``, and the
    method in words."""
    operator, y, shape = problem
    if args.method == "repaint":
        restored = repaint(model, schedule, operator.pseudo_inverse(y), operator.mask,
                           steps=steps, jump_length=min(REPAINT_JUMP, steps),
                           resamplings=REPAINT_RESAMPLINGS, generator=generator,
                           clip_x0=value_range)  # fmt: skip
        return restored, f"repaint, {steps} steps, {REPAINT_RESAMPLINGS} walks"
    if args.method == "dps":
        step_size = 1.0 if args.step_size is None else args.step_size
        restored = dps_sample(model, schedule, operator, y, shape, step_size=step_size,
                              steps=steps, generator=generator, clip_x0=value_range)  # fmt: skip
        return restored, f"dps, step size {step_size:g}, {steps} steps"
    data_std = 1.0 if args.data_std is None else args.data_std
    restored = pigdm_sample(model, schedule, operator, y, shape, noise_std=args.noise,
                            data_std=data_std, steps=steps, eta=args.eta, generator=generator,
                            clip_x0=value_range)  # fmt: skip
    ddim = "" if args.eta is None else f", DDIM eta {args.eta:g}"
    return restored, f"pigdm, data std {data_std:g}{ddim}, {steps} steps"


def _scores(
    rows: dict[str, Tensor],
    originals: Tensor,
    labels: Tensor,
    problem: tuple[LinearMeasurement, Tensor],
    config: dict[str, Any],
    classifier: ReferenceClassifier,
) -> dict[str, dict[str, float]]:
    """For each row of images (N, C, H, W) on the CPU: the root-mean-square of ``A x - y``, the
    share the classifier reads as the original's label, the root-mean-square distance to the
    originals per pixel (both in the checkpoint's pixel units), and, for N >= 2, the Fréchet
    distance to the test set."""
    operator, y = problem
    value_range = tuple(config["value_range"])
    scores = {}
    for name, images in rows.items():
        in_classifier_range = to_unit_interval(images, value_range) * 2 - 1
        probabilities = classifier.embed(in_classifier_range)[1]
        scores[name] = {
            "measurement_error": float((operator(images) - y).pow(2).mean().sqrt()),
            "label_kept": float((probabilities.argmax(1) == labels).float().mean()),
            "distance_to_original": float((images - originals).pow(2).mean().sqrt()),
        }
        if len(images) >= 2:
            score = score_samples(images, config["dataset"], value_range=value_range,
                                  classifier=classifier)  # fmt: skip
            scores[name]["frechet_distance"] = score.frechet_distance
    return scores


ROW_NAMES = {
    "originals": "originals",
    "pseudo_inverse": "pseudo-inverse A+y",
    "restored": "restored",
}


def _score_table(scores: dict[str, dict[str, float]]) -> str:
    lines = [f"{'':<20}{'measurement error':>19}{'digit kept':>12}{'distance to original':>22}"
             f"{'Fréchet distance':>18}"]  # fmt: skip
    for name, row in scores.items():
        frechet = row.get("frechet_distance")
        lines.append(
            f"{ROW_NAMES[name]:<20}{row['measurement_error']:>19.4f}{row['label_kept']:>12.1%}"
            f"{row['distance_to_original']:>22.4f}{'-' if frechet is None else f'{frechet:.2f}':>18}"
        )
    return "\n".join(lines)


def _save_picture(rows: dict[str, Tensor], value_range: tuple[float, float], path: Path) -> None:
    """The first SHOWN images of each row, one row each: originals, A+y, restorations."""
    shown = min(SHOWN, len(rows["originals"]))
    pictures = torch.cat(
        [to_unit_interval(images[:shown], value_range) for images in rows.values()]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(pictures, nrow=shown, padding=2), path)


def run_restore(args: argparse.Namespace) -> None:
    """``restore``: measure the first test images, restore them with the checkpoint's model as
    the prior, score the restorations and save them beside the originals and measurements."""
    check_output_file("--output", args.output, "restored.png", image=True)
    if args.json is not None:
        check_output_file("--json", args.json, "restored.json")
    path, state = read_checkpoint(args.checkpoint)
    config = state["config"]
    steps = _check_restore_args(args, config)
    device = select_device(args.device)
    network, schedule = rebuild(path, state, device)
    # The posterior samplers read the noise only, as ddim does (a hybrid model's variance is unused).
    model, _ = as_noise_sampler_reads_it(network, schedule, config, "ddim")
    value_range = tuple(config["value_range"])
    originals, labels = load_images(
        config["dataset"], train=False, value_range=value_range, limit=cap_samples(args.num)
    )
    operator, task = _measurement(args)
    generator = torch.Generator().manual_seed(args.seed)
    y = operator.measure(originals, args.noise, generator=generator)
    start = time.perf_counter()
    problem = (operator, y.to(device), tuple(originals.shape))
    restored, method = _restore(args, model, schedule, value_range, problem, steps, generator)
    seconds = time.perf_counter() - start
    rows = {
        "originals": originals,
        "pseudo_inverse": operator.pseudo_inverse(y),
        "restored": restored.float().cpu(),
    }
    classifier = get_classifier(config["dataset"], device=device)
    scores = _scores(rows, originals, labels, (operator, y), config, classifier)
    print(f"{path}: {len(originals)} test images of {config['dataset']}, {task}, measurement "
          f"noise {args.noise:g}; restored by {method}, seed {args.seed}, in {seconds:.1f} s")  # fmt: skip
    print(_score_table(scores))
    _save_picture(rows, value_range, args.output)
    print(f"saved originals, measurements (as A+y) and restorations to {args.output}")
    if args.json is not None:
        record = {
            "checkpoint": str(path), "dataset": config["dataset"], "task": task,
            "noise": args.noise, "method": method, "steps": steps, "seed": args.seed,
            "images": len(originals), "seconds": seconds,
            "classifier_version": CLASSIFIER_VERSION, **scores,
        }  # fmt: skip
        text = json.dumps(record, indent=2) + "\n"
        write_atomically(args.json, lambda file: file.write(text.encode("utf-8")))
        print(f"scores written to {args.json}")
