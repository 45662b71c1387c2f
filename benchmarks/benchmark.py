"""Benchmark diffusion_lib's training engine and samplers on one GPU, against the alternatives.

Four sections, each optional (``--sections``):

* ``train``: training throughput (images/s) of FCUNet and AttentionUNet under the engine
  (eager and ``torch.compile``), under the plain loop a tutorial would write, and of diffusers
  and denoising-diffusion-pytorch at AttentionUNet's parameter count.
* ``quality``: every contender trains for the same wall-clock time (``--time-budgets``), then
  ``--samples`` samples are scored with :func:`diffusion_lib.metrics.score_samples`; real
  test images and uniform noise give the reference rows.
* ``sampling``: images/s and quality of DDPM with 1000 steps, DDIM with 10, 20, 50, 100 and
  DPM-Solver++(2M) with 10 and 20.
* ``mfu``: model FLOPs utilisation of the engine's training step.

Results go to a Markdown report (``--output``, default benchmarks/RESULTS.md) and a JSON file
beside it. Rows from earlier runs that this run did not repeat are kept, so the sections can be
run one at a time. ``--quick`` shrinks everything to check the script on a CPU in about a
minute; its report says so at the top and goes to a temporary folder unless ``--output`` is set.

    python benchmarks/benchmark.py --quick
    python benchmarks/benchmark.py --sections train,mfu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
from contenders import (
    MODEL_LABELS,
    TIMESTEPS,
    Contender,
    ContenderUnavailable,
    EngineContender,
    RunSettings,
    TrainedModel,
    TrainingData,
    all_contenders,
)
from torch import Tensor, nn
from torch.utils.data import Subset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

from diffusion_lib.checkpoints import write_atomically
from diffusion_lib.data import data_root, load_images
from diffusion_lib.devices import select_device, synchronize
from diffusion_lib.losses import diffusion_loss
from diffusion_lib.metrics import QualityScore, score_samples
from diffusion_lib.reference_classifier import ReferenceClassifier, get_classifier
from diffusion_lib.sampling import ddim_sample, ddpm_sample
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import smoke_mode
from diffusion_lib.solvers import dpm_solver_sample

SECTIONS = ("train", "quality", "sampling", "mfu")
BENCHMARK_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = BENCHMARK_DIR / "RESULTS.md"
QUICK_OUTPUT = Path(tempfile.gettempdir()) / "diffusion_lib_benchmark" / "RESULTS-quick.md"
DEFAULT_TIME_BUDGETS = (60.0, 180.0, 600.0)
DEFAULT_SAMPLES = 10_000
DDPM_STEPS = 1000
DDIM_STEPS = (10, 20, 50, 100)
DPM_SOLVER_STEPS = (10, 20)
SAMPLER_FUNCTIONS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpm": dpm_solver_sample}
QUALITY_CONTENDERS = (  # the engine as a user runs it: compiled where and when it pays
    "engine-fc-auto",
    "engine-fc-x0-auto",  # the same network with the clean image as its target (chapter 4)
    "engine-fc-x0-b1024-auto",  # and with a batch of 1024, which costs a GPU little more time
    "engine-fc-x0-sinln-b1024-auto",  # and with sinusoidal time features and LayerNorm
    "plain-fc",
    "engine-attention-auto",
    "plain-attention",
    "diffusers-bf16",
    "denoising-diffusion-pytorch-bf16",
)
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched
# in this order against torch.cuda.get_device_name.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
)
# "Decent digits", in the scores of diffusion_lib.metrics: a Fréchet distance in the range the
# metrics module reports for real test digits at 2,000 samples (about 8) rather than for noise
# (above 1,000), a classifier confident on most samples, and every digit drawn about equally
# often. The throughput and sampling ratios are the targets as stated.
DECENT_FRECHET = 20.0
DECENT_CONFIDENT_SHARE = 0.8
DECENT_CLASS_ENTROPY = 0.9
FC_SECONDS = 60.0
ENGINE_OVER_PLAIN = 5.0
DDIM_SCORE_TOLERANCE = 0.10
DDIM_SPEEDUP = 20.0
QUICK_BANNER = (
    "> **Quick functional run, not a measurement.** `--quick` shrinks every size (a few "
    "steps, tiny sample counts, tiny time budgets) so the script can be checked on a CPU in "
    "about a minute. None of the numbers below say anything about speed or quality."
)
SMOKE_BANNER = (
    "> **Smoke mode was on (DIFFUSION_LIB_SMOKE=1): the library capped steps, data and "
    "samples. Not a measurement.**"
)


# ---------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A sampler and its number of steps: ``"ddpm"`` (ancestral), ``"ddim"`` (eta = 0) or
    ``"dpm"`` (DPM-Solver++(2M), one network call per step)."""

    name: str
    steps: int

    @property
    def key(self) -> str:
        return f"{self.name}-{self.steps}"


# The quality section samples 10,000 images from each of 18 networks; 100 steps keep that to
# minutes (all 1000 would take most of an hour). They are ancestral steps of the respaced chain,
# not deterministic DDIM: for an FCUNet trained 3000 steps on a CPU, 500 samples scored a
# Frechet distance of 819 with DDPM-1000, 801 with the respaced 100-step chain and 1494 with
# DDIM-100, whose missing noise leaves the grain of a young model in place.
QUALITY_SAMPLER = SamplerSpec("ddpm", 100)


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Everything a run needs, after ``--quick`` has shrunk the sizes."""

    quick: bool
    sections: tuple[str, ...]
    time_budgets: tuple[float, ...]
    samples: int
    sample_batch: int
    output: Path
    settings: RunSettings
    contenders: tuple[str, ...] | None
    quality_sampler: SamplerSpec
    ddpm_steps: int
    ddim_steps: tuple[int, ...]
    dpm_solver_steps: tuple[int, ...]
    sampling_train_seconds: float
    dataset_limit: int | None
    fresh: bool

    @property
    def json_path(self) -> Path:
        return self.output.with_suffix(".json")


def _comma_list(convert: Callable[[str], object], choices: Sequence[str] | None = None):
    def parse(text: str) -> tuple:
        items = tuple(convert(part.strip()) for part in text.split(",") if part.strip())
        if not items:
            raise argparse.ArgumentTypeError("give at least one value")
        unknown = [item for item in items if choices is not None and item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(str, unknown))}; choose from {', '.join(choices)}"
            )
        return items

    return parse


def _positive_number(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_sampler(text: str) -> SamplerSpec:
    """``"ddpm"`` (1000 steps), ``"ddpm-N"`` (respaced to N), ``"ddim-N"`` or ``"dpm-N"``."""
    name, _, steps = text.strip().lower().partition("-")
    if name not in SAMPLER_FUNCTIONS or (name != "ddpm" and not steps):
        raise argparse.ArgumentTypeError(
            f"unknown sampler {text!r}; choose ddpm, ddpm-N, ddim-N or dpm-N"
        )
    if steps and (not steps.isdigit() or not 1 <= int(steps) <= TIMESTEPS):
        raise argparse.ArgumentTypeError(f"the steps of {text!r} must lie in 1..{TIMESTEPS}")
    return SamplerSpec(name, int(steps) if steps else DDPM_STEPS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a functional check")
    parser.add_argument(
        "--sections", type=_comma_list(str, SECTIONS), default=SECTIONS, help=",".join(SECTIONS)
    )
    parser.add_argument(
        "--time-budgets",
        type=_comma_list(_positive_number),
        default=None,
        help="seconds of training per contender in the quality section (default 60,180,600)",
    )
    parser.add_argument("--samples", type=int, default=None, help="samples scored (default 10000)")
    parser.add_argument("--sample-batch", type=int, default=None, help="images per sampler call")
    parser.add_argument("--output", type=Path, default=None, help="Markdown report to write")
    parser.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu")
    parser.add_argument("--contenders", type=_comma_list(str), default=None)
    parser.add_argument(
        "--quality-sampler",
        type=parse_sampler,
        default=None,
        help="ddpm, ddpm-N (respaced), ddim-N or dpm-N (default ddpm-100)",
    )
    parser.add_argument("--sampling-train-seconds", type=_positive_number, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--timed-steps", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=None, help="plain loop's loader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="drop rows of earlier runs")
    return parser


def _pick(value: object, quick: bool, quick_default: object, default: object) -> object:
    if value is not None:
        return value
    return quick_default if quick else default


def parse_args(argv: Sequence[str] | None = None) -> BenchmarkConfig:
    """The run's configuration from the command line (``sys.argv`` when ``argv`` is None)."""
    args = build_parser().parse_args(argv)
    quick = args.quick
    device = select_device(args.device)
    catalogue_keys = tuple(all_contenders())
    if args.contenders is not None:
        unknown = [key for key in args.contenders if key not in catalogue_keys]
        if unknown:
            raise SystemExit(
                f"unknown contenders {', '.join(unknown)}; choose from {', '.join(catalogue_keys)}"
            )
    settings = RunSettings(
        device=device,
        batch_size=8 if quick else 128,
        warmup_steps=_pick(args.warmup_steps, quick, 1, 30),
        timed_steps=_pick(args.timed_steps, quick, 2, 300),
        num_workers=_pick(args.num_workers, quick, 2, 4),
        seed=args.seed,
        # Compiling takes minutes on a CPU: a quick CPU run skips the compiled contenders.
        allow_compile=not (quick and device.type == "cpu"),
    )
    return BenchmarkConfig(
        quick=quick,
        sections=tuple(section for section in SECTIONS if section in args.sections),
        time_budgets=_pick(args.time_budgets, quick, (2.0,), DEFAULT_TIME_BUDGETS),
        samples=_pick(args.samples, quick, 16, DEFAULT_SAMPLES),
        sample_batch=_pick(args.sample_batch, quick, 16, 2000),
        output=_pick(args.output, quick, QUICK_OUTPUT, DEFAULT_OUTPUT),
        settings=settings,
        contenders=args.contenders,
        quality_sampler=_pick(args.quality_sampler, quick, SamplerSpec("ddim", 2), QUALITY_SAMPLER),
        ddpm_steps=10 if quick else DDPM_STEPS,
        ddim_steps=(2, 5) if quick else DDIM_STEPS,
        dpm_solver_steps=(2,) if quick else DPM_SOLVER_STEPS,
        sampling_train_seconds=_pick(args.sampling_train_seconds, quick, 2.0, 300.0),
        dataset_limit=512 if quick else None,
        fresh=args.fresh,
    )


# ---------------------------------------------------------------------------- measurements


def load_training_data(limit: int | None = None) -> TrainingData:
    """MNIST's training set as a device-ready tensor and as the plain loop's torchvision dataset.

    Both read the folder in ``DIFFUSION_LIB_DATA``; ``limit`` keeps the first images only.
    """
    images, _ = load_images("mnist", train=True, limit=limit)
    to_signed_range = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]
    )
    dataset = datasets.MNIST(
        str(data_root()), train=True, download=False, transform=to_signed_range
    )
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    return TrainingData(images=images, loader_dataset=dataset)


def count_flops(compute_loss: Callable[[], Tensor]) -> int:
    """FLOPs of ``compute_loss()`` and its backward pass, as ``FlopCounterMode`` counts them.

    The counter sees matrix products, convolutions and attention (2 FLOPs per multiply-add);
    elementwise work, normalisation and the optimiser are not counted, as is usual for MFU.
    """
    with FlopCounterMode(display=False) as counter:
        compute_loss().backward()
    return counter.get_total_flops()


def training_step_flops(model: nn.Module, batch_size: int, device: torch.device) -> int:
    """FLOPs of one forward and backward pass of the simplified loss on a (B, 1, 28, 28) batch."""
    model = model.to(device).train()
    schedule = NoiseSchedule.from_name("linear", TIMESTEPS).to(device)
    x0 = torch.zeros(batch_size, 1, 28, 28, device=device)
    flops = count_flops(lambda: diffusion_loss(model, schedule, x0))
    model.zero_grad(set_to_none=True)
    return flops


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU in TFLOP/s from :data:`PEAK_BF16_TFLOPS`, or None if unknown."""
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment.lower() in device_name.lower():
            return tflops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def generate(
    model: nn.Module,
    sampler: SamplerSpec,
    count: int,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> tuple[Tensor, float]:
    """``count`` samples (count, 1, 28, 28) on the CPU and the synchronised seconds they took.

    The network runs under bf16 autocast on CUDA, as it trained; the sampler's arithmetic on
    x_t stays float32.
    """
    schedule = NoiseSchedule.from_name("linear", TIMESTEPS)
    generator = torch.Generator(device=device).manual_seed(seed)
    on_cuda = device.type == "cuda"
    chunks = []
    synchronize(device)
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
        for start in range(0, count, batch_size):
            shape = (min(batch_size, count - start), 1, 28, 28)
            images = SAMPLER_FUNCTIONS[sampler.name](
                model, schedule, shape, generator=generator, steps=sampler.steps, device=device
            )
            chunks.append(images.float().cpu())
    synchronize(device)
    return torch.cat(chunks), time.perf_counter() - started


SCORE_FIELDS = ("frechet_distance", "confident_share", "class_entropy", "classes_present")


def score_fields(score: QualityScore) -> dict[str, object]:
    """The columns the report shows for one :class:`~diffusion_lib.metrics.QualityScore`."""
    return {
        "frechet_distance": score.frechet_distance,
        "confident_share": score.confident_share,
        "class_entropy": score.class_entropy,
        "classes_present": sum(1 for count in score.class_counts if count > 0),
        "score_status": "scored",
    }


class SampleScorer:
    """Scores (N, 1, 28, 28) images in [-1, 1] with :func:`diffusion_lib.metrics.score_samples`.

    The reference classifier is loaded from its cache (or trained, once) on first use and
    then reused. A failure becomes a ``score_status`` and empty scores, not an exception.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.classifier: ReferenceClassifier | None = None

    def __call__(self, images: Tensor) -> dict[str, object]:
        try:
            if self.classifier is None:
                self.classifier = get_classifier("mnist", device=self.device)
            score = score_samples(
                images, "mnist", value_range=(-1.0, 1.0), classifier=self.classifier
            )
        except Exception as error:  # a report with one failed score beats no report
            traceback.print_exc()
            reason = f"scoring failed ({type(error).__name__}: {error})"
            return {**dict.fromkeys(SCORE_FIELDS), "score_status": reason}
        return score_fields(score)


# ---------------------------------------------------------------------------- sections


def _attempt(row: dict, measure: Callable[[], dict]) -> dict:
    """``row`` updated with ``measure()``; a contender that cannot run becomes a status row."""
    try:
        row.update(measure())
        row["status"] = "measured"
    except ContenderUnavailable as reason:
        row["status"] = str(reason)
    except Exception as error:  # one broken contender must not lose the others' hour of work
        traceback.print_exc()
        row["status"] = f"failed ({type(error).__name__}: {error})"
    return row


def _measure_throughput(contender: Contender, data: TrainingData, settings: RunSettings) -> dict:
    return {
        "parameters": contender.parameter_count(),
        "images_per_second": contender.images_per_second(data, settings),
        "batch_size": contender.batch_size(settings),
    }


def run_train_section(
    contenders: Sequence[Contender],
    data: TrainingData,
    settings: RunSettings,
    record: Callable[[dict], None],
) -> list[dict]:
    """Training throughput of every contender; one row each, in the given order."""
    rows = []
    for contender in contenders:
        row = {"section": "train", "key": contender.key, **contender.describe()}
        rows.append(_attempt(row, partial(_measure_throughput, contender, data, settings)))
        record(row)
    return rows


def _measure_quality(
    contender: Contender,
    budget: float,
    data: TrainingData,
    config: BenchmarkConfig,
    score: Callable[[Tensor], dict],
    trained: list[TrainedModel],
) -> dict:
    """Train for ``budget`` seconds (the network is appended to ``trained``), sample, score."""
    settings = config.settings
    result = contender.train_for(budget, data, settings)
    trained.append(result)
    images, seconds = generate(
        result.noise_predictor,
        config.quality_sampler,
        config.samples,
        config.sample_batch,
        settings.device,
        settings.seed,
    )
    return {
        "seconds": result.seconds,
        "steps": result.steps,
        "sampler": config.quality_sampler.key,
        "samples": config.samples,
        "sampling_seconds": seconds,
        **score(images),
    }


def run_quality_section(
    contenders: Sequence[Contender],
    data: TrainingData,
    config: BenchmarkConfig,
    score: Callable[[Tensor], dict],
    record: Callable[[dict], None],
) -> TrainedModel | None:
    """Equal-time training and sample quality; returns the longest-trained engine AttentionUNet."""
    count = config.samples
    reference_rows = [
        # Training images: the scores' reference statistics are those of the test images, so
        # scoring the whole test set would compare it with itself (a distance of 0).
        ("reference-real", "MNIST training images", load_images("mnist", limit=count)[0]),
        ("reference-noise", "uniform noise in [-1, 1]", _uniform_noise(count, config)),
    ]
    for key, label, images in reference_rows:
        row = {"section": "quality", "key": key, "contender": label, "budget": None}
        row.update(samples=len(images), status="measured", **score(images))
        record(row)
    kept: TrainedModel | None = None
    kept_budget = -math.inf
    for budget in config.time_budgets:
        for contender in contenders:
            row = {"section": "quality", "key": f"{contender.key}@{budget:g}", "budget": budget}
            row.update(contender.describe(), contender_key=contender.key)
            trained: list[TrainedModel] = []
            record(
                _attempt(
                    row, partial(_measure_quality, contender, budget, data, config, score, trained)
                )
            )
            if trained and contender.key.startswith("engine-attention") and budget > kept_budget:
                kept, kept_budget = trained[0], budget
    return kept


def _uniform_noise(count: int, config: BenchmarkConfig) -> Tensor:
    generator = torch.Generator().manual_seed(config.settings.seed)
    return torch.rand(count, 1, 28, 28, generator=generator) * 2.0 - 1.0


def _measure_sampler(
    model: nn.Module,
    sampler: SamplerSpec,
    config: BenchmarkConfig,
    score: Callable[[Tensor], dict],
) -> dict:
    settings = config.settings
    images, seconds = generate(
        model, sampler, config.samples, config.sample_batch, settings.device, settings.seed
    )
    return {
        "samples": config.samples,
        "seconds": seconds,
        "images_per_second": config.samples / seconds,
        **score(images),
    }


def run_sampling_section(
    trained: TrainedModel | None,
    data: TrainingData,
    config: BenchmarkConfig,
    score: Callable[[Tensor], dict],
    record: Callable[[dict], None],
) -> None:
    """DDPM against DDIM and DPM-Solver++ at several step counts, from one engine-trained AttentionUNet.

    ``trained`` is the quality section's network when there is one; otherwise a network is
    trained here for ``sampling_train_seconds``.
    """
    settings = config.settings
    samplers = [SamplerSpec("ddpm", config.ddpm_steps)]
    samplers += [SamplerSpec("ddim", steps) for steps in config.ddim_steps]
    samplers += [SamplerSpec("dpm", steps) for steps in config.dpm_solver_steps]
    rows = [
        {"section": "sampling", "key": sampler.key, "sampler": sampler.name, "steps": sampler.steps}
        for sampler in samplers
    ]
    if trained is None:
        contender = EngineContender("attention_unet", compile="auto")
        try:
            trained = contender.train_for(config.sampling_train_seconds, data, settings)
        except Exception as error:  # still say in the report why the section is empty
            traceback.print_exc()
            reason = f"failed: no model to sample ({type(error).__name__}: {error})"
            for row in rows:
                record({**row, "status": reason})
            return
    model = trained.noise_predictor
    # One untimed call at the real batch size lets cuDNN pick its kernels first.
    warmup = SamplerSpec("ddim", 2)
    generate(model, warmup, config.sample_batch, config.sample_batch, settings.device, 0)
    for sampler, row in zip(samplers, rows, strict=True):
        row["model_training_seconds"] = trained.seconds
        record(_attempt(row, partial(_measure_sampler, model, sampler, config, score)))


def _measure_mfu(
    model_name: str, train_rows: Sequence[dict], data: TrainingData, config: BenchmarkConfig
) -> dict:
    """FLOPs per step, the engine's fastest measured throughput, and their ratio to the peak."""
    settings = config.settings
    contender = EngineContender(model_name, compile=settings.allow_compile)
    base_key = contender.key.removesuffix("-compiled")
    engine_keys = (base_key, f"{base_key}-compiled")
    measured = [
        (row["images_per_second"], row["key"])
        for row in train_rows
        if row["key"] in engine_keys and row.get("status") == "measured"
    ]
    if measured:
        images_per_second, source = max(measured)
    else:
        images_per_second, source = contender.images_per_second(data, settings), contender.key
    flops = training_step_flops(contender.build(), settings.batch_size, settings.device)
    achieved = flops * images_per_second / settings.batch_size / 1e12
    name = device_name(settings.device)
    peak = peak_bf16_tflops(name) if settings.device.type == "cuda" else None
    return {
        "flops_per_step": flops,
        "images_per_second": images_per_second,
        "throughput_from": source,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
    }


def run_mfu_section(
    train_rows: Sequence[dict],
    data: TrainingData,
    config: BenchmarkConfig,
    record: Callable[[dict], None],
) -> None:
    """Model FLOPs utilisation of the engine's step for both models.

    The throughput is this run's fastest engine row of the train section, or measured here
    when that section did not run.
    """
    for model_name, label in MODEL_LABELS.items():
        row = {"section": "mfu", "key": model_name, "model": label}
        row["batch_size"] = config.settings.batch_size
        record(_attempt(row, partial(_measure_mfu, model_name, train_rows, data, config)))


# ---------------------------------------------------------------------------- targets


def _best(rows: Sequence[dict], section: str, keys: Sequence[str], field: str) -> dict | None:
    candidates = [
        row
        for row in rows
        if row["section"] == section
        and row["key"] in keys
        and row.get("status") == "measured"
        and row.get(field) is not None
    ]
    return max(candidates, key=lambda row: row[field]) if candidates else None


def decent_digits(row: dict) -> list[tuple[str, float, float, bool]]:
    """(score, value, requirement, passed) for each condition of "decent digits"."""
    checks = [
        ("Fréchet distance", row["frechet_distance"], DECENT_FRECHET, lambda v, r: v <= r),
        ("confident share", row["confident_share"], DECENT_CONFIDENT_SHARE, lambda v, r: v >= r),
        ("class entropy", row["class_entropy"], DECENT_CLASS_ENTROPY, lambda v, r: v >= r),
        ("classes present", row["classes_present"], 10, lambda v, r: v >= r),
    ]
    return [(name, value, needed, passes(value, needed)) for name, value, needed, passes in checks]


def _fc_target(rows: Sequence[dict]) -> tuple[str, str]:
    candidates = [
        row
        for row in rows
        if row["section"] == "quality"
        and str(row.get("contender_key", "")).startswith("engine-fc")
        and row.get("status") == "measured"
        and all(row.get(field) is not None for field in SCORE_FIELDS)
        and row["budget"] <= FC_SECONDS
    ]
    if not candidates:
        return "not measured", "needs scored quality rows of engine-fc* with a budget <= 60 s"
    row = min(candidates, key=lambda row: row["frechet_distance"])
    conditions = decent_digits(row)
    met = all(passed for *_, passed in conditions) and row["seconds"] <= FC_SECONDS
    details = [f"{row['key']}: {row['seconds']:.1f} s (limit {FC_SECONDS:.0f} s)"]
    details += [
        f"{name} {value:.3g} ({'<=' if name == 'Fréchet distance' else '>='} {needed:g}, "
        f"{'met' if passed else 'missed'} by {abs(value - needed):.3g})"
        for name, value, needed, passed in conditions
    ]
    return ("met" if met else "missed"), "; ".join(details)


def _plain_loop_target(rows: Sequence[dict], short: str, label: str) -> tuple[str, str]:
    engine = _best(
        rows, "train", (f"engine-{short}", f"engine-{short}-compiled"), "images_per_second"
    )
    plain = _best(rows, "train", (f"plain-{short}",), "images_per_second")
    if engine is None or plain is None:
        return "not measured", f"needs train rows engine-{short}* and plain-{short}"
    ratio = engine["images_per_second"] / plain["images_per_second"]
    return ("met" if ratio >= ENGINE_OVER_PLAIN else "missed"), (
        f"{label}: {engine['key']} {ratio:.1f}x the plain loop (target {ENGINE_OVER_PLAIN:.0f}x, "
        f"{ratio - ENGINE_OVER_PLAIN:+.1f}x)"
    )


def _library_target(rows: Sequence[dict]) -> tuple[str, str]:
    keys = ("engine-attention", "engine-attention-compiled")
    engine = _best(rows, "train", keys, "images_per_second")
    libraries = {
        "diffusers": ("diffusers-fp32", "diffusers-bf16"),
        "denoising-diffusion-pytorch": (
            "denoising-diffusion-pytorch-fp32",
            "denoising-diffusion-pytorch-bf16",
        ),
    }
    fastest = {
        name: _best(rows, "train", variants, "images_per_second")
        for name, variants in libraries.items()
    }
    missing = [name for name, row in fastest.items() if row is None]
    if engine is None or missing:
        return (
            "not measured",
            f"needs measured train rows for the engine and {', '.join(missing) or 'both libraries'}",
        )
    ratios = {
        row["key"]: engine["images_per_second"] / row["images_per_second"]
        for row in fastest.values()
    }
    met = all(ratio > 1.0 for ratio in ratios.values())
    detail = "; ".join(f"{ratio:.2f}x {key} ({ratio - 1:+.0%})" for key, ratio in ratios.items())
    return ("met" if met else "missed"), f"{engine['key']}: {detail}"


def _ddim_target(rows: Sequence[dict]) -> tuple[str, str]:
    ddpm = _best(rows, "sampling", (f"ddpm-{DDPM_STEPS}",), "images_per_second")
    ddim = _best(rows, "sampling", ("ddim-50",), "images_per_second")
    if ddpm is None or ddim is None:
        return "not measured", f"needs sampling rows ddpm-{DDPM_STEPS} and ddim-50"
    speedup = ddim["images_per_second"] / ddpm["images_per_second"]
    if ddpm.get("frechet_distance") is None or ddim.get("frechet_distance") is None:
        return "not measured", f"speed-up {speedup:.1f}x, but no Fréchet distances were scored"
    ratio = ddim["frechet_distance"] / ddpm["frechet_distance"]
    met = ratio <= 1.0 + DDIM_SCORE_TOLERANCE and speedup >= DDIM_SPEEDUP
    return ("met" if met else "missed"), (
        f"Fréchet distance {ratio - 1:+.1%} relative to DDPM-{DDPM_STEPS} (allowed "
        f"+{DDIM_SCORE_TOLERANCE:.0%}); speed-up {speedup:.1f}x (target {DDIM_SPEEDUP:.0f}x, "
        f"{speedup - DDIM_SPEEDUP:+.1f}x)"
    )


def evaluate_targets(rows: Sequence[dict]) -> list[tuple[str, str, str]]:
    """(target, "met" / "missed" / "not measured", how much) for each stated target."""
    checks = [
        ("FC U-net: decent MNIST digits in under 60 s of H100 time", _fc_target(rows)),
        ("Engine >= 5x the plain loop (FCUNet)", _plain_loop_target(rows, "fc", "FCUNet")),
        (
            "Engine >= 5x the plain loop (AttentionUNet)",
            _plain_loop_target(rows, "attention", "AttentionUNet"),
        ),
        ("Engine ahead of both libraries at equal parameter count", _library_target(rows)),
        ("DDIM-50 within 10% of DDPM-1000's score at 20x the speed", _ddim_target(rows)),
    ]
    return [(target, status, detail) for target, (status, detail) in checks]


# ---------------------------------------------------------------------------- report


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_record(config: BenchmarkConfig, argv: Sequence[str]) -> dict:
    """Who, where and how: command line, date, device, peak, package versions."""
    device = config.settings.device
    name = device_name(device)
    cuda = torch.version.cuda if device.type == "cuda" else None
    return {
        "command": shlex.join(["python", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_name": name,
        "peak_bf16_tflops": peak_bf16_tflops(name) if device.type == "cuda" else None,
        "quick": config.quick,
        "smoke_mode": smoke_mode(),
        "sections": list(config.sections),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "CUDA": cuda or "none",
            "cuDNN": str(torch.backends.cudnn.version()) if cuda else "none",
            "torchvision": _version("torchvision"),
            "diffusion_lib": _version("diffusion_lib"),
            "diffusers": _version("diffusers"),
            "denoising-diffusion-pytorch": _version("denoising-diffusion-pytorch"),
        },
    }


def _number(value: object, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _speed(value: float | None) -> str:
    """Images per second: whole numbers where they are large, three digits where small."""
    return _number(value, ",.0f" if value is not None and value >= 100 else ".3g")


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _status(row: dict) -> str:
    return "" if row.get("status") == "measured" else str(row.get("status", ""))


def _scored_status(row: dict) -> str:
    """The run's status, else the scoring's status; empty when both went as planned."""
    return _status(row) or ("" if row.get("score_status") == "scored" else row.get("score_status"))


def _train_table(rows: Sequence[dict]) -> str:
    plain = {
        row.get("model"): row.get("images_per_second")
        for row in rows
        if row["key"].startswith("plain-") and row.get("status") == "measured"
    }
    body = []
    for row in rows:
        speed = row.get("images_per_second")
        # Library networks are sized to AttentionUNet, so that loop is their baseline.
        baseline = plain.get(row.get("model"), plain.get("AttentionUNet"))
        versus = f"{speed / baseline:.1f}x" if speed and baseline else "–"
        body.append(
            [
                f"`{row['key']}`",
                row.get("contender", ""),
                row.get("model", ""),
                _number(row.get("parameters")),
                row.get("precision", ""),
                row.get("data_path", ""),
                _number(row.get("batch_size")),
                _speed(speed),
                versus,
                row["run"],
                _status(row),
            ]
        )
    headers = ["key", "contender", "model", "parameters", "precision", "data", "batch", "images/s"]
    return _table([*headers, "vs plain loop", "run", "status"], body)


def _quality_table(rows: Sequence[dict]) -> str:
    ordered = sorted(rows, key=lambda row: (row.get("budget") or 0.0, row["key"]))
    body = [
        [
            _number(row.get("budget"), "g"),
            f"`{row['key']}`",
            row.get("contender", ""),
            _number(row.get("seconds"), ".1f"),
            _number(row.get("steps")),
            row.get("sampler", "–"),
            _number(row.get("samples")),
            _number(row.get("frechet_distance"), ".3g"),
            _number(row.get("confident_share"), ".3f"),
            _number(row.get("class_entropy"), ".3f"),
            _number(row.get("classes_present")),
            row["run"],
            _scored_status(row),
        ]
        for row in ordered
    ]
    headers = ["budget (s)", "key", "contender", "seconds used", "steps", "sampler", "samples"]
    extra = ["Fréchet distance", "confident share", "class entropy", "classes", "run", "status"]
    return _table(headers + extra, body)


def _sampling_table(rows: Sequence[dict]) -> str:
    ddpm = next((r for r in rows if r["sampler"] == "ddpm" and r.get("images_per_second")), None)
    body = []
    names = {"ddpm": "DDPM", "ddim": "DDIM", "dpm": "DPM-Solver++(2M)"}
    for row in sorted(
        rows, key=lambda row: (row["sampler"] != "ddpm", row["sampler"], row["steps"])
    ):
        speed, distance = row.get("images_per_second"), row.get("frechet_distance")
        speedup = f"{speed / ddpm['images_per_second']:.1f}x" if ddpm and speed else "–"
        base = ddpm.get("frechet_distance") if ddpm else None
        relative = f"{distance / base - 1:+.1%}" if distance is not None and base else "–"
        body.append(
            [
                names.get(row["sampler"], row["sampler"]),
                row["steps"],
                _number(row.get("samples")),
                _speed(speed),
                speedup,
                _number(distance, ".3g"),
                relative,
                _number(row.get("confident_share"), ".3f"),
                _number(row.get("class_entropy"), ".3f"),
                _number(row.get("classes_present")),
                row["run"],
                _scored_status(row),
            ]
        )
    headers = ["sampler", "steps", "samples", "images/s", "speed vs DDPM", "Fréchet distance"]
    extra = ["vs DDPM", "confident share", "class entropy", "classes", "run", "status"]
    return _table(headers + extra, body)


def _mfu_table(rows: Sequence[dict]) -> str:
    body = [
        [
            row["model"],
            row["batch_size"],
            _number(_scaled(row.get("flops_per_step"), 1e-9), ",.1f"),
            _speed(row.get("images_per_second")),
            f"`{row.get('throughput_from', '–')}`",
            _number(row.get("achieved_tflops"), ".2f"),
            _number(row.get("peak_tflops"), ".0f") if row.get("peak_tflops") else "unknown",
            _number(row.get("mfu"), ".1%") if row.get("mfu") is not None else "unknown",
            row["run"],
            _status(row),
        ]
        for row in rows
    ]
    headers = ["model", "batch", "GFLOP/step (fwd+bwd)", "images/s", "throughput of"]
    extra = ["achieved TFLOP/s", "peak bf16 TFLOP/s", "MFU", "run", "status"]
    return _table(headers + extra, body)


SECTION_TEXT = {
    "train": (
        "1. Training throughput",
        "Images per second over a fixed number of steps after warm-up, device synchronised "
        "at both ends. Library networks are sized to AttentionUNet's parameter count "
        "(within 20%) and read the same device-resident batches as the engine.",
        _train_table,
    ),
    "quality": (
        "2. Quality at equal GPU time",
        "Each contender trains a fresh network for the budget (wall-clock seconds, including "
        "compilation), then every network is sampled the same way and scored with "
        "`diffusion_lib.metrics.score_samples`. The engine samples its EMA weights.",
        _quality_table,
    ),
    "sampling": (
        "3. Sampling",
        "One engine-trained AttentionUNet, sampled with DDPM, deterministic DDIM and "
        "DPM-Solver++(2M) (dpm-N, grid even in log-SNR); "
        "images/s includes moving the images to the CPU.",
        _sampling_table,
    ),
    "mfu": (
        "4. Model FLOPs utilisation",
        "FLOPs of one forward and backward pass (torch.utils.flop_counter.FlopCounterMode) times "
        "the engine's steps per second, over the GPU's dense bf16 peak.",
        _mfu_table,
    ),
}


def render_report(runs: Sequence[dict], rows: Sequence[dict]) -> str:
    """The Markdown report: banners, provenance, targets, then one table per section."""
    latest = runs[-1]
    lines = ["# diffusion_lib benchmark results", ""]
    if any(run["quick"] for run in runs):
        lines += [QUICK_BANNER, ""]
    if any(run.get("smoke_mode") for run in runs):
        lines += [SMOKE_BANNER, ""]
    versions = ", ".join(f"{name} {value}" for name, value in latest["versions"].items())
    peak = latest.get("peak_bf16_tflops")
    lines += [
        f"- Command: `{latest['command']}`",
        f"- Date: {latest['date']}",
        f"- Device: {latest['device_name']} (`{latest['device']}`), dense bf16 peak "
        f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown'}",
        f"- Versions: {versions}",
        "",
    ]
    if len(runs) > 1:
        lines += [
            "Rows come from these runs (column `run`):",
            "",
            _table(
                ["run", "date", "device", "command"],
                [[r["id"], r["date"], r["device_name"], f"`{r['command']}`"] for r in runs],
            ),
            "",
        ]
    devices = {run["device_name"] for run in runs}
    lines += ["## Targets", ""]
    if not any("H100" in name for name in devices):
        lines += [
            f"The targets are stated for an H100; these rows ran on {', '.join(devices)}.",
            "",
        ]
    lines += [_table(["target", "result", "by how much"], evaluate_targets(rows)), ""]
    for section, (title, explanation, table) in SECTION_TEXT.items():
        section_rows = [row for row in rows if row["section"] == section]
        if section_rows:
            lines += [f"## {title}", "", explanation, "", table(section_rows), ""]
    return "\n".join(lines)


class ResultsFile:
    """The report and its JSON twin; rows replace earlier rows of the same section and key.

    Rows of earlier measured runs are kept (unless ``fresh``); a quick run starts afresh and
    refuses to replace a file that holds measurements.
    """

    def __init__(self, output: Path, run: dict, fresh: bool) -> None:
        self.output = output
        self.json_path = output.with_suffix(".json")
        previous = {"runs": [], "rows": []}
        if self.json_path.exists() and not fresh:
            previous = json.loads(self.json_path.read_text())
        earlier_quick = [r["quick"] for r in previous["runs"]]
        if run["quick"] and not all(earlier_quick):
            raise SystemExit(
                f"{output} holds measured results; a --quick run will not overwrite them. "
                "Choose another --output (a quick run's default is a temporary file)."
            )
        if run["quick"] or any(earlier_quick):
            # A quick run stands alone, and its rows never mix with measurements.
            previous = {"runs": [], "rows": []}
        self.runs: list[dict] = previous["runs"]
        self.rows: list[dict] = previous["rows"]
        run["id"] = max((r["id"] for r in self.runs), default=0) + 1
        self.runs.append(run)
        self.run_id = run["id"]

    def record(self, row: dict) -> None:
        """Add (or replace) ``row``, print it, and rewrite both files."""
        row["run"] = self.run_id
        self.rows = [
            r for r in self.rows if (r["section"], r["key"]) != (row["section"], row["key"])
        ]
        self.rows.append(row)
        print(_summary(row), flush=True)
        self.write()

    def write(self) -> None:
        used = {row["run"] for row in self.rows} | {self.run_id}
        runs = [run for run in self.runs if run["id"] in used]
        self.output.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.json_path, json.dumps({"runs": runs, "rows": self.rows}, indent=1))
        _atomic_write(self.output, render_report(runs, self.rows))


def _atomic_write(path: Path, text: str) -> None:
    write_atomically(path, lambda file: file.write((text + "\n").encode("utf-8")))


def _summary(row: dict) -> str:
    fields = [
        f"{name}={_number(row[name], '.4g') if isinstance(row[name], float) else row[name]}"
        for name in (
            "parameters",
            "images_per_second",
            "seconds",
            "steps",
            "frechet_distance",
            "confident_share",
            "class_entropy",
            "mfu",
        )
        if row.get(name) is not None
    ]
    return f"[{row['section']}] {row['key']}: {row.get('status')} {' '.join(fields)}"


def select_contenders(config: BenchmarkConfig, section: str) -> list[Contender]:
    """The contenders of ``section``: ``--contenders`` if given, else the section's default."""
    catalogue = all_contenders()
    if config.contenders is not None:
        return [catalogue[key] for key in config.contenders]
    if section == "train":  # "auto" runs eagerly for as many steps as a measurement takes
        return [contender for key, contender in catalogue.items() if not key.endswith("-auto")]
    return [catalogue[key] for key in QUALITY_CONTENDERS]


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    script = sys.argv[0] if argv is None else "benchmarks/benchmark.py"
    config = parse_args(arguments)
    results = ResultsFile(config.output, run_record(config, [script, *arguments]), config.fresh)
    if config.quick:
        print("Quick functional run: tiny sizes, the numbers are not a measurement.", flush=True)
    print(f"Device: {device_name(config.settings.device)}; writing {config.output}", flush=True)
    data = load_training_data(config.dataset_limit)
    score = SampleScorer(config.settings.device)
    train_rows: list[dict] = []
    trained = None
    if "train" in config.sections:
        train_rows = run_train_section(
            select_contenders(config, "train"), data, config.settings, results.record
        )
    if "quality" in config.sections:
        trained = run_quality_section(
            select_contenders(config, "quality"), data, config, score, results.record
        )
    if "sampling" in config.sections:
        run_sampling_section(trained, data, config, score, results.record)
    if "mfu" in config.sections:
        run_mfu_section(train_rows, data, config, results.record)
    results.write()
    print()
    print(_table(["target", "result", "by how much"], evaluate_targets(results.rows)))
    print(f"\nReport: {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
