"""Kernel distance, the extrapolated Fréchet distance, precision / recall / density / coverage and
nearest neighbours, each against a direct computation with explicit loops or against a closed
form averaged over many Monte Carlo repetitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from diffusion_lib import feature_metrics
from diffusion_lib.feature_metrics import (
    PolynomialKernel,
    frechet_distance_at_infinity,
    kernel_distance,
    manifold_scores,
    mmd_squared_unbiased,
    nearest_neighbour_radii,
    nearest_neighbour_ratios,
    nearest_neighbours,
)


def _gaussian(n: int, dim: int, seed: int, mean: float = 0.0) -> torch.Tensor:
    return mean + torch.randn(
        n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _within_monte_carlo_error(values: list[float], expected: float, sigmas: float = 4.0) -> None:
    values_array = np.asarray(values)
    error = values_array.std(ddof=1) / math.sqrt(len(values_array))
    assert abs(values_array.mean() - expected) < sigmas * error, (
        f"mean {values_array.mean():.5f} vs expected {expected:.5f}, standard error {error:.5f}"
    )


# --- kernel distance -----------------------------------------------------------------------------


def test_polynomial_kernel_matches_its_formula_pair_by_pair() -> None:
    x, y = _gaussian(4, 3, 0), _gaussian(5, 3, 1)
    matrix = PolynomialKernel()(x, y)
    for i, j in itertools.product(range(4), range(5)):
        expected = (float(x[i] @ y[j]) / 3 + 1) ** 3
        assert math.isclose(float(matrix[i, j]), expected, rel_tol=1e-12)
    torch.testing.assert_close(
        PolynomialKernel().diagonal(x), torch.diagonal(PolynomialKernel()(x, x))
    )


@pytest.mark.parametrize("block_entries", [None, 12])  # 12: kernel blocks of 1 or 2 rows
def test_unbiased_mmd_matches_the_u_statistic_written_as_loops(
    block_entries: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if block_entries is not None:
        monkeypatch.setattr(feature_metrics, "MAX_BLOCK_ENTRIES", block_entries)
    x, y = _gaussian(7, 3, 2), _gaussian(5, 3, 3, mean=0.5)
    kernel = PolynomialKernel(degree=2, gamma=0.7, coef0=0.3)

    def k(a: torch.Tensor, b: torch.Tensor) -> float:
        return (0.7 * float(a @ b) + 0.3) ** 2

    within_x = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    within_y = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    between = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / (7 * 5)
    expected = within_x + within_y - 2 * between
    assert math.isclose(mmd_squared_unbiased(x, y, kernel), expected, rel_tol=1e-10)


def test_unbiased_mmd_with_a_linear_kernel_averages_to_the_squared_mean_gap() -> None:
    # With k(x, y) = x.y, MMD^2 = ||mu_a - mu_b||^2 exactly; the estimate from 4 and 3 points
    # must average to it, while keeping the diagonal (the V-statistic) must not.
    linear = PolynomialKernel(degree=1, gamma=1.0, coef0=0.0)
    mu_gap = torch.tensor([0.6, -0.3], dtype=torch.float64)
    generator = torch.Generator().manual_seed(4)
    unbiased, biased = [], []
    for _ in range(4000):
        a = torch.randn(4, 2, generator=generator, dtype=torch.float64)
        b = torch.randn(3, 2, generator=generator, dtype=torch.float64) + mu_gap
        unbiased.append(mmd_squared_unbiased(a, b, linear))
        biased.append(float((a.mean(0) - b.mean(0)).square().sum()))
    expected = float(mu_gap.square().sum())
    _within_monte_carlo_error(unbiased, expected)
    # the plug-in ||mean_a - mean_b||^2 is too large by tr(I) (1/4 + 1/3) = 7/6
    assert np.mean(biased) - expected == pytest.approx(2 * (1 / 4 + 1 / 3), abs=0.1)


def test_unbiased_mmd_with_the_cubic_kernel_averages_to_zero_for_one_distribution() -> None:
    generator = torch.Generator().manual_seed(5)
    values = [
        mmd_squared_unbiased(
            torch.rand(6, 3, generator=generator, dtype=torch.float64),
            torch.rand(9, 3, generator=generator, dtype=torch.float64),
        )
        for _ in range(3000)
    ]
    _within_monte_carlo_error(values, 0.0)


def test_kernel_distance_is_the_mean_and_standard_error_over_disjoint_subsets() -> None:
    a, b = _gaussian(23, 4, 6), _gaussian(31, 4, 7, mean=0.2)
    result = kernel_distance(a, b, num_subsets=4, generator=torch.Generator().manual_seed(8))
    generator = torch.Generator().manual_seed(8)
    order_a, order_b = (
        torch.randperm(23, generator=generator),
        torch.randperm(31, generator=generator),
    )
    estimates = [
        mmd_squared_unbiased(a[order_a[5 * s : 5 * s + 5]], b[order_b[5 * s : 5 * s + 5]])
        for s in range(4)
    ]
    assert (result.num_subsets, result.subset_size) == (4, 5)
    assert result.mean == pytest.approx(np.mean(estimates), rel=1e-12)
    assert result.standard_error == pytest.approx(np.std(estimates, ddof=1) / 2, rel=1e-12)
    single = kernel_distance(a, b, num_subsets=1)
    assert math.isnan(single.standard_error) and single.subset_size == 23


def test_kernel_distance_tells_two_distributions_apart_and_one_from_itself() -> None:
    same = kernel_distance(_gaussian(2000, 8, 9), _gaussian(2000, 8, 10))
    apart = kernel_distance(_gaussian(2000, 8, 11), _gaussian(2000, 8, 12, mean=0.3))
    assert abs(same.mean) < 4 * same.standard_error
    assert apart.mean > 10 * apart.standard_error


# --- the Fréchet distance at infinity -------------------------------------------------------------


def test_frechet_trend_is_a_least_squares_line_in_one_over_n() -> None:
    features = _gaussian(400, 3, 13, mean=0.4)
    trend = frechet_distance_at_infinity(
        features, torch.zeros(3), torch.eye(3), sizes=(50, 100, 200, 400)
    )
    slope, intercept = np.polyfit(1 / np.array(trend.sizes), np.array(trend.distances), 1)
    assert trend.at_infinity == pytest.approx(intercept, rel=1e-9)
    assert trend.slope == pytest.approx(slope, rel=1e-9)
    assert trend.sizes == (50, 100, 200, 400) and trend.distances[-1] > 0


def test_frechet_distance_at_infinity_removes_the_finite_sample_bias() -> None:
    # Samples from N(m, I) against the exact reference N(0, I): the true distance is ||m||^2.
    dim, true_distance = 8, 8 * 0.1**2
    estimates, finite = [], []
    for seed in range(40):
        trend = frechet_distance_at_infinity(
            _gaussian(2000, dim, 100 + seed, mean=0.1),
            torch.zeros(dim),
            torch.eye(dim),
            generator=torch.Generator().manual_seed(seed),
        )
        estimates.append(trend.at_infinity)
        finite.append(trend.distances[-1])  # all 2000 samples
    # the full-sample distance is biased upwards (by 0.012, about 6 standard errors); the
    # extrapolation is not
    finite_error = np.std(finite, ddof=1) / math.sqrt(len(finite))
    assert np.mean(finite) - true_distance > 4 * finite_error
    _within_monte_carlo_error(estimates, true_distance)
    assert len(trend.sizes) == 15 and trend.sizes[0] == 400 and trend.sizes[-1] == 2000


# --- precision, recall, density, coverage ---------------------------------------------------------


def _brute_force_scores(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, ...]:
    def radius(points: torch.Tensor, i: int) -> float:
        others = sorted(float((points[i] - points[j]).norm()) for j in range(len(points)) if j != i)
        return others[k - 1]

    real_r = [radius(real, i) for i in range(len(real))]
    fake_r = [radius(fake, j) for j in range(len(fake))]

    def inside(point: torch.Tensor, centre: torch.Tensor, r: float) -> bool:
        return float((point - centre).norm()) <= r

    precision = np.mean(
        [any(inside(f, real[i], real_r[i]) for i in range(len(real))) for f in fake]
    )
    recall = np.mean([any(inside(r, fake[j], fake_r[j]) for j in range(len(fake))) for r in real])
    density = sum(inside(f, real[i], real_r[i]) for f in fake for i in range(len(real))) / (
        k * len(fake)
    )
    coverage = np.mean([any(inside(f, real[i], real_r[i]) for f in fake) for i in range(len(real))])
    return float(precision), float(recall), float(density), float(coverage)


@pytest.mark.parametrize("k", [1, 3])
def test_manifold_scores_match_the_definitions_written_as_loops(k: int, monkeypatch) -> None:
    monkeypatch.setattr(feature_metrics, "MAX_BLOCK_ENTRIES", 100)  # blocks of 3 or 4 rows
    real, fake = _gaussian(30, 3, 14), _gaussian(25, 3, 15, mean=0.4) * 1.3
    scores = manifold_scores(real, fake, k=k)
    expected = _brute_force_scores(real, fake, k)
    assert (scores.precision, scores.recall, scores.density, scores.coverage) == pytest.approx(
        expected, abs=1e-12
    )
    assert (scores.k, scores.n_real, scores.n_fake) == (k, 30, 25)


def test_radii_and_nearest_neighbours_match_sorting_every_distance(monkeypatch) -> None:
    # blocks of 30 // 11 = 2 rows: several blocks, and a ragged last one
    monkeypatch.setattr(feature_metrics, "MAX_BLOCK_ENTRIES", 30)
    points, queries = _gaussian(11, 2, 16), _gaussian(8, 2, 17)
    everything = torch.cdist(points, points)
    torch.testing.assert_close(
        nearest_neighbour_radii(points, 2), everything.sort(dim=1).values[:, 2]
    )
    distances, indices = nearest_neighbours(queries, points)
    for q in range(8):
        gaps = [float((queries[q] - points[r]).norm()) for r in range(11)]
        assert int(indices[q]) == int(np.argmin(gaps))
        assert float(distances[q]) == pytest.approx(min(gaps), abs=1e-12)


def test_density_and_coverage_have_their_closed_form_means_for_one_distribution() -> None:
    # For N real and M fake points from one law, E[density] = 1 and
    # E[coverage] = 1 - C(N-1, k) / C(N-1+M, k) (Naeem et al. 2020, appendix).
    n, m, k = 40, 30, 3
    generator = torch.Generator().manual_seed(18)
    densities, coverages = [], []
    for _ in range(400):
        scores = manifold_scores(
            torch.randn(n, 2, generator=generator, dtype=torch.float64),
            torch.randn(m, 2, generator=generator, dtype=torch.float64),
            k=k,
        )
        densities.append(scores.density)
        coverages.append(scores.coverage)
    _within_monte_carlo_error(densities, 1.0)
    _within_monte_carlo_error(coverages, 1 - math.comb(n - 1, k) / math.comb(n - 1 + m, k))


def test_precision_and_recall_separate_quality_from_variety() -> None:
    generator = torch.Generator().manual_seed(19)
    real = torch.rand(4000, 1, generator=generator, dtype=torch.float64)  # U[0, 1]
    half = 0.5 * torch.rand(4000, 1, generator=generator, dtype=torch.float64)  # U[0, 1/2]
    scores = manifold_scores(real, half, k=3)
    # every sample lies in the real support; the few outside all balls fall in gaps between
    # real points whose k nearest neighbours all lie on the far side
    assert scores.precision > 0.98
    assert scores.recall == pytest.approx(0.5, abs=0.02)  # but only half the data is reached
    apart = manifold_scores(real, half + 2.0, k=3)
    assert (apart.precision, apart.recall, apart.density, apart.coverage) == (0, 0, 0, 0)
    swapped = manifold_scores(half, real, k=3)
    assert (swapped.precision, swapped.recall) == (scores.recall, scores.precision)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: manifold_scores(torch.zeros(5, 2), torch.zeros(5, 3)), "same feature extractor"),
        (lambda: manifold_scores(torch.zeros(5), torch.zeros(5, 2)), r"shape \(N, D\)"),
        (lambda: manifold_scores(torch.rand(4, 2), torch.rand(9, 2), k=4), r"k must be .* 1\.\.3"),
        (lambda: nearest_neighbours(torch.full((2, 2), math.nan), torch.zeros(3, 2)), "finite"),
        (lambda: kernel_distance(torch.rand(7, 2), torch.rand(9, 2), num_subsets=4), "at least 2"),
        (lambda: kernel_distance(torch.rand(7, 2), torch.rand(9, 2), num_subsets=0), "positive"),
        (lambda: mmd_squared_unbiased(torch.rand(1, 2), torch.rand(9, 2)), "at least 2 rows"),
        (
            lambda: frechet_distance_at_infinity(
                torch.rand(50, 2), torch.zeros(2), torch.eye(2), sizes=(10, 10)
            ),
            "two distinct",
        ),
        (
            lambda: frechet_distance_at_infinity(
                torch.rand(50, 2), torch.zeros(2), torch.eye(2), sizes=(10, 60)
            ),
            r"2\.\.50",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("block_entries", [None, 120])  # 120: blocks of 2 queries
def test_ratios_match_a_direct_computation(
    block_entries: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if block_entries is not None:
        monkeypatch.setattr(feature_metrics, "MAX_BLOCK_ENTRIES", block_entries)
    generator = torch.Generator().manual_seed(5)
    queries, references = (
        torch.randn((30, 7), generator=generator),
        torch.randn((50, 7), generator=generator),
    )
    ratios, indices = nearest_neighbour_ratios(queries, references)
    for query, ratio, index in zip(queries, ratios, indices, strict=True):
        distances = sorted(
            (math.dist(query.tolist(), r.tolist()), k) for k, r in enumerate(references)
        )
        assert ratio.item() == pytest.approx(distances[0][0] / distances[1][0], rel=1e-9)
        assert index.item() == distances[0][1]


def test_a_copy_has_a_small_ratio_and_a_point_between_two_a_ratio_of_one():
    references = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    ratios, indices = nearest_neighbour_ratios(torch.tensor([[0.1, 0.0], [1.5, 0.0]]), references)
    torch.testing.assert_close(ratios, torch.tensor([0.1 / 2.9, 1.0], dtype=torch.float64))
    assert indices[0].item() == 0


def test_ratios_need_two_references():
    with pytest.raises(ValueError, match="at least 2 rows"):
        nearest_neighbour_ratios(torch.zeros(3, 2), torch.zeros(1, 2))
