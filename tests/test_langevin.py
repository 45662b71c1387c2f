"""Langevin dynamics against the closed-form stationary law of the discretised chain."""

from __future__ import annotations

import pytest
import torch

from diffusion_lib import (
    GaussianMixture,
    NoiseSchedule,
    Trajectory,
    annealed_langevin_sample,
    langevin_sample,
    langevin_timesteps,
)
from diffusion_lib.smoke import MAX_SAMPLING_STEPS, SMOKE_VARIABLE


def test_chain_on_a_gaussian_reaches_the_discretised_stationary_law() -> None:
    """For N(m, s^2) the chain x + h (m - x) / s^2 + sqrt(2 h) z is an AR(1) process whose
    stationary variance is s^2 / (1 - h / (2 s^2)), not s^2: check both mean and variance."""
    mean, std, step = 1.5, 0.5, 0.05
    x = torch.zeros(40_000, 1, dtype=torch.float64)
    samples = langevin_sample(
        lambda x: (mean - x) / std**2,
        x,
        step_size=step,
        steps=300,
        generator=torch.Generator().manual_seed(0),
    )
    variance = std**2 / (1 - step / (2 * std**2))
    assert abs(samples.mean().item() - mean) < 0.01
    assert abs(samples.var().item() / variance - 1) < 0.03
    assert abs(samples.var().item() / std**2 - 1) > 0.08, "the step's bias must be visible"


def test_trajectory_and_seed() -> None:
    score = lambda x: -x  # noqa: E731
    start = torch.ones(3, 2)
    first, states = langevin_sample(
        score,
        start,
        step_size=0.1,
        steps=5,
        generator=torch.Generator().manual_seed(3),
        return_trajectory=True,
    )
    again = langevin_sample(
        score, start, step_size=0.1, steps=5, generator=torch.Generator().manual_seed(3)
    )
    assert states.shape == (6, 3, 2)
    torch.testing.assert_close(states[0], start)
    torch.testing.assert_close(states[-1], first)
    torch.testing.assert_close(first, again)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": "big"}, "step_size"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    arguments = {"step_size": 0.1, "steps": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        langevin_sample(lambda x: -x, torch.zeros(2, 2), **arguments)


def test_a_score_of_another_shape_is_refused_rather_than_broadcast() -> None:
    # -x.sum(0) has shape (2,): it would broadcast over the batch of two points without a word.
    with pytest.raises(
        ValueError, match=r"score\(x\) must have the shape of x, \(2, 2\); got \(2,\)"
    ):
        langevin_sample(lambda x: -x.sum(0), torch.zeros(2, 2), step_size=0.1, steps=3)


def test_levels_are_evenly_spaced_in_log_snr_from_the_last_step_to_the_first() -> None:
    schedule = NoiseSchedule.from_name("linear")
    timesteps = langevin_timesteps(schedule, 20)
    assert timesteps[0] == 999 and timesteps[-1] == 0
    assert (timesteps.diff() < 0).all()
    log_snr = schedule.signal_to_noise_ratio.log()
    gaps = log_snr[timesteps].diff()
    # Rounding to whole timesteps moves each level by at most half a step's change in log SNR.
    step_change = log_snr.diff().abs()
    assert (gaps - gaps.mean()).abs().max() <= step_change.max()
    assert langevin_timesteps(schedule, 1).tolist() == [999]
    with pytest.raises(ValueError, match="levels"):
        langevin_timesteps(schedule, 0)
    with pytest.raises(ValueError, match="at most 1000"):
        langevin_timesteps(schedule, 1001)


def _two_far_modes() -> GaussianMixture:
    return GaussianMixture(torch.tensor([[-4.0, 0.0], [4.0, 0.0]]), 0.5, torch.tensor([0.8, 0.2]))


def test_annealing_recovers_the_weights_that_plain_langevin_misses() -> None:
    """Song & Ermon (2019, sec. 3.2.2): between far-apart modes the score says nothing about
    their weights, so a chain started between them splits about evenly; annealing through the
    noised marginals, where the modes overlap, restores 80/20."""
    mixture = _two_far_modes()
    schedule = NoiseSchedule.from_name("linear")
    predictor = mixture.optimal_noise_predictor(schedule)
    generator = torch.Generator().manual_seed(0)
    annealed = annealed_langevin_sample(
        predictor, schedule, (4000, 2), levels=20, steps_per_level=100, generator=generator
    )
    plain = langevin_sample(
        mixture.score,
        torch.randn(4000, 2, dtype=torch.float64),
        step_size=0.01,
        steps=2000,
        generator=generator,
    )
    assert abs(mixture.proportions(annealed)[0].item() - 0.8) < 0.04
    assert abs(mixture.proportions(plain)[0].item() - 0.5) < 0.04
    assert mixture.log_prob(annealed).mean() > mixture.log_prob(mixture.sample(4000)).mean() - 0.1


def test_annealed_trajectory_ends_with_the_denoised_sample() -> None:
    mixture = _two_far_modes()
    schedule = NoiseSchedule.from_name("linear", timesteps=100)
    predictor = mixture.optimal_noise_predictor(schedule)

    def run(denoise: bool) -> tuple[torch.Tensor, Trajectory]:
        return annealed_langevin_sample(
            predictor,
            schedule,
            (5, 2),
            levels=4,
            steps_per_level=3,
            denoise=denoise,
            generator=torch.Generator().manual_seed(0),
            return_trajectory=True,
        )

    samples, trajectory = run(denoise=True)
    levels = langevin_timesteps(schedule, 4)
    assert trajectory.states.shape == (len(levels) + 1, 5, 2)
    assert trajectory.timesteps.tolist() == [*levels.tolist(), -1]
    torch.testing.assert_close(trajectory.states[-1], samples)
    undenoised, _ = run(denoise=False)
    t = torch.zeros(5, dtype=torch.long)
    torch.testing.assert_close(
        samples, schedule.predict_x0(undenoised, t, predictor(undenoised, t))
    )


def test_smoke_mode_caps_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    _, states = langevin_sample(
        lambda x: -x, torch.zeros(1, 1), step_size=0.1, steps=10_000, return_trajectory=True
    )
    assert states.shape[0] == MAX_SAMPLING_STEPS + 1  # the start and one state per step


def test_each_level_steps_with_relative_step_times_one_minus_alpha_bar() -> None:
    """One level, T = 1 with beta = 0.5 (alpha_bar = 0.5), data N(0, 0.5^2): q(x_t) = N(0, v),
    v = 0.5 * 0.25 + 0.5 = 0.625. With h = 0.5 * (1 - alpha_bar) = 0.25 the chain's stationary
    variance is v / (1 - h / (2 v)) = 0.78125 (h = relative_step alone would give 1.04)."""
    schedule = NoiseSchedule(torch.tensor([0.5], dtype=torch.float64))
    model = GaussianMixture(torch.zeros(1, 1), 0.5).optimal_noise_predictor(schedule)
    samples = annealed_langevin_sample(
        model, schedule, (20_000, 1), levels=1, steps_per_level=60, relative_step=0.5,
        denoise=False, generator=torch.Generator().manual_seed(0), device="cpu",
    ).double()  # fmt: skip
    variance = 0.625 / (1 - 0.25 / (2 * 0.625))
    assert abs(samples.mean().item()) < 4 * (variance / 20_000) ** 0.5
    assert samples.var().item() == pytest.approx(variance, rel=0.04)  # 4 standard errors
