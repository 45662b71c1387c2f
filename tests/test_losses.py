"""The simplified loss and the variational-bound terms against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from diffusion_lib import (
    FCUNet,
    NoiseSchedule,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    elbo_bits_per_dim,
    hybrid_loss,
    learned_log_variance,
    normal_kl,
    prior_bits_per_dim,
    train,
    vb_term_bits_per_dim,
)

NAMES = ("cosine", "linear", "quadratic")
PREDICTIONS = ("epsilon", "x0", "v")


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", timesteps=1000)


def oracle_for(schedule: NoiseSchedule, x0: torch.Tensor):
    """A model that knows the clean batch, hence the exact noise: the bound's terms vanish."""
    return lambda x_t, t: schedule.predict_eps(x_t, t, x0)


def test_diffusion_loss_is_the_noise_mse(schedule: NoiseSchedule) -> None:
    x0, noise = torch.rand(4, 1, 5, 5) * 2 - 1, torch.randn(4, 1, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    zero = diffusion_loss(lambda x, t: torch.zeros_like(x), schedule, x0, t=t, noise=noise)
    torch.testing.assert_close(zero, (noise**2).mean())
    perfect = diffusion_loss(oracle_for(schedule, x0), schedule, x0, t=t, noise=noise)
    assert perfect.item() == pytest.approx(0.0, abs=1e-9)


def test_diffusion_loss_draws_timesteps_uniformly(schedule: NoiseSchedule) -> None:
    """20,000 draws cover both ends of 0..999 (each is missed with probability about 2e-9) and
    fill 10 bins of 100 timesteps evenly: Pearson's chi-square, with 9 degrees of freedom, stays
    below 27.88, its 0.999 quantile. Drawing from 0..998 or 1..999 misses an end."""
    seen = []

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return torch.zeros_like(x_t)

    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        diffusion_loss(model, schedule, torch.zeros(200, 1, 1, 1), generator=generator)
    t = torch.cat(seen)
    assert t.dtype == torch.long and t.numel() == 20_000
    assert t.min().item() == 0 and t.max().item() == 999
    counts = torch.bincount(t // 100, minlength=10).double()
    expected = t.numel() / 10
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert counts.numel() == 10 and chi_square < 27.88


def test_diffusion_loss_passes_labels(schedule: NoiseSchedule) -> None:
    got = {}

    def model(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        got["labels"] = labels
        return torch.zeros_like(x_t)

    diffusion_loss(model, schedule, torch.zeros(3, 1, 2, 2), labels=torch.tensor([1, 2, 3]))
    assert got["labels"].tolist() == [1, 2, 3]


def hand_alpha_bar(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t recomputed in NumPy from the betas alone, shape (B,)."""
    return torch.from_numpy(np.cumprod(1.0 - schedule.betas.numpy()))[t]


def hand_alpha_and_sigma(
    schedule: NoiseSchedule, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) as float64 (B, 1, 1, 1)."""
    alpha_bar = hand_alpha_bar(schedule, t).reshape(-1, 1, 1, 1)
    return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()


def test_epsilon_prediction_is_the_loss_as_it_was(schedule: NoiseSchedule) -> None:
    """prediction="epsilon" without snr_gamma is the default, and the default is still the
    plain MSE between the model's output and the noise."""
    x0, noise = torch.rand(5, 1, 3, 3) * 2 - 1, torch.randn(5, 1, 3, 3)
    t = torch.tensor([0, 1, 250, 998, 999])
    model = lambda x, step: 0.7 * x - step[:, None, None, None] / 1000  # noqa: E731
    default = diffusion_loss(model, schedule, x0, t=t, noise=noise)
    explicit = diffusion_loss(
        model, schedule, x0, t=t, noise=noise, prediction="epsilon", snr_gamma=None
    )
    assert torch.equal(default, explicit) and default.dtype == torch.float32
    x_t = schedule.q_sample(x0, t, noise)
    assert torch.equal(default, F.mse_loss(model(x_t, t).float(), noise.float()))
    alpha, sigma = hand_alpha_and_sigma(schedule, t)
    by_hand = (model(alpha * x0.double() + sigma * noise.double(), t) - noise).pow(2).mean()
    torch.testing.assert_close(default.double(), by_hand, rtol=1e-6, atol=0)
    drawn = [
        diffusion_loss(model, schedule, x0, generator=torch.Generator().manual_seed(2), **extra)
        for extra in ({}, {"prediction": "epsilon"})
    ]
    assert torch.equal(*drawn)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_a_model_that_outputs_the_exact_target_has_zero_loss(name: str, prediction: str) -> None:
    """Targets by hand: the noise, the data, or v = alpha eps - sigma x0 (Salimans & Ho 2022)."""
    schedule = NoiseSchedule.from_name(name)
    x0 = torch.rand(6, 1, 2, 2, dtype=torch.float64) * 2 - 1
    noise = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 300, 600, 998, 999])
    alpha, sigma = hand_alpha_and_sigma(schedule, t)
    target = {"epsilon": noise, "x0": x0, "v": alpha * noise - sigma * x0}[prediction]
    exact = lambda x, step: target  # noqa: E731
    loss = diffusion_loss(exact, schedule, x0, t=t, noise=noise, prediction=prediction)
    assert loss.item() <= 1e-12
    other = "x0" if prediction != "x0" else "v"
    assert diffusion_loss(exact, schedule, x0, t=t, noise=noise, prediction=other) > 0.01
    with_gamma = diffusion_loss(
        exact, schedule, x0, t=t, noise=noise, prediction=prediction, snr_gamma=5.0
    )
    assert with_gamma.item() <= 1e-12


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_loss_weighs_the_data_error(name: str, prediction: str) -> None:
    """A model whose implied x0 estimate is off by a known d: the plain loss is
    mean_b w_b mean(d_b^2) with w = SNR, 1 or SNR + 1, and with snr_gamma it is
    mean_b min(SNR_b, gamma) mean(d_b^2) (Hang et al. 2023, eq. 9), SNR from the betas."""
    schedule = NoiseSchedule.from_name(name)
    generator = torch.Generator().manual_seed(3)
    shape = (8, 1, 2, 2)
    x0 = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    d = torch.randn(shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 100, 400, 700, 998, 999])
    alpha, sigma = hand_alpha_and_sigma(schedule, t)

    def model(x_t: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        # The output whose reading at this x_t is the data estimate x0 + d.
        x0_hat = x0 + d
        if prediction == "epsilon":
            return (x_t - alpha * x0_hat) / sigma
        if prediction == "x0":
            return x0_hat
        return (alpha * x_t - x0_hat) / sigma  # v = alpha eps - sigma x0, eps from x_t and x0

    squared = d.pow(2).flatten(1).mean(1)
    alpha_bar = hand_alpha_bar(schedule, t)
    snr = alpha_bar / (1 - alpha_bar)
    own = {"epsilon": snr, "x0": torch.ones_like(snr), "v": snr + 1}[prediction]
    plain = diffusion_loss(model, schedule, x0, t=t, noise=noise, prediction=prediction)
    torch.testing.assert_close(plain.double(), (own * squared).mean(), rtol=1e-6, atol=0)
    for gamma in (1.0, 5.0):
        assert (snr > gamma).any() and (snr < gamma).any()
        weighted = diffusion_loss(
            model, schedule, x0, t=t, noise=noise, prediction=prediction, snr_gamma=gamma
        )
        expected = (snr.clamp(max=gamma) * squared).mean()
        torch.testing.assert_close(weighted.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"snr_gamma": 0.0}, "snr_gamma"),
        ({"snr_gamma": -5.0}, "snr_gamma"),
        ({"snr_gamma": float("nan")}, "snr_gamma"),
        ({"snr_gamma": True}, "snr_gamma"),
        ({"prediction": "score"}, "unknown prediction 'score'; choose one of epsilon, x0, v"),
        ({"prediction": "V"}, "choose one of epsilon, x0, v"),
    ],
)
def test_bad_prediction_options_raise(schedule: NoiseSchedule, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        diffusion_loss(lambda x, t: x, schedule, torch.zeros(2, 1, 2, 2), **options)


def test_normal_kl_matches_torch_distributions() -> None:
    mean1, mean2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    log_var1, log_var2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    expected = kl_divergence(
        Normal(mean1, (0.5 * log_var1).exp()), Normal(mean2, (0.5 * log_var2).exp())
    )
    torch.testing.assert_close(normal_kl(mean1, log_var1, mean2, log_var2), expected)


def test_discretised_likelihood_sums_to_one_over_the_256_bins() -> None:
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, -3.0), (0.7, -1.0), (-0.95, 0.5), (0.2, -6.0)]:
        log_p = discretized_gaussian_log_likelihood(
            bins, mean=torch.tensor(mean, dtype=torch.float64), log_scale=torch.tensor(log_scale)
        )
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretised_likelihood_of_an_inner_bin_is_the_cdf_difference() -> None:
    x = torch.tensor(-1 + 2 * 100 / 255, dtype=torch.float64)
    normal = Normal(torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64))
    expected = torch.log(normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255))
    got = discretized_gaussian_log_likelihood(x, mean=normal.mean, log_scale=normal.stddev.log())
    torch.testing.assert_close(got, expected)


def test_prior_term_is_the_kl_to_the_standard_normal(schedule: NoiseSchedule) -> None:
    x0 = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 2 - 1
    abar = schedule.alphas_cumprod[-1]
    expected = kl_divergence(Normal(abar.sqrt() * x0, (1 - abar).sqrt()), Normal(0.0, 1.0))
    expected_bits = expected.flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(prior_bits_per_dim(schedule, x0), expected_bits)
    assert (prior_bits_per_dim(schedule, x0) < 1e-4).all(), (
        "the linear schedule ends close to N(0, I)"
    )


def test_denoising_terms_vanish_for_a_perfect_model(schedule: NoiseSchedule) -> None:
    x0 = torch.rand(4, 1, 3, 3, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 5, 400, 999])
    x_t = schedule.q_sample(x0, t)
    terms = vb_term_bits_per_dim(oracle_for(schedule, x0), schedule, x0, x_t, t)
    torch.testing.assert_close(terms, torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0)
    wrong = vb_term_bits_per_dim(lambda x, t: torch.zeros_like(x), schedule, x0, x_t, t)
    assert (wrong > 0).all()


def test_denoising_term_matches_the_gaussian_kl(schedule: NoiseSchedule) -> None:
    """L_{t-1} for a zero predictor, recomputed from the posterior with torch.distributions."""
    x0 = torch.rand(2, 1, 2, 2, dtype=torch.float64) * 2 - 1
    t = torch.tensor([10, 700])
    x_t = schedule.q_sample(x0, t)
    zero = torch.zeros_like(x0)
    true_mean, true_var, _ = schedule.q_posterior(x0, x_t, t)
    model_mean, model_var, _ = schedule.q_posterior(schedule.predict_x0(x_t, t, zero), x_t, t)
    expected = kl_divergence(
        Normal(true_mean, true_var.sqrt()), Normal(model_mean, model_var.sqrt())
    )
    got = vb_term_bits_per_dim(lambda x, t: torch.zeros_like(x), schedule, x0, x_t, t)
    torch.testing.assert_close(got, expected.flatten(1).mean(1) / math.log(2))


def test_decoder_term_is_the_discretised_nll_at_t0(schedule: NoiseSchedule) -> None:
    pixels = torch.randint(0, 256, (2, 1, 3, 3)).double()
    x0 = pixels / 127.5 - 1
    t = torch.zeros(2, dtype=torch.long)
    x_t = schedule.q_sample(x0, t)
    bits = vb_term_bits_per_dim(oracle_for(schedule, x0), schedule, x0, x_t, t)
    # A perfect model centres its decoder on x0 with std sqrt(beta_tilde at 0-based step 1);
    # the probability of the right bin is then the same for every inner pixel.
    std = schedule.posterior_variance[1].sqrt()
    normal = Normal(torch.tensor(0.0, dtype=torch.float64), std)
    inner = normal.cdf(torch.tensor(1 / 255)) - normal.cdf(torch.tensor(-1 / 255))
    edge = normal.cdf(torch.tensor(1 / 255))
    at_edge = (pixels == 0) | (pixels == 255)
    expected_nats = -torch.where(at_edge, edge.log(), inner.log())
    torch.testing.assert_close(bits, expected_nats.flatten(1).mean(1) / math.log(2))


def test_elbo_collects_every_term() -> None:
    schedule = NoiseSchedule.from_name("linear", timesteps=20, beta_end=0.5)
    x0 = torch.randint(0, 256, (3, 1, 4, 4)).double() / 127.5 - 1
    zero_model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    bound = elbo_bits_per_dim(zero_model, schedule, x0, generator=torch.Generator().manual_seed(0))
    assert bound.terms.shape == (3, 20) and bound.prior.shape == (3,)
    torch.testing.assert_close(bound.total, bound.prior + bound.terms.sum(1))
    assert (bound.terms > 0).all()
    perfect = elbo_bits_per_dim(oracle_for(schedule, x0), schedule, x0)
    assert (perfect.terms[:, 1:].abs() < 1e-9).all()
    assert (perfect.total < bound.total).all()


def test_elbo_terms_of_the_zero_predictor_match_the_closed_form() -> None:
    """With eps_theta = 0, x0_hat = x_t / sqrt(abar_t), so mu_theta misses the true mean by a
    multiple of the noise and E[L_{t-1}] = (SNR(t-1) / SNR(t) - 1) / 2 nats per dimension for
    every x0. The Monte Carlo mean over B * D draws of a chi-square(1) has a relative standard
    error of sqrt(2 / (B D)) = 0.8%; the tolerance is 5 of them."""
    betas = np.linspace(1e-4, 0.5, 20)
    alphas_cumprod = np.cumprod(1 - betas)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    expected_bits = 0.5 * (snr[:-1] / snr[1:] - 1) / math.log(2)
    schedule = NoiseSchedule.from_name("linear", timesteps=20, beta_end=0.5)
    x0 = torch.randint(0, 256, (2000, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    zero_model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    bound = elbo_bits_per_dim(zero_model, schedule, x0.double() / 127.5 - 1, generator=generator)
    measured = bound.terms[:, 1:].mean(0).numpy()
    np.testing.assert_allclose(measured, expected_bits, rtol=5 * math.sqrt(2 / (2000 * 16)))


def test_bad_input(schedule: NoiseSchedule) -> None:
    x0 = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"timesteps must lie in 0\.\.999"):
        diffusion_loss(lambda x, t: x, schedule, x0, t=torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        diffusion_loss(lambda x, t: x, schedule, x0, noise=torch.zeros(2, 1, 2, 3))
    with pytest.raises(ValueError, match="the model's output must have the shape of x0"):
        diffusion_loss(lambda x, t: x.flatten(1), schedule, x0)
    with pytest.raises(ValueError, match="x0 must be finite"):
        elbo_bits_per_dim(lambda x, t: x, schedule, x0 * float("nan"))


# ----------------------------------------------------------------------------- L_hybrid
class EpsAndVariance(torch.nn.Module):
    """A "network" whose output is two fixed tensors: the noise guess and the variance channel."""

    def __init__(self, eps: torch.Tensor, v_raw: torch.Tensor) -> None:
        super().__init__()
        self.eps = torch.nn.Parameter(eps.clone())
        self.v_raw = torch.nn.Parameter(v_raw.clone())

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.eps, self.v_raw], dim=1)


def test_hybrid_loss_is_mse_plus_lambda_t_times_the_kl(schedule: NoiseSchedule) -> None:
    """Nichol & Dhariwal 2021, eq. 16, with the KL written through torch.distributions."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=generator) * 2 - 1
    noise, guess = torch.randn(2, 3, 1, 4, 4, generator=generator)
    v_raw = torch.rand(3, 1, 4, 4, generator=generator) * 2 - 1
    t = torch.tensor([1, 300, 999])
    loss = hybrid_loss(EpsAndVariance(guess, v_raw), schedule, x0, t=t, noise=noise)

    abar = schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    beta = schedule.betas[t].float().reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    x0_hat = (x_t - (1 - abar).sqrt() * guess) / abar.sqrt()
    abar_prev = schedule.alphas_cumprod[t - 1].float().reshape(-1, 1, 1, 1)
    tilde = beta * (1 - abar_prev) / (1 - abar)

    def posterior_mean(x: torch.Tensor) -> torch.Tensor:
        return (abar_prev.sqrt() * beta * x + (1 - beta).sqrt() * (1 - abar_prev) * x_t) / (
            1 - abar
        )

    fraction = (v_raw + 1) / 2
    variance = torch.exp(fraction * beta.log() + (1 - fraction) * tilde.log())
    kl = kl_divergence(
        Normal(posterior_mean(x0), tilde.sqrt()), Normal(posterior_mean(x0_hat), variance.sqrt())
    )
    expected = F.mse_loss(guess, noise) + 0.001 * 1000 * (kl.mean() / math.log(2))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_the_bound_in_hybrid_loss_does_not_train_the_mean(schedule: NoiseSchedule) -> None:
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 3, 3, generator=generator) * 2 - 1
    noise, guess, v_raw = torch.randn(3, 4, 1, 3, 3, generator=generator)
    t = torch.tensor([0, 2, 50, 700])
    gradients = {}
    for weight in (0.0, 10.0):
        model = EpsAndVariance(guess, v_raw)
        hybrid_loss(model, schedule, x0, t=t, noise=noise, vlb_weight=weight).backward()
        gradients[weight] = (model.eps.grad, model.v_raw.grad)
    torch.testing.assert_close(gradients[10.0][0], gradients[0.0][0])  # the mean: L_simple only
    assert torch.count_nonzero(gradients[0.0][1]) == 0
    assert gradients[10.0][1].abs().min() > 0  # every variance channel hears the bound


def test_hybrid_loss_learns_the_kl_optimal_variance(schedule: NoiseSchedule) -> None:
    """With the mean off by c * delta, the KL is smallest at sigma^2 = beta_tilde + (c delta)^2,
    where c = beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) carries the noise error to the mean."""
    t, delta = 40, 0.3
    x0 = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    noise = torch.full_like(x0, 0.5)
    model = EpsAndVariance(noise + delta, torch.zeros_like(x0))
    optimiser = torch.optim.LBFGS([model.v_raw], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = hybrid_loss(model, schedule, x0, t=torch.tensor([t]), noise=noise)
        loss.backward()
        return loss

    optimiser.step(closure)
    learned = learned_log_variance(schedule, torch.tensor([t]), model.v_raw.detach()).exp()
    beta, abar = schedule.betas[t], schedule.alphas_cumprod[t]
    mean_error = beta / ((1 - beta).sqrt() * (1 - abar).sqrt()) * delta
    optimum = schedule.posterior_variance[t] + mean_error**2
    assert math.isclose(learned.item(), optimum.item(), rel_tol=1e-6)


def test_hybrid_loss_trains_a_two_channel_network() -> None:
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    model = FCUNet(image_size=8, widths=(32, 16), out_channels=2)
    result = train(model, NoiseSchedule.from_name("linear"), images, loss=hybrid_loss, steps=30,
                   batch_size=16, device="cpu", progress=False, seed=0)  # fmt: skip
    assert len(result.history.loss) == 30 and all(map(math.isfinite, result.history.loss))
    variance_bias = result.model.output.bias.detach().reshape(2, 8, 8)[1]
    assert variance_bias.abs().max() > 0  # the variance channel left its zero start


def test_hybrid_loss_rejects_a_one_channel_network(schedule: NoiseSchedule) -> None:
    with pytest.raises(ValueError, match="a learned variance needs a model with 2C = 2 output"):
        hybrid_loss(lambda x, t: x, schedule, torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match=r"vlb_weight must lie in \[0.0, inf\), got -1.0"):
        hybrid_loss(lambda x, t: x, schedule, torch.zeros(2, 1, 2, 2), vlb_weight=-1.0)


# ----------------------------------------------------------------------------- bad input
def tiny_network(timesteps: int = 1000) -> FCUNet:
    return FCUNet(image_size=2, widths=(4,), timesteps=timesteps)


LOSSES = [diffusion_loss, hybrid_loss]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("argument", ["x0", "noise"])
def test_data_in_another_dtype_than_the_networks_weights_is_refused(
    schedule: NoiseSchedule, loss, argument: str
) -> None:
    x0, noise = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    arguments = {"x0": x0, "noise": noise}
    arguments[argument] = arguments[argument].double()
    message = rf"FCUNet's weights are float32 but {argument} is float64 \(NumPy arrays become"
    with pytest.raises(ValueError, match=message):
        loss(tiny_network(), schedule, arguments["x0"], noise=arguments["noise"])


@pytest.mark.parametrize("loss", LOSSES)
def test_a_network_built_for_fewer_timesteps_is_refused(schedule: NoiseSchedule, loss) -> None:
    # It used to fail, at random, with "timesteps must lie in 0..99" for a t never passed.
    with pytest.raises(ValueError, match="built for T=100 timesteps but the schedule has T=1000"):
        loss(tiny_network(100), schedule, torch.zeros(2, 1, 2, 2))


@pytest.mark.parametrize("loss", LOSSES)
def test_the_model_and_schedule_swapped_are_refused(schedule: NoiseSchedule, loss) -> None:
    with pytest.raises(ValueError, match="schedule must be a NoiseSchedule .*; got FCUNet"):
        loss(schedule, tiny_network(), torch.zeros(2, 1, 2, 2))


def test_labels_for_an_unconditional_fc_unet_are_refused(schedule: NoiseSchedule) -> None:
    with pytest.raises(ValueError, match="this FCUNet is unconditional and takes no labels"):
        diffusion_loss(
            tiny_network(), schedule, torch.zeros(2, 1, 2, 2), labels=torch.tensor([0, 1])
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"generator": 0}, r"generator must be a torch\.Generator, e\.g\. torch\.Generator"),
        ({"noise": torch.Generator()}, "noise must be a tensor of x0's shape .*got Generator"),
        ({"x0": torch.zeros(2, 1, 2, 2, dtype=torch.uint8)}, "x0 must be floating point"),
        ({"x0": torch.full((2, 1, 2, 2), math.nan)}, "x0 must be finite, but 8 of its 8"),
    ],
)
@pytest.mark.parametrize("loss", LOSSES)
def test_bad_loss_inputs_are_refused(schedule: NoiseSchedule, loss, options, message) -> None:
    # NaN data used to give a NaN loss without a word; the rest failed with AttributeErrors.
    model = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])  # noqa: E731
    arguments = {"x0": torch.zeros(2, 1, 2, 2), **options}
    with pytest.raises(ValueError, match=message):
        loss(model, schedule, **arguments)
