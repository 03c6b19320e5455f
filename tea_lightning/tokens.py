"""Learned tokens, as training and inference both use them: new tokens in the tokenizer, a word's row as a prompt
tokenizes it, and `LearnedTokens`, the small fp32 rows spliced into a text encoder's token embedding.

Design decision 1: the learned rows are their own `nn.Parameter`, looked up beside the frozen vocabulary through a
forward hook on the token embedding, so the optimiser never sees the 49,408-row matrix and nothing has to be
restored after a step. Inference uses the same splice to put TEA-adjusted rows in while a prompt is encoded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def add_token_rows(tokenizer, encoder: nn.Module, tokens: list[str], what: str = "model.placeholder") -> list[int]:
    """Add `tokens` to `tokenizer` (see `add_new_tokens`) and a row for each to `encoder`'s input embedding, keeping
    the two in step; the new rows' values are the caller's to set. Returns the new ids."""
    token_ids = add_new_tokens(tokenizer, tokens, what)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return token_ids


def concept_row(tokenizer, table: Tensor, word: str, concept_reduce: str = "error") -> Tensor:
    """The input-embedding row of `word` exactly as a prompt tokenizes it (`man` → `man</w>`, not the sub-word
    `man`), fp32 `[D]`. A word of several tokens is an error unless `concept_reduce="mean"` (mean of its rows)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids or (len(ids) > 1 and concept_reduce != "mean"):
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"concept_word={word!r} is {len(ids)} tokens {pieces}, not one. Choose a one-token word "
                         "close to the concept ('man', 'dog', 'toy'), or pass --concept_reduce mean to pull "
                         "towards the mean of its rows.")
    return table[ids].detach().float().mean(dim=0)


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
