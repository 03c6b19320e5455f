"""Reading image folders: the concept photos, class images, reference images (PIL + torch, no torchvision)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SMALL_FACTOR = 2  # an image whose short side is under resolution / SMALL_FACTOR is warned about


def _fail_image(path: Path, error: Exception) -> ValueError:
    return ValueError(f"Cannot read image {str(path)!r} ({error}). Remove or replace the file, then run again.")


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB, the way an image viewer shows it on a white page.

    PIL's own `convert("RGB")` clips 16- and 32-bit greyscale ("I;16", "I") at 255, so a 16-bit PNG turns white; here
    their full range is scaled to 8 bits instead. Transparent pixels (RGBA, LA, palette with transparency) become
    white rather than whatever colour happens to be stored under them; CMYK goes through its embedded ICC profile when
    it has one. 1-bit, palette, L, YCbCr and the rest convert as PIL does.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image).astype(np.float64)
        if mode == "F":  # floats: [0, 1] unless the values say otherwise
            scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        else:  # 16-bit, or 32-bit integers holding 16-bit data; 8-bit data stays as it is
            scale = 255.0 / 65535.0 if values.size and values.max() > 255 else 1.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "CMYK" and image.info.get("icc_profile"):
        managed = _cmyk_through_profile(image)
        if managed is not None:
            return managed
    if "A" in mode or "a" in mode or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return image.convert("RGB")


def _cmyk_through_profile(image: Image.Image) -> Image.Image | None:
    """CMYK to sRGB through the image's embedded ICC profile; None when littlecms or the profile fails."""
    try:
        from PIL import ImageCms
    except ImportError:
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (OSError, ValueError, ImageCms.PyCMSError):
        return None


def read_image(path: Path) -> Image.Image:
    """An image file as RGB (`to_rgb`) with its EXIF orientation applied; an unreadable file, or one so large that
    PIL refuses it as a decompression bomb, is an error naming it."""
    try:
        with Image.open(path) as image:
            return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise ValueError(f"Image {str(path)!r} is too large to read safely ({error}). Downscale it (a few thousand "
                         "pixels per side is plenty: training resizes it to data.resolution), then run again.") \
            from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
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

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, rows: slice) -> SquareImages:
        """The images `rows` (a slice), with their geometry."""
        return SquareImages(self.pixels[rows], self.original_sizes[rows], self.crop_top_left[rows])

    @staticmethod
    def cat(parts: Sequence[SquareImages]) -> SquareImages:
        """The images of `parts`, in order, as one set."""
        return SquareImages(torch.cat([p.pixels for p in parts]), torch.cat([p.original_sizes for p in parts]),
                            torch.cat([p.crop_top_left for p in parts]))


def load_square_images(folder: str | Path, resolution: int) -> SquareImages:
    """Every image in `folder` (EXIF orientation applied, RGB), shorter side resized to `resolution` and
    center-cropped. Errors name the folder or file and the fix."""
    paths = require_image_paths(folder, "Image folder", missing_fix="Point data.instance_dir at a folder of images.",
                                empty_fix="Add 3-20 photos of the concept.")
    images, sizes, crops, small = [], [], [], []
    for path in paths:
        image = read_image(path)
        sizes.append((image.height, image.width))
        if min(image.size) * SMALL_FACTOR < resolution:
            small.append((min(image.size), path, image.size))
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        # A flipped sample is the mirror of this crop: the mirror of the resized image, cropped further left.
        crops.append(((top, left), (top, image.width - resolution - left)))
        image = image.crop((left, top, left + resolution, top + resolution))
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))  # [3, H, W] uint8
    if small:
        _, path, (width, height) = min(small)
        warnings.warn(f"{len(small)} of {len(paths)} images in {str(folder)!r} are much smaller than data.resolution="
                      f"{resolution} (the smallest, {path.name}, is {width}x{height}): they are enlarged more than "
                      f"{SMALL_FACTOR}x and train blurry. Use photos at least {resolution} px on the short side, or "
                      "a lower data.resolution.", UserWarning, stacklevel=2)
    return SquareImages(torch.stack(images), torch.tensor(sizes), torch.tensor(crops))


def image_paths(folder: str | Path) -> list[Path]:
    """The images in `folder`, sorted by name (none when the folder does not exist)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
