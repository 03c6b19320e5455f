"""Drift measured on a tokenizer and text encoder (method.md §3): the vocabulary's norms, the learned rows' vector
drift, a prompt set encoded to one vector per sentence, and the histogram of Figure 4.

`drift.py` holds the math; this file applies it to a model's text side. The drift callbacks use it every N steps
while training, the drift report on every step-stamped export afterwards, so both measure the same quantities.
SDXL's two text encoders are measured each on its own (their spaces have their own scales), under keys that name
the encoder: `drift/clip_l/norm`, `drift_sets/clip_g/inter_l2`; SD 1.x/2.x keys name none (`drift/norm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from tea_lightning import drift
from tea_lightning.conditioning import encoder_label, split
from tea_lightning.prompt_sets import SLOT, available_concepts, resolve

VECTOR_PREFIX = "drift/"  # EmbeddingDrift's TensorBoard keys: drift/norm, drift/norm_ratio, ...
SETS_PREFIX = "drift_sets/"  # ContextualDrift's: drift_sets/inter_l2, drift_sets/intra_hausdorff, ...


def metric_key(prefix: str, key: str, encoder: int, count: int) -> str:
    """`drift/norm` for the only text encoder; `drift/clip_l/norm`, `drift/clip_g/norm` for SDXL's two."""
    label = encoder_label(encoder, count)
    return f"{prefix}{label}/{key}" if label else f"{prefix}{key}"


# ------------------------------------------------------------------------------------------------ token level


def vocabulary_norms(tokenizer: Any, text_encoder: torch.nn.Module) -> Tensor:
    """Norms `[V]` of the base vocabulary's input-embedding rows (tokens added for placeholders are left out)."""
    weight = text_encoder.get_input_embeddings().weight
    return weight[: min(tokenizer.vocab_size, weight.shape[0])].detach().float().norm(dim=-1)


def embedding_drift(vectors: Tensor, concept_rows: Tensor, initial: Tensor, vocab_norms: Tensor) -> dict[str, float]:
    """`drift.vector_drift` for every learned row against its own concept row, averaged over the rows.

    Args:
        vectors: Learned rows `[k, D]` (`module.learned_vectors()[0]`).
        concept_rows: Each row's concept-word row `[k, D]` (several concepts may share one module).
        initial: The learned rows at the start of training `[k, D]`.
        vocab_norms: `[V]` from `vocabulary_norms`.
    """
    rows = [drift.vector_drift(v, c, i, vocab_norms) for v, c, i in zip(vectors, concept_rows, initial, strict=True)]
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


RED, BLUE, GREY = (220, 30, 30), (40, 80, 200), (110, 110, 110)


def histogram_image(vocab_norms: Tensor, marks: dict[str, tuple[float, tuple[int, int, int]]], bins: int = 80,
                    size: tuple[int, int] = (720, 300)) -> np.ndarray:
    """A histogram of the vocabulary norms (log counts) with labelled vertical lines, as an `[H, W, 3]` uint8
    image for TensorBoard. Drawn with PIL, so training needs no plotting library.

    Args:
        vocab_norms: `[V]` norms.
        marks: {label: (norm, RGB colour)} to mark, e.g. the keyword, the concept word, the special tokens.
        bins: Number of bars.
        size: (width, height) in pixels.
    """
    width, height = size
    left, right, top, bottom = 10, 10, 28, 22
    norms = vocab_norms.detach().double().cpu()
    high = max(float(norms.max()), *(norm for norm, _ in marks.values())) * 1.05 or 1.0
    counts = torch.histc(norms, bins=bins, min=0.0, max=high)
    heights = torch.log1p(counts) / math.log1p(float(counts.max()) or 1.0)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = width - left - right, height - top - bottom
    for i, h in enumerate(heights.tolist()):
        x0, x1 = left + plot_w * i / bins, left + plot_w * (i + 1) / bins
        draw.rectangle([x0, top + plot_h * (1 - h), max(x0, x1 - 1), top + plot_h], fill=(170, 170, 170))
    draw.line([left, top + plot_h, left + plot_w, top + plot_h], fill="black")
    for quarter in range(5):
        x = left + plot_w * quarter / 4
        draw.line([x, top + plot_h, x, top + plot_h + 3], fill="black")
        text = f"{high * quarter / 4:.3g}"
        draw.text((min(x, left + plot_w - draw.textlength(text)), top + plot_h + 5), text, fill="black")
    draw.text((left, 4), "vocabulary norms (log count)", fill="black")
    label_x = left + 190
    for label, (norm, colour) in sorted(marks.items(), key=lambda item: item[1][0]):
        x = left + plot_w * norm / high
        draw.line([x, top, x, top + plot_h], fill=colour, width=2)
        text = f"{label} {norm:.3g}"
        draw.text((label_x, 4), text, fill=colour)
        label_x += 10 + int(draw.textlength(text))
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------- prompt level


def load_prompt_set(name_or_path: str, what: str) -> list[str]:
    """Templates of a shipped set name or file (`prompt_sets.resolve`), at least two (the set distances need
    pairs); errors name the file and line."""
    templates = resolve(name_or_path)
    if len(templates) < 2:
        raise ValueError(f"{what}={name_or_path!r} holds {len(templates)} template; the set distances need at least "
                         f"2 (about 200 is what the paper used), one per line, each holding one '{SLOT}'")
    return templates


def contextual_templates(prompt_set: str | None, concept_word: str, fix: str) -> list[str]:
    """Set P: `prompt_set` when given, else the shipped contextual set of `concept_word`; with neither, a
    ValueError that ends with `fix` (how to pass a set where the caller is configured)."""
    if prompt_set is None and concept_word.lower() not in available_concepts():
        raise ValueError(f"no shipped contextual prompt set for concept_word={concept_word!r} (shipped: "
                         f"{', '.join(available_concepts())}). {fix}: a file of about 200 sentences, one per line, "
                         f"each with one '{SLOT}' where the subject goes, or the closest shipped name")
    return load_prompt_set(prompt_set or concept_word, "prompt_set")


def encode_set(encode: Callable[[list[str]], Tensor], prompts: list[str], input_ids: Tensor, eos_token_id: int,
               hidden_state: str, batch_size: int, encoder_widths: list[int] | None = None) -> list[Tensor]:
    """Pooled encodings `[n, d_e]` (fp32) of `prompts`, one per text encoder, `batch_size` sentences per call.

    Args:
        encode: Prompts → the states the UNet reads `[B, L, D]` (`module.encode_prompts(...).states`).
        prompts: The filled sentences.
        input_ids: Their token ids `[n, L]`, for pooling (tokenize once, reuse every measurement).
        eos_token_id: The end-of-text id.
        hidden_state: One of `drift.HIDDEN_STATES`.
        batch_size: Sentences per call.
        encoder_widths: Each encoder's part of `D` (SDXL: 768 and 1280), pooled on its own; None: one encoder.
    """
    pooled: list[list[Tensor]] = []
    for start in range(0, len(prompts), batch_size):
        hidden = encode(prompts[start:start + batch_size])  # [B, L, D]
        ids = input_ids[start:start + batch_size].to(hidden.device)
        parts = split(hidden, encoder_widths) if encoder_widths else [hidden]
        pooled.append([drift.pool_hidden_states(p, ids, eos_token_id, hidden_state).float() for p in parts])
    return [torch.cat(column) for column in zip(*pooled, strict=True)]
