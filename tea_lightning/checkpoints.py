"""Reading every checkpoint format users already have (docs/formats.md), and the concepts they hold.

`read(path)` looks at one file or folder and says what it holds (a `Source`); it loads no model, so bad input fails
fast. `tea_lightning.personalized.build` then installs a source into the stock pipeline of its base model.

An SDXL embedding holds one set of rows per text encoder (`clip_l` for the first, `clip_g` for the second, or
diffusers' `learned_embeds.safetensors` + `learned_embeds_2.safetensors`); a checkpoint made for the other family
is refused before anything is installed, naming both.

Learned token rows are installed the way diffusers' `load_textual_inversion` does it (new tokens, new embedding
rows), so without TEA the pipeline behaves exactly as stock diffusers would with the same file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from tea_lightning.adapters import custom_diffusion_tensors
from tea_lightning.conditioning import ENCODER_NAMES, SUFFIXES
from tea_lightning.export import (
    CUSTOM_DIFFUSION_WEIGHTS,
    CUSTOM_DIFFUSION_WEIGHTS_BIN,
    DIFFUSERS_TI,
    DIFFUSERS_TI_FILES,
    LORA_WEIGHTS,
    TEA_JSON,
    load_pickle,
    read_tea_json,
)

ACCEPTED = """Accepted checkpoints:
  - a tea-lightning export folder (holds tea.json), or a diffusers training output folder holding
    learned_embeds.safetensors, pytorch_lora_weights.safetensors or pytorch_custom_diffusion_weights.safetensors
  - a tea-lightning Lightning checkpoint (.ckpt)
  - a diffusers Textual Inversion file (.safetensors/.bin holding {token: [n, D]})
  - an AUTOMATIC1111 embedding (.pt with string_to_param, .safetensors with emb_params; kohya's and ai-toolkit's too)
  - an SDXL embedding (.safetensors with clip_l and clip_g: AUTOMATIC1111, ComfyUI, kohya), or a folder holding
    diffusers' learned_embeds.safetensors and learned_embeds_2.safetensors
  - a Custom Diffusion token file (<token>.safetensors/.bin holding {token: [D]})
  - a LoRA file: pytorch_lora_weights.safetensors (diffusers or peft keys; a stored lora_alpha is honoured), kohya
    keys (lora_unet_/lora_te_ with .alpha; lora_te1_/lora_te2_ for SDXL), or a UNet adapter written by
    unet.save_lora_adapter
  - Custom Diffusion weights (pytorch_custom_diffusion_weights.safetensors, or .bin as diffusers' script writes with
    --no_safe_serialization)"""
_PICKLES = (".pt", ".bin", ".pth")


@dataclass(frozen=True)
class Concept:
    """A keyword as written in prompts ("<v>", "sks dog", "<new1> cat") and the word TEA pulls it towards ("man").

    `phrase` is what the tokenizer reads in the keyword's place: the keyword with each multi-vector token expanded
    (`<v>` → `<v> <v>_1 <v>_2`, as diffusers names the extra rows); None means the keyword itself. `learned` says
    that the keyword holds learned token rows (Textual Inversion, Custom Diffusion), which TEA adjusts at token
    level; a keyword without (a LoRA's "sks dog") is adjusted at prompt level. `target` is what stands in the
    keyword's place in the prompt-level target prompt; None means the concept word.
    """

    keyword: str
    concept_word: str | None = None
    phrase: str | None = None
    learned: bool = False
    target: str | None = None

    @property
    def text(self) -> str:
        return self.phrase or self.keyword

    @property
    def target_text(self) -> str:
        return self.target or self.concept_word


@dataclass
class Source:
    """What one checkpoint file or folder holds (nothing installed yet)."""

    path: str
    kind: str
    base_model: str | None = None
    concepts: list[Concept] = field(default_factory=list)
    embeddings: dict[str, list[Tensor]] = field(default_factory=dict)  # token -> rows [k, D_e] per text encoder
    lora: str | None = None  # the LoRA file, installed by diffusers' own loader (which reads its metadata)
    sdxl_lora: bool = False  # the LoRA adapts a second text encoder: SDXL's
    custom_diffusion: dict[str, Tensor] | None = None
    module: Any = None  # a DiffusionModule rebuilt from a .ckpt that is not plain Textual Inversion


DEFAULT_RHO = 0.2  # the authors' rotation factor for Textual Inversion and Custom Diffusion
DREAMBOOTH_RHO = 0.1  # and for DreamBooth (their run scripts, method.md §2)


def modifier_targets(concepts: Sequence[Concept], learned: Sequence[str]) -> list[Concept]:
    """Each concept with the prompt-level target the authors used for Custom Diffusion: only the learned tokens of
    the keyword replaced by the concept word ("<new1> cat" → "cat cat"), so the target prompt has the prompt's
    length and position i pairs with position i."""
    result = []
    for concept in concepts:
        target = concept.keyword
        for token in learned:  # whole words; a token may hold a space (AUTOMATIC1111's "pink star")
            target = token_pattern(token).sub(lambda _, word=concept.concept_word: word, target)
        if target == concept.keyword:
            raise ValueError(f"target='modifier' replaces the learned tokens of a keyword, and {concept.keyword!r} "
                             "holds none (a DreamBooth identifier is not learned); use target='word'.")
        result.append(replace(concept, target=target))
    return result


def default_rho(source: Source) -> float:
    """The rotation factor the authors used for the method that wrote `source`: 0.1 for DreamBooth (a LoRA and no
    learned token row), 0.2 otherwise."""
    if source.module is not None:
        return _method_rho(source.module.method)
    return DREAMBOOTH_RHO if source.lora is not None and not source.embeddings else DEFAULT_RHO


def default_rho_of(path: str | Path) -> float:
    """`default_rho` of the checkpoint at `path`, read cheaply: an export folder's `tea.json` or a `.ckpt`'s recorded
    class say the method, so no base model is loaded to decide."""
    path = Path(path).expanduser()
    if (path / TEA_JSON).is_file():
        return _method_rho(read_tea_json(path).get("method"))
    if path.suffix == ".ckpt" and path.is_file():
        return _method_rho(_method_class(path, dict(load_pickle(path).get("hyper_parameters") or {})).method)
    return default_rho(read(path))


def _method_rho(method: str | None) -> float:
    return DREAMBOOTH_RHO if method == "dreambooth_lora" else DEFAULT_RHO


# ----------------------------------------------------------------------------------------------- reading files


def read(path: str | Path, pretrained: str | None = None) -> Source:
    """Say what the checkpoint at `path` holds. `pretrained` is only used to rebuild a method from a `.ckpt`."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint={str(path)!r} does not exist. {ACCEPTED}")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix == ".ckpt":
        return _read_lightning(path, pretrained)
    return _classify(path, *_load_tensors(path))


def _load_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        except (SafetensorError, OSError) as error:
            raise ValueError(f"checkpoint={str(path)!r} is not a readable safetensors file ({error}).") from error
    if path.suffix in _PICKLES:
        data = load_pickle(path)
        if not isinstance(data, dict):
            raise ValueError(f"checkpoint={str(path)!r} holds a {type(data).__name__}, not a dict of tensors. "
                             f"{ACCEPTED}")
        return data, {}
    raise ValueError(f"checkpoint={str(path)!r} has the unknown suffix {path.suffix!r}. {ACCEPTED}")


def _metadata_name(metadata: dict[str, str]) -> str | None:
    """The token name an embedding's safetensors metadata records. ai-toolkit JSON-encodes every value
    (`"name": "\"pinkstar\""`), so a JSON string is unquoted."""
    name = metadata.get("name")
    if name and name.startswith('"'):
        try:
            decoded = json.loads(name)
        except json.JSONDecodeError:
            return name
        return decoded if isinstance(decoded, str) else name
    return name


def _classify(path: Path, data: dict[str, Any], metadata: dict[str, str]) -> Source:
    """Recognise a file by its keys, never by its name (users rename files)."""
    where = str(path)
    if "string_to_param" in data:  # AUTOMATIC1111 .pt: {"string_to_param": {"*": [n, D]}, "name": ...}
        params = data["string_to_param"]
        tensor = params.get("*", next(iter(params.values()), None)) if isinstance(params, dict) else None
        name = data.get("name") if isinstance(data.get("name"), str) else path.stem
        return _embedding_source(where, "AUTOMATIC1111 embedding", {name: tensor})
    if "emb_params" in data:  # AUTOMATIC1111 / kohya / ai-toolkit: {"emb_params": [n, D]}; named by file or metadata
        name = _metadata_name(metadata) or path.stem
        return _embedding_source(where, "AUTOMATIC1111/kohya embedding", {name: data["emb_params"]})
    sdxl_keys = [k for k in ENCODER_NAMES if k in data]
    if sdxl_keys:  # SDXL (AUTOMATIC1111, ComfyUI, kohya): {"clip_l": [n, 768], "clip_g": [n, 1280]}, named by the file
        if len(sdxl_keys) == 1:
            missing = next(k for k in ENCODER_NAMES if k not in data)
            raise ValueError(f"checkpoint={where!r} holds {sdxl_keys[0]!r} but not {missing!r}: an SDXL embedding "
                             "needs a row set for each text encoder (clip_l [n, 768] and clip_g [n, 1280]). The file "
                             "is incomplete; export it again with both.")
        name = metadata.get("name") or path.stem
        return _embedding_source(where, "SDXL embedding (clip_l + clip_g)",
                                 {name: [data[k] for k in ENCODER_NAMES]})
    keys = list(data)
    if keys and any("_custom_diffusion" in k for k in keys):
        return Source(where, "Custom Diffusion weights", custom_diffusion=custom_diffusion_tensors(data, where))
    if keys and all("lora" in k for k in keys):
        _tensors(where, data)
        sdxl = any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys)  # a second text encoder: SDXL's
        return Source(where, "SDXL LoRA weights" if sdxl else "LoRA weights", lora=where, sdxl_lora=sdxl)
    if keys and all(isinstance(v, Tensor) and v.ndim in (1, 2) and "." not in k for k, v in data.items()):
        return _embedding_source(where, "diffusers Textual Inversion embedding", data)
    shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
    raise ValueError(f"checkpoint={where!r} is of an unknown format (keys: {shown or 'none'}). {ACCEPTED}")


def _tensors(where: str, data: dict[str, Any]) -> dict[str, Tensor]:
    bad = [k for k, v in data.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"checkpoint={where!r}: entries {bad[:5]} are not tensors. {ACCEPTED}")
    return dict(data)


def _embedding_source(where: str, kind: str, embeddings: dict[str, Any]) -> Source:
    """`embeddings`: token → a tensor, or a list of tensors, one per text encoder (SDXL)."""
    rows = {}
    for token, tensors in embeddings.items():
        per_encoder = []
        for tensor in tensors if isinstance(tensors, list) else [tensors]:
            if not isinstance(tensor, Tensor) or tensor.ndim not in (1, 2) or not tensor.is_floating_point():
                raise ValueError(f"checkpoint={where!r}: the embedding of {token!r} is not a float tensor [n, D] or "
                                 "[D].")
            per_encoder.append(tensor.detach().float().reshape(-1, tensor.shape[-1]))  # CD tokens are 1-D
        if len({len(r) for r in per_encoder}) > 1:
            raise ValueError(f"checkpoint={where!r}: the embedding of {token!r} has {[len(r) for r in per_encoder]} "
                             "vectors in its text encoders; both must hold the same number.")
        rows[token] = per_encoder
    return Source(where, kind, concepts=[Concept(token) for token in rows], embeddings=rows)


def _read_folder(folder: Path) -> Source:
    info = read_tea_json(folder) if (folder / TEA_JSON).is_file() else {}

    def first(*names: str) -> Path | None:
        return next((folder / n for n in names if (folder / n).is_file()), None)

    ti = first(DIFFUSERS_TI, "learned_embeds.bin")
    ti_2 = first(DIFFUSERS_TI_FILES[1], "learned_embeds_2.bin")  # SDXL: the second text encoder's rows
    lora = first(LORA_WEIGHTS, "pytorch_lora_weights.bin")
    custom = first(CUSTOM_DIFFUSION_WEIGHTS, CUSTOM_DIFFUSION_WEIGHTS_BIN)
    parts = [_classify(p, *_load_tensors(p)) for p in (ti, lora, custom) if p is not None]
    if ti_2 is not None:
        parts[0] = _pair_diffusers_embeddings(folder, ti, ti_2, parts[0] if ti is not None else None)
    if ti is None:  # Custom Diffusion writes one `{token: [D]}` file per modifier token
        known = {p.name for p in (lora, custom) if p is not None}
        for path in sorted(folder.iterdir()):
            if path.suffix in (".safetensors", ".bin") and path.name not in known and path.is_file():
                data, metadata = _load_tensors(path)
                if "emb_params" not in data and "string_to_param" not in data:
                    try:
                        part = _classify(path, data, metadata)
                    except ValueError:
                        continue  # not ours to read; the folder may hold other files
                    if part.embeddings:
                        parts.append(part)
    if not parts:
        listing = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise ValueError(f"checkpoint={str(folder)!r} is a folder without a checkpoint file (it holds {listing}). "
                         f"{ACCEPTED}")
    source = merge(parts)
    source.path = str(folder)
    source.kind = f"{info.get('method', 'diffusers')} export folder"
    source.base_model = info.get("base_model")
    listed = info.get("concepts") or ([info] if info.get("keyword") else [])  # tea.json names the keyword(s)
    if listed:
        source.concepts = [Concept(c["keyword"], c.get("concept_word")) for c in listed]
    return source


def _pair_diffusers_embeddings(folder: Path, ti: Path | None, ti_2: Path, first: Source | None) -> Source:
    """diffusers' SDXL pair: `learned_embeds` (first text encoder) and `learned_embeds_2` (second), same tokens."""
    if first is None:
        raise ValueError(f"checkpoint={str(folder)!r} holds {ti_2.name} (the second SDXL text encoder's rows) without "
                         f"{DIFFUSERS_TI} (the first's); an SDXL embedding needs both.")
    second = _classify(ti_2, *_load_tensors(ti_2))
    if set(second.embeddings) != set(first.embeddings):
        raise ValueError(f"checkpoint={str(folder)!r}: {ti.name} holds the tokens {sorted(first.embeddings)} but "
                         f"{ti_2.name} holds {sorted(second.embeddings)}; they must name the same tokens.")
    pairs = {token: rows + second.embeddings[token] for token, rows in first.embeddings.items()}
    return _embedding_source(str(folder), "diffusers SDXL Textual Inversion embedding", pairs)


def _read_lightning(path: Path, pretrained: str | None) -> Source:
    checkpoint = load_pickle(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    state = checkpoint.get("state_dict") or {}
    if not hparams or not state:
        raise ValueError(f"checkpoint={str(path)!r} is not a tea-lightning Lightning checkpoint (it lacks "
                         f"hyper_parameters or state_dict). {ACCEPTED}")
    base = pretrained or hparams.get("pretrained")
    learned = [f"learned{s}.vectors" for s in SUFFIXES]
    if set(state) in ({learned[0]}, set(learned)) and "placeholder" in hparams:  # Textual Inversion: the rows
        rows = [state[key] for key in learned if key in state]  # one set per text encoder
        source = _embedding_source(str(path), "Textual Inversion checkpoint", {hparams["placeholder"]: rows})
        source.concepts = [Concept(hparams["placeholder"], hparams.get("concept_word"))]
        source.base_model = base
        return source
    module = _rebuild_module(path, hparams, state, base)
    return Source(str(path), f"{type(module).__name__} checkpoint", base_model=module.pretrained,
                  concepts=[Concept(module.keyword, module.concept_word)], module=module)


def _rebuild_module(path: Path, hparams: dict[str, Any], state: dict[str, Tensor], base: str | None):
    """Rebuild the method that wrote `path` (its class is recorded by LightningCLI) and load its trained tensors.

    The class is imported by the name the checkpoint records, here and only here: generating from any other file
    imports no training code.
    """
    cls = _method_class(path, hparams)
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if base is not None:
        kwargs["pretrained"] = base
    module = cls(**kwargs)
    module.load_state_dict(state)
    return module.eval()


def _method_class(path: Path, hparams: dict[str, Any]) -> type:
    """The tea-lightning method class a Lightning checkpoint records (LightningCLI writes `_class_path`)."""
    from lightning import LightningModule

    class_path = hparams.get("_class_path", "")
    if not class_path.startswith("tea_lightning."):
        raise ValueError(f"checkpoint={str(path)!r} does not record a tea-lightning method class (_class_path="
                         f"{class_path or None!r}); load its export folder (exports/final) instead.")
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, LightningModule) and isinstance(getattr(cls, "method", None), str)
            and callable(getattr(cls, "learned_vectors", None))):
        raise ValueError(f"checkpoint={str(path)!r} names {class_path!r}, which is not a tea-lightning method.")
    return cls


def merge(sources: Sequence[Source]) -> Source:
    """One source from several (multi-concept: `<man>` from one file, `<dog>` from another)."""
    if len(sources) == 1:
        return sources[0]
    if any(s.module is not None for s in sources):
        raise ValueError("A .ckpt of a method other than Textual Inversion cannot be combined with other checkpoints; "
                         "use its export folder (exports/final) instead.")
    merged = Source(" + ".join(s.path for s in sources), " + ".join(s.kind for s in sources))
    bases = {s.base_model for s in sources if s.base_model}
    if len(bases) > 1:
        raise ValueError(f"The checkpoints were trained on different base models {sorted(bases)}; pass --pretrained to "
                         "choose one, or combine checkpoints of one base model.")
    merged.base_model = next(iter(bases), None)
    for source in sources:
        for token, rows in source.embeddings.items():
            if token in merged.embeddings:
                raise ValueError(f"The token {token!r} is defined twice ({source.path} and another checkpoint); "
                                 "rename one of the files or tokens.")
            merged.embeddings[token] = rows
        for kind in ("lora", "custom_diffusion"):
            if getattr(source, kind) is not None:
                if getattr(merged, kind) is not None:
                    raise ValueError(f"Two checkpoints hold {kind.replace('_', ' ')} weights; load one at a time.")
                setattr(merged, kind, getattr(source, kind))
        merged.sdxl_lora = merged.sdxl_lora or source.sdxl_lora
        merged.concepts += [c for c in source.concepts if c.keyword not in {m.keyword for m in merged.concepts}]
    return merged


def fingerprint(source: Source) -> str:
    """What a checkpoint holds, as 16 hex digits of a SHA-256 over every tensor (name, dtype, shape and bytes) and the
    bytes of its LoRA file.

    A resumed output folder is matched by this, not by the checkpoint's path: a file replaced at the same path is
    another checkpoint, and the same file moved elsewhere is the same one.
    """
    tensors: dict[str, Tensor] = {}
    for token, rows in source.embeddings.items():  # one [k, D_e] per text encoder
        tensors.update({f"embeddings/{token}/{i}": r for i, r in enumerate(rows)})
    tensors.update({f"custom_diffusion/{name}": t for name, t in (source.custom_diffusion or {}).items()})
    if source.module is not None:
        tensors.update({f"module/{name}": t for name, t in source.module.trainable_state_dict().items()})
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    if source.lora is not None:  # installed from the file by diffusers' own loader: its bytes are what counts
        digest.update(b"lora|")
        with open(source.lora, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ concepts


def parse_concepts(concepts: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """`{"<man>": "man"}` or `["<man>=man", "sks dog=dog"]` → `{keyword: concept word}`."""
    if concepts is None:
        return {}
    if isinstance(concepts, Mapping):
        pairs = dict(concepts)
    else:
        pairs = {}
        for item in concepts:
            keyword, sep, word = str(item).partition("=")
            if not sep or not keyword.strip() or not word.strip():
                raise ValueError(f"concept={item!r} is not 'KEYWORD=WORD'; write e.g. '<man>=man' or 'sks dog=dog'.")
            pairs[keyword.strip()] = word.strip()
    for keyword, word in pairs.items():
        if not str(keyword).strip() or not str(word).strip():
            raise ValueError(f"concepts has an empty keyword or word in {keyword!r}: {word!r}.")
    return pairs


def resolve_concepts(found: Sequence[Concept], concept_word: str | None = None,
                     concepts: Mapping[str, str] | Sequence[str] | None = None) -> list[Concept]:
    """The checkpoint's concepts with the user's words applied: `concept_word` names the word of the only concept;
    `concepts` ({keyword: word}) sets the word of a listed keyword, widens a file's token to a keyword holding it
    ("<new1> cat" for the token "<new1>"), or adds a keyword (DreamBooth LoRA files do not say what their keyword
    is). Every concept must end up with a word."""
    result = list(found)
    if concept_word is not None:
        if len(result) != 1:
            names = [c.keyword for c in result]
            raise ValueError(f"concept_word={concept_word!r} needs exactly one keyword, but the checkpoint has "
                             f"{len(result)} {names}; use --concept 'KEYWORD=WORD' for each keyword instead.")
        result = [replace(result[0], concept_word=concept_word)]
    for keyword, word in parse_concepts(concepts).items():
        index = next((i for i, c in enumerate(result) if c.keyword == keyword), None)
        if index is None:  # a keyword around a file's token ("<new1> cat" for "<new1>") takes the token's place
            index = next((i for i, c in enumerate(result) if token_pattern(c.keyword).search(keyword)), None)
        if index is None:
            result.append(Concept(keyword, word))
        else:
            result[index] = replace(result[index], keyword=keyword, concept_word=word)
    if not result:
        raise ValueError("The checkpoint does not say which keyword it learned (a bare LoRA or Custom Diffusion "
                         "file). Name it and its concept word with --concept 'sks dog=dog'.")
    missing = [c.keyword for c in result if not c.concept_word]
    if missing:
        raise ValueError(f"No concept word for the keyword(s) {missing}: TEA pulls a keyword back towards the word it "
                         f"stands for. Pass --concept_word man (one keyword) or --concept '{missing[0]}=man'.")
    return result


def token_pattern(token: str) -> re.Pattern:
    """A token as a whole word of a keyword; the token may hold spaces (AUTOMATIC1111's "pink star")."""
    return re.compile(rf"(?<!\S){re.escape(token)}(?!\S)")


def owner(concepts: Sequence[Concept], token: str) -> Concept:
    """The concept whose keyword holds the learned `token` as a whole word."""
    for concept in concepts:
        if token_pattern(token).search(concept.keyword):
            return concept
    raise ValueError(f"The learned token {token!r} appears in no keyword {[c.keyword for c in concepts]}; name its "
                     f"concept word with --concept '{token}=WORD'.")
