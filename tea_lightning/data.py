"""The concept images and their prompt templates, as a LightningDataModule (PIL + torch, no torchvision).

Every sample is a pure function of (seed, sample index): which image, whether it is flipped, which template it gets
and, with prior preservation, which class image it is paired with. Training position is a pure function of the
optimiser step, so a run resumed from a `.ckpt` sees exactly the batches an uninterrupted run would, on one process or
many.

A batch is a dict: ``pixel_values`` [B, 3, H, W] in [-1, 1], ``image_index`` [B] (into the instance images, or into
the class images for class samples), ``flipped`` [B] bool, ``template`` list[str] (a template with one ``{}`` for the
keyword, or the finished class prompt), ``concept`` list[int] (which concept; host-side so prompts are built without
a device sync), ``original_size`` [B, 2] (height, width of the image file) and ``crop_top_left`` [B, 2] (where the
square crop sits in the resized image, mirrored with the image when flipped: what SDXL is conditioned on), plus
``is_class`` [B] bool when class images are used (instance half first, then the class half) and ``mask``
[B, 1, H, W] when the resize augmentation is on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from tea_lightning.components import SDXL
from tea_lightning.images import SquareImages, image_paths, load_square_images
from tea_lightning.prompt_sets import SLOT, check_template, fill
from tea_lightning.seeding import sample_seed

# Custom Diffusion's resize augmentation names what it did in the prompt.
FAR_PREFIXES = ("a far away ", "very small ")
NEAR_PREFIXES = ("zoomed in ", "close up ")

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


def resize_augment(pixels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Custom Diffusion's resize augmentation of one image `[3, S, S]` in [-1, 1].

    Two times in three the image shrinks to a random size in [S/3, S] and sits at a random place on a grey canvas,
    with a mask `[1, S, S]` that is 1 only where the image is; otherwise it grows to [1.2 S, 1.4 S) and a random
    S×S crop is kept (mask all ones). Returns the image, the mask and the prompt prefix that says what happened:
    "a far away "/"very small " below 0.6 S, "zoomed in "/"close up " above S, else "".
    """
    size = pixels.shape[-1]

    def randint(low: int, high: int) -> int:  # in [low, high)
        return int(torch.randint(low, high, (), generator=generator))

    if torch.rand((), generator=generator) < 0.66:
        scale = randint(size // 3, size + 1)
    else:
        scale = randint(int(1.2 * size), int(1.4 * size))
    scale += scale % 2
    resized = pixels if scale == size else F.interpolate(
        pixels[None], size=(scale, scale), mode="bilinear", antialias=True, align_corners=False)[0]
    mask = torch.ones(1, size, size)
    if scale >= size:
        top, left = randint(0, scale - size + 1), randint(0, scale - size + 1)
        image = resized[:, top:top + size, left:left + size]
    else:
        top, left = randint(0, size - scale + 1), randint(0, size - scale + 1)
        image = torch.zeros_like(pixels)
        image[:, top:top + scale, left:left + scale] = resized
        mask.zero_()
        mask[:, top:top + scale, left:left + scale] = 1.0
    if scale < 0.6 * size:
        prefix = FAR_PREFIXES[randint(0, len(FAR_PREFIXES))]
    elif scale > size:
        prefix = NEAR_PREFIXES[randint(0, len(NEAR_PREFIXES))]
    else:
        prefix = ""
    return image.contiguous(), mask, prefix


@dataclass
class ClassPool:
    """The class images of one concept: rows `offset .. offset+len(images)-1` of all class images, and the prompt."""

    images: SquareImages
    prompt: str
    offset: int


def collate(items: list) -> dict:
    """Batch samples; (instance, class) pairs become an instance half followed by a class half. `concept` stays a
    Python list so prompts are built on the host."""
    if isinstance(items[0], tuple):
        items = [pair[0] for pair in items] + [pair[1] for pair in items]
    batch = default_collate([{k: v for k, v in item.items() if k != "concept"} for item in items])
    batch["concept"] = [item["concept"] for item in items]
    return batch


class ConceptStream(IterableDataset):
    """Yields samples `start + k·world + rank` for k in one epoch.

    With `class_pools` (one per concept) each sample is an (instance, class) pair; with `augment` each instance
    sample gets Custom Diffusion's resize augmentation, and every sample a loss `mask`.
    """

    def __init__(self, images: SquareImages, templates: tuple[str, ...], flip_p: float, seed: int,
                 samples_per_epoch: int, batch_size: int, concept_of: list[int] | None = None,
                 class_pools: list[ClassPool] | None = None, augment: bool = False) -> None:
        self.images, self.templates, self.flip_p, self.seed = images, templates, flip_p, seed
        self.samples_per_epoch, self.batch_size = samples_per_epoch, batch_size
        self.concept_of = concept_of or [0] * len(images)
        self.class_pools, self.augment = class_pools, augment
        self.start, self.rank, self.world = 0, 0, 1  # set by StepAlignedLoader in the main process

    def __len__(self) -> int:
        return self.samples_per_epoch

    @staticmethod
    def _view(images: SquareImages, row: int, flipped: bool) -> dict:
        """Image `row`, flipped or not, in [-1, 1], with its original size and the crop it shows."""
        pixels = images.pixels[row].flip(-1) if flipped else images.pixels[row]
        return {"pixel_values": pixels.float() / 127.5 - 1.0, "original_size": images.original_sizes[row],
                "crop_top_left": images.crop_top_left[row, int(flipped)]}

    def sample(self, index: int) -> dict | tuple[dict, dict]:
        """Sample number `index` of the infinite stream: each pass over the images is a fresh permutation."""
        n = len(self.images)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(self.seed, index // n)))
        image_index = int(order[index % n])
        generator = torch.Generator().manual_seed(sample_seed(self.seed, index, 1))
        flipped = bool(torch.rand((), generator=generator) < self.flip_p)
        template = self.templates[int(torch.randint(len(self.templates), (), generator=generator))]
        concept = self.concept_of[image_index]
        item = {**self._view(self.images, image_index, flipped), "image_index": image_index, "flipped": flipped,
                "template": template, "concept": concept}
        pixels = item["pixel_values"]
        if self.augment:
            item["pixel_values"], item["mask"], prefix = resize_augment(pixels, generator)
            item["template"] = prefix + template
        if self.class_pools is None:
            return item
        pool = self.class_pools[concept]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, index, 2))
        row = int(torch.randint(len(pool.images), (), generator=generator))
        class_flipped = bool(torch.rand((), generator=generator) < self.flip_p)
        other = {**self._view(pool.images, row, class_flipped), "image_index": pool.offset + row,
                 "flipped": class_flipped, "template": pool.prompt, "concept": concept, "is_class": True}
        if self.augment:
            other["mask"] = torch.ones(1, *pixels.shape[-2:])
        item["is_class"] = False
        return item, other

    def __iter__(self) -> Iterator[dict | tuple[dict, dict]]:
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
        super().__init__(dataset, **{"collate_fn": collate, **kwargs})
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


@dataclass
class TrainingConcept:
    """One concept of a multi-concept run, an entry of ``data.concepts`` (Custom Diffusion reads the same list).

    Args:
        instance_dir: Folder of 3-20 photos of the concept.
        concept_word: One-token word for the concept's category ("cat"); its modifier token starts from it.
        modifier_token: The new token written before the concept word ("<new1>"); default ``<newN>`` for entry N.
        class_prompt: Prompt of the concept's class images ("a photo of a {}": ``{}`` is the concept word).
        class_dir: Folder of class images (default: under the run's root, by model and prompt).
        num_class_images: The class folder is filled up to this many by generating the missing ones.
    """

    instance_dir: str
    concept_word: str | None = None
    modifier_token: str | None = None
    class_prompt: str | None = None
    class_dir: str | None = None
    num_class_images: int = 0


def as_training_concepts(concepts: list[TrainingConcept | dict]) -> list[TrainingConcept]:
    """Entries as `TrainingConcept` (from Python, plain dicts work too)."""
    return [TrainingConcept(**c) if isinstance(c, dict) else c for c in concepts]


def _class_setting(concept: TrainingConcept, where: str) -> None:
    """Refuse prior-preservation settings that cannot work, naming the value and the fix."""
    if concept.num_class_images < 0:
        raise ValueError(f"{where}num_class_images={concept.num_class_images} is negative; use 0 (the class folder "
                         "as is) or the number of class images to use.")
    wants_images = concept.num_class_images > 0 or concept.class_dir is not None
    if wants_images and not concept.class_prompt:
        raise ValueError(f"Class images were requested ({where}num_class_images={concept.num_class_images}, "
                         f"{where}class_dir={concept.class_dir!r}) without a class prompt. Set {where}class_prompt, "
                         "e.g. 'a photo of a {}' ({} becomes the concept word), or drop the class images.")
    if concept.class_prompt and not wants_images:
        raise ValueError(f"{where}class_prompt={concept.class_prompt!r} is set but no class images are: set "
                         f"{where}num_class_images (missing images are generated) or {where}class_dir (your own).")
    if concept.class_prompt and concept.class_prompt.count(SLOT) > 1:
        raise ValueError(f"{where}class_prompt={concept.class_prompt!r} has several '{{}}'; use at most one, "
                         "for the concept word.")
    if concept.class_dir is not None and concept.num_class_images == 0 and not image_paths(concept.class_dir):
        raise FileNotFoundError(f"{where}class_dir={concept.class_dir!r} holds no images and "
                                f"{where}num_class_images is 0. Set {where}num_class_images to generate them there.")


class ConceptDataModule(L.LightningDataModule):
    """Concept images with prompt templates, and optionally class images for prior preservation.

    Prior preservation pairs every instance sample with a class sample (a photo of the class, with the class
    prompt); the module weighs the class half's loss by ``model.prior_loss_weight``. Class images come from
    ``class_dir``: when it holds fewer than ``num_class_images``, the missing ones are generated with the base model
    before training (and reused by the next run); a folder of your own is used as is.

    Args:
        instance_dir: Folder of 3-20 photos of the concept (jpg, png, webp).
        resolution: Training size in pixels (a multiple of 8; 512 for SD 1.5).
        templates: Prompt templates: a family (``object``, ``style``, ``person``) or one template with ``{}`` for
            the keyword (``"a photo of {}"`` gives DreamBooth's "a photo of sks dog").
        flip_p: Probability of a horizontal flip per sample.
        batch_size: Samples per step and process (twice as many with class images).
        repeats: Passes over the images that make one epoch (progress bars and epoch-based schedules).
        num_workers: DataLoader worker processes (images are decoded once, so 0 is usually fastest).
        seed: Seed of the sample order, flips, templates, augmentation and generated class images.
        class_prompt: Prompt of the class images ("a photo of a {}": ``{}`` becomes the model's concept word).
        class_dir: Folder of class images (default: ``<trainer root>/class_images/<model>/<prompt>``).
        num_class_images: Fill the class folder up to this many images (0: use the folder as is).
        class_batch_size: Images generated per batch when class images are missing.
        class_steps: Denoising steps per generated class image.
        augment: Custom Diffusion's resize augmentation ("a far away"/"zoomed in" prefixes, masked loss).
        concepts: Several concepts in one run (Custom Diffusion), instead of ``instance_dir`` and the class options.
    """

    def __init__(self, instance_dir: str | None = None, resolution: int = 512, templates: str = "object",
                 flip_p: float = 0.5, batch_size: int = 1, repeats: int = 100, num_workers: int = 0, seed: int = 0,
                 class_prompt: str | None = None, class_dir: str | None = None, num_class_images: int = 0,
                 class_batch_size: int = 4, class_steps: int = 50, augment: bool = False,
                 concepts: list[TrainingConcept] | None = None) -> None:
        super().__init__()
        if resolution <= 0 or resolution % 8:
            raise ValueError(f"data.resolution={resolution} is not a positive multiple of 8 (the VAE downsamples by "
                             f"8). Use e.g. {max(8, round(resolution / 8) * 8)}.")
        if templates not in TEMPLATES and check_template(templates) is not None:
            raise ValueError(f"data.templates={templates!r} is neither a template family {sorted(TEMPLATES)} nor one "
                             f"template with a '{{}}' for the keyword ({check_template(templates)}); write e.g. "
                             "'a photo of {}', which becomes 'a photo of sks dog'.")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"data.flip_p={flip_p} is not a probability; use a value in [0, 1].")
        if batch_size < 1 or repeats < 1:
            raise ValueError(f"data.batch_size={batch_size} and data.repeats={repeats} must both be at least 1.")
        if class_batch_size < 1 or class_steps < 1:
            raise ValueError(f"data.class_batch_size={class_batch_size} and data.class_steps={class_steps} must both "
                             "be at least 1.")
        self.concepts = self._concept_list(instance_dir, concepts, class_prompt, class_dir, num_class_images)
        self.save_hyperparameters(ignore=["concepts"])
        self.hparams["concepts"] = None if concepts is None else [asdict(c) for c in self.concepts]
        # Decoded now: a bad file fails before any training. Rows of all concepts, in order.
        per_concept = [load_square_images(c.instance_dir, resolution) for c in self.concepts]
        self.images = SquareImages.cat(per_concept)
        self.concept_of = [i for i, images in enumerate(per_concept) for _ in range(len(images))]
        self.class_pools: list[ClassPool] | None = None

    @staticmethod
    def _concept_list(instance_dir: str | None, concepts: list[TrainingConcept] | None, class_prompt: str | None,
                      class_dir: str | None, num_class_images: int) -> list[TrainingConcept]:
        if concepts is None:
            if instance_dir is None:
                raise ValueError("No training images: set data.instance_dir to a folder of photos of the concept "
                                 "(or list several concepts under data.concepts).")
            single = TrainingConcept(instance_dir, class_prompt=class_prompt, class_dir=class_dir,
                                     num_class_images=num_class_images)
            _class_setting(single, "data.")
            return [single]
        if instance_dir is not None or class_prompt is not None or class_dir is not None or num_class_images:
            raise ValueError("data.concepts is given together with data.instance_dir or data.class_*: with several "
                             "concepts, put instance_dir and the class options inside each entry of data.concepts.")
        if not concepts:
            raise ValueError("data.concepts is an empty list; list at least one concept "
                             "({instance_dir, concept_word, modifier_token, class_prompt, ...}) or set "
                             "data.instance_dir instead.")
        concepts = as_training_concepts(concepts)
        for i, concept in enumerate(concepts):
            _class_setting(concept, f"data.concepts[{i}].")
        with_class = [c.class_prompt is not None for c in concepts]
        if any(with_class) and not all(with_class):
            raise ValueError(f"Only some of data.concepts have class images (class_prompt set: {with_class}); prior "
                             "preservation pairs every sample with a class image, so give every concept a "
                             "class_prompt and class images, or none.")
        return concepts

    def _where(self, i: int) -> str:
        return "data." if self.hparams.concepts is None else f"data.concepts[{i}]."

    @property
    def uses_class_images(self) -> bool:
        return self.concepts[0].class_prompt is not None

    # ----- class images -------------------------------------------------------------------------------------------
    def class_settings(self) -> list[tuple[str, Path, int]]:
        """(class prompt, class folder, images wanted) per concept, with `{}` filled by the concept word and the
        default folder resolved; the concept word and base model are the attached module's when not given."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        settings = []
        for i, concept in enumerate(self.concepts):
            prompt = concept.class_prompt
            if SLOT in prompt:
                word = concept.concept_word or getattr(module, "concept_word", None)
                if word is None:
                    raise ValueError(f"{self._where(i)}class_prompt={prompt!r} needs a concept word for its '{{}}'; "
                                     "train through a Trainer with a method that has one, or write the prompt out.")
                prompt = fill(prompt, word)
            folder = concept.class_dir
            if folder is None:
                if module is None:
                    raise ValueError(f"{self._where(i)}class_dir is not set and there is no trainer to place the "
                                     "default folder under; set it.")
                from tea_lightning.class_images import default_class_dir

                folder = default_class_dir(self.trainer.default_root_dir, module.pretrained, prompt)
            settings.append((prompt, Path(folder).expanduser(), concept.num_class_images))
        return settings

    def prepare_data(self) -> None:
        """Generate the missing class images (Lightning runs this on one process per node; the others wait)."""
        if not self.uses_class_images:
            return
        from tea_lightning.class_images import ensure_class_images

        module = self.trainer.lightning_module
        for prompt, folder, count in self.class_settings():
            ensure_class_images(folder, prompt, count, pretrained=module.pretrained,
                                resolution=self.hparams.resolution, batch_size=self.hparams.class_batch_size,
                                steps=self.hparams.class_steps, seed=self.hparams.seed,
                                device=self.trainer.strategy.root_device)

    def check_module(self, module: L.LightningModule) -> None:
        """Refuse a module that trains another number of concepts than `data.concepts` lists (train.py calls this
        before the run folder exists)."""
        keywords = getattr(module, "keywords", None)
        if keywords is not None and len(keywords) != len(self.concepts):
            raise ValueError(f"data.concepts lists {len(self.concepts)} concepts but {type(module).__name__} trains "
                             f"{len(keywords)} keyword(s) {keywords}. Train several concepts with CustomDiffusion "
                             "(it reads data.concepts), or give one data.instance_dir.")
        if self.hparams.augment and getattr(module, "family", None) == SDXL:
            raise ValueError("data.augment (Custom Diffusion's resize augmentation) cannot be used with an SDXL model: "
                             "SDXL is conditioned on each image's size and crop, which a shrunken image on a grey "
                             "canvas does not have. Set data.augment false.")

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.check_module(self.trainer.lightning_module)
        if self.uses_class_images:
            self.load_class_images()

    def load_class_images(self) -> list[ClassPool]:
        """Read every concept's class folder (after `prepare_data` filled it)."""
        pools, offset = [], 0
        for i, (prompt, folder, count) in enumerate(self.class_settings()):
            if not image_paths(folder):
                raise FileNotFoundError(f"The class folder {str(folder)!r} ({self._where(i)}class_dir) holds no "
                                        f"images; set {self._where(i)}num_class_images to generate them.")
            images = load_square_images(folder, self.hparams.resolution)
            if len(images.pixels) < count:
                raise ValueError(f"{self._where(i)}class_dir {str(folder)!r} holds {len(images.pixels)} images, fewer "
                                 f"than num_class_images={count}; they are generated in prepare_data (train through a "
                                 "Trainer) or lower num_class_images.")
            pools.append(ClassPool(images, prompt, offset))
            offset += len(images)
        self.class_pools = pools
        return pools

    # ----- the stream ---------------------------------------------------------------------------------------------
    def _position(self) -> tuple[int, int, int]:
        return stream_position(self.trainer, self.hparams.batch_size)

    def train_dataset(self) -> ConceptStream:
        if self.uses_class_images and self.class_pools is None:
            self.load_class_images()
        templates = self.hparams.templates
        world = self.trainer.world_size if self.trainer is not None else 1
        return ConceptStream(
            self.images, TEMPLATES.get(templates, (templates,)), self.hparams.flip_p, self.hparams.seed,
            samples_per_epoch=max(1, self.hparams.repeats * len(self.images) // world),
            batch_size=self.hparams.batch_size, concept_of=self.concept_of, class_pools=self.class_pools,
            augment=self.hparams.augment,
        )

    def train_dataloader(self) -> DataLoader:
        return StepAlignedLoader(self.train_dataset(), self._position, batch_size=self.hparams.batch_size,
                                 num_workers=self.hparams.num_workers, pin_memory=torch.cuda.is_available())

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Latent-cache keys are read on the host before the batch moves to the GPU: looking them up costs no sync.
        batch["latent_keys"] = latent_keys(batch, augmented=self.hparams.get("augment", False))
        return batch


def latent_keys(batch: dict, augmented: bool = False) -> list[tuple[bool, int, bool] | None]:
    """(is_class, image_index, flipped) of each sample of a collated batch: what its pixels are a pure function of,
    so the module may cache their VAE encoding under this key. Randomly augmented instance samples get None."""
    is_class = batch.get("is_class")
    is_class = [False] * len(batch["image_index"]) if is_class is None else is_class.tolist()
    keys = zip(is_class, batch["image_index"].tolist(), batch["flipped"].tolist(), strict=True)
    return [None if augmented and not key[0] else key for key in keys]
