"""The reference classifier behind the sample-quality scores of :mod:`diffusion_lib.metrics`.

A :class:`SmallConvNet` is trained once per dataset, MNIST or Fashion-MNIST, on the whole
training split (about a minute on a CPU, whether or not smoke mode is on) and measured on the
test split. A :class:`ReferenceClassifier` holds the trained network with the mean and
covariance of its 128 penultimate-layer features of the 10,000 real test images, the Gaussian
that the features of generated images are compared with. :func:`get_classifier` reads it from
the cache or trains and caches it.

The cache folder is ``$DIFFUSION_LIB_CACHE`` or ``~/.cache/diffusion_lib``, with one file per
dataset (``quality_classifier_mnist.pt``, ``quality_classifier_fashion_mnist.pt``). A file of
another :data:`CLASSIFIER_VERSION` or dataset, or one that cannot be read, is retrained and
replaced.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.checkpoints import write_atomically
from diffusion_lib.data import dataset_name, load_images

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
