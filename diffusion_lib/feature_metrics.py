"""Comparing two sets of feature vectors: generated samples against real images.

:mod:`diffusion_lib.metrics` reduces each set to a Gaussian and reports the Fréchet distance
between the two fits. This module adds the other standard ways to compare the sets, all computed
on features such as :meth:`~diffusion_lib.reference_classifier.ReferenceClassifier.embed` returns:

* :func:`kernel_distance`: the unbiased squared maximum mean discrepancy with a cubic
  polynomial kernel, the KID of Bińkowski et al. (2018). Unlike the Fréchet distance its
  expectation does not depend on the number of samples.
* :func:`frechet_distance_at_infinity`: the Fréchet distance extrapolated to infinitely many
  samples from its linear trend in 1/N (Chong & Forsyth 2020).
* :func:`manifold_scores`: precision and recall (Kynkäänniemi et al. 2019), density and
  coverage (Naeem et al. 2020), which split "how good" from "how varied".
* :func:`nearest_neighbours`: the nearest reference for each query, to see whether a model
  copies its training images; :func:`nearest_neighbour_ratios` compares that distance with the
  second nearest, the usual test for a copy (Yoon et al. 2023; Gu et al. 2023).

All distances are Euclidean and computed in float64 on the features' device, in blocks, so
that 10,000 x 10,000 comparisons fit in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_lib.metrics import feature_statistics, frechet_distance
from diffusion_lib.validation import check_finite, is_integer

# Entries per block of a distance or kernel matrix: 2^24 float64 numbers are 128 MiB.
MAX_BLOCK_ENTRIES = 2**24


def _row_blocks(x: Tensor, columns: int) -> tuple[Tensor, ...]:
    """``x`` cut into blocks of rows whose matrix against ``columns`` others fits one block."""
    return x.split(max(1, MAX_BLOCK_ENTRIES // max(1, columns)))


def _features(name: str, x: Tensor, dim: int | None = None, min_rows: int = 1) -> Tensor:
    """``x`` checked to be a finite (N, D) tensor and returned in float64."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (N, D), got {shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} has {x.shape[1]} features per row but the other set has {dim}; "
            "both sets must come from the same feature extractor"
        )
    check_finite(name, x)
    return x.detach().to(torch.float64)


# --- kernel distance -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PolynomialKernel:
    """k(x, y) = (gamma x.y + coef0)^degree; ``gamma=None`` means 1 / D, the kernel of
    Bińkowski et al. (2018), section 2.3."""

    degree: int = 3
    gamma: float | None = None
    coef0: float = 1.0

    def _scale(self, dim: int) -> float:
        return 1.0 / dim if self.gamma is None else self.gamma

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """All pairs: x (N, D), y (M, D) -> (N, M)."""
        return (self._scale(x.shape[1]) * x @ y.T + self.coef0) ** self.degree

    def diagonal(self, x: Tensor) -> Tensor:
        """k(x_i, x_i) for each row: (N, D) -> (N,)."""
        return (self._scale(x.shape[1]) * x.square().sum(dim=1) + self.coef0) ** self.degree

    def sum(self, x: Tensor, y: Tensor) -> Tensor:
        """The sum of k(x_i, y_j) over all pairs, one block of rows at a time."""
        return sum(self(block, y).sum() for block in _row_blocks(x, len(y)))


def mmd_squared_unbiased(x: Tensor, y: Tensor, kernel: PolynomialKernel | None = None) -> float:
    """The unbiased estimate of MMD^2 between the laws of x (N, D) and y (M, D), N, M >= 2.

    MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y) (Gretton et al. 2012, lemma 6). The
    U-statistic leaves out the pairs of a point with itself, so that its expectation is MMD^2
    exactly for every N and M (Gretton et al. 2012, eq. 3); it can be negative. The kernel
    defaults to the cubic :class:`PolynomialKernel`.
    """
    kernel = kernel if kernel is not None else PolynomialKernel()
    x = _features("x", x, min_rows=2)
    y = _features("y", y, dim=x.shape[1], min_rows=2)
    n, m = len(x), len(y)

    def off_diagonal_sum(z: Tensor) -> Tensor:  # the sum over the pairs i != j
        return kernel.sum(z, z) - kernel.diagonal(z).sum()

    value = (
        off_diagonal_sum(x) / (n * (n - 1))
        + off_diagonal_sum(y) / (m * (m - 1))
        - 2 * kernel.sum(x, y) / (n * m)
    )
    return float(value)


@dataclass(frozen=True)
class KernelDistance:
    """An unbiased MMD^2 estimate: ``mean`` over ``num_subsets`` disjoint subsets of
    ``subset_size`` rows from each set, and the ``standard_error`` of that mean (NaN for one
    subset)."""

    mean: float
    standard_error: float
    num_subsets: int
    subset_size: int

    def __str__(self) -> str:
        return f"{self.mean:.5f} ± {self.standard_error:.5f}"


def kernel_distance(
    features_a: Tensor,
    features_b: Tensor,
    *,
    num_subsets: int = 10,
    kernel: PolynomialKernel | None = None,
    generator: torch.Generator | None = None,
) -> KernelDistance:
    """The kernel distance (KID) between two sets of features, with a standard error.

    Both sets are shuffled and cut into ``num_subsets`` disjoint subsets of equal size (the
    size of the smaller set divided by ``num_subsets``); :func:`mmd_squared_unbiased` is computed
    on each pair of subsets. Each estimate is unbiased and they are independent, so their mean is
    unbiased and their spread gives an honest standard error. Bińkowski et al. (2018) used
    subsets of 1000, which ``num_subsets=10`` gives for 10,000 samples.

    Args:
        features_a: (N, D) features of one set, e.g. the samples.
        features_b: (M, D) features of the other, e.g. the real test images.
        num_subsets: how many disjoint subsets; each must hold at least 2 rows.
        kernel: default the cubic :class:`PolynomialKernel` of KID.
        generator: the random generator of the shuffle (CPU).
    """
    features_a = _features("features_a", features_a)
    features_b = _features("features_b", features_b, dim=features_a.shape[1])
    if not is_integer(num_subsets) or num_subsets < 1:
        raise ValueError(f"num_subsets must be a positive integer, got {num_subsets!r}")
    subset_size = min(len(features_a), len(features_b)) // num_subsets
    if subset_size < 2:
        raise ValueError(
            f"num_subsets={num_subsets} leaves subsets of {subset_size} rows from sets of "
            f"{len(features_a)} and {len(features_b)}; each subset needs at least 2 rows"
        )
    order_a = torch.randperm(len(features_a), generator=generator)
    order_b = torch.randperm(len(features_b), generator=generator)
    estimates = torch.tensor(
        [
            mmd_squared_unbiased(features_a[part_a], features_b[part_b], kernel)
            for part_a, part_b in zip(
                order_a[: num_subsets * subset_size].split(subset_size),
                order_b[: num_subsets * subset_size].split(subset_size),
                strict=True,
            )
        ],
        dtype=torch.float64,
    )
    error = float(estimates.std() / math.sqrt(num_subsets)) if num_subsets > 1 else math.nan
    return KernelDistance(float(estimates.mean()), error, num_subsets, subset_size)


# --- Fréchet distance without the finite-sample bias ---------------------------------------------


@dataclass(frozen=True)
class FrechetTrend:
    """Fréchet distances at several sample sizes and the line ``at_infinity + slope / N``
    fitted to them by least squares (Chong & Forsyth 2020, section 3)."""

    sizes: tuple[int, ...]
    distances: tuple[float, ...]
    at_infinity: float
    slope: float


def frechet_distance_at_infinity(
    features: Tensor,
    reference_mean: Tensor,
    reference_covariance: Tensor,
    *,
    sizes: tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
) -> FrechetTrend:
    """The Fréchet distance of ``features`` (N, D) to a reference Gaussian, extrapolated to N = inf.

    The distance of N samples overestimates the distance of their distribution by a term that
    falls as 1/N (the squared gap of the means alone is too large by tr(Sigma) / N in
    expectation). Chong & Forsyth (2020) therefore compute it on random subsets of several sizes
    and read off the intercept of a straight line in 1/N.

    Args:
        features: (N, D) features of the samples.
        reference_mean, reference_covariance: (D,) and (D, D), e.g. a
            :class:`~diffusion_lib.reference_classifier.ReferenceClassifier`'s test-set statistics.
        sizes: at least two distinct subset sizes in 2..N; default 15 sizes evenly spaced in
            1/N from N/5 to N, as in the paper.
        generator: the random generator that draws the subsets (CPU).
    """
    features = _features("features", features, min_rows=3)
    n = len(features)
    if sizes is None:
        sizes = tuple(sorted({round(1 / s) for s in torch.linspace(5 / n, 1 / n, 15).tolist()}))
    sizes = tuple(sizes)
    if len(set(sizes)) < 2 or not all(is_integer(s) and 2 <= s <= n for s in sizes):
        raise ValueError(
            f"sizes must hold at least two distinct integers in 2..{n} (the number of "
            f"features), got {sizes}"
        )
    sizes = tuple(int(s) for s in sizes)
    distances = []
    for size in sizes:
        subset = features[torch.randperm(n, generator=generator)[:size]]
        distances.append(
            frechet_distance(*feature_statistics(subset), reference_mean, reference_covariance)
        )
    design = torch.stack(
        [torch.ones(len(sizes)), 1 / torch.tensor(sizes, dtype=torch.float64)], dim=1
    ).double()
    at_infinity, slope = (
        torch.linalg.lstsq(design, torch.tensor(distances, dtype=torch.float64)[:, None])
        .solution.squeeze(1)
        .tolist()
    )
    return FrechetTrend(sizes, tuple(distances), at_infinity, slope)


# --- precision, recall, density and coverage ----------------------------------------------------


def _distances(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distances (N, M) between the rows of x (N, D) and y (M, D).

    Through ||x||^2 + ||y||^2 - 2 x.y, a matrix product, which in float64 loses nothing that
    matters here and is several times faster than summing squared differences.
    """
    return torch.cdist(x, y)


def nearest_neighbour_radii(features: Tensor, k: int) -> Tensor:
    """The distance from each row of ``features`` (N, D) to its k-th nearest other row: (N,).

    The radius of the ball that Kynkäänniemi et al. (2019) put around each point; the point
    itself (distance 0) is not counted as its own neighbour.
    """
    features = _features("features", features)
    if not is_integer(k) or not 1 <= k < len(features):
        raise ValueError(
            f"k must be an integer in 1..{len(features) - 1} (fewer than the {len(features)} "
            f"points), got {k!r}"
        )
    radii = [
        _distances(block, features).topk(k + 1, dim=1, largest=False).values[:, k]
        for block in _row_blocks(features, len(features))
    ]
    return torch.cat(radii)


@dataclass(frozen=True)
class ManifoldScores:
    """Precision, recall, density and coverage of ``n_fake`` samples against ``n_real`` real
    images with balls of the ``k``-th nearest neighbour; see :func:`manifold_scores`."""

    precision: float
    recall: float
    density: float
    coverage: float
    k: int
    n_real: int
    n_fake: int

    def __str__(self) -> str:
        return (
            f"precision {self.precision:.3f}, recall {self.recall:.3f}, "
            f"density {self.density:.3f}, coverage {self.coverage:.3f} (k={self.k})"
        )


def _ball_counts(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """For each row of ``points`` (P, D): how many balls (centres (C, D), radii (C,)) hold it."""
    return torch.cat(
        [
            (_distances(block, centres) <= radii).sum(dim=1)
            for block in _row_blocks(points, len(centres))
        ]
    )


def manifold_scores(real: Tensor, fake: Tensor, k: int = 5) -> ManifoldScores:
    """Precision, recall, density and coverage of samples ``fake`` (M, D) against ``real`` (N, D).

    Each point gets a ball reaching to its k-th nearest neighbour in its own set; the union of
    a set's balls is its estimated support ("manifold"). With B(x) the ball of a real point:

    * precision: the share of samples inside some real ball, i.e. of samples that look real
      (Kynkäänniemi et al. 2019, eq. 1);
    * recall: the share of real points inside some sample's ball, i.e. of the real data the
      samples reach (ibid.);
    * density: sum_j #{i : fake_j in B(real_i)} / (k M), 1 in expectation when both sets come
      from the same distribution, and unlike precision not fooled by a few outlying real points
      with huge balls (Naeem et al. 2020, eq. 3);
    * coverage: the share of real balls that hold at least one sample (ibid., eq. 4), which
      tends to 1 - 2^-k for identical distributions of equal size.

    ``k`` defaults to 5, the choice of Naeem et al. for 10,000 samples; Kynkäänniemi et al. used 3.
    A point on a ball's boundary counts as inside.
    """
    real = _features("real", real, min_rows=2)
    fake = _features("fake", fake, dim=real.shape[1], min_rows=2)
    real_radii = nearest_neighbour_radii(real, k)
    fake_radii = nearest_neighbour_radii(fake, k)
    fake_in_real_balls = _ball_counts(fake, real, real_radii)  # (M,)
    # one pass over the real-to-sample distances for both recall and coverage
    reached, covered = [], []
    for block, block_radii in zip(
        _row_blocks(real, len(fake)), _row_blocks(real_radii, len(fake)), strict=True
    ):
        distances = _distances(block, fake)  # (rows, M)
        reached.append((distances <= fake_radii).any(dim=1))  # inside some sample's ball
        covered.append(distances.min(dim=1).values <= block_radii)  # its ball holds a sample
    return ManifoldScores(
        precision=float((fake_in_real_balls > 0).double().mean()),
        recall=float(torch.cat(reached).double().mean()),
        density=int(fake_in_real_balls.sum()) / (k * len(fake)),
        coverage=float(torch.cat(covered).double().mean()),
        k=k,
        n_real=len(real),
        n_fake=len(fake),
    )


# --- memorisation ---------------------------------------------------------------------------------


def nearest_neighbours(queries: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
    """For each query (Q, D), the distance to its nearest reference (R, D) and that reference's
    index: (Q,) float64 and (Q,) int64.

    With pixels or features of generated samples as queries and the training set as references,
    distances far below those of held-out real images reveal copies of training images.
    """
    queries = _features("queries", queries)
    references = _features("references", references, dim=queries.shape[1])
    distances, indices = [], []
    for block in _row_blocks(queries, len(references)):
        nearest = _distances(block, references).min(dim=1)
        distances.append(nearest.values)
        indices.append(nearest.indices)
    return torch.cat(distances), torch.cat(indices)


# A query counts as a copy when its nearest reference is less than a third as far as the second
# nearest (Yoon et al. 2023; Gu et al. 2023).
COPY_RATIO = 1 / 3


def nearest_neighbour_ratios(queries: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
    """For each query (Q, D), the distance to its nearest reference (R, D) divided by the
    distance to the second nearest, and the nearest one's index: (Q,) float64 and (Q,) int64.

    A ratio far below 1 means the query sits on one reference, much closer to it than to any
    other: a copy, below COPY_RATIO = 1/3 as Yoon et al. (2023) and Gu et al. (2023) use it. A new
    image between several references has a ratio near 1. Needs R >= 2.
    """
    queries = _features("queries", queries)
    references = _features("references", references, dim=queries.shape[1], min_rows=2)
    ratios, indices = [], []
    for block in _row_blocks(queries, len(references)):
        nearest = _distances(block, references).topk(2, dim=1, largest=False)
        first, second = nearest.values.unbind(dim=1)
        ratios.append(first / second.clamp(min=torch.finfo(second.dtype).tiny))
        indices.append(nearest.indices[:, 0])
    return torch.cat(ratios), torch.cat(indices)
