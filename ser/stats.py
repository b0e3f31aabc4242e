"""The statistics every report uses, in one place: means, bootstrap intervals (over seeds, or over seeds and
held-out pairs together), the exact and Monte Carlo paired sign-flip tests, Holm's correction, and the
calibration (ECE) of pairwise rewards. Used by experiments/report.py, experiments/frozen_study.py,
experiments/ask_study.py, experiments/run.py and the LLM judge."""

import itertools
import math
import statistics

N_BOOT = 2000


def mean_std(xs):
    """Mean and sample std of xs (None values left out); (None, None) when empty, std 0 for one value."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def bootstrap_ci(xs, rng, n=N_BOOT):
    """Percentile 95 % interval of the mean of xs (None values left out), by resampling xs; None below 2."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    means = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def paired_bootstrap_ci(pairs_by_seed, rng, n=N_BOOT):
    """pairs_by_seed: per seed, a list of (a_correct, b_correct). 95 % interval of mean(a - b), resampling the
    seeds and then the pairs within each seed (both sources of variance)."""
    seeds = list(pairs_by_seed)
    if not seeds:
        return None
    stats = []
    for _ in range(n):
        diffs = []
        for s in rng.choices(seeds, k=len(seeds)):
            pairs = pairs_by_seed[s]
            sample = rng.choices(pairs, k=len(pairs))
            diffs.append(sum(a - b for a, b in sample) / len(sample))
        stats.append(statistics.fmean(diffs))
    stats.sort()
    return stats[int(0.025 * n)], stats[int(0.975 * n) - 1]


def sign_flip_p(diffs) -> float:
    """Exact two-sided paired sign-flip permutation p-value of the mean difference (at most 20 values)."""
    observed = abs(sum(diffs))
    n = len(diffs)
    if n > 20:
        raise ValueError("the exact test enumerates 2^n sign patterns; at most 20 seeds")
    hits = sum(abs(sum(d if s else -d for d, s in zip(diffs, signs))) >= observed - 1e-12
               for signs in itertools.product((True, False), repeat=n))
    return hits / 2 ** n


def sign_flip_p_mc(diffs, rng, n=200_000) -> float:
    """The sign-flip p-value by Monte Carlo (2^20 patterns are many to enumerate in Python)."""
    observed = abs(sum(diffs))
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed - 1e-12 for _ in range(n))
    return (hits + 1) / (n + 1)


def holm(ps: dict) -> dict:
    """Holm's step-down adjusted p-values of a family {name: p}."""
    order = sorted(ps, key=ps.get)
    out, running = {}, 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * ps[k]))
        out[k] = running
    return out


def confidence_bin(reward_gap: float) -> tuple[float, int]:
    """The RM's confidence sigmoid(|r_j - r_k|) in [0.5, 1] and its bin of ten."""
    conf = 1 / (1 + math.exp(-abs(reward_gap)))
    return conf, min(9, int((conf - 0.5) * 20))


def calibration(gaps) -> tuple[float | None, list[dict]]:
    """Expected calibration error of the confidence sigmoid(|r_j - r_k|) of pairs whose preferred side is j
    (right when the gap is positive), in ten bins over [0.5, 1]; and each bin's pairs, accuracy and mean
    confidence."""
    bins = [[0, 0, 0.0] for _ in range(10)]  # pairs, correct, summed confidence
    for d in gaps:
        conf, b = confidence_bin(d)
        bins[b][0] += 1
        bins[b][1] += d > 0
        bins[b][2] += conf
    n = sum(m for m, _, _ in bins)
    ece = sum(abs(c - s) for m, c, s in bins if m) / n if n else None  # sum over bins of |correct - conf| / n
    return ece, [{"pairs": m, "accuracy": c / m if m else None, "confidence": s / m if m else None} for m, c, s in bins]
