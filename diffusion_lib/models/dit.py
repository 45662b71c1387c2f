"""A Diffusion Transformer (DiT): the noise predictor as a vision transformer over patches.

Peebles & Xie (2023) replace the U-net by a plain transformer. The image is cut into
non-overlapping ``p x p`` patches, each patch becomes a token (a linear map of its pixels plus
a fixed 2-D sine-cosine position embedding), a stack of transformer blocks mixes the tokens
with global self-attention, and a final linear layer turns every token back into its patch of
predicted noise. The timestep (and optionally a class label) enters every block through
*adaptive layer norm* (adaLN): a shift, a scale and a gate regressed from the conditioning
vector. In the adaLN-Zero variant the gates start at zero, so every residual block starts as the
identity and the untrained network predicts eps = 0 (Peebles & Xie 2023, sec. 3.2, fig. 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.models.attention_unet import _zero_init
from diffusion_lib.models.autoencoder import check_image_batch, check_out_channels
from diffusion_lib.models.embeddings import TimeEmbedding, embed_labels, sinusoidal_embedding
from diffusion_lib.validation import check_model_times, check_number, check_positive_int


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping patches, one token per patch, in row-major order.

    ``images`` (B, C, H, W) -> (B, (H/p) * (W/p), p * p * C); each token lists its patch's
    pixels row by row, the C channels of a pixel together (Peebles & Xie 2023, sec. 3.2).
    """
    batch, channels, height, width = images.shape
    p = patch_size
    grid = images.reshape(batch, channels, height // p, p, width // p, p)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), -1)


def unpatchify(tokens: Tensor, patch_size: int, channels: int, image_size: int) -> Tensor:
    """The inverse of :func:`patchify`: (B, N, p * p * C) -> (B, C, image_size, image_size)."""
    batch = tokens.shape[0]
    p, side = patch_size, image_size // patch_size
    grid = tokens.reshape(batch, side, side, p, p, channels)
    return grid.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, image_size, image_size)


def sincos_position_embedding(grid_size: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings of a ``grid_size x grid_size`` grid of patches.

    The token in row ``i`` and column ``j`` (index ``i * grid_size + j``) gets
    ``[sinusoidal(i, dim / 2), sinusoidal(j, dim / 2)]``: half of its features encode the row
    and half the column, each with the 1-D embedding of Vaswani et al. (2017, sec. 3.5) in the
    sines-then-cosines order of :func:`~diffusion_lib.models.embeddings.sinusoidal_embedding`. DiT uses these fixed embeddings
    (Peebles & Xie 2023, sec. 3.2) as did the masked autoencoders of He et al. (2022).

    Returns (grid_size ** 2, dim) float32; ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"the position embedding needs a width divisible by 4, got {dim}")
    positions = torch.arange(grid_size)
    rows = positions.repeat_interleave(grid_size)
    columns = positions.repeat(grid_size)
    return torch.cat(
        [sinusoidal_embedding(rows, dim // 2), sinusoidal_embedding(columns, dim // 2)], dim=1
    )


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN's affine map ``x (1 + scale) + shift``: tokens (B, N, D), shift and scale (B, D).

    Writing the scale as ``1 + scale`` makes a zero regression output the identity.
    """
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over tokens (Vaswani et al. 2017, sec. 3.2.2).

    Shapes: ``tokens`` (B, N, D) -> (B, N, D). The attention itself is
    :func:`torch.nn.functional.scaled_dot_product_attention`.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)

    def forward(self, tokens: Tensor) -> Tensor:
        batch, length, width = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.output(attended.transpose(1, 2).reshape(batch, length, width))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, sec. 3.2, fig. 3).

    From the conditioning vector ``c`` a linear layer regresses six vectors, a shift, scale and
    gate for each of the two sub-layers::

        x = x + gate_1 * Attention(modulate(LN(x), shift_1, scale_1))
        x = x + gate_2 * MLP(modulate(LN(x), shift_2, scale_2))

    The layer norms have no learned affine parameters: adaLN supplies them, per sample. In a
    :class:`~diffusion_lib.models.dit.DiffusionTransformer` the regression layer starts at zero
    (adaLN-Zero), so every gate is zero and the block starts as the identity.

    Shapes: ``tokens`` (B, N, D), ``condition`` (B, D) -> (B, N, D).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        mlp_width = int(hidden_size * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attention = MultiHeadSelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_width),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_width, hidden_size),
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, tokens: Tensor, condition: Tensor) -> Tensor:
        shift_1, scale_1, gate_1, shift_2, scale_2, gate_2 = self.modulation(condition).chunk(6, 1)
        attended = self.attention(modulate(self.norm1(tokens), shift_1, scale_1))
        tokens = tokens + gate_1[:, None, :] * attended
        transformed = self.mlp(modulate(self.norm2(tokens), shift_2, scale_2))
        return tokens + gate_2[:, None, :] * transformed


class FinalLayer(nn.Module):
    """adaLN (shift and scale, no gate) then a linear map from each token to its patch's noise.

    Shapes: ``tokens`` (B, N, D), ``condition`` (B, D) -> (B, N, p * p * C). In a
    :class:`~diffusion_lib.models.dit.DiffusionTransformer` its modulation and linear layers
    start at zero (Peebles & Xie 2023, sec. 3.2), so the untrained model predicts eps = 0.
    """

    def __init__(self, hidden_size: int, patch_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_dim)

    def forward(self, tokens: Tensor, condition: Tensor) -> Tensor:
        shift, scale = self.modulation(condition).chunk(2, dim=1)
        return self.linear(modulate(self.norm(tokens), shift, scale))


class DiffusionTransformer(nn.Module):
    """Transformer noise predictor ``eps_theta(x_t, t[, labels])`` (Peebles & Xie 2023).

    The pipeline of their fig. 3, sized for 28x28 digits::

        x_t (B, C, 28, 28) -> patchify, linear      -> (B, N, D) tokens, N = (28 / p)^2
                           + fixed 2-D sin-cos position embeddings
        c = TimeEmbedding(t) [+ label embedding]     (B, D)
        depth x DiTBlock(tokens, c)                  adaLN-Zero, global self-attention
        FinalLayer(tokens, c) -> unpatchify          -> eps (B, C, 28, 28)

    With ``num_classes`` set, a learned label embedding is added to the time embedding. Its
    table has ``num_classes + 1`` rows; row ``null_label = num_classes`` means "no label", which
    classifier-free guidance (Ho & Salimans 2021) trains by dropping labels.

    Args:
        image_size: H = W; must be divisible by ``patch_size``.
        channels: image channels C.
        patch_size: side p of the square patches; the sequence has (image_size / p)^2 tokens.
        hidden_size: token width D; divisible by 4 (position embedding) and by ``num_heads``.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: width of each block's MLP as a multiple of D (4 in the paper).
        num_classes: number of class labels for conditioning, or ``None`` for unconditional.
        timesteps: T; used only to check that ``t`` lies in 0..T-1.
        out_channels: channels of the output; ``None`` means C. ``2 C`` gives the noise and a
            learned variance, as the paper trains (see :mod:`diffusion_lib.learned_variance`).

    Shapes: ``forward(x_t, t, labels=None)`` with ``x_t`` (B, C, H, W), ``t`` (B,) int64 (or
    real times in [0, T]) and ``labels`` (B,) int64 in 0..num_classes -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        image_size: int = 28,
        channels: int = 1,
        patch_size: int = 4,
        hidden_size: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        timesteps: int = 1000,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.image_size = check_positive_int("image_size", image_size)
        self.channels = check_positive_int("channels", channels)
        self.out_channels = check_out_channels(out_channels, channels)
        self.patch_size = check_positive_int("patch_size", patch_size)
        self.timesteps = check_positive_int("timesteps", timesteps)
        self.depth = check_positive_int("depth", depth)
        _check_widths(image_size, patch_size, hidden_size, num_heads)
        check_number("mlp_ratio", mlp_ratio, 0.0, low_open=True)
        self.num_classes = (
            None if num_classes is None else check_positive_int("num_classes", num_classes)
        )
        self.grid_size = image_size // patch_size
        patch_dim = patch_size * patch_size * channels

        self.patch_embedding = nn.Linear(patch_dim, hidden_size)
        self.register_buffer(
            "position_embedding",
            sincos_position_embedding(self.grid_size, hidden_size),
            persistent=False,
        )
        self.time_embedding = TimeEmbedding(hidden_size, hidden_size)
        self.label_embedding = (
            nn.Embedding(num_classes + 1, hidden_size) if num_classes is not None else None
        )
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self._initialise()

    def _initialise(self) -> None:
        """Xavier-uniform linear layers with zero biases, then adaLN-Zero: every modulation
        layer and the final linear layer at zero (Peebles & Xie 2023, sec. 3.2)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            _zero_init(block.modulation)
        _zero_init(self.final_layer.modulation)
        _zero_init(self.final_layer.linear)

    @property
    def num_tokens(self) -> int:
        """Sequence length N = (image_size / patch_size)^2."""
        return self.grid_size**2

    @property
    def null_label(self) -> int:
        """The label index that means "no label" (``num_classes``); only for conditional models."""
        if self.num_classes is None:
            raise AttributeError(
                "an unconditional DiffusionTransformer (num_classes=None) has no null_label"
            )
        return self.num_classes

    def condition(self, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """The conditioning vector ``c`` (B, D): time embedding plus label embedding."""
        embedding = self.time_embedding(t)
        label_embedding = embed_labels(self.label_embedding, labels, t.shape[0], t.device, self)
        return embedding if label_embedding is None else embedding + label_embedding

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predict the noise in ``x_t`` (B, C, H, W) at timesteps ``t`` (B,)."""
        check_image_batch(
            type(self).__name__,
            x_t,
            self.channels,
            self.image_size,
            weights_dtype=self.patch_embedding.weight.dtype,
        )
        if not torch.compiler.is_compiling():
            # Range checks read t's values; skip them on accelerators to avoid a sync per step.
            check_model_times(t, self.timesteps, x_t.shape[0], values=None)
        condition = self.condition(t, labels)
        tokens = self.patch_embedding(patchify(x_t, self.patch_size))
        tokens = tokens + self.position_embedding.to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, condition)
        patches = self.final_layer(tokens, condition)
        return unpatchify(patches, self.patch_size, self.out_channels, self.image_size)


def _check_widths(image_size: int, patch_size: int, hidden_size: int, num_heads: int) -> None:
    """Raise ``ValueError`` unless patches tile the image and the heads and position
    embedding split the token width evenly."""
    if image_size % patch_size:
        raise ValueError(
            f"patch_size={patch_size} must divide image_size={image_size} so that the patches "
            "tile the image"
        )
    check_positive_int("hidden_size", hidden_size)
    check_positive_int("num_heads", num_heads)
    if hidden_size % num_heads:
        raise ValueError(
            f"num_heads={num_heads} must divide hidden_size={hidden_size}, "
            "so that every head gets the same width"
        )
    if hidden_size % 4:
        raise ValueError(
            f"hidden_size={hidden_size} must be divisible by 4: the 2-D position embedding "
            "gives a sine and a cosine half to each of the two axes"
        )
