"""The readout that scores the world's images: accurate on the generator's ground truth, and it reads what it sees."""

import pytest
import torch

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
