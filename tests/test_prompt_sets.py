"""Shipped prompt files and the rules for reading them (tea_lightning.prompt_sets)."""

from __future__ import annotations

import csv
import re

import pytest

from tea_lightning import prompt_sets
from tea_lightning.prompt_sets import (
    SLOT,
    EvalPrompt,
    available_concepts,
    contextual_set,
    fill,
    load_eval_csv,
    load_templates,
    package_prompt_files,
    resolve,
    simple_set,
    vocabulary_words,
    words,
)

PROMPTS = prompt_sets.PROMPTS_DIR
HUMAN_CONCEPTS = ("man", "woman", "person")
CC101_CLASSES = {"barn", "tortoise plushy", "teddy bear", "wooden pot", "dog", "cat", "flower", "table", "chair"}

SHIPPED_TEMPLATE_FILES = [p for p in package_prompt_files() if p.suffix == ".txt"]
SHIPPED_CONCEPTS = available_concepts()


def _file_id(path):
    return str(path.relative_to(PROMPTS))


# ------------------------------------------------------------------------------------------- shipped files


def test_package_ships_simple_set_eval_csvs_and_human_contextual_sets():
    shipped = {_file_id(p) for p in package_prompt_files()}
    assert {"simple.txt", "eval_celeba.csv", "eval_customconcept101.csv"} <= shipped
    for concept in HUMAN_CONCEPTS:
        assert f"contextual/{concept}.txt" in shipped
        assert concept in SHIPPED_CONCEPTS


@pytest.mark.parametrize("path", SHIPPED_TEMPLATE_FILES, ids=_file_id)
def test_every_line_of_shipped_template_file_holds_exactly_one_slot(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        assert line.strip(), f"{path}:{lineno} is blank"
        assert line.count(SLOT) == 1, f"{path}:{lineno}: {line!r}"
        assert "{" not in line.replace(SLOT, "") and "}" not in line.replace(SLOT, ""), f"{path}:{lineno}"
    assert load_templates(path) == [line.strip() for line in lines]


@pytest.mark.parametrize("path", package_prompt_files(), ids=_file_id)
def test_shipped_prompt_files_are_plain_ascii(path):
    assert path.read_text(encoding="utf-8").isascii()


@pytest.mark.parametrize("concept", SHIPPED_CONCEPTS)
def test_contextual_set_holds_195_to_210_distinct_sentences(concept):
    sentences = contextual_set(concept)
    assert 195 <= len(sentences) <= 210
    assert len(set(sentences)) == len(sentences)


@pytest.mark.parametrize("concept", SHIPPED_CONCEPTS)
def test_contextual_sentences_are_10_to_30_words_with_a_one_word_keyword(concept):
    for sentence in contextual_set(concept):
        n = len(fill(sentence, "sks").split())
        assert 10 <= n <= 30, f"{concept}: {n} words: {sentence!r}"


@pytest.mark.parametrize("concept", HUMAN_CONCEPTS)
def test_human_sentences_put_the_slot_where_the_subject_noun_phrase_goes(concept):
    for sentence in contextual_set(concept):
        assert "a {}" in sentence, sentence
        assert fill(sentence, "sks man").count("a sks man") == 1


def test_man_woman_and_person_sets_are_mostly_different_sentences():
    pronouns = re.compile(r"\b(he|she|they|him|her|them|his|hers|their|himself|herself|themselves)\b")

    def normalised(concept):
        return {pronouns.sub("_", s) for s in contextual_set(concept)}

    sets = {c: normalised(c) for c in HUMAN_CONCEPTS}
    for a, b in [("man", "woman"), ("man", "person"), ("woman", "person")]:
        shared = len(sets[a] & sets[b])
        assert shared < 0.5 * min(len(sets[a]), len(sets[b])), f"{a}/{b} share {shared} sentences"


def test_simple_set_holds_195_to_210_distinct_short_prompts():
    prompts = simple_set()
    assert 195 <= len(prompts) <= 210
    assert len(set(prompts)) == len(prompts)
    for prompt in prompts:
        assert len(prompt.split()) <= 10, prompt
    assert "a photo of a {}" in prompts and "a portrait of a {}" in prompts


# -------------------------------------------------------------------------------------------- eval CSVs


def test_celeba_eval_csv_holds_the_papers_17_action_prompts():
    rows = load_eval_csv(PROMPTS / "eval_celeba.csv")
    assert len(rows) == 17
    assert len({r.prompt for r in rows}) == 17
    for row in rows:
        assert row.concept == "a {}"
        assert row.prompt.startswith("A photo of a {} wearing glasses and ")
        assert row.prompt.endswith(row.context)
        assert not row.context.startswith("wearing glasses"), "the authors' context segment is the action alone"
    assert rows[0].full_text("sks man") == "A photo of a sks man wearing glasses and handshaking with a man"
    assert rows[0].concept_text("man") == "a man"


def test_customconcept101_eval_csv_holds_the_authors_lists_for_the_papers_9_concepts():
    rows = load_eval_csv(PROMPTS / "eval_customconcept101.csv")
    counts = {cls: sum(r.cls == cls for r in rows) for cls in CC101_CLASSES}
    assert counts == {"barn": 13, "tortoise plushy": 14, "teddy bear": 14, "wooden pot": 13, "dog": 14, "cat": 14,
                      "flower": 13, "table": 14, "chair": 14}, "a concept's prompt list is incomplete"
    for row in rows:
        assert row.concept == "a {}"
        assert row.context and "{" not in row.context


def test_customconcept101_authors_prompts_are_ours_with_the_class_word_after_the_slot():
    with (PROMPTS / "eval_customconcept101.csv").open(encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 123
    for record in records:
        class_word = {"teddy bear": "teddybear"}.get(record["class"], record["class"])  # the authors' spelling
        assert record["authors_prompt"].replace("{} " + class_word, "{}") == record["prompt"], record


@pytest.mark.parametrize("name", ["eval_celeba.csv", "eval_customconcept101.csv"])
def test_eval_csvs_have_prompt_concept_context_header(name):
    header = (PROMPTS / name).read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[:3] == ["prompt", "concept", "context"]


def test_eval_csv_keeps_quoted_commas_inside_one_field(tmp_path):
    path = tmp_path / "eval.csv"
    path.write_text('prompt,concept,context\n"a {}, smiling, in the rain",a {},"smiling, in the rain"\n')
    (row,) = load_eval_csv(path)
    assert row == EvalPrompt("a {}, smiling, in the rain", "a {}", "smiling, in the rain", None)


def test_eval_csv_missing_columns_error_names_them_and_the_file(tmp_path):
    path = tmp_path / "no_context.csv"
    path.write_text("prompt,concept\na {} on a bench,a {}\n")
    with pytest.raises(ValueError, match=re.escape("missing column(s) context in header")) as info:
        load_eval_csv(path)
    assert str(path) in str(info.value)


def test_eval_csv_row_without_slot_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad_row.csv"
    path.write_text("prompt,concept,context\na {} on a bench,a {},a bench\na man on a bench,a {},a bench\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3")):
        load_eval_csv(path)


def test_eval_csv_row_with_unquoted_extra_comma_is_rejected(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("prompt,concept,context\na {} in the rain,a {},rain,wind\n")
    with pytest.raises(ValueError, match="quote"):
        load_eval_csv(path)


def test_eval_csv_context_with_slot_is_rejected(tmp_path):
    path = tmp_path / "ctx.csv"
    path.write_text("prompt,concept,context\na {} in the rain,a {},a {} in the rain\n")
    with pytest.raises(ValueError, match="context"):
        load_eval_csv(path)


def test_empty_eval_csv_is_rejected(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_eval_csv(path)


# ----------------------------------------------------------------------------------------------------- fill


def test_fill_leaves_words_that_contain_the_concept_word_intact():
    assert fill("a {} and many humans", "man") == "a man and many humans"
    assert fill("a {} handshaking with a woman", "sks man") == "a sks man handshaking with a woman"


def test_fill_inserts_braces_in_the_keyword_literally():
    assert fill("a photo of a {}", "<v>") == "a photo of a <v>"
    assert fill("a photo of a {}", "{x}") == "a photo of a {x}"


@pytest.mark.parametrize("template", ["a photo of a man", "a {} and a {}"])
def test_fill_rejects_templates_without_exactly_one_slot_and_names_them(template):
    with pytest.raises(ValueError, match=re.escape(repr(template))):
        fill(template, "man")


# ----------------------------------------------------------------------------------------- load_templates


def test_load_templates_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "set.txt"
    path.write_text("# my set\n\n  a photo of a {}  \n# another comment\na {} in the snow\n")
    assert load_templates(path) == ["a photo of a {}", "a {} in the snow"]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("a photo of a man", "no '{}'"),
        ("a {} and a {}", "2 '{}'"),
        ("a {} in {the} snow", "stray"),
    ],
    ids=["no-slot", "two-slots", "stray-brace"],
)
def test_load_templates_bad_line_error_names_file_line_and_fix(tmp_path, bad_line, reason):
    path = tmp_path / "bad.txt"
    path.write_text(f"a photo of a {{}}\n# comment\n{bad_line}\n")
    with pytest.raises(ValueError) as info:
        load_templates(path)
    message = str(info.value)
    assert f"{path}:3" in message
    assert reason in message
    assert "exactly one '{}'" in message


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"], ids=["empty", "blank", "comments"])
def test_load_templates_rejects_file_without_templates(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="no templates") as info:
        load_templates(path)
    assert str(path) in str(info.value)


def test_load_templates_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_templates(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------- names and resolving


def test_unknown_concept_error_lists_available_concepts_and_custom_path_option():
    with pytest.raises(ValueError) as info:
        contextual_set("spaceship")
    message = str(info.value)
    assert "'man'" in message and "'woman'" in message
    assert "path" in message


def test_concept_words_with_spaces_map_to_underscored_files(tmp_path, monkeypatch):
    (tmp_path / "tortoise_plushy.txt").write_text("a {} on a shelf\n")
    monkeypatch.setattr(prompt_sets, "CONTEXTUAL_DIR", tmp_path)
    assert available_concepts() == ["tortoise plushy"]
    assert contextual_set("tortoise plushy") == ["a {} on a shelf"]
    assert resolve("tortoise_plushy") == ["a {} on a shelf"]


def test_resolve_accepts_shipped_names_and_file_paths(tmp_path):
    assert resolve("simple") == simple_set()
    assert resolve("man") == contextual_set("man")
    custom = tmp_path / "custom.txt"
    custom.write_text("a {} on the moon\n")
    assert resolve(custom) == ["a {} on the moon"]
    assert resolve(str(custom)) == ["a {} on the moon"]


def test_resolve_unknown_name_lists_shipped_sets():
    with pytest.raises(ValueError, match="simple") as info:
        resolve("no-such-set")
    assert "'man'" in str(info.value)


# -------------------------------------------------------------------------------------------------- words


def test_words_splits_like_clips_pre_tokeniser():
    assert words("A Man's DOG, 2 cats!") == ["a", "man", "'s", "dog", ",", "2", "cats", "!"]
    assert words("<|startoftext|>a photo<|endoftext|>") == ["<|startoftext|>", "a", "photo", "<|endoftext|>"]
    assert words("Coco-Cola  42") == ["coco", "-", "cola", "4", "2"]


def test_vocabulary_covers_every_word_of_the_shipped_prompts():
    vocab = set(vocabulary_words())
    assert SLOT not in vocab
    for word in ["photo", "portrait", "glasses", "guitar", "man", "woman", "person", "tortoise"]:
        assert word in vocab
    for prompt in simple_set() + contextual_set("man"):
        assert set(words(fill(prompt, ""))) <= vocab
