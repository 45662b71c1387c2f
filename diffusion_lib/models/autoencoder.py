"""A small convolutional denoising autoencoder (Vincent et al. 2008), the book's first model.

It maps a noisy image to a clean one through a narrow latent vector and knows nothing about
timesteps or noise levels: the diffusion models of later chapters add exactly that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_lib.validation import check_positive_int, check_weights_dtype


def check_image_batch(
    model_name: str,
    x: Tensor,
    channels: int,
    image_size: int,
    *,
    weights_dtype: torch.dtype | None = None,
    name: str = "x_t",
) -> None:
    """Raise ``ValueError`` unless ``x`` has shape (B, channels, image_size, image_size), holds
    floating-point numbers and, where ``weights_dtype`` (the model's) is given, has that dtype;
    ``name`` names ``x`` in that message."""
    expected = f"(B, {channels}, {image_size}, {image_size})"
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{model_name} expects images of shape {expected}, got {shape}")
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"{model_name} expects floating-point images (pixels scaled to [-1, 1], as "
            f"load_images gives them), got dtype {x.dtype}"
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"{model_name} was built for {channels}-channel images, got {x.shape[1]} channels "
            f"(input shape {tuple(x.shape)})"
        )
    if x.shape[2] != image_size or x.shape[3] != image_size:
        raise ValueError(
            f"{model_name} was built for image_size={image_size} ({image_size}x{image_size} images), "
            f"got {x.shape[2]}x{x.shape[3]}"
        )
    if weights_dtype is not None and not torch.compiler.is_compiling():
        check_weights_dtype(model_name, name, x, weights_dtype)


def check_out_channels(out_channels: int | None, channels: int) -> int:
    """The output channels of a noise predictor: ``channels`` when ``None``, else a positive int."""
    return channels if out_channels is None else check_positive_int("out_channels", out_channels)


class DenoisingAutoencoder(nn.Module):
    """Convolutional encoder -> latent vector -> convolutional decoder.

    The encoder halves the resolution twice with stride-2 convolutions (28 -> 14 -> 7) and
    flattens to a ``latent_dim`` vector; the decoder mirrors it with transposed convolutions.
    The output layer is linear (no sigmoid), so the reconstruction lives in the same range as
    the data, whether that is [0, 1] or [-1, 1], and MSE training needs no special care.

    Args:
        channels: image channels C.
        image_size: height and width H = W; must be divisible by 4.
        hidden: channel counts of the two convolutional stages.
        latent_dim: length of the bottleneck vector.

    Shapes: ``forward(x_noisy)`` (B, C, H, W) -> (B, C, H, W); ``encode`` (B, C, H, W) ->
    (B, latent_dim); ``decode`` (B, latent_dim) -> (B, C, H, W).
    """

    def __init__(
        self,
        channels: int = 1,
        image_size: int = 28,
        hidden: tuple[int, int] = (32, 64),
        latent_dim: int = 64,
    ) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.image_size = check_positive_int("image_size", image_size)
        if image_size % 4:
            raise ValueError(
                f"image_size must be divisible by 4 (two stride-2 halvings), got {image_size}"
            )
        if len(hidden) != 2:
            raise ValueError(f"hidden must hold two channel counts, got {hidden!r}")
        first, second = (check_positive_int("hidden", width) for width in hidden)
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        side = image_size // 4
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, first, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(first, second, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(second * side * side, latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, second * side * side),
            nn.SiLU(),
            nn.Unflatten(1, (second, side, side)),
            nn.ConvTranspose2d(second, first, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(first, first, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(first, channels, 3, padding=1),
        )

    def encode(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, latent_dim) codes."""
        check_image_batch(
            type(self).__name__,
            x,
            self.channels,
            self.image_size,
            weights_dtype=self.encoder[0].weight.dtype,
            name="x",
        )
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_dim) codes -> (B, C, H, W) images."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"codes must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x_noisy: Tensor) -> Tensor:
        """Reconstruct clean images from noisy ones: (B, C, H, W) -> (B, C, H, W)."""
        return self.decode(self.encode(x_noisy))
