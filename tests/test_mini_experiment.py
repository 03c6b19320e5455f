"""The miniature experiment command: its CI-sized run writes the documented report (never judged on its outcome)."""

import csv

import pytest

from tea_lightning.mini.concept import METHODS
from tea_lightning.mini.experiment import SCORE_COLUMNS, SIZES, context_hit, requested, run, score, write_report
from tea_lightning.mini.readout import Reading


def _rows(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_ci_sized_experiment_scores_every_image_and_reports_all_three_methods(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    result = run(out, size="ci", work=tmp_path / "work", progress=False)
    size = SIZES["ci"]
    scores = _rows(out / "scores.csv")
    assert tuple(scores[0]) == SCORE_COLUMNS
    for row in scores:
        assert {row[m] for m in ("context", "concept", "both")} <= {"0", "1"}, row
        assert row["both"] == str(int(row["context"] == row["concept"] == "1")), "both = context and concept"
    assert {r["form"] for r in scores} == {"on", "background first"}, "both prompt forms are scored"
    ti = [r for r in scores if r["method"] == "textual_inversion" and r["form"] == "on"]
    steps = sorted({int(r["step"]) for r in ti})
    ti_training = size.training["textual_inversion"]
    assert steps == list(range(0, ti_training.steps + 1, ti_training.every)), "images at every export"
    settings = {r["setting"] for r in ti if int(r["step"]) == steps[-1]}
    swept = {f"tea-rho{r:g}-alpha{a:g}" for r in size.rhos for a in size.alphas} - {"tea-rho0-alpha0"}
    assert settings == {"baseline", "tea-rho0.2-alpha0.5"} | swept, "baseline, TEA and every (rho, alpha) swept"
    for method in METHODS:  # Table 6: baseline and TEA images of every method, paired on the same seeds
        mine = [r for r in scores if r["method"] == method]
        assert {r["setting"] for r in mine} >= {"baseline", "tea-rho0.2-alpha0.5"}, method

    assert [r["method"] for r in result["methods"]] == list(METHODS)
    for row in result["methods"]:
        for metric in ("context", "concept", "both"):
            assert row[f"baseline_{metric}_low"] <= row[f"baseline_{metric}"] <= row[f"baseline_{metric}_high"]
            assert -1 <= row[f"{metric}_gap_low"] <= row[f"{metric}_gap"] <= row[f"{metric}_gap_high"] <= 1
    assert [r["step"] for r in result["curves"]] == steps
    for name in ("summary.md", "methods.csv", "curves.csv", "sweep.csv", "curves.png", "sweep.png",
                 "drift/drift.csv", "drift/contextual_drift.png", "drift/vector_drift.png", "drift/vocab_norms.png",
                 *(f"grid-{m}.png" for m in METHODS)):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    assert "Table 6" in summary and "The readout against a person" in summary

    # The report is a pure function of scores.csv and the drift rows: written again, it says the same.
    again = write_report(out, "ci", size)
    assert again["methods"] == result["methods"] and again["sweep"] == result["sweep"]


def test_context_asks_for_the_named_background_and_second_object():
    assert requested("a {} next to a yellow square on a black background") == ("black", ("yellow", "square"))
    assert requested("on a gray background") == ("gray", None)
    seen = Reading("black", frozenset({("pink", "star"), ("yellow", "square")}), frozenset({"star", "square"}),
                   frozenset({"pink", "yellow"}))
    assert context_hit(seen, "next to a yellow square on a black background")
    assert not context_hit(seen, "next to a green circle")
    assert not context_hit(seen, "on a red background")


def test_an_image_counts_for_both_only_with_the_background_and_the_pink_star():
    star_on_black = Reading("black", frozenset({("pink", "star")}), frozenset({"star"}), frozenset({"pink"}))
    assert score(star_on_black, "on a black background") == {"context": 1, "concept": 1, "both": 1}
    assert score(star_on_black, "on a blue background") == {"context": 0, "concept": 1, "both": 0}
    white_star = Reading("black", frozenset({("white", "star")}), frozenset({"star"}), frozenset({"white"}))
    assert score(white_star, "on a black background") == {"context": 1, "concept": 0, "both": 0}


def test_wall_time_adds_up_the_calls_that_built_a_report_and_restarts_with_a_fresh_one(tmp_path):
    import json

    from tea_lightning.mini.experiment import _record_time

    path = tmp_path / "wall_time.json"
    _record_time(path, {"total": 60.0}, reused=False)
    _record_time(path, {"total": 5.0}, reused=True)  # reused the trainings: its 5 s come on top of the first 60
    assert json.loads(path.read_text())["calls"] == [{"total": 60.0}, {"total": 5.0}]
    _record_time(path, {"total": 70.0}, reused=False)  # trained everything again: the old record no longer applies
    assert json.loads(path.read_text())["calls"] == [{"total": 70.0}]


def test_the_grid_shows_the_images_of_the_prompts_it_labels(tmp_path):
    # The last export's images of the second prompt form sort after the first form's folder; a grid that took the
    # last folder by name would show "a blue background with <pink-star>" under the label "<pink-star> on a blue ...".
    import numpy as np
    from PIL import Image

    from tea_lightning.mini.experiment import FORMS, TEA_TAG, _grid, images_folder

    run_dir = tmp_path / "seed0"
    (run_dir / "exports" / "step-000002").mkdir(parents=True)
    for form, colour in zip(FORMS, ((255, 0, 0), (0, 0, 255)), strict=True):
        for tag in ("baseline", TEA_TAG):
            folder = images_folder(run_dir, 2, form) / tag
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32), colour).save(folder / "p000-i000.png")
    _grid(run_dir, ["a {} on a red background"], "<pink-star>", 1, tmp_path / "grid.png")
    pixels = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).reshape(-1, 3)
    assert ((pixels == (255, 0, 0)).all(axis=1)).any(), "the labelled form's images are in the grid"
    assert not ((pixels == (0, 0, 255)).all(axis=1)).any(), "the other form's images are not"
