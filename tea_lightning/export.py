"""Writing checkpoint files that stock diffusers and other UIs load (see docs/formats.md), atomically.

Every write goes to a temporary name in the same folder and is renamed into place, so an interrupted run never
leaves a half-written file; a whole export folder is assembled under a temporary name and renamed the same way.
"""

from __future__ import annotations

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


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{str(path)!r} is not a readable PyTorch file ({str(error).splitlines()[0]}).") from None


def write_png(image: Any, path: Path) -> None:
    """Save a PIL image as PNG, atomically."""
    _atomic(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def write_bytes(data: bytes, path: Path) -> None:
    """Write `data` (an image, a CSV, a report, a plot) to `path` atomically."""
    _atomic(Path(path), lambda tmp: tmp.write_bytes(data))


def write_json(data: dict[str, Any], path: Path) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_tea_json(folder: Path, *, method: str, base_model: str, keyword: str, concept_word: str | None,
                   step: int, **extra: Any) -> None:
    """`tea.json`: what `infer.py` needs to apply TEA without being told (method, base model, keyword, concept)."""
    write_json({"format_version": FORMAT_VERSION, "method": method, "base_model": base_model, "keyword": keyword,
                "concept_word": concept_word, "step": step, **extra}, Path(folder) / TEA_JSON)


def read_tea_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / TEA_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: {str(folder)!r} is not a tea-lightning export folder.")
    return json.loads(path.read_text())


def write_export_folder(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Create `folder` atomically: `fill` writes into a fresh temporary sibling that is then renamed into place,
    replacing an older export of the same name (a resumed run re-exporting a step)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
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
