"""Intervals shared by the study's report and the LLM judge."""

import statistics

N_BOOT = 2000


def bootstrap_ci(xs, rng, n=N_BOOT):
    """Percentile 95 % interval of the mean of xs (None values left out), by resampling xs; None below 2."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    means = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]
