"""Tests for diffusion_lib.metrics: the Fréchet distance against closed forms, and the scores of
real, noisy and constant images.

The MNIST reference classifier comes from the shared classifier cache of tests/conftest.py,
copied from the default cache where there is one and trained there otherwise.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from diffusion_lib import metrics, reference_classifier


@pytest.fixture(scope="module")
def mnist_classifier(classifier_cache) -> reference_classifier.ReferenceClassifier:
    return reference_classifier.get_classifier("mnist")


def random_covariance(dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    factor = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    return factor @ factor.T / rank


# ---------------------------------------------------------------- Fréchet distance, no classifier


def test_frechet_distance_matches_closed_form_for_diagonal_covariances() -> None:
    generator = torch.Generator().manual_seed(1)
    variances_a, variances_b = torch.rand(2, 6, generator=generator, dtype=torch.float64) * 3
    mean_a, mean_b = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    expected = ((mean_a - mean_b) ** 2).sum() + (
        (variances_a.sqrt() - variances_b.sqrt()) ** 2
    ).sum()
    actual = metrics.frechet_distance(mean_a, variances_a.diag(), mean_b, variances_b.diag())
    assert actual == pytest.approx(float(expected), rel=1e-10)


def test_frechet_distance_matches_numpy_with_known_square_root() -> None:
    # Choose S_a = R^2 with R symmetric PSD, and S_b = R^{-1} M^2 R^{-1}: then S_a S_b is similar
    # to M^2, so Tr (S_a S_b)^{1/2} = Tr M, computed here in numpy without any eigen-solver.
    rng = np.random.default_rng(2)
    root_factor, middle_factor = rng.normal(size=(2, 5, 5))
    root = root_factor @ root_factor.T + np.eye(5)
    middle = middle_factor @ middle_factor.T + 0.5 * np.eye(5)
    covariance_a = root @ root
    root_inverse = np.linalg.inv(root)
    covariance_b = root_inverse @ middle @ middle @ root_inverse
    mean_a, mean_b = rng.normal(size=(2, 5))
    expected = (
        np.sum((mean_a - mean_b) ** 2)
        + np.trace(covariance_a)
        + np.trace(covariance_b)
        - 2 * np.trace(middle)
    )
    as_tensors = [torch.from_numpy(x) for x in (mean_a, covariance_a, mean_b, covariance_b)]
    assert metrics.frechet_distance(*as_tensors) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_frechet_distance_is_symmetric_and_zero_for_identical_statistics() -> None:
    generator = torch.Generator().manual_seed(3)
    covariance_a = random_covariance(20, 8, generator)  # rank-deficient, as with few samples
    covariance_b = random_covariance(20, 30, generator)
    mean_a, mean_b = torch.randn(2, 20, generator=generator, dtype=torch.float64)
    forward = metrics.frechet_distance(mean_a, covariance_a, mean_b, covariance_b)
    backward = metrics.frechet_distance(mean_b, covariance_b, mean_a, covariance_a)
    assert forward > 1.0
    assert forward == pytest.approx(backward, rel=1e-7)
    assert metrics.frechet_distance(mean_b, covariance_b, mean_b, covariance_b) == pytest.approx(
        0.0, abs=1e-9
    )


def test_class_coverage_entropy_and_counts() -> None:
    even = torch.arange(10).repeat(7)
    assert metrics.class_coverage(even) == (pytest.approx(1.0), (7,) * 10)
    single = torch.full((30,), 4)
    entropy, counts = metrics.class_coverage(single)
    assert entropy == 0.0 and counts == (0, 0, 0, 0, 30, 0, 0, 0, 0, 0)
    two_classes = torch.tensor([0, 0, 0, 1])
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(10)
    assert metrics.class_coverage(two_classes)[0] == pytest.approx(expected)


def test_confident_share_counts_rows_above_threshold() -> None:
    probabilities = torch.tensor([[0.95, 0.05], [0.5, 0.5], [0.1, 0.9], [0.01, 0.99]])
    assert metrics.confident_share(probabilities, threshold=0.9) == pytest.approx(0.5)
    assert metrics.confident_share(probabilities, threshold=0.4) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4)), "mean_b"),
        ((torch.zeros(3), torch.eye(2), torch.zeros(3), torch.eye(3)), "covariance_a"),
        ((torch.zeros(3), torch.eye(3), torch.full((3,), math.nan), torch.eye(3)), "finite"),
        (("zeros", torch.eye(3), torch.zeros(3), torch.eye(3)), "mean_a must be a tensor or an"),
    ],
)
def test_frechet_distance_rejects_bad_statistics(arguments, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.frechet_distance(*arguments)


@pytest.mark.parametrize("convert", [np.asarray, lambda x: x.tolist()], ids=["numpy", "lists"])
def test_frechet_distance_takes_arrays(convert) -> None:
    generator = torch.Generator().manual_seed(5)
    covariance_a, covariance_b = (random_covariance(4, 6, generator) for _ in range(2))
    mean_a, mean_b = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    statistics = (mean_a, covariance_a, mean_b, covariance_b)
    expected = metrics.frechet_distance(*statistics)
    assert metrics.frechet_distance(*(convert(x.numpy()) for x in statistics)) == expected


# ------------------------------------------------------------------------- scores of image sets


@pytest.fixture(scope="module")
def reference_scores(mnist_classifier, mnist_test_images) -> dict[str, metrics.QualityScore]:
    generator = torch.Generator().manual_seed(4)
    candidates = {
        "real": mnist_test_images,
        "noise": torch.rand(len(mnist_test_images), 1, 28, 28, generator=generator) * 2 - 1,
        "black": torch.full((len(mnist_test_images), 1, 28, 28), -1.0),
        "grey": torch.zeros(len(mnist_test_images), 1, 28, 28),
    }
    return {
        name: metrics.score_samples(images, "mnist", classifier=mnist_classifier)
        for name, images in candidates.items()
    }


def test_real_images_score_well(reference_scores) -> None:
    real = reference_scores["real"]
    assert real.n == 2000 and sum(real.class_counts) == 2000
    assert real.confident_share > 0.9
    assert real.class_entropy > 0.99


@pytest.mark.parametrize("fake", ["noise", "black", "grey"])
def test_fake_images_are_far_from_real_ones(reference_scores, fake: str) -> None:
    real, score = reference_scores["real"], reference_scores[fake]
    assert score.frechet_distance > 50 * real.frechet_distance
    assert score.class_entropy < 0.5  # identical or featureless images land in few classes


def test_score_of_the_whole_test_set_is_zero(mnist_classifier) -> None:
    test_images = reference_classifier._full_split("mnist", train=False)[0]
    score = metrics.score_samples(test_images, classifier=mnist_classifier)
    assert score.frechet_distance == pytest.approx(0.0, abs=1e-6)
    assert score.confident_share > 0.95


def test_value_range_zero_one_gives_the_same_scores(mnist_classifier, mnist_test_images) -> None:
    images = mnist_test_images[:300]
    in_minus_one_one = metrics.score_samples(images, classifier=mnist_classifier)
    in_zero_one = metrics.score_samples(
        (images + 1) / 2, value_range=(0.0, 1.0), classifier=mnist_classifier
    )
    assert in_zero_one.frechet_distance == pytest.approx(
        in_minus_one_one.frechet_distance, rel=1e-4
    )
    assert in_zero_one.class_counts == in_minus_one_one.class_counts


def test_score_samples_loads_from_the_cache_folder(mnist_classifier, mnist_test_images) -> None:
    images = mnist_test_images[:100]
    through_cache = metrics.score_samples(images, "MNIST")
    assert through_cache == metrics.score_samples(images, classifier=mnist_classifier)


def test_quality_score_formats(reference_scores) -> None:
    real = reference_scores["real"]
    row = real.as_row()
    assert row["frechet_distance"] == real.frechet_distance and row["n"] == 2000
    assert all(isinstance(value, (int, float, str)) for value in row.values())
    text = str(real)
    assert f"{real.frechet_distance:.2f}" in text and "n=2000" in text


@pytest.mark.parametrize(
    ("images", "keywords", "message"),
    [
        (torch.zeros(4, 28, 28), {}, "shape"),
        (torch.zeros(4, 3, 28, 28), {}, "shape"),
        (torch.zeros(4, 1, 32, 32), {}, "shape"),
        (torch.zeros(1, 1, 28, 28), {}, "at least 2"),
        (torch.full((4, 1, 28, 28), math.nan), {}, "finite"),
        (torch.zeros(4, 1, 28, 28, dtype=torch.uint8), {}, "float"),
        (torch.zeros(4, 1, 28, 28), {"dataset": "cifar10"}, "mnist, fashion_mnist"),
        (torch.zeros(4, 1, 28, 28), {"value_range": (1.0, 0.0)}, "value_range"),
        (torch.zeros(4, 1, 28, 28), {"threshold": 1.5}, "threshold"),
    ],
)
def test_score_samples_rejects_bad_input(images, keywords, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.score_samples(images, **keywords)


@pytest.mark.parametrize(
    ("to_pixels", "message"),
    [
        (lambda x: (x + 1) / 2, r"no pixel lies below its middle 0; .* value_range=\(0, 1\)"),
        (lambda x: (x + 1) * 127.5, r"they reach 255, far above .* value_range=\(0, 255\)"),
    ],
    ids=["[0, 1]", "0..255"],
)
def test_score_samples_warns_about_images_in_another_range(
    mnist_classifier, mnist_test_images, to_pixels, message: str
) -> None:
    images = to_pixels(mnist_test_images[:100])
    with pytest.warns(UserWarning, match=message):
        metrics.score_samples(images, classifier=mnist_classifier)


def _lower_half_blank(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:, :, :14], torch.full_like(x[:, :, 14:], -1.0)], dim=2)


@pytest.mark.parametrize(
    ("to_pixels", "value_range"),
    [
        (lambda x: x * 1.5, (-1.0, 1.0)),  # unclipped samples overshoot
        (lambda x: x + 3.0 * (x > 0.9), (-1.0, 1.0)),  # a few pixels far out
        (lambda x: x * 0.5 - 0.5, (-1.0, 1.0)),  # dark
        (_lower_half_blank, (-1.0, 1.0)),  # partial
        (torch.zeros_like, (-1.0, 1.0)),  # constant mid-grey
        (lambda x: (x + 1) / 2, (0.0, 1.0)),
        (lambda x: (x + 1) * 127.5, (0.0, 255.0)),
        (lambda x: x * 3, (-3.0, 3.0)),
    ],
    ids=["overshoot", "outliers", "dark", "half blank", "grey", "[0, 1]", "0..255", "[-3, 3]"],
)
def test_score_samples_does_not_warn_about_images_in_their_range(
    mnist_classifier, mnist_test_images, to_pixels, value_range
) -> None:
    images = to_pixels(mnist_test_images[:100])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.score_samples(images, value_range=value_range, classifier=mnist_classifier)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_score_samples_takes_other_floating_dtypes(
    mnist_classifier, mnist_test_images, dtype
) -> None:
    images = mnist_test_images[:100]
    expected = metrics.score_samples(images, classifier=mnist_classifier)
    score = metrics.score_samples(images.to(dtype), classifier=mnist_classifier)
    assert score.frechet_distance == pytest.approx(expected.frechet_distance, rel=1e-4)
    assert score.class_counts == expected.class_counts


def test_a_classifier_passed_as_the_dataset_is_pointed_to_its_keyword(mnist_classifier) -> None:
    with pytest.raises(ValueError, match=r"score_samples\(images, classifier=classifier\)"):
        metrics.score_samples(torch.zeros(4, 1, 28, 28), mnist_classifier)


def test_score_samples_rejects_a_classifier_of_another_dataset(mnist_classifier) -> None:
    with pytest.raises(ValueError, match="trained on 'mnist'"):
        metrics.score_samples(
            torch.zeros(4, 1, 28, 28), "fashion_mnist", classifier=mnist_classifier
        )


def test_to_classifier_range_is_affine_then_clamped() -> None:
    images = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5, -0.2])
    assert metrics.to_classifier_range(images, (0.0, 1.0)).tolist() == pytest.approx(
        [-1.0, -0.5, 0.0, 1.0, 1.0, -1.0], abs=1e-7
    )
    pixels = torch.tensor([0.0, 63.75, 127.5, 255.0, 300.0])
    assert metrics.to_classifier_range(pixels, (0.0, 255.0)).tolist() == pytest.approx(
        [-1.0, -0.5, 0.0, 1.0, 1.0], abs=1e-7
    )
