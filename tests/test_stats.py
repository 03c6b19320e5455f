"""Bootstrap intervals: right on cases small enough to work out by hand, honest in coverage, paired and clustered."""

import numpy as np
import pytest

from tea_lightning.stats import bootstrap_mean, paired_difference


def test_the_interval_of_a_tiny_sample_matches_the_hand_computed_bootstrap_distribution():
    # Resampling [0, 0, 3] gives mean k with k ~ Binomial(3, 1/3): P = 8/27, 12/27, 6/27, 1/27 for k = 0, 1, 2, 3.
    # P(mean <= 2) = 26/27 = 0.963: the 95th percentile is 2, the 97.5th is 3; the 2.5th and 5th are 0.
    interval = bootstrap_mean([0.0, 0.0, 3.0], confidence=0.90)
    assert (interval.estimate, interval.low, interval.high) == (1.0, 0.0, 2.0)
    assert (bootstrap_mean([0.0, 0.0, 3.0]).low, bootstrap_mean([0.0, 0.0, 3.0]).high) == (0.0, 3.0)


def test_clusters_weigh_equally_and_are_resampled_whole():
    # Cluster a holds three 0s, cluster b one 1: the paper's aggregation (mean of cluster means) is 0.5, not the
    # pooled 0.25; resampling two clusters gives 0, 0.5 or 1 with P = 1/4, 1/2, 1/4, so the 80 % interval is [0, 1].
    interval = bootstrap_mean([0.0, 0.0, 0.0, 1.0], groups=["a", "a", "a", "b"], confidence=0.8)
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.0, 1.0)
    assert (interval.n, interval.clusters) == (4, 2)


def test_a_constant_paired_gap_has_no_width_and_excludes_zero():
    baseline = np.random.default_rng(0).normal(size=40)
    gap = paired_difference(baseline + 0.5, baseline)
    assert gap.estimate == pytest.approx(0.5) and gap.low == pytest.approx(0.5) and gap.high == pytest.approx(0.5)
    assert gap.excludes_zero()


def test_pairing_removes_the_spread_both_settings_share():
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(scale=5.0, size=64)  # what the shared initial noise does to both images
    baseline, treated = seed_effect + rng.normal(size=64), seed_effect + 0.6 + rng.normal(size=64)
    paired = paired_difference(treated, baseline)
    separate = [bootstrap_mean(treated), bootstrap_mean(baseline)]
    assert paired.high - paired.low < (separate[0].high - separate[0].low) / 3, "pairing must narrow the gap"
    assert paired.excludes_zero()


def test_a_95_percent_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    covered = 0
    for i in range(300):
        interval = bootstrap_mean(rng.normal(loc=1.0, size=40), resamples=1000, seed=i)
        covered += interval.low <= 1.0 <= interval.high
    assert 0.88 <= covered / 300 <= 0.99, covered / 300


def test_between_cluster_spread_widens_the_interval():
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=2.0, size=5)  # five training seeds that differ
    values = np.concatenate([c + rng.normal(scale=0.2, size=16) for c in centres])
    groups = np.repeat(np.arange(5), 16)
    clustered, naive = bootstrap_mean(values, groups=list(groups)), bootstrap_mean(values)
    assert clustered.high - clustered.low > 2 * (naive.high - naive.low)


def test_the_same_seed_gives_the_same_interval_and_bad_input_is_named():
    values = np.random.default_rng(4).random(30)
    assert bootstrap_mean(values, seed=7) == bootstrap_mean(values, seed=7)
    with pytest.raises(ValueError, match="3 treated and 2 baseline"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_mean([1.0, float("nan")])
    with pytest.raises(ValueError, match="group labels"):
        bootstrap_mean([1.0, 2.0], groups=["a"])
    with pytest.raises(ValueError, match="confidence=1.5"):
        bootstrap_mean([1.0, 2.0], confidence=1.5)
