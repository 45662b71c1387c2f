"""Classifier guidance against the exact conditional model of a Gaussian mixture."""

import math

import pytest
import torch
from torch import Tensor

from diffusion_lib import GaussianMixture, NoiseSchedule, ddim_sample, train
from diffusion_lib.classifier_guidance import (
    ClassifierGuided,
    NoisyClassifier,
    logits_log_prob,
    noisy_classifier_loss,
)

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


SMALL = dict(image_size=8, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
             norm_groups=4)  # fmt: skip


def test_classifier_loss_is_the_cross_entropy_on_noised_images(schedule):
    torch.manual_seed(0)
    classifier = NoisyClassifier(3, **SMALL).double()
    x0 = torch.rand(16, 1, 8, 8, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 3, (16,))
    loss = noisy_classifier_loss(classifier, schedule, x0, labels=labels,
                                 generator=torch.Generator().manual_seed(4))  # fmt: skip
    generator = torch.Generator().manual_seed(4)  # the same draws, in the same order
    t = torch.randint(0, 1000, (16,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    alpha_bar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    logits = classifier(alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps, t)
    expected = -logits.log_softmax(1)[torch.arange(16), labels].mean()
    torch.testing.assert_close(loss, expected.float())


def test_a_trained_noisy_classifier_reads_labels_through_light_noise_only(schedule):
    # two classes: the bright half of the image is the top or the bottom
    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 2, (512,), generator=generator)
    rows = torch.arange(8).view(1, 1, 8, 1)
    top = (rows < 4).float().expand(512, 1, 8, 8)
    images = torch.where(labels.view(-1, 1, 1, 1) == 0, top, 1 - top) * 1.6 - 0.8
    classifier = NoisyClassifier(2, **SMALL)
    train(classifier, schedule, images, labels=labels, loss=noisy_classifier_loss, steps=150,
          batch_size=64, lr=2e-3, device="cpu", progress=False)  # fmt: skip
    x0, y = images[:256], labels[:256]

    def accuracy(t: int) -> float:
        times = torch.full((256,), t)
        x_t = schedule.q_sample(x0, times, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            return (classifier(x_t, times).argmax(1) == y).float().mean().item()

    assert accuracy(100) > 0.95  # the halves still show
    assert accuracy(999) < 0.65  # pure noise holds no label: chance is 0.5
    guided = ClassifierGuided(lambda x, t: torch.zeros_like(x), schedule,
                              logits_log_prob(classifier), y[:4])  # fmt: skip
    assert guided(x0[:4], torch.full((4,), 500)).abs().max() > 0  # the gradient reaches x_t


def test_classifier_errors_say_what_is_allowed(schedule):
    with pytest.raises(ValueError, match="at least 2"):
        NoisyClassifier(1, **SMALL)
    with pytest.raises(ValueError, match="out_channels do not apply"):
        NoisyClassifier(2, out_channels=2, **SMALL)
    with pytest.raises(ValueError, match="needs the class labels"):
        noisy_classifier_loss(NoisyClassifier(2, **SMALL), schedule, torch.zeros(2, 1, 8, 8))


def test_scale_s_moves_s_times_as_far_as_the_exact_conditional(schedule: NoiseSchedule) -> None:
    """With the exact classifier, eps - sqrt(1 - abar) grad log p(y | x_t) is the conditional
    eps_y (the s = 1 test), so eps - s sqrt(1 - abar) grad log p = eps + s (eps_y - eps)."""
    mixture = GaussianMixture(MEANS, STD, WEIGHTS).optimal_noise_predictor(schedule)
    x_t = 2 * torch.randn(12, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 100, 200, 300, 400, 500, 600, 700, 850, 999])
    labels = torch.tensor([0, 1, 2] * 4)
    log_prob = logits_log_prob(noisy_logits(schedule))
    guided = ClassifierGuided(mixture, schedule, log_prob, labels, scale=2.5)(x_t, t)
    unguided = mixture(x_t, t)
    for k in range(3):
        component = GaussianMixture(MEANS[k : k + 1], STD).optimal_noise_predictor(schedule)
        rows = labels == k
        expected = unguided[rows] + 2.5 * (component(x_t[rows], t[rows]) - unguided[rows])
        # logits_log_prob works in float32: the gradients agree to about 1e-7, relatively
        torch.testing.assert_close(guided[rows], expected, rtol=1e-6, atol=1e-6)


def test_classifier_loss_of_fixed_logits_is_the_closed_form_cross_entropy(
    schedule: NoiseSchedule,
) -> None:
    """Logits (0, 2, 0) for every input: -log softmax = log(2 + e^2) - 2 [y = 1]; labels
    (0, 1, 2, 1) average to log(2 + e^2) - 1, whatever the noise."""

    class FixedLogits(torch.nn.Module):
        def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
            return torch.tensor([0.0, 2.0, 0.0]).expand(x_t.shape[0], 3)

    loss = noisy_classifier_loss(FixedLogits(), schedule, torch.zeros(4, 1, 2, 2),
                                 labels=torch.tensor([0, 1, 2, 1]),
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert loss.item() == pytest.approx(math.log(2 + math.e**2) - 1.0, rel=1e-6)
