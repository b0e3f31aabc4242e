"""The statistics every report uses (ser/stats.py)."""

import random

import numpy as np
import pytest

from ser.stats import crossed, crossed_ratio, holm, sign_flip_p, sign_flip_p_mc


def test_holm_multiplies_by_the_remaining_count_and_keeps_the_order():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})  # b: max(2 x 0.03, 1 x 0.04)
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


def test_the_exact_sign_flip_test_counts_patterns_and_the_monte_carlo_one_agrees():
    assert sign_flip_p([1.0, 1.0, 1.0]) == 2 / 8  # only all-plus and all-minus reach |3|
    diffs = [0.3, 0.1, -0.05, 0.2, 0.25, 0.15, -0.1, 0.2]
    assert sign_flip_p_mc(diffs, random.Random(0), n=20_000) == pytest.approx(sign_flip_p(diffs), abs=0.01)


def test_crossed_intervals_count_the_pairs_as_well_as_the_seeds():
    rng = np.random.default_rng(0)
    seeds, pairs = 20, 400
    seed_effect = rng.normal(0, 0.02, (seeds, 1))
    pair_effect = rng.normal(0, 0.5, (1, pairs))  # pairs differ a lot: the seed-only interval is too narrow
    table = 0.03 + seed_effect + pair_effect + rng.normal(0, 0.1, (seeds, pairs))
    out = crossed(table)
    seed_only_se = table.mean(1).std(ddof=1) / np.sqrt(seeds)
    assert out["mean"] == pytest.approx(table.mean())
    assert out["se"] > 3 * seed_only_se  # the pairs' share dominates
    assert out["se"] == pytest.approx(np.sqrt(0.02 ** 2 / seeds + 0.5 ** 2 / pairs + 0.1 ** 2 / (seeds * pairs)), rel=0.25)


def test_a_ratio_of_crossed_means_gets_a_two_way_bootstrap_interval():
    rng = np.random.default_rng(1)
    den = rng.binomial(1, 0.5, (10, 300)) - rng.binomial(1, 0.3, (10, 300))  # mean about 0.2
    num = den * rng.binomial(1, 0.5, (10, 300))  # about half of it
    out = crossed_ratio(num, den, draws=500)
    assert out["ratio"] == pytest.approx(num.mean() / den.mean())
    assert out["ci"][0] < out["ratio"] < out["ci"][1] and out["ci"][1] - out["ci"][0] < 1
    assert crossed_ratio(num, np.zeros_like(den))["ratio"] is None
    with pytest.raises(ValueError, match="same seeds and pairs"):
        crossed_ratio(num, den[:5])
