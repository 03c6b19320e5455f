"""After training: the drift of every step-stamped export of a run, as `drift.csv` and PNG plots.

    python -m tea_lightning.drift_report runs/demo/lightning_logs/version_0

Reads `<run>/exports/step-NNNNNN/` (`tea.json` + `learned_embeds.safetensors`, written by the `Export` callback),
rebuilds the base model's tokenizer and text encoder from `tea.json`'s `base_model`, and for each step measures
what `EmbeddingDrift` and `ContextualDrift` log while training, with the same functions and the same column names
(`drift/norm`, `drift_sets/inter_l2`, ...): P(c) is encoded once, P(V*) and S(V*) once per step, in batches.
Writes `<run>/drift/drift.csv` (one row per step; no plotting library needed) and, with matplotlib installed
(`pip install tea-lightning[plots]`), `contextual_drift.png` (the paper's Figure 2), `vector_drift.png` and
`vocab_norms.png` (Figure 4). The CSV is rewritten after every step, so an interrupted report resumes where it
stopped. `cosine_initial` is measured against the earliest export (step 0 when the run exported it).

Token-level exports only (Textual Inversion, Custom Diffusion modifier tokens). DreamBooth LoRA exports change
the text encoder's weights instead; their prompt-level drift is logged during training by `ContextualDrift`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from tea_lightning import drift
from tea_lightning.components import resolve_pretrained
from tea_lightning.drift_measure import (
    SETS_PREFIX,
    VECTOR_PREFIX,
    contextual_templates,
    embedding_drift,
    encode_set,
    load_prompt_set,
    vocabulary_norms,
)
from tea_lightning.export import DIFFUSERS_TI, TEA_JSON, read_tea_json, write_bytes, write_json
from tea_lightning.prompt_sets import fill
from tea_lightning.tiny import TINY, tiny_pipeline
from tea_lightning.tokens import add_new_tokens, placeholder_tokens, single_token_id

_STEP_DIR = re.compile(r"^step-(\d+)$")
VECTOR_COLUMNS = ["norm", "concept_norm", "norm_ratio", "cosine_concept", "angle_concept_deg", "cosine_initial",
                  "norm_percentile"]
SET_COLUMNS = list(drift.SET_KEYS)
COLUMNS = ["step"] + [VECTOR_PREFIX + c for c in VECTOR_COLUMNS] + [SETS_PREFIX + c for c in SET_COLUMNS]
CSV_NAME, SETTINGS_NAME = "drift.csv", "drift.json"


@dataclass
class Export:
    """One step-stamped export folder of a token-level method."""

    step: int
    folder: Path
    vectors: dict[str, torch.Tensor]  # placeholder → [k, D]


def find_exports(run: Path) -> tuple[dict[str, Any], list[Export]]:
    """The run's step-stamped exports in step order, and the `tea.json` they share.

    Args:
        run: A run folder holding `exports/`, or the `exports/` folder itself.
    """
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist; pass a run folder such as "
                                "runs/demo/lightning_logs/version_0 (the one holding exports/)")
    exports_dir = run / "exports" if (run / "exports").is_dir() else run
    folders = sorted((int(m.group(1)), p) for p in exports_dir.iterdir()
                     if p.is_dir() and (m := _STEP_DIR.match(p.name)))
    if not folders:
        raise FileNotFoundError(
            f"no step-stamped exports (exports/step-NNNNNN/) under {str(run)!r}; drift_report reads the folders the "
            "Export callback writes every every_n_steps steps: train with tea_lightning.callbacks.Export("
            "every_n_steps=100) (as the shipped configs do) and pass that run's folder")
    meta: dict[str, Any] | None = None
    exports = []
    for step, folder in folders:
        tea = read_tea_json(folder)
        if not (folder / DIFFUSERS_TI).is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} has no {DIFFUSERS_TI} (method {tea.get('method')!r}): drift_report measures "
                "learned token vectors (Textual Inversion, Custom Diffusion). A DreamBooth LoRA run's prompt-level "
                "drift is logged while it trains, by the ContextualDrift callback")
        if meta is None:
            meta = tea
        for key in ("base_model", "keyword", "concept_word"):
            if tea.get(key) != meta.get(key):
                raise ValueError(f"{str(folder / TEA_JSON)!r} has {key}={tea.get(key)!r} but the earlier exports "
                                 f"have {meta.get(key)!r}: the folder mixes runs; keep one run's exports together")
        exports.append(Export(step, folder, load_file(folder / DIFFUSERS_TI)))
    if not meta.get("concept_word"):
        raise ValueError(f"{str(folders[0][1] / TEA_JSON)!r} names no concept_word, which the drift is measured "
                         "against; it was not written by a token-level method of tea-lightning")
    return meta, exports


def load_text_parts(base_model: str) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and text encoder of `base_model` (a hub id, a local diffusers folder or a built-in such as `tiny` or
    `mini`), nothing else."""
    source = resolve_pretrained(base_model)
    if source == TINY:
        pipe = tiny_pipeline()
        return pipe.tokenizer, pipe.text_encoder
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        return (CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
                CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32))
    except OSError as error:
        raise FileNotFoundError(f"could not load the tokenizer and text encoder of base_model={base_model!r} named "
                                f"in tea.json: {error}") from error


def _digest(templates: list[str]) -> str:
    return hashlib.sha256("\n".join(templates).encode()).hexdigest()[:16]


def _fingerprint(export: Export) -> str:
    """What an export's row is a function of besides the settings: its learned vectors."""
    return hashlib.sha256((export.folder / DIFFUSERS_TI).read_bytes()).hexdigest()[:16]


def _read_rows(out: Path, settings: dict[str, Any]) -> dict[int, dict[str, str]]:
    """Rows of an earlier report with the same settings whose export is unchanged (resume); nothing when the
    settings changed. A run folder trained again, on another base model or from another seed, is measured anew."""
    try:
        earlier = json.loads((out / SETTINGS_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    same = {k: v for k, v in earlier.items() if k != "exports"} == {k: v for k, v in settings.items() if k != "exports"}
    if not same or not (out / CSV_NAME).is_file():
        return {}
    unchanged = {int(step) for step, digest in earlier.get("exports", {}).items()
                 if settings["exports"].get(step) == digest}
    with (out / CSV_NAME).open(newline="") as handle:
        return {int(row["step"]): row for row in csv.DictReader(handle)
                if list(row) == COLUMNS and int(row["step"]) in unchanged}


def _write_rows(out: Path, rows: dict[int, dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    write_bytes(buffer.getvalue().encode(), out / CSV_NAME)


def drift_report(run: str, prompt_set: str | None = None, simple_set: str = "simple", hidden_state: str = "last",
                 batch_size: int = 64, temperature: float = 1.0, shrinkage: float = drift.DEFAULT_SHRINKAGE,
                 reproduce_authors: bool = False, device: str = "auto", out: str | None = None,
                 plots: bool = True) -> Path:
    """Measure the drift of every step-stamped export of a run; write drift.csv and PNG plots.

    Args:
        run: The run folder (holding `exports/step-NNNNNN/`), e.g. runs/demo/lightning_logs/version_0.
        prompt_set: Contextual set P: a shipped concept name or a file (one sentence per line, each with one `{}`).
            Default: the shipped set of the concept word in tea.json.
        simple_set: Simple set S: `simple` or a file.
        hidden_state: Sentence vector: `last` (the paper's), `eos`, `mean` or `flatten` (see ContextualDrift).
        batch_size: Sentences per text-encoder call.
        temperature: KL temperature tau.
        shrinkage: Mahalanobis covariance shrinkage lambda in [0, 1] (default 0.1, see docs/drift_metrics.md; 0 is
            the authors' pseudo-inverse).
        reproduce_authors: Score P(c) against P(V*) in inter_mahalanobis and inter_kl and cut simple_kl after the
            softmax, as the authors' code did.
        device: `auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ...
        out: Output folder; default `<run>/drift`.
        plots: Also draw the PNG plots (needs matplotlib: `pip install tea-lightning[plots]`).

    Returns:
        The output folder.
    """
    if hidden_state not in drift.HIDDEN_STATES:
        raise ValueError(f"hidden_state={hidden_state!r} does not exist; choose one of "
                         f"{', '.join(drift.HIDDEN_STATES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use 1 or more sentences per text-encoder call")
    drift.check_shrinkage(shrinkage)
    meta, exports = find_exports(Path(run))
    concept_word = meta["concept_word"]
    p_templates = contextual_templates(prompt_set, concept_word, "Pass --prompt_set")
    s_templates = load_prompt_set(simple_set, "simple_set")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    out_dir = Path(out) if out is not None else (Path(run) / "drift")
    if plots and not _have_matplotlib():
        plots = False
        print("drift_report: matplotlib is not installed, so only drift.csv is written; "
              "pip install tea-lightning[plots] for the PNG plots")

    settings = {"base_model": meta["base_model"], "keyword": meta["keyword"], "concept_word": concept_word,
                "first_step": exports[0].step, "prompt_set": _digest(p_templates), "simple_set": _digest(s_templates),
                "hidden_state": hidden_state, "temperature": float(temperature), "shrinkage": float(shrinkage),
                "reproduce_authors": bool(reproduce_authors),
                "exports": {str(e.step): _fingerprint(e) for e in exports}}
    rows: dict[int, dict[str, Any]] = _read_rows(out_dir, settings)
    todo = [e for e in exports if e.step not in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(settings, out_dir / SETTINGS_NAME)
    tokenizer, encoder = load_text_parts(meta["base_model"]) if todo or plots else (None, None)
    histogram = _histogram_inputs(meta, tokenizer, encoder) if plots else None  # before placeholders are added

    if todo:
        measure = _Measurer(meta, tokenizer, encoder, exports[0], p_templates, s_templates, hidden_state, batch_size,
                            dict(temperature=temperature, shrinkage=shrinkage, reproduce_authors=reproduce_authors),
                            device)
        for export in tqdm(todo, desc="drift", unit="export"):
            rows[export.step] = {"step": export.step, **measure(export)}
            _write_rows(out_dir, rows)  # after every step: an interrupted report resumes here
    else:
        _write_rows(out_dir, rows)
    if plots:
        plot_all(out_dir / CSV_NAME, out_dir, histogram)
    return out_dir


class _Measurer:
    """The base model's text encoder with the run's placeholder tokens, measuring one export at a time."""

    def __init__(self, meta: dict[str, Any], tokenizer: Any, encoder: torch.nn.Module, first: Export,
                 p_templates: list[str], s_templates: list[str], hidden_state: str, batch_size: int,
                 options: dict[str, Any], device: torch.device) -> None:
        self.tokenizer, self.encoder = tokenizer, encoder.to(device).eval().requires_grad_(False)
        self.hidden_state, self.batch_size, self.options = hidden_state, batch_size, options
        table = self.encoder.get_input_embeddings()
        self.vocab_norms = vocabulary_norms(tokenizer, self.encoder)
        concept_row = table.weight[single_token_id(tokenizer, meta["concept_word"], "tea.json concept_word")]
        self.concept_row = concept_row.detach().float()
        # Placeholder tokens as the training run wrote them into prompts ("<v> <v>_1" for two vectors).
        tokens = meta.get("tokens") or [t for name, v in first.vectors.items()
                                        for t in placeholder_tokens(name, len(v.reshape(-1, v.shape[-1])))]
        self.names = list(first.vectors)
        self.ids = add_new_tokens(tokenizer, tokens, "tea.json tokens")
        self.encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.initial = self._rows(first)
        if self.initial.shape != (len(self.ids), table.weight.shape[1]):
            raise ValueError(f"{str(first.folder / DIFFUSERS_TI)!r} holds {tuple(self.initial.shape)} vectors for "
                             f"tokens {tokens}; the base model's embeddings are {table.weight.shape[1]} wide")
        keyword = " ".join(tokens)
        self.sets = {}
        for name, templates, word in (("p_keyword", p_templates, keyword),
                                      ("p_concept", p_templates, meta["concept_word"]),
                                      ("s_keyword", s_templates, keyword)):
            prompts = [fill(t, word) for t in templates]
            self.sets[name] = (prompts, self._tokenize(prompts))
        self.p_concept = self._encode("p_concept")

    def _rows(self, export: Export) -> torch.Tensor:
        rows = [export.vectors[name].reshape(-1, export.vectors[name].shape[-1]) for name in self.names]
        return torch.cat(rows).float()  # [k, D]

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.encoder.device)

    @torch.no_grad()
    def _encode(self, name: str) -> torch.Tensor:
        prompts, ids = self.sets[name]
        return encode_set(lambda batch: self.encoder(self._tokenize(batch))[0], prompts, ids,
                          self.tokenizer.eos_token_id, self.hidden_state, self.batch_size)

    @torch.no_grad()
    def __call__(self, export: Export) -> dict[str, float]:
        vectors = self._rows(export)
        weight = self.encoder.get_input_embeddings().weight
        weight[self.ids] = vectors.to(weight.device, weight.dtype)
        concept_rows = self.concept_row.expand_as(vectors)
        values = {VECTOR_PREFIX + k: v for k, v in
                  embedding_drift(vectors, concept_rows, self.initial, self.vocab_norms).items()}
        distances = drift.contextual_distances(self._encode("p_keyword"), self.p_concept, self._encode("s_keyword"),
                                               **self.options)
        values.update({SETS_PREFIX + k: v for k, v in distances.items()})
        return values


def _histogram_inputs(meta: dict[str, Any], tokenizer: Any, encoder: torch.nn.Module) -> dict[str, Any]:
    """What the vocabulary-norm figure needs besides the CSV: the vocabulary's norms and the reference tokens'."""
    norms = vocabulary_norms(tokenizer, encoder)
    marks = {meta["concept_word"]: float(norms[single_token_id(tokenizer, meta["concept_word"])])}
    for name, token_id in (("<|startoftext|>", tokenizer.bos_token_id), ("<|endoftext|>", tokenizer.eos_token_id)):
        if token_id is not None and token_id < len(norms):
            marks[name] = float(norms[token_id])
    return {"vocab_norms": norms.numpy(), "marks": marks, "keyword": meta["keyword"]}


# ------------------------------------------------------------------------------------------------------- plots


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _read_csv(path: Path) -> dict[str, list[float]]:
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {column: [float(row[column]) for row in rows] for column in COLUMNS}


def _save(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_bytes(buffer.getvalue(), path)


def plot_all(csv_path: Path, out: Path, histogram: dict[str, Any]) -> list[Path]:
    """Draw `contextual_drift.png` (Figure 2), `vector_drift.png` and `vocab_norms.png` (Figure 4) from a drift.csv.

    Args:
        csv_path: The report's drift.csv.
        out: Folder for the PNGs.
        histogram: `vocab_norms` (array), `marks` ({label: norm} of reference tokens) and `keyword`.
    """
    from matplotlib import cm, colors
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    data, out = _read_csv(csv_path), Path(out)
    steps = data["step"]
    paths = [out / "contextual_drift.png", out / "vector_drift.png", out / "vocab_norms.png"]

    figure = Figure(figsize=(10, 12), layout="constrained")
    axes = figure.subplots(4, 2, sharex=True)
    for row, (metric, title) in enumerate((("l2", "L2"), ("hausdorff", "Hausdorff"), ("mahalanobis", "Mahalanobis"),
                                           ("kl", "KL"))):
        left, right = axes[row]
        left.plot(steps, data[f"{SETS_PREFIX}inter_{metric}"], "o-", label="inter d(P(V*), P(c))")
        intra = {"mahalanobis": "spread"}.get(metric, metric)  # the intra-set Mahalanobis is a constant
        if f"{SETS_PREFIX}intra_{intra}" in data:
            label = "intra spread of P(V*)" if intra == "spread" else "intra d(P(V*), P(V*))"
            left.plot(steps, data[f"{SETS_PREFIX}intra_{intra}"], "s--", label=label)
        right.plot(steps, data[f"{SETS_PREFIX}simple_{metric}"], "o-", color="tab:green", label="d(P(V*), S(V*))")
        left.set_ylabel(title)
        for axis in (left, right):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    axes[0][0].set_title("(a) inter-set and intra-set")
    axes[0][1].set_title("(b) contextual vs simple prompts")
    for axis in axes[-1]:
        axis.set_xlabel("step")
    figure.suptitle(f"Contextual drift of {histogram['keyword']}")
    _save(figure, paths[0])

    figure = Figure(figsize=(10, 7), layout="constrained")
    (ratio, cosines), (angle, percentile) = figure.subplots(2, 2, sharex=True)
    ratio.plot(steps, data[f"{VECTOR_PREFIX}norm_ratio"], "o-")
    ratio.set_ylabel("|V*| / |c|")
    cosines.plot(steps, data[f"{VECTOR_PREFIX}cosine_concept"], "o-", label="cosine to c")
    cosines.plot(steps, data[f"{VECTOR_PREFIX}cosine_initial"], "s--", label="cosine to initial V*")
    cosines.legend(fontsize=8)
    angle.plot(steps, data[f"{VECTOR_PREFIX}angle_concept_deg"], "o-")
    angle.set_ylabel("angle to c (degrees)")
    percentile.plot(steps, data[f"{VECTOR_PREFIX}norm_percentile"], "o-")
    percentile.set_ylabel("|V*| percentile among vocabulary norms")
    for axis in (ratio, cosines, angle, percentile):
        axis.grid(alpha=0.3)
    for axis in (angle, percentile):
        axis.set_xlabel("step")
    figure.suptitle(f"Vector drift of {histogram['keyword']}")
    _save(figure, paths[1])

    figure = Figure(figsize=(10, 5), layout="constrained")
    axis = figure.subplots()
    axis.hist(histogram["vocab_norms"], bins=100, color="0.65", log=True)
    scale = colors.Normalize(vmin=min(steps), vmax=max(max(steps), min(steps) + 1))
    for step, norm in zip(steps, data[f"{VECTOR_PREFIX}norm"], strict=True):
        axis.axvline(norm, color=cm.viridis(scale(step)), linewidth=1.5)
    for (label, norm), (colour, style) in zip(histogram["marks"].items(),
                                              (("tab:blue", "-"), ("tab:red", ":"), ("tab:red", "--")), strict=False):
        axis.axvline(norm, color=colour, linestyle=style, linewidth=1.5, label=label)
    figure.colorbar(cm.ScalarMappable(norm=scale, cmap="viridis"), ax=axis, label=f"step of |{histogram['keyword']}|")
    axis.set_xlabel("input-embedding norm")
    axis.set_ylabel("vocabulary tokens (log)")
    axis.legend(fontsize=8)
    axis.set_title(f"Vocabulary norms and |{histogram['keyword']}| over training")
    _save(figure, paths[2])
    return paths


def main() -> None:
    from jsonargparse import auto_cli

    print(f"drift_report: wrote {auto_cli(drift_report)}")


if __name__ == "__main__":
    main()
