"""DreamBooth with LoRA: low-rank adapters on the UNet's attention (and optionally the text encoder), a rare
identifier before the concept word ("a photo of sks dog"), usually with prior preservation.

The adapters are peft LoRA layers; everything else stays frozen. The export is the file diffusers'
`StableDiffusionPipeline.save_lora_weights` writes, with the standard text-encoder names, so
`pipe.load_lora_weights(folder)` loads it unchanged on transformers 4 and 5; beside it the same adapters in kohya's
layout (`lora_unet_…`/`lora_te_…` with `.alpha`) for AUTOMATIC1111 and ComfyUI.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from tea_lightning import export
from tea_lightning.adapters import diffusers_lora_layers, kohya_lora_layers, standard_text_encoder_names
from tea_lightning.module import DiffusionModule
from tea_lightning.seeding import sample_seed

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class DreamBoothLoRA(DiffusionModule):
    """DreamBooth-LoRA (Ruiz et al. with Hu et al.'s low-rank adapters): "a photo of sks dog".

    Args:
        concept_word: The class noun after the identifier ("dog"); the class prompt and TEA use it.
        identifier: Rare token written before the concept word ("sks").
        rank: LoRA rank (4 in the paper).
        lora_alpha: LoRA scale numerator (the adapter adds alpha/rank · up·down); default = rank.
        dropout: Dropout on the LoRA input.
        train_text_encoder: Also put LoRA on the text encoder's q/k/v/out projections (the authors did).
        pretrained, seed, prior_loss_weight, gradient_checkpointing, regularizers, optimizer, lr_scheduler: see
            `DiffusionModule`.
    """

    method = "dreambooth_lora"

    def __init__(self, concept_word: str, identifier: str = "sks", rank: int = 4, lora_alpha: float | None = None,
                 dropout: float = 0.0, train_text_encoder: bool = True, **kwargs) -> None:
        if rank < 1:
            raise ValueError(f"model.rank={rank}; a LoRA rank is at least 1 (4 is the usual choice).")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout={dropout} is not in [0, 1).")
        if not concept_word.strip() or not identifier.strip() or "{" in identifier + concept_word:
            raise ValueError(f"model.identifier={identifier!r} and model.concept_word={concept_word!r} must be plain "
                             "words, e.g. identifier 'sks' and concept_word 'dog' ('a photo of sks dog').")
        super().__init__(**kwargs)
        self.concept_word, self.identifier = concept_word, identifier
        self.trains_text_encoder = train_text_encoder
        self.lora_alpha = rank if lora_alpha is None else lora_alpha
        self.lora_scale = self.lora_alpha / rank
        config = dict(r=rank, lora_alpha=self.lora_alpha, lora_dropout=dropout, init_lora_weights="gaussian")
        # inject_adapter_in_model creates the LoRA tensors trainable and in fp32; the base weights stay frozen. Their
        # random start comes from the seed, so two modules built alike start alike (resume, DDP, comparisons).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.hparams.seed, 2))
            inject_adapter_in_model(LoraConfig(target_modules=UNET_TARGETS, **config), self.unet)
            if train_text_encoder:
                inject_adapter_in_model(LoraConfig(target_modules=TEXT_ENCODER_TARGETS, **config), self.text_encoder)
        if dropout:  # LoRA dropout only acts in train mode; the frozen weights have no dropout of their own
            self.unet.train()
            self.text_encoder.train(train_text_encoder)

    @property
    def keyword(self) -> str:
        return f"{self.identifier} {self.concept_word}"

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.hparams.dropout:  # dropout masks from (seed, step, rank): a resumed run draws the same ones
            torch.manual_seed(sample_seed(self.hparams.seed, self.global_step, batch_idx, self.global_rank, 1))

    def export(self, folder: Path, step: int) -> None:
        from diffusers import StableDiffusionPipeline

        unet = diffusers_lora_layers(self.unet, self.lora_scale)
        text_encoder = (standard_text_encoder_names(diffusers_lora_layers(self.text_encoder, self.lora_scale))
                        if self.trains_text_encoder else None)
        # The stock writer names the keys; our save function makes the write atomic and refuses NaN.
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=unet, text_encoder_lora_layers=text_encoder, weight_name=export.LORA_WEIGHTS,
            save_function=lambda tensors, path: export.write_safetensors(tensors, Path(path), {"format": "pt"}))
        kohya = kohya_lora_layers(get_peft_model_state_dict(self.unet), "lora_unet", self.lora_alpha)
        if self.trains_text_encoder:
            kohya |= kohya_lora_layers(standard_text_encoder_names(get_peft_model_state_dict(self.text_encoder)),
                                       "lora_te", self.lora_alpha)
        export.write_safetensors(kohya, folder / export.KOHYA_LORA, {
            "ss_network_module": "networks.lora", "ss_network_dim": str(self.hparams.rank),
            "ss_network_alpha": str(self.lora_alpha), "format": "pt"})
        export.write_tea_json(folder, method=self.method, base_model=self.pretrained, keyword=self.keyword,
                              concept_word=self.concept_word, step=step, identifier=self.identifier,
                              rank=self.hparams.rank, trains_text_encoder=self.trains_text_encoder)
