"""A personalisation installed into the stock pipeline of its base model: what generation and baking work on.

`build(source, concepts)` loads the base model once and installs what `tea_lightning.checkpoints.read` found (token
rows the way diffusers' `load_textual_inversion` adds them, LoRA through diffusers' own loader, Custom Diffusion
processors through ours), so without TEA the pipeline behaves exactly as stock diffusers would with the same files.
`from_module(module)` gives the same over a method's own parts while it trains (sample images, `.ckpt` files).
The result, `Personalized`, says what TEA needs: each concept's keyword and concept word, and where each learned
token's rows live, in which text encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler
from torch import Tensor

from tea_lightning.adapters import install_custom_diffusion, install_lora
from tea_lightning.checkpoints import Concept, Source, owner, token_pattern
from tea_lightning.components import (
    DEFAULT_MODEL,
    DEFAULT_SDXL_MODEL,
    FAMILY_NAMES,
    SDXL,
    build_pipeline,
    load_pipeline,
    model_family,
    text_parts,
)
from tea_lightning.conditioning import ENCODER_NAMES
from tea_lightning.tokens import add_new_tokens, concept_row, placeholder_tokens


@dataclass
class LearnedRows:
    """Learned rows `[k, D]` of the tokens with ids `first_id .. first_id + k - 1` of text encoder `encoder`, and
    their concept rows `[k, D]` in that encoder."""

    first_id: int
    vectors: Tensor
    targets: Tensor
    encoder: int = 0


@dataclass
class Personalized:
    """A stock pipeline with a personalisation installed, and what TEA needs: concepts and learned token rows."""

    pipe: Any  # StableDiffusionPipeline or StableDiffusionXLPipeline
    concepts: list[Concept]
    rows: list[LearnedRows]
    checkpoint: str
    base_model: str


def base_model(source: Source, pretrained: str | None = None) -> str:
    """The base model to install `source` into: the user's, else the one the checkpoint records, else the default of
    its family (SDXL's base for a file with rows for two text encoders or an SDXL LoRA, SD 1.5 otherwise)."""
    sdxl = any(len(rows) == 2 for rows in source.embeddings.values()) or source.sdxl_lora
    return pretrained or source.base_model or (DEFAULT_SDXL_MODEL if sdxl else DEFAULT_MODEL)


def _kind_of(rows: Sequence[Tensor]) -> str:
    if len(rows) == 2:
        return f"an SDXL embedding ({ENCODER_NAMES[0]} and {ENCODER_NAMES[1]} rows)"
    return f"an SD 1.x/2.x embedding (one set of rows, {rows[0].shape[-1]} wide)"


def check_family(source: Source, base: str, family: str) -> None:
    """Refuse embeddings and LoRAs of the other family before any weights load, naming both."""
    count = 2 if family == SDXL else 1
    other = "an SD 1.x/2.x model" if family == SDXL else f"an SDXL model (e.g. {DEFAULT_SDXL_MODEL!r})"
    for token, rows in source.embeddings.items():
        if len(rows) != count:
            raise ValueError(f"{source.path}: {token!r} is {_kind_of(rows)}, but the base model {base!r} is "
                             f"{FAMILY_NAMES[family]}. Pass --pretrained with {other}.")
    if family != SDXL and source.sdxl_lora:
        raise ValueError(f"{source.path} is an SDXL LoRA (it adapts a second text encoder), but the base model "
                         f"{base!r} is {FAMILY_NAMES[family]}. Pass --pretrained with {other}.")


def _check_widths(source: Source, base: str, text_encoders: Sequence[torch.nn.Module]) -> None:
    widths = [e.get_input_embeddings().weight.shape[1] for e in text_encoders]
    for token, rows in source.embeddings.items():
        for e, (encoder_rows, width) in enumerate(zip(rows, widths, strict=True)):
            if encoder_rows.shape[-1] != width:
                which = "text encoder" if len(widths) == 1 else f"{ENCODER_NAMES[e]} text encoder"
                raise ValueError(
                    f"The embedding {token!r} in {source.path} is {encoder_rows.shape[-1]} wide, but the {which} of "
                    f"{base!r} is {width} wide (768 = SD 1.x, 1024 = SD 2.x; SDXL: clip_l 768, clip_g 1280): it was "
                    "trained for another base model. Pass --pretrained with the model it was trained on.")


def build(source: Source, concepts: Sequence[Concept], pretrained: str | None = None,
          concept_reduce: str = "error") -> Personalized:
    """Load the base model and install `source` into it; `concepts` come from `resolve_concepts`."""
    if source.module is not None:
        return from_module(source.module, concepts=concepts, concept_reduce=concept_reduce, checkpoint=source.path)
    base = base_model(source, pretrained)
    check_family(source, base, model_family(base))
    pipe = load_pipeline(base)
    tokenizers, text_encoders = text_parts(pipe)
    _check_widths(source, base, text_encoders)
    first_ids: dict[str, list[int]] = {}  # token -> its first new id in each tokenizer
    for token, rows in source.embeddings.items():
        try:
            first_ids[token] = [add_new_tokens(t, placeholder_tokens(token, len(rows[0])), what="keyword")[0]
                                for t in tokenizers]
        except ValueError as error:
            raise ValueError(f"The embedding's token {token!r} ({source.path}) is already a word of {base!r}, so "
                             "using it would change that word in every prompt. Rename it (AUTOMATIC1111 and kohya "
                             "files are named by their file name, e.g. '<my-concept>.safetensors').") from error
    if first_ids:  # one resize for all tokens: each copies the whole table
        for encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tables = [e.get_input_embeddings() for e in text_encoders]
    with torch.no_grad():
        for token, rows in source.embeddings.items():
            for table, first_id, encoder_rows in zip(tables, first_ids[token], rows, strict=True):
                table.weight[first_id:first_id + len(encoder_rows)] = encoder_rows.to(table.weight.dtype)
    if source.lora is not None:
        install_lora(pipe, source.lora, base)
    if source.custom_diffusion is not None:
        install_custom_diffusion(pipe.unet, source.custom_diffusion, source.path, base)

    owners = {token: owner(concepts, token).keyword for token in source.embeddings}
    concepts = [replace(c, phrase=_phrase(c.keyword, source.embeddings), learned=c.keyword in owners.values())
                for c in concepts]
    learned = []
    for token, rows in source.embeddings.items():
        word = next(c.concept_word for c in concepts if c.keyword == owners[token])
        for e, (tokenizer, table, first_id, encoder_rows) in enumerate(
                zip(tokenizers, tables, first_ids[token], rows, strict=True)):
            target = concept_row(tokenizer, table.weight, word, concept_reduce)
            learned.append(LearnedRows(first_id, encoder_rows, target.expand_as(encoder_rows).clone(), e))
    return Personalized(pipe, list(concepts), learned, source.path, base)


def _phrase(keyword: str, embeddings: dict[str, list[Tensor]]) -> str | None:
    """What the tokenizer reads for `keyword`: each multi-vector token expanded as diffusers names its rows
    (`<v>` → `<v> <v>_1`); None when nothing expands."""
    phrase = keyword
    for token, rows in embeddings.items():
        if len(rows[0]) > 1:
            expansion = " ".join(placeholder_tokens(token, len(rows[0])))
            phrase = token_pattern(token).sub(lambda _, text=expansion: text, phrase)
    return None if phrase == keyword else phrase


# ----------------------------------------------------------------------------------------- a method in training


def from_module(module, scheduler=None, concepts: Sequence[Concept] | None = None, concept_reduce: str = "error",
                checkpoint: str = "(in memory)") -> Personalized:
    """A stock pipeline over a method's own parts (no copy): for sample images while training and for `.ckpt` files.

    The learned rows are read now (`module.learned_vectors(encoder)`), so call it again after the module has
    trained on.
    """
    scheduler = scheduler or DPMSolverMultistepScheduler.from_config(module.noise_scheduler.config)
    pipe = build_pipeline(module.family, module.tokenizers, module.text_encoders, module.vae, module.unet, scheduler)
    concepts = list(concepts or [Concept(module.keyword, module.concept_word)])
    if not concepts[0].concept_word:
        raise ValueError(f"{type(module).__name__} has no concept word, so TEA has nothing to pull towards.")
    rows = []
    for e, (tokenizer, encoder) in enumerate(zip(module.tokenizers, module.text_encoders, strict=True)):
        try:
            vectors, targets = module.learned_vectors(e)  # [k, D] each
        except NotImplementedError:
            break
        concepts = [replace(c, learned=True) for c in concepts]
        if len(concepts) == 1 and concepts[0].concept_word != module.concept_word:
            table = encoder.get_input_embeddings().weight
            targets = concept_row(tokenizer, table, concepts[0].concept_word, concept_reduce).expand_as(vectors)
        start = 0
        for tokens in module.token_modules(e):
            k = len(tokens.vectors)
            rows.append(LearnedRows(tokens.first_id, vectors[start:start + k].detach().float(),
                                    targets[start:start + k].detach().float(), e))
            start += k
        if start != len(vectors):
            raise ValueError(f"{type(module).__name__}.learned_vectors({e}) returned {len(vectors)} rows but its "
                             f"LearnedTokens hold {start}; token-level TEA cannot tell where they go.")
    return Personalized(pipe, concepts, rows, checkpoint, module.pretrained)
