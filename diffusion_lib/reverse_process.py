"""One step of the reverse process, p_theta(x_{t-1} | x_t), from a noise-predicting model.

:func:`predict_noise` calls the model, with classifier-free guidance when asked. Its noise
estimate gives an estimate of x_0 (Ho et al. 2020, eq. 4 solved for x_0), and through the
posterior of the forward process the mean and variance of p_theta(x_{t-1} | x_t)
(:func:`p_mean_variance`, eq. 11), from which one ancestral step draws. The samplers of
:mod:`diffusion_lib.sampling` chain these steps from noise to an image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_lib.guidance import Guided
from diffusion_lib.learned_variance import learned_log_variance, split_eps_and_v
from diffusion_lib.sampler_inputs import NoisePredictor, _check_labels, _randn
from diffusion_lib.schedules import NoiseSchedule, _gather
from diffusion_lib.validation import (
    check_choice,
    check_range,
    check_same_shape,
    check_timesteps,
)

VARIANCES = ("small", "large", "learned")


_LEARNED_HINT = (
    "a model with 2C output channels learns its variance: pass variance='learned' to an "
    "ancestral sampler, or wrap it in NoiseOnly for the others"
)


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
