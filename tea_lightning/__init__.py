"""tea-lightning: personalise Stable Diffusion and undo semantic collapse with test-time embedding adjustment."""

import logging


class _NoTorchvisionNotice(logging.Filter):
    """tea-lightning needs no torchvision (images are PIL + torch), so transformers' notice that it falls back to its
    PIL image processors, printed on every import of diffusers' pipelines, is noise to our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())


from tea_lightning.custom_diffusion import CustomDiffusion
from tea_lightning.data import ConceptDataModule, TrainingConcept
from tea_lightning.dreambooth_lora import DreamBoothLoRA
from tea_lightning.module import DiffusionModule
from tea_lightning.textual_inversion import TextualInversion

__all__ = ["ConceptDataModule", "CustomDiffusion", "DiffusionModule", "DreamBoothLoRA", "TextualInversion",
           "TrainingConcept"]
__version__ = "0.1.0"
