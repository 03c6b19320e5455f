"""tea-lightning: personalise Stable Diffusion and undo semantic collapse with test-time embedding adjustment."""

import logging


class _NoTorchvisionNotice(logging.Filter):
    """tea-lightning needs no torchvision (images are PIL + torch), so transformers' notice that it falls back to its
    PIL image processors, printed on every import of diffusers' pipelines, is noise to our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())


# The methods, importable as `tea_lightning.TextualInversion` (configs name them so). Imported on first use, so
# `import tea_lightning.inference` loads no training code.
_LAZY = {"ConceptDataModule": "data", "TrainingConcept": "data", "CustomDiffusion": "custom_diffusion",
         "DiffusionModule": "module", "DreamBoothLoRA": "dreambooth_lora", "TextualInversion": "textual_inversion"}
__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"tea_lightning.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tea_lightning' has no attribute {name!r}")
