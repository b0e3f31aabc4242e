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


def crossed(diffs_by_seed) -> dict:
    """The mean of a seeds x pairs table of paired differences (every seed scored on the same held-out pairs),
    with a 95 % interval and a two-sided p that count both sources of variance: the random-effects variance
    of a crossed design without replication, from its ANOVA mean squares (seeds MS_a, pairs MS_b, residual
    MS_e): var(mean) = s2_a / S + s2_b / P + s2_e / (S P), s2_a = (MS_a - MS_e) / P and s2_b = (MS_b - MS_e) / S
    (each at least 0), s2_e = MS_e; normal interval and p."""
    import numpy as np

    d = np.asarray(diffs_by_seed, dtype=np.float64)  # [seeds, pairs]
    s, p = d.shape
    m, rows, cols = d.mean(), d.mean(1), d.mean(0)
    ms_a = p * ((rows - m) ** 2).sum() / (s - 1)
    ms_b = s * ((cols - m) ** 2).sum() / (p - 1)
    ms_e = ((d - rows[:, None] - cols[None, :] + m) ** 2).sum() / ((s - 1) * (p - 1))
    var = max(ms_a - ms_e, 0) / (p * s) + max(ms_b - ms_e, 0) / (s * p) + ms_e / (s * p)
    se = math.sqrt(var)
    z = m / se if se else math.inf * (1 if m else 0)
    return {"mean": float(m), "ci": (float(m - 1.96 * se), float(m + 1.96 * se)),
            "p": math.erfc(abs(z) / math.sqrt(2)) if se else float(m == 0), "se": se, "seeds": s, "pairs": p}


def crossed_ratio(numerator, denominator, draws: int = N_BOOT, seed: int = 0) -> dict:
    """mean(numerator) / mean(denominator) of two seeds x pairs tables of paired differences (e.g. gap recovered:
    (SER - seed RM) / (all labels - seed RM)), with a 95 % two-way bootstrap interval: the seeds and the pairs
    resampled independently, both sources of variance, percentile interval. None where a mean is 0."""
    import numpy as np

    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"tables of shapes {a.shape} and {b.shape}: the same seeds and pairs are needed")
    if b.mean() == 0:
        return {"ratio": None, "ci": None}
    rng = np.random.default_rng(seed)
    s, p = a.shape
    stats = []
    for _ in range(draws):
        rows, cols = rng.integers(0, s, s), rng.integers(0, p, p)
        num, den = a[rows][:, cols].mean(), b[rows][:, cols].mean()
        stats.append(num / den if den else np.nan)
    stats = np.sort(np.asarray(stats)[~np.isnan(stats)])
    return {"ratio": float(a.mean() / b.mean()),
            "ci": (float(stats[int(0.025 * len(stats))]), float(stats[int(0.975 * len(stats)) - 1])) if len(stats) else None}


def seeds_and_pairs_ci(accuracies, pairs: int) -> tuple[float, float]:
    """95 % interval of a mean accuracy over seeds on one set of `pairs` held-out pairs, counting both: the
    seeds' variance over their number plus the binomial bound m (1 - m) / pairs on the pairs' share (without
    per-pair results the two cannot be told apart, so this errs wide)."""
    m, sd = mean_std(accuracies)
    se = math.sqrt(sd ** 2 / len(accuracies) + m * (1 - m) / pairs)
    return m - 1.96 * se, m + 1.96 * se
