"""Shared fixtures. Nothing downloads: HF_HUB_OFFLINE=1 makes an accidental hub request fail loudly."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

warnings.filterwarnings("ignore", message=r".*torchvision.*")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The built-in tiny model saved as a diffusers folder: loaded back through the path a hub id takes."""
    from tea_lightning.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """The built-in tiny SDXL model saved as a diffusers folder: loaded back through the path a hub id takes."""
    from tea_lightning.tiny import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def untrained_world(tmp_path_factory) -> Path:
    """`python -m tea_lightning.mini.world new FOLDER`: the mini architecture with seeded random weights."""
    from tea_lightning.mini.world import main

    folder = tmp_path_factory.mktemp("mini-untrained")
    main(["new", str(folder)])
    return folder


@pytest.fixture(scope="session")
def drift_run(tmp_path_factory):
    """A 4-step tiny Textual Inversion run with the drift callbacks and exports every 2 steps, shared by the drift
    callback and report tests. Returns (run folder, {step: logged metrics}, module)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from helpers import RecordingLogger, make_trainer, star_data, ti_module
    from tea_lightning.callbacks import ContextualDrift, EmbeddingDrift, Export

    root = tmp_path_factory.mktemp("drift-run")
    module, recorder = ti_module(lr=5e-2), RecordingLogger()
    callbacks = [Export(every_n_steps=2), EmbeddingDrift(every_n_steps=2),
                 ContextualDrift(every_n_steps=2, prompt_set="toy")]
    make_trainer(root, max_steps=4, callbacks=callbacks,
                 logger=[TensorBoardLogger(root, name="", version=0), recorder]).fit(module, star_data())
    return root / "version_0", recorder.by_step(), module


@pytest.fixture(scope="session")
def class_dir(tmp_path_factory) -> Path:
    """Two class images of "a photo of a star" made by the tiny model (few steps: their content does not matter)."""
    from tea_lightning.class_images import ensure_class_images

    folder = tmp_path_factory.mktemp("class-star")
    ensure_class_images(folder, "a photo of a star", 2, pretrained="tiny", resolution=64, batch_size=2, steps=2)
    return folder
