"""The reference training step: what diffusers' example scripts do every step, written from their description in
`shared/reference/users-and-costs.md` (textual_inversion.py, train_dreambooth_lora.py, train_custom_diffusion.py,
and for SDXL textual_inversion_sdxl.py and train_dreambooth_lora_sdxl.py).

- the image goes through the VAE encoder every step;
- the prompt goes through the text encoder(s) every step; for SDXL both encoders' penultimate hidden states are
  concatenated, the second's pooled output and the time ids (original size, crop, target size) go to the UNet;
- UNet forward and backward under fp16/bf16 autocast, frozen UNet and VAE in that half type on CUDA
  (`weight_dtype`), trainables fp32;
- new tokens (Textual Inversion's placeholder, Custom Diffusion's modifier) are trained as rows of the whole
  token-embedding matrix: AdamW holds state for all 49,408 × 768 entries; Textual Inversion restores the frozen rows
  from a copy after every step, Custom Diffusion zeroes their gradients before the step; on SDXL the rows of both
  encoders train this way (diffusers' SDXL script trains the first encoder's only; tea-lightning trains both);
- LoRA (peft adapters, as `add_adapter` makes them) or Custom Diffusion's key/value attention processors train
  inside the UNet.

It starts from the same weights and the same initial trainables as a tea-lightning module (`Template.of(module)`),
so the two train the same thing and, with the same generator, compute the same loss (tests/test_bench.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, CustomDiffusionAttnProcessor2_0
from peft import LoraConfig, inject_adapter_in_model

from tea_lightning.components import SDXL, load_components
from tea_lightning.module import _HALF, DiffusionModule
from tea_lightning.prompt_sets import fill
from tea_lightning.seeding import sample_seed

DIFFUSERS_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def _peft_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "peft_config", None)
    return copy.deepcopy(next(iter(config.values()))) if config else None


def _trainables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}


@dataclass
class Template:
    """What the reference copies from a fresh tea-lightning module so both train the same thing: method, keyword,
    seed, weights, new tokens with their initial rows, and adapter configurations with their initial tensors."""

    method: str
    keyword: str
    seed: int
    pretrained: str
    new_tokens: list[str]
    new_rows: list[torch.Tensor] | None  # per text encoder
    unet_peft: Any
    unet_init: dict[str, torch.Tensor]
    text_peft: Any
    text_init: list[dict[str, torch.Tensor]]  # per text encoder

    @classmethod
    def of(cls, module: DiffusionModule) -> Template:
        """Read from a module that has not trained yet."""
        encoders = range(module.num_text_encoders)
        spliced = [sorted(module.token_modules(e), key=lambda m: m.first_id) for e in encoders]
        ids = [m.first_id + i for m in spliced[0] for i in range(len(m.vectors))]
        rows = [torch.cat([m.vectors.detach().float().clone() for m in s]) for s in spliced] if ids else None
        return cls(method=module.method, keyword=module.keyword, seed=int(module.hparams.seed),
                   pretrained=module.pretrained, new_tokens=module.tokenizer.convert_ids_to_tokens(ids),
                   new_rows=rows, unet_peft=_peft_config(module.unet), unet_init=_trainables(module.unet),
                   text_peft=_peft_config(module.text_encoder),
                   text_init=[_trainables(e) for e in module.text_encoders])


class ReferenceStep:
    """A reference trainer for the method of a tea-lightning module, on its own copy of the same weights.

    Args:
        template: `Template.of(module)` of a fresh tea-lightning module.
        device: Where to train.
        precision: Lightning precision string ("32", "bf16-mixed", "16-mixed").
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (diffusers' default 1e-2).
        eps: AdamW epsilon (diffusers' default 1e-8).
    """

    def __init__(self, template: Template, device: torch.device, precision: str = "32", lr: float = 5e-4,
                 weight_decay: float = 1e-2, eps: float = 1e-8) -> None:
        self.device, self.keyword, self.seed, self.method = device, template.keyword, template.seed, template.method
        half = _HALF.get(str(precision))
        self.autocast = half if half is not None and str(precision).endswith("-mixed") else None
        self.weight_dtype = half if (half is not None and device.type == "cuda") else torch.float32
        parts = load_components(template.pretrained)
        self.sdxl, self.scheduler = parts.family == SDXL, parts.noise_scheduler
        self.tokenizers, self.text_encoders = parts.tokenizers, parts.text_encoders
        self.text_encoder = parts.text_encoder  # the first (SD's only) one
        self.vae, self.unet = parts.vae, parts.unet

        # TI placeholder / CD modifier rows of each text encoder, trained via the whole matrix.
        self.encoder_ids = [self._add_tokens(template, e) for e in range(len(self.text_encoders))]
        self.new_ids = self.encoder_ids[0]
        self._add_unet_adapters(template)
        if template.text_peft is not None:  # DreamBooth with text-encoder LoRA
            for encoder, initial in zip(self.text_encoders, template.text_init, strict=True):
                inject_adapter_in_model(copy.deepcopy(template.text_peft), encoder)
                _copy_into(encoder, initial)

        # Frozen parts in weight_dtype, trainables fp32; a text encoder stays fp32 when its token table trains.
        for model in (self.vae, self.unet, *self.text_encoders):
            model.to(device)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
                elif not (model in self.text_encoders and self.new_ids):
                    p.data = p.data.to(self.weight_dtype)
        self.trainable = [p for m in (self.unet, *self.text_encoders) for p in m.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError(f"The reference for {template.method!r} found nothing to train.")
        self.optimizer = torch.optim.AdamW(self.trainable, lr=lr, weight_decay=weight_decay, eps=eps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast == torch.float16)
        if self.new_ids:
            self.orig_embeds_params = [e.get_input_embeddings().weight.data.clone() for e in self.text_encoders]
        self.step_count = 0

    # ----- set-up: the same trainables as ours ----------------------------------------------------------------------
    def _add_tokens(self, template: Template, encoder: int) -> list[int]:
        if not template.new_tokens:
            return []
        tokenizer, text_encoder = self.tokenizers[encoder], self.text_encoders[encoder]
        base = len(tokenizer)
        tokenizer.add_tokens(template.new_tokens)
        ids = tokenizer.convert_tokens_to_ids(template.new_tokens)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = text_encoder.get_input_embeddings()
        if template.new_rows is not None:
            with torch.no_grad():
                table.weight[ids] = template.new_rows[encoder].to(table.weight.dtype)
        if ids != list(range(base, base + len(ids))):
            raise RuntimeError(f"The reference tokenizer gave the new tokens {template.new_tokens} ids {ids}.")
        text_encoder.requires_grad_(False)
        table.requires_grad_(True)  # the whole matrix, as the reference scripts do
        return ids

    def _add_unet_adapters(self, template: Template) -> None:
        if template.method.startswith("dreambooth"):
            # What `unet.add_adapter` does in the scripts (called directly: diffusers' wrapper wants peft ≥ 0.22).
            config = template.unet_peft or LoraConfig(
                r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=DIFFUSERS_LORA_TARGETS)
            inject_adapter_in_model(config, self.unet)
        elif template.method.startswith("custom"):
            self._custom_diffusion_processors()
        _copy_into(self.unet, template.unet_init)

    def _custom_diffusion_processors(self) -> None:
        """train_custom_diffusion.py with --freeze_model crossattn_kv: new key/value projections of every cross
        attention, initialised from the pretrained ones; self-attention keeps its frozen weights."""
        processors = {}
        for name in self.unet.attn_processors:
            layer = self.unet.get_submodule(name.rsplit(".processor", 1)[0])
            hidden, cross = layer.to_k.weight.shape
            if name.endswith("attn2.processor"):
                processor = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=hidden,
                                                            cross_attention_dim=cross)
                processor.load_state_dict({"to_k_custom_diffusion.weight": layer.to_k.weight.detach().float(),
                                           "to_v_custom_diffusion.weight": layer.to_v.weight.detach().float()})
                processors[name] = processor
            else:
                processors[name] = AttnProcessor2_0()
        self.unet.set_attn_processor(processors)

    # ----- one step ------------------------------------------------------------------------------------------------
    def generator(self, step: int) -> torch.Generator:
        """The generator a tea-lightning module uses at optimiser step `step` on rank 0 (`step_generator`: Lightning's
        batch_idx equals the step within the first epoch)."""
        return torch.Generator(device=self.device).manual_seed(sample_seed(self.seed, step, step, 0))

    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The scripts' loss: fresh VAE latents, fresh text encoding, MSE of the UNet's prediction."""
        pixel_values = batch["pixel_values"].to(self.device, non_blocking=True)
        prompts = [fill(template, self.keyword) for template in batch["template"]]
        input_ids = [t(prompts, padding="max_length", max_length=t.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(self.device) for t in self.tokenizers]
        latents = self.vae.encode(pixel_values.to(self.weight_dtype)).latent_dist.sample(generator=generator)
        latents = latents.detach() * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator, device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.sdxl:  # textual_inversion_sdxl.py / train_dreambooth_lora_sdxl.py
            outputs = [e(ids, output_hidden_states=True) for e, ids in zip(self.text_encoders, input_ids, strict=True)]
            encoder_hidden_states = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1).to(self.weight_dtype)
            size = list(pixel_values.shape[-2:])
            time_ids = torch.tensor([list(o) + list(c) + size for o, c in zip(
                batch["original_size"].tolist(), batch["crop_top_left"].tolist(), strict=True)], device=self.device)
            added = {"text_embeds": outputs[1][0].to(self.weight_dtype), "time_ids": time_ids.to(self.weight_dtype)}
        else:
            encoder_hidden_states, added = self.text_encoder(input_ids[0])[0].to(self.weight_dtype), None
        prediction = self.unet(noisy, timesteps, encoder_hidden_states, added_cond_kwargs=added).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")

    def step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimiser step; returns the detached loss."""
        generator = self.generator(self.step_count)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            loss = self.loss(batch, generator)
        self.scaler.scale(loss).backward()
        custom = self.method.startswith("custom")
        for tokenizer, encoder, ids in zip(self.tokenizers, self.text_encoders, self.encoder_ids, strict=True):
            if ids and custom:
                # train_custom_diffusion.py: zero the gradients of every row but the modifier tokens'.
                grads = encoder.get_input_embeddings().weight.grad
                index_grads_to_zero = torch.arange(len(tokenizer)) != ids[0]
                for token_id in ids[1:]:
                    index_grads_to_zero = index_grads_to_zero & (torch.arange(len(tokenizer)) != token_id)
                grads.data[index_grads_to_zero, :] = grads.data[index_grads_to_zero, :].fill_(0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.new_ids and not custom:
            for tokenizer, encoder, ids, original in zip(self.tokenizers, self.text_encoders, self.encoder_ids,
                                                         self.orig_embeds_params, strict=True):
                # textual_inversion.py: put back every row but the placeholder's (weight decay moved them all).
                index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
                index_no_updates[min(ids): max(ids) + 1] = False
                with torch.no_grad():
                    encoder.get_input_embeddings().weight[index_no_updates] = original[index_no_updates]
        self.step_count += 1
        return loss.detach()

    def learned_rows(self, encoder: int = 0) -> torch.Tensor:
        """The trained token rows `[k, D]` of text encoder `encoder` (Textual Inversion / Custom Diffusion)."""
        return self.text_encoders[encoder].get_input_embeddings().weight[self.encoder_ids[encoder]].detach()


def _copy_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """Copy same-named, same-shaped trainable tensors into `model` (the same initial adapters as ours)."""
    own = {name: p for name, p in model.named_parameters() if p.requires_grad}
    copied = 0
    with torch.no_grad():
        for name, value in tensors.items():
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value.to(own[name].dtype))
                copied += 1
    return copied
