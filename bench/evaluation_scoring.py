"""Scoring throughput: batched vs one image at a time, side by side, through the evaluation's own encoders.

    .venv/bin/python bench/evaluation_scoring.py --size base --images 48 --batch_size 32
    .venv/bin/python bench/evaluation_scoring.py --size large --device cuda   # the paper's CLIP ViT-L/14 + DINOv2-base

The models have the published architectures (CLIP ViT-B/32 + DINOv2-small for `base`, CLIP ViT-L/14 +
DINOv2-base for `large`) with random weights, built from their configs and saved to a temporary folder, so the
benchmark needs no download; speed does not depend on the weights. Images are 512×512 PNGs (SD 1.5's size), decoded
and preprocessed inside the timed loop, as in a real evaluation. One image at a time is how the reference scripts
called torchmetrics' CLIPScore. Three ways, alternating: one image at a time (one thread), batched (one thread),
batched with the default preprocessing threads. Prints a markdown table row for bench/evaluation_scoring.md
(images/s, ratio to one at a time).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tea_lightning import scoring

SIZES = {
    "base": dict(clip=dict(text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                     num_attention_heads=8),
                           vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, patch_size=32), projection_dim=512),
                 dino=dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14)),
    "large": dict(clip=dict(text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12),
                            vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                        num_attention_heads=16, patch_size=14), projection_dim=768),
                  dino=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14)),
}


def build_models(size: str, root: Path) -> tuple[Path, Path]:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from tea_lightning.tiny import tiny_tokenizer

    spec = SIZES[size]
    tokenizer = tiny_tokenizer()
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **spec["clip"]["text"]),
        vision_config=dict(image_size=224, **spec["clip"]["vision"]), projection_dim=spec["clip"]["projection_dim"]))
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer).save_pretrained(root / "clip")
    Dinov2Model(Dinov2Config(image_size=518, **spec["dino"])).save_pretrained(root / "dino")
    dino_processor = BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    dino_processor.save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def throughput(paths: list[Path], clip, dino, batch_size: int, workers: int | None, device: torch.device) -> float:
    scoring.encode_images(paths[:batch_size], clip, dino, batch_size, workers)  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    scoring.encode_images(paths, clip, dino, batch_size, workers)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each is reported")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clip_dir, dino_dir = build_models(args.size, root)
        clip = scoring.ClipEncoder(scoring.clip_source(str(clip_dir)), device)
        dino = scoring.DinoEncoder(scoring.dino_source(str(dino_dir)), "mean", device)
        paths = []
        for i in range(args.images):
            pixels = np.random.default_rng(i).integers(0, 256, (512, 512, 3), dtype=np.uint8)
            paths.append(root / f"{i:03d}.png")
            Image.fromarray(pixels).save(paths[-1])
        ways = {"one at a time": (1, 1), f"batch {args.batch_size}": (args.batch_size, 1),
                f"batch {args.batch_size} + threads": (args.batch_size, None)}
        best = dict.fromkeys(ways, 0.0)
        for _ in range(args.rounds):  # alternate, so drifting machine load hits every way alike
            for name, (batch_size, workers) in ways.items():
                best[name] = max(best[name], throughput(paths, clip, dino, batch_size, workers, device))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    base = best["one at a time"]
    cells = " | ".join(f"{v:.2f} ({v / base:.2f}×)" for v in best.values())
    print(f"| {time.strftime('%Y-%m-%d')} | {commit} | {machine} | {args.size} | {args.images} | {cells} |")


if __name__ == "__main__":
    main()
