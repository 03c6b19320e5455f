"""Class images for prior preservation: generated once with the base model, kept on disk and reused.

A class folder is filled up to the number of images asked for: only the missing ones are generated (in batches,
with a progress bar, each written atomically), so an interrupted generation resumes where it stopped and the next
run generates nothing. Image `class-NNNNN.png` always comes from seed (seed, N), so a folder filled in several
sittings holds the same images as one filled at once. Images of your own in the folder count and are never touched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from tea_lightning.export import file_stem, write_png
from tea_lightning.images import image_paths
from tea_lightning.seeding import sample_seed


def default_class_dir(root: str | Path, pretrained: str, prompt: str) -> Path:
    """`<root>/class_images/<model>/<prompt>`: one folder per base model and class prompt, found again next run."""
    return Path(root) / "class_images" / file_stem(pretrained) / file_stem(prompt)


def class_image_name(index: int) -> str:
    return f"class-{index:05d}.png"


def missing_indices(folder: Path, count: int) -> list[int]:
    """The images N to generate so `folder` holds `count` images: the first N whose `class-NNNNN.png` is free."""
    existing = image_paths(folder)
    names = {p.name for p in existing}
    needed, index, missing = count - len(existing), 0, []
    while len(missing) < needed:
        if class_image_name(index) not in names:
            missing.append(index)
        index += 1
    return missing


def ensure_class_images(folder: str | Path, prompt: str, count: int, *, pretrained: str, resolution: int,
                        batch_size: int = 4, steps: int = 50, guidance: float = 7.5, seed: int = 0,
                        device: torch.device | str = "cpu") -> int:
    """Fill `folder` up to `count` images of `prompt` made by the base model `pretrained`; return how many were made.

    Args:
        folder: The class folder (created when missing).
        prompt: The class prompt, finished ("a photo of a dog").
        count: Images the folder should hold.
        pretrained: The base model (hub id, local folder or ``tiny``), loaded only when something is missing.
        resolution: Height and width of the generated images.
        batch_size: Images per pipeline call.
        steps: Denoising steps per image.
        guidance: Classifier-free guidance scale.
        seed: Image `class-NNNNN.png` is drawn from seed (seed, N).
        device: Where the pipeline runs (fp16 on CUDA).
    """
    folder = Path(folder)
    missing = missing_indices(folder, count)
    if not missing:
        return 0
    from tea_lightning.components import load_pipeline

    device = torch.device(device)
    pipe = load_pipeline(pretrained).to(device)
    if device.type == "cuda":
        pipe.to(torch.float16)
    pipe.set_progress_bar_config(disable=True)
    with tqdm(total=len(missing), desc=f"Generating class images {prompt!r}", unit="image") as bar:
        for start in range(0, len(missing), batch_size):
            indices = missing[start:start + batch_size]
            generators = [torch.Generator(device).manual_seed(sample_seed(seed, i)) for i in indices]
            images = pipe([prompt] * len(indices), height=resolution, width=resolution, num_inference_steps=steps,
                          guidance_scale=guidance, generator=generators).images
            for index, image in zip(indices, images, strict=True):
                write_png(image, folder / class_image_name(index))
            bar.update(len(indices))
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return len(missing)
