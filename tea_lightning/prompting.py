"""Prompts that hold keywords, as TEA reads them: parsing ("a photo of {}" or "<man> touching a <dog>"), the target
prompt (each keyword replaced by its concept word), and the pairing of prompt-level TEA (which target position each
prompt position is adjusted towards; method.md §2, alignment `span` or the authors' `position`).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tea_lightning.checkpoints import Concept
from tea_lightning.prompt_sets import SLOT, check_template


@dataclass(frozen=True)
class Prompt:
    """A prompt split into text pieces and keyword occurrences, in order."""

    parts: tuple[str | Concept, ...]
    template: str

    @property
    def text(self) -> str:
        """The prompt as the user reads it (keywords filled in)."""
        return "".join(p if isinstance(p, str) else p.keyword for p in self.parts)

    @property
    def model_text(self) -> str:
        """What the tokenizer reads (multi-vector tokens expanded)."""
        return "".join(p if isinstance(p, str) else p.text for p in self.parts)

    @property
    def target_text(self) -> str:
        """The prompt with each keyword replaced by its concept word (the prompt-level target; `Concept.target`)."""
        return "".join(p if isinstance(p, str) else p.target_text for p in self.parts)

    def without_learned(self) -> Prompt:
        """The prompt as prompt-level TEA sees it when concepts of both levels meet: each keyword with learned rows
        becomes plain text (its rows are adjusted at token level), so only the other keywords are replaced in the
        target prompt and paired with their concept words."""
        return Prompt(tuple(p.text if isinstance(p, Concept) and p.learned else p for p in self.parts), self.template)


def parse_prompt(raw: str, concepts: Sequence[Concept]) -> Prompt:
    """A template with one `{}` (filled with the only concept's keyword) or a prompt holding keywords literally.

    Keywords are matched as whole words ("sks dog" does not match inside "sks doggy"); the concept word is never
    searched for, so "many" and "human" stay intact.
    """
    if SLOT in raw:
        problem = check_template(raw)
        if problem:
            raise ValueError(f"prompt {raw!r} has {problem}; write one '{SLOT}' where the keyword goes.")
        if len(concepts) != 1:
            raise ValueError(f"prompt {raw!r} has a '{SLOT}' slot but there are {len(concepts)} keywords "
                             f"{[c.keyword for c in concepts]}; write the keywords into the prompt instead.")
        before, after = raw.split(SLOT)
        return Prompt((before, concepts[0], after), raw)
    by_keyword = {c.keyword: c for c in concepts}
    alternatives = "|".join(re.escape(k) for k in sorted(by_keyword, key=len, reverse=True))
    parts: list[str | Concept] = []
    template, last = [], 0
    for match in re.finditer(rf"(?<!\w)(?:{alternatives})(?!\w)", raw):
        parts += [raw[last:match.start()], by_keyword[match.group(0)]]
        template += [raw[last:match.start()], SLOT]
        last = match.end()
    if not parts:
        keywords = " or ".join(repr(k) for k in by_keyword)
        raise ValueError(f"prompt {raw!r} holds no keyword: write {keywords} where the concept goes (or use a "
                         f"template with '{SLOT}').")
    return Prompt((*parts, raw[last:]), "".join(template) + raw[last:])


def read_prompts_file(path: str | Path) -> list[str]:
    """A CSV with a `prompt` column (method.md §6; other columns are ignored) or a text file, one prompt per line
    (blank lines and lines starting with `#` skipped). Prompts hold `{}` for the keyword or the keyword itself."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompts_file={str(path)!r} does not exist (or is not a file).")
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            if "prompt" not in header:
                raise ValueError(f"prompts_file={str(path)!r} has no 'prompt' column (header: {header}); the CSV "
                                 "needs a header row with a 'prompt' column holding '{}' for the keyword.")
            reader.fieldnames = header
            prompts = [row["prompt"].strip() for row in reader if (row.get("prompt") or "").strip()]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts_file={str(path)!r} holds no prompt.")
    return prompts


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def token_spans(tokenizer, prompt: Prompt) -> list[tuple[int, int]]:
    """(tokens in the prompt, tokens in the target) for each part; checks both fit the text encoder and that each
    keyword stands apart from its neighbours, so the parts tokenize as the whole prompt does."""
    spans = []
    for part in prompt.parts:
        if isinstance(part, str):
            n = len(_ids(tokenizer, part))
            spans.append((n, n))
        else:
            spans.append((len(_ids(tokenizer, part.text)), len(_ids(tokenizer, part.target_text))))
    limit = tokenizer.model_max_length - 2
    for which, text, total in (("prompt", prompt.model_text, sum(k for k, _ in spans)),
                               ("target prompt", prompt.target_text, sum(c for _, c in spans))):
        if total > limit:
            raise ValueError(f"The {which} {text!r} is {total} tokens; the text encoder reads {limit}. Shorten it.")
        if len(_ids(tokenizer, text)) != total:
            raise ValueError(f"In the prompt {prompt.text!r} a keyword is glued to the text beside it, so it does not "
                             "tokenize on its own; put a space or punctuation around it.")
    return spans


def pairing(tokenizer, prompt: Prompt, align: str = "span", concept_reduce: str = "error") -> Tensor:
    """`[L, L]` weights: row i says which target positions prompt position i is adjusted towards (prompt level).

    `position` pairs i with i (the authors' code: every token after a keyword that is longer than its concept
    word, EOS and padding included, meets the target's next token). `span` pairs the text before a keyword with
    itself, the keyword's tokens with the concept word's right-aligned ("sks dog" → "dog", "dog"; "<v> <v>_1" →
    "man", "man"), and every later token, EOS and padding with its true counterpart. A keyword shorter than its
    concept word ("<v>" for "teddy bear") is an error unless `concept_reduce="mean"` (the mean of the word's span).
    """
    length = tokenizer.model_max_length
    spans = token_spans(tokenizer, prompt)
    if align == "position":
        return torch.eye(length)
    weights = torch.zeros(length, length)
    weights[0, 0] = 1.0  # start of text
    p = t = 1
    for part, (k, c) in zip(prompt.parts, spans, strict=True):
        if isinstance(part, str) or k >= c:
            for j in range(k):
                weights[p + j, t + max(0, j - (k - c))] = 1.0
        elif concept_reduce == "mean":
            weights[p:p + k, t:t + c] = 1.0 / c
        else:
            raise ValueError(f"The keyword {part.keyword!r} is {k} token(s) but its target "
                             f"{part.target_text!r} is {c}; pass --concept_reduce mean to pair it with the mean of "
                             "the word's tokens, or choose a one-token concept word.")
        p, t = p + k, t + c
    for j in range(length - p):  # end of text and padding
        weights[p + j, min(t + j, length - 1)] = 1.0
    return weights
