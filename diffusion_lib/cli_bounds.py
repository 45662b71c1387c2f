"""The likelihood bounds that ``evaluate`` reports with --bound-images M, on the first M test
images: the variational bound of a noise or hybrid model in bits/dim (Ho et al. 2020, eq. 5),
with --ode-steps N also the bound through the probability-flow ODE, and for a masked checkpoint
the order-agnostic bound of masked diffusion on the test images quantised to its K grey levels,
in nats per image and in bits/dim. Here too are the checks that a checkpoint has the bound asked
for, and the lines that report it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diffusion_lib.cli_sample import SamplingPlan, as_noise_sampler_reads_it
from diffusion_lib.command_line import MASKED_BOUND_DRAWS, SCHEDULE_OBJECTIVES, CommandError
from diffusion_lib.data import load_images
from diffusion_lib.likelihood import ode_bits_per_dim
from diffusion_lib.losses import elbo_bits_per_dim
from diffusion_lib.masked_diffusion import (
    MaskedDiffusion,
    masked_nll_bound,
    tokens_from_images,
)
from diffusion_lib.smoke import cap_samples

# The objectives that --bound-images applies to
BOUND_OBJECTIVES = (*SCHEDULE_OBJECTIVES, "masked")
# Test images per batch of the bound: T network calls each, without gradients.
BOUND_BATCH_SIZE = 256


def _check_ode_bound_fits(config: dict[str, Any], ode_steps: int) -> None:
    """--ode-steps needs a Gaussian schedule whose last step keeps some signal, and at most T
    steps."""
    if ode_steps == 0:
        return
    schedule = config.get("schedule", {})
    if config.get("objective", "noise") == "masked":
        raise CommandError(
            "--ode-steps needs a Gaussian noise schedule; a masked checkpoint has no "
            "probability-flow ODE"
        )
    if schedule.get("zero_terminal_snr", False):
        raise CommandError(
            "--ode-steps cannot bound a zero-terminal-SNR checkpoint: its last step has "
            "alpha_bar = 0, where the ODE's variable x / sqrt(alpha_bar) is infinite"
        )
    if ode_steps > schedule["timesteps"]:
        raise CommandError(
            f"--ode-steps must be at most the schedule's T = {schedule['timesteps']}, "
            f"got {ode_steps}"
        )


def check_bound_fits(config: dict[str, Any], bound_images: int, ode_steps: int) -> None:
    """--bound-images needs a model with a noise schedule, trained on data in [-1, 1], or a
    masked model."""
    if bound_images == 0:
        return
    objective = config.get("objective", "noise")
    if objective not in BOUND_OBJECTIVES:
        allowed = ", ".join(f"--objective {name}" for name in BOUND_OBJECTIVES[:-1])
        raise CommandError(
            f"--bound-images needs a checkpoint trained with {allowed} or --objective "
            f"{BOUND_OBJECTIVES[-1]}, whose noise schedule or masking process defines the "
            f"variational bound; this one was trained with --objective {objective}"
        )
    _check_ode_bound_fits(config, ode_steps)
    if [float(value) for value in config["value_range"]] != [-1.0, 1.0]:
        raise CommandError(
            "--bound-images needs a checkpoint trained on images in [-1, 1], where the bound's "
            "decoder scores 8-bit pixels; this one was trained with --value-range "
            f"{' '.join(str(value) for value in config['value_range'])}"
        )


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


def _ode_bound(plan: SamplingPlan, num_images: int, steps: int, seed: int) -> dict[str, Any]:
    """:func:`~diffusion_lib.likelihood.ode_bits_per_dim` averaged over the first
    ``cap_samples(num_images)`` test images: Heun's method on ``steps`` timesteps (``steps - 1``
    Heun steps, ``2 steps - 2`` network calls), Hutchinson's divergence.

    The model is the noise predictor the deterministic samplers call (a hybrid model's noise
    channels; x0 and v models through the noise they imply); a conditional model is called
    without labels. A CPU generator seeded with ``seed`` draws the dequantisation offsets and the
    probes, running on through batches of BOUND_BATCH_SIZE.
    """
    model, _ = as_noise_sampler_reads_it(plan.network, plan.schedule, plan.config, "ddim")
    x0, _ = load_images(plan.config["dataset"], train=False, limit=cap_samples(num_images))
    generator = torch.Generator().manual_seed(seed)
    bits = [
        ode_bits_per_dim(model, plan.schedule, batch.to(plan.device), steps=steps,
                         generator=generator).cpu()
        for batch in x0.split(BOUND_BATCH_SIZE)
    ]  # fmt: skip
    return {"bits_per_dim": float(torch.cat(bits).mean()), "images": len(x0), "steps": steps,
            "divergence": "hutchinson"}  # fmt: skip


def _masked_bound(plan: SamplingPlan, num_images: int, seed: int) -> dict[str, Any]:
    """The order-agnostic bound on -log p(x_0) of a masked model (:func:`masked_nll_bound`),
    averaged over the first ``cap_samples(num_images)`` test images quantised to its K levels:
    in nats per image, and in bits per dimension, nats / (D ln 2) for D pixels.

    Each image's bound is the mean of MASKED_BOUND_DRAWS unbiased draws (the masked pixels are
    random). A CPU generator seeded with ``seed`` runs on through the draws, each a pass over
    the images in batches of BOUND_BATCH_SIZE.
    """
    process = plan.schedule
    images, _ = load_images(plan.config["dataset"], train=False, limit=cap_samples(num_images))
    x0 = tokens_from_images(images, process.num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        draws = torch.stack([
            torch.cat([
                masked_nll_bound(plan.network, process, batch.to(plan.device), generator=generator)
                for batch in x0.split(BOUND_BATCH_SIZE)
            ])
            for _ in range(MASKED_BOUND_DRAWS)
        ])  # fmt: skip
    nats = float(draws.mean(dim=0).mean())
    return {
        "bits_per_dim": nats / (x0[0].numel() * math.log(2)),
        "nats_per_image": nats,
        "images": len(x0),
        "classes": process.num_classes,
        "draws": MASKED_BOUND_DRAWS,
    }


def likelihood_bound(
    plan: SamplingPlan, bound_images: int, ode_steps: int, seed: int
) -> dict[str, Any] | None:
    """The bound on the first ``bound_images`` test images (None for 0): the masked bound of a
    masked checkpoint, otherwise the variational bound, with the probability-flow ODE's bound
    under ``"ode"`` when ``ode_steps`` is not 0."""
    masked = isinstance(plan.schedule, MaskedDiffusion)
    bound = None
    if bound_images:
        bound_of = _masked_bound if masked else _variational_bound
        bound = bound_of(plan, bound_images, seed)
    if ode_steps:
        bound["ode"] = _ode_bound(plan, bound_images, ode_steps, seed)
    return bound


def bound_lines(bound: dict[str, Any], masked: bool) -> str:
    """The lines that report ``bound``, a :func:`likelihood_bound` of a masked checkpoint or
    not."""
    if masked:
        lines = [
            f"variational bound: {bound['bits_per_dim']:.4f} bits/dim, "
            f"{bound['nats_per_image']:.2f} nats per image, on {bound['images']} test images "
            f"at {bound['classes']} grey levels (each the mean of {bound['draws']} draws)"
        ]
    else:
        lines = [
            f"variational bound: {bound['bits_per_dim']:.4f} bits/dim on {bound['images']} "
            f"test images ({bound['variance']} variance)"
        ]
    if "ode" in bound:
        ode = bound["ode"]
        lines.append(
            f"probability-flow ODE bound: {ode['bits_per_dim']:.4f} bits/dim on {ode['images']} "
            f"test images ({ode['steps']} timesteps, Hutchinson's divergence, dequantised)"
        )
    return "\n".join(lines)
