"""Step-stamped exports while training, and a final one at the end."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from typing_extensions import override

from tea_lightning.export import write_export_folder


def run_dir(trainer: L.Trainer) -> Path:
    """The run's folder: the logger's version folder (`lightning_logs/version_N`) or the trainer's root."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class Export(L.Callback):
    """Write the module's diffusers-loadable files every `every_n_steps` (to `exports/step-NNNNNN/`) and at the end
    of training (to `exports/final/`). Rank 0 only; each folder appears whole or not at all.

    Args:
        every_n_steps: Steps between step-stamped exports (drift analysis reads them); 0 exports only at the end.
        dirname: Folder inside the run folder.
    """

    def __init__(self, every_n_steps: int = 100, dirname: str = "exports") -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps={every_n_steps}; use 0 (final export only) or more.")
        self.every_n_steps, self.dirname = every_n_steps, dirname
        self._last_step = -1

    def folder(self, trainer: L.Trainer, name: str) -> Path:
        return run_dir(trainer) / self.dirname / name

    def write(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> Path:
        # Every rank asks for the folder: `trainer.log_dir` is a broadcast, and a collective that only rank 0
        # enters hangs a DDP run. Only rank 0 writes.
        folder, step = self.folder(trainer, name), trainer.global_step
        if trainer.is_global_zero:
            write_export_folder(folder, lambda tmp: module.export(tmp, step))
        return folder

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if self.every_n_steps and trainer.global_step == 0:
            self.write(trainer, pl_module, "step-000000")  # the starting point of every drift curve

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # With gradient accumulation this hook runs once per micro-batch; export once per optimiser step.
        step = trainer.global_step
        if self.every_n_steps and step != self._last_step and step % self.every_n_steps == 0:
            self.write(trainer, pl_module, f"step-{step:06d}")
        self._last_step = step

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module, "final")
