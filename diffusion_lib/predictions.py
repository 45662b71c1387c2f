"""What the network predicts (the noise, the clean data or the velocity) and how the loss weighs time.

Write ``alpha = sqrt(alpha_bar_t)`` and ``sigma = sqrt(1 - alpha_bar_t)``, so that
``x_t = alpha x_0 + sigma eps`` and ``alpha^2 + sigma^2 = 1``. Given x_t, any one of ::

    eps,    x_0,    v = alpha eps - sigma x_0      (Salimans & Ho 2022, sec. 4)

determines the other two, so a network may be trained to output any of them. The choices
differ in how an error is weighed. If the noise estimate is off by ``e``, the data estimate
``x_0 = (x_t - sigma eps) / alpha`` is off by ``-(sigma / alpha) e`` and the velocity by ``e /
alpha``; with ``SNR = alpha^2 / sigma^2`` (Kingma et al. 2021, eq. 2), ::

    ||eps - eps_hat||^2 = SNR       ||x_0 - x0_hat||^2,
    ||v - v_hat||^2     = (SNR + 1) ||x_0 - x0_hat||^2.

An unweighted mean squared error on the chosen target is therefore a loss on the data error
with the weight SNR, 1 or SNR + 1 (:func:`x0_error_weight`). The variational bound has its own
weight (:func:`elbo_weight`), and Hang et al. (2023) clip the data weight at ``gamma``
(:func:`min_snr_weight`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_lib.reverse_process import predict_noise
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.validation import check_choice, check_number, check_timesteps

PREDICTIONS = ("epsilon", "x0", "v")


def prediction_target(
    schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor, prediction: str
) -> Tensor:
    """What a network trained for ``prediction`` should output at ``x_t = alpha x_0 + sigma eps``.

    ``"epsilon"``: the noise (Ho et al. 2020, eq. 14); ``"x0"``: the data; ``"v"``: ``alpha eps -
    sigma x_0`` (Salimans & Ho 2022, sec. 4). ``x0``, ``noise``: (B, ...); ``t``: (B,) 0-based
    timesteps, not checked here so that training never waits on the device. Returns (B, ...).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "epsilon":
        return noise
    if prediction == "x0":
        return x0
    return schedule._velocity(x0, t, noise)


def eps_from_prediction(
    schedule: NoiseSchedule, x_t: Tensor, t: Tensor, output: Tensor, prediction: str
) -> Tensor:
    """The noise estimate implied by a network's ``output`` for ``prediction``.

    ``"x0"``: ``eps = (x_t - alpha x0_hat) / sigma`` (Ho et al. 2020, eq. 4 solved for eps);
    ``"v"``: ``eps = sigma x_t + alpha v_hat`` (Salimans & Ho 2022, sec. 4). ``x_t``, ``output``:
    (B, ...); ``t``: (B,). Returns (B, ...) like ``output``.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "epsilon":
        return output
    if prediction == "x0":
        return schedule._predict_eps(x_t, t, output)
    return schedule._x0_and_eps_from_velocity(x_t, t, output)[1]


def x0_error_weight(schedule: NoiseSchedule, t: Tensor, prediction: str) -> Tensor:
    """The weight that a plain squared error on the ``prediction`` target puts on the data error.

    ``||target - output||^2 = w(t) ||x_0 - x0_hat||^2`` with ``w = SNR`` for ``"epsilon"``, 1 for
    ``"x0"`` and ``SNR + 1`` for ``"v"`` (the identities in this module's docstring). ``t``: (B,).
    Returns (B,) float64 on ``t``'s device.
    """
    check_timesteps(t, schedule.timesteps, t.shape[0])
    return _x0_error_weight(schedule, t, prediction)


def _x0_error_weight(schedule: NoiseSchedule, t: Tensor, prediction: str) -> Tensor:
    check_choice("prediction", prediction, PREDICTIONS)
    snr = schedule.signal_to_noise_ratio.to(t.device)[t]
    return {"epsilon": snr, "x0": torch.ones_like(snr), "v": snr + 1.0}[prediction]


def elbo_weight(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The weight of the data error in one denoising term of the bound, in nats.

    With the reverse variance ``beta_tilde_t``, the term of 0-based step ``t >= 1`` is
    ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) = (SNR(t-1) - SNR(t)) / 2 ||x_0 - x0_hat||^2``
    (Kingma et al. 2021). ``t``: (B,) in 1..T-1; step 0 is the decoder term, which is
    not a squared error. Returns (B,) float64 on ``t``'s device.
    """
    check_timesteps(t, schedule.timesteps, t.shape[0])
    if (t < 1).any():
        raise ValueError(
            "elbo_weight needs t >= 1: step 0 is the decoder term L_0, a likelihood of x_0 and "
            "not a weighted squared error"
        )
    snr = schedule.signal_to_noise_ratio.to(t.device)
    return 0.5 * (snr[t - 1] - snr[t])


def min_snr_weight(schedule: NoiseSchedule, t: Tensor, prediction: str, gamma: float) -> Tensor:
    """Loss weights of Min-SNR-gamma (Hang et al. 2023) for a ``prediction`` target.

    They turn the squared error on the target into ``min(SNR, gamma) ||x_0 - x0_hat||^2``: the
    data weight SNR of noise prediction, capped at ``gamma`` so that the nearly clean steps do
    not dominate. That is ``min(SNR, gamma) / w`` with ``w`` of :func:`x0_error_weight`. ``t``:
    (B,). Returns (B,) float64 on ``t``'s device.
    """
    check_timesteps(t, schedule.timesteps, t.shape[0])
    return _min_snr_weight(
        schedule, t, prediction, check_number("gamma", gamma, 0.0, low_open=True)
    )


def _min_snr_weight(schedule: NoiseSchedule, t: Tensor, prediction: str, gamma: float) -> Tensor:
    """:func:`min_snr_weight` without the check of ``t``, which would wait on the device."""
    snr = schedule.signal_to_noise_ratio.to(t.device)[t]
    return snr.clamp(max=gamma) / _x0_error_weight(schedule, t, prediction)


class NoiseFromPrediction(nn.Module):
    """A network that predicts ``x0`` or ``v``, seen as a noise predictor.

    Every sampler in the library asks its model for eps; this wrapper answers with
    :func:`eps_from_prediction` of the wrapped network's output, so those samplers run a data or
    velocity network unchanged. The conversion is affine in the output with coefficients that
    depend on ``t`` only, so classifier-free guidance on eps equals guidance on the output.
    Called like the network: ``(x_t, t)`` or ``(x_t, t, labels)`` -> eps, shaped like ``x_t``.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, prediction: str) -> None:
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.prediction = check_choice("prediction", prediction, PREDICTIONS)
        if hasattr(model, "null_label"):
            self.null_label = model.null_label

    def forward(self, x_t: Tensor, t: Tensor, *labels: Tensor) -> Tensor:
        if self.schedule.device != x_t.device:
            # Moved once, not on every call (and to float32 on MPS, which lacks float64).
            self.schedule = self.schedule.to(x_t.device)
        output = self.model(x_t, t, *labels)
        return eps_from_prediction(self.schedule, x_t, t, output.to(x_t.dtype), self.prediction)

    def noise_and_x0(
        self,
        x_t: Tensor,
        t: Tensor,
        labels: Tensor | None = None,
        guidance: float = 0.0,
        null_label: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The estimates of eps and x_0, each read from the network's output directly.

        For ``"v"``, ``x0 = alpha x_t - sigma v_hat`` needs no division, so it stays defined at
        alpha = 0, the last step of a schedule with zero terminal SNR, where the eps of
        :meth:`forward` equals x_t and carries nothing of x_0. Guidance (see
        :func:`~diffusion_lib.reverse_process.predict_noise`) mixes the network's outputs, which is the
        same as mixing either estimate. ``x_t``: (B, ...), ``t``: (B,). Returns ``(eps, x0)``.
        """
        if self.schedule.device != x_t.device:
            self.schedule = self.schedule.to(x_t.device)
        output = predict_noise(self.model, x_t, t, labels, guidance, null_label).to(x_t.dtype)
        if self.prediction == "epsilon":
            return output, self.schedule._predict_x0(x_t, t, output)
        if self.prediction == "x0":
            return self.schedule._predict_eps(x_t, t, output), output
        x0, eps = self.schedule._x0_and_eps_from_velocity(x_t, t, output)
        return eps, x0

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}"
