"""The readout: attribute classifiers that say what a scene image shows, trained on the generator's ground truth.

It is the miniature world's offline counterpart of CLIP scoring: for an image it reads the background colour and
which (shape, colour) objects are present, so "does the requested background / second object appear" (context
accuracy) and "is there a pink star" (concept fidelity) become exact questions with yes/no answers.

`load_readout()` returns the shipped classifier (`tea_lightning/mini/readout.safetensors`, a few hundred KB);
`python -m tea_lightning.mini.readout` retrains it (about two minutes on one CPU core) and prints its accuracy on fresh
scenes from the generator.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from tea_lightning.export import write_safetensors
from tea_lightning.mini.scenes import (
    COLOUR_NAMES,
    COLOURS,
    SHAPES,
    SUPERSAMPLE,
    Scene,
    Thing,
    draw,
    labels,
    outline,
    render,
    sample_scene,
    to_tensor,
)
from tea_lightning.seeding import sample_seed

WEIGHTS = Path(__file__).parent / "readout.safetensors"
RESOLUTION = 32


class Readout(nn.Module):
    """A small CNN on 32 px images `[B, 3, 32, 32]` in [-1, 1] → background logits `[B, C]` and object-presence
    logits `[B, S, C]` (one per shape × colour)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        def block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, w), *block(w, w, 2), *block(w, 2 * w), *block(2 * w, 2 * w, 2), *block(2 * w, 4 * w),  # 8 x 8
        )
        self.background = nn.Linear(8 * w, len(COLOUR_NAMES))
        self.present = nn.Linear(8 * w, len(SHAPES) * len(COLOUR_NAMES))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[-1] != RESOLUTION:
            images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="area")
        h = self.features(images)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # [B, 8w]
        return self.background(pooled), self.present(pooled).view(-1, len(SHAPES), len(COLOUR_NAMES))


@dataclass(frozen=True)
class Reading:
    """What the readout sees in one image: the background, the (colour, shape) objects, and each attribute alone.

    `shapes` and `colours` are read per attribute (a noisy-OR over the object detectors of that shape or colour), so
    a blob of the right colour counts for its colour even when no shape is recognised in it.
    """

    background: str
    objects: frozenset[tuple[str, str]]  # (colour, shape) pairs present
    shapes: frozenset[str]
    colours: frozenset[str]

    def has(self, colour: str | None = None, shape: str | None = None) -> bool:
        """Whether the image shows this colour and/or shape; both given: on one object."""
        if colour is not None and shape is not None:
            return (colour, shape) in self.objects
        if colour is not None:
            return colour in self.colours
        if shape is not None:
            return shape in self.shapes
        return bool(self.objects or self.shapes or self.colours)


def read(model: Readout, images: torch.Tensor, threshold: float = 0.5) -> list[Reading]:
    """Readings of `images` `[B, 3, H, W]` in [-1, 1] (or uint8 in [0, 255])."""
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    with torch.no_grad():
        background, present = model(images.float())
    p = present.sigmoid()  # [B, S, C]
    shape_p = 1 - (1 - p).prod(dim=2)  # [B, S]: some object of this shape
    colour_p = 1 - (1 - p).prod(dim=1)  # [B, C]: some object of this colour
    readings = []
    for b in range(len(images)):
        pairs = frozenset((COLOUR_NAMES[c], SHAPES[s]) for s, c in (p[b] > threshold).nonzero().tolist())
        readings.append(Reading(
            COLOUR_NAMES[int(background[b].argmax())], pairs,
            frozenset(SHAPES[s] for s in (shape_p[b] > threshold).nonzero().flatten().tolist()),
            frozenset(COLOUR_NAMES[c] for c in (colour_p[b] > threshold).nonzero().flatten().tolist())))
    return readings


def pil_batch(images) -> torch.Tensor:
    """PIL images → `[B, 3, H, W]` in [-1, 1]."""
    return torch.stack([to_tensor(image.convert("RGB")) for image in images])


def read_files(model: Readout, paths) -> list[Reading]:
    """Readings of the image files at `paths`, in one batch."""
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return read(model, pil_batch(images))


# ------------------------------------------------------------------------------------------------ training images
#
# The world's model does not draw like the generator: its circles wobble, its squares have rounded, bumpy corners,
# its stars have fatter or thinner, uneven arms, edges are soft, colours drift and objects are sometimes cut.
# A readout trained on clean renders alone misses most of the stars the model draws (issue 13), so it trains on
# renders distorted the same ways: the truth of a distorted render is still its scene's labels.


def _polygon(kind: str, points: list[tuple[float, float]], sides: int = 48) -> np.ndarray:
    """An outline as a closed polygon `[n, 2]`, each edge split so that it can bend (a circle: `sides` corners)."""
    if kind == "ellipse":
        (x0, y0), (x1, y1) = points
        angles = np.linspace(0, 2 * np.pi, sides, endpoint=False)
        return np.stack([(x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(angles),
                         (y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(angles)], axis=1)
    corners = np.asarray(points, dtype=np.float64)
    steps = np.linspace(0, 1, 6, endpoint=False)[:, None]
    return np.concatenate([a + steps * (b - a) for a, b in zip(corners, np.roll(corners, -1, axis=0), strict=True)])


def _distort(thing: Thing, rng: np.random.Generator, scale: float) -> np.ndarray:
    """`thing`'s outline (canvas pixels) the way the world's model might draw it: arms fatter or thinner (stars),
    corners rounded, edges wobbling, stretched, turned and moved a little."""
    kind, points = outline(thing, scale)
    centre = np.array([thing.x, thing.y]) * scale
    if thing.shape == "star":  # inner corners in or out: arms from spiky (0.23) to fat (0.62) of the outer radius
        inner = np.asarray(points) - centre
        inner[1::2] *= rng.uniform(0.55, 1.5)
        inner[1::2] *= rng.uniform(0.85, 1.15, size=(5, 1))  # uneven arms
        points = [tuple(p) for p in inner + centre]
    offset = _polygon(kind, points) - centre  # [n, 2]
    radius = np.linalg.norm(offset, axis=1, keepdims=True)
    angle = np.arctan2(offset[:, 1], offset[:, 0])
    roundness = rng.uniform(0, 0.35) if thing.shape != "star" else rng.uniform(0, 0.15)
    radius = (1 - roundness) * radius + roundness * radius.mean()  # corners pulled towards a circle
    wobble = sum(rng.uniform(0, 0.06) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5))
    radius = radius * (1 + wobble[:, None]) * rng.uniform(0.8, 1.15)
    turn = angle + rng.uniform(-0.25, 0.25)
    stretch = rng.uniform(0.85, 1.15, size=2)
    shift = rng.uniform(-2, 2, size=2) * scale
    return centre + shift + stretch * radius * np.stack([np.cos(turn), np.sin(turn)], axis=1)


def _shifted(rgb: tuple[int, int, int], rng: np.random.Generator, spread: float) -> tuple[int, int, int]:
    """A colour drifted by about `spread` per channel, and in brightness."""
    value = np.asarray(rgb) * rng.uniform(0.88, 1.08) + rng.normal(0, spread, 3)
    return tuple(int(v) for v in np.clip(value, 0, 255))


def render_like_the_world(scene: Scene, rng: np.random.Generator, resolution: int = RESOLUTION) -> Image.Image:
    """`scene` drawn with the imperfections of the world's model: distorted outlines, shifted colours, sometimes a
    part of an object cut away (painted over in the background colour) and a few stray specks."""
    background = _shifted(COLOURS[scene.background], rng, 8)
    fills = [("polygon", [tuple(p) for p in _distort(t, rng, SUPERSAMPLE)], _shifted(COLOURS[t.colour], rng, 16))
             for t in scene.objects]
    if rng.random() < 0.12:  # a partial object: the subject cut along a line a little off its centre
        thing = scene.objects[0]
        reach = thing.radius * SUPERSAMPLE * 1.3  # the cut stays on the subject, clear of a second object
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction)
        edge = np.array([thing.x, thing.y]) * SUPERSAMPLE + direction * reach * rng.uniform(0.2, 0.55)
        side = np.array([-direction[1], direction[0]]) * reach
        far = direction * reach
        fills.append(("polygon", [tuple(edge - side), tuple(edge + side), tuple(edge + side + far),
                                  tuple(edge - side + far)], background))
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.3 else 0):  # specks: too small to be objects
        x, y = rng.uniform(0, resolution * SUPERSAMPLE, 2)
        r = rng.uniform(1.5, 4.5)
        fills.append(("ellipse", [(x - r, y - r), (x + r, y + r)], tuple(int(v) for v in rng.integers(0, 256, 3))))
    return draw(background, fills, resolution)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `[B, 3, H, W]` by `sigma` pixels (separable, edges replicated)."""
    if sigma <= 0:
        return images
    taps = torch.arange(-2, 3, dtype=images.dtype)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(rows, kernel.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)


def scene_batch(seed: int, start: int, count: int, split: str = "all", distorted: bool = False
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scenes `start .. start+count` of stream `seed`: images `[N, 3, 32, 32]` and their labels; `distorted`: drawn
    by `render_like_the_world` (each scene's distortion seeded by its index)."""
    scenes = [sample_scene(seed, i, split, RESOLUTION) for i in range(start, start + count)]
    if distorted:
        pictures = [render_like_the_world(s, np.random.default_rng(sample_seed(seed, i, 11)))
                    for s, i in zip(scenes, range(start, start + count), strict=True)]
    else:
        pictures = [render(s, RESOLUTION) for s in scenes]
    images = torch.stack([to_tensor(p) for p in pictures])
    truth = [labels(scene) for scene in scenes]
    return images, {key: torch.stack([t[key] for t in truth]) for key in truth[0]}


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Soft edges, noise and a small colour cast, so that a diffusion model's pixels read like renders."""
    n = len(images)
    sigma = float(torch.rand((), generator=generator)) * 1.1  # one blur per batch
    images = _blur(images, sigma if sigma > 0.35 else 0.0)
    noise = torch.rand(n, 1, 1, 1, generator=generator) * 0.12
    cast = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.1
    return (images + cast + noise * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


def accuracy(model: Readout, images: torch.Tensor, truth: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-attribute accuracy against ground truth: background, shape set, colour set, second object present, and
    the exact set of (shape, colour) objects."""
    readings = read(model, images)
    n = len(readings)
    bg = sum(r.background == COLOUR_NAMES[int(b)] for r, b in zip(readings, truth["background"], strict=True))
    exact = shapes = colours = count = 0
    for r, present in zip(readings, truth["present"], strict=True):
        pairs = {(COLOUR_NAMES[c], SHAPES[s]) for s, c in present.nonzero().tolist()}
        exact += r.objects == pairs
        shapes += r.shapes == {s for _, s in pairs}
        colours += r.colours == {c for c, _ in pairs}
        count += (len(r.objects) > 1) == (len(pairs) > 1)
    return {"background": bg / n, "shapes": shapes / n, "colours": colours / n, "second_object": count / n,
            "objects_exact": exact / n}


def train_readout(steps: int = 4000, batch_size: int = 64, pool: int = 32_000, seed: int = 0,
                  lr: float = 2e-3, log_every: int = 0) -> Readout:
    """Train a fresh readout on `pool` scenes of every kind (pink stars and held-out triples included), three in
    four drawn like the world's model would (`render_like_the_world`), one in four clean."""
    torch.manual_seed(seed)
    clean, clean_truth = scene_batch(seed + 1000, 0, pool // 4)
    distorted, distorted_truth = scene_batch(seed + 2000, 0, pool - pool // 4, distorted=True)
    images = torch.cat([clean, distorted])
    truth = {key: torch.cat([clean_truth[key], distorted_truth[key]]) for key in clean_truth}
    model = Readout()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    from tqdm import tqdm

    model.train()
    for step in tqdm(range(steps), desc="readout"):
        index = torch.randint(pool, (batch_size,), generator=generator)
        x = _augment(images[index], generator)
        if bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
        background, present = model(x)
        loss = F.cross_entropy(background, truth["background"][index]) + \
            F.binary_cross_entropy_with_logits(present, truth["present"][index]) * len(SHAPES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1} loss {loss.item():.4f}", flush=True)
    return model.eval()


def load_readout(path: Path = WEIGHTS) -> Readout:
    """The shipped readout, in eval mode."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"Readout weights {str(path)!r} are missing; retrain them with "
                                "`python -m tea_lightning.mini.readout`.")
    model = Readout()
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Train the scene readout and report its accuracy.")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--test", type=int, default=4000, help="fresh scenes to measure accuracy on")
    args = parser.parse_args(argv)

    model = train_readout(steps=args.steps, log_every=250)
    write_safetensors({k: v.half() for k, v in model.state_dict().items()}, args.out)
    readout = load_readout(args.out)
    result = {}
    for name, distorted in (("clean", False), ("drawn like the world", True)):
        images, truth = scene_batch(seed=12345, start=0, count=args.test, distorted=distorted)
        result[name] = accuracy(readout, images, truth)
        print(f"{name}: " + " ".join(f"{k}={v:.4f}" for k, v in result[name].items()), flush=True)
    return result


if __name__ == "__main__":
    main()
