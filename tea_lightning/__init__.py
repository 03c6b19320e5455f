"""tea-lightning: personalise Stable Diffusion and undo semantic collapse with test-time embedding adjustment."""

from tea_lightning.custom_diffusion import CustomDiffusion
from tea_lightning.data import ConceptDataModule, TrainingConcept
from tea_lightning.dreambooth_lora import DreamBoothLoRA
from tea_lightning.module import DiffusionModule
from tea_lightning.textual_inversion import TextualInversion

__all__ = ["ConceptDataModule", "CustomDiffusion", "DiffusionModule", "DreamBoothLoRA", "TextualInversion",
           "TrainingConcept"]
__version__ = "0.1.0"
