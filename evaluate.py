"""Evaluate a trained concept the way the paper does: `python evaluate.py --help`.

Scores baseline and TEA images (generated from a checkpoint, or already written by infer.py) with CLIP-T (full
prompt, concept segment, context segment), CLIP-I and DINO-I, and writes scores.csv, summary.md and summary.csv.
Every option can also come from a YAML file: `python evaluate.py --config eval.yaml`. A user error ends the command
with one line, `error: ...`, and exit code 2, before any image is generated or scored.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import auto_cli

from tea_lightning.evaluation import evaluate
from tea_lightning.user_errors import run_command


def main(args: list[str] | None = None) -> Path:
    return auto_cli(evaluate, args=args, as_positional=False, exit_on_error=False)


if __name__ == "__main__":
    print(run_command(main, prog="evaluate.py"))
