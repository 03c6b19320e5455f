"""Summary of a scores.csv: means per prompt, per concept and overall, standard deviations, gaps, the tables."""

import csv
import math
from pathlib import Path

import pytest

from tea_lightning.evaluation import tea_tag
from tea_lightning.summary import BASELINE, METRICS, write_summary


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _score_row(concept, tag, prompt, image, values, rho="", alpha=""):
    row = dict(concept=concept, tag=tag, mode=BASELINE if tag == BASELINE else "tea", rho=rho, alpha=alpha,
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
    assert "| gap (TEA rho=0.2 alpha=0.5 − baseline) | +6.00 | -4.25 | +1.25 | +0.25 | -0.75 |" in text
    assert "## Per concept" in text and "Sweep" not in text

