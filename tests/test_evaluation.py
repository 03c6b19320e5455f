"""Evaluation end to end (tiny models, CPU): scores against a direct computation and torchmetrics, reuse, bad input."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as evaluate_cli
from helpers import STAR_IMAGES
from tea_lightning import scoring
from tea_lightning.evaluation import evaluate, tea_tag
from tea_lightning.prompt_sets import fill
from tea_lightning.summary import BASELINE

KEYWORD = "<pink-star>"
CSV_ROWS = [("a photo of a {} wearing glasses", "a {}", "wearing glasses"),
            ("a {} on the beach at night", "a {}", "on the beach at night")]


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP (text and vision towers) with a CLIP tokenizer and image processor, saved to a folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from tea_lightning.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16))
    folder = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(folder)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    """A tiny random DINOv2 backbone with a BiT-style image processor (as facebook/dinov2-base ships), saved."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    torch.manual_seed(1)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                     patch_size=8))
    folder = tmp_path_factory.mktemp("tiny-dino")
    model.save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def write_csv(path: Path, rows=CSV_ROWS, header=("prompt", "concept", "context")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_generated(folder: Path, templates, settings, num_images=2, seed_shift=None) -> None:
    """Images in inference.generate's layout: <tag>/pNNN-iNNN.png + sidecar, seeds shared across settings."""
    for s, (rho, alpha) in enumerate(settings):
        tag = BASELINE if rho is None else tea_tag(rho, alpha)
        (folder / tag).mkdir(parents=True, exist_ok=True)
        for p, template in enumerate(templates):
            for i in range(num_images):
                pixels = np.random.default_rng([s, p, i]).integers(0, 256, (48, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / tag / f"p{p:03d}-i{i:03d}.png")
                seed = 1000 + 10 * p + i + (seed_shift or {}).get(tag, 0)
                meta = dict(prompt=fill(template, KEYWORD), template=template, prompt_index=p, image_index=i,
                            seed=seed, mode=BASELINE if rho is None else "tea", rho=rho, alpha=alpha, level="token",
                            checkpoint="runs/x/exports/final", base_model="tiny", keyword=KEYWORD,
                            concept_word="star", scheduler="dpm", steps=50, guidance=7.0, resolution=64)
                (folder / tag / f"p{p:03d}-i{i:03d}.json").write_text(json.dumps(meta))


@pytest.fixture
def generated(tmp_path) -> tuple[Path, Path]:
    """An evaluation CSV and a folder of baseline + one TEA setting, two prompts, two images each."""
    csv_path = write_csv(tmp_path / "prompts.csv")
    images = tmp_path / "images"
    write_generated(images, [r[0] for r in CSV_ROWS], [(None, None), (0.2, 0.5)])
    return csv_path, images


def run(tmp_path, csv_path, images, clip_dir, dino_dir, **kwargs) -> Path:
    options = dict(out=str(tmp_path / "eval"), prompts=str(csv_path), references=str(STAR_IMAGES),
                   images=None if images is None else str(images), num_images=2, clip_model=str(clip_dir),
                   dino_model=str(dino_dir), batch_size=3)
    options.update(kwargs)
    return evaluate(**options)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------------- the scores


def _direct(clip_dir, dino_dir, pngs, texts, references, pooling):
    """The paper's numbers computed by hand from the same saved models (no evaluation code involved)."""
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    processor = AutoImageProcessor.from_pretrained(clip_dir, backend="pil")
    dino = AutoModel.from_pretrained(dino_dir).eval()
    dino_processor = AutoImageProcessor.from_pretrained(dino_dir, backend="pil")

    def clip_images(paths):
        pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
        return model.get_image_features(pixel_values=pixels).pooler_output

    def dino_images(paths):
        pixels = dino_processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
        tokens = dino(pixel_values=pixels).last_hidden_state
        return tokens.mean(1) if pooling == "mean" else tokens[:, 0]

    cos = torch.nn.functional.cosine_similarity
    with torch.no_grad():
        image, refs = clip_images(pngs), clip_images(references)
        clip_t = {}
        for segment, strings in texts.items():
            tokens = tokenizer(strings, padding=True, return_tensors="pt")
            text = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            clip_t[segment] = 100 * cos(image, text.pooler_output).clamp(min=0)
        clip_i = 100 * cos(image[:, None], refs[None], dim=-1).mean(1)
        dino_i = 100 * cos(dino_images(pngs)[:, None], dino_images(references)[None], dim=-1).mean(1)
    return clip_t, clip_i, dino_i


@pytest.mark.parametrize("pooling, anchor", [("mean", None), ("cls", "02.png")])
def test_scores_equal_a_direct_computation_with_the_same_models(tmp_path, generated, clip_dir, dino_dir, pooling,
                                                                 anchor):
    csv_path, images = generated
    run(tmp_path, csv_path, images, clip_dir, dino_dir, dino_pooling=pooling, anchor_image=anchor)
    rows = read_csv(tmp_path / "eval" / "scores.csv")
    assert len(rows) == 2 * 2 * 2
    pngs = [tmp_path / "eval" / r["image"] for r in rows]
    references = [STAR_IMAGES / anchor] if anchor else sorted(STAR_IMAGES.glob("*.png"))
    texts = {segment: [r[f"text_{segment}"] for r in rows] for segment in ("full", "concept", "context")}
    clip_t, clip_i, dino_i = _direct(clip_dir, dino_dir, pngs, texts, references, pooling)
    for segment, expected in clip_t.items():
        assert [float(r[f"clip_t_{segment}"]) for r in rows] == pytest.approx(expected.tolist(), abs=1e-3)
    assert [float(r["clip_i"]) for r in rows] == pytest.approx(clip_i.tolist(), abs=1e-3)
    assert [float(r["dino_i"]) for r in rows] == pytest.approx(dino_i.tolist(), abs=1e-3)
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert f"{pooling} pooling" in summary and ("anchor 02.png" if anchor else "mean of 6") in summary


def test_clip_t_matches_torchmetrics_clip_score(tmp_path, generated, clip_dir, dino_dir):
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    class Transformers4Outputs(torch.nn.Module):  # torchmetrics 1.9 expects tensors (transformers 4 behaviour)
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    csv_path, images = generated
    run(tmp_path, csv_path, images, clip_dir, dino_dir)
    model = Transformers4Outputs(CLIPModel.from_pretrained(clip_dir).eval())
    processor = CLIPProcessor.from_pretrained(clip_dir)
    for row in read_csv(tmp_path / "eval" / "scores.csv")[:3]:
        pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "eval" / row["image"]).convert("RGB")).copy())
        for segment in ("full", "context"):
            with torch.no_grad():
                expected = clip_score(pixels.permute(2, 0, 1), row[f"text_{segment}"], lambda: (model, processor))
            assert float(row[f"clip_t_{segment}"]) == pytest.approx(expected.item(), abs=1e-3)


def test_scores_csv_records_texts_without_the_keyword_and_the_generation_settings(tmp_path, generated, clip_dir,
                                                                                    dino_dir):
    csv_path, images = generated
    run(tmp_path, csv_path, images, clip_dir, dino_dir)
    rows = read_csv(tmp_path / "eval" / "scores.csv")
    first = next(r for r in rows if r["tag"] == tea_tag(0.2, 0.5) and r["prompt_index"] == "1")
    assert (first["text_full"], first["text_concept"], first["text_context"]) == (
        "a star on the beach at night", "a star", "on the beach at night")
    assert (first["rho"], first["alpha"], first["mode"], first["scheduler"], first["steps"], first["guidance"]) == (
        "0.2", "0.5", "tea", "dpm", "50", "7")
    assert all(KEYWORD not in r["text_full"] and "{}" not in r["text_full"] for r in rows)
    seeds = {(r["prompt_index"], r["image_index"]): set() for r in rows}
    for r in rows:
        seeds[(r["prompt_index"], r["image_index"])].add(r["seed"])
    assert all(len(s) == 1 for s in seeds.values()), "baseline and TEA rows of one image share its seed"


# --------------------------------------------------------------------------------------------- full runs, reuse


def test_full_run_with_a_rho_sweep_and_two_concepts_writes_the_tables_and_plot_and_reruns_without_rescoring(
        tmp_path, clip_dir, dino_dir, monkeypatch):
    csv_path = write_csv(tmp_path / "prompts.csv")
    settings = [(None, None), (0.1, 0.5), (0.4, 0.5)]
    for name in ("star-a", "star-b"):
        write_generated(tmp_path / name, [r[0] for r in CSV_ROWS], settings)
    concepts = [dict(name=name, references=str(STAR_IMAGES), images=str(tmp_path / name))
                for name in ("star-a", "star-b")]
    args = ["--out", str(tmp_path / "eval"), "--prompts", str(csv_path), "--concepts", json.dumps(concepts),
            "--rhos", "[0.1, 0.4]", "--num_images", "2", "--clip_model", str(clip_dir), "--dino_model",
            str(dino_dir)]
    evaluate_cli.main(args)
    out = tmp_path / "eval"
    rows = read_csv(out / "scores.csv")
    assert len(rows) == 2 * 3 * 2 * 2 and {r["concept"] for r in rows} == {"star-a", "star-b"}
    text = (out / "summary.md").read_text()
    assert "## Sweep over rho" in text and "](sweep.png)" in text and "## Per concept" in text
    assert (out / "sweep.png").stat().st_size > 1000 and (out / "summary.csv").is_file()

    # Second run: every score is reused, so no model is even loaded; the results are unchanged.
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded although every score could be reused")

    monkeypatch.setattr(scoring, "ClipEncoder", no_model)
    evaluate_cli.main(args)
    assert read_csv(out / "scores.csv") == rows

    # A regenerated image is rescored, and only that one.
    Image.new("RGB", (48, 40), "white").save(tmp_path / "star-b" / BASELINE / "p001-i000.png")
    monkeypatch.undo()
    encoded = []
    original = scoring.encode_images
    monkeypatch.setattr(scoring, "encode_images", lambda paths, *a, **k: encoded.append(len(paths)) or original(
        paths, *a, **k))
    evaluate_cli.main(args)
    assert encoded == [6, 1], "the references (6) and the one changed image"
    changed = [(a, b) for a, b in zip(rows, read_csv(out / "scores.csv"), strict=True) if a != b]
    assert len(changed) == 1 and changed[0][1]["image"].endswith("star-b/baseline/p001-i000.png")


def test_generation_fills_missing_images_and_a_second_run_reuses_them(tmp_path, tiny_dir, clip_dir, dino_dir,
                                                                       monkeypatch):
    inference = pytest.importorskip("tea_lightning.inference")  # runs once the infer branch is merged
    from helpers import ti_module

    export = tmp_path / "export"
    export.mkdir()
    ti_module(pretrained=str(tiny_dir), placeholder=KEYWORD).export(export, step=0)
    csv_path = write_csv(tmp_path / "prompts.csv")
    options = dict(out=str(tmp_path / "eval"), prompts=str(csv_path), references=str(STAR_IMAGES),
                   checkpoint=str(export), num_images=1, rhos=[0.2, 0.6], clip_model=str(clip_dir),
                   dino_model=str(dino_dir), steps=2, resolution=64, device="cpu")
    evaluate(**options)
    out = tmp_path / "eval"
    pngs = sorted((out / "images").rglob("p*-i*.png"))  # infer.py's grid (grid.png) sits beside them
    assert len(pngs) == 2 * 3, "two prompts × (baseline + two TEA settings) × one image"
    rows = read_csv(out / "scores.csv")
    assert len(rows) == 6 and all(r["text_concept"] == "a star" for r in rows)
    assert (out / "sweep.png").is_file() and "## Sweep over rho" in (out / "summary.md").read_text()

    stamps = [p.stat().st_mtime_ns for p in pngs]
    monkeypatch.setattr(inference, "generate", lambda *a, **k: pytest.fail("images were generated again"))
    evaluate(**options)
    assert [p.stat().st_mtime_ns for p in pngs] == stamps
    assert read_csv(out / "scores.csv") == rows


def test_missing_images_are_requested_from_generate_with_the_agreed_contract(tmp_path, clip_dir, dino_dir,
                                                                           monkeypatch):
    """Until the infer branch lands, a stand-in with `inference.generate`'s agreed signature writes the layout."""
    import sys
    import types

    calls = []

    def generate(checkpoint, prompts, out, *, rhos=(0.2,), alphas=(0.5,), compare=True, num_images=4, seed=0,
                 batch_size=4, pretrained=None, scheduler="dpm", steps=50, guidance=7.0, resolution=None,
                 mode="auto", align="span", target_encoder="adapted", target="word", concepts=None,
                 negative_prompt=None, device=None):
        calls.append(dict(checkpoint=checkpoint, prompts=list(prompts), rhos=rhos, alphas=alphas, compare=compare,
                          num_images=num_images, steps=steps))
        write_generated(Path(out), prompts, [(None, None)] * compare + [(r, a) for r in rhos for a in alphas],
                        num_images=num_images)

    monkeypatch.setitem(sys.modules, "tea_lightning.inference", types.SimpleNamespace(generate=generate))
    csv_path = write_csv(tmp_path / "prompts.csv")
    checkpoint = tmp_path / "export"
    checkpoint.mkdir()
    (checkpoint / "tea.json").write_text(json.dumps({"concept_word": "star"}))
    options = dict(checkpoint=str(checkpoint), num_images=1, max_prompts=1, steps=3)
    run(tmp_path, csv_path, None, clip_dir, dino_dir, **options)
    assert calls == [dict(checkpoint=str(checkpoint), prompts=[CSV_ROWS[0][0]], rhos=(0.2,), alphas=(0.5,),
                          compare=True, num_images=1, steps=3)]
    assert len(read_csv(tmp_path / "eval" / "scores.csv")) == 2
    run(tmp_path, csv_path, None, clip_dir, dino_dir, **options)
    assert len(calls) == 1, "complete images are not generated again"
    (tmp_path / "eval" / "images" / "pink_star" / tea_tag(0.2, 0.5) / "p000-i000.png").unlink()
    run(tmp_path, csv_path, None, clip_dir, dino_dir, **options)
    assert len(calls) == 2, "a missing image is generated"


# ---------------------------------------------------------------------------------------------------- bad input


def test_csv_without_the_required_columns_names_them(tmp_path, generated, clip_dir, dino_dir):
    _, images = generated
    bad = write_csv(tmp_path / "bad.csv", [r[:2] for r in CSV_ROWS], header=("prompt", "concept"))
    with pytest.raises(ValueError, match="missing column.*context"):
        run(tmp_path, bad, images, clip_dir, dino_dir)
    assert not (tmp_path / "eval").exists(), "nothing is written before the inputs are checked"


def test_template_without_the_keyword_slot_is_an_error(tmp_path, generated, clip_dir, dino_dir):
    _, images = generated
    bad = write_csv(tmp_path / "bad.csv", [("a photo of a man", "a {}", "x")])
    with pytest.raises(ValueError, match=r"no '\{\}' keyword slot"):
        run(tmp_path, bad, images, clip_dir, dino_dir)


def test_empty_reference_folder_is_an_error(tmp_path, generated, clip_dir, dino_dir):
    csv_path, images = generated
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .* images"):
        run(tmp_path, csv_path, images, clip_dir, dino_dir, references=str(tmp_path / "empty"))


def test_baseline_and_tea_images_of_unequal_count_is_an_error(tmp_path, generated, clip_dir, dino_dir):
    csv_path, images = generated
    for suffix in (".png", ".json"):
        (images / tea_tag(0.2, 0.5) / f"p001-i001{suffix}").unlink()
    with pytest.raises(ValueError, match=r"prompt 1 .*unequal count \(baseline 2, tea-rho0.2-alpha0.5 1"):
        run(tmp_path, csv_path, images, clip_dir, dino_dir)


def test_tea_images_with_other_seeds_than_their_baseline_are_an_error(tmp_path, clip_dir, dino_dir):
    csv_path = write_csv(tmp_path / "prompts.csv")
    write_generated(tmp_path / "images", [r[0] for r in CSV_ROWS], [(None, None), (0.2, 0.5)],
                    seed_shift={tea_tag(0.2, 0.5): 7})
    with pytest.raises(ValueError, match="must share their initial noise"):
        run(tmp_path, csv_path, tmp_path / "images", clip_dir, dino_dir)


@pytest.mark.parametrize("which", ["clip_model", "dino_model", "no_config"])
def test_a_model_folder_of_the_wrong_kind_is_an_error(tmp_path, generated, clip_dir, dino_dir, which):
    csv_path, images = generated
    (tmp_path / "not-a-model").mkdir()
    swapped = {"clip_model": dict(clip_model=str(dino_dir)), "dino_model": dict(dino_model=str(clip_dir)),
               "no_config": dict(clip_model=str(tmp_path / "not-a-model"))}[which]
    message = {"clip_model": "'dinov2' model, not one of \\['clip'\\]", "dino_model": "'clip' model, not one of",
               "no_config": "without config.json"}[which]
    with pytest.raises(ValueError, match=message):
        run(tmp_path, csv_path, images, clip_dir, dino_dir, **swapped)
    assert not (tmp_path / "eval").exists()


def test_missing_images_without_a_checkpoint_say_how_to_fix_it(tmp_path, generated, clip_dir, dino_dir):
    csv_path, images = generated
    with pytest.raises(ValueError, match="missing images .*Pass checkpoint"):
        run(tmp_path, csv_path, images, clip_dir, dino_dir, num_images=3)
    with pytest.raises(ValueError, match="no images of the setting 'tea-rho0.3-alpha0.5'"):
        run(tmp_path, csv_path, images, clip_dir, dino_dir, rhos=[0.3])


def test_a_csv_with_classes_scores_the_rows_of_the_chosen_class(tmp_path, clip_dir, dino_dir):
    rows = [("{} in snowy ice", "a {}", "snowy ice", "chair"), ("{} on a boat", "a {}", "a boat", "tortoise plushy"),
            ("{} on a mountain", "a {}", "a mountain", "chair")]
    csv_path = write_csv(tmp_path / "cc101.csv", rows, header=("prompt", "concept", "context", "class"))
    write_generated(tmp_path / "images", [rows[0][0], rows[2][0]], [(None, None), (0.2, 0.5)], num_images=1)
    with pytest.raises(ValueError, match=r"classes \['chair', 'tortoise plushy'\], none of them 'star'"):
        run(tmp_path, csv_path, tmp_path / "images", clip_dir, dino_dir, num_images=1)
    run(tmp_path, csv_path, tmp_path / "images", clip_dir, dino_dir, num_images=1, prompt_class="chair")
    scored = read_csv(tmp_path / "eval" / "scores.csv")
    assert sorted({(r["prompt_index"], r["text_full"]) for r in scored}) == [
        ("0", "star in snowy ice"), ("2", "star on a mountain")], "prompt indices are the CSV's rows"


# ----------------------------------------------------------------------------------------------- across steps


def test_step_metrics_evaluates_every_export_and_gathers_the_overall_scores_per_step(tmp_path, drift_run, clip_dir,
                                                                                    dino_dir):
    from tea_lightning.step_metrics import step_metrics

    run_dir, _, _ = drift_run
    csv_path = write_csv(tmp_path / "prompts.csv")
    options = dict(prompts=str(csv_path), references=str(STAR_IMAGES), out=str(tmp_path / "steps"), num_images=1,
                   max_prompts=1, clip_model=str(clip_dir), dino_model=str(dino_dir), steps=2, resolution=64)
    path = step_metrics(str(run_dir), **options)
    rows = read_csv(path)
    assert [(r["step"], r["mode"]) for r in rows] == [(s, m) for s in ("0", "2", "4") for m in (BASELINE, "tea")]
    for row in rows:  # each step's row is its own evaluation's overall mean
        summary = read_csv(tmp_path / "steps" / f"step-{int(row['step']):06d}" / "summary.csv")
        overall = next(r for r in summary if r["level"] == "overall" and r["tag"] == row["tag"])
        assert row["clip_t_context"] == overall["clip_t_context"]
    tea = [r for r in rows if r["mode"] == "tea"]
    assert all(float(r["clip_i_low"]) <= float(r["clip_i_high"]) for r in tea), "TEA rows carry the gap interval"
    assert (tmp_path / "steps" / "step_metrics.png").is_file()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "steps").rglob("*.png") if "images" in p.parts}
    step_metrics(str(run_dir), **options)  # resumes: nothing is generated again
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "steps").rglob("*.png") if "images" in p.parts}


@pytest.mark.parametrize("labels", [[""], ["clip_l/", "clip_g/"]], ids=["sd", "sdxl"])
def test_the_step_plot_draws_the_drift_of_every_text_encoder_relative_to_its_start(labels):
    # SDXL's drift report names each encoder in its columns; reading only SD's names left the panel empty.
    from tea_lightning.step_metrics import drift_curves

    rows = [{"step": str(step), **{f"{prefix}{label}{key}": str(value * (1 + e))
                                   for e, label in enumerate(labels)
                                   for prefix, key in (("drift/", "norm_ratio"), ("drift_sets/", "inter_l2"))}}
            for step, value in ((0, 2.0), (100, 3.0), (200, 5.0))]
    curves = drift_curves(rows)
    assert set(curves) == {f"{prefix}{label}{key}" for label in labels
                           for prefix, key in (("drift/", "norm_ratio"), ("drift_sets/", "inter_l2"))}
    for points in curves.values():
        assert points == [(0, 1.0), (100, 1.5), (200, 2.5)], "each curve is relative to its first export"
