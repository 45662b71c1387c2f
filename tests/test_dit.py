"""Tests for diffusion_lib.models.dit: patches, position embeddings, adaLN-Zero and training.

Shapes, gradients, timestep and label handling and input checks that every noise predictor
shares are tested in test_models.py, which includes the DiT in its parametrisation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_lib.models import DiffusionTransformer, build_model, count_parameters
from diffusion_lib.models.dit import (
    DiTBlock,
    FinalLayer,
    patchify,
    sincos_position_embedding,
    unpatchify,
)
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.training import train


def perturbed(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Add noise to every parameter, so the zero-initialised gates no longer hide the rest."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


# --- patches --------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "image_size", "patch_size"), [(1, 28, 4), (3, 32, 8), (1, 28, 7), (3, 28, 2)])  # fmt: skip
def test_unpatchify_inverts_patchify(channels: int, image_size: int, patch_size: int) -> None:
    images = torch.randn(2, channels, image_size, image_size)
    tokens = patchify(images, patch_size)
    assert tokens.shape == (2, (image_size // patch_size) ** 2, patch_size**2 * channels)
    assert torch.equal(unpatchify(tokens, patch_size, channels, image_size), images)


def test_a_token_holds_its_patch_row_by_row() -> None:
    images = torch.randn(2, 3, 12, 12)
    tokens = patchify(images, 4)
    for row, column in [(0, 0), (1, 2), (2, 1)]:
        patch = images[:, :, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4]
        by_hand = torch.stack(
            [patch[:, c, i, j] for i in range(4) for j in range(4) for c in range(3)], dim=1
        )
        assert torch.equal(tokens[:, 3 * row + column], by_hand)


# --- position embeddings --------------------------------------------------------------------


@pytest.mark.parametrize(("row", "column"), [(0, 0), (1, 5), (6, 2)])
def test_position_embedding_matches_the_sine_cosine_formula(row: int, column: int) -> None:
    grid, dim = 7, 16
    quarter = dim // 4  # frequencies per axis: sines and cosines of the row, then the column
    expected = []
    for position in (row, column):
        angles = [position / 10000 ** (k / quarter) for k in range(quarter)]
        expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
    embedding = sincos_position_embedding(grid, dim)
    assert embedding.shape == (grid * grid, dim)
    torch.testing.assert_close(
        embedding[row * grid + column], torch.tensor(expected), atol=1e-6, rtol=0
    )


def test_position_embeddings_are_distinct_and_fixed() -> None:
    model = DiffusionTransformer(hidden_size=16, depth=1, num_heads=2)
    embedding = model.position_embedding
    assert torch.cdist(embedding, embedding).add(torch.eye(49)).min() > 0.1
    names = [name for name, _ in model.named_parameters()]
    assert not any("position" in name for name in names)
    assert "position_embedding" not in model.state_dict()


# --- adaLN-Zero -----------------------------------------------------------------------------


def test_every_block_is_the_identity_at_initialisation() -> None:
    model = DiffusionTransformer(hidden_size=16, depth=3, num_heads=2)
    tokens, condition = torch.randn(2, 49, 16), torch.randn(2, 16)
    for block in model.blocks:
        assert torch.equal(block(tokens, condition), tokens)
    x_t = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x_t, torch.tensor([0, 999])), torch.zeros_like(x_t))


def block_by_hand(block: DiTBlock, x: torch.Tensor, c: torch.Tensor, heads: int) -> torch.Tensor:
    """adaLN-Zero block of Peebles & Xie (2023, fig. 3) with attention written as softmax."""
    width = x.shape[-1]
    weights, bias = block.modulation[1].weight, block.modulation[1].bias
    shift1, scale1, gate1, shift2, scale2, gate2 = (F.silu(c) @ weights.T + bias).split(width, -1)

    def attention(h: torch.Tensor) -> torch.Tensor:
        q, k, v = (h @ block.attention.qkv.weight.T + block.attention.qkv.bias).split(width, -1)
        q, k, v = (z.unflatten(-1, (heads, width // heads)).transpose(1, 2) for z in (q, k, v))
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        merged = (scores @ v).transpose(1, 2).flatten(2)
        return merged @ block.attention.output.weight.T + block.attention.output.bias

    def normalise(h: torch.Tensor) -> torch.Tensor:
        return (h - h.mean(-1, keepdim=True)) / (
            h.var(-1, unbiased=False, keepdim=True) + 1e-6
        ).sqrt()

    x = x + gate1[:, None] * attention(normalise(x) * (1 + scale1[:, None]) + shift1[:, None])
    h = normalise(x) * (1 + scale2[:, None]) + shift2[:, None]
    return x + gate2[:, None] * block.mlp(h)


def test_a_perturbed_block_matches_the_adaln_formula() -> None:
    block = perturbed(DiTBlock(hidden_size=16, num_heads=4, mlp_ratio=2.0))
    tokens, condition = torch.randn(3, 10, 16), torch.randn(3, 16)
    expected = block_by_hand(block, tokens, condition, heads=4)
    torch.testing.assert_close(block(tokens, condition), expected, atol=1e-5, rtol=1e-5)


def test_labels_enter_through_the_conditioning_vector() -> None:
    model = perturbed(DiffusionTransformer(hidden_size=16, depth=1, num_heads=2, num_classes=10))
    t, labels = torch.tensor([5, 700]), torch.tensor([3, 10])
    expected = model.time_embedding(t) + model.label_embedding.weight[[3, 10]]
    torch.testing.assert_close(model.condition(t, labels), expected)


# --- symmetry -------------------------------------------------------------------------------


def test_without_position_embeddings_permuting_patches_permutes_the_output() -> None:
    """Only the position embedding tells the transformer where a patch is: without it the
    network is permutation-equivariant over tokens, so it cannot know the image's layout."""
    model = perturbed(DiffusionTransformer(hidden_size=16, depth=2, num_heads=2)).eval()
    x_t, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 900])
    permutation = torch.randperm(49, generator=torch.Generator().manual_seed(0))

    def shuffle(images: torch.Tensor) -> torch.Tensor:
        return unpatchify(patchify(images, 4)[:, permutation], 4, 1, 28)

    with torch.no_grad():
        with_positions = (model(shuffle(x_t), t), shuffle(model(x_t, t)))
        model.position_embedding = torch.zeros_like(model.position_embedding)
        without_positions = (model(shuffle(x_t), t), shuffle(model(x_t, t)))
    torch.testing.assert_close(*without_positions, atol=1e-5, rtol=1e-5)
    assert (with_positions[0] - with_positions[1]).abs().max() > 1e-3


# --- sizes and arguments --------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [None, 10])
def test_parameter_count_by_hand(num_classes: int | None) -> None:
    width, depth, patch, channels, mlp = 8, 2, 7, 3, 16
    model = DiffusionTransformer(
        image_size=28, channels=channels, patch_size=patch, hidden_size=width, depth=depth,
        num_heads=2, mlp_ratio=2.0, num_classes=num_classes,
    )  # fmt: skip
    patch_dim = patch * patch * channels

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    patch_embedding = linear(patch_dim, width)
    time_embedding = linear(width, width) + linear(width, width)
    label_embedding = 0 if num_classes is None else (num_classes + 1) * width
    attention = linear(width, 3 * width) + linear(width, width)
    block = attention + linear(width, mlp) + linear(mlp, width) + linear(width, 6 * width)
    final = linear(width, 2 * width) + linear(width, patch_dim)  # layer norms have no weights
    expected = patch_embedding + time_embedding + label_embedding + depth * block + final
    assert count_parameters(model) == expected


def test_build_model_makes_a_dit_with_the_papers_conventions() -> None:
    model = build_model("dit", hidden_size=32, depth=2, num_heads=4, patch_size=2)
    assert isinstance(model, DiffusionTransformer)
    assert model.num_tokens == 14 * 14
    assert model.blocks[0].mlp[0].out_features == 4 * 32  # mlp_ratio 4 by default


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(patch_size=5), "patch_size=5 must divide image_size=28"),
        (dict(hidden_size=30, num_heads=4), "num_heads=4 must divide hidden_size=30"),
        (dict(hidden_size=18, num_heads=2), "hidden_size=18 must be divisible by 4"),
        (dict(depth=0), "depth must be an integer >= 1"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
        (dict(num_classes=0), "num_classes"),
        (dict(patch_size=0), "patch_size"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiffusionTransformer(**{"hidden_size": 16, "num_heads": 2, **kwargs})


# --- training -------------------------------------------------------------------------------


def test_a_few_training_steps_lower_the_loss() -> None:
    """At initialisation the prediction is 0 and the loss E||eps||^2 per pixel is about 1; a
    few dozen steps on images of one shape must bring it down."""
    frame = torch.full((1, 28, 28), -1.0)
    frame[:, 8:20, 8:20] = 1.0
    images = frame.expand(64, -1, -1, -1).clone()
    model = DiffusionTransformer(hidden_size=32, depth=2, num_heads=4, patch_size=7)
    result = train(
        model, NoiseSchedule.from_name("linear"), images, steps=80, batch_size=32, lr=3e-3, warmup_steps=5,
        device="cpu", progress=False, compile=False,
    )  # fmt: skip
    losses = torch.tensor(result.history.loss)
    assert 0.7 < losses[:5].mean() < 1.3
    assert losses[-10:].mean() < 0.5 * losses[:5].mean()


def test_the_final_layer_is_adaln_without_a_gate_then_linear() -> None:
    layer = perturbed(FinalLayer(hidden_size=8, patch_dim=6), scale=0.3)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 8)
    weight, bias = layer.modulation[1].weight, layer.modulation[1].bias
    shift, scale = (F.silu(c) @ weight.T + bias).split(8, dim=-1)
    variance = x.var(-1, unbiased=False, keepdim=True)
    normed = (x - x.mean(-1, keepdim=True)) / (variance + 1e-6).sqrt()
    modulated = normed * (1 + scale[:, None]) + shift[:, None]
    expected = modulated @ layer.linear.weight.T + layer.linear.bias
    torch.testing.assert_close(layer(x, c), expected, atol=1e-5, rtol=1e-5)
