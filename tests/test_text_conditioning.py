"""Tests for diffusion_lib.text_conditioning: tokenizer, text encoder and the captioned U-net."""

from __future__ import annotations

import pytest
import torch
from test_models import perturb  # noise on every parameter, so zero-initialised layers speak
from torch import Tensor

from diffusion_lib import NoiseSchedule, ddim_sample, load_checkpoint, train
from diffusion_lib.losses import diffusion_loss
from diffusion_lib.reverse_process import predict_noise
from diffusion_lib.text_conditioning import (
    CaptionEncoder,
    CaptionVocabulary,
    TextConditionedUNet,
    pool_tokens,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["three", "seven", "left", "right", "of"]
CAPTIONS = ["three left of seven", "seven right of three", "seven left of three", "three"]
UNET = dict(image_size=8, base_channels=8, num_res_blocks=1, num_heads=2)
IMAGES, BATCH, STEPS = 256, 128, 8  # 1024 labels drawn: the share of dropped ones has SE 1.25%


def vocabulary() -> CaptionVocabulary:
    return CaptionVocabulary(WORDS, max_length=4)


def test_encode_starts_every_caption_and_pads_the_rest() -> None:
    tokens = vocabulary().encode(["three left of seven", "seven", ""])
    # words: 0 pad, 1 start, 2 three, 3 seven, 4 left, 5 right, 6 of
    expected = torch.tensor([[1, 2, 4, 6, 3], [1, 3, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert torch.equal(tokens, expected)
    assert vocabulary().decode(tokens) == ["three left of seven", "seven", ""]
    assert len(vocabulary()) == 7


@pytest.mark.parametrize(
    ("words", "captions", "message"),
    [
        (WORDS, ["three above seven"], r"outside the vocabulary: \['above'\]"),
        (WORDS, ["three left of seven seven"], "has 5 words; at most 4"),
        (WORDS, "three", "list of captions"),
        (["Three"], [], "lower case"),
        (["of", "of"], [], "distinct"),
        (["<start>"], [], "distinct"),
    ],
)
def test_bad_vocabularies_and_captions_raise(words, captions, message) -> None:
    with pytest.raises(ValueError, match=message):
        CaptionVocabulary(words, max_length=4).encode(captions)


def test_padding_is_invisible_to_the_encoder() -> None:
    encoder = CaptionEncoder(len(vocabulary()), length=5, dim=16, heads=2).eval()
    padded = vocabulary().encode(["three left of"])  # (1, 5) with one padding token
    context, mask = encoder(padded)
    trimmed, _ = encoder(padded[:, :4])
    assert torch.equal(mask, padded != 0)
    torch.testing.assert_close(context[:, :4], trimmed)
    by_hand = context[0, :4].mean(dim=0)
    torch.testing.assert_close(pool_tokens(context, mask)[0, 0], by_hand)


def test_a_bag_of_words_cannot_tell_the_order_and_positions_can() -> None:
    tokens = vocabulary().encode(["three left of seven", "seven left of three"])
    bag = CaptionEncoder(len(vocabulary()), 5, dim=16, heads=2, positional=False).eval()
    context, mask = bag(tokens)
    # The second caption swaps words 1 and 4, and so the encoder's outputs.
    torch.testing.assert_close(context[1], context[0][[0, 4, 2, 3, 1]])
    pooled = pool_tokens(context, mask)
    torch.testing.assert_close(pooled[0], pooled[1])
    ordered = CaptionEncoder(len(vocabulary()), 5, dim=16, heads=2).eval()
    pooled = pool_tokens(*ordered(tokens))
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3


@pytest.mark.parametrize("pooled", [False, True])
def test_labels_pick_rows_of_the_caption_table(pooled: bool) -> None:
    model = perturb(TextConditionedUNet(CAPTIONS, vocabulary(), pooled=pooled, text_dim=16, **UNET))
    assert model.num_classes == model.null_label == 4 and model.captions == CAPTIONS
    x, t, labels = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 999]), torch.tensor([2, 0, 4])
    # The same computation from the caption strings, through the parts.
    context, mask = model.text_encoder(vocabulary().encode([CAPTIONS[2], CAPTIONS[0], ""]))
    if pooled:  # the mean over the start token and the words
        lengths = [1 + len(CAPTIONS[2].split()), 1 + len(CAPTIONS[0].split()), 1]
        means = [context[i, :n].mean(dim=0) for i, n in enumerate(lengths)]
        context, mask = torch.stack(means)[:, None], None
    expected = model.unet(x, t, context=context, context_mask=mask)
    torch.testing.assert_close(model(x, t, labels), expected)
    torch.testing.assert_close(model(x, t), model(x, t, torch.full((3,), 4)))
    assert not torch.allclose(model(x, t, labels), model(x, t, torch.tensor([1, 3, 0])))


def test_guidance_combines_the_caption_and_the_empty_caption() -> None:
    model = perturb(TextConditionedUNet(CAPTIONS, vocabulary(), text_dim=16, **UNET))
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([40, 600]), torch.tensor([0, 3])
    guided = predict_noise(model, x, t, labels, guidance=1.5, null_label=model.null_label)
    torch.testing.assert_close(
        guided, 2.5 * model(x, t, labels) - 1.5 * model(x, t), atol=1e-5, rtol=1e-5
    )


def identifiable_images(count: int) -> Tensor:
    """(count, 1, 8, 8) images, image i filled with i / count: each batch row tells its index."""
    return (torch.arange(count) / count).reshape(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()


def recording_loss(seen: list[tuple[Tensor, Tensor]]):
    """The default objective, noting the dataset row (from the image) and the label of every
    batch element that the engine hands it."""

    def loss(model, schedule, x0, *, labels, **options):
        rows = (x0[:, 0, 0, 0] * IMAGES).round().long()
        seen.append((rows, labels.detach().clone()))
        return diffusion_loss(model, schedule, x0, labels=labels, **options)

    return loss


def guided_ddim_by_hand(model, schedule, x, labels, w: float, steps: int) -> Tensor:
    """Deterministic DDIM (eta = 0, x_0 clipped to [-1, 1], the paper's "leading" timesteps
    0, T/steps, ...) with ``(1 + w) eps(x, t, c) - w eps(x, t, empty caption)`` at every step,
    each estimate from its own call of the network."""
    abar, skip = schedule.alphas_cumprod, schedule.timesteps // steps
    empty = torch.full_like(labels, model.null_label)
    with torch.no_grad():
        for i in reversed(range(steps)):
            t = torch.full_like(labels, i * skip)
            eps = (1 + w) * model(x, t, labels) - w * model(x, t, empty)
            a, a_prev = abar[i * skip], abar[(i - 1) * skip] if i else torch.tensor(1.0)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def test_trains_with_label_dropout_and_samples_with_guidance(tmp_path) -> None:
    """Label dropout p shows the model the empty caption (row ``null_label``, the start token
    alone) in place of a share p of the batch's captions, and leaves the others the captions of
    their images; guided DDIM takes ``(1 + w) eps(c) - w eps(empty)`` at every step.

    The share is a binomial count over 1024 draws, so it must lie within 5 standard errors of
    p; an engine that never drops, drops with 1 - p or drops to another row fails. The guided
    sample must equal a hand-written DDIM loop that evaluates the rule with two separate calls
    of the network, and differ from the unguided sample and from guidance with w's sign flipped.
    """
    schedule = NoiseSchedule.from_name("linear", timesteps=100)
    model = TextConditionedUNet(CAPTIONS, vocabulary(), text_dim=16, timesteps=100, **UNET)
    images, labels, seen, p = identifiable_images(IMAGES), torch.arange(IMAGES) % 4, [], 0.2
    result = train(model, schedule, images, labels=labels, steps=STEPS, batch_size=BATCH,
                   label_dropout=p, device="cpu", progress=False, checkpoint_dir=tmp_path,
                   loss=recording_loss(seen))  # fmt: skip
    assert result.steps == STEPS
    assert model.text_encoder.token_embedding.weight.grad is not None
    rows, given = (torch.cat(parts) for parts in zip(*seen, strict=True))
    assert len(given) == STEPS * BATCH
    dropped = given == 4  # the row after the 4 captions
    share, standard_error = dropped.float().mean().item(), (p * (1 - p) / len(given)) ** 0.5
    assert abs(share - p) < 5 * standard_error, (share, p)
    assert torch.equal(given[~dropped], rows[~dropped] % 4)  # the kept captions are the images'
    assert torch.equal(model.caption_tokens[4], torch.tensor([1, 0, 0, 0, 0]))  # "" is <start>

    reloaded = TextConditionedUNet(CAPTIONS, vocabulary(), text_dim=16, timesteps=100, **UNET)
    load_checkpoint(tmp_path / "checkpoint.pt", reloaded)
    torch.testing.assert_close(reloaded.state_dict(), result.ema_model.state_dict())
    # A few steps barely move the zero-initialised output layer: perturb the weights so that
    # the caption and the empty caption give clearly different estimates.
    guided_model = perturb(reloaded).eval()
    x_T = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))

    def sample(w: float) -> Tensor:
        return ddim_sample(guided_model, schedule, (4, 1, 8, 8), steps=5, x_T=x_T,
                           labels=labels[:4], guidance=w, null_label=model.null_label)  # fmt: skip

    samples = sample(2.0)
    assert samples.shape == (4, 1, 8, 8) and torch.isfinite(samples).all()
    by_hand = guided_ddim_by_hand(guided_model, schedule, x_T, labels[:4], 2.0, steps=5)
    torch.testing.assert_close(samples, by_hand, atol=1e-5, rtol=1e-5)
    flipped = guided_ddim_by_hand(guided_model, schedule, x_T, labels[:4], -2.0, steps=5)
    assert (samples - sample(0.0)).abs().max() > 0.1 and (samples - flipped).abs().max() > 0.1


def test_without_label_dropout_every_caption_reaches_the_model() -> None:
    """With ``label_dropout=0`` no caption is replaced: the model sees each image's own."""
    schedule = NoiseSchedule.from_name("linear", timesteps=100)
    model = TextConditionedUNet(CAPTIONS, vocabulary(), text_dim=16, timesteps=100, **UNET)
    seen = []
    train(model, schedule, identifiable_images(IMAGES), labels=torch.arange(IMAGES) % 4,
          steps=2, batch_size=BATCH, device="cpu", progress=False, loss=recording_loss(seen))  # fmt: skip
    rows, given = (torch.cat(parts) for parts in zip(*seen, strict=True))
    assert len(given) == 2 * BATCH and torch.equal(given, rows % 4)
    assert torch.equal(rows.sort().values, torch.arange(IMAGES))  # one epoch: every image once


@pytest.mark.parametrize(
    ("captions", "options", "message"),
    [
        ([], {}, "non-empty list"),
        ("three", {}, "non-empty list"),
        (CAPTIONS, {"num_classes": 3}, "num_classes are set by the captions"),
        (CAPTIONS, {"context_dim": 3}, "context_dim are set by the captions"),
        (["three below seven"], {}, "outside the vocabulary"),
    ],
)
def test_bad_models_raise(captions, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        TextConditionedUNet(captions, vocabulary(), text_dim=16, **UNET, **options)


def test_bad_labels_raise() -> None:
    model = TextConditionedUNet(CAPTIONS, vocabulary(), text_dim=16, **UNET)
    with pytest.raises(ValueError, match=r"labels must lie in 0..4"):
        model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="vocabulary must be a CaptionVocabulary"):
        TextConditionedUNet(CAPTIONS, WORDS, **UNET)


def test_any_caption_of_the_vocabulary_can_be_asked_for() -> None:
    model = perturb(TextConditionedUNet(CAPTIONS[:2], vocabulary(), text_dim=16, **UNET))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    before = model(x, t, torch.tensor([1, 2]))  # caption 1 and the empty caption
    rows = model.caption_rows(
        ["seven right of three", "Three left of  seven", "seven left of three"]
    )
    assert rows.tolist() == [1, 0, 2] and model.null_label == 3
    assert model.captions == [*CAPTIONS[:2], "seven left of three"]
    torch.testing.assert_close(model(x, t, torch.tensor([1, 3])), before)
    bigger = TextConditionedUNet(CAPTIONS[:3], vocabulary(), text_dim=16, **UNET)
    bigger.load_state_dict(model.state_dict())  # the weights do not hold the table
    torch.testing.assert_close(bigger(x, t, rows[2:].repeat(2)), model(x, t, rows[2:].repeat(2)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.caption_rows(["three above seven"])
