"""The shared input checks, and NumPy numbers passing through the public functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_lib import NoiseSchedule, ddim_sample, frechet_distance_at_infinity
from diffusion_lib.validation import (
    check_bool,
    check_generator,
    check_model_times,
    check_model_timesteps,
    check_number,
    check_positive_int,
    check_schedule,
    check_timesteps,
    check_tuple,
    check_weights_dtype,
    is_integer,
)


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


@pytest.mark.parametrize("t", [7, 7.0, None, np.int64(7)])
def test_model_times_that_are_not_a_tensor_get_an_example(t: object) -> None:
    message = r"t must be a tensor of shape \(B,\), one timestep per image, e\.g\. "
    with pytest.raises(ValueError, match=message + r"torch\.full\(\(3,\), 50\); got"):
        check_model_times(t, 100, 3)


def test_uint8_timesteps_are_refused() -> None:
    with pytest.raises(ValueError, match="got dtype torch.uint8 .*indexes as a mask"):
        check_timesteps(torch.ones(3, dtype=torch.uint8), 10, 3)
    check_timesteps(torch.ones(3, dtype=torch.int32), 10, 3)  # other integer types index


def test_tuples_and_bools() -> None:
    assert check_tuple("widths", [4, 2], "(4, 2)") == (4, 2)
    for value in (4, "42", None):
        with pytest.raises(ValueError, match=r"widths must be a tuple such as \(4, 2\); got"):
            check_tuple("widths", value, "(4, 2)")
    assert check_bool("layer_norm", False) is False
    for value in ("no", 1, None):
        with pytest.raises(ValueError, match="layer_norm must be True or False"):
            check_bool("layer_norm", value)


def test_generators_and_schedules_are_checked_by_type() -> None:
    check_generator(None)
    check_generator(torch.Generator())
    with pytest.raises(ValueError, match=r"torch\.Generator\(\)\.manual_seed\(0\); got int"):
        check_generator(0)
    check_schedule(NoiseSchedule.from_name("linear", 10), NoiseSchedule, hint="a hint")
    with pytest.raises(ValueError, match=r"schedule must be a NoiseSchedule \(a hint\); got str"):
        check_schedule("linear", NoiseSchedule, hint="a hint")


class _Network:
    def __init__(self, timesteps: object) -> None:
        self.timesteps = timesteps


def test_only_a_network_built_for_fewer_timesteps_is_refused() -> None:
    for model in (_Network(1000), _Network(5000), _Network(None), _Network(True), object()):
        check_model_timesteps(model, 1000)
    with pytest.raises(ValueError, match="built for T=100 timesteps but the schedule has T=1000"):
        check_model_timesteps(_Network(100), 1000)


def test_weights_dtype_is_exempt_under_autocast_and_on_devices_without_it() -> None:
    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Net's weights are float16 but x is float64 .*x\.half"):
        check_weights_dtype("Net", "x", x, torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_weights_dtype("Net", "x", x, torch.float16)
    with pytest.raises(ValueError, match="weights are float32 but x is float64"):
        check_weights_dtype("Net", "x", x.to("meta"), torch.float32)
