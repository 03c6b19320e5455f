"""Every checkpoint format users have loads, installs what it holds, and changes the images; bad files say why."""

import argparse
import json

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

from helpers import kohya_module_names, make_trainer, star_data, ti_module
from tea_lightning import checkpoints, personalized
from tea_lightning.checkpoints import Concept
from tea_lightning.export import CUSTOM_DIFFUSION_WEIGHTS, LORA_WEIGHTS
from tea_lightning.inference import Setting, encode, generate, make_scheduler, render_jobs
from tea_lightning.personalized import Personalized
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
    return personalized.build(source, concepts, pretrained=kwargs.pop("pretrained", "tiny"), **kwargs)


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


# Files as the tools that write them build them (each tool's writer read in its source; formats.md).


def _a1111_embedding(path, name: str, vectors: torch.Tensor):
    """AUTOMATIC1111's `Embedding.save`: a pickle of the token string's parameter and bookkeeping. Its
    `create_embedding` keeps spaces in names ("pink star"), and prompts then use the name as written."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": 7,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    return path


def _ai_toolkit_embedding(path, name: str, vectors: torch.Tensor):
    """ai-toolkit's `Embedding.save` to .safetensors: `emb_params`, and every bookkeeping value JSON-encoded into the
    metadata (so the name arrives quoted: '"pinkstar"')."""
    meta = {"string_to_token": {"*": 265}, "name": name, "step": 7, "sd_checkpoint": None,
            "sd_checkpoint_name": None, "notes": None}
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    metadata |= {"string_to_param": json.dumps({"*": "emb_params"}), "software": json.dumps({"name": "ai-toolkit"}),
                 "format": "pt"}
    save_file({"emb_params": vectors}, path, metadata=metadata)
    return path


def _original_ti_embedding(path, vectors: torch.Tensor):
    """The original Textual Inversion code (rinongal/textual_inversion) pickles its `EmbeddingManager`'s
    `nn.ParameterDict`."""
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})}, path)
    return path


def _custom_diffusion_bin(folder, vector: torch.Tensor):
    """diffusers' train_custom_diffusion.py with --no_safe_serialization: `unet.save_attn_procs` pickled, with an
    empty `{}` for each untrained self-attention processor, and `torch.save({token: embedding_table[id]})` per token
    (a row of the trained table)."""
    _custom_diffusion_unet().save_attn_procs(folder, weight_name="pytorch_custom_diffusion_weights.bin",
                                             safe_serialization=False)
    table = torch.nn.Parameter(torch.cat([torch.zeros(3, HIDDEN), vector[None]]))
    torch.save({"<new1>": table[3]}, folder / "<new1>.bin")
    return folder


def _lora_configs(alpha: int):
    from peft import LoraConfig

    common = dict(r=4, lora_alpha=alpha, init_lora_weights=False)
    return (LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"], **common),
            LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], **common))


def _adapted_pipeline(alpha: int = 8):
    """The tiny pipeline with random LoRA adapters (rank 4, `alpha`) on the UNet and the text encoder."""
    from peft import inject_adapter_in_model

    pipe = tiny_pipeline()
    unet_config, text_config = _lora_configs(alpha)
    torch.manual_seed(0)
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    return pipe


def _peft_lora_with_alpha(folder):
    """diffusers' own round trip (its LoRA tests): peft state dicts saved by `save_lora_weights` with each
    adapter's config as metadata, which carries lora_alpha (here 8 at rank 4: a LoRA at double strength)."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    pipe = _adapted_pipeline(alpha=8)
    unet_config, text_config = _lora_configs(8)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return folder / LORA_WEIGHTS


def _unet_adapter(folder):
    """`unet.save_lora_adapter`: the UNet's LoRA alone, keys without a `unet.` prefix, lora_alpha in metadata."""
    pipe = _adapted_pipeline(alpha=8)
    pipe.unet.save_lora_adapter(folder)
    return folder / LORA_WEIGHTS


def _kohya_lora(path, rank: int = 4, alpha: float = 2.0):
    """A LoRA as kohya's `LoRANetwork.save_weights` writes it: per module `lora_down.weight` [r, in(, 1, 1)],
    `lora_up.weight` [out, r(, 1, 1)] and the `alpha` buffer (the adapter adds alpha/r · up·down)."""
    generator, state = torch.Generator().manual_seed(2), {}
    for name, layer in kohya_module_names(tiny_pipeline()).items():
        conv = isinstance(layer, torch.nn.Conv2d)
        n_in, n_out = (layer.in_channels, layer.out_channels) if conv else (layer.in_features, layer.out_features)
        tail = (1, 1) if conv else ()
        state[f"{name}.lora_down.weight"] = 0.3 * torch.randn(rank, n_in, *tail, generator=generator)
        state[f"{name}.lora_up.weight"] = 0.3 * torch.randn(n_out, rank, *tail, generator=generator)
        state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                     "ss_network_alpha": str(alpha)})
    return path


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

    a1111 = _a1111_embedding(root / "pinkv.pt", "pinkv", vectors)
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
            "token_file": token_file, "custom": custom, "lora": _save_lora(lora_dir), "root": root,
            "a1111_spaced": _a1111_embedding(root / "pink star.pt", "pink star", vectors),
            "ai_toolkit": _ai_toolkit_embedding(root / "pinkstar.safetensors", "pinkstar", vectors)}


# Embedding formats: the keyword's text embeddings must equal what stock diffusers' loader makes of the same file.
EMBEDDING_FORMATS = [  # (fixture key, keyword in prompts, concept word to pass)
    ("export", "<v>", None),
    ("diffusers", "<v>", "star"),
    ("a1111_safetensors", "<v>", "star"),  # our export's copy records its token name in the metadata
    ("a1111_pt", "pinkv", "star"),
    ("kohya", "kohyav", "star"),
    ("kohya_pt", "kohyapt", "star"),
    ("token_file", "<new1>", "star"),
    ("a1111_spaced", "pink star", "star"),  # AUTOMATIC1111 keeps spaces in names; prompts write it as named
    ("ai_toolkit", "pinkstar", "star"),  # its metadata name is JSON-quoted
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


def test_an_embedding_named_with_a_space_takes_its_concept_word_from_the_suggested_concept_option(files, tmp_path):
    records = generate(files["a1111_spaced"], ["a photo of pink star on a table"], tmp_path,
                       concepts=["pink star=star"], pretrained="tiny", steps=1, resolution=32, num_images=1,
                       progress=False)
    tea = [(r.keyword, r.concept_word, r.level) for r in records if r.mode == "tea"]
    assert tea == [("pink star", "star", "token")]


def test_an_original_textual_inversion_file_is_refused_in_one_line_without_torchs_unsafe_advice(tmp_path):
    path = _original_ti_embedding(tmp_path / "embeddings_gs-5000.pt", _vectors(1))
    with pytest.raises(ValueError) as refused:
        checkpoints.read(path)
    message = str(refused.value)
    assert "ParameterDict" in message and "original Textual Inversion" in message and "emb_params" in message
    assert "\n" not in message and "\x1b" not in message and "weights_only=False" not in message


def test_a_custom_diffusion_bin_folder_from_diffusers_script_loads_and_matches_the_trained_unet(files, tmp_path):
    folder = _custom_diffusion_bin(tmp_path / "bin", files["vectors"][0])
    model = _load(folder, concepts=["<new1> star=star"])
    assert [c.keyword for c in model.concepts] == ["<new1> star"] and len(model.rows) == 1
    torch.testing.assert_close(model.rows[0].vectors, files["vectors"][:1])
    from tea_lightning.adapters import load_custom_diffusion

    unet = tiny_pipeline().unet
    changed = load_custom_diffusion(unet, folder)  # the folder alone, as for a .safetensors one
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = torch.randn(1, 77, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _custom_diffusion_unet()(latents, 10, states).sample
        for ours in (model.pipe.unet(latents, 10, states).sample, unet(latents, 10, states).sample):
            torch.testing.assert_close(ours, expected)
    assert len(changed) == len([k for k in unet.attn_processors if "attn2" in k])


def _lora_outputs(pipe, prompt: str = "a photo of sks star") -> tuple[torch.Tensor, torch.Tensor]:
    """What a LoRA changes: the text encoder's output for `prompt`, and the UNet's on fixed inputs."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        return states, pipe.unet(latents, 10, states).sample


def _assert_same_outputs(ours, theirs, base, text_encoder_changes: bool = True):
    """Our pipeline's text-encoder and UNet outputs equal stock diffusers' with the same file, and the LoRA changes
    them (the text encoder's only when the file holds text-encoder layers)."""
    outputs = zip(_lora_outputs(ours), _lora_outputs(theirs), _lora_outputs(base), (text_encoder_changes, True),
                  strict=True)
    for mine, stock, plain, changes in outputs:
        torch.testing.assert_close(mine, stock, rtol=1e-5, atol=1e-5)
        assert bool((mine - plain).abs().max() > 1e-3) == changes, "the LoRA loaded but changed nothing"


def test_a_lora_stored_alpha_is_honoured_as_stock_diffusers_honours_it(tmp_path):
    path = _peft_lora_with_alpha(tmp_path)
    model = _load(path, concepts=["sks star=star"])
    stock = tiny_pipeline()
    stock.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHTS)
    _assert_same_outputs(model.pipe, stock, tiny_pipeline())
    # and both are the adapters that were saved: alpha 8 at rank 4 (the bare state dict would apply alpha = rank)
    trained = _adapted_pipeline(alpha=8)
    for mine, saved in zip(_lora_outputs(model.pipe), _lora_outputs(trained), strict=True):
        torch.testing.assert_close(mine, saved, rtol=1e-5, atol=1e-5)


def test_a_unet_only_adapter_file_loads_into_the_unet(tmp_path):
    path = _unet_adapter(tmp_path)
    assert not any(k.startswith("unet.") for k in load_file(path))
    model = _load(path, concepts=["sks star=star"])
    stock = tiny_pipeline()
    stock.unet.load_lora_adapter(str(tmp_path), weight_name=LORA_WEIGHTS, prefix=None)
    _assert_same_outputs(model.pipe, stock, tiny_pipeline(), text_encoder_changes=False)


def test_a_unet_only_adapter_of_another_model_names_the_key_that_does_not_fit(tmp_path):
    path = _unet_adapter(tmp_path)
    state = load_file(path)
    key = sorted(k for k in state if ".lora_A." in k)[0]
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 8)
    save_file(state, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=rf"key {key!r} has shape .* trained for another base model"):
        _load(tmp_path / "other.safetensors", concepts=["sks star=star"])


def test_a_kohya_lora_loads_as_stock_diffusers_converts_it(tmp_path):
    path = _kohya_lora(tmp_path / "my_lora.safetensors")
    model = _load(path, concepts=["sks star=star"])
    stock = tiny_pipeline()
    stock.load_lora_weights(str(tmp_path), weight_name="my_lora.safetensors")
    _assert_same_outputs(model.pipe, stock, tiny_pipeline())


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
    rebuilt = personalized.build(source, source.concepts)
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
