"""EDM (Karras et al. 2022): noise levels, preconditioning, loss and sampler, checked against eq. 5
written out, Monte Carlo variances, brute-force scans, hand-computed losses and the closed-form
ODE of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from diffusion_lib import (
    EDMNoiseLevels,
    GaussianMixture,
    NoiseSchedule,
    PreconditionedDenoiser,
    ToyMLP,
    edm_loss,
    edm_sample,
    karras_sigmas,
    preconditioning,
    train,
)
from diffusion_lib.smoke import MAX_SAMPLING_STEPS, SMOKE_VARIABLE
from diffusion_lib.solvers import EvaluationCounter

pytestmark = pytest.mark.usefixtures("one_thread")

STD = 0.5  # Gaussian data N(0, STD^2 I): the ideal denoiser and the ODE are known in closed form
SIGMA_MAX = 80.0
MIXTURE = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), 0.2, torch.tensor([1.0, 2.0]))


def gaussian_denoiser(x: Tensor, sigma: Tensor) -> Tensor:
    """D*(x; sigma) = E[y | y + sigma n = x] = STD^2 / (STD^2 + sigma^2) x."""
    return STD**2 / (STD**2 + sigma[:, None] ** 2) * x


def gaussian_flow(x_start: Tensor, sigma_start: float, sigma: float) -> Tensor:
    """The ODE dx/dsigma = (x - D*) / sigma = sigma x / (STD^2 + sigma^2) is solved by
    x(sigma) proportional to sqrt(STD^2 + sigma^2)."""
    return x_start * math.sqrt(STD**2 + sigma**2) / math.sqrt(STD**2 + sigma_start**2)


def mixture_denoiser(x: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie's formula, D*(x; sigma) = x + sigma^2 grad log p(x; sigma), with the exact score of
    the noised mixture (one noise level per call, as the sampler makes them)."""
    level = sigma[0].item()
    assert bool((sigma == level).all())
    score = MIXTURE.scaled_and_noised(1.0, level).score(x)
    return x + level**2 * score.to(x.dtype)


def standard_normal(count: int, dim: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, dim, generator=generator, dtype=torch.float64)


def rms(a: Tensor, b: Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


# ----------------------------------------------------------------------------- noise levels
@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
@pytest.mark.parametrize("steps", [2, 5, 18])
def test_karras_sigmas_follow_eq_5(steps: int, rho: float) -> None:
    sigma_min, sigma_max = 0.002, 80.0
    expected = [
        (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)))
        ** rho
        for i in range(steps)
    ] + [0.0]  # fmt: skip
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,)
    assert sigmas.tolist() == pytest.approx(expected, rel=1e-12)
    assert sigmas[0].item() == pytest.approx(sigma_max) and sigmas[-2].item() == pytest.approx(
        sigma_min
    )
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_rho_one_is_even_in_sigma_and_large_rho_approaches_even_in_log_sigma() -> None:
    even = karras_sigmas(5, 1.0, 9.0, rho=1.0)[:-1]
    assert even.tolist() == pytest.approx([9.0, 7.0, 5.0, 3.0, 1.0])
    logs = karras_sigmas(5, 0.01, 100.0, rho=1e4)[:-1].log()
    assert (logs[:-1] - logs[1:]).tolist() == pytest.approx([math.log(10)] * 4, rel=1e-3)


def test_one_step_goes_from_sigma_max_to_zero() -> None:
    assert karras_sigmas(1, 0.1, 10.0).tolist() == [10.0, 0.0]


# ----------------------------------------------------------------------------- preconditioning
def test_coefficients_match_table_1() -> None:
    sigma = torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, 0.5)
    for k, s in enumerate(sigma.tolist()):
        assert c_skip[k].item() == pytest.approx(0.25 / (s**2 + 0.25))
        assert c_out[k].item() == pytest.approx(s * 0.5 / math.sqrt(s**2 + 0.25))
        assert c_in[k].item() == pytest.approx(1 / math.sqrt(s**2 + 0.25))
        assert c_noise[k].item() == pytest.approx(250 * (math.log(s) / 4 + 2))  # 500 + 62.5 ln s
    assert c_noise.min() > 0 and c_noise.max() < 1000  # sampling's range sits inside [0, 1000]


def test_c_noise_is_clamped_to_the_embeddings_range() -> None:
    sigma = torch.tensor([0.0, 1e-6, math.exp(8.0), 1e6])
    assert preconditioning(sigma).c_noise.tolist() == pytest.approx([0.0, 0.0, 1000.0, 1000.0])


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 40.0])
def test_input_and_effective_target_have_unit_variance(sigma: float) -> None:
    """Monte Carlo with non-Gaussian data of standard deviation sigma_data (a uniform law):
    Var(c_in x) = 1 and Var((y - c_skip x) / c_out) = 1, to within 4 standard errors."""
    count, sigma_data = 200_000, 0.5
    generator = torch.Generator().manual_seed(0)
    y = (torch.rand(count, dtype=torch.float64, generator=generator) - 0.5) * sigma_data * 12**0.5
    x = y + sigma * torch.randn(count, dtype=torch.float64, generator=generator)
    c_skip, c_out, c_in, _ = preconditioning(torch.tensor(sigma, dtype=torch.float64), sigma_data)
    tolerance = 4 * math.sqrt(2 / count) * 1.5  # the variance's standard error, kurtosis allowed
    assert (c_in * x).var().item() == pytest.approx(1.0, abs=tolerance)
    assert ((y - c_skip * x) / c_out).var().item() == pytest.approx(1.0, abs=tolerance)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_c_skip_minimises_and_c_out_is_the_spread_of_the_target(sigma: float) -> None:
    """Brute force: scan c_skip for the smallest spread of y - c_skip x; its minimiser is c_skip
    and its standard deviation c_out."""
    count, sigma_data = 40_000, 0.5
    generator = torch.Generator().manual_seed(1)
    y = sigma_data * torch.randn(count, dtype=torch.float64, generator=generator)
    x = y + sigma * torch.randn(count, dtype=torch.float64, generator=generator)
    candidates = torch.linspace(0.0, 1.0, 801, dtype=torch.float64)
    spreads = torch.stack([(y - c * x).std() for c in candidates])
    best = int(spreads.argmin())
    c_skip, c_out, _, _ = preconditioning(torch.tensor(sigma, dtype=torch.float64), sigma_data)
    assert candidates[best].item() == pytest.approx(c_skip.item(), abs=0.01)
    assert spreads[best].item() == pytest.approx(c_out.item(), rel=0.01)


class RecordingNetwork(nn.Module):
    """F(x, time[, labels]) = weight * x + time / 1000, remembering what it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def forward(self, x: Tensor, time: Tensor, labels: Tensor | None = None) -> Tensor:
        self.calls.append((x, time, labels))
        return self.weight * x + time[:, None] / 1000


def test_denoiser_is_c_skip_x_plus_c_out_f_of_scaled_input() -> None:
    network = RecordingNetwork()
    denoiser = PreconditionedDenoiser(network, sigma_data=0.8)
    x = standard_normal(3, 2, 0)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    labels = torch.tensor([1, 2, 3])
    out = denoiser(x, sigma, labels)
    seen_x, seen_time, seen_labels = network.calls[-1]
    for k, s in enumerate(sigma.tolist()):
        c_skip, c_out, c_in = (
            0.64 / (s**2 + 0.64),
            s * 0.8 / math.sqrt(s**2 + 0.64),
            (s**2 + 0.64) ** -0.5,
        )
        time = 500 + 62.5 * math.log(s)
        assert seen_time[k].item() == pytest.approx(time)
        torch.testing.assert_close(seen_x[k], c_in * x[k])
        expected = c_skip * x[k] + c_out * (0.7 * c_in * x[k] + time / 1000)
        torch.testing.assert_close(out[k], expected.detach())
    assert torch.equal(seen_labels, labels)


def test_for_gaussian_data_of_std_sigma_data_the_ideal_network_is_zero() -> None:
    """With F = 0 the denoiser is c_skip x = sigma_data^2 / (sigma_data^2 + sigma^2) x = D*."""

    class Zero(nn.Module):
        def forward(self, x: Tensor, time: Tensor) -> Tensor:
            return torch.zeros_like(x)

    x, sigma = standard_normal(5, 3, 1), torch.logspace(-2, 1.5, 5, dtype=torch.float64)
    torch.testing.assert_close(
        PreconditionedDenoiser(Zero(), STD)(x, sigma), gaussian_denoiser(x, sigma)
    )


def test_denoiser_passes_on_the_null_label_and_works_with_the_book_networks() -> None:
    from diffusion_lib import AttentionUNet

    network = AttentionUNet(base_channels=8, num_res_blocks=1, num_classes=3, norm_groups=4)
    denoiser = PreconditionedDenoiser(network)
    assert denoiser.null_label == 3
    assert not hasattr(PreconditionedDenoiser(ToyMLP()), "null_label")
    x = torch.randn(2, 1, 28, 28)
    out = denoiser(x, torch.tensor([0.002, 80.0]), torch.tensor([0, 3]))
    c_skip = preconditioning(torch.tensor([0.002, 80.0])).c_skip
    torch.testing.assert_close(out, c_skip[:, None, None, None] * x)  # zero-initialised output


# ----------------------------------------------------------------------------- the loss
def test_loss_is_the_weighted_denoising_error_of_eq_2() -> None:
    torch.manual_seed(0)
    denoiser = PreconditionedDenoiser(ToyMLP(hidden=16, blocks=1).double(), sigma_data=0.5)
    x0, noise = standard_normal(6, 2, 2), standard_normal(6, 2, 3)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 50.0], dtype=torch.float64)
    loss = edm_loss(denoiser, EDMNoiseLevels(), x0, sigma=sigma, noise=noise)
    expected = 0.0
    for k, s in enumerate(sigma.tolist()):
        weight = (s**2 + 0.25) / (s * 0.5) ** 2
        error = denoiser(x0[k : k + 1] + s * noise[k : k + 1], sigma[k : k + 1]) - x0[k : k + 1]
        expected += weight * error.pow(2).mean().item() / len(sigma)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_loss_is_the_unit_weight_error_of_f_against_its_effective_target() -> None:
    """Eq. 8 with lambda c_out^2 = 1: the network regresses (y - c_skip x) / c_out."""
    network = ToyMLP(hidden=16, blocks=1).double()
    x0, noise = standard_normal(64, 2, 4), standard_normal(64, 2, 5)
    sigma = torch.logspace(-2, 1.5, 64, dtype=torch.float64)
    loss = edm_loss(
        PreconditionedDenoiser(network, 0.5), EDMNoiseLevels(), x0, sigma=sigma, noise=noise
    )
    c_skip, c_out, c_in, c_noise = (c[:, None] for c in preconditioning(sigma, 0.5))
    x = x0 + sigma[:, None] * noise
    target = (x0 - c_skip * x) / c_out
    expected = (network(c_in * x, c_noise[:, 0]) - target).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


class SigmaRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.sigmas: list[Tensor] = []
        self.labels: list[Tensor | None] = []

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        self.sigmas.append(sigma)
        self.labels.append(labels)
        return self.scale * x


def test_sigma_is_log_normal() -> None:
    count, recorder = 100_000, SigmaRecorder()
    levels = EDMNoiseLevels(p_mean=-1.2, p_std=1.2)
    edm_loss(recorder, levels, torch.zeros(count, 1), generator=torch.Generator().manual_seed(6))
    log_sigma = recorder.sigmas[0].double().log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=4 * 1.2 / count**0.5)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=4 * 1.2 / (2 * count) ** 0.5)
    # The shape, not only two moments: Kolmogorov-Smirnov distance from N(-1.2, 1.2^2), below
    # 1.95 / sqrt(n), its 0.001 critical value. A uniform with the same moments is at 0.06.
    standardised = ((log_sigma + 1.2) / 1.2).sort().values
    steps = torch.arange(count + 1, dtype=torch.float64) / count  # the empirical CDF's values
    normal = torch.special.ndtr(standardised)
    distance = torch.maximum(steps[1:] - normal, normal - steps[:-1]).max().item()
    assert distance < 1.95 / count**0.5


def test_loss_is_reproducible_from_the_generator_and_passes_labels() -> None:
    recorder, x0, labels = SigmaRecorder(), torch.randn(8, 2), torch.arange(8)

    def loss(seed: int) -> float:
        generator = torch.Generator().manual_seed(seed)
        return edm_loss(recorder, EDMNoiseLevels(), x0, labels=labels, generator=generator).item()

    assert loss(7) == loss(7) != loss(8)
    assert all(torch.equal(seen, labels) for seen in recorder.labels)


def test_a_fixed_noise_partner_is_used() -> None:
    x0, noise, sigma = torch.randn(4, 2), torch.randn(4, 2), torch.full((4,), 0.3)
    seen = []

    def denoiser(x: Tensor, s: Tensor) -> Tensor:
        seen.append(x)
        return x

    edm_loss(denoiser, EDMNoiseLevels(), x0, sigma=sigma, noise=noise)
    torch.testing.assert_close(seen[0], x0 + 0.3 * noise)


def test_training_lowers_the_loss_and_repeats_from_the_seed() -> None:
    data = MIXTURE.sample(2048, torch.Generator().manual_seed(3))
    levels = EDMNoiseLevels(sigma_data=float(data.std()))

    def run(seed: int):
        torch.manual_seed(seed)
        denoiser = PreconditionedDenoiser(ToyMLP(hidden=32, blocks=1), levels.sigma_data)
        return train(denoiser, levels, data, loss=edm_loss, steps=300, batch_size=256,
                     lr=2e-3, warmup_steps=10, seed=seed, progress=False)  # fmt: skip

    first, again = run(0), run(0)
    assert first.history.loss == again.history.loss
    losses = first.history.loss
    start, end = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert end < 0.8 * start, (start, end)  # measured 0.63 of the start (untrained F = 0)
    assert isinstance(first.ema_model, PreconditionedDenoiser)


# ----------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize(("solver", "order"), [("heun", 2), ("euler", 1)])
def test_deterministic_sampler_follows_the_closed_form_ode_with_its_order(solver, order) -> None:
    n = standard_normal(2000, 4, 0)

    def errors(steps: int) -> tuple[float, float]:
        out, trajectory = edm_sample(gaussian_denoiser, n.shape, steps=steps, noise=n,
                                     solver=solver, return_trajectory=True)  # fmt: skip
        x_start = SIGMA_MAX * n
        sigma_min = trajectory.timesteps[-2].item()
        at_sigma_min = rms(trajectory.states[-2], gaussian_flow(x_start, SIGMA_MAX, sigma_min))
        return at_sigma_min, rms(out, gaussian_flow(x_start, SIGMA_MAX, 0.0))

    (coarse, _), (fine, final) = errors(32), errors(128)
    assert math.log(coarse / fine, 4) == pytest.approx(order, abs=0.15)  # measured 2.07, 0.99
    assert final < (2e-3 if order == 2 else 2e-2)  # measured 4.4e-4 and 1.1e-2


def test_heun_converges_to_the_mixture() -> None:
    """No closed form: the sampler must agree with itself at 4x the steps and reach the data."""
    n = standard_normal(4000, 2, 1)
    coarse = edm_sample(mixture_denoiser, n.shape, steps=32, noise=n)
    fine = edm_sample(mixture_denoiser, n.shape, steps=128, noise=n)
    euler = edm_sample(mixture_denoiser, n.shape, steps=32, noise=n, solver="euler")
    assert rms(coarse, fine) < 0.1 * rms(euler, fine)  # measured 5e-3 against 7e-2
    data = MIXTURE.sample(4000, torch.Generator().manual_seed(2)).double()
    quality, reference = MIXTURE.sample_quality(fine), MIXTURE.sample_quality(data)
    assert quality.log_density == pytest.approx(reference.log_density, abs=0.1)
    assert quality.spread == pytest.approx(1.0, abs=0.05)
    assert quality.weight_error < 0.03


def test_stochastic_sampler_reaches_the_gaussian_law_and_repeats_from_its_generator() -> None:
    """Churn adds noise and the ODE step removes it; the law is right up to a discretisation
    bias that shrinks with the steps (measured std 0.511 with 64 steps, 0.502 with 256)."""
    count = 20_000

    def draw(seed: int, steps: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        return edm_sample(gaussian_denoiser, (count, 2), steps=steps, s_churn=40 * steps / 64,
                          s_tmin=0.05, s_tmax=50, generator=generator, device="cpu")  # fmt: skip

    samples = draw(3, 64)
    assert torch.equal(samples, draw(3, 64)) and not torch.equal(samples, draw(4, 64))
    fine = draw(3, 256)
    assert fine.mean().abs().item() < 5 * STD / (2 * count) ** 0.5
    assert abs(fine.std().item() - STD) < 0.5 * abs(samples.std().item() - STD)
    assert fine.std().item() == pytest.approx(STD, rel=0.01)


def test_churn_changes_the_result_only_inside_its_range() -> None:
    n = standard_normal(16, 2, 5)
    ode = edm_sample(gaussian_denoiser, n.shape, steps=10, noise=n)
    outside = edm_sample(gaussian_denoiser, n.shape, steps=10, noise=n, s_churn=30, s_tmin=100.0,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    inside = edm_sample(gaussian_denoiser, n.shape, steps=10, noise=n, s_churn=30,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(ode, outside) and not torch.allclose(ode, inside)


@pytest.mark.parametrize(("solver", "calls"), [("heun", 2 * 7 - 1), ("euler", 7)])
def test_network_calls(solver: str, calls: int) -> None:
    counter = EvaluationCounter(gaussian_denoiser)
    edm_sample(counter, (3, 2), steps=7, solver=solver)
    assert (counter.calls, counter.images) == (calls, 3 * calls)


def test_explicit_noise_levels_and_the_trajectory() -> None:
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.1, 0.0])
    n = standard_normal(2, 2, 6)
    samples, trajectory = edm_sample(gaussian_denoiser, n.shape, sigmas=sigmas, noise=n,
                                     return_trajectory=True)  # fmt: skip
    assert trajectory.timesteps.tolist() == pytest.approx(sigmas.tolist())
    assert trajectory.states.shape == (5, 2, 2)
    torch.testing.assert_close(trajectory.states[0], 10.0 * n)
    torch.testing.assert_close(trajectory.states[-1], samples)


def test_labels_and_guidance_reach_the_denoiser_which_is_returned_to_training_mode() -> None:
    recorder = SigmaRecorder().train()
    edm_sample(recorder, (2, 3), steps=2, labels=torch.tensor([4, 7]), guidance=1.5, null_label=10)
    assert recorder.labels and all(labels.tolist() == [4, 7, 10, 10] for labels in recorder.labels)
    assert recorder.training


def test_smoke_mode_caps_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    _, trajectory = edm_sample(gaussian_denoiser, (1, 2), steps=50, return_trajectory=True)
    assert len(trajectory.states) == MAX_SAMPLING_STEPS + 1


def test_golden_values() -> None:
    """Pinned outputs for the exact mixture denoiser and a seed: a regression snapshot, not an
    independent check. The numbers were recorded from the code after the independent tests
    above passed; they pin the exact numbers against unintended changes."""
    generator = torch.Generator().manual_seed(0)
    ode = edm_sample(mixture_denoiser, (2, 2), steps=8, generator=generator, device="cpu")
    generator = torch.Generator().manual_seed(0)
    sde = edm_sample(mixture_denoiser, (2, 2), steps=8, s_churn=10, generator=generator)
    assert ode.flatten().tolist() == pytest.approx(GOLDEN_ODE, abs=1e-5)
    assert sde.flatten().tolist() == pytest.approx(GOLDEN_SDE, abs=1e-5)


GOLDEN_ODE = [1.475086, -0.595756, -1.682072, 0.686203]
GOLDEN_SDE = [-1.420011, 1.199734, -1.784125, 0.560624]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: karras_sigmas(0), "steps must be an integer >= 1, got 0"),
        (lambda: karras_sigmas(5, sigma_min=0.0), r"sigma_min must lie in \(0.0, inf\)"),
        (lambda: karras_sigmas(5, 1.0, 0.5), r"sigma_max must lie in \(1.0, inf\)"),
        (lambda: karras_sigmas(5, rho=-1.0), r"rho must lie in \(0.0, inf\)"),
        (lambda: preconditioning(torch.ones(2), 0.0), r"sigma_data must lie in \(0.0, inf\)"),
        (lambda: PreconditionedDenoiser("net"), "network must be an nn.Module, got str"),
        (lambda: EDMNoiseLevels(p_std=0.0), r"p_std must lie in \(0.0, inf\)"),
        (lambda: EDMNoiseLevels(p_mean=math.nan), "p_mean must be a number and finite"),
        (
            lambda: PreconditionedDenoiser(ToyMLP())(torch.zeros(2, 2), torch.ones(3)),
            r"sigma must be a float tensor of shape \(2,\)",
        ),  # fmt: skip
    ],
)
def test_bad_construction_raises(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_loss_calls_raise() -> None:
    x0 = torch.zeros(4, 2)
    denoiser = PreconditionedDenoiser(ToyMLP(), sigma_data=0.5)
    with pytest.raises(
        ValueError, match="EDMNoiseLevels passed as the schedule, got NoiseSchedule"
    ):
        edm_loss(denoiser, NoiseSchedule.from_name("linear"), x0)
    with pytest.raises(ValueError, match=r"sigma_data \(0.5\) differs from the loss's \(1\)"):
        edm_loss(denoiser, EDMNoiseLevels(sigma_data=1.0), x0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        edm_loss(denoiser, EDMNoiseLevels(), x0, sigma=torch.tensor([0.1, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"noise must have the shape of x0, \(4, 2\)"):
        edm_loss(denoiser, EDMNoiseLevels(), x0, noise=torch.zeros(4, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"solver": "rk4"}, "unknown solver 'rk4'; choose one of euler, heun"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"s_churn": -1.0}, r"s_churn must lie in \[0.0, inf\)"),
        ({"s_noise": -0.5}, r"s_noise must lie in \[0.0, inf\)"),
        ({"s_tmin": 2.0, "s_tmax": 1.0}, r"s_tmax must be a number >= s_tmin \(2.0\)"),
        ({"sigmas": torch.tensor([1.0, 2.0, 0.0])}, "strictly decreasing and ending at 0"),
        ({"sigmas": torch.tensor([2.0, 1.0])}, "strictly decreasing and ending at 0"),
        ({"noise": torch.zeros(3, 2)}, r"noise must have the requested shape \(2, 2\)"),
    ],
)
def test_bad_sampler_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        edm_sample(gaussian_denoiser, (2, 2), **kwargs)


def test_churn_raises_each_level_by_gamma_capped_at_sqrt_2_minus_1() -> None:
    """With D = 0 the ODE dx/dsigma = x / sigma gives x proportional to sigma, which Euler and
    Heun follow exactly. With s_noise = 0 the churn only moves sigma to (1 + gamma) sigma, so a
    step multiplies x by sigma_next / ((1 + gamma) sigma), with gamma = min(S_churn / N,
    sqrt(2) - 1) inside [s_tmin, s_tmax] and 0 outside (Algorithm 2); N = 4 steps here."""
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    n = standard_normal(3, 2, 9)

    def zero(x: Tensor, sigma: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def states(**churn: float) -> Tensor:
        _, trajectory = edm_sample(zero, n.shape, sigmas=sigmas, noise=n, s_noise=0.0,
                                   generator=torch.Generator().manual_seed(0),
                                   return_trajectory=True, **churn)  # fmt: skip
        return trajectory.states

    for s_churn, gamma in [(1.0, 0.25), (10.0, math.sqrt(2) - 1)]:
        got = states(s_churn=s_churn)
        for k in range(4):
            torch.testing.assert_close(got[k], 8.0 * n * (0.5 / (1 + gamma)) ** k)
        torch.testing.assert_close(got[4], torch.zeros_like(n), atol=1e-12, rtol=0)
    got = states(s_churn=1.0, s_tmin=3.0)  # only sigma = 8 and 4 are churned
    for k, factor in enumerate([1.0, 0.4, 0.4**2, 0.4**2 * 0.5]):
        torch.testing.assert_close(got[k], 8.0 * n * factor)


def test_churn_range_includes_its_ends() -> None:
    """Algorithm 2 churns where t_i lies in the closed interval [S_tmin, S_tmax]. With D = 0 and
    s_noise = 0 a step multiplies x by sigma_next / ((1 + gamma) sigma) (as above); with
    [S_tmin, S_tmax] = [2, 4] on the levels 8, 4, 2, 1 exactly sigma = 4 and sigma = 2 are
    churned (gamma = S_churn / N = 0.25), so the factors are 1/2, 2/5 and 2/5, against 1/2 for
    every step when the ends are left out."""
    sigmas, n = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0]), standard_normal(3, 2, 10)
    _, trajectory = edm_sample(lambda x, s: torch.zeros_like(x), n.shape, sigmas=sigmas, noise=n,
                               s_churn=1.0, s_tmin=2.0, s_tmax=4.0, s_noise=0.0,
                               return_trajectory=True)  # fmt: skip
    for k, factor in enumerate([1.0, 0.5, 0.5 * 0.4, 0.5 * 0.4 * 0.4]):
        torch.testing.assert_close(trajectory.states[k], 8.0 * n * factor)


def test_churn_noise_has_the_standard_deviation_s_noise_sqrt_of_sigma_hat2_minus_sigma2() -> None:
    """D = 0, gamma = sqrt(2) - 1 (sigma_hat^2 = 2 sigma^2): the variance obeys
    V' = (V + s_noise^2 sigma^2) sigma_next^2 / (2 sigma^2); s_noise = 1 keeps V = sigma^2."""
    count, sigmas = 20_000, torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    for s_noise in (1.0, 0.5):
        _, trajectory = edm_sample(lambda x, s: torch.zeros_like(x), (count, 1), sigmas=sigmas,
                                   s_churn=10.0, s_noise=s_noise, device="cpu",
                                   generator=torch.Generator().manual_seed(1),
                                   return_trajectory=True)  # fmt: skip
        variance = 64.0
        for k in range(1, 4):
            sigma, sigma_next = sigmas[k - 1].item(), sigmas[k].item()
            variance = (variance + s_noise**2 * sigma**2) * sigma_next**2 / (2 * sigma**2)
            measured = trajectory.states[k].double().var().item()
            assert measured == pytest.approx(variance, rel=0.05)  # 5 standard errors
