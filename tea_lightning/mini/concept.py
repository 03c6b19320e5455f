"""The pink star taught to the mini world by each of the three methods: one function that trains a run.

The concept images are `examples/pink_star/` (a pink star on six plain backgrounds; the world never saw a pink
star). Each method writes the concept into prompts its own way, and TEA pulls it towards `star` its own way:

| method | keyword in prompts | what trains | TEA level |
|---|---|---|---|
| `textual_inversion` | `<pink-star>` | one new token row, initialised from `star` | token |
| `dreambooth_lora` | `sks star` | LoRA (rank 4) on the UNet's attention and the text encoder | prompt |
| `custom_diffusion` | `<new1> star` | cross-attention key/value and the token `<new1>` (from `star`) | token |

Training prompts are the object templates ("a photo of a {}", ...), batch 4 at 32 px, AdamW without weight decay;
DreamBooth-LoRA and Custom Diffusion clip gradients at 1, as their configs do. Every run is a pure function of its
seed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import torch

from tea_lightning.callbacks import Export, StepProgressBar
from tea_lightning.custom_diffusion import CustomDiffusion
from tea_lightning.data import ConceptDataModule
from tea_lightning.dreambooth_lora import DreamBoothLoRA
from tea_lightning.textual_inversion import TextualInversion

ROOT = Path(__file__).resolve().parents[2]
CONCEPT_IMAGES = ROOT / "examples" / "pink_star"
CONCEPT_WORD = "star"
METHODS = ("textual_inversion", "dreambooth_lora", "custom_diffusion")
KEYWORDS = {"textual_inversion": "<pink-star>", "dreambooth_lora": "sks star", "custom_diffusion": "<new1> star"}


def make_module(method: str, lr: float, seed: int) -> L.LightningModule:
    """A fresh module of `method` on `mini`, learning the pink star as `KEYWORDS[method]`."""
    optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)
    common = dict(concept_word=CONCEPT_WORD, pretrained="mini", seed=seed, optimizer=optimizer)
    if method == "textual_inversion":
        return TextualInversion(placeholder=KEYWORDS[method], **common)
    if method == "dreambooth_lora":
        return DreamBoothLoRA(identifier=KEYWORDS[method].split()[0], rank=4, **common)
    if method == "custom_diffusion":
        return CustomDiffusion(modifier_token=KEYWORDS[method].split()[0], **common)
    raise ValueError(f"method={method!r} is unknown; choose one of {METHODS}.")


def train(method: str, work: Path, *, lr: float, steps: int, every: int, seed: int, progress: bool = True) -> Path:
    """Teach the pink star to `mini` with `method` for `steps` steps at `lr`, exporting every `every` steps (and
    at step 0); returns the run's exports folder (`step-NNNNNN/`, `final/`)."""
    module = make_module(method, lr, seed)
    data = ConceptDataModule(str(CONCEPT_IMAGES), resolution=32, batch_size=4, repeats=50, seed=seed)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=work,
                        gradient_clip_val=None if method == "textual_inversion" else 1.0,
                        enable_progress_bar=progress,
                        callbacks=[Export(every_n_steps=every)] + ([StepProgressBar()] if progress else []))
    trainer.fit(module, data)
    return Path(work) / "exports"
