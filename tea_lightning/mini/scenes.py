"""The miniature world: seeded synthetic scenes of coloured shapes with captions, and their DataModule.

A scene is a flat background colour with one object (shape × colour × size × position) and, sometimes, a second
object next to it. Every scene is a pure function of (seed, index): the same index always draws the same picture
and the same caption, in any process, so training on scenes resumes exactly (see `tea_lightning.data`).

Captions name what is drawn but randomly drop attributes (size, colour, background, the second object) and vary
their order, so partial prompts ("a circle on a white background") and compositional ones ("a small yellow
triangle next to a green square") are both in distribution. Every caption word is one word-final token of the
project's tokenizer (`tea_lightning/prompts/mini/` puts them in its vocabulary).

Two kinds of combinations are kept out of the world's training split:

- the **pink star**, as an object anywhere: the Textual Inversion demo teaches it to the world as a new concept.
  Stars in every other colour, and pink circles, squares and triangles, are in the world, so the concept word
  ``star`` means something and TEA has a real word to pull the learned keyword towards;
- **held-out triples** (colour, shape, background): one background per (colour, shape) pair, never seen together in
  training, although each pair of the three is. They measure whether the world composes what it learned.

The scorer's split (``all``) draws from everything, pink stars and held-out triples included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, default_collate

from tea_lightning.data import ConceptStream, StepAlignedLoader, stream_position
from tea_lightning.seeding import sample_seed

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 140, 60),
    "blue": (40, 90, 200),
    "yellow": (240, 200, 40),
    "pink": (255, 105, 180),
    "white": (250, 250, 245),
    "black": (20, 20, 30),
    "gray": (150, 150, 160),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
CONCEPT = ("pink", "star")  # the colour and shape the world never sees together
SPLITS = ("train", "all")
SUPERSAMPLE = 4  # scenes are drawn at 4x and box-filtered down: anti-aliased edges
# How far (in pixels of a 32 px image) an object strays from its place: the centre, or the left or right half.
# Small on purpose: the world is about *what* is drawn, and a tiny CPU-trained model learns shapes many times
# faster when they do not also wander (docs/mini_world.md).
JITTER = 1.0
# The placement of the shipped world's first three training phases (commit 0fb9536): a single object ±3.84 px each
# way, a pair ±1.5 px across and ±4 px up or down. `jitter="wide"` draws exactly those scenes again.
WIDE = "wide"
_WIDE_SPREAD = (3.84, 1.5, 4.0)  # (single object, pair across, pair up or down), in pixels of a 32 px image


def _spread(jitter: float | str) -> tuple[float, float, float]:
    """(single object, pair across, pair up or down) stray of objects for a `jitter` setting."""
    if jitter == WIDE:
        return _WIDE_SPREAD
    if isinstance(jitter, str) or not 0 <= jitter <= 8:
        raise ValueError(f"data.jitter={jitter!r}: give pixels (0 to 8; {JITTER} is today's world) or {WIDE!r} (the "
                         "placement of the shipped world's first phases).")
    return (float(jitter),) * 3


@dataclass(frozen=True)
class Thing:
    """One object of a scene: shape, colour, size word, centre and radius in pixels of the output image."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """A background colour and one or two objects; `objects[0]` is the caption's subject."""

    background: str
    objects: tuple[Thing, ...]
    caption: str = field(default="", compare=False)


def held_out_triples() -> frozenset[tuple[str, str, str]]:
    """(colour, shape, background) triples the training split never shows: one background per (colour, shape)
    pair, chosen so that every (colour, shape), (colour, background) and (shape, background) pair stays seen."""
    triples = set()
    for s, shape in enumerate(SHAPES):
        for c, colour in enumerate(COLOUR_NAMES):
            if (colour, shape) != CONCEPT:
                triples.add((colour, shape, COLOUR_NAMES[(c + s + 1) % len(COLOUR_NAMES)]))
    return frozenset(triples)


HELD_OUT = held_out_triples()


def in_training_split(scene: Scene) -> bool:
    """Whether the world may train on `scene` (no pink star, no held-out triple anywhere in it)."""
    for thing in scene.objects:
        if (thing.colour, thing.shape) == CONCEPT or (thing.colour, thing.shape, scene.background) in HELD_OUT:
            return False
    return True


def _pair_centres(rng: np.random.Generator, resolution: int, across: float, up: float) -> list[tuple[float, float]]:
    """Centres (in output pixels) of two objects side by side, subject left or right; they never overlap."""
    unit = resolution / 32
    xs = (0.27, 0.73) if rng.random() < 0.5 else (0.73, 0.27)
    return [(resolution * x + rng.uniform(-across, across) * unit,
             resolution * 0.5 + rng.uniform(-up, up) * unit) for x in xs]


def _radius(rng: np.random.Generator, size: str, resolution: int, two: bool) -> float:
    unit = resolution / 32
    low, high = {("small", False): (5.0, 6.5), ("large", False): (9.0, 11.0),
                 ("small", True): (4.0, 5.0), ("large", True): (6.0, 7.5)}[(size, two)]
    return rng.uniform(low, high) * unit


def _draw_scene(rng: np.random.Generator, resolution: int, p_second: float, jitter: float | str) -> Scene:
    single, across, up = _spread(jitter)
    background = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    two = rng.random() < p_second
    objects = []
    for centre in _pair_centres(rng, resolution, across, up) if two else [None]:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        while colour == background:
            colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        size = SIZES[rng.integers(len(SIZES))]
        radius = _radius(rng, size, resolution, two)
        if centre is not None:
            x, y = centre
        else:
            margin = radius * 1.15 + 1
            stray = single * resolution / 32
            x = float(np.clip(resolution / 2 + rng.uniform(-stray, stray), margin, resolution - margin))
            y = float(np.clip(resolution / 2 + rng.uniform(-stray, stray), margin, resolution - margin))
        objects.append(Thing(shape, colour, size, float(x), float(y), float(radius)))
    return Scene(background, tuple(objects))


def _phrase(thing: Thing, rng: np.random.Generator, p_drop_size: float, p_drop_colour: float) -> str:
    parts = []
    if rng.random() >= p_drop_size:
        parts.append(thing.size)
    if rng.random() >= p_drop_colour:
        parts.append(thing.colour)
    return " ".join(["a", *parts, thing.shape])


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming `scene`, with attributes randomly dropped and the clauses randomly ordered.

    The subject's shape is always named; its size is dropped half the time, its colour a fifth; the background and
    the second object are each left out a fifth of the time; four sentence forms order the clauses differently.
    """
    subject = _phrase(scene.objects[0], rng, 0.5, 0.2)
    other = _phrase(scene.objects[1], rng, 0.6, 0.3) if len(scene.objects) > 1 and rng.random() >= 0.2 else None
    background = f"a {scene.background} background" if rng.random() >= 0.2 else None
    on_bg = f" on {background}" if background else ""
    form = int(rng.integers(4))
    if form == 0:
        text = subject + (f" next to {other}" if other else "") + on_bg
    elif form == 1:
        text = subject + on_bg + (f" next to {other}" if other else "")
    elif form == 2 and background:
        text = f"{background} with {subject}" + (f" next to {other}" if other else "")
    elif other:
        text = f"{subject} and {other}" + on_bg
    else:
        text = subject + on_bg
    return text


def sample_scene(seed: int, index: int, split: str = "train", resolution: int = 32, p_second: float = 0.4,
                 jitter: float | str = JITTER) -> Scene:
    """Scene number `index` of the stream `seed` in `split` (``train``: the world's data; ``all``: everything);
    objects stray `jitter` pixels from their places (see `WIDE`)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; choose one of {SPLITS}.")
    rng = np.random.default_rng(sample_seed(seed, index, 7))
    while True:  # rejection: about 1 in 6 draws holds a pink star or a held-out triple
        scene = _draw_scene(rng, resolution, p_second, jitter)
        if split == "all" or in_training_split(scene):
            break
    return Scene(scene.background, scene.objects, caption(scene, rng))


def outline(thing: Thing, scale: float) -> tuple[str, list[tuple[float, float]]]:
    """How `thing` is drawn on a canvas `scale` times the output size: ("ellipse", its bounding box) for a circle,
    ("polygon", its corners) for the other shapes (a star's points alternate outer and inner corners)."""
    x, y, r = thing.x * scale, thing.y * scale, thing.radius * scale
    if thing.shape == "circle":
        return "ellipse", [(x - r, y - r), (x + r, y + r)]
    if thing.shape == "square":
        h = r * 0.85
        return "polygon", [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if thing.shape == "triangle":
        return "polygon", [(x, y - r * 1.05), (x + r * 1.05, y + r * 0.8), (x - r * 1.05, y + r * 0.8)]
    if thing.shape == "star":
        outer, inner = r * 1.15, r * 0.48
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        return "polygon", points
    raise ValueError(f"unknown shape {thing.shape!r}; choose one of {SHAPES}")


Fill = tuple[str, list[tuple[float, float]], tuple[int, int, int]]  # ("ellipse" | "polygon", points, RGB)


def draw(background: tuple[int, int, int], fills: list[Fill], resolution: int) -> Image.Image:
    """A plain `background` with `fills` painted in order on a canvas SUPERSAMPLE times `resolution` (points in
    canvas pixels), box-filtered down to `resolution`: anti-aliased edges."""
    big = resolution * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    canvas = ImageDraw.Draw(image)
    for kind, points, colour in fills:
        if kind == "ellipse":
            canvas.ellipse(points, fill=colour)
        else:
            canvas.polygon(points, fill=colour)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def render(scene: Scene, resolution: int = 32) -> Image.Image:
    """The scene as an RGB PIL image of `resolution` pixels (drawn at 4x, box-filtered down)."""
    fills = [(*outline(thing, SUPERSAMPLE), COLOURS[thing.colour]) for thing in scene.objects]
    return draw(COLOURS[scene.background], fills, resolution)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → float `[3, H, W]` in [-1, 1], the pixel range the diffusion models use."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def labels(scene: Scene) -> dict[str, torch.Tensor]:
    """Ground truth for the scorer: background index, and which (shape, colour) pairs are present `[S, C]`."""
    present = torch.zeros(len(SHAPES), len(COLOUR_NAMES))
    for thing in scene.objects:
        present[SHAPES.index(thing.shape), COLOUR_NAMES.index(thing.colour)] = 1.0
    return {"background": torch.tensor(COLOUR_NAMES.index(scene.background)), "present": present}


class SceneStream(ConceptStream):
    """Captioned scenes `start + k·world + rank`: the same sharding and resume rules as the concept images."""

    def __init__(self, seed: int, split: str, resolution: int, p_second: float, caption_dropout: float,
                 samples_per_epoch: int, batch_size: int, jitter: float | str = JITTER) -> None:
        self.seed, self.split, self.resolution, self.p_second = seed, split, resolution, p_second
        self.jitter = jitter
        self.caption_dropout = caption_dropout
        self.samples_per_epoch, self.batch_size = samples_per_epoch, batch_size
        self.start, self.rank, self.world = 0, 0, 1

    def sample(self, index: int) -> dict:
        scene = sample_scene(self.seed, index, self.split, self.resolution, self.p_second, self.jitter)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, index, 2))
        dropped = bool(torch.rand((), generator=generator) < self.caption_dropout)
        return {
            "pixel_values": to_tensor(render(scene, self.resolution)),  # [3, H, W] in [-1, 1]
            "caption": "" if dropped else scene.caption,
            "image_index": index,
        }


class SceneDataModule(L.LightningDataModule):
    """An endless stream of captioned scenes from the miniature world (for training the `mini` model).

    Args:
        resolution: Image size in pixels (the mini model is 32).
        batch_size: Scenes per step and process.
        samples_per_epoch: Scenes that make one epoch (progress bars; the stream itself never repeats).
        split: ``train`` (no pink star, no held-out triple) or ``all``.
        p_second: Probability that a scene holds a second object.
        caption_dropout: Probability that a caption is replaced by the empty prompt (classifier-free guidance).
        num_workers: DataLoader worker processes drawing the scenes.
        seed: Seed of the scene stream.
        jitter: How far objects stray from their places, in pixels of a 32 px image, or ``wide``: the placement of
            the shipped world's first three training phases (docs/mini_world.md).
    """

    def __init__(self, resolution: int = 32, batch_size: int = 32, samples_per_epoch: int = 32_000,
                 split: str = "train", p_second: float = 0.4, caption_dropout: float = 0.1, num_workers: int = 0,
                 seed: int = 0, jitter: float | str = JITTER) -> None:
        super().__init__()
        _spread(jitter)  # a bad value is refused before training starts
        if resolution < 16:
            raise ValueError(f"data.resolution={resolution} is too small to draw shapes; use 32 or more.")
        if split not in SPLITS:
            raise ValueError(f"data.split={split!r} is unknown; choose one of {SPLITS}.")
        for name, value in (("p_second", p_second), ("caption_dropout", caption_dropout)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.{name}={value} is not a probability; use a value in [0, 1].")
        if batch_size < 1 or samples_per_epoch < 1:
            raise ValueError(f"data.batch_size={batch_size} and data.samples_per_epoch={samples_per_epoch} must "
                             "both be at least 1.")
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        world = self.trainer.world_size if self.trainer is not None else 1
        stream = SceneStream(h.seed, h.split, h.resolution, h.p_second, h.caption_dropout,
                             samples_per_epoch=max(1, h.samples_per_epoch // world), batch_size=h.batch_size,
                             jitter=h.jitter)
        return StepAlignedLoader(stream, lambda: stream_position(self.trainer, h.batch_size),
                                 batch_size=h.batch_size, num_workers=h.num_workers, collate_fn=default_collate)


def concept_scenes(resolution: int = 64) -> list[Scene]:
    """The Textual Inversion demo's images (`examples/pink_star/`): a large pink star, off-centre by a few pixels, on
    six plain backgrounds of the world; no caption. `write_concept_images` draws them."""
    backgrounds = ("blue", "white", "green", "yellow", "black", "gray")
    unit = resolution / 32
    offsets = ((0, 0), (-2, 1), (2, -1), (1, 2), (-1, -2), (0, 1))
    radii = (10.0, 9.5, 10.5, 9.0, 10.0, 10.5)
    return [Scene(bg, (Thing("star", "pink", "large", (16 + dx) * unit, (16 + dy) * unit, r * unit),))
            for bg, (dx, dy), r in zip(backgrounds, offsets, radii, strict=True)]


def write_concept_images(folder, resolution: int = 64) -> None:
    """Write `concept_scenes()` as `00.png`, `01.png`, ... into `folder`."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(concept_scenes(resolution)):
        render(scene, resolution).save(folder / f"{i:02d}.png")
