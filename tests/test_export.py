"""Writing files atomically, and cleaning up after a writer that was killed mid-write (kill -9, a full disk)."""

import os

import pytest

from helpers import make_trainer, star_data, ti_module
from tea_lightning.callbacks import Export
from tea_lightning.export import remove_stale_temporaries, write_bytes, write_export_folder

DEAD_PID = 999_999_999  # above any kernel's pid_max: no such process


def test_a_write_that_fails_leaves_neither_the_file_nor_a_temporary(tmp_path):
    def fail(folder):
        (folder / "half.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_export_folder(tmp_path / "final", fail)
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_writer_left_is_removed_and_a_live_writers_files_are_kept(tmp_path):
    exports = tmp_path / "exports"
    dead_folder = exports / f".step-000050.{DEAD_PID}-k3j9x.tmp"
    dead_folder.mkdir(parents=True)
    (dead_folder / "learned_embeds.safetensors").write_bytes(b"half")
    dead_image = tmp_path / "baseline" / f".p000-i001.png.{DEAD_PID}-a1b2.tmp"
    dead_image.parent.mkdir()
    dead_image.write_bytes(b"half")
    older = tmp_path / ".run.json.q8w7e6r5.tmp"  # written before temporaries carried the writer's process id
    older.write_text("{")
    live = tmp_path / f".grid-p000.png.{os.getpid()}-zz.tmp"
    live.write_bytes(b"being written")
    replaced = exports / ".final.old"  # killed after the old export moved aside, before the new one arrived
    replaced.mkdir()
    (replaced / "tea.json").write_text("{}")
    kept = [tmp_path / "baseline" / "p000-i000.png", tmp_path / ".hidden-by-the-user"]
    for path in kept:
        path.write_bytes(b"keep")

    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead_folder, dead_image, older])
    assert not dead_folder.exists() and not dead_image.exists() and not older.exists()
    assert live.exists(), "a temporary of a process still writing was removed"
    assert (exports / "final" / "tea.json").exists() and not replaced.exists(), "the older export was not put back"
    assert all(path.exists() for path in kept)


def test_a_training_run_removes_the_export_temporaries_a_killed_run_left(tmp_path):
    stale = tmp_path / "exports" / f".step-000002.{DEAD_PID}-x1.tmp"
    stale.mkdir(parents=True)
    make_trainer(tmp_path, max_steps=1, callbacks=[Export(every_n_steps=0)]).fit(ti_module(), star_data())
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["final"]


def test_an_atomic_write_names_its_temporary_after_the_writing_process(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(os, "replace", lambda source, target: seen.append(os.path.basename(source)))
    write_bytes(b"x", tmp_path / "scores.csv")
    assert seen and seen[0].startswith(f".scores.csv.{os.getpid()}-") and seen[0].endswith(".tmp")
