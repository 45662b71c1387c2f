"""Measurement operators, DPS and PiGDM, checked against explicit matrices and exact Gaussian
posteriors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from diffusion_lib import (
    Downsampling,
    GaussianMixture,
    Inpainting,
    LinearMeasurement,
    NoiseSchedule,
    ddpm_sample,
    dps_sample,
    pigdm_sample,
    posterior_variance_of_x0,
)

MU, S = 0.3, 0.5  # the Gaussian data N(MU, S^2 I) of the exact tests


def matrix_of(operator, shape: tuple[int, ...]) -> Tensor:
    """The matrix of a linear operator on images of ``shape`` (no batch), one column per pixel."""
    size = torch.Size(shape).numel()
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *shape)
    return operator(basis).reshape(size, -1).T


class FlatImages:
    """Calls a model of points (B, D) on images (B, C, H, W)."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.model(x_t.flatten(1), t).reshape(x_t.shape)


def gaussian_model(schedule: NoiseSchedule, dimensions: int = 4) -> FlatImages:
    mixture = GaussianMixture(torch.full((1, dimensions), MU, dtype=torch.float64), S)
    return FlatImages(mixture.optimal_noise_predictor(schedule))


# Problems on 2x2 images: (operator, the rows of A that see something, measurement noise).
MASK = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
PROBLEMS = {
    "inpainting, exact": (Inpainting(MASK), 0.0),
    "inpainting, noisy": (Inpainting(MASK), 0.3),
    "downsampling, exact": (Downsampling(2), 0.0),
    "downsampling, noisy": (Downsampling(2), 0.2),
}


def seen_rows(operator, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The rows of A that see something, and their positions in the flattened measurement."""
    a = matrix_of(operator, shape)
    seen = a.abs().sum(1) > 0
    return a[seen], seen.nonzero().flatten()


def measurement(operator, shape: tuple[int, ...], y_seen: Tensor) -> Tensor:
    """A batch of measurements (B, ...) holding ``y_seen`` (B, rows) in the seen positions."""
    _, positions = seen_rows(operator, shape[1:])
    out_shape = operator(torch.zeros(shape, dtype=torch.float64)).shape
    y = torch.zeros(shape[0], out_shape[1:].numel(), dtype=torch.float64)
    y[:, positions] = y_seen
    return y.reshape(out_shape)


def gaussian_posterior(a: Tensor, y: Tensor, noise_std: float) -> tuple[Tensor, Tensor]:
    """Mean and covariance of x_0 ~ N(MU, S^2 I) given y = A x_0 + noise_std n (conditioning)."""
    d = a.shape[1]
    prior_mean = torch.full((d,), MU, dtype=torch.float64)
    gain = (
        S**2
        * a.T
        @ torch.linalg.inv(S**2 * a @ a.T + noise_std**2 * torch.eye(len(a), dtype=torch.float64))
    )
    return prior_mean + gain @ (y - a @ prior_mean), S**2 * (
        torch.eye(d, dtype=torch.float64) - gain @ a
    )


@pytest.mark.parametrize(
    ("operator", "shape"),
    [
        (Inpainting(torch.tensor([1, 0, 1, 1, 0, 0]).reshape(1, 2, 3).bool()), (1, 2, 3)),
        (Downsampling(2), (2, 4, 6)),
    ],  # fmt: skip
    ids=["inpainting", "downsampling"],
)
def test_operators_agree_with_their_matrices(operator, shape: tuple[int, ...]) -> None:
    a = matrix_of(operator, shape)
    gram = a @ a.T
    torch.testing.assert_close(gram, torch.diag(gram.diagonal()))  # A A^T is diagonal
    y = torch.randn(1, *operator(torch.zeros(1, *shape)).shape[1:], dtype=torch.float64)
    diagonal = operator.gram_diagonal(y).expand_as(y).reshape(-1)
    torch.testing.assert_close(diagonal, gram.diagonal())
    torch.testing.assert_close(
        operator.pseudo_inverse(y).reshape(-1), torch.linalg.pinv(a) @ y.reshape(-1)
    )


def test_measure_adds_noise_of_the_given_std() -> None:
    x = torch.randn(200, 1, 20, 20, dtype=torch.float64)
    y = Downsampling(2).measure(x, 0.05, generator=torch.Generator().manual_seed(0))
    noise = y - Downsampling(2)(x)
    assert abs(noise.std().item() - 0.05) < 0.05 * 0.02  # 20,000 draws: 0.5 % standard error
    assert abs(noise.mean().item()) < 0.05 * 0.02
    torch.testing.assert_close(Inpainting(MASK).measure(x[:, :, :2, :2]), x[:, :, :2, :2] * MASK)


def test_posterior_variance_of_x0_matches_regression() -> None:
    # Var[x_0 | x_t] for Gaussian data is the residual variance of the linear regression of
    # x_0 on x_t, measured here on draws rather than by conditioning.
    schedule = NoiseSchedule.from_name("linear")
    generator = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(400_000, generator=generator, dtype=torch.float64)
    t = torch.tensor([10, 300, 600, 999])
    measured = []
    for alpha_bar in schedule.alphas_cumprod[t]:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        slope = torch.cov(torch.stack([x0, x_t]))[0, 1] / x_t.var()
        measured.append((x0 - slope * x_t).var())
    exact = posterior_variance_of_x0(schedule, t, data_std=S)
    torch.testing.assert_close(exact, torch.stack(measured), rtol=0.01, atol=0)
    torch.testing.assert_close(
        posterior_variance_of_x0(schedule, t), 1 - schedule.alphas_cumprod[t]
    )


def one_step_schedule() -> NoiseSchedule:
    # T = 1 with alpha_bar = 0.4: the single reverse step returns its x_0 estimate exactly
    # (the posterior mean's coefficients are 1 on x_0 and 0 on x_t when alpha_bar_{t-1} = 1).
    return NoiseSchedule(torch.tensor([0.6], dtype=torch.float64))


@pytest.mark.parametrize(("operator", "noise_std"), PROBLEMS.values(), ids=PROBLEMS.keys())
def test_pigdm_guided_estimate_is_the_exact_posterior_mean(operator, noise_std: float) -> None:
    # For Gaussian data the guided estimate must equal E[x_0 | x_t, y], computed here by
    # conditioning the joint Gaussian of (x_0, x_t, y) on (x_t, y).
    schedule = one_step_schedule()
    shape = (3, 1, 2, 2)
    generator = torch.Generator().manual_seed(2)
    x_t = torch.randn(shape, generator=generator, dtype=torch.float64)
    a, _ = seen_rows(operator, shape[1:])
    y_seen = torch.randn(3, len(a), generator=generator, dtype=torch.float64)
    y = measurement(operator, shape, y_seen)
    guided = pigdm_sample(
        gaussian_model(schedule), schedule, operator, y, shape,
        noise_std=noise_std, data_std=S, x_T=x_t, clip_x0=None,
    )  # fmt: skip

    alpha = schedule.sqrt_alphas_cumprod[0]
    sigma = schedule.sqrt_one_minus_alphas_cumprod[0]
    d = 4
    # z = (x_t, y_seen) = M x_0 + independent noise, M = [alpha I; A], noise variances [sigma^2, sigma_y^2].
    m = torch.cat([alpha * torch.eye(d, dtype=torch.float64), a])
    noise_variance = torch.diag(
        torch.cat([sigma**2 * torch.ones(d), noise_std**2 * torch.ones(len(a))]).double()
    )
    covariance_zz = S**2 * m @ m.T + noise_variance
    for i in range(3):
        z = torch.cat([x_t[i].reshape(-1), y_seen[i]])
        expected = MU + S**2 * m.T @ torch.linalg.solve(
            covariance_zz, z - m @ torch.full((d,), MU, dtype=torch.float64)
        )
        torch.testing.assert_close(guided[i].reshape(-1), expected)


@pytest.mark.parametrize(
    ("operator", "noise_std", "eta"),
    [
        (*PROBLEMS["inpainting, noisy"], None),
        (*PROBLEMS["downsampling, exact"], None),
        (*PROBLEMS["inpainting, noisy"], 0.0),
    ],  # fmt: skip
    ids=["inpainting, noisy", "downsampling, exact", "inpainting, noisy, deterministic DDIM"],
)
def test_pigdm_draws_from_the_exact_gaussian_posterior(
    operator, noise_std: float, eta: float | None
) -> None:
    # The whole chain with the exact denoiser: 20,000 draws for one measurement against the
    # posterior mean and standard deviations from conditioning (standard error of the mean
    # at most 0.5 / sqrt(20,000) = 0.0035). With eta = 0 the chain is the probability-flow
    # ODE of the posterior, which carries N(0, I) onto the posterior too.
    schedule = NoiseSchedule.from_name("linear")
    shape = (20_000, 1, 2, 2)
    a, _ = seen_rows(operator, shape[1:])
    y_seen = torch.tensor([0.9, -0.4], dtype=torch.float64)[: len(a)]
    y = measurement(operator, shape, y_seen.expand(shape[0], len(a)))
    generator = torch.Generator().manual_seed(3)
    x_T = torch.randn(shape, generator=generator, dtype=torch.float64)
    x0 = pigdm_sample(
        gaussian_model(schedule), schedule, operator, y, shape, noise_std=noise_std, data_std=S,
        eta=eta, x_T=x_T, generator=generator, clip_x0=None,
    ).flatten(1)  # fmt: skip
    mean, covariance = gaussian_posterior(a, y_seen, noise_std)
    torch.testing.assert_close(x0.mean(0), mean, atol=0.015, rtol=0)
    torch.testing.assert_close(torch.cov(x0.T), covariance, atol=0.01, rtol=0)


def test_pigdm_with_ddim_steps_at_eta_one_is_the_ancestral_sampler() -> None:
    # DDIM's step with eta = 1 is a draw from q(x_{t-1} | x_t, x_0) (Song et al. 2021, eq. 16),
    # so with the same noise both chains visit the same states.
    schedule = NoiseSchedule.from_name("linear")
    operator, noise_std = PROBLEMS["downsampling, noisy"]
    shape = (64, 1, 2, 2)
    y = measurement(operator, shape, torch.full((64, 1), 0.5, dtype=torch.float64))
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(eta: float | None, seed: int) -> Tensor:
        return pigdm_sample(
            gaussian_model(schedule), schedule, operator, y, shape, noise_std=noise_std,
            data_std=S, steps=50, eta=eta, x_T=x_T, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    ancestral = run(None, 2)
    torch.testing.assert_close(run(1.0, 2), ancestral)
    deterministic = run(0.0, 3)
    torch.testing.assert_close(run(0.0, 4), deterministic, rtol=0, atol=0)  # no noise drawn
    assert (deterministic - ancestral).abs().max() > 1e-3


def test_pigdm_is_exact_at_zero_terminal_snr_with_a_data_predicting_model(
    gaussian_x0_model,
) -> None:
    # At t = T the schedule has alpha_bar = 0, where the correction must vanish rather than
    # divide by zero; the posterior is the same as on any other schedule.
    schedule = NoiseSchedule.from_name("linear", zero_terminal_snr=True)
    model = gaussian_x0_model(schedule, MU, S)
    operator, noise_std = PROBLEMS["inpainting, noisy"]
    shape = (20_000, 1, 2, 2)
    a, _ = seen_rows(operator, shape[1:])
    y_seen = torch.tensor([0.9, -0.4], dtype=torch.float64)
    y = measurement(operator, shape, y_seen.expand(shape[0], 2))
    generator = torch.Generator().manual_seed(7)
    x_T = torch.randn(shape, generator=generator, dtype=torch.float64)
    x0 = pigdm_sample(
        model, schedule, operator, y, shape, noise_std=noise_std, data_std=S, x_T=x_T,
        generator=generator, clip_x0=None,
    ).flatten(1)  # fmt: skip
    mean, covariance = gaussian_posterior(a, y_seen, noise_std)
    assert bool(torch.isfinite(x0).all())
    torch.testing.assert_close(x0.mean(0), mean, atol=0.015, rtol=0)
    torch.testing.assert_close(torch.cov(x0.T), covariance, atol=0.01, rtol=0)


def test_dps_step_matches_its_gradient_written_out() -> None:
    # One step with the exact Gaussian denoiser, whose x_0 estimate is linear in x_t:
    # x0_hat = MU + J (x_t - alpha MU) with J = alpha S^2 / (alpha^2 S^2 + sigma^2), so
    # grad ||y - A x0_hat||^2 = -2 J A^T (y - A x0_hat), scaled by zeta / ||y - A x0_hat||.
    schedule = one_step_schedule()
    operator, shape, zeta = Downsampling(2), (5, 1, 4, 4), 0.7
    generator = torch.Generator().manual_seed(4)
    x_t = torch.randn(shape, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 1, 2, 2, generator=generator, dtype=torch.float64)
    model = gaussian_model(schedule, dimensions=16)
    stepped = dps_sample(model, schedule, operator, y, shape, step_size=zeta, x_T=x_t, clip_x0=None)

    alpha, sigma = schedule.sqrt_alphas_cumprod[0], schedule.sqrt_one_minus_alphas_cumprod[0]
    jacobian = alpha * S**2 / (alpha**2 * S**2 + sigma**2)
    a = matrix_of(operator, shape[1:])
    x0_hat = MU + jacobian * (x_t.flatten(1) - alpha * MU)
    residual = y.flatten(1) - x0_hat @ a.T
    gradient = -2 * jacobian * residual @ a
    expected = x0_hat - zeta / residual.norm(dim=1, keepdim=True) * gradient
    torch.testing.assert_close(stepped.flatten(1), expected)


def test_dps_clips_the_estimate_of_the_step_but_not_that_of_the_gradient() -> None:
    """DPS's docstring: the clipped x0_hat enters the ancestral step, the unclipped one the
    gradient. On the one-step schedule the step returns its x_0, so the result is
    clamp(x0_hat) - zeta / ||r|| grad ||r||^2 with r = y - A x0_hat, written out as in
    test_dps_step_matches_its_gradient_written_out; x_t is wide, so some estimates are clipped."""
    schedule = one_step_schedule()
    operator, shape, zeta, low, high = Downsampling(2), (5, 1, 4, 4), 0.7, -0.2, 0.6
    generator = torch.Generator().manual_seed(8)
    x_t = 3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 1, 2, 2, generator=generator, dtype=torch.float64)
    model = gaussian_model(schedule, dimensions=16)
    stepped = dps_sample(
        model, schedule, operator, y, shape, step_size=zeta, x_T=x_t, clip_x0=(low, high)
    )

    alpha, sigma = schedule.sqrt_alphas_cumprod[0], schedule.sqrt_one_minus_alphas_cumprod[0]
    jacobian = alpha * S**2 / (alpha**2 * S**2 + sigma**2)
    a = matrix_of(operator, shape[1:])
    x0_hat = MU + jacobian * (x_t.flatten(1) - alpha * MU)
    outside = (x0_hat < low) | (x0_hat > high)
    assert outside.any() and not outside.all()
    residual = y.flatten(1) - x0_hat @ a.T
    gradient = -2 * jacobian * residual @ a
    expected = x0_hat.clamp(low, high) - zeta / residual.norm(dim=1, keepdim=True) * gradient
    torch.testing.assert_close(stepped.flatten(1), expected)


@pytest.mark.parametrize("eta", [None, 0.0])
def test_pigdm_clips_the_guided_estimate(eta: float | None) -> None:
    """PiGDM clips x0_y, the estimate after guidance: on the one-step schedule the result is
    clamp(E[x_0 | x_t, y]) with the exact posterior mean of Gaussian data (conditioning, as in
    test_pigdm_guided_estimate_is_the_exact_posterior_mean), by the ancestral and the DDIM
    route. Clipping x0_hat before the guidance, or not at all, gives other numbers."""
    schedule = one_step_schedule()
    operator, noise_std = PROBLEMS["downsampling, noisy"]
    shape, low, high = (6, 1, 2, 2), -0.2, 0.6
    generator = torch.Generator().manual_seed(9)
    x_t = 3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    y = torch.randn(6, 1, 1, 1, generator=generator, dtype=torch.float64)
    guided = pigdm_sample(
        gaussian_model(schedule), schedule, operator, y, shape, noise_std=noise_std,
        data_std=S, eta=eta, x_T=x_t, clip_x0=(low, high),
    ).flatten(1)  # fmt: skip

    alpha = schedule.sqrt_alphas_cumprod[0]
    sigma = schedule.sqrt_one_minus_alphas_cumprod[0]
    a = matrix_of(operator, shape[1:])
    m = torch.cat([alpha * torch.eye(4, dtype=torch.float64), a])
    noise_variance = torch.diag(
        torch.cat([sigma**2 * torch.ones(4), noise_std**2 * torch.ones(len(a))]).double()
    )
    covariance_zz = S**2 * m @ m.T + noise_variance
    z = torch.cat([x_t.flatten(1), y.flatten(1)], dim=1)  # (B, 4 + 1)
    prior = torch.full((4,), MU, dtype=torch.float64)
    mean = MU + S**2 * torch.linalg.solve(covariance_zz, (z - m @ prior).T).T @ m
    outside = (mean < low) | (mean > high)
    assert outside.any() and not outside.all()
    # the unguided estimate would also be clipped in places: the clip must come after guidance
    jacobian = alpha * S**2 / (alpha**2 * S**2 + sigma**2)
    x0_hat = MU + jacobian * (x_t.flatten(1) - alpha * MU)
    assert ((x0_hat < low) | (x0_hat > high)).any()
    torch.testing.assert_close(guided, mean.clamp(low, high))


def test_dps_without_a_step_is_ancestral_sampling() -> None:
    schedule = NoiseSchedule.from_name("linear")
    model = gaussian_model(schedule)
    shape = (6, 1, 2, 2)
    x_T = torch.randn(shape, dtype=torch.float64)
    y = torch.ones(6, 1, 1, 1, dtype=torch.float64)
    run = dict(x_T=x_T, steps=20, clip_x0=None)
    dps = dps_sample(model, schedule, Downsampling(2), y, shape, step_size=0.0,
                     generator=torch.Generator().manual_seed(5), **run)  # fmt: skip
    plain = ddpm_sample(model, schedule, shape, generator=torch.Generator().manual_seed(5), **run)
    torch.testing.assert_close(dps, plain)


def test_dps_moves_samples_towards_the_measurement() -> None:
    # Prior mean of A x_0: 0.3; measured: 1.0. Plain sampling misses it, DPS lands on it.
    schedule = NoiseSchedule.from_name("linear")
    shape = (500, 1, 2, 2)
    y = torch.full((500, 1, 1, 1), 1.0, dtype=torch.float64)
    x_T = torch.randn(shape, dtype=torch.float64)
    misses = {}
    for zeta in (0.0, 0.5):
        x0 = dps_sample(gaussian_model(schedule), schedule, Downsampling(2), y, shape,
                        step_size=zeta, steps=100, x_T=x_T, clip_x0=None,
                        generator=torch.Generator().manual_seed(6))  # fmt: skip
        misses[zeta] = abs((Downsampling(2)(x0) - y).mean().item())
    assert misses[0.5] < 0.05 and misses[0.0] > 0.6


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.layer(x_t)


@pytest.mark.parametrize("method", ["dps", "pigdm"])
def test_samplers_leave_the_network_as_they_found_it(method: str) -> None:
    net = TinyNet().train()
    schedule = NoiseSchedule.from_name("linear")
    operator, y = Inpainting(torch.ones(1, 1, 4, 4)), torch.zeros(2, 1, 4, 4)
    if method == "dps":
        out = dps_sample(net, schedule, operator, y, (2, 1, 4, 4), steps=3)
    else:
        out = pigdm_sample(net, schedule, operator, y, (2, 1, 4, 4), noise_std=0.1, steps=3)
    assert out.shape == (2, 1, 4, 4) and not out.requires_grad
    assert net.training
    assert all(p.grad is None for p in net.parameters())


class Blur(LinearMeasurement):
    """A measurement with only a forward map, as a reader would write one."""

    def __call__(self, x: Tensor) -> Tensor:
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)


def test_dps_needs_only_the_forward_map_and_pigdm_says_what_it_lacks() -> None:
    schedule = NoiseSchedule.from_name("linear")
    y = torch.zeros(2, 1, 4, 4)
    out = dps_sample(TinyNet(), schedule, Blur(), y, (2, 1, 4, 4), steps=3)
    assert out.shape == (2, 1, 4, 4) and bool(torch.isfinite(out).all())
    with pytest.raises(NotImplementedError, match="gram_diagonal.*dps_sample"):
        pigdm_sample(TinyNet(), schedule, Blur(), y, (2, 1, 4, 4), noise_std=0.1, steps=3)


def restore(method: str = "dps", operator=None, y: Tensor | None = None, **options) -> Tensor:
    """One small restoration of (2, 1, 4, 4) images, with defaults that are all valid."""
    operator = Downsampling(2) if operator is None else operator
    y = torch.ones(2, 1, 2, 2) if y is None else y
    sampler = dps_sample if method == "dps" else pigdm_sample
    schedule = NoiseSchedule.from_name("linear")
    return sampler(TinyNet(), schedule, operator, y, (2, 1, 4, 4), **{"steps": 2, **options})


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Inpainting(torch.tensor([0.0, 0.5])), "only 0"),
        (lambda: Inpainting(torch.ones(3))(torch.ones(2, 4)), "does not broadcast"),
        (lambda: Downsampling(0), "factor"),
        (lambda: Downsampling(3)(torch.ones(1, 1, 4, 4)), "divisible by 3"),
        (lambda: Downsampling(2).measure(torch.ones(1, 1, 4, 4), -0.1), "noise_std"),
        (lambda: restore(y=torch.ones(2, 1, 4, 4)), r"shape \(2, 1, 2, 2\)"),
        (lambda: restore(operator="blur"), "LinearMeasurement"),
        (lambda: restore(step_size=-1), "step_size"),
        (lambda: restore(steps=0), "steps"),
        (lambda: restore("pigdm", noise_std=0.1, data_std=0), "data_std"),
        (lambda: restore("pigdm", noise_std=-0.1), "noise_std"),
        (lambda: restore("pigdm", noise_std=0.1, eta=-1.0), "eta"),
        (lambda: restore("pigdm", noise_std=0.1, eta=1.5), r"eta must lie in \[0.0, 1.0\]"),
        (
            lambda: restore("pigdm", y=torch.full((2, 1, 2, 2), float("nan")), noise_std=0.1),
            "finite",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
