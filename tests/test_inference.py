"""TEA at generation time: what a user sees in the images, the files and the errors."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tea_lightning import checkpoints, inference, personalized
from tea_lightning.checkpoints import Concept
from tea_lightning.grids import SMALL_CELL
from tea_lightning.inference import Setting, encode, generate, prompt_embeddings
from tea_lightning.personalized import Personalized
from tea_lightning.prompting import parse_prompt, read_prompts_file
from tea_lightning.tea import adjust
from tea_lightning.tiny import HIDDEN, tiny_pipeline

FAST = dict(steps=2, resolution=64, progress=False)


def _embedding(path, token: str, seed: int, k: int = 1):
    save_file({token: 3.0 * torch.randn(k, HIDDEN, generator=torch.Generator().manual_seed(seed))}, path)
    return path


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    return {"v": _embedding(root / "v.safetensors", "<v>", 0, k=2), "man": _embedding(root / "m.safetensors", "<m>", 1),
            "dog": _embedding(root / "d.safetensors", "<d>", 2)}


def _images(folder) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_tea_with_zero_factors_equals_the_baseline_bit_for_bit_and_a_sweep_writes_every_image(embeddings, tmp_path):
    out = tmp_path / "out"
    records = generate(embeddings["v"], ["a photo of <v> on the beach", "a {} wearing glasses"], out,
                       rhos=(0.0, 1.0), alphas=(0.0, 1.0), num_images=3, batch_size=2, concept_word="star",
                       pretrained="tiny", **FAST)
    tags = ["baseline", "tea-rho0-alpha0", "tea-rho0-alpha1", "tea-rho1-alpha0", "tea-rho1-alpha1"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == tags
    for tag in tags:  # one image and one record per (setting, prompt, index)
        assert sorted(p.name for p in (out / tag).iterdir()) == sorted(
            f"p{p:03d}-i{i:03d}.{ext}" for p in range(2) for i in range(3) for ext in ("png", "json"))
    assert len(records) == 5 * 2 * 3

    baseline, same, full = (_images(out / t) for t in ("baseline", "tea-rho0-alpha0", "tea-rho1-alpha1"))
    for name in baseline:
        np.testing.assert_array_equal(same[name], baseline[name])
        assert not np.array_equal(full[name], baseline[name])

    record = json.loads((out / "tea-rho1-alpha0" / "p001-i002.json").read_text())
    assert record["prompt"] == "a <v> wearing glasses" and record["template"] == "a {} wearing glasses"
    assert (record["prompt_index"], record["image_index"], record["mode"], record["level"]) == (1, 2, "tea", "token")
    assert (record["rho"], record["alpha"], record["keyword"], record["concept_word"]) == (1.0, 0.0, "<v>", "star")
    assert (record["base_model"], record["scheduler"], record["steps"], record["resolution"]) == ("tiny", "dpm", 2, 64)
    assert json.loads((out / "baseline" / "p001-i002.json").read_text())["seed"] == record["seed"]

    grid = np.asarray(Image.open(out / "grid.png").convert("L"))  # a row per prompt, a column per setting
    cell = SMALL_CELL  # 64 px images grow to a readable size
    assert grid.shape[1] > 5 * 3 * cell and 2 * cell < grid.shape[0] < 3 * cell, grid.shape
    images_left = grid.shape[1] - 5 * 3 * (cell + 2)
    for row in range(2):  # each prompt's text is written beside its row
        band = grid[26 + row * (cell + 10): 26 + row * (cell + 10) + cell, :images_left]
        assert (band < 100).any(), f"no label beside row {row}"


def test_prompt_level_with_zero_factors_equals_the_baseline_bit_for_bit(embeddings, tmp_path):
    generate(embeddings["v"], ["a photo of <v> on the beach"], tmp_path, rhos=(0.0, 1.0), alphas=(0.0,),
             num_images=2, mode="prompt", concept_word="star", pretrained="tiny", **FAST)
    baseline, same, turned = (_images(tmp_path / t) for t in ("baseline", "tea-rho0-alpha0", "tea-rho1-alpha0"))
    for name in baseline:
        np.testing.assert_array_equal(same[name], baseline[name])
        assert not np.array_equal(turned[name], baseline[name])
    assert json.loads((tmp_path / "tea-rho1-alpha0" / "p000-i000.json").read_text())["level"] == "prompt"


def test_an_image_is_the_same_whatever_else_is_in_its_batch(embeddings, tmp_path):
    common = dict(rhos=(0.2,), compare=False, concept_word="star", pretrained="tiny", num_images=2, **FAST)
    generate(embeddings["v"], ["a <v>", "a <v> in the snow"], tmp_path / "batched", batch_size=4, **common)
    generate(embeddings["v"], ["a <v>"], tmp_path / "single", batch_size=1, **common)
    name = "tea-rho0.2-alpha0.5/p000-i001.png"
    batched = np.asarray(Image.open(tmp_path / "batched" / name), dtype=int)
    single = np.asarray(Image.open(tmp_path / "single" / name), dtype=int)
    assert np.abs(batched - single).max() <= 2  # float rounding of batched kernels at most


def test_resume_skips_finished_images_and_other_settings_are_refused(embeddings, tmp_path):
    common = dict(concept_word="star", pretrained="tiny", batch_size=2, **FAST)
    generate(embeddings["v"], ["a <v>"], tmp_path, num_images=2, **common)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("p*.png")}
    records = generate(embeddings["v"], ["a <v>"], tmp_path, num_images=4, **common)  # two more per setting
    assert len(records) == 8
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "a finished image was rewritten"
    assert len(list(tmp_path.rglob("p*.png"))) == 8
    with pytest.raises(ValueError, match=r"other settings \(steps: 2 -> 3\)"):
        generate(embeddings["v"], ["a <v>"], tmp_path, num_images=2, **{**common, "steps": 3})
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_resume_is_keyed_by_the_checkpoints_tensors_not_its_path(tmp_path):
    checkpoint, out = _embedding(tmp_path / "a.safetensors", "<v>", 0), tmp_path / "out"
    common = dict(concept_word="star", pretrained="tiny", num_images=1, **FAST)
    generate(checkpoint, ["a <v>"], out, **common)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("p*.png")}
    moved = tmp_path / "moved" / "a.safetensors"
    moved.parent.mkdir()
    os.replace(checkpoint, moved)
    generate(moved, ["a <v>"], out, **common)  # the same tensors elsewhere: resumed, nothing rewritten
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    _embedding(moved, "<v>", 1)  # another checkpoint at the same path must not add images to this folder
    with pytest.raises(ValueError, match=r"other settings \(checkpoint_fingerprint: "):
        generate(moved, ["a <v>"], out, **common)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_a_killed_runs_hidden_temporaries_are_removed_when_the_folder_is_resumed(embeddings, tmp_path):
    common = dict(concept_word="star", pretrained="tiny", num_images=1, **FAST)
    generate(embeddings["v"], ["a <v>"], tmp_path, **common)
    half = tmp_path / "baseline" / ".p000-i001.png.999999999-k2j3.tmp"  # a process that no longer exists
    half.write_bytes(b"half an image")
    generate(embeddings["v"], ["a <v>"], tmp_path, **common)
    assert not half.exists()


def test_an_output_folder_of_other_files_or_a_file_is_refused(embeddings, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already holds files that tea-lightning did not write"):
        generate(embeddings["v"], ["a <v>"], tmp_path, concept_word="star", pretrained="tiny", **FAST)
    with pytest.raises(ValueError, match=r"out=.*mine.txt' is a file"):
        generate(embeddings["v"], ["a <v>"], tmp_path / "mine.txt", concept_word="star", pretrained="tiny", **FAST)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rhos=(0.2, 1.5)), r"rho=1.5 is outside \[0, 1\]"),
    (dict(alphas=(-0.1,)), r"alpha=-0.1 is outside \[0, 1\]"),
    (dict(prompts=["a photo of a dog"]), r"prompt 'a photo of a dog' holds no keyword: write '<v>'"),
    (dict(concept_word=None), r"No concept word for the keyword\(s\) \['<v>'\]"),
    (dict(checkpoint="missing/learned_embeds.safetensors"), "does not exist"),
    (dict(resolution=60), "multiple of 8"),
    (dict(align="middle"), r"align='middle' is not one of \['span', 'position'\]"),
])
def test_bad_input_is_refused_before_any_image_is_made(embeddings, tmp_path, kwargs, message):
    options = dict(checkpoint=embeddings["v"], prompts=["a <v>"], out=tmp_path / "out", concept_word="star",
                   pretrained="tiny", **FAST)
    options.update(kwargs)
    error = FileNotFoundError if "checkpoint" in kwargs else ValueError
    with pytest.raises(error, match=message):
        generate(options.pop("checkpoint"), options.pop("prompts"), options.pop("out"), **options)
    assert not (tmp_path / "out").exists()


def test_keywords_match_whole_words_and_templates_fill_the_slot():
    concepts = [Concept("sks dog", "dog")]
    prompt = parse_prompt("many sks dog, human and sks dog", concepts)
    assert prompt.target_text == "many dog, human and dog"
    assert prompt.template == "many {}, human and {}"
    with pytest.raises(ValueError, match="holds no keyword"):
        parse_prompt("a sks doggy", concepts)
    assert parse_prompt("a {} by a man", concepts).text == "a sks dog by a man"


def _prompt_level_case():
    model = Personalized(tiny_pipeline(), [Concept("sks star", "star")], [], "test", "tiny")
    prompt = parse_prompt("a photo of sks star wearing glasses", model.concepts)
    with torch.no_grad():
        embeds = encode(model.pipe, [prompt.model_text]).states[0]  # [77, D]
        target = encode(model.pipe, [prompt.target_text]).states[0]
    return model, prompt, embeds, target


def test_span_alignment_keeps_the_text_before_the_keyword_and_pairs_later_tokens_with_their_counterparts():
    model, prompt, embeds, target = _prompt_level_case()
    tokenizer = model.pipe.tokenizer
    before = 1 + len(tokenizer("a photo of", add_special_tokens=False).input_ids)  # BOS + "a photo of"
    keyword = len(tokenizer("sks star", add_special_tokens=False).input_ids)
    assert keyword == 2
    with torch.no_grad():
        gentle = prompt_embeddings(model, [prompt], Setting(0.2, 0.5), level="prompt", align="span").states[0]
        full = prompt_embeddings(model, [prompt], Setting(1.0, 1.0), level="prompt", align="span").states[0]
    assert torch.equal(gentle[:before], embeds[:before])
    assert not torch.allclose(gentle[before:], embeds[before:])
    # rho = alpha = 1 lands each position on its partner: both keyword tokens on "star", then every later token
    # (wearing, glasses, end of text, padding) on the same token one position earlier in the target prompt.
    torch.testing.assert_close(full[before:before + keyword], target[before].expand(keyword, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(full[before + keyword:], target[before + 1:77 - keyword + 1], atol=1e-4, rtol=0)


def test_position_alignment_reproduces_the_authors_position_by_position_pairing():
    model, prompt, embeds, target = _prompt_level_case()
    with torch.no_grad():
        ours = prompt_embeddings(model, [prompt], Setting(0.2, 0.5), level="prompt", align="position").states[0]
    authors = torch.stack([adjust(embeds[i], target[i], 0.2, 0.5) for i in range(77)])
    torch.testing.assert_close(ours, authors, atol=1e-6, rtol=0)


def test_target_encoder_base_encodes_the_target_with_the_adapters_off(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    pipe = tiny_pipeline()
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
                            pipe.text_encoder)
    model = Personalized(pipe, [Concept("sks star", "star")], [], "test", "tiny")
    prompt = parse_prompt("a photo of sks star", model.concepts)
    with torch.no_grad():
        full = {which: prompt_embeddings(model, [prompt], Setting(1.0, 1.0), level="prompt", align="position",
                                         target_encoder=which).states[0] for which in ("adapted", "base")}
        adapted_target = encode(pipe, [prompt.target_text]).states[0]
        base_target = encode(Personalized(tiny_pipeline(), [], [], "", "").pipe, [prompt.target_text]).states[0]
    torch.testing.assert_close(full["adapted"], adapted_target, atol=1e-4, rtol=0)
    torch.testing.assert_close(full["base"], base_target, atol=1e-4, rtol=0)
    assert all(p.requires_grad for n, p in pipe.text_encoder.named_parameters() if "lora" in n), "trainability lost"


def test_the_authors_custom_diffusion_target_replaces_only_the_modifier_and_pairs_position_by_position():
    (concept,) = checkpoints.modifier_targets([Concept("<new1> star", "star")], ["<new1>"])
    pipe = tiny_pipeline()
    pipe.tokenizer.add_tokens(["<new1>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    model = Personalized(pipe, [concept], [], "test", "tiny")
    prompt = parse_prompt("{} on a boat in the sea", model.concepts)
    assert prompt.target_text == "star star on a boat in the sea", "the class word stays, as in the authors' runs"
    with torch.no_grad():
        embeds = encode(pipe, [prompt.model_text]).states[0]
        target = encode(pipe, [prompt.target_text]).states[0]
        spans = [prompt_embeddings(model, [prompt], Setting(0.2, 0.5), level="prompt", align=a).states[0]
                 for a in ("span", "position")]
    torch.testing.assert_close(spans[0], spans[1], atol=0, rtol=0)  # same length: both pairings are i with i
    torch.testing.assert_close(spans[1], torch.stack([adjust(embeds[i], target[i], 0.2, 0.5) for i in range(77)]),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="holds none"):
        checkpoints.modifier_targets([Concept("sks star", "star")], [])


def test_dreambooth_checkpoints_default_to_the_authors_rho_of_0_1_and_others_to_0_2(embeddings):
    assert checkpoints.default_rho(checkpoints.read(embeddings["man"])) == 0.2
    lora = checkpoints.Source("x.safetensors", "DreamBooth LoRA", lora={"k": torch.zeros(1)})
    assert checkpoints.default_rho(lora) == 0.1


@pytest.mark.parametrize(("class_path", "method", "rho"), [
    ("tea_lightning.DreamBoothLoRA", "dreambooth_lora", 0.1),
    ("tea_lightning.TextualInversion", "textual_inversion", 0.2),
])
def test_the_default_rho_of_a_saved_checkpoint_is_read_without_loading_its_base_model(tmp_path, class_path, method,
                                                                                       rho):
    # evaluate.py picks rho before generating: a base model that cannot even be found shows that none was loaded.
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"_class_path": class_path, "pretrained": "/no/such/model"},
                "state_dict": {"x": torch.zeros(1)}}, ckpt)
    assert checkpoints.default_rho_of(ckpt) == rho
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "tea.json").write_text(f'{{"format_version": 1, "method": "{method}"}}')
    assert checkpoints.default_rho_of(tmp_path / "export") == rho


def test_each_keyword_of_a_multi_concept_prompt_turns_towards_its_own_word(embeddings):
    source = checkpoints.merge([checkpoints.read(embeddings["man"]), checkpoints.read(embeddings["dog"])])
    concepts = checkpoints.resolve_concepts(source.concepts, concepts=["<m>=man", "<d>=dog"])
    model = personalized.build(source, concepts, pretrained="tiny")
    prompt = parse_prompt("a photo of <m> touching a <d>", model.concepts)
    with torch.no_grad():
        full = prompt_embeddings(model, [prompt], Setting(1.0, 1.0), level="token").states
        words = encode(model.pipe, ["a photo of man touching a dog"]).states
        baseline = prompt_embeddings(model, [prompt], Setting(), level="token").states
    torch.testing.assert_close(full, words, atol=1e-5, rtol=0)
    assert not torch.allclose(baseline, words)


def test_multi_vector_tokens_expand_and_every_vector_is_adjusted(embeddings):
    source = checkpoints.read(embeddings["v"])
    model = personalized.build(source, checkpoints.resolve_concepts(source.concepts, "star"), pretrained="tiny")
    prompt = parse_prompt("a photo of <v>", model.concepts)
    assert prompt.model_text == "a photo of <v> <v>_1"
    with torch.no_grad():
        full = prompt_embeddings(model, [prompt], Setting(1.0, 1.0), level="token").states
        words = encode(model.pipe, ["a photo of star star"]).states
    torch.testing.assert_close(full, words, atol=1e-5, rtol=0)


def test_prompts_file_reads_a_csv_prompt_column_or_lines(tmp_path):
    from helpers import ROOT

    rows = read_prompts_file(ROOT / "tea_lightning" / "prompts" / "eval_celeba.csv")
    assert len(rows) == 17 and all(r.count("{}") == 1 for r in rows)
    (tmp_path / "p.txt").write_text("# mine\na photo of <v>\n\na {} on a boat\n")
    assert read_prompts_file(tmp_path / "p.txt") == ["a photo of <v>", "a {} on a boat"]
    (tmp_path / "bad.csv").write_text("text\na {}\n")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        read_prompts_file(tmp_path / "bad.csv")


def test_a_prompt_longer_than_the_text_encoder_reads_is_refused(embeddings, tmp_path):
    long = "a photo of <v> " + "and a red car " * 20
    with pytest.raises(ValueError, match="tokens; the text encoder reads 75"):
        generate(embeddings["v"], [long], tmp_path, concept_word="star", pretrained="tiny", **FAST)


def test_generation_uses_the_available_accelerator_in_half_precision_by_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference._resolve_device(None, "auto") == (torch.device("cuda"), "fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference._resolve_device(None, "auto") == (torch.device("cpu"), "fp32")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_a_lora_and_an_embedding_together_each_get_their_own_level(embeddings, tmp_path):
    from helpers import lora_module
    from tea_lightning.export import LORA_WEIGHTS

    lora_module(rank=2).export(tmp_path, step=0)
    source = checkpoints.merge([checkpoints.read(embeddings["man"]), checkpoints.read(tmp_path / LORA_WEIGHTS)])
    concepts = checkpoints.resolve_concepts(source.concepts, concepts=["<m>=man", "sks circle=circle"])
    model = personalized.build(source, concepts, pretrained="tiny")
    assert [(c.keyword, c.learned) for c in model.concepts] == [("<m>", True), ("sks circle", False)]
    prompt = parse_prompt("a photo of <m> next to sks circle", model.concepts)
    tokenizer = model.pipe.tokenizer
    before = 1 + len(tokenizer("a photo of <m> next to", add_special_tokens=False).input_ids)
    with torch.no_grad():
        full = prompt_embeddings(model, [prompt], Setting(1.0, 1.0), level="mixed").states[0]
        words = encode(model.pipe, ["a photo of man next to sks circle"]).states[0]
        target = encode(model.pipe, ["a photo of man next to circle"]).states[0]
    # token level: <m>'s row became man's, so the text up to the LoRA keyword reads "a photo of man next to"
    torch.testing.assert_close(full[:before], words[:before], atol=1e-5, rtol=0)
    # prompt level: both tokens of "sks circle" land on "circle", later tokens on their counterparts
    torch.testing.assert_close(full[before:before + 2], target[before].expand(2, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(full[before + 2:], target[before + 1:76], atol=1e-4, rtol=0)

    common = dict(concepts=["<m>=man", "sks circle=circle"], pretrained="tiny", num_images=1, **FAST)
    paths = [embeddings["man"], tmp_path / LORA_WEIGHTS]
    records = generate(paths, ["a photo of <m> next to sks circle"], tmp_path / "out", **common)
    assert {r.level for r in records} == {None, "mixed"}
    with pytest.raises(ValueError, match=r"mode='token' needs learned token rows.*\['sks circle'\]"):
        generate(paths, ["a photo of <m> next to sks circle"], tmp_path / "token", mode="token", **common)


def test_a_lora_replaced_at_the_same_path_is_another_checkpoint_for_resume(tmp_path):
    # A LoRA is installed from its file, so the fingerprint must read the file: two trainings written to the same
    # path would otherwise mix their images in one resumed folder.
    from helpers import lora_module
    from tea_lightning.export import LORA_WEIGHTS

    lora_module(rank=2).export(tmp_path, step=0)
    first = checkpoints.fingerprint(checkpoints.read(tmp_path / LORA_WEIGHTS))
    assert checkpoints.fingerprint(checkpoints.read(tmp_path / LORA_WEIGHTS)) == first
    lora_module(rank=2, seed=1).export(tmp_path, step=0)
    assert checkpoints.fingerprint(checkpoints.read(tmp_path / LORA_WEIGHTS)) != first
