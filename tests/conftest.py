"""Shared fixtures: unit tests run with smoke mode off unless a test turns it on."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from diffusion_lib import metrics
from diffusion_lib.smoke import SMOKE_VARIABLE


@pytest.fixture(autouse=True)
def _no_smoke_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SMOKE_VARIABLE, raising=False)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


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


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory) -> Iterator[Path]:
    """A cache folder for the MNIST reference classifier of the command line's scores, seeded
    with the current one from the default cache where there is one; otherwise it is trained
    there once per module (about a minute)."""
    folder = tmp_path_factory.mktemp("classifier_cache")
    cached = metrics.classifier_path("mnist")
    if cached.is_file():
        shutil.copy(cached, metrics.classifier_path("mnist", folder))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(metrics.CACHE_VARIABLE, str(folder))
        yield folder
