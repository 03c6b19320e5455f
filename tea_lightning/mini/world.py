"""The world's model: a small text-to-image model trained by tea-lightning itself on the scenes world.

It is a stock `StableDiffusionPipeline` at toy size, in pixel space: its `AutoencoderKL` has one block (scale
factor 1, three latent channels) whose weights are set by hand so that decoding an encoding returns the image to
about 1e-4, so the UNet denoises the 32-pixel RGB scenes themselves. The UNet and the CLIP text encoder were trained
from scratch on `tea_lightning.mini.scenes` with `configs/mini_world.yaml` (recipe and accuracy:
docs/mini_world.md), and ship as package data (`tea_lightning/models/mini/`, fp16 safetensors, with the tokenizer
they were trained with). `pretrained: mini` loads that folder like any other (`tea_lightning.components`).

    python -m tea_lightning.mini.world new runs/mini-untrained     # the architecture, seeded random weights
    python -m tea_lightning.mini.world ship RUN/exports/final      # copy a trained world into package data (fp16)
    python -m tea_lightning.mini.world evaluate [FOLDER]           # how often the world draws what it is asked
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tea_lightning.components import BUILT_IN_FOLDERS, MINI, load_pipeline
from tea_lightning.mini.readout import load_readout, read
from tea_lightning.mini.scenes import COLOUR_NAMES, CONCEPT, HELD_OUT, SHAPES
from tea_lightning.seeding import sample_seed
from tea_lightning.tiny import MAX_LENGTH, tiny_tokenizer

RESOLUTION = 32
HIDDEN = 64
SHIPPED = BUILT_IN_FOLDERS[MINI]  # the diffusers folder `pretrained: mini` loads

# The identity VAE: a signed copy of the image and a constant pair keep every GroupNorm's statistics fixed.
_SHIFT, _SPREAD = 20.0, 100.0


def _identity_in(conv: torch.nn.Conv2d) -> None:
    """conv(3 → 8): channels 0-2 = x, 3-5 = -x, 6 = +SPREAD, 7 = -SPREAD (centre tap only)."""
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(3):
        conv.weight[c, c, 1, 1] = 1.0
        conv.weight[c + 3, c, 1, 1] = -1.0
    conv.bias[6], conv.bias[7] = _SPREAD, -_SPREAD


def _identity_norm(norm: torch.nn.GroupNorm) -> None:
    """GroupNorm(1 group, 8 channels): its mean is 0 and its std SPREAD/2 (to 1.5e-4 for |x| <= 1), so scaling by
    SPREAD/2 undoes it; the shift keeps the SiLU that follows in its linear range."""
    norm.weight.zero_()
    norm.bias.zero_()
    norm.weight[:6] = _SPREAD / 2
    norm.bias[:6] = _SHIFT


def _identity_out(conv: torch.nn.Conv2d, offset: int = 0, log_variance: float | None = None) -> None:
    """conv(8 → n): output c = (ch_c - ch_{c+3}) / 2 = x_c (the shift cancels); extra outputs hold `log_variance`."""
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(3):
        conv.weight[offset + c, c, 1, 1] = 0.5
        conv.weight[offset + c, c + 3, 1, 1] = -0.5
    if log_variance is not None:
        conv.bias[3:] = log_variance


def _silence_resnets(module: torch.nn.Module) -> None:
    for name, child in module.named_modules():
        if name.endswith("conv2") and isinstance(child, torch.nn.Conv2d):  # the residual branch's last conv
            child.weight.zero_()
            child.bias.zero_()


def identity_vae() -> AutoencoderKL:
    """A factor-1 `AutoencoderKL` whose latents are the pixels: `decode(encode(x).mode()) ≈ x` for x in [-1, 1].

    Every residual branch outputs zero, the mid-block has no attention, and each GroupNorm sees a signed copy of the
    input plus a large constant pair, so its statistics barely depend on the image. The posterior's std is e^-15.
    """
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=3, layers_per_block=1, block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=1,
        sample_size=RESOLUTION, scaling_factor=1.0, mid_block_add_attention=False, use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():
        _silence_resnets(vae)
        for coder in (vae.encoder, vae.decoder):
            _identity_in(coder.conv_in)
            _identity_norm(coder.conv_norm_out)
        _identity_out(vae.encoder.conv_out, log_variance=-30.0)
        _identity_out(vae.decoder.conv_out)
    return vae


def mini_unet() -> UNet2DConditionModel:
    """The world's denoiser: 32 px RGB, three levels (32, 16, 8 px), attending to the text at 8 px and in the middle,
    and conditioned on the pooled text at every level."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 48, 96),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=16, norm_num_groups=8,
        # The text also reaches every resolution through the timestep embedding (attention-pooled, as in
        # Kandinsky/unCLIP's "text" addition embedding): global attributes are learned in far fewer steps.
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )


def mini_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=HIDDEN, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def mini_scheduler() -> DPMSolverMultistepScheduler:
    """Pixel-space DDPM noise (linear betas 1e-4 to 0.02 over 1000 steps), sampled with DPM-Solver++. The UNet
    predicts the clean image (x0, `prediction_type="sample"`): on flat-coloured scenes it learned recognisable
    shapes and colours in far fewer steps than epsilon or v-prediction (docs/mini_world.md)."""
    return DPMSolverMultistepScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                       num_train_timesteps=1000, prediction_type="sample",
                                       steps_offset=1, timestep_spacing="trailing")


def _assemble(tokenizer, text_encoder, unet) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=identity_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=mini_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def untrained_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The mini architecture with seeded random UNet and text encoder, and today's tiny tokenizer: the starting
    point of `configs/mini_world.yaml` (`python -m tea_lightning.mini.world new FOLDER` writes it)."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder, unet = mini_text_encoder(tokenizer), mini_unet()
    return _assemble(tokenizer, text_encoder, unet)


def ship(export_folder: str | Path, folder: Path = SHIPPED) -> Path:
    """Copy a trained world (a `FullFineTune` export folder, a diffusers pipeline) into package data as fp16."""
    pipe = StableDiffusionPipeline.from_pretrained(Path(export_folder), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.to(torch.float16)
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # package data: readable by every user of an install
    return folder


def sample(pipe: StableDiffusionPipeline, prompts: list[str], seed: int = 0, steps: int = 20,
           guidance: float = 4.0, batch_size: int = 32) -> torch.Tensor:
    """Images `[N, 3, H, W]` in [-1, 1] for `prompts`, image i seeded by (seed, i) so any subset is reproducible."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(sample_seed(seed, start + i)) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   output_type="pt").images  # [b, 3, H, W] in [0, 1]
        images.append(out * 2 - 1)
    return torch.cat(images)


def held_out_prompts() -> list[tuple[str, str | None, str | None, str | None]]:
    """(prompt, colour, shape, background) for every held-out triple, in full caption form."""
    return [(f"a {c} {s} on a {b} background", c, s, b) for c, s, b in sorted(HELD_OUT)]


def evaluation_cases(seed: int = 0) -> dict[str, list[tuple[str, str | None, str | None, str | None]]]:
    """Prompt sets the world's accuracy is reported on: held-out triples, seen triples, partial prompts (colour or
    background left out) and reordered ones ("a BG background with a COLOUR SHAPE")."""
    rng = np.random.default_rng(seed)
    seen = [(c, s, b) for s in SHAPES for c in COLOUR_NAMES for b in COLOUR_NAMES
            if b != c and (c, s) != CONCEPT and (c, s, b) not in HELD_OUT]
    picks = [seen[i] for i in rng.choice(len(seen), size=32, replace=False)]
    return {
        "held-out triples": held_out_prompts(),
        "seen triples": [(f"a {c} {s} on a {b} background", c, s, b) for c, s, b in picks[:16]],
        "colour left out": [(f"a {s} on a {b} background", None, s, b) for _, s, b in picks[16:24]],
        "background left out": [(f"a {c} {s}", c, s, None) for c, s, _ in picks[24:]],
        "reordered": [(f"a {b} background with a {c} {s}", c, s, b) for c, s, b in picks[:8]],
    }


def world_accuracy(pipe: StableDiffusionPipeline, cases: list[tuple[str, str | None, str | None, str | None]],
                   images_per_prompt: int = 4, seed: int = 0, steps: int = 20, guidance: float = 4.0,
                   readout=None) -> dict[str, float]:
    """How often the world draws what `cases` ask for, by the readout: the share of images holding an object of
    the requested shape, of the requested colour, both on one object, and the requested background (None: not
    asked, not counted)."""
    readout = readout or load_readout()
    prompts = [case[0] for case in cases for _ in range(images_per_prompt)]
    readings = read(readout, sample(pipe, prompts, seed=seed, steps=steps, guidance=guidance))
    hits = {"shape": [], "colour": [], "object": [], "background": []}
    for (_, colour, shape, background), reading in zip(
            [case for case in cases for _ in range(images_per_prompt)], readings, strict=True):
        if shape is not None:
            hits["shape"].append(reading.has(shape=shape))
        if colour is not None:
            hits["colour"].append(reading.has(colour=colour))
        if shape is not None and colour is not None:
            hits["object"].append(reading.has(colour, shape))
        if background is not None:
            hits["background"].append(reading.background == background)
    return {key: sum(v) / len(v) for key, v in hits.items() if v}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The mini world's model: make, ship or evaluate it.")
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="write the untrained architecture (seeded) as a diffusers folder")
    new.add_argument("folder", type=Path)
    new.add_argument("--seed", type=int, default=0)
    ship_ = commands.add_parser("ship", help="copy a trained world (an export folder) into package data as fp16")
    ship_.add_argument("export", type=Path)
    evaluate = commands.add_parser("evaluate", help="how often the world draws what its prompts ask for")
    evaluate.add_argument("folder", nargs="?", default=MINI, help="a world folder (default: the shipped mini)")
    args = parser.parse_args(argv)
    if args.command == "new":
        untrained_pipeline(args.seed).save_pretrained(args.folder, safe_serialization=True)
        print(args.folder)
    elif args.command == "ship":
        print(ship(args.export))
    else:
        world = load_pipeline(args.folder)
        for name, cases in evaluation_cases().items():
            print(name, {k: round(v, 3) for k, v in world_accuracy(world, cases, images_per_prompt=4).items()},
                  flush=True)


if __name__ == "__main__":
    main()
