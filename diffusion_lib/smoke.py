"""Smoke mode: ``DIFFUSION_LIB_SMOKE=1`` shrinks every run so the whole book executes on a CPU in minutes.

The code paths stay the same; only sizes are capped (training steps, dataset size, sampling
steps). The first capped call prints a one-line notice so a smoke run is never mistaken for
a real one.
"""

from __future__ import annotations

import os

SMOKE_VARIABLE = "DIFFUSION_LIB_SMOKE"
MAX_TRAINING_STEPS = 20
MAX_DATASET_SIZE = 512
MAX_SAMPLING_STEPS = 10
MAX_SAMPLES = 16

_notice_shown = False


def smoke_mode() -> bool:
    """True when the environment variable ``DIFFUSION_LIB_SMOKE`` is set to a true value."""
    return os.environ.get(SMOKE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def _notice() -> None:
    global _notice_shown
    if not _notice_shown:
        print(
            f"[diffusion_lib] smoke mode ({SMOKE_VARIABLE}=1): steps, data and sampling are capped; "
            "results are not meaningful."
        )
        _notice_shown = True


def _cap(value: int, limit: int) -> int:
    if smoke_mode() and value > limit:
        _notice()
        return limit
    return value


def cap_training_steps(steps: int) -> int:
    """``steps``, or at most 20 in smoke mode."""
    return _cap(steps, MAX_TRAINING_STEPS)


def cap_dataset_size(size: int) -> int:
    """``size``, or at most 512 in smoke mode."""
    return _cap(size, MAX_DATASET_SIZE)


def cap_sampling_steps(steps: int) -> int:
    """``steps``, or at most 10 in smoke mode."""
    return _cap(steps, MAX_SAMPLING_STEPS)


def cap_samples(count: int) -> int:
    """``count`` images to generate or score, or at most 16 in smoke mode."""
    return _cap(count, MAX_SAMPLES)
