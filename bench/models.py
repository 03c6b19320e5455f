"""The models the benchmark trains: the built-in `tiny` and `tiny-sdxl`, or the architectures of Stable Diffusion 1.5
and SDXL with random weights.

`sd15` writes SD 1.5's public configs out in code (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, PNDM
scheduler) and fills them with seeded random weights: nothing downloads, and the FLOPs, parameter counts and
kernel shapes are those of `stable-diffusion-v1-5/stable-diffusion-v1-5`. Its tokenizer is the tiny CLIP-style BPE
padded to CLIP's 49,408 ids (start and end tokens last, as in CLIP), so the reference Textual Inversion step
optimises a full-size 49,408 × 768 token-embedding matrix exactly as the reference scripts do. `sdxl` does the same
for `stabilityai/stable-diffusion-xl-base-1.0` (its UNet with 2.6 B parameters, CLIP ViT-L and OpenCLIP bigG with its
projection, the SDXL VAE, Euler scheduler); it is saved in fp16 (5 GB instead of 10), loaded in fp32.

Both sides of the benchmark load the model from one saved diffusers folder, through the path a hub id takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tea_lightning.tiny import END, START, TINY, TINY_SDXL, _vocab_and_merges, tiny_pipeline

ARCHS = (TINY, TINY_SDXL, "sd15", "sdxl")
CLIP_VOCAB = 49_408


def sd15_tokenizer() -> CLIPTokenizer:
    """The tiny BPE padded with unreachable filler tokens to CLIP's 49,408 ids; start/end are ids 49406/49407."""
    vocab, merges = _vocab_and_merges()
    tokens = [t for t in vocab if t not in (START, END)]
    tokens += [f"<filler-{i}>" for i in range(CLIP_VOCAB - 2 - len(tokens))] + [START, END]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges), model_max_length=77)


# SD 1.5's text encoder, and SDXL's first one: CLIP ViT-L/14's text tower.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
              hidden_act="quick_gelu")


def _clip(config: dict, model: type = CLIPTextModel) -> CLIPTextModel:
    return model(CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=77, layer_norm_eps=1e-5,
                                bos_token_id=0, eos_token_id=2, pad_token_id=1, **config))


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
        text_encoder = _clip(CLIP_L)
    # The tiny pipeline's scheduler is SD 1.x's PNDM schedule; everything else is replaced.
    parts = {**tiny_pipeline().components, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
             "unet": unet}
    return StableDiffusionPipeline(**parts, requires_safety_checker=False)


def sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL base 1.0's architecture (its public configs, written out) with seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
            flip_sin_to_cos=True, freq_shift=0,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu", scaling_factor=0.13025,
            force_upcast=True,
        )
        text_encoder = _clip(CLIP_L)
        text_encoder_2 = _clip(dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                    num_attention_heads=20, projection_dim=1280, hidden_act="gelu"),
                               CLIPTextModelWithProjection)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=sd15_tokenizer(), tokenizer_2=sd15_tokenizer(), unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)


def model_folder(arch: str, cache_dir: Path) -> str:
    """A `pretrained` value for `arch`: ``tiny`` or ``tiny-sdxl`` itself, or a diffusers folder of the random SD 1.5
    or SDXL architecture saved once under `cache_dir` (reused by later runs; about 4.3 GB for sd15 in fp32, 7 GB for
    sdxl in fp16)."""
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is unknown; choose one of {ARCHS}.")
    if arch in (TINY, TINY_SDXL):
        return arch
    folder = Path(cache_dir).expanduser() / f"{arch}-random-seed0"
    marker = folder / "complete.json"
    if not marker.exists():
        if arch == "sd15":
            sd15_pipeline().save_pretrained(folder)
        else:  # fp16 on disk: half the size and the save time; loaded back in fp32
            sdxl_pipeline().to(torch.float16).save_pretrained(folder)
        marker.write_text(json.dumps({"arch": arch, "seed": 0}))
    return str(folder)
