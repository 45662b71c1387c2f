"""The reverse process: p(x_{t-1} | x_t) from a noise-predicting model, and the samplers.

A model is any callable ``model(x_t, t) -> eps`` with ``x_t`` of shape (B, C, H, W) and ``t`` an
int64 tensor of shape (B,) holding 0-based timesteps. Conditional models take a third argument,
``model(x_t, t, labels)``; the samplers pass it when ``labels`` is given.

The samplers compute on ``device`` when it is given, else where the model's parameters are (for
a plain function, where ``x_T`` is, or the CPU); a given ``x_T`` is moved there. Noise from a
``generator`` is drawn on the generator's device and then moved, so a seed gives the same noise
on every device.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion_lib.guidance import Guided
from diffusion_lib.learned_variance import learned_log_variance, split_eps_and_v
from diffusion_lib.schedules import NoiseSchedule, _betas_from_alphas_cumprod, _gather
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.validation import (
    check_choice,
    check_generator,
    check_model_timesteps,
    check_positive_int,
    check_range,
    check_same_shape,
    check_schedule,
    check_timesteps,
    check_weights_dtype,
    is_integer,
)

NoisePredictor = Callable[..., Tensor]
_SCHEDULE_HINT = (
    "the second argument, after the model; for a flow model use flow_sample with a RectifiedFlow"
)
VARIANCES = ("small", "large", "learned")
DDIM_SPACINGS = ("leading", "trailing", "linspace")
_LEARNED_HINT = (
    "a model with 2C output channels learns its variance: pass variance='learned' to an "
    "ancestral sampler, or wrap it in NoiseOnly for the others"
)


@dataclass
class Trajectory:
    """The states a sampler visited, for plots and animations.

    Attributes:
        states: (S + 1, B, C, H, W) on the CPU; ``states[0]`` is the starting noise x_T and
            ``states[-1]`` the finished sample.
        timesteps: (S + 1,) int64; ``timesteps[i]`` is the 0-based timestep at which
            ``states[i]`` was handed to the model, and -1 for the finished sample. For
            :func:`~diffusion_lib.flow_matching.flow_sample` it is float32 instead: the time
            t in [0, 1] of each state, from 1.0 (noise) to 0.0 (the finished sample); for
            :func:`~diffusion_lib.edm.edm_sample`, the noise level sigma of each state, ending
            at 0.0. :func:`~diffusion_lib.sampling.ddim_encode` runs the other way:
            ``states[0]`` is x_0, marked -1, and ``timesteps[i]`` is the timestep that
            ``states[i]`` has reached.
    """

    states: Tensor
    timesteps: Tensor


def predict_noise(
    model: NoisePredictor,
    x_t: Tensor,
    t: Tensor,
    labels: Tensor | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
) -> Tensor:
    """The model's noise estimate eps_theta(x_t, t), optionally with classifier-free guidance.

    With ``labels`` and ``guidance = w > 0`` this returns the guided estimate of Ho & Salimans
    (2021, eq. 6): ``(1 + w) eps(x_t, t, c) - w eps(x_t, t, no label)``, where "no label" is
    ``null_label``. Shapes: ``x_t`` (B, C, H, W), ``t`` (B,), ``labels`` (B,). Guidance acts
    on the first C output channels, the noise; any further channels (a learned variance) are
    the conditional pass's, as in GLIDE (Nichol et al. 2022). The estimate is
    :class:`~diffusion_lib.guidance.Guided`'s with the null label as the reference.
    """
    if labels is None:
        _check_no_guidance(guidance)
        return model(x_t, t)
    if guidance == 0.0:
        return model(x_t, t, labels)
    if null_label is None:
        raise ValueError("guidance > 0 needs null_label, the model's 'no label' token")
    return Guided(model, guidance, reference_label=null_label)(x_t, t, labels)


def _check_no_guidance(guidance: float) -> None:
    """Refuse a guidance weight without labels, which would otherwise be ignored."""
    if guidance != 0.0:
        raise ValueError(
            f"guidance={guidance!r} needs labels: classifier-free guidance moves the estimate for "
            "a class away from the one without a class; pass labels (B,) and null_label, or wrap "
            "the model in Guided(model, w, reference_model=...) for autoguidance"
        )


def _clip(x0: Tensor, clip_x0: tuple[float, float] | None) -> Tensor:
    return x0 if clip_x0 is None else x0.clamp(*check_range("clip_x0", clip_x0))


_ZERO_SNR_HINT = (
    "the schedule has zero terminal SNR (alpha_bar_T = 0), where a noise prediction says "
    "nothing about x_0; train the model to predict 'v' or 'x0' and wrap it in "
    "NoiseFromPrediction (Lin et al. 2024, sec. 3.2), or use a schedule with alpha_bar_T > 0"
)


def _check_terminal_estimate(model: NoisePredictor, schedule: NoiseSchedule, t: Tensor) -> None:
    """Refuse a noise-only model at t = T of a zero-terminal-SNR schedule, where x_0 = 0 / 0.

    Looks at ``t`` (a device sync) only for such schedules.
    """
    if not schedule.zero_terminal_snr or getattr(model, "prediction", "epsilon") != "epsilon":
        return
    if bool((t == schedule.timesteps - 1).any()):
        raise ValueError(_ZERO_SNR_HINT)


def _estimates_of_noise_and_x0(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x: Tensor,
    t: Tensor,
    extra: dict[str, object],
) -> tuple[Tensor, Tensor]:
    """The model's estimates of eps and x_0 at (x, t), unclipped.

    A model with a ``noise_and_x0`` method (:class:`~diffusion_lib.predictions.NoiseFromPrediction`)
    gives x_0 from its own output, which stays defined where alpha_bar_t = 0; for any other
    model x_0 comes from eps through eq. 4. ``x``: (B, ...), ``t``: (B,).
    """
    _check_terminal_estimate(model, schedule, t)
    both = getattr(model, "noise_and_x0", None)
    if both is not None:
        eps, x0 = both(x, t, **extra)
        return eps.to(x.dtype), x0.to(x.dtype)
    eps = predict_noise(model, x, t, **extra).to(x.dtype)
    check_same_shape("the model's output", eps, "x_t", x, hint=_LEARNED_HINT)
    return eps, schedule._predict_x0(x, t, eps)


def _noise_and_x0(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x: Tensor,
    t: Tensor,
    clip_x0: tuple[float, float] | None,
    extra: dict[str, object],
) -> tuple[Tensor, Tensor]:
    """The model's noise estimate at (x, t) and the x_0 it implies (eq. 4 inverted).

    When x_0 is clipped, the noise is recomputed from the clipped x_0 so that the two stay
    consistent, as deterministic samplers need. ``x``: (B, ...), ``t``: (B,).
    """
    eps, x0 = _estimates_of_noise_and_x0(model, schedule, x, t, extra)
    if clip_x0 is not None:
        x0 = _clip(x0, clip_x0)
        eps = schedule._predict_eps(x, t, x0)
    return eps, x0


def p_mean_variance(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x_t: Tensor,
    t: Tensor,
    *,
    variance: str = "small",
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    **model_kwargs: object,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean, variance, log-variance of p_theta(x_{t-1} | x_t), and the model's estimate of x_0.

    The mean is the posterior mean of q(x_{t-1} | x_t, x_0) with x_0 replaced by the model's
    estimate (Ho et al. 2020, eq. 11, written through eqs. 7 and 4). The variance is fixed,
    ``"small"`` is sigma_t^2 = beta_tilde_t and ``"large"`` is sigma_t^2 = beta_t (sec. 3.2;
    both appear in Table 1), except at t = 0, where ``"large"`` takes beta_tilde of the next
    step as Nichol & Dhariwal's code does (beta_tilde is 0 there), or ``"learned"``: the model
    returns 2C channels, the noise and the v of Nichol & Dhariwal (2021, eq. 15), see :mod:`diffusion_lib.learned_variance`.
    ``x_t``: (B, C, H, W); ``t``: (B,). The mean and x_0 estimate have ``x_t``'s shape;
    variance and log-variance broadcast against it.
    """
    check_choice("variance", variance, VARIANCES)
    check_timesteps(t, schedule.timesteps, x_t.shape[0], values=None)  # no GPU wait per step
    if variance == "learned":
        _check_terminal_estimate(model, schedule, t)
        eps, v_raw = split_eps_and_v(predict_noise(model, x_t, t, **model_kwargs), x_t.shape[1])
        x0 = schedule._predict_x0(x_t, t, eps.to(x_t.dtype))
    else:
        x0 = _estimates_of_noise_and_x0(model, schedule, x_t, t, model_kwargs)[1]
    x0 = _clip(x0, clip_x0)
    mean, posterior_variance, posterior_log_variance = schedule._q_posterior(x0, x_t, t)
    if variance == "small":
        return mean, posterior_variance, posterior_log_variance, x0
    if variance == "learned":
        log_variance = learned_log_variance(schedule, t, v_raw.to(x_t.dtype))
        return mean, log_variance.exp(), log_variance, x0
    # For "large" the first entry borrows beta_tilde_1 so that the decoder at t = 0 keeps a
    # sensible variance (beta_1 would make L_0 needlessly sharp), as in Nichol & Dhariwal's code.
    large = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]])
    return mean, _gather(large, t, x_t), _gather(large.log(), t, x_t), x0


class _RespacedModel(nn.Module):
    """Calls the wrapped model with the original timestep of a respaced schedule's index."""

    def __init__(self, model: NoisePredictor, original_timesteps: Tensor) -> None:
        super().__init__()
        self.model = model
        self.original_timesteps = original_timesteps
        # Mirror the wrapped model's mode, so that _evaluating(wrapper) restores it faithfully.
        self.training = getattr(model, "training", False)
        self.prediction = getattr(model, "prediction", "epsilon")
        if hasattr(model, "noise_and_x0"):
            self.noise_and_x0 = self._noise_and_x0

    def forward(self, x_t: Tensor, index: Tensor, *args: Tensor) -> Tensor:
        return self.model(x_t, self.original_timesteps.to(index.device)[index], *args)

    def _noise_and_x0(self, x_t: Tensor, index: Tensor, **extra: object) -> tuple[Tensor, Tensor]:
        return self.model.noise_and_x0(
            x_t, self.original_timesteps.to(index.device)[index], **extra
        )


def respace(schedule: NoiseSchedule, steps: int) -> tuple[NoiseSchedule, Tensor]:
    """A shorter schedule that visits ``steps`` evenly spaced timesteps of ``schedule``.

    The new betas keep the original alpha-bar at the kept steps:
    ``beta'_k = 1 - alpha_bar[t_k] / alpha_bar[t_{k-1}]`` (Nichol & Dhariwal 2021, sec. 4).
    Returns the respaced schedule and the kept 0-based timesteps (steps,), ascending, from 0
    to T - 1 (just 0 when ``steps`` is 1).
    """
    check_positive_int("steps", steps, maximum=schedule.timesteps)
    if steps == schedule.timesteps:
        return schedule, torch.arange(schedule.timesteps)
    kept = torch.linspace(0, schedule.timesteps - 1, steps, dtype=torch.float64).round().long()
    return NoiseSchedule(_betas_from_alphas_cumprod(schedule.alphas_cumprod.cpu()[kept])), kept


def _respaced_chain(
    model: NoisePredictor, schedule: NoiseSchedule, steps: int, device: torch.device
) -> tuple[NoiseSchedule, Tensor, _RespacedModel]:
    """The respaced schedule on ``device``, its kept timesteps, and ``model`` wrapped to match."""
    sampling_schedule, kept = respace(schedule, steps)
    return sampling_schedule.to(device), kept, _RespacedModel(model, kept)


@contextlib.contextmanager
def _evaluating(model: NoisePredictor) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode for sampling and restore its mode afterwards."""
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _parameter_device(model: NoisePredictor) -> torch.device | None:
    """Where the model's parameters are; ``None`` for a function or a module without any."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return None


def _model_device(model: NoisePredictor) -> torch.device:
    return _parameter_device(model) or torch.device("cpu")


def _parameter_dtype(model: NoisePredictor) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter; ``None`` if it has none."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            if parameter.dtype.is_floating_point:
                return parameter.dtype
    return None


def _check_network_dtype(model: NoisePredictor, name: str, x: Tensor | None) -> None:
    """Refuse ``x`` in another dtype than the weights of one of the library's networks.

    Those record their T (an int ``timesteps``) and need their inputs in their weights' dtype;
    other callables, and modules whose scalar parameters promote a float64 input, are left
    alone, as is an ``x`` that is not a floating-point tensor (``None``: not given). ``name``
    is the argument ``x`` came in as.
    """
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        return
    if not is_integer(getattr(model, "timesteps", None)):
        return
    weights = _parameter_dtype(model)
    if weights is not None:
        check_weights_dtype(type(model).__name__, name, x, weights)


def _check_model_and_schedule(model: NoisePredictor, schedule: NoiseSchedule) -> None:
    """Refuse what is not a :class:`NoiseSchedule` as ``schedule``, and a network built for
    fewer timesteps than it has; called before any respacing, on the pair the user gave."""
    check_schedule(schedule, NoiseSchedule, hint=_SCHEDULE_HINT)
    check_model_timesteps(model, schedule.timesteps)


def _randn(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise drawn on the generator's device, so a seed gives the same images anywhere."""
    check_generator(generator)
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def _start(
    model: NoisePredictor,
    shape: tuple[int, ...],
    x_T: Tensor | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    name: str = "x_T",
) -> Tensor:
    """The starting state: ``x_T`` checked and moved to the sampling device, or standard
    normal noise of ``shape`` drawn from ``generator``. ``name`` is what the sampler calls it."""
    if not isinstance(shape, (tuple, list)):
        raise ValueError(f"shape must be a tuple such as (16, 1, 28, 28); got {shape!r}")
    check_generator(generator)
    if x_T is not None:
        if not isinstance(x_T, Tensor) or not x_T.dtype.is_floating_point:
            kind = x_T.dtype if isinstance(x_T, Tensor) else type(x_T).__name__
            raise ValueError(f"{name} must be a floating-point tensor, got {kind}")
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(
                f"{name} must have the requested shape {tuple(shape)}, got {tuple(x_T.shape)}"
            )
        _check_network_dtype(model, name, x_T)
        device = device if device is not None else _parameter_device(model)
        return x_T.to(device) if device is not None else x_T
    if len(shape) < 2 or any(not is_integer(n) or n < 1 for n in shape):
        raise ValueError(f"shape must be positive integers (B, C, H, W), got {tuple(shape)}")
    device = torch.device(device) if device is not None else _model_device(model)
    return _randn(tuple(int(n) for n in shape), generator, device)


def _check_labels(labels: Tensor | None, batch_size: int, device: torch.device) -> Tensor | None:
    if labels is None:
        return None
    labels = torch.as_tensor(labels, device=device).long().reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(batch_size)
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"labels must hold one class per sample ({batch_size}), got {labels.shape[0]}"
        )
    return labels


def _conditioning(
    labels: Tensor | None,
    guidance: float,
    null_label: int | None,
    batch_size: int,
    device: torch.device,
) -> dict[str, object]:
    """The keyword arguments :func:`predict_noise` needs for class conditioning, if any."""
    labels = _check_labels(labels, batch_size, device)
    if labels is None:
        _check_no_guidance(guidance)
        return {}
    return {"labels": labels, "guidance": guidance, "null_label": null_label}


def _ancestral_step(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x: Tensor,
    index: int,
    generator: torch.Generator | None,
    variance: str,
    clip_x0: tuple[float, float] | None,
    extra: dict[str, object],
) -> Tensor:
    """One step of Algorithm 2: x_{t-1} ~ p_theta(x_{t-1} | x_t) at the 0-based ``index`` = t.

    ``schedule`` is the one the steps are counted in (a respaced one, with ``model`` wrapped to
    match). No noise is added at index 0, the step that returns the sample.
    """
    t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
    mean, _, log_variance, _ = p_mean_variance(
        model, schedule, x, t, variance=variance, clip_x0=clip_x0, **extra
    )
    return _draw_step(mean, log_variance, index, generator)


def _draw_step(
    mean: Tensor, log_variance: Tensor, index: int, generator: torch.Generator | None
) -> Tensor:
    """``mean + sigma z`` with z ~ N(0, I), or the mean itself at index 0 (the last step)."""
    if index == 0:
        return mean
    return mean + (0.5 * log_variance).exp() * _randn(tuple(mean.shape), generator, mean.device)


def ddpm_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    variance: str = "small",
    return_trajectory: bool = False,
    steps: int | None = None,
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    labels: Tensor | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Trajectory]:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2).

    Starting from x_T ~ N(0, I), repeat for t = T-1, ..., 0:
    ``x_{t-1} = mu_theta(x_t, t) + sigma_t z`` with z ~ N(0, I), and z = 0 at the last step.

    Args:
        model: noise predictor ``model(x_t, t)``.
        schedule: the schedule the model was trained with.
        shape: (B, C, H, W) of the batch to draw.
        x_T: starting noise of that shape (drawn from ``generator`` when omitted).
        variance: ``"small"`` (beta_tilde_t), ``"large"`` (beta_t) or ``"learned"`` (a model
            with 2C output channels, Nichol & Dhariwal 2021, eq. 15).
        steps: visit only this many evenly spaced timesteps, with the schedule respaced to
            keep alpha-bar (Nichol & Dhariwal 2021, sec. 4); ``None`` visits all T.
        clip_x0: range the x_0 estimate is clipped to at each step (``None``: no clipping).
        labels, guidance, null_label: class conditioning and classifier-free guidance
            (see :func:`predict_noise`).
        return_trajectory: also return every visited state as a :class:`Trajectory`.

    Returns the samples (B, C, H, W), or ``(samples, trajectory)``.
    """
    _check_model_and_schedule(model, schedule)
    check_choice("variance", variance, VARIANCES)
    steps = cap_sampling_steps(schedule.timesteps if steps is None else steps)
    x = _start(model, shape, x_T, generator, device)
    sampling_schedule, kept, wrapped = _respaced_chain(model, schedule, steps, x.device)
    extra = _conditioning(labels, guidance, null_label, x.shape[0], x.device)
    states, visited = [x.cpu()], []
    with _evaluating(model):
        for index in reversed(range(steps)):
            x = _ancestral_step(
                wrapped, sampling_schedule, x, index, generator, variance, clip_x0, extra
            )
            visited.append(int(kept[index]))
            if return_trajectory:
                states.append(x.cpu())
    if not return_trajectory:
        return x
    return x, Trajectory(torch.stack(states), torch.tensor([*visited, -1]))


def ddim_timesteps(timesteps: int, steps: int, spacing: str = "leading") -> Tensor:
    """The 0-based timesteps DDIM visits, ascending, shape (steps,).

    ``"leading"``: the DDIM paper's uniform skip 0, T/steps, 2T/steps, ... (rounded down),
    which never reaches t = T - 1: with 10 of 1000 steps it starts at t = 900, from noise
    that is purer than x_900 ever is. ``"trailing"``: the same skip counted down from the last
    step, T - 1, T - 1 - T/steps, ... (rounded), which starts where the forward process ends;
    ``"linspace"``: evenly from 0 to T - 1 (Lin et al. 2024, sec. 3.3 and Table 2). All three
    give 0..T-1 when ``steps = T``.
    """
    check_positive_int("steps", steps, maximum=timesteps)
    check_choice("spacing", spacing, DDIM_SPACINGS)
    if spacing == "leading":
        return torch.arange(steps, dtype=torch.long) * timesteps // steps
    if spacing == "trailing":
        ends = torch.arange(1, steps + 1, dtype=torch.float64) * (timesteps / steps)
        return ends.round().long() - 1
    return torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long()


def _ddim_update(
    x0: Tensor,
    eps: Tensor,
    alpha_bar: Tensor,
    alpha_bar_prev: Tensor,
    eta: float,
    last: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """One DDIM step from the estimates x0 and eps (Song et al. 2021, eq. 12, sigma of eq. 16):
    ``sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z``, with no noise at the last."""
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and not last:
        x = x + sigma * _randn(tuple(x.shape), generator, x.device)
    return x


def _check_eta(eta: object) -> float:
    """``eta`` as a float if it is a number in [0, 1], else ``ValueError``."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
        raise ValueError(
            "eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's variance); "
            f"got {eta!r}"
        )
    return float(eta)


def ddim_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    spacing: str = "leading",
    eta: float = 0.0,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    labels: Tensor | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Trajectory]:
    """DDIM sampling (Song et al. 2021, eq. 12) over ``steps`` evenly spaced timesteps.

    For consecutive visited timesteps t > s (and alpha-bar_s = 1 after the last one):
    ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z``, with
    ``sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)`` (eq. 16).
    ``eta = 0`` is deterministic DDIM; ``eta = 1`` matches DDPM's posterior variance; eta lies
    in [0, 1], beyond which sigma^2 would exceed the ``1 - abar_s`` that eq. 12 shares out.
    When x0_hat is clipped, eps_hat is recomputed from it so that both stay consistent.
    ``spacing`` picks the visited timesteps (:func:`ddim_timesteps`); ``"trailing"`` starts
    at t = T - 1, as a schedule with zero terminal SNR needs.

    Returns the samples (B, C, H, W), or ``(samples, trajectory)`` when asked.
    """
    _check_model_and_schedule(model, schedule)
    eta = _check_eta(eta)
    steps = cap_sampling_steps(steps)
    visited = ddim_timesteps(schedule.timesteps, steps, spacing)
    x = _start(model, shape, x_T, generator, device)
    schedule = schedule.to(x.device)
    extra = _conditioning(labels, guidance, null_label, x.shape[0], x.device)
    states = [x.cpu()]
    with _evaluating(model):
        for i in reversed(range(steps)):
            t = torch.full((x.shape[0],), int(visited[i]), device=x.device, dtype=torch.long)
            eps, x0 = _noise_and_x0(model, schedule, x, t, clip_x0, extra)
            alpha_bar = _gather(schedule.alphas_cumprod, t, x)
            alpha_bar_prev = (
                _gather(schedule.alphas_cumprod, torch.full_like(t, int(visited[i - 1])), x)
                if i > 0
                else torch.ones_like(alpha_bar)
            )
            x = _ddim_update(x0, eps, alpha_bar, alpha_bar_prev, eta, i == 0, generator)
            if return_trajectory:
                states.append(x.cpu())
    if not return_trajectory:
        return x
    return x, Trajectory(torch.stack(states), torch.cat([visited.flip(0), torch.tensor([-1])]))


def ddim_encode(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    steps: int = 50,
    spacing: str = "leading",
    labels: Tensor | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Trajectory]:
    """Run deterministic DDIM backwards: map images x_0 to the noise x_T that DDIM would decode to them.

    The eta = 0 update (Song et al. 2021, eq. 12) is the Euler step of an ODE (eq. 14), so it
    can be integrated from x_0 towards x_T over the same timesteps as :func:`ddim_sample`; each
    step evaluates the model at the state it leaves and the timestep it moves to. With enough
    steps, ``ddim_sample(..., x_T=ddim_encode(...))`` gives back x_0 up to discretisation error.
    ``x0``: (B, C, H, W). Returns x_T of the same shape, or ``(x_T, trajectory)``.
    """
    _check_model_and_schedule(model, schedule)
    _check_network_dtype(model, "x0", x0)
    steps = cap_sampling_steps(steps)
    visited = ddim_timesteps(schedule.timesteps, steps, spacing)
    schedule = schedule.to(x0.device)
    labels = _check_labels(labels, x0.shape[0], x0.device)
    x, states = x0, [x0.cpu()]
    alpha_bar = torch.ones(x0.shape[0], *([1] * (x0.dim() - 1)), dtype=x0.dtype, device=x0.device)
    with _evaluating(model):
        for i in range(steps):
            t = torch.full((x.shape[0],), int(visited[i]), device=x.device, dtype=torch.long)
            eps = predict_noise(model, x, t, labels).to(x.dtype)
            x0_estimate = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
            alpha_bar = _gather(schedule.alphas_cumprod, t, x)
            x = alpha_bar.sqrt() * x0_estimate + (1 - alpha_bar).sqrt() * eps
            if return_trajectory:
                states.append(x.cpu())
    if not return_trajectory:
        return x
    return x, Trajectory(torch.stack(states), torch.cat([torch.tensor([-1]), visited]))


def slerp(x0: Tensor, x1: Tensor, weight: float | Tensor) -> Tensor:
    """Spherical interpolation between two noise tensors (Shoemake 1985), as used on DDIM latents.

    Gaussian noise in many dimensions lives near a sphere of radius sqrt(d); a straight line
    between two such points passes inside it, where the model has never seen its inputs, while
    ``sin((1 - w) theta) / sin(theta) x0 + sin(w theta) / sin(theta) x1`` stays on it.
    ``x0``, ``x1``: same shape (..., D...) with the first dimension as batch; ``weight`` in [0, 1].
    """
    check_same_shape("x1", x1, "x0", x0)
    if x0.dim() < 2:
        raise ValueError(
            "slerp interpolates batches: x0 and x1 must have shape (B, ...) with the batch "
            f"first, e.g. (1, {x0.numel()}) for a single vector; got {tuple(x0.shape)}"
        )
    flat0, flat1 = x0.flatten(1), x1.flatten(1)
    cosine = (flat0 * flat1).sum(1) / (flat0.norm(dim=1) * flat1.norm(dim=1))
    theta = torch.arccos(cosine.clamp(-1.0, 1.0)).reshape(-1, *([1] * (x0.dim() - 1)))
    weight = torch.as_tensor(weight, dtype=x0.dtype, device=x0.device)
    sin_theta = torch.sin(theta).clamp(min=1e-8)
    mixed = (torch.sin((1 - weight) * theta) * x0 + torch.sin(weight * theta) * x1) / sin_theta
    # Nearly parallel inputs: the spherical formula degenerates, fall back to a straight line.
    return torch.where(theta < 1e-4, (1 - weight) * x0 + weight * x1, mixed)
