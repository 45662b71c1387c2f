"""Shared fixtures: unit tests run with smoke mode off unless a test turns it on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

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
