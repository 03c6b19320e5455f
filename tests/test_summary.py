"""Summary of a scores.csv: means per prompt, per concept and overall, standard deviations, gaps, the tables."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from tea_lightning.evaluation import tea_tag
from tea_lightning.stats import bootstrap_mean
from tea_lightning.summary import BASELINE, METRICS, read_scores, summarize, write_summary


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _score_row(concept, tag, prompt, image, values, rho="", alpha="", training_seed=""):
    row = dict(concept=concept, training_seed=training_seed, tag=tag, mode=BASELINE if tag == BASELINE else "tea",
               rho=rho, alpha=alpha,
               prompt_index=prompt, image_index=image, seed=image, template=f"t{prompt} {{}}")
    row.update(zip(METRICS, values, strict=True))
    return row


def test_summary_means_and_gaps_equal_a_hand_computation(tmp_path):
    tea = tea_tag(0.2, 0.5)
    rows = [  # concept a: prompt 0 has one image, prompt 1 three (so mean of prompt means != mean of images)
        _score_row("a", BASELINE, 0, 0, [10, 20, 30, 40, 50]),
        _score_row("a", BASELINE, 1, 0, [20, 20, 20, 20, 20]),
        _score_row("a", BASELINE, 1, 1, [30, 30, 30, 30, 30]),
        _score_row("a", BASELINE, 1, 2, [40, 40, 40, 40, 40]),
        _score_row("a", tea, 0, 0, [12, 21, 33, 39, 45], 0.2, 0.5),
        _score_row("a", tea, 1, 0, [22, 22, 22, 22, 22], 0.2, 0.5),
        _score_row("a", tea, 1, 1, [32, 32, 32, 32, 32], 0.2, 0.5),
        _score_row("a", tea, 1, 2, [42, 42, 42, 42, 42], 0.2, 0.5),
        _score_row("b", BASELINE, 0, 0, [60, 60, 60, 60, 60]),
        _score_row("b", tea, 0, 0, [70, 50, 60, 60, 60], 0.2, 0.5),
    ]
    scores = tmp_path / "scores.csv"
    with scores.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_summary(scores)
    summary = read_csv(tmp_path / "summary.csv")

    def get(level, concept, tag, metric, prompt=""):
        match = [r for r in summary if (r["level"], r["concept"], r["tag"], r["prompt_index"]) ==
                 (level, concept, tag, str(prompt))]
        assert len(match) == 1, (level, concept, tag, prompt)
        return float(match[0][metric])

    assert get("prompt", "a", BASELINE, "clip_t_full", 1) == pytest.approx(30)
    # concept a, CLIP-T full: baseline (10 + 30) / 2 = 20; TEA (12 + 32) / 2 = 22
    assert get("concept", "a", BASELINE, "clip_t_full") == pytest.approx(20)
    assert get("concept", "a", tea, "clip_t_full") == pytest.approx(22)
    assert get("concept", "a", f"gap {tea}", "clip_t_full") == pytest.approx(2)
    # overall = mean over concepts: baseline (20 + 60) / 2 = 40, TEA (22 + 70) / 2 = 46, gap 6
    assert get("overall", "", BASELINE, "clip_t_full") == pytest.approx(40)
    assert get("overall", "", tea, "clip_t_full") == pytest.approx(46)
    assert get("overall", "", f"gap {tea}", "clip_t_full") == pytest.approx(6)
    # CLIP-I (4th metric): a baseline (40 + 30) / 2 = 35, TEA (39 + 32) / 2 = 35.5; b 60 / 60; gap overall 0.25
    assert get("overall", "", f"gap {tea}", "clip_i") == pytest.approx(0.25)
    # DINO-I: a baseline (50 + 30) / 2 = 40, TEA (45 + 32) / 2 = 38.5; b 60 / 60; gap overall -0.75
    assert get("overall", "", f"gap {tea}", "dino_i") == pytest.approx(-0.75)
    # the standard deviation overall is over the concepts' means: baseline CLIP-T full stdev(20, 60)
    assert float(next(r for r in summary if r["level"] == "overall" and r["tag"] == BASELINE)["clip_t_full_std"]) \
        == pytest.approx(math.sqrt(800))
    text = (tmp_path / "summary.md").read_text()
    # overall gaps per metric: CLIP-T concept a 26.5 - 25, b 50 - 60: (1.5 - 10) / 2; context (2.5 + 0) / 2
    line = next(t for t in text.splitlines() if t.startswith("| gap (TEA rho=0.2 alpha=0.5 − baseline) |"))
    assert [cell.split(" [")[0] for cell in line.strip("| ").split(" | ")[1:]] == \
        ["+6.00", "-4.25", "+1.25", "+0.25", "-0.75"]
    assert "## Per concept" in text and "Sweep" not in text



def _write(tmp_path: Path, rows: list[dict]) -> Path:
    scores = tmp_path / "scores.csv"
    with scores.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return scores


def _gap(summary, level, concept="", prompt=""):
    return next(r for r in summary if r["mode"] == "gap" and (r["level"], r["concept"], r["prompt_index"]) ==
                (level, concept, prompt))


def _one_concept_rows(seeds=("",)):
    """Concept a, 3 prompts x 3 images per training seed; TEA = baseline + a known shift per image."""
    tea = tea_tag(0.2, 0.5)
    rows, shifts = [], {}
    for s, seed in enumerate(seeds):
        for prompt in range(3):
            for image in range(3):
                base = 20.0 + prompt + image
                shift = (prompt - 1) * 2 + image * 0.5 + s  # differs per prompt, image and seed
                shifts[(seed, prompt, image)] = shift
                rows.append(_score_row("a", BASELINE, prompt, image, [base] * 5, training_seed=seed))
                rows.append(_score_row("a", tea, prompt, image, [base + shift] * 5, 0.2, 0.5, seed))
    return rows, shifts


def test_gap_intervals_are_the_paired_bootstrap_of_the_differences_clustered_by_prompt(tmp_path):
    rows, shifts = _one_concept_rows()
    summary = summarize(read_scores(_write(tmp_path, rows)), resamples=2000)
    by_prompt = [[shifts[("", p, i)] for i in range(3)] for p in range(3)]
    flat = [v for values in by_prompt for v in values]
    # the gap of a prompt: the images' differences, independent
    expected = bootstrap_mean(by_prompt[2], resamples=2000)
    prompt_gap = _gap(summary, "prompt", "a", 2)
    assert (prompt_gap["clip_i_low"], prompt_gap["clip_i_high"]) == pytest.approx((expected.low, expected.high))
    assert prompt_gap["clip_i"] == pytest.approx(sum(by_prompt[2]) / 3)
    # the gap of the concept: the differences clustered by prompt; its std is over the prompts' gaps (not NaN)
    expected = bootstrap_mean(flat, [p for p in range(3) for _ in range(3)], resamples=2000)
    concept_gap = _gap(summary, "concept", "a")
    assert (concept_gap["dino_i_low"], concept_gap["dino_i_high"]) == pytest.approx((expected.low, expected.high))
    assert concept_gap["dino_i"] == pytest.approx(expected.estimate)
    prompt_gaps = [sum(v) / 3 for v in by_prompt]
    assert concept_gap["dino_i_std"] == pytest.approx(float(np.std(prompt_gaps, ddof=1)))
    assert concept_gap["dino_i_low"] < concept_gap["dino_i"] < concept_gap["dino_i_high"]


def test_several_training_seeds_average_per_seed_then_cluster_the_interval_by_seed(tmp_path):
    rows, shifts = _one_concept_rows(seeds=("0", "1", "2"))
    rows = [r for r in rows if not (r["training_seed"] == "2" and r["image_index"] == 2)]  # seed 2: 2 images
    summary = summarize(read_scores(_write(tmp_path, rows)), resamples=2000)
    seeds = {"0": 3, "1": 3, "2": 2}
    # a prompt's gap: mean over each seed's images, then over seeds (not the pooled mean of 8 images)
    per_seed = [sum(shifts[(s, 0, i)] for i in range(n)) / n for s, n in seeds.items()]
    assert _gap(summary, "prompt", "a", 0)["clip_t_full"] == pytest.approx(sum(per_seed) / 3)
    # the concept's interval: each (seed, prompt)'s mean difference, clustered by training seed
    units = {(s, p): sum(shifts[(s, p, i)] for i in range(n)) / n for s, n in seeds.items() for p in range(3)}
    expected = bootstrap_mean(list(units.values()), [s for s, _ in units], resamples=2000)
    gap = _gap(summary, "concept", "a")
    assert gap["clip_t_full"] == pytest.approx(expected.estimate)
    assert (gap["clip_t_full_low"], gap["clip_t_full_high"]) == pytest.approx((expected.low, expected.high))
    assert "3 training seed(s)" in (write_summary(tmp_path / "scores.csv")).read_text()
