"""Image metrics across training steps (the paper's Figure 3): every step-stamped export of a run, evaluated.

    python -m tea_lightning.step_metrics runs/ti/lightning_logs/version_0 --prompts celeba --references my_photos

For each `<run>/exports/step-NNNNNN/` (written by the `Export` callback) this runs `tea_lightning.evaluation.evaluate`
into `<out>/step-NNNNNN/` (baseline and TEA images from the same seeds, scores.csv, summary), then gathers the overall
rows of every step into `<out>/step_metrics.csv` (one row per step and setting: CLIP-T full/concept/context, CLIP-I,
DINO-I, and for TEA rows the gap's 95 % interval) and draws `step_metrics.png`: the five scores against the step,
baseline and TEA, beside the text-space drift of `<run>/drift/drift.csv` when the drift report was run. Every step
resumes where it stopped (evaluate reuses images and scores), so an interrupted command continues; new exports of a
run that trained on are added.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Literal

from tea_lightning import scoring
from tea_lightning.drift_measure import SETS_PREFIX, VECTOR_PREFIX, metric_key
from tea_lightning.evaluation import evaluate
from tea_lightning.export import step_exports, write_bytes, write_csv
from tea_lightning.summary import METRIC_NAMES, METRICS
from tea_lightning.user_errors import run_command

CSV_NAME, PLOT_NAME = "step_metrics.csv", "step_metrics.png"
COLUMNS = ("step", "tag", "mode", "rho", "alpha", *METRICS, *[f"{m}_{end}" for m in METRICS for end in ("low", "high")])
# The text-space drift drawn beside the scores: (prefix, key) of the drift report's columns, per text encoder.
DRIFT_CURVES = ((VECTOR_PREFIX, "norm_ratio"), (VECTOR_PREFIX, "cosine_concept"), (SETS_PREFIX, "inter_l2"),
                (SETS_PREFIX, "simple_l2"))


def step_metrics(run: str, prompts: str | None = None, references: str | None = None, out: str | None = None,
                 concept_word: str | None = None, prompt_class: str | None = None, anchor_image: str | None = None,
                 rhos: list[float] | None = None, alphas: list[float] | None = None, num_images: int = 4,
                 max_prompts: int | None = None, seed: int = 0, clip_model: str = scoring.DEFAULT_CLIP,
                 dino_model: str = scoring.DEFAULT_DINO, dino_pooling: Literal["mean", "cls"] = "mean",
                 device: str | None = None, steps: int = 50, guidance: float = 7.0, resolution: int | None = None,
                 every: int = 1, plots: bool = True) -> Path:
    """Evaluate every step-stamped export of a run; write step_metrics.csv and step_metrics.png.

    Args:
        run: The run folder (holding exports/step-NNNNNN/).
        prompts: Evaluation CSV or shipped set (celeba, customconcept101), as for evaluate.py (required).
        references: Folder of the concept's reference images (required).
        out: Output folder; default `<run>/step_metrics`.
        concept_word: Word filling the CLIP-T texts (default: the exports').
        prompt_class: Rows of the CSV's class column (default: the concept word's).
        anchor_image: Score image alignment against this one reference image.
        rhos: TEA rotation factors (default: the authors' for the method); [] is not allowed: TEA is compared.
        alphas: TEA norm factors (default [0.5]).
        num_images: Images per prompt, setting and step (the paper's Figure 3 used 100).
        max_prompts: Only the first this many prompts.
        seed: Base seed of generation: every step's images start from the same noise.
        clip_model: CLIP hub id or local folder.
        dino_model: DINO hub id or local folder.
        dino_pooling: mean or cls.
        device: Scoring and generation device.
        steps: Denoising steps.
        guidance: Classifier-free guidance scale.
        resolution: Image size (default: the model's).
        every: Evaluate every this-many-th export (1: all of them; the last is always included).
        plots: Draw step_metrics.png (needs matplotlib).

    Returns:
        The path of step_metrics.csv.
    """
    for name, value, what in (("prompts", prompts, "an evaluation CSV or a shipped set (celeba, customconcept101)"),
                              ("references", references, "the folder of the concept's training images")):
        if value is None:
            raise ValueError(f"{name} is missing; pass --{name}, {what}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r}: evaluate every n-th export, n a whole number of at least 1")
    exports = step_exports(run, "step_metrics")
    exports = [e for i, e in enumerate(exports) if i % every == 0 or i == len(exports) - 1]
    out_dir = Path(out) if out is not None else Path(run) / "step_metrics"
    rows = []
    for step, folder in exports:
        summary = evaluate(str(out_dir / f"step-{step:06d}"), prompts=prompts, references=references,
                           checkpoint=str(folder), images=str(out_dir / f"step-{step:06d}" / "images"),
                           concept_word=concept_word, prompt_class=prompt_class, anchor_image=anchor_image, rhos=rhos,
                           alphas=alphas, num_images=num_images, max_prompts=max_prompts, seed=seed,
                           clip_model=clip_model, dino_model=dino_model, dino_pooling=dino_pooling, device=device,
                           steps=steps, guidance=guidance, resolution=resolution)
        rows += [{"step": step, **row} for row in _overall_rows(summary.parent / "summary.csv")]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / CSV_NAME, COLUMNS, rows)
    if plots:
        plot(out_dir / CSV_NAME, out_dir / PLOT_NAME, Path(run) / "drift" / "drift.csv")
    return out_dir / CSV_NAME


def _overall_rows(summary_csv: Path) -> list[dict[str, str]]:
    """The overall rows of a summary.csv: baseline and each TEA setting, each TEA row with its gap's interval."""
    with summary_csv.open(newline="") as handle:
        overall = [r for r in csv.DictReader(handle) if r["level"] == "overall"]
    gaps = {r["tag"].removeprefix("gap "): r for r in overall if r["mode"] == "gap"}
    rows = []
    for row in (r for r in overall if r["mode"] != "gap"):
        gap = gaps.get(row["tag"], {})
        rows.append({**row, **{f"{m}_{end}": gap.get(f"{m}_{end}", "") for m in METRICS for end in ("low", "high")}})
    return rows


def drift_curves(drift_rows: list[dict[str, str]]) -> dict[str, list[tuple[int, float]]]:
    """The `DRIFT_CURVES` of a drift report's rows, each relative to its first value: column → [(step, value)].
    SDXL's report has a column per text encoder (`drift/clip_l/norm_ratio`, `drift/clip_g/norm_ratio`)."""
    header = drift_rows[0].keys() if drift_rows else ()
    count = 2 if metric_key(VECTOR_PREFIX, "norm_ratio", 1, 2) in header else 1
    curves = {}
    for e in range(count):
        for prefix, key in DRIFT_CURVES:
            column = metric_key(prefix, key, e, count)
            points = [(int(r["step"]), float(r[column])) for r in drift_rows if r.get(column)]
            if points:
                first = points[0][1] or 1.0
                curves[column] = [(step, value / first) for step, value in points]
    return curves


def plot(csv_path: Path, png: Path, drift_csv: Path | None = None) -> bool:
    """The five scores against the step (one line per setting) and, when `drift_csv` exists, the text-space drift
    curves of the same run beside them; False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    with Path(csv_path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    drift_rows = []
    if drift_csv is not None and Path(drift_csv).is_file():
        with Path(drift_csv).open(newline="") as handle:
            drift_rows = list(csv.DictReader(handle))
    figure = Figure(figsize=(12, 7), layout="constrained")
    axes = figure.subplots(2, 3).flatten()
    for axis, metric in zip(axes, METRICS, strict=False):
        for tag in dict.fromkeys(r["tag"] for r in rows):
            line = [(int(r["step"]), float(r[metric])) for r in rows if r["tag"] == tag]
            axis.plot(*zip(*line, strict=True), "o-" if tag != "baseline" else "s--", label=tag)
        axis.set_title(METRIC_NAMES[metric])
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    drift_axis = axes[5]
    for column, points in drift_curves(drift_rows).items():
        drift_axis.plot(*zip(*points, strict=True), label=column)
    drift_axis.set_title("text-space drift (relative to the first export)")
    if drift_rows:
        drift_axis.set_xlabel("step")
        drift_axis.grid(alpha=0.3)
        drift_axis.legend(fontsize=7)
    else:  # say what to run instead of drawing empty axes
        drift_axis.axis("off")
        drift_axis.text(0.5, 0.5, "no drift report for this run:\npython -m tea_lightning.drift_report RUN",
                        ha="center", va="center", fontsize=10, transform=drift_axis.transAxes)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes(buffer.getvalue(), png)
    return True


def main(args: list[str] | None = None) -> Any:
    """`python -m tea_lightning.step_metrics RUN`; a user error is one line and exit code 2."""
    from jsonargparse import auto_cli

    path = run_command(lambda argv: auto_cli(step_metrics, args=argv, as_positional=True, exit_on_error=False), args,
                       prog="-m tea_lightning.step_metrics")
    print(f"step_metrics: wrote {path}")
    return path


if __name__ == "__main__":
    main()
