"""What TEA costs at inference, and what batching buys: ratios measured side by side in one run.

    python bench/tea_cost.py                  # tiny model (any machine, offline)
    python bench/tea_cost.py --model sd15     # SD 1.5 architecture built from config (random weights, no download):
                                              # images on a GPU; on a CPU only the text side (images take minutes)

1. TEA's own cost against generating one image (50 DPM-Solver steps, guidance 7): token level (adjust the learned
   rows, spliced in while encoding) and prompt level (encode the target prompt too, pair positions, adjust 77 rows).
2. Batched generation (one pipeline call for N images) against one image per call, per image.
Each measurement is the median of interleaved repeats, so load on a shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import date

import torch

from tea_lightning.checkpoints import Concept
from tea_lightning.inference import Setting, encode, make_scheduler, prompt_embeddings, render
from tea_lightning.personalized import LearnedRows, Personalized
from tea_lightning.prompting import parse_prompt
from tea_lightning.tea import adjust
from tea_lightning.tiny import tiny_pipeline


def median_seconds(runs: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median wall time of each callable; the callables take turns so drifting load affects all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def personalized(pipe, device) -> Personalized:
    """The pipeline with one learned token `<v>` (random row) whose concept word is `man`."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    tokenizer.add_tokens(["<v>"])
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = encoder.get_input_embeddings().weight
    first = tokenizer.convert_tokens_to_ids("<v>")
    man = tokenizer("man", add_special_tokens=False).input_ids[0]
    vectors = 3 * torch.randn(1, table.shape[1])
    with torch.no_grad():
        table[first] = vectors[0].to(table.dtype)
    pipe.to(device)
    return Personalized(pipe, [Concept("<v>", "man")], [LearnedRows(first, vectors, table[man].float().cpu()[None])],
                        "bench", "bench")


def tea_cost(model: Personalized, steps: int, resolution: int, repeats: int, sync,
             with_image: bool = True) -> list[tuple[str, float]]:
    pipe = model.pipe
    prompt = [parse_prompt("a photo of <v> wearing glasses and playing guitar", model.concepts)]
    negative = encode(pipe, [""])
    rows = model.rows[0]
    tea = Setting(0.2, 0.5)

    def image():
        embeds = prompt_embeddings(model, prompt, Setting())
        render(pipe, embeds, negative, [0], steps=steps, guidance=7.0, resolution=resolution)

    with torch.no_grad():
        t = median_seconds({
            "adjust learned rows": lambda: adjust(rows.vectors, rows.targets, 0.2, 0.5),
            "encode, baseline": lambda: prompt_embeddings(model, prompt, Setting()),
            "encode, token-level TEA": lambda: prompt_embeddings(model, prompt, tea, level="token"),
            "encode, prompt-level TEA": lambda: prompt_embeddings(model, prompt, tea, level="prompt"),
        }, repeats * 20, sync)
        if with_image:
            t["one image"] = median_seconds({"one image": image}, repeats, sync)["one image"]
    token = t["encode, token-level TEA"] - t["encode, baseline"]
    prompt_level = t["encode, prompt-level TEA"] - t["encode, baseline"]
    rows = [("adjust() of the learned row", t["adjust learned rows"]),
            ("token-level TEA: extra encode time", token),
            ("prompt-level TEA: extra encode time (target prompt + pairing + adjust)", prompt_level),
            ("encode one prompt, baseline", t["encode, baseline"])]
    if with_image:
        rows.append((f"one image ({steps} steps, {resolution} px, guidance 7)", t["one image"]))
    return rows


def batching(pipe, n: int, steps: int, resolution: int, repeats: int, sync) -> tuple[float, float]:
    embeds = encode(pipe, ["a photo of a man wearing glasses"] * n)
    negative = encode(pipe, [""])
    with torch.no_grad():
        t = median_seconds({
            "batched": lambda: render(pipe, embeds, negative, list(range(n)), steps=steps, guidance=7.0,
                                      resolution=resolution),
            "one per call": lambda: [render(pipe, embeds.select(slice(i, i + 1)), negative, [i], steps=steps,
                                            guidance=7.0, resolution=resolution) for i in range(n)],
        }, repeats, sync)
    return t["batched"] / n, t["one per call"] / n


def sd15_pipe():
    """SD 1.5's text encoder and UNet architectures with random weights (built from config: no download)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    small = tiny_pipeline()
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)  # SD 1.5 defaults
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(small.tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=small.tokenizer, unet=unet,
                                   scheduler=small.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "sd15", "both"], default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {date.today()}, commit {commit}, {platform.machine()}, torch {torch.__version__}, {where}")

    cases = [("tiny", tiny_pipeline, 64), ("SD 1.5 architecture", sd15_pipe, 512)]
    cases = cases[:1] if args.model == "tiny" else cases[1:] if args.model == "sd15" else cases
    for name, make, resolution in cases:
        pipe = make()
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe.scheduler = make_scheduler("dpm", pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        model = personalized(pipe, device)
        pipe.to(dtype=dtype)
        full = name == "tiny" or device.type == "cuda"  # SD 1.5 images on a CPU would take minutes each
        rows = tea_cost(model, 50, resolution, args.repeats, sync, with_image=full)
        whole = rows[-1][1]  # one image, or (CPU, SD 1.5) one baseline prompt encoding
        share = "share of one image" if full else "share of one prompt encoding"
        print(f"\n## TEA cost, {name} ({str(dtype).removeprefix('torch.')}, {device.type})\n")
        print(f"| what | time | {share} |\n|---|---|---|")
        for what, seconds in rows:
            print(f"| {what} | {seconds * 1e3:.3f} ms | {seconds / whole:.2e} |")
        if not full:
            continue
        n = 8
        batched, single = batching(pipe, n, 50, resolution, args.repeats, sync)
        print(f"\n## Batched vs one image per call, {name}, {n} images, 50 steps, {resolution} px\n")
        print("| way | time per image | ratio |\n|---|---|---|")
        print(f"| one pipeline call for {n} images | {batched * 1e3:.1f} ms | 1.00 |")
        print(f"| one image per call | {single * 1e3:.1f} ms | {single / batched:.2f} |")


if __name__ == "__main__":
    main()
