"""Uncertainty of the reported numbers: percentile bootstrap intervals, paired and clustered (pure numpy).

Every number tea-lightning reports about images (a CLIP-T mean, a readout share, TEA minus baseline) is a mean over
images that share things: the images of one prompt, or of one training seed, are not independent draws. So the
interval resamples at two levels, the way the numbers were made: first whole clusters (prompts, or training seeds),
then images inside each drawn cluster. The estimate is the mean over clusters of each cluster's mean, the paper's
aggregation ("mean over images of a prompt, then over prompts"). Without clusters it is the ordinary bootstrap of
a mean.

A gap (TEA minus baseline) is bootstrapped on the paired differences: baseline and TEA images of the same index
start from the same noise, so their difference removes the seed-to-seed spread that two separate intervals would
both carry.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95
_CHUNK = 4_000_000  # values drawn at once: bounds memory for many clusters of many images


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval: `estimate` in [`low`, `high`] at `confidence`, from `n` values in
    `clusters` clusters."""

    estimate: float
    low: float
    high: float
    n: int
    clusters: int
    confidence: float = CONFIDENCE

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (a gap that the resampling never erases)."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def _check(values: Sequence[float], groups: Sequence[Hashable] | None, confidence: float, resamples: int
           ) -> tuple[np.ndarray, list[np.ndarray]]:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("bootstrap of no values: there is nothing to estimate.")
    if not np.isfinite(x).all():
        raise ValueError(f"bootstrap of non-finite values ({int((~np.isfinite(x)).sum())} of {x.size}); drop or fix "
                         "them first.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must lie in (0, 1), e.g. 0.95.")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples={resamples!r}: use a whole number of at least 100 (10,000 is usual).")
    if groups is None:
        return x, [np.arange(x.size)]
    if len(groups) != x.size:
        raise ValueError(f"{len(groups)} group labels for {x.size} values; give one label per value.")
    members: dict[Hashable, list[int]] = {}
    for i, label in enumerate(groups):
        members.setdefault(label, []).append(i)
    return x, [np.asarray(m) for m in members.values()]


def bootstrap_mean(values: Sequence[float], groups: Sequence[Hashable] | None = None, *,
                   confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The mean of `values` and its percentile bootstrap interval.

    Args:
        values: One number per image (a score, or 1/0 for a yes/no reading).
        groups: The cluster of each value (its prompt, or its training seed), or None for independent values. The
            estimate is then the mean of the cluster means, and each resample draws clusters with replacement, then
            values with replacement inside each drawn cluster.
        confidence: Coverage of the interval (0.95: the 2.5th and 97.5th percentiles).
        resamples: Bootstrap resamples.
        seed: Seed of the resampling: the same inputs always give the same interval.
    """
    x, clusters = _check(values, groups, confidence, resamples)
    means = np.array([x[c].mean() for c in clusters])
    estimate = float(means.mean())  # independent values: one cluster, whose mean is the mean
    rng = np.random.default_rng(seed)
    sizes = np.array([len(c) for c in clusters])
    padded = np.zeros((len(clusters), sizes.max()))
    for i, c in enumerate(clusters):
        padded[i, : len(c)] = x[c]
    draws = []
    chunk = max(1, _CHUNK // (len(clusters) * int(sizes.max())))
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        picked = rng.integers(0, len(clusters), size=(b, len(clusters))) if groups is not None else \
            np.zeros((b, 1), dtype=np.int64)  # [b, G]: which cluster fills each slot
        n = sizes[picked]  # [b, G]
        # Values inside each drawn cluster: uniform indices below that cluster's size.
        inner = (rng.random((b, picked.shape[1], int(sizes.max()))) * n[..., None]).astype(np.int64)
        mask = np.arange(sizes.max()) < n[..., None]  # [b, G, max]
        sums = (padded[picked[..., None], inner] * mask).sum(axis=-1)  # [b, G]
        draws.append((sums / n).mean(axis=1))
    draws = np.concatenate(draws)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high), int(x.size), len(clusters), confidence)


def paired_difference(treated: Sequence[float], baseline: Sequence[float], groups: Sequence[Hashable] | None = None,
                      **kwargs) -> Interval:
    """`treated` minus `baseline`, pair by pair (same prompt, image index and seed), with the bootstrap interval of
    the mean difference. `groups` and the keyword arguments are those of `bootstrap_mean`."""
    t, b = np.asarray(treated, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if t.shape != b.shape:
        raise ValueError(f"paired difference of {t.size} treated and {b.size} baseline values: each TEA image needs "
                         "its baseline image of the same prompt, index and seed.")
    return bootstrap_mean(t - b, groups, **kwargs)
