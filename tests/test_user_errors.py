"""Every user error of train.py, infer.py and evaluate.py: exit code 2, one line `error: ...` on stderr naming the bad
value, and nothing written (no run folder, no output folder, no pickled payload run).

The commands run in-process through the same `run_command` their `__main__` uses (a few subprocess tests at the end
check the real console, warnings and all). Hostile files are made once; errors are found before any model trains.
"""

import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import evaluate
import infer
import train
from helpers import ROOT, STAR_IMAGES, ti_module
from tea_lightning import bake, drift_report, step_metrics
from tea_lightning.user_errors import run_command

MAINS = {"train": train.main, "infer": infer.main, "evaluate": evaluate.main}
TOOLS = {"bake": bake.main, "step_metrics": step_metrics.main, "drift_report": drift_report.main}


def fake_png(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims `width` x `height` (PIL reads the size before any pixel)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


class Payload:
    """Unpickling this would create `marker`: proof that a checkpoint's pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def lightning_checkpoint(path: Path, class_path: str, step: int, **hparams) -> Path:
    torch.save({"hyper_parameters": {"_class_path": class_path, **hparams}, "state_dict": {}, "global_step": step,
                "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A folder of hostile inputs; every case's outputs are pointed inside it, so a write shows as a change."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "corrupt").mkdir()
    shutil.copy(STAR_IMAGES / "00.png", root / "corrupt" / "00.png")
    (root / "corrupt" / "01.png").write_bytes((STAR_IMAGES / "01.png").read_bytes()[:200])
    (root / "empty").mkdir()
    (root / "bomb").mkdir()
    fake_png(root / "bomb" / "huge.png", 20000, 20000)
    (root / "empty.ckpt").write_bytes(b"")
    ti = dict(concept_word="star", placeholder="<pink-star>", num_vectors=1, pretrained="mini", seed=0)
    lightning_checkpoint(root / "ti.ckpt", "tea_lightning.TextualInversion", 2, **ti)
    (root / "truncated.ckpt").write_bytes((root / "ti.ckpt").read_bytes()[:300])
    lightning_checkpoint(root / "finished.ckpt", "tea_lightning.TextualInversion", 300, **ti)
    lightning_checkpoint(root / "dreambooth.ckpt", "tea_lightning.DreamBoothLoRA", 2, concept_word="star", rank=4)
    torch.save({"hyper_parameters": {"_class_path": "tea_lightning.TextualInversion"}, "state_dict": {},
                "global_step": 1, "payload": Payload(root / "PAYLOAD-RAN")}, root / "pickled.ckpt")
    (root / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(root / "ti.ckpt", root / "run" / "checkpoints" / "last.ckpt")
    export = root / "export"
    ti_module().export(export, step=1)
    for name, edit in (("badjson", lambda text: text[:20]), ("types", lambda text: text.replace('"star"', '["star"]')),
                       ("version2", lambda text: text.replace('"format_version": 1', '"format_version": 2'))):
        shutil.copytree(export, root / f"export_{name}")
        tea = root / f"export_{name}" / "tea.json"
        tea.write_text(edit(tea.read_text()))
    (root / "a_file").write_text("not a folder")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("someone else's")
    (root / "two_concepts.yaml").write_text(f"""
data:
  instance_dir: null
  concepts:
    - {{instance_dir: {STAR_IMAGES}, concept_word: star}}
    - {{instance_dir: {STAR_IMAGES}, concept_word: circle, modifier_token: <round>}}
""")
    return root


@dataclass
class Case:
    command: str
    args: list[str]
    named: str  # the bad value, as the error line must show it

    def argv(self, bad: Path) -> list[str]:
        base = {
            "train": ["fit", "--config", "configs/demo.yaml", "--trainer.default_root_dir", "{bad}/runs"],
            "infer": ["--checkpoint", "{bad}/export", "--prompt", "a photo of a {}", "--out", "{bad}/out",
                      "--steps", "1"],
            "evaluate": ["--out", "{bad}/eval", "--prompts", "celeba", "--references", str(STAR_IMAGES),
                         "--checkpoint", "{bad}/export"],
            # the tools take their run or checkpoint as the first argument, given by each case
            "bake": ["--out", "{bad}/baked"],
            "step_metrics": ["--prompts", "celeba", "--references", str(STAR_IMAGES), "--out", "{bad}/steps"],
            "drift_report": ["--out", "{bad}/drift"],
        }[self.command]
        if self.command in TOOLS:
            return [a.replace("{bad}", str(bad)) for a in self.args[:1] + base + self.args[1:]]
        return [a.replace("{bad}", str(bad)) for a in base + self.args]


def train_case(*args: str, named: str) -> Case:
    return Case("train", list(args), named)


def infer_case(*args: str, named: str) -> Case:
    return Case("infer", list(args), named)


def evaluate_case(*args: str, named: str) -> Case:
    return Case("evaluate", list(args), named)


CASES = [
    # train.py: the model
    train_case("--model.init_args.concept_word", "teddy bear", named="'teddy bear'"),
    train_case("--model.init_args.placeholder", "", named="placeholder=''"),
    train_case("--model.init_args.placeholder", "star", named="'star'"),
    train_case("--model.init_args.num_vectors", "0", named="num_vectors=0"),
    train_case("--model.init_args.num_vectors", "two", named="'two'"),
    train_case("--model.init_args.snr_gamma", "-1", named="snr_gamma=-1"),
    train_case("--model.init_args.parametrization", "round", named="'round'"),
    train_case("--model.init_args.pretrained", "someone/not-cached-model", named="someone/not-cached-model"),
    train_case("--model.init_args.pretrained", "/no/such/model", named="/no/such/model"),
    train_case("--model.class_path", "tea_lightning.Nope", named="tea_lightning.Nope"),
    # train.py: the data
    train_case("--data.instance_dir", "/no/such/photos", named="/no/such/photos"),
    train_case("--data.instance_dir", "{bad}/empty", named="empty"),
    train_case("--data.instance_dir", "{bad}/corrupt", named="01.png"),
    train_case("--data.instance_dir", "{bad}/bomb", named="huge.png"),
    train_case("--data.resolution", "30", named="resolution=30"),
    train_case("--data.flip_p", "2", named="flip_p=2"),
    train_case("--data.templates", "a photo", named="'a photo'"),
    train_case("--data.seed", "3", named="data.seed=3"),
    train_case("--config", "{bad}/two_concepts.yaml", named="2 concepts"),
    # train.py: the trainer, callbacks and command line
    train_case("--trainer.max_steps", "many", named="'many'"),
    train_case("--trainer.precision", "17", named="'17'"),
    train_case("--trainer.enable_progress_bar", "false", named="enable_progress_bar=False"),
    train_case("--trainer.callbacks+=tea_lightning.callbacks.Export", "--trainer.callbacks.every_n_steps", "-1",
               named="every_n_steps=-1"),
    train_case("--trainer.callbacks+=tea_lightning.callbacks.CollapseAlarm", "--trainer.callbacks.action", "explode",
               named="'explode'"),
    train_case("--data.colour", "pink", named="--data.colour"),
    train_case("--config", "{bad}/missing.yaml", named="missing.yaml"),
    # train.py: resuming
    train_case("--ckpt_path", "{bad}/run", named="is a folder"),
    train_case("--ckpt_path", "{bad}/missing.ckpt", named="missing.ckpt"),
    train_case("--ckpt_path", "{bad}/empty.ckpt", named="empty.ckpt"),
    train_case("--ckpt_path", "{bad}/truncated.ckpt", named="truncated.ckpt"),
    train_case("--ckpt_path", "{bad}/pickled.ckpt", named="pickled.ckpt"),
    train_case("--ckpt_path", "{bad}/dreambooth.ckpt", named="tea_lightning.DreamBoothLoRA"),
    train_case("--ckpt_path", "{bad}/ti.ckpt", "--model.init_args.num_vectors", "2", named="num_vectors"),
    train_case("--ckpt_path", "{bad}/finished.ckpt", "--trainer.max_steps", "300", named="step 300"),
    # infer.py
    infer_case("--checkpoint", "{bad}/nothing-here", named="nothing-here"),
    infer_case("--checkpoint", "{bad}/empty.ckpt", named="empty.ckpt"),
    infer_case("--checkpoint", "{bad}/export_badjson", named="export_badjson/tea.json"),
    infer_case("--checkpoint", "{bad}/export_types", named="concept_word=['star']"),
    infer_case("--checkpoint", "{bad}/export_version2", named="format_version 2"),
    infer_case("--rho", "1.5", named="rho=1.5"),
    infer_case("--alpha", "x", named="'x'"),
    infer_case("--num_images", "100000000", named="num_images=100000000"),
    infer_case("--num_images", "0", named="num_images=0"),
    infer_case("--scheduler", "bogus", named="'bogus'"),
    infer_case("--resolution", "30", named="resolution=30"),
    infer_case("--device", "gpu", named="'gpu'"),
    infer_case("--prompt", "a photo of a dog", named="a photo of a dog"),
    infer_case("--concept", "no-equals-sign", named="no-equals-sign"),
    infer_case("--prompts_file", "{bad}/prompts.csv", named="prompts.csv"),
    infer_case("--out", "{bad}/a_file", named="a_file"),
    infer_case("--out", "{bad}/a_file/images", named="a_file"),
    infer_case("--out", "{bad}/foreign", named="foreign"),
    infer_case("--out", "/proc/tea-lightning-out", named="/proc/tea-lightning-out"),
    # evaluate.py
    evaluate_case("--rhos", "[1.5]", named="1.5"),
    evaluate_case("--alphas", "[-0.5]", named="-0.5"),
    evaluate_case("--num_images", "0", named="num_images=0"),
    evaluate_case("--max_prompts", "0", named="max_prompts=0"),
    evaluate_case("--references", "/no/such/references", named="/no/such/references"),
    evaluate_case("--references", "{bad}/empty", named="empty"),
    evaluate_case("--references", "{bad}/corrupt", named="01.png"),
    evaluate_case("--prompts", "no_such_set", named="no_such_set"),
    evaluate_case("--checkpoint", "{bad}/no-export", named="no-export"),
    evaluate_case("--anchor_image", "nowhere.png", named="nowhere.png"),
    evaluate_case("--dino_pooling", "max", named="'max'"),
    evaluate_case("--device", "gpu", named="'gpu'"),
    evaluate_case("--out", "{bad}/a_file", named="a_file"),
    evaluate_case("--clip_model", "/no/such/clip", named="/no/such/clip"),
]
TOOL_CASES = [
    Case("bake", ["{bad}/nothing-here"], named="nothing-here"),
    Case("bake", ["{bad}/empty.ckpt"], named="empty.ckpt"),
    Case("bake", ["{bad}/export", "--rho", "1.5"], named="rho=1.5"),
    Case("bake", ["{bad}/export", "--alpha", "x"], named="'x'"),
    Case("bake", ["{bad}/export", "--out", "{bad}/a_file"], named="a_file"),
    Case("bake", ["{bad}/export", "--out", "{bad}/foreign"], named="foreign"),
    Case("bake", ["{bad}/export", "--concept", "no-equals-sign"], named="no-equals-sign"),
    Case("step_metrics", ["{bad}/nowhere"], named="nowhere"),
    Case("step_metrics", ["{bad}/run"], named="/run"),
    Case("drift_report", ["{bad}/nowhere"], named="nowhere"),
    Case("drift_report", ["{bad}/run"], named="/run"),
    Case("drift_report", ["{bad}/run", "--batch_size", "many"], named="'many'"),
]
if not torch.cuda.is_available():
    CASES += [infer_case("--device", "cuda", named="'cuda'"), evaluate_case("--device", "cuda", named="'cuda'")]


def snapshot(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", CASES + TOOL_CASES, ids=lambda c: f"{c.command}:{' '.join(c.args)[:60]}")
def test_a_bad_input_ends_with_one_line_naming_it_exit_code_2_and_nothing_written(case, bad, capfd, monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped configs name their files relative to the repository
    before = snapshot(bad)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        if case.command in TOOLS:  # each tool's main is its own console entry: it runs run_command itself
            TOOLS[case.command](case.argv(bad))
        else:
            run_command(MAINS[case.command], case.argv(bad), prog=f"{case.command}.py")
    err = capfd.readouterr().err.splitlines()
    assert exit_info.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), f"a user sees more than one line: {err}"
    assert case.named.replace("{bad}", str(bad)) in err[0], f"the bad value is not named: {err[0]}"
    assert snapshot(bad) == before, "a bad input wrote files (or ran a checkpoint's pickled code)"
    assert not (bad / "PAYLOAD-RAN").exists()


def test_the_table_covers_all_three_commands_with_at_least_40_inputs():
    assert len(CASES) >= 40
    assert {c.command for c in CASES} == set(MAINS)


def test_a_library_error_that_is_not_a_user_error_keeps_its_traceback():
    def broken(args):
        return {}["missing"]  # a bug, not a bad input

    with pytest.raises(KeyError):
        run_command(broken, [], prog="x.py")


@pytest.mark.parametrize(("script", "args"), [
    ("train.py", ["fit", "--config", "configs/demo.yaml", "--model.init_args.concept_word", "teddy bear"]),
    ("infer.py", ["--checkpoint", "nowhere/exports/final", "--prompt", "a {}"]),
    ("evaluate.py", ["--out", "nowhere", "--rhos", "[1.5]"]),
    ("-m", ["tea_lightning.mini.full_finetune", "fit", "--config", "configs/mini_world.yaml", "--trainer.max_steps",
            "many"]),
])
def test_the_real_console_shows_one_line_and_no_traceback(script, args):
    # A hang guard, not a speed claim: the command stops before any model is trained.
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr[-2000:]
