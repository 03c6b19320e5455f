"""The concept DataModule: image loading, bad input, and a sample stream that resumes and shards exactly."""

import shutil

import pytest
import torch
from PIL import Image

from helpers import STAR_IMAGES, star_data
from tea_lightning.data import ConceptStream
from tea_lightning.images import load_square_images


def test_images_are_rgb_center_cropped_to_the_resolution(tmp_path):
    Image.new("RGBA", (120, 60), (10, 20, 30, 255)).save(tmp_path / "wide.png")
    Image.new("L", (40, 90), 200).save(tmp_path / "tall.jpg")
    images = load_square_images(tmp_path, 32).pixels
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40×20 with a red top half and a blue bottom half; EXIF orientation 6 says "turn 90° clockwise", so a
    # viewer shows it 20×40 with blue on the left and red on the right.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 10, 40, 20))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    pixels = load_square_images(tmp_path, 16).pixels[0].int()  # [3, 16, 16]
    left, right = pixels[:, 8, 2], pixels[:, 8, 13]
    assert left[2] > 200 and left[0] < 60, left.tolist()
    assert right[0] > 200 and right[2] < 60, right.tolist()


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        star_data(instance_dir=str(tmp_path / "nope"))


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no .jpg"):
        star_data(instance_dir=str(tmp_path))


def test_a_corrupt_image_is_named(tmp_path):
    shutil.copy(STAR_IMAGES / "00.png", tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        star_data(instance_dir=str(tmp_path))


@pytest.mark.parametrize("resolution", [60, 0, -8])
def test_resolution_must_be_a_positive_multiple_of_8(resolution):
    with pytest.raises(ValueError, match=f"data.resolution={resolution} is not a positive multiple of 8"):
        star_data(resolution=resolution)


def test_unknown_template_family_is_refused():
    with pytest.raises(ValueError, match="templates='portraits'"):
        star_data(templates="portraits")


def _stream(images, seed=0, samples=12, batch=2):
    return ConceptStream(images, ("a {}", "the {}"), flip_p=0.5, seed=seed, samples_per_epoch=samples,
                         batch_size=batch)


def test_samples_are_a_pure_function_of_seed_and_index():
    images = star_data().images
    a, b = _stream(images), _stream(images)
    for index in (0, 5, 123):
        x, y = a.sample(index), b.sample(index)
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and x["template"] == y["template"]
    assert [a.sample(i)["image_index"] for i in range(6)] != [_stream(images, seed=1).sample(i)["image_index"]
                                                              for i in range(6)]


def test_each_pass_shows_every_image_once():
    images = star_data().images
    stream = _stream(images)
    n = len(images)
    for epoch in range(3):
        assert sorted(stream.sample(epoch * n + i)["image_index"] for i in range(n)) == list(range(n))


def test_flipped_samples_are_mirror_images():
    stream = _stream(star_data().images)
    flipped = next(s for s in map(stream.sample, range(50)) if s["flipped"])
    original = stream.images.pixels[flipped["image_index"]].float() / 127.5 - 1.0
    assert torch.equal(flipped["pixel_values"], original.flip(-1))


def test_ranks_split_the_stream_without_overlap_and_start_where_the_step_says():
    images = star_data().images
    seen = {}
    for rank in (0, 1):
        stream = _stream(images, samples=6)
        stream.start, stream.rank, stream.world = 10, rank, 2
        seen[rank] = [(s["image_index"], s["flipped"], s["template"]) for s in stream]
    reference = _stream(images, samples=12)
    expected = [reference.sample(10 + i) for i in range(12)]
    assert seen[0] == [(s["image_index"], s["flipped"], s["template"]) for s in expected[0::2]]
    assert seen[1] == [(s["image_index"], s["flipped"], s["template"]) for s in expected[1::2]]


def test_workers_reproduce_the_single_process_order():
    data = star_data(batch_size=2, repeats=2)
    single = [b["image_index"].tolist() for b in data.train_dataloader()]
    data.hparams.num_workers = 2
    multi = [b["image_index"].tolist() for b in data.train_dataloader()]
    assert multi == single
