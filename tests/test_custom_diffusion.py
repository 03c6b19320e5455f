"""Custom Diffusion on the tiny model: what trains, the start token, modifier tokens, augmentation, several concepts,
the diffusers-format export and our loader, resume, bad input."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (
    STAR_IMAGES,
    assert_resume_matches_uninterrupted,
    cd_module,
    changed_tensors,
    frozen_state,
    make_trainer,
    star_data,
    trainable_names,
)
from tea_lightning.adapters import cross_attentions, load_custom_diffusion
from tea_lightning.callbacks import Export
from tea_lightning.data import FAR_PREFIXES, NEAR_PREFIXES, TrainingConcept, resize_augment
from tea_lightning.export import CUSTOM_DIFFUSION_WEIGHTS, read_tea_json
from tea_lightning.module import masked_mean
from tea_lightning.tiny import tiny_pipeline


def _kinds(names: list[str]) -> set[str]:
    return {n.split(".processor.")[1] if ".processor." in n else n for n in names}


def test_only_cross_attention_projections_and_the_modifier_row_train_and_the_rest_is_bit_identical(tmp_path):
    assert _kinds(trainable_names(cd_module(train_q_out=False))) == {
        "to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight", "modifiers.0.vectors"}
    module = cd_module(train_q_out=True)
    names = trainable_names(module)
    assert _kinds(names) == {"to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight",
                             "to_q_custom_diffusion.weight", "to_out_custom_diffusion.0.weight",
                             "to_out_custom_diffusion.0.bias", "modifiers.0.vectors"}
    assert all(".attn2.processor." in n for n in names if n.startswith("unet."))
    assert len([n for n in names if n.startswith("unet.")]) == 5 * len(cross_attentions(module.unet))
    before = frozen_state(module)
    start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    make_trainer(tmp_path, max_steps=2).fit(module, star_data(batch_size=1, templates="photo of a {}"))

    assert changed_tensors(before, module) == []
    moved = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert sorted(moved) == sorted(start), "some trainable tensors never moved"


def test_the_modifier_token_starts_at_the_word_final_row_of_its_concept_word():
    module = cd_module(concept_word="star", modifier_token="<new1>")
    rows = module.text_encoder.get_input_embeddings().weight
    word_final = module.tokenizer.convert_tokens_to_ids("star</w>")
    subword = module.tokenizer.convert_tokens_to_ids("star")
    torch.testing.assert_close(module.modifiers[0].vectors[0], rows[word_final].float(), rtol=0, atol=0)
    assert not torch.equal(module.modifiers[0].vectors[0], rows[subword].float())
    assert (module.keyword, module.concept_word) == ("<new1> star", "star")
    vectors, concept = module.learned_vectors()
    assert vectors.shape == concept.shape == (1, rows.shape[1])


def test_the_authors_rare_token_initialiser_starts_the_modifier_there_and_tea_still_targets_the_concept_word():
    module = cd_module(concept_word="star", initializer_token="toy")  # the authors used "ktn" in SD's vocabulary
    rows = module.text_encoder.get_input_embeddings().weight
    start = rows[module.tokenizer.convert_tokens_to_ids("toy</w>")].float()
    torch.testing.assert_close(module.modifiers[0].vectors[0], start, rtol=0, atol=0)
    vectors, concept = module.learned_vectors()
    torch.testing.assert_close(concept[0], rows[module.tokenizer.convert_tokens_to_ids("star</w>")].float(),
                               rtol=0, atol=0)


def test_the_start_token_key_and_value_get_no_gradient():
    module = cd_module()
    name, attn = next(iter(cross_attentions(module.unet).items()))
    processor = attn.processor
    hidden = torch.randn(1, 16, attn.to_q.in_features)
    for position, expect_gradient in ((0, False), (1, True)):
        context = torch.zeros(1, 77, attn.to_k.in_features)
        context[0, position] = torch.randn(attn.to_k.in_features)  # only this token carries information
        processor.zero_grad()
        attn(hidden, encoder_hidden_states=context).square().sum().backward()
        for projection in (processor.to_k_custom_diffusion, processor.to_v_custom_diffusion):
            has_gradient = bool(projection.weight.grad.abs().sum() > 0)
            assert has_gradient == expect_gradient, (name, position)


def test_resize_augmentation_names_the_zoom_in_the_prompt_and_masks_the_canvas():
    image = torch.rand(3, 64, 64) * 2 - 1
    seen = set()
    for seed in range(60):
        pixels, mask, prefix = resize_augment(image, torch.Generator().manual_seed(seed))
        assert pixels.shape == image.shape and mask.shape == (1, 64, 64)
        covered = float(mask.mean())
        if prefix in FAR_PREFIXES:
            assert covered < 0.6 ** 2 + 1e-6  # shrunk below 0.6 of the side: the image covers < 36%
            assert torch.all(pixels[:, mask[0] == 0] == 0), "outside the image the canvas is grey"
        elif prefix in NEAR_PREFIXES:
            assert covered == 1.0
        else:
            assert prefix == ""
        seen.add(prefix in FAR_PREFIXES and "far" or prefix in NEAR_PREFIXES and "near" or "plain")
    assert seen == {"far", "near", "plain"}

    plain = next(iter(star_data(batch_size=2).train_dataloader()))
    augmented = next(iter(star_data(batch_size=2, augment=True).train_dataloader()))
    assert "mask" not in plain, "augmentation is off by default"
    assert augmented["mask"].shape == (2, 1, 64, 64)


def test_the_masked_loss_averages_only_where_the_mask_is_one():
    error = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2)  # [B, C, h, w]
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    expected = torch.tensor([(0.0 + 4.0) / 2, error[1].mean()])
    torch.testing.assert_close(masked_mean(error, mask), expected)


def test_export_loads_with_our_loader_and_stock_load_textual_inversion_and_changes_generation(tmp_path):
    module = cd_module(lr=5e-2, train_q_out=True)
    make_trainer(tmp_path, max_steps=2, callbacks=[Export(every_n_steps=0)]).fit(
        module, star_data(batch_size=1, templates="photo of a {}"))
    folder = tmp_path / "exports" / "final"
    weights = load_file(folder / CUSTOM_DIFFUSION_WEIGHTS)
    assert all(".attn2.processor." in k and not k.startswith("unet.") for k in weights)
    token_file = load_file(folder / "<new1>.safetensors")
    assert list(token_file) == ["<new1>"] and token_file["<new1>"].ndim == 1
    info = read_tea_json(folder)
    assert (info["method"], info["keyword"], info["concept_word"], info["tokens"]) == (
        "custom_diffusion", "<new1> star", "star", ["<new1>"])

    base, tuned = tiny_pipeline(), tiny_pipeline()
    changed = load_custom_diffusion(tuned.unet, folder)
    assert changed == sorted(cross_attentions(tuned.unet))
    tuned.load_textual_inversion(str(folder / "<new1>.safetensors"), token="<new1>")

    module.eval()
    ids = module.tokenize(["photo of a <new1> star"])
    torch.testing.assert_close(tuned.tokenizer(["photo of a <new1> star"], padding="max_length", max_length=77,
                                               return_tensors="pt").input_ids, ids)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = module.unet(latents, 500, module.text_encoder(ids)[0]).sample
        theirs = tuned.unet(latents, 500, tuned.text_encoder(ids)[0]).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)

    def generate(pipe, prompt):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    assert abs(generate(tuned, "photo of a <new1> star") - generate(base, "photo of a star")).max() > 1e-3


def test_a_custom_diffusion_file_for_another_model_is_refused_naming_the_key(tmp_path):
    cd_module().export(tmp_path, step=0)
    weights = load_file(tmp_path / CUSTOM_DIFFUSION_WEIGHTS)
    key = sorted(weights)[0]
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] * 2)
    save_file(weights, tmp_path / "other.safetensors")
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_custom_diffusion(pipe.unet, tmp_path / "other.safetensors")
    assert not any(type(a.processor).__name__.startswith("CustomDiffusion")
                   for a in cross_attentions(pipe.unet).values()), "nothing is installed from a file that is refused"


def test_several_concepts_train_in_one_run_each_with_its_own_token(tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder, names in zip(folders, (["00.png", "01.png"], ["02.png", "03.png"]), strict=True):
        folder.mkdir()
        for name in names:
            shutil.copy(STAR_IMAGES / name, folder / name)
    concepts = [TrainingConcept(str(folders[0]), concept_word="star"),
                TrainingConcept(str(folders[1]), concept_word="circle")]
    module = cd_module(concept_word=None, concepts=concepts)
    assert module.keywords == ["<new1> star", "<new2> circle"]
    data = star_data(instance_dir=None, concepts=concepts, batch_size=4, templates="photo of a {}", flip_p=0.0)
    batch = next(iter(data.train_dataloader()))
    for prompt, concept, index in zip(module.batch_prompts(batch), batch["concept"], batch["image_index"],
                                      strict=True):
        assert prompt == f"photo of a {module.keywords[concept]}"
        assert concept == int(index) // 2  # images 0-1 are the first concept's, 2-3 the second's

    make_trainer(tmp_path, max_steps=1, callbacks=[Export(every_n_steps=0)]).fit(module, data)
    folder = tmp_path / "exports" / "final"
    assert (folder / "<new1>.safetensors").is_file() and (folder / "<new2>.safetensors").is_file()
    assert [c["keyword"] for c in read_tea_json(folder)["concepts"]] == module.keywords


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    assert_resume_matches_uninterrupted(
        tmp_path, cd_module, lambda: star_data(batch_size=1, templates="photo of a {}", augment=True))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"modifier_token": "star"}, "already in the vocabulary"),
    ({"concept_word": None}, "needs model.concept_word"),
    ({"concept_word": None, "concepts": []}, "empty list"),
    ({"concepts": [TrainingConcept("x", concept_word="cat")]}, "both set"),
    ({"concept_word": None, "concepts": [TrainingConcept("x")]}, r"concepts\[0\] has no concept_word"),
    ({"modifier_token": "<a/b>"}, "slashes"),
])
def test_bad_custom_diffusion_settings_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cd_module(**kwargs)
