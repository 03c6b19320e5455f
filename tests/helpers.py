"""Helpers shared by the tests: tiny modules, data and trainers with quiet defaults."""

import functools
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

ROOT = Path(__file__).resolve().parents[1]
STAR_IMAGES = ROOT / "examples" / "pink_star"


def adamw(lr: float):
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


def make_trainer(root: Path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    options = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                   callbacks=list(callbacks))
    options.update(kwargs)
    return L.Trainer(**options)


def star_data(**kwargs):
    from tea_lightning.data import ConceptDataModule

    options = dict(instance_dir=str(STAR_IMAGES), resolution=64, batch_size=2, repeats=10)
    options.update(kwargs)
    return ConceptDataModule(**options)


def ti_module(lr: float = 5e-3, **kwargs):
    from tea_lightning.textual_inversion import TextualInversion

    options = dict(concept_word="star", placeholder="<v>", pretrained="tiny", optimizer=adamw(lr))
    options.update(kwargs)
    return TextualInversion(**options)


class RecordingLogger(Logger):
    """Keeps every `log_metrics` call in memory: what a test reads back of what TensorBoard would show."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def by_step(self) -> dict[int, dict[str, float]]:
        merged: dict[int, dict[str, float]] = {}
        for step, metrics in self.calls:
            merged.setdefault(step, {}).update(metrics)
        return merged
