"""The models the benchmark trains: the built-in `tiny`, or Stable Diffusion 1.5's architecture with random weights.

`sd15` writes SD 1.5's public configs out in code (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, PNDM
scheduler) and fills them with seeded random weights: nothing downloads, and the FLOPs, parameter counts and
kernel shapes are those of `stable-diffusion-v1-5/stable-diffusion-v1-5`. Its tokenizer is the tiny CLIP-style BPE
padded to CLIP's 49,408 ids (start and end tokens last, as in CLIP), so the reference Textual Inversion step
optimises a full-size 49,408 × 768 token-embedding matrix exactly as the reference scripts do.

Both sides of the benchmark load the model from one saved diffusers folder, through the path a hub id takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tea_lightning.tiny import END, START, _vocab_and_merges, tiny_pipeline

ARCHS = ("tiny", "sd15")
CLIP_VOCAB = 49_408


def sd15_tokenizer() -> CLIPTokenizer:
    """The tiny BPE padded with unreachable filler tokens to CLIP's 49,408 ids; start/end are ids 49406/49407."""
    vocab, merges = _vocab_and_merges()
    tokens = [t for t in vocab if t not in (START, END)]
    tokens += [f"<filler-{i}>" for i in range(CLIP_VOCAB - 2 - len(tokens))] + [START, END]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges), model_max_length=77)


def sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.5's architecture (configs of stable-diffusion-v1-5, written out) with seeded random weights."""
    tokenizer = sd15_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
            center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
            mid_block_scale_factor=1,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        ))
    # The tiny pipeline's scheduler is SD 1.x's PNDM schedule; everything else is replaced.
    parts = {**tiny_pipeline().components, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
             "unet": unet}
    return StableDiffusionPipeline(**parts, requires_safety_checker=False)


def model_folder(arch: str, cache_dir: Path) -> str:
    """A `pretrained` value for `arch`: ``tiny`` itself, or a diffusers folder of the random SD 1.5 architecture
    saved once under `cache_dir` (reused by later runs; about 4.3 GB in fp32)."""
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is unknown; choose one of {ARCHS}.")
    if arch == "tiny":
        return "tiny"
    folder = Path(cache_dir).expanduser() / "sd15-random-seed0"
    marker = folder / "complete.json"
    if not marker.exists():
        sd15_pipeline().save_pretrained(folder)
        marker.write_text(json.dumps({"arch": "sd15", "seed": 0}))
    return str(folder)
