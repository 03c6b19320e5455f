"""Loading the parts of a Stable Diffusion model: a hub id, a local diffusers folder, or a built-in model.

`tiny` and `tiny-sdxl` (random, for tests) are built in code; `mini` (the world tea-lightning trained, see
`tea_lightning.mini`) is a diffusers folder shipped as package data, loaded through the very same `from_pretrained`
path as any local folder.

Two model families are supported and told apart by the model itself (its `model_index.json`): SD 1.x/2.x (one text
encoder, `StableDiffusionPipeline`) and SDXL (two text encoders, `StableDiffusionXLPipeline`). Everything above
this file treats "the text encoders" as a list (design decision 7); `tea_lightning.conditioning` says how each family
turns prompts into the UNet's conditioning.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from tea_lightning.tiny import TINY, TINY_SDXL, tiny_pipeline, tiny_sdxl_pipeline

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
SD, SDXL = "sd", "sdxl"
FAMILY_NAMES = {SD: "SD 1.x/2.x", SDXL: "SDXL"}
_PARTS = {SD: ("tokenizer", "text_encoder", "vae", "unet", "scheduler"),
          SDXL: ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet", "scheduler")}


@dataclass
class Components:
    """The parts training needs. `tokenizers` and `text_encoders` hold one entry for SD 1.x/2.x and two for SDXL
    (CLIP ViT-L, then OpenCLIP bigG with its projection). `noise_scheduler` is a DDPM scheduler with the model's own
    noise schedule and `prediction_type` (epsilon or v_prediction)."""

    family: str
    tokenizers: list[CLIPTokenizer]
    text_encoders: list[CLIPTextModel]
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """The first tokenizer (SD 1.x/2.x's only one)."""
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> CLIPTextModel:
        """The first text encoder (SD 1.x/2.x's only one)."""
        return self.text_encoders[0]


MINI = "mini"
# Models shipped as diffusers folders of package data, by name (fp16 safetensors, loaded in fp32).
BUILT_IN_FOLDERS = {MINI: Path(__file__).parent / "models" / "mini"}
BUILT_IN_CODE = {TINY: (SD, tiny_pipeline), TINY_SDXL: (SDXL, tiny_sdxl_pipeline)}


def _hint(pretrained: str) -> str:
    return (f"pretrained={pretrained!r}: give a hub id (e.g. {DEFAULT_MODEL!r} or {DEFAULT_SDXL_MODEL!r}, downloaded "
            "once beforehand when working offline), a local diffusers folder holding model_index.json, or a built-in "
            f"model: {MINI!r} (trained on synthetic scenes), {TINY!r} or {TINY_SDXL!r} (random, for tests)")


def family_of_index(index: dict, where: str) -> str:
    """The family a pipeline's `model_index.json` describes: SDXL when it names `StableDiffusionXL...` or holds a
    second text encoder, else SD 1.x/2.x. An SDXL refiner (no first text encoder) is refused: it only refines."""
    has_second = bool(index.get("text_encoder_2")) and index["text_encoder_2"][0] is not None
    if str(index.get("_class_name", "")).startswith("StableDiffusionXL") or has_second:
        if not index.get("text_encoder") or index["text_encoder"][0] is None:
            raise ValueError(f"{where} is an SDXL refiner (it has no first text encoder); tea-lightning personalises "
                             f"base models. Use e.g. {DEFAULT_SDXL_MODEL!r}.")
        return SDXL
    return SD


def resolve_pretrained(pretrained: str) -> str:
    """Validate `pretrained` before anything heavy happens; return it unchanged, or the local folder it names."""
    if pretrained in BUILT_IN_CODE:
        return pretrained
    if pretrained in BUILT_IN_FOLDERS:
        folder = BUILT_IN_FOLDERS[pretrained]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"The built-in model {pretrained!r} is missing from {str(folder)!r} (package "
                                    "data): reinstall tea-lightning with `pip install -e .` from a full checkout.")
        return str(folder)
    expanded = os.path.expanduser(pretrained)
    if os.path.isdir(expanded):
        index = Path(expanded) / "model_index.json"
        family = family_of_index(json.loads(index.read_text()), repr(expanded)) if index.is_file() else SD
        missing = [p for p in _PARTS[family] if not os.path.isdir(os.path.join(expanded, p))]
        if missing:
            raise FileNotFoundError(f"{expanded!r} is not a diffusers {FAMILY_NAMES[family]} folder: it lacks the "
                                    f"subfolders {missing}. {_hint(pretrained)}")
        return expanded
    looks_local = pretrained.startswith((".", "/", "~")) or os.path.exists(expanded) or pretrained.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"No such model folder: {expanded!r}. {_hint(pretrained)}")
    if _offline_and_not_cached(pretrained):
        raise _load_failure(pretrained, pretrained, None)
    return pretrained


def _offline_and_not_cached(repo_id: str) -> bool:
    """Offline (HF_HUB_OFFLINE=1) and no cached copy of the repo's model_index.json: it cannot load."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return False
    try:
        return not isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
    except ValueError:  # not a valid repo id: from_pretrained says why
        return False


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading pipeline components"/"Loading weights" bars: loading from disk takes seconds, and the console is
    kept for what a user must read (a download still shows huggingface_hub's own bar)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(module, module.is_progress_bar_enabled()) for module in (diffusers_logging, transformers_logging)]
    for module, _ in states:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in states:
            if enabled:
                module.enable_progress_bar()


def _load_failure(pretrained: str, source: str, error: OSError | None) -> FileNotFoundError:
    """A failed hub or folder load as one sentence: which model, why (offline and not cached, or the library's first
    line), and what to do."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        reason = "is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
        fix = (f"Download it once while online (huggingface-cli download {source}), or pass a local diffusers folder "
               f"or a built-in model ({MINI!r}, {TINY!r})")
    else:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = first.split(". ")[0]
        reason = f"could not be loaded ({first.rstrip('.')})"
        fix = (f"Check the hub id (e.g. {DEFAULT_MODEL!r}), your network and access token, or pass a local diffusers "
               f"folder or a built-in model ({MINI!r}, {TINY!r})")
    return FileNotFoundError(f"pretrained={pretrained!r} {reason}. {fix}.")


def model_family(pretrained: str, revision: str | None = None) -> str:
    """`SD` or `SDXL`, read from the model's `model_index.json` (a hub id fetches that one small file), so a
    checkpoint of the other family is refused before any weights load."""
    source = resolve_pretrained(pretrained)
    if source in BUILT_IN_CODE:
        return BUILT_IN_CODE[source][0]
    try:
        index = DiffusionPipeline.load_config(source, revision=revision)
    except (OSError, ValueError) as error:  # offline, not cached, gated, or a typo in a hub id
        raise _load_failure(pretrained, source, error) from error
    return family_of_index(dict(index), repr(source))


def load_pipeline(pretrained: str = DEFAULT_MODEL, revision: str | None = None):
    """The stock pipeline of `pretrained`'s family (`StableDiffusionPipeline` with the safety checker off, or
    `StableDiffusionXLPipeline` without watermark), in fp32 on the CPU."""
    source = resolve_pretrained(pretrained)
    if source in BUILT_IN_CODE:
        return BUILT_IN_CODE[source][1]()
    family = model_family(source, revision)
    try:
        with _quiet_loading():
            if family == SDXL:
                return StableDiffusionXLPipeline.from_pretrained(source, revision=revision, dtype=torch.float32,
                                                                 add_watermarker=False)
            return StableDiffusionPipeline.from_pretrained(
                source, revision=revision, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    except OSError as error:  # offline, not cached, gated, or a typo in a hub id
        raise _load_failure(pretrained, source, error) from error


def pipeline_class(family: str) -> type:
    """The stock pipeline class of `family`."""
    return StableDiffusionXLPipeline if family == SDXL else StableDiffusionPipeline


def pipeline_family(pipe) -> str:
    return SDXL if isinstance(pipe, StableDiffusionXLPipeline) else SD


def text_parts(pipe) -> tuple[list, list]:
    """A pipeline's tokenizers and text encoders, as lists (one entry for SD 1.x/2.x, two for SDXL)."""
    if pipeline_family(pipe) == SDXL:
        return [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    return [pipe.tokenizer], [pipe.text_encoder]


def build_pipeline(family: str, tokenizers: list, text_encoders: list, vae, unet, scheduler):
    """The stock pipeline of `family` over existing parts (no copy)."""
    if family == SDXL:  # no watermark: it needs an extra package and changes the images
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler, add_watermarker=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_components(pretrained: str = DEFAULT_MODEL, revision: str | None = None) -> Components:
    """Tokenizers, text encoders, VAE, UNet and a DDPM noise scheduler for training, all frozen
    (`requires_grad=False`).

    The same path serves a hub id and a local folder, so a test that saves the tiny model with `save_pretrained`
    and loads it back exercises exactly what `stable-diffusion-v1-5/stable-diffusion-v1-5` goes through.
    """
    pipe = load_pipeline(pretrained, revision)
    tokenizers, text_encoders = text_parts(pipe)
    # DDPM with the checkpoint's schedule and prediction type: the noise process the model was trained under.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for model in (*text_encoders, pipe.vae, pipe.unet):
        model.requires_grad_(False)
        model.eval()
    return Components(pipeline_family(pipe), tokenizers, text_encoders, pipe.vae, pipe.unet, noise_scheduler)
