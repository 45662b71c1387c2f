"""Latent diffusion's first stage: an autoencoder that moves images to a small latent grid.

Rombach et al. (2022) split image generation in two. A convolutional autoencoder, trained
once, compresses an image into a grid of latent vectors a few times smaller along each side
and decodes it back; the diffusion model is then trained on, and samples, those latent grids,
and the decoder turns a sampled grid into an image. The U-net's cost falls with the number of
latent positions, while the decoder restores the fine detail that the diffusion model no
longer has to spend capacity on.

The diffusion model expects data of roughly unit scale, as the forward process adds noise of
unit variance. An autoencoder has no reason to produce latents of any particular scale, so
Rombach et al. regularise the latents weakly (a small KL or vector-quantisation term, their
sec. 3.1) and divide them by their standard deviation on training data. Here a small L2
penalty on the latents, with noise added to them before decoding (a variational autoencoder
with a fixed posterior variance), keeps their scale from drifting during training, and a
:class:`LatentScaler` standardises each latent channel to zero mean and unit variance
afterwards: :meth:`LatentAutoencoder.encode` returns, and :meth:`LatentAutoencoder.decode`
takes, standardised latents.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusion_lib.devices import select_device
from diffusion_lib.models.autoencoder import check_image_batch
from diffusion_lib.smoke import cap_training_steps
from diffusion_lib.validation import check_finite, check_positive_int, is_integer

__all__ = [
    "AutoencoderHistory",
    "LatentAutoencoder",
    "LatentScaler",
    "encode_dataset",
    "train_autoencoder",
]


class LatentScaler(nn.Module):
    """Per-channel standardisation of latents: ``(z - mean_c) / std_c``.

    Rombach et al. (2022) rescale latents by one number, the inverse of their standard
    deviation on training data; per channel, and removing the mean as well, is the same idea
    with a little more freedom. Until :meth:`fit` is called the scaler is the
    identity (mean 0, std 1). ``mean`` and ``std`` are buffers, so they move with ``.to()``
    and are saved in the ``state_dict``.

    Shapes: ``normalise`` and ``denormalise`` map (B, C, H, W) to (B, C, H, W); ``mean`` and
    ``std`` are (C,).
    """

    def __init__(self, latent_channels: int) -> None:
        super().__init__()
        self.latent_channels = check_positive_int("latent_channels", latent_channels)
        self.register_buffer("mean", torch.zeros(latent_channels))
        self.register_buffer("std", torch.ones(latent_channels))

    def _check(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.dim() != 4 or z.shape[1] != self.latent_channels:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"latents must have shape (B, {self.latent_channels}, H, W), got {shape}"
            )

    @torch.no_grad()
    def fit(self, raw_latents: Tensor) -> LatentScaler:
        """Set ``mean`` and ``std`` to the per-channel statistics of ``raw_latents`` (N, C, H, W)."""
        self._check(raw_latents)
        if raw_latents.shape[0] * raw_latents.shape[2] * raw_latents.shape[3] < 2:
            raise ValueError("fitting the scaler needs at least two latent values per channel")
        check_finite("raw_latents", raw_latents)
        values = raw_latents.transpose(0, 1).flatten(1).double()  # (C, N * H * W)
        self.mean.copy_(values.mean(dim=1))
        self.std.copy_(values.std(dim=1).clamp(min=1e-8))
        return self

    def normalise(self, raw_latents: Tensor) -> Tensor:
        """Encoder output -> standardised latents, (B, C, H, W) -> (B, C, H, W)."""
        self._check(raw_latents)
        return (raw_latents - self.mean[:, None, None]) / self.std[:, None, None]

    def denormalise(self, latents: Tensor) -> Tensor:
        """Standardised latents -> what the decoder reads, (B, C, H, W) -> (B, C, H, W)."""
        self._check(latents)
        return latents * self.std[:, None, None] + self.mean[:, None, None]


class LatentAutoencoder(nn.Module):
    """Convolutional autoencoder from images (B, C, H, W) to latent grids (B, c, h, h).

    The image is padded by ``padding`` pixels on every side (edge values repeated), then each
    entry of ``hidden`` adds a level: a 3x3 convolution to that many channels and a stride-2
    convolution that halves the side. A 3x3 convolution maps to ``latent_channels``. The
    decoder mirrors this with nearest-neighbour upsampling and crops the padding away. For
    the defaults, 28x28 MNIST digits become 32x32 and then 4 x 8 x 8 latents (256 numbers
    for 784 pixels); the even side 8 lets a U-net halve the latent grid once more.

    This is the first stage of latent diffusion (Rombach et al. 2022, sec. 3.1), without the
    perceptual and adversarial losses that make their reconstructions sharp at high
    resolution: for 28x28 digits, mean squared error is enough.

    Args:
        channels: image channels C.
        image_size: H = W of the images.
        latent_channels: c, channels of the latent grid.
        hidden: encoder channels per level; ``len(hidden)`` halvings.
        padding: pixels added on each side before encoding; ``image_size + 2 padding`` must
            be divisible by ``2 ** len(hidden)``.

    Shapes: ``encode`` (B, C, H, W) -> (B, c, h, h) standardised latents (see
    :class:`LatentScaler`); ``decode`` (B, c, h, h) -> (B, C, H, W); ``forward`` (B, C, H, W)
    -> (B, C, H, W), the reconstruction, which does not depend on the scaler.
    """

    def __init__(
        self,
        channels: int = 1,
        image_size: int = 28,
        latent_channels: int = 4,
        hidden: tuple[int, ...] = (32, 64),
        padding: int = 2,
    ) -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.image_size = check_positive_int("image_size", image_size)
        self.latent_channels = check_positive_int("latent_channels", latent_channels)
        if not hidden:
            raise ValueError("hidden must hold at least one channel count, e.g. (32, 64)")
        widths = [check_positive_int("hidden", width) for width in hidden]
        if not is_integer(padding) or padding < 0:
            raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
        self.padding = int(padding)
        padded, factor = image_size + 2 * padding, 2 ** len(widths)
        if padded % factor:
            raise ValueError(
                f"image_size + 2 * padding = {padded} must be divisible by 2 ** len(hidden) = "
                f"{factor} (one halving per entry of hidden); choose another padding"
            )
        self.latent_size = padded // factor
        self.encoder = _encoder(channels, widths, latent_channels)
        self.decoder = _decoder(latent_channels, widths, channels)
        self.scaler = LatentScaler(latent_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The shape (c, h, h) of one latent grid."""
        return (self.latent_channels, self.latent_size, self.latent_size)

    def encode_raw(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> the encoder's latents (B, c, h, h), before standardisation."""
        check_image_batch(type(self).__name__, x, self.channels, self.image_size)
        p = self.padding
        return self.encoder(F.pad(x, (p, p, p, p), mode="replicate") if p else x)

    def decode_raw(self, raw_latents: Tensor) -> Tensor:
        """The encoder's latents (B, c, h, h) -> images (B, C, H, W), padding cropped away."""
        self._check_latents(raw_latents)
        out = self.decoder(raw_latents)
        p = self.padding
        return out[:, :, p : p + self.image_size, p : p + self.image_size]

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> standardised latents (B, c, h, h)."""
        return self.scaler.normalise(self.encode_raw(x))

    def decode(self, latents: Tensor) -> Tensor:
        """Standardised latents (B, c, h, h), e.g. from a sampler -> images (B, C, H, W)."""
        self._check_latents(latents)
        return self.decode_raw(self.scaler.denormalise(latents))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct images: (B, C, H, W) -> (B, C, H, W)."""
        return self.decode_raw(self.encode_raw(x))

    def _check_latents(self, z: Tensor) -> None:
        expected = (self.latent_channels, self.latent_size, self.latent_size)
        if not isinstance(z, Tensor) or z.dim() != 4 or tuple(z.shape[1:]) != expected:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"{type(self).__name__} decodes latents of shape (B, {', '.join(map(str, expected))}), "
                f"got {shape}"
            )


def _encoder(channels: int, widths: list[int], latent_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
    width = widths[0]
    for level_width in widths:
        layers += [nn.SiLU(), nn.Conv2d(width, level_width, 3, padding=1)]
        layers += [nn.SiLU(), nn.Conv2d(level_width, level_width, 3, stride=2, padding=1)]
        width = level_width
    return nn.Sequential(*layers, nn.SiLU(), nn.Conv2d(width, latent_channels, 3, padding=1))


def _decoder(latent_channels: int, widths: list[int], channels: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(latent_channels, widths[-1], 3, padding=1)]
    width = widths[-1]
    for level_width in reversed(widths):
        layers += [nn.SiLU(), nn.Conv2d(width, level_width, 3, padding=1)]
        layers += [nn.SiLU(), nn.Upsample(scale_factor=2.0, mode="nearest")]
        layers += [nn.Conv2d(level_width, level_width, 3, padding=1)]
        width = level_width
    return nn.Sequential(*layers, nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))


@dataclass
class AutoencoderHistory:
    """What :func:`train_autoencoder` measured, one value per step.

    Attributes:
        loss: the objective, reconstruction error plus the weighted latent penalty.
        reconstruction: mean squared error between images and reconstructions.
        latent_square: mean of the squared raw latents, ``mean(z^2)``.
        seconds: wall-clock time of the run.
    """

    loss: list[float] = field(default_factory=list)
    reconstruction: list[float] = field(default_factory=list)
    latent_square: list[float] = field(default_factory=list)
    seconds: float = float("nan")


def train_autoencoder(
    autoencoder: LatentAutoencoder,
    images: Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    latent_penalty: float = 1e-3,
    latent_noise: float = 0.0,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AutoencoderHistory:
    """Fit the autoencoder with Adam on ``||x - D(z + s eps)||^2 + latent_penalty * ||z||^2``.

    Here ``z = E(x)`` are the raw latents, ``s = latent_noise`` and ``eps ~ N(0, I)``; both terms
    are means over pixels and latent entries. Together they are a variational autoencoder
    (Kingma & Welling 2014) whose posterior ``N(z, s^2 I)`` has a fixed variance: its KL
    divergence from ``N(0, I)`` is ``||z||^2 / 2`` plus a constant. This plays the part of the
    weak KL regularisation of Rombach et al. (2022, sec. 3.1): without it the encoder could
    grow its latents without bound and let the decoder shrink them back, and the noise teaches
    the decoder to tolerate the small errors of a diffusion sampler. ``latent_noise=0`` gives a
    plain autoencoder with an L2 penalty.

    Each step uses a random batch drawn (without repeats) from ``images`` (N, C, H, W) by a
    CPU generator seeded with ``seed``, which also draws the latent noise. The autoencoder is
    trained in place and left on ``device`` (default
    :func:`~diffusion_lib.devices.select_device`) in eval mode; its scaler is not touched (see
    :func:`encode_dataset`). In smoke mode ``steps`` is capped.
    """
    check_image_batch("train_autoencoder", images, autoencoder.channels, autoencoder.image_size)
    steps = cap_training_steps(check_positive_int("steps", steps))
    batch_size = min(check_positive_int("batch_size", batch_size), images.shape[0])
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not latent_penalty >= 0 or not latent_noise >= 0:
        raise ValueError(
            f"latent_penalty and latent_noise must be >= 0, got {latent_penalty} and {latent_noise}"
        )
    device = select_device(device)
    autoencoder.to(device).train()
    images = images.to(device)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history, started = AutoencoderHistory(), time.perf_counter()
    for _ in tqdm(range(steps), desc="autoencoder", unit="step", disable=not progress):
        batch = images[torch.randperm(images.shape[0], generator=generator)[:batch_size].to(device)]
        terms = _autoencoder_loss(autoencoder, batch, latent_penalty, latent_noise, generator)
        optimizer.zero_grad(set_to_none=True)
        terms[0].backward()
        optimizer.step()
        loss, reconstruction, latent_square = torch.stack(terms).tolist()
        history.loss.append(loss)
        history.reconstruction.append(reconstruction)
        history.latent_square.append(latent_square)
    autoencoder.eval()
    history.seconds = time.perf_counter() - started
    return history


def _autoencoder_loss(
    autoencoder: LatentAutoencoder,
    batch: Tensor,
    latent_penalty: float,
    latent_noise: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """The objective of :func:`train_autoencoder`, its reconstruction error and ``mean(z^2)``."""
    raw_latents = autoencoder.encode_raw(batch)
    decoded_latents = raw_latents
    if latent_noise > 0:
        noise = torch.randn(raw_latents.shape, generator=generator).to(raw_latents.device)
        decoded_latents = raw_latents + latent_noise * noise
    reconstruction = F.mse_loss(autoencoder.decode_raw(decoded_latents), batch)
    latent_square = raw_latents.square().mean()
    return reconstruction + latent_penalty * latent_square, reconstruction, latent_square


@torch.no_grad()
def encode_dataset(
    autoencoder: LatentAutoencoder,
    images: Tensor,
    *,
    batch_size: int = 500,
    fit_scaler: bool = True,
) -> Tensor:
    """Encode ``images`` (N, C, H, W) in batches into standardised latents (N, c, h, h).

    With ``fit_scaler`` (the default, meant for the training images) the autoencoder's
    :class:`LatentScaler` is first fitted to the raw latents of ``images``, so the returned
    latents have zero mean and unit standard deviation per channel; pass ``False`` to encode
    other images with the scaler already fitted. The latents land on the autoencoder's device.
    """
    check_image_batch("encode_dataset", images, autoencoder.channels, autoencoder.image_size)
    batch_size = check_positive_int("batch_size", batch_size)
    was_training = autoencoder.training
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    raw_latents = torch.cat(
        [autoencoder.encode_raw(chunk.to(device)) for chunk in images.split(batch_size)]
    )
    autoencoder.train(was_training)
    if fit_scaler:
        autoencoder.scaler.fit(raw_latents)
    return autoencoder.scaler.normalise(raw_latents)
