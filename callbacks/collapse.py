"""CollapseAlarm: warn, or stop with a checkpoint, when the learned keyword drifts into the special-token tail.

Semantic collapse (method.md §1) shows in the learned vector itself: its norm climbs past ordinary words towards
the norms of `<|startoftext|>`/`<|endoftext|>`, and its cosine to the concept word falls. The alarm reads the
same measures the drift callback logs (`tea_lightning.drift.norm_percentile` and `cosine`, the pieces of
`vector_drift`), per learned vector, so a multi-vector token alarms when any one of its vectors drifts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from tea_lightning.callbacks.export import check_every_n_steps, run_dir
from tea_lightning.conditioning import encoder_label
from tea_lightning.drift import cosine, norm_percentile
from tea_lightning.drift_measure import vocabulary_norms

ACTIONS = ("warn", "stop")


class CollapseAlarm(L.Callback):
    """Every `every_n_steps` optimiser steps, check each learned keyword vector V* against two limits: the
    percentage of vocabulary row norms below |V*| (`max_norm_percentile`) and its cosine to the concept word
    (`min_cosine`). When either is crossed it warns, or with ``action: stop`` it saves a checkpoint
    (`collapse-step=NNNNNN.ckpt` beside ModelCheckpoint's, or in `<run>/checkpoints/`) and ends the run cleanly, so
    `Export` still writes `exports/final/`.

    Works for methods with learned token vectors (Textual Inversion, Custom Diffusion's modifier tokens).

    Args:
        every_n_steps: Steps between checks (≥ 1).
        max_norm_percentile: Alarm when more than this percentage (0 to 100) of vocabulary norms lie below |V*|.
            99 flags a keyword among the largest 1% of rows, where the special tokens live.
        min_cosine: Alarm when cos(V*, concept word) falls below this (−1 to 1).
        action: ``warn`` (keep training) or ``stop`` (checkpoint and end the run).
    """

    def __init__(self, every_n_steps: int = 50, max_norm_percentile: float = 99.0, min_cosine: float = 0.2,
                 action: Literal["warn", "stop"] = "warn") -> None:
        check_every_n_steps(every_n_steps, "CollapseAlarm")
        if not _number_in(max_norm_percentile, 0, 100):
            raise ValueError(f"CollapseAlarm(max_norm_percentile={max_norm_percentile!r}): use a percentage from 0 "
                             "to 100, e.g. 99.")
        if not _number_in(min_cosine, -1, 1):
            raise ValueError(f"CollapseAlarm(min_cosine={min_cosine!r}): use a cosine from -1 to 1, e.g. 0.2.")
        if action not in ACTIONS:
            raise ValueError(f"CollapseAlarm(action={action!r}): use one of {list(ACTIONS)}.")
        self.every_n_steps, self.action = every_n_steps, action
        self.max_norm_percentile, self.min_cosine = float(max_norm_percentile), float(min_cosine)
        self.stopped_at: int | None = None
        self._last_step = -1

    def check_module(self, pl_module: L.LightningModule) -> None:
        """Refuse a method without learned token vectors or concept word (train.py calls this before the run folder
        exists; `on_fit_start` again for runs started from Python)."""
        try:
            pl_module.learned_vectors()
        except NotImplementedError:
            raise ValueError(f"CollapseAlarm watches learned token vectors, but {type(pl_module).__name__} learns "
                             "none. Remove it from trainer.callbacks for this method.") from None
        if not getattr(pl_module, "concept_word", None):
            raise ValueError(f"CollapseAlarm compares the keyword with its concept word, but this "
                             f"{type(pl_module).__name__} has none. Set model.init_args.concept_word.")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_module(pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # With gradient accumulation this hook runs once per micro-batch; check once per optimiser step.
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_steps == 0:
            self.check(trainer, pl_module)
        self._last_step = step

    def findings(self, pl_module: L.LightningModule) -> list[str]:
        """One line per learned vector that crossed a limit; empty when all is well. On SDXL each text encoder's
        rows are checked against that encoder's vocabulary and named by it ("clip_g vector 0: ...")."""
        count = pl_module.num_text_encoders
        return [line for e in range(count) for line in self._findings(pl_module, e, encoder_label(e, count))]

    def _findings(self, pl_module: L.LightningModule, encoder: int, label: str) -> list[str]:
        vectors, concept = pl_module.learned_vectors(encoder)  # [k, D] each
        vocab = vocabulary_norms(pl_module.tokenizers[encoder], pl_module.text_encoders[encoder])
        found = []
        for i, (v, c) in enumerate(zip(vectors.detach(), concept.detach(), strict=True)):
            norm, percentile, cos = v.norm().item(), norm_percentile(v.norm(), vocab), cosine(v, c).item()
            reasons = []
            if percentile > self.max_norm_percentile:
                reasons.append(f"|V*| = {norm:.4g} ({norm / c.norm().item():.2f}x the concept word) is above "
                               f"{percentile:.2f}% of vocabulary norms (limit {self.max_norm_percentile:g}%)")
            if cos < self.min_cosine:
                reasons.append(f"cos(V*, {pl_module.concept_word!r}) = {cos:.3f} (limit {self.min_cosine:g})")
            if reasons:
                found.append(f"{label + ' ' if label else ''}vector {i}: " + "; ".join(reasons))
        return found

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank holds the same vectors (DDP keeps them in sync), so every rank reaches the same decision.
        found = self.findings(pl_module)
        if not found:
            return
        step = trainer.global_step
        message = (f"CollapseAlarm at step {step}: the keyword {pl_module.keyword!r} is drifting towards semantic "
                   "collapse: " + " | ".join(found) + ". Consider model.init_args.regularizers (NormPenalty, "
                   "DirectionPenalty), model.init_args.parametrization spherical, or a lower learning rate.")
        if self.action == "warn":
            rank_zero_warn(message, category=UserWarning)
            return
        path = self.checkpoint_path(trainer, step)
        trainer.save_checkpoint(path, weights_only=False)  # collective: every rank calls it, rank 0 writes
        rank_zero_warn(f"{message} Stopping (action='stop'); checkpoint saved to {path}.", category=UserWarning)
        self.stopped_at = step
        trainer.should_stop = True

    @staticmethod
    def checkpoint_path(trainer: L.Trainer, step: int) -> Path:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or run_dir(trainer) / "checkpoints"
        return Path(folder) / f"collapse-step={step:06d}.ckpt"


def _number_in(value: Any, low: float, high: float) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and \
        low <= value <= high
