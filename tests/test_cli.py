"""The Lightning CLI entry point and the shipped configs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from helpers import ROOT, STAR_IMAGES

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_demo_config_trains_and_writes_logs_checkpoint_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    train.main(["fit", "--config", "configs/demo.yaml", "--trainer.max_steps", "4",
                "--trainer.default_root_dir", str(tmp_path)])
    run = tmp_path / "lightning_logs" / "version_0"
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard log"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "exports" / "final" / "learned_embeds.safetensors").is_file()
    assert (run / "exports" / "final" / "tea.json").is_file()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_instantiates(config: Path, tiny_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    if "SceneDataModule" in config.read_text():  # training a world from scratch: built-in model, generated data
        cli = train.main(["--config", str(config)], run=False)
        assert cli.datamodule.train_dataloader() is not None
    else:
        # SD 1.5 configs point at the hub; the tiny model saved as a diffusers folder stands in for it offline.
        cli = train.main(["--config", str(config), "--model.init_args.pretrained", str(tiny_dir),
                          "--data.instance_dir", str(STAR_IMAGES), "--data.resolution", "64"], run=False)
        assert cli.model.hparams.pretrained == str(tiny_dir)
    assert cli.trainer.max_steps > 0, "training length is set in steps"


def test_bad_input_on_the_command_line_prints_one_clear_line_and_no_traceback():
    result = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/demo.yaml", "--model.init_args.concept_word",
         "teddy bear"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "error: model.concept_word='teddy bear' is 2 tokens" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_progress_bar_counts_optimiser_steps_of_the_whole_run(tmp_path, capfd):
    from helpers import make_trainer, star_data, ti_module
    from tea_lightning.callbacks import StepProgressBar

    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[StepProgressBar()], enable_progress_bar=True)
    trainer.fit(ti_module(), star_data(repeats=1))  # 3 steps per epoch: the bar must run on across epochs
    out = capfd.readouterr().out  # Lightning's bars write to stdout
    assert "Steps: 100%" in out and "6/6" in out
