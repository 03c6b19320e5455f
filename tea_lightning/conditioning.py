"""How each model family conditions its UNet on a prompt, for training, generation and drift alike.

- SD 1.x/2.x (one text encoder): the last hidden state after the final layer norm, `[B, 77, D]`, as
  `StableDiffusionPipeline` encodes a prompt.
- SDXL (two text encoders): each encoder's penultimate hidden state, concatenated (`[B, 77, 768 + 1280]`), and the
  pooled, projected output of the second encoder (`[B, 1280]`), as `StableDiffusionXLPipeline.encode_prompt` does.
  The UNet also reads six "time ids" per image: original size, crop top-left and target size (`time_ids`).

The per-encoder parts of the concatenated states come back with `split`: TEA and the drift measures treat each
encoder's part on its own, since the two spaces have their own scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

# SDXL's encoders by the names AUTOMATIC1111, ComfyUI and kohya give their embedding rows (CLIP ViT-L, OpenCLIP bigG).
ENCODER_NAMES = ("clip_l", "clip_g")
# diffusers' suffix of each encoder's parts and files: text_encoder, text_encoder_2; learned_embeds, learned_embeds_2.
SUFFIXES = ("", "_2")


class PromptEmbeds(NamedTuple):
    """A batch of prompts as the UNet reads them: `states` `[B, 77, D]` (cross-attention) and, for SDXL, `pooled`
    `[B, P]` (the second encoder's projected pooled output, added to the timestep embedding)."""

    states: Tensor
    pooled: Tensor | None = None

    def select(self, index) -> PromptEmbeds:
        """The rows `index` (an int, a slice or a list) of both tensors."""
        return PromptEmbeds(self.states[index], None if self.pooled is None else self.pooled[index])

    def detach(self) -> PromptEmbeds:
        return PromptEmbeds(self.states.detach(), None if self.pooled is None else self.pooled.detach())

    def to(self, *args, **kwargs) -> PromptEmbeds:
        return PromptEmbeds(self.states.to(*args, **kwargs),
                            None if self.pooled is None else self.pooled.to(*args, **kwargs))


def stack(rows: Sequence[PromptEmbeds]) -> PromptEmbeds:
    """One batch from single-prompt rows (each `states` `[77, D]`, `pooled` `[P]` or None)."""
    pooled = [r.pooled for r in rows]
    return PromptEmbeds(torch.stack([r.states for r in rows]), None if pooled[0] is None else torch.stack(pooled))


def tokenize(tokenizer, prompts: Sequence[str]) -> Tensor:
    """Token ids `[B, 77]`, padded and truncated to the tokenizer's length, as the stock pipelines tokenize."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_ids(text_encoders: Sequence[torch.nn.Module], ids: Sequence[Tensor]) -> PromptEmbeds:
    """The UNet's conditioning from each encoder's token ids (`ids[i]` for `text_encoders[i]`, `[B, 77]` each)."""
    if len(text_encoders) == 1:
        encoder = text_encoders[0]
        return PromptEmbeds(encoder(ids[0].to(encoder.device))[0])  # [B, 77, D]
    states, pooled = [], None
    for encoder, encoder_ids in zip(text_encoders, ids, strict=True):
        output = encoder(encoder_ids.to(encoder.device), output_hidden_states=True)
        states.append(output.hidden_states[-2])  # [B, 77, D_i]: penultimate layer, no final layer norm
        pooled = getattr(output, "text_embeds", None)  # the last encoder's projected pooled output [B, P]
    return PromptEmbeds(torch.cat(states, dim=-1), pooled)


def encode(tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], prompts: Sequence[str]) -> PromptEmbeds:
    """`prompts` → the UNet's conditioning, exactly as the stock pipeline of the family encodes a prompt."""
    return encode_ids(text_encoders, [tokenize(t, prompts) for t in tokenizers])


def widths(text_encoders: Sequence[torch.nn.Module]) -> list[int]:
    """Each encoder's part of the concatenated states (768 and 1280 for SDXL)."""
    return [encoder.config.hidden_size for encoder in text_encoders]


def split(states: Tensor, encoder_widths: Sequence[int]) -> list[Tensor]:
    """The per-encoder parts `[..., D_i]` of concatenated states `[..., sum D_i]`."""
    if states.shape[-1] != sum(encoder_widths):
        raise ValueError(f"states are {states.shape[-1]} wide, but the text encoders give {list(encoder_widths)}")
    return list(states.split(list(encoder_widths), dim=-1))


def encoder_label(index: int, count: int) -> str:
    """How metrics and messages name encoder `index` of `count`: nothing when there is one, else clip_l / clip_g."""
    return "" if count == 1 else ENCODER_NAMES[index]


def time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: tuple[int, int]) -> Tensor:
    """SDXL's size and crop conditioning `[B, 6]`: (original height, width, crop top, left, target height, width).

    Args:
        original_size: `[B, 2]` height and width of each image as read from disk, before any resize.
        crop_top_left: `[B, 2]` where the training crop starts in the resized (and flipped) image.
        target_size: Height and width of the training images.
    """
    target = torch.tensor(target_size, device=original_size.device).expand(len(original_size), 2)
    return torch.cat([original_size, crop_top_left.to(original_size.device), target], dim=1)


def pipeline_arguments(embeds: PromptEmbeds, negative: PromptEmbeds) -> dict[str, Tensor]:
    """The stock pipeline's embedding arguments (`prompt_embeds`, `negative_prompt_embeds`, and SDXL's pooled ones);
    `negative` (one row) is repeated for every prompt."""
    count = len(embeds.states)
    arguments = {"prompt_embeds": embeds.states, "negative_prompt_embeds": negative.states.expand(count, -1, -1)}
    if embeds.pooled is not None:
        arguments["pooled_prompt_embeds"] = embeds.pooled
        arguments["negative_pooled_prompt_embeds"] = negative.pooled.expand(count, -1)
    return arguments
