"""How a training step runs fast: the `Speed` options of every method and the caches and settings behind them.

The defaults are what paid in `bench/RESULTS.md`, so users get them without a tuning guide. None of them changes
what is trained: cached latents are sampled from the cached posterior with the step's own generator, so the loss
equals the uncached loss up to floating-point rounding.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

Attention = Literal["sdpa", "xformers", "math"]
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]


@dataclass(frozen=True)
class Speed:
    """Speed-ups of the training step (YAML: ``model.init_args.speed``). Defaults are the measured winners.

    Args:
        cache_latents: Encode each (image, flip) through the VAE once and keep its posterior; every step still
            samples a fresh latent from it with the step's generator, so the loss equals the uncached loss. Saves the
            VAE encoder, about 40% of the FLOPs of an uncached step at 512 px.
        attention: ``sdpa`` (PyTorch's fused scaled-dot-product attention), ``xformers`` (needs the xformers
            package and CUDA), or ``math`` (diffusers' plain attention, slow; for comparison only).
        channels_last: Channels-last memory layout for the UNet and VAE convolutions (CUDA only).
        tf32: Allow TF32 tensor cores for fp32 matmuls and convolutions (CUDA only; process-wide setting).
        cudnn_benchmark: Let cuDNN time its convolution algorithms once per shape (CUDA only; process-wide).
        fused_optimizer: Use the single-kernel ``fused=True`` implementation of Adam/AdamW on CUDA when the configured
            optimiser is one of them and sets neither ``fused`` nor ``foreach``.
        frozen_half: Frozen weights in bf16/fp16 on CUDA under mixed precision; trained tensors stay fp32.
        compile_unet: ``torch.compile`` the UNet in place: ``off``, ``default``, ``reduce-overhead`` (CUDA graphs) or
            ``max-autotune``. The first steps pay the compile time (minutes); the state-dict keys do not change.
    """

    cache_latents: bool = True
    attention: Attention = "sdpa"
    channels_last: bool = True
    tf32: bool = True
    cudnn_benchmark: bool = True
    fused_optimizer: bool = True
    frozen_half: bool = True
    compile_unet: CompileMode = "off"

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "xformers", "math"):
            raise ValueError(f"model.speed.attention={self.attention!r}; choose sdpa, xformers or math.")
        if self.attention == "xformers" and importlib.util.find_spec("xformers") is None:
            raise ValueError("model.speed.attention='xformers' but xformers is not installed. Install the xformers "
                             "wheel built for your torch and CUDA (pip install xformers), or use 'sdpa'.")
        if self.compile_unet not in ("off", "default", "reduce-overhead", "max-autotune"):
            raise ValueError(f"model.speed.compile_unet={self.compile_unet!r}; choose off, default, reduce-overhead "
                             "or max-autotune.")


DEFAULT_SPEED = Speed()


_KERNELS = {"sdpa": AttnProcessor2_0, "math": AttnProcessor, "xformers": XFormersAttnProcessor}
_PLAIN = tuple(_KERNELS.values())


def set_attention(model: nn.Module, attention: Attention) -> None:
    """Select the attention kernel of a diffusers model. Only plain processors are swapped: a method's own
    processors (Custom Diffusion's, which hold trained tensors the optimiser already tracks) stay as they are."""
    kind = _KERNELS[attention]
    processors = model.attn_processors
    if any(isinstance(p, _PLAIN) and not isinstance(p, kind) for p in processors.values()):
        model.set_attn_processor({name: kind() if isinstance(p, _PLAIN) else p for name, p in processors.items()})


def prepare(speed: Speed, unet: nn.Module, vae: nn.Module, device: torch.device) -> None:
    """Apply the options to the UNet and VAE once they sit on their device in their final dtype (at fit start)."""
    attention = speed.attention
    if attention == "xformers" and device.type != "cuda":
        warnings.warn("model.speed.attention='xformers' needs CUDA; using 'sdpa' on this device.", stacklevel=2)
        attention = "sdpa"
    set_attention(unet, attention)
    set_attention(vae, attention)
    if device.type == "cuda":
        if speed.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if speed.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if speed.channels_last:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
    if speed.compile_unet != "off":
        unet.compile(mode=None if speed.compile_unet == "default" else speed.compile_unet)


def fused(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.optim.Optimizer:
    """The same Adam/AdamW with ``fused=True`` on CUDA (one kernel for all tensors); any other optimiser, or one
    that chose ``fused``/``foreach`` itself, comes back unchanged. Call before any step (the state is empty)."""
    kind = type(optimizer)
    if device.type != "cuda" or kind not in (torch.optim.Adam, torch.optim.AdamW):
        return optimizer
    if optimizer.defaults.get("fused") is not None or optimizer.defaults.get("foreach") is not None:
        return optimizer
    if not all(p.is_cuda and p.is_floating_point() for g in optimizer.param_groups for p in g["params"]):
        return optimizer
    accepted = set(inspect.signature(kind.__init__).parameters)
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [{**group, "fused": True} for group in optimizer.param_groups]
    return kind(groups, **{**defaults, "fused": True})


class AdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' 8-bit AdamW: its two moment estimates in 8 bits, a quarter of AdamW's optimiser memory (for
    DreamBooth-LoRA or Custom Diffusion on SDXL on a 12 GB GPU). An optional extra: `pip install
    "tea-lightning[bnb]"`; CUDA only. In a config: ``optimizer: {class_path: tea_lightning.speed.AdamW8bit,
    init_args: {lr: 1.0e-4}}``.

    Args:
        params: The trainable tensors (given by the module).
        lr: Learning rate.
        betas: Adam's moment decay rates.
        eps: Adam's epsilon.
        weight_decay: Decoupled weight decay, as AdamW.
    """

    def __new__(cls, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 1e-2):
        try:
            import bitsandbytes
        except ImportError:
            raise ValueError("model.optimizer tea_lightning.speed.AdamW8bit needs bitsandbytes, which is not "
                             "installed: pip install \"tea-lightning[bnb]\" (CUDA only), or use "
                             "torch.optim.AdamW.") from None
        # The class only names the optimiser in configs; the object is bitsandbytes' own.
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class LatentCache:
    """VAE posteriors by key (is_class, image_index, flipped): each image and flip is encoded once per fit.

    The cache holds the posterior's parameters (mean and log-variance), not a latent: sampling from it with the
    step's generator draws exactly the latent an uncached step draws.
    """

    def __init__(self) -> None:
        self.store: dict[Hashable, torch.Tensor] = {}

    def clear(self) -> None:
        self.store.clear()

    def posterior(self, keys: list[Hashable | None], pixel_values: torch.Tensor,
                  encode: Callable[[torch.Tensor], torch.Tensor]) -> DiagonalGaussianDistribution:
        """The posterior of each sample. `encode(pixels) -> parameters [n, 2C, h, w]` runs for unseen keys, one
        image at a time, and for samples without a key (randomly augmented pixels), together and every time."""
        with torch.no_grad():
            # One image at a time: a cached posterior must not depend on which other images shared its first batch,
            # or a run resumed from a checkpoint (fresh cache, other batches) would drift from the uninterrupted one.
            for i, key in enumerate(keys):
                if key is not None and key not in self.store:
                    self.store[key] = encode(pixel_values[i : i + 1])[0].detach()
            parameters = [None if key is None else self.store[key] for key in keys]
            fresh = [i for i, key in enumerate(keys) if key is None]
            if fresh:
                for row, encoded in zip(fresh, encode(pixel_values[fresh]).detach(), strict=True):
                    parameters[row] = encoded
        return DiagonalGaussianDistribution(torch.stack(parameters))
