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

SDXL runs (`learned_embeds.safetensors` + `learned_embeds_2.safetensors` per export) are measured on both text
encoders, each on its own, with the callbacks' keys (`drift/clip_l/norm`, `drift_sets/clip_g/inter_l2`, ...), and
plotted per encoder (`contextual_drift-clip_l.png`, ...).

Token-level exports only (Textual Inversion, Custom Diffusion modifier tokens). DreamBooth LoRA exports change
the text encoder's weights instead; their prompt-level drift is logged during training by `ContextualDrift`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from tqdm.auto import tqdm

from tea_lightning import drift
from tea_lightning.components import BUILT_IN_CODE, SDXL, load_pipeline, model_family, resolve_pretrained, text_parts
from tea_lightning.conditioning import SUFFIXES, encode, encoder_label, tokenize, widths
from tea_lightning.devices import resolve_device
from tea_lightning.drift_measure import (
    SETS_PREFIX,
    VECTOR_PREFIX,
    contextual_templates,
    embedding_drift,
    encode_set,
    load_prompt_set,
    metric_key,
    vocabulary_norms,
)
from tea_lightning.export import (
    DIFFUSERS_TI,
    DIFFUSERS_TI_FILES,
    TEA_JSON,
    read_tea_json,
    remove_stale_temporaries,
    step_exports,
    write_bytes,
    write_json,
)
from tea_lightning.prompt_sets import fill
from tea_lightning.tokens import add_token_rows, placeholder_tokens, single_token_id
from tea_lightning.user_errors import run_command

VECTOR_COLUMNS = ["norm", "concept_norm", "norm_ratio", "cosine_concept", "angle_concept_deg", "cosine_initial",
                  "norm_percentile"]
SET_COLUMNS = list(drift.SET_KEYS)


def columns(count: int) -> list[str]:
    """The CSV's columns for a model with `count` text encoders: the callbacks' metric keys, step first."""
    return (["step"] + [metric_key(VECTOR_PREFIX, c, e, count) for e in range(count) for c in VECTOR_COLUMNS]
            + [metric_key(SETS_PREFIX, c, e, count) for e in range(count) for c in SET_COLUMNS])


CSV_NAME, SETTINGS_NAME = "drift.csv", "drift.json"


@dataclass
class Export:
    """One step-stamped export folder of a token-level method."""

    step: int
    folder: Path
    vectors: list[dict[str, torch.Tensor]]  # per text encoder: placeholder → [k, D_e]


def find_exports(run: Path) -> tuple[dict[str, Any], list[Export]]:
    """The run's step-stamped exports in step order, and the `tea.json` they share.

    Args:
        run: A run folder holding `exports/`, or the `exports/` folder itself.
    """
    folders = step_exports(run, "drift_report")
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
        files = [folder / name for name in DIFFUSERS_TI_FILES if (folder / name).is_file()]
        exports.append(Export(step, folder, [load_file(path) for path in files]))
        if len(exports[-1].vectors) != len(exports[0].vectors):
            raise ValueError(f"{str(folder)!r} holds {len(files)} embedding file(s) but the earlier exports hold "
                             f"{len(exports[0].vectors)}: the folder mixes runs; keep one run's exports together")
    if not meta.get("concept_word"):
        raise ValueError(f"{str(folders[0][1] / TEA_JSON)!r} names no concept_word, which the drift is measured "
                         "against; it was not written by a token-level method of tea-lightning")
    return meta, exports


def load_text_parts(base_model: str) -> tuple[list, list[torch.nn.Module]]:
    """Tokenizers and text encoders of `base_model` (a hub id, a local diffusers folder or a built-in such as `tiny`,
    `tiny-sdxl` or `mini`), nothing else: one of each for SD 1.x/2.x, two for SDXL."""
    source = resolve_pretrained(base_model)
    if source in BUILT_IN_CODE:
        return text_parts(load_pipeline(source))
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    count = 2 if model_family(source) == SDXL else 1
    models = (CLIPTextModel, CLIPTextModelWithProjection)[:count]  # SDXL's second encoder has a projection
    try:
        return ([CLIPTokenizer.from_pretrained(source, subfolder=f"tokenizer{s}") for s in SUFFIXES[:count]],
                [m.from_pretrained(source, subfolder=f"text_encoder{s}", dtype=torch.float32)
                 for s, m in zip(SUFFIXES, models, strict=False)])
    except OSError as error:
        raise FileNotFoundError(f"could not load the tokenizer and text encoder of base_model={base_model!r} named "
                                f"in tea.json: {error}") from error


def _digest(templates: list[str]) -> str:
    return hashlib.sha256("\n".join(templates).encode()).hexdigest()[:16]


def _fingerprint(export: Export) -> str:
    """What an export's row is a function of besides the settings: its learned vectors."""
    files = DIFFUSERS_TI_FILES[:len(export.vectors)]
    return hashlib.sha256(b"".join((export.folder / name).read_bytes() for name in files)).hexdigest()[:16]


def _read_rows(out: Path, settings: dict[str, Any], names: list[str]) -> dict[int, dict[str, str]]:
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
                if list(row) == names and int(row["step"]) in unchanged}


def _write_rows(out: Path, rows: dict[int, dict[str, Any]], names: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    write_bytes(buffer.getvalue().encode(), out / CSV_NAME)


# The ContextualDrift settings a report takes from the run's config.yaml unless given, and their defaults.
TRAINED_WITH = {"prompt_set": None, "simple_set": "simple", "hidden_state": "last", "temperature": 1.0,
                "shrinkage": drift.DEFAULT_SHRINKAGE, "reproduce_authors": False}


def trained_with(run: Path) -> dict[str, Any]:
    """The settings of the `ContextualDrift` callback the run trained with, read from its `config.yaml` (the keys of
    `TRAINED_WITH` it sets); empty when the run has no config.yaml or trained without the callback."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{str(path)!r} is not valid YAML ({error}); pass --prompt_set and --simple_set, or restore "
                         "the config.yaml the run wrote") from error
    callbacks = ((config.get("trainer") or {}).get("callbacks") or []) if isinstance(config, dict) else []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith(".ContextualDrift"):
            args = callback.get("init_args") or {}
            return {key: args[key] for key in TRAINED_WITH if args.get(key) is not None}
    return {}


def drift_report(run: str, prompt_set: str | None = None, simple_set: str | None = None,
                 hidden_state: str | None = None, batch_size: int = 64, temperature: float | None = None,
                 shrinkage: float | None = None, reproduce_authors: bool | None = None, device: str = "auto",
                 out: str | None = None, plots: bool = True) -> Path:
    """Measure the drift of every step-stamped export of a run; write drift.csv and PNG plots.

    The prompt sets, sentence vector and temperature are those the run's `ContextualDrift` callback used (read from
    the run's config.yaml), so the report's numbers match what TensorBoard showed while training; an argument given
    here overrides them.

    Args:
        run: The run folder (holding `exports/step-NNNNNN/`), e.g. runs/demo/lightning_logs/version_0.
        prompt_set: Contextual set P: a shipped concept name or a file (one sentence per line, each with one `{}`).
            Default: the run's, else the shipped set of the concept word in tea.json.
        simple_set: Simple set S: `simple` or a file. Default: the run's, else `simple`.
        hidden_state: Sentence vector: `last` (the paper's), `eos`, `mean` or `flatten` (see ContextualDrift).
            Default: the run's, else `last`.
        batch_size: Sentences per text-encoder call.
        temperature: KL temperature tau. Default: the run's, else 1.0.
        shrinkage: Mahalanobis covariance shrinkage lambda in [0, 1] (default: the run's, else 0.1, see
            docs/drift_metrics.md; 0 is the authors' pseudo-inverse).
        reproduce_authors: Score P(c) against P(V*) in inter_mahalanobis and inter_kl and cut simple_kl after the
            softmax, as the authors' code did (default: the run's, else false).
        device: `auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ...
        out: Output folder; default `<run>/drift`.
        plots: Also draw the PNG plots (needs matplotlib: `pip install tea-lightning[plots]`).

    Returns:
        The output folder.
    """
    given = {"prompt_set": prompt_set, "simple_set": simple_set, "hidden_state": hidden_state,
             "temperature": temperature, "shrinkage": shrinkage, "reproduce_authors": reproduce_authors}
    from_run = {key: value for key, value in trained_with(Path(run)).items() if given[key] is None}
    chosen = {**TRAINED_WITH, **from_run, **{k: v for k, v in given.items() if v is not None}}
    prompt_set, simple_set = chosen["prompt_set"], chosen["simple_set"]
    hidden_state, temperature = chosen["hidden_state"], chosen["temperature"]
    shrinkage, reproduce_authors = chosen["shrinkage"], chosen["reproduce_authors"]
    if hidden_state not in drift.HIDDEN_STATES:
        raise ValueError(f"hidden_state={hidden_state!r} does not exist; choose one of "
                         f"{', '.join(drift.HIDDEN_STATES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use 1 or more sentences per text-encoder call")
    drift.check_shrinkage(shrinkage)
    meta, exports = find_exports(Path(run))
    concept_word = meta["concept_word"]
    try:
        p_templates = contextual_templates(prompt_set, concept_word, "Pass --prompt_set")
        s_templates = load_prompt_set(simple_set, "simple_set")
    except (ValueError, FileNotFoundError) as error:
        if not {"prompt_set", "simple_set"} & from_run.keys():
            raise
        raise ValueError(f"{error} (the set was read from {str(Path(run) / 'config.yaml')!r}: run the report from the "
                         "folder training ran in, or pass --prompt_set and --simple_set)") from error
    device = resolve_device(device)
    out_dir = Path(out) if out is not None else (Path(run) / "drift")
    if from_run:
        print("drift_report: as the run trained, from its config.yaml: "
              + ", ".join(f"{key}={value!r}" for key, value in from_run.items()))
    if plots and not _have_matplotlib():
        plots = False
        print("drift_report: matplotlib is not installed, so only drift.csv is written; "
              "pip install tea-lightning[plots] for the PNG plots")

    settings = {"base_model": meta["base_model"], "keyword": meta["keyword"], "concept_word": concept_word,
                "first_step": exports[0].step, "prompt_set": _digest(p_templates), "simple_set": _digest(s_templates),
                "hidden_state": hidden_state, "temperature": float(temperature), "shrinkage": float(shrinkage),
                "reproduce_authors": bool(reproduce_authors),
                "exports": {str(e.step): _fingerprint(e) for e in exports}}
    remove_stale_temporaries(out_dir, depth=0)  # a killed report's half-written CSV or plot
    count = len(exports[0].vectors)  # text encoders: one embedding file each
    names = columns(count)
    rows: dict[int, dict[str, Any]] = _read_rows(out_dir, settings, names)
    todo = [e for e in exports if e.step not in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(settings, out_dir / SETTINGS_NAME)
    tokenizers, encoders = load_text_parts(meta["base_model"]) if todo or plots else ([], [])
    if (todo or plots) and len(encoders) != count:
        raise ValueError(f"the run's exports hold {count} embedding file(s) but base_model={meta['base_model']!r} "
                         f"has {len(encoders)} text encoder(s): tea.json names another base model than the run used")
    # Before placeholders are added: the vocabulary the figure shows is the base model's.
    histograms = [_histogram_inputs(meta, t, e) for t, e in zip(tokenizers, encoders, strict=True)] if plots else []

    if todo:
        measure = _Measurer(meta, tokenizers, encoders, exports[0], p_templates, s_templates, hidden_state,
                            batch_size, dict(temperature=temperature, shrinkage=shrinkage,
                                             reproduce_authors=reproduce_authors), device)
        for export in tqdm(todo, desc="drift", unit="export"):
            rows[export.step] = {"step": export.step, **measure(export)}
            _write_rows(out_dir, rows, names)  # after every step: an interrupted report resumes here
    else:
        _write_rows(out_dir, rows, names)
    for e, histogram in enumerate(histograms):
        plot_all(out_dir / CSV_NAME, out_dir, histogram, e, count)
    return out_dir


class _Measurer:
    """The base model's text encoders with the run's placeholder tokens, measuring one export at a time."""

    def __init__(self, meta: dict[str, Any], tokenizers: list, encoders: list[torch.nn.Module], first: Export,
                 p_templates: list[str], s_templates: list[str], hidden_state: str, batch_size: int,
                 options: dict[str, Any], device: torch.device) -> None:
        self.tokenizers = tokenizers
        self.encoders = [e.to(device).eval().requires_grad_(False) for e in encoders]
        self.hidden_state, self.batch_size, self.options = hidden_state, batch_size, options
        self.vocab_norms = [vocabulary_norms(t, e) for t, e in zip(tokenizers, self.encoders, strict=True)]
        self.concept_rows = [e.get_input_embeddings().weight[single_token_id(t, meta["concept_word"],
                                                                             "tea.json concept_word")].detach().float()
                             for t, e in zip(tokenizers, self.encoders, strict=True)]
        # Placeholder tokens as the training run wrote them into prompts ("<v> <v>_1" for two vectors).
        tokens = meta.get("tokens") or [t for name, v in first.vectors[0].items()
                                        for t in placeholder_tokens(name, len(v.reshape(-1, v.shape[-1])))]
        self.names = list(first.vectors[0])
        self.ids = [add_token_rows(t, e, tokens, "tea.json tokens") for t, e in zip(tokenizers, self.encoders,
                                                                                 strict=True)]
        self.initial = self._rows(first)
        for e, (initial, encoder) in enumerate(zip(self.initial, self.encoders, strict=True)):
            width = encoder.get_input_embeddings().weight.shape[1]
            if initial.shape != (len(tokens), width):
                raise ValueError(f"{str(first.folder / DIFFUSERS_TI_FILES[e])!r} holds {tuple(initial.shape)} vectors "
                                 f"for tokens {tokens}; the base model's embeddings are {width} wide")
        keyword = " ".join(tokens)
        self.sets = {}
        for name, templates, word in (("p_keyword", p_templates, keyword),
                                      ("p_concept", p_templates, meta["concept_word"]),
                                      ("s_keyword", s_templates, keyword)):
            prompts = [fill(t, word) for t in templates]
            self.sets[name] = (prompts, tokenize(tokenizers[0], prompts))
        self.p_concept = self._encode("p_concept")

    def _rows(self, export: Export) -> list[torch.Tensor]:
        """The learned rows `[k, D_e]` of each text encoder."""
        return [torch.cat([v[name].reshape(-1, v[name].shape[-1]) for name in self.names]).float()
                for v in export.vectors]

    @torch.no_grad()
    def _encode(self, name: str) -> list[torch.Tensor]:
        prompts, ids = self.sets[name]

        def states(batch: list[str]) -> torch.Tensor:
            return encode(self.tokenizers, self.encoders, batch).states

        return encode_set(states, prompts, ids, self.tokenizers[0].eos_token_id, self.hidden_state, self.batch_size,
                          widths(self.encoders))

    @torch.no_grad()
    def __call__(self, export: Export) -> dict[str, float]:
        count, values = len(self.encoders), {}
        for e, (vectors, encoder) in enumerate(zip(self._rows(export), self.encoders, strict=True)):
            weight = encoder.get_input_embeddings().weight
            weight[self.ids[e]] = vectors.to(weight.device, weight.dtype)
            measured = embedding_drift(vectors, self.concept_rows[e].expand_as(vectors), self.initial[e],
                                       self.vocab_norms[e])
            values.update({metric_key(VECTOR_PREFIX, k, e, count): v for k, v in measured.items()})
        p_keyword, s_keyword = self._encode("p_keyword"), self._encode("s_keyword")
        for e in range(count):
            distances = drift.contextual_distances(p_keyword[e], self.p_concept[e], s_keyword[e], **self.options)
            values.update({metric_key(SETS_PREFIX, k, e, count): v for k, v in distances.items()})
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
    return {column: [float(row[column]) for row in rows] for column in rows[0]} if rows else {}


def _save(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_bytes(buffer.getvalue(), path)


def plot_all(csv_path: Path, out: Path, histogram: dict[str, Any], encoder: int = 0, count: int = 1) -> list[Path]:
    """Draw `contextual_drift.png` (Figure 2), `vector_drift.png` and `vocab_norms.png` (Figure 4) from a drift.csv,
    for text encoder `encoder` of `count` (SDXL: one set per encoder, named `contextual_drift-clip_l.png`, ...).

    Args:
        csv_path: The report's drift.csv.
        out: Folder for the PNGs.
        histogram: `vocab_norms` (array), `marks` ({label: norm} of reference tokens) and `keyword`.
        encoder: Which text encoder's columns to draw.
        count: How many text encoders the run has.
    """
    from matplotlib import cm, colors
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    data, out = _read_csv(csv_path), Path(out)
    name = encoder_label(encoder, count)

    def key(prefix: str, name: str) -> str:
        return metric_key(prefix, name, encoder, count)

    steps = data["step"]
    tail = f"-{name}.png" if name else ".png"
    paths = [out / f"contextual_drift{tail}", out / f"vector_drift{tail}", out / f"vocab_norms{tail}"]
    keyword = f"{histogram['keyword']} ({name})" if name else histogram["keyword"]

    figure = Figure(figsize=(10, 12), layout="constrained")
    axes = figure.subplots(4, 2, sharex=True)
    for row, (metric, title) in enumerate((("l2", "L2"), ("hausdorff", "Hausdorff"), ("mahalanobis", "Mahalanobis"),
                                           ("kl", "KL"))):
        left, right = axes[row]
        left.plot(steps, data[key(SETS_PREFIX, f"inter_{metric}")], "o-", label="inter d(P(V*), P(c))")
        intra = {"mahalanobis": "spread"}.get(metric, metric)  # the intra-set Mahalanobis is a constant
        if key(SETS_PREFIX, f"intra_{intra}") in data:
            label = "intra spread of P(V*)" if intra == "spread" else "intra d(P(V*), P(V*))"
            left.plot(steps, data[key(SETS_PREFIX, f"intra_{intra}")], "s--", label=label)
        right.plot(steps, data[key(SETS_PREFIX, f"simple_{metric}")], "o-", color="tab:green",
                   label="d(P(V*), S(V*))")
        left.set_ylabel(title)
        for axis in (left, right):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    axes[0][0].set_title("(a) inter-set and intra-set")
    axes[0][1].set_title("(b) contextual vs simple prompts")
    for axis in axes[-1]:
        axis.set_xlabel("step")
    figure.suptitle(f"Contextual drift of {keyword}")
    _save(figure, paths[0])

    figure = Figure(figsize=(10, 7), layout="constrained")
    (ratio, cosines), (angle, percentile) = figure.subplots(2, 2, sharex=True)
    ratio.plot(steps, data[key(VECTOR_PREFIX, "norm_ratio")], "o-")
    ratio.set_ylabel("|V*| / |c|")
    cosines.plot(steps, data[key(VECTOR_PREFIX, "cosine_concept")], "o-", label="cosine to c")
    cosines.plot(steps, data[key(VECTOR_PREFIX, "cosine_initial")], "s--", label="cosine to initial V*")
    cosines.legend(fontsize=8)
    angle.plot(steps, data[key(VECTOR_PREFIX, "angle_concept_deg")], "o-")
    angle.set_ylabel("angle to c (degrees)")
    percentile.plot(steps, data[key(VECTOR_PREFIX, "norm_percentile")], "o-")
    percentile.set_ylabel("|V*| percentile among vocabulary norms")
    for axis in (ratio, cosines, angle, percentile):
        axis.grid(alpha=0.3)
    for axis in (angle, percentile):
        axis.set_xlabel("step")
    figure.suptitle(f"Vector drift of {keyword}")
    _save(figure, paths[1])

    figure = Figure(figsize=(10, 5), layout="constrained")
    axis = figure.subplots()
    axis.hist(histogram["vocab_norms"], bins=100, color="0.65", log=True)
    scale = colors.Normalize(vmin=min(steps), vmax=max(max(steps), min(steps) + 1))
    for step, norm in zip(steps, data[key(VECTOR_PREFIX, "norm")], strict=True):
        axis.axvline(norm, color=cm.viridis(scale(step)), linewidth=1.5)
    for (label, norm), (colour, style) in zip(histogram["marks"].items(),
                                              (("tab:blue", "-"), ("tab:red", ":"), ("tab:red", "--")), strict=False):
        axis.axvline(norm, color=colour, linestyle=style, linewidth=1.5, label=label)
    figure.colorbar(cm.ScalarMappable(norm=scale, cmap="viridis"), ax=axis, label=f"step of |{keyword}|")
    axis.set_xlabel("input-embedding norm")
    axis.set_ylabel("vocabulary tokens (log)")
    axis.legend(fontsize=8)
    axis.set_title(f"Vocabulary norms and |{keyword}| over training")
    _save(figure, paths[2])
    return paths


def main(args: list[str] | None = None) -> Path:
    """`python -m tea_lightning.drift_report RUN`; a user error is one line and exit code 2."""
    from jsonargparse import auto_cli

    out = run_command(lambda argv: auto_cli(drift_report, args=argv, exit_on_error=False), args,
                      prog="-m tea_lightning.drift_report")
    print(f"drift_report: wrote {out}")
    return out


if __name__ == "__main__":
    main()
