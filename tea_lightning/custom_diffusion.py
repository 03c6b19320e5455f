"""Custom Diffusion (Kumari et al.): train the UNet's cross-attention key/value projections and a modifier token
("photo of a <new1> cat"), optionally the cross-attention query and output too; everything else frozen.

The trained projections live in diffusers' own `CustomDiffusionAttnProcessor2_0` on every cross-attention, which
also keeps the start token's key and value out of the gradient, as the authors did. The modifier tokens are
`LearnedTokens` like Textual Inversion's vectors: one small fp32 parameter per token, initialised from its concept
word's word-final token (`cat</w>`, the row a prompt uses), not from the sub-word the reference script looks up;
`initializer_token: ktn` starts them from the rare token the authors' runs used instead.

Exports are what diffusers' Custom Diffusion example writes: `pytorch_custom_diffusion_weights.safetensors` and one
`<token>.safetensors` per modifier token. On SDXL every modifier token learns a row in each text encoder
(`modifiers`, `modifiers_2`), and its file holds them as AUTOMATIC1111's SDXL embeddings do (`clip_l`, `clip_g`).
diffusers' own `unet.load_attn_procs` silently installs nothing for these files (huggingface/diffusers#9320), so
`tea_lightning.adapters.load_custom_diffusion` installs the processors itself.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from tea_lightning import export
from tea_lightning.adapters import cross_attentions, custom_diffusion_processor
from tea_lightning.conditioning import ENCODER_NAMES, SUFFIXES
from tea_lightning.data import TrainingConcept, as_training_concepts
from tea_lightning.module import DiffusionModule
from tea_lightning.tokens import LearnedTokens, add_token_rows, single_token_id


class CustomDiffusion(DiffusionModule):
    """Custom Diffusion: cross-attention key/value (+ query/output) and modifier tokens, for one or more concepts.

    Args:
        concept_word: One-token word of the concept's category ("cat"); prompts say "<new1> cat".
        modifier_token: The new token written before the concept word.
        train_q_out: Also train the cross-attention query and output projections (the authors' setting).
        initializer_token: Start every modifier token from this word's row instead of its concept word's: the
            authors' Custom Diffusion runs started from the rare token "ktn" (their script's default). Token-level
            TEA still pulls towards the concept word; a start far from it leaves more to correct.
        concepts: Several concepts (filled from ``data.concepts`` by train.py); each brings its own modifier token.
        pretrained, seed, prior_loss_weight, gradient_checkpointing, regularizers, optimizer, lr_scheduler: see
            `DiffusionModule`.
    """

    method = "custom_diffusion"

    def __init__(self, concept_word: str | None = None, modifier_token: str = "<new1>", train_q_out: bool = False,
                 initializer_token: str | None = None, concepts: list[TrainingConcept] | None = None,
                 **kwargs) -> None:
        pairs = self._token_pairs(concept_word, modifier_token, concepts)
        super().__init__(**kwargs)
        if concepts is not None:
            self.hparams["concepts"] = [asdict(c) for c in as_training_concepts(concepts)]
        self.modifier_tokens = [token for token, _ in pairs]
        self.concept_words = [word for _, word in pairs]
        self.concept_word = self.concept_words[0]
        concept_ids = [[single_token_id(t, word) for word in self.concept_words] for t in self.tokenizers]
        start_ids = concept_ids if initializer_token is None else \
            [[single_token_id(t, initializer_token, "model.initializer_token")] * len(self.concept_words)
             for t in self.tokenizers]
        for suffix, tokenizer, encoder, ids, starts in zip(SUFFIXES, self.tokenizers, self.text_encoders,
                                                           concept_ids, start_ids, strict=False):
            token_ids = add_token_rows(tokenizer, encoder, self.modifier_tokens, what="model.modifier_token")
            table = encoder.get_input_embeddings()
            concept_rows = table.weight[ids].detach().float().clone()  # [k, D]
            rows = table.weight[starts].detach().float().clone()  # [k, D] where each modifier token starts
            with torch.no_grad():
                table.weight[token_ids] = rows.to(table.weight.dtype)
            self.register_buffer(f"concept_vectors{suffix}", concept_rows, persistent=False)
            # One fp32 parameter per token, spliced into the embedding output by its own hook.
            modifiers = nn.ModuleList(LearnedTokens(row[None], first_id=token_id)
                                      for row, token_id in zip(rows, token_ids, strict=True))
            for modifier in modifiers:
                modifier.attach(table)
            setattr(self, f"modifiers{suffix}", modifiers)
        for attn in cross_attentions(self.unet).values():
            attn.set_processor(custom_diffusion_processor(attn, train_q_out))

    @staticmethod
    def _token_pairs(concept_word: str | None, modifier_token: str,
                     concepts: list[TrainingConcept] | None) -> list[tuple[str, str]]:
        """(modifier token, concept word) per concept, checked before any model is loaded."""
        if concepts is None:
            if concept_word is None:
                raise ValueError("Custom Diffusion needs model.concept_word (one concept, e.g. 'cat') or "
                                 "data.concepts (several).")
            pairs = [(modifier_token, concept_word)]
        else:
            if concept_word is not None:
                raise ValueError(f"model.concept_word={concept_word!r} and data.concepts are both set: with several "
                                 "concepts each entry names its own concept_word; remove model.concept_word "
                                 "(--model.init_args.concept_word null).")
            if not concepts:
                raise ValueError("data.concepts is an empty list; list at least one concept.")
            concepts = as_training_concepts(concepts)
            missing = [i for i, c in enumerate(concepts) if not c.concept_word]
            if missing:
                raise ValueError(f"data.concepts[{missing[0]}] has no concept_word; Custom Diffusion initialises its "
                                 "modifier token from it (e.g. concept_word: cat).")
            pairs = [(c.modifier_token or f"<new{i + 1}>", c.concept_word) for i, c in enumerate(concepts)]
        tokens = [token for token, _ in pairs]
        for token in tokens:
            if not token.strip() or any(ch in token for ch in '/\\ {}') or tokens.count(token) > 1:
                raise ValueError(f"modifier token {token!r} must be unique, non-empty and free of spaces, slashes "
                                 "and braces (it names an export file, <token>.safetensors); e.g. '<new1>'.")
        return pairs

    @property
    def keyword(self) -> str:
        return self.keywords[0]

    @property
    def keywords(self) -> list[str]:
        return [f"{token} {word}" for token, word in zip(self.modifier_tokens, self.concept_words, strict=True)]

    def token_modules(self, encoder: int = 0) -> list[LearnedTokens]:
        return list(getattr(self, f"modifiers{SUFFIXES[encoder]}"))

    def learned_vectors(self, encoder: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = torch.cat([m.vectors for m in self.token_modules(encoder)])
        return vectors, getattr(self, f"concept_vectors{SUFFIXES[encoder]}")

    def export(self, folder: Path, step: int) -> None:
        weights = {name.removeprefix("unet."): tensor.float() for name, tensor in self.trainable_state_dict().items()
                   if name.startswith("unet.")}
        export.write_safetensors(weights, folder / export.CUSTOM_DIFFUSION_WEIGHTS)
        rows = [self.learned_vectors(e)[0].detach().float() for e in range(self.num_text_encoders)]  # [k, D_e] each
        for i, token in enumerate(self.modifier_tokens):
            if len(rows) == 1:  # diffusers' Custom Diffusion token file: {token: [D]}
                tensors, metadata = {token: rows[0][i]}, None
            else:  # SDXL: one row per encoder, keyed and named as AUTOMATIC1111's SDXL embeddings
                tensors, metadata = {n: r[i:i + 1] for n, r in zip(ENCODER_NAMES, rows, strict=True)}, {"name": token}
            export.write_safetensors(tensors, folder / f"{token}.safetensors", metadata=metadata)
        concepts = [{"modifier_token": t, "keyword": k, "concept_word": w}
                    for t, k, w in zip(self.modifier_tokens, self.keywords, self.concept_words, strict=True)]
        export.write_tea_json(folder, method=self.method, base_model=self.pretrained, keyword=self.keyword,
                              concept_word=self.concept_word, step=step, tokens=self.modifier_tokens,
                              concepts=concepts, train_q_out=self.hparams.train_q_out)
