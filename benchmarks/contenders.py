"""The training loops the benchmark compares, each behind the same small interface.

* :class:`EngineContender`: :func:`diffusion_lib.training.train` (device-resident data, bf16
  autocast, fused AdamW, EMA), eager or through ``torch.compile``.
* :class:`PlainLoopContender`: the loop a tutorial writes for the same network: torchvision's
  MNIST through a ``DataLoader`` (``ToTensor`` + ``Normalize``), float32, eager, Adam, and the
  simplified loss written out by hand.
* :class:`DiffusersContender`: Hugging Face diffusers' ``UNet2DModel`` and ``DDPMScheduler``
  in the loop of diffusers' unconditional training example (``add_noise``, MSE on the noise,
  AdamW, gradient clipping), without accelerate.
* :class:`LucidrainsContender`: denoising-diffusion-pytorch's ``Unet`` inside
  ``GaussianDiffusion``, whose call ``diffusion(images)`` returns the loss.

The two libraries are optional: when one cannot be imported, its contender raises
:class:`ContenderUnavailable`, which the benchmark records as a "not installed" row. Both are
sized to the parameter count of :class:`~diffusion_lib.models.AttentionUNet` (see
:func:`closest_width`), trained on the same noise schedule (linear, 1e-4 to 0.02, T = 1000)
with the same epsilon objective, and fed the same device-resident batches as the engine, so
that only the network and the training step differ. Every trained network is returned as a
plain ``model(x_t, t) -> eps`` module, so one sampler serves all of them.
"""

from __future__ import annotations

import functools
import importlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from diffusion_lib.devices import synchronize
from diffusion_lib.losses import diffusion_loss
from diffusion_lib.models import AttentionUNet, FCUNet, count_parameters
from diffusion_lib.predictions import PREDICTIONS, NoiseFromPrediction
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.training import TrainingResult, train
from diffusion_lib.validation import check_choice, check_number, check_positive_int

TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
ENGINE_MODELS: dict[str, type[nn.Module]] = {"fc_unet": FCUNet, "attention_unet": AttentionUNet}
MODEL_LABELS = {"fc_unet": "FCUNet", "attention_unet": "AttentionUNet"}
# A library network counts as "the same size" when its parameters are within this fraction.
PARAMETER_TOLERANCE = 0.2
# The step count of an engine run that its time limit ends.
UNBOUNDED_STEPS = 10**9
# Key suffix and label of the engine's compile settings.
COMPILE_VARIANTS = {False: ("", ""), True: ("-compiled", " + torch.compile"),
                    "auto": ("-auto", " (defaults, compile='auto')")}  # fmt: skip


class ContenderUnavailable(RuntimeError):
    """The contender cannot run here: its package is not installed, or it was skipped."""


@dataclass(frozen=True)
class RunSettings:
    """How every contender is run.

    Attributes:
        device: where training happens.
        batch_size: images per optimisation step (128 for every contender).
        warmup_steps: untimed steps before a throughput measurement.
        timed_steps: steps timed for a throughput measurement.
        num_workers: ``DataLoader`` worker processes of the plain loop.
        seed: seeds model initialisation and the random draws of every loop.
        allow_compile: False skips the ``torch.compile`` contenders (compiling takes minutes
            on a CPU).
    """

    device: torch.device
    batch_size: int = 128
    warmup_steps: int = 20
    timed_steps: int = 200
    num_workers: int = 4
    seed: int = 0
    allow_compile: bool = True


@dataclass
class TrainingData:
    """The training set in the two forms the contenders read it.

    Attributes:
        images: (N, 1, 28, 28) float32 in [-1, 1] on the CPU, for the engine and the libraries.
        loader_dataset: a map-style dataset of (image (1, 28, 28) in [-1, 1], label) pairs, for
            the plain loop's ``DataLoader`` (torchvision's MNIST with ``ToTensor`` and
            ``Normalize``, which decodes every image on every visit).
    """

    images: Tensor
    loader_dataset: Dataset


@dataclass
class TrainedModel:
    """A contender's network after a run of fixed wall-clock time.

    Attributes:
        noise_predictor: ``model(x_t, t) -> eps`` with ``x_t`` (B, 1, 28, 28), ``t`` (B,) int64.
        seconds: wall-clock seconds the run took, device synchronised at the end.
        steps: optimisation steps taken.
    """

    noise_predictor: nn.Module
    seconds: float
    steps: int


def require(module: str, package: str) -> object:
    """Import ``module`` or raise :class:`ContenderUnavailable` naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ContenderUnavailable(
            f"not installed (pip install {package}; {type(error).__name__}: {error})"
        ) from None


def linear_alphas_cumprod(device: torch.device) -> Tensor:
    """``alpha_bar_t`` of Ho et al.'s linear schedule as a tutorial computes it: float32, (T,)."""
    betas = torch.linspace(BETA_START, BETA_END, TIMESTEPS, device=device)
    return torch.cumprod(1.0 - betas, dim=0)


def noisy_images(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`` (Ho et al. 2020, eq. 4).

    Shapes: ``x0`` and ``noise`` (B, C, H, W), ``t`` (B,) 0-based, ``alphas_cumprod`` (T,).
    """
    alpha_bar = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def closest_width(
    build: Callable[[int], nn.Module], target: int, widths: Iterable[int]
) -> tuple[int, int]:
    """The width whose network has the parameter count closest to ``target``, and that count.

    Networks are built on the meta device, so no memory is allocated for their weights.
    """
    best: tuple[int, int] | None = None
    for width in widths:
        with torch.device("meta"):
            count = count_parameters(build(width))
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (width, count)
    if best is None:
        raise ValueError("widths is empty: give at least one candidate width")
    return best


def _check_finite_loss(loss: Tensor, label: str) -> None:
    value = float(loss.detach().float())
    if not math.isfinite(value):
        raise FloatingPointError(f"{label}: the loss became {value}")


class Contender:
    """One way of training a noise predictor on MNIST; subclasses fill in the attributes.

    Attributes:
        key: short name used on the command line and in the results.
        label: a readable description for the tables.
        library: where the training code comes from.
        model_name: the network's class name.
        precision: "fp32" or "bf16 autocast".
        data_path: how batches reach the device.
    """

    key: str
    label: str
    library: str
    model_name: str
    precision: str
    data_path: str

    def parameter_count(self) -> int:
        raise NotImplementedError

    def batch_size(self, settings: RunSettings) -> int:
        """Images per step: the run's shared batch unless the contender has a recipe of its own."""
        return settings.batch_size

    def images_per_second(self, data: TrainingData, settings: RunSettings) -> float:
        """Training throughput after ``warmup_steps``, over ``timed_steps`` synchronised steps."""
        raise NotImplementedError

    def train_for(self, seconds: float, data: TrainingData, settings: RunSettings) -> TrainedModel:
        """Train a fresh network for about ``seconds`` of wall-clock time."""
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        return {
            "contender": self.label,
            "library": self.library,
            "model": self.model_name,
            "precision": self.precision,
            "data_path": self.data_path,
        }


class EngineContender(Contender):
    """diffusion_lib's :func:`~diffusion_lib.training.train`: eager (``compile=False``),
    compiled (``True``) or as ``train`` decides by default (``"auto"``)."""

    def __init__(
        self,
        model: str,
        compile: bool | str,
        prediction: str = "epsilon",
        *,
        batch_size: int | None = None,
        lr: float | None = None,
        variant: str | None = None,
        **model_options: object,
    ) -> None:
        if model not in ENGINE_MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(ENGINE_MODELS)}")
        self.model, self.compile, self.model_options = model, compile, model_options
        self.prediction = check_choice("prediction", prediction, PREDICTIONS)
        # A recipe of its own (batch and learning rate) instead of the shared batch of 128 and
        # train()'s default learning rate; None keeps those.
        self.own_batch_size = (
            None if batch_size is None else check_positive_int("batch_size", batch_size)
        )
        self.lr = None if lr is None else check_number("lr", lr, 0.0, low_open=True)
        self.schedule = NoiseSchedule.from_name("linear", TIMESTEPS)
        suffix, label = COMPILE_VARIANTS[compile]
        target = "" if prediction == "epsilon" else f"-{prediction}"
        target_label = "" if prediction == "epsilon" else f", predicting {prediction}"
        recipe = "" if batch_size is None else f"-b{batch_size}"
        recipe_label = "" if batch_size is None else f", batch {batch_size}"
        recipe_label += "" if lr is None else f", lr {lr:g}"
        # A network other than the book's default gets a name in the key; its options are
        # spelled out in the label.
        variant_key = "" if variant is None else f"-{variant}"
        if variant is not None:
            recipe_label += "".join(f", {name} {value}" for name, value in model_options.items())
        self.key = f"engine-{model.split('_')[0]}{target}{variant_key}{recipe}{suffix}"
        self.label = f"diffusion_lib engine{label}{target_label}{recipe_label}"
        self.library = "diffusion_lib"
        self.model_name = MODEL_LABELS[model]
        self.precision = "bf16 autocast (CUDA), fp32 elsewhere"
        self.data_path = "device-resident tensor"

    def build(self) -> nn.Module:
        return ENGINE_MODELS[self.model](**self.model_options)

    def batch_size(self, settings: RunSettings) -> int:
        return self.own_batch_size or settings.batch_size

    def parameter_count(self) -> int:
        return count_parameters(self.build())

    def _check_compile(self, settings: RunSettings) -> None:
        if self.compile is True and not settings.allow_compile:
            raise ContenderUnavailable(
                "skipped: torch.compile is off for this run (--quick on a CPU, where compiling "
                "alone takes minutes)"
            )

    def _train(
        self, model: nn.Module, images: Tensor, settings: RunSettings, **options: object
    ) -> TrainingResult:
        if self.prediction != "epsilon":
            options["loss"] = functools.partial(diffusion_loss, prediction=self.prediction)
        if self.lr is not None:
            options["lr"] = self.lr
        return train(
            model,
            self.schedule,
            images,
            batch_size=self.batch_size(settings),
            device=settings.device,
            compile=self.compile,
            seed=settings.seed,
            progress=False,
            **options,
        )

    def images_per_second(self, data: TrainingData, settings: RunSettings) -> float:
        self._check_compile(settings)
        torch.manual_seed(settings.seed)
        model = self.build()
        # The first call compiles, autotunes and warms the allocator. train() itself leaves
        # out its first step and synchronises the device around the steps it times.
        self._train(model, data.images, settings, steps=max(1, settings.warmup_steps))
        result = self._train(model, data.images, settings, steps=settings.timed_steps + 1)
        return result.history.images_per_second

    def train_for(self, seconds: float, data: TrainingData, settings: RunSettings) -> TrainedModel:
        """Train for ``seconds`` in one call with ``time_limit``: compilation counts towards the
        time, and the run stops at the first loss read past it (every 50 steps on a GPU)."""
        self._check_compile(settings)
        torch.manual_seed(settings.seed)
        result = self._train(
            self.build(), data.images, settings, steps=UNBOUNDED_STEPS, time_limit=seconds
        )
        return TrainedModel(self.noise_predictor(result), result.seconds, result.steps)

    def train_steps(self, steps: int, images: Tensor, settings: RunSettings) -> TrainingResult:
        """Train a fresh network for ``steps`` steps (``benchmarks/fc_recipes.py``)."""
        self._check_compile(settings)
        torch.manual_seed(settings.seed)
        return self._train(self.build(), images, settings, steps=steps)

    def noise_predictor(self, result: TrainingResult) -> nn.Module:
        """A run's EMA network as the noise predictor that the samplers ask for."""
        if self.prediction == "epsilon":
            return result.ema_model
        return NoiseFromPrediction(result.ema_model, self.schedule, self.prediction)


class _LoopState:
    """A loop ready to step: ``step()`` runs one optimisation step and returns the loss."""

    noise_predictor: nn.Module

    def step(self) -> Tensor:
        raise NotImplementedError


class LoopContender(Contender):
    """A contender whose loop the benchmark drives step by step, timing it from outside."""

    def start(self, data: TrainingData, settings: RunSettings) -> _LoopState:
        raise NotImplementedError

    def images_per_second(self, data: TrainingData, settings: RunSettings) -> float:
        state = self.start(data, settings)
        for _ in range(settings.warmup_steps):
            state.step()
        synchronize(settings.device)
        started = time.perf_counter()
        for _ in range(settings.timed_steps):
            loss = state.step()
        synchronize(settings.device)
        seconds = time.perf_counter() - started
        _check_finite_loss(loss, self.key)
        return settings.timed_steps * settings.batch_size / seconds

    def train_for(self, seconds: float, data: TrainingData, settings: RunSettings) -> TrainedModel:
        state = self.start(data, settings)
        synchronize(settings.device)
        started = time.perf_counter()
        steps = 0
        # The clock is read without waiting for the device; the GPU runs at most one launch
        # queue behind, and the final synchronisation puts that time on the bill.
        while time.perf_counter() - started < seconds:
            loss = state.step()
            steps += 1
        synchronize(settings.device)
        used = time.perf_counter() - started
        if steps:
            _check_finite_loss(loss, self.key)
        return TrainedModel(state.noise_predictor.eval(), used, steps)


class _PlainLoopState(_LoopState):
    def __init__(self, model: nn.Module, dataset: Dataset, settings: RunSettings) -> None:
        self.device = settings.device
        self.model = model.to(settings.device).train()
        self.noise_predictor = self.model
        self.loader = DataLoader(
            dataset, batch_size=settings.batch_size, shuffle=True, num_workers=settings.num_workers
        )
        self.batches: Iterator = iter(self.loader)
        self.alphas_cumprod = linear_alphas_cumprod(settings.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=2e-4)

    def _next_batch(self) -> Tensor:
        try:
            images, _ = next(self.batches)
        except StopIteration:  # a new epoch: the loader reshuffles and restarts its workers
            self.batches = iter(self.loader)
            images, _ = next(self.batches)
        return images

    def step(self) -> Tensor:
        x0 = self._next_batch().to(self.device)
        t = torch.randint(0, TIMESTEPS, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        x_t = noisy_images(x0, t, noise, self.alphas_cumprod)
        loss = F.mse_loss(self.model(x_t, t), noise)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class PlainLoopContender(LoopContender):
    """The tutorial loop: DataLoader, float32, eager, Adam, the simplified loss by hand."""

    def __init__(self, model: str, **model_options: object) -> None:
        if model not in ENGINE_MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(ENGINE_MODELS)}")
        self.model, self.model_options = model, model_options
        self.key = f"plain-{model.split('_')[0]}"
        self.label = "plain PyTorch loop"
        self.library = "torch + torchvision"
        self.model_name = MODEL_LABELS[model]
        self.precision = "fp32"
        self.data_path = "torchvision MNIST + DataLoader"

    def build(self) -> nn.Module:
        return ENGINE_MODELS[self.model](**self.model_options)

    def parameter_count(self) -> int:
        return count_parameters(self.build())

    def start(self, data: TrainingData, settings: RunSettings) -> _LoopState:
        torch.manual_seed(settings.seed)
        return _PlainLoopState(self.build(), data.loader_dataset, settings)


class _DeviceBatches:
    """Random batches of a dataset held on the device, as the engine holds it."""

    def __init__(self, images: Tensor, batch_size: int, device: torch.device) -> None:
        self.images = images.to(device)
        self.batch_size = min(batch_size, images.shape[0])

    def next(self) -> Tensor:
        rows = torch.randint(0, self.images.shape[0], (self.batch_size,), device=self.images.device)
        return self.images[rows]


class _NoiseOutput(nn.Module):
    """``model(x_t, t) -> eps`` around a network that returns diffusers' output object."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.network(x_t, t, return_dict=False)[0]


def _autocast(settings: RunSettings, bf16: bool):
    enabled = bf16 and settings.device.type == "cuda"
    return torch.autocast(settings.device.type, dtype=torch.bfloat16, enabled=enabled)


class _LibraryContender(LoopContender):
    """Shared parts of the two library contenders: sizing, precision, availability."""

    package: str
    module: str
    widths: tuple[int, ...]

    def __init__(self, reference_parameters: int, bf16: bool) -> None:
        self.reference_parameters = reference_parameters
        self.bf16 = bf16
        self.precision = "bf16 autocast (CUDA), fp32 elsewhere" if bf16 else "fp32"
        self.data_path = "device-resident tensor"
        self._width: tuple[int, int] | None = None

    def network(self, width: int, settings: RunSettings | None = None) -> nn.Module:
        raise NotImplementedError

    def width(self) -> tuple[int, int]:
        """(width, parameter count) closest to the reference; ValueError if not within 20%."""
        require(self.module, self.package)
        if self._width is None:
            self._width = closest_width(self.network, self.reference_parameters, self.widths)
        width, count = self._width
        if abs(count - self.reference_parameters) > PARAMETER_TOLERANCE * self.reference_parameters:
            raise ValueError(
                f"{self.package}: no width gives within {PARAMETER_TOLERANCE:.0%} of "
                f"{self.reference_parameters:,} parameters (closest: {count:,} at width {width})"
            )
        return width, count

    def parameter_count(self) -> int:
        return self.width()[1]


class _DiffusersState(_LoopState):
    def __init__(self, network: nn.Module, images: Tensor, settings: RunSettings, bf16: bool):
        diffusers = require("diffusers", "diffusers")
        self.settings, self.bf16 = settings, bf16
        self.network = network.to(settings.device).train()
        self.noise_predictor = _NoiseOutput(self.network)
        self.scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END
        )
        self.batches = _DeviceBatches(images, settings.batch_size, settings.device)
        # The optimiser settings of diffusers' unconditional training example.
        self.optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8
        )

    def step(self) -> Tensor:
        clean_images = self.batches.next()
        noise = torch.randn_like(clean_images)
        timesteps = torch.randint(
            0, TIMESTEPS, (clean_images.shape[0],), device=clean_images.device
        )
        noisy = self.scheduler.add_noise(clean_images, noise, timesteps)
        with _autocast(self.settings, self.bf16):
            noise_prediction = self.network(noisy, timesteps, return_dict=False)[0]
        loss = F.mse_loss(noise_prediction.float(), noise.float())
        loss.backward()
        nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()


class DiffusersContender(_LibraryContender):
    """diffusers' UNet2DModel (three levels, attention at 14x14 and 7x7) and DDPMScheduler."""

    package = module = "diffusers"
    widths = tuple(range(8, 257, 8))

    def __init__(self, reference_parameters: int, bf16: bool) -> None:
        super().__init__(reference_parameters, bf16)
        self.key = f"diffusers-{'bf16' if bf16 else 'fp32'}"
        self.label = "diffusers UNet2DModel + DDPMScheduler"
        self.library = "diffusers"
        self.model_name = "UNet2DModel"

    def network(self, width: int, settings: RunSettings | None = None) -> nn.Module:
        diffusers = require("diffusers", "diffusers")
        # The same layout as AttentionUNet: widths (w, 2w, 2w), two blocks per level,
        # attention below full resolution, GroupNorm with 8 groups, 4 attention heads.
        return diffusers.UNet2DModel(
            sample_size=28,
            in_channels=1,
            out_channels=1,
            layers_per_block=2,
            block_out_channels=(width, 2 * width, 2 * width),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=max(1, width // 2),
        )

    def start(self, data: TrainingData, settings: RunSettings) -> _LoopState:
        width, _ = self.width()
        torch.manual_seed(settings.seed)
        return _DiffusersState(self.network(width), data.images, settings, self.bf16)


class _LucidrainsState(_LoopState):
    def __init__(self, network: nn.Module, images: Tensor, settings: RunSettings, bf16: bool):
        library = require("denoising_diffusion_pytorch", "denoising-diffusion-pytorch")
        self.settings, self.bf16 = settings, bf16
        self.noise_predictor = network
        # Epsilon prediction on the linear schedule, and data already in [-1, 1], so the
        # task is the same as every other contender's (the library defaults to v prediction
        # on a sigmoid schedule).
        self.diffusion = library.GaussianDiffusion(
            network,
            image_size=28,
            timesteps=TIMESTEPS,
            objective="pred_noise",
            beta_schedule="linear",
            auto_normalize=False,
        ).to(settings.device)
        self.batches = _DeviceBatches(images, settings.batch_size, settings.device)
        # The optimiser settings of the library's Trainer.
        self.optimizer = torch.optim.Adam(self.diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))

    def step(self) -> Tensor:
        with _autocast(self.settings, self.bf16):
            loss = self.diffusion(self.batches.next())
        loss.backward()
        nn.utils.clip_grad_norm_(self.diffusion.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()


class LucidrainsContender(_LibraryContender):
    """denoising-diffusion-pytorch's Unet (dim_mults (1, 2, 2)) inside GaussianDiffusion."""

    package = "denoising-diffusion-pytorch"
    module = "denoising_diffusion_pytorch"
    widths = tuple(range(8, 257, 4))

    def __init__(self, reference_parameters: int, bf16: bool) -> None:
        super().__init__(reference_parameters, bf16)
        self.key = f"denoising-diffusion-pytorch-{'bf16' if bf16 else 'fp32'}"
        self.label = "denoising-diffusion-pytorch Unet + GaussianDiffusion"
        self.library = "denoising-diffusion-pytorch"
        self.model_name = "Unet"

    def network(self, width: int, settings: RunSettings | None = None) -> nn.Module:
        library = require(self.module, self.package)
        # Flash attention (PyTorch's SDPA flash kernel) needs half precision on a GPU.
        flash = self.bf16 and settings is not None and settings.device.type == "cuda"
        return library.Unet(dim=width, dim_mults=(1, 2, 2), channels=1, flash_attn=flash)

    def start(self, data: TrainingData, settings: RunSettings) -> _LoopState:
        width, _ = self.width()
        torch.manual_seed(settings.seed)
        return _LucidrainsState(self.network(width, settings), data.images, settings, self.bf16)


def all_contenders(**model_options: dict[str, object]) -> dict[str, Contender]:
    """Every contender by key, libraries sized to the AttentionUNet built with the options.

    ``model_options`` maps ``"fc_unet"`` / ``"attention_unet"`` to keyword arguments of the
    model (tests use small networks); the defaults are the book's models.
    """
    fc_options = model_options.get("fc_unet", {})
    attention_options = model_options.get("attention_unet", {})
    reference = count_parameters(AttentionUNet(**attention_options))
    catalogue: list[Contender] = [
        EngineContender("fc_unet", compile=False, **fc_options),
        EngineContender("fc_unet", compile=True, **fc_options),
        EngineContender("fc_unet", compile="auto", **fc_options),
        EngineContender("fc_unet", compile="auto", prediction="x0", **fc_options),
        EngineContender(
            "fc_unet", compile="auto", prediction="x0", batch_size=1024, lr=1e-3, **fc_options
        ),
        EngineContender(
            "fc_unet",
            compile="auto",
            prediction="x0",
            batch_size=1024,
            lr=1e-3,
            variant="sinln",
            **{**fc_options, "time_embedding": "sinusoidal", "layer_norm": True},
        ),
        PlainLoopContender("fc_unet", **fc_options),
        EngineContender("attention_unet", compile=False, **attention_options),
        EngineContender("attention_unet", compile=True, **attention_options),
        EngineContender("attention_unet", compile="auto", **attention_options),
        PlainLoopContender("attention_unet", **attention_options),
        DiffusersContender(reference, bf16=False),
        DiffusersContender(reference, bf16=True),
        LucidrainsContender(reference, bf16=False),
        LucidrainsContender(reference, bf16=True),
    ]
    return {contender.key: contender for contender in catalogue}
