"""Does training-time regularisation hold the keyword near its concept word? The same Textual Inversion run on the
tiny model, unconstrained, with each regulariser, with both, and spherical, side by side in one process.

Every variant shares the seed, data, steps and optimiser; only the constraint differs. At the end each keyword is
measured with `tea_lightning.drift.vector_drift` (the function the drift callback logs): norm ratio |V*|/|c|,
cosine to the concept word, and the percentile of |V*| among the vocabulary norms. A high learning rate makes the
drift visible within a few dozen steps.

    python bench/regularization.py --steps 60 --lrs 5e-3 5e-2 --out bench/regularization.md
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from tea_lightning.data import ConceptDataModule  # noqa: E402
from tea_lightning.drift import norm_percentile, vector_drift  # noqa: E402
from tea_lightning.regularizers import DirectionPenalty, NormPenalty  # noqa: E402
from tea_lightning.textual_inversion import TextualInversion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "unconstrained": {},
    "NormPenalty(1e-3, max_ratio=1.5)": {"regularizers": lambda: [NormPenalty(1e-3, 1.5)]},
    "DirectionPenalty(1e-3)": {"regularizers": lambda: [DirectionPenalty(1e-3)]},
    "NormPenalty + DirectionPenalty": {"regularizers": lambda: [NormPenalty(1e-3, 1.5), DirectionPenalty(1e-3)]},
    "spherical (norm held at the concept word's)": {"parametrization": "spherical"},
    "spherical + DirectionPenalty(1e-3)": {"parametrization": "spherical",
                                           "regularizers": lambda: [DirectionPenalty(1e-3)]},
}


def train(variant: dict, lr: float, steps: int, seed: int, root: Path) -> dict:
    """One run; returns the keyword's drift at the end."""
    options = {k: (v() if callable(v) else v) for k, v in variant.items()}
    L.seed_everything(seed, verbose=False)
    module = TextualInversion(concept_word="star", placeholder="<v>", pretrained="tiny", seed=seed,
                              optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0), **options)
    data = ConceptDataModule(instance_dir=str(ROOT / "examples" / "pink_star"), resolution=64, batch_size=2,
                             repeats=100, seed=seed)
    initial = module.learned_vectors()[0].detach().clone()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, data)
    vectors, concept = module.learned_vectors()
    vocab_norms = module.text_encoder.get_input_embeddings().weight[: module.tokenizer.vocab_size].norm(dim=-1)
    drift = vector_drift(vectors, concept[0], initial, vocab_norms)
    drift["concept_percentile"] = norm_percentile(concept[0].norm(), vocab_norms)
    specials = [module.tokenizer.bos_token_id, module.tokenizer.eos_token_id]
    drift["special_percentiles"] = [norm_percentile(vocab_norms[i], vocab_norms) for i in specials]
    return drift


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return head + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-3, 5e-2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here (else print it)")
    args = parser.parse_args()

    lines = [
        "# Training-time regularisation on the tiny model",
        "",
        f"- machine: {platform.machine()} {cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU",
        f"- date: {datetime.date.today().isoformat()}",
        f"- commit: {commit()}",
        f"- command: `python bench/regularization.py --steps {args.steps} --lrs {' '.join(map(str, args.lrs))}`",
        f"- run: Textual Inversion of `examples/pink_star` from the word `star`, tiny model, 64 px, batch 2, "
        f"AdamW (weight decay 0), {args.steps} steps, seed {args.seed}; every variant in one process",
        "",
    ]
    for lr in args.lrs:
        lines += [f"## lr {lr:g}", "",
                  "| variant | norm ratio \\|V*\\|/\\|c\\| | cos(V*, c) | angle to c (deg) | norm percentile |",
                  "|---|---|---|---|---|"]
        for name, variant in VARIANTS.items():
            drift = train(variant, lr, args.steps, args.seed, Path("/tmp") / "tea-bench-regularization")
            lines.append(f"| {name} | {drift['norm_ratio']:.3f} | {drift['cosine_concept']:.3f} | "
                         f"{drift['angle_concept_deg']:.1f} | {drift['norm_percentile']:.2f} |")
            print(lines[-1], flush=True)
        start, end = drift["special_percentiles"]
        lines += ["", f"For scale: the concept word `star` sits at norm percentile {drift['concept_percentile']:.2f}, "
                  f"`<|startoftext|>` and `<|endoftext|>` (3x the usual norm) at {start:.3f} and {end:.3f}.", ""]
        lines.append("")
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
