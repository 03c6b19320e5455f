"""The SampleImages callback: grids of baseline and TEA images while training, without disturbing training."""

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from helpers import make_trainer, star_data, ti_module
from tea_lightning.callbacks import SampleImages
from tea_lightning.grids import SMALL_CELL


def test_sample_grids_are_logged_every_n_steps_and_training_ends_as_without_them(tmp_path):
    plain = ti_module(lr=5e-2)
    make_trainer(tmp_path / "plain", max_steps=4).fit(plain, star_data())

    sampled = ti_module(lr=5e-2)
    callback = SampleImages(every_n_steps=2, steps=2, resolution=64, num_images=2)
    logger = TensorBoardLogger(tmp_path / "logs", name="", version=0)
    make_trainer(tmp_path / "sampled", max_steps=4, callbacks=[callback], logger=logger).fit(sampled, star_data())

    torch.testing.assert_close(sampled.learned.vectors, plain.learned.vectors, rtol=0, atol=0)
    assert sampled.training and not sampled.unet.training  # modes as Lightning and the module left them
    run = tmp_path / "logs" / "version_0"
    grids = sorted((run / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-000002.png", "step-000004.png"]
    grid = Image.open(grids[0])  # two rows (prompts), two columns (baseline, TEA) of two images each
    assert grid.width > 2 * 2 * SMALL_CELL and 2 * SMALL_CELL < grid.height < 3 * SMALL_CELL

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("samples")] == [2, 4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(every_n_steps=0), "every_n_steps=0"),
    (dict(prompts=["a photo of a dog"]), "no '{}' keyword slot"),
    (dict(rho=2.0), r"rho=2.0 is outside \[0, 1\]"),
])
def test_bad_sample_settings_are_refused_when_configured(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleImages(**kwargs)
