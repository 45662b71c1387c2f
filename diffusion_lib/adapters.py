"""Low-rank adaptation (LoRA): fine-tune a frozen network through small trainable corrections.

Hu et al. (2022) keep a pre-trained weight W (out, in) fixed and learn its change as a product
of two thin matrices, ``W' = W + (alpha / r) B A`` with ``A`` (r, in), ``B`` (out, r) and a
rank r far below both sides (their eq. 3). ``B`` starts at zero, so the adapted network starts
as the pre-trained one exactly; only ``r (in + out)`` numbers per layer train, and the update is
stored apart from the model and can be scaled, switched off or folded into ``W``.

A convolution with kernel k x k is adapted the same way (as in diffusers and LyCORIS): ``A`` is
a k x k convolution to r channels with the layer's stride and padding, ``B`` a 1 x 1 convolution
back to the output channels, so the update of the flattened kernel ``W (out, in k k)`` is again
``B A`` with rank at most r.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from diffusion_lib.validation import check_number, check_positive_int


def _check_rank_and_alpha(rank: int, alpha: float) -> tuple[int, float]:
    return check_positive_int("rank", rank), check_number("alpha", alpha, 0.0, low_open=True)


class _LowRankUpdate(nn.Module):
    """A frozen layer ``base`` plus ``multiplier * (alpha / r) up(down(x))``; ``up`` starts at zero."""

    def __init__(self, base: nn.Module, down: nn.Module, up: nn.Module, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = down
        self.up = up
        nn.init.zeros_(self.up.weight)
        self.rank = self.up.weight.shape[1]
        self.scale = alpha / self.rank
        self.multiplier = 1.0  # set_lora_scale's knob: 0 is the base layer, 1 the adapted one

    @property
    def weight(self) -> Tensor:
        """The frozen base weight, for code that reads a layer's weight (its dtype, device)."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.multiplier * self.scale) * self.up(self.down(x))

    def delta_weight(self) -> Tensor:
        """``multiplier * (alpha / r) B A``, shaped like the base weight."""
        update = self.up.weight.flatten(1) @ self.down.weight.flatten(1)  # (out, r) @ (r, in...)
        return (self.multiplier * self.scale * update).view_as(self.base.weight)

    def merged(self) -> nn.Module:
        """A plain copy of the base layer with weight W + delta_weight() and the same bias."""
        layer = copy.deepcopy(self.base)
        with torch.no_grad():
            layer.weight += self.delta_weight()
        return layer


class LoRALinear(_LowRankUpdate):
    """``y = x W^T + b + (alpha / r) x A^T B^T`` around a frozen :class:`torch.nn.Linear`.

    ``x``: (..., in_features) -> (..., out_features). ``down`` holds A (r, in), drawn like a
    fresh linear layer's weight; ``up`` holds B (out, r), zero, so the first output equals the
    base layer's (Hu et al. 2022, sec. 4.1).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        rank, alpha = _check_rank_and_alpha(rank, alpha)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        down = nn.Linear(base.in_features, rank, bias=False, **factory)
        up = nn.Linear(rank, base.out_features, bias=False, **factory)
        super().__init__(base, down, up, alpha)


class LoRAConv2d(_LowRankUpdate):
    """A frozen :class:`torch.nn.Conv2d` plus ``(alpha / r) B(A(x))``: A a k x k convolution to r
    channels with the base's stride, padding and dilation, B a zero 1 x 1 convolution back.

    ``x``: (B, in_channels, H, W) -> (B, out_channels, H', W'), the base layer's shapes. The
    kernel's update, flattened to (out, in k k), is B (out, r) times A (r, in k k).
    """

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float) -> None:
        rank, alpha = _check_rank_and_alpha(rank, alpha)
        if not _ordinary_convolution(base):
            raise ValueError(
                "LoRA adapts ordinary convolutions only (groups=1, padding_mode='zeros'); "
                f"got groups={base.groups}, padding_mode={base.padding_mode!r}"
            )
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        down = nn.Conv2d(
            base.in_channels,
            rank,
            base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            bias=False,
            **factory,
        )
        up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)
        super().__init__(base, down, up, alpha)


def add_lora(
    model: nn.Module,
    rank: int,
    *,
    alpha: float | None = None,
    targets: Iterable[str] | None = None,
) -> list[str]:
    """Freeze every parameter of ``model`` and wrap layers in trainable low-rank adapters, in place.

    Args:
        model: any network; its linear layers and ordinary (groups=1) convolutions can be adapted.
        rank: r, the rank of every update (Hu et al. use 1 to 64; a few suffice for small nets).
        alpha: the update is scaled by alpha / r. With alpha held fixed while r changes, this
            keeps the step size the optimiser needs about the same (Hu et al. 2022, sec. 4.1).
            ``None`` means alpha = r, a factor of 1.
        targets: qualified names of the layers to adapt (as in ``model.named_modules()``), or
            ``None`` for every ``nn.Linear`` and ordinary ``nn.Conv2d`` (exactly those types).

    Returns the names of the adapted layers. Afterwards only the adapters' A and B require
    gradients: pass ``model`` to any training loop and the base weights stay as they were.
    """
    rank = check_positive_int("rank", rank)
    alpha = float(rank) if alpha is None else check_number("alpha", alpha, 0.0, low_open=True)
    if _adapted_layers(model):
        raise ValueError("this model already has LoRA adapters; merge_lora(model) folds them in")
    candidates = {
        name: module
        for name, module in model.named_modules()
        # Exact types: subclasses such as MultiheadAttention's out_proj are read by their parent
        # as weights, never called, so a wrapper around them would be silently bypassed.
        if name and (type(module) is nn.Linear or _ordinary_convolution(module))
    }
    if isinstance(targets, str):
        targets = [targets]
    names = sorted(candidates) if targets is None else list(targets)
    unknown = [name for name in names if name not in candidates]
    if unknown:
        raise ValueError(
            f"cannot adapt {unknown}: targets must name linear layers or ordinary convolutions "
            f"of the model, such as {sorted(candidates)[:4]}"
        )
    if not names:
        raise ValueError("the model has no linear layer or ordinary convolution to adapt")
    model.requires_grad_(False)
    for name in names:
        base = candidates[name]
        wrapper = LoRALinear if isinstance(base, nn.Linear) else LoRAConv2d
        _replace(model, name, wrapper(base, rank, alpha))
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices of every LoRA layer in ``model``, in module order."""
    return [p for _, layer in _adapted_layers(model) for p in (layer.down.weight, layer.up.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapters' weights: what a fine-tuned LoRA model adds to its base model.

    To restore them, adapt the base model with the same rank, alpha and targets, then
    ``model.load_state_dict(adapters, strict=False)``: every other weight is reported missing and
    keeps the base model's value.
    """
    return {
        f"{name}.{part}.weight": getattr(layer, part).weight.detach().clone()
        for name, layer in _adapted_layers(model)
        for part in ("down", "up")
    }


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Multiply every adapter's update by ``scale``: 0 gives the base model, 1 the fine-tuned one,
    values between blend them and values above 1 exaggerate the change.
    """
    scale = check_number("scale", scale, -math.inf, low_open=True)
    layers = _adapted_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA adapters; add_lora(model, rank) adds them")
    for _, layer in layers:
        layer.multiplier = scale


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W <- W + s (alpha / r) B A, in place, with the
    scale s of :func:`~diffusion_lib.adapters.set_lora_scale` (1 unless changed).

    The result has the original architecture (plain linear and convolution layers), runs as fast
    as the base model and loads into it with ``load_state_dict``. Its parameters stay frozen
    as the adapted model's base weights were. Returns ``model``.
    """
    layers = _adapted_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA adapters to merge")
    for name, layer in layers:
        _replace(model, name, layer.merged())
    return model


def _adapted_layers(model: nn.Module) -> list[tuple[str, _LowRankUpdate]]:
    """Every LoRA layer of ``model`` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _LowRankUpdate)]


def _ordinary_convolution(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
