"""Loading the parts of a Stable Diffusion model: a hub id, a local diffusers folder, or a built-in model.

`tiny` (random, for tests) is built in code; `mini` (the world tea-lightning trained, see `tea_lightning.mini`) is a
diffusers folder shipped as package data, loaded through the very same `from_pretrained` path as any local folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from tea_lightning.tiny import TINY, tiny_pipeline

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
_PARTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


@dataclass
class Components:
    """The five parts training needs. `noise_scheduler` is a DDPM scheduler with the model's own noise schedule
    and `prediction_type` (epsilon or v_prediction)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


MINI = "mini"
# Models shipped as diffusers folders of package data, by name (fp16 safetensors, loaded in fp32).
BUILT_IN_FOLDERS = {MINI: Path(__file__).parent / "models" / "mini"}


def _hint(pretrained: str) -> str:
    return (f"pretrained={pretrained!r}: give a hub id (e.g. {DEFAULT_MODEL!r}, downloaded once beforehand when "
            f"working offline), a local diffusers folder holding model_index.json, or a built-in model: "
            f"{MINI!r} (trained on synthetic scenes) or {TINY!r} (random, for tests)")


def resolve_pretrained(pretrained: str) -> str:
    """Validate `pretrained` before anything heavy happens; return it unchanged, or the local folder it names."""
    if pretrained == TINY:
        return pretrained
    if pretrained in BUILT_IN_FOLDERS:
        folder = BUILT_IN_FOLDERS[pretrained]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"The built-in model {pretrained!r} is missing from {str(folder)!r} (package "
                                    "data): reinstall tea-lightning with `pip install -e .` from a full checkout.")
        return str(folder)
    expanded = os.path.expanduser(pretrained)
    if os.path.isdir(expanded):
        missing = [p for p in _PARTS if not os.path.isdir(os.path.join(expanded, p))]
        if missing:
            raise FileNotFoundError(f"{expanded!r} is not a diffusers Stable Diffusion folder: it lacks the "
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


def load_pipeline(pretrained: str = DEFAULT_MODEL, revision: str | None = None) -> StableDiffusionPipeline:
    """The stock `StableDiffusionPipeline` for `pretrained` (safety checker off), in fp32 on the CPU."""
    source = resolve_pretrained(pretrained)
    if source == TINY:
        return tiny_pipeline()
    try:
        with _quiet_loading():
            return StableDiffusionPipeline.from_pretrained(
                source, revision=revision, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    except OSError as error:  # offline, not cached, gated, or a typo in a hub id
        raise _load_failure(pretrained, source, error) from error


def load_components(pretrained: str = DEFAULT_MODEL, revision: str | None = None) -> Components:
    """Tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler for training, all frozen (`requires_grad=False`).

    The same path serves a hub id and a local folder, so a test that saves the tiny model with `save_pretrained`
    and loads it back exercises exactly what `stable-diffusion-v1-5/stable-diffusion-v1-5` goes through.
    """
    pipe = load_pipeline(pretrained, revision)
    # DDPM with the checkpoint's schedule and prediction type: the noise process the model was trained under.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for model in (pipe.text_encoder, pipe.vae, pipe.unet):
        model.requires_grad_(False)
        model.eval()
    return Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, noise_scheduler)

