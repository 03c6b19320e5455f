"""The concept images and their prompt templates, as a LightningDataModule (PIL + torch, no torchvision).

Every sample is a pure function of (seed, sample index): which image, whether it is flipped and which template
it gets. Training position is a pure function of the optimiser step, so a run resumed from a `.ckpt` sees exactly
the batches an uninterrupted run would, on one process or many.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# Prompt templates; `{}` is filled with the method's keyword phrase ("<v>", "sks dog", "<new1> cat").
TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a photo of a {}", "a photo of the {}", "a close-up photo of a {}", "a cropped photo of the {}",
        "a bright photo of a {}", "a dark photo of the {}", "a good photo of a {}", "a clean photo of the {}",
        "a photo of one {}", "a photo of my {}", "a rendering of a {}", "a picture of the {}",
        "a photo of a small {}", "a photo of the large {}", "a photo of a nice {}", "a photo of a cool {}",
    ),
    "style": (
        "a painting in the style of {}", "a rendering in the style of {}", "a picture in the style of {}",
        "artwork in the style of {}", "a drawing in the style of {}", "a cropped painting in the style of {}",
        "a bright painting in the style of {}", "a dark painting in the style of {}",
        "a nice painting in the style of {}", "a small painting in the style of {}",
        "a large painting in the style of {}", "a cool painting in the style of {}",
    ),
    "person": (
        "a photo of a {}", "a portrait of a {}", "a close-up photo of a {}", "a cropped photo of the {}",
        "a bright photo of a {}", "a dark portrait of the {}", "a good photo of a {}", "a picture of the {}",
        "a photo of one {}", "a face of a {}", "a close-up portrait of the {}", "a photo of the {} face",
    ),
}


def _fail_image(path: Path, error: Exception) -> ValueError:
    return ValueError(f"Cannot read image {str(path)!r} ({error}). Remove or replace the file, then run again.")


def read_image(path: Path) -> Image.Image:
    """An image file as RGB with its EXIF orientation applied; an unreadable file is an error naming it."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise _fail_image(path, error) from error


def load_images(folder: str | Path, resolution: int) -> torch.Tensor:
    """Every image in `folder` (EXIF orientation applied, RGB), shorter side resized to `resolution` and
    center-cropped, as uint8 `[N, 3, resolution, resolution]`. Errors name the folder or file and the fix."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {str(folder)!r} does not exist. Point data.instance_dir at a folder "
                                f"of {', '.join(IMAGE_SUFFIXES)} images.")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"Image folder {str(folder)!r} holds no {', '.join(IMAGE_SUFFIXES)} images. "
                         "Add 3-20 photos of the concept.")
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


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, index, ...): nearby indices get unrelated streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class ConceptStream(IterableDataset):
    """Yields samples `start + k·world + rank` for k in one epoch."""

    def __init__(self, images: torch.Tensor, templates: tuple[str, ...], flip_p: float, seed: int,
                 samples_per_epoch: int, batch_size: int) -> None:
        self.images, self.templates, self.flip_p, self.seed = images, templates, flip_p, seed
        self.samples_per_epoch, self.batch_size = samples_per_epoch, batch_size
        self.start, self.rank, self.world = 0, 0, 1  # set by StepAlignedLoader in the main process

    def __len__(self) -> int:
        return self.samples_per_epoch

    def sample(self, index: int) -> dict:
        """Sample number `index` of the infinite stream: each pass over the images is a fresh permutation."""
        n = len(self.images)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(self.seed, index // n)))
        image_index = int(order[index % n])
        generator = torch.Generator().manual_seed(sample_seed(self.seed, index, 1))
        flipped = bool(torch.rand((), generator=generator) < self.flip_p)
        template = self.templates[int(torch.randint(len(self.templates), (), generator=generator))]
        pixels = self.images[image_index]
        if flipped:
            pixels = pixels.flip(-1)
        return {
            "pixel_values": pixels.float() / 127.5 - 1.0,  # [3, H, W] in [-1, 1]
            "image_index": image_index,
            "flipped": flipped,
            "template": template,
        }

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        num_batches = math.ceil(self.samples_per_epoch / self.batch_size)
        # Worker w makes batches w, w + W, ...: the DataLoader interleaves them back into single-process order.
        for batch in range(worker_id, num_batches, workers):
            for k in range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.samples_per_epoch)):
                yield self.sample(self.start + k * self.world + self.rank)


def stream_position(trainer: L.Trainer | None, batch_size: int) -> tuple[int, int, int]:
    """(first sample, rank, world size) of the stream at the trainer's optimiser step."""
    if trainer is None:
        return 0, 0, 1
    per_step = batch_size * trainer.accumulate_grad_batches * trainer.world_size
    return trainer.global_step * per_step, trainer.global_rank, trainer.world_size


class StepAlignedLoader(DataLoader):
    """A DataLoader whose stream starts, at every `iter()`, at the sample the optimiser step says it should: every
    epoch, and every resume from a `.ckpt`, continues exactly where an uninterrupted run would be."""

    def __init__(self, dataset: ConceptStream, position: Callable[[], tuple[int, int, int]], **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self._position = position

    def __iter__(self):
        self.dataset.start, self.dataset.rank, self.dataset.world = self._position()
        return super().__iter__()

    # Lightning asks loaders for state to resume mid-epoch. Ours is derived from `trainer.global_step`, which
    # Lightning itself restores, so there is nothing more to store.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        return None


class ConceptDataModule(L.LightningDataModule):
    """Concept images with prompt templates.

    Args:
        instance_dir: Folder of 3-20 photos of the concept (jpg, png, webp).
        resolution: Training size in pixels (a multiple of 8; 512 for SD 1.5).
        templates: Prompt template family: ``object``, ``style`` or ``person``.
        flip_p: Probability of a horizontal flip per sample.
        batch_size: Samples per step and process.
        repeats: Passes over the images that make one epoch (progress bars and epoch-based schedules).
        num_workers: DataLoader worker processes (images are decoded once, so 0 is usually fastest).
        seed: Seed of the sample order, flips and template choice.
    """

    def __init__(self, instance_dir: str, resolution: int = 512, templates: str = "object", flip_p: float = 0.5,
                 batch_size: int = 1, repeats: int = 100, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if resolution <= 0 or resolution % 8:
            raise ValueError(f"data.resolution={resolution} is not a positive multiple of 8 (the VAE downsamples by "
                             f"8). Use e.g. {max(8, round(resolution / 8) * 8)}.")
        if templates not in TEMPLATES:
            raise ValueError(f"data.templates={templates!r} is unknown; choose one of {sorted(TEMPLATES)}.")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"data.flip_p={flip_p} is not a probability; use a value in [0, 1].")
        if batch_size < 1 or repeats < 1:
            raise ValueError(f"data.batch_size={batch_size} and data.repeats={repeats} must both be at least 1.")
        self.save_hyperparameters()
        self.images = load_images(instance_dir, resolution)  # decoded now: a bad file fails before any training

    def _position(self) -> tuple[int, int, int]:
        return stream_position(self.trainer, self.hparams.batch_size)

    def train_dataset(self) -> ConceptStream:
        world = self.trainer.world_size if self.trainer is not None else 1
        return ConceptStream(
            self.images, TEMPLATES[self.hparams.templates], self.hparams.flip_p, self.hparams.seed,
            samples_per_epoch=max(1, self.hparams.repeats * len(self.images) // world),
            batch_size=self.hparams.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return StepAlignedLoader(self.train_dataset(), self._position, batch_size=self.hparams.batch_size,
                                 num_workers=self.hparams.num_workers, pin_memory=torch.cuda.is_available())
