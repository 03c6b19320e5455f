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

import torch
from torch import nn
from torch.nn import functional as F

from tea_lightning.export import write_safetensors
from tea_lightning.mini.scenes import COLOUR_NAMES, SHAPES, labels, render, sample_scene, to_tensor

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


def scene_batch(seed: int, start: int, count: int, split: str = "all") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scenes `start .. start+count` of stream `seed`: images `[N, 3, 32, 32]` and their labels."""
    scenes = [sample_scene(seed, i, split, RESOLUTION) for i in range(start, start + count)]
    images = torch.stack([to_tensor(render(scene, RESOLUTION)) for scene in scenes])
    truth = [labels(scene) for scene in scenes]
    return images, {key: torch.stack([t[key] for t in truth]) for key in truth[0]}


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise and a small colour shift, so that a diffusion model's imperfect pixels read like clean renders."""
    n = len(images)
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * 0.15
    shift = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.1
    return (images + shift + sigma * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


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


def train_readout(steps: int = 2000, batch_size: int = 64, pool: int = 16_000, seed: int = 0,
                  lr: float = 2e-3, log_every: int = 0) -> Readout:
    """Train a fresh readout on `pool` scenes of every kind (pink stars and held-out triples included)."""
    torch.manual_seed(seed)
    images, truth = scene_batch(seed + 1000, 0, pool)
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
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--test", type=int, default=4000, help="fresh scenes to measure accuracy on")
    args = parser.parse_args(argv)

    model = train_readout(steps=args.steps, log_every=250)
    write_safetensors({k: v.half() for k, v in model.state_dict().items()}, args.out)
    images, truth = scene_batch(seed=12345, start=0, count=args.test)
    result = accuracy(load_readout(args.out), images, truth)
    print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
