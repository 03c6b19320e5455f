"""The world's own images, labelled by a person: the set the readout is checked against.

A readout that scores 99 % on the scene generator's renders can still misread the images the world's model draws
(its stars have fatter, uneven arms; its circles wobble). `labelled/` holds images the model drew and
`labelled/labels.csv`, written by a person looking at each image enlarged, in shuffled order and without the
prompt or the readout's answer in view (issue 13):

- batch 1 (108 images, `w-*` and `ti*-*`): plain prompts, and Textual Inversion images of the pink star at a mild,
  a hot and a too-hot setting, without TEA, with TEA and pulled all the way to `star` (`make` draws them again);
  labelled before any readout was run on them, then used once to choose between two readouts (docs/mini_world.md);
- batch 2 (48 images, `x-*`): drawn at random from the full experiment's images (all three methods, both prompt
  forms, TEA sweep settings), labelled after the shipped readout was final: a held-out check.

The readout's agreement with those labels, per attribute, is the number that says whether its readings can be
trusted:

    python -m tea_lightning.mini.labelled                 # agreement of the shipped readout, per attribute and batch
    python -m tea_lightning.mini.labelled make runs/labelled   # draw batch 1 again (three TI runs, ~6 CPU-min)

`labels.csv` columns: `file`, `source`, `prompt`, `background` (the colour seen, `?` when unclear), `objects` (each
object seen as "colour shape", `;`-separated; `?` for a colour or shape that cannot be told, `blob` for a shape
that is none of the four), `concept` (`yes`, `no` or `unclear`: is a pink star there?), `note` and `batch`.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tea_lightning.mini.readout import Reading, load_readout, read_files
from tea_lightning.mini.scenes import COLOUR_NAMES, CONCEPT, SHAPES

FOLDER = Path(__file__).parent / "labelled"
LABELS = FOLDER / "labels.csv"
UNCLEAR = "?"
ATTRIBUTES = ("background", "context", "concept", "colours", "shapes", "objects")


@dataclass(frozen=True)
class Label:
    """What a person saw in one image."""

    file: str
    source: str
    prompt: str
    background: str  # a colour name or "?"
    objects: tuple[tuple[str, str], ...]  # (colour or "?", shape, "blob" or "?")
    concept: str  # yes | no | unclear
    note: str = ""
    batch: str = "1"

    @property
    def requested_background(self) -> str | None:
        """The background the prompt asks for, if it names one."""
        return requested(self.prompt)[0]


def requested(context: str) -> tuple[str | None, tuple[str | None, str] | None]:
    """What a prompt's context asks for: (background colour, (colour, shape) of a second object), None if not."""
    words = context.replace("{}", " ").split()
    background = words[words.index("background") - 1] if "background" in words else None
    other = None
    for i, word in enumerate(words):
        if word in SHAPES:
            colour = words[i - 1] if i > 0 and words[i - 1] in COLOUR_NAMES else None
            other = (colour, word)
    return background, other


def _objects(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        colour, shape = item.split()
        if colour not in (*COLOUR_NAMES, UNCLEAR) or shape not in (*SHAPES, "blob", UNCLEAR):
            raise ValueError(f"object {item!r} in {LABELS} is not 'colour shape' (colours {COLOUR_NAMES}, shapes "
                             f"{SHAPES}, blob or ?).")
        pairs.append((colour, shape))
    return tuple(pairs)


def load_labels(path: Path = LABELS) -> list[Label]:
    """The labelled images' rows, checked."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = []
    for row in rows:
        if row["background"] not in (*COLOUR_NAMES, UNCLEAR) or row["concept"] not in ("yes", "no", "unclear"):
            raise ValueError(f"row {row['file']!r} of {path}: background {row['background']!r} or concept "
                             f"{row['concept']!r} is not a colour/? and yes/no/unclear.")
        labels.append(Label(row["file"], row["source"], row["prompt"], row["background"], _objects(row["objects"]),
                            row["concept"], row.get("note", ""), row.get("batch", "1")))
    return labels


def compare(label: Label, reading: Reading) -> dict[str, bool]:
    """Whether the reading agrees with the label, for each attribute the label decides (undecided ones are left
    out): the background; the context (the requested background there or not); the concept (a pink star or not);
    the set of object colours, of object shapes, and of (colour, shape) objects."""
    out = {}
    if label.background != UNCLEAR:
        out["background"] = reading.background == label.background
        wanted = label.requested_background
        if wanted is not None:
            out["context"] = (reading.background == wanted) == (label.background == wanted)
    if label.concept != "unclear":
        out["concept"] = reading.has(*CONCEPT) == (label.concept == "yes")
    colours = {c for c, _ in label.objects}
    shapes = {s for _, s in label.objects if s != "blob"}  # a blob is no shape the readout knows
    if UNCLEAR not in colours:
        out["colours"] = set(reading.colours) == colours
    if UNCLEAR not in shapes:
        out["shapes"] = set(reading.shapes) == shapes
        if UNCLEAR not in colours:
            out["objects"] = set(reading.objects) == {(c, s) for c, s in label.objects if s != "blob"}
    return out


def agreement(readout=None, path: Path = LABELS) -> dict[str, dict[str, tuple[int, int]]]:
    """{"all" or "batch B": {attribute: (images where the readout agrees with the person, images the person
    decided)}}: over every labelled image, and over each batch's. The images are read once."""
    readout = readout or load_readout()
    labels = load_labels(path)
    groups = ["all"] + [f"batch {b}" for b in sorted({label.batch for label in labels})]
    counts = {group: {name: [0, 0] for name in ATTRIBUTES} for group in groups}
    readings = read_files(readout, [Path(path).parent / label.file for label in labels])
    for label, reading in zip(labels, readings, strict=True):
        for name, agrees in compare(label, reading).items():
            for group in ("all", f"batch {label.batch}"):
                counts[group][name][0] += agrees
                counts[group][name][1] += 1
    return {group: {name: (a, n) for name, (a, n) in per.items()} for group, per in counts.items()}


# How the images were drawn: world samples of these prompts, and three Textual Inversion runs of the pink star
# (training seed, learning rate, steps, images per prompt and setting): mild, hot (the keyword's norm ~7.5x that of
# `star`, stars degrading to blobs), and too hot (the concept itself lost).
WORLD_PROMPTS = (
    "a black circle on a gray background", "a blue square on a pink background",
    "a green triangle on a blue background",
    "a white star on a black background", "a yellow star on a red background", "a red star on a green background",
    "a gray star on a white background", "a black star", "a pink circle on a yellow background", "a pink triangle",
    "a star on a blue background", "a circle on a white background", "a square on a gray background",
    "a green background with a red circle", "a yellow background with a blue star", "a white background with a square",
    "a red circle next to a blue square", "a small yellow triangle next to a green square on a black background",
    "a white star and a pink circle on a blue background", "a blue star next to a red circle on a white background",
    "a large pink square", "a green star and a white triangle", "a yellow circle on a black background",
    "a red triangle on a white background",
)
TI_RUNS = ((1, 5e-3, 600, 1), (2, 2e-2, 900, 2), (3, 5e-2, 900, 1))
TI_PROMPTS = ("a {} on a red background", "a {} on a blue background", "a {} on a white background",
              "a {} on a green background", "a yellow background with a {}", "a {} on a black background", "a {}")
TI_SETTINGS = ((0.2, 0.5), (1.0, 1.0))  # besides the baseline: TEA at the paper's factors, and all the way to `star`


def make(work: Path, out: Path = FOLDER, steps: int = 15, guidance: float = 4.0) -> list[Path]:
    """Draw the set's images again into `out` (`w-NNN.png`, `tiS-TAG-pNNN-iNNN.png`; labels are not touched)."""
    import shutil

    from tea_lightning.components import load_pipeline
    from tea_lightning.inference import generate
    from tea_lightning.mini.concept import train
    from tea_lightning.mini.world import sample

    out.mkdir(parents=True, exist_ok=True)
    written = []
    images = sample(load_pipeline("mini"), list(WORLD_PROMPTS), seed=7, steps=steps, guidance=guidance)
    for i, image in enumerate(images):
        written.append(out / f"w-{i:03d}.png")
        Image.fromarray(((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(written[-1])
    for seed, lr, train_steps, per_prompt in TI_RUNS:
        exports = train("textual_inversion", work / f"ti{seed}", lr=lr, steps=train_steps, every=train_steps,
                        seed=seed)
        for (rho, alpha), compare in zip(TI_SETTINGS, (True, False), strict=True):
            records = generate(exports / "final", list(TI_PROMPTS), work / f"images{seed}-rho{rho:g}",
                               rhos=(rho,), alphas=(alpha,), compare=compare, num_images=per_prompt, seed=seed,
                               batch_size=32, steps=steps, guidance=guidance, device="cpu", progress=False)
            for record in records:
                written.append(out / f"ti{seed}-{record.tag}-{Path(record.path).name}")
                shutil.copy(record.path, written[-1])
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The readout against a person's labels of the world's images.")
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("check", help="agreement per attribute (the default)")
    check.add_argument("--readout", type=Path, default=None, help="readout weights (default: the shipped ones)")
    remake = commands.add_parser("make", help="draw the images again (labels are not touched)")
    remake.add_argument("work", type=Path, help="folder for the training runs and their images")
    remake.add_argument("--out", type=Path, default=FOLDER)
    args = parser.parse_args(argv)
    if args.command == "make":
        print(len(make(args.work, args.out)), "images in", args.out)
        return
    weights = getattr(args, "readout", None)
    readout = load_readout(weights) if weights else load_readout()
    results = agreement(readout)
    print(f"{'attribute':<11} " + " ".join(f"{name:>16}" for name in results))
    for attribute in ATTRIBUTES:
        cells = [f"{a}/{n} {100 * a / max(n, 1):5.1f}%" for a, n in (r[attribute] for r in results.values())]
        print(f"{attribute:<11} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
