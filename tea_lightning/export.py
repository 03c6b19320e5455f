"""Writing checkpoint files that stock diffusers and other UIs load (see docs/formats.md), atomically.

Every write goes to a temporary name in the same folder and is renamed into place, so an interrupted run never
leaves a half-written file; a whole export folder is assembled under a temporary name and renamed the same way.
Temporary names are hidden and carry the writer's process id (`.final.1234-x7q.tmp`): what a killed process left
behind is removed by `remove_stale_temporaries` when the next run starts, while a live writer's files are kept.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# The file names stock diffusers writes and looks for.
DIFFUSERS_TI = "learned_embeds.safetensors"
# One file per text encoder: SDXL's second encoder's rows go to learned_embeds_2 (diffusers' `_2` naming).
DIFFUSERS_TI_FILES = (DIFFUSERS_TI, "learned_embeds_2.safetensors")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CUSTOM_DIFFUSION_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"
CUSTOM_DIFFUSION_WEIGHTS_BIN = "pytorch_custom_diffusion_weights.bin"  # diffusers' --no_safe_serialization
# What AUTOMATIC1111, ComfyUI and kohya's scripts load as a LoRA (`lora_unet_…`/`lora_te_…` keys with `.alpha`).
KOHYA_LORA = "lora_kohya.safetensors"
TEA_JSON = "tea.json"
# The keys of an AUTOMATIC1111/ComfyUI/kohya embedding, by number of text encoders: SD 1.x/2.x have one, SDXL two.
WEBUI_EMBEDDING_KEYS = {1: ("emb_params",), 2: ("clip_l", "clip_g")}
FORMAT_VERSION = 1
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask: temporary files are private, finished ones get the usual modes


def file_stem(keyword: str) -> str:
    """A file name for a keyword: `<pink-star>` → `pink-star`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", keyword).strip("-.") or "embedding"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_folder(folder: Path, what: str) -> None:
    """Refuse, before any work, a `folder` that cannot be written: a file, a path under a file, or a place the user
    may not write to (probed with an anonymous temporary file, which leaves nothing behind).

    Args:
        folder: The output folder (it need not exist yet).
        what: Its option name, for the message ("out").
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what}={str(folder)!r} is a file; pass the path of a folder to write into.")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}={str(folder)!r} lies inside {str(existing)!r}, which is a file; choose a "
                         "folder path.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"{what}={str(folder)!r} cannot be written ({error.strerror or error} in {str(existing)!r}); "
                         "choose a folder you can write to.") from error


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save contiguous CPU copies of `tensors`; a non-finite value is refused rather than written."""
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(f"Refusing to write {path.name}: tensor {key!r} holds NaN or inf values. "
                                     "The run diverged; lower the learning rate or use bf16-mixed/32 precision.")
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(clean, str(tmp), metadata=metadata))


def webui_embedding(rows: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """An AUTOMATIC1111/ComfyUI/kohya embedding file's tensors from one token's rows `[k, D_e]`, one per text
    encoder in the model's order: `emb_params` for one encoder, `clip_l` and `clip_g` for SDXL's two."""
    keys = WEBUI_EMBEDDING_KEYS.get(len(rows))
    if keys is None:
        raise ValueError(f"An embedding file holds the rows of 1 or 2 text encoders, not {len(rows)}.")
    return dict(zip(keys, rows, strict=True))


def load_pickle(path: str | Path) -> Any:
    """A `.pt`/`.bin`/`.ckpt` file read with `torch.load(weights_only=True)`: tensors and plain containers only, since
    a full unpickle can run arbitrary code. A file that needs more is refused in one line naming what it holds."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        held = found.group(1) if found else "Python objects beyond tensors"
        fix = ("Convert it to safetensors with the tool that made it, or use a file in another format."
               if not held.endswith("ParameterDict") else  # the original Textual Inversion code's embeddings
               "It is an embedding of the original Textual Inversion code: if you trust it, save its vectors once "
               "as an AUTOMATIC1111 .safetensors ({'emb_params': tensor [n, D]}) and use that.")
        raise ValueError(f"{str(path)!r} holds {held}, and pickle files are only read as plain tensors "
                         f"(torch.load with weights_only=True) because a full unpickle can run arbitrary code. "
                         f"{fix}") from None
    except (RuntimeError, EOFError) as error:  # EOFError: an empty file, with no message of its own
        reason = (str(error).strip().splitlines() or ["the file is empty"])[0].split(". ")[0]
        raise ValueError(f"{str(path)!r} is not a readable PyTorch file ({reason}): it is truncated, empty or of "
                         "another kind. Use a complete copy, e.g. an earlier checkpoint of the run.") from None


def write_png(image: Any, path: Path) -> None:
    """Save a PIL image as PNG, atomically."""
    _atomic(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def write_bytes(data: bytes, path: Path) -> None:
    """Write `data` (an image, a CSV, a report, a plot) to `path` atomically."""
    _atomic(Path(path), lambda tmp: tmp.write_bytes(data))


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """Write `rows` as a CSV with the header `columns` (keys outside it are left out), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(buffer.getvalue().encode("utf-8"), path)


def write_json(data: dict[str, Any], path: Path) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_tea_json(folder: Path, *, method: str, base_model: str, keyword: str, concept_word: str | None,
                   step: int, **extra: Any) -> None:
    """`tea.json`: what `infer.py` needs to apply TEA without being told (method, base model, keyword, concept)."""
    write_json({"format_version": FORMAT_VERSION, "method": method, "base_model": base_model, "keyword": keyword,
                "concept_word": concept_word, "step": step, **extra}, Path(folder) / TEA_JSON)


# The fields of tea.json that readers rely on, and their JSON types (None: the field may be null).
_TEA_FIELDS: dict[str, tuple[type | None, ...]] = {
    "format_version": (int,), "method": (str,), "base_model": (str, None), "keyword": (str,),
    "concept_word": (str, None), "step": (int,), "tokens": (list,), "concepts": (list,)}


def read_tea_json(folder: str | Path) -> dict[str, Any]:
    """`tea.json` of an export folder, checked: valid JSON, a `format_version` this version reads, and every known
    field of its type. Errors name the file and what is wrong with it."""
    path = Path(folder) / TEA_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: {str(folder)!r} is not a tea-lightning export folder.")
    fix = "Re-export it (the Export callback writes it), or restore the file the training run wrote."
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}). {fix}") from error
    if not isinstance(info, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(info).__name__}, not an object of fields. {fix}")
    version = info.get("format_version", 1)  # a hand-written tea.json may leave it out
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format_version {version}, newer than this tea-lightning reads "
                         f"({FORMAT_VERSION}). Upgrade tea-lightning (pip install -U tea-lightning).")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{str(path)!r} has format_version={version!r}, not a version this tea-lightning knows "
                         f"(1 to {FORMAT_VERSION}). {fix}")
    for key, types in _TEA_FIELDS.items():
        value = info.get(key)
        if key not in info or (value is None and None in types):
            continue
        if isinstance(value, bool) or not isinstance(value, tuple(t for t in types if t is not None)):
            wanted = " or ".join("null" if t is None else t.__name__ for t in types)
            raise ValueError(f"{str(path)!r} has {key}={value!r}, which should be {wanted}. {fix}")
    for i, concept in enumerate(info.get("concepts") or []):
        if not isinstance(concept, dict) or not isinstance(concept.get("keyword"), str) or \
                not isinstance(concept.get("concept_word"), str | None):
            raise ValueError(f"{str(path)!r} has concepts[{i}]={concept!r}, which should be an object with a text "
                             f"keyword and concept_word. {fix}")
    return info


def remove_stale_temporaries(folder: str | Path, depth: int = 2) -> list[Path]:
    """Remove what a killed writer left in `folder` and its subfolders down to `depth`: temporary files and export
    folders of a process that no longer runs. An export folder that was being replaced (its old copy still named
    `.NAME.old`) is put back when the new one never arrived. Returns the removed paths."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        stale = _STALE.fullmatch(entry.name)
        if stale and not _alive(stale.group("pid")):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
        elif entry.name.startswith(".") and entry.name.endswith(".old") and entry.is_dir():
            target = entry.with_name(entry.name[1:-len(".old")])
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            else:
                with contextlib.suppress(FileNotFoundError):  # another process put it back first
                    os.replace(entry, target)
        elif depth > 0 and entry.is_dir() and not entry.is_symlink():
            removed += remove_stale_temporaries(entry, depth - 1)
    return removed


# `.NAME.PID-RANDOM.tmp` (this version) or `.NAME.RANDOM.tmp` (earlier ones, which recorded no process id).
_STALE = re.compile(r"\..+\.(?:(?P<pid>\d+)-)?[^.]+\.tmp")


def _alive(pid: str | None) -> bool:
    if pid is None:
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def step_exports(run: str | Path, command: str) -> list[tuple[int, Path]]:
    """(step, folder) of every step-stamped export (`exports/step-NNNNNN/`, written by the `Export` callback) of a
    run, in step order.

    Args:
        run: A run folder holding `exports/`, or the `exports/` folder itself.
        command: The command that reads them, for the message when there are none.
    """
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist; pass a run folder such as "
                                "runs/demo/lightning_logs/version_0 (the one holding exports/)")
    folder = run / "exports" if (run / "exports").is_dir() else run
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP.fullmatch(p.name)))
    if not found:
        raise FileNotFoundError(
            f"no step-stamped exports (exports/step-NNNNNN/) under {str(run)!r}; {command} reads the folders the "
            "Export callback writes every every_n_steps steps: train with tea_lightning.callbacks.Export("
            "every_n_steps=100) (as the shipped configs do) and pass that run's folder")
    return found


_STEP = re.compile(r"step-(\d+)")


def write_export_folder(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Create `folder` atomically: `fill` writes into a fresh temporary sibling that is then renamed into place,
    replacing an older export of the same name (a resumed run re-exporting a step)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(folder), suffix=".tmp", dir=folder.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
