"""Reading image folders: the concept photos, class images, reference images (PIL + torch, no torchvision)."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class SquareImages:
    """Images resized (shorter side to `resolution`) and center-cropped to squares, with the geometry SDXL is
    conditioned on (its `time_ids`): the size each image had and where its crop sits."""

    pixels: torch.Tensor  # [N, 3, S, S] uint8
    original_sizes: torch.Tensor  # [N, 2] (height, width) as read, EXIF orientation applied, before the resize
    crop_top_left: torch.Tensor  # [N, 2, 2]: [i, 0] the crop's (top, left) in the resized image, [i, 1] in its mirror


def load_square_images(folder: str | Path, resolution: int) -> SquareImages:
    """Every image in `folder` (EXIF orientation applied, RGB), shorter side resized to `resolution` and
    center-cropped. Errors name the folder or file and the fix."""
    paths = require_image_paths(folder, "Image folder", missing_fix="Point data.instance_dir at a folder of images.",
                                empty_fix="Add 3-20 photos of the concept.")
    images, sizes, crops = [], [], []
    for path in paths:
        image = read_image(path)
        sizes.append((image.height, image.width))
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        # A flipped sample is the mirror of this crop: the mirror of the resized image, cropped further left.
        crops.append(((top, left), (top, image.width - resolution - left)))
        image = image.crop((left, top, left + resolution, top + resolution))
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))  # [3, H, W] uint8
    return SquareImages(torch.stack(images), torch.tensor(sizes), torch.tensor(crops))


def load_images(folder: str | Path, resolution: int) -> torch.Tensor:
    """The pixels of `load_square_images`: uint8 `[N, 3, resolution, resolution]`."""
    return load_square_images(folder, resolution).pixels


def image_paths(folder: str | Path) -> list[Path]:
    """The images in `folder`, sorted by name (none when the folder does not exist)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
