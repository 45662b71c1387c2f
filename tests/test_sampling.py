"""Samplers checked with noise predictors whose optimum is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_lib import (
    DDIM_SPACINGS,
    FCUNet,
    NoiseFromPrediction,
    NoiseSchedule,
    RectifiedFlow,
    ddim_encode,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    dpm_solver_sample,
    flow_sample,
    heun_sample,
    p_mean_variance,
    predict_noise,
    slerp,
)
from diffusion_lib.sampling import _ddim_update
from diffusion_lib.smoke import MAX_SAMPLING_STEPS, SMOKE_VARIABLE


class GaussianOptimalPredictor:
    """The exact E[eps | x_t] when every pixel of the data is N(mean, std^2), independently.

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is jointly Gaussian with eps, so
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mean) / (abar std^2 + 1 - abar).
    """

    def __init__(self, schedule: NoiseSchedule, mean: float, std: float) -> None:
        self.alphas_cumprod = schedule.alphas_cumprod
        self.mean, self.std = mean, std

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * self.mean) / (abar * self.std**2 + 1 - abar)


class SinglePointPredictor:
    """The perfect predictor for a data set holding one image: the noise that separates x_t from it."""

    def __init__(self, schedule: NoiseSchedule, point: torch.Tensor) -> None:
        self.schedule, self.point = schedule, point

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.predict_eps(x_t, t, self.point.expand_as(x_t))


@pytest.mark.parametrize(
    ("sampler", "kwargs"),
    [
        (ddpm_sample, {"variance": "small"}),
        (ddpm_sample, {"variance": "large"}),
        (ddpm_sample, {"steps": 100, "variance": "large"}),
        (ddim_sample, {"steps": 1000, "eta": 0.0}),
        (ddim_sample, {"steps": 1000, "eta": 1.0}),
    ],
)
@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_gaussian_data_is_reproduced(sampler, kwargs: dict, schedule_name: str) -> None:
    schedule = NoiseSchedule.from_name(schedule_name)
    mean, std = 0.3, 0.5
    model = GaussianOptimalPredictor(schedule, mean, std)
    generator = torch.Generator().manual_seed(1)
    samples = sampler(
        model, schedule, (10_000, 1, 1, 1), generator=generator, clip_x0=None, **kwargs
    )
    # Standard errors: 0.005 for the mean, 0.7% for the std; the discretisation adds a little.
    assert samples.mean().item() == pytest.approx(mean, abs=0.02)
    assert samples.std().item() == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_is_euler_on_the_probability_flow(linear: NoiseSchedule, steps: int) -> None:
    """For Gaussian data, deterministic DDIM is Euler's method on a linear ODE (Song et al. 2021, eq. 14).

    In the variables xbar = x / sqrt(abar) and sigma = sqrt((1 - abar) / abar) the update is
    xbar_s = xbar_t + (sigma_s - sigma_t) eps(x_t), and the optimal eps is
    sigma (xbar - mean) / (std^2 + sigma^2). The map x_T -> x_0 is affine; compute it in NumPy.
    """
    mean, std = 0.3, 0.5
    abar = linear.alphas_cumprod.numpy()
    visited = np.arange(steps) * 1000 // steps
    sigmas = [np.sqrt((1 - abar[t]) / abar[t]) for t in visited[::-1]] + [0.0]
    slope, offset = 1 / np.sqrt(abar[visited[-1]]), 0.0  # xbar_T = x_T / sqrt(abar_T)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        factor = (sigma_next - sigma) * sigma / (std**2 + sigma**2)
        slope, offset = slope * (1 + factor), offset * (1 + factor) - factor * mean
    x_T = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64).reshape(3, 1, 1, 1)
    model = GaussianOptimalPredictor(linear, mean, std)
    samples = ddim_sample(model, linear, (3, 1, 1, 1), steps=steps, x_T=x_T, clip_x0=None)
    expected = slope * x_T.flatten().numpy() + offset
    np.testing.assert_allclose(samples.flatten().numpy(), expected, rtol=1e-9, atol=1e-12)


def test_ddim_without_noise_recovers_a_single_training_point(linear: NoiseSchedule) -> None:
    point = torch.tensor([0.25, -0.5, 0.75, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    samples = ddim_sample(
        SinglePointPredictor(linear, point),
        linear,
        (3, 1, 2, 2),
        steps=20,
        x_T=torch.randn(3, 1, 2, 2, dtype=torch.float64),
    )
    torch.testing.assert_close(samples, point.expand(3, -1, -1, -1), rtol=0, atol=1e-10)


def test_ddpm_with_a_perfect_predictor_ends_on_the_training_point(linear: NoiseSchedule) -> None:
    point = torch.tensor([0.5, -0.25], dtype=torch.float64).reshape(1, 1, 1, 2)
    samples = ddpm_sample(
        SinglePointPredictor(linear, point),
        linear,
        (4, 1, 1, 2),
        x_T=torch.randn(4, 1, 1, 2, dtype=torch.float64),
    )
    torch.testing.assert_close(samples, point.expand(4, -1, -1, -1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_trajectory_records_every_visited_state(sampler, linear: NoiseSchedule) -> None:
    x_T = torch.randn(2, 1, 3, 3)
    model = GaussianOptimalPredictor(linear, 0.0, 0.5)
    samples, trajectory = sampler(
        model, linear, (2, 1, 3, 3), x_T=x_T, steps=10, return_trajectory=True
    )
    assert trajectory.states.shape == (11, 2, 1, 3, 3)
    torch.testing.assert_close(trajectory.states[0], x_T)
    torch.testing.assert_close(trajectory.states[-1], samples)
    assert (
        trajectory.timesteps[0] > trajectory.timesteps[-2] == 0 and trajectory.timesteps[-1] == -1
    )
    assert (trajectory.timesteps[:-1].diff() < 0).all()


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_a_generator_makes_sampling_reproducible(sampler, linear: NoiseSchedule) -> None:
    model = GaussianOptimalPredictor(linear, 0.0, 0.5)
    extra = {"eta": 1.0} if sampler is ddim_sample else {}

    def draw(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return sampler(model, linear, (2, 1, 4, 4), steps=20, generator=generator, **extra)

    torch.testing.assert_close(draw(3), draw(3))
    assert not torch.allclose(draw(3), draw(4))


def test_golden_values(linear: NoiseSchedule) -> None:
    """Pinned outputs of both samplers for a fixed predictor and seed: a regression snapshot,
    not an independent check. The numbers were recorded from the code after the independent
    tests above passed; they pin the exact numbers against unintended changes."""
    model = GaussianOptimalPredictor(linear, 0.1, 0.4)
    ddpm = ddpm_sample(model, linear, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    ddim = ddim_sample(model, linear, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert ddpm.flatten().tolist() == pytest.approx(GOLDEN_DDPM, abs=1e-4)
    assert ddim.flatten().tolist() == pytest.approx(GOLDEN_DDIM, abs=1e-4)


GOLDEN_DDPM = [0.506329, 0.028888, 0.606356, 0.267907, -0.13174, 0.568548, 0.556987, 0.182302]
GOLDEN_DDIM = [0.675654, -0.009955, -0.7146, 0.312162, -0.305623, -0.423006, 0.250462, 0.412922]


def test_small_variance_underdisperses_when_respaced_coarsely(linear: NoiseSchedule) -> None:
    """beta_tilde ignores the uncertainty of x_0 given x_t, which matters when steps are far apart."""
    model = GaussianOptimalPredictor(linear, 0.3, 0.5)
    stds = [
        ddpm_sample(
            model, linear, (10_000, 1, 1, 1), steps=steps, clip_x0=None,
            generator=torch.Generator().manual_seed(1),
        ).std().item()
        for steps in (25, 100, 1000)
    ]  # fmt: skip
    assert stds[0] < stds[1] < stds[2] and stds[0] < 0.45


def test_smoke_mode_caps_sampling_steps(
    linear: NoiseSchedule, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    model = GaussianOptimalPredictor(linear, 0.0, 0.5)
    for sampler in (ddpm_sample, ddim_sample):
        _, trajectory = sampler(model, linear, (1, 1, 2, 2), return_trajectory=True)
        assert len(trajectory.states) == MAX_SAMPLING_STEPS + 1


def test_the_model_is_put_in_eval_mode_and_restored(linear: NoiseSchedule) -> None:
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return torch.zeros_like(x_t)

    model = Recorder().train()
    ddim_sample(model, linear, (1, 1, 2, 2), steps=3)
    assert seen == [False] * 3 and model.training


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments(linear: NoiseSchedule) -> None:
    model = GaussianOptimalPredictor(linear, 0.0, 1.0)
    with pytest.raises(ValueError, match="steps must be at most 1000, got 2000"):
        ddim_sample(model, linear, (1, 1, 2, 2), steps=2000)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        ddpm_sample(model, linear, (1, 1, 2, 2), steps=0)
    with pytest.raises(ValueError, match="unknown variance 'tiny'; choose one of small, large"):
        ddpm_sample(model, linear, (1, 1, 2, 2), variance="tiny")
    with pytest.raises(ValueError, match=r"x_T must have the requested shape \(1, 1, 2, 2\)"):
        ddpm_sample(model, linear, (1, 1, 2, 2), x_T=torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="shape must be positive integers"):
        ddim_sample(model, linear, (0, 1, 2, 2))
    with pytest.raises(ValueError, match="the model's output must have the shape of x_t"):
        ddpm_sample(lambda x, t: x[:, :, :1], linear, (1, 1, 2, 2))


def test_ddim_encode_follows_the_exact_flow_of_gaussian_data(linear: NoiseSchedule) -> None:
    """For N(mean, std^2) data the flow keeps (xbar - mean) / sqrt(std^2 + sigma^2) constant."""
    mean, std = 0.3, 0.5
    model = GaussianOptimalPredictor(linear, mean, std)
    x0 = torch.tensor([-0.6, 0.1, 0.3, 0.9], dtype=torch.float64).reshape(4, 1, 1, 1)
    x_T = ddim_encode(model, linear, x0, steps=1000)
    abar = linear.alphas_cumprod[-1]
    sigma = ((1 - abar) / abar).sqrt()
    exact = abar.sqrt() * (mean + (x0 - mean) * (std**2 + sigma**2).sqrt() / std)
    torch.testing.assert_close(x_T, exact, rtol=0.01, atol=0.01)
    back = ddim_sample(model, linear, (4, 1, 1, 1), steps=1000, x_T=x_T, clip_x0=None)
    torch.testing.assert_close(back, x0, rtol=0, atol=0.01)


def test_ddim_encode_two_steps_by_hand(linear: NoiseSchedule) -> None:
    """Two encoding steps written out: leading spacing with 2 of 1000 steps visits t = 0, 500,
    and each step evaluates the model at the state it leaves and the timestep it moves to. The
    predictor depends on t, so evaluating it at the timestep the state came from (0 instead of
    500 in the second step) changes the result; the exact-flow test above cannot see that with
    1000 small steps."""
    model = lambda x, t: torch.tanh(x + t.reshape(-1, 1, 1, 1) / 1000)  # noqa: E731
    x0 = torch.tensor([-0.6, 0.1, 0.9], dtype=torch.float64).reshape(3, 1, 1, 1)
    abar = linear.alphas_cumprod
    eps = model(x0, torch.full((3,), 0))  # from x_0 (alpha-bar 1) to t = 0
    x_at_0 = abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * eps
    eps = model(x_at_0, torch.full((3,), 500))  # from t = 0 to t = 500
    x0_estimate = (x_at_0 - (1 - abar[0]).sqrt() * eps) / abar[0].sqrt()
    x_at_500 = abar[500].sqrt() * x0_estimate + (1 - abar[500]).sqrt() * eps
    torch.testing.assert_close(ddim_encode(model, linear, x0, steps=2), x_at_500)


def test_slerp_stays_on_the_sphere_and_hits_the_ends() -> None:
    a, b = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    unit_a, unit_b = (
        a / a.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1),
        b / b.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1),
    )
    middle = slerp(unit_a, unit_b, 0.5)
    torch.testing.assert_close(middle.flatten(1).norm(dim=1), torch.ones(3))
    # Equal angles to both ends at w = 0.5.
    cos_a = (middle.flatten(1) * unit_a.flatten(1)).sum(1)
    cos_b = (middle.flatten(1) * unit_b.flatten(1)).sum(1)
    torch.testing.assert_close(cos_a, cos_b)
    torch.testing.assert_close(slerp(a, a, 0.3), a)


# ---------------------------------------------------------------------- spacing, zero terminal SNR


def test_ddim_visits_the_timesteps_of_its_spacing(linear: NoiseSchedule) -> None:
    model = GaussianOptimalPredictor(linear, 0.0, 1.0)
    for spacing in DDIM_SPACINGS:
        _, trajectory = ddim_sample(
            model, linear, (2, 1, 1, 1), steps=10, spacing=spacing, return_trajectory=True
        )
        expected = ddim_timesteps(1000, 10, spacing).flip(0).tolist() + [-1]
        assert trajectory.timesteps.tolist() == expected


class GaussianVelocity:
    """The exact E[v | x_t] for N(mean, std^2) pixels: v = alpha eps - sigma x_0 with
    E[x_0 | x_t] = mean + alpha std^2 (x_t - alpha mean) / (alpha^2 std^2 + sigma^2), written
    out here rather than converted from the noise predictor."""

    def __init__(self, schedule: NoiseSchedule, mean: float, std: float) -> None:
        self.alphas_cumprod = schedule.alphas_cumprod
        self.mean, self.std = mean, std

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        x0 = self.mean + alpha * self.std**2 * (x_t - alpha * self.mean) / (
            abar * self.std**2 + 1 - abar
        )
        eps = (x_t - alpha * x0) / sigma
        return alpha * eps - sigma * x0


@pytest.fixture
def zero_snr() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", 1000, zero_terminal_snr=True)


def test_one_trailing_step_at_zero_snr_returns_the_data_mean(zero_snr: NoiseSchedule) -> None:
    """At SNR 0, x_T is independent of x_0, so E[x_0 | x_T] = E[x_0] for every x_T."""
    model = NoiseFromPrediction(GaussianVelocity(zero_snr, 0.3, 0.5), zero_snr, "v")
    x_T = torch.randn(100, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = ddim_sample(model, zero_snr, x_T.shape, steps=1, spacing="trailing", x_T=x_T, clip_x0=None)
    torch.testing.assert_close(x, torch.full_like(x, 0.3))


@pytest.mark.parametrize(
    ("sampler", "kwargs"),
    [
        (ddim_sample, {"steps": 1000, "spacing": "trailing"}),
        (ddim_sample, {"steps": 1000, "spacing": "trailing", "eta": 1.0}),
        (ddpm_sample, {}),
        (ddpm_sample, {"steps": 100, "variance": "large"}),
    ],
)
def test_a_velocity_model_samples_gaussian_data_at_zero_terminal_snr(
    zero_snr: NoiseSchedule, sampler, kwargs: dict
) -> None:
    mean, std = 0.3, 0.5
    model = NoiseFromPrediction(GaussianVelocity(zero_snr, mean, std), zero_snr, "v")
    generator = torch.Generator().manual_seed(1)
    samples = sampler(
        model, zero_snr, (10_000, 1, 1, 1), generator=generator, clip_x0=None, **kwargs
    )
    assert torch.isfinite(samples).all()
    assert samples.mean().item() == pytest.approx(mean, abs=0.02)
    assert samples.std().item() == pytest.approx(std, rel=0.03)


def test_a_noise_predictor_is_refused_where_it_cannot_give_x0(zero_snr: NoiseSchedule) -> None:
    model = GaussianOptimalPredictor(zero_snr, 0.3, 0.5)
    for call in [
        lambda: ddim_sample(model, zero_snr, (2, 1, 1, 1), steps=10, spacing="trailing"),
        lambda: ddpm_sample(model, zero_snr, (2, 1, 1, 1), steps=10),
        lambda: p_mean_variance(model, zero_snr, torch.zeros(2, 1, 1, 1), torch.tensor([5, 999])),
        lambda: ddim_sample(
            NoiseFromPrediction(model, zero_snr, "epsilon"),
            zero_snr,
            (2, 1, 1, 1),
            steps=1,
            spacing="trailing",
        ),  # fmt: skip
    ]:
        with pytest.raises(ValueError, match="zero terminal SNR.*predict 'v' or 'x0'"):
            call()
    # Away from t = T it still works: the leading grid never reaches it.
    x = ddim_sample(model, zero_snr, (2, 1, 1, 1), steps=10, spacing="leading")
    assert torch.isfinite(x).all()


def test_ddim_with_eta_one_over_every_step_is_ddpm() -> None:
    # Song et al. 2021, sec. 4.1: eta = 1 makes sigma^2 the posterior variance beta-tilde, and the
    # coefficients of x0 and eps then equal those of the DDPM posterior mean, step for step.
    schedule = NoiseSchedule.from_name("linear", timesteps=50)
    model = GaussianOptimalPredictor(schedule, 0.3, 0.5)
    x_T = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    options = dict(x_T=x_T, clip_x0=None, generator=torch.Generator().manual_seed(1))
    ddim = ddim_sample(model, schedule, x_T.shape, steps=50, eta=1.0, **options)
    options["generator"] = torch.Generator().manual_seed(1)
    ddpm = ddpm_sample(model, schedule, x_T.shape, **options)
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-10)
    deterministic = ddim_sample(model, schedule, x_T.shape, steps=50, x_T=x_T, clip_x0=None)
    assert (deterministic - ddpm).abs().max() > 0.1  # the comparison can tell eta apart


def test_one_ddim_step_is_the_bayes_posterior_of_a_skipped_step() -> None:
    # From t to s < t with abar_t = 0.3, abar_s = 0.8: q(x_s | x_t, x0) by Bayes' rule in
    # precision form, with a = abar_t / abar_s the signal kept between s and t.
    abar_t, abar_s = 0.3, 0.8
    a = abar_t / abar_s
    variance = 1 / (1 / (1 - abar_s) + a / (1 - a))
    x0 = torch.tensor([[0.4, -1.2, 0.7]], dtype=torch.float64)
    eps = torch.tensor([[1.1, 0.3, -0.6]], dtype=torch.float64)
    x_t = math.sqrt(abar_t) * x0 + math.sqrt(1 - abar_t) * eps
    mean = variance * (math.sqrt(abar_s) * x0 / (1 - abar_s) + math.sqrt(a) * x_t / (1 - a))
    t_bar, s_bar = (torch.full((1, 1), value, dtype=torch.float64) for value in (abar_t, abar_s))
    last = _ddim_update(x0, eps, t_bar, s_bar, 1.0, True, None)  # the mean, without noise
    torch.testing.assert_close(last, mean, rtol=0, atol=1e-12)
    zeros = torch.zeros(1, 3, dtype=torch.float64)
    noise = _ddim_update(zeros, zeros, t_bar, s_bar, 0.5, False, torch.Generator().manual_seed(5))
    z = torch.randn(1, 3, generator=torch.Generator().manual_seed(5)).double()
    torch.testing.assert_close(noise, 0.5 * math.sqrt(variance) * z, rtol=0, atol=1e-12)
    deterministic = _ddim_update(x0, eps, t_bar, s_bar, 0.0, False, None)
    expected = math.sqrt(abar_s) * x0 + math.sqrt(1 - abar_s) * eps
    torch.testing.assert_close(deterministic, expected, rtol=0, atol=1e-12)


def test_clipping_x0_recomputes_the_noise(linear: NoiseSchedule) -> None:
    # For one training point p outside [-1, 1], x0 = p is clipped to clamp(p); the noise re-derived
    # from the clipped x0 is then exactly the predictor of clamp(p), so the two runs coincide.
    outside = torch.tensor([2.0, -0.5, -3.0, 0.25], dtype=torch.float64).reshape(1, 1, 2, 2)
    x_T = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    clipping = SinglePointPredictor(linear, outside)
    _, clipped = ddim_sample(clipping, linear, x_T.shape, steps=10, x_T=x_T, return_trajectory=True)
    inside = SinglePointPredictor(linear, outside.clamp(-1, 1))
    _, unclipped = ddim_sample(
        inside, linear, x_T.shape, steps=10, x_T=x_T, clip_x0=None, return_trajectory=True
    )
    torch.testing.assert_close(clipped.states, unclipped.states, rtol=0, atol=1e-10)


@pytest.mark.parametrize("weight", [0.25, 0.5, 0.8])
def test_slerp_moves_along_the_great_circle_at_constant_speed(weight: float) -> None:
    theta = 2 * math.pi / 3  # unit vectors 120 degrees apart
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[math.cos(theta), math.sin(theta)]], dtype=torch.float64)
    angle = weight * theta
    expected = torch.tensor([[math.cos(angle), math.sin(angle)]], dtype=torch.float64)
    torch.testing.assert_close(slerp(a, b, weight), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(slerp(3 * a, 3 * b, weight), 3 * expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("clip_x0", [(1.0, -1.0), 1.0, (-1.0,), (0.0, math.nan)])
@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample, heun_sample, dpm_solver_sample])
def test_a_bad_clip_range_is_refused(linear: NoiseSchedule, sampler, clip_x0) -> None:
    model = GaussianOptimalPredictor(linear, 0.0, 1.0)
    with pytest.raises(ValueError, match="clip_x0 must be"):
        sampler(model, linear, (1, 1, 2, 2), steps=3, clip_x0=clip_x0)


@pytest.mark.parametrize("guidance", [3.0, math.nan])
def test_guidance_without_labels_is_refused(linear: NoiseSchedule, guidance: float) -> None:
    # It used to be ignored: the samples came out as if no guidance had been asked for.
    model = GaussianOptimalPredictor(linear, 0.0, 1.0)
    with pytest.raises(ValueError, match="guidance=.* needs labels"):
        ddim_sample(model, linear, (1, 1, 2, 2), steps=3, guidance=guidance)
    with pytest.raises(ValueError, match="guidance=.* needs labels"):
        predict_noise(model, torch.zeros(1, 1, 2, 2), torch.tensor([5]), guidance=guidance)
    with pytest.raises(ValueError, match="guidance=.* needs labels"):
        flow_sample(lambda x, t: torch.zeros_like(x), RectifiedFlow(), (1, 2), guidance=guidance)


@pytest.mark.parametrize("eta", [-0.5, 2.0, 1.0001, math.inf, math.nan, None, "0", True])
def test_eta_outside_zero_to_one_is_refused(linear: NoiseSchedule, eta: object) -> None:
    # eta = 2 used to run, its noise silently clamped; None and "0" failed in a comparison.
    model = GaussianOptimalPredictor(linear, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\] \(0: deterministic"):
        ddim_sample(model, linear, (1, 1, 2, 2), steps=3, eta=eta)


SAMPLERS = [ddpm_sample, ddim_sample, heun_sample, dpm_solver_sample]


def tiny_network(timesteps: int = 1000, **kwargs: object) -> FCUNet:
    return FCUNet(image_size=2, widths=(4,), timesteps=timesteps, **kwargs)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("shape", [16, "16", None])
def test_a_shape_that_is_not_a_tuple_is_refused(linear: NoiseSchedule, sampler, shape) -> None:
    # An int used to fail with "object of type 'int' has no len()".
    with pytest.raises(ValueError, match=r"shape must be a tuple such as \(16, 1, 28, 28\); got"):
        sampler(tiny_network(), linear, shape, steps=2)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("generator", [0, "seed", torch.tensor(0)])
def test_a_seed_instead_of_a_generator_is_refused(linear, sampler, generator) -> None:
    with pytest.raises(ValueError, match=r"generator must be a torch\.Generator, e\.g\. torch"):
        sampler(tiny_network(), linear, (1, 1, 2, 2), steps=2, generator=generator)


@pytest.mark.parametrize("sampler", [*SAMPLERS, ddim_encode])
@pytest.mark.parametrize("arguments", ["a name", "swapped", "a flow"])
def test_a_schedule_of_the_wrong_type_is_refused(sampler, arguments: str) -> None:
    # Each used to fail with an AttributeError deep inside the sampler.
    model, schedule = tiny_network(), NoiseSchedule.from_name("linear")
    second = {"a name": "cosine", "swapped": model, "a flow": RectifiedFlow()}[arguments]
    first = schedule if arguments == "swapped" else model
    third = torch.zeros(1, 1, 2, 2) if sampler is ddim_encode else (1, 1, 2, 2)
    with pytest.raises(ValueError, match="schedule must be a NoiseSchedule .*flow_sample"):
        sampler(first, second, third, steps=2)


def test_ddim_with_the_shape_in_the_schedules_place_is_refused(linear: NoiseSchedule) -> None:
    with pytest.raises(ValueError, match="schedule must be a NoiseSchedule .*; got tuple"):
        ddim_sample(tiny_network(), (1, 1, 2, 2), linear)


@pytest.mark.parametrize("sampler", [*SAMPLERS, ddim_encode])
def test_a_network_built_for_fewer_timesteps_than_the_schedule_is_refused(
    linear: NoiseSchedule, sampler
) -> None:
    # It used to fail at the first step with "timesteps must lie in 0..99", a t never passed.
    third = torch.zeros(1, 1, 2, 2) if sampler is ddim_encode else (1, 1, 2, 2)
    with pytest.raises(
        ValueError, match="the model was built for T=100 timesteps but the schedule has T=1000"
    ):
        sampler(tiny_network(100), linear, third, steps=2)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_shorter_schedule_and_respaced_steps_still_sample_a_network(linear, sampler) -> None:
    """Chapter 3 samples a network built for T = 1000 on a 10-step schedule, and respacing
    hands the network the original timesteps of a shorter chain."""
    short = NoiseSchedule.from_name("linear", timesteps=10)
    assert sampler(tiny_network(), short, (1, 1, 2, 2), steps=3).shape == (1, 1, 2, 2)
    assert sampler(tiny_network(), linear, (1, 1, 2, 2), steps=3).shape == (1, 1, 2, 2)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_start_in_another_dtype_than_the_networks_weights_is_refused(
    linear: NoiseSchedule, sampler, dtype: torch.dtype
) -> None:
    x_T = torch.zeros(1, 1, 2, 2, dtype=dtype)
    with pytest.raises(ValueError, match=r"FCUNet's weights are float32 but x_T is float"):
        sampler(tiny_network(), linear, (1, 1, 2, 2), steps=2, x_T=x_T)


def test_a_module_with_scalar_parameters_keeps_a_float64_start(linear: NoiseSchedule) -> None:
    """Only the library's networks (which record their T) demand their weights' dtype: a
    module whose float32 scalar parameter promotes a float64 input keeps computing in float64."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.5))

        def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.scale * x_t

    x_T = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    assert ddim_sample(Scaled(), linear, x_T.shape, steps=3, x_T=x_T).dtype == torch.float64


def test_a_start_that_is_not_a_floating_point_tensor_is_refused(linear: NoiseSchedule) -> None:
    for x_T, kind in [(torch.zeros(1, 1, 2, 2, dtype=torch.long), "torch.int64"), ([0.0], "list")]:
        with pytest.raises(ValueError, match=f"x_T must be a floating-point tensor, got {kind}"):
            ddpm_sample(tiny_network(), linear, (1, 1, 2, 2), steps=2, x_T=x_T)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_labels_for_an_unconditional_fc_unet_are_refused(linear: NoiseSchedule, sampler) -> None:
    # It used to fail with "FCUNet.forward() takes 3 positional arguments but 4 were given".
    with pytest.raises(ValueError, match="this FCUNet is unconditional and takes no labels"):
        sampler(tiny_network(), linear, (2, 1, 2, 2), steps=2, labels=torch.tensor([0, 1]))


def test_slerp_of_unbatched_vectors_is_refused() -> None:
    # A 1-D input used to fail with an IndexError from flatten(1).
    with pytest.raises(ValueError, match=r"slerp interpolates batches.*\(1, 5\).*got \(5,\)"):
        slerp(torch.randn(5), torch.randn(5), 0.5)
