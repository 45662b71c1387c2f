"""A convolutional U-net with residual blocks and self-attention: the DDPM noise predictor.

The layout follows the U-net of Ronneberger et al. (2015): a contracting path that halves
the resolution level by level, an expanding path that doubles it back, and skip connections
that concatenate each contracting feature map onto the expanding path at the same
resolution. The building blocks follow Ho et al. (2020, appendix B), scaled down for 28x28
and 32x32 images: residual blocks with GroupNorm and SiLU into which a projection of the
timestep embedding is added, and self-attention at the low resolutions, where a pixel's
receptive field is still too small to see the whole image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.models.autoencoder import check_image_batch, check_out_channels
from diffusion_lib.models.embeddings import TimeEmbedding, embed_labels
from diffusion_lib.validation import check_model_times, check_positive_int, check_tuple


def _zero_init(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResidualBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))) + P tau)))`` (Ho et al. 2020, appendix B).

    ``P tau`` is a linear projection of the (SiLU-activated) time embedding, one value per
    channel, broadcast over the image. A 1x1 convolution matches the channels of the skip
    path when they change. The second convolution starts at zero, so each block starts as
    the identity and the deep network starts as a shallow one.

    Shapes: ``x`` (B, in_channels, H, W), ``time_features`` (B, time_dim) ->
    (B, out_channels, H, W).
    """

    def __init__(
        self, in_channels: int, out_channels: int, time_dim: int, dropout: float, groups: int
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_projection = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor, time_features: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_projection(time_features)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H * W positions of a feature map, with a residual.

    Each pixel is a token of ``channels`` features (Vaswani et al. 2017, sec. 3.2); the
    attention itself is :func:`torch.nn.functional.scaled_dot_product_attention`, which picks
    a fused kernel where one is available. The output projection starts at zero, so the block
    starts as the identity.

    Shapes: ``x`` (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        if channels % check_positive_int("num_heads", num_heads):
            raise ValueError(
                f"num_heads={num_heads} must divide the {channels} channels of every attention layer"
            )
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.output = _zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        # (B, H*W, C) tokens are a view of a channels_last tensor, so no copy is made there.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        head_dim = channels // self.num_heads
        qkv = self.qkv(tokens).reshape(batch, height * width, 3, self.num_heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, H*W, d)
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(1, 2).reshape(batch, height * width, channels)
        out = self.output(attended).transpose(1, 2).reshape(batch, channels, height, width)
        return x + out


class CrossAttention(nn.Module):
    """Multi-head attention from the H * W pixels of a feature map to a sequence of context
    tokens, with a residual: how a text-to-image U-net reads its caption (Rombach et al. 2022,
    sec. 3.3, eq. 3).

    Queries are projections of the normalised pixels; keys and values are projections of the
    context tokens ``tau(y)``, so ``softmax(Q K^T / sqrt(d)) V`` gives every pixel its own
    mixture of the tokens. ``context_mask`` marks the tokens that take part (True) and those
    that are padding (False). With a single context token the softmax is 1 and every pixel
    receives the same vector, ``W_o (W_v c + b_v) + b_o``: the global conditioning of an
    added embedding. The output projection starts at zero, so the block starts as the identity.

    Shapes: ``x`` (B, C, H, W), ``context`` (B, L, context_dim), ``context_mask`` (B, L) bool
    or None -> (B, C, H, W).
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int, groups: int) -> None:
        super().__init__()
        if channels % check_positive_int("num_heads", num_heads):
            raise ValueError(
                f"num_heads={num_heads} must divide the {channels} channels of every attention layer"
            )
        self.num_heads = num_heads
        self.context_dim = context_dim
        self.norm = nn.GroupNorm(groups, channels)
        self.query = nn.Linear(channels, channels)
        self.key_value = nn.Linear(context_dim, 2 * channels)
        self.output = _zero_init(nn.Linear(channels, channels))

    def _heads(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, heads, H*W, d) of the pixels; keys and values (B, heads, L, d)."""
        batch, channels, height, width = x.shape
        head_dim = channels // self.num_heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        query = self.query(tokens).reshape(batch, height * width, self.num_heads, head_dim)
        key_value = self.key_value(context).reshape(batch, -1, 2, self.num_heads, head_dim)
        key, value = key_value.permute(2, 0, 3, 1, 4).unbind(0)
        return query.transpose(1, 2), key, value

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        batch, channels, height, width = x.shape
        query, key, value = self._heads(x, context)
        mask = None if context_mask is None else context_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(query, key, value, mask)
        attended = attended.transpose(1, 2).reshape(batch, height * width, channels)
        out = self.output(attended).transpose(1, 2).reshape(batch, channels, height, width)
        return x + out

    def attention_weights(
        self, x: Tensor, context: Tensor, context_mask: Tensor | None = None
    ) -> Tensor:
        """``softmax(Q K^T / sqrt(d))``: how much each pixel reads each token,
        (B, heads, H*W, L), zero for padding; each row sums to 1."""
        query, key, _ = self._heads(x, context)
        scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
        if context_mask is not None:
            scores = scores.masked_fill(~context_mask[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling then a 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """A residual block optionally followed by self-attention and, in a network with a
    ``context_dim``, cross-attention to the context; the unit both paths are made of."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_dim: int,
        dropout: float,
        groups: int,
        attention: bool,
        num_heads: int,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.block = ResidualBlock(in_channels, out_channels, time_dim, dropout, groups)
        self.attention = SelfAttention(out_channels, num_heads, groups) if attention else None
        self.cross_attention = (
            CrossAttention(out_channels, context_dim, num_heads, groups)
            if attention and context_dim is not None
            else None
        )

    def forward(
        self,
        x: Tensor,
        time_features: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        h = self.block(x, time_features)
        if self.attention is not None:
            h = self.attention(h)
        if self.cross_attention is not None:
            h = self.cross_attention(h, context, context_mask)
        return h


class AttentionUNet(nn.Module):
    """Convolutional U-net noise predictor ``eps_theta(x_t, t[, labels])``.

    The architecture of Ho et al. (2020, appendix B), itself a PixelCNN++-style version of
    the U-net of Ronneberger et al. (2015), scaled down. For the defaults and 28x28 images::

        3x3 conv ->  28x28: 2 x Res                 (32 ch) -> down
                 ->  14x14: 2 x (Res + Attention)  (64 ch) -> down
                 ->   7x7:  2 x (Res + Attention)  (64 ch)
        middle    ->  7x7:  Res, Attention, Res
        up path   ->  mirror image with 3 blocks per level, each reading the concatenation
                      of the previous output and the matching skip activation
        GroupNorm -> SiLU -> 3x3 conv (zero-initialised) -> eps

    Every residual block adds a projection of the time embedding (sinusoidal features of t
    through an MLP, :class:`~diffusion_lib.models.embeddings.TimeEmbedding`). With ``num_classes`` set, a learned label
    embedding is added to the time embedding first. The table has ``num_classes + 1`` rows:
    row ``null_label = num_classes`` stands for "no label", which classifier-free guidance
    (Ho & Salimans 2021) trains by dropping labels and uses at sampling time.

    With ``context_dim`` set, every stage that has self-attention (and the middle) also has
    a :class:`CrossAttention` layer to a sequence of context tokens, such as an encoded
    caption, given as ``forward(x_t, t, context=..., context_mask=...)``: the conditioning
    of Stable Diffusion's U-net (Rombach et al. 2022), used by
    :class:`~diffusion_lib.text_conditioning.TextConditionedUNet`.

    Args:
        image_size: H = W; must be divisible by 2 ** (len(channel_multipliers) - 1).
        channels: image channels C (1 for MNIST, 3 for colour).
        base_channels: channels of the first level; level i has base * channel_multipliers[i].
        channel_multipliers: one entry per resolution level.
        num_res_blocks: residual blocks per level on the contracting path (one more on the
            expanding path, which also consumes the downsampling layer's skip).
        attention_resolutions: resolutions (side lengths) that get self-attention after each
            residual block. ``None`` means every level below the full resolution, e.g.
            (14, 7) for 28x28 and (16, 8) for 32x32. The middle always has attention.
        dropout: dropout rate inside the residual blocks.
        num_classes: number of class labels for conditioning, or ``None`` for unconditional.
        timesteps: T; used only to check that ``t`` lies in 0..T-1.
        num_heads: attention heads; must divide the channels of every attention level.
        norm_groups: GroupNorm groups; must divide the channels of every level.
        out_channels: channels of the output; ``None`` means C. ``2 C`` gives the noise and a
            learned variance (see :mod:`diffusion_lib.learned_variance`).
        context_dim: width of the context tokens the attention stages cross-attend to, or
            ``None`` for a network without cross-attention.

    Shapes: ``forward(x_t, t, labels=None, context=None, context_mask=None)`` with ``x_t``
    (B, C, H, W), ``t`` (B,) int64, ``labels`` (B,) int64 in 0..num_classes, ``context``
    (B, L, context_dim) and ``context_mask`` (B, L) bool (True for the tokens that take part)
    -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        image_size: int = 28,
        channels: int = 1,
        base_channels: int = 32,
        channel_multipliers: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] | None = None,
        dropout: float = 0.0,
        num_classes: int | None = None,
        timesteps: int = 1000,
        num_heads: int = 4,
        norm_groups: int = 8,
        out_channels: int | None = None,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.image_size = check_positive_int("image_size", image_size)
        self.channels = check_positive_int("channels", channels)
        self.out_channels = check_out_channels(out_channels, channels)
        self.timesteps = check_positive_int("timesteps", timesteps)
        check_positive_int("num_res_blocks", num_res_blocks)
        level_channels = _level_channels(base_channels, channel_multipliers, norm_groups)
        self.resolutions = _resolutions(image_size, len(level_channels))
        self.attention_resolutions = _attention_resolutions(attention_resolutions, self.resolutions)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.num_classes = _optional_positive_int("num_classes", num_classes)
        self.context_dim = _optional_positive_int("context_dim", context_dim)

        self.time_embedding = TimeEmbedding(base_channels, 4 * base_channels)
        time_dim = self.time_embedding.out_dim
        self.label_embedding = (
            nn.Embedding(num_classes + 1, time_dim) if num_classes is not None else None
        )

        def stage(n_in: int, n_out: int, resolution: int) -> _Stage:
            attention = resolution in self.attention_resolutions
            return _Stage(
                n_in, n_out, time_dim, dropout, norm_groups, attention, num_heads, context_dim
            )

        self.input_conv = nn.Conv2d(channels, base_channels, 3, padding=1)
        self.down, skip_channels = _contracting_path(
            stage, base_channels, level_channels, self.resolutions, num_res_blocks
        )
        width = level_channels[-1]
        self.middle = nn.ModuleList(
            [
                _Stage(width, width, time_dim, dropout, norm_groups, True, num_heads, context_dim),
                _Stage(width, width, time_dim, dropout, norm_groups, False, num_heads),
            ]
        )
        # Channels of each contracting-path activation the expanding path reads back, in
        # the order they are stored: what a ControlNet's residuals must match.
        self.skip_channels = tuple(skip_channels)
        self.up = _expanding_path(
            stage, level_channels, self.resolutions, num_res_blocks, list(skip_channels)
        )

        # The last convolution starts at zero so the untrained model predicts eps = 0, the
        # mean of the noise it must predict: the first loss is then exactly E||eps||^2 = 1
        # per dimension rather than a random network's much larger error, and early
        # gradients do not have to undo a random output first.
        self.output = nn.Sequential(
            nn.GroupNorm(norm_groups, level_channels[0]),
            nn.SiLU(),
            _zero_init(nn.Conv2d(level_channels[0], self.out_channels, 3, padding=1)),
        )

    @property
    def null_label(self) -> int:
        """The label index that means "no label" (``num_classes``); only for conditional models."""
        if self.num_classes is None:
            raise AttributeError(
                "an unconditional AttentionUNet (num_classes=None) has no null_label"
            )
        return self.num_classes

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        labels: Tensor | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict the noise in ``x_t`` (B, C, H, W) at 0-based timesteps ``t`` (B,).

        ``t`` may also hold real times in [0, T]: a velocity model of a
        :class:`~diffusion_lib.flow_matching.RectifiedFlow` is called with ``1000 t``.
        ``context`` and ``context_mask`` are given exactly when the network has a
        ``context_dim``.
        """
        context_options = {"context": context, "context_mask": context_mask}
        h, skips, time_features = self.encode(x_t, t, labels, **context_options)
        return self.decode(h, skips, time_features, **context_options)

    def encode(
        self,
        x_t: Tensor,
        t: Tensor,
        labels: Tensor | None = None,
        *,
        input_residual: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], Tensor]:
        """The contracting path and the middle: ``(h, skips, time_features)``.

        ``h`` is the middle's output, ``skips`` the activations the expanding path
        concatenates back, with ``self.skip_channels`` channels, and ``time_features`` the
        activated time (and label) embedding (B, time_dim). ``input_residual``
        (B, base_channels, H, W) is added to the first convolution's output: where a
        ControlNet feeds its encoded condition in (Zhang, Rao & Agrawala 2023). ``context``
        and ``context_mask`` go to the cross-attention layers, as in :meth:`forward`.
        """
        check_image_batch(
            type(self).__name__,
            x_t,
            self.channels,
            self.image_size,
            weights_dtype=self.input_conv.weight.dtype,
        )
        if not torch.compiler.is_compiling():
            self._check_context(context, context_mask, x_t.shape[0])
        if not torch.compiler.is_compiling():
            # Range checks read t's values; skip them on accelerators to avoid a sync per step.
            check_model_times(t, self.timesteps, x_t.shape[0], values=None)
        embedding = self.time_embedding(t)
        label_embedding = embed_labels(self.label_embedding, labels, x_t.shape[0], x_t.device, self)
        if label_embedding is not None:
            embedding = embedding + label_embedding
        time_features = F.silu(embedding)

        h = self.input_conv(x_t)
        if input_residual is not None:
            h = h + input_residual
        skips = [h]
        for module in self.down:
            is_stage = isinstance(module, _Stage)
            h = module(h, time_features, context, context_mask) if is_stage else module(h)
            skips.append(h)
        for module in self.middle:
            h = module(h, time_features, context, context_mask)
        return h, skips, time_features

    def _check_context(self, context: Tensor | None, mask: Tensor | None, batch: int) -> None:
        """Raise ``ValueError`` unless the context fits this network and the batch."""
        if self.context_dim is None:
            if context is not None or mask is not None:
                raise ValueError(
                    "this AttentionUNet has no cross-attention (context_dim=None) and takes no "
                    "context; build it with context_dim=... to condition on a token sequence"
                )
            return
        if context is None:
            raise ValueError(
                f"this AttentionUNet cross-attends to a context (context_dim={self.context_dim}): "
                f"pass context=(B, L, {self.context_dim}) tokens, e.g. an encoded caption"
            )
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.context_dim:
            raise ValueError(
                f"context must have shape ({batch}, L, {self.context_dim}), got "
                f"{tuple(context.shape)}"
            )
        if mask is not None and (mask.dtype != torch.bool or mask.shape != context.shape[:2]):
            raise ValueError(
                f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])} (True "
                f"for the tokens that take part), got {mask.dtype} {tuple(mask.shape)}"
            )
        # Reading the mask's values would make an accelerator wait; check them on a CPU only.
        if mask is not None and mask.device.type == "cpu" and not bool(mask.any(dim=1).all()):
            raise ValueError("context_mask must keep at least one token of every sample")

    def drop_expanding_path(self) -> AttentionUNet:
        """Remove the expanding path and the output layer in place and return the network,
        for a module that only reads :meth:`encode`: a ControlNet's copy, a classifier's
        encoder. The middle's output then has ``skip_channels[-1]`` channels."""
        self.up = nn.ModuleList()
        self.output = nn.Identity()
        return self

    def decode(
        self,
        h: Tensor,
        skips: list[Tensor],
        time_features: Tensor,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """The expanding path: from :meth:`encode`'s outputs to the noise estimate
        (B, out_channels, H, W). ``skips`` is consumed from the end, deepest first; the
        context is the one given to :meth:`encode`."""
        if not self.up:
            raise ValueError(
                "this AttentionUNet's expanding path was dropped (drop_expanding_path), so it "
                "can only encode; call encode(x_t, t) for its features"
            )
        skips = list(skips)
        for module in self.up:
            if isinstance(module, _Stage):
                h = torch.cat([h, skips.pop()], dim=1)
                h = module(h, time_features, context, context_mask)
            else:
                h = module(h)
        return self.output(h)


def _level_channels(
    base_channels: int, channel_multipliers: tuple[int, ...], norm_groups: int
) -> list[int]:
    """The channels of each resolution level, ``base_channels * m`` for each multiplier m,
    checked: at least one level, and ``norm_groups`` dividing every level's channels."""
    check_positive_int("base_channels", base_channels)
    channel_multipliers = check_tuple("channel_multipliers", channel_multipliers, "(1, 2, 2)")
    if not channel_multipliers:
        raise ValueError("channel_multipliers must hold at least one level, e.g. (1, 2, 2)")
    level_channels = [
        base_channels * check_positive_int("channel_multipliers", m) for m in channel_multipliers
    ]
    check_positive_int("norm_groups", norm_groups)
    if any(c % norm_groups for c in level_channels):
        raise ValueError(
            f"norm_groups={norm_groups} must divide the channels of every level, {level_channels}"
        )
    return level_channels


def _optional_positive_int(name: str, value: int | None) -> int | None:
    return None if value is None else check_positive_int(name, value)


def _contracting_path(
    stage: Callable[[int, int, int], nn.Module],
    base_channels: int,
    level_channels: list[int],
    resolutions: list[int],
    num_res_blocks: int,
) -> tuple[nn.ModuleList, list[int]]:
    """The down path: ``num_res_blocks`` stages per level, then a downsampling layer on every
    level but the last. Returns the layers and the channels of every activation they keep as
    a skip connection, starting with the input convolution's (``base_channels``)."""
    layers, skip_channels, width = nn.ModuleList(), [base_channels], base_channels
    for level, resolution in enumerate(resolutions):
        for _ in range(num_res_blocks):
            layers.append(stage(width, level_channels[level], resolution))
            width = level_channels[level]
            skip_channels.append(width)
        if level < len(level_channels) - 1:
            layers.append(Downsample(width))
            skip_channels.append(width)
    return layers, skip_channels


def _expanding_path(
    stage: Callable[[int, int, int], nn.Module],
    level_channels: list[int],
    resolutions: list[int],
    num_res_blocks: int,
    skip_channels: list[int],
) -> nn.ModuleList:
    """The up path, the down path's mirror image: ``num_res_blocks + 1`` stages per level, each
    reading the previous output concatenated with the last skip not yet consumed, then an
    upsampling layer on every level but the first. Consumes ``skip_channels``."""
    layers, width = nn.ModuleList(), level_channels[-1]
    for level in reversed(range(len(level_channels))):
        for _ in range(num_res_blocks + 1):
            layers.append(
                stage(width + skip_channels.pop(), level_channels[level], resolutions[level])
            )
            width = level_channels[level]
        if level > 0:
            layers.append(Upsample(width))
    return layers


def _resolutions(image_size: int, levels: int) -> list[int]:
    """Side lengths of the levels, halving each time: 28, 14, 7 for three levels."""
    divisor = 2 ** (levels - 1)
    if image_size % divisor:
        raise ValueError(
            f"image_size={image_size} cannot be halved {levels - 1} times "
            f"({levels} channel_multipliers levels); use a multiple of {divisor}"
        )
    return [image_size // 2**level for level in range(levels)]


def _attention_resolutions(
    requested: tuple[int, ...] | None, resolutions: list[int]
) -> tuple[int, ...]:
    if requested is None:
        return tuple(resolutions[1:])
    requested = check_tuple("attention_resolutions", requested, "(14, 7), or None")
    unknown = [r for r in requested if r not in resolutions]
    if unknown:
        raise ValueError(
            f"attention_resolutions {unknown} are not resolutions of this model; "
            f"choose from {', '.join(map(str, resolutions))}"
        )
    return tuple(requested)
