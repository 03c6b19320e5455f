"""DreamBooth-LoRA on the tiny model: what trains, the diffusers-loadable export, resume, checkpointing, bad input."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import (
    assert_resume_matches_uninterrupted,
    changed_tensors,
    frozen_state,
    kohya_module_names,
    lora_module,
    make_trainer,
    star_data,
    trainable_names,
)
from tea_lightning.adapters import check_lora_shapes
from tea_lightning.callbacks import Export
from tea_lightning.export import KOHYA_LORA, LORA_WEIGHTS, read_tea_json
from tea_lightning.tiny import tiny_pipeline


def test_only_the_lora_tensors_train_and_every_frozen_weight_is_bit_identical(tmp_path):
    module = lora_module()
    names = trainable_names(module)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert targets == {"to_q", "to_k", "to_v", "0", "q_proj", "k_proj", "v_proj", "out_proj"}
    assert {n.split(".")[0] for n in names} == {"unet", "text_encoder"}
    before = frozen_state(module)
    lora_b = {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_B." in n}

    make_trainer(tmp_path, max_steps=2).fit(module, star_data(batch_size=1))

    assert changed_tensors(before, module) == []
    params = dict(module.named_parameters())
    assert all(not torch.equal(params[n], start) for n, start in lora_b.items()), "some LoRA up weights never moved"


def test_without_text_encoder_lora_only_the_unet_trains_and_the_export_has_no_text_encoder_keys(tmp_path):
    module = lora_module(train_text_encoder=False)
    assert {n.split(".")[0] for n in trainable_names(module)} == {"unet"}
    assert not module.trains_text_encoder
    module.export(tmp_path, step=0)
    assert all(k.startswith("unet.") for k in load_file(tmp_path / LORA_WEIGHTS))
    assert all(k.startswith("lora_unet_") for k in load_file(tmp_path / KOHYA_LORA))


def test_the_module_contract_says_keyword_concept_and_no_token_vectors(tmp_path):
    module = lora_module(identifier="sks", concept_word="star")
    assert (module.keyword, module.concept_word, module.trains_text_encoder) == ("sks star", "star", True)
    with pytest.raises(NotImplementedError):
        module.learned_vectors()
    module.export(tmp_path, step=7)
    info = read_tea_json(tmp_path)
    assert (info["method"], info["keyword"], info["concept_word"], info["step"]) == (
        "dreambooth_lora", "sks star", "star", 7)


def _text_and_unet_output(unet, text_encoder, tokenizer) -> torch.Tensor:
    ids = tokenizer(["a photo of sks star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet(latents, 500, text_encoder(ids)[0]).sample


def test_export_loads_with_stock_load_lora_weights_and_changes_generation(tmp_path):
    # lora_alpha ≠ rank: the export folds the scale in, because readers assume alpha = rank.
    module = lora_module(lr=5e-2, lora_alpha=4)
    make_trainer(tmp_path, max_steps=2, callbacks=[Export(every_n_steps=0)]).fit(module, star_data(batch_size=1))
    folder = tmp_path / "exports" / "final"
    keys = list(load_file(folder / LORA_WEIGHTS))
    assert any(k.startswith("unet.") and k.endswith(".lora.down.weight") for k in keys)
    text_keys = [k for k in keys if k.startswith("text_encoder.")]
    # The standard name: diffusers on transformers 4 fails on `text_encoder.encoder.layers…` (IndexError).
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)
    assert any(".lora_linear_layer.up." in k for k in text_keys)

    base, tuned, kohya = tiny_pipeline(), tiny_pipeline(), tiny_pipeline()
    tuned.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS)
    kohya.load_lora_weights(str(folder), weight_name=KOHYA_LORA)  # through diffusers' own kohya conversion
    module.eval()
    ours = _text_and_unet_output(module.unet, module.text_encoder, module.tokenizer)
    for pipe in (tuned, kohya):
        torch.testing.assert_close(_text_and_unet_output(pipe.unet, pipe.text_encoder, pipe.tokenizer), ours,
                                   rtol=1e-4, atol=1e-5)

    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a photo of sks star", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    assert abs(generate(tuned) - generate(base)).max() > 1e-3, "the LoRA loaded but changed nothing"


def test_the_kohya_export_uses_the_names_and_alpha_kohyas_lora_network_gives_these_layers(tmp_path):
    module = lora_module(rank=2, lora_alpha=3)
    module.export(tmp_path, step=0)
    state = load_file(tmp_path / KOHYA_LORA)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    kohya = kohya_module_names(tiny_pipeline())
    assert names <= set(kohya), sorted(names - set(kohya))[:3]
    trained = {n.split(".lora_")[0] for n in trainable_names(module)}  # one kohya module per LoRA layer
    assert len(names) == len(trained)
    for name in names:
        layer = kohya[name]
        assert state[f"{name}.lora_down.weight"].shape == (2, layer.in_features)
        assert state[f"{name}.lora_up.weight"].shape == (layer.out_features, 2)
        assert state[f"{name}.alpha"].ndim == 0 and float(state[f"{name}.alpha"]) == 3.0


def test_resumed_run_ends_with_the_same_adapters_as_an_uninterrupted_one(tmp_path, class_dir):
    assert_resume_matches_uninterrupted(tmp_path, lora_module, lambda: star_data(
        batch_size=1, templates="a photo of {}", class_prompt="a photo of a star", class_dir=str(class_dir)))


def test_gradient_checkpointing_gives_the_lora_tensors_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        module = lora_module(gradient_checkpointing=checkpointing)
        with torch.no_grad():  # non-zero up weights, so the down weights get a gradient too
            for name, p in module.named_parameters():
                if ".lora_B." in name:
                    p.normal_(generator=torch.Generator().manual_seed(len(name)))
        batch = next(iter(star_data(batch_size=1).train_dataloader()))
        generator = torch.Generator().manual_seed(0)
        latents = module.encode_images(batch["pixel_values"], generator)
        module.diffusion_loss(latents, module.text_states(batch), generator).mean().backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_a_lora_file_for_another_model_is_refused_naming_the_key(tmp_path):
    module = lora_module()
    module.export(tmp_path, step=0)
    state = load_file(tmp_path / LORA_WEIGHTS)
    key = sorted(k for k in state if k.startswith("unet.") and ".lora.down." in k)[0]
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 8)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_lora_shapes(state, tiny_pipeline(), "other.safetensors")
    check_lora_shapes(load_file(tmp_path / LORA_WEIGHTS), tiny_pipeline(), LORA_WEIGHTS)  # the real export fits


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 0}, "rank=0"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"identifier": ""}, "plain words"),
])
def test_bad_lora_settings_are_refused_before_loading_the_model(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora_module(pretrained="/nonexistent/model", **kwargs)
