"""Guidance beyond the plain classifier-free rule: what it pushes away from, where, and how far.

Classifier-free guidance (Ho & Salimans 2021, eq. 6) moves a conditional noise estimate away
from the unconditional one. Written with a general reference estimate eps_ref, ::

    eps_tilde(x_t, t, c) = eps(x_t, t, c) + w [eps(x_t, t, c) - eps_ref(x_t, t)],

and the variants in the literature each change one part of it:

* the reference: the same network without a label (classifier-free guidance), with a label to
  steer away from (a negative prompt), or a weaker network given the same label (autoguidance,
  Karras et al. 2024, eq. 2);
* the noise levels it acts on: only those inside an interval, plain conditional estimates elsewhere
  (Kynkäänniemi et al. 2024, eq. 2);
* its size: each sample's guided estimate rescaled to the standard deviation of its conditional
  one, then mixed back with a weight phi (Lin et al. 2024, Algorithm 2).

:class:`Guided` wraps a network into a noise predictor with any combination of these, called
like the network, so every sampler of the library draws with it unchanged.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor, nn

NoisePredictor = Callable[..., Tensor]


class Guided(nn.Module):
    """A noise predictor ``eps(c) + w (eps(c) - eps_ref)`` built from a network and a reference.

    Args:
        model: the network, ``model(x_t, t)`` or ``model(x_t, t, labels)``.
        weight: the guidance weight w; 0 returns the model's own estimate, and the rule with the
            default reference is :func:`~diffusion_lib.reverse_process.predict_noise`'s
            ``(1 + w) eps(c) - w eps(no label)``. Karras et al. write the same rule with their
            weight ``w_K = 1 + w``.
        reference_model: a second network that gives eps_ref with the same labels as ``model``
            (autoguidance: a smaller or less trained version of ``model``). When omitted, eps_ref
            is ``model``'s own estimate for ``reference_label``.
        reference_label: the label eps_ref is computed for instead of the sample's own: a class
            to steer away from (a negative prompt), one for the whole batch or a tensor (B,)
            of one per sample. Defaults to ``model.null_label`` (plain classifier-free
            guidance) when there is no ``reference_model``.
        interval: ``(first, last)`` in the units of the model's time input ``t``: 0-based
            timesteps for a noise predictor, the noise level sigma for an EDM denoiser
            (Kynkäänniemi et al. guide EDM2 at ``0.28 < sigma <= 5.42``), ``time_scale * t`` for
            a flow's velocity. Guidance acts where ``first <= t <= last``; elsewhere the model's
            estimate is returned as it is, without evaluating the reference. ``None``: every
            timestep.
        rescale: phi in [0, 1] (Lin et al. 2024, Algorithm 2): the guided estimate of each sample
            is blended, with weight phi, with its copy rescaled to the standard deviation of the
            conditional estimate. 0 leaves it unchanged; they use 0.7.

    ``forward(x_t, t, labels=None)``: ``x_t`` (B, C, ...), ``t`` (B,), ``labels`` (B,) or
    ``None`` for an unconditional model (which then needs ``reference_model``). A model with
    more than C output channels (a learned variance) has only its first C guided; the rest are
    the conditional estimate's, as in :func:`~diffusion_lib.reverse_process.predict_noise`.
    """

    def __init__(
        self,
        model: NoisePredictor,
        weight: float,
        *,
        reference_model: NoisePredictor | None = None,
        reference_label: int | Tensor | None = None,
        interval: tuple[float, float] | None = None,
        rescale: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(
                f"weight must be a finite number (0 means no guidance), got {weight!r}"
            )
        if not isinstance(rescale, numbers.Real) or not 0.0 <= rescale <= 1.0:
            raise ValueError(
                f"rescale must be a number in [0, 1] (0.7 is typical), got {rescale!r}"
            )
        self.model, self.reference_model = model, reference_model
        self.weight, self.rescale = float(weight), float(rescale)
        self.interval = _check_interval(interval)
        if reference_model is None and reference_label is None:
            reference_label = _null_label(model)
        self.reference_label = reference_label

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None and self.reference_model is None:
            raise ValueError(
                "guidance without labels needs a reference_model (autoguidance): there is no "
                "label to compare with a reference label"
            )
        inside = self._inside(t)
        if inside is not None and not bool(inside.any()):
            return _call(self.model, x_t, t, labels)
        estimate, reference = self._estimate_and_reference(x_t, t, labels, inside)
        channels = x_t.shape[1]
        guided = estimate.clone()
        rows = slice(None) if inside is None else inside
        guided[rows, :channels] = self._combine(estimate[rows, :channels], reference[:, :channels])
        return guided

    def _inside(self, t: Tensor) -> Tensor | None:
        """(B,) bool: the samples whose timestep lies in the guidance interval; ``None`` when
        there is no interval, so that guiding every step costs no mask and no device sync."""
        if self.interval is None:
            return None
        first, last = self.interval
        return (t >= first) & (t <= last)

    def _reference_labels(self, labels: Tensor | None, inside: Tensor | None) -> Tensor | None:
        """The labels eps_ref is computed for, for the samples inside the interval."""
        if labels is None:
            return None
        if isinstance(self.reference_label, Tensor):
            if self.reference_label.shape != labels.shape:
                raise ValueError(
                    "reference_label must be one label or a tensor with one per sample, shape "
                    f"{tuple(labels.shape)}; got shape {tuple(self.reference_label.shape)}"
                )
            labels = self.reference_label.to(labels.device)
        elif self.reference_label is not None:
            labels = torch.full_like(labels, self.reference_label)
        return _rows(labels, inside)

    def _estimate_and_reference(
        self, x_t: Tensor, t: Tensor, labels: Tensor | None, inside: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The model's estimate for every sample, (B, ...), and eps_ref for those inside the
        interval (all when ``inside`` is None); one batched call when both come from the same
        network."""
        guided_x, guided_t = _rows(x_t, inside), _rows(t, inside)
        reference_labels = self._reference_labels(labels, inside)
        if self.reference_model is not None:
            estimate = _call(self.model, x_t, t, labels)
            return estimate, _call(self.reference_model, guided_x, guided_t, reference_labels)
        # forward() has checked that a model without a reference model is given labels.
        both = self.model(
            torch.cat([x_t, guided_x]),
            torch.cat([t, guided_t]),
            torch.cat([labels, reference_labels]),
        )
        return both[: x_t.shape[0]], both[x_t.shape[0] :]

    def _combine(self, estimate: Tensor, reference: Tensor) -> Tensor:
        """``estimate + w (estimate - reference)``, then the rescaling; shapes (B, C, ...)."""
        guided = estimate + self.weight * (estimate - reference)
        if self.rescale == 0.0:
            return guided
        dims = tuple(range(1, guided.dim()))
        ratio = estimate.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        return self.rescale * guided * ratio + (1.0 - self.rescale) * guided


def _rows(values: Tensor, inside: Tensor | None) -> Tensor:
    return values if inside is None else values[inside]


def _call(model: NoisePredictor, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
    return model(x_t, t) if labels is None else model(x_t, t, labels)


def _null_label(model: NoisePredictor) -> int:
    try:
        return int(model.null_label)  # type: ignore[attr-defined]
    except (AttributeError, ValueError) as error:
        raise ValueError(
            "classifier-free guidance needs a model trained with a null label (a conditional "
            "model with label dropout); otherwise give reference_label, a class to steer away "
            f"from, or reference_model, a weaker network ({error})"
        ) from error


def _check_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    if interval is None:
        return None
    valid = (
        isinstance(interval, tuple | list)
        and len(interval) == 2
        and all(
            isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            for value in interval
        )
        and 0 <= interval[0] <= interval[1]
    )
    if not valid:
        raise ValueError(
            "interval must be two finite times (first, last) with 0 <= first <= last, in the "
            "units of the model's time input (timesteps, or sigma for an EDM denoiser), the "
            f"range where guidance acts; got {interval!r}"
        )
    first, last = interval
    return first, last
