"""NoiseSchedule against closed forms computed independently in NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_lib import SCHEDULES, NoiseSchedule, rescale_zero_terminal_snr, shift_snr
from diffusion_lib.schedules import linear_betas

NAMES = sorted(SCHEDULES)


@pytest.fixture(params=NAMES)
def schedule(request: pytest.FixtureRequest) -> NoiseSchedule:
    return NoiseSchedule.from_name(request.param, timesteps=1000)


def test_invariants(schedule: NoiseSchedule) -> None:
    assert schedule.timesteps == 1000
    for table in (schedule.betas, schedule.alphas, schedule.alphas_cumprod):
        assert table.shape == (1000,) and table.dtype == torch.float64
    assert ((schedule.betas > 0) & (schedule.betas < 1)).all()
    assert (schedule.alphas_cumprod.diff() < 0).all(), "alpha-bar must strictly decrease"
    assert schedule.alphas_cumprod[-1] < 1e-3, "x_T must be nearly pure noise"
    torch.testing.assert_close(schedule.alphas, 1 - schedule.betas)
    torch.testing.assert_close(
        schedule.signal_to_noise_ratio, schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
    )


def test_linear_values_at_known_points() -> None:
    schedule = NoiseSchedule.from_name("linear")
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-10)
    # Ho et al.'s schedule leaves alpha-bar_T around 4e-5: almost no signal at the end.
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)


def test_quadratic_has_linear_square_roots() -> None:
    schedule = NoiseSchedule.from_name("quadratic", timesteps=50)
    roots = schedule.betas.sqrt().numpy()
    np.testing.assert_allclose(np.diff(roots), np.full(49, np.diff(roots)[0]), rtol=1e-9)
    assert roots[0] == pytest.approx(math.sqrt(1e-4)) and roots[-1] == pytest.approx(
        math.sqrt(0.02)
    )


def test_cosine_matches_the_defining_formula() -> None:
    T, s = 1000, 0.008
    schedule = NoiseSchedule.from_name("cosine", timesteps=T)
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    expected = f[1:] / f[0]
    unclipped = schedule.betas.numpy() < 0.999
    np.testing.assert_allclose(
        schedule.alphas_cumprod.numpy()[unclipped], expected[unclipped], rtol=1e-9
    )
    assert schedule.betas.max().item() == pytest.approx(0.999)


def test_keyword_arguments_reach_the_schedule() -> None:
    schedule = NoiseSchedule.from_name("linear", timesteps=10, beta_start=0.001, beta_end=0.1)
    assert schedule.betas[0].item() == pytest.approx(0.001)
    assert schedule.betas[-1].item() == pytest.approx(0.1)


@pytest.mark.parametrize("name", NAMES)
def test_used_in_the_inputs_dtype(name: str) -> None:
    schedule = NoiseSchedule.from_name(name, timesteps=100)
    t = torch.tensor([0, 99])
    for dtype in (torch.float32, torch.float64):
        x0 = torch.randn(2, 1, 4, 4, dtype=dtype)
        assert schedule.q_sample(x0, t).dtype == dtype
        mean, variance, log_variance = schedule.q_posterior(x0, x0, t)
        assert mean.dtype == variance.dtype == log_variance.dtype == dtype


def test_to_moves_every_table() -> None:
    schedule = NoiseSchedule.from_name("linear", timesteps=10)
    assert schedule.to("cpu") is schedule
    moved = schedule.to(torch.device("meta"))
    tables = [v for v in vars(moved).values() if isinstance(v, torch.Tensor)]
    assert len(tables) >= 10 and all(v.device.type == "meta" for v in tables)
    assert moved.timesteps == 10 and moved.zero_terminal_snr is False


def test_q_sample_statistics_match_the_closed_form(schedule: NoiseSchedule) -> None:
    """Monte Carlo mean and variance of x_t for a fixed x_0 (Ho et al. eq. 4), each to 5 standard
    errors of n draws. x_0 is chosen per step so that the mean sqrt(alpha_bar) x_0 is 0.7: with a
    fixed x_0 = 0.7 the mean at t = 999 (alpha_bar ~ 4e-5 on the linear schedule) would lie
    below the tolerance, and dropping the signal there would pass."""
    n = 200_000
    generator = torch.Generator().manual_seed(0)
    for step in (0, 300, 999):
        alpha_bar = schedule.alphas_cumprod[step].item()
        x0 = torch.full((n, 1), 0.7 / math.sqrt(alpha_bar), dtype=torch.float64)
        x_t = schedule.q_sample(x0, torch.full((n,), step), generator=generator)
        variance = 1 - alpha_bar
        assert abs(x_t.mean().item() - 0.7) < 5 * math.sqrt(variance / n)
        assert abs(x_t.var().item() / variance - 1) < 5 * math.sqrt(2 / n)


def test_markov_chain_and_closed_form_agree() -> None:
    """Running q(x_t | x_{t-1}) step by step gives the law of q(x_t | x_0)."""
    schedule = NoiseSchedule.from_name("linear", timesteps=200)
    n, x0 = 100_000, 0.5
    x = torch.full((n,), x0, dtype=torch.float64)
    for beta in schedule.betas:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(n, dtype=torch.float64)
    alpha_bar = schedule.alphas_cumprod[-1].item()
    assert x.mean().item() == pytest.approx(math.sqrt(alpha_bar) * x0, abs=0.015)
    assert x.var().item() == pytest.approx(1 - alpha_bar, rel=0.02)


def test_posterior_matches_bayes_rule(schedule: NoiseSchedule) -> None:
    """Multiply the Gaussians q(x_t | x_{t-1}) and q(x_{t-1} | x_0) and normalise (precision form)."""
    t = torch.tensor([1, 10, 500, 999])
    x0 = torch.tensor([0.3, -0.8, 1.0, 0.1], dtype=torch.float64).reshape(4, 1)
    x_t = torch.tensor([0.1, 0.4, -1.2, 2.0], dtype=torch.float64).reshape(4, 1)
    mean, variance, log_variance = schedule.q_posterior(x0, x_t, t)
    a = schedule.alphas.numpy()[t]
    ab_prev = schedule.alphas_cumprod.numpy()[t - 1]
    b = schedule.betas.numpy()[t]
    precision = 1 / (1 - ab_prev) + a / b
    expected_var = 1 / precision
    expected_mean = expected_var * (
        np.sqrt(ab_prev) * x0.numpy()[:, 0] / (1 - ab_prev) + np.sqrt(a) * x_t.numpy()[:, 0] / b
    )
    np.testing.assert_allclose(mean.numpy()[:, 0], expected_mean, rtol=1e-9)
    np.testing.assert_allclose(variance.numpy()[:, 0], expected_var, rtol=1e-9)
    np.testing.assert_allclose(log_variance.numpy()[:, 0], np.log(expected_var), rtol=1e-9)


def test_posterior_against_monte_carlo() -> None:
    """Sample (x_{t-1}, x_t) jointly from the forward process and regress x_{t-1} on x_t by least
    squares: the slope is posterior_mean_coef2, the intercept posterior_mean_coef1 x_0 and the
    residual variance beta_tilde (Ho et al. eqs. 6-7). Slope and intercept are checked to 5 of
    their standard errors, the residual variance to 5 sqrt(2 / n) relative; the intercept is
    about 17 standard errors from 0, so a posterior mean without its x_0 term fails."""
    schedule = NoiseSchedule.from_name("linear", timesteps=1000)
    step, n, x0_value = 400, 400_000, 0.6
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((n,), x0_value, dtype=torch.float64)
    x_prev = schedule.q_sample(x0, torch.full((n,), step - 1), generator=generator)
    beta = schedule.betas[step]
    noise = torch.randn(n, generator=generator, dtype=torch.float64)
    x_t = (1 - beta).sqrt() * x_prev + beta.sqrt() * noise
    # Ordinary least squares of x_prev on (1, x_t), with the textbook standard errors.
    x_mean, x_var = x_t.mean(), (x_t - x_t.mean()).pow(2).mean()
    slope = ((x_t - x_mean) * (x_prev - x_prev.mean())).mean() / x_var
    intercept = x_prev.mean() - slope * x_mean
    residual_var = (x_prev - intercept - slope * x_t).pow(2).sum().item() / (n - 2)
    slope_se = math.sqrt(residual_var / (n * x_var.item()))
    intercept_se = math.sqrt(residual_var * (1 / n + x_mean.item() ** 2 / (n * x_var.item())))
    mean, variance, _ = schedule.q_posterior(x0[:1], torch.zeros(1), torch.tensor([step]))
    assert abs(slope.item() - schedule.posterior_mean_coef2[step].item()) < 5 * slope_se
    assert abs(intercept.item() - mean.item()) < 5 * intercept_se
    assert abs(residual_var / variance.item() - 1) < 5 * math.sqrt(2 / n)


def test_posterior_at_the_first_step_returns_x0() -> None:
    schedule = NoiseSchedule.from_name("cosine", timesteps=100)
    x0, x_t = torch.randn(3, 2), torch.randn(3, 2)
    mean, variance, log_variance = schedule.q_posterior(x0, x_t, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (variance == 0).all() and torch.isfinite(log_variance).all()


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    timesteps=st.integers(1, 2000),
    fraction=st.floats(0, 1, exclude_max=True),
)
def test_predict_x0_inverts_q_sample(name: str, timesteps: int, fraction: float) -> None:
    schedule = NoiseSchedule.from_name(name, timesteps=timesteps)
    t = torch.tensor([int(fraction * timesteps)] * 2)
    x0, noise = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    x_t = schedule.q_sample(x0, t, noise)
    # Near alpha-bar = 0 the inversion divides by a tiny number, so compare relative to it.
    tolerance = 1e-9 / schedule.sqrt_alphas_cumprod[t[0]].item()
    torch.testing.assert_close(schedule.predict_x0(x_t, t, noise), x0, rtol=0, atol=tolerance)
    torch.testing.assert_close(schedule.predict_eps(x_t, t, x0), noise, rtol=0, atol=tolerance)


# ----------------------------------------------------------------------------- bad input
def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'cosin'.*cosine, linear, quadratic"):
        NoiseSchedule.from_name("cosin")


@pytest.mark.parametrize("timesteps", [0, -5, 2.5, True])
def test_bad_timestep_counts(timesteps: object) -> None:
    with pytest.raises(ValueError, match="timesteps must be an integer >= 1"):
        NoiseSchedule.from_name("linear", timesteps=timesteps)  # type: ignore[arg-type]


def test_bad_keyword_is_named() -> None:
    with pytest.raises(ValueError, match="bad keyword arguments for the 'cosine' schedule"):
        NoiseSchedule.from_name("cosine", beta_start=0.1)


@pytest.mark.parametrize("betas", [[1.0, 0.1], [0.1, 1.5], [0.0, 0.1], [float("nan")], [[0.1]]])
def test_bad_betas(betas: list) -> None:
    with pytest.raises(ValueError, match="beta"):
        NoiseSchedule(torch.tensor(betas))


@pytest.mark.parametrize(
    ("t", "message"),
    [
        (torch.tensor([0, 10]), r"0\.\.9 \(0-based, T=10\)"),
        (torch.tensor([-1, 0]), r"0\.\.9"),
        (torch.tensor([0.0, 1.0]), "integer timesteps"),
        (torch.tensor([1]), "t has 1 entries but the batch has 2"),
        (torch.tensor([[1, 2]]), r"shape \(B,\)"),
    ],
)
def test_bad_timesteps(t: torch.Tensor, message: str) -> None:
    schedule = NoiseSchedule.from_name("linear", timesteps=10)
    with pytest.raises(ValueError, match=message):
        schedule.q_sample(torch.zeros(2, 3), t)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_images_are_refused_by_the_forward_process(dtype: torch.dtype) -> None:
    # uint8 used to fail inside the random number generator, and int64 with noise given came
    # back as all zeros: sqrt(alpha_bar) rounded to an integer.
    schedule = NoiseSchedule.from_name("linear", timesteps=10)
    x0, t = torch.full((2, 3), 200).to(dtype), torch.tensor([1, 2])
    message = r"x0 must be floating point \(pixels scaled to \[-1, 1\], as load_images"
    for call in (
        lambda: schedule.q_sample(x0, t),
        lambda: schedule.q_sample(x0, t, torch.randn(2, 3)),
        lambda: schedule.q_mean_variance(x0, t),
    ):
        with pytest.raises(ValueError, match=message + f" gives them\\); got {dtype}"):
            call()


def test_uint8_timesteps_are_refused_rather_than_read_as_a_mask() -> None:
    # With as many samples as timesteps, a uint8 t of ones selected every table entry, in order.
    schedule = NoiseSchedule.from_name("linear", timesteps=10)
    with pytest.raises(ValueError, match=r"uint8 tensor indexes as a mask\); pass t\.long\(\)"):
        schedule.q_sample(torch.zeros(10, 3), torch.ones(10, dtype=torch.uint8))


def test_a_generator_in_the_noises_place_or_a_seed_is_refused() -> None:
    schedule = NoiseSchedule.from_name("linear", timesteps=10)
    x0, t = torch.zeros(2, 3), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="noise must be a tensor .*pass a generator by keyword"):
        schedule.q_sample(x0, t, torch.Generator())
    with pytest.raises(ValueError, match=r"generator must be a torch\.Generator.*got int"):
        schedule.q_sample(x0, t, generator=0)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("linear", {"beta_start": 0.02, "beta_end": 1e-4}, "beta_start must not exceed beta_end"),
        ("quadratic", {"beta_start": 0.02, "beta_end": 1e-4}, "beta_start must not exceed"),
        ("linear", {"beta_start": 0.0}, r"beta_start must lie in \(0.0, 1.0\], got 0.0"),
        ("linear", {"beta_end": 1.5}, r"beta_end must lie in \(0.0, 1.0\], got 1.5"),
        ("cosine", {"max_beta": 1.5}, r"max_beta must lie in \(0.0, 1.0\], got 1.5"),
        ("cosine", {"max_beta": 0.0}, r"max_beta must lie in \(0.0, 1.0\], got 0.0"),
    ],
)
def test_bad_schedule_parameters(name: str, options: dict, message: str) -> None:
    # A decreasing linear range used to be accepted silently.
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.from_name(name, **options)


def test_a_constant_schedule_is_still_allowed() -> None:
    schedule = NoiseSchedule.from_name("linear", timesteps=5, beta_start=0.01, beta_end=0.01)
    torch.testing.assert_close(schedule.betas, torch.full((5,), 0.01, dtype=torch.float64))


def test_shape_mismatch_and_non_finite_inputs() -> None:
    schedule = NoiseSchedule.from_name("linear", timesteps=10)
    t = torch.tensor([1, 2])
    with pytest.raises(
        ValueError, match=r"noise must have the shape of x0, \(2, 3\); got \(2, 4\)"
    ):
        schedule.q_sample(torch.zeros(2, 3), t, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="x0 must be finite, but 2 of its 6 values"):
        schedule.q_sample(torch.tensor([[0.0, float("nan"), 0.0]] * 2), t)
    with pytest.raises(ValueError, match="eps must be finite"):
        schedule.predict_x0(torch.zeros(2, 3), t, torch.full((2, 3), float("inf")))
    with pytest.raises(ValueError, match="x_t must have the shape of x0"):
        schedule.q_posterior(torch.zeros(2, 3), torch.zeros(3, 3), t)


# ---------------------------------------------------------------- score and velocity


def test_score_from_eps_is_the_score_of_gaussian_data_by_monte_carlo() -> None:
    """Data x0 ~ N(m, s^2): regress eps on x_t by Monte Carlo (E[eps | x_t] is linear here),
    turn the fit into a score and compare with the autograd gradient of log N(x_t; ...)."""
    schedule = NoiseSchedule.from_name("linear")
    generator = torch.Generator().manual_seed(0)
    mean, std, n = 0.7, 0.4, 400_000
    for step in (50, 300, 800):
        alpha_bar = schedule.alphas_cumprod[step].item()
        x0 = mean + std * torch.randn(n, 1, generator=generator, dtype=torch.float64)
        eps = torch.randn(n, 1, generator=generator, dtype=torch.float64)
        t = torch.full((n,), step)
        x_t = schedule.q_sample(x0, t, noise=eps)
        design = torch.cat([x_t, torch.ones_like(x_t)], dim=1)
        slope, intercept = torch.linalg.lstsq(design, eps).solution.flatten()
        points = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)[:, None].requires_grad_()
        variance = alpha_bar * std**2 + 1 - alpha_bar
        log_density = -((points - math.sqrt(alpha_bar) * mean) ** 2) / (2 * variance)
        (exact,) = torch.autograd.grad(log_density.sum(), points)
        fitted_eps = slope * points.detach() + intercept
        score = schedule.score_from_eps(torch.full((7,), step), fitted_eps)
        torch.testing.assert_close(score, exact, atol=0.01 * exact.abs().max(), rtol=0.0)


def test_eps_from_score_inverts_score_from_eps(schedule: NoiseSchedule) -> None:
    eps = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    torch.testing.assert_close(schedule.eps_from_score(t, schedule.score_from_eps(t, eps)), eps)


def test_velocity_is_the_derivative_along_the_circle() -> None:
    """With x(phi) = cos(phi) x0 + sin(phi) eps and alpha_bar = cos^2(phi), v = dx/dphi
    (Salimans & Ho 2022): compare with a central finite difference in phi."""
    schedule = NoiseSchedule.from_name("cosine")
    x0, eps = torch.randn(2, 5, 3, dtype=torch.float64)
    for step in (3, 400, 990):
        phi = math.acos(schedule.sqrt_alphas_cumprod[step].item())
        h = 1e-6
        derivative = (
            (math.cos(phi + h) - math.cos(phi - h)) * x0
            + (math.sin(phi + h) - math.sin(phi - h)) * eps
        ) / (2 * h)
        v = schedule.velocity(x0, torch.full((5,), step), eps)
        torch.testing.assert_close(v, derivative, atol=1e-8, rtol=1e-6)


def test_x0_and_eps_from_velocity_recover_both(schedule: NoiseSchedule) -> None:
    x0, eps = torch.randn(2, 4, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([0, 200, 700, 999])
    x_t = schedule.q_sample(x0, t, noise=eps)
    x0_back, eps_back = schedule.x0_and_eps_from_velocity(x_t, t, schedule.velocity(x0, t, eps))
    torch.testing.assert_close(x0_back, x0)
    torch.testing.assert_close(eps_back, eps)


def test_errors_of_the_three_targets_differ_by_snr_weights(schedule: NoiseSchedule) -> None:
    """For one x_t, an error in eps is an error in x0 scaled by 1/SNR and in v by 1/alpha_bar
    (squared), the weights behind the choice of prediction target."""
    x0, eps, eps_hat = torch.randn(3, 8, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 250, 500, 750, 900, 999])
    x_t = schedule.q_sample(x0, t, noise=eps)
    x0_hat = schedule.predict_x0(x_t, t, eps_hat)
    alpha, sigma = schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]
    v_hat = (eps_hat - sigma[:, None] * x_t) / alpha[:, None]  # eps = sigma x_t + alpha v
    eps_error = (eps_hat - eps).pow(2).sum(1)
    snr = schedule.signal_to_noise_ratio[t]
    torch.testing.assert_close((x0_hat - x0).pow(2).sum(1), eps_error / snr)
    v_error = (v_hat - schedule.velocity(x0, t, eps)).pow(2).sum(1)
    torch.testing.assert_close(v_error, eps_error / schedule.alphas_cumprod[t])


def test_parameterisations_check_their_input() -> None:
    schedule = NoiseSchedule.from_name("linear", timesteps=10)
    with pytest.raises(ValueError, match="0..9"):
        schedule.score_from_eps(torch.tensor([10]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="shape"):
        schedule.velocity(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one timestep per sample"):
        schedule.x0_and_eps_from_velocity(torch.zeros(2, 3), torch.tensor([0]), torch.zeros(2, 3))


# ---------------------------------------------------------------------- zero terminal SNR, shifts
STABLE_DIFFUSION = {"beta_start": 0.00085, "beta_end": 0.012}


def _rescaled_by_hand(betas: list[float]) -> list[float]:
    """Lin et al. 2024, Algorithm 1, written with Python floats, step by step."""
    alphas_bar, product = [], 1.0
    for beta in betas:
        product *= 1.0 - beta
        alphas_bar.append(product)
    roots = [math.sqrt(a) for a in alphas_bar]
    first, last = roots[0], roots[-1]
    roots = [(r - last) * first / (first - last) for r in roots]
    alphas_bar = [r * r for r in roots]
    alphas = [alphas_bar[0]] + [b / a for a, b in zip(alphas_bar[:-1], alphas_bar[1:], strict=True)]
    return [1.0 - a for a in alphas]


def test_stable_diffusions_schedule_leaks_the_signal_lin_et_al_report() -> None:
    """Lin et al. (2024, sec. 3.1): sqrt(alpha_bar_T) = 0.068265 for Stable Diffusion."""
    schedule = NoiseSchedule.from_name("quadratic", **STABLE_DIFFUSION)
    assert schedule.sqrt_alphas_cumprod[-1].item() == pytest.approx(0.068265, abs=5e-7)
    assert schedule.zero_terminal_snr is False


@pytest.mark.parametrize("name", ["linear", "cosine", "quadratic"])
def test_rescaling_matches_algorithm_1_and_ends_in_pure_noise(name: str) -> None:
    original = NoiseSchedule.from_name(name, 1000)
    betas = rescale_zero_terminal_snr(original.betas)
    expected = torch.tensor(_rescaled_by_hand(original.betas.tolist()), dtype=torch.float64)
    torch.testing.assert_close(betas, expected, rtol=1e-9, atol=1e-12)
    schedule = NoiseSchedule(betas)
    assert schedule.zero_terminal_snr is True
    assert betas[-1].item() == 1.0 and schedule.alphas_cumprod[-1].item() == 0.0
    assert schedule.signal_to_noise_ratio[-1].item() == 0.0
    # The first step keeps its alpha-bar, and sqrt(alpha_bar) stays an affine map of the old one.
    assert schedule.alphas_cumprod[0].item() == pytest.approx(original.alphas_cumprod[0].item())
    old, new = original.sqrt_alphas_cumprod, schedule.sqrt_alphas_cumprod
    slope = (new[0] - new[-1]) / (old[0] - old[-1])
    torch.testing.assert_close(new, slope * (old - old[-1]), rtol=1e-9, atol=1e-12)
    assert bool((schedule.betas[:-1] < 1).all()) and bool((schedule.betas > 0).all())


def test_at_zero_terminal_snr_x_T_is_the_noise_alone() -> None:
    schedule = NoiseSchedule.from_name("linear", 100, zero_terminal_snr=True)
    x0, noise = (
        torch.randn(3, 1, 4, 4, dtype=torch.float64),
        torch.randn(3, 1, 4, 4, dtype=torch.float64),
    )
    x_T = schedule.q_sample(x0, torch.full((3,), 99), noise)
    assert torch.equal(x_T, noise)
    # The posterior at t = T is the prior of x_{T-1} given x_0: mean sqrt(abar_{T-1}) x0.
    mean, variance, _ = schedule.q_posterior(x0, x_T, torch.full((3,), 99))
    torch.testing.assert_close(mean, schedule.sqrt_alphas_cumprod[-2] * x0)
    torch.testing.assert_close(variance.flatten(), (1 - schedule.alphas_cumprod[-2]).expand(3))


def test_rescaling_is_idempotent_and_needs_two_steps() -> None:
    once = rescale_zero_terminal_snr(linear_betas(50))
    torch.testing.assert_close(rescale_zero_terminal_snr(once), once)
    with pytest.raises(ValueError, match="at least 2 timesteps"):
        rescale_zero_terminal_snr(torch.tensor([0.1]))
    with pytest.raises(ValueError, match="the last beta may be 1 .* but not more"):
        rescale_zero_terminal_snr(torch.tensor([0.1, 1.2]))


@pytest.mark.parametrize("scale", [0.5, 2.0, 8.0])
def test_shift_divides_every_snr_by_the_square_of_the_scale(scale: float) -> None:
    original = NoiseSchedule.from_name("cosine", 200)
    shifted = NoiseSchedule(shift_snr(original.betas, scale))
    ratio = shifted.signal_to_noise_ratio / original.signal_to_noise_ratio
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / scale**2), rtol=1e-9, atol=0)
    same = NoiseSchedule.from_name("cosine", 200, snr_scale=scale)
    torch.testing.assert_close(same.betas, shifted.betas)


def test_shift_then_rescale_when_both_are_asked_for() -> None:
    """from_name shifts the SNR first, then rescales to zero terminal SNR: by hand, each
    alpha-bar becomes abar / (abar + s^2 (1 - abar)) (SNR divided by s^2), then Algorithm 1."""
    scale = 2.0
    original = NoiseSchedule.from_name("linear", 300)
    alphas_bar = [float(a) for a in original.alphas_cumprod]
    shifted_bar = [a / (a + scale**2 * (1 - a)) for a in alphas_bar]
    shifted_betas = [1 - shifted_bar[0]] + [
        1 - b / a for a, b in zip(shifted_bar[:-1], shifted_bar[1:], strict=True)
    ]
    expected = torch.tensor(_rescaled_by_hand(shifted_betas), dtype=torch.float64)
    both = NoiseSchedule.from_name("linear", 300, snr_scale=scale, zero_terminal_snr=True)
    torch.testing.assert_close(both.betas, expected, rtol=1e-9, atol=1e-12)
    assert both.zero_terminal_snr is True


def test_averaging_blocks_raises_the_snr_by_their_size_and_the_shift_undoes_it() -> None:
    """Monte Carlo: a 4x-upsampled image, noised and then average-pooled over 4x4 blocks, has
    4^2 times the SNR of the image noised at 28x28; shifting the schedule by 4 restores it."""
    generator = torch.Generator().manual_seed(0)
    small = torch.rand(64, 1, 7, 7, generator=generator, dtype=torch.float64) * 2 - 1
    large = small.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    t = torch.full((64,), 300)
    for schedule, factor in [
        (NoiseSchedule.from_name("linear", 1000), 16.0),
        (NoiseSchedule.from_name("linear", 1000, snr_scale=4.0), 1.0),
    ]:
        base = NoiseSchedule.from_name("linear", 1000)
        noisy = schedule.q_sample(large, t, generator=generator)
        pooled = torch.nn.functional.avg_pool2d(noisy, 4)
        alpha = schedule.sqrt_alphas_cumprod[300]
        noise_variance = (pooled - alpha * small).var().item()
        pooled_snr = alpha.item() ** 2 / noise_variance
        # 3,136 residuals: the variance is within 10% with overwhelming probability.
        assert pooled_snr == pytest.approx(factor * base.signal_to_noise_ratio[300].item(), rel=0.1)


def test_bad_shift_and_zero_snr_options() -> None:
    with pytest.raises(ValueError, match=r"scale must lie in \(0.0, inf\), got 0.0"):
        shift_snr(linear_betas(10), 0.0)
    with pytest.raises(ValueError, match="scale must be a number and finite, got inf"):
        shift_snr(linear_betas(10), math.inf)
    with pytest.raises(ValueError, match="snr_scale must be a number and finite, got True"):
        NoiseSchedule.from_name("linear", 10, snr_scale=True)
    with pytest.raises(ValueError, match=r"snr_scale must lie in \(0.0, inf\), got -2"):
        NoiseSchedule.from_name("linear", 10, snr_scale=-2)
    with pytest.raises(ValueError, match="zero_terminal_snr must be True or False"):
        NoiseSchedule.from_name("linear", 10, zero_terminal_snr="yes")


def test_q_mean_variance_is_the_closed_form_of_eq_4() -> None:
    schedule = NoiseSchedule.from_name("cosine", timesteps=100)
    x0 = torch.tensor([[0.3, -0.7], [1.0, 0.2], [-0.5, 0.9]], dtype=torch.float64)
    t = torch.tensor([0, 40, 99])
    mean, variance = schedule.q_mean_variance(x0, t)
    alpha_bar = np.cumprod(1 - schedule.betas.numpy())[t.numpy()]
    expected_mean = np.sqrt(alpha_bar)[:, None] * x0.numpy()
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-12, atol=0)
    assert variance.shape == (3, 1)
    np.testing.assert_allclose(variance.numpy()[:, 0], 1 - alpha_bar, rtol=1e-12)
