"""Sample-quality scores for 28x28 MNIST and Fashion-MNIST images that work offline.

The usual score for image generators, the FID of Heusel et al. (2017), compares Gaussian fits of
Inception-v3 features of generated and real images. This module does **not** compute that FID:

* Inception weights must be downloaded, and the book has to run on machines without internet.
* Inception features were learned on natural RGB photographs at 299x299; a 28x28 grey digit,
  upsampled and copied into three channels, is far from what those features describe.

Instead the scores use a small convolutional classifier trained once per dataset on the
training split and cached on disk, the reference classifier of
:mod:`diffusion_lib.reference_classifier`. From it come three scores:

* ``frechet_distance``: the FID formula applied to the classifier's 128 penultimate-layer
  features of the samples and of the 10,000 real test images;
* ``confident_share``: the share of samples whose most likely class has probability above a
  threshold, i.e. samples the classifier finds clearly recognisable. Classifiers are often
  confidently wrong on images unlike any they were trained on (uniform noise is called an "8"
  with near certainty), so read this share beside the Fréchet distance, never alone;
* ``class_entropy``: the entropy of the histogram of predicted classes divided by log(10), from
  1 (every class equally often) to 0 (a single class), with the counts beside it.

The numbers are comparable only with each other: within this library, for the same dataset,
the same classifier version
(:data:`~diffusion_lib.reference_classifier.CLASSIFIER_VERSION`) and the same number of
samples (the Fréchet distance of a finite sample is biased upwards, the more so the fewer
samples). They are not comparable with FID values published in papers. For a sense of scale,
with the first classifier version and 2,000 images: real MNIST test digits score about 8,
uniform noise and constant images more than 1,000; with only 16 images even real digits score
about 250.

The scores that compare the two sets of features point by point (the unbiased kernel distance,
precision, recall, density and coverage, nearest neighbours) are in
:mod:`diffusion_lib.feature_metrics`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_lib.data import CLASS_NAMES, dataset_name
from diffusion_lib.reference_classifier import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    ReferenceClassifier,
    feature_statistics,
    get_classifier,
)
from diffusion_lib.validation import check_finite, check_range


@dataclass(frozen=True)
class QualityScore:
    """Scores of one batch of samples; see the module docstring for what each one means."""

    frechet_distance: float
    confident_share: float
    class_entropy: float
    class_counts: tuple[int, ...]
    n: int
    dataset: str

    def as_row(self) -> dict[str, str | int | float]:
        """The scalar scores as a dict, one row of a table (``pandas.DataFrame(rows)``)."""
        return {
            "dataset": self.dataset,
            "n": self.n,
            "frechet_distance": self.frechet_distance,
            "confident_share": self.confident_share,
            "class_entropy": self.class_entropy,
        }

    def __str__(self) -> str:
        counts = " ".join(str(count) for count in self.class_counts)
        return (
            f"{self.dataset}, n={self.n}: Fréchet distance {self.frechet_distance:.2f}, "
            f"confident {self.confident_share:.1%}, class entropy {self.class_entropy:.3f} "
            f"(counts {counts})"
        )


def _matrix_sqrt_psd(matrix: Tensor) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def _as_tensor(name: str, x: object) -> Tensor:
    """``x`` as a tensor: a tensor itself, or an array-like of numbers such as a NumPy array
    (in float64: Python floats would otherwise become float32)."""
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"{name} must be a tensor or an array of numbers, got {type(x).__name__}"
        ) from None


def _checked_float64(name: str, x: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64)
    check_finite(name, x)
    return x


def frechet_distance(
    mean_a: Tensor, covariance_a: Tensor, mean_b: Tensor, covariance_b: Tensor
) -> float:
    """Fréchet distance between N(mean_a, covariance_a) and N(mean_b, covariance_b).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` (Heusel et al. 2017, eq. 6; Dowson &
    Landau 1982), in float64. Means (D,), covariances (D, D) symmetric positive semi-definite;
    tensors or arrays such as NumPy's.
    """
    mean_a, covariance_a, mean_b, covariance_b = (
        _as_tensor(name, x)
        for name, x in (
            ("mean_a", mean_a),
            ("covariance_a", covariance_a),
            ("mean_b", mean_b),
            ("covariance_b", covariance_b),
        )
    )
    if mean_a.dim() != 1:
        raise ValueError(f"mean_a must have shape (D,), got {tuple(mean_a.shape)}")
    dim = mean_a.shape[0]
    mean_a, mean_b = (
        _checked_float64(n, x, (dim,)) for n, x in (("mean_a", mean_a), ("mean_b", mean_b))
    )
    covariance_a, covariance_b = (
        _checked_float64(n, x, (dim, dim))
        for n, x in (("covariance_a", covariance_a), ("covariance_b", covariance_b))
    )
    # S_a S_b = A (A S_b A) A^{-1} with A = S_a^{1/2}, so (S_a S_b)^{1/2} has the trace of the
    # square root of the symmetric PSD matrix A S_b A, whose eigenvalues eigh finds stably.
    sqrt_a = _matrix_sqrt_psd(covariance_a)
    middle = sqrt_a @ covariance_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    squared_mean_gap = (mean_a - mean_b).square().sum()
    distance = squared_mean_gap + covariance_a.trace() + covariance_b.trace() - 2 * trace_sqrt
    return max(0.0, float(distance))  # rounding can leave -1e-12 for identical statistics


def confident_share(probabilities: Tensor, threshold: float = 0.9) -> float:
    """Share of rows of ``probabilities`` (N, K) whose largest entry exceeds ``threshold``."""
    return float((probabilities.max(dim=1).values > threshold).float().mean())


def class_coverage(
    predicted: Tensor, num_classes: int = NUM_CLASSES
) -> tuple[float, tuple[int, ...]]:
    """Normalised entropy H(counts / N) / log K of the predicted classes (N,), and the K counts.

    1 means every class equally often, 0 a single class. With N < K the largest reachable
    value is log N / log K.
    """
    counts = torch.bincount(predicted.detach().cpu(), minlength=num_classes)
    shares = counts[counts > 0].double() / counts.sum()
    entropy = float(-(shares * shares.log()).sum() / math.log(num_classes))
    return max(0.0, entropy), tuple(int(count) for count in counts)


def _check_images(images: Tensor, value_range: tuple[float, float]) -> None:
    if not isinstance(images, Tensor):
        raise ValueError(
            f"images must be a tensor of shape (N, 1, 28, 28), got {type(images).__name__}"
        )
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be a float tensor, got dtype {images.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"images must have shape (N, 1, 28, 28), got {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 images to fit a covariance, got {images.shape[0]}")
    check_finite("images", images)
    _warn_if_outside(images, check_range("value_range", value_range))


def _warn_if_outside(images: Tensor, value_range: tuple[float, float]) -> None:
    """Warn when ``images`` clearly use another pixel range than ``value_range``.

    Two mistakes give wrong scores without an error: images in [0, 1] scored as (-1, 1), whose
    pixels all lie in the upper half of the range, and 0..255 pixels, far above it. The tests
    are loose because samplers that do not clip overshoot the range a little and some images
    are dark or blank in parts: a maximum more than twice the range's width above its upper
    end, or no pixel below its middle (with some above, as a constant mid-grey is no mistake).
    """
    low, high = value_range
    middle, width = (low + high) / 2, high - low
    minimum, maximum = (float(value) for value in torch.aminmax(images.detach()))
    if maximum > high + 2 * width:
        reason = (
            f"they reach {maximum:g}, far above its upper end {high:g}; "
            "for pixels in 0..255 pass value_range=(0, 255)"
        )
    elif minimum >= middle and maximum > middle:
        reason = (
            f"no pixel lies below its middle {middle:g}; for images in "
            f"[{middle:g}, {high:g}] pass value_range=({middle:g}, {high:g})"
        )
    else:
        return
    warnings.warn(
        f"images do not seem to use value_range={value_range}: {reason}, or the scores are wrong",
        UserWarning,
        stacklevel=4,  # the caller of score_samples
    )


def to_classifier_range(images: Tensor, value_range: tuple[float, float]) -> Tensor:
    """``images`` with pixels in ``value_range`` mapped to the classifier's [-1, 1] and clamped,
    as they would be when saved as pictures."""
    low, high = value_range
    return (2 * (images.detach() - low) / (high - low) - 1).clamp(-1.0, 1.0)


def score_samples(
    images: Tensor,
    dataset: str = "mnist",
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    threshold: float = 0.9,
    device: str | torch.device | None = None,
    classifier: ReferenceClassifier | None = None,
) -> QualityScore:
    """Score generated ``images`` (N, 1, 28, 28), N >= 2, against the real test images.

    Args:
        images: samples with pixel values in ``value_range``, float32 or another floating
            dtype; values outside it are clamped, as they would be when the samples are saved as
            pictures. A ``UserWarning`` says when they clearly use another range.
        dataset: ``"mnist"`` or ``"fashion_mnist"``, the data the generator learned.
        value_range: the pixel range of ``images``: (-1, 1) as in Ho et al., or (0, 1).
        threshold: probability above which a sample counts as confidently classified.
        device: where a classifier loaded here runs; default the images' device.
        classifier: a classifier from
            :func:`~diffusion_lib.reference_classifier.get_classifier`, to skip reading the
            cache; it runs on its own device.
    """
    if isinstance(dataset, ReferenceClassifier):
        raise ValueError(
            "the second argument of score_samples is the dataset's name; pass a classifier "
            "by keyword: score_samples(images, classifier=classifier)"
        )
    dataset = dataset_name(dataset)
    _check_images(images, value_range)
    images = images.float()  # the classifier's dtype, for float64 or float16 images
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    if classifier is None:
        classifier = get_classifier(dataset, device=device or images.device)
    elif classifier.dataset != dataset:
        raise ValueError(f"classifier was trained on {classifier.dataset!r}, not {dataset!r}")
    features, probabilities = classifier.embed(to_classifier_range(images, value_range))
    mean, covariance = feature_statistics(features)
    entropy, counts = class_coverage(probabilities.argmax(dim=1), len(CLASS_NAMES[dataset]))
    return QualityScore(
        frechet_distance=frechet_distance(
            mean, covariance, classifier.feature_mean, classifier.feature_covariance
        ),
        confident_share=confident_share(probabilities, threshold),
        class_entropy=entropy,
        class_counts=counts,
        n=len(images),
        dataset=dataset,
    )
