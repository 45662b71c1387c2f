"""Tests for diffusion_lib.models: shapes, gradients, embeddings, conditioning and input checks."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lib.models import (
    MODELS,
    AttentionUNet,
    DenoisingAutoencoder,
    DiffusionTransformer,
    FCUNet,
    TimeEmbedding,
    ToyMLP,
    build_model,
    count_parameters,
    sinusoidal_embedding,
)
from diffusion_lib.models.attention_unet import CrossAttention, ResidualBlock, SelfAttention
from diffusion_lib.reverse_process import predict_noise

T = 1000


def tiny_fc_unet(channels: int, image_size: int, **kwargs: object) -> FCUNet:
    return FCUNet(image_size=image_size, channels=channels, widths=(32, 16, 8), **kwargs)


def tiny_attention_unet(channels: int, image_size: int, **kwargs: object) -> AttentionUNet:
    options = dict(base_channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=1, num_heads=2)
    options.update(kwargs)
    return AttentionUNet(image_size=image_size, channels=channels, **options)


def tiny_dit(channels: int, image_size: int, **kwargs: object) -> DiffusionTransformer:
    options = dict(patch_size=4, hidden_size=16, depth=2, num_heads=2)
    options.update(kwargs)
    return DiffusionTransformer(image_size=image_size, channels=channels, **options)


NOISE_PREDICTORS: dict[str, Callable[[int, int], nn.Module]] = {
    "fc_unet_scalar": tiny_fc_unet,
    "fc_unet_sinusoidal_layer_norm": lambda c, s: tiny_fc_unet(
        c, s, time_embedding="sinusoidal", layer_norm=True, time_embedding_dim=8
    ),
    "attention_unet": tiny_attention_unet,
    "attention_unet_conditional": lambda c, s: tiny_attention_unet(c, s, num_classes=10),
    "dit": tiny_dit,
    "dit_conditional": lambda c, s: tiny_dit(c, s, num_classes=10),
}


def perturb(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Add noise to every parameter, so zero-initialised layers no longer hide the rest."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


def inputs(channels: int, image_size: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    x_t = torch.randn(batch, channels, image_size, image_size)
    t = torch.randint(0, T, (batch,))
    return x_t, t


# --- sinusoidal embedding -------------------------------------------------------------------


def vaswani_position_encoding(positions: np.ndarray, dim: int, max_period: float) -> np.ndarray:
    """PE(pos, 2i) = sin(pos / P^(2i/d)), PE(pos, 2i+1) = cos(pos / P^(2i/d)), interleaved."""
    table = np.zeros((len(positions), dim))
    for row, pos in enumerate(positions):
        for i in range(dim // 2):
            angle = pos / max_period ** (2 * i / dim)
            table[row, 2 * i] = math.sin(angle)
            table[row, 2 * i + 1] = math.cos(angle)
    return table


@pytest.mark.parametrize("dim", [2, 8, 32])
@pytest.mark.parametrize("max_period", [10000.0, 100.0])
def test_sinusoidal_embedding_matches_vaswani_formula(dim: int, max_period: float) -> None:
    t = torch.tensor([0, 1, 2, 17, 500, 999])
    expected = vaswani_position_encoding(t.numpy(), dim, max_period)
    # The library puts all sines first, then all cosines: the same columns in another order.
    expected = np.concatenate([expected[:, 0::2], expected[:, 1::2]], axis=1)
    actual = sinusoidal_embedding(t, dim, max_period)
    assert actual.shape == (6, dim) and actual.dtype == torch.float32
    np.testing.assert_allclose(actual.numpy(), expected, atol=2e-4)


def test_sinusoidal_embedding_odd_dim_pads_with_zero() -> None:
    t = torch.arange(0, T, 37)
    odd = sinusoidal_embedding(t, 7)
    assert odd.shape == (len(t), 7)
    torch.testing.assert_close(odd[:, :6], sinusoidal_embedding(t, 6))
    assert torch.all(odd[:, 6] == 0)


def test_distinct_timesteps_give_distinct_embeddings() -> None:
    embeddings = sinusoidal_embedding(torch.arange(T), 32).double()
    distances = torch.cdist(embeddings, embeddings)
    distances.fill_diagonal_(float("inf"))
    # Neighbouring timesteps differ by at least the fastest frequency's step, 2 sin(1/2) ~ 0.96.
    assert distances.min() > 0.5


def test_time_embedding_is_sinusoid_then_mlp() -> None:
    embedding = TimeEmbedding(8)
    assert embedding.out_dim == 32
    t = torch.tensor([0, 5, 999])
    first, second = embedding.mlp[0], embedding.mlp[2]
    expected = second(F.silu(first(sinusoidal_embedding(t, 8))))
    torch.testing.assert_close(embedding(t), expected)
    assert embedding(t).shape == (3, 32)


# --- shapes and gradients -------------------------------------------------------------------


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", [28, 32])
def test_noise_predictor_output_shape(name: str, channels: int, image_size: int) -> None:
    model = NOISE_PREDICTORS[name](channels, image_size)
    x_t, t = inputs(channels, image_size)
    eps = model(x_t, t)
    assert eps.shape == x_t.shape and eps.dtype == x_t.dtype


TINY_BUILDERS = {"fc_unet": tiny_fc_unet, "attention_unet": tiny_attention_unet, "dit": tiny_dit}


@pytest.mark.parametrize("name", TINY_BUILDERS)
@pytest.mark.parametrize("channels", [1, 3])
def test_out_channels_sets_the_output_channels(name: str, channels: int) -> None:
    model = perturb(TINY_BUILDERS[name](channels, 28, out_channels=2 * channels))
    x_t, t = inputs(channels, 28)
    output = model(x_t, t)
    assert output.shape == (x_t.shape[0], 2 * channels, 28, 28)
    assert model.out_channels == 2 * channels and model.channels == channels
    # each output channel is its own function of the input, not a copy of another
    assert not torch.allclose(output[:, :channels], output[:, channels:])


@pytest.mark.parametrize("name", TINY_BUILDERS)
def test_out_channels_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match="out_channels must be an integer >= 1, got 0"):
        TINY_BUILDERS[name](1, 28, out_channels=0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", [28, 32])
def test_autoencoder_shapes(channels: int, image_size: int) -> None:
    model = DenoisingAutoencoder(channels, image_size, hidden=(4, 8), latent_dim=5)
    x, _ = inputs(channels, image_size)
    assert model.encode(x).shape == (3, 5)
    assert model(x).shape == x.shape


def test_autoencoder_output_is_not_squashed() -> None:
    model = DenoisingAutoencoder(hidden=(4, 8), latent_dim=5)
    with torch.no_grad():
        model.decoder[-1].bias.fill_(3.0)
    # With a sigmoid the output could never exceed 1; the linear output layer can.
    assert model(torch.rand(2, 1, 28, 28)).min() > 1.0


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = perturb(NOISE_PREDICTORS[name](3, 28))
    x_t, t = inputs(3, 28, batch=4)
    args = (torch.tensor([0, 1, 2, 10]),) if name.endswith("conditional") else ()
    model(x_t, t, *args).square().sum().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


def test_autoencoder_gradients_reach_every_parameter() -> None:
    model = DenoisingAutoencoder(hidden=(4, 8), latent_dim=5)
    model(torch.rand(2, 1, 28, 28)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
def test_untrained_noise_predictor_outputs_zero(name: str) -> None:
    model = NOISE_PREDICTORS[name](1, 28)
    x_t, t = inputs(1, 28)
    assert torch.equal(model(x_t, t), torch.zeros_like(x_t))


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
def test_samples_in_a_batch_do_not_interact(name: str) -> None:
    model = perturb(NOISE_PREDICTORS[name](3, 32)).eval()
    x_t, t = inputs(3, 32, batch=4)
    together = model(x_t, t)
    for i in range(4):
        torch.testing.assert_close(together[i : i + 1], model(x_t[i : i + 1], t[i : i + 1]))


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
def test_timestep_changes_the_output(name: str) -> None:
    model = perturb(NOISE_PREDICTORS[name](1, 28))
    x_t = torch.randn(1, 1, 28, 28).expand(2, -1, -1, -1)
    eps = model(x_t, torch.tensor([0, 999]))
    assert (eps[0] - eps[1]).abs().max() > 1e-4


def test_attention_unet_accepts_channels_last() -> None:
    model = perturb(tiny_attention_unet(3, 32))
    x_t, t = inputs(3, 32)
    expected = model(x_t, t)
    actual = model(x_t.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


# --- FCUNet structure -----------------------------------------------------------------------


def test_fc_unet_scalar_time_input_is_t_over_T() -> None:
    model = tiny_fc_unet(1, 28)
    seen = []
    model.encoder[0].linear.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    t = torch.tensor([0, 250, 999])
    model(torch.randn(3, 1, 28, 28), t)
    assert seen[0].shape == (3, 28 * 28 + 1)
    torch.testing.assert_close(seen[0][:, -1], t.float() / T)


@pytest.mark.parametrize("widths", [(32, 16, 8), (20, 10), (12,)])
def test_fc_unet_skip_pairs_have_equal_width(widths: tuple[int, ...]) -> None:
    model = FCUNet(widths=widths)
    assert len(model.encoder) == len(widths) and len(model.decoder) == len(widths) - 1
    assert len(model.skip_pairs) == len(widths) - 1
    for encoder_index, decoder_index in model.skip_pairs:
        encoder_width = model.encoder[encoder_index].linear.out_features
        assert encoder_width == model.decoder[decoder_index].linear.out_features
    assert model.output.in_features == widths[0]


def test_fc_unet_skip_connections_carry_encoder_activations() -> None:
    """With the decoder layers zeroed, only the outermost skip reaches the output layer."""
    model = perturb(tiny_fc_unet(1, 28))
    with torch.no_grad():
        for parameter in model.decoder.parameters():
            parameter.zero_()
    x_t, t = inputs(1, 28)
    first_layer_input = torch.cat([x_t.flatten(1), (t.float() / T)[:, None]], dim=1)
    h_0 = F.silu(model.encoder[0].linear(first_layer_input))
    expected = model.output(h_0).reshape(x_t.shape)
    torch.testing.assert_close(model(x_t, t), expected)


def test_fc_unet_default_size() -> None:
    model = FCUNet()
    assert model.widths == (2000, 1000, 500)
    assert 5_000_000 <= count_parameters(model) <= 10_000_000


# --- AttentionUNet structure and conditioning -----------------------------------------------


def test_self_attention_matches_softmax_formula() -> None:
    layer = perturb(SelfAttention(channels=8, num_heads=2, groups=4), scale=0.3)
    x = torch.randn(2, 8, 3, 5)
    tokens = layer.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
    query, key, value = layer.qkv(tokens).chunk(3, dim=-1)
    heads = []
    for head in range(2):
        part = slice(4 * head, 4 * head + 4)
        weights = torch.softmax(query[..., part] @ key[..., part].transpose(1, 2) / 2.0, dim=-1)
        heads.append(weights @ value[..., part])
    out = layer.output(torch.cat(heads, dim=-1)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(layer(x), x + out)


@pytest.mark.parametrize(
    ("image_size", "attention_resolutions", "expected"),
    [(28, None, (14, 7)), (32, None, (16, 8)), (28, (7,), (7,)), (32, (), ())],
)
def test_attention_placed_at_requested_resolutions(
    image_size: int, attention_resolutions: tuple[int, ...] | None, expected: tuple[int, ...]
) -> None:
    model = tiny_attention_unet(1, image_size, attention_resolutions=attention_resolutions)
    assert model.attention_resolutions == expected
    layers = sum(isinstance(m, SelfAttention) for m in model.modules())
    # Per attended level: 1 block on the way down and 2 on the way up; plus 1 in the middle.
    assert layers == 3 * len(expected) + 1


def test_attention_unet_default_size() -> None:
    model = AttentionUNet()
    assert model.resolutions == [28, 14, 7]
    assert 500_000 <= count_parameters(model) <= 5_000_000


@pytest.mark.parametrize("name", ["attention_unet_conditional", "dit_conditional"])
def test_labels_change_the_output_and_none_means_null_label(name: str) -> None:
    model = perturb(NOISE_PREDICTORS[name](1, 28))
    assert model.null_label == 10
    assert model.label_embedding.num_embeddings == 11
    x_t = torch.randn(1, 1, 28, 28).expand(3, -1, -1, -1)
    t = torch.full((3,), 500)
    eps = model(x_t, t, torch.tensor([0, 1, 10]))
    assert (eps[0] - eps[1]).abs().max() > 1e-4
    assert (eps[0] - eps[2]).abs().max() > 1e-4
    torch.testing.assert_close(model(x_t, t), model(x_t, t, torch.full((3,), 10)))


@pytest.mark.parametrize("name", ["attention_unet_conditional", "dit_conditional"])
def test_conditional_model_supports_classifier_free_guidance(name: str) -> None:
    model = perturb(NOISE_PREDICTORS[name](1, 28))
    x_t, t = inputs(1, 28)
    labels = torch.tensor([3, 4, 5])
    guided = predict_noise(model, x_t, t, labels, guidance=2.0, null_label=model.null_label)
    expected = 3.0 * model(x_t, t, labels) - 2.0 * model(x_t, t)
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 11]), "0..10"),
        (torch.tensor([-1, 3]), "0..10"),
        (torch.tensor([0.0, 1.0]), "integer"),
        (torch.tensor([0, 1, 2]), "shape (2,)"),
    ],
)
@pytest.mark.parametrize("name", ["attention_unet_conditional", "dit_conditional"])
def test_bad_labels_raise(name: str, labels: torch.Tensor, message: str) -> None:
    model = NOISE_PREDICTORS[name](1, 28)
    x_t, t = inputs(1, 28, batch=2)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(x_t, t, labels)


@pytest.mark.parametrize("name", ["fc_unet_scalar", "attention_unet", "dit"])
def test_unconditional_model_rejects_labels(name: str) -> None:
    model = NOISE_PREDICTORS[name](1, 28)
    x_t, t = inputs(1, 28, batch=2)
    with pytest.raises(ValueError, match="unconditional"):
        model(x_t, t, torch.tensor([0, 1]))
    with pytest.raises(AttributeError, match="null_label"):
        _ = model.null_label


# --- input checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
def test_wrong_image_size_raises(name: str) -> None:
    model = NOISE_PREDICTORS[name](1, 28)
    with pytest.raises(ValueError, match="image_size=28"):
        model(torch.randn(2, 1, 32, 32), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
def test_wrong_channel_count_raises(name: str) -> None:
    model = NOISE_PREDICTORS[name](1, 28)
    with pytest.raises(ValueError, match="built for 1-channel images, got 3"):
        model(torch.randn(2, 3, 28, 28), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
def test_missing_batch_dimension_raises(name: str) -> None:
    model = NOISE_PREDICTORS[name](1, 28)
    with pytest.raises(ValueError, match=r"shape \(B, 1, 28, 28\)"):
        model(torch.randn(1, 28, 28), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
@pytest.mark.parametrize(
    ("t", "message"),
    [
        (torch.tensor([0, T]), "0..999"),
        (torch.tensor([0.5, T + 0.5]), r"real-valued times must lie in \[0, 1000\]"),
        (torch.tensor([0.5]), r"shape \(2,\)"),
    ],
)
def test_bad_timesteps_raise(name: str, t: torch.Tensor, message: str) -> None:
    model = NOISE_PREDICTORS[name](1, 28)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 1, 28, 28), t)


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
def test_real_times_of_a_flow_are_accepted_and_match_integer_ones(name: str) -> None:
    """A velocity model is called with 1000 t; whole-number times give the integer result,
    and the output varies smoothly in between."""
    model = NOISE_PREDICTORS[name](1, 28).eval()
    for parameter in model.parameters():  # zero-initialised output layers would hide t
        torch.nn.init.normal_(parameter, std=0.05)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        whole = model(x, torch.tensor([3, T - 1]))
        real = model(x, torch.tensor([3.0, T - 1.0]))
        nudged = model(x, torch.tensor([3.001, T - 1.0]))
    torch.testing.assert_close(real, whole)
    assert 0 < (nudged - real).abs().max() < 1e-2


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
@pytest.mark.parametrize("t", [500, 500.0, [500, 500]])
def test_timesteps_that_are_not_a_tensor_are_refused(name: str, t: object) -> None:
    # A plain int used to fail with "'int' object has no attribute 'device'".
    model = NOISE_PREDICTORS[name](1, 28)
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \(B,\), one timestep per"):
        model(torch.randn(2, 1, 28, 28), t)


def test_the_fc_unet_names_the_conditional_networks_when_given_labels() -> None:
    # It used to fail with "FCUNet.forward() takes 3 positional arguments but 4 were given".
    x_t, t = inputs(1, 28, batch=2)
    with pytest.raises(ValueError, match=r"this FCUNet is unconditional.*AttentionUNet\(num_"):
        tiny_fc_unet(1, 28)(x_t, t, torch.tensor([0, 1]))


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        (
            torch.float64,
            r"float32 but x_t is float64 \(NumPy arrays become float64\); pass x_t\.float",
        ),
        (torch.float16, r"float32 but x_t is float16; pass x_t\.float\(\)"),
    ],
)
def test_an_input_in_another_dtype_than_the_weights_is_refused(
    name: str, dtype: torch.dtype, message: str
) -> None:
    model = NOISE_PREDICTORS[name](1, 28)
    x_t, t = inputs(1, 28, batch=2)
    with pytest.raises(ValueError, match=f"{type(model).__name__}'s weights are {message}"):
        model(x_t.to(dtype), t)


@pytest.mark.parametrize("name", NOISE_PREDICTORS)
def test_autocast_and_matching_half_precision_still_run(name: str) -> None:
    """Under autocast the weights and inputs may differ (autocast casts them); a model cast to
    bfloat16 takes bfloat16 input."""
    x_t, t = inputs(1, 28, batch=2)
    model = NOISE_PREDICTORS[name](1, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.to(torch.bfloat16)(x_t, t).shape == x_t.shape
    assert model(x_t.to(torch.bfloat16), t).dtype == torch.bfloat16


def test_autoencoder_checks_its_input() -> None:
    model = DenoisingAutoencoder(hidden=(4, 8), latent_dim=5)
    with pytest.raises(ValueError, match="image_size=28"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="weights are float32 but x is float64"):
        model(torch.rand(2, 1, 28, 28, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by 4"):
        DenoisingAutoencoder(image_size=30)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(image_size=30), "multiple of 4"),
        (dict(channel_multipliers=(1, 2, 2, 2)), "multiple of 8"),
        (dict(attention_resolutions=(16,)), "choose from 28, 14, 7"),
        (dict(norm_groups=3), "norm_groups=3"),
        (dict(num_heads=3), "num_heads=3"),
        (dict(dropout=1.0), "dropout"),
        (dict(channel_multipliers=()), "channel_multipliers"),
        (dict(channel_multipliers=2), r"channel_multipliers must be a tuple such as \(1, 2, 2\)"),
        (
            dict(attention_resolutions=14),
            r"attention_resolutions must be a tuple such as \(14, 7\)",
        ),
    ],
)
def test_attention_unet_rejects_bad_configurations(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttentionUNet(**{"base_channels": 8, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(time_embedding="learned"), "scalar, sinusoidal"),
        (dict(widths=()), "widths"),
        (dict(widths=64), r"widths must be a tuple such as \(2000, 1000, 500\); got 64"),
        (dict(layer_norm="no"), "layer_norm must be True or False, got 'no'"),
    ],
)
def test_fc_unet_rejects_bad_configurations(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FCUNet(**kwargs)


# --- registry and parameter counts ----------------------------------------------------------


def test_build_model_uses_the_registry() -> None:
    assert set(MODELS) == {"fc_unet", "attention_unet", "dit"}
    model = build_model("fc_unet", widths=(8, 4), image_size=4)
    assert isinstance(model, FCUNet) and model.widths == (8, 4)
    assert isinstance(build_model("attention_unet", base_channels=8), AttentionUNet)
    dit = build_model("dit", hidden_size=16, depth=1, num_heads=2, patch_size=7)
    assert isinstance(dit, DiffusionTransformer) and dit.num_tokens == 16


def test_build_model_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unet.*fc_unet, attention_unet"):
        build_model("unet")


def test_count_parameters_by_hand() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), shared, shared)
    assert count_parameters(model) == (3 * 4 + 4) + (4 * 4 + 4)
    model[0].requires_grad_(False)
    assert count_parameters(model) == 4 * 4 + 4


def test_count_parameters_of_a_tiny_fc_unet() -> None:
    model = FCUNet(image_size=4, channels=1, widths=(6, 3))
    pixels = 16
    encoder = ((pixels + 1) * 6 + 6) + (6 * 3 + 3)
    decoder = 3 * 6 + 6
    output = 6 * pixels + pixels
    assert count_parameters(model) == encoder + decoder + output


def test_toy_mlp_counts_and_shapes() -> None:
    model = ToyMLP(dim=3, hidden=16, blocks=2, embedding_dim=8)
    embedding = 8 * 16 + 16 + 16 * 16 + 16
    lift, block, project = 3 * 16 + 16, 2 * (16 * 16 + 16), 16 * 3 + 3
    assert count_parameters(model) == embedding + lift + 2 * block + project
    x_t = torch.randn(5, 3)
    eps = model(x_t, torch.tensor([0, 1, 2, 500, 999]))
    assert eps.shape == (5, 3)
    changed = model(x_t, torch.tensor([999, 999, 999, 0, 0]))
    assert not torch.allclose(eps, changed), "the timestep must reach the output"


def test_toy_mlp_points_do_not_interact() -> None:
    model = ToyMLP()
    x_t, t = torch.randn(4, 2), torch.tensor([3, 30, 300, 900])
    torch.testing.assert_close(model(x_t, t)[1:2], model(x_t[1:2], t[1:2]))


@pytest.mark.parametrize(
    "x_t, t, message",
    [
        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), r"\(B, 2\)"),
        (torch.zeros(2, 1, 2), torch.zeros(2, dtype=torch.long), r"\(B, 2\)"),
        (torch.zeros(2, 2), torch.zeros(3, dtype=torch.long), r"\(2,\)"),
        (torch.zeros(2, 2), 5, r"t must be a tensor of shape \(2,\).*got int"),
        (torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2), "weights are float32 but x_t"),
    ],
)
def test_toy_mlp_checks_its_input(x_t: torch.Tensor, t: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ToyMLP()(x_t, t)


def test_attention_unet_is_its_expanding_path_after_its_contracting_path():
    model = AttentionUNet(image_size=8, base_channels=8, channel_multipliers=(1, 2), norm_groups=4)
    for parameter in model.parameters():  # no zero-initialised layer hides a term
        torch.nn.init.normal_(parameter, std=0.2)
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    h, skips, features = model.encode(x_t, t)
    assert [s.shape[1] for s in skips] == list(model.skip_channels)
    torch.testing.assert_close(model.decode(h, skips, features), model(x_t, t))
    assert len(skips) == len(model.skip_channels)  # decode works on a copy of the list
    shifted = torch.randn(2, 8, 8, 8)
    expected = model.decode(*model.encode(x_t, t, input_residual=shifted))
    assert (expected - model(x_t, t)).abs().max() > 1e-4


def test_a_network_without_its_expanding_path_only_encodes():
    model = AttentionUNet(image_size=8, base_channels=8, channel_multipliers=(1, 2), norm_groups=4)
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    h, skips, features = model.drop_expanding_path().encode(x_t, t)
    assert h.shape[1] == model.skip_channels[-1]  # the middle keeps the deepest skip's width
    with pytest.raises(ValueError, match="expanding path was dropped"):
        model(x_t, t)


def test_cross_attention_matches_softmax_formula_with_padding() -> None:
    layer = perturb(CrossAttention(channels=8, context_dim=6, num_heads=2, groups=4), scale=0.3)
    x, context = torch.randn(2, 8, 3, 5), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    query = layer.query(layer.norm(x).flatten(2).transpose(1, 2))  # (B, N, C)
    key, value = layer.key_value(context).chunk(2, dim=-1)  # (B, L, C) each
    heads = []
    for head in range(2):
        part = slice(4 * head, 4 * head + 4)
        scores = query[..., part] @ key[..., part].transpose(1, 2) / 2.0
        weights = torch.softmax(scores.masked_fill(~mask[:, None, :], -math.inf), dim=-1)
        heads.append(weights @ value[..., part])
    out = layer.output(torch.cat(heads, dim=-1)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(layer(x, context, mask), x + out)
    weights = layer.attention_weights(x, context, mask)  # (B, heads, N, L)
    assert weights.shape == (2, 2, 15, 4) and (weights[1, :, :, 1:] == 0).all()
    by_hand = torch.softmax(query[..., :4] @ key[..., :4].transpose(1, 2) / 2.0, dim=-1)
    torch.testing.assert_close(
        weights[0, 0, :, :3], by_hand[0, :, :3] / by_hand[0, :, :3].sum(-1, keepdim=True)
    )
    # Padding is not read: changing the masked tokens changes nothing.
    changed = torch.where(mask[..., None], context, torch.randn_like(context))
    torch.testing.assert_close(layer(x, changed, mask), layer(x, context, mask))


def test_cross_attention_to_one_token_adds_the_same_vector_to_every_pixel() -> None:
    layer = perturb(CrossAttention(channels=8, context_dim=6, num_heads=2, groups=4), scale=0.3)
    x, token = torch.randn(2, 8, 3, 5), torch.randn(2, 1, 6)
    value = layer.key_value(token)[..., 8:]  # (B, 1, C): the softmax over one key is 1
    added = layer.output(value).transpose(1, 2)[..., None]  # (B, C, 1, 1)
    torch.testing.assert_close(layer(x, token), x + added)


def test_context_reaches_every_cross_attention_layer_and_only_those() -> None:
    model = perturb(tiny_attention_unet(1, 8, context_dim=6), scale=0.2)
    layers = [m for m in model.modules() if isinstance(m, CrossAttention)]
    # One per self-attention layer except the middle's second stage, which has none.
    assert len(layers) == sum(isinstance(m, SelfAttention) for m in model.modules())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    context = torch.randn(2, 3, 6)
    out = model(x, t, context=context)
    assert not torch.allclose(out, model(x, t, context=context.flip(0)))
    for layer in layers:
        nn.init.zeros_(layer.output.weight), nn.init.zeros_(layer.output.bias)
    plain = tiny_attention_unet(1, 8)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("cross_attention" in name for name in unexpected)
    # With every cross-attention silenced, the network is the same one without them.
    torch.testing.assert_close(model(x, t, context=context), plain(x, t))


@pytest.mark.parametrize(
    ("context_dim", "context", "mask", "message"),
    [
        (None, torch.zeros(2, 3, 6), None, "takes no context"),
        (6, None, None, "cross-attends to a context"),
        (6, torch.zeros(2, 3, 5), None, r"context must have shape \(2, L, 6\)"),
        (6, torch.zeros(3, 3, 6), None, r"context must have shape \(2, L, 6\)"),
        (6, torch.zeros(2, 3, 6), torch.ones(2, 3), "context_mask must be a bool"),
        (6, torch.zeros(2, 3, 6), torch.tensor([[1, 0, 0], [0, 0, 0]]).bool(), "at least one"),
    ],
)
def test_bad_context_raises(context_dim, context, mask, message) -> None:
    model = tiny_attention_unet(1, 8, context_dim=context_dim)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), context=context, context_mask=mask)


def _group_norm(
    h: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    b, c, height, width = h.shape
    g = h.reshape(b, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    return g.reshape(b, c, height, width) * weight[None, :, None, None] + bias[None, :, None, None]


def _affine(layer: nn.Linear, v: torch.Tensor) -> torch.Tensor:
    return v @ layer.weight.T + layer.bias


def test_residual_block_matches_ho_et_al_appendix_b() -> None:
    # skip(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))) + P tau))), group norm written out by hand.
    block = perturb(ResidualBlock(4, 6, time_dim=5, dropout=0.0, groups=2), scale=0.3).eval()
    x, tau = torch.randn(2, 4, 3, 3), torch.randn(2, 5)
    h = F.silu(_group_norm(x, 2, block.norm1.weight, block.norm1.bias))
    h = F.conv2d(h, block.conv1.weight, block.conv1.bias, padding=1)
    h = h + _affine(block.time_projection, tau)[:, :, None, None]
    h = F.silu(_group_norm(h, 2, block.norm2.weight, block.norm2.bias))
    h = F.conv2d(h, block.conv2.weight, block.conv2.bias, padding=1)
    skip = F.conv2d(x, block.skip.weight, block.skip.bias)
    torch.testing.assert_close(block(x, tau), skip + h, atol=1e-5, rtol=1e-5)
    assert torch.equal(ResidualBlock(4, 4, 5, 0.0, 2)(x, tau), x)  # conv2 starts at zero


def test_fc_unet_sinusoidal_layer_norm_layer_by_hand() -> None:
    # One width: SiLU(LN(W x + b + P SiLU(time embedding))), then the output layer.
    model = FCUNet(
        image_size=4, widths=(6,), time_embedding="sinusoidal", layer_norm=True,
        time_embedding_dim=4,
    )  # fmt: skip
    model = perturb(model, scale=0.3)
    x, t = torch.randn(3, 1, 4, 4), torch.tensor([0, 250, 999])
    mlp = model.time_mlp.mlp
    tau = F.silu(_affine(mlp[2], F.silu(_affine(mlp[0], sinusoidal_embedding(t, 4)))))
    layer = model.encoder[0]
    z = _affine(layer.linear, x.flatten(1)) + _affine(layer.time_projection, tau)
    z = (z - z.mean(-1, keepdim=True)) / (z.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    h0 = F.silu(z * layer.norm.weight + layer.norm.bias)
    expected = _affine(model.output, h0).reshape(3, 1, 4, 4)
    assert expected.abs().max() > 0.1  # the perturbed output layer no longer hides the rest
    torch.testing.assert_close(model(x, t), expected, atol=1e-5, rtol=1e-5)


def test_toy_mlp_forward_by_hand() -> None:
    # h <- lift(x); h <- h + W2 SiLU(W1 SiLU(h + embedding)) per block; project(SiLU(h)).
    model = ToyMLP(dim=3, hidden=8, blocks=2, embedding_dim=4)
    x_t, t = torch.randn(5, 3), torch.tensor([0, 3, 100, 500, 999])
    mlp = model.time_embedding.mlp
    embedding = _affine(mlp[2], F.silu(_affine(mlp[0], sinusoidal_embedding(t, 4))))
    h = _affine(model.lift, x_t)
    for block in model.blocks:
        h = h + _affine(block[3], F.silu(_affine(block[1], F.silu(h + embedding))))
    torch.testing.assert_close(model(x_t, t), _affine(model.project[1], F.silu(h)))


@pytest.mark.parametrize(
    "build",
    [
        lambda: FCUNet(image_size=8, widths=(16,)),
        lambda: AttentionUNet(image_size=8, base_channels=8, channel_multipliers=(1, 2)),
        lambda: DiffusionTransformer(
            image_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2
        ),
    ],
)
def test_models_refuse_integer_images(build) -> None:
    # Raw 0..255 pixels used to pass silently through the fully connected U-net.
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="expects floating-point images.*got dtype torch.uint8"):
        build()(images, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("num_heads", [0, -1])
def test_attention_refuses_a_number_of_heads_below_one(num_heads: int) -> None:
    with pytest.raises(ValueError, match=f"num_heads must be an integer >= 1, got {num_heads}"):
        AttentionUNet(num_heads=num_heads)
