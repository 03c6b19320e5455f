"""Full fine-tuning (or training from scratch) of a whole text-to-image model on captioned images.

This is how the built-in `mini` model was made: `configs/mini_world.yaml` trains the UNet and the text encoder of
an untrained world on `tea_lightning.mini.scenes` through the same diffusion loss every personalisation method uses.
The VAE stays frozen (mini's is a fixed identity map, so the UNet works on the pixels).

    python -m tea_lightning.mini.world new runs/mini-untrained
    python -m tea_lightning.mini.full_finetune fit --config configs/mini_world.yaml

is the Lightning CLI of `train.py` with captioned data: any `LightningDataModule` named by `data.class_path`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from tea_lightning import export
from tea_lightning.conditioning import PromptEmbeds
from tea_lightning.module import DiffusionModule


class FullFineTune(DiffusionModule):
    """Train every weight of the UNet (and, by default, of the text encoder) on captioned images.

    Batches carry a ``caption`` per image (see `tea_lightning.mini.scenes.SceneDataModule`); an empty caption is the
    unconditional prompt that classifier-free guidance needs. Exports are whole diffusers pipelines.

    Args:
        train_text_encoder: Also train the text encoder (its token rows included).
        pretrained, seed, prior_loss_weight, regularizers, optimizer, lr_scheduler: see `DiffusionModule`.
    """

    method = "full_finetune"

    def __init__(self, train_text_encoder: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trains_text_encoder = train_text_encoder
        self.unet.requires_grad_(True).train()
        self.text_encoder.requires_grad_(train_text_encoder).train(train_text_encoder)

    @property
    def keyword(self) -> str:
        raise NotImplementedError("FullFineTune learns no keyword: its prompts are the captions of the data")

    def batch_prompts(self, batch: dict[str, Any]) -> list[str]:
        if "caption" not in batch:
            raise ValueError("FullFineTune trains on captioned images: use a data module whose batches carry a "
                             "'caption' per image, such as tea_lightning.mini.scenes.SceneDataModule.")
        return list(batch["caption"])

    def text_states(self, batch: dict[str, Any]) -> PromptEmbeds:
        return self.encode_prompts(self.batch_prompts(batch))  # every caption differs: nothing to cache

    def pipeline(self) -> StableDiffusionPipeline:
        """The current weights as a stock pipeline, sampled with DPM-Solver++ under the training noise schedule."""
        scheduler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def export(self, folder: Path, step: int) -> None:
        with torch.no_grad():
            self.pipeline().save_pretrained(folder, safe_serialization=True)
        export.write_tea_json(folder, method=self.method, base_model=self.pretrained, keyword="", concept_word=None,
                              step=step)


def main(args: list[str] | None = None, run: bool = True):
    """The Lightning CLI for whole-model training on captioned data (`fit`, `--print_config`, overrides)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(FullFineTune, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        args=args, run=run, save_config_kwargs={"overwrite": True},
                        parser_kwargs={"exit_on_error": False})


if __name__ == "__main__":
    # Run the package's copy of this module: classes defined in `__main__` are not the ones the config names.
    from tea_lightning.mini.full_finetune import main as package_main
    from tea_lightning.user_errors import run_command

    run_command(package_main, prog="-m tea_lightning.mini.full_finetune")
