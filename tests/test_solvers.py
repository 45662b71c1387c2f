"""ODE solvers checked against the exact flow of Gaussian data, against DDIM, and by their order."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lib import (
    GaussianMixture,
    NoiseSchedule,
    OptimalNoisePredictor,
    ddim_sample,
    ddim_timesteps,
    dpm_solver_sample,
    heun_sample,
    ode_timesteps,
)
from diffusion_lib.smoke import MAX_SAMPLING_STEPS, SMOKE_VARIABLE
from diffusion_lib.solvers import EvaluationCounter

MEAN, STD = 0.3, 0.5


@pytest.fixture(scope="module")
def gaussian(linear: NoiseSchedule) -> OptimalNoisePredictor:
    """The exact noise predictor of N(MEAN, STD^2) data in four dimensions."""
    return OptimalNoisePredictor(GaussianMixture(torch.full((1, 4), MEAN), STD), linear)


@pytest.fixture(scope="module")
def x_T() -> torch.Tensor:
    return torch.randn(2000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def exact_flow(schedule: NoiseSchedule, x_T: torch.Tensor) -> torch.Tensor:
    """Where the sampling ODE takes x_T (at t = T - 1) for N(MEAN, STD^2) data, then one denoise.

    In x_bar = x / alpha and rho = sigma / alpha the ODE is d x_bar / d rho = rho (x_bar - mean)
    / (std^2 + rho^2) for this data, solved by x_bar - mean = C sqrt(std^2 + rho^2): the solvers'
    states keep z = (x - alpha mean) / sqrt(alpha^2 std^2 + sigma^2). Every grid ends at t = 0,
    and the last step returns E[x_0 | x at t = 0] (Tweedie), also in closed form.
    """
    alpha_bar = schedule.alphas_cumprod
    z = (x_T - alpha_bar[-1].sqrt() * MEAN) / (alpha_bar[-1] * STD**2 + 1 - alpha_bar[-1]).sqrt()
    alpha, variance = alpha_bar[0].sqrt(), alpha_bar[0] * STD**2 + 1 - alpha_bar[0]
    x_at_0 = alpha * MEAN + variance.sqrt() * z
    return MEAN + alpha * STD**2 * (x_at_0 - alpha * MEAN) / variance


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


SOLVERS = {
    "DDIM (DPM-Solver++ order 1)": (dpm_solver_sample, {"order": 1}, 1),
    "DPM-Solver++(2M)": (dpm_solver_sample, {"order": 2}, 2),
    "Heun": (heun_sample, {}, 2),
}


# ----------------------------------------------------------------------------- time grids
@pytest.mark.parametrize("spacing", ["time", "logsnr"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50, 200, 999, 1000])
def test_grids_are_distinct_and_span_the_chain(
    linear: NoiseSchedule, spacing: str, steps: int
) -> None:
    grid = ode_timesteps(linear, steps, spacing)
    assert grid.dtype == torch.long and grid.shape == (steps,)
    assert bool((grid[1:] > grid[:-1]).all())
    assert int(grid[-1]) == 999 and (steps == 1 or int(grid[0]) == 0)


def test_time_grid_is_evenly_spaced(linear: NoiseSchedule) -> None:
    assert ode_timesteps(linear, 10, "time").tolist() == [
        0,
        111,
        222,
        333,
        444,
        555,
        666,
        777,
        888,
        999,
    ]


def test_logsnr_grid_is_nearest_to_even_half_log_snr(linear: NoiseSchedule) -> None:
    """Brute force: for each target lambda, scan all T timesteps for the closest one."""
    alpha_bar = linear.alphas_cumprod.tolist()
    lambdas = [0.5 * math.log(a / (1 - a)) for a in alpha_bar]
    steps = 8
    targets = [lambdas[0] + k * (lambdas[-1] - lambdas[0]) / (steps - 1) for k in range(steps)]
    expected = [min(range(1000), key=lambda t, g=g: abs(lambdas[t] - g)) for g in targets]
    assert ode_timesteps(linear, steps, "logsnr").tolist() == expected


# ----------------------------------------------------------------------------- DDIM and orders
@pytest.mark.parametrize("clip_x0", [None, (-1.0, 1.0)])
def test_first_order_dpm_solver_is_ddim(linear: NoiseSchedule, clip_x0) -> None:
    """Same grid, same numbers: the exponential integrator of order 1 is deterministic DDIM."""
    model = OptimalNoisePredictor(GaussianMixture(torch.tensor([[-0.8], [0.9]]), 0.3), linear)
    x_T = 1.5 * torch.randn(64, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = ddim_timesteps(1000, 12)
    ours = dpm_solver_sample(
        model, linear, x_T.shape, order=1, timesteps=grid, x_T=x_T, clip_x0=clip_x0
    )
    ddim = ddim_sample(model, linear, x_T.shape, steps=12, x_T=x_T, clip_x0=clip_x0)
    torch.testing.assert_close(ours, ddim, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spacing", ["time", "logsnr"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_error_shrinks_with_the_solvers_order(
    linear: NoiseSchedule, gaussian, x_T: torch.Tensor, name: str, spacing: str
) -> None:
    """Four times the steps divide the error by about 4 (first order) or 16 (second order)."""
    sampler, kwargs, order = SOLVERS[name]
    exact = exact_flow(linear, x_T)

    def error(steps: int) -> float:
        samples = sampler(
            gaussian, linear, x_T.shape, steps=steps, spacing=spacing, x_T=x_T, clip_x0=None,
            **kwargs,
        )  # fmt: skip
        return rms(samples, exact)

    coarse, fine = error(40), error(160)
    measured_order = math.log(coarse / fine, 4)
    assert abs(measured_order - order) < 0.15, (coarse, fine, measured_order)
    assert fine < (0.015 if order == 1 else 0.003)


def test_second_order_solvers_agree_on_a_mixture(linear: NoiseSchedule) -> None:
    """No closed form here, but two different second-order methods must meet in the limit."""
    mixture = GaussianMixture.ring(components=4, radius=1.0, std=0.15)
    model = mixture.optimal_noise_predictor(linear)
    x_T = torch.randn(500, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    heun = heun_sample(model, linear, x_T.shape, steps=200, x_T=x_T, clip_x0=None)
    dpm = dpm_solver_sample(model, linear, x_T.shape, steps=400, x_T=x_T, clip_x0=None)
    euler = dpm_solver_sample(model, linear, x_T.shape, steps=20, order=1, x_T=x_T, clip_x0=None)
    assert rms(heun, dpm) < 2e-3
    assert rms(euler, dpm) > 10 * rms(heun, dpm)  # the check can fail: coarse Euler is far off


def test_second_order_beats_first_order_at_equal_cost(
    linear: NoiseSchedule, gaussian, x_T: torch.Tensor
) -> None:
    """Twenty network calls: DPM-Solver++(2M) 20 steps, Heun 10 steps (19 calls), DDIM 20 steps."""
    exact = exact_flow(linear, x_T)
    ddim = dpm_solver_sample(gaussian, linear, x_T.shape, steps=20, order=1, x_T=x_T, clip_x0=None)
    dpm = dpm_solver_sample(gaussian, linear, x_T.shape, steps=20, x_T=x_T, clip_x0=None)
    heun = heun_sample(gaussian, linear, x_T.shape, steps=10, spacing="time", x_T=x_T, clip_x0=None)
    assert rms(dpm, exact) < rms(heun, exact) < rms(ddim, exact)


def test_dpm_solver_2m_is_the_multistep_update_written_out(linear: NoiseSchedule) -> None:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) written out by hand on an uneven grid, with
    the closed-form x_0 estimate of N(MEAN, STD^2) data, E[x_0 | x] = MEAN + alpha STD^2
    (x - alpha MEAN) / (alpha^2 STD^2 + sigma^2): the first step is first order, every later
    step extrapolates D = (1 + 1/(2 r)) x0_i - 1/(2 r) x0_{i-1} with r = h_{i-1} / h_i, and the
    last state is the x_0 estimate at t = 0. Four steps whose ratios r are far from 1 make an
    error in the extrapolation, in r or in where the multistep part starts visible; the
    order tests above cannot see a second step taken at first order."""
    means = torch.full((1, 4), MEAN, dtype=torch.float64)
    model = GaussianMixture(means, STD).optimal_noise_predictor(linear)
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = [0, 100, 300, 600, 999]
    _, trajectory = dpm_solver_sample(
        model, linear, x_T.shape, order=2, timesteps=torch.tensor(grid), x_T=x_T, clip_x0=None,
        return_trajectory=True,
    )  # fmt: skip

    alpha_bar = [float(linear.alphas_cumprod[t]) for t in reversed(grid)]  # noisiest first
    alpha = [math.sqrt(a) for a in alpha_bar]
    sigma = [math.sqrt(1 - a) for a in alpha_bar]
    lam = [0.5 * math.log(a / (1 - a)) for a in alpha_bar]

    def x0_estimate(x: torch.Tensor, k: int) -> torch.Tensor:
        variance = alpha[k] ** 2 * STD**2 + sigma[k] ** 2
        return MEAN + alpha[k] * STD**2 * (x - alpha[k] * MEAN) / variance

    states, estimates = [x_T], []
    for k in range(len(grid) - 1):
        estimates.append(x0_estimate(states[-1], k))
        h = lam[k + 1] - lam[k]
        d = estimates[-1]
        if k > 0:
            r = (lam[k] - lam[k - 1]) / h
            d = (1 + 1 / (2 * r)) * estimates[-1] - 1 / (2 * r) * estimates[-2]
        states.append(sigma[k + 1] / sigma[k] * states[-1] - alpha[k + 1] * (math.exp(-h) - 1) * d)
    states.append(x0_estimate(states[-1], len(grid) - 1))
    torch.testing.assert_close(trajectory.states, torch.stack(states), rtol=1e-9, atol=1e-9)
    ratios = [(lam[k] - lam[k - 1]) / (lam[k + 1] - lam[k]) for k in (1, 2, 3)]
    assert min(abs(r - 1) for r in ratios) > 0.2  # r = 1 would hide an r inverted
    first_order = dpm_solver_sample(
        model, linear, x_T.shape, order=1, timesteps=torch.tensor(grid), x_T=x_T, clip_x0=None
    )
    assert (first_order - states[-1]).abs().max() > 1e-2  # the extrapolation matters here


# ----------------------------------------------------------------------------- bookkeeping
def test_network_calls_per_solver(linear: NoiseSchedule, gaussian) -> None:
    counted = EvaluationCounter(gaussian)
    shape = (3, 4)
    heun_sample(counted, linear, shape, steps=10)
    assert (counted.calls, counted.images) == (19, 57)
    counted.calls = counted.images = 0
    dpm_solver_sample(counted, linear, shape, steps=10)
    assert (counted.calls, counted.images) == (10, 30)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_trajectory_records_each_step(linear: NoiseSchedule, gaussian, name: str) -> None:
    sampler, kwargs, _ = SOLVERS[name]
    samples, trajectory = sampler(
        gaussian, linear, (2, 4), steps=5, return_trajectory=True, **kwargs
    )
    assert trajectory.states.shape == (6, 2, 4)
    grid = ode_timesteps(linear, 5)
    assert trajectory.timesteps.tolist() == [*grid.flip(0).tolist(), -1]
    torch.testing.assert_close(trajectory.states[-1], samples.cpu())


@pytest.mark.parametrize("name", list(SOLVERS))
def test_labels_and_guidance_reach_the_model(linear: NoiseSchedule, name: str) -> None:
    sampler, kwargs, _ = SOLVERS[name]
    seen = []

    def model(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(labels.tolist())
        return torch.zeros_like(x_t)

    sampler(model, linear, (2, 3), steps=2, labels=torch.tensor([4, 7]), guidance=1.5,
            null_label=10, **kwargs)  # fmt: skip
    assert seen and all(labels == [4, 7, 10, 10] for labels in seen)


def test_smoke_mode_caps_the_steps(
    linear: NoiseSchedule, gaussian, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    for sampler, kwargs, _ in SOLVERS.values():
        _, trajectory = sampler(
            gaussian, linear, (1, 4), steps=50, return_trajectory=True, **kwargs
        )
        assert len(trajectory.states) == MAX_SAMPLING_STEPS + 1


def test_bad_arguments(linear: NoiseSchedule, gaussian) -> None:
    with pytest.raises(ValueError, match=r"order must be 1 \(DDIM\) or 2"):
        dpm_solver_sample(gaussian, linear, (1, 4), order=3)
    with pytest.raises(ValueError, match="unknown spacing 'uniform'; choose one of logsnr, time"):
        heun_sample(gaussian, linear, (1, 4), spacing="uniform")
    with pytest.raises(ValueError, match="steps must be at most 1000, got 1001"):
        ode_timesteps(linear, 1001)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        dpm_solver_sample(gaussian, linear, (1, 4), steps=0)
    with pytest.raises(ValueError, match="timesteps must be strictly increasing"):
        heun_sample(gaussian, linear, (1, 4), timesteps=torch.tensor([0, 500, 500, 999]))
    with pytest.raises(ValueError, match="timesteps must be a 1-D tensor of integers"):
        dpm_solver_sample(gaussian, linear, (1, 4), timesteps=torch.tensor([0.0, 999.0]))
    with pytest.raises(ValueError, match=r"timesteps must lie in 0\.\.999"):
        dpm_solver_sample(gaussian, linear, (1, 4), timesteps=torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"x_T must have the requested shape \(1, 4\)"):
        heun_sample(gaussian, linear, (1, 4), x_T=torch.zeros(2, 4))


def test_golden_values(linear: NoiseSchedule) -> None:
    """Pinned outputs for a fixed predictor and seed: a regression snapshot, not an independent
    check. The numbers were recorded from the code after the independent tests above passed;
    they pin the exact numbers against unintended changes."""
    model = OptimalNoisePredictor(GaussianMixture(torch.tensor([[-0.5, 0.5]]), 0.4), linear)
    outputs = []
    for sampler, kwargs in ((dpm_solver_sample, {}), (heun_sample, {})):
        draw = sampler(
            model, linear, (2, 2), steps=8, generator=torch.Generator().manual_seed(0), **kwargs
        )
        outputs.append(draw.flatten().tolist())
    assert outputs[0] == pytest.approx(GOLDEN_DPM_SOLVER, abs=1e-5)
    assert outputs[1] == pytest.approx(GOLDEN_HEUN, abs=1e-5)


GOLDEN_DPM_SOLVER = [0.122852, 0.380362, -1.0, 0.727999]
GOLDEN_HEUN = [0.331758, 0.340236, -1.0, 0.804471]


@pytest.fixture(scope="module")
def zero_snr() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", 1000, zero_terminal_snr=True)


def test_the_grid_at_zero_terminal_snr_is_spaced_in_time(zero_snr: NoiseSchedule) -> None:
    with pytest.raises(ValueError, match="log-SNR spacing needs a finite log-SNR.*'time'"):
        ode_timesteps(zero_snr, 10, "logsnr")
    assert ode_timesteps(zero_snr, 3).tolist() == [0, 500, 999]  # the default there
    assert ode_timesteps(zero_snr, 3, "time").tolist() == [0, 500, 999]


@pytest.mark.parametrize("order", [1, 2])
def test_dpm_solver_follows_the_exact_flow_from_pure_noise_at_zero_terminal_snr(
    zero_snr: NoiseSchedule, gaussian_x0_model, x_T: torch.Tensor, order: int
) -> None:
    """At alpha = 0 the first step is infinitely long in lambda; its limit must still land on
    the exact flow of Gaussian data, x_T -> MEAN + STD x_T, with the solver's order."""
    model = gaussian_x0_model(zero_snr, MEAN, STD)
    exact = exact_flow(zero_snr, x_T)

    def error(steps: int) -> float:
        samples = dpm_solver_sample(
            model, zero_snr, x_T.shape, steps=steps, order=order, x_T=x_T, clip_x0=None
        )
        assert bool(torch.isfinite(samples).all())
        return float((samples - exact).abs().max())

    # on the grid spaced in time (the default here), four times the steps divide the error by
    # about 4 or 16 (measured: 0.137 -> 0.035 and 0.164 -> 0.011 from 40 to 160 steps)
    coarse, fine = error(40), error(160)
    assert fine < coarse / (3 if order == 1 else 10)
    assert fine < (0.05 if order == 1 else 0.02)


def test_heun_follows_the_exact_flow_from_pure_noise_at_zero_terminal_snr(
    zero_snr: NoiseSchedule, gaussian_x0_model, x_T: torch.Tensor
) -> None:
    """Its first step, from rho = inf, is DDIM's; the trapezoids after it keep the second
    order: four times the steps divide the error by about 16 (measured: 0.0093 -> 0.00058)."""
    model = gaussian_x0_model(zero_snr, MEAN, STD)
    exact = exact_flow(zero_snr, x_T)

    def error(steps: int) -> float:
        samples = heun_sample(model, zero_snr, x_T.shape, steps=steps, x_T=x_T, clip_x0=None)
        assert bool(torch.isfinite(samples).all())
        return float((samples - exact).abs().max())

    coarse, fine = error(40), error(160)
    assert fine < coarse / 10
    assert fine < 0.02


def test_heuns_first_step_from_pure_noise_is_ddims(
    zero_snr: NoiseSchedule, gaussian_x0_model, x_T: torch.Tensor
) -> None:
    model = gaussian_x0_model(zero_snr, MEAN, STD)
    grid = torch.tensor([0, 500, 999])
    states = {
        name: sampler(
            model,
            zero_snr,
            x_T.shape,
            timesteps=grid,
            x_T=x_T,
            clip_x0=None,
            return_trajectory=True,
            **options,
        )[1].states  # fmt: skip
        for name, sampler, options in (
            ("heun", heun_sample, {}),
            ("ddim", dpm_solver_sample, {"order": 1}),
        )
    }
    torch.testing.assert_close(states["heun"][1], states["ddim"][1])  # 999 -> 500
    assert (states["heun"][2] - states["ddim"][2]).abs().max() > 1e-3  # then a trapezoid


def test_first_order_dpm_solver_is_ddim_at_zero_terminal_snr(
    zero_snr: NoiseSchedule, gaussian_x0_model, x_T: torch.Tensor
) -> None:
    model = gaussian_x0_model(zero_snr, MEAN, STD)
    grid = ddim_timesteps(1000, 12, "trailing")
    ours = dpm_solver_sample(
        model, zero_snr, x_T.shape, order=1, timesteps=grid, x_T=x_T, clip_x0=None
    )
    ddim = ddim_sample(
        model, zero_snr, x_T.shape, steps=12, spacing="trailing", x_T=x_T, clip_x0=None
    )
    torch.testing.assert_close(ours, ddim, rtol=1e-10, atol=1e-10)
