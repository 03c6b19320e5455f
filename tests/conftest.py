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
