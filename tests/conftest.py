"""Shared fixtures: unit tests run with smoke mode off unless a test turns it on."""

from __future__ import annotations

import pytest
import torch

from diffusion_lib.smoke import SMOKE_VARIABLE


@pytest.fixture(autouse=True)
def _no_smoke_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SMOKE_VARIABLE, raising=False)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
