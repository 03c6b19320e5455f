"""CUDA training steps of every method on the tiny model (bench/gpu_check.sh runs these on a GPU machine).

Skipped, and reported as skipped with the reason, where no CUDA device is visible.
"""

import importlib

import pytest
import torch

from helpers import make_trainer, star_data
from tea_lightning.speed import Speed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run bench/gpu_check.sh on a GPU machine)")

# (module, class, extra init args) per method: DreamBooth-LoRA and Custom Diffusion arrive with issue 4.
METHODS = {
    "ti": ("tea_lightning.textual_inversion", "TextualInversion", {"concept_word": "star", "placeholder": "<v>"}),
    "lora": ("tea_lightning.dreambooth_lora", "DreamBoothLoRA", {"concept_word": "star"}),
    "cd": ("tea_lightning.custom_diffusion", "CustomDiffusion", {"concept_word": "star"}),
}


def build(method: str, speed: Speed = Speed(), pretrained: str = "tiny"):  # noqa: B008 - frozen dataclass
    module_name, cls, kwargs = METHODS[method]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        pytest.skip(f"{module_name} is not on this branch yet")
    return getattr(module, cls)(pretrained=pretrained, speed=speed, **kwargs)


def cuda_trainer(tmp_path, steps: int, precision: str, **kwargs):
    return make_trainer(tmp_path, max_steps=steps, accelerator="cuda", precision=precision, **kwargs)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("method", list(METHODS))
def test_cuda_training_step_has_finite_loss_fp32_trainables_and_the_default_speed_ups(tmp_path, method, precision):
    module = build(method)
    trainer = cuda_trainer(tmp_path, 3, precision)
    trainer.fit(module, star_data())

    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    half = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.is_cuda for p in trainable)
    assert all(p.dtype == half for p in module.unet.parameters() if not p.requires_grad)
    assert trainer.optimizers[0].defaults["fused"] is True
    conv = module.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    assert module.latent_cache.store, "the latent cache stayed empty on CUDA"


@pytest.mark.parametrize("method", list(METHODS))
def test_cuda_cached_latents_give_the_uncached_loss(tmp_path, method):
    losses = {}
    for cache in (True, False):
        module = build(method, Speed(cache_latents=cache))
        trainer = cuda_trainer(tmp_path / str(cache), 4, "32")
        trainer.fit(module, star_data(flip_p=0.0, batch_size=2))
        losses[cache] = trainer.callback_metrics["train/loss"].float().cpu()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-3, atol=1e-5)


def test_cuda_compiled_unet_trains(tmp_path):
    module = build("ti", Speed(compile_unet="default"))
    trainer = cuda_trainer(tmp_path, 3, "bf16-mixed")
    trainer.fit(module, star_data())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(module.learned.vectors).all()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("method", list(METHODS))
def test_cuda_sdxl_steps_are_finite_with_half_frozen_weights_and_an_fp32_vae_under_fp16(tmp_path, method, precision):
    module = build(method, pretrained="tiny-sdxl")
    trainer = cuda_trainer(tmp_path, 3, precision)
    trainer.fit(module, star_data())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    half = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    for encoder in module.text_encoders:
        assert all(p.dtype == half for p in encoder.parameters() if not p.requires_grad)
    # SDXL's VAE overflows in fp16 (its config says force_upcast): it stays fp32 under 16-mixed, bf16 is safe.
    assert next(module.vae.parameters()).dtype == (torch.float32 if half == torch.float16 else half)
