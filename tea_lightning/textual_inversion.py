"""Textual Inversion: learn new token vectors for a placeholder, everything else frozen.

The learned vectors are their own small fp32 `nn.Parameter` (design decision 1). A forward hook on the text
encoder's token embedding swaps them in wherever the placeholder's ids appear, so the optimiser never sees the
49,408-row vocabulary, nothing has to be restored after a step, and the stock pipeline built from this module's
parts already uses the current vectors.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from tea_lightning import export
from tea_lightning.module import DiffusionModule


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
    """Learned rows `[k, D]` spliced into a token-embedding's output wherever ids `first_id .. first_id+k-1` occur."""

    def __init__(self, init: torch.Tensor, first_id: int) -> None:
        super().__init__()
        self.vectors = nn.Parameter(init.detach().float().clone())  # fp32: fp16 rows underflow at lr 5e-4
        self.first_id = first_id

    def splice(self, input_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        offset = input_ids - self.first_id  # [B, L]
        hit = (offset >= 0) & (offset < len(self.vectors))
        rows = self.vectors.to(embeddings.dtype)[offset.clamp(0, len(self.vectors) - 1)]  # [B, L, D]
        return torch.where(hit.unsqueeze(-1), rows, embeddings)

    def attach(self, token_embedding: nn.Embedding) -> None:
        token_embedding.register_forward_hook(lambda module, args, output: self.splice(args[0], output))


def file_stem(keyword: str) -> str:
    """A file name for a keyword: `<pink-star>` → `pink-star`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", keyword).strip("-.") or "embedding"


class TextualInversion(DiffusionModule):
    """Textual Inversion (Gal et al.): a new placeholder token initialised from its concept word.

    Args:
        concept_word: One-token word the vectors start from and TEA later pulls them back towards ("man", "dog").
        placeholder: The new token written in prompts ("<v>", "<my-dog>").
        num_vectors: Vectors per placeholder (multi-vector tokens are exported as `tok`, `tok_1`, ...).
        pretrained, seed, prior_loss_weight, regularizers, optimizer, lr_scheduler: see `DiffusionModule`.
    """

    method = "textual_inversion"

    def __init__(self, concept_word: str, placeholder: str = "<v>", num_vectors: int = 1, **kwargs) -> None:
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
        self.learned = LearnedTokens(concept.repeat(num_vectors, 1), first_id=token_ids[0])
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
