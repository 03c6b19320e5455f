"""Scoring generated images the way the paper does (method.md §4), and writing its tables.

One image gets five numbers:

- CLIP-T three ways, 100·max(cos, 0) between the CLIP image embedding and the text embedding of the full prompt
  (the template filled with the concept word, never the learned keyword), of the concept segment ("a man") and of
  the context segment ("wearing glasses and playing a guitar");
- CLIP-I, 100·cos between the CLIP image embeddings of the image and of the reference images (mean over all
  references, or one anchor image as the authors did);
- DINO-I, the same with a DINO backbone (``facebook/dinov2-base`` with the mean of all output tokens as the
  authors did, or the CLS token as DreamBooth-style work does).

Aggregation: mean over the images of a prompt, then over the prompts of a concept, then over concepts; the gap is
TEA minus baseline on the same seeds. ``scores.csv`` (one row per image) holds everything the summary is computed
from, so :func:`write_summary` rebuilds ``summary.md``/``summary.csv``/``sweep.png`` from it alone.

Generated images follow the layout of ``tea_lightning.inference.generate``: ``<images>/<tag>/p000-i000.png`` with a
sidecar ``p000-i000.json``, ``tag`` = ``baseline`` or ``tea-rho{rho:g}-alpha{alpha:g}``. Missing images are
generated through :func:`generate_images` when a checkpoint is given; existing images and their scores are reused.

CLIP is run with transformers' ``CLIPModel`` directly, computing exactly what torchmetrics' ``CLIPScore`` computes
per image (the tests check the two agree): torchmetrics 1.9 fails on transformers 5, whose ``get_image_features``
returns an output object (Lightning-AI/torchmetrics#3407), and only loads hub ids containing "openai".
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from tqdm.auto import tqdm

from tea_lightning.data import read_image, require_image_paths
from tea_lightning.export import read_tea_json, write_bytes
from tea_lightning.prompt_sets import PROMPTS_DIR, EvalPrompt, fill, load_eval_csv

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dinov2-base"
DINO_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit")
METRICS = ("clip_t_full", "clip_t_concept", "clip_t_context", "clip_i", "dino_i")
METRIC_NAMES = {"clip_t_full": "CLIP-T full", "clip_t_concept": "CLIP-T concept", "clip_t_context": "CLIP-T context",
                "clip_i": "CLIP-I", "dino_i": "DINO-I"}
BASELINE = "baseline"
SCORE_COLUMNS = (
    "concept", "tag", "mode", "rho", "alpha", "prompt_index", "image_index", "seed", *METRICS,
    "image", "image_sha1", "template", "text_full", "text_concept", "text_context",
    "clip_model", "dino_model", "dino_pooling", "references",
    "scheduler", "steps", "guidance", "resolution", "base_model", "checkpoint", "level",
)
# A stored score is reused only when every one of these still matches (same pixels, texts, models and references).
_REUSE_KEYS = ("image_sha1", "text_full", "text_concept", "text_context", "clip_model", "dino_model", "dino_pooling",
               "references")
_SIDECAR_KEYS = ("template", "image_index", "seed", "mode")


def tea_tag(rho: float, alpha: float) -> str:
    """The output folder of one TEA setting, as `inference.generate` names it: ``tea-rho0.2-alpha0.5``."""
    return f"tea-rho{rho:g}-alpha{alpha:g}"


# ------------------------------------------------------------------------------------------------------ the scores


def _unit(features: torch.Tensor) -> torch.Tensor:
    return features.float() / features.float().norm(dim=-1, keepdim=True)


def clip_t(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP text-image score of each row pair, 100·max(cos, 0) (torchmetrics' ``CLIPScore`` for one image).

    Args:
        image_features: ``[N, D]`` CLIP image embeddings (any norm).
        text_features: ``[N, D]`` CLIP text embeddings, row i belonging to image i.
    """
    return 100 * (_unit(image_features) * _unit(text_features)).sum(-1).clamp(min=0)  # [N]


def image_alignment(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Image-image score of each row against a reference set: 100·cos, averaged over the references.

    Args:
        features: ``[N, D]`` embeddings of generated images.
        references: ``[R, D]`` embeddings of the reference images (R = 1 for the single-anchor mode).
    """
    return 100 * (_unit(features) @ _unit(references).T).mean(-1)  # [N]


def segment_texts(row: EvalPrompt, concept_word: str) -> tuple[str, str, str]:
    """The three texts CLIP-T scores an image against: full prompt, concept segment, context segment.

    The full prompt is the template filled with the concept word ("A photo of a man wearing glasses"), not the
    keyword the model learned, which CLIP's text encoder has never seen.
    """
    return fill(row.prompt, concept_word), fill(row.concept, concept_word), row.context


# ------------------------------------------------------------------------------------------------------- models


def _model_source(name_or_path: str, what: str, model_types: Sequence[str], example: str) -> str:
    """Check that `name_or_path` is a hub id or local folder of one of `model_types`, reading only its config."""
    from transformers import AutoConfig

    expanded = os.path.expanduser(name_or_path)
    fix = (f"give a hub id (e.g. {example!r}; downloaded once beforehand when working offline) or a local folder "
           f"written by save_pretrained")
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ValueError(f"{what}={name_or_path!r} is a folder without config.json, not a transformers model: "
                             f"{fix}")
        source = expanded
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"{what}={name_or_path!r}: no such model folder; {fix}")
    else:
        source = name_or_path
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:  # offline and not cached, a typo in a hub id, an unknown model type
        reason = str(error).rstrip(".")
        raise FileNotFoundError(f"Could not load {what}={name_or_path!r}: {reason}. {fix[0].upper()}{fix[1:]}") \
            from error
    if config.model_type not in model_types:
        raise ValueError(f"{what}={name_or_path!r} is a {config.model_type!r} model, not one of {list(model_types)}; "
                         f"{fix}")
    return source


def _image_processor(source: str):
    # The PIL backend whatever is installed: scores must not depend on whether torchvision happens to be present
    # (transformers 5 prefers torchvision's resize when it is), and PIL is what the authors' transformers 4 used.
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(source, backend="pil")
    return AutoImageProcessor.from_pretrained(source, use_fast=False)


def _projected(output: Any) -> torch.Tensor:
    """`get_*_features` returns a tensor in transformers 4 and an output object (projection in `pooler_output`) in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEncoder:
    """CLIP image and text embeddings (unit norm, fp32, on CPU), from a hub id or a local folder.

    Args:
        source: Hub id or folder, checked with `clip_source`.
        device: Where the model runs.
    """

    def __init__(self, source: str, device: torch.device) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.device = device
        self.model = CLIPModel.from_pretrained(source).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.processor = _image_processor(source)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The model's input for one image (resize, crop, normalise): ``[3, H, W]``."""
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``[N, D]`` of preprocessed images ``[N, 3, H, W]``."""
        return _unit(_projected(self.model.get_image_features(pixel_values=pixels.to(self.device)))).cpu()

    @torch.inference_mode()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _unit(_projected(self.model.get_text_features(**tokens))).cpu()  # [N, D]


class DinoEncoder:
    """DINO image embeddings (unit norm, fp32, on CPU): the mean of all output tokens, or the CLS token.

    Args:
        source: Hub id or folder, checked with `dino_source`.
        pooling: ``mean`` (all output tokens, as the TEA authors did with DINOv2) or ``cls`` (DreamBooth-style).
        device: Where the model runs.
    """

    def __init__(self, source: str, pooling: str, device: torch.device) -> None:
        from transformers import AutoModel

        self.device, self.pooling = device, pooling
        self.model = AutoModel.from_pretrained(source).to(device).eval()
        self.processor = _image_processor(source)

    pixels = ClipEncoder.pixels  # the same call on this model's own image processor

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``[N, D]`` of preprocessed images ``[N, 3, H, W]``."""
        tokens = self.model(pixel_values=pixels.to(self.device)).last_hidden_state  # [N, 1 + patches (+ regs), D]
        pooled = tokens.mean(1) if self.pooling == "mean" else tokens[:, 0]
        return _unit(pooled).cpu()


def clip_source(name_or_path: str) -> str:
    """Validate a CLIP model (hub id or local folder) from its config alone; return what `from_pretrained` takes."""
    return _model_source(name_or_path, "clip_model", ("clip",), DEFAULT_CLIP)


def dino_source(name_or_path: str) -> str:
    """Validate a DINO/ViT backbone (hub id or local folder) from its config alone."""
    return _model_source(name_or_path, "dino_model", DINO_MODEL_TYPES, DEFAULT_DINO)


def _prefetched(items: Sequence[Any], batch_size: int, prepare: Callable[[Any], Any], workers: int):
    """Yield `prepare(item)` results batch by batch, computed in `workers` threads up to two batches ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead: deque[list[Future]] = deque()
        for start in range(0, len(items), batch_size):
            ahead.append([pool.submit(prepare, item) for item in items[start:start + batch_size]])
            if len(ahead) > 2:
                yield [future.result() for future in ahead.popleft()]
        while ahead:
            yield [future.result() for future in ahead.popleft()]


def encode_images(paths: Sequence[Path], clip: ClipEncoder, dino: DinoEncoder, batch_size: int,
                  workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and DINO embeddings of image files, `batch_size` images per forward pass.

    Decoding and preprocessing (PIL, which releases the GIL) run in `workers` threads (default: the CPU count, at
    most 8) while the models work on the previous batch: on a GPU they, not the models, set the pace.

    Returns:
        ``([N, D_clip], [N, D_dino])`` unit vectors on the CPU.
    """
    def prepare(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_image(path)
        return clip.pixels(image), dino.pixels(image)

    workers = workers or min(8, os.cpu_count() or 1)
    clip_out, dino_out = [], []
    for batch in _prefetched(paths, batch_size, prepare, workers):
        clip_pixels, dino_pixels = (torch.stack(part) for part in zip(*batch, strict=True))  # [B, 3, H, W]
        clip_out.append(clip.embed(clip_pixels))
        dino_out.append(dino.embed(dino_pixels))
    return torch.cat(clip_out), torch.cat(dino_out)


# ------------------------------------------------------------------------------------------------- the concepts


@dataclass
class Concept:
    """One trained concept to evaluate.

    Args:
        references: Folder of the concept's reference (training) images.
        checkpoint: What `inference.generate` loads (export folder, ``.ckpt``, embedding file); needed only to
            generate missing images.
        images: Folder of generated images in the `inference.generate` layout (default ``<out>/images/<name>``).
        name: Name in the tables (default: the reference folder's name).
        concept_word: Word filling the templates for the CLIP-T texts ("man", "tortoise plushy"; default: the
            checkpoint's or the images' concept word).
        prompts: Evaluation CSV for this concept (default: the evaluation's ``prompts``).
        prompt_class: Rows of the CSV's ``class`` column to use (default: rows whose class is the concept word).
        anchor_image: Score CLIP-I/DINO-I against this one image (a path, or a file name inside `references`)
            instead of the mean over all references (the authors' single-anchor mode).
    """

    references: str
    checkpoint: str | None = None
    images: str | None = None
    name: str | None = None
    concept_word: str | None = None
    prompts: str | None = None
    prompt_class: str | None = None
    anchor_image: str | None = None


@dataclass
class _Plan:
    """A validated concept: where everything is and which CSV rows it is scored on."""

    name: str
    spec: Concept
    images: Path
    csv_path: Path
    csv_rows: list[EvalPrompt]
    references: list[Path]
    reference_label: str
    concept_word: str | None = None
    prompts: list[tuple[int, EvalPrompt]] = field(default_factory=list)  # (row index in the CSV, row)


def eval_csv_path(prompts: str) -> Path:
    """An evaluation CSV path, or a shipped set's name (``celeba``, ``customconcept101``)."""
    path = Path(prompts).expanduser()
    if path.is_file():
        return path
    shipped = PROMPTS_DIR / f"eval_{prompts}.csv"
    if shipped.is_file() and os.sep not in prompts:
        return shipped
    names = sorted(p.stem.removeprefix("eval_") for p in PROMPTS_DIR.glob("eval_*.csv"))
    raise FileNotFoundError(f"prompts={prompts!r} is neither a file nor a shipped evaluation set ({', '.join(names)}); "
                            f"give a CSV with the columns prompt, concept, context")


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _references(spec: Concept, name: str) -> tuple[list[Path], str]:
    """The reference images (all, or the anchor) and a label that changes whenever their content does."""
    folder = Path(spec.references).expanduser()
    fix = "Point references at the concept's training images."
    paths = require_image_paths(folder, f"Reference folder of concept {name!r}", missing_fix=fix, empty_fix=fix)
    if spec.anchor_image is not None:
        anchor = Path(spec.anchor_image).expanduser()
        anchor = anchor if anchor.is_file() else folder / spec.anchor_image
        if not anchor.is_file():
            raise FileNotFoundError(f"anchor_image={spec.anchor_image!r} of concept {name!r} is neither a file nor "
                                    f"an image in {str(folder)!r} (it holds {', '.join(p.name for p in paths[:5])}, …)")
        paths, label = [anchor], f"anchor {anchor.name}"
    else:
        label = f"mean of {len(paths)}"
    digest = hashlib.sha1("".join(_sha1(p) for p in paths).encode()).hexdigest()[:12]
    return paths, f"{label} ({digest})"


def _plan(spec: Concept, default_prompts: str | None, out: Path) -> _Plan:
    name = spec.name or Path(spec.references).expanduser().resolve().name
    prompts = spec.prompts or default_prompts
    if prompts is None:
        raise ValueError(f"concept {name!r} has no evaluation prompts: pass prompts (a CSV with the columns prompt, "
                         f"concept, context, or a shipped set: celeba, customconcept101)")
    csv_path = eval_csv_path(prompts)
    references, label = _references(spec, name)
    if spec.images is None and spec.checkpoint is None:
        raise ValueError(f"concept {name!r} has neither images (a folder written by infer.py) nor a checkpoint to "
                         f"generate them from; pass one of the two")
    images = Path(spec.images).expanduser() if spec.images is not None else out / "images" / name
    return _Plan(name, spec, images, csv_path, load_eval_csv(csv_path), references, label)


def _select_prompts(plan: _Plan, max_prompts: int | None) -> list[tuple[int, EvalPrompt]]:
    """The CSV rows of this concept: all rows, or those of its class when the CSV has a ``class`` column."""
    rows = list(enumerate(plan.csv_rows))
    classes = sorted({r.cls for _, r in rows if r.cls})
    if classes:
        wanted = plan.spec.prompt_class or plan.concept_word
        if wanted is None:
            raise ValueError(f"{plan.csv_path} holds prompts of the classes {classes}; pass prompt_class (or "
                             f"concept_word) to say which rows concept {plan.name!r} is scored on")
        rows = [(i, r) for i, r in rows if r.cls == wanted]
        if not rows:
            raise ValueError(f"{plan.csv_path} holds prompts of the classes {classes}, none of them "
                             f"{wanted!r} (concept {plan.name!r}); pass prompt_class with one of them")
    templates = [r.prompt for _, r in rows]
    duplicates = sorted({t for t in templates if templates.count(t) > 1})
    if duplicates:
        raise ValueError(f"{plan.csv_path}: the template(s) {duplicates} appear in several rows; images are matched "
                         f"to rows by template, so keep one row per template")
    return rows[:max_prompts] if max_prompts is not None else rows


def read_image_folder(folder: Path) -> list[tuple[Path, str, dict[str, Any]]]:
    """Every generated image with a sidecar under `folder`: ``(png path, tag, sidecar)``, sorted by path.

    An image whose PNG is missing (an interrupted write) is left out; a sidecar that is not the expected JSON is
    an error naming it.
    """
    found = []
    for sidecar in sorted(Path(folder).glob("*/p*-i*.json")):  # no folder yet: nothing found
        png = sidecar.with_suffix(".png")
        if not png.is_file():
            continue
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{sidecar}: not a JSON sidecar of a generated image ({error}); delete it and its PNG "
                             f"to have them generated again") from error
        missing = [k for k in _SIDECAR_KEYS if k not in meta]
        if missing:
            raise ValueError(f"{sidecar}: sidecar lacks {missing}; images must come from tea_lightning's infer.py "
                             f"(or hold these keys)")
        found.append((png, sidecar.parent.name, meta))
    return found


def _match(plan: _Plan, tags: list[str], num_images: int) -> tuple[dict, list[str]]:
    """Images for every (tag, prompt, image index) this concept needs, and what is missing or inconsistent."""
    by_template = {row.prompt: index for index, row in plan.prompts}
    found: dict[tuple[str, int, int], tuple[Path, dict]] = {}
    for png, tag, meta in read_image_folder(plan.images):
        index = by_template.get(meta["template"])
        if tag in tags and index is not None and int(meta["image_index"]) < num_images:
            found[(tag, index, int(meta["image_index"]))] = (png, meta)
    present = {tag for tag, _, _ in found}
    problems = [f"no images of the setting {tag!r} (folder {tag}/ missing or empty)" for tag in tags
                if tag not in present]
    for index, row in plan.prompts:
        counts = {tag: sum((tag, index, i) in found for i in range(num_images)) for tag in tags if tag in present}
        if any(c != num_images for c in counts.values()):
            listed = ", ".join(f"{tag} {count}" for tag, count in counts.items())
            kind = "baseline and TEA images of unequal count" if len(set(counts.values())) > 1 else "missing images"
            problems.append(f"prompt {index} ({row.prompt!r}): {kind} ({listed} of num_images={num_images})")
    return found, problems


def _check_seeds(plan: _Plan, found: dict) -> None:
    for (tag, index, image), (png, meta) in found.items():
        base = found.get((BASELINE, index, image))
        if tag != BASELINE and base is not None and int(base[1]["seed"]) != int(meta["seed"]):
            raise ValueError(f"concept {plan.name!r}: {png} has seed {meta['seed']} but its baseline {base[0]} has "
                             f"seed {base[1]['seed']}; TEA and baseline images must share their initial noise. "
                             f"Regenerate both with infer.py (compare=True)")


def generate_images(checkpoint: str, templates: list[str], folder: Path, *, rhos: Sequence[float],
                    alphas: Sequence[float], num_images: int, seed: int, **options: Any) -> None:
    """Write baseline and TEA images (same seeds) for `templates` into `folder` with `inference.generate`.

    The one place evaluation reaches into generation; `options` are passed on (pretrained, scheduler, steps,
    guidance, resolution, batch_size, device).
    """
    from tea_lightning.inference import generate  # lazily: scoring existing images needs no diffusion pipeline

    generate(checkpoint, templates, folder, rhos=tuple(rhos), alphas=tuple(alphas), compare=True,
             num_images=num_images, seed=seed, **options)


# ----------------------------------------------------------------------------------------------------- scores.csv


def read_scores(path: Path) -> list[dict[str, str]]:
    """Rows of a ``scores.csv`` as written by :func:`evaluate` (strings, as in the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; run the evaluation first")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("concept", "tag", "mode", "rho", "alpha", "prompt_index", "image_index", *METRICS)
                   if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a scores.csv of tea-lightning (missing columns {missing})")
        return list(reader)


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(buffer.getvalue().encode("utf-8"), path)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.7g}"
    return str(value)


# ----------------------------------------------------------------------------------------------------- summaries


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarize(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Means per prompt, per concept and overall, per setting, with gap rows (TEA minus baseline) after each TEA row.

    Mean over the images of a prompt, then over the prompts of a concept, then over concepts. Each ``*_std`` is
    the sample standard deviation of what that mean averaged: images for a prompt, prompts for a concept, concepts
    overall (prompts when there is one concept). ``n`` counts those items.
    """
    tags = list(dict.fromkeys(r["tag"] for r in sorted(rows, key=lambda r: r["mode"] != BASELINE)))
    setting = {r["tag"]: {"tag": r["tag"], "mode": r["mode"], "rho": r["rho"], "alpha": r["alpha"]} for r in rows}
    images: dict[tuple[str, int, str], list[dict[str, str]]] = {}  # (concept, prompt, tag) -> rows, in file order
    for r in rows:
        images.setdefault((r["concept"], int(r["prompt_index"]), r["tag"]), []).append(r)
    concepts = list(dict.fromkeys(c for c, _, _ in images))
    prompts = {c: sorted({p for c2, p, _ in images if c2 == c}) for c in concepts}

    def stats(level: str, concept: str, index: Any, tag: str, values: list[dict[str, float]], **extra: Any) -> dict:
        row = {"level": level, "concept": concept, "prompt_index": index, "template": "", **setting[tag],
               "n": len(values), **extra}
        for m in METRICS:
            row[m], row[f"{m}_std"] = _mean_std([v[m] for v in values])
        return row

    per_prompt = {key: stats("prompt", key[0], key[1], key[2], [{m: float(r[m]) for m in METRICS} for r in group],
                             template=group[0].get("template", ""))
                  for key, group in images.items()}
    per_concept = {(c, tag): stats("concept", c, "", tag, [per_prompt[(c, p, tag)] for p in prompts[c]
                                                            if (c, p, tag) in per_prompt])
                   for c in concepts for tag in tags if any((c, p, tag) in per_prompt for p in prompts[c])}
    overall = []
    for tag in tags:
        row = stats("overall", "", "", tag, [v for (_, t), v in per_concept.items() if t == tag])
        if len(concepts) == 1:  # one concept: the spread over its prompts says more than an undefined one
            row.update({f"{m}_std": per_concept[(concepts[0], tag)][f"{m}_std"] for m in METRICS})
        overall.append(row)
    ordered = [per_prompt[(c, p, t)] for c in concepts for p in prompts[c] for t in tags if (c, p, t) in per_prompt]
    ordered += [per_concept[(c, t)] for c in concepts for t in tags if (c, t) in per_concept]
    return _with_gaps(ordered + overall)


def _with_gaps(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert a gap row (TEA minus baseline, same level/concept/prompt) after each TEA row."""
    baseline = {(r["level"], r["concept"], r["prompt_index"]): r for r in summary if r["mode"] == BASELINE}
    out = []
    for row in summary:
        out.append(row)
        base = baseline.get((row["level"], row["concept"], row["prompt_index"]))
        if row["mode"] != BASELINE and base is not None:
            gap = {**row, "tag": f"gap {row['tag']}", "mode": "gap"}
            for metric in METRICS:
                gap[metric], gap[f"{metric}_std"] = row[metric] - base[metric], math.nan
            out.append(gap)
    return out


SUMMARY_COLUMNS = ("level", "concept", "prompt_index", "template", "tag", "mode", "rho", "alpha", "n",
                   *[c for m in METRICS for c in (m, f"{m}_std")])


def _setting_label(row: dict[str, Any]) -> str:
    if row["mode"] == BASELINE:
        return "baseline"
    label = f"TEA rho={float(row['rho']):g} alpha={float(row['alpha']):g}"
    return f"gap ({label} − baseline)" if row["mode"] == "gap" else label


def _table(rows: list[dict[str, Any]], lead: list[str], lead_values, with_std: bool = False) -> list[str]:
    head = [*lead, *(METRIC_NAMES[m] for m in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = []
        for m in METRICS:
            value = f"{row[m]:+.2f}" if row["mode"] == "gap" else f"{row[m]:.2f}"
            std = row[f"{m}_std"]
            cells.append(f"{value} ± {std:.2f}" if with_std and not math.isnan(std) else value)
        lines.append("| " + " | ".join([*lead_values(row), *cells]) + " |")
    return lines


def _unique(rows: list[dict[str, str]], column: str) -> str:
    values = list(dict.fromkeys(r.get(column, "") for r in rows if r.get(column, "")))
    return ", ".join(values) if values else "(not recorded)"


def _sweep_axis(tea: list[dict[str, Any]]) -> str | None:
    """``rho`` or ``alpha`` when the TEA settings sweep one of them (rho when both vary), else None."""
    if len(tea) < 2:
        return None
    rhos = {float(r["rho"]) for r in tea}
    return "rho" if len(rhos) > 1 else "alpha"


def plot_sweep(overall: list[dict[str, Any]], axis: str, path: Path) -> bool:
    """CLIP-T context and CLIP-I against the swept value (baseline dashed); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    other = "alpha" if axis == "rho" else "rho"
    tea = [r for r in overall if r["mode"] == "tea"]
    base = next((r for r in overall if r["mode"] == BASELINE), None)
    figure, panels = plt.subplots(1, 2, figsize=(9, 3.6))
    for panel, metric in zip(panels, ("clip_t_context", "clip_i"), strict=True):
        for value in sorted({float(r[other]) for r in tea}):
            line = sorted((float(r[axis]), r[metric]) for r in tea if float(r[other]) == value)
            panel.plot(*zip(*line, strict=True), marker="o", label=f"{other}={value:g}")
        if base is not None:
            panel.axhline(base[metric], linestyle="--", color="gray", label="baseline")
        panel.set_xlabel(axis)
        panel.set_ylabel(METRIC_NAMES[metric])
        panel.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_bytes(buffer.getvalue(), path)
    return True


def write_summary(scores_csv: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write ``summary.csv``, ``summary.md`` (and ``sweep.png`` with a rho or alpha sweep) from a ``scores.csv``.

    Everything is recomputed from the scores file alone, so the summary of any evaluation can be rebuilt.

    Args:
        scores_csv: The per-image scores.
        out: Folder for the summary files (default: the folder of `scores_csv`).

    Returns:
        The path of ``summary.md``.
    """
    rows = read_scores(Path(scores_csv))
    if not rows:
        raise ValueError(f"{scores_csv}: no scored images to summarise")
    out = Path(out) if out is not None else Path(scores_csv).parent
    summary = summarize(rows)
    _write_csv(out / "summary.csv", SUMMARY_COLUMNS, [{k: _cell(v) for k, v in r.items()} for r in summary])

    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    overall = [r for r in summary if r["level"] == "overall"]
    tea = [r for r in overall if r["mode"] == "tea"]
    seeds = {(r["concept"], r["prompt_index"], r["image_index"]): r["seed"] for r in rows}
    prompts = {(r["concept"], r["prompt_index"]) for r in rows}
    lines = [
        "# Evaluation summary", "",
        f"- CLIP: `{_unique(rows, 'clip_model')}`; CLIP-T = 100·max(cos, 0) against the full prompt (template filled "
        f"with the concept word), the concept segment and the context segment; CLIP-I = 100·cos to the references",
        f"- DINO: `{_unique(rows, 'dino_model')}`, {_unique(rows, 'dino_pooling')} pooling "
        f"({'mean of all output tokens' if _unique(rows, 'dino_pooling') == 'mean' else 'CLS token'}); "
        f"DINO-I = 100·cos to the references",
        f"- References: {_unique(rows, 'references')}",
        f"- Generation: base model `{_unique(rows, 'base_model')}`, checkpoint(s) `{_unique(rows, 'checkpoint')}`, "
        f"scheduler {_unique(rows, 'scheduler')}, {_unique(rows, 'steps')} steps, guidance "
        f"{_unique(rows, 'guidance')}, resolution {_unique(rows, 'resolution')}, TEA level {_unique(rows, 'level')}",
        "- Settings: " + "; ".join(_setting_label(r) for r in overall if r["mode"] != "gap"),
        f"- Seeds: {len(seeds)} (prompt, image) pairs with their own seed (`seed` column of scores.csv), shared by "
        f"the baseline and every TEA setting",
        f"- {len(concepts)} concept(s), {len(prompts)} prompt(s), {len(rows)} scored images; means over images, "
        f"then prompts, then concepts; ± is the sample standard deviation over "
        f"{'concepts' if len(concepts) > 1 else 'prompts'}",
        "", "## Overall" + (" (mean over concepts)" if len(concepts) > 1 else ""), "",
        *_table(overall, ["setting"], lambda r: [_setting_label(r)]),
    ]
    axis = _sweep_axis(tea)
    if axis is not None:
        other = "alpha" if axis == "rho" else "rho"
        lines += ["", f"## Sweep over {axis}", "",
                  *_table([r for r in overall if r["mode"] != "gap"], [axis, other],
                          lambda r: ["baseline", ""] if r["mode"] == BASELINE else
                          [f"{float(r[axis]):g}", f"{float(r[other]):g}"], with_std=True), ""]
        if plot_sweep(overall, axis, out / "sweep.png"):
            lines.append("![CLIP-T context and CLIP-I against the swept value](sweep.png)")
        else:
            lines.append("(plot skipped: matplotlib is not installed; `pip install tea-lightning[plots]`)")
    if len(concepts) > 1:
        lines += ["", "## Per concept", "",
                  *_table([r for r in summary if r["level"] == "concept"], ["concept", "setting"],
                          lambda r: [r["concept"], _setting_label(r)])]
    lines += ["", "## Per prompt", "",
              *_table([r for r in summary if r["level"] == "prompt"], ["concept", "prompt", "setting"],
                      lambda r: [r["concept"], f"{r['prompt_index']}: {r['template']}", _setting_label(r)])]
    path = out / "summary.md"
    write_bytes(("\n".join(lines) + "\n").encode("utf-8"), path)
    return path


# ---------------------------------------------------------------------------------------------------- evaluation


def _check_settings(rhos: Sequence[float], alphas: Sequence[float], num_images: int, batch_size: int,
                    max_prompts: int | None, dino_pooling: str) -> None:
    for name, values in (("rhos", rhos), ("alphas", alphas)):
        if not values:
            raise ValueError(f"{name} is empty; give at least one value in [0, 1] (the paper's default is "
                             f"{'0.2' if name == 'rhos' else '0.5'})")
        bad = [v for v in values if not 0 <= v <= 1]
        if bad:
            raise ValueError(f"{name}={list(values)}: {bad} outside [0, 1]; TEA's factors are fractions")
    if num_images < 1 or batch_size < 1 or (max_prompts is not None and max_prompts < 1):
        raise ValueError(f"num_images={num_images}, batch_size={batch_size}, max_prompts={max_prompts}: each must be "
                         f"1 or more")
    if dino_pooling not in ("mean", "cls"):
        raise ValueError(f"dino_pooling={dino_pooling!r}; use 'mean' (all output tokens) or 'cls'")


def evaluate(
    out: str,
    prompts: str | None = None,
    references: str | None = None,
    checkpoint: str | None = None,
    images: str | None = None,
    concept_word: str | None = None,
    prompt_class: str | None = None,
    anchor_image: str | None = None,
    concepts: list[Concept] | None = None,
    rhos: list[float] | None = None,
    alphas: list[float] | None = None,
    num_images: int = 4,
    max_prompts: int | None = None,
    seed: int = 0,
    clip_model: str = DEFAULT_CLIP,
    dino_model: str = DEFAULT_DINO,
    dino_pooling: Literal["mean", "cls"] = "mean",
    batch_size: int = 32,
    device: str | None = None,
    rescore: bool = False,
    pretrained: str | None = None,
    scheduler: str = "dpm",
    steps: int = 50,
    guidance: float = 7.0,
    resolution: int | None = None,
    generation_batch_size: int = 4,
) -> Path:
    """Score baseline and TEA images of one or more concepts and write scores.csv, summary.md and summary.csv.

    Images already in the `inference.generate` layout are reused; missing ones are generated from the checkpoint
    (baseline and TEA from the same seeds). Scores already in ``<out>/scores.csv`` for the same image, texts,
    models and references are reused, so an interrupted evaluation continues where it stopped.

    Args:
        out: Output folder (scores.csv, summary.md, summary.csv, sweep.png, and generated images under images/).
        prompts: Evaluation CSV (columns prompt, concept, context; optional class) or a shipped set name
            (``celeba``, ``customconcept101``).
        references: Folder of the concept's reference images (one concept; use `concepts` for several).
        checkpoint: What infer.py loads, to generate missing images (one concept).
        images: Folder of images already generated by infer.py (one concept; default ``<out>/images/<name>``).
        concept_word: Word filling the templates for CLIP-T (default: from the checkpoint or the images).
        prompt_class: Rows of the CSV's class column to use (default: the concept word's).
        anchor_image: Score image alignment against this one reference image instead of the mean over all.
        concepts: Several concepts (each with references, checkpoint/images, ...), aggregated as mean over concepts.
        rhos: TEA rotation factors to evaluate (default [0.2]); several make a sweep table and plot.
        alphas: TEA norm factors to evaluate (default [0.5]).
        num_images: Images per prompt and setting.
        max_prompts: Use only the first this many prompts of each concept (quick checks).
        seed: Base seed of generation (each image's seed derives from it, the prompt and image index).
        clip_model: CLIP hub id or local folder.
        dino_model: DINO/ViT hub id or local folder (``facebook/dinov2-base``, ``facebook/dino-vits16``).
        dino_pooling: ``mean`` of all output tokens (the TEA authors) or the ``cls`` token (DreamBooth-style).
        batch_size: Images per scoring forward pass.
        device: Scoring (and generation) device; default CUDA when present.
        rescore: Recompute every score even when scores.csv already holds it.
        pretrained: Base model for generation (default: the checkpoint's).
        scheduler: Generation scheduler (see infer.py).
        steps: Denoising steps.
        guidance: Classifier-free guidance scale.
        resolution: Generated image size (default: the model's).
        generation_batch_size: Images per generation batch.

    Returns:
        The path of summary.md.
    """
    out_dir = Path(out).expanduser()
    rhos = [0.2] if rhos is None else list(rhos)
    alphas = [0.5] if alphas is None else list(alphas)
    _check_settings(rhos, alphas, num_images, batch_size, max_prompts, dino_pooling)
    one = None if references is None else Concept(references, checkpoint=checkpoint, images=images,
                                                  concept_word=concept_word, prompt_class=prompt_class,
                                                  anchor_image=anchor_image)
    if concepts and one is not None:
        raise ValueError("pass either references (one concept) or concepts (several), not both")
    specs = list(concepts or ([] if one is None else [one]))
    if not specs:
        raise ValueError("nothing to evaluate: pass references (with checkpoint or images) or concepts")
    plans = [_plan(spec, prompts, out_dir) for spec in specs]
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ValueError(f"concept names {names} repeat; give each concept a distinct name")
    sources = clip_source(clip_model), dino_source(dino_model)
    tags = [BASELINE] + [tea_tag(r, a) for r in rhos for a in alphas]
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generation = dict(pretrained=pretrained, scheduler=scheduler, steps=steps, guidance=guidance,
                      resolution=resolution, batch_size=generation_batch_size, device=device)

    for plan in plans:  # every input checked before anything is generated or scored
        plan.concept_word = _known_concept_word(plan, [meta for _, _, meta in read_image_folder(plan.images)])
        plan.prompts = _select_prompts(plan, max_prompts)
        if plan.spec.checkpoint is None:
            _require_complete(plan, tags, num_images)
    work = []
    for plan in plans:
        if plan.spec.checkpoint is not None and _match(plan, tags, num_images)[1]:
            generate_images(plan.spec.checkpoint, [r.prompt for _, r in plan.prompts], plan.images, rhos=rhos,
                            alphas=alphas, num_images=num_images, seed=seed, **generation)
        found = _require_complete(plan, tags, num_images)
        plan.concept_word = plan.concept_word or _known_concept_word(plan, [meta for _, meta in found.values()])
        if plan.concept_word is None:
            raise ValueError(f"concept {plan.name!r}: no concept word in its checkpoint or images; pass concept_word "
                             f"(the word filling the CLIP-T texts, e.g. 'man')")
        work.append((plan, found))

    scores_path = out_dir / "scores.csv"
    previous = {} if rescore or not scores_path.is_file() else {
        (r["concept"], r["tag"], r["prompt_index"], r["image_index"]): r for r in read_scores(scores_path)}
    scorer = _Scorer(sources, dino_pooling, torch_device, batch_size)
    rows: list[dict[str, str]] = []
    for position, (plan, found) in enumerate(work):
        pending = {p.name for p, _ in work[position + 1:]}

        def save(pending: set[str] = pending) -> None:  # scored rows, plus stored rows of concepts still to come
            stored = [r for r in previous.values() if r["concept"] in pending]
            _write_csv(scores_path, SCORE_COLUMNS, [r for r in rows if "clip_i" in r] + stored)

        scorer.score_concept(plan, found, tags, out_dir, previous, rows, save)
        save()
    return write_summary(scores_path, out_dir)


def _require_complete(plan: _Plan, tags: list[str], num_images: int) -> dict:
    """The images of every (tag, prompt, image index), or an error saying what is missing or unpaired."""
    found, problems = _match(plan, tags, num_images)
    if problems:
        hint = ("Generation did not write them" if plan.spec.checkpoint is not None else
                "Pass checkpoint to generate them, or num_images/max_prompts/rhos/alphas matching the images")
        raise ValueError(f"concept {plan.name!r}, images in {str(plan.images)!r}: " + "; ".join(problems[:5])
                         + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "") + f". {hint}")
    _check_seeds(plan, found)
    return found


def _known_concept_word(plan: _Plan, sidecars: list[dict[str, Any]]) -> str | None:
    """The concept word: given, else the images' sidecars', else the checkpoint's tea.json; None when unknown."""
    if plan.spec.concept_word:
        return plan.spec.concept_word
    words = sorted({str(meta["concept_word"]) for meta in sidecars if meta.get("concept_word")})
    if len(words) > 1:
        raise ValueError(f"concept {plan.name!r}: the images disagree on the concept word ({words}); pass "
                         f"concept_word")
    if words:
        return words[0]
    checkpoint = Path(plan.spec.checkpoint).expanduser() if plan.spec.checkpoint else None
    if checkpoint is not None and (checkpoint / "tea.json").is_file():
        return read_tea_json(checkpoint).get("concept_word") or None
    return None


class _Scorer:
    """Scores images in chunks, loading the models only once something needs scoring."""

    chunk = 256  # images scored between two writes of scores.csv: what an interruption can cost

    def __init__(self, sources: tuple[str, str], pooling: str, device: torch.device, batch_size: int) -> None:
        self.sources, self.pooling, self.device, self.batch_size = sources, pooling, device, batch_size
        self.encoders: tuple[ClipEncoder, DinoEncoder] | None = None

    def score_concept(self, plan: _Plan, found: dict, tags: list[str], out: Path, previous: dict,
                      rows: list[dict[str, str]], save: Callable[[], None]) -> None:
        """Append the rows of scores.csv for one concept to `rows`, reusing stored rows whose inputs are unchanged;
        `save` is called after each chunk of newly scored images."""
        todo = []
        for tag in tags:
            for index, prompt in plan.prompts:
                for image in sorted(i for (t, p, i) in found if t == tag and p == index):
                    png, meta = found[(tag, index, image)]
                    row = self._row(plan, tag, index, prompt, png, meta, out)
                    stored = previous.get((plan.name, tag, row["prompt_index"], row["image_index"]))
                    if stored is not None and all(stored.get(k) == row[k] for k in _REUSE_KEYS):
                        row.update({m: stored[m] for m in METRICS})
                    else:
                        todo.append((row, png))
                    rows.append(row)
        if not todo:
            return
        if self.encoders is None:
            clip_name, dino_name = self.sources
            self.encoders = ClipEncoder(clip_name, self.device), DinoEncoder(dino_name, self.pooling, self.device)
        clip, dino = self.encoders
        ref_clip, ref_dino = encode_images(plan.references, clip, dino, self.batch_size)
        texts = sorted({row[k] for row, _ in todo for k in ("text_full", "text_concept", "text_context")})
        text_features = dict(zip(texts, clip.texts(texts), strict=True))
        with tqdm(total=len(todo), desc=f"scoring {plan.name}", unit="img") as bar:
            for start in range(0, len(todo), self.chunk):
                part = todo[start:start + self.chunk]
                image_clip, image_dino = encode_images([png for _, png in part], clip, dino, self.batch_size)
                scores = {"clip_i": image_alignment(image_clip, ref_clip),
                          "dino_i": image_alignment(image_dino, ref_dino)}
                for segment in ("full", "concept", "context"):
                    texts_of = torch.stack([text_features[row[f"text_{segment}"]] for row, _ in part])
                    scores[f"clip_t_{segment}"] = clip_t(image_clip, texts_of)
                for i, (row, _) in enumerate(part):
                    row.update({m: _cell(float(scores[m][i])) for m in METRICS})
                save()
                bar.update(len(part))

    def _row(self, plan: _Plan, tag: str, index: int, prompt: EvalPrompt, png: Path, meta: dict, out: Path) -> dict:
        full, concept, context = segment_texts(prompt, plan.concept_word)
        tea = tag != BASELINE
        row = {
            "concept": plan.name, "tag": tag, "mode": "tea" if tea else BASELINE,
            "rho": meta.get("rho") if tea else None, "alpha": meta.get("alpha") if tea else None,
            "prompt_index": index, "image_index": meta["image_index"],
            "seed": meta["seed"], "image": os.path.relpath(png, out), "image_sha1": _sha1(png),
            "template": prompt.prompt, "text_full": full, "text_concept": concept, "text_context": context,
            "clip_model": self.sources[0], "dino_model": self.sources[1], "dino_pooling": self.pooling,
            "references": plan.reference_label,
            **{k: meta.get(k) for k in ("scheduler", "steps", "guidance", "resolution", "base_model", "checkpoint",
                                        "level")},
        }
        return {k: _cell(v) for k, v in row.items()}
