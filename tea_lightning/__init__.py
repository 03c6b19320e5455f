"""tea-lightning: personalise Stable Diffusion and undo semantic collapse with test-time embedding adjustment."""

from tea_lightning.data import ConceptDataModule
from tea_lightning.module import DiffusionModule
from tea_lightning.textual_inversion import TextualInversion

__all__ = ["ConceptDataModule", "DiffusionModule", "TextualInversion"]
__version__ = "0.1.0"
