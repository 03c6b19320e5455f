"""`python -m tea_lightning.drift_report`: a run's step-stamped exports → drift.csv and the paper's plots."""

import csv
import json
import shutil
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import ti_module
from tea_lightning import drift_report as report
from tea_lightning.callbacks import ContextualDrift, EmbeddingDrift
from tea_lightning.export import write_tea_json


def _rows(folder) -> dict[int, dict[str, float]]:
    with (folder / "drift.csv").open(newline="") as handle:
        return {int(row["step"]): {k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def drift_out(drift_run, tmp_path_factory):
    run, _, _ = drift_run
    return report.drift_report(str(run), prompt_set="toy", out=str(tmp_path_factory.mktemp("report")))


def test_report_has_a_row_per_export_equal_to_what_the_callbacks_logged_while_training(drift_run, drift_out):
    _, logged, _ = drift_run
    rows = _rows(drift_out)
    assert sorted(rows) == [0, 2, 4]
    with (drift_out / "drift.csv").open() as handle:
        assert handle.readline().strip().split(",") == report.columns(1)
    for step, row in rows.items():
        for key in report.columns(1)[1:]:
            # The same measure from the export on a rebuilt base model as from the live module (fp32 vs fp32).
            assert row[key] == pytest.approx(logged[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_report_draws_the_contextual_vector_and_vocabulary_plots(drift_out):
    for name in ("contextual_drift.png", "vector_drift.png", "vocab_norms.png"):
        with Image.open(drift_out / name) as image:
            assert image.format == "PNG" and min(image.size) > 200, name


class _Counting:
    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        original = report._Measurer.__call__

        def counted(measurer, export):
            self.calls += 1
            return original(measurer, export)

        monkeypatch.setattr(report._Measurer, "__call__", counted)


def test_a_second_report_resumes_and_changed_settings_measure_again(drift_run, drift_out, tmp_path, monkeypatch):
    run, _, _ = drift_run
    out = tmp_path / "report"
    shutil.copytree(drift_out, out)
    counter = _Counting(monkeypatch)
    report.drift_report(str(run), prompt_set="toy", out=str(out), plots=False)
    assert counter.calls == 0, "steps already in drift.csv were measured again"
    report.drift_report(str(run), prompt_set="toy", out=str(out), plots=False, hidden_state="eos")
    assert counter.calls == 3
    assert _rows(out)[4]["drift_sets/inter_l2"] != pytest.approx(_rows(drift_out)[4]["drift_sets/inter_l2"])


def test_a_run_trained_again_into_the_same_folder_is_measured_again(drift_run, drift_out, tmp_path, monkeypatch):
    # Otherwise a report resumed after retraining (another seed, or a base model whose weights changed) would mix
    # the old run's rows into the new run's curves without a word.
    run, _, _ = drift_run
    copy, out = tmp_path / "run", tmp_path / "report"
    shutil.copytree(run, copy)
    shutil.copytree(drift_out, out)
    export = copy / "exports" / "step-000004" / "learned_embeds.safetensors"
    from safetensors.torch import load_file

    vectors = load_file(export)
    save_file({k: v * 1.5 for k, v in vectors.items()}, export)
    counter = _Counting(monkeypatch)
    report.drift_report(str(copy), prompt_set="toy", out=str(out), plots=False)
    assert counter.calls == 1, "only the export whose vectors changed is measured again"
    assert _rows(out)[4]["drift/norm"] == pytest.approx(1.5 * _rows(drift_out)[4]["drift/norm"], rel=1e-4)


def test_report_rebuilds_a_diffusers_folder_base_model_and_needs_no_matplotlib_for_the_csv(drift_run, drift_out,
                                                                                          tiny_dir, tmp_path,
                                                                                          monkeypatch):
    run, _, _ = drift_run
    copy = tmp_path / "run"
    shutil.copytree(run / "exports", copy / "exports")
    for tea_json in (copy / "exports").glob("*/tea.json"):
        meta = json.loads(tea_json.read_text())
        meta["base_model"] = str(tiny_dir)  # the tiny model saved as a diffusers folder: the path a hub id takes
        tea_json.write_text(json.dumps(meta))
    monkeypatch.setattr(report, "_have_matplotlib", lambda: False)
    out = report.drift_report(str(copy), prompt_set="toy")
    assert sorted(p.name for p in out.iterdir()) == ["drift.csv", "drift.json"]
    rebuilt, built_in = _rows(out), _rows(drift_out)
    assert sorted(rebuilt) == sorted(built_in)
    for step in rebuilt:
        assert rebuilt[step] == pytest.approx(built_in[step], rel=1e-6, abs=1e-9)


def test_the_command_line_takes_the_run_folder_and_options(drift_run, drift_out, tmp_path, monkeypatch, capsys):
    run, _, _ = drift_run
    out = tmp_path / "cli"
    shutil.copytree(drift_out, out)  # resumes: parses and writes without measuring again
    monkeypatch.setattr(sys, "argv", ["drift_report", str(run), "--prompt_set", "toy", "--out", str(out),
                                      "--plots", "false"])
    report.main()
    assert str(out) in capsys.readouterr().out
    assert sorted(_rows(out)) == [0, 2, 4]


def test_without_options_the_report_uses_the_prompt_sets_the_run_trained_with(drift_run, drift_out, tmp_path,
                                                                              monkeypatch, capsys):
    run, _, _ = drift_run
    copy = tmp_path / "run"
    shutil.copytree(run / "exports", copy / "exports")
    shutil.copytree(drift_out, copy / "drift")  # measured with prompt_set="toy": resumes only if the sets match
    # What LightningCLI writes into the run folder: the drift callback with its settings.
    (copy / "config.yaml").write_text("""
trainer:
  callbacks:
    - class_path: tea_lightning.callbacks.Export
      init_args: {every_n_steps: 2}
    - class_path: tea_lightning.callbacks.ContextualDrift
      init_args: {every_n_steps: 2, prompt_set: toy, simple_set: simple, hidden_state: last, temperature: 1.0}
""")
    counter = _Counting(monkeypatch)
    out = report.drift_report(str(copy), plots=False)  # the tiny run's word "star" has no shipped set of its own
    assert counter.calls == 0, "the report measured with other sets than the run trained with"
    assert _rows(out) == _rows(drift_out)
    assert "prompt_set='toy'" in capsys.readouterr().out
    (copy / "drift" / "drift.json").unlink()  # and an option given on the command line wins over the run's
    with pytest.raises(ValueError, match="hidden_state='pooled' does not exist"):
        report.drift_report(str(copy), hidden_state="pooled")


def test_multi_vector_exports_are_measured_as_the_callbacks_measure_the_live_module(tmp_path):
    module = ti_module(concept_word="toy", num_vectors=2)
    start = module.learned.vectors.detach().clone()
    generator = torch.Generator().manual_seed(0)
    steps = {0: start, 7: start * 3 + 0.2 * torch.randn(start.shape, generator=generator)}
    for step, vectors in steps.items():
        folder = tmp_path / "exports" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        with torch.no_grad():
            module.learned.vectors.copy_(vectors)
        module.export(folder, step)
    rows = _rows(report.drift_report(str(tmp_path), plots=False))  # default prompt set: the shipped "toy"

    embedding, contextual = EmbeddingDrift(), ContextualDrift(prompt_set="toy")
    embedding.initial[0] = start
    assert module.keyword == "<v> <v>_1"
    expected = {**embedding.compute(module), **contextual.compute(module)}  # the module holds step 7's vectors
    assert rows[7] == pytest.approx({"step": 7, **expected}, rel=1e-4, abs=1e-6)


def _export(folder, *, method="textual_inversion", embeds=True, keyword="<v>"):
    folder.mkdir(parents=True)
    write_tea_json(folder, method=method, base_model="tiny", keyword=keyword, concept_word="toy", step=0)
    if embeds:
        save_file({keyword: torch.zeros(1, 32)}, str(folder / "learned_embeds.safetensors"))


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: tmp, "no step-stamped exports"),
    (lambda tmp: (_export(tmp / "exports" / "final"), tmp)[1], "no step-stamped exports"),
    (lambda tmp: (_export(tmp / "exports" / "step-000010", method="dreambooth_lora", embeds=False), tmp)[1],
     "has no learned_embeds.safetensors (method 'dreambooth_lora')"),
    (lambda tmp: (_export(tmp / "exports" / "step-000000"), _export(tmp / "exports" / "step-000010", keyword="<w>"),
                  tmp)[2], "mixes runs"),
])
def test_a_run_folder_that_cannot_be_reported_is_refused_with_the_fix(tmp_path, make, message):
    with pytest.raises((FileNotFoundError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        report.drift_report(str(make(tmp_path)))


def test_bad_options_are_refused_before_any_model_is_loaded(drift_run, monkeypatch):
    run, _, _ = drift_run
    monkeypatch.setattr(report, "load_text_parts", lambda *a: pytest.fail("loaded a model before checking input"))
    with pytest.raises(ValueError, match="hidden_state='pooled' does not exist"):
        report.drift_report(str(run), prompt_set="toy", hidden_state="pooled")
    with pytest.raises(ValueError, match="concept_word='star'.*--prompt_set"):
        report.drift_report(str(run))  # the tiny run's concept word has no shipped contextual set
