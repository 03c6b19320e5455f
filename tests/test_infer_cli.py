"""`python infer.py`: the command line reads well and reaches the same generation as the Python API."""

import json

import pytest
import torch

import infer
from helpers import ti_module


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--prompts_file", "--rho", "--alpha", "--compare", "--align", "--target_encoder",
                   "--concept ", "--concept_word", "--concept_reduce", "--mode", "--scheduler"):
        assert option in text
    assert "Rotation factors in [0, 1]" in text and "--rho 0 0.1 0.2 --alpha 0.5 sweeps" in text


def test_list_options_take_several_values_or_repeat():
    argv = infer.normalize_argv(["--checkpoint", "a", "--rho", "0", "0.1", "--out", "x", "--concept", "<m>=man",
                                 "--concept=<d>=dog", "--alpha", "[0.5, 1]"])
    options = dict(zip(argv[::2], argv[1::2], strict=True))
    assert json.loads(options["--rho"]) == ["0", "0.1"]
    assert json.loads(options["--concept"]) == ["<m>=man", "<d>=dog"]
    assert (options["--checkpoint"], options["--alpha"], options["--out"]) == ('["a"]', "[0.5, 1]", "x")


def test_a_sweep_from_a_prompts_file_writes_the_images_records_and_grids(tmp_path):
    module = ti_module()
    with torch.no_grad():
        module.learned.vectors.mul_(4.0)
    module.export(tmp_path, step=3)
    out = tmp_path / "samples"
    prompts = tmp_path / "prompts.csv"  # method.md §6: a real CSV, so a quoted field may hold a comma
    prompts.write_text('prompt,concept,context\n"a {} reading, smiling",a {},"reading, smiling"\na {} on a boat,a {},'
                       'on a boat\n')
    infer.main(["--checkpoint", str(tmp_path), "--prompts_file", str(prompts),
                "--rho", "0", "0.5", "--alpha", "0.5", "--num_images", "1", "--steps", "2", "--resolution", "64",
                "--batch_size", "8", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["baseline", "tea-rho0-alpha0.5",
                                                                     "tea-rho0.5-alpha0.5"]
    assert len(list(out.glob("*/p*.png"))) == 3 * 2 and (out / "grid.png").is_file()
    record = json.loads((out / "tea-rho0.5-alpha0.5" / "p000-i000.json").read_text())
    assert (record["prompt"], record["template"]) == ("a <v> reading, smiling", "a {} reading, smiling")
    assert record["concept_word"] == "star"
