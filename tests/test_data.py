"""Dataset loading through torchvision, and the error when the data is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import datasets

from diffusion_lib import DATA_VARIABLE, DataNotFoundError, data_root, load_images
from diffusion_lib.data import dataset_name, to_unit_interval
from diffusion_lib.smoke import MAX_DATASET_SIZE, SMOKE_VARIABLE


def test_mnist_shapes_ranges_and_labels() -> None:
    images, labels = load_images("mnist", train=False)
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.float32
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert labels.dtype == torch.long and sorted(labels.unique().tolist()) == list(range(10))
    # The test set's first digit is a 7 (the published file order).
    assert labels[0].item() == 7


def test_value_range_and_limit() -> None:
    unit, _ = load_images("fashion-mnist", train=False, value_range=(0.0, 1.0), limit=100)
    signed, _ = load_images("Fashion_MNIST", train=False, limit=100)
    assert unit.shape[0] == 100 and unit.min() >= 0 and unit.max() <= 1
    torch.testing.assert_close(signed, unit * 2 - 1)
    torch.testing.assert_close(to_unit_interval(signed), unit)
    # Fashion-MNIST's training set holds 6,000 images of each class.
    _, labels = load_images("fashion_mnist", train=True)
    assert torch.bincount(labels).tolist() == [6000] * 10


def test_smoke_mode_caps_the_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    images, labels = load_images("mnist", train=False)
    assert len(images) == len(labels) == MAX_DATASET_SIZE


def test_data_root_follows_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_VARIABLE, str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv(DATA_VARIABLE)
    assert data_root() == Path.home() / ".cache" / "diffusion_lib" / "data"


def test_missing_data_without_network_gives_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def offline(self: datasets.MNIST) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.MNIST, "download", offline)
    monkeypatch.setenv(DATA_VARIABLE, str(tmp_path))
    with pytest.raises(DataNotFoundError) as caught:
        load_images("mnist")
    message = str(caught.value)
    assert DATA_VARIABLE in message and str(tmp_path / "MNIST" / "raw") in message
    assert caught.value.__cause__ is None, "no chained stack trace from the download code"


@pytest.mark.parametrize("bad", ["cifar10", "mnst", ""])
def test_unknown_dataset_names(bad: str) -> None:
    with pytest.raises(ValueError, match="choose one of mnist, fashion_mnist"):
        dataset_name(bad)


@pytest.mark.parametrize("bad", [None, 3, ("mnist",)])
def test_a_dataset_that_is_not_a_name_is_reported_by_its_type(bad) -> None:
    with pytest.raises(
        ValueError, match=rf"one of mnist, fashion_mnist; got a {type(bad).__name__}$"
    ):
        dataset_name(bad)


def test_bad_value_range_and_limit() -> None:
    with pytest.raises(ValueError, match="high > low"):
        load_images("mnist", value_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_images("mnist", limit=0)


def test_a_split_or_limit_of_the_wrong_kind_is_refused() -> None:
    # train="test" used to load the training split, and limit=2.7 two images.
    with pytest.raises(ValueError, match="train must be True .* or False .*, got 'test'"):
        load_images("mnist", train="test")
    with pytest.raises(ValueError, match="limit must be a whole number >= 1, got 2.7"):
        load_images("mnist", limit=2.7)
