"""Classifier guidance (Dhariwal & Nichol 2021): an unconditional model steered by a classifier.

Bayes' rule, differentiated in x_t, splits the score of the noised conditional distribution::

    grad log p_t(x_t | y) = grad log p_t(x_t) + grad log p_t(y | x_t).

The unconditional model gives the first term through ``eps = -sqrt(1 - abar_t) grad log p_t``
(chapter 9); a classifier ``p_phi(y | x_t, t)`` trained on noisy images gives the second. Their
sum, with the classifier's term scaled by s, is the guided noise estimate of Dhariwal & Nichol
(2021, eq. 14 and Algorithm 2)::

    eps_guided(x_t, t) = eps_theta(x_t, t) - s sqrt(1 - abar_t) grad_{x_t} log p_phi(y | x_t, t).

With an exact model and classifier, s = 1 gives the exact conditional model. Larger s follows
the score of ``p_t(x_t) p_t(y | x_t)^s``, which favours the images the classifier is surest of:
fidelity bought with diversity, as with classifier-free guidance (chapter 7). The classifier
must be trained on x_t at every noise level: one trained on clean images says nothing useful
about a noisy x_t. :class:`NoisyClassifier` is such a classifier, trained with
``train(classifier, schedule, images, labels=labels, loss=noisy_classifier_loss)``, and
:class:`ClassifierGuided` wraps model and classifier as a plain ``(x_t, t)`` noise predictor,
so every sampler of the library can use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.losses import _noisy_batch
from diffusion_lib.models.attention_unet import AttentionUNet
from diffusion_lib.schedules import NoiseSchedule, _gather
from diffusion_lib.validation import check_number, check_positive_int

ClassifierLogProb = Callable[[Tensor, Tensor, Tensor], Tensor]


class NoisyClassifier(nn.Module):
    """``p_phi(y | x_t, t)`` as logits: the contracting path and middle of an AttentionUNet,
    averaged over the image, then a linear layer (Dhariwal & Nichol 2021, section 4.1, use the
    U-net's downsampling half the same way, with attention pooling).

    Args:
        num_classes: K >= 2.
        **unet_options: the :class:`~diffusion_lib.models.attention_unet.AttentionUNet` arguments of the
            encoder (image size, channels, widths, timesteps); ``num_classes`` and
            ``out_channels`` do not apply.

    Shapes: ``forward(x_t, t)`` with ``x_t`` (B, C, H, W) and ``t`` (B,) -> (B, K).
    """

    def __init__(self, num_classes: int, **unet_options: object) -> None:
        super().__init__()
        given = sorted({"num_classes", "out_channels"} & unet_options.keys())
        if given:
            raise ValueError(f"{', '.join(given)} do not apply to a NoisyClassifier's encoder")
        self.num_classes = check_positive_int("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.encoder = AttentionUNet(**unet_options).drop_expanding_path()
        width = self.encoder.skip_channels[-1]
        groups = self.encoder.middle[-1].block.norm2.num_groups
        self.head = nn.Sequential(
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        h, _, _ = self.encoder.encode(x_t, t)
        return self.head(h)


def noisy_classifier_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    noise: Tensor | None = None,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Cross-entropy of ``model(x_t, t)`` against the labels of x_0, with x_t ~ q(x_t | x_0) at
    a uniform random t: how a classifier for guidance is trained. ``x0`` (B, C, H, W),
    ``labels`` (B,) int64; returns a scalar. Pass as ``loss`` to ``train`` with ``labels``."""
    if labels is None:
        raise ValueError("noisy_classifier_loss needs the class labels: pass labels=... to train")
    t, _, x_t = _noisy_batch(schedule, x0, None, noise, generator)
    return F.cross_entropy(model(x_t, t).float(), labels.long())


def logits_log_prob(classifier: Callable[[Tensor, Tensor], Tensor]) -> ClassifierLogProb:
    """``log p_phi(y | x_t, t)`` from a network that returns class logits ``(x_t, t) -> (B, K)``:
    the log-softmax of the logits at each sample's label, shape (B,)."""

    def log_prob(x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        log_probs = F.log_softmax(classifier(x_t, t).float(), dim=1)
        return log_probs.gather(1, labels.long().view(-1, 1)).squeeze(1)

    return log_prob


class ClassifierGuided(nn.Module):
    """``eps_theta(x_t, t) - s sqrt(1 - abar_t) grad log p_phi(y | x_t, t)`` for fixed labels y.

    Args:
        model: an unconditional noise predictor ``model(x_t, t)`` trained with ``schedule``.
        schedule: the schedule of the original timesteps the samplers pass (respaced samplers
            pass the original ones).
        log_prob: ``(x_t, t, labels) -> (B,)``, the classifier's ``log p_phi(y | x_t, t)``,
            differentiable in x_t; see :func:`logits_log_prob`.
        labels: (B,) int64, the class y of each sample to draw.
        scale: s >= 0; 0 is the unguided model.

    Shapes: ``forward(x_t, t)`` with ``x_t`` (B, ...) and ``t`` (B,) -> like ``x_t``. Each call
    evaluates the classifier's gradient with autograd, inside the samplers' ``no_grad`` too.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        log_prob: ClassifierLogProb,
        labels: Tensor,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not callable(log_prob):
            raise ValueError(
                "log_prob must be a callable (x_t, t, labels) -> log p(y | x_t, t) of shape (B,), "
                f"got {type(log_prob).__name__}; wrap a logits network with logits_log_prob"
            )
        if not isinstance(labels, Tensor) or labels.dim() != 1:
            raise ValueError(
                "labels must be a 1-D tensor of class indices, one per sample, got "
                f"{getattr(labels, 'shape', type(labels).__name__)}"
            )
        self.model = model
        self.schedule = schedule
        self.log_prob = log_prob
        self.labels = labels
        self.scale = check_number("scale", scale, 0.0, low_open=False)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        if x_t.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"the sampler asked for {x_t.shape[0]} samples but {self.labels.shape[0]} labels "
                "are bound: give one label per sample"
            )
        eps = self.model(x_t, t)
        if self.scale == 0:
            return eps
        return eps - self.scale * self._scaled_gradient(x_t, t)

    def _scaled_gradient(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``sqrt(1 - abar_t) grad_{x_t} log p_phi(y | x_t, t)``, like ``x_t``."""
        labels = self.labels.to(x_t.device)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_()
            log_prob = self.log_prob(x, t, labels)
            if log_prob.shape != (x.shape[0],):
                raise ValueError(
                    f"log_prob must return one log-probability per sample, shape ({x.shape[0]},), "
                    f"got {tuple(log_prob.shape)}"
                )
            (gradient,) = torch.autograd.grad(log_prob.sum(), x)
        alpha_bar = _gather(self.schedule.alphas_cumprod, t.long(), x_t)
        return (1 - alpha_bar).sqrt() * gradient.to(x_t.dtype)
