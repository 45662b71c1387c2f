"""Fine-tuning a diffusion model towards a reward, by policy gradient or through the sampler.

Ancestral sampling is a sequence of Gaussian decisions. With S respaced steps, each stochastic
step draws ``x_{k-1} ~ p_theta(x_{k-1} | x_k) = N(mu_theta(x_k, k), sigma_k^2 I)``, so the
sampler is a policy in a Markov decision process whose state is ``(x_k, k)``, whose action is
``x_{k-1}`` and whose only reward ``r(x_0)`` arrives at the end (Black et al. 2024, sec. 4.2).
Two ways to raise E[r(x_0)]:

* DDPO (Black et al. 2024) differentiates the log-probabilities of the steps taken,
  ``grad E[r] = E[r(x_0) sum_k grad log p_theta(x_{k-1} | x_k)]`` (the score-function or
  REINFORCE estimator, their eq. 3), and reuses a batch of samples for several updates through
  PPO's clipped importance ratio (Schulman et al. 2017, eq. 7). The reward need not be
  differentiable.
* DRaFT (Clark et al. 2024) writes each step as ``x_{k-1} = mu_theta(x_k, k) + sigma_k z`` and
  backpropagates ``r(x_0)`` through the last K steps of the sampler (DRaFT-K, their sec. 4.1).
  The reward must be differentiable; one sample then gives a low-variance gradient.

:func:`path_kl` measures how far a fine-tuned model's reverse steps have moved from the model
it started from: both steps share the fixed variance, so each step's KL is
``||mu_theta - mu_ref||^2 / (2 sigma_k^2)``, summed over pixels and steps. Its average over
chains is the KL between the two samplers' distributions over chains, which bounds the KL between
their last noisy states x_1 (Fan et al. 2023, lemma 4.1); the final, noiseless step maps x_1 to
the image by each model's own mean and is outside the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion_lib.losses import normal_kl
from diffusion_lib.respacing import _respaced_chain
from diffusion_lib.reverse_process import VARIANCES, _ancestral_step, _draw_step, p_mean_variance
from diffusion_lib.sampler_inputs import NoisePredictor, _evaluating, _start
from diffusion_lib.sampling import Trajectory
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.validation import (
    check_choice,
    check_finite,
    check_number,
    check_positive_int,
    check_same_shape,
    check_timesteps,
)

Clip = tuple[float, float] | None


@dataclass
class Rollout:
    """A batch of ancestral samples with every state and the log-probability of each step.

    Attributes:
        states: (S + 1, B, C, H, W), detached, on the sampling device: ``states[0]`` is x_T,
            ``states[j + 1]`` was drawn from p_theta(. | states[j]) at respaced index S - 1 - j,
            and ``states[-1]`` is the finished sample.
        log_probs: (S - 1, B) in the states' dtype, log p_theta(states[j + 1] | states[j])
            under the model that sampled, for the S - 1 stochastic steps; the last step returns
            the mean and has no density, so it is no decision of the policy.
    """

    states: Tensor
    log_probs: Tensor

    @property
    def steps(self) -> int:
        """S, the number of respaced steps of the chain."""
        return self.states.shape[0] - 1

    @property
    def samples(self) -> Tensor:
        """The finished samples x_0, (B, C, H, W)."""
        return self.states[-1]


def ancestral_log_prob(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x_t: Tensor,
    t: Tensor,
    x_prev: Tensor,
    *,
    variance: str = "small",
    clip_x0: Clip = (-1.0, 1.0),
) -> Tensor:
    """log p_theta(x_prev | x_t) = log N(x_prev; mu_theta(x_t, t), sigma_t^2 I), summed per sample.

    ``x_t`` and ``x_prev``: (B, C, H, W); ``t``: (B,) 0-based timesteps of ``schedule``, none of
    them 0 (the last step returns the mean and has no density). Returns (B,) in nats, with
    gradients to the model's parameters (Black et al. 2024, sec. 4.3).
    """
    check_choice("variance", variance, VARIANCES)
    check_timesteps(t, schedule.timesteps, x_t.shape[0], values=None)
    check_same_shape("x_prev", x_prev, "x_t", x_t)
    if bool((t == 0).any()):
        raise ValueError("t must be >= 1: the step at t = 0 returns the mean and has no density")
    mean, _, log_variance, _ = p_mean_variance(
        model, schedule, x_t, t, variance=variance, clip_x0=clip_x0
    )
    return _gaussian_log_prob(x_prev, mean, log_variance)


def _gaussian_log_prob(x: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
    """log N(x; mean, exp(log_variance) I) summed over all but the batch dimension: (B,)."""
    per_pixel = -0.5 * ((x - mean).square() * torch.exp(-log_variance) + log_variance)
    return per_pixel.flatten(1).sum(1) - 0.5 * x[0].numel() * math.log(2 * math.pi)


def _index(batch_size: int, index: int, device: torch.device) -> Tensor:
    return torch.full((batch_size,), index, device=device, dtype=torch.long)


def sample_rollout(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    variance: str = "small",
    clip_x0: Clip = (-1.0, 1.0),
    device: torch.device | str | None = None,
) -> Rollout:
    """Ancestral samples over ``steps`` respaced timesteps, keeping what DDPO needs.

    The samples equal :func:`~diffusion_lib.sampling.ddpm_sample`'s for the same ``x_T`` and
    ``generator``. ``shape``: (B, C, H, W). Returns a :class:`Rollout`.
    """
    check_choice("variance", variance, VARIANCES)
    steps = cap_sampling_steps(check_positive_int("steps", steps, maximum=schedule.timesteps))
    if steps < 2:
        raise ValueError("steps must be at least 2: only the steps before the last are random")
    x = _start(model, shape, x_T, generator, device)
    sampling_schedule, _, wrapped = _respaced_chain(model, schedule, steps, x.device)
    states, log_probs = [x], []
    with _evaluating(model):
        for index in reversed(range(steps)):
            t = _index(x.shape[0], index, x.device)
            mean, _, log_variance, _ = p_mean_variance(
                wrapped, sampling_schedule, x, t, variance=variance, clip_x0=clip_x0
            )
            x_prev = _draw_step(mean, log_variance, index, generator)
            if index > 0:
                log_probs.append(_gaussian_log_prob(x_prev, mean, log_variance))
            states.append(x_prev)
            x = x_prev
    return Rollout(torch.stack(states), torch.stack(log_probs))


def reward_advantages(rewards: Tensor, clip: float = 5.0) -> Tensor:
    """Rewards standardised over the batch and clipped to [-clip, clip]: (B,) -> (B,).

    Subtracting the mean is the baseline that lowers the score-function estimator's variance
    without biasing it (much, for a batch mean); dividing by the spread makes the learning rate
    independent of the reward's units (Black et al. 2024, sec. 4.3 and appendix).
    """
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards must be a tensor (B,), one number per sample; got {rewards!r}")
    if not rewards.dtype.is_floating_point:  # a bool or 0/1 reward ("the classifier says 7")
        rewards = rewards.float()
    check_finite("rewards", rewards)
    if rewards.dim() != 1 or rewards.numel() < 2:
        raise ValueError(
            f"rewards must be one number per sample, at least 2; got {tuple(rewards.shape)}"
        )
    clip = check_number("clip", clip, 0.0, low_open=True)
    standardised = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    return standardised.clamp(-clip, clip)


def _check_rollout(rollout: Rollout, advantages: Tensor) -> None:
    batch = rollout.states.shape[1]
    if advantages.shape != (batch,):
        raise ValueError(
            f"advantages must hold one value per sample of the rollout, shape ({batch},); "
            f"got {tuple(advantages.shape)}"
        )
    if rollout.log_probs.shape != (rollout.steps - 1, batch):
        raise ValueError(
            f"rollout.log_probs must have shape ({rollout.steps - 1}, {batch}) for "
            f"{rollout.steps} steps, got {tuple(rollout.log_probs.shape)}"
        )


def ppo_clipped_loss(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float
) -> Tensor:
    """PPO's clipped surrogate, to be minimised: mean of -min(rho A, clip(rho, 1 +- eps) A).

    ``rho = exp(log_probs - old_log_probs)`` is the importance ratio of the new policy to the
    one that sampled (Schulman et al. 2017, eq. 7). All arguments: (B,). At rho = 1 its gradient
    is the score-function estimator's, ``-mean(A grad log p)``; once rho has left
    [1 - eps, 1 + eps] in the direction A favours, the sample stops contributing.
    """
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def _check_kl_weight(kl_weight: float, reference: NoisePredictor | None, variance: str) -> float:
    kl_weight = check_number("kl_weight", kl_weight, 0.0, low_open=False)
    if kl_weight > 0 and reference is None:
        raise ValueError("kl_weight > 0 needs the reference model whose steps the KL compares with")
    if kl_weight > 0:
        check_choice("variance", variance, ("small", "large"))
    return kl_weight


def _step_kl(
    reference: NoisePredictor,
    schedule: NoiseSchedule,
    x: Tensor,
    t: Tensor,
    mean: Tensor,
    log_variance: Tensor,
    variance: str,
    clip_x0: Clip,
) -> Tensor:
    """KL(N(mean, var) || N(mu_ref(x, t), var)) summed per sample, (B,); ``reference`` (on the
    respaced chain of ``schedule``) runs in eval mode without a graph."""
    with _evaluating(reference):
        reference_mean = p_mean_variance(
            reference, schedule, x, t, variance=variance, clip_x0=clip_x0
        )[0]
    return normal_kl(mean, log_variance, reference_mean, log_variance).flatten(1).sum(1)


def ddpo_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: NoiseSchedule,
    rollout: Rollout,
    advantages: Tensor,
    *,
    minibatch_size: int | None = None,
    clip_range: float = 1e-4,
    max_grad_norm: float = 1.0,
    reference: NoisePredictor | None = None,
    kl_weight: float = 0.0,
    variance: str = "small",
    clip_x0: Clip = (-1.0, 1.0),
) -> float:
    """One pass of DDPO-IS over a rollout: an optimiser step per minibatch (Black et al. 2024).

    For each minibatch the clipped surrogate of :func:`ppo_clipped_loss` is averaged over the
    rollout's S - 1 stochastic steps; each step is backpropagated on its own, so memory does not
    grow with S. With ``kl_weight`` = beta > 0, each step also pays beta times its KL divergence
    from ``reference``'s step (the terms of :func:`path_kl`), so that the update raises
    E[r] - beta KL, the objective of DPOK (Fan et al. 2023, eq. 6), with the penalty's gradient
    taken through the means. Gradients are clipped to ``max_grad_norm`` before the step.
    ``advantages``: (B,), from :func:`reward_advantages`. Returns the share of (step, sample)
    pairs whose ratio was clipped. The model's mode is left as it is; :func:`sample_rollout`
    samples in eval mode, and a model whose training mode differs (dropout) would add its noise
    to the ratios.
    """
    _check_rollout(rollout, advantages)
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ValueError(
            "model has no parameters that require gradients (a frozen copy, such as "
            "TrainingResult.ema_model?); call model.requires_grad_() before fine-tuning it"
        )
    clip_range = check_number("clip_range", clip_range, 0.0, low_open=True)
    kl_weight = _check_kl_weight(kl_weight, reference, variance)
    batch = rollout.states.shape[1]
    minibatch_size = check_positive_int("minibatch_size", minibatch_size or batch, maximum=batch)
    device = rollout.states.device
    sampling_schedule, _, wrapped = _respaced_chain(model, schedule, rollout.steps, device)
    if kl_weight > 0:
        reference_wrapped = _respaced_chain(reference, schedule, rollout.steps, device)[2]
    clipped, counted = 0, 0
    for rows in torch.arange(batch, device=device).split(minibatch_size):
        optimizer.zero_grad(set_to_none=True)
        for j in range(rollout.steps - 1):
            x, t = rollout.states[j, rows], _index(len(rows), rollout.steps - 1 - j, device)
            mean, _, log_variance, _ = p_mean_variance(
                wrapped, sampling_schedule, x, t, variance=variance, clip_x0=clip_x0
            )
            log_probs = _gaussian_log_prob(rollout.states[j + 1, rows], mean, log_variance)
            old = rollout.log_probs[j, rows].to(log_probs.dtype)
            loss = ppo_clipped_loss(log_probs, old, advantages[rows], clip_range)
            if kl_weight > 0:
                step_kl = _step_kl(
                    reference_wrapped, sampling_schedule, x, t, mean, log_variance, variance,
                    clip_x0,
                )  # fmt: skip
                loss = loss + kl_weight * step_kl.mean()
            (loss / (rollout.steps - 1)).backward()
            ratio = torch.exp(log_probs.detach() - old)
            clipped += int(((ratio - 1).abs() > clip_range).sum())
            counted += len(rows)
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return clipped / counted


def draft_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int,
    backprop_steps: int = 1,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    variance: str = "small",
    clip_x0: Clip = (-1.0, 1.0),
    device: torch.device | str | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Trajectory]:
    """Ancestral samples that carry gradients through their last ``backprop_steps`` steps.

    DRaFT-K (Clark et al. 2024, sec. 4.1): the first S - K steps run without a graph, the last K
    with one, each written as ``mu_theta(x_k, k) + sigma_k z`` so that ``r(x_0)`` can be
    backpropagated to the parameters. K = S gives the full gradient of E[r]; small K drops the
    terms of the earlier steps, which are the costly and the noisy ones. The model's mode is
    left as it is. Returns the samples (B, C, H, W), and with ``return_trajectory`` also the
    detached states (on the CPU) and the original timesteps, as ``ddpm_sample`` does.
    """
    check_choice("variance", variance, VARIANCES)
    steps = cap_sampling_steps(check_positive_int("steps", steps, maximum=schedule.timesteps))
    backprop_steps = check_positive_int("backprop_steps", backprop_steps, maximum=steps)
    x = _start(model, shape, x_T, generator, device)
    sampling_schedule, kept, wrapped = _respaced_chain(model, schedule, steps, x.device)
    states = [x.detach().cpu()]
    for index in reversed(range(steps)):
        with torch.set_grad_enabled(index < backprop_steps):
            x = _ancestral_step(
                wrapped, sampling_schedule, x, index, generator, variance, clip_x0, {}
            )
        if return_trajectory:
            states.append(x.detach().cpu())
    if not return_trajectory:
        return x
    timesteps = torch.cat([kept.flip(0), torch.tensor([-1])])
    return x, Trajectory(torch.stack(states), timesteps)


def path_kl(
    model: NoisePredictor,
    reference: NoisePredictor,
    schedule: NoiseSchedule,
    states: Tensor,
    *,
    variance: str = "small",
    clip_x0: Clip = (-1.0, 1.0),
) -> Tensor:
    """Sum over the stochastic steps of KL(p_theta(. | x_k) || p_ref(. | x_k)), per sample: (B,).

    ``states``: (S + 1, B, C, H, W), the states of an S-step chain drawn from ``model`` (a
    :class:`Rollout`'s, or a :class:`~diffusion_lib.sampling.Trajectory`'s). With a shared fixed
    variance each term is ``||mu_theta - mu_ref||^2 / (2 sigma_k^2)``; averaged over chains, the
    sum is the KL between the two samplers' distributions over the chains x_S, ..., x_1, which
    bounds the KL between their x_1 (Fan et al. 2023, lemma 4.1). Gradients flow to ``model``'s
    parameters through its means (not through the states), as in their KL-regularised
    objective; the reference runs without a graph.
    """
    check_choice("variance", variance, ("small", "large"))
    steps = states.shape[0] - 1
    if states.dim() < 3 or steps < 2:
        raise ValueError(
            f"states must be (S + 1, B, ...) with S >= 2 steps, got {tuple(states.shape)}"
        )
    sampling_schedule, _, wrapped = _respaced_chain(model, schedule, steps, states.device)
    reference_wrapped = _respaced_chain(reference, schedule, steps, states.device)[2]
    total = torch.zeros(states.shape[1], device=states.device)
    for j in range(steps - 1):
        x, t = states[j], _index(states.shape[1], steps - 1 - j, states.device)
        mean, _, log_variance, _ = p_mean_variance(
            wrapped, sampling_schedule, x, t, variance=variance, clip_x0=clip_x0
        )
        total = total + _step_kl(
            reference_wrapped, sampling_schedule, x, t, mean, log_variance, variance, clip_x0
        )
    return total
