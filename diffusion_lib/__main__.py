"""Command line: ``python -m diffusion_lib train ...`` trains a model, ``... sample ...`` draws from
it, ``... evaluate ...`` scores its samples (and its variational bound), and ``... distill ...``
halves the sampling steps of a flow model (progressive distillation).

A checkpoint written by ``train`` records the model's name and arguments, the schedule, the
dataset and its value range, so ``sample``, ``evaluate`` and ``distill`` rebuild everything from
the file alone.
The options and the help text are defined in :mod:`diffusion_lib.command_line`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from diffusion_lib.checkpoints import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_state_dict_fits,
    load_checkpoint,
)
from diffusion_lib.command_line import (
    COMPILE_CHOICES,
    DEFAULT_SAMPLERS,
    IMAGE_CHANNELS,
    IMAGE_SIZE,
    SAMPLERS,
    SCHEDULE_OBJECTIVES,
    build_parser,
)
from diffusion_lib.data import (
    CLASS_NAMES,
    DataNotFoundError,
    load_images,
    to_unit_interval,
)
from diffusion_lib.devices import select_device
from diffusion_lib.distillation import ProgressiveDistillation
from diffusion_lib.edm import EDMNoiseLevels, PreconditionedDenoiser, edm_loss, edm_sample
from diffusion_lib.flow_matching import RectifiedFlow, flow_sample
from diffusion_lib.learned_variance import NoiseOnly
from diffusion_lib.losses import diffusion_loss, elbo_bits_per_dim, hybrid_loss
from diffusion_lib.metrics import (
    CLASSIFIER_VERSION,
    SPLIT_SIZES,
    QualityScore,
    ReferenceClassifier,
    get_classifier,
    score_samples,
)
from diffusion_lib.models import MODELS, build_model, count_parameters
from diffusion_lib.predictions import NoiseFromPrediction
from diffusion_lib.sampling import ddim_sample, ddpm_sample
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_samples, cap_sampling_steps
from diffusion_lib.solvers import dpm_solver_sample, heun_sample
from diffusion_lib.training import train

NOISE_SAMPLERS = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpm-solver": dpm_solver_sample,
    "heun": heun_sample,
}
# The rows of evaluate's table: JSON key, then the label printed.
SCORE_ROWS = {"samples": "samples", "real_test_images": "real test images"}
# Test images per batch of the bound: T network calls each, without gradients.
BOUND_BATCH_SIZE = 256


class CommandError(Exception):
    """A problem with the command's inputs, reported as one line on stderr (exit status 1)."""


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "image_size": IMAGE_SIZE,
        "channels": IMAGE_CHANNELS,
        "timesteps": args.timesteps,
        **dict(args.model_arg),
    }
    if args.conditional:
        if "num_classes" not in inspect.signature(MODELS[args.model]).parameters:
            conditional = [
                name
                for name, cls in MODELS.items()
                if "num_classes" in inspect.signature(cls).parameters
            ]
            raise CommandError(
                f"--conditional needs a model that takes class labels; {args.model} does not "
                f"(choose one of {', '.join(conditional) or 'none'})"
            )
        kwargs["num_classes"] = len(CLASS_NAMES[args.dataset])
    return _with_output_channels(kwargs, args.objective)


def _with_output_channels(kwargs: dict[str, Any], objective: str) -> dict[str, Any]:
    """The model arguments with the output channels that --objective needs: 2C for hybrid (the
    noise, then the variance), else C, left to the model's default."""
    channels = kwargs["channels"]
    needed = 2 * channels if objective == "hybrid" else channels
    given = kwargs.get("out_channels", needed)
    if given != needed:
        hint = (
            "the noise, then the variance"
            if objective == "hybrid"
            else "one per image channel; --objective hybrid trains 2C, the noise and its variance"
        )
        raise CommandError(
            f"--objective {objective} needs out_channels={needed} ({hint}); leave out "
            f"--model-arg out_channels={given}"
        )
    if objective == "hybrid":
        kwargs["out_channels"] = needed
    return kwargs


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of :func:`train` that the optimisation and checkpoint options set."""
    return {
        "steps": args.steps,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "compile": COMPILE_CHOICES[args.compile],
        "time_limit": args.time_limit,
        "checkpoint_dir": args.output,
        "checkpoint_every": args.checkpoint_every,
        "resume": args.resume,
        "seed": args.seed,
        "progress": not args.no_progress,
    }


def _noise_loss(args: argparse.Namespace) -> Callable[..., torch.Tensor] | None:
    """The objective that --prediction and --snr-gamma ask for; ``None`` (the engine's default,
    L_simple on the noise) when they keep their defaults."""
    if args.prediction == "epsilon" and args.snr_gamma is None:
        return None
    if args.objective != "noise":
        raise CommandError(
            "--prediction and --snr-gamma apply to --objective noise only: a flow model always "
            "predicts the velocity of the straight path, with the plain flow-matching loss, an "
            "edm model its preconditioned target, with EDM's weight, and a hybrid model the "
            "noise and its variance, with L_hybrid"
        )
    if args.snr_gamma is not None and not 0 < args.snr_gamma < math.inf:
        raise CommandError(f"--snr-gamma must be a number > 0 (5 is typical), got {args.snr_gamma}")
    return functools.partial(diffusion_loss, prediction=args.prediction, snr_gamma=args.snr_gamma)


def _objective(
    args: argparse.Namespace, network: nn.Module, loss: Callable[..., torch.Tensor] | None
) -> tuple[nn.Module, Any, Callable[..., torch.Tensor] | None]:
    """The module the engine trains, the process it noises with, and the loss, for --objective."""
    if args.objective == "edm":
        if args.timesteps != 1000:
            raise CommandError(
                "--objective edm gives the network noise levels mapped onto the time range "
                "[0, 1000]; leave --timesteps at 1000"
            )
        denoiser = PreconditionedDenoiser(network, args.sigma_data)
        return denoiser, EDMNoiseLevels(sigma_data=args.sigma_data), edm_loss
    if args.objective == "flow":
        return network, RectifiedFlow(args.timesteps), loss
    schedule = NoiseSchedule.from_name(args.schedule, args.timesteps)
    return network, schedule, _hybrid_loss(args) if args.objective == "hybrid" else loss


def _hybrid_loss(args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """hybrid_loss, with --vlb-weight as its lambda when given."""
    if args.vlb_weight is None:
        return hybrid_loss
    if not 0 <= args.vlb_weight < math.inf:
        raise CommandError(
            f"--vlb-weight must be a number >= 0 (0.001 is typical), got {args.vlb_weight}"
        )
    return functools.partial(hybrid_loss, vlb_weight=args.vlb_weight)


def run_train(args: argparse.Namespace) -> None:
    """``train``: load the dataset, build model and schedule, train, report the checkpoint."""
    low, high = args.value_range
    if args.vlb_weight is not None and args.objective != "hybrid":
        raise CommandError("--vlb-weight applies to --objective hybrid only")
    loss = _noise_loss(args)
    kwargs = _model_kwargs(args)
    try:
        network = build_model(args.model, **kwargs)
    except TypeError as error:
        raise CommandError(f"bad --model-arg for {args.model}: {error}") from None
    model, process, loss = _objective(args, network, loss)
    images, labels = load_images(
        args.dataset, train=True, value_range=(low, high), limit=args.limit
    )
    config = {
        "model": {"name": args.model, "kwargs": kwargs},
        "schedule": {"name": args.schedule, "timesteps": args.timesteps},
        "dataset": args.dataset,
        "value_range": [low, high],
        "conditional": args.conditional,
        "objective": args.objective,
    }
    if args.objective == "edm":
        config["sigma_data"] = args.sigma_data
    elif args.objective == "hybrid":
        config["vlb_weight"] = 0.001 if args.vlb_weight is None else args.vlb_weight
    elif args.objective == "noise" and loss is not None:
        # Absent keys mean epsilon and plain MSE: a default run writes the config it always did.
        config.update(prediction=args.prediction, snr_gamma=args.snr_gamma)
    print(
        f"{args.model}: {count_parameters(network):,} trainable parameters; {len(images):,} images"
    )
    result = train(
        model,
        process,
        images,
        labels=labels if args.conditional else None,
        label_dropout=args.label_dropout if args.conditional else 0.0,
        device=args.device,
        loss=loss,
        **_engine_options(args),
        config=config,
    )
    final = result.history.loss[-1] if result.history.loss else float("nan")
    print(f"trained {result.steps} steps in {result.seconds:.1f} s, final loss {final:.4f}")
    print(f"checkpoint written to {result.checkpoint_path}")
    if args.time_limit is not None and result.seconds >= args.time_limit:
        print("stopped at the time limit; the same command continues from the checkpoint")


def _read_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
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


def _rebuild(
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


def _as_noise_sampler_reads_it(
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


def _plan_sampling(args: argparse.Namespace) -> SamplingPlan:
    """Read --checkpoint, check the sampling options against it and rebuild its model."""
    path, state = _read_checkpoint(args.checkpoint)
    config = state["config"]
    sampler = _sampler(args, config)
    steps = _check_sampling_args(args, config, sampler)
    device = select_device(args.device)
    network, schedule = _rebuild(path, state, device)
    return SamplingPlan(path, config, network, schedule, sampler, cap_sampling_steps(steps), device)


def _draw_samples(plan: SamplingPlan, args: argparse.Namespace) -> tuple[torch.Tensor, str | None]:
    """``cap_samples(args.num)`` samples (N, C, H, W), float32 on the CPU in the checkpoint's
    value range, and the ddpm variance they were drawn with (``None``: the sampler's default).

    --label and --guidance steer a conditional model (classifier-free guidance), --eta sets
    ddim's noise. The noise comes from a CPU generator seeded with --seed, so a seed gives the
    same images on every device.
    """
    config, device = plan.config, plan.device
    model, variance = _as_noise_sampler_reads_it(plan.network, plan.schedule, config, plan.sampler)
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


def _method(sampler: str, variance: str | None, steps: int) -> str:
    """How samples were drawn, in words: ``"ddpm, learned variance, 100 steps"``."""
    return ", ".join([sampler, *([f"{variance} variance"] if variance else []), f"{steps} steps"])


def run_sample(args: argparse.Namespace) -> None:
    """``sample``: rebuild model and schedule from the checkpoint and save a grid of samples."""
    plan = _plan_sampling(args)
    samples, variance = _draw_samples(plan, args)
    num = len(samples)
    pictures = to_unit_interval(samples, tuple(plan.config["value_range"]))
    grid = make_grid(pictures, nrow=math.ceil(math.sqrt(num)), padding=2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, args.output)
    width, height = grid.shape[2], grid.shape[1]
    method = _method(plan.sampler, variance, plan.steps)
    print(f"saved {num} samples ({method}) to {args.output} ({width}x{height})")


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
    model, variance = _as_noise_sampler_reads_it(plan.network, plan.schedule, plan.config, "ddpm")
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


def _write_json_atomically(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to a temporary file beside ``path``, then rename it to ``path``: a
    reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=2)
            file.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would hide the scores from others
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def run_evaluate(args: argparse.Namespace) -> None:
    """``evaluate``: score samples of a checkpoint beside as many real test images, and with
    --bound-images its variational bound."""
    _check_evaluation_args(args)
    plan = _plan_sampling(args)
    _check_bound_fits(plan.config, args.bound_images)
    classifier = get_classifier(plan.config["dataset"], device=plan.device)
    samples, variance = _draw_samples(plan, args)
    scores = _quality_scores(samples, plan, classifier)
    bound = _variational_bound(plan, args.bound_images, args.seed) if args.bound_images else None
    guided = "" if args.label is None else f", label {args.label}, guidance {args.guidance:g}"
    print(
        f"{plan.path}: {len(samples)} samples of {plan.config['dataset']} "
        f"({_method(plan.sampler, variance, plan.steps)}{guided}, seed {args.seed})"
    )
    print(_score_table(scores))
    if bound is not None:
        print(
            f"variational bound: {bound['bits_per_dim']:.4f} bits/dim on {bound['images']} "
            f"test images ({bound['variance']} variance)"
        )
    if args.json is not None:
        _write_json_atomically(args.json, _evaluation_record(args, plan, variance, scores, bound))
        print(f"scores written to {args.json}")


def _check_teacher(config: dict[str, Any], student_steps: int) -> None:
    """A flow checkpoint can teach any N; a student that samples in M steps can teach only M / 2."""
    if config.get("objective", "noise") != "flow":
        raise CommandError(
            "distill needs a checkpoint trained with --objective flow (a velocity model); "
            f"this one was trained with --objective {config.get('objective', 'noise')}"
        )
    if student_steps < 1:
        raise CommandError(f"--student-steps must be >= 1, got {student_steps}")
    teacher_steps = config.get("distilled_steps")
    if teacher_steps is not None and teacher_steps != 2 * student_steps:
        hint = (
            f"choose --student-steps {teacher_steps // 2}"
            if teacher_steps % 2 == 0
            else "its steps cannot be halved"
        )
        raise CommandError(
            f"the teacher is a student that samples in {teacher_steps} steps, so the next "
            f"round must halve that: {hint}"
        )


def run_distill(args: argparse.Namespace) -> None:
    """``distill``: one round of progressive distillation from a flow checkpoint."""
    path, state = _read_checkpoint(args.checkpoint)
    config = state["config"]
    _check_teacher(config, args.student_steps)
    device = select_device(args.device)
    teacher, _ = _rebuild(path, state, device)
    student = copy.deepcopy(teacher).train().requires_grad_()
    images, labels = load_images(
        config["dataset"], train=True, value_range=tuple(config["value_range"]), limit=args.limit
    )
    conditional = bool(config.get("conditional"))
    result = train(
        student,
        RectifiedFlow(config["schedule"]["timesteps"]),
        images,
        labels=labels if conditional else None,
        label_dropout=0.1 if conditional else 0.0,  # the student keeps its unconditional half
        loss=ProgressiveDistillation(teacher, args.student_steps),
        device=device,
        **_engine_options(args),
        config={**config, "distilled_steps": args.student_steps},
    )
    final = result.history.loss[-1] if result.history.loss else float("nan")
    print(
        f"distilled {result.steps} steps in {result.seconds:.1f} s, final loss {final:.3g}; "
        f"the student samples in {args.student_steps} steps"
    )
    print(f"checkpoint written to {result.checkpoint_path}")


COMMANDS = {
    "train": run_train,
    "sample": run_sample,
    "evaluate": run_evaluate,
    "distill": run_distill,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 failure, 2 usage error)."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (CommandError, CheckpointError, DataNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
