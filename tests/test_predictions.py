"""Noise, data and velocity targets, their weights and the wrapper, checked independently."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from diffusion_lib import (
    PREDICTIONS,
    SCHEDULES,
    NoiseFromPrediction,
    NoiseSchedule,
    ddim_sample,
    ddpm_sample,
    diffusion_loss,
    elbo_weight,
    eps_from_prediction,
    min_snr_weight,
    predict_noise,
    prediction_target,
    vb_term_bits_per_dim,
    x0_error_weight,
)
from diffusion_lib.models import ToyMLP
from diffusion_lib.toy import GaussianMixture
from diffusion_lib.training import train

NAMES = sorted(SCHEDULES)
STEPS = [0, 1, 2, 10, 100, 400, 700, 900, 998, 999]
MIXTURE = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), 0.2, torch.tensor([1.0, 2.0]))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks


def schedule_named(name: str) -> NoiseSchedule:
    return NoiseSchedule.from_name(name, timesteps=1000)


def hand_alpha_bar(schedule: NoiseSchedule) -> Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), recomputed in NumPy from the betas alone."""
    return torch.from_numpy(np.cumprod(1.0 - schedule.betas.numpy()))


def hand_snr(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021, eq. 2), shape (B,)."""
    alpha_bar = hand_alpha_bar(schedule)[t]
    return alpha_bar / (1.0 - alpha_bar)


def alpha_and_sigma(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast against ``like``."""
    alpha_bar = hand_alpha_bar(schedule)[t].reshape(-1, *([1] * (like.dim() - 1)))
    return alpha_bar.sqrt().to(like.dtype), (1.0 - alpha_bar).sqrt().to(like.dtype)


def data_and_noise(count: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(count, 3, 2, generator=generator, dtype=torch.float64) * 2 - 1
    return x0, torch.randn(count, 3, 2, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------------------- targets


@pytest.mark.parametrize("name", NAMES)
def test_v_is_the_angular_derivative_of_the_noised_point(name: str) -> None:
    """Salimans & Ho 2022, sec. 4: on x(phi) = cos(phi) x0 + sin(phi) eps with
    phi = atan2(sigma, alpha), v = dx/dphi; here by a central difference of step h, whose
    truncation error h^2/6 |x'''| and rounding error ~1e-16 |x| / h are both below 1e-10."""
    schedule = schedule_named(name)
    t = torch.tensor(STEPS)
    x0, noise = data_and_noise(len(STEPS))
    alpha, sigma = alpha_and_sigma(schedule, t, x0)
    phi = torch.atan2(sigma, alpha)

    def on_circle(angle: Tensor) -> Tensor:
        return torch.cos(angle) * x0 + torch.sin(angle) * noise

    # The angle parametrises the forward process itself: x(phi_t) is x_t.
    torch.testing.assert_close(on_circle(phi), schedule.q_sample(x0, t, noise))
    h = 1e-5
    derivative = (on_circle(phi + h) - on_circle(phi - h)) / (2 * h)
    v = prediction_target(schedule, x0, t, noise, "v")
    torch.testing.assert_close(v, derivative, atol=1e-9, rtol=0)
    torch.testing.assert_close(v, schedule.velocity(x0, t, noise), atol=1e-15, rtol=0)
    assert torch.equal(prediction_target(schedule, x0, t, noise, "epsilon"), noise)
    assert torch.equal(prediction_target(schedule, x0, t, noise, "x0"), x0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_noise_is_recovered_from_every_target(name: str, prediction: str) -> None:
    """eps_from_prediction inverts prediction_target at every one of the 1000 steps.

    For "x0" the inversion eps = (x_t - alpha x0) / sigma divides a difference of numbers of
    size ~|x| by sigma, so its rounding error grows like 1e-16 |x| / sigma. That is largest at
    t = 0 (sigma = sqrt(beta_1): 0.01 for linear, 0.006 for cosine), not at T - 1, where sigma
    is almost 1 (it is the opposite inversion, x0 from eps, that divides by the tiny alpha
    there). The bound 1e-14 (1 + 1 / sigma) is 20 to 50 times the worst error measured."""
    schedule = schedule_named(name)
    t = torch.arange(1000)
    x0, noise = data_and_noise(1000, seed=1)
    alpha, sigma = alpha_and_sigma(schedule, t, x0)
    x_t = alpha * x0 + sigma * noise
    target = prediction_target(schedule, x0, t, noise, prediction)
    recovered = eps_from_prediction(schedule, x_t, t, target, prediction)
    error = (recovered - noise).abs().flatten(1).max(1).values
    bound = 1e-14 * (1.0 + 1.0 / sigma.flatten())
    assert (error <= bound).all(), f"worst error / bound: {(error / bound).max():.3g}"


# ---------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_squared_target_error_is_the_weighted_data_error(name: str, prediction: str) -> None:
    """Perturb the noise by e; the data estimate moves by -(sigma / alpha) e and the velocity
    by e / alpha, so ||target error||^2 / ||x0 error||^2 is SNR, 1 or SNR + 1."""
    schedule = schedule_named(name)
    t = torch.tensor(STEPS)
    x0, noise = data_and_noise(len(STEPS), seed=2)
    e = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x_t = schedule.q_sample(x0, t, noise)
    eps_hat = noise + e
    x0_hat = schedule.predict_x0(x_t, t, eps_hat)
    v_hat = schedule.velocity(x0_hat, t, eps_hat)
    v_error = v_hat - schedule.velocity(x0, t, noise)
    alpha, sigma = alpha_and_sigma(schedule, t, x0)
    torch.testing.assert_close(x0_hat - x0, -(sigma / alpha) * e, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(v_error, e / alpha, rtol=1e-9, atol=1e-12)
    # v_hat is the velocity of this x_t: converting it back gives the same two estimates.
    x0_back, eps_back = schedule.x0_and_eps_from_velocity(x_t, t, v_hat)
    torch.testing.assert_close(x0_back, x0_hat, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(eps_back, eps_hat, rtol=1e-9, atol=1e-12)

    target_error = {"epsilon": e, "x0": x0_hat - x0, "v": v_error}[prediction]
    ratio = target_error.pow(2).flatten(1).sum(1) / (x0_hat - x0).pow(2).flatten(1).sum(1)
    snr = hand_snr(schedule, t)
    expected = {"epsilon": snr, "x0": torch.ones_like(snr), "v": snr + 1}[prediction]
    weight = x0_error_weight(schedule, t, prediction)
    assert weight.dtype == torch.float64 and weight.shape == (len(STEPS),)
    torch.testing.assert_close(ratio, expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(weight, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_elbo_weight_is_the_bound_term_of_the_data_error(name: str) -> None:
    """A model whose noise estimate is off by delta has a known data error; the bound's term
    from vb_term_bits_per_dim (a Gaussian KL between the posteriors, variance beta_tilde) is
    elbo_weight ||x0 - x0_hat||^2, per dimension and in bits."""
    schedule = schedule_named(name)
    t = torch.tensor([1, 2, 10, 100, 400, 700, 900, 998, 999])
    generator = torch.Generator().manual_seed(4)
    x0 = torch.rand(len(t), 1, 3, 3, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    delta = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    alpha, sigma = alpha_and_sigma(schedule, t, x0)
    x_t = alpha * x0 + sigma * noise
    bits = vb_term_bits_per_dim(lambda x, step: noise + delta, schedule, x0, x_t, t)
    x0_hat = (x_t - sigma * (noise + delta)) / alpha
    squared = (x0 - x0_hat).pow(2).flatten(1).sum(1)
    dims = x0[0].numel()
    expected = elbo_weight(schedule, t) * squared / (dims * math.log(2))
    torch.testing.assert_close(bits, expected, rtol=1e-10, atol=0)
    assert (bits > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_elbo_weight_closed_form_from_the_betas(name: str) -> None:
    """beta_t alpha_bar_{t-1} / (2 (1 - alpha_bar_{t-1}) (1 - alpha_bar_t)), i.e. the squared
    posterior-mean coefficient of x0 over twice beta_tilde (Ho et al. 2020, eqs. 6-7)."""
    schedule = schedule_named(name)
    betas = schedule.betas.numpy()
    alpha_bar = np.cumprod(1.0 - betas)
    t = np.arange(1, 1000)
    expected = betas[t] * alpha_bar[t - 1] / (2 * (1 - alpha_bar[t - 1]) * (1 - alpha_bar[t]))
    got = elbo_weight(schedule, torch.from_numpy(t))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_elbo_weight_rejects_the_decoder_step() -> None:
    schedule = schedule_named("linear")
    with pytest.raises(ValueError, match="decoder"):
        elbo_weight(schedule, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"timesteps must lie in 0\.\.999"):
        elbo_weight(schedule, torch.tensor([1000]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_weight_caps_the_data_weight(name: str, prediction: str, gamma: float) -> None:
    """Hang et al. 2023, eq. 9: weight times the target's own data weight is min(SNR, gamma)."""
    schedule = schedule_named(name)
    t = torch.tensor(STEPS)
    snr = hand_snr(schedule, t)
    assert (snr > gamma).any() and (snr < gamma).any(), "both sides of the cap are tested"
    weight = min_snr_weight(schedule, t, prediction, gamma)
    capped = snr.clamp(max=gamma)
    own = {"epsilon": snr, "x0": torch.ones_like(snr), "v": snr + 1}[prediction]
    torch.testing.assert_close(weight, capped / own, rtol=1e-9, atol=0)
    torch.testing.assert_close(
        weight * x0_error_weight(schedule, t, prediction), capped, rtol=1e-9, atol=0
    )


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("nan"), True, "5"])
def test_min_snr_weight_rejects_a_bad_gamma(gamma: object) -> None:
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weight(schedule_named("linear"), torch.tensor([0, 1]), "epsilon", gamma)


@pytest.mark.parametrize("t", [[-1, 0], [0, 1000], [0.0, 1.0]])
@pytest.mark.parametrize(
    "weight",
    [
        lambda s, t: x0_error_weight(s, t, "v"),
        lambda s, t: min_snr_weight(s, t, "v", 5.0),
        lambda s, t: elbo_weight(s, t),
    ],
)
def test_the_weights_reject_timesteps_outside_the_schedule(t: list, weight) -> None:
    # -1 would silently read the last step's weight, 1000 would fail later as an IndexError.
    with pytest.raises(ValueError, match="t"):
        weight(schedule_named("linear"), torch.tensor(t))


@pytest.mark.parametrize(
    "call",
    [
        lambda s, t: prediction_target(s, torch.zeros(2, 2), t, torch.zeros(2, 2), "score"),
        lambda s, t: eps_from_prediction(s, torch.zeros(2, 2), t, torch.zeros(2, 2), "score"),
        lambda s, t: x0_error_weight(s, t, "score"),
        lambda s, t: min_snr_weight(s, t, "score", 5.0),
        lambda s, t: NoiseFromPrediction(nn.Identity(), s, "score"),
    ],
)
def test_an_unknown_prediction_lists_the_choices(call) -> None:
    with pytest.raises(
        ValueError, match="unknown prediction 'score'; choose one of epsilon, x0, v"
    ):
        call(schedule_named("linear"), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------- the wrapper


class ExactDataPredictor:
    """E[x0 | x_t] = (x_t - sigma E[eps | x_t]) / alpha, from the mixture's optimal noise."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule) -> None:
        self.noise_predictor = mixture.optimal_noise_predictor(schedule)
        self.alpha_bar = hand_alpha_bar(schedule)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        points = x_t.double()
        eps = self.noise_predictor(points, t)
        alpha_bar = self.alpha_bar[t][:, None]
        return ((points - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()).to(x_t.dtype)


class ExactVelocityPredictor(ExactDataPredictor):
    """E[v | x_t] = alpha E[eps] - sigma E[x0] = (E[eps | x_t] - sigma x_t) / alpha."""

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        points = x_t.double()
        eps = self.noise_predictor(points, t)
        alpha_bar = self.alpha_bar[t][:, None]
        return ((eps - (1 - alpha_bar).sqrt() * points) / alpha_bar.sqrt()).to(x_t.dtype)


def exact_predictor(prediction: str, schedule: NoiseSchedule):
    if prediction == "epsilon":
        return MIXTURE.optimal_noise_predictor(schedule)
    return {"x0": ExactDataPredictor, "v": ExactVelocityPredictor}[prediction](MIXTURE, schedule)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.float64, 1e-11)])
def test_samplers_see_the_exact_noise_through_the_wrapper(
    prediction: str, dtype: torch.dtype, tolerance: float
) -> None:
    """An exact data or velocity predictor, wrapped, samples exactly like the optimal noise
    predictor: with DDIM (20 steps) and with DDPM (50 respaced steps, same random stream)."""
    schedule = schedule_named("linear")
    wrapped = NoiseFromPrediction(exact_predictor(prediction, schedule), schedule, prediction)
    optimal = MIXTURE.optimal_noise_predictor(schedule)
    x_T = torch.randn(400, 2, generator=torch.Generator().manual_seed(5), dtype=dtype)
    options = {"x_T": x_T, "clip_x0": None}

    expected = ddim_sample(optimal, schedule, x_T.shape, steps=20, **options)
    got = ddim_sample(wrapped, schedule, x_T.shape, steps=20, **options)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)

    def ddpm(model) -> Tensor:
        generator = torch.Generator().manual_seed(6)
        return ddpm_sample(model, schedule, x_T.shape, steps=50, generator=generator, **options)

    torch.testing.assert_close(ddpm(wrapped), ddpm(optimal), atol=tolerance, rtol=0)
    if prediction != "epsilon":
        # Without the conversion the same network samples something else entirely.
        network = exact_predictor(prediction, schedule)
        unconverted = ddim_sample(network, schedule, x_T.shape, steps=20, **options)
        assert (unconverted - expected).abs().max() > 0.5


class RecordingConditional(nn.Module):
    """A linear 'network' of (x_t, labels) that remembers the labels of each call."""

    null_label = 7

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2).double()
        self.label_shift = nn.Embedding(8, 2).double()
        self.seen: list[Tensor] = []

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        self.seen.append(labels)
        return self.linear(x_t) + self.label_shift(labels)


def test_the_wrapper_forwards_labels_and_guidance_acts_on_the_output() -> None:
    """Labels reach the network; guidance on the converted noise equals the conversion of the
    guided output, because eps = sigma x_t + alpha v is affine in v."""
    schedule = schedule_named("cosine")
    network = RecordingConditional()
    wrapped = NoiseFromPrediction(network, schedule, "v")
    assert wrapped.null_label == 7
    x_t = torch.randn(4, 2, dtype=torch.float64)
    t, labels = torch.tensor([0, 300, 600, 999]), torch.tensor([1, 2, 3, 1])
    alpha, sigma = alpha_and_sigma(schedule, t, x_t)
    with torch.no_grad():
        eps = wrapped(x_t, t, labels)
        assert network.seen[-1] is labels
        torch.testing.assert_close(eps, sigma * x_t + alpha * network(x_t, t, labels))

        guided = predict_noise(wrapped, x_t, t, labels, guidance=2.0, null_label=wrapped.null_label)
        assert network.seen[-1].tolist() == [1, 2, 3, 1, 7, 7, 7, 7]
        v_guided = 3.0 * network(x_t, t, labels) - 2.0 * network(x_t, t, torch.full_like(t, 7))
    torch.testing.assert_close(guided, sigma * x_t + alpha * v_guided)


def test_the_wrapper_moves_its_schedule_to_the_data_once() -> None:
    schedule = schedule_named("linear")
    wrapped = NoiseFromPrediction(lambda x, t: x, schedule, "v")
    moved = NoiseSchedule.to  # a "meta" tensor stands in for another device
    x_t = torch.zeros(3, 2, device="meta")
    calls = []

    def counting_to(self, device):
        calls.append(device)
        return moved(self, device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NoiseSchedule, "to", counting_to)
        for _ in range(3):
            eps = wrapped(x_t, torch.tensor([0, 5, 999], device="meta"))
    assert eps.device.type == "meta" and wrapped.schedule.device.type == "meta"
    assert len(calls) == 1
    x_t = torch.randn(3, 2, dtype=torch.float64)
    expected = eps_from_prediction(schedule, x_t, torch.tensor([0, 5, 999]), x_t, "v")
    on_cpu = NoiseFromPrediction(lambda x, t: x, schedule, "v")
    torch.testing.assert_close(on_cpu(x_t, torch.tensor([0, 5, 999])), expected)
    assert on_cpu.schedule is schedule  # already on the data's device: nothing copied


def test_the_wrapper_is_a_module_around_the_network() -> None:
    schedule = schedule_named("linear")
    network = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    wrapped = NoiseFromPrediction(network, schedule, "x0")
    assert isinstance(wrapped, nn.Module) and not hasattr(wrapped, "null_label")
    assert list(wrapped.parameters()) == list(network.parameters())
    assert not wrapped.eval().training and not network.training
    assert wrapped.train().training and network.training
    assert "prediction='x0'" in repr(wrapped)


# ---------------------------------------------------------------------------- end to end


def trained_network(schedule: NoiseSchedule, prediction: str) -> nn.Module:
    points = MIXTURE.sample(4096, torch.Generator().manual_seed(1))
    torch.manual_seed(0)  # the initial weights
    result = train(
        ToyMLP(hidden=32, blocks=1), schedule, points,
        loss=functools.partial(diffusion_loss, prediction=prediction), steps=300, batch_size=256,
        lr=5e-3, warmup_steps=20, device="cpu", progress=False,
    )  # fmt: skip
    return result.ema_model


def quality(model, schedule: NoiseSchedule):
    generator = torch.Generator().manual_seed(7)
    samples = ddim_sample(model, schedule, (2000, 2), steps=50, generator=generator, clip_x0=None)
    return MIXTURE.sample_quality(samples)


def close_to_the_mixture(quality) -> bool:
    """Near the mixture's modes, in the right proportions. The data score log-density -0.25,
    spread 1 and weight error 0; 50 exact DDIM steps score about -0.07, 0.9 and 0.01. A short
    run of an x0 network learns the nearly clean steps poorly (its loss weighs them by 1, where
    noise prediction weighs them by SNR), so its samples huddle on the means: spread about
    0.6, hence the low bound of 0.35. Untrained or misread networks score below -10 and
    spread beyond 3."""
    return (
        quality.log_density > -1.5 and 0.35 < quality.spread < 1.6 and quality.weight_error < 0.08
    )


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_a_network_trained_on_another_target_samples_the_mixture(prediction: str) -> None:
    """Train a small network with diffusion_loss(prediction=...), sample through the wrapper;
    the same network read as a noise predictor, or an untrained one, fails the same test."""
    schedule = schedule_named("linear")
    network = trained_network(schedule, prediction)
    assert close_to_the_mixture(
        quality(NoiseFromPrediction(network, schedule, prediction), schedule)
    )
    assert not close_to_the_mixture(quality(network, schedule))
    torch.manual_seed(1)
    untrained = NoiseFromPrediction(ToyMLP(hidden=32, blocks=1), schedule, prediction)
    assert not close_to_the_mixture(quality(untrained, schedule))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_noise_and_x0_agree_with_the_conversions_and_with_guidance(prediction: str) -> None:
    """Both estimates, read from the output directly, equal those of eq. 4 from the wrapper's eps
    (away from alpha = 0, where the two routes are the same algebra); guided estimates equal
    the guided output converted, for eps and for x_0 alike."""
    schedule = schedule_named("cosine")
    network = RecordingConditional()
    wrapped = NoiseFromPrediction(network, schedule, prediction)
    x_t = torch.randn(4, 2, dtype=torch.float64)
    t, labels = torch.tensor([0, 300, 600, 990]), torch.tensor([1, 2, 3, 1])
    alpha, sigma = alpha_and_sigma(schedule, t, x_t)
    with torch.no_grad():
        eps, x0 = wrapped.noise_and_x0(x_t, t, labels)
        torch.testing.assert_close(eps, wrapped(x_t, t, labels))
        torch.testing.assert_close(x0, (x_t - sigma * eps) / alpha)
        eps_g, x0_g = wrapped.noise_and_x0(x_t, t, labels, guidance=1.5, null_label=7)
        eps_u, x0_u = wrapped.noise_and_x0(x_t, t, torch.full_like(t, 7))
    torch.testing.assert_close(eps_g, 2.5 * eps - 1.5 * eps_u)
    torch.testing.assert_close(x0_g, 2.5 * x0 - 1.5 * x0_u)


def test_a_velocity_gives_x0_where_alpha_is_zero() -> None:
    """At SNR 0: x_t is the noise, v = -x_0, and the wrapper reads x_0 = -v (no 0 / 0)."""
    schedule = NoiseSchedule.from_name("cosine", 100, zero_terminal_snr=True)
    x0, noise = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    t = torch.full((3,), 99)
    x_t = schedule.q_sample(x0, t, noise)
    target = prediction_target(schedule, x0, t, noise, "v")
    torch.testing.assert_close(target, -x0)
    wrapped = NoiseFromPrediction(lambda x, s: target, schedule, "v")
    eps, estimate = wrapped.noise_and_x0(x_t, t)
    torch.testing.assert_close(estimate, x0)
    torch.testing.assert_close(eps, noise)
