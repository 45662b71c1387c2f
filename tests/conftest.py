"""Shared fixtures: unit tests run with smoke mode off unless a test turns it on."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from diffusion_lib import NoiseFromPrediction, NoiseSchedule, reference_classifier
from diffusion_lib.data import load_images
from diffusion_lib.smoke import SMOKE_VARIABLE


@pytest.fixture(autouse=True)
def _no_smoke_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SMOKE_VARIABLE, raising=False)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def linear() -> NoiseSchedule:
    """Ho et al.'s linear schedule, 1e-4 to 0.02 over T = 1000 steps."""
    return NoiseSchedule.from_name("linear", timesteps=1000)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module of tiny networks: on a small shared CPU, more threads
    mostly wait for each other (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_test_images() -> torch.Tensor:
    """The first 2,000 MNIST test digits in [-1, 1], (2000, 1, 28, 28)."""
    return load_images("mnist", train=False, limit=2000)[0]


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory) -> Iterator[Path]:
    """A cache folder for the MNIST reference classifier of the command line's scores, seeded
    with the current one from the default cache where there is one; otherwise it is trained
    there once per module (about a minute)."""
    folder = tmp_path_factory.mktemp("classifier_cache")
    cached = reference_classifier.classifier_path("mnist")
    if cached.is_file():
        shutil.copy(cached, reference_classifier.classifier_path("mnist", folder))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(reference_classifier.CACHE_VARIABLE, str(folder))
        yield folder


class GaussianDataPredictor(nn.Module):
    """E[x_0 | x_t] for data N(mean, std^2) in every pixel, written out: a data-predicting model
    that stays exact where alpha_bar = 0, as at the last step of a zero-terminal-SNR schedule."""

    def __init__(self, schedule: NoiseSchedule, mean: float, std: float) -> None:
        super().__init__()
        self.alphas_cumprod, self.mean, self.std = schedule.alphas_cumprod, mean, std

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        abar = self.alphas_cumprod[t].to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        shrink = abar.sqrt() * self.std**2 / (abar * self.std**2 + 1 - abar)
        return self.mean + shrink * (x_t - abar.sqrt() * self.mean)


@pytest.fixture
def gaussian_x0_model():
    """A factory: ``gaussian_x0_model(schedule, mean, std)`` is the exact N(mean, std^2) denoiser
    as a noise predictor, through ``NoiseFromPrediction``."""

    def build(schedule: NoiseSchedule, mean: float, std: float) -> NoiseFromPrediction:
        return NoiseFromPrediction(GaussianDataPredictor(schedule, mean, std), schedule, "x0")

    return build
