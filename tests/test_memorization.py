"""EmpiricalDenoiser, the exact minimiser of the loss on a finite training set: against autograd
of the noised mixture's log density, Monte Carlo counts of where noised images land, and the
loss itself; sampling with it returns training images."""

import pytest
import torch

from diffusion_lib import EmpiricalDenoiser, NoiseSchedule, ddim_sample, nearest_neighbour_ratios


@pytest.fixture
def schedule():
    return NoiseSchedule.from_name("linear", 1000)


def test_noise_estimate_is_tweedie_score_of_the_noised_mixture(schedule):
    """E[eps | x_t] = -sigma_t grad log q(x_t), with q(x_t) the mixture of N(a x^i, s^2 I),
    differentiated by autograd."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((5, 1, 3, 4), generator=generator) * 2 - 1
    t = torch.tensor([3, 60, 300, 900])
    x_t = torch.randn((4, 1, 3, 4), generator=generator, dtype=torch.float64)
    denoiser = EmpiricalDenoiser(images, schedule)

    points = x_t.clone().requires_grad_(True)
    alpha = schedule.sqrt_alphas_cumprod[t].double()[:, None, None, None, None]
    variance = (1 - schedule.alphas_cumprod[t]).double()[:, None, None, None, None]
    offsets = points[:, None] - alpha * images.double()[None]  # (B, N, C, H, W)
    log_density = torch.logsumexp(
        -offsets.pow(2).sum(dim=(2, 3, 4)) / (2 * variance[:, :, 0, 0, 0]), dim=1
    )
    (score,) = torch.autograd.grad(log_density.sum(), points)
    expected = -variance.sqrt()[:, 0] * score

    torch.testing.assert_close(denoiser(x_t, t), expected, rtol=1e-6, atol=1e-6)


def test_one_training_image_is_always_the_answer(schedule):
    image = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    x_t = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    estimate = EmpiricalDenoiser(image, schedule).x0_estimate(x_t, torch.tensor([0, 500, 999]))
    torch.testing.assert_close(estimate, image.expand(3, -1, -1, -1))


def test_weights_are_the_posterior_of_the_training_image():
    """Monte Carlo: noise three one-pixel images many times; among the draws that land near a
    point x, the share made from image i is w_i(x)."""
    schedule = NoiseSchedule.from_name("linear", 1000)
    images = torch.tensor([-0.5, 0.0, 0.6]).reshape(3, 1, 1, 1)
    denoiser = EmpiricalDenoiser(images, schedule)
    t_value = 300
    generator = torch.Generator().manual_seed(2)
    source = torch.randint(0, 3, (400_000,), generator=generator)
    noise = torch.randn((400_000, 1, 1, 1), generator=generator)
    x_t = schedule.q_sample(images[source], torch.full_like(source, t_value), noise).flatten()
    first_image_weights = []
    for centre in torch.linspace(-1.0, 1.0, 5).tolist():
        near = (x_t - centre).abs() < 0.025
        shares = torch.bincount(source[near], minlength=3).double() / near.sum()
        point = torch.full((1, 1, 1, 1), centre)
        weights = denoiser.weights(point, torch.tensor([t_value]))[0]
        torch.testing.assert_close(shares, weights, atol=0.02, rtol=0)
        first_image_weights.append(weights[0].item())
    assert first_image_weights[0] - first_image_weights[-1] > 0.3  # they do depend on x


def test_effective_count_runs_from_all_images_to_one(schedule):
    images = torch.rand((10, 1, 3, 3), generator=torch.Generator().manual_seed(6)) * 2 - 1
    denoiser = EmpiricalDenoiser(images, schedule)
    noise = torch.randn((10, 1, 3, 3), generator=torch.Generator().manual_seed(7))
    at_the_end = denoiser.effective_count(noise, torch.full((10,), 999))
    near_the_image = denoiser.effective_count(
        schedule.q_sample(images, torch.zeros(10, dtype=torch.long), noise),
        torch.zeros(10, dtype=torch.long),
    )
    torch.testing.assert_close(
        at_the_end, torch.full((10,), 10.0, dtype=torch.float64), rtol=0.02, atol=0
    )
    torch.testing.assert_close(near_the_image, torch.ones(10, dtype=torch.float64))
    weights = denoiser.weights(noise, torch.full((10,), 400))
    by_hand = torch.exp(-(weights * weights.log()).sum(dim=1))
    torch.testing.assert_close(denoiser.effective_count(noise, torch.full((10,), 400)), by_hand)


def test_sampling_with_the_ideal_denoiser_copies_training_images(schedule):
    generator = torch.Generator().manual_seed(3)
    images = torch.rand((8, 1, 6, 6), generator=generator) * 2 - 1
    samples = ddim_sample(
        EmpiricalDenoiser(images, schedule), schedule, (16, 1, 6, 6), steps=50, generator=generator
    )
    ratios, indices = nearest_neighbour_ratios(samples.flatten(1), images.flatten(1))
    assert ratios.max() < 1e-3
    torch.testing.assert_close(samples, images[indices], atol=1e-3, rtol=0)
    assert len(indices.unique()) > 1  # different noises reach different training images


def test_noise_estimate_minimises_the_loss_on_the_training_set(schedule):
    """The simplified loss E|eps_hat(x_t) - eps|^2 is a convex quadratic in eps_hat, so its
    minimiser is the estimate whose directional derivative vanishes in every direction f(x_t):
    E[(eps_hat - eps) . f(x_t)] = 0. Checked by Monte Carlo for several features f (constant,
    linear, quadratic and random tanh ones), each to 5 standard errors; an estimate scaled by
    1.05 is out by more than 100 of them in the linear direction."""
    generator = torch.Generator().manual_seed(4)
    n = 200_000
    images = torch.rand((6, 1, 2, 2), generator=generator) * 2 - 1
    denoiser = EmpiricalDenoiser(images, schedule)
    source = torch.randint(0, 6, (n,), generator=generator)
    t = torch.full((n,), 400)
    noise = torch.randn((n, 1, 2, 2), generator=generator)
    x_t = schedule.q_sample(images[source], t, noise)
    residual = (denoiser(x_t, t) - noise).double()
    features = [torch.ones_like(x_t), x_t, x_t.pow(2), x_t.flip(-1)]
    features += [torch.tanh(x_t @ torch.randn((2, 2), generator=generator)) for _ in range(4)]
    for feature in features:
        product = (residual * feature.double()).flatten(1).sum(1)
        assert abs(product.mean().item()) < 5 * product.std().item() / n**0.5


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(4, 4), r"\(N, C, H, W\)"),
        (torch.zeros(0, 1, 4, 4), "N >= 1"),
        (torch.full((2, 1, 2, 2), float("nan")), "finite"),
    ],
)
def test_bad_training_images_are_refused(schedule, images, message):
    with pytest.raises(ValueError, match=message):
        EmpiricalDenoiser(images, schedule)


def test_bad_calls_are_refused(schedule):
    denoiser = EmpiricalDenoiser(torch.zeros(2, 1, 4, 4), schedule)
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 1, 4, 4\)"):
        denoiser(torch.zeros(3, 1, 5, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="0..999"):
        denoiser(torch.zeros(3, 1, 4, 4), torch.full((3,), 1000))
