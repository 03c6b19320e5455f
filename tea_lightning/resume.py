"""Checking a Lightning checkpoint given to `train.py --ckpt_path` against the run that resumes from it.

LightningCLI's own handling (`LightningCLI._parse_ckpt_path`) applies the checkpoint's hyper-parameters over the
run's configuration: a Textual Inversion config resumed from a DreamBooth-LoRA checkpoint silently trains
DreamBooth-LoRA, and `--model.init_args.num_vectors 2` is silently replaced by the checkpoint's 1. Here the
checkpoint is read once (tensors only: `export.load_pickle`, so no pickled code runs) and compared with the run
before any model is built or file written: another method, other settings, or a run that is already finished are
refused with one message saying what differs and what to do. The run's configuration is then the one
that trains, and the one its `config.yaml` records.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tea_lightning.export import load_pickle

# Lightning resolves these names itself (`--ckpt_path last` resumes the newest checkpoint of the run folder).
LIGHTNING_NAMES = ("last", "best", "hpc")
# Settings that change how fast a step runs or how many processes load data, never what a step computes.
RESULT_NEUTRAL = {"model.init_args.gradient_checkpointing", "data.num_workers"}
_PRIVATE = ("_instantiator",)


def is_file_path(ckpt_path: str) -> bool:
    """Whether `ckpt_path` names a local file (not one of Lightning's names, nor a remote URL)."""
    return ckpt_path not in LIGHTNING_NAMES and not ckpt_path.startswith("registry") and "://" not in ckpt_path


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """A tea-lightning Lightning checkpoint, loaded with `weights_only=True`; every way a file can be unusable (a
    folder, empty, truncated, pickled objects, another program's checkpoint) is an error naming the path."""
    path = Path(ckpt_path).expanduser()
    where = f"--ckpt_path {str(ckpt_path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist. Pass a .ckpt file, e.g. runs/…/checkpoints/last.ckpt.")
    if path.is_dir():
        inside = sorted(path.rglob("*.ckpt"))
        hint = f" (it holds {str(inside[-1])!r})" if inside else ""
        raise ValueError(f"{where} is a folder{hint}. Pass the .ckpt file itself, e.g. "
                         f"{str(path / 'checkpoints' / 'last.ckpt')!r}.")
    if path.stat().st_size == 0:
        raise ValueError(f"{where} is empty (0 bytes): its save was interrupted. Resume from an earlier checkpoint "
                         "of the run instead.")
    checkpoint = load_pickle(path)  # tensors only: no pickled code runs
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("hyper_parameters"), Mapping) \
            or "global_step" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{where} is not a Lightning checkpoint of a tea-lightning run (it lacks hyper_parameters, "
                         "state_dict or global_step). Pass a checkpoint written by train.py.")
    return checkpoint


def _flat(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Nested settings as {dotted key: value}, tuples as lists (YAML and torch.save store sequences differently)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in _PRIVATE:
            continue
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _plain(value)
    return flat


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def differences(saved: Mapping[str, Any], run: Mapping[str, Any], prefix: str) -> list[tuple[str, Any, Any]]:
    """(setting, checkpoint's value, run's value) for every setting both record with different values.

    A setting only one side records is left out: one the checkpoint lacks is a newer option whose default keeps the
    old behaviour, one the run lacks no longer exists.
    """
    old, new = _flat(saved, prefix), _flat(run, prefix)
    return [(key, old[key], new[key]) for key in sorted(old.keys() & new.keys())
            if old[key] != new[key] and key not in RESULT_NEUTRAL]


def run_folder(ckpt_path: str | Path) -> Path | None:
    """The run folder a checkpoint was saved in (`<run>/checkpoints/x.ckpt`), when it is laid out that way."""
    path = Path(ckpt_path).expanduser()
    return path.parent.parent if path.parent.name == "checkpoints" else None


def check_resume(ckpt_path: str, model: Mapping[str, Any], data: Mapping[str, Any] | None,
                 max_steps: int | None, fit: bool = True) -> None:
    """Refuse to resume from `ckpt_path` when it would not continue this run.

    Args:
        ckpt_path: The `--ckpt_path` value (a file path; Lightning's own names are not checked).
        model: The run's model configuration, ``{"class_path": ..., "init_args": {...}}``.
        data: The run's data module arguments (None when the run has none).
        max_steps: The run's `trainer.max_steps` (-1 or None: no step limit).
        fit: Training (a finished run is refused) rather than validating.
    """
    checkpoint = read_checkpoint(ckpt_path)
    where = f"--ckpt_path {str(ckpt_path)!r}"
    folder = run_folder(ckpt_path)
    config = folder / "config.yaml" if folder is not None and (folder / "config.yaml").is_file() else None
    use_its_config = (f"resume with the config it was trained with (--config {str(config)!r})" if config else
                      "resume with the settings it was trained with")
    saved = dict(checkpoint["hyper_parameters"])
    saved_class, run_class = saved.pop("_class_path", None), model.get("class_path")
    if saved_class is not None and saved_class != run_class:
        raise ValueError(f"{where} is a checkpoint of {saved_class}, but this run trains {run_class}. To continue "
                         f"that run, {use_its_config}; to train {run_class.rpartition('.')[2]}, pass a checkpoint of "
                         "it or none.")
    changed = differences(saved, model.get("init_args") or {}, "model.init_args.")
    if data is not None:
        changed += differences(checkpoint.get("datamodule_hyper_parameters") or {}, data, "data.")
    if changed:
        listed = "; ".join(f"{key}: checkpoint {old!r}, this run {new!r}" for key, old, new in changed)
        raise ValueError(f"{where} was trained with other settings than this run ({listed}). Resuming must not mix "
                         f"them: {use_its_config}, or drop --ckpt_path to start a new run with these settings.")
    step = int(checkpoint["global_step"])
    if fit and max_steps is not None and max_steps > 0 and step >= max_steps:
        exports = f" ({str(folder / 'exports' / 'final')!r})" if folder is not None else ""
        raise ValueError(f"{where} is at step {step}, and this run ends at trainer.max_steps={max_steps}: it is "
                         f"finished, nothing is left to train. Raise --trainer.max_steps to train on, or use its "
                         f"final export{exports}.")
