"""Prior preservation: class images made once and reused, batches of instance and class halves, the weighted loss."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import STAR_IMAGES, lora_module, make_trainer, star_data, ti_module
from tea_lightning.class_images import ensure_class_images
from tea_lightning.images import load_square_images

GENERATE = dict(pretrained="tiny", resolution=64, batch_size=2, steps=2)


def test_only_missing_class_images_are_generated_and_a_second_run_generates_none(tmp_path):
    own = tmp_path / "mine.jpg"
    shutil.copy(STAR_IMAGES / "00.png", own)
    own_bytes = own.read_bytes()

    assert ensure_class_images(tmp_path, "a photo of a star", 3, **GENERATE) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class-00000.png", "class-00001.png", "mine.jpg"]
    assert own.read_bytes() == own_bytes, "a user's image was changed"
    made = {p.name: p.read_bytes() for p in tmp_path.glob("class-*.png")}

    assert ensure_class_images(tmp_path, "a photo of a star", 3, **GENERATE) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.glob("class-*.png")} == made

    # An interrupted generation resumes: the lost image comes back the same (up to rounding: it is now generated in a
    # batch of one), the others are not remade.
    lost = tmp_path / "class-00001.png"
    pixels = np.asarray(Image.open(lost), dtype=np.int16)
    lost.unlink()
    assert ensure_class_images(tmp_path, "a photo of a star", 3, **GENERATE) == 1
    assert np.abs(np.asarray(Image.open(lost), dtype=np.int16) - pixels).max() <= 1
    assert (tmp_path / "class-00000.png").read_bytes() == made["class-00000.png"]
    assert not list(tmp_path.glob(".*")), "temporary files were left behind"


def test_training_generates_class_images_for_the_models_concept_word_and_reuses_them(tmp_path):
    def run():
        data = star_data(templates="a photo of {}", class_prompt="a photo of a {}", num_class_images=2,
                         class_steps=1, batch_size=1)
        make_trainer(tmp_path, max_steps=1).fit(lora_module(), data)
        return data

    data = run()
    folder = tmp_path / "class_images" / "tiny" / "a-photo-of-a-star"
    assert sorted(p.name for p in folder.iterdir()) == ["class-00000.png", "class-00001.png"]
    assert [pool.prompt for pool in data.class_pools] == ["a photo of a star"]
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    run()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_a_batch_is_an_instance_half_then_a_class_half_from_the_users_own_folder(class_dir):
    before = sorted(p.name for p in class_dir.iterdir())
    data = star_data(batch_size=3, class_prompt="a photo of a star", class_dir=str(class_dir), flip_p=0.0)
    batch = next(iter(data.train_dataloader()))

    assert batch["is_class"].tolist() == [False] * 3 + [True] * 3
    assert batch["pixel_values"].shape == (6, 3, 64, 64)
    assert all("{}" in t for t in batch["template"][:3])
    assert batch["template"][3:] == ["a photo of a star"] * 3
    classes = load_square_images(class_dir, 64).pixels.float() / 127.5 - 1.0
    for row, index in zip(batch["pixel_values"][3:], batch["image_index"][3:], strict=True):
        torch.testing.assert_close(row, classes[index], rtol=0, atol=0)
    assert sorted(p.name for p in class_dir.iterdir()) == before, "a user's class folder must be used as is"


def test_the_loss_is_the_instance_mean_plus_the_weighted_class_mean():
    module = ti_module(prior_loss_weight=0.5)
    per_sample = torch.tensor([1.0, 3.0, 10.0, 30.0])
    is_class = torch.tensor([False, False, True, True])
    loss, parts = module.combine(per_sample, is_class)
    assert float(loss) == pytest.approx((1.0 + 3.0) / 2 + 0.5 * (10.0 + 30.0) / 2)
    assert float(parts["train/instance_loss"]) == pytest.approx(2.0)
    assert float(parts["train/prior_loss"]) == pytest.approx(20.0)


def test_cached_class_prompt_encodings_equal_fresh_ones(class_dir):
    module = lora_module(train_text_encoder=False)
    data = star_data(templates="a photo of {}", class_prompt="a photo of a star", class_dir=str(class_dir))
    batch = next(iter(data.train_dataloader()))
    assert module.batch_prompts(batch) == ["a photo of sks star"] * 2 + ["a photo of a star"] * 2
    module.cache_class_prompts = False
    fresh = module.text_states(batch)
    module.cache_class_prompts = True
    cached_first, cached_again = module.text_states(batch), module.text_states(batch)
    torch.testing.assert_close(cached_first, fresh, rtol=0, atol=0)
    torch.testing.assert_close(cached_again, fresh, rtol=0, atol=0)
    assert list(module._class_states) == ["a photo of a star"]


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"num_class_images": 5}, ValueError, "without a class prompt"),
    ({"class_dir": "somewhere"}, ValueError, "without a class prompt"),
    ({"class_prompt": "a photo of a {}"}, ValueError, "no class images are"),
    ({"class_prompt": "a {} and a {}", "num_class_images": 2}, ValueError, "several"),
    ({"class_prompt": "a star", "num_class_images": -1}, ValueError, "num_class_images=-1"),
    ({"class_prompt": "a star", "class_dir": "/nonexistent/folder"}, FileNotFoundError, "holds no images"),
    ({"templates": "a photo of sks dog"}, ValueError, "no '{}' keyword slot"),
    ({"concepts": []}, ValueError, "data.concepts is given together"),
    ({"instance_dir": None, "concepts": []}, ValueError, "empty list"),
    ({"instance_dir": None}, ValueError, "No training images"),
])
def test_bad_prior_preservation_and_prompt_settings_are_refused_with_the_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        star_data(**kwargs)
