"""SDEdit and RePaint checked against exact conditionals of Gaussian and mixture data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from diffusion_lib import GaussianMixture, NoiseSchedule, repaint, repaint_schedule, sdedit
from diffusion_lib.smoke import MAX_SAMPLING_STEPS, SMOKE_VARIABLE


class CountingModel:
    """Wraps a noise predictor and records the timesteps it was called with."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(t[0]))
        return self.model(x_t, t)


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("strength", [0.1, 0.3, 1.0])
def test_sdedit_samples_the_posterior_of_the_noised_guide(
    linear: NoiseSchedule, strength: float, variance: str
) -> None:
    # Data N(mu, s^2 I). The guide g is noised to x = a g + sigma eps (a^2 = alpha_bar at the
    # start level, sigma^2 = 1 - a^2); an exact reverse process then draws x_0 ~ N(m(x), v) with
    # 1 / v = 1 / s^2 + a^2 / sigma^2 and m(x) = v (mu / s^2 + a x / sigma^2). Averaging over
    # eps: mean v (mu / s^2 + a^2 g / sigma^2), variance v + (v a / sigma^2)^2 sigma^2.
    mu, s = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.5
    model = GaussianMixture(mu[None], s).optimal_noise_predictor(linear)
    guide = torch.tensor([1.5, 1.5], dtype=torch.float64).expand(20_000, 2).clone()
    edited = sdedit(
        model,
        linear,
        guide,
        strength,
        variance=variance,
        clip_x0=None,
        generator=torch.Generator().manual_seed(0),
    )
    a2 = linear.alphas_cumprod[round(strength * 1000) - 1]
    sigma2 = 1 - a2
    v = 1 / (1 / s**2 + a2 / sigma2)
    mean = v * (mu / s**2 + a2 * guide[0] / sigma2)
    std = (v + v**2 * a2 / sigma2).sqrt()
    torch.testing.assert_close(edited.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(edited.std(0), std.expand(2), atol=0, rtol=0.03)


def test_sdedit_runs_the_last_part_of_the_respaced_chain(linear: NoiseSchedule) -> None:
    model = CountingModel(lambda x_t, t: torch.zeros_like(x_t))
    guide = torch.zeros(3, 1, 4, 4)
    edited, trajectory = sdedit(model, linear, guide, 0.3, steps=100, return_trajectory=True)
    kept = torch.linspace(0, 999, 100, dtype=torch.float64).round().long()
    assert model.calls == kept[:30].flip(0).tolist()
    assert trajectory.timesteps.tolist() == [*kept[:30].flip(0).tolist(), -1]
    assert trajectory.states.shape == (31, 3, 1, 4, 4)
    torch.testing.assert_close(trajectory.states[-1], edited)


def test_sdedit_starts_from_the_forward_process_at_its_start_level(linear: NoiseSchedule) -> None:
    """With 10 steps and strength 0.3 the chain starts at level n0 = 3, the state the model sees
    at kept timestep kept[2] = 222, so the noised guide must be a draw of q(x_222 | x_0 = guide):
    mean sqrt(abar_222) g and variance 1 - abar_222 (Ho et al. eq. 4). Both are checked to 5
    standard errors of 20,000 draws; noising to the neighbouring kept timestep (level n0 instead
    of n0 - 1, abar 0.32 instead of 0.60) misses by dozens of them. The end-to-end test above
    runs the full chain, where that off-by-one moves alpha-bar too little to see."""
    n, value = 20_000, 1.5
    guide = torch.full((n, 1), value, dtype=torch.float64)
    _, trajectory = sdedit(
        lambda x_t, t: torch.zeros_like(x_t),
        linear,
        guide,
        0.3,
        steps=10,
        clip_x0=None,
        return_trajectory=True,
        generator=torch.Generator().manual_seed(5),
    )
    kept = torch.linspace(0, 999, 10, dtype=torch.float64).round().long()
    assert int(trajectory.timesteps[0]) == int(kept[2]) == 222
    abar = linear.alphas_cumprod[kept[2]].item()
    first = trajectory.states[0].double()
    assert abs(first.mean().item() - abar**0.5 * value) < 5 * ((1 - abar) / n) ** 0.5
    assert abs(first.var().item() / (1 - abar) - 1) < 5 * (2 / n) ** 0.5


def test_sdedit_is_reproducible_with_a_generator(linear: NoiseSchedule) -> None:
    model = GaussianMixture(torch.zeros(1, 2), 1.0).optimal_noise_predictor(linear)
    guide = torch.ones(5, 2, dtype=torch.float64)

    def run() -> torch.Tensor:
        return sdedit(
            model, linear, guide, 0.5, steps=50, generator=torch.Generator().manual_seed(3)
        )

    torch.testing.assert_close(run(), run(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("steps", "jump_length", "resamplings"), [(20, 5, 3), (25, 10, 4), (7, 7, 2)]
)
def test_repaint_schedule_walks_every_stretch_resamplings_times(
    steps: int, jump_length: int, resamplings: int
) -> None:
    levels = repaint_schedule(steps, jump_length, resamplings)
    assert levels[0] == steps and levels[-1] == 0
    moves = [b - a for a, b in zip(levels[:-1], levels[1:], strict=True)]
    assert set(moves) <= {-1, jump_length}
    # Each stretch ends at a level n = 1, 1 + j, ... with n + j <= steps, and is walked down
    # resamplings times; every other level is reached from above once per walk of its stretch.
    steps_down = [b for a, b in zip(levels[:-1], levels[1:], strict=True) if b == a - 1]
    jump_points = list(range(1, steps - jump_length + 1, jump_length))
    for n in range(steps):
        stretch_ends = [p for p in jump_points if p <= n < p + jump_length]
        assert steps_down.count(n) == (resamplings if stretch_ends else 1)
    assert len(steps_down) == steps + (resamplings - 1) * jump_length * len(jump_points)
    assert levels[-2:] == [1, 0]  # the step that returns the image is never undone


def test_one_resampling_is_plain_ancestral_order() -> None:
    assert repaint_schedule(12, 4, 1) == list(range(12, -1, -1))


def test_repaint_keeps_the_known_pixels_exactly(linear: NoiseSchedule) -> None:
    known = torch.rand(4, 1, 6, 6) * 2 - 1
    mask = torch.rand(1, 1, 6, 6) > 0.5
    filled = repaint(
        lambda x_t, t: 0.1 * x_t, linear, known, mask, steps=20, jump_length=5, resamplings=2
    )
    keep = mask.expand_as(known)
    assert torch.equal(filled[keep], known[keep])
    assert not torch.equal(filled[~keep], known[~keep])


def test_repaint_shows_the_model_the_kept_pixels_noised_to_its_timestep(
    linear: NoiseSchedule,
) -> None:
    """Every state the model is handed at timestep t must hold the kept pixels as a draw of
    q(x_t | x_0 = known): mean sqrt(abar_t) x_0, variance 1 - abar_t. That holds after a step
    down (the kept pixels are noised to level n - 1, the level the next call sees at kept[n - 2])
    and after a jump up (q(x_{n+j} | x_n) composed with q(x_n | x_0)). The calls' timesteps are
    checked against the level convention of the module (level n is seen at kept[n - 1]), and
    each call's kept pixel against the forward process to 5 standard errors of 20,000 draws;
    noising to the kept timestep one level off, or jumping with the wrong alpha-bar ratio, is
    out by 10 or more of them at the low levels."""
    n, value = 20_000, 0.8
    kept = torch.linspace(0, 999, 10, dtype=torch.float64).round().long()
    levels = repaint_schedule(10, 3, 2)
    seen: list[tuple[int, torch.Tensor]] = []

    def recording(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((int(t[0]), x_t[:, 0].clone()))
        return torch.zeros_like(x_t)

    known = torch.tensor([[value, 0.0]], dtype=torch.float64).expand(n, 2).clone()
    repaint(
        recording,
        linear,
        known,
        torch.tensor([[1.0, 0.0]]),
        steps=10,
        jump_length=3,
        resamplings=2,
        clip_x0=None,
        generator=torch.Generator().manual_seed(6),
    )
    calls = [int(kept[a - 1]) for a, b in zip(levels[:-1], levels[1:], strict=True) if b < a]
    assert [t for t, _ in seen] == calls
    assert 999 in calls[1:]  # level 10 is reached again after a jump, not only from noise
    for t, pixel in seen[1:]:  # the first call sees pure noise, before any kept pixel
        abar = linear.alphas_cumprod[t].item()
        assert abs(pixel.mean().item() - abar**0.5 * value) < 5 * ((1 - abar) / n) ** 0.5, t
        assert abs(pixel.var().item() / (1 - abar) - 1) < 5 * (2 / n) ** 0.5, t


def _repaint_marginal_of_gaussian_data(
    variance: str, mean0: float, std0: float, steps: int, resamplings: int
) -> tuple[float, float]:
    """Mean and std of RePaint's output with nothing known, for data N(mean0, std0^2) and its
    exact denoiser, by carrying the Gaussian marginal through the levels. Written from the
    formulas with numpy: level n of the chain respaced to ``steps`` has alpha-bar
    abar[kept[n - 1]] (1 at level 0); E[x_0 | x_n] is linear in x_n; a step down is Ho et al.'s
    posterior mean with that estimate, plus noise except at the last step; a jump up is
    q(x_{n+j} | x_n)."""
    betas = np.linspace(1e-4, 0.02, 1000)
    kept = np.round(np.linspace(0, 999, steps)).astype(int)
    abar = np.concatenate([[1.0], np.cumprod(1 - betas)[kept]])  # by level
    mean, var = 0.0, 1.0  # x at level `steps` is N(0, I)
    levels = repaint_schedule(steps, 10, resamplings)
    for level, new in zip(levels[:-1], levels[1:], strict=True):
        if new > level:
            ratio = abar[new] / abar[level]
            mean, var = ratio**0.5 * mean, ratio * var + 1 - ratio
            continue
        a_t, a_s = abar[level], abar[new]
        beta = 1 - a_t / a_s
        gain = std0**2 * a_t**0.5 / (a_t * std0**2 + 1 - a_t)  # E[x0 | x] = offset + gain x
        offset = mean0 - gain * a_t**0.5 * mean0
        c_x0, c_x = a_s**0.5 * beta / (1 - a_t), (1 - beta) ** 0.5 * (1 - a_s) / (1 - a_t)
        noise_var = 0.0 if new == 0 else (1 - a_s) / (1 - a_t) * beta
        if variance == "large" and new > 0:
            noise_var = beta
        mean = c_x0 * (offset + gain * mean) + c_x * mean
        var = (c_x0 * gain + c_x) ** 2 * var + noise_var
    return mean, var**0.5


@pytest.mark.parametrize("variance", ["large", "small"])
def test_repaint_with_nothing_known_matches_the_exact_gaussian_marginal(
    linear: NoiseSchedule, variance: str
) -> None:
    """An exact model keeps every marginal of the full chain, but a respaced chain only nearly
    so: the small variance loses some spread on every walk. The output's mean and std match the
    Gaussian recursion above, to about 4 standard errors of 20,000 draws."""
    model = GaussianMixture(torch.tensor([[0.3]]), 0.5).optimal_noise_predictor(linear)
    known = torch.zeros(20_000, 1, dtype=torch.float64)
    filled = repaint(
        model,
        linear,
        known,
        torch.zeros(1, 1),
        steps=100,
        resamplings=3,
        variance=variance,
        clip_x0=None,
        generator=torch.Generator().manual_seed(1),
    )
    mean, std = _repaint_marginal_of_gaussian_data(variance, 0.3, 0.5, 100, 3)
    assert abs(filled.mean().item() - mean) < 4 * std / 20_000**0.5
    assert abs(filled.std().item() - std) < 4 * std / 40_000**0.5
    if variance == "small":
        assert std < 0.47  # the narrowing is real, not sampling noise


def test_resampling_finds_the_exact_conditional_that_replacement_misses(
    linear: NoiseSchedule,
) -> None:
    # Two components, (-2, -2) and (2, 2) with s = 0.5: x1 = 1 says "the second one" with
    # posterior odds exp(((1 + 2)^2 - (1 - 2)^2) / (2 s^2)) = e^16, and then x2 ~ N(2, s^2).
    s = 0.5
    mixture = GaussianMixture(torch.tensor([[-2.0, -2.0], [2.0, 2.0]]), s)
    model = mixture.optimal_noise_predictor(linear)
    known = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(4000, 2).clone()
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    likelihood = Normal(torch.tensor([-2.0, 2.0], dtype=torch.float64), s).log_prob(known[0, 0])
    exact_wrong_share = likelihood.softmax(0)[0].item()
    exact_mean = (likelihood.softmax(0) * torch.tensor([-2.0, 2.0])).sum().item()

    def fill_and_measure(resamplings: int) -> tuple[float, float, float]:
        filled = repaint(
            model,
            linear,
            known,
            mask,
            steps=100,
            jump_length=10,
            resamplings=resamplings,
            clip_x0=None,
            generator=torch.Generator().manual_seed(2),
        )
        right = filled[filled[:, 1] > 0, 1]
        return (filled[:, 1] < 0).double().mean().item(), filled[:, 1].mean().item(), right.std()

    replacement_wrong, _, _ = fill_and_measure(1)
    repaint_wrong, repaint_mean, repaint_std = fill_and_measure(10)
    assert exact_wrong_share < 1e-6
    assert replacement_wrong > exact_wrong_share + 0.08  # the documented failure: ~14%
    assert repaint_wrong < exact_wrong_share + 0.01
    assert abs(repaint_mean - exact_mean) < 0.05
    assert abs(repaint_std - s) < 0.03 * s


def test_smoke_mode_caps_the_editing_chains(
    linear: NoiseSchedule, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    model = CountingModel(lambda x_t, t: torch.zeros_like(x_t))
    sdedit(model, linear, torch.zeros(2, 3), 1.0)
    assert len(model.calls) == MAX_SAMPLING_STEPS
    model.calls.clear()
    repaint(model, linear, torch.zeros(2, 3), torch.ones(1, 3), jump_length=5, resamplings=2)
    levels = repaint_schedule(MAX_SAMPLING_STEPS, 5, 2)
    assert len(model.calls) == sum(b < a for a, b in zip(levels[:-1], levels[1:], strict=True))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, s: sdedit(m, s, torch.zeros(2, 3), 0.0), "strength must lie in"),
        (lambda m, s: sdedit(m, s, torch.zeros(2, 3), 1.5), "strength must lie in"),
        (lambda m, s: sdedit(m, s, torch.zeros(2, 3), True), "strength must be a number"),
        (lambda m, s: sdedit(m, s, torch.zeros(2, 3, dtype=torch.long), 0.5), "floating-point"),
        (lambda m, s: sdedit(m, s, torch.zeros(3), 0.5), "shape"),
        (lambda m, s: sdedit(m, s, torch.zeros(2, 3), 0.5, variance="big"), "unknown variance"),
        (lambda m, s: repaint(m, s, torch.zeros(2, 3), torch.full((1, 3), 0.5)), "only 0"),
        (lambda m, s: repaint(m, s, torch.zeros(2, 3), torch.ones(4)), "broadcast"),
        (lambda m, s: repaint(m, s, torch.zeros(2, 3), torch.ones(1, 1, 3)), "more dimensions"),
        (lambda m, s: repaint(m, s, torch.zeros(2, 3), [1, 0, 1]), "mask must be a tensor"),
        (
            lambda m, s: repaint(m, s, torch.full((2, 3), float("nan")), torch.ones(1, 3)),
            "finite",
        ),
        (
            lambda m, s: repaint(m, s, torch.zeros(2, 3), torch.ones(1, 3), steps=5),
            "jump_length must be at most 5",
        ),
        (
            lambda m, s: repaint(m, s, torch.zeros(2, 3), torch.ones(1, 3), resamplings=0),
            "resamplings must be an integer >= 1",
        ),
        (
            lambda m, s: repaint(m, s, torch.zeros(2, 3), torch.ones(1, 3), steps=2000),
            "steps must be at most 1000",
        ),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(linear: NoiseSchedule, call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call(lambda x_t, t: torch.zeros_like(x_t), linear)


@pytest.mark.parametrize("edit", ["sdedit", "repaint"])
def test_labels_and_guidance_reach_the_model(linear: NoiseSchedule, edit: str) -> None:
    seen = []

    def conditional(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(labels.tolist())
        return torch.zeros_like(x_t)

    images, labels = torch.zeros(2, 3), torch.tensor([4, 7])
    kwargs = dict(steps=5, labels=labels, guidance=2.0, null_label=10)
    if edit == "sdedit":
        sdedit(conditional, linear, images, 1.0, **kwargs)
    else:
        repaint(conditional, linear, images, torch.ones(1, 3), jump_length=5, **kwargs)
    assert seen and all(call == [4, 7, 10, 10] for call in seen)  # conditional, then unconditional
