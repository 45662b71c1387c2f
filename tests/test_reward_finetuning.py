"""Reward fine-tuning: the step densities against eq. 11 written out, the score-function and
pathwise gradients against finite differences of the sampler, PPO's clipping, and the path KL
against torch.distributions."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from diffusion_lib import NoiseSchedule, ddpm_sample, p_mean_variance
from diffusion_lib.respacing import _respaced_chain
from diffusion_lib.reward_finetuning import (
    Rollout,
    ancestral_log_prob,
    ddpo_update,
    draft_sample,
    path_kl,
    ppo_clipped_loss,
    reward_advantages,
    sample_rollout,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (6, 1, 2, 2)


class TinyNoisePredictor(nn.Module):
    """eps = tanh(w x + b_t) with a learnable scale w and a bias per timestep band: the early
    (noisy) band t >= cut and the late band t < cut have their own bias, so a test can tell
    through which steps a gradient flowed."""

    def __init__(self, cut: int = 500, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.cut = cut
        self.scale = nn.Parameter(torch.tensor(0.7, dtype=dtype))
        self.early_bias = nn.Parameter(torch.tensor(0.2, dtype=dtype))
        self.late_bias = nn.Parameter(torch.tensor(-0.3, dtype=dtype))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        late = (t < self.cut).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        bias = late * self.late_bias + (1 - late) * self.early_bias
        return torch.tanh(self.scale * x_t + bias)


class ShiftedNoisePredictor(nn.Module):
    """eps = sqrt(1 - alpha_bar_t) x_t + theta: the exact predictor of N(0, 1) data, shifted by a
    learnable theta. Every step is linear in x_t and theta, so E[x_0] is linear in theta."""

    def __init__(self, schedule: NoiseSchedule, theta: float) -> None:
        super().__init__()
        self.alphas_cumprod = schedule.alphas_cumprod
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        shrink = (1 - self.alphas_cumprod[t]).sqrt().to(x_t.dtype).reshape(-1, 1, 1, 1)
        return shrink * x_t + self.theta


def _x_T(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_step_log_prob_is_the_gaussian_of_ho_et_al_eq_11(linear: NoiseSchedule, variance: str):
    model = TinyNoisePredictor()
    x_t, x_prev = _x_T(SHAPE, 1), _x_T(SHAPE, 2)
    t = torch.tensor([1, 5, 300, 499, 500, 999])
    betas, alphas_cumprod = linear.betas.double()[t], linear.alphas_cumprod.double()[t]
    previous = linear.alphas_cumprod.double()[t - 1]
    eps = model(x_t, t)
    shape = (-1, 1, 1, 1)
    mean = (x_t - (betas / (1 - alphas_cumprod).sqrt()).reshape(shape) * eps) / (
        1 - betas
    ).sqrt().reshape(shape)
    variances = betas * (1 - previous) / (1 - alphas_cumprod) if variance == "small" else betas
    expected = torch.distributions.Normal(mean, variances.sqrt().reshape(shape))
    ours = ancestral_log_prob(model, linear, x_t, t, x_prev, variance=variance, clip_x0=None)
    torch.testing.assert_close(ours, expected.log_prob(x_prev).flatten(1).sum(1))


def test_rollout_draws_ddpm_samples_and_records_their_log_probs(linear: NoiseSchedule):
    model, steps, x_T = TinyNoisePredictor(), 8, _x_T(SHAPE, 3)
    rollout = sample_rollout(
        model, linear, SHAPE, steps=steps, x_T=x_T, generator=torch.Generator().manual_seed(4)
    )
    reference = ddpm_sample(
        model, linear, SHAPE, steps=steps, x_T=x_T, generator=torch.Generator().manual_seed(4)
    )
    assert rollout.states.shape == (steps + 1, *SHAPE) and rollout.steps == steps
    torch.testing.assert_close(rollout.samples, reference)
    assert not rollout.states.requires_grad
    schedule, _, wrapped = _respaced_chain(model, linear, steps, torch.device("cpu"))
    for j in range(steps - 1):
        index = torch.full((SHAPE[0],), steps - 1 - j)
        recomputed = ancestral_log_prob(
            wrapped, schedule, rollout.states[j], index, rollout.states[j + 1]
        )
        torch.testing.assert_close(rollout.log_probs[j], recomputed)


def test_draft_sample_with_no_gradients_is_ddpm_sample(linear: NoiseSchedule):
    model, x_T = TinyNoisePredictor(), _x_T(SHAPE, 5)
    ours, trajectory = draft_sample(
        model, linear, SHAPE, steps=6, backprop_steps=2, x_T=x_T, return_trajectory=True,
        generator=torch.Generator().manual_seed(6),
    )  # fmt: skip
    reference, expected = ddpm_sample(
        model, linear, SHAPE, steps=6, x_T=x_T, return_trajectory=True,
        generator=torch.Generator().manual_seed(6),
    )  # fmt: skip
    torch.testing.assert_close(ours.detach(), reference)
    torch.testing.assert_close(trajectory.states, expected.states)
    assert torch.equal(trajectory.timesteps, expected.timesteps)


def _mean_reward(model: nn.Module, schedule: NoiseSchedule, steps: int, seed: int) -> Tensor:
    """E[sum x_0^2] over a fixed batch of chains (common random numbers), with gradients."""
    samples = draft_sample(
        model, schedule, (64, 1, 2, 2), steps=steps, backprop_steps=steps, clip_x0=None,
        x_T=_x_T((64, 1, 2, 2), seed), generator=torch.Generator().manual_seed(seed + 1),
    )  # fmt: skip
    return samples.square().flatten(1).sum(1).mean()


def _finite_difference(model, schedule, steps, seed, parameter, h=1e-4) -> float:
    with torch.no_grad():
        parameter += h
        up = _mean_reward(model, schedule, steps, seed).item()
        parameter -= 2 * h
        down = _mean_reward(model, schedule, steps, seed).item()
        parameter += h
    return (up - down) / (2 * h)


def test_full_draft_gradient_is_the_pathwise_derivative(linear: NoiseSchedule):
    model, steps = TinyNoisePredictor(), 10
    _mean_reward(model, linear, steps, seed=7).backward()
    for parameter in model.parameters():
        expected = _finite_difference(model, linear, steps, 7, parameter)
        assert parameter.grad.item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_truncated_draft_gradient_flows_only_through_the_last_steps(linear: NoiseSchedule):
    # With 10 steps the respaced chain visits 999, 888, ..., 111, 0; cut = 200 puts the last two
    # steps (t = 111 and 0) in the late band and the other eight in the early one.
    model, steps, seed = TinyNoisePredictor(cut=200), 10, 8
    samples = draft_sample(
        model, linear, (64, 1, 2, 2), steps=steps, backprop_steps=2, clip_x0=None,
        x_T=_x_T((64, 1, 2, 2), seed), generator=torch.Generator().manual_seed(seed + 1),
    )  # fmt: skip
    samples.square().flatten(1).sum(1).mean().backward()
    # The late bias acts only inside the two differentiated steps: its gradient is complete.
    expected = _finite_difference(model, linear, steps, seed, model.late_bias)
    assert model.late_bias.grad.item() == pytest.approx(expected, rel=1e-6)
    # The early bias changes the samples, but only through steps DRaFT-2 does not differentiate.
    assert abs(_finite_difference(model, linear, steps, seed, model.early_bias)) > 1e-3
    assert model.early_bias.grad is None or model.early_bias.grad.item() == 0.0


def test_ddpo_gradient_is_an_unbiased_estimate_of_the_reward_gradient(linear: NoiseSchedule):
    # E[x_0] is linear in theta for eps = theta, so the exact gradient of E[x_0] is a finite
    # difference of the chain's samples under common random numbers.
    steps, count = 5, 200_000
    model = ShiftedNoisePredictor(linear, 0.1)
    rollout = sample_rollout(
        model, linear, (count, 1, 1, 1), steps=steps, clip_x0=None,
        generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    rewards = rollout.samples.flatten()
    exact = _exact_mean_gradient(model, linear, steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ddpo_update(model, optimizer, linear, rollout, rewards - rewards.mean(), clip_range=10.0,
                max_grad_norm=1e9, clip_x0=None)  # fmt: skip
    estimate = -(steps - 1) * model.theta.grad.item()  # the loss averages over the S - 1 steps
    # Over 20 seeds of this size the estimates averaged -4.448 against the exact -4.433, with a
    # standard deviation of 0.029 |exact|: the tolerance is four of those.
    assert estimate == pytest.approx(exact, rel=0.12)


def _exact_mean_gradient(
    model: ShiftedNoisePredictor, schedule: NoiseSchedule, steps: int
) -> float:
    """d E[x_0] / d theta: x_0 is linear in theta and in the noise, so the difference of two
    chains that share their noise is exact."""
    theta, zeros = model.theta.item(), torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    samples = []
    for shifted in (theta + 1.0, theta - 1.0):
        with torch.no_grad():
            model.theta.fill_(shifted)
        samples.append(ddpm_sample(model, schedule, (1, 1, 1, 1), steps=steps, x_T=zeros,
                                   clip_x0=None, generator=torch.Generator().manual_seed(0)))  # fmt: skip
    with torch.no_grad():
        model.theta.fill_(theta)
    return ((samples[0] - samples[1]) / 2).item()


def test_ppo_clipping_stops_only_the_favoured_direction():
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    old = torch.zeros(4)
    log_probs = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5])).requires_grad_()
    ppo_clipped_loss(log_probs, old, advantages, clip_range=0.2).backward()
    ratio = log_probs.detach().exp()
    # At ratio 1 the gradient is the score-function estimator's, -A rho / B; a ratio already
    # pushed past the clip in the direction its advantage favours gets none; one pushed the
    # wrong way keeps the full gradient.
    expected = torch.tensor([-ratio[0] / 4, 0.0, 0.0, ratio[3] / 4])
    torch.testing.assert_close(log_probs.grad, expected)


def test_ddpo_update_raises_the_reward(linear: NoiseSchedule):
    model, target = ShiftedNoisePredictor(linear, 0.0), 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)

    def reward(rollout: Rollout) -> Tensor:
        return -(rollout.samples.flatten() - target).square()

    generator = torch.Generator().manual_seed(10)
    rewards = []
    for _ in range(25):
        rollout = sample_rollout(model, linear, (256, 1, 1, 1), steps=5, clip_x0=None,
                                 generator=generator)  # fmt: skip
        rewards.append(reward(rollout).mean().item())
        clipped = ddpo_update(model, optimizer, linear, rollout, reward_advantages(reward(rollout)),
                              minibatch_size=64, clip_range=0.2, clip_x0=None)  # fmt: skip
        assert 0.0 <= clipped <= 1.0
    # The samples' mean moves towards the target, and the reward rises well beyond its noise.
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1


def _model_reference_and_rollout(schedule: NoiseSchedule, steps: int, seed: int):
    """Two toy models that differ in their scale, and a rollout of the first."""
    model, reference = TinyNoisePredictor(), TinyNoisePredictor()
    with torch.no_grad():
        reference.scale.fill_(0.4)
    rollout = sample_rollout(model, schedule, SHAPE, steps=steps, x_T=_x_T(SHAPE, seed),
                             generator=torch.Generator().manual_seed(seed + 1))  # fmt: skip
    return model, reference, rollout


def test_path_kl_is_the_sum_of_gaussian_kls(linear: NoiseSchedule):
    steps = 6
    model, reference, rollout = _model_reference_and_rollout(linear, steps, seed=11)
    ours = path_kl(model, reference, linear, rollout.states)
    schedule, _, wrapped = _respaced_chain(model, linear, steps, torch.device("cpu"))
    reference_wrapped = _respaced_chain(reference, linear, steps, torch.device("cpu"))[2]
    expected = torch.zeros(SHAPE[0], dtype=torch.float64)
    for j in range(steps - 1):
        t = torch.full((SHAPE[0],), steps - 1 - j)
        mean, variance, _, _ = p_mean_variance(wrapped, schedule, rollout.states[j], t)
        other = p_mean_variance(reference_wrapped, schedule, rollout.states[j], t)[0]
        step = torch.distributions.kl_divergence(
            torch.distributions.Normal(mean, variance.sqrt()),
            torch.distributions.Normal(other, variance.sqrt()),
        )
        expected += step.flatten(1).sum(1).detach()
    torch.testing.assert_close(ours.detach(), expected)
    assert (ours > 0).all()
    # The reference runs in eval mode and is handed back in the mode it came in.
    assert reference.training
    path_kl(model, reference.eval(), linear, rollout.states)
    assert not reference.training
    ours.sum().backward()
    assert model.scale.grad is not None and reference.scale.grad is None
    torch.testing.assert_close(
        path_kl(model, model, linear, rollout.states).detach(), torch.zeros(SHAPE[0]).double()
    )


def test_ddpo_kl_penalty_is_the_gradient_of_the_path_kl(linear: NoiseSchedule):
    # With zero advantages the clipped surrogate has no gradient, and what is left of the update
    # is beta times the gradient of the path KL, averaged over the S - 1 steps.
    steps = 6
    model, reference, rollout = _model_reference_and_rollout(linear, steps, seed=14)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ddpo_update(model, optimizer, linear, rollout, torch.zeros(SHAPE[0]), reference=reference,
                kl_weight=0.3, max_grad_norm=1e9)  # fmt: skip
    ours = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    (0.3 * path_kl(model, reference, linear, rollout.states).mean() / (steps - 1)).backward()
    for got, parameter in zip(ours, model.parameters(), strict=True):
        torch.testing.assert_close(got, parameter.grad)
    assert reference.scale.grad is None and ours[0].abs() > 0


def test_reward_advantages_are_standardised_and_clipped():
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0])
    advantages = reward_advantages(rewards, clip=1.5)
    standardised = (rewards - rewards.mean()) / rewards.std()
    torch.testing.assert_close(advantages, standardised.clamp(-1.5, 1.5))
    assert advantages.max() == 1.5
    torch.testing.assert_close(reward_advantages(torch.tensor([1.0, 3.0])), torch.tensor([-0.7071, 0.7071]), atol=1e-4, rtol=0)  # fmt: skip


def test_bad_inputs_are_refused(linear: NoiseSchedule):
    model, x = TinyNoisePredictor(), _x_T(SHAPE, 13)
    with pytest.raises(ValueError, match="t must be >= 1"):
        ancestral_log_prob(model, linear, x, torch.zeros(SHAPE[0], dtype=torch.long), x)
    with pytest.raises(ValueError, match="steps must be at least 2"):
        sample_rollout(model, linear, SHAPE, steps=1)
    with pytest.raises(ValueError, match="backprop_steps must be at most 4"):
        draft_sample(model, linear, SHAPE, steps=4, backprop_steps=5)
    with pytest.raises(ValueError, match="unknown variance"):
        sample_rollout(model, linear, SHAPE, steps=4, variance="big")
    rollout = sample_rollout(model, linear, SHAPE, steps=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match=r"advantages must hold one value per sample.*\(6,\)"):
        ddpo_update(model, optimizer, linear, rollout, torch.zeros(5))
    with pytest.raises(ValueError, match="clip_range must lie in"):
        ddpo_update(model, optimizer, linear, rollout, torch.zeros(6), clip_range=0.0)
    with pytest.raises(ValueError, match="minibatch_size must be at most 6"):
        ddpo_update(model, optimizer, linear, rollout, torch.zeros(6), minibatch_size=7)
    with pytest.raises(ValueError, match="kl_weight > 0 needs the reference model"):
        ddpo_update(model, optimizer, linear, rollout, torch.zeros(6), kl_weight=0.1)
    with pytest.raises(ValueError, match=r"kl_weight must lie in \[0.0, inf\)"):
        ddpo_update(model, optimizer, linear, rollout, torch.zeros(6), kl_weight=-1.0)
    frozen = TinyNoisePredictor().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require gradients"):
        ddpo_update(frozen, optimizer, linear, rollout, torch.zeros(6))
    with pytest.raises(ValueError, match="rewards must be one number per sample"):
        reward_advantages(torch.zeros(1))
    with pytest.raises(ValueError, match="rewards must be finite"):
        reward_advantages(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="unknown variance 'learned'"):
        path_kl(model, model, linear, rollout.states, variance="learned")
    with pytest.raises(ValueError, match="states must be"):
        path_kl(model, model, linear, rollout.states[:2])


def test_ppo_clipped_loss_value_by_hand() -> None:
    # Rows (rho, A): (1, 1) -> -1; (1.5, 1) -> -min(1.5, 1.2) = -1.2; (0.5, -1) -> -min(-0.5, -0.8)
    # = 0.8; (1.5, -1) -> -min(-1.5, -1.2) = 1.5. Their mean is 0.1 / 4.
    log_probs = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5]))
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss = ppo_clipped_loss(log_probs, torch.zeros(4), advantages, 0.2)
    assert loss.item() == pytest.approx(0.025, abs=1e-6)


def test_bool_and_integer_rewards_are_standardised_like_floats() -> None:
    # A reward such as "the classifier says 7" is a bool; mean() of a bool tensor used to fail.
    expected = reward_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(
        reward_advantages(torch.tensor([True, False, True, False])), expected
    )
    torch.testing.assert_close(reward_advantages(torch.tensor([1, 0, 1, 0])), expected)
    with pytest.raises(ValueError, match="rewards must be a tensor"):
        reward_advantages([1.0, 0.0])


def test_ancestral_log_prob_checks_t_and_x_prev() -> None:
    # An int t failed with an AttributeError, and a mis-shaped x_prev was broadcast silently.
    schedule, x = NoiseSchedule.from_name("linear", 10), torch.zeros(2, 1, 4, 4)

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x_t)

    with pytest.raises(ValueError, match="t must be an int64 tensor of shape"):
        ancestral_log_prob(model, schedule, x, 5, x)
    with pytest.raises(ValueError, match=r"x_prev must have the shape of x_t"):
        ancestral_log_prob(model, schedule, x, torch.tensor([5, 5]), x[:1])
