"""Stable Diffusion XL end to end on `tiny-sdxl`: training with both text encoders, the files users load elsewhere,
TEA at generation, drift on each encoder, and the errors for checkpoints of the other family."""

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import train
from helpers import (
    ROOT,
    STAR_IMAGES,
    RecordingLogger,
    assert_resume_matches_uninterrupted,
    cd_module,
    lora_module,
    make_trainer,
    star_data,
    ti_module,
)
from tea_lightning import checkpoints, conditioning, personalized
from tea_lightning import drift_report as report
from tea_lightning.callbacks import CollapseAlarm, ContextualDrift, EmbeddingDrift, Export
from tea_lightning.checkpoints import Concept
from tea_lightning.components import SD, SDXL, load_components, load_pipeline, model_family, text_parts
from tea_lightning.data import ConceptDataModule
from tea_lightning.export import KOHYA_LORA, LORA_WEIGHTS
from tea_lightning.inference import Setting, encode, generate, prompt_embeddings
from tea_lightning.prompt_sets import fill
from tea_lightning.prompting import parse_prompt
from tea_lightning.tea import adjust
from tea_lightning.tiny import HIDDEN, HIDDEN_2, POOLED, tiny_pipeline, tiny_sdxl_pipeline

FAST = dict(steps=2, resolution=64, progress=False)
SDXL_CONFIGS = sorted((ROOT / "configs").glob("*_sdxl.yaml"))


def _build(path, pretrained, **kwargs):
    source = checkpoints.read(path)
    concepts = checkpoints.resolve_concepts(source.concepts, kwargs.pop("concept_word", None),
                                            kwargs.pop("concepts", None))
    return personalized.build(source, concepts, pretrained=str(pretrained), **kwargs)


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_dir, tmp_path_factory):
    """4 steps of Textual Inversion on the saved tiny SDXL model, with the drift callbacks and exports every 2 steps.
    Returns (run folder, {step: logged metrics}, module)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    root = tmp_path_factory.mktemp("sdxl-run")
    module, recorder = ti_module(lr=5e-2, pretrained=str(tiny_sdxl_dir)), RecordingLogger()
    callbacks = [Export(every_n_steps=2), EmbeddingDrift(every_n_steps=2),
                 ContextualDrift(every_n_steps=2, prompt_set="toy")]
    make_trainer(root, max_steps=4, callbacks=callbacks,
                 logger=[TensorBoardLogger(root, name="", version=0), recorder]).fit(module, star_data())
    return root / "version_0", recorder.by_step(), module


# ----------------------------------------------------------------------------------------------- the model


def test_tiny_sdxl_is_a_stock_sdxl_pipeline_that_loads_back_through_the_hub_path(tiny_sdxl_dir):
    built, loaded = tiny_sdxl_pipeline(), load_components(str(tiny_sdxl_dir))
    assert loaded.family == SDXL and model_family(str(tiny_sdxl_dir)) == SDXL
    assert [type(e).__name__ for e in loaded.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    for name, ours in (("text_encoder", loaded.text_encoders[0]), ("text_encoder_2", loaded.text_encoders[1]),
                       ("unet", loaded.unet), ("vae", loaded.vae)):
        a, b = getattr(built, name).state_dict(), ours.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    prompt = "a photo of a man wearing glasses"
    assert [t(prompt).input_ids for t in loaded.tokenizers] == [built.tokenizer(prompt).input_ids] * 2
    tiny_sdxl_pipeline()
    start = time.perf_counter()
    tiny_sdxl_pipeline()
    assert time.perf_counter() - start < 0.5, "tiny-sdxl must build in well under a second"


def test_the_family_is_read_from_the_model_index(tiny_dir, tiny_sdxl_dir, tmp_path):
    assert model_family(str(tiny_dir)) == SD and model_family("tiny") == SD and model_family("tiny-sdxl") == SDXL
    index = json.loads((tiny_sdxl_dir / "model_index.json").read_text())
    refiner = tmp_path / "refiner"
    refiner.mkdir()
    (refiner / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None],
                                                          "tokenizer": [None, None]}))
    with pytest.raises(ValueError, match="SDXL refiner"):
        model_family(str(refiner))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps(index))
    for part in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
        (broken / part).mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a diffusers SDXL folder.*\['tokenizer_2', 'text_encoder_2'\]"):
        load_components(str(broken))


def test_prompts_are_encoded_exactly_as_the_stock_sdxl_pipeline_encodes_them(tiny_sdxl_dir):
    module = ti_module(pretrained=str(tiny_sdxl_dir))
    pipe = load_pipeline(str(tiny_sdxl_dir))
    prompts = ["a photo of a star", "a star wearing glasses and playing guitar"]
    with torch.no_grad():
        ours = module.encode_prompts(prompts)
        states, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert ours.states.shape == (2, 77, HIDDEN + HIDDEN_2) and ours.pooled.shape == (2, POOLED)
    torch.testing.assert_close(ours.states, states, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ the data


def test_batches_carry_the_original_size_and_the_crop_the_data_pipeline_made(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (60, 125, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "wide.png")
    data = ConceptDataModule(str(folder), resolution=32, flip_p=0.5, repeats=20)
    stream = data.train_dataset()
    samples = [stream.sample(i) for i in range(20)]
    # The shorter side (60) goes to 32, so the width becomes round(125 * 32 / 60) = 67 and the square crop starts
    # at (67 - 32) // 2 = 17; in the mirror image the same pixels start at 67 - 32 - 17 = 18.
    resized = np.asarray(Image.fromarray(pixels).resize((67, 32), Image.Resampling.BICUBIC))
    for flipped in (False, True):
        sample = next(s for s in samples if s["flipped"] == flipped)
        assert sample["original_size"].tolist() == [60, 125]
        top, left = sample["crop_top_left"].tolist()
        assert (top, left) == (0, 18 if flipped else 17)
        view = resized[:, ::-1] if flipped else resized
        expected = torch.from_numpy(view[top:top + 32, left:left + 32].copy()).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(sample["pixel_values"], expected, rtol=0, atol=0)
    batch = next(iter(data.train_dataloader()))
    assert batch["original_size"].shape == (1, 2) and batch["crop_top_left"].shape == (1, 2)


def test_resize_augmentation_is_refused_on_sdxl_before_training(tmp_path):
    module = cd_module(pretrained="tiny-sdxl")
    with pytest.raises(ValueError, match="data.augment .* cannot be used with an SDXL model"):
        make_trainer(tmp_path, max_steps=1).fit(module, star_data(augment=True))


# --------------------------------------------------------------------------------------------- the training


def test_the_sdxl_loss_is_the_reference_scripts_loss_with_pooled_text_and_time_ids(tiny_sdxl_dir):
    module = ti_module(pretrained=str(tiny_sdxl_dir))
    pipe = load_pipeline(str(tiny_sdxl_dir))
    batch = next(iter(star_data(batch_size=2).train_dataloader()))
    prompts = [fill(t, "star") for t in batch["template"]]  # the concept word: the placeholder starts at its rows
    with torch.no_grad():
        latents = module.encode_images(batch["pixel_values"], torch.Generator().manual_seed(0))
        time_ids = module.time_ids(batch)
        ours = module.diffusion_loss(latents, module.encode_prompts(prompts), torch.Generator().manual_seed(1),
                                     time_ids=time_ids)
        # diffusers' SDXL scripts: penultimate states of both encoders, the pooled output of the second, and
        # time ids = original size + crop top-left + target size.
        states, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        expected_ids = torch.tensor([batch["original_size"][i].tolist() + batch["crop_top_left"][i].tolist()
                                     + [64, 64] for i in range(2)])
        generator = torch.Generator().manual_seed(1)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (2,), generator=generator)
        noisy = module.noise_scheduler.add_noise(latents, noise, t)
        prediction = pipe.unet(noisy, t, states, added_cond_kwargs={"text_embeds": pooled,
                                                                     "time_ids": expected_ids.float()}).sample
        reference = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
        shifted = module.diffusion_loss(latents, module.encode_prompts(prompts), torch.Generator().manual_seed(1),
                                        time_ids=time_ids + 100)
    assert time_ids.tolist() == expected_ids.tolist()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(shifted, ours), "the UNet must read the time ids"


def test_textual_inversion_learns_one_fp32_row_per_encoder_from_the_concept_words_row(tiny_sdxl_dir):
    module = ti_module(pretrained=str(tiny_sdxl_dir), num_vectors=2)
    for e, (tokenizer, encoder) in enumerate(zip(module.tokenizers, module.text_encoders, strict=True)):
        vectors, concept = module.learned_vectors(e)
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("star</w>")].float()
        assert vectors.shape == (2, (HIDDEN, HIDDEN_2)[e]) and vectors.dtype == torch.float32
        assert torch.equal(vectors, row.expand(2, -1)) and torch.equal(concept, row.expand(2, -1))
    assert sorted(module.trainable_state_dict()) == ["learned.vectors", "learned_2.vectors"]
    with pytest.raises(ValueError, match="sphere_norm=0.5 sets one norm.*two text encoders"):
        ti_module(pretrained="tiny-sdxl", parametrization="spherical", sphere_norm=0.5)


def test_textual_inversion_exports_load_in_stock_diffusers_and_as_an_sdxl_embedding_file(sdxl_run, tiny_sdxl_dir):
    run, _, module = sdxl_run
    final = run / "exports" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["learned_embeds.safetensors", "learned_embeds_2.safetensors",
                                                       "tea.json", "v.safetensors"]
    trained = [module.learned_vectors(e)[0].detach() for e in range(2)]
    single = load_file(final / "v.safetensors")
    assert sorted(single) == ["clip_g", "clip_l"]
    torch.testing.assert_close(single["clip_l"], trained[0], rtol=0, atol=0)
    torch.testing.assert_close(single["clip_g"], trained[1], rtol=0, atol=0)

    prompt = "a photo of <v> on a table"
    diffusers_pair = load_pipeline(str(tiny_sdxl_dir))
    diffusers_pair.load_textual_inversion(str(final), weight_name="learned_embeds.safetensors", token="<v>")
    diffusers_pair.load_textual_inversion(str(final), weight_name="learned_embeds_2.safetensors", token="<v>",
                                          text_encoder=diffusers_pair.text_encoder_2,
                                          tokenizer=diffusers_pair.tokenizer_2)
    a1111 = load_pipeline(str(tiny_sdxl_dir))  # the two calls formats.md gives for clip_l/clip_g files
    a1111.load_textual_inversion(single["clip_l"], token="<v>", text_encoder=a1111.text_encoder,
                                 tokenizer=a1111.tokenizer)
    a1111.load_textual_inversion(single["clip_g"], token="<v>", text_encoder=a1111.text_encoder_2,
                                 tokenizer=a1111.tokenizer_2)
    with torch.no_grad():
        ours = module.encode_prompts([prompt])
        for stock in (diffusers_pair, a1111):
            states, _, pooled, _ = stock.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
            torch.testing.assert_close(states, ours.states, rtol=0, atol=1e-6)
            torch.testing.assert_close(pooled, ours.pooled, rtol=0, atol=1e-6)


def test_a_resumed_sdxl_run_ends_with_the_same_rows_as_an_uninterrupted_one(tmp_path):
    assert_resume_matches_uninterrupted(tmp_path, lambda: ti_module(lr=5e-2, pretrained="tiny-sdxl"),
                                        lambda: star_data(batch_size=1))


def test_dreambooth_lora_on_sdxl_adapts_both_encoders_and_loads_in_stock_diffusers(tiny_sdxl_dir, tmp_path):
    module = lora_module(pretrained=str(tiny_sdxl_dir))
    names = {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad}
    assert names == {"unet", "text_encoder", "text_encoder_2"}
    with torch.no_grad():  # as after training: up weights that are not zero
        for name, p in module.named_parameters():
            if ".lora_B." in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    module.export(tmp_path, step=3)
    keys = load_file(tmp_path / LORA_WEIGHTS)
    assert any(k.startswith("text_encoder_2.") for k in keys) and any(k.startswith("unet.") for k in keys)

    stock = load_pipeline(str(tiny_sdxl_dir))
    stock.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHTS)
    base = load_pipeline(str(tiny_sdxl_dir))
    prompt = "a photo of sks star"
    with torch.no_grad():
        ours = module.encode_prompts([prompt])
        theirs = stock.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        plain = base.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(theirs[0], ours.states, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs[2], ours.pooled, rtol=0, atol=1e-5)
    assert not torch.allclose(theirs[0], plain[0]), "the LoRA changed nothing"


def test_dreambooth_lora_on_sdxl_can_leave_the_text_encoders_alone(tmp_path):
    module = lora_module(pretrained="tiny-sdxl", train_text_encoder=False)
    assert {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad} == {"unet"}
    module.export(tmp_path, step=0)
    assert all(k.startswith("unet.") for k in load_file(tmp_path / LORA_WEIGHTS))


def test_custom_diffusion_on_sdxl_trains_a_modifier_row_per_encoder_and_generates_from_its_export(tmp_path):
    module = cd_module(pretrained="tiny-sdxl", lr=5e-2)
    make_trainer(tmp_path, max_steps=2, callbacks=[Export(every_n_steps=0)]).fit(module, star_data(batch_size=1))
    final = tmp_path / "exports" / "final"
    token_file = load_file(final / "<new1>.safetensors")
    for e, name in enumerate(("clip_l", "clip_g")):
        torch.testing.assert_close(token_file[name], module.learned_vectors(e)[0].detach(), rtol=0, atol=0)
        assert not torch.equal(token_file[name], module.learned_vectors(e)[1]), f"{name} row did not train"
    model = _build(final, "tiny-sdxl")
    assert model.concepts == [Concept("<new1> star", "star", learned=True)]
    assert sorted(r.encoder for r in model.rows) == [0, 1]
    prompt = parse_prompt("a photo of <new1> star", model.concepts)
    with torch.no_grad():
        ours = module.encode_prompts([prompt.model_text])
        rebuilt = encode(model.pipe, [prompt.model_text])
    torch.testing.assert_close(rebuilt.states, ours.states, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- TEA


def _sdxl_embedding(path, seed: int, widths=(HIDDEN, HIDDEN_2), k: int = 1, keys=("clip_l", "clip_g")):
    generator = torch.Generator().manual_seed(seed)
    save_file({key: 3.0 * torch.randn(k, width, generator=generator) for key, width in zip(keys, widths,
                                                                                          strict=True)}, path)
    return path


def test_token_level_tea_pulls_each_encoders_row_to_its_concept_row_and_the_pooled_follows(tmp_path):
    model = _build(_sdxl_embedding(tmp_path / "<v>.safetensors", 0, k=2), "tiny-sdxl", concept_word="star")
    assert [(r.encoder, tuple(r.vectors.shape)) for r in model.rows] == [(0, (2, HIDDEN)), (1, (2, HIDDEN_2))]
    prompt = parse_prompt("a photo of <v> wearing glasses", model.concepts)
    with torch.no_grad():
        full = prompt_embeddings(model, [prompt], Setting(1.0, 1.0), level="token")
        words = encode(model.pipe, ["a photo of star star wearing glasses"])
        baseline = prompt_embeddings(model, [prompt], Setting(), level="token")
    torch.testing.assert_close(full.states, words.states, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.pooled, words.pooled, atol=1e-5, rtol=0)  # computed from the adjusted rows
    for part, other in zip(conditioning.split(baseline.states, [HIDDEN, HIDDEN_2]),
                           conditioning.split(words.states, [HIDDEN, HIDDEN_2]), strict=True):
        assert not torch.allclose(part, other), "each encoder's part moves under TEA"


def test_prompt_level_tea_adjusts_each_encoders_part_and_the_pooled_towards_the_target():
    model = personalized.Personalized(tiny_sdxl_pipeline(), [Concept("sks star", "star")], [], "test", "tiny-sdxl")
    prompt = parse_prompt("a photo of sks star wearing glasses", model.concepts)
    with torch.no_grad():
        embeds = encode(model.pipe, [prompt.model_text])
        target = encode(model.pipe, [prompt.target_text])
        zero = prompt_embeddings(model, [prompt], Setting(0.0, 0.0), level="prompt", align="position")
        gentle = prompt_embeddings(model, [prompt], Setting(0.2, 0.5), level="prompt", align="position")
        full = prompt_embeddings(model, [prompt], Setting(1.0, 1.0), level="prompt", align="position")
    assert torch.equal(zero.states, embeds.states) and torch.equal(zero.pooled, embeds.pooled)
    torch.testing.assert_close(full.pooled, target.pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(gentle.pooled, adjust(embeds.pooled, target.pooled, 0.2, 0.5), atol=1e-6, rtol=0)
    # Each encoder's part is adjusted on its own: SLERP over the concatenation would mix the two spaces' norms.
    parts = zip(conditioning.split(embeds.states[0], [HIDDEN, HIDDEN_2]),
                conditioning.split(target.states[0], [HIDDEN, HIDDEN_2]), strict=True)
    expected = torch.cat([torch.stack([adjust(e[i], t[i], 0.2, 0.5) for i in range(77)]) for e, t in parts], dim=-1)
    torch.testing.assert_close(gentle.states[0], expected, atol=1e-6, rtol=0)


def test_generate_on_sdxl_runs_the_stock_pipeline_and_zero_factors_equal_the_baseline(sdxl_run, tmp_path):
    run, _, _ = sdxl_run
    records = generate(run / "exports" / "final", ["a photo of <v> on the beach"], tmp_path / "out", rhos=(0.0, 1.0),
                       alphas=(0.0,), num_images=1, **FAST)
    assert {r.level for r in records if r.mode == "tea"} == {"token"}

    def image(tag):
        return np.asarray(Image.open(tmp_path / "out" / tag / "p000-i000.png"))

    assert np.array_equal(image("baseline"), image("tea-rho0-alpha0"))
    assert not np.array_equal(image("baseline"), image("tea-rho1-alpha0"))


def test_every_sdxl_embedding_format_reads_to_the_same_rows(sdxl_run, tmp_path):
    run, _, module = sdxl_run
    final = run / "exports" / "final"
    pair = tmp_path / "pair"
    pair.mkdir()
    for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"):
        (pair / name).write_bytes((final / name).read_bytes())  # a diffusers folder: no tea.json
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {**module.hparams, "_class_path": "tea_lightning.TextualInversion"},
                "state_dict": module.trainable_state_dict()}, ckpt)
    expected = [module.learned_vectors(e)[0].detach() for e in range(2)]
    for path in (final, final / "v.safetensors", pair, ckpt):
        source = checkpoints.read(path)
        (rows,) = source.embeddings.values()
        assert len(rows) == 2, path
        for got, want in zip(rows, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(path))


def test_the_kohya_copy_of_an_sdxl_lora_is_named_as_kohya_names_sdxl_loras_and_reads_like_its_diffusers_twin(
        tmp_path):
    module = lora_module(pretrained="tiny-sdxl")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_B." in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    module.export(tmp_path, step=0)
    kohya = load_file(tmp_path / KOHYA_LORA)
    # kohya's sd-scripts train SDXL on the original UNet: down_blocks.1.attentions.0 is input_blocks.3.1 there.
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in kohya
    assert {k.split("_text_model")[0] for k in kohya if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    prompt = "a photo of sks star"
    outputs = []
    for path in (tmp_path / LORA_WEIGHTS, tmp_path / KOHYA_LORA):
        model = _build(path, "tiny-sdxl", concepts=["sks star=star"])
        with torch.no_grad():
            embeds = prompt_embeddings(model, [parse_prompt(prompt, model.concepts)], Setting(0.2, 0.5),
                                       level="prompt")
            unet_out = model.pipe.unet(torch.ones(1, 4, 8, 8), 10, embeds.states, added_cond_kwargs={
                "text_embeds": embeds.pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}).sample
        outputs.append((embeds, unet_out))
    (diffusers_embeds, diffusers_unet), (kohya_embeds, kohya_unet) = outputs
    torch.testing.assert_close(kohya_embeds.states, diffusers_embeds.states, rtol=0, atol=1e-5)
    torch.testing.assert_close(kohya_embeds.pooled, diffusers_embeds.pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(kohya_unet, diffusers_unet, rtol=0, atol=1e-4)


def test_a_baked_sdxl_embedding_gives_stock_diffusers_token_level_teas_embeddings(sdxl_run, tiny_sdxl_dir, tmp_path):
    from tea_lightning.bake import bake

    run, _, _ = sdxl_run
    final = run / "exports" / "final"
    bake(final, tmp_path / "baked", rho=0.3, alpha=0.7)
    webui = load_file(tmp_path / "baked" / "webui" / "v.safetensors")
    assert sorted(webui) == ["clip_g", "clip_l"]
    assert not (tmp_path / "baked" / "diffusers").exists()
    stock = load_pipeline(str(tiny_sdxl_dir))
    stock.load_textual_inversion(webui["clip_l"], token="<v>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(webui["clip_g"], token="<v>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    model = _build(final, str(tiny_sdxl_dir))
    prompt = "a photo of <v> wearing glasses"
    with torch.no_grad():
        tea = prompt_embeddings(model, [parse_prompt(prompt, model.concepts)], Setting(0.3, 0.7), level="token")
        states, _, pooled, _ = stock.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(states, tea.states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, tea.pooled, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- bad input


def _sd_lora(folder):
    module = lora_module(pretrained="tiny")
    module.export(folder, step=0)
    return folder / LORA_WEIGHTS


def _sdxl_lora(folder):
    module = lora_module(pretrained="tiny-sdxl")
    module.export(folder, step=0)
    return folder / LORA_WEIGHTS


@pytest.mark.parametrize(("make", "base", "message"), [
    (lambda d: _sdxl_embedding(d / "half.safetensors", 0, widths=(HIDDEN,), keys=("clip_l",)), "tiny-sdxl",
     "holds 'clip_l' but not 'clip_g'"),
    (lambda d: _sdxl_embedding(d / "odd.safetensors", 0, widths=(40, 56)), "tiny-sdxl",
     r"is 40 wide, but the clip_l text encoder of 'tiny-sdxl' is 32 wide"),
    (lambda d: _sdxl_embedding(d / "sdxl.safetensors", 0), "tiny",
     r"is an SDXL embedding \(clip_l and clip_g rows\), but the base model 'tiny' is SD 1.x/2.x"),
    (lambda d: (save_file({"emb_params": torch.randn(1, HIDDEN)}, d / "sd.safetensors"), d / "sd.safetensors")[1],
     "tiny-sdxl", r"is an SD 1.x/2.x embedding \(one set of rows, 32 wide\), but the base model 'tiny-sdxl' is SDXL"),
    (_sd_lora, "tiny-sdxl", "reads 32-wide text, but 'tiny-sdxl' reads 80-wide text"),
    (_sdxl_lora, "tiny", "is an SDXL LoRA .* but the base model 'tiny' is SD 1.x/2.x"),
    (lambda d: (save_file({"<v>": torch.randn(1, HIDDEN_2)}, d / "learned_embeds_2.safetensors"), d)[1], "tiny-sdxl",
     "without learned_embeds.safetensors"),
])
def test_checkpoints_of_the_other_family_or_shape_are_refused_before_any_image(make, base, message, tmp_path):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=message):
        generate(path, ["a photo of {}"], tmp_path / "out", pretrained=base, concepts=["sks star=star"]
                 if "lora" in str(path).lower() else None, concept_word=None if "lora" in str(path).lower()
                 else "star", **FAST)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.png"))


# ------------------------------------------------------------------------------------------------------ drift


def test_drift_callbacks_measure_each_encoder_under_keys_that_name_it(sdxl_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tea_lightning import drift

    run, logged, module = sdxl_run
    vector = {"norm", "concept_norm", "norm_ratio", "cosine_concept", "angle_concept_deg", "cosine_initial",
              "norm_percentile"}
    sets = set(drift.SET_KEYS)
    expected = {f"drift/{e}/{k}" for e in ("clip_l", "clip_g") for k in vector} | {
        f"drift_sets/{e}/{k}" for e in ("clip_l", "clip_g") for k in sets}
    assert {k for k in logged[4] if k.startswith("drift")} == expected
    assert logged[0]["drift/clip_g/norm_ratio"] == pytest.approx(1)
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert {t for t in events.Tags()["images"]} == {"drift/clip_l/vocab_norms", "drift/clip_g/vocab_norms"}
    # The contextual sets, encoded from scratch in one call and cut into each encoder's part of the states.
    from tea_lightning.prompt_sets import contextual_set

    with torch.no_grad():
        keyword = module.encode_prompts([fill(t, module.keyword) for t in contextual_set("toy")]).states[:, -1]
        concept = module.encode_prompts([fill(t, "star") for t in contextual_set("toy")]).states[:, -1]
    for name, k, c in zip(("clip_l", "clip_g"), keyword.split([HIDDEN, HIDDEN_2], -1),
                          concept.split([HIDDEN, HIDDEN_2], -1), strict=True):
        assert logged[4][f"drift_sets/{name}/inter_l2"] == pytest.approx(drift.l2_distance(k, c).item(), rel=1e-4)
        vectors, rows = module.learned_vectors(("clip_l", "clip_g").index(name))
        assert logged[4][f"drift/{name}/cosine_concept"] == pytest.approx(
            torch.nn.functional.cosine_similarity(vectors, rows).mean().item(), rel=1e-5)


def test_the_drift_report_of_an_sdxl_run_equals_what_the_callbacks_logged(sdxl_run, tmp_path):
    run, logged, _ = sdxl_run
    out = report.drift_report(str(run), prompt_set="toy", out=str(tmp_path / "report"))
    names = report.columns(2)
    with (out / "drift.csv").open() as handle:
        header = handle.readline().strip().split(",")
        rows = [dict(zip(header, map(float, line.split(",")), strict=True)) for line in handle]
    assert header == names
    for row in rows:
        for key in names[1:]:
            assert row[key] == pytest.approx(logged[int(row["step"])][key], rel=1e-4, abs=1e-6), key
    for name in ("contextual_drift-clip_l.png", "vector_drift-clip_g.png", "vocab_norms-clip_g.png"):
        assert (out / name).is_file(), name


def test_the_collapse_alarm_names_the_encoder_whose_row_collapsed():
    module = ti_module(pretrained="tiny-sdxl", lr=0.0)
    with torch.no_grad():
        module.learned_2.vectors.copy_(-module.learned_2.vectors)  # turned away in the second encoder only
    findings = CollapseAlarm(max_norm_percentile=100, min_cosine=0.2).findings(module)
    assert len(findings) == 1 and findings[0].startswith("clip_g vector 0: cos(V*, 'star') = -1.000")


# ------------------------------------------------------------------------------------------- memory options


def test_gradient_checkpointing_recomputes_the_text_encoders_and_keeps_their_gradients(tmp_path):
    grads, calls = [], []
    for checkpointing in (False, True):
        module = lora_module(pretrained="tiny-sdxl", gradient_checkpointing=checkpointing)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if ".lora_B." in name:
                    p.normal_(generator=torch.Generator().manual_seed(len(name)))
        make_trainer(tmp_path, max_steps=0).fit(module, star_data(batch_size=1))  # on_fit_start enables it
        layer = module.text_encoder_2.text_model.encoder.layers[0]
        count = []
        # A pre-hook: the recomputation stops as soon as it has what the backward pass needs, before the MLP returns.
        layer.mlp.register_forward_pre_hook(lambda *_, count=count: count.append(1))
        batch = next(iter(star_data(batch_size=1).train_dataloader()))
        generator = torch.Generator().manual_seed(0)
        latents = module.encode_images(batch["pixel_values"], generator)
        module.diffusion_loss(latents, module.text_states(batch), generator,
                              time_ids=module.time_ids(batch)).mean().backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
        calls.append(len(count))
    assert calls == [1, 2], "with checkpointing the second encoder's layers run again in the backward pass"
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


# ------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("config", SDXL_CONFIGS, ids=lambda p: p.name)
def test_every_sdxl_config_instantiates_on_the_tiny_sdxl_model(config, tiny_sdxl_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in config.read_text()
    cli = train.main(["--config", str(config), "--model.init_args.pretrained", str(tiny_sdxl_dir),
                      "--data.instance_dir", str(STAR_IMAGES), "--data.resolution", "64"], run=False)
    assert cli.model.family == SDXL and len(cli.model.text_encoders) == 2


def test_the_sdxl_textual_inversion_config_trains_from_the_command_line(tiny_sdxl_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    train.main(["fit", "--config", "configs/textual_inversion_sdxl.yaml", "--data.instance_dir", str(STAR_IMAGES),
                "--model.init_args.concept_word", "toy", "--model.init_args.pretrained", str(tiny_sdxl_dir),
                "--data.resolution", "64", "--trainer.max_steps", "2", "--trainer.precision", "32",
                "--trainer.default_root_dir", str(tmp_path)])
    final = tmp_path / "lightning_logs" / "version_0" / "exports" / "final"
    assert sorted(load_file(final / "v.safetensors")) == ["clip_g", "clip_l"]


def test_the_sd_tiny_model_is_untouched_by_the_sdxl_path():
    pipe = tiny_pipeline()
    tokenizers, encoders = text_parts(pipe)
    assert len(tokenizers) == len(encoders) == 1
    with torch.no_grad():
        embeds = conditioning.encode(tokenizers, encoders, ["a photo of a star"])
    assert embeds.pooled is None and embeds.states.shape == (1, 77, HIDDEN)
    torch.testing.assert_close(embeds.states, pipe.encode_prompt("a photo of a star", "cpu", 1, False)[0],
                               rtol=0, atol=0)
