"""The paper's story in miniature, measured offline on the `mini` world: one command, one report.

    python -m tea_lightning.mini.experiment                         # full: report in docs/mini_experiment (~51 min)
    python -m tea_lightning.mini.experiment --size ci --out /tmp/ci # 20 s; numbers mean nothing

The pink star (`examples/pink_star/`, a concept the world never saw) is taught to `mini` by each of the three
methods (`tea_lightning.mini.concept`), once per training seed. Images of prompts the world can draw ("a KEYWORD on
a COLOUR background" for every background but pink; and the same with the background named first, "a COLOUR
background with a KEYWORD") are made without TEA and with TEA from the same noise (`tea_lightning.inference.generate`),
and each image is read by the readout (`tea_lightning.mini.readout`, checked against a person's labels in
`tea_lightning.mini.labelled`):

- **context**: the requested background is there;
- **concept**: a pink star is there;
- **both**: the two at once: the prompt was followed and the concept kept.

For Textual Inversion the keyword's drift is measured at every export (`tea_lightning.drift_report`: the vector
drift of the paper's Figure 4 and the set distances of its Figure 2), with images at each export, and TEA's rho and
alpha are swept at the last step (Table 1). Every share comes with a 95 % bootstrap interval over training seeds
(`tea_lightning.stats`, images resampled inside each seed), and every TEA-minus-baseline gap is paired image by
image.

Output (`--out`): `scores.csv` (one row per image: the raw data), `drift_seeds.csv` (the drift reports of every
seed) and `wall_time.json`, from which `write_report` computes everything else: `summary.md`, `methods.csv`,
`curves.csv`, `sweep.csv`, the plots `curves.png` and `sweep.png`; plus the drift report of the first seed (`drift/`:
`contextual_drift.png` = Figure 2, `vector_drift.png`, `vocab_norms.png` = Figure 4) and the grids
`grid-<method>.png` (baseline and TEA, one row per prompt). Training runs and images go to `--work` (default
`runs/mini_experiment`); a rerun reuses every run trained with the same settings and every finished image.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from tea_lightning.drift_report import drift_report
from tea_lightning.export import step_exports, write_json, write_png
from tea_lightning.grids import table
from tea_lightning.mini.concept import KEYWORDS, METHODS, train
from tea_lightning.mini.labelled import ATTRIBUTES, agreement, requested
from tea_lightning.mini.readout import load_readout, read_files
from tea_lightning.mini.scenes import CONCEPT
from tea_lightning.prompt_sets import PROMPTS_DIR, load_eval_csv
from tea_lightning.stats import bootstrap_mean, paired_difference

MINI_PROMPTS = PROMPTS_DIR / "mini"
TEA = (0.2, 0.5)  # the paper's factors (rho, alpha), for every method
TEA_TAG = f"tea-rho{TEA[0]:g}-alpha{TEA[1]:g}"
METRICS = ("context", "concept", "both")
DRIFT = ("drift/norm_ratio", "drift/cosine_concept", "drift_sets/inter_l2", "drift_sets/intra_hausdorff",
         "drift_sets/simple_l2")
FORMS = {"on": "eval_pink_star.csv", "background first": "eval_pink_star_background_first.csv"}
WALL_TIME = "wall_time.json"
SCORE_COLUMNS = ("method", "seed", "step", "form", "setting", "rho", "alpha", "prompt_index", "prompt", "image_index",
                 "background_read", *METRICS)


@dataclass(frozen=True)
class Training:
    """One method's training: learning rate, steps, and how often it exports (Textual Inversion's curves)."""

    lr: float
    steps: int
    every: int


@dataclass(frozen=True)
class Size:
    """How much the experiment does."""

    seeds: tuple[int, ...]  # training seeds; each seed also seeds its images' noise
    prompts: int  # evaluation prompts used (the first n of each file of FORMS)
    images: int  # images per prompt and setting, baseline against TEA, at the last step
    other_images: int  # the same for the second prompt form ("a COLOUR background with a KEYWORD")
    curve_images: int  # images per prompt and setting at each earlier export (Textual Inversion)
    sweep_images: int  # images per prompt and setting of the rho x alpha sweep (Textual Inversion)
    sample_steps: int  # DPM-Solver++ steps per image
    rhos: tuple[float, ...]
    alphas: tuple[float, ...]
    training: dict[str, Training] = field(default_factory=dict)


SIZES = {
    # The settings were chosen from probe runs (docs/mini_world.md, "Choosing the experiment's setting"): at
    # Textual Inversion's lr 5e-3 the keyword's norm reaches ~2.5x that of `star` and no background is lost; at 2e-2
    # it reaches ~7.5x by step 900 and the first background goes; at 5e-2 the concept itself is lost. DreamBooth-LoRA
    # and Custom Diffusion kept every background at both lr 1e-3 (300 steps) and 5e-3 (600 steps); the hotter one
    # is used. 10 sampling steps draw what 15 do (compared image by image) in two thirds of the time.
    "full": Size(seeds=(0, 1, 2, 3, 4), prompts=7, images=16, other_images=4, curve_images=2, sweep_images=4,
                 sample_steps=10,
                 rhos=(0.0, 0.2, 0.4, 0.7, 1.0), alphas=(0.0, 0.5, 1.0),
                 training={"textual_inversion": Training(2e-2, 900, 150),
                           "dreambooth_lora": Training(5e-3, 600, 600),
                           "custom_diffusion": Training(5e-3, 600, 600)}),
    "ci": Size(seeds=(0,), prompts=2, images=1, other_images=1, curve_images=1, sweep_images=1, sample_steps=2,
               rhos=(0.0, 1.0), alphas=(0.5,), training={"textual_inversion": Training(2e-2, 4, 2),
                                        "dreambooth_lora": Training(5e-3, 2, 2),
                                        "custom_diffusion": Training(5e-3, 2, 2)}),
}


# ------------------------------------------------------------------------------------------------ readout rules


def context_hit(reading, context: str) -> bool:
    """Whether an image shows everything the context asks for (the requested background and second object)."""
    background, other = requested(context)
    ok = background is None or reading.background == background
    return ok and (other is None or reading.has(*other))


def score(reading, context: str) -> dict[str, int]:
    """1/0 per metric for one image: context followed, concept (a pink star) present, both."""
    context_ok, concept_ok = context_hit(reading, context), reading.has(*CONCEPT)
    return {"context": int(context_ok), "concept": int(concept_ok), "both": int(context_ok and concept_ok)}


# ------------------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class Prompts:
    """One prompt form: its templates (`{}` for the keyword) and what each asks of the image besides the concept."""

    form: str
    templates: list[str]
    contexts: list[str]


def load_forms(count: int) -> list[Prompts]:
    """The first `count` prompts of each form in `FORMS`."""
    forms = []
    for form, name in FORMS.items():
        prompts = load_eval_csv(MINI_PROMPTS / name)[:count]
        forms.append(Prompts(form, [p.prompt for p in prompts], [p.context for p in prompts]))
    return forms


def _generate(export: Path, prompts: Prompts, folder: Path, seed: int, size: Size, *, num_images: int,
              rhos=(TEA[0],), alphas=(TEA[1],)):
    from tea_lightning.inference import generate

    kwargs = dict(rhos=rhos, alphas=alphas, num_images=num_images, seed=seed, batch_size=28, steps=size.sample_steps,
                  guidance=4.0, device="cpu", progress=False)
    try:
        return generate(export, prompts.templates, folder, **kwargs)
    except ValueError:  # images of other settings (another size's run): make them afresh
        shutil.rmtree(folder)
        return generate(export, prompts.templates, folder, **kwargs)


def _score_records(records, method: str, seed: int, step: int, prompts: Prompts, readout) -> list[dict]:
    rows = []
    for record, reading in zip(records, read_files(readout, [r.path for r in records]), strict=True):
        rows.append({"method": method, "seed": seed, "step": step, "form": prompts.form, "setting": record.tag,
                     "rho": record.rho, "alpha": record.alpha, "prompt_index": record.prompt_index,
                     "prompt": record.template, "image_index": record.image_index,
                     "background_read": reading.background, **score(reading, prompts.contexts[record.prompt_index])})
    return rows


def images_folder(run_dir: Path, step: int, form: str = next(iter(FORMS))) -> Path:
    """Where the images of one export and prompt form are generated (the first form, the one the grids show, has no
    suffix: `images/step-000900`; the others `images/step-000900-background-first`)."""
    suffix = "" if form == next(iter(FORMS)) else "-" + form.replace(" ", "-")
    return run_dir / "images" / f"step-{step:06d}{suffix}"


def _method_images(method: str, exports: Path, seed: int, size: Size, forms: list[Prompts], work: Path,
                   readout) -> list[dict]:
    """Images of every export (curves; Textual Inversion) and of the last one (with the sweep, and the second
    prompt form), scored."""
    found = step_exports(exports, "the mini experiment")
    main, other = forms[0], forms[1:]
    rows = []
    for step, export in found:
        last = step == found[-1][0]
        if not last and method != "textual_inversion":
            continue
        folder = images_folder(work, step)
        records = _generate(export, main, folder, seed, size, num_images=size.images if last else size.curve_images)
        if last and method == "textual_inversion":  # the sweep reuses the first images of the pair above
            turned = [r for r in size.rhos if r > 0]
            extra = _generate(export, main, folder, seed, size, num_images=size.sweep_images, rhos=turned,
                              alphas=size.alphas) if turned else []
            if 0.0 in size.rhos and any(a > 0 for a in size.alphas):
                extra += _generate(export, main, folder, seed, size, num_images=size.sweep_images, rhos=(0.0,),
                                   alphas=[a for a in size.alphas if a > 0])
            seen = {r.path for r in records}
            records += [r for r in extra if r.path not in seen and r.tag != "baseline"]
        rows += _score_records(records, method, seed, step, main, readout)
        for prompts in other if last else []:
            records = _generate(export, prompts, images_folder(work, step, prompts.form), seed, size,
                                num_images=size.other_images)
            rows += _score_records(records, method, seed, step, prompts, readout)
    return rows


def _fresh(run_dir: Path, training: dict) -> None:
    """Keep a finished run only if it was trained with `training`; otherwise start it afresh."""
    record = run_dir / "training.json"
    if run_dir.exists() and (not record.is_file() or json.loads(record.read_text()) != training):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(training, record)


def run(out: str | Path = "docs/mini_experiment", size: str = "full", work: str | Path = "runs/mini_experiment",
        progress: bool = True) -> dict:
    """Run the experiment and write its report into `out` (see the module docstring). Returns the summary."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is unknown; choose one of {sorted(SIZES)}.")
    s = SIZES[size]
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    seconds: dict[str, float] = defaultdict(float)
    readout = load_readout()
    forms = load_forms(s.prompts)
    rows, drift_rows = [], []
    reused = False  # whether this call builds on trainings (and images) of an earlier one
    for method in METHODS:
        t = s.training[method]
        for seed in s.seeds:
            run_dir = work / method / f"seed{seed}"
            _fresh(run_dir, {"method": method, "seed": seed, **asdict(t)})
            clock = time.perf_counter()
            if (run_dir / "exports" / "final").is_dir():
                reused = True
            else:
                train(method, run_dir, lr=t.lr, steps=t.steps, every=t.every, seed=seed, progress=progress)
            seconds[f"train {method}"] += time.perf_counter() - clock
            clock = time.perf_counter()
            rows += _method_images(method, run_dir / "exports", seed, s, forms, run_dir, readout)
            seconds[f"images {method}"] += time.perf_counter() - clock
            if method == "textual_inversion":
                clock = time.perf_counter()
                report = drift_report(str(run_dir), prompt_set=str(MINI_PROMPTS / "contextual_star.txt"),
                                      simple_set=str(MINI_PROMPTS / "simple.txt"), device="cpu",
                                      out=str(run_dir / "drift"), plots=seed == s.seeds[0])
                with (report / "drift.csv").open() as handle:
                    drift_rows += [{"seed": seed, **row} for row in csv.DictReader(handle)]
                if seed == s.seeds[0]:
                    shutil.copytree(report, out / "drift", dirs_exist_ok=True)
                seconds["drift reports"] += time.perf_counter() - clock
            print(f"{method} seed {seed}: done ({time.perf_counter() - started:.0f} s)", flush=True)

    _write_csv(out / "scores.csv", SCORE_COLUMNS, rows)
    _write_csv(out / "drift_seeds.csv", list(drift_rows[0]) if drift_rows else ["seed"], drift_rows)
    for method in METHODS:
        _grid(work / method / f"seed{s.seeds[0]}", forms[0].templates, KEYWORDS[method], min(4, s.images),
              out / f"grid-{method}.png")
    seconds["total"] = time.perf_counter() - started
    _record_time(out / WALL_TIME, dict(seconds), reused)
    return write_report(out, size, s)


def _record_time(path: Path, seconds: dict[str, float], reused: bool) -> None:
    """Keep the wall time of every call that built this report: a call that reused an earlier call's trainings adds
    its own time to theirs; a call that trained everything afresh starts the record anew."""
    calls = json.loads(path.read_text())["calls"] if reused and path.is_file() else []
    write_json({"calls": [*calls, seconds]}, path)


def write_report(out: Path, size: str, s: Size) -> dict:
    """`summary.md`, `methods.csv`, `curves.csv`, `sweep.csv` and the plots, from `scores.csv`, `drift_seeds.csv`
    and `wall_time.json` alone."""
    everything = _read_csv(out / "scores.csv")
    main_form = next(iter(FORMS))
    scores = [r for r in everything if r["form"] == main_form]
    other = [r for r in everything if r["form"] != main_form]
    drift_rows = _read_csv(out / "drift_seeds.csv")
    seconds = json.loads((out / WALL_TIME).read_text())
    methods, other_methods = method_table(scores), method_table(other)
    curves = curve_table(scores, drift_rows)
    sweep = sweep_table(scores, s.sweep_images)
    for name, rows in (("methods.csv", methods), ("curves.csv", curves), ("sweep.csv", sweep)):
        _write_csv(out / name, list(rows[0]), rows)
    per_prompt = prompt_table(scores) + prompt_table(other)
    labels = agreement()
    _plots(out, curves, sweep)
    _summary(out, size, s, load_forms(s.prompts), methods, other_methods, per_prompt, curves, sweep, labels, seconds)
    return {"methods": methods, "other_form": other_methods, "curves": curves, "sweep": sweep, "prompts": per_prompt,
            "readout": labels}


# ------------------------------------------------------------------------------------------------ statistics


def _values(rows, metric):
    return [float(r[metric]) for r in rows], [r["seed"] for r in rows]


def _interval(rows, metric) -> dict[str, float]:
    values, seeds = _values(rows, metric)
    ci = bootstrap_mean(values, seeds)
    return {metric: ci.estimate, f"{metric}_low": ci.low, f"{metric}_high": ci.high}


def _gap(treated, baseline, metric) -> dict[str, float]:
    key = lambda r: (r["seed"], r["prompt_index"], r["image_index"])  # noqa: E731
    base = {key(r): r for r in baseline}
    pairs = [(r, base[key(r)]) for r in treated if key(r) in base]
    ci = paired_difference([float(t[metric]) for t, _ in pairs], [float(b[metric]) for _, b in pairs],
                           [t["seed"] for t, _ in pairs])
    return {f"{metric}_gap": ci.estimate, f"{metric}_gap_low": ci.low, f"{metric}_gap_high": ci.high}


def _last_steps(scores) -> list[tuple[str, int]]:
    """(method, its last step) for each method that has scores, in `METHODS` order."""
    return [(m, max(int(r["step"]) for r in scores if r["method"] == m)) for m in METHODS
            if any(r["method"] == m for r in scores)]


def _select(scores, method, step, setting, max_image: int | None = None):
    return [r for r in scores if r["method"] == method and int(r["step"]) == step and r["setting"] == setting
            and (max_image is None or int(r["image_index"]) < max_image)]


def method_table(scores) -> list[dict]:
    """The paper's Table 6 in miniature: per method, baseline and TEA shares at the last step and their gaps."""
    rows = []
    for method, step in _last_steps(scores):
        base, treated = _select(scores, method, step, "baseline"), _select(scores, method, step, TEA_TAG)
        row = {"method": method, "step": step, "images": len(base), "seeds": len({r["seed"] for r in base})}
        for metric in METRICS:
            row |= {f"baseline_{k}": v for k, v in _interval(base, metric).items()}
            row |= {f"tea_{k}": v for k, v in _interval(treated, metric).items()}
            row |= _gap(treated, base, metric)
        rows.append(row)
    return rows


def prompt_table(scores) -> list[dict]:
    """Per method and prompt, at the last step: baseline and TEA shares (means over seeds and images)."""
    rows = []
    for method, step in _last_steps(scores):
        for prompt in dict.fromkeys(r["prompt"] for r in scores):
            row = {"method": method, "prompt": prompt}
            for setting, name in (("baseline", "baseline"), (TEA_TAG, "tea")):
                chosen = [r for r in _select(scores, method, step, setting) if r["prompt"] == prompt]
                for metric in METRICS:
                    row[f"{name}_{metric}"] = sum(float(r[metric]) for r in chosen) / max(1, len(chosen))
            rows.append(row)
    return rows


def curve_table(scores, drift_rows) -> list[dict]:
    """Textual Inversion against training steps: the drift (mean over seeds) and the readout's shares with their
    intervals, baseline and TEA (all images of each step)."""
    method = "textual_inversion"
    rows = []
    for step in sorted({int(r["step"]) for r in scores if r["method"] == method}):
        row: dict = {"step": step}
        at = [d for d in drift_rows if int(d["step"]) == step]
        for key in DRIFT:
            row[key] = sum(float(d[key]) for d in at) / len(at) if at else float("nan")
        for setting, name in (("baseline", "baseline"), (TEA_TAG, "tea")):
            chosen = _select(scores, method, step, setting)
            for metric in METRICS:
                row |= {f"{name}_{k}": v for k, v in _interval(chosen, metric).items()}
        rows.append(row)
    return rows


def sweep_table(scores, images: int) -> list[dict]:
    """Textual Inversion's last step under every (rho, alpha) of the sweep, on the first `images` images of each
    prompt and seed: shares, and the gap to the baseline on the same images."""
    step = dict(_last_steps(scores)).get("textual_inversion")
    if step is None:
        return []
    method = "textual_inversion"
    base = _select(scores, method, step, "baseline", images)
    factors = {r["setting"]: (float(r["rho"]), float(r["alpha"])) for r in scores
               if r["method"] == method and int(r["step"]) == step and r["setting"] != "baseline"}
    rows = []
    for tag in ["baseline", *sorted(factors, key=factors.get)]:
        chosen = _select(scores, method, step, tag, images)
        row = {"setting": tag, "rho": chosen[0]["rho"], "alpha": chosen[0]["alpha"], "images": len(chosen)}
        for metric in METRICS:
            row |= _interval(chosen, metric)
        if tag != "baseline":
            row |= _gap(chosen, base, "both")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ output


def _write_csv(path: Path, columns, rows) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v))
                             for k, v in row.items()})


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _grid(run_dir: Path, templates: list[str], keyword: str, images: int, path: Path) -> None:
    """Baseline against TEA of the last step, one row per prompt (labelled), `images` images per cell: the images of
    the first prompt form, the one `templates` holds."""
    last = step_exports(run_dir, "the mini experiment")[-1][0]
    folder = images_folder(run_dir, last)
    cells = [[[Image.open(folder / tag / f"p{p:03d}-i{i:03d}.png").convert("RGB") for i in range(images)]
              for tag in ("baseline", TEA_TAG)] for p in range(len(templates))]
    headers = ["baseline", f"TEA rho {TEA[0]:g}, alpha {TEA[1]:g}"]
    write_png(table(cells, [t.format(keyword) for t in templates], headers), path)


def _plots(out: Path, curves: list[dict], sweep: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in curves]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(steps, [r["drift/norm_ratio"] for r in curves], marker="o", label="|V*| / |star|")
    axes[0].plot(steps, [r["drift/cosine_concept"] for r in curves], marker="o", label="cos(V*, star)")
    axes[0].set_title("keyword drift (mean over seeds)")
    for ax, metric in zip(axes[1:], ("context", "concept"), strict=True):
        for name, colour in (("baseline", "tab:red"), ("tea", "tab:blue")):
            ax.plot(steps, [r[f"{name}_{metric}"] for r in curves], marker="o", color=colour,
                    label="TEA rho 0.2, alpha 0.5" if name == "tea" else "baseline")
            ax.fill_between(steps, [r[f"{name}_{metric}_low"] for r in curves],
                            [r[f"{name}_{metric}_high"] for r in curves], color=colour, alpha=0.15)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title({"context": "requested background present", "concept": "pink star present"}[metric])
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    if not sweep:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    alphas = sorted({float(r["alpha"]) for r in sweep if r["alpha"] not in ("", None)})
    for ax, metric in zip(axes, METRICS, strict=True):
        base = sweep[0]
        ax.axhspan(base[f"{metric}_low"], base[f"{metric}_high"], color="gray", alpha=0.2, label="baseline")
        for alpha in alphas:
            chosen = [r for r in sweep[1:] if float(r["alpha"]) == alpha]
            x = [float(r["rho"]) for r in chosen]
            y = [r[metric] for r in chosen]
            err = [[v - r[f"{metric}_low"] for v, r in zip(y, chosen, strict=True)],
                   [r[f"{metric}_high"] - v for v, r in zip(y, chosen, strict=True)]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"alpha {alpha:g}")
        ax.set_xlabel("rho")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title({"context": "background present", "concept": "pink star present",
                      "both": "both"}[metric])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


def _wall_time(calls: list[dict[str, float]]) -> str:
    total = {k: sum(c.get(k, 0.0) for c in calls) for k in dict.fromkeys(k for c in calls for k in c)}
    text = f"Wall time: {total['total'] / 60:.1f} min in all (" + ", ".join(
        f"{k} {v / 60:.1f}" for k, v in total.items() if k != "total") + " min), one CPU thread"
    if len(calls) > 1:
        text += (f", over {len(calls)} calls of the command (later ones reusing the trainings and images of earlier "
                 "ones: " + ", ".join(f"{c['total'] / 60:.1f}" for c in calls) + " min)")
    return text + "."


def _share(agree: int, n: int) -> str:
    return f"{agree}/{n} ({agree / max(1, n):.1%})"


def _ci(row, key) -> str:
    return f"{row[key]:.2f} [{row[key + '_low']:.2f}, {row[key + '_high']:.2f}]"


def _gap_text(row, key) -> str:
    return f"{row[key]:+.2f} [{row[key + '_low']:+.2f}, {row[key + '_high']:+.2f}]"


def _method_lines(methods) -> list[str]:
    lines = ["| method | images | context: baseline | TEA | gap | concept: baseline | TEA | gap | both: baseline | TEA "
             "| gap |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in methods:
        cells = [r["method"], str(r["images"])]
        for metric in METRICS:
            cells += [_ci(r, f"baseline_{metric}"), _ci(r, f"tea_{metric}"), _gap_text(r, f"{metric}_gap")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _summary(out: Path, size: str, s: Size, forms: list[Prompts], methods, other_methods, per_prompt, curves, sweep,
             labels, seconds) -> None:
    main, other = forms[0], forms[1]
    lines = [
        "# The paper's story in miniature (mini world)", "",
        f"`python -m tea_lightning.mini.experiment --size {size}`: the pink star taught to `mini` by each method, "
        f"training seeds {', '.join(map(str, s.seeds))}; "
        + "; ".join(f"{m}: lr {t.lr:g}, {t.steps} steps" for m, t in s.training.items())
        + f". Images: {s.images} per prompt and setting at the last step (seeded by the training seed, baseline and "
        f"TEA from the same noise), DPM-Solver++ {s.sample_steps} steps, guidance 4, read by the readout. Prompts: "
        + "; ".join(f"`{t}`" for t in main.templates) + f". TEA: rho {TEA[0]:g}, alpha {TEA[1]:g}. Every share "
        "comes with its 95 % bootstrap interval over training seeds (images resampled inside each seed); gaps are "
        "TEA minus baseline, paired image by image.", "",
        _wall_time(seconds["calls"]), "",
        "## The readout against a person", "",
        "Agreement of the readout with a person's labels of images the world drew (`tea_lightning/mini/labelled/`; "
        "batch 2 was drawn from this experiment and labelled after the readout was final; "
        "`python -m tea_lightning.mini.labelled`):", "",
        "| attribute | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|",
        *[f"| {attribute} | " + " | ".join(_share(*r[attribute]) for r in labels.values()) + " |"
          for attribute in ATTRIBUTES], "",
        "## Baseline against TEA, per method (the paper's Table 6)", "",
        "Shares of images at the last step: **context** = the requested background, **concept** = a pink star, "
        "**both** = the two in one image.", "",
        *_method_lines(methods), "",
        f"The same with the background named first ({', '.join(f'`{t}`' for t in other.templates[:2])}, ...; "
        f"{s.other_images} images per prompt and seed):", "",
        *_method_lines(other_methods), "",
        "Per prompt (shares over seeds and images, baseline → TEA):", "",
        "| method | prompt | context | concept | both |", "|---|---|---|---|---|",
    ]
    for r in per_prompt:
        lines.append(f"| {r['method']} | `{r['prompt']}` | " + " | ".join(
            f"{r[f'baseline_{m}']:.2f} → {r[f'tea_{m}']:.2f}" for m in METRICS) + " |")
    lines += ["", "## Textual Inversion against training steps (Figures 2 and 4)", "",
              "Drift: means over seeds. Shares: all images of the step (baseline and TEA).", "",
              "| step | norm ratio | cosine | inter L2 | intra Hausdorff | simple L2 | context: baseline | TEA "
              "| concept: baseline | TEA | both: baseline | TEA |", "|" + "---|" * 12]
    for r in curves:
        lines.append(f"| {r['step']} | " + " | ".join(f"{r[k]:.2f}" for k in DRIFT) + " | " + " | ".join(
            _ci(r, f"{name}_{m}") for m in METRICS for name in ("baseline", "tea")) + " |")
    lines += ["", "![curves](curves.png)", "", "The drift report of the first seed: vector drift and vocabulary "
              "norms (Figure 4), set distances (Figure 2).", "", "![vector drift](drift/vector_drift.png)", "",
              "![vocabulary norms](drift/vocab_norms.png)", "", "![set distances](drift/contextual_drift.png)", ""]
    if sweep:
        lines += [f"## TEA's rho and alpha at step {curves[-1]['step']} (Table 1)", "",
                  f"Textual Inversion, the first {s.sweep_images} images of each prompt and seed; gap: both, against "
                  "the baseline on the same images.", "",
                  "| rho | alpha | context | concept | both | gap (both) |", "|---|---|---|---|---|---|"]
        for r in sweep:
            rho = "—" if r["rho"] in ("", None) else f"{float(r['rho']):g}"
            alpha = "—" if r["alpha"] in ("", None) else f"{float(r['alpha']):g}"
            gap = _gap_text(r, "both_gap") if "both_gap" in r else "—"
            lines.append(f"| {rho} | {alpha} | " + " | ".join(_ci(r, m) for m in METRICS) + f" | {gap} |")
        lines += ["", "![sweep](sweep.png)", ""]
    lines += ["## Images", "", "First seed, last step, the first four images of each prompt:", ""]
    lines += [f"![{m}](grid-{m}.png)\n" for m in METHODS if (out / f"grid-{m}.png").is_file()]
    (out / "summary.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/mini_experiment", help="report folder")
    parser.add_argument("--size", default="full", choices=sorted(SIZES), help="full, or ci (a minute)")
    parser.add_argument("--work", default="runs/mini_experiment", help="training runs and images")
    args = parser.parse_args(argv)
    run(args.out, args.size, args.work)


if __name__ == "__main__":
    main()
