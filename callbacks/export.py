"""Step-stamped exports while training, and a final one at the end."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from tea_lightning.export import remove_stale_temporaries, write_export_folder


def run_dir(trainer: L.Trainer) -> Path:
    """The run's folder: the logger's version folder (`lightning_logs/version_N`) or the trainer's root.

    Read from the logger directly, not from `trainer.log_dir`: that property is a broadcast, and a collective that
    only rank 0 enters (code under `rank_zero_only`) hangs a DDP run. Rank 0's answer is the run's.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        return Path(logger.log_dir if isinstance(logger, TensorBoardLogger | CSVLogger) else logger.save_dir)
    return Path(trainer.default_root_dir)


def check_every_n_steps(every_n_steps: int, owner: str, minimum: int = 1) -> int:
    """A callback's `every_n_steps`, refused unless a whole number of at least `minimum` (0: only at the end)."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < minimum:
        zero = " (0: only at the end)" if minimum == 0 else ""
        raise ValueError(f"{owner}(every_n_steps={every_n_steps!r}): use a whole number of steps, {minimum} or more"
                         f"{zero}; 100 is a good default for Stable Diffusion runs.")
    return every_n_steps


class Export(L.Callback):
    """Write the module's diffusers-loadable files every `every_n_steps` (to `exports/step-NNNNNN/`) and at the end
    of training (to `exports/final/`). Rank 0 only; each folder appears whole or not at all.

    Args:
        every_n_steps: Steps between step-stamped exports (drift analysis reads them); 0 exports only at the end.
        dirname: Folder inside the run folder.
    """

    def __init__(self, every_n_steps: int = 100, dirname: str = "exports") -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps, "Export", minimum=0)
        self.dirname = dirname
        self._last_step = -1

    def folder(self, trainer: L.Trainer, name: str) -> Path:
        return run_dir(trainer) / self.dirname / name

    @rank_zero_only
    def write(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> Path:
        step = trainer.global_step
        return write_export_folder(self.folder(trainer, name), lambda tmp: module.export(tmp, step))

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        if trainer.is_global_zero:  # what a killed run left half-written (the folder is reused with a fixed version)
            remove_stale_temporaries(run_dir(trainer) / self.dirname, depth=1)
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
