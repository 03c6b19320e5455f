"""``scores.csv`` and what is computed from it alone: the means, the gaps, the tables and the sweep plot.

Aggregation: mean over the images of a prompt (of each training seed, then over training seeds), then over the
prompts of a concept, then over concepts; the gap is TEA minus baseline on the same seeds. Every gap row carries a
paired bootstrap 95 % interval (``tea_lightning.stats.paired_difference``) of each metric, ``<metric>_low`` and
``<metric>_high``, resampled the way the numbers were made (:func:`gap_interval`). ``scores.csv`` (one row per
image, written by ``tea_lightning.evaluation.evaluate``) holds everything the summary is computed from, so
:func:`write_summary` rebuilds ``summary.md``/``summary.csv``/``sweep.png`` from it alone, without loading a model.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from pathlib import Path
from typing import Any

from tea_lightning.export import write_bytes, write_csv
from tea_lightning.stats import Interval, paired_difference

METRICS = ("clip_t_full", "clip_t_concept", "clip_t_context", "clip_i", "dino_i")
METRIC_NAMES = {"clip_t_full": "CLIP-T full", "clip_t_concept": "CLIP-T concept", "clip_t_context": "CLIP-T context",
                "clip_i": "CLIP-I", "dino_i": "DINO-I"}
BASELINE = "baseline"
SCORE_COLUMNS = (
    "concept", "training_seed", "tag", "mode", "rho", "alpha", "prompt_index", "image_index", "seed", *METRICS,
    "image", "image_sha1", "template", "text_full", "text_concept", "text_context",
    "clip_model", "dino_model", "dino_pooling", "references",
    "scheduler", "steps", "guidance", "resolution", "base_model", "checkpoint", "level",
)
SUMMARY_COLUMNS = ("level", "concept", "prompt_index", "template", "tag", "mode", "rho", "alpha", "n",
                   *[c for m in METRICS for c in (m, f"{m}_std", f"{m}_low", f"{m}_high")])


# ----------------------------------------------------------------------------------------------------- scores.csv


def read_scores(path: Path) -> list[dict[str, str]]:
    """Rows of a ``scores.csv`` as written by ``tea_lightning.evaluation.evaluate`` (strings, as in the file)."""
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


def write_scores(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the rows of a ``scores.csv`` (its columns in the order of `SCORE_COLUMNS`) atomically."""
    write_csv(path, SCORE_COLUMNS, rows)


def format_cell(value: Any) -> str:
    """A value as a CSV cell: empty for None and NaN, floats to 7 significant digits."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.7g}"
    return str(value)


# ----------------------------------------------------------------------------------------------------- summaries


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def _seed(row: dict[str, str]) -> str:
    return row.get("training_seed") or ""


def _prompt_mean(group: list[dict[str, str]], metric: str) -> float:
    """Mean over the images of each training seed, then over training seeds (one seed: the mean over images)."""
    by_seed: dict[str, list[float]] = {}
    for r in group:
        by_seed.setdefault(_seed(r), []).append(float(r[metric]))
    return statistics.fmean(statistics.fmean(v) for v in by_seed.values())


def summarize(rows: list[dict[str, str]], resamples: int = 10_000) -> list[dict[str, Any]]:
    """Means per prompt, per concept and overall, per setting, with gap rows (TEA minus baseline) after each TEA row.

    Mean over the images of a prompt (per training seed, then over training seeds), then over the prompts of a
    concept, then over concepts. Each ``*_std`` is the sample standard deviation of what that mean averaged:
    images for a prompt, prompts for a concept, concepts overall (prompts when there is one concept); ``n`` counts
    those items. Gap rows hold the same for the paired differences and the interval ``*_low``, ``*_high`` of
    :func:`gap_interval`; other rows leave the interval empty.

    Args:
        rows: The rows of a ``scores.csv`` (`read_scores`).
        resamples: Bootstrap resamples of each interval.
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

    per_prompt = {}
    for key, group in images.items():
        row = stats("prompt", key[0], key[1], key[2], [{m: float(r[m]) for m in METRICS} for r in group],
                    template=group[0].get("template", ""))
        row.update({m: _prompt_mean(group, m) for m in METRICS})
        per_prompt[key] = row
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
    return _with_gaps(ordered + overall, _pairs(rows), resamples)


def _pairs(rows: list[dict[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """Per TEA tag, one record per image with a baseline of the same concept, training seed, prompt and index:
    the keys and each metric's difference (TEA minus baseline)."""
    key = lambda r: (r["concept"], _seed(r), int(r["prompt_index"]), int(r["image_index"]))  # noqa: E731
    baseline = {key(r): r for r in rows if r["mode"] == BASELINE}
    pairs: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        base = baseline.get(key(r))
        if r["mode"] != BASELINE and base is not None:
            concept, seed, prompt, _ = key(r)
            pairs.setdefault(r["tag"], []).append({"concept": concept, "seed": seed, "prompt": prompt,
                                                   **{m: float(r[m]) - float(base[m]) for m in METRICS}})
    return pairs


def gap_interval(pairs: list[dict[str, Any]], metric: str, level: str, concept: str = "", prompt: Any = "",
                 resamples: int = 10_000) -> Interval:
    """The paired bootstrap 95 % interval of a gap (TEA minus baseline), resampled as the gap was aggregated.

    - a prompt: the images' differences, clustered by training seed when there are several (else independent);
    - a concept: with several training seeds, each (seed, prompt)'s mean difference clustered by seed; with one,
      the images' differences clustered by prompt;
    - overall: with several concepts, each (concept, prompt)'s mean difference (over its seeds) clustered by
      concept; with one, as for that concept.

    The estimate is then the gap of the tables (mean over prompts, seeds and concepts as they are).

    Args:
        pairs: One record per image pair: ``concept``, ``seed`` (training seed), ``prompt`` and each metric's
            difference (`_pairs`).
        metric: One of `METRICS`.
        level: ``prompt``, ``concept`` or ``overall``.
        concept: The concept (prompt and concept levels).
        prompt: The prompt index (prompt level).
        resamples: Bootstrap resamples.
    """
    if level == "prompt":
        chosen = [p for p in pairs if p["concept"] == concept and p["prompt"] == int(prompt)]
        seeds = [p["seed"] for p in chosen]
        return paired_difference([p[metric] for p in chosen], [0.0] * len(chosen),
                                 seeds if len(set(seeds)) > 1 else None, resamples=resamples)
    concepts = list(dict.fromkeys(p["concept"] for p in pairs))
    if level == "overall" and len(concepts) > 1:
        units = _unit_means(pairs, metric, ("concept", "prompt"))
        return paired_difference(list(units.values()), [0.0] * len(units), [c for c, _ in units],
                                 resamples=resamples)
    chosen = [p for p in pairs if p["concept"] == (concept if level == "concept" else concepts[0])]
    if len({p["seed"] for p in chosen}) > 1:
        units = _unit_means(chosen, metric, ("seed", "prompt"))
        return paired_difference(list(units.values()), [0.0] * len(units), [s for s, _ in units],
                                 resamples=resamples)
    return paired_difference([p[metric] for p in chosen], [0.0] * len(chosen), [p["prompt"] for p in chosen],
                             resamples=resamples)


def _unit_means(pairs: list[dict[str, Any]], metric: str, by: tuple[str, str]) -> dict[tuple, float]:
    """Mean difference of each (by[0], by[1]) unit; a (concept, prompt) unit averages its seeds' means first."""
    cells: dict[tuple, dict[str, list[float]]] = {}
    for p in pairs:
        cells.setdefault((p[by[0]], p[by[1]]), {}).setdefault(p["seed"], []).append(p[metric])
    return {unit: statistics.fmean(statistics.fmean(v) for v in seeds.values()) for unit, seeds in cells.items()}


def _with_gaps(summary: list[dict[str, Any]], pairs: dict[str, list[dict[str, Any]]],
               resamples: int) -> list[dict[str, Any]]:
    """Insert a gap row (TEA minus baseline, same level/concept/prompt) after each TEA row, with its interval and
    the standard deviation of the paired differences it averaged."""
    baseline = {(r["level"], r["concept"], r["prompt_index"]): r for r in summary if r["mode"] == BASELINE}
    out = []
    for row in summary:
        out.append(row)
        base = baseline.get((row["level"], row["concept"], row["prompt_index"]))
        if row["mode"] == BASELINE or base is None or row["tag"] not in pairs:
            continue
        gap = {**row, "tag": f"gap {row['tag']}", "mode": "gap"}
        for metric in METRICS:
            gap[metric] = row[metric] - base[metric]
            interval = gap_interval(pairs[row["tag"]], metric, row["level"], row["concept"], row["prompt_index"],
                                    resamples)
            gap[f"{metric}_low"], gap[f"{metric}_high"] = interval.low, interval.high
            gap[f"{metric}_std"] = _gap_std(summary, baseline, row, metric, pairs[row["tag"]])
        out.append(gap)
    return out


def _gap_std(summary: list[dict[str, Any]], baseline: dict, row: dict[str, Any], metric: str,
             pairs: list[dict[str, Any]]) -> float:
    """Sample standard deviation of the differences a gap averaged: images (prompt), prompts (concept), concepts
    overall (prompts with one concept)."""
    level, concept = row["level"], row["concept"]
    if level == "prompt":
        values = [p[metric] for p in pairs if p["concept"] == concept and p["prompt"] == int(row["prompt_index"])]
    else:
        items = [r for r in summary if r["mode"] != BASELINE and r["tag"] == row["tag"] and (
            (r["level"] == "prompt" and r["concept"] == concept) if level == "concept" else r["level"] == "concept")]
        if level == "overall" and len(items) == 1:  # one concept: the spread over its prompts
            items = [r for r in summary if r["mode"] != BASELINE and r["tag"] == row["tag"] and r["level"] == "prompt"]
        values = [r[metric] - baseline[(r["level"], r["concept"], r["prompt_index"])][metric] for r in items
                  if (r["level"], r["concept"], r["prompt_index"]) in baseline]
    return statistics.stdev(values) if len(values) > 1 else math.nan


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
            value = f"{row[m]:+.2f} [{row[f'{m}_low']:+.2f}, {row[f'{m}_high']:+.2f}]" if row["mode"] == "gap" \
                else f"{row[m]:.2f}"
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
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, [{k: format_cell(v) for k, v in r.items()} for r in summary])

    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    overall = [r for r in summary if r["level"] == "overall"]
    tea = [r for r in overall if r["mode"] == "tea"]
    seeds = {(r["concept"], _seed(r), r["prompt_index"], r["image_index"]): r["seed"] for r in rows}
    seeds_trained = {_seed(r) for r in rows}
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
        f"- {len(concepts)} concept(s), {len(prompts)} prompt(s), {len(seeds_trained)} training seed(s), "
        f"{len(rows)} scored images; means over images, then "
        f"{'training seeds, then ' if len(seeds_trained) > 1 else ''}prompts, then concepts; ± is the sample "
        f"standard deviation over "
        f"{'concepts' if len(concepts) > 1 else 'prompts'}",
        "- Gaps (TEA − baseline, same seeds) carry a paired bootstrap 95 % interval [low, high] (10,000 resamples of "
        "the paired differences, clustered as they were averaged: by concept overall, by "
        f"{'training seed' if len(seeds_trained) > 1 else 'prompt'} within a concept; `tea_lightning.stats`)",
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

