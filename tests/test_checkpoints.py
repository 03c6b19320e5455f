"""Every checkpoint format users have loads, installs what it holds, and changes the images; bad files say why."""

import argparse
import json

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

from helpers import make_trainer, star_data, ti_module
from tea_lightning import checkpoints
from tea_lightning.checkpoints import Concept, Personalized
from tea_lightning.export import CUSTOM_DIFFUSION_WEIGHTS, LORA_WEIGHTS
from tea_lightning.inference import Setting, encode, make_scheduler, render_jobs
from tea_lightning.prompting import parse_prompt
from tea_lightning.tiny import HIDDEN, tiny_pipeline


def _vectors(k: int = 1, seed: int = 0, width: int = HIDDEN) -> torch.Tensor:
    return 3.0 * torch.randn(k, width, generator=torch.Generator().manual_seed(seed))


def _image(model: Personalized, prompt: str) -> np.ndarray:
    """One 2-step 64 px image of `prompt` (baseline, no TEA), as an array."""
    prompts = [parse_prompt(prompt, model.concepts)]
    negative = encode(model.pipe, [""])
    model.pipe.scheduler = make_scheduler("dpm", model.pipe.scheduler.config)
    model.pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = render_jobs(model, prompts, [(0, 0)], Setting(), negative, seed=0, steps=2, guidance=7.0,
                            resolution=64, level="token")[0]
    return np.asarray(image)


def _base_image(prompt: str) -> np.ndarray:
    return _image(Personalized(tiny_pipeline(), [Concept("star", "star")], [], "base", "tiny"), prompt)


def _load(path, **kwargs) -> Personalized:
    source = checkpoints.read(path)
    concepts = checkpoints.resolve_concepts(source.concepts, kwargs.pop("concept_word", None),
                                            kwargs.pop("concepts", None))
    return checkpoints.build(source, concepts, pretrained=kwargs.pop("pretrained", "tiny"), **kwargs)


def _save_lora(folder):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = tiny_pipeline()
    torch.manual_seed(0)
    unet = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]), pipe.unet)
    text = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                              target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                                   pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text)))
    return folder / LORA_WEIGHTS


def _custom_diffusion_unet():
    """A tiny UNet with trained-looking Custom Diffusion processors on its cross-attention layers."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    unet = tiny_pipeline().unet
    generator = torch.Generator().manual_seed(1)
    processors = {}
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.rsplit(".", 1)[0]).inner_dim
            processor = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=True, hidden_size=hidden,
                                                        cross_attention_dim=HIDDEN)
            with torch.no_grad():
                for p in processor.parameters():
                    p.copy_(0.3 * torch.randn(p.shape, generator=generator))
        else:  # as diffusers' train_custom_diffusion.py sets self-attention: nothing trained, same computation
            processor = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
        processors[name] = processor
    unet.set_attn_processor(processors)
    return unet


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    vectors = _vectors(2)
    module = ti_module(num_vectors=2)
    with torch.no_grad():
        module.learned.vectors.copy_(vectors)
    export = root / "export"
    export.mkdir()
    module.export(export, step=7)

    a1111 = root / "pinkv.pt"
    torch.save({"string_to_param": {"*": vectors}, "string_to_token": {"*": 265}, "name": "pinkv", "step": 7,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, a1111)
    kohya = root / "kohyav.safetensors"
    save_file({"emb_params": vectors}, kohya)
    kohya_pt = root / "kohyapt.pt"
    torch.save({"emb_params": vectors}, kohya_pt)
    token_file = root / "new1.safetensors"
    save_file({"<new1>": vectors[0]}, token_file)  # Custom Diffusion modifier token: 1-D

    custom = root / "custom"
    _custom_diffusion_unet().save_attn_procs(custom, weight_name=CUSTOM_DIFFUSION_WEIGHTS)
    save_file({"<new1>": vectors[0]}, custom / "<new1>.safetensors")
    (custom / "tea.json").write_text(json.dumps({"method": "custom_diffusion", "base_model": "tiny",
                                                 "keyword": "<new1> star", "concept_word": "star", "step": 5}))
    lora_dir = root / "lora"
    lora_dir.mkdir()
    return {"vectors": vectors, "export": export, "diffusers": export / "learned_embeds.safetensors",
            "a1111_safetensors": export / "v.safetensors", "a1111_pt": a1111, "kohya": kohya, "kohya_pt": kohya_pt,
            "token_file": token_file, "custom": custom, "lora": _save_lora(lora_dir), "root": root}


# Embedding formats: the keyword's text embeddings must equal what stock diffusers' loader makes of the same file.
EMBEDDING_FORMATS = [  # (fixture key, keyword in prompts, concept word to pass)
    ("export", "<v>", None),
    ("diffusers", "<v>", "star"),
    ("a1111_safetensors", "<v>", "star"),  # our export's copy records its token name in the metadata
    ("a1111_pt", "pinkv", "star"),
    ("kohya", "kohyav", "star"),
    ("kohya_pt", "kohyapt", "star"),
    ("token_file", "<new1>", "star"),
]


@pytest.mark.parametrize("key, keyword, word", EMBEDDING_FORMATS, ids=[f[0] for f in EMBEDDING_FORMATS])
def test_every_embedding_format_loads_as_stock_diffusers_would_and_changes_the_image(files, key, keyword, word):
    model = _load(files[key], concept_word=word)
    prompt = f"a photo of {keyword} on a table"
    stock = tiny_pipeline()
    stock.load_textual_inversion(str(files[key]), token=keyword)
    with torch.no_grad():
        ours = encode(model.pipe, [parse_prompt(prompt, model.concepts).model_text]).states
        theirs = stock.text_encoder(stock.tokenizer(stock.maybe_convert_prompt(prompt, stock.tokenizer),
                                                    padding="max_length", max_length=77,
                                                    return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert model.concepts[0].concept_word == "star"
    assert not np.array_equal(_image(model, prompt), _base_image("a photo of star on a table"))


def test_a_lightning_checkpoint_loads_like_its_export(files, tmp_path):
    module = ti_module(lr=5e-2, num_vectors=2)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    make_trainer(tmp_path, max_steps=1, callbacks=[saver], enable_checkpointing=True).fit(module, star_data())
    (tmp_path / "export").mkdir()
    module.export(tmp_path / "export", step=1)
    from_ckpt, from_export = _load(tmp_path / "last.ckpt"), _load(tmp_path / "export")
    assert from_ckpt.base_model == "tiny" and from_ckpt.concepts[0].concept_word == "star"
    prompt = "a photo of <v> in the snow"
    np.testing.assert_array_equal(_image(from_ckpt, prompt), _image(from_export, prompt))

    # A method other than Textual Inversion is rebuilt from the class LightningCLI records, then used in place.
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "tea_lightning.TextualInversion"
    checkpoint["state_dict"]["learned.extra"] = torch.zeros(1)  # not plain TI any more: no direct read
    torch.save(checkpoint, tmp_path / "rebuilt.ckpt")
    source = checkpoints.read(tmp_path / "rebuilt.ckpt")
    assert source.module is not None
    rebuilt = checkpoints.build(source, source.concepts)
    assert rebuilt.concepts[0].keyword == "<v> <v>_1"
    np.testing.assert_array_equal(_image(rebuilt, "a photo of <v> <v>_1 in the snow"), _image(from_export, prompt))


def test_dreambooth_lora_loads_and_changes_the_image(files):
    model = _load(files["lora"].parent, concepts=["sks star=star"])
    assert model.rows == [] and model.concepts == [Concept("sks star", "star")]
    assert not np.array_equal(_image(model, "a photo of sks star"), _base_image("a photo of sks star"))


def test_custom_diffusion_weights_install_with_our_loader_and_match_the_trained_unet(files):
    model = _load(files["custom"])
    assert model.concepts[0].keyword == "<new1> star" and len(model.rows) == 1
    trained = _custom_diffusion_unet()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = torch.randn(1, 77, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(latents, 10, states).sample
        ours = model.pipe.unet(latents, 10, states).sample
        base = tiny_pipeline().unet(latents, 10, states).sample
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, base)
    assert not np.array_equal(_image(model, "a photo of <new1> star"), _base_image("a photo of star"))


def test_the_concept_row_is_the_word_final_token_not_the_subword(files):
    model = _load(files["diffusers"], concept_word="man")
    tokenizer, table = model.pipe.tokenizer, model.pipe.text_encoder.get_input_embeddings().weight
    word_final, subword = tokenizer.convert_tokens_to_ids(["man</w>", "man"])
    assert word_final != subword
    torch.testing.assert_close(model.rows[0].targets, table[word_final].expand(2, -1), rtol=0, atol=0)
    assert not torch.allclose(model.rows[0].targets[0], table[subword])


def test_a_concept_word_of_several_tokens_is_an_error_unless_mean_is_chosen(files):
    with pytest.raises(ValueError, match=r"concept_word='teddy bear' is 2 tokens.*--concept_reduce mean"):
        _load(files["diffusers"], concept_word="teddy bear")
    model = _load(files["diffusers"], concept_word="teddy bear", concept_reduce="mean")
    table = model.pipe.text_encoder.get_input_embeddings().weight
    ids = model.pipe.tokenizer("teddy bear", add_special_tokens=False).input_ids
    torch.testing.assert_close(model.rows[0].targets[0], table[ids].mean(0))


def test_weights_of_another_width_name_both_widths(files, tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file({"<w>": _vectors(1, width=48)}, path)
    with pytest.raises(ValueError, match=r"48 wide.*'tiny' is 32 wide"):
        _load(path, concept_word="star")
    weights = load_file(files["custom"] / CUSTOM_DIFFUSION_WEIGHTS)
    wide = {k: torch.zeros(v.shape[0], 48) if "to_k_" in k or "to_v_" in k else v for k, v in weights.items()}
    save_file(wide, tmp_path / CUSTOM_DIFFUSION_WEIGHTS)
    with pytest.raises(ValueError, match=r"read 48-wide text embeddings, but 'tiny' has 32-wide"):
        _load(tmp_path / CUSTOM_DIFFUSION_WEIGHTS, concepts=["<new1> star=star"])


def test_unknown_missing_and_unsafe_files_say_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        checkpoints.read(tmp_path / "nowhere.safetensors")
    odd = tmp_path / "odd.safetensors"
    save_file({"model.layer.weight": torch.ones(2, 2)}, odd)
    with pytest.raises(ValueError, match=r"unknown format.*'model.layer.weight'.*Accepted checkpoints"):
        checkpoints.read(odd)
    with pytest.raises(ValueError, match="unknown suffix '.txt'"):
        (tmp_path / "notes.txt").write_text("hi")
        checkpoints.read(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="folder without a checkpoint file"):
        checkpoints.read(tmp_path)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"string_to_param": {"*": torch.ones(1, 4)}, "extra": argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        checkpoints.read(unsafe)


def test_a_file_without_a_concept_word_asks_for_one(files):
    source = checkpoints.read(files["diffusers"])
    with pytest.raises(ValueError, match=r"No concept word for the keyword\(s\) \['<v>'\].*--concept_word"):
        checkpoints.resolve_concepts(source.concepts)
    lora = checkpoints.read(files["lora"])
    with pytest.raises(ValueError, match="--concept 'sks dog=dog'"):
        checkpoints.resolve_concepts(lora.concepts)
