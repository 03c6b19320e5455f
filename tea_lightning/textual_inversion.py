"""Textual Inversion: learn new token vectors for a placeholder, everything else frozen.

The learned vectors are their own small fp32 `nn.Parameter` (design decision 1). A forward hook on the text
encoder's token embedding swaps them in wherever the placeholder's ids appear, so the optimiser never sees the
49,408-row vocabulary, nothing has to be restored after a step, and the stock pipeline built from this module's
parts already uses the current vectors.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tea_lightning import export
from tea_lightning.module import DiffusionModule

PARAMETRIZATIONS = ("free", "spherical")


def single_token_id(tokenizer, word: str, what: str = "model.concept_word") -> int:
    """The id of `word` exactly as a prompt tokenizes it (`man` → `man</w>`); several pieces is an error."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"{what}={word!r} is {len(ids)} tokens {pieces}, not one. Choose a single-token word "
                         "close to the concept (e.g. 'man', 'dog', 'toy').")
    return ids[0]


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """`<v>`, `<v>_1`, `<v>_2`, ...: the names diffusers' `load_textual_inversion` gives multi-vector tokens."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def add_new_tokens(tokenizer, tokens: list[str], what: str = "model.placeholder") -> list[int]:
    """Add `tokens` to the tokenizer; a token that already means something is an error, since it would shadow it."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        existing = tokenizer(token, add_special_tokens=False).input_ids
        if token in vocab or token + "</w>" in vocab or len(existing) == 1:
            raise ValueError(f"{what}={token!r} is already in the vocabulary, so training it would change the "
                             "meaning of that word. Choose a new string such as '<my-concept>'.")
    tokenizer.add_tokens(tokens)
    return tokenizer.convert_tokens_to_ids(tokens)


class LearnedTokens(nn.Module):
    """Learned rows `[k, D]` spliced into a token-embedding's output wherever ids `first_id .. first_id+k-1` occur.

    `vectors` are the rows the text encoder sees, in both parametrisations:
    - free (`norm=None`): `vectors` is the trained `nn.Parameter` itself;
    - spherical (`norm` > 0): the trained parameter is `direction`, and `vectors` = norm · direction/|direction|,
      so every row's norm is `norm` exactly, whatever the optimiser does, and only directions are learned
      (as in Directional Textual Inversion, arXiv 2512.13672).

    Args:
        init: Starting rows `[k, D]` (rescaled to `norm` when spherical).
        first_id: Token id of the first row; row i replaces id `first_id + i`.
        norm: Fixed norm of every row, or None to learn the rows freely.
    """

    def __init__(self, init: torch.Tensor, first_id: int, norm: float | None = None) -> None:
        super().__init__()
        self.first_id = first_id
        self.norm = None if norm is None else check_sphere_norm(norm)
        rows = init.detach().float().clone()  # fp32: fp16 rows underflow at lr 5e-4
        if self.norm is None:
            self.vectors = nn.Parameter(rows)
        else:
            if bool((rows.norm(dim=-1) == 0).any()):
                raise ValueError("A spherical token cannot start from a zero vector: it has no direction.")
            self.direction = nn.Parameter(F.normalize(rows, dim=-1) * self.norm)
            self._projected = self.direction._version

    def __getattr__(self, name: str):
        # Spherical rows are computed, not stored; `vectors` means "the rows the model sees" either way.
        if name == "vectors" and self.__dict__.get("norm") is not None:
            return self.norm * F.normalize(self.direction, dim=-1)
        return super().__getattr__(name)

    def splice(self, input_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        if self.norm is not None and torch.is_grad_enabled() and self.direction._version != self._projected:
            # After each optimiser step (which bumps the tensor's version), pull the free tensor back onto the
            # sphere. The model only sees its direction, so no output changes, but a scale-invariant parameter's
            # length grows under Adam and would silently shrink the angle a step turns. Once per step: a second
            # forward in the same step must not edit a tensor its graph has saved.
            with torch.no_grad():
                self.direction.copy_(F.normalize(self.direction, dim=-1) * self.norm)
            self._projected = self.direction._version
        vectors = self.vectors
        offset = input_ids - self.first_id  # [B, L]
        hit = (offset >= 0) & (offset < len(vectors))
        rows = vectors.to(embeddings.dtype)[offset.clamp(0, len(vectors) - 1)]  # [B, L, D]
        return torch.where(hit.unsqueeze(-1), rows, embeddings)

    def attach(self, token_embedding: nn.Embedding) -> None:
        token_embedding.register_forward_hook(lambda module, args, output: self.splice(args[0], output))


def check_sphere_norm(norm: float, what: str = "model.sphere_norm") -> float:
    if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not 0 < norm < math.inf:
        raise ValueError(f"{what}={norm!r}: a spherical token's norm must be a finite number > 0 (leave it unset "
                         "to use the concept word's norm).")
    return float(norm)


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


def file_stem(keyword: str) -> str:
    """A file name for a keyword: `<pink-star>` → `pink-star`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", keyword).strip("-.") or "embedding"


class TextualInversion(DiffusionModule):
    """Textual Inversion (Gal et al.): a new placeholder token initialised from its concept word.

    Args:
        concept_word: One-token word the vectors start from and TEA later pulls them back towards ("man", "dog").
        placeholder: The new token written in prompts ("<v>", "<my-dog>").
        num_vectors: Vectors per placeholder (multi-vector tokens are exported as `tok`, `tok_1`, ...).
        parametrization: ``free`` learns the vectors outright; ``spherical`` holds every vector's norm fixed (at
            `sphere_norm`) and learns only its direction, so the norm cannot drift.
        sphere_norm: The fixed norm for ``spherical``; None (default) = the concept word's norm.
        pretrained, seed, prior_loss_weight, regularizers, optimizer, lr_scheduler: see `DiffusionModule`.
    """

    method = "textual_inversion"

    def __init__(self, concept_word: str, placeholder: str = "<v>", num_vectors: int = 1,
                 parametrization: Literal["free", "spherical"] = "free", sphere_norm: float | None = None,
                 **kwargs) -> None:
        check_parametrization(parametrization, sphere_norm)  # before the model loads
        super().__init__(**kwargs)
        if num_vectors < 1:
            raise ValueError(f"model.num_vectors={num_vectors}; use 1 or more.")
        concept_id = single_token_id(self.tokenizer, concept_word)
        self.concept_word, self.placeholder = concept_word, placeholder
        self.tokens = placeholder_tokens(placeholder, num_vectors)
        token_ids = add_new_tokens(self.tokenizer, self.tokens)
        # The new vocabulary rows only keep the matrix in step with the tokenizer (for pipelines and exports of the
        # text encoder); training reads `self.learned`, spliced in by the hook.
        self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        table = self.text_encoder.get_input_embeddings()
        concept = table.weight[concept_id].detach().float().clone()
        with torch.no_grad():
            table.weight[token_ids] = concept.to(table.weight.dtype)
        self.register_buffer("concept_vector", concept.clone(), persistent=False)  # [D]
        norm = sphere_norm_for(parametrization, sphere_norm, concept, f"concept word {concept_word!r}")
        self.learned = LearnedTokens(concept.repeat(num_vectors, 1), first_id=token_ids[0], norm=norm)
        self.learned.attach(table)

    @property
    def keyword(self) -> str:
        return " ".join(self.tokens)

    def learned_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = self.learned.vectors
        return vectors, self.concept_vector.expand_as(vectors)

    def export(self, folder: Path, step: int) -> None:
        vectors = self.learned.vectors.detach().float().cpu()
        export.write_safetensors({self.placeholder: vectors}, folder / export.DIFFUSERS_TI)
        export.write_safetensors({"emb_params": vectors}, folder / f"{file_stem(self.placeholder)}.safetensors",
                                 metadata={"name": self.placeholder, "step": str(step)})
        export.write_tea_json(folder, method=self.method, base_model=self.pretrained, keyword=self.placeholder,
                              tokens=self.tokens, concept_word=self.concept_word, step=step)
