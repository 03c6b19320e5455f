"""Textual Inversion: learn new token vectors for a placeholder, everything else frozen.

The learned vectors are their own small fp32 `nn.Parameter` (design decision 1). A forward hook on the text
encoder's token embedding swaps them in wherever the placeholder's ids appear, so the optimiser never sees the
49,408-row vocabulary, nothing has to be restored after a step, and the stock pipeline built from this module's
parts already uses the current vectors. SDXL learns one set of rows per text encoder (`learned`, `learned_2`), each
initialised from the concept word's row in that encoder and exported the way each ecosystem loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from tea_lightning import export
from tea_lightning.conditioning import ENCODER_NAMES, SUFFIXES
from tea_lightning.module import DiffusionModule
from tea_lightning.tokens import LearnedTokens, add_token_rows, check_sphere_norm, placeholder_tokens, single_token_id

PARAMETRIZATIONS = ("free", "spherical")


def check_parametrization(parametrization: str, sphere_norm: float | None) -> None:
    """Refuse an unknown parametrization, a `sphere_norm` ≤ 0, or a `sphere_norm` that ``free`` would ignore."""
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"model.parametrization={parametrization!r}; use one of {list(PARAMETRIZATIONS)}.")
    if sphere_norm is not None:
        if parametrization == "free":
            raise ValueError(f"model.sphere_norm={sphere_norm!r} only applies with model.parametrization "
                             "spherical; set that too, or remove sphere_norm.")
        check_sphere_norm(sphere_norm)


def sphere_norm_for(parametrization: str, sphere_norm: float | None, reference: torch.Tensor | None,
                    reference_name: str = "the concept word") -> float | None:
    """The fixed norm a method passes to `LearnedTokens(norm=...)`: None for ``free``; for ``spherical``
    `sphere_norm`, or when that is None the norm of `reference` (the concept word's row).

    Args:
        parametrization: ``free`` or ``spherical``.
        sphere_norm: Explicit norm for ``spherical``, or None.
        reference: Row `[D]` whose norm is the default, or None when the method has none.
        reference_name: What `reference` is, for error messages.
    """
    check_parametrization(parametrization, sphere_norm)
    if parametrization == "free":
        return None
    if sphere_norm is not None:
        return float(sphere_norm)
    if reference is None:
        raise ValueError(f"model.parametrization spherical needs a norm: there is no {reference_name} to take it "
                         "from, so set model.sphere_norm.")
    return check_sphere_norm(float(reference.float().norm()), f"the norm of {reference_name}")


class TextualInversion(DiffusionModule):
    """Textual Inversion (Gal et al.): a new placeholder token initialised from its concept word.

    Args:
        concept_word: One-token word the vectors start from and TEA later pulls them back towards ("man", "dog").
        placeholder: The new token written in prompts ("<v>", "<my-dog>").
        num_vectors: Vectors per placeholder (multi-vector tokens are exported as `tok`, `tok_1`, ...).
        parametrization: ``free`` learns the vectors outright; ``spherical`` holds every vector's norm fixed (at
            `sphere_norm`) and learns only its direction, so the norm cannot drift.
        sphere_norm: The fixed norm for ``spherical``; None (default) = the concept word's norm (on SDXL always:
            each encoder's rows keep the norm of the concept word's row in that encoder).
        pretrained, seed, prior_loss_weight, regularizers, optimizer, lr_scheduler: see `DiffusionModule`.
    """

    method = "textual_inversion"

    def __init__(self, concept_word: str, placeholder: str = "<v>", num_vectors: int = 1,
                 parametrization: Literal["free", "spherical"] = "free", sphere_norm: float | None = None,
                 **kwargs) -> None:
        check_parametrization(parametrization, sphere_norm)  # before the model loads
        if not placeholder.strip() or placeholder != placeholder.strip() or "{" in placeholder:
            # An empty token (an unset shell variable) would train the end-of-text row every prompt ends with.
            raise ValueError(f"model.placeholder={placeholder!r} is empty, padded with spaces or holds a brace; give "
                             "the new token written in prompts, e.g. '<my-dog>'.")
        if num_vectors < 1:
            raise ValueError(f"model.num_vectors={num_vectors}; use 1 or more.")
        super().__init__(**kwargs)
        if sphere_norm is not None and self.num_text_encoders > 1:
            raise ValueError(f"model.sphere_norm={sphere_norm} sets one norm, but the SDXL model {self.pretrained!r} "
                             "has two text encoders with their own scales; leave it unset, so each encoder's rows keep "
                             "the norm of the concept word's row in that encoder.")
        concept_ids = [single_token_id(tokenizer, concept_word) for tokenizer in self.tokenizers]
        self.concept_word, self.placeholder = concept_word, placeholder
        self.tokens = placeholder_tokens(placeholder, num_vectors)
        for suffix, tokenizer, encoder, concept_id in zip(SUFFIXES, self.tokenizers, self.text_encoders, concept_ids,
                                                          strict=False):
            # The new vocabulary rows only keep the matrix in step with the tokenizer (for pipelines and exports of
            # the text encoder); training reads `self.learned`, spliced in by the hook.
            token_ids = add_token_rows(tokenizer, encoder, self.tokens)
            table = encoder.get_input_embeddings()
            concept = table.weight[concept_id].detach().float().clone()
            with torch.no_grad():
                table.weight[token_ids] = concept.to(table.weight.dtype)
            self.register_buffer(f"concept_vector{suffix}", concept.clone(), persistent=False)  # [D]
            norm = sphere_norm_for(parametrization, sphere_norm, concept, f"concept word {concept_word!r}")
            learned = LearnedTokens(concept.repeat(num_vectors, 1), first_id=token_ids[0], norm=norm)
            learned.attach(table)
            setattr(self, f"learned{suffix}", learned)

    @property
    def keyword(self) -> str:
        return " ".join(self.tokens)

    def token_modules(self, encoder: int = 0) -> list[LearnedTokens]:
        return [getattr(self, f"learned{SUFFIXES[encoder]}")]

    def learned_vectors(self, encoder: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = self.token_modules(encoder)[0].vectors
        return vectors, getattr(self, f"concept_vector{SUFFIXES[encoder]}").expand_as(vectors)

    def export(self, folder: Path, step: int) -> None:
        """diffusers' `learned_embeds.safetensors` (`{placeholder: [n, D]}`; SDXL also `learned_embeds_2` for the
        second encoder) and the single file AUTOMATIC1111, ComfyUI and kohya load: `emb_params`, or on SDXL
        `clip_l` and `clip_g`."""
        rows = [self.learned_vectors(e)[0].detach().float().cpu() for e in range(self.num_text_encoders)]
        for name, vectors in zip(export.DIFFUSERS_TI_FILES, rows, strict=False):
            export.write_safetensors({self.placeholder: vectors}, folder / name)
        single = {"emb_params": rows[0]} if len(rows) == 1 else dict(zip(ENCODER_NAMES, rows, strict=True))
        export.write_safetensors(single, folder / f"{export.file_stem(self.placeholder)}.safetensors",
                                 metadata={"name": self.placeholder, "step": str(step)})
        export.write_tea_json(folder, method=self.method, base_model=self.pretrained, keyword=self.placeholder,
                              tokens=self.tokens, concept_word=self.concept_word, step=step)
