"""Tests for diffusion_lib.reference_classifier: the feature statistics against numpy, and the
classifier: its accuracy, its cache, and retraining when the cached file is stale.

The MNIST classifier is trained once per module into a temporary cache folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lib import reference_classifier
from diffusion_lib.data import load_images
from diffusion_lib.smoke import SMOKE_VARIABLE, smoke_mode


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("diffusion_lib_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(reference_classifier.CACHE_VARIABLE, str(folder))
        yield folder


@pytest.fixture(scope="module")
def mnist_classifier(cache_folder) -> reference_classifier.ReferenceClassifier:
    return reference_classifier.get_classifier("mnist")


def test_feature_statistics_match_numpy() -> None:
    features = torch.randn(50, 4, dtype=torch.float32) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, covariance = reference_classifier.feature_statistics(features)
    assert mean.dtype == covariance.dtype == torch.float64
    np.testing.assert_allclose(mean.numpy(), features.double().numpy().mean(axis=0), rtol=1e-12)
    expected = np.cov(features.double().numpy(), rowvar=False)
    np.testing.assert_allclose(covariance.numpy(), expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ the classifier and its cache


def test_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(reference_classifier.CACHE_VARIABLE, str(tmp_path))
    assert reference_classifier.classifier_path("Fashion-MNIST").parent == tmp_path
    monkeypatch.delenv(reference_classifier.CACHE_VARIABLE)
    assert reference_classifier.cache_folder() == Path.home() / ".cache" / "diffusion_lib"


def test_full_split_ignores_smoke_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    assert len(load_images("mnist", train=False)[0]) < 10_000  # smoke mode really caps
    images, labels = reference_classifier._full_split("mnist", train=False)
    assert images.shape == (10_000, 1, 28, 28) and labels.shape == (10_000,)
    assert smoke_mode()  # and is switched back on afterwards


def test_classifier_is_accurate_and_cached(mnist_classifier, cache_folder) -> None:
    assert mnist_classifier.test_accuracy > 0.98
    assert mnist_classifier.version == reference_classifier.CLASSIFIER_VERSION
    assert mnist_classifier.feature_mean.shape == (reference_classifier.FEATURE_DIM,)
    assert mnist_classifier.feature_covariance.shape == (reference_classifier.FEATURE_DIM,) * 2
    path = reference_classifier.classifier_path("mnist")
    assert path.parent == cache_folder and path.exists()
    assert [p.name for p in cache_folder.iterdir()] == [path.name]  # no temporary files left


def test_cached_classifier_is_reused(mnist_classifier, monkeypatch, mnist_test_images) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been used")

    monkeypatch.setattr(reference_classifier, "train_classifier", no_training)
    path = reference_classifier.classifier_path("mnist")
    modified = path.stat().st_mtime_ns
    loaded = reference_classifier.get_classifier("mnist")
    assert path.stat().st_mtime_ns == modified
    assert loaded.test_accuracy == mnist_classifier.test_accuracy
    torch.testing.assert_close(loaded.feature_covariance, mnist_classifier.feature_covariance)
    torch.testing.assert_close(
        loaded.embed(mnist_test_images[:64])[1], mnist_classifier.embed(mnist_test_images[:64])[1]
    )


@pytest.mark.parametrize("stale", ["old version", "damaged file", "other dataset"])
def test_stale_cache_is_retrained(stale: str, mnist_classifier, monkeypatch, tmp_path) -> None:
    path = reference_classifier.classifier_path("mnist", tmp_path)
    reference_classifier._save(mnist_classifier, path)
    contents = torch.load(path, weights_only=True)
    if stale == "old version":
        contents["version"] = "an older classifier"
    elif stale == "other dataset":
        contents["dataset"] = "fashion_mnist"
    torch.save(contents, path)
    if stale == "damaged file":
        path.write_bytes(path.read_bytes()[:1000])
    trained = []

    def fake_training(dataset, *, device=None):
        trained.append(dataset)
        return mnist_classifier

    monkeypatch.setattr(reference_classifier, "train_classifier", fake_training)
    reference_classifier.get_classifier("mnist", folder=tmp_path)
    assert trained == ["mnist"]
    assert torch.load(path, weights_only=True)["version"] == reference_classifier.CLASSIFIER_VERSION
    reference_classifier.get_classifier(
        "mnist", folder=tmp_path
    )  # now current: read, not retrained
    assert trained == ["mnist"]
    assert sorted(os.listdir(tmp_path)) == [path.name]
