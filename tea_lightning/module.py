"""The shared LightningModule: diffusion loss, prior preservation, regularisers, optimiser, pruned checkpoints.

A training step reads top to bottom: images → VAE latents → noise at a random timestep → UNet prediction → MSE
against the scheduler's target. Each method (one file each) only says which text it encodes, how, and which
tensors it trains and exports.

One code path serves both model families (design decision 7): "the text encoders" are a list (one for SD 1.x/2.x,
two for SDXL, as `text_encoder` and `text_encoder_2`, diffusers' names), prompts become a `PromptEmbeds` the way the
family's stock pipeline encodes them (`tea_lightning.conditioning`), and an SDXL step also gives the UNet each
image's size and crop (`time_ids`), read from the batch the data module made.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from tea_lightning.components import DEFAULT_MODEL, SDXL, load_components
from tea_lightning.conditioning import SUFFIXES, PromptEmbeds, encode, stack, time_ids, tokenize
from tea_lightning.prompt_sets import SLOT, fill
from tea_lightning.regularizers import Regularizer, check_regularizers
from tea_lightning.seeding import sample_seed
from tea_lightning.speed import DEFAULT_SPEED, LatentCache, Speed, fused, prepare
from tea_lightning.tokens import LearnedTokens

# Frozen parts stay in eval mode on purpose (no dropout in frozen weights), and our stream shards itself across
# workers: Lightning's generic warnings about both are noise here.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined.*")
# Lightning 2.6's own batch flattening calls an API that newer torch deprecates; nothing a user can change.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated.*")
# Lightning advertises its cloud logger at every fit ("💡 Tip: ..."): not about the run.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "💡" not in record.getMessage())

_HALF = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16, "16-true": torch.float16, "bf16-true": torch.bfloat16}


def _checkpoint_non_reentrant(module: torch.nn.Module, *args: Any) -> Any:
    # The reentrant variant gives no gradient to adapters whose inputs need none, and breaks under DDP.
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def checkpoint_text_encoder(encoder: torch.nn.Module) -> None:
    """Recompute a transformers text encoder's layer activations in the backward pass (non-reentrant).

    transformers only checkpoints a layer whose own `training` flag is set; only that flag is raised, on the layers
    themselves, so their attention and MLP stay in eval mode (no dropout in frozen weights).
    """
    if hasattr(encoder, "activation_checkpointing_enable"):  # transformers ≥ 5.x; the older name warns there
        encoder.activation_checkpointing_enable({"use_reentrant": False})
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in encoder.modules():
        if getattr(layer, "gradient_checkpointing", False):
            layer.training = True


def masked_mean(error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean `[B]` of `error` `[B, C, h, w]` over the positions weighted by `mask` `[B, 1, h, w]`."""
    weight = mask.expand_as(error)
    return (error * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp_min(1e-8)


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str,
                   gamma: float, floor: float = 0.0) -> torch.Tensor:
    """Min-SNR-γ loss weights `[B]` (Hang et al., 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    Every prediction type then weights the error of its implied clean image by min(SNR(t), γ): high-noise steps
    stop dominating and low-noise steps, where the details are drawn, count up to γ times. In the target's own
    units that is min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR + 1) for v and min(SNR, γ) for the clean sample,
    the weights of diffusers' training scripts' ``--snr_gamma``. `floor` > 0 also clips the SNR from below, so
    that near-pure-noise steps keep a weight of `floor` on the clean-image error instead of almost none.
    """
    alpha = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha / (1 - alpha)
    clipped = snr.clamp(min=floor, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"Min-SNR weighting does not know prediction_type {prediction_type!r}")


class DiffusionModule(L.LightningModule):
    """Base of every method. Subclasses implement `keyword`, `export` and, when they differ, `encode_prompts`.

    Args:
        pretrained: Hub id, local diffusers folder, or ``tiny`` (the built-in offline model).
        seed: Seed of the per-step noise and timesteps (with the step number, so resumed runs match).
        prior_loss_weight: Weight of the class-image term when the batch carries class images.
        snr_gamma: Min-SNR-γ loss weighting (`min_snr_weight`; 5 is the paper's value); None weights every
            timestep alike, as the original trainers do.
        snr_floor: Lower clip of the same weights (0: Min-SNR as published). 1 keeps the near-pure-noise steps,
            where a model predicting the clean image learns the layout the prompt asks for, at their plain weight.
        gradient_checkpointing: Recompute the activations of the UNet, and of every text encoder the gradient
            flows through, in the backward pass (less memory, about 20% slower); non-reentrant, so it works under DDP.
        regularizers: Penalties on the learned vectors added to the loss (see `tea_lightning.regularizers`).
        optimizer: Optimiser over the trainable tensors only (YAML: ``class_path`` + ``init_args``).
        lr_scheduler: Optional learning-rate schedule, stepped every optimiser step.
        speed: Speed-ups of the training step (latent cache, attention kernel, CUDA settings, ...); see `Speed`.
    """

    method = "base"
    concept_word: str | None = None  # the word TEA pulls the keyword back towards ("man", "dog")
    trains_text_encoder = False  # True when the text encoder's own weights change (DreamBooth with text-encoder LoRA)

    def __init__(self, pretrained: str = DEFAULT_MODEL, seed: int = 0, prior_loss_weight: float = 1.0,
                 snr_gamma: float | None = None, snr_floor: float = 0.0, gradient_checkpointing: bool = False,
                 regularizers: list[Regularizer] | None = None,
                 optimizer: OptimizerCallable = torch.optim.AdamW,
                 lr_scheduler: LRSchedulerCallable | None = None, speed: Speed = DEFAULT_SPEED) -> None:
        super().__init__()
        if prior_loss_weight < 0:
            raise ValueError(f"model.prior_loss_weight={prior_loss_weight} is negative; use 0 or more.")
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"model.snr_gamma={snr_gamma} must be positive (5 is usual), or null for no weighting.")
        if snr_floor and (snr_gamma is None or not 0 <= snr_floor < snr_gamma):
            raise ValueError(f"model.snr_floor={snr_floor} needs model.snr_gamma set and must lie in [0, snr_gamma); "
                             "use 0 for Min-SNR as published, or 1 with snr_gamma 5.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "regularizers", "speed"])
        self.pretrained, self.snr_gamma, self.snr_floor = pretrained, snr_gamma, snr_floor
        parts = load_components(pretrained)
        self.family, self.noise_scheduler = parts.family, parts.noise_scheduler
        self.vae, self.unet = parts.vae, parts.unet
        # `text_encoder`, `text_encoder_2`, ...: diffusers' names, so state-dict keys read like its files.
        for suffix, tokenizer, encoder in zip(SUFFIXES, parts.tokenizers, parts.text_encoders, strict=False):
            setattr(self, f"tokenizer{suffix}", tokenizer)
            setattr(self, f"text_encoder{suffix}", encoder)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing(_checkpoint_non_reentrant)
        self.regularizers = list(regularizers or [])
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._last_loss: torch.Tensor | None = None
        self.cache_class_prompts = True  # reuse class-prompt encodings while the text encoder is frozen
        self._class_states: dict[str, PromptEmbeds] = {}  # one row per class prompt
        self.speed, self.latent_cache = speed, LatentCache()

    @property
    def tokenizers(self) -> list:
        """One tokenizer per text encoder."""
        return [getattr(self, f"tokenizer{s}") for s in SUFFIXES[:self.num_text_encoders]]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders: one for SD 1.x/2.x; CLIP ViT-L and OpenCLIP bigG for SDXL."""
        return [getattr(self, f"text_encoder{s}") for s in SUFFIXES[:self.num_text_encoders]]

    @property
    def num_text_encoders(self) -> int:
        return 2 if self.family == SDXL else 1

    # ----- what each method defines -------------------------------------------------------------------------------
    @property
    def keyword(self) -> str:
        """The phrase that fills a template's `{}` slot ("<v>", "sks dog")."""
        raise NotImplementedError

    @property
    def keywords(self) -> list[str]:
        """The keyword of each concept, in the order of the data's concepts (one for single-concept methods)."""
        return [self.keyword]

    def export(self, folder: Path, step: int) -> None:
        """Write the method's diffusers-loadable files and `tea.json` into `folder` (which exists and is empty)."""
        raise NotImplementedError

    def learned_vectors(self, encoder: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned keyword vectors `[k, D]` in text encoder `encoder` and their concept rows `[k, D]`, for
        regularisers and drift (SDXL learns rows in each encoder, each its own width)."""
        raise NotImplementedError(f"{type(self).__name__} learns no token vectors")

    def token_modules(self, encoder: int = 0) -> list[LearnedTokens]:
        """The `LearnedTokens` spliced into text encoder `encoder`, whose rows `learned_vectors(encoder)` returns in
        the same order; none when the method learns no token rows."""
        return []

    # ----- the diffusion loss -------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """The first tokenizer's ids `[B, 77]` (SDXL's second tokenizer splits prompts the same way)."""
        return tokenize(self.tokenizer, prompts).to(self.device)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """The UNet's text conditioning: states `[B, 77, D]` (SDXL: both encoders' penultimate states, concatenated)
        and, for SDXL, the second encoder's pooled output `[B, P]`."""
        return encode(self.tokenizers, self.text_encoders, prompts)

    def batch_prompts(self, batch: dict[str, Any]) -> list[str]:
        """Each sample's prompt: its template filled with its concept's keyword; a class prompt (no `{}`) as is."""
        keywords = self.keywords
        concepts = batch.get("concept") or [0] * len(batch["template"])
        return [fill(t, keywords[c]) if SLOT in t else t for t, c in zip(batch["template"], concepts, strict=True)]

    def text_states(self, batch: dict[str, Any]) -> PromptEmbeds:
        """The text conditioning of a batch. Class prompts are encoded once and reused while the text encoders'
        weights are frozen (they hold no learned token)."""
        prompts = self.batch_prompts(batch)
        fixed = {i for i, t in enumerate(batch["template"]) if SLOT not in t}
        if not fixed or self.trains_text_encoder or not self.cache_class_prompts:
            return self.encode_prompts(prompts)
        new = sorted({prompts[i] for i in fixed} - self._class_states.keys())
        if new:
            with torch.no_grad():
                encoded = self.encode_prompts(new)
                self._class_states.update((p, encoded.select(i)) for i, p in enumerate(new))
        varying = [p for i, p in enumerate(prompts) if i not in fixed]
        encoded = self.encode_prompts(varying) if varying else None
        rows, k = [], 0
        for i, prompt in enumerate(prompts):
            if i in fixed:
                rows.append(self._class_states[prompt])
            else:
                rows.append(encoded.select(k))
                k += 1
        return stack(rows)

    def time_ids(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """SDXL's size and crop conditioning `[B, 6]` of each image (`conditioning.time_ids`), from the original size
        and crop the data module recorded; None for SD 1.x/2.x, whose UNet reads no time ids."""
        if self.family != SDXL:
            return None
        if "original_size" not in batch or "crop_top_left" not in batch:
            raise ValueError("An SDXL batch must carry each image's original_size and crop_top_left (the "
                             "ConceptDataModule records them); SDXL's UNet is conditioned on them.")
        return time_ids(batch["original_size"], batch["crop_top_left"], tuple(batch["pixel_values"].shape[-2:]))

    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator,
                      keys: list | None = None) -> torch.Tensor:
        """Latents sampled with `generator`. With `keys` (`data.latent_keys`, one per image: what its pixels are a
        pure function of) and `speed.cache_latents`, each image's posterior is encoded once and then reused."""
        vae = self.vae
        if keys is not None and self.speed.cache_latents:
            posterior = self.latent_cache.posterior(
                keys, pixel_values, lambda pixels: vae.encode(pixels.to(vae.dtype)).latent_dist.parameters)
        else:
            posterior = vae.encode(pixel_values.to(vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)  # [B, 4, H/8, W/8]
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Noise, timesteps and latent samples of a step come from (seed, step, micro-batch, rank), not from the
        global RNG: a run resumed from a checkpoint draws exactly what the uninterrupted run drew."""
        seed = sample_seed(self.hparams.seed, self.global_step, batch_idx, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def diffusion_loss(self, latents: torch.Tensor, text: PromptEmbeds, generator: torch.Generator,
                       mask: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample MSE `[B]` between the UNet's prediction and the scheduler's target, averaged over the pixels
        where `mask` `[B, 1, H, W]` (image resolution) is 1 when one is given, and weighted by Min-SNR-γ when
        `snr_gamma` is set. SDXL's UNet also reads `text.pooled` and `time_ids` `[B, 6]` (`self.time_ids(batch)`)."""
        scheduler = self.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator, device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        added = None
        if text.pooled is not None:
            if time_ids is None:
                raise ValueError("SDXL's UNet needs time_ids (original size, crop, target size); pass "
                                 "module.time_ids(batch).")
            added = {"text_embeds": text.pooled.to(self.unet.dtype), "time_ids": time_ids.to(self.unet.dtype)}
        prediction = self.unet(noisy, timesteps, text.states.to(self.unet.dtype), added_cond_kwargs=added).sample
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        elif scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        elif scheduler.config.prediction_type == "sample":  # x0-prediction (the `mini` world)
            target = latents
        else:
            raise ValueError(f"Unsupported prediction_type {scheduler.config.prediction_type!r} in {self.pretrained}")
        error = F.mse_loss(prediction.float(), target.float(), reduction="none")  # [B, C, h, w]
        if mask is None:
            per_sample = error.mean(dim=(1, 2, 3))
        else:
            per_sample = masked_mean(error, F.interpolate(mask.float(), size=error.shape[-2:], mode="area"))
        if self.snr_gamma is None:
            return per_sample
        return per_sample * min_snr_weight(scheduler.alphas_cumprod, timesteps, scheduler.config.prediction_type,
                                           self.snr_gamma, self.snr_floor)

    def combine(self, per_sample: torch.Tensor, is_class: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """Instance loss, plus `prior_loss_weight` × class loss when the batch carries class images."""
        if is_class is None:
            return per_sample.mean(), {}
        is_class = is_class.to(per_sample.device)
        instance = per_sample[~is_class].mean()
        prior = per_sample[is_class].mean()
        return instance + self.hparams.prior_loss_weight * prior, {"train/instance_loss": instance,
                                                                    "train/prior_loss": prior}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        generator = self.step_generator(batch_idx)
        latents = self.encode_images(batch["pixel_values"], generator, batch.get("latent_keys"))
        per_sample = self.diffusion_loss(latents, self.text_states(batch), generator, mask=batch.get("mask"),
                                         time_ids=self.time_ids(batch))
        loss, parts = self.combine(per_sample, batch.get("is_class"))
        if self.regularizers:
            rows = [self.learned_vectors(e) for e in range(self.num_text_encoders)]
            for regularizer in self.regularizers:
                # SDXL: each encoder's rows are penalised against their own concept row, and the penalties add up.
                value = sum(regularizer(vectors, concept) for vectors, concept in rows)
                parts[f"train/{regularizer.name}"] = value
                loss = loss + value
        self.log("train/loss", loss, prog_bar=True)
        if parts:
            self.log_dict(parts)
        self._last_loss = loss.detach()
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The previous step's loss is finished by now, so this check costs no GPU sync in the hot path.
        if self._last_loss is not None and not torch.isfinite(self._last_loss):
            raise FloatingPointError(
                f"The loss became {self._last_loss.item()} at step {self.global_step}; training stopped before any "
                "non-finite weights were exported. Lower the learning rate, or train with trainer.precision "
                "bf16-mixed or 32 instead of 16-mixed.")

    # ----- precision, optimiser, checkpoints ----------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def setup(self, stage: str) -> None:
        # Frozen weights run in half precision on CUDA under mixed precision; trainables stay fp32 so the
        # gradient scaler never meets fp16 parameters ("Attempting to unscale FP16 gradients"). Cast here, before
        # Lightning moves the module, so the fp32 copies never occupy GPU memory.
        dtype = _HALF.get(str(self.trainer.precision))
        if dtype is not None and self.trainer.strategy.root_device.type == "cuda" and self.speed.frozen_half:
            # SDXL's VAE overflows in fp16 (NaN latents) and says so with `force_upcast`, as the stock SDXL pipeline
            # reads it: under fp16 it stays fp32 (bf16 has fp32's range). With cached latents it runs once per image.
            upcast = self.family == SDXL and dtype == torch.float16 and self.vae.config.get("force_upcast", False)
            keep = {id(p) for p in self.vae.parameters()} if upcast else set()
            for p in self.parameters():
                if not p.requires_grad and id(p) not in keep:
                    p.data = p.data.to(dtype)

    def on_fit_start(self) -> None:
        if self.gradient_checkpointing:  # the text encoders the gradient flows through: trained, or holding rows
            for e, encoder in enumerate(self.text_encoders):
                if any(p.requires_grad for p in encoder.parameters()) or self.token_modules(e):
                    checkpoint_text_encoder(encoder)
        check_regularizers(self)  # before the first step: a regulariser this method cannot feed is a config error
        # Caches made before now may hold another dtype or device.
        self._class_states.clear()
        self.latent_cache.clear()
        prepare(self.speed, self.unet, self.vae, self.device)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.speed.fused_optimizer:
            optimizer = fused(optimizer, self.device)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep only what training changes: a TI checkpoint is kilobytes, not the 4 GB of frozen weights.
        checkpoint["state_dict"] = self.trainable_state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        expected = set(self.trainable_state_dict())
        missing = expected - set(state_dict)
        if missing:
            raise KeyError(f"The checkpoint lacks trainable tensors {sorted(missing)[:5]}; it was written by another "
                           "method or configuration. Resume with the config that wrote it.")
        return super().load_state_dict(state_dict, strict=False, assign=assign)
