"""Sample-quality scores for 28x28 MNIST and Fashion-MNIST images that work offline.

The usual score for image generators, the FID of Heusel et al. (2017), compares Gaussian fits of
Inception-v3 features of generated and real images. This module does **not** compute that FID:

* Inception weights must be downloaded, and the book has to run on machines without internet.
* Inception features were learned on natural RGB photographs at 299x299; a 28x28 grey digit,
  upsampled and copied into three channels, is far from what those features describe.

Instead a small convolutional classifier is trained once per dataset on the training split (about
a minute on a CPU, whether or not smoke mode is on) and cached on disk. From it come three scores:

* ``frechet_distance``: the FID formula applied to the classifier's 128 penultimate-layer
  features of the samples and of the 10,000 real test images;
* ``confident_share``: the share of samples whose most likely class has probability above a
  threshold, i.e. samples the classifier finds clearly recognisable. Classifiers are often
  confidently wrong on images unlike any they were trained on (uniform noise is called an "8"
  with near certainty), so read this share beside the Fréchet distance, never alone;
* ``class_entropy``: the entropy of the histogram of predicted classes divided by log(10), from
  1 (every class equally often) to 0 (a single class), with the counts beside it.

The numbers are comparable only with each other: within this library, for the same dataset,
the same classifier version (:data:`CLASSIFIER_VERSION`) and the same number of samples (the
Fréchet distance of a finite sample is biased upwards, the more so the fewer samples). They
are not comparable with FID values published in papers. For a sense of scale, with the first
classifier version and 2,000 images: real MNIST test digits score about 8, uniform noise and
constant images more than 1,000; with only 16 images even real digits score about 250.

The cache folder is ``$DIFFUSION_LIB_CACHE`` or ``~/.cache/diffusion_lib``. The scores that
compare the two sets of features point by point (the unbiased kernel distance, precision,
recall, density and coverage, nearest neighbours) are in :mod:`diffusion_lib.feature_metrics`.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.checkpoints import write_atomically
from diffusion_lib.data import CLASS_NAMES, dataset_name, load_images
from diffusion_lib.validation import check_finite, check_range

CACHE_VARIABLE = "DIFFUSION_LIB_CACHE"
#: Names the classifier's network, training and seed. Change it whenever either changes:
#: caches holding another version are retrained, and scores of different versions must not be
#: compared.
CLASSIFIER_VERSION = "conv16-32-bn-fc128/2-epochs-onecycle/seed-0/v1"
IMAGE_SHAPE = (1, 28, 28)
FEATURE_DIM = 128
NUM_CLASSES = 10
SPLIT_SIZES = {True: 60_000, False: 10_000}  # train, test; the same for both datasets
EPOCHS = 2
BATCH_SIZE = 256
MAX_LEARNING_RATE = 3e-3
TRAINING_SEED = 0


class SmallConvNet(nn.Module):
    """Two conv blocks and two linear layers: (B, 1, 28, 28) in [-1, 1] -> (B, 10) logits."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7x7
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features: (B, 1, 28, 28) -> (B, 128), non-negative."""
        return self.blocks(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class ReferenceClassifier:
    """A trained :class:`SmallConvNet` with the feature statistics of the real test images.

    Attributes:
        network: the classifier, in eval mode.
        dataset: ``"mnist"`` or ``"fashion_mnist"``.
        feature_mean: (128,) float64, mean test-set feature.
        feature_covariance: (128, 128) float64, their covariance (divisor N - 1).
        test_accuracy: share of the 10,000 test images classified correctly.
        version: the :data:`CLASSIFIER_VERSION` it was trained with.
    """

    network: SmallConvNet
    dataset: str
    feature_mean: Tensor
    feature_covariance: Tensor
    test_accuracy: float
    version: str = CLASSIFIER_VERSION

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Features (N, 128) and class probabilities (N, 10) of ``images`` (N, 1, 28, 28) in [-1, 1]."""
        return embed(self.network, images)


@torch.inference_mode()
def embed(network: SmallConvNet, images: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """Features (N, 128) and class probabilities (N, 10) of ``images`` (N, 1, 28, 28) in [-1, 1].

    Runs on the network's device; both results are float32 on the images' device.
    """
    device = next(network.parameters()).device
    features, probabilities = [], []
    for batch in images.split(batch_size):
        batch_features = network.features(batch.to(device))
        features.append(batch_features)
        probabilities.append(network.head(batch_features).softmax(dim=1))
    return torch.cat(features).to(images.device), torch.cat(probabilities).to(images.device)


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


def cache_folder() -> Path:
    """The cache folder: ``$DIFFUSION_LIB_CACHE`` or ``~/.cache/diffusion_lib``."""
    configured = os.environ.get(CACHE_VARIABLE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "diffusion_lib"


def classifier_path(dataset: str, folder: str | os.PathLike | None = None) -> Path:
    """Where the classifier of ``dataset`` is cached (``folder`` defaults to :func:`cache_folder`)."""
    folder = Path(folder) if folder is not None else cache_folder()
    return folder / f"quality_classifier_{dataset_name(dataset)}.pt"


def _full_split(dataset: str, train: bool) -> tuple[Tensor, Tensor]:
    """The whole training or test split in [-1, 1], never capped by smoke mode."""
    # The classifier is a measuring instrument: a smoke-sized one would be cached and then
    # silently used by every later, real run.
    images, labels = load_images(dataset, train=train, value_range=(-1.0, 1.0), smoke_cap=False)
    if len(images) != SPLIT_SIZES[train]:
        raise RuntimeError(f"expected {SPLIT_SIZES[train]} images, got {len(images)}")
    return images, labels


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) of ``features`` (N, D), in float64, divisor N - 1."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(
            f"features must have shape (N, D) with N >= 2, got {tuple(features.shape)}"
        )
    features = features.detach().to("cpu", torch.float64)
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.T @ centred / (features.shape[0] - 1)


def _fit(network: SmallConvNet, images: Tensor, labels: Tensor) -> None:
    """Adam with a one-cycle learning rate (Smith & Topin 2019), EPOCHS passes, batch 256."""
    optimizer = torch.optim.Adam(network.parameters(), lr=MAX_LEARNING_RATE)
    steps = EPOCHS * math.ceil(len(images) / BATCH_SIZE)
    learning_rate = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, MAX_LEARNING_RATE, total_steps=steps
    )
    network.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(images)).to(images.device).split(BATCH_SIZE):
            loss = F.cross_entropy(network(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            learning_rate.step()
    network.eval()


def train_classifier(
    dataset: str = "mnist", *, device: str | torch.device | None = None
) -> ReferenceClassifier:
    """Train a :class:`SmallConvNet` on the full training split and measure it on the test split.

    Two epochs, fixed seed, the global random state left untouched; smoke mode is ignored.
    ``device`` (default CPU) is where it trains.
    """
    dataset = dataset_name(dataset)
    device = torch.device(device if device is not None else "cpu")
    images, labels = (tensor.to(device) for tensor in _full_split(dataset, train=True))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(TRAINING_SEED)
        network = SmallConvNet().to(device)
        _fit(network, images, labels)
    test_images, test_labels = (tensor.to(device) for tensor in _full_split(dataset, train=False))
    features, probabilities = embed(network, test_images)
    accuracy = float((probabilities.argmax(dim=1) == test_labels).float().mean())
    return ReferenceClassifier(network, dataset, *feature_statistics(features), accuracy)


def _save(classifier: ReferenceClassifier, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    contents = {
        "version": classifier.version,
        "dataset": classifier.dataset,
        "state_dict": {key: value.cpu() for key, value in classifier.network.state_dict().items()},
        "feature_mean": classifier.feature_mean.cpu(),
        "feature_covariance": classifier.feature_covariance.cpu(),
        "test_accuracy": classifier.test_accuracy,
    }
    write_atomically(path, lambda file: torch.save(contents, file))  # never half a file


def _load(path: Path, dataset: str) -> ReferenceClassifier | None:
    """The cached classifier, or None if the file is missing, unreadable or of another version."""
    if not path.exists():
        return None
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
        if contents["version"] != CLASSIFIER_VERSION or contents["dataset"] != dataset:
            print(f"[diffusion_lib] {path} holds another classifier or version; retraining.")
            return None
        network = SmallConvNet()
        network.load_state_dict(contents["state_dict"])
    except Exception as error:  # truncated, foreign or damaged file: train a new one
        print(f"[diffusion_lib] could not read {path} ({type(error).__name__}); retraining.")
        return None
    mean, covariance = contents["feature_mean"], contents["feature_covariance"]
    return ReferenceClassifier(network.eval(), dataset, mean, covariance, contents["test_accuracy"])


def get_classifier(
    dataset: str = "mnist",
    *,
    device: str | torch.device | None = None,
    folder: str | os.PathLike | None = None,
) -> ReferenceClassifier:
    """The reference classifier of ``dataset``, from the cache or trained now and cached.

    Args:
        dataset: ``"mnist"`` or ``"fashion_mnist"``.
        device: where the network is placed (and trained, if needed); default CPU.
        folder: cache folder, default :func:`cache_folder`.
    """
    dataset = dataset_name(dataset)
    path = classifier_path(dataset, folder)
    classifier = _load(path, dataset)
    if classifier is None:
        print(f"[diffusion_lib] training the {dataset} classifier for the quality scores (once).")
        classifier = train_classifier(dataset, device=device)
        _save(classifier, path)
        print(f"[diffusion_lib] test accuracy {classifier.test_accuracy:.2%}; cached in {path}")
    classifier.network.to(device if device is not None else "cpu")
    return classifier


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
        classifier: a classifier from :func:`get_classifier`, to skip reading the cache; it
            runs on its own device.
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
