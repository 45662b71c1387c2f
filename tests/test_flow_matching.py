"""The straight path, its loss and the ODE samplers, against closed forms for Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lib import (
    FCUNet,
    GaussianMixture,
    NoiseSchedule,
    RectifiedFlow,
    flow_matching_loss,
    flow_sample,
    flow_times,
)
from diffusion_lib.sampling import Trajectory


@pytest.fixture
def flow() -> RectifiedFlow:
    return RectifiedFlow()


def test_interpolate_runs_from_data_to_noise_with_the_target_velocity(flow: RectifiedFlow) -> None:
    x0, noise = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    ends = [flow.interpolate(x0, noise, torch.full((6,), t, dtype=torch.float64)) for t in (0, 1)]
    torch.testing.assert_close(ends[0], x0)
    torch.testing.assert_close(ends[1], noise)
    t, h = torch.rand(6, dtype=torch.float64) * 0.8 + 0.1, 1e-6
    derivative = (flow.interpolate(x0, noise, t + h) - flow.interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(derivative, flow.velocity_target(x0, noise))


def test_conversions_recover_the_endpoints_of_the_line(flow: RectifiedFlow) -> None:
    x0, noise = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randn(5, 1, 4, 4).double()
    t = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.99], dtype=torch.float64)
    x_t, v = flow.interpolate(x0, noise, t), flow.velocity_target(x0, noise)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, t, v), x0)
    torch.testing.assert_close(flow.eps_from_velocity(x_t, t, v), noise)
    torch.testing.assert_close(flow.velocity_from_eps(x_t, t, noise), v)


def test_loss_is_the_mean_squared_velocity_error(flow: RectifiedFlow) -> None:
    x0, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8)
    calls = []

    def model(x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        calls.append(time)
        return 0.5 * x_t

    loss = flow_matching_loss(model, flow, x0, t=t, noise=noise)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    torch.testing.assert_close(loss, (0.5 * x_t - (noise - x0)).pow(2).mean())
    torch.testing.assert_close(calls[0], 1000 * t)


def test_loss_draws_times_uniformly_from_the_generator(flow: RectifiedFlow) -> None:
    times = []
    model = lambda x_t, time: times.append(time) or x_t  # noqa: E731
    x0 = torch.zeros(50_000, 1)
    first = flow_matching_loss(model, flow, x0, generator=torch.Generator().manual_seed(3))
    again = flow_matching_loss(model, flow, x0, generator=torch.Generator().manual_seed(3))
    assert first == again
    t = times[0] / 1000
    assert t.min() >= 0 and t.max() <= 1
    assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.003


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t": torch.full((4,), 1.5)}, r"\[0, 1\]"),
        ({"t": torch.zeros(4, dtype=torch.long)}, "float tensor"),
        ({"t": torch.zeros(3)}, r"shape \(4,\)"),
        ({"noise": torch.zeros(4, 3)}, "shape of x0"),
    ],
)
def test_bad_loss_arguments_raise(flow: RectifiedFlow, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        flow_matching_loss(lambda x, t: x, flow, torch.zeros(4, 2), **kwargs)


@pytest.mark.parametrize("flow_like", [NoiseSchedule.from_name("linear", 10), "flow", None])
def test_a_noise_schedule_in_the_flows_place_is_refused(flow_like: object) -> None:
    # It used to fail with "'NoiseSchedule' object has no attribute 'model_time'".
    message = "flow must be a RectifiedFlow .*for a NoiseSchedule use ddpm_sample"
    with pytest.raises(ValueError, match=message):
        flow_sample(lambda x, t: x, flow_like, (3, 2))
    with pytest.raises(ValueError, match=message):
        flow_matching_loss(lambda x, t: x, flow_like, torch.zeros(4, 2))


def test_a_seed_instead_of_a_generator_is_refused(flow: RectifiedFlow) -> None:
    message = r"generator must be a torch\.Generator, e\.g\. torch\.Generator\(\)\.manual_seed"
    with pytest.raises(ValueError, match=message):
        flow_sample(lambda x, t: x, flow, (3, 2), generator=0)
    with pytest.raises(ValueError, match=message):
        flow_matching_loss(lambda x, t: x, flow, torch.zeros(4, 2), generator=0)


def test_a_network_refuses_data_in_another_dtype_than_its_weights(flow: RectifiedFlow) -> None:
    network = FCUNet(image_size=2, widths=(4,))
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    message = r"FCUNet's weights are float32 but {} is float64 \(NumPy arrays become float64\)"
    with pytest.raises(ValueError, match=message.format("x_1")):
        flow_sample(network, flow, x.shape, steps=2, x_1=x)
    with pytest.raises(ValueError, match=message.format("x0")):
        flow_matching_loss(network, flow, x)
    with pytest.raises(ValueError, match=message.format("noise")):
        flow_matching_loss(network, flow, x.float(), noise=x)


def test_bad_time_scale_raises() -> None:
    with pytest.raises(ValueError, match="time_scale must be positive"):
        RectifiedFlow(time_scale=0)


def _gaussian_transport(mean: float, std: float, x_1: torch.Tensor) -> torch.Tensor:
    """Where the exact ODE of N(mean, std^2 I) data carries x_1: x_t = (1 - t) mean + sigma_t x_1
    with sigma_t = sqrt((1 - t)^2 std^2 + t^2) solves dx/dt = E[eps - x_0 | x_t], so x_0 is
    mean + std x_1."""
    return mean + std * x_1


def test_euler_and_heun_converge_to_the_exact_transport_at_their_orders(
    flow: RectifiedFlow,
) -> None:
    mean, std = 1.5, 0.2
    velocity = GaussianMixture(torch.tensor([[mean, mean]]), std).optimal_velocity(flow)
    x_1 = torch.randn(100, 2, dtype=torch.float64)
    exact = _gaussian_transport(mean, std, x_1)
    errors = {}
    for solver in ("euler", "heun"):
        for steps in (20, 40):
            x = flow_sample(velocity, flow, (100, 2), steps=steps, solver=solver, x_1=x_1)
            errors[solver, steps] = (x - exact).abs().max().item()
    assert 1.8 < errors["euler", 20] / errors["euler", 40] < 2.2  # first order
    assert 3.6 < errors["heun", 20] / errors["heun", 40] < 4.4  # second order
    assert errors["heun", 20] < 0.1 * errors["euler", 20]


def test_one_euler_step_lands_on_the_mean_of_the_data(flow: RectifiedFlow) -> None:
    """At t = 1 the noise says nothing about x_0, so v(x_1, 1) = x_1 - E[x_0]: a single step
    sends every sample to the data's mean (the blur that reflow removes)."""
    mixture = GaussianMixture.ring(components=4, radius=1.0, std=0.1)
    x = flow_sample(mixture.optimal_velocity(flow), flow, (64, 2), steps=1, x_1=torch.randn(64, 2))
    torch.testing.assert_close(x, torch.zeros(64, 2), atol=1e-6, rtol=0)


def test_trajectory_holds_every_state_and_its_time(flow: RectifiedFlow) -> None:
    model = lambda x, t: torch.ones_like(x)  # noqa: E731
    x, trajectory = flow_sample(
        model, flow, (3, 1, 2, 2), steps=4, return_trajectory=True, generator=torch.Generator()
    )
    assert isinstance(trajectory, Trajectory)
    assert trajectory.states.shape == (5, 3, 1, 2, 2)
    torch.testing.assert_close(trajectory.timesteps, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(trajectory.states[-1], x)
    torch.testing.assert_close(x, trajectory.states[0] - 1.0)  # v = 1 for one unit of time


def test_guidance_combines_conditional_and_unconditional_velocities(flow: RectifiedFlow) -> None:
    def model(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return labels.to(x.dtype)[:, None].expand_as(x)  # the null label 9 gives v = 9

    x_1 = torch.zeros(2, 3)
    kwargs = {"steps": 1, "x_1": x_1, "labels": torch.tensor([1, 2]), "null_label": 9}
    plain = flow_sample(model, flow, (2, 3), **kwargs)
    guided = flow_sample(model, flow, (2, 3), guidance=2.0, **kwargs)
    torch.testing.assert_close(plain, -torch.tensor([[1.0], [2.0]]).expand(2, 3))
    torch.testing.assert_close(guided, -(3 * torch.tensor([[1.0], [2.0]]) - 18).expand(2, 3))


def test_flow_times_run_from_noise_to_data() -> None:
    torch.testing.assert_close(
        flow_times(4), torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"solver": "rk4"}, "unknown solver 'rk4'; choose one of euler, heun"),
        ({"x_1": torch.zeros(2, 2)}, r"x_1 must have the requested shape \(3, 2\)"),
        ({"steps": 0}, "steps must be an integer >= 1"),
    ],
)
def test_bad_sampler_arguments_raise(flow: RectifiedFlow, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        flow_sample(lambda x, t: x, flow, (3, 2), **kwargs)


def test_smoke_mode_caps_the_steps(flow: RectifiedFlow, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFUSION_LIB_SMOKE", "1")
    calls = []
    flow_sample(lambda x, t: calls.append(t) or x, flow, (2, 2), steps=100)
    assert len(calls) == 10
    assert math.isclose(float(calls[0][0]), 1000.0)


@pytest.mark.parametrize("t_value", [0.25, 0.5, 0.9])
def test_the_exact_velocity_leaves_the_conditional_variance_of_the_target(
    flow: RectifiedFlow, t_value: float
) -> None:
    """For N(m, s^2 I) data, u = eps - x_0 and x_t = (1 - t) x_0 + t eps are jointly Gaussian:
    Var u = 1 + s^2, Cov(u, x_t) = t - (1 - t) s^2, Var x_t = (1 - t)^2 s^2 + t^2, so the
    minimum of the loss at time t is Var(u | x_t) = s^2 / ((1 - t)^2 s^2 + t^2) per entry."""
    std, count = 0.5, 20_000
    data = GaussianMixture(torch.tensor([[0.7, -0.7]]), std)
    x0 = data.sample(count, torch.Generator().manual_seed(1)).double()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.full((count,), t_value, dtype=torch.float64)
    loss = flow_matching_loss(data.optimal_velocity(flow), flow, x0, t=t, noise=noise)
    expected = std**2 / ((1 - t_value) ** 2 * std**2 + t_value**2)
    # 40,000 squared Gaussian residuals: a relative standard error of sqrt(2 / 40,000) = 0.7%
    assert loss.item() == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_flow_times_needs_a_positive_whole_number_of_steps(steps) -> None:
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        flow_times(steps)
