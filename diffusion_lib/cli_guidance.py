"""The guidance options of ``sample`` and ``evaluate`` (chapters 7 and 28): checked against the
checkpoint, and turned into the :class:`~diffusion_lib.guidance.Guided` noise predictor that the
sampler calls in place of the network.

``--guidance w`` extrapolates ``eps(c) + w (eps(c) - eps_ref)`` from a reference estimate:

* with ``--label c`` alone, the model's own estimate without a label (classifier-free guidance);
* with ``--negative-label k``, its estimate for class k, a class to steer away from; without
  ``--label`` the samples are drawn without a label, away from k;
* with ``--reference-checkpoint``, a weaker model of the same kind (autoguidance), which needs
  no label.

``--label all`` draws the classes in turn, 0, 1, ..., K - 1, 0, ... (a class-balanced set, as
``evaluate`` wants it). ``--guidance-interval`` limits guidance to a stretch of noise levels, in the unit the checkpoint
samples in: timesteps 0..T - 1 for a noise or a hybrid model, the time t in [0, 1] of a flow,
the noise level sigma of an EDM denoiser. ``--guidance-rescale`` is Lin et al.'s phi.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lib.command_line import ALL_LABELS, CommandError
from diffusion_lib.data import CLASS_NAMES
from diffusion_lib.flow_matching import RectifiedFlow
from diffusion_lib.guidance import Guided

# What a reference checkpoint must share with the checkpoint it guides, so that both estimate
# the same quantity of the same data, with the value a config written before the key existed
# stands for; the network itself may differ (a smaller one, say).
SHARED_CONFIG = {
    "objective": "noise",
    "prediction": "epsilon",
    "schedule": None,
    "dataset": None,
    "value_range": None,
    "sigma_data": None,
}
SHARED_MODEL_KWARGS = ("image_size", "channels")
INTERVAL_UNITS = {
    "noise": "timesteps",
    "hybrid": "timesteps",
    "flow": "the flow's time t",
    "edm": "noise levels sigma",
}


def guidance_options_given(args: argparse.Namespace) -> list[str]:
    """The options that shape guidance and were given, as they are spelled on the command line."""
    given = {
        "--negative-label": args.negative_label is not None,
        "--guidance-interval": args.guidance_interval is not None,
        "--guidance-rescale": args.guidance_rescale != 0.0,
        "--reference-checkpoint": args.reference_checkpoint is not None,
    }
    return [option for option, is_given in given.items() if is_given]


def check_guidance_args(args: argparse.Namespace, config: dict[str, Any]) -> None:
    """Check --label, --guidance and the options that shape guidance against a checkpoint of a
    Gaussian objective (noise, hybrid, flow or edm); raise a CommandError saying what is wrong."""
    if args.guidance < 0:
        raise CommandError(f"--guidance must be >= 0 (0 means no guidance), got {args.guidance}")
    shaping = guidance_options_given(args)
    if args.guidance == 0 and shaping:
        raise CommandError(f"{shaping[0]} shapes guidance, so it needs --guidance w > 0")
    references = [args.label, args.negative_label, args.reference_checkpoint]
    if args.guidance > 0 and all(reference is None for reference in references):
        raise CommandError(
            "--guidance needs --label (classifier-free guidance towards a class), "
            "--negative-label (away from a class) or --reference-checkpoint (autoguidance by a "
            "weaker model of the same kind)"
        )
    for option, label in (("--label", args.label), ("--negative-label", args.negative_label)):
        if label is not None:
            _check_label(option, label, config)
    if args.negative_label is not None and args.label == ALL_LABELS:
        raise CommandError(
            f"--negative-label with --label {ALL_LABELS} would leave the samples of class "
            f"{args.negative_label} unguided, since they would steer away from themselves; "
            "give one --label, or none to draw without a class"
        )
    if args.negative_label is not None and args.negative_label == args.label:
        raise CommandError(
            f"--negative-label {args.negative_label} is also --label: a class cannot steer away "
            "from itself; choose another class, or leave --negative-label out for plain "
            "classifier-free guidance"
        )
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise CommandError(
            f"--guidance-rescale must lie in [0, 1] (0.7 is typical), got {args.guidance_rescale}"
        )
    if args.guidance_interval is not None:
        guidance_interval(args, config)


def _check_label(option: str, label: int | str, config: dict[str, Any]) -> None:
    num_classes = config["model"]["kwargs"].get("num_classes")
    if not num_classes:
        raise CommandError(
            f"{option} needs a conditional checkpoint (trained with --conditional); this one is "
            "unconditional"
        )
    if label == ALL_LABELS:
        return
    if not 0 <= label < num_classes:
        names = CLASS_NAMES.get(config.get("dataset"), [str(k) for k in range(num_classes)])
        choices = ", ".join(f"{k} ({name})" for k, name in enumerate(names))
        raise CommandError(f"{option} must be one of {choices}; got {label}")


def guidance_interval(args: argparse.Namespace, config: dict[str, Any]) -> tuple[float, float]:
    """--guidance-interval checked against the checkpoint's objective and turned into the unit of
    its model's time input: timesteps stay timesteps, sigma stays sigma, and a flow's t in
    [0, 1] becomes ``time_scale * t``."""
    first, last = args.guidance_interval
    objective = config.get("objective", "noise")
    unit = INTERVAL_UNITS[objective]
    if objective == "flow":
        low, high = 0.0, 1.0
    elif objective == "edm":
        low, high = 0.0, float("inf")
    else:
        low, high = 0, config["schedule"]["timesteps"] - 1
        if first != int(first) or last != int(last):
            raise CommandError(
                f"--guidance-interval of a {objective} checkpoint is in whole timesteps, "
                f"0..{high}; got {first:g} {last:g}"
            )
        first, last = int(first), int(last)
    if not low <= first <= last <= high:
        raise CommandError(
            f"--guidance-interval FIRST LAST needs {low:g} <= FIRST <= LAST <= {high:g} for a "
            f"{objective} checkpoint, whose interval is in {unit}; got {first:g} {last:g}"
        )
    if objective == "flow":
        scale = RectifiedFlow(config["schedule"]["timesteps"]).time_scale
        return first * scale, last * scale
    return first, last


def check_reference_fits(
    reference_path: Path, reference: dict[str, Any], config: dict[str, Any], labelled: bool
) -> None:
    """A reference checkpoint for autoguidance must estimate what the guided one estimates, for
    the same data, and take the same labels when the samples are drawn with one."""
    for key, default in SHARED_CONFIG.items():
        theirs, ours = reference.get(key, default), config.get(key, default)
        if theirs != ours:
            raise CommandError(
                f"--reference-checkpoint {reference_path} differs from --checkpoint in {key} "
                f"({theirs!r} against {ours!r}); autoguidance needs a model of the same kind "
                "on the same data, trained for less or smaller"
            )
    ours, theirs = config["model"]["kwargs"], reference["model"]["kwargs"]
    for key in SHARED_MODEL_KWARGS:
        if theirs.get(key) != ours.get(key):
            raise CommandError(
                f"--reference-checkpoint {reference_path} draws images with {key} "
                f"{theirs.get(key)!r}, the checkpoint {ours.get(key)!r}"
            )
    if labelled and theirs.get("num_classes") != ours.get("num_classes"):
        raise CommandError(
            f"--reference-checkpoint {reference_path} must be conditional on the same "
            f"{ours.get('num_classes')} classes as the checkpoint, since the samples are drawn "
            "with a label; it was trained with "
            f"{theirs.get('num_classes') or 'no'} classes"
        )


def guided_model(
    model: nn.Module,
    args: argparse.Namespace,
    config: dict[str, Any],
    reference_model: nn.Module | None = None,
) -> nn.Module:
    """The network ``model`` as the sampler should call it: unchanged without guidance, else
    wrapped in :class:`Guided` with the reference and the interval and rescaling of the options.

    ``model`` and ``reference_model`` (the reference checkpoint's network) are the rebuilt
    networks, whose outputs are guided as they are: the noise, x0 or v of a noise model, a
    flow's velocity, an EDM denoiser's clean image. Each is affine in the noise estimate at a
    given ``x_t`` and ``t``, so guiding it is guiding the noise."""
    if args.guidance == 0:
        return model
    interval = None if args.guidance_interval is None else guidance_interval(args, config)
    reference_label = args.negative_label
    if reference_label is None and reference_model is None:
        reference_label = model.null_label
    return Guided(
        model,
        args.guidance,
        reference_model=reference_model,
        reference_label=reference_label,
        interval=interval,
        rescale=args.guidance_rescale,
    )


def sampling_labels(
    args: argparse.Namespace, network: nn.Module, count: int, device: torch.device | str = "cpu"
) -> Tensor | None:
    """The labels (count,) the samples are drawn with: --label for all of them, the classes
    0, 1, ..., K - 1, 0, ... for ``--label all``, the null label when only --negative-label is
    given (drawn without a class, away from one); ``None`` without a label."""
    if args.label == ALL_LABELS:
        return torch.arange(count, device=device) % network.null_label
    label = args.label
    if label is None and args.negative_label is not None:
        label = network.null_label
    if label is None:
        return None
    return torch.full((count,), label, dtype=torch.long, device=device)


def describe_guidance(args: argparse.Namespace) -> str:
    """The label and guidance of a run in words, as evaluate prints them; empty without either:
    ``"label 3, guidance 2 (away from 5, interval 0..499, rescale 0.7)"``."""
    parts = [] if args.label is None else [f"label {args.label}"]
    if args.guidance > 0:
        shaping = []
        if args.negative_label is not None:
            shaping.append(f"away from {args.negative_label}")
        if args.reference_checkpoint is not None:
            shaping.append(f"autoguidance by {args.reference_checkpoint}")
        if args.guidance_interval is not None:
            first, last = args.guidance_interval
            shaping.append(f"interval {first:g}..{last:g}")
        if args.guidance_rescale:
            shaping.append(f"rescale {args.guidance_rescale:g}")
        details = f" ({', '.join(shaping)})" if shaping else ""
        parts.append(f"guidance {args.guidance:g}{details}")
    return ", ".join(parts)


def guidance_record(args: argparse.Namespace) -> dict[str, Any]:
    """The label and guidance settings of a run, for evaluate's JSON."""
    reference = args.reference_checkpoint
    return {
        "label": args.label,
        "guidance": args.guidance,
        "negative_label": args.negative_label,
        "guidance_interval": args.guidance_interval,
        "guidance_rescale": args.guidance_rescale,
        "reference_checkpoint": None if reference is None else str(reference),
    }
