"""A progress bar over the whole run, in optimiser steps."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run, counting optimiser steps towards `trainer.max_steps` ("Steps 1350/3000").

    Personalisation runs are set in steps and an "epoch" is only a number of passes over a handful of photos, so
    Lightning's per-epoch bar (with its "Epoch 2/-2") says little; this one says how far the run is.
    """

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        self.train_progress_bar.initial = trainer.global_step  # a resumed run starts where it stopped
        self.train_progress_bar.set_description("Steps")

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        pass  # keep the one bar across epochs

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if self._should_update(step, bar.total or 0) and bar.n != step:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
