"""MNIST and Fashion-MNIST through torchvision, as whole tensors ready to live on the GPU.

The data folder is read from the environment variable ``DIFFUSION_LIB_DATA`` (default
``~/.cache/diffusion_lib/data``). It uses torchvision's layout (``MNIST/raw/...``,
``FashionMNIST/raw/...``); where the files are missing torchvision downloads them.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor
from torchvision import datasets

from diffusion_lib.smoke import cap_dataset_size
from diffusion_lib.validation import check_range, is_integer

DATA_VARIABLE = "DIFFUSION_LIB_DATA"
DATASETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion_mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}  # fmt: skip


class DataNotFoundError(RuntimeError):
    """The dataset is not in the data folder and could not be downloaded."""


def data_root() -> Path:
    """The data folder: ``$DIFFUSION_LIB_DATA`` or ``~/.cache/diffusion_lib/data``."""
    configured = os.environ.get(DATA_VARIABLE)
    return (
        Path(configured).expanduser()
        if configured
        else Path.home() / ".cache" / "diffusion_lib" / "data"
    )


def dataset_name(name: str) -> str:
    """Normalise a dataset name (``"Fashion-MNIST"`` -> ``"fashion_mnist"``) or raise ``ValueError``."""
    if not isinstance(name, str):
        raise ValueError(
            f"a dataset is named by a string, one of {', '.join(DATASETS)}; got a "
            f"{type(name).__name__}"
        )
    key = name.strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def _open(name: str, train: bool, root: Path) -> datasets.MNIST:
    dataset_class = DATASETS[name]
    try:
        return dataset_class(root=str(root), train=train, download=True)
    except Exception as error:  # no network, a proxy, a partial file: all end the same way
        raise DataNotFoundError(
            f"could not find or download {dataset_class.__name__} in {root} "
            f"(expected {root / dataset_class.__name__ / 'raw'}). Point the environment variable "
            f"{DATA_VARIABLE} at a folder holding {dataset_class.__name__}/raw/ in torchvision's "
            f"layout, or connect to the internet once. ({type(error).__name__}: {error})"
        ) from None


def load_images(
    name: str = "mnist",
    *,
    train: bool = True,
    value_range: tuple[float, float] = (-1.0, 1.0),
    limit: int | None = None,
    root: str | os.PathLike | None = None,
    smoke_cap: bool = True,
) -> tuple[Tensor, Tensor]:
    """Load a whole dataset as tensors.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``.
        train: the 60,000 training images, or the 10,000 test images.
        value_range: pixels are mapped from [0, 255] linearly onto this interval; (-1, 1) is
            what Ho et al. use, (0, 1) the raw intensities.
        limit: keep only the first ``limit`` images (capped further in smoke mode).
        root: data folder, default :func:`data_root`.
        smoke_cap: cap the size in smoke mode; measuring instruments (the quality
            classifier) turn this off so that they are never trained on a fraction.

    Returns ``images`` (N, 1, 28, 28) float32 and ``labels`` (N,) int64, on the CPU.
    """
    name = dataset_name(name)
    low, high = check_range("value_range", value_range)
    if not isinstance(train, bool):
        raise ValueError(
            f"train must be True (the training images) or False (the test images), got {train!r}"
        )
    if limit is not None:
        limit = _check_limit(limit)
    dataset = _open(name, train, Path(root) if root is not None else data_root())
    count = len(dataset.data) if limit is None else min(limit, len(dataset.data))
    if smoke_cap:
        count = cap_dataset_size(count)
    pixels = dataset.data[:count].unsqueeze(1).float() / 255.0
    return low + (high - low) * pixels, dataset.targets[:count].long().clone()


def _check_limit(limit: object) -> int:
    if not is_integer(limit):  # an int, or a NumPy integer
        raise ValueError(f"limit must be a whole number >= 1, got {limit!r}")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return int(limit)


def to_unit_interval(images: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Map images from ``value_range`` back to [0, 1] for display, clamping stray values."""
    low, high = check_range("value_range", value_range)
    return ((images - low) / (high - low)).clamp(0.0, 1.0)
