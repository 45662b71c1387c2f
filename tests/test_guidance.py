"""Tests for diffusion_lib.guidance: the guided estimate, its reference, interval and rescaling."""

from __future__ import annotations

import pytest
import torch
from test_models import perturb  # noise on every parameter, so zero-initialised layers speak

from diffusion_lib import (
    AttentionUNet,
    ClassConditionalNoisePredictor,
    GaussianMixture,
    Guided,
    NoiseSchedule,
    PreconditionedDenoiser,
    ddim_sample,
)
from diffusion_lib.reverse_process import predict_noise
from diffusion_lib.solvers import EvaluationCounter

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = dict(image_size=8, base_channels=8, num_res_blocks=1, num_heads=2, num_classes=3)


def network(seed: int = 0) -> AttentionUNet:
    torch.manual_seed(seed)
    return perturb(AttentionUNet(**UNET)).eval()


def inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x_t = torch.randn(batch, 1, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    labels = torch.arange(batch) % 3
    return x_t, t, labels


@torch.no_grad()
def test_default_reference_is_classifier_free_guidance() -> None:
    model, (x_t, t, labels) = network(), inputs()
    guided = Guided(model, 2.5)(x_t, t, labels)
    unconditional = model(x_t, t, torch.full_like(labels, model.null_label))
    expected = (1 + 2.5) * model(x_t, t, labels) - 2.5 * unconditional  # Ho & Salimans, eq. 6
    torch.testing.assert_close(guided, expected)
    sampler_estimate = predict_noise(
        model, x_t, t, labels, guidance=2.5, null_label=model.null_label
    )
    torch.testing.assert_close(sampler_estimate, expected)
    assert not torch.allclose(guided, model(x_t, t, labels))


@torch.no_grad()
def test_negative_label_replaces_the_unconditional_estimate() -> None:
    model, (x_t, t, labels) = network(), inputs()
    negative = model(x_t, t, torch.full_like(labels, 2))
    conditional = model(x_t, t, labels)
    expected = negative + 2.0 * (conditional - negative)  # eps_neg + (1 + w)(eps_c - eps_neg)
    torch.testing.assert_close(Guided(model, 1.0, reference_label=2)(x_t, t, labels), expected)


@torch.no_grad()
def test_a_negative_label_per_sample_steers_each_sample_away_from_its_own() -> None:
    model, (x_t, t, labels) = network(), inputs()
    negatives = torch.tensor([1, 2, 0, 3])  # 3 is the null label: plain guidance for that row
    guided = Guided(model, 1.5, reference_label=negatives)(x_t, t, labels)
    for row, negative in enumerate(negatives.tolist()):
        one = slice(row, row + 1)
        expected = Guided(model, 1.5, reference_label=negative)(x_t[one], t[one], labels[one])
        torch.testing.assert_close(guided[one], expected)
    with pytest.raises(ValueError, match="one per sample, shape"):
        Guided(model, 1.5, reference_label=negatives[:2])(x_t, t, labels)


@torch.no_grad()
@pytest.mark.parametrize("conditional", [True, False])
def test_autoguidance_extrapolates_from_the_weaker_model(conditional: bool) -> None:
    good, weak = network(0), network(1)
    x_t, t, labels = inputs()
    args = (x_t, t, labels) if conditional else (x_t, t)
    if not conditional:
        good, weak = (perturb(AttentionUNet(**{**UNET, "num_classes": None})) for _ in range(2))
    expected = 3.0 * good(*args) - 2.0 * weak(*args)  # Karras et al. 2024, eq. 2 with w_K = 3
    torch.testing.assert_close(Guided(good, 2.0, reference_model=weak)(*args), expected)


@torch.no_grad()
def test_interval_leaves_the_other_timesteps_alone_and_skips_their_reference() -> None:
    model, (x_t, _, labels) = network(), inputs()
    t = torch.tensor([100, 400, 600, 900])
    reference = EvaluationCounter(network(1))
    guided = Guided(model, 2.0, reference_model=reference, interval=(400, 600))
    out = guided(x_t, t, labels)
    plain = Guided(model, 2.0, reference_model=network(1))(x_t, t, labels)
    conditional = model(x_t, t, labels)
    torch.testing.assert_close(out[[0, 3]], conditional[[0, 3]])
    torch.testing.assert_close(out[[1, 2]], plain[[1, 2]])
    assert reference.images == 2  # the reference saw only the two samples inside
    guided(x_t, torch.full_like(t, 999), labels)
    assert reference.images == 2  # nothing inside: the reference is not evaluated


@torch.no_grad()
def test_rescale_matches_the_conditional_standard_deviation() -> None:
    model, (x_t, t, labels) = network(), inputs()
    conditional = model(x_t, t, labels)
    plain = Guided(model, 4.0)(x_t, t, labels)
    rescaled = Guided(model, 4.0, rescale=1.0)(x_t, t, labels)
    half = Guided(model, 4.0, rescale=0.5)(x_t, t, labels)
    dims = (1, 2, 3)
    torch.testing.assert_close(rescaled.std(dim=dims), conditional.std(dim=dims))
    # Same direction as the plain guided estimate, only shorter or longer.
    cosine = torch.nn.functional.cosine_similarity(rescaled.flatten(1), plain.flatten(1))
    torch.testing.assert_close(cosine, torch.ones(4))
    torch.testing.assert_close(half, 0.5 * (rescaled + plain))


@torch.no_grad()
def test_learned_variance_channels_are_the_conditional_ones() -> None:
    torch.manual_seed(0)
    model = perturb(AttentionUNet(**UNET, out_channels=2)).eval()
    x_t, t, labels = inputs()
    out = Guided(model, 1.5)(x_t, t, labels)
    conditional = model(x_t, t, labels)
    unconditional = model(x_t, t, torch.full_like(labels, model.null_label))
    torch.testing.assert_close(out[:, :1], 2.5 * conditional[:, :1] - 1.5 * unconditional[:, :1])
    torch.testing.assert_close(out[:, 1:], conditional[:, 1:])


@torch.no_grad()
def test_zero_weight_samples_like_the_model() -> None:
    model, schedule = network(), NoiseSchedule.from_name("linear")
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 1, 2])
    plain = ddim_sample(model, schedule, x_T.shape, steps=5, x_T=x_T, labels=labels)
    wrapped = ddim_sample(Guided(model, 0.0), schedule, x_T.shape, steps=5, x_T=x_T, labels=labels)
    torch.testing.assert_close(wrapped, plain)


def test_guided_estimate_is_the_score_of_the_tilted_noised_density() -> None:
    """With exact predictors, eps_tilde = -sigma_t grad log [q_t(x|c)^(1+w) q_t(x)^(-w)]."""
    schedule = NoiseSchedule.from_name("linear")
    classes = [
        GaussianMixture(torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), 0.3),
        GaussianMixture(torch.tensor([[1.0, 0.5]]), 0.4),
    ]
    exact = ClassConditionalNoisePredictor(classes, schedule, torch.tensor([0.7, 0.3]))
    w, step = 2.0, 300
    x_t = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t, labels = torch.full((5,), step), torch.tensor([0, 1, 0, 1, 1])
    guided = Guided(exact, w)(x_t, t, labels)

    points = x_t.clone().requires_grad_(True)
    conditional = torch.stack(
        [
            classes[int(c)].noised(schedule, step).log_prob(points[i : i + 1])[0]
            for i, c in enumerate(labels)
        ]
    )
    pooled = exact.pooled.noised(schedule, step).log_prob(points)
    (gradient,) = torch.autograd.grad(((1 + w) * conditional - w * pooled).sum(), points)
    sigma = schedule.sqrt_one_minus_alphas_cumprod[step].item()
    torch.testing.assert_close(guided, -sigma * gradient)


@torch.no_grad()
def test_an_interval_of_noise_levels_guides_an_edm_denoiser_only_there() -> None:
    """Kynkäänniemi et al. give EDM2's interval in sigma, the time input of its denoiser."""
    model, (x_t, _, labels) = network(), inputs()
    denoiser = PreconditionedDenoiser(model)
    sigma = torch.tensor([0.1, 0.28, 3.0, 40.0])
    guided = Guided(denoiser, 2.0, interval=(0.28, 5.42))(x_t, sigma, labels)
    everywhere = Guided(denoiser, 2.0)(x_t, sigma, labels)
    torch.testing.assert_close(guided[[1, 2]], everywhere[[1, 2]])
    torch.testing.assert_close(guided[[0, 3]], denoiser(x_t, sigma, labels)[[0, 3]])
    assert not torch.allclose(everywhere[[0, 3]], guided[[0, 3]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(weight=float("nan")), "weight must be a finite number"),
        (dict(weight=1.0, rescale=1.5), "rescale must be a number in"),
        (dict(weight=1.0, interval=(600, 400)), "interval must be two finite times"),
        (dict(weight=1.0, interval=(-1, 400)), "interval must be two finite times"),
        (dict(weight=1.0, interval=(0, float("inf"))), "interval must be two finite times"),
        (dict(weight=1.0, interval=(0, 1, 2)), "interval must be two finite times"),
    ],
)
def test_bad_settings_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Guided(network(), **kwargs)


def test_an_unconditional_model_needs_a_reference() -> None:
    model = AttentionUNet(**{**UNET, "num_classes": None})
    with pytest.raises(ValueError, match="needs a model trained with a null label"):
        Guided(model, 1.0)
    with pytest.raises(ValueError, match="guidance without labels needs a reference_model"):
        Guided(network(), 1.0)(*inputs()[:2])
