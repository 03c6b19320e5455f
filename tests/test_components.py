"""Loading model parts: the built-in tiny model, a saved diffusers folder, and clear errors for bad paths."""

import subprocess
import sys

import pytest
import torch

from tea_lightning.components import load_components, resolve_pretrained
from tea_lightning.prompt_sets import available_concepts, contextual_set, package_prompt_files, simple_set, words
from tea_lightning.tiny import tiny_pipeline, tiny_tokenizer


def test_tiny_model_saved_with_save_pretrained_loads_back_through_the_hub_path(tiny_dir):
    built, loaded = tiny_pipeline(), load_components(str(tiny_dir))
    for name in ("text_encoder", "vae", "unet"):
        a, b = getattr(built, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    prompt = "a photo of a man wearing glasses and playing guitar"
    assert built.tokenizer(prompt).input_ids == loaded.tokenizer(prompt).input_ids
    assert loaded.noise_scheduler.config.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = tiny_pipeline(), tiny_pipeline()
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters(), strict=True))


def test_every_word_of_the_shipped_prompt_sets_is_one_word_final_token():
    tokenizer = tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    corpus = set()
    for path in package_prompt_files():
        corpus.update(words(path.read_text()))
    corpus.update(w for concept in available_concepts() for w in concept.split())
    split = [w for w in sorted(corpus) if w + "</w>" not in vocab and w not in ("<|startoftext|>", "<|endoftext|>")]
    assert split == []
    for sentence in contextual_set("man")[:20] + simple_set()[:20]:
        text = sentence.replace("{}", "man")
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
        assert all(p.endswith("</w>") for p in pieces), pieces


def test_tokenizer_distinguishes_word_final_tokens_from_subwords_like_clip():
    tokenizer = tiny_tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer("man", add_special_tokens=False).input_ids) == ["man</w>"]
    assert tokenizer.convert_tokens_to_ids("man") != tokenizer.convert_tokens_to_ids("man</w>")
    assert tokenizer.convert_tokens_to_ids("man") != tokenizer.unk_token_id
    ids = tokenizer("a dog").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.model_max_length == 77


@pytest.mark.parametrize("bad", ["./no/such/model", "/definitely/missing", "~/missing-sd"])
def test_an_unknown_local_path_names_the_value_and_the_alternatives(bad):
    with pytest.raises(FileNotFoundError, match="No such model folder") as error:
        resolve_pretrained(bad)
    assert "tiny" in str(error.value) and "model_index.json" in str(error.value)


def test_a_folder_that_is_not_a_diffusers_model_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks the subfolders"):
        resolve_pretrained(str(tmp_path))


def test_a_hub_id_that_is_not_cached_fails_offline_with_the_fix():
    message = r"pretrained='nobody/no-such-model' is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids"
    with pytest.raises(FileNotFoundError, match=message + r" downloading it\. Download it once"):
        load_components("nobody/no-such-model")


def test_tiny_model_is_identical_in_every_process():
    # An export trained in one process is used by infer.py in another: the vocabulary ids and weights must agree.
    script = ("import hashlib, json; from tea_lightning.tiny import tiny_pipeline; p = tiny_pipeline(); "
              "v = json.dumps(sorted(p.tokenizer.get_vocab().items())); "
              "print(hashlib.sha1(v.encode()).hexdigest(), float(p.text_encoder.get_input_embeddings().weight.sum()))")
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
            for _ in range(3)}
    assert len(runs) == 1, runs
