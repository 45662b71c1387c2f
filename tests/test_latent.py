"""Tests for diffusion_lib.latent: shapes, the scaler's statistics, training, and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_lib.latent import (
    AutoencoderHistory,
    LatentAutoencoder,
    LatentScaler,
    _autoencoder_loss,
    encode_dataset,
    train_autoencoder,
)
from diffusion_lib.smoke import MAX_TRAINING_STEPS, SMOKE_VARIABLE

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks


def tiny_autoencoder(**kwargs: object) -> LatentAutoencoder:
    options: dict[str, object] = dict(hidden=(8, 16))
    options.update(kwargs)
    return LatentAutoencoder(**options)


def quick_autoencoder() -> LatentAutoencoder:
    """One level (4 x 16 x 16 latents): learns the toy images below in a hundred steps."""
    return LatentAutoencoder(hidden=(8,))


def blob_images(count: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """``count`` images (N, 1, size, size) in [-1, 1]: one Gaussian bump each, at random places."""
    generator = torch.Generator().manual_seed(seed)
    centres = 6 + (size - 12) * torch.rand(count, 2, generator=generator)
    grid = torch.arange(size, dtype=torch.float32)
    rows = (grid[None, :] - centres[:, :1]) ** 2
    cols = (grid[None, :] - centres[:, 1:]) ** 2
    bumps = torch.exp(-(rows[:, :, None] + cols[:, None, :]) / (2 * 2.5**2))
    return (2 * bumps - 1).unsqueeze(1)


# ---------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    ("options", "image_shape", "latent_shape"),
    [
        ({}, (1, 28, 28), (4, 8, 8)),
        ({"hidden": (8,), "latent_channels": 2}, (1, 28, 28), (2, 16, 16)),
        ({"hidden": (8,), "padding": 0}, (1, 28, 28), (4, 14, 14)),
        ({"channels": 3, "image_size": 32, "padding": 0}, (3, 32, 32), (4, 8, 8)),
        ({"hidden": (8, 8, 8), "padding": 2}, (1, 28, 28), (4, 4, 4)),
    ],
)
def test_shapes_of_encode_decode_and_forward(
    options: dict, image_shape: tuple, latent_shape: tuple
) -> None:
    autoencoder = LatentAutoencoder(**{"hidden": (8, 16), **options})
    x = torch.randn(3, *image_shape)
    z = autoencoder.encode(x)
    assert autoencoder.latent_shape == latent_shape
    assert z.shape == (3, *latent_shape)
    assert autoencoder.decode(z).shape == x.shape
    assert autoencoder(x).shape == x.shape


def test_decoder_output_is_cropped_from_the_centre_of_the_padded_grid() -> None:
    autoencoder = tiny_autoencoder()
    raw = torch.randn(2, *autoencoder.latent_shape)
    padded = autoencoder.decoder(raw)
    assert padded.shape == (2, 1, 32, 32)
    torch.testing.assert_close(autoencoder.decode_raw(raw), padded[:, :, 2:30, 2:30])


def test_encoder_sees_the_image_padded_with_its_edge_values() -> None:
    autoencoder = tiny_autoencoder()
    x = torch.randn(2, 1, 28, 28)
    edge_padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), "edge"))
    torch.testing.assert_close(autoencoder.encode_raw(x), autoencoder.encoder(edge_padded))


# ---------------------------------------------------------------------------- the scaler
def test_scaler_matches_per_channel_statistics_computed_with_numpy() -> None:
    channel_means, channel_stds = torch.tensor([3.0, -1.0, 0.0]), torch.tensor([0.5, 4.0, 1e-2])
    raw = channel_means[:, None, None] + channel_stds[:, None, None] * torch.randn(50, 3, 6, 6)
    scaler = LatentScaler(3).fit(raw)
    values = raw.numpy().transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(scaler.mean.numpy(), values.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scaler.std.numpy(), values.std(axis=1, ddof=1), rtol=1e-5)

    normalised = scaler.normalise(raw)
    per_channel = normalised.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(scaler.denormalise(normalised), raw, atol=1e-5, rtol=1e-5)


def test_unfitted_scaler_is_the_identity_and_travels_in_the_state_dict() -> None:
    autoencoder = tiny_autoencoder()
    z = torch.randn(2, *autoencoder.latent_shape)
    torch.testing.assert_close(autoencoder.scaler.normalise(z), z)
    autoencoder.scaler.fit(3 + 2 * torch.randn(10, *autoencoder.latent_shape))
    restored = tiny_autoencoder()
    restored.load_state_dict(autoencoder.state_dict())
    torch.testing.assert_close(restored.scaler.mean, autoencoder.scaler.mean)
    torch.testing.assert_close(restored.scaler.std, autoencoder.scaler.std)


def test_encode_dataset_standardises_the_latents_it_was_fitted_on() -> None:
    autoencoder = tiny_autoencoder()
    images = blob_images(64)
    latents = encode_dataset(autoencoder, images, batch_size=10)
    assert latents.shape == (64, *autoencoder.latent_shape)
    per_channel = latents.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(dim=1), torch.ones(4), atol=1e-4, rtol=0)
    # Batching does not change the result, and encode() applies the same standardisation.
    with torch.no_grad():
        torch.testing.assert_close(latents, autoencoder.encode(images), atol=1e-5, rtol=1e-5)
        again = encode_dataset(autoencoder, images, batch_size=1000, fit_scaler=False)
        torch.testing.assert_close(again, latents, atol=1e-5, rtol=1e-5)
        # decode undoes the standardisation: decode(encode(x)) is the plain reconstruction.
        torch.testing.assert_close(
            autoencoder.decode(latents), autoencoder(images), atol=1e-5, rtol=1e-4
        )


def test_encode_dataset_without_fitting_keeps_the_scaler() -> None:
    autoencoder = tiny_autoencoder()
    encode_dataset(autoencoder, blob_images(32))
    mean, std = autoencoder.scaler.mean.clone(), autoencoder.scaler.std.clone()
    encode_dataset(autoencoder, blob_images(32, seed=1) * 0.5, fit_scaler=False)
    torch.testing.assert_close(autoencoder.scaler.mean, mean)
    torch.testing.assert_close(autoencoder.scaler.std, std)


# ---------------------------------------------------------------------------- training
def reconstruction_error(autoencoder: LatentAutoencoder, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.mse_loss(autoencoder(images), images))


def test_training_lowers_the_reconstruction_error() -> None:
    images = blob_images(256)
    autoencoder = quick_autoencoder()
    before = reconstruction_error(autoencoder, images)
    history = train_autoencoder(
        autoencoder, images, steps=150, batch_size=32, lr=3e-3, device="cpu", progress=False
    )
    assert len(history.loss) == len(history.reconstruction) == len(history.latent_square) == 150
    after = reconstruction_error(autoencoder, images)
    assert after < 0.2 * before, (before, after)
    assert np.mean(history.reconstruction[-10:]) < 0.2 * np.mean(history.reconstruction[:10])
    # The objective is the reconstruction error plus the weighted penalty, step by step.
    np.testing.assert_allclose(
        history.loss,
        np.add(history.reconstruction, 1e-3 * np.asarray(history.latent_square)),
        rtol=1e-5,
    )
    assert not autoencoder.training
    torch.testing.assert_close(autoencoder.scaler.std, torch.ones(4))  # not fitted by training


def train_quick_autoencoder(images: torch.Tensor, steps: int, **options) -> AutoencoderHistory:
    """A freshly seeded quick autoencoder trained with batch 32 and learning rate 3e-3."""
    torch.manual_seed(0)
    return train_autoencoder(
        quick_autoencoder(), images, steps=steps, batch_size=32, lr=3e-3, progress=False, **options
    )


def test_a_larger_latent_penalty_gives_smaller_latents() -> None:
    images = blob_images(128)
    sizes = []
    for penalty in (0.0, 1.0):
        history = train_quick_autoencoder(images, steps=60, latent_penalty=penalty)
        sizes.append(np.mean(history.latent_square[-10:]))
    assert sizes[1] < 0.5 * sizes[0], sizes


def test_latent_noise_is_what_the_decoder_must_see_through() -> None:
    # Noise far larger than the latents leaves nothing to decode: the best the decoder can do
    # is the mean image, so the reconstruction error stays near the images' variance.
    images = blob_images(128)
    errors = []
    for noise in (0.0, 100.0):
        history = train_quick_autoencoder(images, steps=100, latent_noise=noise)
        errors.append(np.mean(history.reconstruction[-10:]))
    variance = float(images.var(dim=0).mean())
    assert errors[0] < 0.3 * variance, (errors, variance)
    assert errors[1] > 0.7 * variance, (errors, variance)


def test_training_is_reproducible_with_a_seed() -> None:
    images = blob_images(64)
    losses = []
    for _ in range(2):
        torch.manual_seed(1)
        autoencoder = tiny_autoencoder()
        losses.append(train_autoencoder(autoencoder, images, steps=5, progress=False).loss)
    assert losses[0] == losses[1]


def test_smoke_mode_caps_the_training_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    history = train_autoencoder(
        tiny_autoencoder(), blob_images(8), steps=MAX_TRAINING_STEPS + 5, progress=False
    )
    assert len(history.loss) == MAX_TRAINING_STEPS


# ---------------------------------------------------------------------------- input checks
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 1, 32, 32), "image_size=28"),
        ((2, 3, 28, 28), "1-channel"),
        ((1, 28, 28), "expects images of shape"),
    ],
)
def test_wrong_images_are_refused(shape: tuple, message: str) -> None:
    autoencoder = tiny_autoencoder()
    x = torch.zeros(shape)
    for call in (
        autoencoder.encode,
        autoencoder,
        lambda x: encode_dataset(autoencoder, x),
        lambda x: train_autoencoder(autoencoder, x, steps=1, progress=False),
    ):
        with pytest.raises(ValueError, match=message):
            call(x)


@pytest.mark.parametrize("shape", [(2, 4, 7, 7), (2, 3, 8, 8), (4, 8, 8)])
def test_wrong_latents_are_refused(shape: tuple) -> None:
    with pytest.raises(ValueError, match=r"latents of shape \(B, 4, 8, 8\)"):
        tiny_autoencoder().decode(torch.zeros(shape))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"padding": 1}, "must be divisible by 2 \\*\\* len\\(hidden\\) = 4"),
        ({"padding": -1}, "padding must be an integer >= 0"),
        ({"hidden": ()}, "at least one channel count"),
        ({"hidden": (8, 0)}, "hidden must be an integer >= 1"),
        ({"latent_channels": 0}, "latent_channels must be an integer >= 1"),
    ],
)
def test_bad_construction_arguments(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_autoencoder(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 1, "batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"steps": 1, "lr": 0.0}, "lr must be > 0"),
        ({"steps": 1, "latent_penalty": -1.0}, "latent_penalty and latent_noise must be >= 0"),
        ({"steps": 1, "latent_noise": -0.1}, "latent_penalty and latent_noise must be >= 0"),
        ({"steps": 1, "device": "tpu"}, "unknown device"),
    ],
)
def test_bad_training_arguments(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_autoencoder(tiny_autoencoder(), blob_images(4), progress=False, **options)


def test_scaler_refuses_wrong_channels_and_too_little_data() -> None:
    scaler = LatentScaler(4)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        scaler.normalise(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="at least two"):
        scaler.fit(torch.zeros(1, 4, 1, 1))
    with pytest.raises(ValueError, match="finite"):
        scaler.fit(torch.full((2, 4, 2, 2), float("nan")))


@pytest.mark.parametrize("latent_noise", [0.0, 0.7])
def test_autoencoder_loss_of_constant_layers_is_its_closed_form(latent_noise: float) -> None:
    """Zero the last encoder and decoder convolutions' weights: the raw latents are the encoder
    bias b per channel and the reconstruction is the decoder bias beta everywhere, whatever the
    latent noise. Then reconstruction = mean (x - beta)^2, latent_square = mean_c b_c^2 =
    (1 + 4 + 0.25 + 9) / 4, and loss = reconstruction + penalty * latent_square."""
    autoencoder = quick_autoencoder()
    with torch.no_grad():
        autoencoder.encoder[-1].weight.zero_()
        autoencoder.encoder[-1].bias.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        autoencoder.decoder[-1].weight.zero_()
        autoencoder.decoder[-1].bias.fill_(0.25)
    x = blob_images(4)
    loss, reconstruction, latent_square = _autoencoder_loss(
        autoencoder, x, 0.1, latent_noise, torch.Generator().manual_seed(0)
    )
    expected_reconstruction = float(((x.double() - 0.25) ** 2).mean())
    assert reconstruction.item() == pytest.approx(expected_reconstruction, rel=1e-6)
    assert latent_square.item() == pytest.approx(14.25 / 4, rel=1e-6)
    assert loss.item() == pytest.approx(expected_reconstruction + 0.1 * 14.25 / 4, rel=1e-6)
