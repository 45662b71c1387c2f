"""Classifier guidance against the exact conditional model of a Gaussian mixture."""

import pytest
import torch
from torch import Tensor

from diffusion_lib import GaussianMixture, NoiseSchedule, ddim_sample
from diffusion_lib.classifier_guidance import ClassifierGuided, logits_log_prob

MEANS = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]], dtype=torch.float64)
STD = 0.3
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def noisy_logits(schedule: NoiseSchedule):
    """The exact classifier of the noised mixture, as logits: ``log w_k + log N(x_t; sqrt(abar)
    mu_k, (abar s^2 + 1 - abar) I)``, unnormalised, so that logits_log_prob must normalise them."""

    def classifier(x_t: Tensor, t: Tensor) -> Tensor:
        alpha_bar = schedule.alphas_cumprod[t].view(-1, 1, 1)
        variance = alpha_bar * STD**2 + 1 - alpha_bar  # (B, 1, 1)
        offsets = x_t[:, None, :] - alpha_bar.sqrt() * MEANS[None]  # (B, K, D)
        log_normal = -0.5 * (offsets.pow(2) / variance + torch.log(2 * torch.pi * variance))
        return WEIGHTS.log() + log_normal.sum(-1) + 3.0  # any offset cancels

    return classifier


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear")


def test_scale_one_with_exact_parts_is_the_exact_conditional_model(schedule):
    mixture = GaussianMixture(MEANS, STD, WEIGHTS).optimal_noise_predictor(schedule)
    generator = torch.Generator().manual_seed(0)
    x_t = 2 * torch.randn(12, 2, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 100, 200, 300, 400, 500, 600, 700, 850, 999])
    labels = torch.tensor([0, 1, 2] * 4)
    guided = ClassifierGuided(mixture, schedule, logits_log_prob(noisy_logits(schedule)), labels)
    for k in range(3):  # the noise predictor of component k alone: the model given y = k
        component = GaussianMixture(MEANS[k : k + 1], STD).optimal_noise_predictor(schedule)
        rows = labels == k
        torch.testing.assert_close(guided(x_t, t)[rows], component(x_t[rows], t[rows]))
    unguided = ClassifierGuided(mixture, schedule, logits_log_prob(noisy_logits(schedule)),
                                labels, scale=0.0)  # fmt: skip
    torch.testing.assert_close(unguided(x_t, t), mixture(x_t, t))


def test_guided_sampling_draws_the_requested_component(schedule):
    mixture = GaussianMixture(MEANS, STD, WEIGHTS)
    labels = torch.full((2000,), 2)  # the rarest component, 20% of the data
    guided = ClassifierGuided(mixture.optimal_noise_predictor(schedule), schedule,
                              logits_log_prob(noisy_logits(schedule)), labels, scale=1.0)  # fmt: skip
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    samples = ddim_sample(guided, schedule, (2000, 2), steps=100, x_T=x_T, clip_x0=None)
    assert mixture.nearest_component(samples).eq(2).float().mean() > 0.99
    # the component's mean within 5 standard errors (0.3 / sqrt(2000) = 0.007)
    torch.testing.assert_close(samples.mean(0), MEANS[2], atol=0.035, rtol=0)


def test_errors_say_what_is_allowed(schedule):
    model = GaussianMixture(MEANS, STD).optimal_noise_predictor(schedule)
    log_prob = logits_log_prob(noisy_logits(schedule))
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="scale"):
        ClassifierGuided(model, schedule, log_prob, labels, scale=-1.0)
    with pytest.raises(ValueError, match="log_prob must be a callable"):
        ClassifierGuided(model, schedule, "classifier", labels)
    with pytest.raises(ValueError, match="1-D tensor of class indices"):
        ClassifierGuided(model, schedule, log_prob, torch.zeros(2, 2))
    x_t, t = torch.zeros(3, 2, dtype=torch.float64), torch.tensor([5, 5, 5])
    with pytest.raises(ValueError, match="3 samples but 2 labels"):
        ClassifierGuided(model, schedule, log_prob, labels)(x_t, t)
    summed = ClassifierGuided(model, schedule, lambda x, t, y: x.sum(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"one log-probability per sample, shape \(3,\)"):
        summed(x_t, t)
