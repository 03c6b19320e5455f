"""Reading image folders: the concept photos, class images, reference images (PIL + torch, no torchvision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _fail_image(path: Path, error: Exception) -> ValueError:
    return ValueError(f"Cannot read image {str(path)!r} ({error}). Remove or replace the file, then run again.")


def read_image(path: Path) -> Image.Image:
    """An image file as RGB with its EXIF orientation applied; an unreadable file is an error naming it."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise _fail_image(path, error) from error


def require_image_paths(folder: str | Path, what: str, missing_fix: str, empty_fix: str) -> list[Path]:
    """`image_paths(folder)`, where a missing folder, or one without images, is an error naming `what`, the folder
    and the fix."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {str(folder)!r} does not exist. {missing_fix}")
    paths = image_paths(folder)
    if not paths:
        raise ValueError(f"{what} {str(folder)!r} holds no {', '.join(IMAGE_SUFFIXES)} images. {empty_fix}")
    return paths


def load_images(folder: str | Path, resolution: int) -> torch.Tensor:
    """Every image in `folder` (EXIF orientation applied, RGB), shorter side resized to `resolution` and
    center-cropped, as uint8 `[N, 3, resolution, resolution]`. Errors name the folder or file and the fix."""
    paths = require_image_paths(folder, "Image folder", missing_fix="Point data.instance_dir at a folder of images.",
                                empty_fix="Add 3-20 photos of the concept.")
    images = []
    for path in paths:
        image = read_image(path)
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))  # [3, H, W] uint8
    return torch.stack(images)


def image_paths(folder: str | Path) -> list[Path]:
    """The images in `folder`, sorted by name (none when the folder does not exist)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
