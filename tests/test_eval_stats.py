"""Unit tests of the evaluation statistics (pure functions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kalm_ray.eval.stats import paired_difference, seed_mean_std, wilson_interval


def test_wilson_matches_hand_computed_case() -> None:
    # 8 successes of 10, z = 1.96: p = 0.8, z^2 = 3.8416
    # centre = (0.8 + 3.8416/20) / (1 + 3.8416/10) = 0.99208 / 1.38416 = 0.716738
    # half = 1.96 * sqrt(0.8*0.2/10 + 3.8416/400) / 1.38416 = 1.96 * 0.160012 / 1.38416 = 0.226581
    lo, hi = wilson_interval(8, 10, z=1.96)
    assert lo == pytest.approx(0.490, abs=5e-4)
    assert hi == pytest.approx(0.943, abs=5e-4)
    assert lo == pytest.approx(0.716738 - 0.226581, abs=1e-5)


def test_wilson_edges_stay_in_unit_interval_and_are_not_degenerate() -> None:
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2  # 0/20: [0, 0.161]
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and 0.8 < lo < 0.9
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_wilson_shrinks_with_more_episodes() -> None:
    w = [np.diff(wilson_interval(n // 2, n))[0] for n in (10, 100, 1000)]
    assert w[0] > w[1] > w[2]
    assert w[2] == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 1000), rel=0.01)


def test_seed_mean_std() -> None:
    assert seed_mean_std([0.5]) == (0.5, 0.0)
    mean, std = seed_mean_std([0.2, 0.4])
    assert mean == pytest.approx(0.3) and std == pytest.approx(math.sqrt(0.02))


def test_paired_difference_averages_seeds_then_specs() -> None:
    a = np.array([[0, 0, 1, 0], [0, 1, 1, 0]])
    b = np.array([[1, 0, 1, 1], [1, 1, 1, 0]])
    d = paired_difference(a, b)
    # per-spec differences averaged over seeds: [1, 0, 0, 0.5]; diff = their mean
    assert d.diff == pytest.approx(0.375)
    # Agresti-Min by hand: n* = 6, mean* = 1.5 / 6 = 0.25,
    # E*[d^2] = (1 + 0.25 + 1) / 6 = 0.375, se = sqrt((0.375 - 0.0625) / 6) = 0.228218
    assert d.low == pytest.approx(0.25 - 1.959963984540054 * 0.2282177, abs=1e-6)
    assert d.high == pytest.approx(0.25 + 1.959963984540054 * 0.2282177, abs=1e-6)
    assert (d.n_specs, d.n_pairs) == (4, 8)


def test_paired_difference_one_seed_is_agresti_min() -> None:
    # 2x2 table over 30 specs: 5 only b succeeds, 2 only a succeeds, 23 concordant.
    a = np.array([[0] * 5 + [1] * 2 + [0] * 23])
    b = np.array([[1] * 5 + [0] * 2 + [0] * 23])
    d = paired_difference(a, b)
    n, p12, p21 = 32, 5.5 / 32, 2.5 / 32
    diff = p12 - p21
    se = math.sqrt((p12 + p21 - diff**2) / n)
    assert d.diff == pytest.approx(3 / 30)
    assert (d.low, d.high) == pytest.approx(
        (diff - 1.959963984540054 * se, diff + 1.959963984540054 * se)
    )


def test_paired_difference_identical_mixes_has_zero_diff_and_honest_width() -> None:
    a = np.random.default_rng(0).integers(0, 2, (3, 50))
    d = paired_difference(a, a.copy())
    assert d.diff == 0.0
    assert d.low == pytest.approx(-1.96 / 52, rel=1e-3) and d.high == pytest.approx(
        1.96 / 52, rel=1e-3
    )
    with pytest.raises(ValueError):
        paired_difference(a, a[:, :10])
