"""The miniature experiment command: its CI-sized run writes the documented report (never judged on its outcome)."""

import csv

import pytest

from tea_lightning.mini.experiment import CURVE_COLUMNS, SIZES, SWEEP_COLUMNS, context_hit, requested, run
from tea_lightning.mini.readout import Reading


def test_ci_sized_experiment_writes_curves_sweep_plots_grid_and_summary(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    run(out, size="ci", work=tmp_path / "work")
    size = SIZES["ci"]
    with (out / "curves.csv").open() as handle:
        curves = list(csv.DictReader(handle))
    assert tuple(curves[0]) == CURVE_COLUMNS
    assert [int(r["step"]) for r in curves] == list(range(0, size.steps + 1, size.every))
    with (out / "sweep.csv").open() as handle:
        sweep = list(csv.DictReader(handle))
    assert tuple(sweep[0]) == SWEEP_COLUMNS
    assert sweep[0]["setting"] == "baseline" and len(sweep) == 1 + len(size.rhos) * len(size.alphas)
    for row in curves + sweep:
        for key, value in row.items():
            if key not in ("setting", "rho", "alpha") and value:
                float(value)
    for name in ("drift/drift.csv", "drift/vector_drift.png", "drift/contextual_drift.png", "drift/vocab_norms.png",
                 "context_and_fidelity.png", "sweep.png", "grid.png", "summary.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "TEA sweep" in (out / "summary.md").read_text()


def test_context_asks_for_the_named_background_and_second_object():
    assert requested("a <pink-star> next to a yellow square on a black background") == ("black", ("yellow", "square"))
    assert requested("a gray background with a <pink-star>") == ("gray", None)
    seen = Reading("black", frozenset({("pink", "star"), ("yellow", "square")}), frozenset({"star", "square"}),
                   frozenset({"pink", "yellow"}))
    assert context_hit(seen, "a <pink-star> next to a yellow square on a black background")
    assert not context_hit(seen, "a <pink-star> next to a green circle")
    assert not context_hit(seen, "a <pink-star> on a red background")
