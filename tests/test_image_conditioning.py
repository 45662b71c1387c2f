"""Image conditioning: concatenation (SR3), ControlNet, the conditional loss and bound samplers."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib import AttentionUNet, FCUNet, NoiseSchedule, ddim_sample, ddpm_sample, train
from diffusion_lib.image_conditioning import (
    ConcatConditioned,
    ControlledUNet,
    ControlNet,
    ImageConditionedLoss,
    with_condition,
)
from diffusion_lib.models.attention_unet import _Stage

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(
    image_size=8, base_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=4
)


def _randomised(module: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
    """Every weight drawn at random, the zero-initialised ones included, so no output is
    trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(std * torch.randn(parameter.shape, generator=generator))
    return module


def _base(seed: int = 0) -> AttentionUNet:
    return _randomised(AttentionUNet(**SMALL), seed).double()


class ExactDenoiser(nn.Module):
    """``eps(x_t, t, c) = (x_t - sqrt(a_t) c) / sqrt(1 - a_t)``: the noise exactly, when the
    condition is the clean image c = x_0 (Ho et al. 2020, eq. 4 solved for eps)."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.alphas_cumprod = schedule.alphas_cumprod
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the samplers a device to read

    def forward(self, x_t: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        alpha_bar = self.alphas_cumprod.to(x_t)[t.long()].view(-1, 1, 1, 1)
        return (x_t - alpha_bar.sqrt() * condition) / (1 - alpha_bar).sqrt() + self.anchor


def _reference_controlled(
    base: AttentionUNet, control: ControlNet, x_t: Tensor, t: Tensor, c: Tensor, scale: float
) -> Tensor:
    """The controlled network written out module by module (Zhang, Rao & Agrawala 2023),
    without AttentionUNet.encode or decode."""

    def contracting(net: AttentionUNet, h: Tensor, features: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = [h]
        for module in net.down:
            h = module(h, features) if isinstance(module, _Stage) else module(h)
            skips.append(h)
        for module in net.middle:
            h = module(h, features)
        return h, skips

    features = F.silu(base.time_embedding(t))
    h, skips = contracting(base, base.input_conv(x_t), features)
    copy = control.encoder
    copy_features = F.silu(copy.time_embedding(t))
    h_c, skips_c = contracting(copy, copy.input_conv(x_t) + control.hint(c), copy_features)
    h = h + scale * control.middle_projection(h_c)
    skips = [
        s + scale * z(s_c)
        for s, z, s_c in zip(skips, control.skip_projections, skips_c, strict=True)
    ]
    for module in base.up:
        if isinstance(module, _Stage):
            h = module(torch.cat([h, skips.pop()], dim=1), features)
        else:
            h = module(h)
    return base.output(h)


def _inputs(batch: int = 3, condition_channels: int = 1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 1, 8, 8, generator=generator, dtype=torch.float64)
    c = torch.randn(batch, condition_channels, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 400, 999][:batch])
    return x_t, t, c


def test_concatenation_feeds_the_stacked_channels_to_the_network():
    network = _randomised(AttentionUNet(**{**SMALL, "channels": 3, "out_channels": 1}), 1).double()
    model = ConcatConditioned(network, condition_channels=2)
    x_t, t, c = _inputs(condition_channels=2)
    torch.testing.assert_close(model(x_t, t, c), network(torch.cat([x_t, c], dim=1), t))
    changed = c.clone()
    changed[0] += 1.0
    moved = (model(x_t, t, changed) - model(x_t, t, c)).flatten(1).abs().amax(1)
    assert moved[0] > 1e-3 and moved[1:].max() == 0  # each image reads its own condition


def test_loss_vanishes_for_the_exact_denoiser_of_the_clean_image(linear):
    x0 = torch.rand(64, 1, 8, 8, dtype=torch.float64) * 2 - 1
    loss = ImageConditionedLoss(lambda x, generator: x)(
        ExactDenoiser(linear).double(), linear, x0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert loss.item() < 1e-20
    blind = ImageConditionedLoss(lambda x, generator: torch.zeros_like(x))(
        ExactDenoiser(linear).double(), linear, x0, generator=torch.Generator().manual_seed(0)
    )
    assert blind.item() > 0.1  # without the image, the noise cannot be read off x_t


def test_loss_matches_the_objective_written_out(linear):
    x0 = torch.rand(16, 1, 8, 8, dtype=torch.float64) * 2 - 1
    network = _randomised(AttentionUNet(**{**SMALL, "channels": 2, "out_channels": 1}), 2).double()
    model = ConcatConditioned(network)

    def degrade(x: Tensor, generator: torch.Generator | None) -> Tensor:
        low = F.avg_pool2d(x, 2)
        low = low + 0.1 * torch.randn(low.shape, generator=generator, dtype=x.dtype)
        return F.interpolate(low, scale_factor=2, mode="nearest")

    loss = ImageConditionedLoss(degrade)(
        model, linear, x0, generator=torch.Generator().manual_seed(5)
    )
    generator = torch.Generator().manual_seed(5)  # the same draws, in the same order
    c = degrade(x0, generator)
    t = torch.randint(0, 1000, (16,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    alpha_bar = linear.alphas_cumprod.to(torch.float64)[t].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps  # as SR3 noises x_0
    expected = (network(torch.cat([x_t, c], dim=1), t) - eps).pow(2).mean()
    torch.testing.assert_close(loss, expected.float())


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_bound_exact_denoiser_samples_its_condition(linear, sampler):
    # With x0_hat = c at every step, DDIM lands on c, and so does the ancestral chain: its
    # last step is the posterior mean at t = 0, which is x0_hat itself, with no noise.
    c = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 1.6 - 0.8
    model = with_condition(ExactDenoiser(linear).double(), c)
    generator = torch.Generator().manual_seed(3)
    x_T = torch.randn(c.shape, generator=generator, dtype=torch.float64)
    if sampler == "ddpm":
        sample = ddpm_sample(model, linear, tuple(c.shape), x_T=x_T, steps=50, generator=generator)
    else:
        sample = ddim_sample(model, linear, tuple(c.shape), x_T=x_T, steps=20)
    torch.testing.assert_close(sample, c)


def test_control_starts_as_the_base_and_only_its_zero_convolutions_learn_first():
    base = _base()
    controlled = ControlledUNet(base).double()
    x_t, t, c = _inputs()
    reference = _base()(x_t, t)
    output = controlled(x_t, t, c)
    torch.testing.assert_close(output, reference)  # zero convolutions: exactly the base
    output.pow(2).sum().backward()
    assert all(p.grad is None for p in base.parameters())  # frozen
    control = controlled.control
    zero_convolutions = [*control.skip_projections, control.middle_projection]
    for projection in zero_convolutions:
        assert projection.weight.grad.abs().max() > 0  # d(W f)/dW = f, not zero
    for name, parameter in [*control.encoder.named_parameters(), *control.hint.named_parameters()]:
        # every path from these to the output passes a zero weight, so their gradient is zero
        assert parameter.grad is None or parameter.grad.abs().max() == 0, name


def test_a_class_conditional_base_keeps_its_labels_under_control():
    base = _randomised(AttentionUNet(**SMALL, num_classes=3), 4).double()
    controlled = ControlledUNet(base).double()
    x_t, t, c = _inputs()
    labels = torch.tensor([0, 2, base.null_label])
    torch.testing.assert_close(controlled(x_t, t, c, labels), base(x_t, t, labels))
    _randomised(controlled.control, 5)
    other = torch.tensor([1, 1, 1])
    _, middle = controlled.control(x_t, t, c, labels)
    _, middle_other = controlled.control(x_t, t, c, other)
    assert (middle - middle_other).abs().max() > 1e-3  # the control reads the labels too


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_controlled_output_matches_the_network_written_out(scale):
    base = _base()
    controlled = ControlledUNet(base, condition_channels=2, control_scale=scale).double()
    _randomised(controlled.control, 7)
    x_t, t, c = _inputs(condition_channels=2)
    expected = _reference_controlled(base, controlled.control, x_t, t, c, scale)
    torch.testing.assert_close(controlled(x_t, t, c), expected)
    assert (expected - base(x_t, t)).abs().max() > 1e-3  # the control does something


def test_scale_zero_is_the_base_and_the_stored_control_reloads():
    base = _base()
    controlled = ControlledUNet(base).double()
    _randomised(controlled.control, 8)
    x_t, t, c = _inputs()
    controlled.control_scale = 0.0
    torch.testing.assert_close(controlled(x_t, t, c), base(x_t, t))
    controlled.control_scale = 1.0
    fresh = ControlledUNet(_base()).double()
    fresh.control.load_state_dict(controlled.control.state_dict())
    torch.testing.assert_close(fresh(x_t, t, c), controlled(x_t, t, c))


def test_training_a_control_leaves_the_base_unchanged(linear):
    base = _randomised(AttentionUNet(**SMALL), 9)
    before = {name: value.clone() for name, value in base.state_dict().items()}
    controlled = ControlledUNet(base)
    projection_before = controlled.control.middle_projection.weight.clone()
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    loss = ImageConditionedLoss(
        lambda x, generator: F.avg_pool2d(x, 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    )
    result = train(controlled, linear, images, loss=loss, steps=3, batch_size=8, device="cpu",
                   progress=False, warmup_steps=0)  # fmt: skip
    assert result.steps == 3
    for name, value in base.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert (controlled.control.middle_projection.weight - projection_before).abs().max() > 0


def test_guided_estimate_extrapolates_from_the_null_condition():
    network = _randomised(AttentionUNet(**{**SMALL, "channels": 2, "out_channels": 1}), 3).double()
    model = ConcatConditioned(network)
    x_t, t, c = _inputs()
    guided = with_condition(model, c, guidance=1.5)(x_t, t)
    # Ho & Salimans 2021, eq. 6, with the null condition an image of zeros
    expected = 2.5 * model(x_t, t, c) - 1.5 * model(x_t, t, torch.zeros_like(c))
    torch.testing.assert_close(guided, expected)
    torch.testing.assert_close(with_condition(model, c)(x_t, t), model(x_t, t, c))


class ConditionRecorder(nn.Module):
    """Predicts eps = 0 and keeps the conditions it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[Tensor] = []

    def forward(self, x_t: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        self.seen.append(condition)
        return self.weight * x_t


@pytest.mark.parametrize("probability", [0.0, 0.3])
def test_condition_dropout_nulls_the_requested_share(linear, probability):
    recorder, count = ConditionRecorder(), 20_000
    loss = ImageConditionedLoss(lambda x, generator: torch.ones_like(x), probability)
    loss(recorder, linear, torch.zeros(count, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    (seen,) = recorder.seen
    dropped = (seen.flatten(1) == 0).all(dim=1).float()
    assert bool(((seen.flatten(1) == 0) | (seen.flatten(1) == 1)).all())  # zeros or untouched
    # Monte Carlo: a binomial share, within 5 standard errors
    assert abs(dropped.mean().item() - probability) <= 5 * (0.3 * 0.7 / count) ** 0.5


def test_model_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match="copies an AttentionUNet"):
        ControlNet(FCUNet())
    with pytest.raises(ValueError, match="leaves none for x_t"):
        ConcatConditioned(AttentionUNet(**SMALL), condition_channels=1)
    with pytest.raises(ValueError, match="condition_channels"):
        ControlledUNet(AttentionUNet(**SMALL), condition_channels=0)
    with pytest.raises(ValueError, match="control_scale"):
        ControlledUNet(AttentionUNet(**SMALL), control_scale=-1.0)
    controlled = ControlledUNet(AttentionUNet(**SMALL)).double()
    x_t, t, c = _inputs()
    with pytest.raises(ValueError, match="must have 1 channels, got 2"):
        controlled(x_t, t, torch.cat([c, c], dim=1))
    with pytest.raises(ValueError, match="batch size and image size"):
        controlled(x_t, t, c[:, :, :4, :4])
    with pytest.raises(ValueError, match="batch size and image size"):
        controlled(x_t, t, c[:2])
    with pytest.raises(ValueError, match="image batch"):
        controlled(x_t, t, c[0])


def test_loss_and_binding_errors_say_what_is_allowed(linear):
    with pytest.raises(ValueError, match="make_condition must be a callable"):
        ImageConditionedLoss("low resolution")
    with pytest.raises(ValueError, match="condition_dropout"):
        ImageConditionedLoss(lambda x, generator: x, condition_dropout=1.5)
    with pytest.raises(ValueError, match="guidance"):
        with_condition(ExactDenoiser(linear), torch.zeros(2, 1, 8, 8), guidance=-1.0)
    with pytest.raises(ValueError, match="batch of condition images"):
        with_condition(ExactDenoiser(linear), [1, 2])
    bound = with_condition(ExactDenoiser(linear), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="one sample per condition"):
        ddim_sample(bound, linear, (3, 1, 8, 8), steps=2)
