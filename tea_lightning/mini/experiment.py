"""The paper's story in miniature, measured offline on the `mini` world: one command, one report.

    python -m tea_lightning.mini.experiment --out docs/mini_experiment          # full run (CPU, tens of minutes)
    python -m tea_lightning.mini.experiment --out /tmp/ci --size ci             # a few minutes at most

It trains Textual Inversion of the pink star (`examples/pink_star/`, a concept the world never saw) on `mini`,
exporting the learned vector every few steps, and for each export measures

- with the drift report (`tea_lightning.drift_report`), the vector drift of the keyword against its concept word
  ``star`` (the paper's Figure 4: norm, norm ratio, cosine and angle, cosine to its start, norm percentile among the
  vocabulary) and the contextual set distances (Figure 2: d(P(V*), P(c)), d(P(V*), P(V*)), d(P(V*), S(V*)), one
  vector per sentence, the last position) with the world's own prompt sets (`tea_lightning/prompts/mini/`);
- by the readout (`tea_lightning.mini.readout`), on images of the evaluation prompts (`prompts/mini/eval_pink_star.csv`)
  made through `tea_lightning.inference.generate`, without TEA and with TEA at rho=0.2, alpha=0.5: **context
  accuracy** (the share of images showing every requested background and second object), **concept
  fidelity** (the share showing a pink star) and **concept colour** (the share showing anything pink);

and finally sweeps TEA's rho and alpha at the last step (Table 1). It writes into `--out`:

- `curves.csv` (one row per export step; columns in `CURVE_COLUMNS`: the drift report's `drift/...` and
  `drift_sets/...` columns, then the readout's) and `sweep.csv` (one row per (rho, alpha), baseline first; columns
  in `SWEEP_COLUMNS`);
- `drift/` (the drift report: `drift.csv`, `contextual_drift.png` = Figure 2, `vector_drift.png` and
  `vocab_norms.png` = Figure 4), `context_and_fidelity.png`, `sweep.png`;
- `grid.png`: baseline against TEA images of the last step, and `summary.md` with the numbers.

Everything is seeded: the same command writes the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from PIL import Image

from tea_lightning.callbacks import Export, StepProgressBar
from tea_lightning.data import ConceptDataModule
from tea_lightning.drift_report import COLUMNS as DRIFT_COLUMNS
from tea_lightning.drift_report import drift_report
from tea_lightning.inference import generate
from tea_lightning.mini.readout import load_readout, pil_batch, read
from tea_lightning.mini.scenes import COLOUR_NAMES, CONCEPT, SHAPES
from tea_lightning.prompt_sets import PROMPTS_DIR, load_eval_csv
from tea_lightning.textual_inversion import TextualInversion

ROOT = Path(__file__).resolve().parents[2]
CONCEPT_IMAGES = ROOT / "examples" / "pink_star"
KEYWORD, CONCEPT_WORD = "<pink-star>", "star"
MINI_PROMPTS = PROMPTS_DIR / "mini"

READOUT_COLUMNS = ("context_baseline", "fidelity_baseline", "colour_baseline", "context_tea", "fidelity_tea",
                   "colour_tea")
CURVE_COLUMNS = (*DRIFT_COLUMNS, *READOUT_COLUMNS)  # step, drift_report's vector and set columns, then the readout
SUMMARY_COLUMNS = ("step", "drift/norm_ratio", "drift/cosine_concept", "drift/norm_percentile",
                   "drift_sets/inter_l2", "drift_sets/intra_hausdorff", "drift_sets/simple_l2", *READOUT_COLUMNS)
SWEEP_COLUMNS = ("setting", "rho", "alpha", "context_accuracy", "concept_fidelity", "concept_colour", "images")


@dataclass(frozen=True)
class Size:
    """How much the experiment does: training steps, export spacing, images and sampling steps."""

    steps: int
    every: int
    lr: float
    images: int
    sample_steps: int
    prompts: int  # evaluation prompts used (the first n of the CSV)
    rhos: tuple[float, ...]
    alphas: tuple[float, ...]


SIZES = {
    "full": Size(steps=600, every=100, lr=5e-3, images=4, sample_steps=15, prompts=8,
                 rhos=(0.0, 0.2, 0.4, 0.7, 1.0), alphas=(0.0, 0.5, 1.0)),
    "ci": Size(steps=4, every=2, lr=5e-3, images=1, sample_steps=2, prompts=2, rhos=(0.2, 1.0), alphas=(0.5,)),
}


# ------------------------------------------------------------------------------------------------ readout rules


def requested(context: str) -> tuple[str | None, tuple[str | None, str] | None]:
    """What a prompt's context asks for: (background colour, (colour, shape) of a second object), None if not."""
    words = context.replace(KEYWORD, " ").split()
    background = words[words.index("background") - 1] if "background" in words else None
    other = None
    for i, word in enumerate(words):
        if word in SHAPES:
            colour = words[i - 1] if i > 0 and words[i - 1] in COLOUR_NAMES else None
            other = (colour, word)
    return background, other


def context_hit(reading, context: str) -> bool:
    """Whether an image shows everything the context asks for (the requested background and second object)."""
    background, other = requested(context)
    ok = background is None or reading.background == background
    return ok and (other is None or reading.has(*other))


def score_images(records, prompts, readout) -> dict[str, dict[str, float]]:
    """Context accuracy and concept fidelity per setting tag, read from the images `generate` wrote."""
    by_tag: dict[str, list] = {}
    for record in records:
        by_tag.setdefault(record.tag, []).append(record)
    scores = {}
    for tag, group in by_tag.items():
        images = []
        for record in group:
            with Image.open(record.path) as image:
                images.append(image.convert("RGB"))
        readings = read(readout, pil_batch(images))
        context = [context_hit(r, prompts[rec.prompt_index].context) for r, rec in zip(readings, group, strict=True)]
        fidelity = [r.has(*CONCEPT) for r in readings]
        colour = [r.has(colour=CONCEPT[0]) for r in readings]
        scores[tag] = {"context": sum(context) / len(context), "fidelity": sum(fidelity) / len(fidelity),
                       "colour": sum(colour) / len(colour), "images": len(readings), "rho": group[0].rho,
                       "alpha": group[0].alpha}
    return scores


# ------------------------------------------------------------------------------------------------ the run


def train_concept(work: Path, size: Size, seed: int) -> Path:
    """Textual Inversion of the pink star on `mini`; returns the run's exports folder."""

    module = TextualInversion(concept_word=CONCEPT_WORD, placeholder=KEYWORD, pretrained="mini", seed=seed,
                              optimizer=functools.partial(torch.optim.AdamW, lr=size.lr, weight_decay=0.0))
    data = ConceptDataModule(str(CONCEPT_IMAGES), resolution=32, batch_size=4, repeats=50, seed=seed)
    trainer = L.Trainer(max_steps=size.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=work,
                        callbacks=[Export(every_n_steps=size.every), StepProgressBar()])
    trainer.fit(module, data)
    return work / "exports"


def run(out: str | Path, size: str = "full", work: str | Path | None = None, seed: int = 0,
        guidance: float = 4.0) -> dict:
    """Run the experiment and write its report into `out` (see the module docstring). Returns the numbers."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is unknown; choose one of {sorted(SIZES)}.")
    s = SIZES[size]
    out = Path(out)
    work = Path(work) if work is not None else out / "work"
    if work.exists():
        shutil.rmtree(work)  # a fresh run: exports and images of another size must not mix in
    out.mkdir(parents=True, exist_ok=True)


    readout = load_readout()
    prompts = load_eval_csv(MINI_PROMPTS / "eval_pink_star.csv")[: s.prompts]
    templates = [p.prompt for p in prompts]
    exports = train_concept(work / "ti", s, seed)
    steps = sorted(int(p.name.split("-")[1]) for p in exports.glob("step-*"))
    # The text side, by the drift report: vector drift (Figure 4) and contextual set distances (Figure 2) of every
    # export, with the world's own sentences about a star.

    report = drift_report(str(work / "ti"), prompt_set=str(MINI_PROMPTS / "contextual_star.txt"),
                          simple_set=str(MINI_PROMPTS / "simple.txt"), device="cpu", out=str(out / "drift"))
    with (report / "drift.csv").open() as handle:
        text_side = {int(row["step"]): row for row in csv.DictReader(handle)}

    def images(export: Path, name: str, rhos, alphas):
        records = generate(export, templates, work / "images" / name, rhos=rhos, alphas=alphas, compare=True,
                           num_images=s.images, seed=seed, batch_size=16, steps=s.sample_steps, guidance=guidance,
                           device="cpu", progress=False)
        return score_images(records, prompts, readout)

    curves = []
    for step in steps:
        export = exports / f"step-{step:06d}"
        row = {k: float(v) for k, v in text_side[step].items() if k != "step"} | {"step": step}
        scores = images(export, f"step-{step:06d}", (0.2,), (0.5,))
        tea = next(v for k, v in scores.items() if k != "baseline")
        base = scores["baseline"]
        row.update(context_baseline=base["context"], fidelity_baseline=base["fidelity"], colour_baseline=base["colour"],
                   context_tea=tea["context"], fidelity_tea=tea["fidelity"], colour_tea=tea["colour"])
        curves.append({k: row[k] for k in CURVE_COLUMNS})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in curves[-1].items()}), flush=True)
    last = exports / f"step-{steps[-1]:06d}"
    sweep_scores = images(last, "sweep", s.rhos, s.alphas)
    sweep = [{"setting": tag, "rho": v["rho"], "alpha": v["alpha"], "context_accuracy": v["context"],
              "concept_fidelity": v["fidelity"], "concept_colour": v["colour"], "images": v["images"]}
             for tag, v in sweep_scores.items()]
    sweep.sort(key=lambda r: (r["rho"] is not None, r["rho"] or 0, r["alpha"] or 0))

    _write_csv(out / "curves.csv", CURVE_COLUMNS, curves)
    _write_csv(out / "sweep.csv", SWEEP_COLUMNS, sweep)
    _grid(work / "images" / f"step-{steps[-1]:06d}", out / "grid.png", len(templates))
    _plots(out, curves, sweep)
    _summary(out, size, s, guidance, seed, curves, sweep, templates)
    return {"curves": curves, "sweep": sweep}


def _write_csv(path: Path, columns, rows) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v))
                             for k, v in row.items()})


def _grid(folder: Path, path: Path, prompts: int) -> None:
    """The per-prompt grids `generate` wrote (baseline | TEA columns), side by side."""
    grids = [Image.open(folder / f"grid-p{p:03d}.png").convert("RGB") for p in range(prompts)]
    sheet = Image.new("RGB", (sum(g.width for g in grids) + 8 * (len(grids) - 1), max(g.height for g in grids)),
                      "white")
    x = 0
    for grid in grids:
        sheet.paste(grid, (x, 0))
        x += grid.width + 8
    sheet.save(path)


def _plots(out: Path, curves: list[dict], sweep: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in curves]

    def panel(ax, keys, title):
        for key in keys:
            ax.plot(steps, [r[key] for r in curves], marker="o", label=key)
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.legend(fontsize=7)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    panel(ax, list(READOUT_COLUMNS), "readout: context accuracy and concept fidelity")
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(out / "context_and_fidelity.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "concept_fidelity", "concept fidelity (pink star present)"),
                           (axes[1], "concept_colour", "concept colour (anything pink present)")):
        for row in sweep:
            name = "baseline" if row["rho"] is None else f"rho {row['rho']:g}, alpha {row['alpha']:g}"
            ax.scatter(row[key], row["context_accuracy"], marker="*" if row["rho"] is None else "o")
            ax.annotate(name, (row[key], row["context_accuracy"]), fontsize=6)
        ax.set_xlabel(label)
        ax.set_ylabel("context accuracy")
        ax.set_title("TEA sweep at the last step")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


def _summary(out: Path, size: str, s: Size, guidance: float, seed: int, curves, sweep, templates) -> None:
    def table(rows, columns) -> list[str]:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            lines.append("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else
                                           ("—" if row[c] is None else str(row[c])) for c in columns) + " |")
        return lines

    text = [
        "# The paper's story in miniature (mini world)", "",
        f"`python -m tea_lightning.mini.experiment --size {size}` (seed {seed}): Textual Inversion of `{KEYWORD}` "
        f"(initialised from `{CONCEPT_WORD}`) on `mini`, {s.steps} steps at lr {s.lr:g}, batch 4, 32 px; exports "
        f"every {s.every} steps. Images: {s.images} per prompt and setting, DPM-Solver {s.sample_steps} steps, "
        f"guidance {guidance:g}, scored by the readout. Prompts: " + "; ".join(f"`{t}`" for t in templates) + ".", "",
        "## Drift and readout against training steps", "",
        *table(curves, SUMMARY_COLUMNS), "",
        "All columns: `curves.csv`. Figure 4 (vector drift, vocabulary norms) and Figure 2 (set distances), from the "
        "drift report:", "",
        "![vector drift](drift/vector_drift.png)", "", "![vocabulary norms](drift/vocab_norms.png)", "",
        "![set distances](drift/contextual_drift.png)", "",
        "![context and fidelity](context_and_fidelity.png)", "",
        f"## TEA sweep at step {curves[-1]['step']}", "",
        *table(sweep, SWEEP_COLUMNS), "", "![sweep](sweep.png)", "",
        "## Baseline (left column of each block) against TEA rho 0.2, alpha 0.5 (right)", "", "![grid](grid.png)", "",
    ]
    (out / "summary.md").write_text("\n".join(text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/mini_experiment", help="report folder")
    parser.add_argument("--size", default="full", choices=sorted(SIZES), help="full, or ci (a few minutes)")
    parser.add_argument("--work", default=None, help="where the training run and images go (default OUT/work)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args(argv)
    run(args.out, args.size, args.work, args.seed, args.guidance)


if __name__ == "__main__":
    main()
