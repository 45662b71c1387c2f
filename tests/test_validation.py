"""The shared input checks, and NumPy numbers passing through the public functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_lib import NoiseSchedule, ddim_sample, frechet_distance_at_infinity
from diffusion_lib.validation import check_number, check_positive_int, is_integer


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3), np.int32(-1)])
def test_integers_python_and_numpy_count_as_integers(value: object) -> None:
    assert is_integer(value)


@pytest.mark.parametrize(
    "value", [True, np.bool_(True), 3.0, np.float64(3.0), "3", torch.tensor(3)]
)
def test_bools_floats_strings_and_tensors_do_not(value: object) -> None:
    assert not is_integer(value)


def test_numpy_numbers_come_back_as_python_numbers() -> None:
    steps = check_positive_int("steps", np.int64(50))
    assert steps == 50 and type(steps) is int
    lr = check_number("lr", np.float32(0.5), 0.0, low_open=True)
    assert lr == 0.5 and type(lr) is float
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got np.int64.0."):
        check_positive_int("steps", np.int64(0))


def test_numpy_integers_work_where_python_integers_do() -> None:
    """Step counts and sizes often come from NumPy (``np.linspace(...).astype(int)``)."""
    assert NoiseSchedule.from_name("linear", np.int64(10)).timesteps == 10
    schedule = NoiseSchedule.from_name("linear", 10)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    shape = (np.int64(2), 1, np.int64(4), 4)
    ours = ddim_sample(model, schedule, shape, steps=np.int64(5), x_T=None,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    theirs = ddim_sample(model, schedule, (2, 1, 4, 4), steps=5,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    features = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    mean, covariance = torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    trends = [
        frechet_distance_at_infinity(
            features, mean, covariance, sizes=sizes, generator=torch.Generator().manual_seed(2)
        )  # fmt: skip
        for sizes in ((10, 20, 40), tuple(np.array([10, 20, 40])))
    ]
    assert trends[0] == trends[1]
