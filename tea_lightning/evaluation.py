"""Evaluating trained concepts as the paper does (method.md §4): which images, generating the missing ones, the run.

A :class:`Concept` is checked into a plan before anything is generated or scored: its reference images, the rows of
its evaluation CSV and the folder of its generated images. Generated images follow the layout of
``tea_lightning.inference.generate``: ``<images>/<tag>/p000-i000.png`` with a sidecar ``p000-i000.json``, ``tag`` =
``baseline`` or ``tea-rho{rho:g}-alpha{alpha:g}``. Missing images are generated through :func:`generate_images` when
a checkpoint is given; existing images and their scores are reused.

:func:`evaluate` ties the parts together: the five scores of each image come from ``tea_lightning.scoring``,
``scores.csv`` and the summary tables from ``tea_lightning.summary``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from tea_lightning import scoring
from tea_lightning.devices import resolve_device
from tea_lightning.export import check_writable_folder, read_tea_json, remove_stale_temporaries
from tea_lightning.images import read_image, require_image_paths
from tea_lightning.prompt_sets import PROMPTS_DIR, EvalPrompt, load_eval_csv
from tea_lightning.summary import BASELINE, METRICS, format_cell, read_scores, write_scores, write_summary

# A stored score is reused only when every one of these still matches (same pixels, texts, models and references).
_REUSE_KEYS = ("image_sha1", "text_full", "text_concept", "text_context", "clip_model", "dino_model", "dino_pooling",
               "references")
_SIDECAR_KEYS = ("template", "image_index", "seed", "mode")


def tea_tag(rho: float, alpha: float) -> str:
    """The output folder of one TEA setting, as `inference.generate` names it: ``tea-rho0.2-alpha0.5``."""
    return f"tea-rho{rho:g}-alpha{alpha:g}"


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
        training_seed: The seed this concept's checkpoint was trained with, when the same concept is evaluated
            from several training runs (same name, one entry per seed): the summary averages over the seeds and
            its intervals resample them. Default images folder then ``<out>/images/<name>/seed-<training_seed>``.
    """

    references: str
    checkpoint: str | None = None
    images: str | None = None
    name: str | None = None
    concept_word: str | None = None
    prompts: str | None = None
    prompt_class: str | None = None
    anchor_image: str | None = None
    training_seed: int | None = None


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
    for path in paths:  # a corrupt reference is found now, not after every image has been generated
        read_image(path)
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
    if spec.checkpoint is not None and not Path(spec.checkpoint).expanduser().exists():
        raise FileNotFoundError(f"checkpoint={spec.checkpoint!r} of concept {name!r} does not exist; pass an export "
                                "folder (runs/…/exports/final) or a checkpoint file")
    default = out / "images" / name / ("" if spec.training_seed is None else f"seed-{spec.training_seed}")
    images = Path(spec.images).expanduser() if spec.images is not None else default
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
    clip_model: str = scoring.DEFAULT_CLIP,
    dino_model: str = scoring.DEFAULT_DINO,
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
    mode: Literal["auto", "token", "prompt"] = "auto",
    align: Literal["span", "position"] = "span",
    target_encoder: Literal["adapted", "base"] = "adapted",
    target: Literal["word", "modifier"] = "word",
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
        rhos: TEA rotation factors to evaluate; several make a sweep table and plot. Default: the authors' for each
            concept's method (0.1 for a DreamBooth LoRA checkpoint, 0.2 otherwise), or, for concepts given as
            images only, the rotation factors of the TEA images found.
        alphas: TEA norm factors to evaluate (default [0.5]).
        num_images: Images per prompt and setting. The default 4 keeps a first evaluation short; the paper used
            50 (pass 50 to reproduce its tables: 12.5 times the generation time).
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
        mode: TEA level of generation (see infer.py): auto (each keyword at its own level: token when it holds
            learned rows, else prompt), token or prompt. The authors applied TEA to Custom Diffusion at prompt
            level: mode prompt, target modifier, align position.
        align: Prompt level: span (true counterparts) or position (the authors').
        target_encoder: Prompt level: adapted (the authors') or base text encoder for the target prompt.
        target: Prompt level: word (concept word in the keyword's place) or modifier (only learned tokens replaced,
            the authors' Custom Diffusion).

    Returns:
        The path of summary.md.
    """
    out_dir = Path(out).expanduser()
    alphas = [0.5] if alphas is None else list(alphas)
    _check_settings([0.2] if rhos is None else rhos, alphas, num_images, batch_size, max_prompts, dino_pooling)
    check_writable_folder(out_dir, "out")
    torch_device = resolve_device(device)
    one = None if references is None else Concept(references, checkpoint=checkpoint, images=images,
                                                  concept_word=concept_word, prompt_class=prompt_class,
                                                  anchor_image=anchor_image)
    if concepts and one is not None:
        raise ValueError("pass either references (one concept) or concepts (several), not both")
    specs = list(concepts or ([] if one is None else [one]))
    if not specs:
        raise ValueError("nothing to evaluate: pass references (with checkpoint or images) or concepts")
    plans = [_plan(spec, prompts, out_dir) for spec in specs]
    names = [(p.name, p.spec.training_seed) for p in plans]
    if len(set(names)) != len(names):
        raise ValueError(f"concepts (name, training_seed) {names} repeat; give each concept a distinct name, or "
                         f"each run of the same concept its own training_seed")
    rhos = _default_rhos(plans) if rhos is None else list(rhos)
    sources = scoring.clip_source(clip_model), scoring.dino_source(dino_model)
    tags = [BASELINE] + [tea_tag(r, a) for r in rhos for a in alphas]
    generation = dict(pretrained=pretrained, scheduler=scheduler, steps=steps, guidance=guidance,
                      resolution=resolution, batch_size=generation_batch_size, device=device, mode=mode, align=align,
                      target_encoder=target_encoder, target=target)

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

    remove_stale_temporaries(out_dir, depth=0)  # a killed run's half-written scores.csv or summary
    scores_path = out_dir / "scores.csv"
    previous = {} if rescore or not scores_path.is_file() else {
        (r["concept"], r.get("training_seed", ""), r["tag"], r["prompt_index"], r["image_index"]): r
        for r in read_scores(scores_path)}
    scorer = _Scorer(sources, dino_pooling, torch_device, batch_size)
    rows: list[dict[str, str]] = []
    for position, (plan, found) in enumerate(work):
        pending = {(p.name, _seed_cell(p)) for p, _ in work[position + 1:]}

        def save(pending: set[tuple[str, str]] = pending) -> None:  # scored rows + stored rows of concepts to come
            stored = [r for r in previous.values() if (r["concept"], r.get("training_seed", "")) in pending]
            write_scores(scores_path, [r for r in rows if "clip_i" in r] + stored)

        scorer.score_concept(plan, found, tags, out_dir, previous, rows, save)
        save()
    return write_summary(scores_path, out_dir)


def _seed_cell(plan: _Plan) -> str:
    """The training seed as scores.csv writes it ('' when not given)."""
    return format_cell(plan.spec.training_seed)


def _default_rhos(plans: list[_Plan]) -> list[float]:
    """The authors' rotation factor of each concept's method (from its checkpoint), or those of its TEA images."""
    from tea_lightning import checkpoints  # lazily, like generation: scoring existing images needs no pipeline

    found: set[float] = set()
    for plan in plans:
        if plan.spec.checkpoint is not None:
            found.add(checkpoints.default_rho_of(plan.spec.checkpoint))
        else:
            found.update(float(meta["rho"]) for _, tag, meta in read_image_folder(plan.images)
                         if tag != BASELINE and meta.get("rho") is not None)
    return sorted(found) or [checkpoints.DEFAULT_RHO]


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
        self.encoders: tuple[scoring.ClipEncoder, scoring.DinoEncoder] | None = None

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
                    stored = previous.get((plan.name, row["training_seed"], tag, row["prompt_index"],
                                           row["image_index"]))
                    if stored is not None and all(stored.get(k) == row[k] for k in _REUSE_KEYS):
                        row.update({m: stored[m] for m in METRICS})
                    else:
                        todo.append((row, png))
                    rows.append(row)
        if not todo:
            return
        if self.encoders is None:
            clip_name, dino_name = self.sources
            self.encoders = (scoring.ClipEncoder(clip_name, self.device),
                             scoring.DinoEncoder(dino_name, self.pooling, self.device))
        clip, dino = self.encoders
        ref_clip, ref_dino = scoring.encode_images(plan.references, clip, dino, self.batch_size)
        texts = sorted({row[k] for row, _ in todo for k in ("text_full", "text_concept", "text_context")})
        text_features = dict(zip(texts, clip.texts(texts), strict=True))
        with tqdm(total=len(todo), desc=f"scoring {plan.name}", unit="img") as bar:
            for start in range(0, len(todo), self.chunk):
                part = todo[start:start + self.chunk]
                image_clip, image_dino = scoring.encode_images([png for _, png in part], clip, dino, self.batch_size)
                scores = {"clip_i": scoring.image_alignment(image_clip, ref_clip),
                          "dino_i": scoring.image_alignment(image_dino, ref_dino)}
                for segment in ("full", "concept", "context"):
                    texts_of = torch.stack([text_features[row[f"text_{segment}"]] for row, _ in part])
                    scores[f"clip_t_{segment}"] = scoring.clip_t(image_clip, texts_of)
                for i, (row, _) in enumerate(part):
                    row.update({m: format_cell(float(scores[m][i])) for m in METRICS})
                save()
                bar.update(len(part))

    def _row(self, plan: _Plan, tag: str, index: int, prompt: EvalPrompt, png: Path, meta: dict, out: Path) -> dict:
        full, concept, context = scoring.segment_texts(prompt, plan.concept_word)
        tea = tag != BASELINE
        row = {
            "concept": plan.name, "training_seed": plan.spec.training_seed, "tag": tag,
            "mode": "tea" if tea else BASELINE,
            "rho": meta.get("rho") if tea else None, "alpha": meta.get("alpha") if tea else None,
            "prompt_index": index, "image_index": meta["image_index"],
            "seed": meta["seed"], "image": os.path.relpath(png, out), "image_sha1": _sha1(png),
            "template": prompt.prompt, "text_full": full, "text_concept": concept, "text_context": context,
            "clip_model": self.sources[0], "dino_model": self.sources[1], "dino_pooling": self.pooling,
            "references": plan.reference_label,
            **{k: meta.get(k) for k in ("scheduler", "steps", "guidance", "resolution", "base_model", "checkpoint",
                                        "level")},
        }
        return {k: format_cell(v) for k, v in row.items()}
