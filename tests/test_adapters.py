"""LoRA adapters: the low-rank update in closed form, merging, scaling and freezing."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from diffusion_lib import AttentionUNet
from diffusion_lib.adapters import (
    LoRAConv2d,
    LoRALinear,
    add_lora,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    set_lora_scale,
)


def _randomise_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every B a non-zero value, as training would, so the update is not trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lora_parameters(model):
            parameter.copy_(
                torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            )


def test_linear_update_is_the_low_rank_product():
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    layer = LoRALinear(base, rank=2, alpha=3.0)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x))  # B starts at zero
    _randomise_adapters(layer)
    a, b = layer.down.weight, layer.up.weight  # (2, 6), (5, 2)
    expected = x @ (base.weight + 1.5 * b @ a).T + base.bias  # Hu et al. eq. 3, alpha / r = 1.5
    torch.testing.assert_close(layer(x), expected)
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 2


def test_convolution_update_is_a_rank_r_kernel():
    torch.manual_seed(1)
    base = nn.Conv2d(3, 8, 3, stride=2, padding=1).double()
    layer = LoRAConv2d(base, rank=2, alpha=2.0)
    _randomise_adapters(layer)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    # The kernel written out: out[o] = sum_r B[o, r] * A[r] with A the r-th down kernel.
    a, b = layer.down.weight, layer.up.weight[:, :, 0, 0]  # (2, 3, 3, 3), (8, 2)
    kernel = base.weight + torch.einsum("or,rikl->oikl", b, a)
    expected = F.conv2d(x, kernel, base.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), expected)
    assert torch.linalg.matrix_rank(layer.delta_weight().flatten(1)) == 2


def _small_unet() -> AttentionUNet:
    torch.manual_seed(2)
    model = AttentionUNet(
        base_channels=8, num_res_blocks=1, attention_resolutions=(7,), num_classes=3
    )
    with torch.no_grad():
        model.output[2].weight.normal_(std=0.05)  # a non-zero output, so changes are visible
    return model.double().eval()


def _inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(3)
    x_t = torch.randn(batch, 1, 28, 28, generator=generator, dtype=torch.float64)
    return x_t, torch.tensor([10, 500, 990]), torch.tensor([0, 2, 3])


def test_add_lora_starts_at_the_base_model_and_trains_only_the_adapters():
    model = _small_unet()
    before = model(*_inputs())
    total = sum(p.numel() for p in model.parameters())
    names = add_lora(model, rank=2)
    assert "input_conv" in names and "time_embedding.mlp.0" in names
    assert not any(".down" in name or ".up." in name for name in names)
    torch.testing.assert_close(model(*_inputs()), before)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    assert 0 < sum(p.numel() for p in trainable) < 0.2 * total
    model(*_inputs()).square().sum().backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in trainable)


def test_merge_and_scale_reproduce_the_adapted_model():
    model = _small_unet()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(*_inputs())
    add_lora(model, rank=3, alpha=1.5)
    _randomise_adapters(model, seed=4)
    with torch.no_grad():
        for parameter in lora_parameters(model):
            parameter.mul_(0.05)
    adapted = model(*_inputs())
    assert (adapted - before).abs().max() > 1e-3
    set_lora_scale(model, 0.0)
    torch.testing.assert_close(model(*_inputs()), before)
    set_lora_scale(model, 1.0)
    adapters = lora_state_dict(model)
    assert all(key.endswith(("down.weight", "up.weight")) for key in adapters)
    rebuilt = _small_unet()  # the base model again, adapted, with only the adapters loaded
    add_lora(rebuilt, rank=3, alpha=1.5)
    missing, unexpected = rebuilt.load_state_dict(adapters, strict=False)
    assert not unexpected and set(adapters).isdisjoint(missing)
    torch.testing.assert_close(rebuilt(*_inputs()), adapted)
    merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in model.modules())
    torch.testing.assert_close(model(*_inputs()), adapted)
    plain = _small_unet()
    plain.load_state_dict(model.state_dict())  # the original architecture again
    torch.testing.assert_close(plain(*_inputs()), adapted)
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, base_state[k])]
    assert "input_conv.weight" in changed and "input_conv.bias" not in changed


def test_targets_choose_the_layers():
    model = _small_unet()
    names = add_lora(model, rank=1, targets=["input_conv", "middle.0.attention.qkv"])
    assert names == ["input_conv", "middle.0.attention.qkv"]
    assert isinstance(model.input_conv, LoRAConv2d)
    assert isinstance(model.middle[0].attention.qkv, LoRALinear)
    assert len(lora_parameters(model)) == 4


def test_multihead_attention_projection_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 4))
    model.attention = nn.MultiheadAttention(4, 2)
    assert add_lora(model, rank=1) == ["0"]  # out_proj is read as a weight, never called


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: add_lora(m, rank=0), "rank"),
        (lambda m: add_lora(m, rank=2, alpha=-1.0), "alpha"),
        (lambda m: add_lora(m, rank=2, targets=["nope"]), "cannot adapt"),
        (lambda m: add_lora(m, rank=2, targets="output.0"), "cannot adapt"),  # a GroupNorm
        (lambda m: (add_lora(m, rank=2), add_lora(m, rank=2)), "already has LoRA"),
        (lambda m: set_lora_scale(m, 1.0), "no LoRA adapters"),
        (lambda m: merge_lora(m), "no LoRA adapters"),
        (lambda m: add_lora(nn.Sequential(nn.ReLU()), rank=1), "no linear layer"),
        (lambda m: LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), 1, 1.0), "groups=1"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(_small_unet())


def test_a_scale_between_zero_and_one_scales_the_update_and_merging_keeps_it() -> None:
    """set_lora_scale(s): y = x (W + s (alpha / r) B A)^T + b; merged() bakes in the same s.
    With alpha omitted, alpha = r and the update is B A itself."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    layer = LoRALinear(base, rank=2, alpha=3.0)
    _randomise_adapters(layer)
    set_lora_scale(layer, 0.4)
    x = torch.randn(4, 6, dtype=torch.float64)
    a, b = layer.down.weight, layer.up.weight
    expected = x @ (base.weight + 0.4 * 1.5 * b @ a).T + base.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merged()(x), expected)

    model = nn.Sequential(nn.Linear(6, 5).double())
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    add_lora(model, rank=2)  # alpha = None: alpha / r = 1
    _randomise_adapters(model, seed=1)
    a, b = model[0].down.weight, model[0].up.weight
    torch.testing.assert_close(model(x), x @ (weight + b @ a).T + bias)


@pytest.mark.parametrize(
    ("rank", "alpha", "message"), [(0, 1.0, "rank must be"), (2, -1.0, "alpha")]
)
def test_an_adapter_built_directly_checks_its_rank_and_alpha(rank, alpha, message) -> None:
    # rank = 0 used to fail with a ZeroDivisionError, and alpha = -1 turned the update around.
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(4, 3), rank=rank, alpha=alpha)
    with pytest.raises(ValueError, match=message):
        LoRAConv2d(nn.Conv2d(2, 3, 3), rank=rank, alpha=alpha)
