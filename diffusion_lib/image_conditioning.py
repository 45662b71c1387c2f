"""Diffusion models conditioned on an image: concatenation (SR3, Palette) and ControlNet.

A condition image ``c`` (B, C_c, H, W), such as an upsampled low-resolution copy or an
edge map, comes with each training image x_0. A network that sees it learns the noise of
``p(x_t | c)``, and the samplers then draw from ``p(x_0 | c)``. The objective is the
simplified loss with the condition as an extra input (Saharia et al. 2022)::

    E_{x_0, c, t, eps} || eps - eps_theta(x_t, c, t) ||^2,   x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps.

Two ways to build ``eps_theta(x_t, c, t)``:

* :class:`ConcatConditioned`, as SR3 (Saharia et al. 2022) and Palette (Saharia et al.
  2022b) do: a U-net trained from scratch on the channel-wise concatenation ``[x_t, c]``.
* :class:`ControlledUNet`, ControlNet (Zhang, Rao & Agrawala 2023): a trained, frozen
  :class:`~diffusion_lib.models.attention_unet.AttentionUNet` plus a trainable copy of its contracting
  path that reads ``c``. The copy's activations pass through convolutions that start at zero
  and are added to the frozen network's skip connections and middle, so training starts
  from the trained model exactly and never disturbs its weights.

:class:`ImageConditionedLoss` trains either one with :func:`~diffusion_lib.training.train`,
making the condition from each batch of x_0; :func:`with_condition` fixes the conditions
so that every sampler of the library can draw from the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.losses import _noisy_batch
from diffusion_lib.models.attention_unet import AttentionUNet, _zero_init
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.validation import check_number, check_positive_int, check_same_shape

MakeCondition = Callable[[Tensor, torch.Generator | None], Tensor]


def _check_condition(condition: Tensor, x_t: Tensor, channels: int | None = None) -> None:
    """``condition`` must be a (B, C_c, H, W) image batch aligned with ``x_t`` (B, C, H, W)."""
    if not isinstance(condition, Tensor) or condition.dim() != x_t.dim():
        raise ValueError(
            f"the condition must be an image batch (B, C_c, H, W) like x_t {tuple(x_t.shape)}, "
            f"got {getattr(condition, 'shape', type(condition).__name__)}"
        )
    if condition.shape[0] != x_t.shape[0] or condition.shape[2:] != x_t.shape[2:]:
        raise ValueError(
            f"the condition {tuple(condition.shape)} must have x_t's batch size and image "
            f"size, {(x_t.shape[0], '*', *x_t.shape[2:])}"
        )
    if channels is not None and condition.shape[1] != channels:
        raise ValueError(f"the condition must have {channels} channels, got {condition.shape[1]}")


class ConcatConditioned(nn.Module):
    """``eps_theta(x_t, c, t) = network([x_t, c], t)``: the condition as extra input channels.

    The conditioning of SR3 (Saharia et al. 2022) and Palette: the network,
    for instance an ``AttentionUNet(channels=C + C_c, out_channels=C)``, reads the noisy image
    and the condition stacked along the channels and is trained from scratch.

    Shapes: ``forward(x_t, t, condition, labels=None)`` with ``x_t`` (B, C, H, W) and
    ``condition`` (B, C_c, H, W) -> the network's output for (B, C + C_c, H, W).
    """

    def __init__(self, network: nn.Module, condition_channels: int = 1) -> None:
        super().__init__()
        self.network = network
        self.condition_channels = check_positive_int("condition_channels", condition_channels)
        total = getattr(network, "channels", None)
        if total is not None and total <= self.condition_channels:
            raise ValueError(
                f"the network reads {total} channels, which leaves none for x_t beside "
                f"{self.condition_channels} condition channels: build it with channels = "
                "C + condition_channels"
            )

    def forward(
        self, x_t: Tensor, t: Tensor, condition: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        _check_condition(condition, x_t, self.condition_channels)
        inputs = torch.cat([x_t, condition.to(x_t.dtype)], dim=1)
        return self.network(inputs, t) if labels is None else self.network(inputs, t, labels)


def _predict(
    model: nn.Module, x_t: Tensor, t: Tensor, condition: Tensor, labels: Tensor | None
) -> Tensor:
    """``model(x_t, t, condition)``, with the labels as a fourth argument when there are any."""
    if labels is None:
        return model(x_t, t, condition)
    return model(x_t, t, condition, labels)


class ControlNet(nn.Module):
    """The trainable side of a ControlNet (Zhang, Rao & Agrawala 2023) for an AttentionUNet.

    * ``encoder``: a copy of the base network's contracting path and middle, starting from
      the base's trained weights (its expanding path is dropped: it is never used).
    * ``hint``: three 3x3 convolutions that turn the condition into ``base_channels``
      features; the last starts at zero. They are added after the copy's first convolution
      (the paper's ``x + Z(c)``).
    * ``skip_projections`` and ``middle_projection``: the paper's zero convolutions, 1x1
      convolutions with zero weight and bias, one per skip activation and one for the middle.

    ``forward(x_t, t, condition, labels=None)`` returns ``(skip_residuals, middle_residual)``
    shaped like the base's skips and middle output. With every zero convolution at zero
    they are all zero, but their gradients are not: the derivative of ``W f + b`` in ``W`` is
    the copy's activation ``f``, which is not zero, so the first step moves them.
    """

    def __init__(
        self, base: AttentionUNet, condition_channels: int = 1, hint_channels: int = 16
    ) -> None:
        super().__init__()
        if not isinstance(base, AttentionUNet):
            raise ValueError(
                f"a ControlNet copies an AttentionUNet's contracting path, got {type(base).__name__}"
            )
        self.condition_channels = check_positive_int("condition_channels", condition_channels)
        check_positive_int("hint_channels", hint_channels)
        self.encoder = copy.deepcopy(base).drop_expanding_path().requires_grad_(True)
        base_channels = base.input_conv.out_channels
        self.hint = nn.Sequential(
            nn.Conv2d(condition_channels, hint_channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hint_channels, hint_channels, 3, padding=1),
            nn.SiLU(),
            _zero_init(nn.Conv2d(hint_channels, base_channels, 3, padding=1)),
        )
        self.skip_projections = nn.ModuleList(
            _zero_init(nn.Conv2d(channels, channels, 1)) for channels in base.skip_channels
        )
        middle_channels = base.skip_channels[-1]
        self.middle_projection = _zero_init(nn.Conv2d(middle_channels, middle_channels, 1))

    def forward(
        self, x_t: Tensor, t: Tensor, condition: Tensor, labels: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        _check_condition(condition, x_t, self.condition_channels)
        hint = self.hint(condition.to(x_t.dtype))
        h, skips, _ = self.encoder.encode(x_t, t, labels, input_residual=hint)
        skip_residuals = [
            projection(skip) for projection, skip in zip(self.skip_projections, skips, strict=True)
        ]
        return skip_residuals, self.middle_projection(h)


class ControlledUNet(nn.Module):
    """A frozen AttentionUNet steered by a :class:`ControlNet`: ``eps_theta(x_t, c, t)``.

    The base network runs as before, except that the control's residuals, times
    ``control_scale``, are added to its middle output and to every skip activation before
    the expanding path reads them (Zhang, Rao & Agrawala 2023). The base's weights
    are frozen here; only ``control`` trains. At initialisation, and at ``control_scale = 0``,
    the output is the base network's.

    Args:
        base: a trained :class:`~diffusion_lib.models.attention_unet.AttentionUNet`, conditional or not.
        condition_channels: C_c, the channels of the condition image.
        hint_channels: width of the control's condition encoder.
        control_scale: multiplier of the residuals (diffusers' ``controlnet_conditioning_scale``).

    Shapes: ``forward(x_t, t, condition, labels=None)`` with ``x_t`` (B, C, H, W) and
    ``condition`` (B, C_c, H, W) -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        base: AttentionUNet,
        condition_channels: int = 1,
        hint_channels: int = 16,
        control_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.control = ControlNet(base, condition_channels, hint_channels)
        self.base = base.requires_grad_(False)
        self.control_scale = check_number("control_scale", control_scale, 0.0, low_open=False)

    @property
    def channels(self) -> int:
        return self.base.channels

    def forward(
        self, x_t: Tensor, t: Tensor, condition: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        h, skips, time_features = self.base.encode(x_t, t, labels)
        if self.control_scale == 0:
            return self.base.decode(h, skips, time_features)
        skip_residuals, middle_residual = self.control(x_t, t, condition, labels)
        scale = self.control_scale
        skips = [
            skip + scale * residual for skip, residual in zip(skips, skip_residuals, strict=True)
        ]
        return self.base.decode(h + scale * middle_residual, skips, time_features)


def _drop_conditions(
    condition: Tensor, probability: float, generator: torch.Generator | None
) -> Tensor:
    """Each sample's condition replaced by the null condition (zeros) with ``probability``."""
    source = generator.device if generator is not None else condition.device
    dropped = torch.rand(condition.shape[0], generator=generator, device=source) < probability
    keep = (~dropped).to(device=condition.device, dtype=condition.dtype)
    return condition * keep.view(-1, *([1] * (condition.dim() - 1)))


class ImageConditionedLoss:
    """The simplified loss with an image condition made from each batch (Saharia et al. 2022).

    ``make_condition(x0, generator) -> c`` (B, C_c, H, W) draws the condition of each
    training image, for instance ``A^+ (A x0 + sigma n)``, the upsampled noisy low-resolution
    copy, for super-resolution. It should draw any randomness from ``generator``, so a seed
    fixes a run. Pass an instance as ``loss`` to :func:`~diffusion_lib.training.train`; the
    model is called as ``model(x_t, t, c)``, or ``model(x_t, t, c, labels)`` with labels.

    With ``condition_dropout`` = p > 0, each sample's condition is replaced by zeros, the null
    condition, with probability p: the same network then also learns ``eps_theta(x_t, 0, t)``,
    which classifier-free guidance needs (Ho & Salimans 2021; :func:`with_condition`). Zeros
    are what InstructPix2Pix (Brooks et al. 2023) drops an image condition to.
    """

    def __init__(self, make_condition: MakeCondition, condition_dropout: float = 0.0) -> None:
        if not callable(make_condition):
            raise ValueError(
                "make_condition must be a callable make_condition(x0, generator) -> condition, "
                f"got {type(make_condition).__name__}"
            )
        self.make_condition = make_condition
        self.condition_dropout = check_number(
            "condition_dropout", condition_dropout, 0.0, 1.0, low_open=False
        )

    def __call__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        x0: Tensor,
        *,
        noise: Tensor | None = None,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``mean ||eps - eps_theta(x_t, c, t)||^2`` over a batch ``x0`` (B, C, H, W): a scalar."""
        with torch.no_grad():
            condition = self.make_condition(x0, generator)
        _check_condition(condition, x0)
        if self.condition_dropout > 0:
            condition = _drop_conditions(condition, self.condition_dropout, generator)
        t, noise, x_t = _noisy_batch(schedule, x0, None, noise, generator)
        output = _predict(model, x_t, t, condition, labels)
        check_same_shape("the model's output", output, "x0", x0)
        return F.mse_loss(output.float(), noise.float())


class ConditionBound(nn.Module):
    """``model(x_t, t, condition)`` with the conditions fixed: a noise predictor ``(x_t, t)``
    that the samplers can use. Made by :func:`with_condition`."""

    def __init__(self, model: nn.Module, condition: Tensor, guidance: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.condition = condition
        self.guidance = check_number("guidance", guidance, 0.0, low_open=False)

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if x_t.shape[0] != self.condition.shape[0]:
            raise ValueError(
                f"the sampler asked for {x_t.shape[0]} images but {self.condition.shape[0]} "
                "conditions are bound: draw one sample per condition (repeat a condition for "
                "several draws), and guide through with_condition(..., guidance=w) rather "
                "than the sampler's own guidance"
            )
        condition = self.condition.to(device=x_t.device, dtype=x_t.dtype)
        if self.guidance == 0:
            return _predict(self.model, x_t, t, condition, labels)
        # One batch for both estimates: (1 + w) eps(x_t, c) - w eps(x_t, 0) (Ho & Salimans 2021).
        doubled = torch.cat([condition, torch.zeros_like(condition)])
        both = _predict(
            self.model,
            x_t.repeat(2, *([1] * (x_t.dim() - 1))),
            t.repeat(2),
            doubled,
            None if labels is None else labels.repeat(2),
        )
        conditional, unconditional = both.chunk(2)
        return (1 + self.guidance) * conditional - self.guidance * unconditional


def with_condition(model: nn.Module, condition: Tensor, guidance: float = 0.0) -> ConditionBound:
    """Fix the conditions ``condition`` (B, C_c, H, W) of an image-conditioned model.

    The result is called as ``(x_t, t)`` like an unconditional noise predictor, so
    ``ddpm_sample(with_condition(model, c), schedule, (B, C, H, W))`` draws one image per
    condition from ``p(x_0 | c)``. With ``guidance`` = w > 0 it returns the classifier-free
    guided estimate ``(1 + w) eps_theta(x_t, c, t) - w eps_theta(x_t, 0, t)`` (Ho & Salimans
    2021), for a model trained with ``ImageConditionedLoss(..., condition_dropout > 0)``.
    """
    if not isinstance(condition, Tensor) or condition.dim() < 2:
        raise ValueError(
            "condition must be a batch of condition images (B, C_c, H, W), got "
            f"{getattr(condition, 'shape', type(condition).__name__)}"
        )
    return ConditionBound(model, condition, guidance)
