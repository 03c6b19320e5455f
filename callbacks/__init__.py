"""Lightning callbacks of tea-lightning (configure them under `trainer.callbacks` in a YAML config)."""

from tea_lightning.callbacks.export import Export
from tea_lightning.callbacks.progress import StepProgressBar
from tea_lightning.callbacks.samples import SampleImages

__all__ = ["Export", "SampleImages", "StepProgressBar"]
