"""Lightning callbacks of tea-lightning (configure them under `trainer.callbacks` in a YAML config)."""

from tea_lightning.callbacks.collapse import CollapseAlarm
from tea_lightning.callbacks.drift import ContextualDrift, EmbeddingDrift
from tea_lightning.callbacks.export import Export
from tea_lightning.callbacks.progress import StepProgressBar
from tea_lightning.callbacks.samples import SampleImages

__all__ = ["CollapseAlarm", "ContextualDrift", "EmbeddingDrift", "Export", "SampleImages", "StepProgressBar"]
