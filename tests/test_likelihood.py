"""The probability-flow likelihood against closed forms: the divergence against the Jacobian's
trace, Hutchinson's estimate against it on average, and the whole ODE against the exact density
of noised Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_lib import GaussianMixture, NoiseSchedule
from diffusion_lib.likelihood import (
    divergence_exact,
    divergence_hutchinson,
    ode_bits_per_dim,
    ode_log_likelihood,
)

MEAN, STD = 0.3, 0.5


@pytest.fixture(scope="module")
def gaussian(linear: NoiseSchedule):
    """The exact noise predictor of N(MEAN, STD^2) data, in every dimension."""
    return GaussianMixture(torch.full((1, 3), MEAN), STD).optimal_noise_predictor(linear)


def _noised(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    """Mean and variance of N(MEAN, STD^2) data noised to timestep t."""
    alpha_bar = float(schedule.alphas_cumprod[t])
    return math.sqrt(alpha_bar) * MEAN, alpha_bar * STD**2 + 1 - alpha_bar


def _log_normal(x: torch.Tensor, mean: float, variance: float) -> torch.Tensor:
    per_dim = -0.5 * ((x - mean) ** 2 / variance + math.log(2 * math.pi * variance))
    return per_dim.flatten(1).sum(dim=1)


def exact_ode_result(schedule: NoiseSchedule, x: torch.Tensor) -> torch.Tensor:
    """What the ODE computes with the exact denoiser, in closed form.

    The flow keeps z = (x - m_t) / sqrt(v_t) fixed, so x_0 = x lands on x_T = m_T + sqrt(v_T) z,
    and the density changes exactly as q_t does: the result is log q_0(x) with the prior
    N(0, I) in place of q_T at x_T (they differ by alpha_bar_T = 4e-5, about 1e-4 nats).
    """
    (m_0, v_0), (m_T, v_T) = _noised(schedule, 0), _noised(schedule, schedule.timesteps - 1)
    x_T = m_T + math.sqrt(v_T) * (x - m_0) / math.sqrt(v_0)
    return _log_normal(x, m_0, v_0) - _log_normal(x_T, m_T, v_T) + _log_normal(x_T, 0.0, 1.0)


def test_exact_divergence_is_the_trace_of_the_jacobian() -> None:
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def function(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight) * x

    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    value, divergence = divergence_exact(function, x)
    for b in range(5):
        jacobian = torch.autograd.functional.jacobian(function, x[b : b + 1]).reshape(4, 4)
        assert float(divergence[b]) == pytest.approx(float(jacobian.trace()), rel=1e-12)
    torch.testing.assert_close(value, function(x))


def test_hutchinson_estimate_averages_to_the_trace() -> None:
    matrix = torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = torch.zeros(20_000, 6, dtype=torch.float64)
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(3))
    probe = (2 * signs - 1).double()
    _, estimates = divergence_hutchinson(lambda v: v @ matrix.T, x, probe)
    error = float(estimates.std() / math.sqrt(len(estimates)))
    assert abs(float(estimates.mean()) - float(matrix.trace())) < 4 * error
    # with Rademacher probes a diagonal Jacobian is estimated without any variance
    _, diagonal = divergence_hutchinson(lambda v: 3.0 * v, x[:10], probe[:10])
    torch.testing.assert_close(diagonal, torch.full((10,), 18.0, dtype=torch.float64))


@pytest.mark.parametrize("spacing", ["logsnr", "time"])
def test_ode_likelihood_is_the_exact_density_of_noised_gaussian_data(
    linear: NoiseSchedule, gaussian, spacing: str
) -> None:
    """With the exact denoiser the ODE's density at t = 0 is q_0 itself, up to the prior;
    Heun's error falls about fourfold per doubling of the steps."""
    x = MEAN + STD * torch.randn(
        200, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    exact = exact_ode_result(linear, x)

    def error(steps: int) -> float:
        ours = ode_log_likelihood(
            gaussian, linear, x, steps=steps, spacing=spacing, divergence="exact"
        )
        return float((ours - exact).abs().max())

    coarse, fine = error(100), error(400)
    assert fine < 3e-3  # nats, for three dimensions
    assert fine < coarse / 8


def test_hutchinson_likelihood_is_unbiased(linear: NoiseSchedule) -> None:
    # two components, so that the denoiser's Jacobian is not diagonal and the probes matter
    means = torch.tensor([[-0.5, 0.3, 0.1], [0.6, -0.2, 0.4]], dtype=torch.float64)
    mixture = GaussianMixture(means, 0.4).optimal_noise_predictor(linear)
    x = torch.tensor([[0.1, 0.2, 0.0]], dtype=torch.float64).expand(3000, 3)
    exact = ode_log_likelihood(mixture, linear, x[:1], steps=50, divergence="exact")
    estimates = ode_log_likelihood(
        mixture, linear, x, steps=50, generator=torch.Generator().manual_seed(5)
    )
    error = float(estimates.std() / math.sqrt(len(estimates)))
    assert error > 1e-3  # the probes do vary
    assert abs(float(estimates.mean()) - float(exact)) < 4 * error


def test_bits_per_dim_average_the_dequantised_density_and_bound_the_discrete_likelihood(
    linear: NoiseSchedule, gaussian
) -> None:
    """For Gaussian q_0, E_u[-log q_0(x + u)] = log-normaliser + ((x - m)^2 + w^2 / 12) / (2 v)
    per pixel; the bound must average to it and lie above -log P(bin), from the normal CDF."""
    width = 0.2  # wide bins, so that the gap of Jensen's inequality shows
    x = torch.tensor([[0.2, 0.6, -0.2]], dtype=torch.float64).expand(4000, 3)
    bits = ode_bits_per_dim(
        gaussian, linear, x, bin_width=width, steps=400, spacing="time", divergence="exact",
        generator=torch.Generator().manual_seed(6),
    )  # fmt: skip
    alpha_bar = float(linear.alphas_cumprod[0])
    m, v = math.sqrt(alpha_bar) * MEAN, alpha_bar * STD**2 + 1 - alpha_bar
    point = x[0]
    expected_nats = 0.5 * math.log(2 * math.pi * v) + ((point - m) ** 2 + width**2 / 12) / (2 * v)
    expected = float((expected_nats.mean() - math.log(width)) / math.log(2))
    error = float(bits.std() / math.sqrt(len(bits)))
    # + the ODE's own error, about 1e-3 nats over the 3 dimensions at 400 steps
    assert abs(float(bits.mean()) - expected) < 4 * error + 1e-3
    normal = torch.distributions.Normal(m, math.sqrt(v))
    probability = normal.cdf(point + width / 2) - normal.cdf(point - width / 2)
    discrete = float(-probability.log().mean() / math.log(2))
    assert discrete < float(bits.mean()) < discrete + 0.01


def test_likelihood_leaves_the_model_as_it_was(linear: NoiseSchedule) -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.layer(x) * (t[:, None] / 1000)

    model = Tiny().train()
    x = torch.randn(4, 3)
    result = ode_log_likelihood(
        model, linear, x, steps=5, generator=torch.Generator().manual_seed(7)
    )
    assert result.shape == (4,) and bool(torch.isfinite(result).all())
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, s: ode_log_likelihood(m, s, torch.zeros(2, 3), steps=1), "at least 2"),
        (lambda m, s: ode_log_likelihood(m, s, torch.zeros(2, 3), divergence="x"), "divergence"),
        (
            lambda m, s: ode_log_likelihood(
                m,
                NoiseSchedule.from_name("linear", 1000, zero_terminal_snr=True),
                torch.zeros(2, 3),
            ),
            "alpha_bar = 0",
        ),
        (
            lambda m, s: ode_log_likelihood(
                lambda x, t: torch.cat([x, x], 1), s, torch.zeros(2, 3)
            ),
            "as many channels as the data",
        ),
        (lambda m, s: ode_bits_per_dim(m, s, torch.zeros(2, 3), bin_width=0), "bin_width"),
        (lambda m, s: ode_log_likelihood(m, s, torch.full((2, 3), math.nan)), "finite"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(linear, gaussian, call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call(gaussian, linear)


def test_heun_error_estimate_is_second_order(linear: NoiseSchedule, gaussian) -> None:
    x = MEAN + STD * torch.randn(
        50, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64
    )
    exact = exact_ode_result(linear, x)
    errors = [
        float(
            (ode_log_likelihood(gaussian, linear, x, steps=s, divergence="exact") - exact)
            .abs()
            .mean()
        )
        for s in (25, 50, 100)
    ]
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert (ratios > 3).all(), errors
