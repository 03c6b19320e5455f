"""The Lightning CLI entry point and the shipped configs."""

from pathlib import Path

import pytest
import yaml

import train
from helpers import ROOT, STAR_IMAGES

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PERSONALISATION = [c for c in CONFIGS if "SceneDataModule" not in c.read_text()]  # not the mini world's own training


def test_demo_config_trains_and_writes_logs_checkpoint_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    train.main(["fit", "--config", "configs/demo.yaml", "--trainer.max_steps", "4",
                "--trainer.default_root_dir", str(tmp_path)])
    run = tmp_path / "lightning_logs" / "version_0"
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard log"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "exports" / "final" / "learned_embeds.safetensors").is_file()
    assert (run / "exports" / "final" / "tea.json").is_file()


@pytest.mark.parametrize(("config", "export_file"), [
    ("demo_dreambooth_lora", "pytorch_lora_weights.safetensors"),
    ("demo_custom_diffusion", "pytorch_custom_diffusion_weights.safetensors"),
])
def test_method_demo_configs_train_a_few_steps_and_export(config, export_file, tmp_path, monkeypatch, class_dir):
    monkeypatch.chdir(ROOT)
    # Class images from a ready folder: generating them is tested in test_prior_preservation.py.
    train.main(["fit", "--config", f"configs/{config}.yaml", "--trainer.max_steps", "2", "--data.batch_size", "1",
                "--trainer.default_root_dir", str(tmp_path), "--data.class_dir", str(class_dir),
                "--data.num_class_images", "0"])
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "exports" / "final" / export_file).is_file()
    assert (run / "exports" / "final" / "tea.json").is_file()


def test_a_concepts_list_under_data_reaches_custom_diffusion_and_is_refused_by_single_concept_methods(tmp_path):
    config = tmp_path / "two.yaml"
    config.write_text(f"""
model:
  class_path: tea_lightning.CustomDiffusion
  init_args: {{pretrained: tiny}}
data:
  resolution: 64
  concepts:
    - {{instance_dir: {STAR_IMAGES}, concept_word: star}}
    - {{instance_dir: {STAR_IMAGES}, concept_word: circle, modifier_token: <round>}}
""")
    cli = train.main(["--config", str(config)], run=False)
    assert cli.model.keywords == ["<new1> star", "<round> circle"]
    assert len(cli.datamodule.concepts) == 2

    ti = tmp_path / "ti.yaml"
    ti.write_text(config.read_text().replace("tea_lightning.CustomDiffusion", "tea_lightning.TextualInversion")
                  .replace("{pretrained: tiny}", "{pretrained: tiny, concept_word: star}"))
    with pytest.raises(ValueError, match="data.concepts lists 2 concepts but TextualInversion trains 1"):
        train.main(["fit", "--config", str(ti), "--trainer.max_steps", "1", "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(tmp_path)])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_instantiates(config: Path, tiny_dir, untrained_world, monkeypatch):
    monkeypatch.chdir(ROOT)
    if "SceneDataModule" in config.read_text():  # training a world from scratch: an untrained world, generated data
        from tea_lightning.mini.full_finetune import main as full_finetune_cli

        cli = full_finetune_cli(["--config", str(config), "--model.init_args.pretrained", str(untrained_world)],
                                run=False)
        assert cli.datamodule.train_dataloader() is not None
    else:
        # SD 1.5 configs point at the hub; the tiny model saved as a diffusers folder stands in for it offline.
        cli = train.main(["--config", str(config), "--model.init_args.pretrained", str(tiny_dir),
                          "--data.instance_dir", str(STAR_IMAGES), "--data.resolution", "64"], run=False)
        assert cli.model.hparams.pretrained == str(tiny_dir)
    assert cli.trainer.max_steps > 0, "training length is set in steps"


@pytest.mark.parametrize("config", PERSONALISATION, ids=lambda p: p.name)
def test_every_personalisation_config_watches_drift_and_samples_images(config: Path):
    settings = yaml.safe_load(config.read_text())
    callbacks = {entry["class_path"].rpartition(".")[2] for entry in settings["trainer"]["callbacks"]}
    learns_a_token = "DreamBooth" not in settings["model"]["class_path"]  # DreamBooth's drift is prompt-level only
    expected = {"Export", "SampleImages", "ContextualDrift"} | ({"EmbeddingDrift"} if learns_a_token else set())
    assert expected <= callbacks, f"the README promises drift monitors and sample images: {expected - callbacks}"


def test_a_resumed_run_continues_with_its_own_settings_and_refuses_others(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["fit", "--config", "configs/demo.yaml", "--trainer.default_root_dir", str(tmp_path)]
    train.main([*args, "--trainer.max_steps", "2"])
    runs = tmp_path / "lightning_logs"
    first = runs / "version_0"
    killed = first / "exports" / ".step-000050.999999999-k3.tmp"  # an export a killed run left half-written
    killed.mkdir()
    # LightningCLI alone would train the checkpoint's settings and record them as this run's.
    with pytest.raises(ValueError, match=r"num_vectors: checkpoint 1, this run 2\).*--config"):
        train.main([*args, "--trainer.max_steps", "3", "--ckpt_path", str(first / "checkpoints" / "last.ckpt"),
                    "--model.init_args.num_vectors", "2"])
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"], "a refused resume created a run folder"
    cli = train.main([*args, "--trainer.max_steps", "3", "--ckpt_path", str(first / "checkpoints" / "last.ckpt")])
    assert cli.trainer.global_step == 3
    assert not killed.exists(), "the killed run's temporary export was left behind"
    recorded = yaml.safe_load((runs / "version_1" / "config.yaml").read_text())
    assert recorded["model"]["init_args"]["num_vectors"] == 1
    with pytest.raises(ValueError, match="is at step 3, and this run ends at trainer.max_steps=3: it is finished"):
        train.main([*args, "--trainer.max_steps", "3", "--ckpt_path",
                    str(runs / "version_1" / "checkpoints" / "last.ckpt")])


def test_one_seed_draws_a_runs_samples_and_noise(monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = train.main(["--config", "configs/demo.yaml", "--data.seed", "3", "--model.init_args.seed", "3"], run=False)
    assert cli.model.hparams.seed == cli.datamodule.hparams.seed == 3


def test_the_progress_bar_counts_optimiser_steps_of_the_whole_run(tmp_path, capfd):
    from helpers import make_trainer, star_data, ti_module
    from tea_lightning.callbacks import StepProgressBar

    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[StepProgressBar()], enable_progress_bar=True)
    trainer.fit(ti_module(), star_data(repeats=1))  # 3 steps per epoch: the bar must run on across epochs
    out = capfd.readouterr().out  # Lightning's bars write to stdout
    assert "Steps: 100%" in out and "6/6" in out


def readme_commands() -> list[list[str]]:
    """Every `python ...` command line in the README's bash blocks, continuation lines joined, comments cut."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["python"]:
                commands.append(words[1:])
    return commands


def command_main(words: list[str]):
    """The in-process `main` of a command line and its arguments."""
    import evaluate
    import infer
    from tea_lightning import bake, drift_report, step_metrics

    scripts = {"train.py": train.main, "infer.py": infer.main, "evaluate.py": evaluate.main}
    tools = {"tea_lightning.bake": bake.main, "tea_lightning.drift_report": drift_report.main,
             "tea_lightning.step_metrics": step_metrics.main}
    if words[0] == "-m":
        return tools[words[1]], words[2:]
    return scripts[words[0]], words[1:]


README_COMMANDS = [c for c in readme_commands() if c[:2] != ["-m", "tea_lightning.bake"]]


def test_the_readme_shows_a_command_of_every_entry_point():
    shown = {" ".join(c[:2]) if c[0] == "-m" else c[0] for c in readme_commands()}
    assert shown >= {"train.py", "infer.py", "evaluate.py", "-m tea_lightning.bake", "-m tea_lightning.drift_report",
                     "-m tea_lightning.step_metrics"}


@pytest.mark.parametrize("words", README_COMMANDS, ids=lambda c: " ".join(c)[:70])
def test_every_command_the_readme_shows_parses_as_written(words, monkeypatch, capsys):
    # A user copies these lines; an option spelt as no parser knows it fails before any work. Parsing only:
    # --print_config prints the resolved options and exits, so no model is built and nothing is read.
    # (The bake command is plain argparse without --print_config: test_bake runs it as the README writes it.)
    monkeypatch.chdir(ROOT)
    main, args = command_main(words)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_the_command_in_each_config_header_parses_as_written(config, monkeypatch, capsys):
    import re
    import shlex

    from tea_lightning.mini import full_finetune

    monkeypatch.chdir(ROOT)
    found = re.search(r"^#\s+python (train\.py|-m tea_lightning\.mini\.full_finetune) (fit .*)$", config.read_text(),
                      re.M)
    assert found, f"{config.name} shows no command line in its header"
    main = train.main if found.group(1) == "train.py" else full_finetune.main
    with pytest.raises(SystemExit) as exit_info:
        main([*shlex.split(found.group(2), comments=True), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
