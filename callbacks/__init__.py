"""Lightning callbacks of tea-lightning (configure them under `trainer.callbacks` in a YAML config)."""

from tea_lightning.callbacks.collapse import CollapseAlarm
from tea_lightning.callbacks.export import Export

__all__ = ["CollapseAlarm", "Export"]
