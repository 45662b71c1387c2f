"""The ``sample`` command, and the checkpoint side that ``evaluate`` and ``distill`` share with
it: read a checkpoint written by ``train``, rebuild its model and schedule, check the sampling
options against it (:class:`SamplingPlan`) and draw samples with a sampler of its objective.

A masked checkpoint (``train --objective masked``) holds a :class:`TokenDenoiser`; its plan
carries the masking process, with the schedule of --masking-schedule, and its samples are the
drawn tokens as images of its K grey levels.

``sample --nearest PATH`` also writes each sample's nearest training image, to see copies.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from diffusion_lib.checkpoints import CHECKPOINT_NAME, check_state_dict_fits, load_checkpoint
from diffusion_lib.cli_guidance import (
    check_guidance_args,
    check_reference_fits,
    guidance_options_given,
    guided_model,
    sampling_labels,
)
from diffusion_lib.command_line import (
    DEFAULT_MASKED_STEPS,
    DEFAULT_MASKING_SCHEDULE,
    DEFAULT_REVEAL_ORDER,
    DEFAULT_SAMPLERS,
    IMAGE_CHANNELS,
    IMAGE_SIZE,
    SAMPLERS,
    SCHEDULE_OBJECTIVES,
    CommandError,
    check_output_file,
)
from diffusion_lib.data import load_images, to_unit_interval
from diffusion_lib.devices import select_device
from diffusion_lib.edm import PreconditionedDenoiser, edm_sample
from diffusion_lib.feature_metrics import COPY_RATIO, nearest_neighbour_ratios
from diffusion_lib.flow_matching import RectifiedFlow, flow_sample
from diffusion_lib.learned_variance import NoiseOnly
from diffusion_lib.masked_diffusion import (
    MaskedDiffusion,
    TokenDenoiser,
    images_from_tokens,
    masked_sample,
    tokens_from_images,
)
from diffusion_lib.models import build_model
from diffusion_lib.predictions import NoiseFromPrediction
from diffusion_lib.sampling import ddim_sample, ddpm_sample
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_samples, cap_sampling_steps
from diffusion_lib.solvers import dpm_solver_sample, heun_sample

NOISE_SAMPLERS = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpm-solver": dpm_solver_sample,
    "heun": heun_sample,
}


def read_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint file at ``path`` (or in the folder ``path``, as ``train --output`` wrote it)
    and what it holds; a CommandError when there is none, or it has no config to rebuild from."""
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CommandError(
            f"no checkpoint at {path}; write one with: python -m diffusion_lib train ... --output DIR"
        )
    state = load_checkpoint(path)
    if not state.get("config"):
        raise CommandError(
            f"checkpoint {path} has no config (model and schedule), so it cannot be rebuilt here; "
            "load it in Python with diffusion_lib.training.load_checkpoint(path, model)"
        )
    return path, state


def _sampler(args: argparse.Namespace, config: dict[str, Any]) -> str:
    """The sampler asked for, or the checkpoint's default for its objective (DEFAULT_SAMPLERS)."""
    objective = config.get("objective", "noise")
    allowed = SAMPLERS[objective]
    sampler = args.sampler or DEFAULT_SAMPLERS[objective]
    if sampler not in allowed:
        choices = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise CommandError(
            f"--sampler {sampler} does not fit this checkpoint, trained with --objective "
            f"{objective}; choose {choices}"
        )
    return sampler


def _masked_options(args: argparse.Namespace, config: dict[str, Any]) -> tuple[str, str] | None:
    """The masking schedule and the reveal order for a masked checkpoint, and ``None`` for the
    others, which take neither --masking-schedule nor --order."""
    objective = config.get("objective", "noise")
    if objective != "masked":
        for option, value in (
            ("--masking-schedule", args.masking_schedule),
            ("--order", args.order),
        ):
            if value is not None:
                raise CommandError(
                    f"{option} applies to a masked checkpoint (trained with --objective masked) "
                    f"only; this one was trained with --objective {objective}"
                )
        return None
    return (
        args.masking_schedule or DEFAULT_MASKING_SCHEDULE,
        args.order or DEFAULT_REVEAL_ORDER,
    )


def _check_masked_sampling_args(args: argparse.Namespace) -> int:
    """Validate the sampling options for a masked checkpoint; return the number of steps. It is
    unconditional and draws no Gaussian noise, so --label, --eta and guidance do not apply."""
    steps = DEFAULT_MASKED_STEPS if args.steps is None else args.steps
    if steps < 1:
        raise CommandError(f"--steps must be >= 1, got {steps}")
    if args.num < 1:
        raise CommandError(f"--num must be >= 1, got {args.num}")
    given = [
        *(["--label"] if args.label is not None else []),
        *(["--guidance"] if args.guidance != 0 else []),
        *(["--eta"] if args.eta != 0 else []),
        *guidance_options_given(args),
    ]
    if given:
        raise CommandError(
            f"{given[0]} does not apply to a masked checkpoint, which is unconditional and "
            "adds no Gaussian noise; it takes --steps, --masking-schedule and --order"
        )
    return steps


def _check_sampling_args(args: argparse.Namespace, config: dict[str, Any], sampler: str) -> int:
    """Validate the sampling options against the checkpoint; return the number of steps."""
    objective = config.get("objective", "noise")
    if objective == "masked":
        return _check_masked_sampling_args(args)
    timesteps = config["schedule"]["timesteps"]
    default_steps = {"ddpm": timesteps}.get(
        sampler, 18 if objective == "edm" else min(50, timesteps)
    )
    # A distilled student samples with the steps it was trained for.
    steps = args.steps if args.steps is not None else config.get("distilled_steps", default_steps)
    if objective in ("flow", "edm") and steps < 1:
        raise CommandError(f"--steps must be >= 1, got {steps}")
    if objective in SCHEDULE_OBJECTIVES and not 1 <= steps <= timesteps:
        raise CommandError(
            f"--steps must lie in 1..{timesteps} (T of this checkpoint), got {steps}"
        )
    if args.num < 1:
        raise CommandError(f"--num must be >= 1, got {args.num}")
    if not 0 <= args.eta <= 1:
        raise CommandError(
            f"--eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's variance), got {args.eta}"
        )
    if args.eta > 0 and sampler != "ddim":
        raise CommandError("--eta applies to --sampler ddim only")
    if args.spacing is not None and sampler != "ddim":
        raise CommandError("--spacing applies to --sampler ddim only")
    zero_terminal_snr = config.get("schedule", {}).get("zero_terminal_snr", False)
    if zero_terminal_snr and args.spacing == "leading":
        raise CommandError(
            "--spacing leading never visits T - 1, the one step where this checkpoint's schedule "
            "(trained with --zero-terminal-snr) matches pure noise; use trailing or linspace"
        )
    check_guidance_args(args, config)
    return steps


def rebuild(
    path: Path, state: dict[str, Any], device: torch.device
) -> tuple[nn.Module, NoiseSchedule | MaskedDiffusion]:
    """The model (with the EMA weights, in eval mode) and the schedule described by the
    checkpoint: for a masked checkpoint, a :class:`TokenDenoiser` and its masking process, on
    the linear schedule (the one sampling uses is the caller's choice)."""
    config = state["config"]
    model = build_model(config["model"]["name"], **config["model"]["kwargs"])
    if config.get("objective") == "edm":
        model = PreconditionedDenoiser(model, config["sigma_data"])
    elif config.get("objective") == "masked":
        model = TokenDenoiser(model, config["classes"])
    check_state_dict_fits(path, state["ema"], model)
    model.load_state_dict(state["ema"])
    if config.get("objective") == "masked":
        return model.to(device).eval(), MaskedDiffusion(config["classes"])
    return model.to(device).eval(), schedule_of(config)


def schedule_of(config: dict[str, Any]) -> NoiseSchedule:
    """The noise schedule a checkpoint's config describes, with its shift and its rescaling to
    zero terminal SNR when it was trained with them."""
    described = config["schedule"]
    return NoiseSchedule.from_name(
        described["name"],
        described["timesteps"],
        snr_scale=described.get("snr_scale", 1.0),
        zero_terminal_snr=described.get("zero_terminal_snr", False),
    )


def as_noise_sampler_reads_it(
    network: nn.Module, schedule: NoiseSchedule, config: dict[str, Any], sampler: str
) -> tuple[nn.Module, str | None]:
    """The model a noise sampler calls, and the ddpm variance it asks for (``None``: the default).

    An x0 or v network goes through the noise it implies. A hybrid network's learned variance
    sets each ddpm step's variance; the other samplers read only its noise channels.
    """
    prediction = config.get("prediction", "epsilon")
    if prediction != "epsilon":
        return NoiseFromPrediction(network, schedule, prediction), None
    if config.get("objective") != "hybrid":
        return network, None
    if sampler == "ddpm":
        return network, "learned"
    return NoiseOnly(network), None


@dataclass
class SamplingPlan:
    """A checkpoint rebuilt for sampling, with the sampling options checked against it.

    Attributes:
        path: the checkpoint file.
        config: its config (model, schedule, dataset, value range, objective).
        network: the model with the EMA weights, in eval mode, on ``device``.
        schedule: the training schedule (what noise and hybrid models are sampled on); for a
            masked checkpoint, its masking process on the schedule of --masking-schedule.
        sampler: one of ``SAMPLERS[objective]``.
        steps: the denoising steps, after smoke mode's cap.
        device: where the model runs.
        order: for a masked checkpoint, the reveal order of --order; else ``None``.
        reference: the network of --reference-checkpoint (autoguidance), with its EMA weights
            in eval mode, and its config (which :func:`check_reference_fits` has matched with
            ``config``); else ``None``.
    """

    path: Path
    config: dict[str, Any]
    network: nn.Module
    schedule: NoiseSchedule | MaskedDiffusion
    sampler: str
    steps: int
    device: torch.device
    order: str | None = None
    reference: tuple[nn.Module, dict[str, Any]] | None = None


def plan_sampling(args: argparse.Namespace) -> SamplingPlan:
    """Read --checkpoint, check the sampling options against it and rebuild its model."""
    path, state = read_checkpoint(args.checkpoint)
    config = state["config"]
    sampler = _sampler(args, config)
    masked = _masked_options(args, config)
    steps = _check_sampling_args(args, config, sampler)
    device = select_device(args.device)
    network, schedule = rebuild(path, state, device)
    order = None
    if masked is not None:
        masking_schedule, order = masked
        schedule = MaskedDiffusion(config["classes"], masking_schedule)
    steps = cap_sampling_steps(steps)
    reference = None
    if args.reference_checkpoint is not None:
        reference = _rebuild_reference(args, config, device)
    return SamplingPlan(path, config, network, schedule, sampler, steps, device, order, reference)


def _rebuild_reference(
    args: argparse.Namespace, config: dict[str, Any], device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """The network of --reference-checkpoint and its config, checked to fit the checkpoint."""
    path, state = read_checkpoint(args.reference_checkpoint)
    labelled = args.label is not None or args.negative_label is not None
    check_reference_fits(path, state["config"], config, labelled)
    network, _ = rebuild(path, state, device)
    return network, state["config"]


def draw_samples(plan: SamplingPlan, args: argparse.Namespace) -> tuple[torch.Tensor, str | None]:
    """``cap_samples(args.num)`` samples (N, C, H, W), float32 on the CPU in the checkpoint's
    value range, and the ddpm variance they were drawn with (``None``: the sampler's default).

    --label draws a class (or the classes in turn); --guidance and the options that shape it
    wrap the model in :class:`~diffusion_lib.guidance.Guided`
    (:func:`~diffusion_lib.cli_guidance.guided_model`); --eta sets ddim's noise. The noise
    comes from a CPU generator seeded with --seed, so a seed gives the same images on every
    device. A masked checkpoint's samples are its drawn tokens as images
    in [-1, 1], each pixel one of its K grey levels (:func:`images_from_tokens`).
    """
    config, device = plan.config, plan.device
    num = cap_samples(args.num)
    kwargs = config["model"]["kwargs"]
    size = kwargs.get("image_size", IMAGE_SIZE)
    if isinstance(plan.schedule, MaskedDiffusion):
        generator = torch.Generator().manual_seed(args.seed)
        shape = (num, IMAGE_CHANNELS, size, size)
        tokens = masked_sample(
            plan.network, plan.schedule, shape, plan.steps, generator=generator, order=plan.order
        )
        return images_from_tokens(tokens, plan.schedule.num_classes).cpu(), None
    # Guidance combines the network's raw outputs, which every target turns into the noise (or
    # the velocity, or the clean image) affinely, so that an x0 or v network still reaches the
    # sampler as a NoiseFromPrediction and is read without dividing by sigma.
    reference = None if plan.reference is None else plan.reference[0]
    network = guided_model(plan.network, args, config, reference)
    model, variance = as_noise_sampler_reads_it(network, plan.schedule, config, plan.sampler)
    shape = (num, kwargs.get("channels", IMAGE_CHANNELS), size, size)
    options: dict[str, Any] = {
        "steps": plan.steps,
        "generator": torch.Generator().manual_seed(args.seed),
        "device": device,
    }
    labels = sampling_labels(args, plan.network, num, device)
    if labels is not None:
        options["labels"] = labels
    if plan.sampler == "ddim":
        options["eta"] = args.eta
        options["spacing"] = args.spacing or (
            "trailing" if plan.schedule.zero_terminal_snr else "leading"
        )
    if variance is not None:
        options["variance"] = variance
    if config.get("objective", "noise") == "flow":
        flow = RectifiedFlow(config["schedule"]["timesteps"])
        samples = flow_sample(model, flow, shape, solver=plan.sampler, **options)
    elif config.get("objective") == "edm":
        samples = edm_sample(model, shape, solver=plan.sampler, **options)
    else:
        # The x0 estimates are clipped to the range the checkpoint's images were trained in.
        clip_x0 = tuple(config.get("value_range", (-1.0, 1.0)))
        samples = NOISE_SAMPLERS[plan.sampler](
            model, plan.schedule, shape, clip_x0=clip_x0, **options
        )
    return samples.float().cpu(), variance


def sampling_method(plan: SamplingPlan, variance: str | None) -> str:
    """How samples were drawn, in words: ``"ddpm, learned variance, 100 steps"``, or for a
    masked checkpoint ``"masked, cosine schedule, random order, 100 steps"``."""
    details = [f"{variance} variance"] if variance else []
    if isinstance(plan.schedule, MaskedDiffusion):
        details = [f"{plan.schedule.schedule} schedule", f"{plan.order} order"]
    return ", ".join([plan.sampler, *details, f"{plan.steps} steps"])


def real_images(plan: SamplingPlan, count: int | None, train: bool) -> torch.Tensor:
    """The first ``count`` images of a split (all for ``None``) in [-1, 1]; for a masked
    checkpoint, rounded to the K grey levels that its samples have."""
    images, _ = load_images(plan.config["dataset"], train=train, limit=count)
    if isinstance(plan.schedule, MaskedDiffusion):
        classes = plan.schedule.num_classes
        images = images_from_tokens(tokens_from_images(images, classes), classes)
    return images


def training_images(plan: SamplingPlan, split: torch.Tensor | None = None) -> torch.Tensor:
    """The images the checkpoint was trained on, in [-1, 1]: the training split, or its first N
    when train had --limit N (recorded in the config). ``split``: the whole training split as
    :func:`real_images` returns it, sliced instead of read again."""
    limit = plan.config.get("limit")
    if split is None:
        return real_images(plan, limit, train=True)
    return split[:limit]


def _save_grid(pictures: torch.Tensor, path: Path) -> torch.Tensor:
    """Save pictures (N, C, H, W) in [0, 1] as one square-ish grid; returns the grid."""
    grid = make_grid(pictures, nrow=math.ceil(math.sqrt(len(pictures))), padding=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return grid


def _save_nearest(pictures: torch.Tensor, training: torch.Tensor, path: Path) -> None:
    """Save the nearest training image of each picture (in [0, 1]) at its place in the grid, and
    print how many pictures are copies (nearest over second-nearest distance below COPY_RATIO)."""
    references = to_unit_interval(training)
    ratios, nearest = nearest_neighbour_ratios(pictures.flatten(1), references.flatten(1))
    _save_grid(references[nearest], path)
    copies = int((ratios < COPY_RATIO).sum())
    print(
        f"saved the nearest of the {len(training)} training images to {path}: {copies} of "
        f"{len(pictures)} samples are copies (nearest over second-nearest distance below "
        f"{COPY_RATIO:.3g}, median {ratios.median():.3f})"
    )


def run_sample(args: argparse.Namespace) -> None:
    """``sample``: rebuild model and schedule from the checkpoint and save a grid of samples;
    with --nearest also the grid of their nearest training images."""
    check_output_file("--output", args.output, "samples.png", image=True)
    if args.nearest is not None:
        check_output_file("--nearest", args.nearest, "nearest.png", image=True)
        if args.nearest.resolve() == args.output.resolve():
            raise CommandError(
                f"--nearest and --output both name {args.output}; the nearest training images "
                "would replace the samples"
            )
    plan = plan_sampling(args)
    training = None
    if args.nearest is not None:
        training = training_images(plan)
        if len(training) < 2:
            raise CommandError(
                "--nearest needs a checkpoint trained on at least 2 images: a copy is told by "
                "its distance to the nearest training image over that to the second nearest"
            )
    samples, variance = draw_samples(plan, args)
    pictures = to_unit_interval(samples, tuple(plan.config["value_range"]))
    grid = _save_grid(pictures, args.output)
    width, height = grid.shape[2], grid.shape[1]
    method = sampling_method(plan, variance)
    print(f"saved {len(samples)} samples ({method}) to {args.output} ({width}x{height})")
    if training is not None:
        _save_nearest(pictures, training, args.nearest)
