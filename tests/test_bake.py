"""Baked TEA: embedding files that give stock loaders (diffusers, AUTOMATIC1111, ComfyUI) TEA's prompt embeddings
without tea-lightning at generation time."""

import json

import pytest
import torch
from safetensors import safe_open

from helpers import cd_module, ti_module
from tea_lightning import checkpoints, personalized
from tea_lightning.bake import BAKE_JSON, bake, main
from tea_lightning.export import LORA_WEIGHTS
from tea_lightning.inference import Setting, prompt_embeddings
from tea_lightning.prompting import parse_prompt
from tea_lightning.tiny import tiny_pipeline
from tea_lightning.tokens import LearnedTokens


def _drifted(module, seed: int):
    """A method whose learned rows have drifted far from their concept word: TEA then changes them noticeably."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tokens in (m for m in module.modules() if isinstance(m, LearnedTokens)):
            tokens.vectors.copy_(3.0 * torch.randn(tokens.vectors.shape, generator=generator))
    return module


def _stock_embeddings(pipe, prompt: str) -> torch.Tensor:
    """The prompt embeddings stock diffusers computes (multi-vector tokens expanded as its pipeline does)."""
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _our_embeddings(checkpoint, prompt: str, setting: Setting, **concepts) -> torch.Tensor:
    source = checkpoints.read(checkpoint)
    model = personalized.build(source, checkpoints.resolve_concepts(source.concepts, **concepts), pretrained="tiny")
    return prompt_embeddings(model, [parse_prompt(prompt, model.concepts)], setting, level="token").states


@pytest.fixture(scope="module")
def ti_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti-export")
    _drifted(ti_module(num_vectors=2), seed=0).export(folder, step=5)
    return folder


def test_a_baked_embedding_gives_stock_diffusers_the_prompt_embeddings_of_token_level_tea(ti_export, tmp_path):
    out = tmp_path / "baked"
    bake(ti_export, out, rho=0.3, alpha=0.7)
    prompt = "a photo of <v> wearing glasses"
    tea = _our_embeddings(ti_export, prompt, Setting(0.3, 0.7))
    assert not torch.allclose(tea, _our_embeddings(ti_export, prompt, Setting())), "TEA changed nothing here"
    for layout in ("diffusers", "webui"):  # the webui file is named by its file name, so diffusers needs the token
        stock = tiny_pipeline()
        stock.load_textual_inversion(str(out / layout / "v.safetensors"), token="<v>")
        torch.testing.assert_close(_stock_embeddings(stock, prompt), tea, atol=1e-5, rtol=1e-5)

    with safe_open(str(out / "webui" / "v.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        metadata = handle.metadata()
    assert (metadata["tea_rho"], metadata["tea_alpha"], metadata["tea_concept_word"]) == ("0.3", "0.7", "star")
    record = json.loads((out / BAKE_JSON).read_text())
    assert (record["rho"], record["alpha"], record["base_model"]) == (0.3, 0.7, "tiny")
    assert record["tokens"] == [{"token": "<v>", "keyword": "<v>", "concept_word": "star", "vectors": 2,
                                 "webui_word": "v", "files": {"webui": "webui/v.safetensors",
                                                              "diffusers": "diffusers/v.safetensors"}}]


def test_custom_diffusion_modifier_tokens_bake_from_the_command_line(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    _drifted(cd_module(), seed=1).export(folder, step=3)
    main([str(folder), "--out", str(tmp_path / "baked"), "--rho", "0.5", "--alpha", "0.5"])
    assert "new1" in capsys.readouterr().out
    prompt = "a photo of <new1> star"
    stock = tiny_pipeline()
    stock.load_textual_inversion(str(tmp_path / "baked" / "diffusers" / "new1.safetensors"))  # token from the key
    torch.testing.assert_close(_stock_embeddings(stock, prompt), _our_embeddings(folder, prompt, Setting(0.5, 0.5)),
                               atol=1e-5, rtol=1e-5)


def test_what_cannot_bake_is_refused_before_anything_is_written(ti_export, tmp_path):
    from helpers import lora_module

    lora_module(rank=2).export(tmp_path / "lora", step=0)
    with pytest.raises(ValueError, match="no learned token rows, so there is nothing to bake.*infer.py"):
        bake(tmp_path / "lora" / LORA_WEIGHTS, tmp_path / "out", concepts=["sks star=star"])
    with pytest.raises(ValueError, match=r"rho=2.0 is outside \[0, 1\]"):
        bake(ti_export, tmp_path / "out", rho=2.0)
    assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already holds files that are not a bake"):
        bake(ti_export, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
