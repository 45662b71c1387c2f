"""Tests for diffusion_lib.digit_pairs: captions, scenes, and reading scenes back."""

from __future__ import annotations

import pytest
import torch

from diffusion_lib import load_images
from diffusion_lib.digit_pairs import (
    caption,
    make_scenes,
    place_side_by_side,
    read_scenes,
    scene_captions,
    scene_vocabulary,
)
from diffusion_lib.reference_classifier import get_classifier


def test_both_phrasings_name_the_same_scene() -> None:
    assert caption(3, 7) == "three left of seven"
    assert caption(3, 7, "right") == "seven right of three"
    with pytest.raises(ValueError, match="relation must be 'left' or 'right'"):
        caption(3, 7, "above")


def test_the_caption_table_holds_every_ordered_pair_once_per_phrasing() -> None:
    assert scene_captions().captions[:2] == ["zero left of one", "zero left of two"]
    table = scene_captions(("left", "right"))
    assert len(table.captions) == len(set(table.captions)) == 180
    pairs = set(zip(table.left.tolist(), table.right.tolist(), strict=True))
    assert pairs == {(a, b) for a in range(10) for b in range(10) if a != b}
    rows = table.pair_index(3, 7).tolist()
    assert [table.captions[r] for r in rows] == ["three left of seven", "seven right of three"]
    assert scene_captions().pair_index(3, 7).tolist() == [rows[0] // 2]
    tokens = scene_vocabulary().encode(table.captions)  # every caption is in the vocabulary
    assert scene_vocabulary().decode(tokens) == table.captions
    with pytest.raises(ValueError, match="distinct phrasings"):
        scene_captions(("left", "left"))


def test_place_side_by_side_shrinks_each_digit_into_its_half() -> None:
    left, right = torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    scenes = place_side_by_side(left, right, background=-0.5)
    # 2x2 block means, written as a reshape.
    shrink = lambda x: x.reshape(2, 1, 14, 2, 14, 2).mean(dim=(3, 5))  # noqa: E731
    torch.testing.assert_close(scenes[:, :, 7:21, :14], shrink(left))
    torch.testing.assert_close(scenes[:, :, 7:21, 14:], shrink(right))
    assert (scenes[:, :, :7] == -0.5).all() and (scenes[:, :, 21:] == -0.5).all()
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        place_side_by_side(left, right[:1])


def test_make_scenes_draws_the_captioned_digits_from_the_given_rows() -> None:
    digits = torch.arange(50) % 10
    images = digits.float().view(50, 1, 1, 1).expand(50, 1, 28, 28) / 10  # pixel = digit / 10
    table = scene_captions(("left", "right"))
    rows = torch.tensor([0, 1, 66, 67, 179])
    scenes, labels = make_scenes(images, digits, table, rows, 200, generator=torch.Generator())
    assert set(labels.tolist()) == set(rows.tolist())
    torch.testing.assert_close(scenes[:, 0, 10, 3], table.left[labels].float() / 10)
    torch.testing.assert_close(scenes[:, 0, 10, 20], table.right[labels].float() / 10)
    with pytest.raises(ValueError, match="no example of the digits"):
        make_scenes(images[digits != 4], digits[digits != 4], table, rows, 5)
    with pytest.raises(ValueError, match=r"caption rows in 0..179"):
        make_scenes(images, digits, table, torch.tensor([180]), 5)


def test_the_classifier_reads_both_digits_of_real_scenes() -> None:
    images, digits = load_images("mnist", train=False, limit=2000)
    table, generator = scene_captions(), torch.Generator().manual_seed(0)
    scenes, labels = make_scenes(images, digits, table, torch.arange(90), 1000, generator=generator)
    left, right = table.left[labels], table.right[labels]
    reading = read_scenes(scenes, get_classifier("mnist"))
    assert reading.correct(left, right).float().mean() > 0.93
    assert reading.swapped(left, right).float().mean() < 0.01
    # The same halves in the other order read as swapped.
    exchanged = torch.cat([scenes[..., 14:], scenes[..., :14]], dim=-1)
    reading = read_scenes(exchanged, get_classifier("mnist"))
    assert reading.swapped(left, right).float().mean() > 0.93
    assert reading.correct(left, right).float().mean() < 0.01
