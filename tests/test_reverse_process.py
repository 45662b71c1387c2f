"""One reverse step, p_theta(x_{t-1} | x_t), checked against closed forms computed separately."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_lib import NoiseSchedule, p_mean_variance, predict_noise


def test_small_variance_step_is_the_forward_posterior_and_eq_11(linear: NoiseSchedule) -> None:
    """With the true noise, the mean equals both q(x_{t-1} | x_t, x_0)'s mean (Ho et al. 2020,
    eq. 7, coefficients in numpy) and eq. 11's form through the noise; the variance is beta_tilde."""
    betas = np.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = np.cumprod(1 - betas)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 1, 3, 3, dtype=torch.float64, generator=generator) * 1.6 - 0.8
    noise = torch.randn(5, 1, 3, 3, dtype=torch.float64, generator=generator)
    t = torch.tensor([0, 1, 10, 500, 999])
    abar = torch.from_numpy(alphas_cumprod)[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    true_noise = lambda x, step: noise  # noqa: E731
    mean, variance, log_variance, x0_estimate = p_mean_variance(true_noise, linear, x_t, t)
    torch.testing.assert_close(x0_estimate, x0, rtol=0, atol=1e-10)
    for i, step in enumerate(t.tolist()):
        beta, abar_t = betas[step], alphas_cumprod[step]
        abar_prev = alphas_cumprod[step - 1] if step > 0 else 1.0
        posterior = (beta * math.sqrt(abar_prev) * x0[i] + (1 - abar_prev) * math.sqrt(1 - beta)
                     * x_t[i]) / (1 - abar_t)  # fmt: skip
        eq_11 = (x_t[i] - beta / math.sqrt(1 - abar_t) * noise[i]) / math.sqrt(1 - beta)
        torch.testing.assert_close(mean[i], posterior, rtol=0, atol=1e-10)
        torch.testing.assert_close(mean[i], eq_11, rtol=0, atol=1e-10)
        beta_tilde = (1 - abar_prev) / (1 - abar_t) * beta
        assert math.isclose(variance[i].item(), beta_tilde, rel_tol=1e-10, abs_tol=1e-300)
        if step > 0:
            assert math.isclose(log_variance[i].item(), math.log(beta_tilde), rel_tol=1e-10)


def test_guidance_combines_conditional_and_unconditional(linear: NoiseSchedule) -> None:
    """(1 + w) eps(x, c) - w eps(x, null), Ho & Salimans 2021 eq. 6, with a toy predictor."""
    model = lambda x, t, labels: x * 0 + labels.reshape(-1, 1, 1, 1).to(x.dtype)  # noqa: E731
    x, t, labels = torch.zeros(2, 1, 1, 1), torch.tensor([3, 3]), torch.tensor([2, 5])
    guided = predict_noise(model, x, t, labels, guidance=2.0, null_label=10)
    expected = 3.0 * labels.float() - 2.0 * 10.0
    torch.testing.assert_close(guided.flatten(), expected)
    assert math.isclose(predict_noise(model, x, t, labels).flatten()[1].item(), 5.0)


def test_large_variance_is_beta_and_borrows_beta_tilde_at_t0(linear: NoiseSchedule) -> None:
    betas = np.linspace(1e-4, 0.02, 1000)
    t = torch.tensor([0, 1, 37, 999])
    x_t = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    _, variance, log_variance, _ = p_mean_variance(
        lambda x, step: torch.zeros_like(x), linear, x_t, t, variance="large", clip_x0=None
    )
    beta_tilde_1 = betas[1] * betas[0] / (1 - (1 - betas[0]) * (1 - betas[1]))
    expected = np.array([beta_tilde_1, betas[1], betas[37], betas[999]])
    np.testing.assert_allclose(variance.flatten().numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(log_variance.flatten().numpy(), np.log(expected), rtol=1e-10)


@pytest.mark.parametrize(
    ("t", "message"),
    [([-1, 0], r"0\.\.999"), ([0, 1000], r"0\.\.999"), ([0.5, 1.0], "integer"), ([0, 0, 0], "3")],
)
def test_p_mean_variance_checks_its_timesteps(linear: NoiseSchedule, t: list, message: str) -> None:
    # t = -1 used to give the last step's mean without a word, and t = 1000 an IndexError.
    with pytest.raises(ValueError, match=message):
        p_mean_variance(
            lambda x, step: torch.zeros_like(x), linear, torch.zeros(2, 1, 2, 2), torch.tensor(t)
        )
