"""The readout that scores the world's images: accurate on the generator's ground truth, and it reads what it sees."""

import pytest
import torch
from PIL import Image

from tea_lightning.mini.labelled import FOLDER, Label, agreement, compare, load_labels
from tea_lightning.mini.readout import accuracy, load_readout, read, scene_batch
from tea_lightning.mini.scenes import Scene, Thing, render, to_tensor


@pytest.fixture(scope="module")
def readout():
    return load_readout()


def test_shipped_readout_is_at_least_95_percent_accurate_on_fresh_scenes(readout):
    images, truth = scene_batch(seed=777, start=0, count=400)  # a stream the readout never trained on
    result = accuracy(readout, images, truth)
    for attribute in ("background", "shapes", "colours", "second_object"):
        assert result[attribute] >= 0.95, result


def test_shipped_readout_reads_scenes_drawn_the_way_the_worlds_model_draws(readout):
    # Distorted outlines, shifted colours, cut objects, specks (100 % / 93 % / 97 % on 4,000 in docs/mini_world.md).
    images, truth = scene_batch(seed=777, start=0, count=300, distorted=True)
    result = accuracy(readout, images, truth)
    assert result["background"] >= 0.95 and result["shapes"] >= 0.85 and result["colours"] >= 0.9, result


def test_readout_sees_a_pink_star_beside_a_green_square_on_blue(readout):
    scene = Scene("blue", (Thing("star", "pink", "large", 9, 16, 7), Thing("square", "green", "small", 23, 15, 5)))
    image = to_tensor(render(scene))
    (reading,) = read(readout, image[None])
    assert reading.background == "blue"
    assert reading.has("pink", "star") and reading.has("green", "square")
    assert not reading.has(shape="circle")
    uint8 = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert read(readout, uint8[None]) == [reading], "uint8 images read the same"


def test_missing_readout_weights_name_the_command_that_retrains_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m tea_lightning.mini.readout"):
        load_readout(tmp_path / "nope.safetensors")


def _star(inner: float, background: str, colour: str = "pink"):
    """A large star whose inner corners sit at `inner` of the outer radius (the generator draws 0.42)."""
    import math

    from tea_lightning.mini.scenes import COLOURS, SUPERSAMPLE, draw

    points = []
    for k in range(10):
        radius = 11.5 * (1 if k % 2 == 0 else inner) * SUPERSAMPLE
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((16 * SUPERSAMPLE + radius * math.cos(angle), 16 * SUPERSAMPLE + radius * math.sin(angle)))
    return to_tensor(draw(COLOURS[background], [("polygon", points, COLOURS[colour])], 32))


def test_readout_sees_stars_with_fatter_or_thinner_arms_than_the_generator_draws(readout):
    # The world's model draws stars with arms from spiky to fat; a readout that knew only the generator's 0.42
    # missed most of them (3 of 14 at 0.55, none at 0.60: issue 13).
    backgrounds = ("blue", "white", "black", "gray")
    images = torch.stack([_star(inner, bg) for inner in (0.3, 0.42, 0.55, 0.6) for bg in backgrounds])
    readings = read(readout, images)
    assert all(r.has("pink", "star") for r in readings), [sorted(r.objects) for r in readings]


def test_the_labelled_set_holds_at_least_50_of_the_worlds_images_each_read_by_a_person():
    labels = load_labels()
    assert len(labels) >= 50
    for label in labels:
        with Image.open(FOLDER / label.file) as image:
            assert image.size == (32, 32), label.file
    sources = {label.source.split(",")[0] for label in labels}
    assert {"world", "textual inversion seed 2"} <= sources, "plain world images and pink-star runs"
    assert {"yes", "no"} <= {label.concept for label in labels}


def test_shipped_readout_agrees_with_a_person_on_concept_and_context_in_nine_images_of_ten(readout):
    # What the experiment's numbers rest on: the readout's "pink star present" and "requested background present"
    # match what a person sees in the world's own images (98 % and 100 % in docs/mini_world.md).
    results = agreement(readout)
    for group in ("all", "batch 2"):  # every image, and those labelled after the readout was final
        result = results[group]
        for attribute in ("concept", "context", "background"):
            agree, n = result[attribute]
            assert n >= 40 and agree / n >= 0.9, (group, attribute, agree, n)


def test_an_unclear_label_is_left_out_of_the_agreement():
    from tea_lightning.mini.readout import Reading

    label = Label("x.png", "world", "a <pink-star> on a blue background", "blue", (("pink", "?"),), "unclear")
    reading = Reading("gray", frozenset(), frozenset(), frozenset())
    assert compare(label, reading) == {"background": False, "context": False, "colours": False}
