"""Lightning callbacks of tea-lightning (configure them under `trainer.callbacks` in a YAML config)."""

from tea_lightning.callbacks.drift import ContextualDrift, EmbeddingDrift
from tea_lightning.callbacks.export import Export

__all__ = ["ContextualDrift", "EmbeddingDrift", "Export"]
