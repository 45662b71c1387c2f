"""The ``sample`` command, and the checkpoint side that ``evaluate`` and ``distill`` share with
it: read a checkpoint written by ``train``, rebuild its model and schedule, check the sampling
options against it (:class:`SamplingPlan`) and draw samples with a sampler of its objective.
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
from diffusion_lib.command_line import (
    DEFAULT_SAMPLERS,
    IMAGE_CHANNELS,
    IMAGE_SIZE,
    SAMPLERS,
    SCHEDULE_OBJECTIVES,
    CommandError,
)
from diffusion_lib.data import CLASS_NAMES, to_unit_interval
from diffusion_lib.devices import select_device
from diffusion_lib.edm import PreconditionedDenoiser, edm_sample
from diffusion_lib.flow_matching import RectifiedFlow, flow_sample
from diffusion_lib.learned_variance import NoiseOnly
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
        raise CommandError(
            f"--sampler {sampler} does not fit this checkpoint, trained with --objective "
            f"{objective}; choose {', '.join(allowed[:-1])} or {allowed[-1]}"
        )
    return sampler


def _check_sampling_args(args: argparse.Namespace, config: dict[str, Any], sampler: str) -> int:
    """Validate the sampling options against the checkpoint; return the number of steps."""
    objective = config.get("objective", "noise")
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
    if args.eta < 0:
        raise CommandError(f"--eta must be >= 0, got {args.eta}")
    if args.eta > 0 and sampler != "ddim":
        raise CommandError("--eta applies to --sampler ddim only")
    if args.guidance < 0:
        raise CommandError(f"--guidance must be >= 0 (0 means no guidance), got {args.guidance}")
    num_classes = config["model"]["kwargs"].get("num_classes")
    if args.label is None:
        if args.guidance > 0:
            raise CommandError("--guidance needs --label: guidance steers towards a class")
        return steps
    if not num_classes:
        raise CommandError(
            "--label needs a conditional checkpoint (trained with --conditional); this one is unconditional"
        )
    if not 0 <= args.label < num_classes:
        names = CLASS_NAMES.get(config.get("dataset"), [str(k) for k in range(num_classes)])
        choices = ", ".join(f"{k} ({name})" for k, name in enumerate(names))
        raise CommandError(f"--label must be one of {choices}; got {args.label}")
    return steps


def rebuild(
    path: Path, state: dict[str, Any], device: torch.device
) -> tuple[nn.Module, NoiseSchedule]:
    """The model (with the EMA weights, in eval mode) and the schedule described by the checkpoint."""
    config = state["config"]
    model = build_model(config["model"]["name"], **config["model"]["kwargs"])
    if config.get("objective") == "edm":
        model = PreconditionedDenoiser(model, config["sigma_data"])
    check_state_dict_fits(path, state["ema"], model)
    model.load_state_dict(state["ema"])
    schedule = NoiseSchedule.from_name(config["schedule"]["name"], config["schedule"]["timesteps"])
    return model.to(device).eval(), schedule


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
        schedule: the training schedule (what noise and hybrid models are sampled on).
        sampler: one of ``SAMPLERS[objective]``.
        steps: the denoising steps, after smoke mode's cap.
        device: where the model runs.
    """

    path: Path
    config: dict[str, Any]
    network: nn.Module
    schedule: NoiseSchedule
    sampler: str
    steps: int
    device: torch.device


def plan_sampling(args: argparse.Namespace) -> SamplingPlan:
    """Read --checkpoint, check the sampling options against it and rebuild its model."""
    path, state = read_checkpoint(args.checkpoint)
    config = state["config"]
    sampler = _sampler(args, config)
    steps = _check_sampling_args(args, config, sampler)
    device = select_device(args.device)
    network, schedule = rebuild(path, state, device)
    return SamplingPlan(path, config, network, schedule, sampler, cap_sampling_steps(steps), device)


def draw_samples(plan: SamplingPlan, args: argparse.Namespace) -> tuple[torch.Tensor, str | None]:
    """``cap_samples(args.num)`` samples (N, C, H, W), float32 on the CPU in the checkpoint's
    value range, and the ddpm variance they were drawn with (``None``: the sampler's default).

    --label and --guidance steer a conditional model (classifier-free guidance), --eta sets
    ddim's noise. The noise comes from a CPU generator seeded with --seed, so a seed gives the
    same images on every device.
    """
    config, device = plan.config, plan.device
    model, variance = as_noise_sampler_reads_it(plan.network, plan.schedule, config, plan.sampler)
    num = cap_samples(args.num)
    kwargs = config["model"]["kwargs"]
    size = kwargs.get("image_size", IMAGE_SIZE)
    shape = (num, kwargs.get("channels", IMAGE_CHANNELS), size, size)
    options: dict[str, Any] = {
        "steps": plan.steps,
        "generator": torch.Generator().manual_seed(args.seed),
        "device": device,
    }
    if args.label is not None:
        options["labels"] = torch.full((num,), args.label, dtype=torch.long, device=device)
        options.update(guidance=args.guidance, null_label=plan.network.null_label)
    if plan.sampler == "ddim":
        options["eta"] = args.eta
    if variance is not None:
        options["variance"] = variance
    if config.get("objective", "noise") == "flow":
        flow = RectifiedFlow(config["schedule"]["timesteps"])
        samples = flow_sample(model, flow, shape, solver=plan.sampler, **options)
    elif config.get("objective") == "edm":
        samples = edm_sample(model, shape, solver=plan.sampler, **options)
    else:
        samples = NOISE_SAMPLERS[plan.sampler](model, plan.schedule, shape, **options)
    return samples.float().cpu(), variance


def sampling_method(sampler: str, variance: str | None, steps: int) -> str:
    """How samples were drawn, in words: ``"ddpm, learned variance, 100 steps"``."""
    return ", ".join([sampler, *([f"{variance} variance"] if variance else []), f"{steps} steps"])


def run_sample(args: argparse.Namespace) -> None:
    """``sample``: rebuild model and schedule from the checkpoint and save a grid of samples."""
    plan = plan_sampling(args)
    samples, variance = draw_samples(plan, args)
    num = len(samples)
    pictures = to_unit_interval(samples, tuple(plan.config["value_range"]))
    grid = make_grid(pictures, nrow=math.ceil(math.sqrt(num)), padding=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, args.output)
    width, height = grid.shape[2], grid.shape[1]
    method = sampling_method(plan.sampler, variance, plan.steps)
    print(f"saved {num} samples ({method}) to {args.output} ({width}x{height})")
