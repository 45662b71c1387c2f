"""A fully connected U-net: the simplest network that can learn to predict noise.

The image is flattened into one vector, fully connected layers compress it (2000 -> 1000 ->
500 features by default) and expand it back to C * H * W numbers. As in the U-net of
Ronneberger et al. (2015), each expanding layer receives the activations of the compressing
layer of the same width; here they are added (a residual connection) rather than
concatenated, so each pair must have equal width. The connections carry the fine detail of
the input past the narrow middle, which a plain autoencoder would have to squeeze through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.models.autoencoder import check_image_batch, check_out_channels
from diffusion_lib.models.embeddings import TimeEmbedding
from diffusion_lib.validation import (
    check_bool,
    check_choice,
    check_model_times,
    check_positive_int,
    check_tuple,
)

TIME_EMBEDDINGS = ("scalar", "sinusoidal")


class _DenseLayer(nn.Module):
    """``SiLU(LayerNorm(W h + b + P tau))``: one hidden layer, with an optional time projection.

    Shapes: ``h`` (B, in_features), ``time_features`` (B, time_dim) or None -> (B, out_features).
    """

    def __init__(
        self, in_features: int, out_features: int, time_dim: int | None, layer_norm: bool
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.time_projection = nn.Linear(time_dim, out_features) if time_dim is not None else None
        self.norm = nn.LayerNorm(out_features) if layer_norm else nn.Identity()

    def forward(self, h: Tensor, time_features: Tensor | None) -> Tensor:
        z = self.linear(h)
        if self.time_projection is not None:
            z = z + self.time_projection(time_features)
        return F.silu(self.norm(z))


class FCUNet(nn.Module):
    """Fully connected U-net noise predictor ``eps_theta(x_t, t)``.

    Layout for ``widths = (w_0, w_1, w_2)``, with ``D = C * H * W``::

        x_t (D) [+ t/T] -> h_0 (w_0) -> h_1 (w_1) -> h_2 (w_2)
                                                       |
        eps (D) <- u_0 (w_0) = f(u_1) + h_0 <- u_1 (w_1) = f(h_2) + h_1

    Each hidden layer is ``Linear -> [LayerNorm] -> SiLU``; the output layer is linear.

    How the network sees the timestep (``time_embedding``):
        ``"scalar"``: one extra input element ``t / T`` (in [0, 1)) appended to the flattened
            image. Cheap and easy to explain, but the network must carve the noise level out
            of a single number that only the first layer sees.
        ``"sinusoidal"``: ``t`` goes through :class:`~diffusion_lib.models.embeddings.TimeEmbedding` (Vaswani et al. 2017
            features, then an MLP), and every hidden layer adds its own linear projection of
            that embedding before its activation, as the blocks of Ho et al.'s U-net do
            (2020, appendix B). Every layer then knows the noise level directly.

    The output layer starts at zero, so the untrained model predicts eps = 0 (see
    :class:`~diffusion_lib.models.attention_unet.AttentionUNet` for why).

    Args:
        image_size: H = W of the images the model is built for.
        channels: C.
        widths: hidden widths from the widest (next to the image) to the narrowest (middle).
        timesteps: T; used to scale ``t`` and to check its range.
        time_embedding: ``"scalar"`` or ``"sinusoidal"``.
        layer_norm: put a LayerNorm before every hidden activation.
        time_embedding_dim: length of the sinusoidal features (``"sinusoidal"`` only).
        out_channels: channels of the output; ``None`` means C. ``2 C`` gives the noise and a
            learned variance (see :mod:`diffusion_lib.learned_variance`).

    Shapes: ``forward(x_t, t)`` with ``x_t`` (B, C, H, W) and ``t`` (B,) int64 in 0..T-1 ->
    (B, out_channels, H, W). The network is unconditional: ``labels`` are refused.
    """

    def __init__(
        self,
        image_size: int = 28,
        channels: int = 1,
        widths: tuple[int, ...] = (2000, 1000, 500),
        timesteps: int = 1000,
        time_embedding: str = "scalar",
        layer_norm: bool = False,
        time_embedding_dim: int = 64,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.image_size = check_positive_int("image_size", image_size)
        self.channels = check_positive_int("channels", channels)
        self.out_channels = check_out_channels(out_channels, channels)
        self.timesteps = check_positive_int("timesteps", timesteps)
        self.time_embedding = check_choice("time_embedding", time_embedding, TIME_EMBEDDINGS)
        self.widths = tuple(
            check_positive_int("widths", width)
            for width in check_tuple("widths", widths, "(2000, 1000, 500)")
        )
        if not self.widths:
            raise ValueError("widths must hold at least one hidden width, e.g. (2000, 1000, 500)")
        self.layer_norm = check_bool("layer_norm", layer_norm)
        pixels = channels * image_size * image_size

        if time_embedding == "sinusoidal":
            self.time_mlp: TimeEmbedding | None = TimeEmbedding(time_embedding_dim)
            time_dim: int | None = self.time_mlp.out_dim
            in_features = pixels
        else:
            self.time_mlp = None
            time_dim = None
            in_features = pixels + 1
        encoder_sizes = zip((in_features, *self.widths[:-1]), self.widths, strict=True)
        self.encoder = nn.ModuleList(
            _DenseLayer(n_in, n_out, time_dim, layer_norm) for n_in, n_out in encoder_sizes
        )
        decoder_widths = self.widths[::-1]
        self.decoder = nn.ModuleList(
            _DenseLayer(n_in, n_out, time_dim, layer_norm)
            for n_in, n_out in zip(decoder_widths[:-1], decoder_widths[1:], strict=True)
        )
        self.output = nn.Linear(self.widths[0], self.out_channels * image_size * image_size)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    @property
    def skip_pairs(self) -> list[tuple[int, int]]:
        """``(encoder index, decoder index)`` of each residual connection; both have equal width."""
        depth = len(self.widths)
        return [(depth - 2 - k, k) for k in range(depth - 1)]

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predict the noise in ``x_t`` (B, C, H, W) at 0-based timesteps ``t`` (B,).

        ``t`` may also hold real times in [0, T]: a velocity model of a
        :class:`~diffusion_lib.flow_matching.RectifiedFlow` is called with ``1000 t``.
        ``labels`` is there to be refused with a message, as the conditional networks'
        signature has it: this network is unconditional.
        """
        if labels is not None:
            raise ValueError(
                f"this {type(self).__name__} is unconditional and takes no labels; use "
                "AttentionUNet(num_classes=...) to condition on labels"
            )
        check_image_batch(
            type(self).__name__,
            x_t,
            self.channels,
            self.image_size,
            weights_dtype=self.output.weight.dtype,
        )
        if not torch.compiler.is_compiling():
            # Range checks read t's values; skip them on accelerators to avoid a sync per step.
            check_model_times(t, self.timesteps, x_t.shape[0], values=None)
        h = x_t.flatten(1)
        if self.time_mlp is None:
            time_features = None
            h = torch.cat([h, (t.to(h.dtype) / self.timesteps)[:, None]], dim=1)
        else:
            time_features = F.silu(self.time_mlp(t))

        encoder_activations = []
        for layer in self.encoder:
            h = layer(h, time_features)
            encoder_activations.append(h)
        for encoder_index, decoder_index in self.skip_pairs:
            h = self.decoder[decoder_index](h, time_features) + encoder_activations[encoder_index]
        return self.output(h).reshape(x_t.shape[0], self.out_channels, *x_t.shape[2:])
