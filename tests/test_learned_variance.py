"""Learned variances (Nichol & Dhariwal 2021) against closed forms of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lib import (
    NoiseOnly,
    NoiseSchedule,
    ddim_sample,
    ddpm_sample,
    elbo_bits_per_dim,
    learned_log_variance,
    p_mean_variance,
    predict_noise,
    respace,
    split_eps_and_v,
    variance_fraction,
)

MEAN, STD = 0.3, 0.5  # every pixel of the toy data is N(MEAN, STD^2)


def hand_betas_and_posterior(betas: list[float]) -> tuple[list[float], list[float]]:
    """beta_t and beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) with plain floats."""
    product, previous, tilde = 1.0, 1.0, []
    for beta in betas:
        product *= 1.0 - beta
        tilde.append(beta * (1.0 - previous) / (1.0 - product))
        previous = product
    return betas, tilde


def gaussian_posterior_eps(abar: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] for N(MEAN, STD^2) pixels: x_t and eps are jointly Gaussian."""
    return (1 - abar).sqrt() * (x_t - abar.sqrt() * MEAN) / (abar * STD**2 + 1 - abar)


class GaussianOracle(torch.nn.Module):
    """The exact eps and the exact reverse variance of Gaussian data, on a respaced chain.

    The true reverse step q(x_{s-1} | x_s) of N(MEAN, STD^2) data is Gaussian with variance
    beta_tilde_s + c_1^2 Var[x_0 | x_s], where c_1 is the posterior mean's coefficient of x_0
    and Var[x_0 | x_s] = STD^2 (1 - abar) / (abar STD^2 + 1 - abar). Solving eq. 15 for v gives
    the variance channel that reproduces it.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        super().__init__()
        self.chain, kept = respace(schedule, steps)
        self.index_of = {int(t): i for i, t in enumerate(kept)}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        index = torch.tensor([self.index_of[int(step)] for step in t])
        chain = self.chain
        abar = chain.alphas_cumprod[index].reshape(-1, 1, 1, 1)
        x0_variance = STD**2 * (1 - abar) / (abar * STD**2 + 1 - abar)
        true_variance = chain.posterior_variance[index].reshape(-1, 1, 1, 1) + (
            chain.posterior_mean_coef1[index].reshape(-1, 1, 1, 1) ** 2 * x0_variance
        )
        log_small = chain.posterior_log_variance_clipped[index].reshape(-1, 1, 1, 1)
        log_large = chain.betas[index].log().reshape(-1, 1, 1, 1)
        v = (true_variance.log() - log_small) / (log_large - log_small)
        eps = gaussian_posterior_eps(abar, x_t.double())
        return torch.cat([eps, (2 * v - 1).expand_as(eps)], dim=1).to(x_t.dtype)


def constant_variance_model(model_eps, v_raw: float):
    """Wrap a noise predictor with a variance channel fixed at ``v_raw``."""
    return lambda x_t, t: torch.cat([model_eps(x_t, t), torch.full_like(x_t, v_raw)], dim=1)


def gaussian_eps(schedule: NoiseSchedule):
    return lambda x_t, t: gaussian_posterior_eps(
        schedule.alphas_cumprod[t].to(x_t.dtype).reshape(-1, 1, 1, 1), x_t
    )


# ----------------------------------------------------------------------------- eq. 15
def test_learned_log_variance_interpolates_beta_tilde_and_beta_on_a_log_scale(
    linear: NoiseSchedule,
) -> None:
    betas, tilde = hand_betas_and_posterior(linear.betas.tolist())
    t = torch.tensor([1, 2, 10, 500, 999])
    for v in (0.0, 0.25, 1.0, 1.5):
        v_raw = torch.full((5, 1, 2, 2), 2 * v - 1, dtype=torch.float64)
        got = learned_log_variance(linear, t, v_raw)[:, 0, 0, 0]
        expected = [v * math.log(betas[k]) + (1 - v) * math.log(tilde[k]) for k in t.tolist()]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_the_geometric_mean_sits_at_v_raw_zero(linear: NoiseSchedule) -> None:
    """A zero-initialised output layer starts at sqrt(beta_t beta_tilde_t)."""
    t = torch.arange(1, 1000)
    got = learned_log_variance(linear, t, torch.zeros(999, 1, 1, 1, dtype=torch.float64)).exp()
    expected = (linear.betas[t] * linear.posterior_variance[t]).sqrt()
    torch.testing.assert_close(got.flatten(), expected)


def test_t_zero_uses_the_clipped_posterior_variance(linear: NoiseSchedule) -> None:
    v_raw = torch.full((1, 1, 1, 1), -1.0, dtype=torch.float64)
    got = learned_log_variance(linear, torch.tensor([0]), v_raw).exp().item()
    assert math.isclose(got, linear.posterior_variance[1].item(), rel_tol=1e-12)


def test_variance_fraction_maps_minus_one_and_one_to_the_bounds() -> None:
    fraction = variance_fraction(torch.tensor([-1.0, 0.0, 1.0, 3.0]))
    torch.testing.assert_close(fraction, torch.tensor([0.0, 0.5, 1.0, 2.0]))


# ----------------------------------------------------------------------------- the bounds
@pytest.mark.parametrize(("v_raw", "fixed"), [(-1.0, "small"), (1.0, "large")])
def test_the_ends_of_the_range_are_the_fixed_variances(
    linear: NoiseSchedule, v_raw: float, fixed: str
) -> None:
    model = constant_variance_model(gaussian_eps(linear), v_raw)
    x_t, t = torch.randn(6, 1, 3, 3, dtype=torch.float64), torch.tensor([1, 2, 5, 100, 500, 999])
    learned = p_mean_variance(model, linear, x_t, t, variance="learned")
    reference = p_mean_variance(gaussian_eps(linear), linear, x_t, t, variance=fixed)
    for got, expected in zip(learned, reference, strict=True):
        torch.testing.assert_close(got, expected.expand_as(got))


@pytest.mark.parametrize(("v_raw", "fixed"), [(-1.0, "small"), (1.0, "large")])
def test_respaced_ancestral_sampling_matches_the_fixed_variance_at_the_ends(
    linear: NoiseSchedule, v_raw: float, fixed: str
) -> None:
    """At t = 0 no noise is drawn, so v = 1 gives exactly the "large" chain."""
    model = constant_variance_model(gaussian_eps(linear), v_raw)
    draws = {
        name: ddpm_sample(m, linear, (4, 1, 2, 2), steps=20, variance=variance, clip_x0=None,
                          generator=torch.Generator().manual_seed(3))
        for name, m, variance in [("learned", model, "learned"),
                                  ("fixed", gaussian_eps(linear), fixed)]
    }  # fmt: skip
    torch.testing.assert_close(draws["learned"], draws["fixed"])


@pytest.mark.parametrize("steps", [5, 25])
def test_the_exact_variance_makes_coarse_ancestral_sampling_exact(
    linear: NoiseSchedule, steps: int
) -> None:
    """With the true reverse variance a respaced chain reproduces N(MEAN, STD^2) at any step
    count, where the fixed beta_tilde underdisperses (Monte Carlo, 20,000 draws: the
    standard error of the sample std is about 0.0025)."""
    shape = (20_000, 1, 1, 1)
    oracle = GaussianOracle(linear, steps)
    learned = ddpm_sample(oracle, linear, shape, steps=steps, variance="learned", clip_x0=None,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    small = ddpm_sample(NoiseOnly(oracle), linear, shape, steps=steps, clip_x0=None,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert abs(learned.mean().item() - MEAN) < 0.015
    assert abs(learned.std().item() - STD) < 0.01
    assert small.std().item() < STD - 0.03


def test_the_exact_variance_lowers_the_bound(linear: NoiseSchedule) -> None:
    """Each KL term is smallest in expectation at the true reverse variance (the Gaussian
    KL's minimiser over sigma^2 is the true variance plus the squared mean error), so the
    bound drops. 64 images, the same x_t for both models at every step."""
    x0 = MEAN + STD * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x0 = (x0.clamp(-1, 1) * 127.5).round() / 127.5
    oracle = GaussianOracle(linear, 1000)
    learned = elbo_bits_per_dim(oracle, linear, x0, variance="learned",
                                generator=torch.Generator().manual_seed(1))  # fmt: skip
    small = elbo_bits_per_dim(NoiseOnly(oracle), linear, x0,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
    learned_kl, small_kl = learned.terms[:, 1:].sum(1).mean(), small.terms[:, 1:].sum(1).mean()
    assert learned_kl < 0.95 * small_kl  # 5.57 against 6.26 bits when written
    assert learned.total.mean() < small.total.mean()


# ----------------------------------------------------------------------------- the channels
def test_split_and_noise_only_take_the_first_c_channels() -> None:
    output = torch.arange(2 * 3 * 4.0).reshape(1, 6, 2, 2)
    eps, v_raw = split_eps_and_v(output, 3)
    torch.testing.assert_close(torch.cat([eps, v_raw], dim=1), output)
    model = lambda x_t, t: torch.cat([x_t + 1, x_t - 1], dim=1)  # noqa: E731
    x_t = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(NoiseOnly(model)(x_t, torch.tensor([1, 2])), x_t + 1)


def test_noise_only_keeps_the_null_label_of_a_conditional_model() -> None:
    from diffusion_lib import AttentionUNet

    options = dict(base_channels=8, num_res_blocks=1, num_heads=2, out_channels=2)
    assert NoiseOnly(AttentionUNet(num_classes=10, **options)).null_label == 10
    assert not hasattr(NoiseOnly(AttentionUNet(**options)), "null_label")


def test_noise_only_lets_ddim_read_a_learned_variance_model(linear: NoiseSchedule) -> None:
    two_channel = constant_variance_model(gaussian_eps(linear), 0.4)
    kwargs = dict(steps=10, clip_x0=None, x_T=torch.randn(3, 1, 2, 2))
    torch.testing.assert_close(
        ddim_sample(NoiseOnly(two_channel), linear, (3, 1, 2, 2), **kwargs),
        ddim_sample(gaussian_eps(linear), linear, (3, 1, 2, 2), **kwargs),
    )


def test_guidance_mixes_the_noise_and_keeps_the_conditional_variance() -> None:
    def model(x_t, t, labels):
        level = labels.reshape(-1, 1, 1, 1).to(x_t.dtype)
        return torch.cat([x_t * 0 + level, x_t * 0 + 10 * level], dim=1)

    x_t, t, labels = torch.zeros(2, 1, 1, 1), torch.tensor([3, 3]), torch.tensor([2, 5])
    output = predict_noise(model, x_t, t, labels, guidance=2.0, null_label=7)
    eps, v_raw = split_eps_and_v(output, 1)
    torch.testing.assert_close(eps.flatten(), 3.0 * labels.float() - 2.0 * 7)
    torch.testing.assert_close(v_raw.flatten(), 10.0 * labels.float())


def test_wrong_channel_counts_are_explained(linear: NoiseSchedule) -> None:
    x_t, t = torch.zeros(2, 1, 2, 2), torch.tensor([3, 4])
    with pytest.raises(
        ValueError, match=r"2C = 2 output channels .* returned shape \(2, 1, 2, 2\)"
    ):
        p_mean_variance(lambda x, t: x, linear, x_t, t, variance="learned")
    doubled = constant_variance_model(gaussian_eps(linear), 0.0)
    with pytest.raises(ValueError, match="learns its variance: pass variance='learned'"):
        p_mean_variance(doubled, linear, x_t, t, variance="small")
    with pytest.raises(ValueError, match="wrap it in NoiseOnly"):
        ddim_sample(doubled, linear, (2, 1, 2, 2), steps=3)
