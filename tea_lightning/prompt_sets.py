"""Prompt sets shipped with tea-lightning, and the rules for reading them.

Every prompt is a *template*: a sentence holding the keyword slot ``{}`` exactly once, standing where the
subject's noun phrase goes ("a {} wearing glasses is writing in a red notebook").  The slot is filled with
:func:`fill`, a template operation: the text is split on the slot, so a concept word is never searched for
inside the sentence ("many", "human", "woman" all contain "man").

Shipped files (``tea_lightning/prompts/``):

- ``contextual/<concept>.txt``: about 200 diverse contextual sentences for one concept word (the paper's
  set P). The file name is the concept word with spaces replaced by underscores (``tortoise_plushy.txt``).
- ``simple.txt``: about 200 simple prompts where the keyword is the focal point (the paper's set S).
- ``eval_celeba.csv``, ``eval_customconcept101.csv``: evaluation prompts (the paper's Table 4).

Template files hold one template per line; blank lines and lines starting with ``#`` are skipped.

Evaluation CSVs have a header row and are read with :mod:`csv` (quote a field that holds a comma):

- ``prompt``: the full prompt template, with one ``{}`` for the keyword.
- ``concept``: the concept segment as a template with one ``{}`` (normally ``a {}``), filled at evaluation
  time with the concept word ("a man") to score concept alignment.
- ``context``: the context segment as plain text with no ``{}`` ("wearing glasses and playing a guitar").
- ``class`` (optional): the concept the row belongs to (``chair``, ``tortoise plushy``); other columns are
  ignored.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SLOT",
    "PROMPTS_DIR",
    "CONTEXTUAL_DIR",
    "SIMPLE_SET_NAME",
    "EvalPrompt",
    "available_concepts",
    "check_template",
    "contextual_set",
    "fill",
    "load_eval_csv",
    "load_templates",
    "package_prompt_files",
    "resolve",
    "simple_set",
    "vocabulary_words",
    "words",
]

SLOT = "{}"
PROMPTS_DIR = Path(__file__).parent / "prompts"
CONTEXTUAL_DIR = PROMPTS_DIR / "contextual"
SIMPLE_SET_NAME = "simple"

_EVAL_REQUIRED_COLUMNS = ("prompt", "concept", "context")
_FIX_HINT = "put exactly one '{}' where the keyword's noun phrase goes, e.g. 'a photo of a {}'"

# CLIP's pre-tokenisation pattern, restricted to ASCII letters (CLIP uses \p{L} and \p{N}).
_CLIP_WORD_RE = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")


# --------------------------------------------------------------------------------------------------- templates


def check_template(template: str) -> str | None:
    """Return why ``template`` is not a valid template, or ``None`` when it is.

    Valid means: exactly one ``{}`` slot and no other ``{`` or ``}``.
    """
    count = template.count(SLOT)
    if count == 0:
        return f"no '{SLOT}' keyword slot"
    if count > 1:
        return f"{count} '{SLOT}' keyword slots (exactly one is allowed)"
    if "{" in template.replace(SLOT, "") or "}" in template.replace(SLOT, ""):
        return f"a stray '{{' or '}}' besides the '{SLOT}' keyword slot"
    return None


def fill(template: str, word: str) -> str:
    """Put ``word`` into the single ``{}`` slot of ``template``.

    Splits on the slot (never a substring replace of a concept word, never ``str.format``), so
    ``fill("a {} and many humans", "man")`` is ``"a man and many humans"`` and braces inside ``word`` are
    inserted literally.
    """
    parts = template.split(SLOT)
    if len(parts) != 2:
        raise ValueError(
            f"template {template!r} has {len(parts) - 1} '{SLOT}' keyword slots; a template needs exactly one: "
            f"{_FIX_HINT}"
        )
    return parts[0] + word + parts[1]


def load_templates(path: str | os.PathLike[str]) -> list[str]:
    """Read a template file: one template per line, each holding exactly one ``{}`` and no other braces.

    Blank lines and lines starting with ``#`` are skipped; surrounding whitespace is stripped. A file with no
    template, or any invalid line, is a ``ValueError`` naming the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist (or is not a file)")
    templates: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            problem = check_template(line)
            if problem is not None:
                raise ValueError(f"{path}:{lineno}: template {line!r} has {problem}; {_FIX_HINT}")
            templates.append(line)
    if not templates:
        raise ValueError(
            f"{path}: no templates found (the file is empty or holds only blank and '#' comment lines); "
            f"write one template per line, each holding one '{SLOT}', e.g. 'a photo of a {SLOT}'"
        )
    return templates


# ------------------------------------------------------------------------------------------------ shipped sets


def _concept_file_name(concept_word: str) -> str:
    return concept_word.strip().lower().replace(" ", "_") + ".txt"


def available_concepts() -> list[str]:
    """Concept words that have a shipped contextual set, sorted (underscores shown as spaces)."""
    if not CONTEXTUAL_DIR.is_dir():
        return []
    return sorted(p.stem.replace("_", " ") for p in CONTEXTUAL_DIR.glob("*.txt") if p.is_file())


def contextual_set(concept_word: str) -> list[str]:
    """The shipped contextual sentences (set P) for ``concept_word``, e.g. ``"man"`` or ``"tortoise plushy"``."""
    path = CONTEXTUAL_DIR / _concept_file_name(concept_word)
    if not path.is_file():
        available = ", ".join(repr(c) for c in available_concepts()) or "(none)"
        raise ValueError(
            f"no shipped contextual prompt set for concept {concept_word!r}; available concepts: {available}. "
            f"For another concept, write your own file (one sentence per line, each holding one '{SLOT}') and "
            f"pass its path to resolve() or load_templates()"
        )
    return load_templates(path)


def simple_set() -> list[str]:
    """The shipped simple prompts (set S): "a photo of a {}", "a portrait of a {}", ..."""
    return load_templates(PROMPTS_DIR / "simple.txt")


def _looks_like_path(text: str) -> bool:
    return os.sep in text or (os.altsep is not None and os.altsep in text) or Path(text).suffix != ""


def resolve(name_or_path: str | os.PathLike[str]) -> list[str]:
    """Templates for a shipped set name or a template file path.

    Shipped names: ``"simple"`` (the simple set) or any concept word from :func:`available_concepts`
    (spaces or underscores). Anything that looks like a path (has a directory separator or a file
    extension), or is an existing file, is read with :func:`load_templates`.
    """
    if isinstance(name_or_path, os.PathLike):
        return load_templates(name_or_path)
    text = str(name_or_path).strip()
    if not _looks_like_path(text):
        if text.lower() == SIMPLE_SET_NAME:
            return simple_set()
        if (CONTEXTUAL_DIR / _concept_file_name(text.replace("_", " "))).is_file():
            return contextual_set(text)
    if _looks_like_path(text) or Path(text).is_file():
        return load_templates(text)
    names = ", ".join(repr(n) for n in [SIMPLE_SET_NAME, *available_concepts()])
    raise ValueError(
        f"{text!r} is neither a shipped prompt set nor an existing file; shipped sets: {names}. "
        f"Pass a file path (one template per line, each holding one '{SLOT}') for a custom set"
    )


# ----------------------------------------------------------------------------------------------- evaluation CSV


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: full template, concept-segment template, context text, optional class."""

    prompt: str
    concept: str
    context: str
    cls: str | None = None

    def full_text(self, word: str) -> str:
        """The full prompt with ``word`` in the slot."""
        return fill(self.prompt, word)

    def concept_text(self, word: str) -> str:
        """The concept segment with ``word`` in the slot ("a man")."""
        return fill(self.concept, word)


def load_eval_csv(path: str | os.PathLike[str]) -> list[EvalPrompt]:
    """Read an evaluation CSV (header ``prompt,concept,context`` and optionally ``class``).

    ``prompt`` and ``concept`` must each hold exactly one ``{}``; ``context`` is plain text without braces.
    Errors are ``ValueError`` naming the file (and line, for a bad row).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation CSV {str(path)!r} does not exist (or is not a file)")
    rows: list[EvalPrompt] = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        if not header:
            raise ValueError(
                f"{path}: empty evaluation CSV; it needs a header row "
                f"'{','.join(_EVAL_REQUIRED_COLUMNS)}' and one row per prompt"
            )
        reader.fieldnames = header
        missing = [c for c in _EVAL_REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)} in header {header}; the header must hold "
                f"{', '.join(_EVAL_REQUIRED_COLUMNS)} (and optionally class)"
            )
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:
                raise ValueError(
                    f"{where}: row has more fields than the header ({record[None]!r} left over); "
                    f"quote any field that holds a comma"
                )
            values = {k: (v.strip() if v is not None else None) for k, v in record.items()}
            absent = [c for c in _EVAL_REQUIRED_COLUMNS if values.get(c) is None]
            if absent:
                raise ValueError(f"{where}: row has no value for column(s) {', '.join(absent)}")
            for column in ("prompt", "concept"):
                problem = check_template(values[column])
                if problem is not None:
                    raise ValueError(f"{where}: column {column!r} value {values[column]!r} has {problem}; {_FIX_HINT}")
            if "{" in values["context"] or "}" in values["context"]:
                raise ValueError(
                    f"{where}: column 'context' value {values['context']!r} holds a brace; the context segment "
                    f"is plain text without the '{SLOT}' slot (e.g. 'wearing glasses and playing a guitar')"
                )
            cls = values.get("class") or None
            rows.append(EvalPrompt(values["prompt"], values["concept"], values["context"], cls))
    if not rows:
        raise ValueError(f"{path}: evaluation CSV has a header but no prompt rows")
    return rows


# ------------------------------------------------------------------------------------------- words / vocabulary


def package_prompt_files() -> list[Path]:
    """Every shipped prompt file (``.txt`` and ``.csv`` under ``tea_lightning/prompts/``), sorted."""
    if not PROMPTS_DIR.is_dir():
        return []
    return sorted(p for p in PROMPTS_DIR.rglob("*") if p.is_file() and p.suffix in {".txt", ".csv"})


def words(text: str) -> list[str]:
    """Lower-case ``text`` and split it into the word pieces CLIP's pre-tokeniser sees.

    ``words("A man's {} dog, 2!")`` is ``['a', 'man', "'s", '{}', 'dog', ',', '2', '!']``.
    """
    return _CLIP_WORD_RE.findall(" ".join(text.lower().split()))


def vocabulary_words(files: list[Path] | None = None) -> list[str]:
    """Sorted unique :func:`words` of ``files``, slot removed.

    Default: every :func:`package_prompt_files` file plus the shipped concept words themselves (a concept such
    as "person" may name a file without appearing in any sentence).
    """
    vocab: set[str] = set()
    for path in package_prompt_files() if files is None else files:
        vocab.update(words(Path(path).read_text(encoding="utf-8").replace(SLOT, " ")))
    if files is None:
        for concept in available_concepts():
            vocab.update(words(concept))
    return sorted(vocab)
