"""Training speed-ups (`tea_lightning.speed`): each one must leave what is trained unchanged."""

import importlib.util
from argparse import ArgumentError

import lightning as L
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, CustomDiffusionAttnProcessor2_0

import train
from helpers import ROOT, make_trainer, star_data, ti_module
from tea_lightning.data import latent_keys
from tea_lightning.speed import LatentCache, Speed, set_attention


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(outputs["loss"].detach().clone())


def _train(tmp_path, module, steps: int, **data) -> list[torch.Tensor]:
    losses = _Losses()
    make_trainer(tmp_path, max_steps=steps, callbacks=[losses]).fit(module, star_data(**data))
    return losses.values


def test_cached_latents_give_the_same_losses_and_vectors_as_encoding_every_step(tmp_path):
    # 6 images, no flip, 12 samples: every image's posterior is cached once and reused once.
    cached = ti_module(lr=5e-2, speed=Speed(cache_latents=True))
    uncached = ti_module(lr=5e-2, speed=Speed(cache_latents=False))
    with_cache = _train(tmp_path / "a", cached, steps=6, flip_p=0.0)
    without = _train(tmp_path / "b", uncached, steps=6, flip_p=0.0)

    assert sorted(cached.latent_cache.store) == [(False, i, False) for i in range(6)], "each image cached once"
    assert not uncached.latent_cache.store
    torch.testing.assert_close(torch.stack(with_cache), torch.stack(without), rtol=1e-5, atol=1e-6)
    # Adam divides by the gradient scale, so rounding-level gradient differences show at ~1e-6 in the vectors.
    torch.testing.assert_close(cached.learned.vectors, uncached.learned.vectors, rtol=1e-4, atol=1e-5)


def test_augmented_samples_are_encoded_every_step_and_only_unaugmented_ones_are_cached():
    batch = {"image_index": torch.tensor([0, 1, 0, 2]), "flipped": torch.tensor([False, True, False, False]),
             "is_class": torch.tensor([False, False, True, True])}
    assert latent_keys(batch) == [(False, 0, False), (False, 1, True), (True, 0, False), (True, 2, False)]
    keys = latent_keys(batch, augmented=True)  # instance crops are random: no key; class images are not augmented
    assert keys == [None, None, (True, 0, False), (True, 2, False)]

    cache, encoded = LatentCache(), []

    def encode(pixels):
        encoded.append(len(pixels))
        return torch.cat([pixels, pixels.abs()], dim=1)  # [n, 2C, h, w]: mean and log-variance

    pixels = torch.randn(4, 4, 2, 2)
    first = cache.posterior(keys, pixels, encode)
    second = cache.posterior(keys, pixels, encode)
    assert encoded == [1, 1, 2, 2], "class images once each, the two augmented samples every time, together"
    torch.testing.assert_close(first.mean, pixels)
    torch.testing.assert_close(second.mean, pixels)


def test_choosing_an_attention_kernel_keeps_a_methods_own_attention_layers_and_the_output():
    module = ti_module()
    unet = module.unet
    name = next(n for n in unet.attn_processors if n.endswith("attn2.processor"))
    layer = unet.get_submodule(name.rsplit(".processor", 1)[0])
    hidden, cross = layer.to_k.weight.shape
    custom = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=hidden,
                                             cross_attention_dim=cross)
    custom.load_state_dict({"to_k_custom_diffusion.weight": layer.to_k.weight.detach(),
                            "to_v_custom_diffusion.weight": layer.to_v.weight.detach()})
    unet.set_attn_processor({n: custom if n == name else p for n, p in unet.attn_processors.items()})
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)

    set_attention(unet, "math")
    math_out = unet(sample, 10, context).sample
    assert unet.attn_processors[name] is custom
    assert all(type(p) is AttnProcessor for n, p in unet.attn_processors.items() if n != name)
    set_attention(unet, "sdpa")
    assert unet.attn_processors[name] is custom
    assert all(type(p) is AttnProcessor2_0 for n, p in unet.attn_processors.items() if n != name)
    torch.testing.assert_close(unet(sample, 10, context).sample, math_out, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_asking_for_xformers_without_it_installed_names_the_fix():
    with pytest.raises(ValueError, match="pip install xformers"):
        Speed(attention="xformers")


def test_speed_options_are_typed_cli_arguments_with_the_measured_defaults(monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = train.main(["--config", "configs/demo.yaml", "--model.init_args.speed.cache_latents", "false",
                      "--model.init_args.speed.compile_unet", "reduce-overhead"], run=False)
    assert cli.model.speed == Speed(cache_latents=False, compile_unet="reduce-overhead")
    assert ti_module().speed == Speed()
    with pytest.raises(ArgumentError, match="flash"):  # jsonargparse rejects a value outside the Literal
        train.main(["--config", "configs/demo.yaml", "--model.init_args.speed.attention", "flash"], run=False)


def test_8bit_adam_is_chosen_from_the_command_line_and_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    import sys
    from types import SimpleNamespace

    monkeypatch.chdir(ROOT)
    cli = train.main(["--config", "configs/demo.yaml", "--model.init_args.pretrained", "tiny",
                      "--model.init_args.optimizer", "tea_lightning.speed.AdamW8bit",
                      "--model.init_args.optimizer.lr", "1e-3"], run=False)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as when it is not installed
    with pytest.raises(ValueError, match=r"needs bitsandbytes.*pip install \"tea-lightning\[bnb\]\""):
        cli.model.configure_optimizers()
    made = []
    fake = SimpleNamespace(optim=SimpleNamespace(AdamW8bit=lambda params, **kwargs: made.append(kwargs) or "8bit"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    assert cli.model.configure_optimizers() == "8bit"
    assert len(made) == 1 and made[0]["lr"] == 1e-3 and set(made[0]) == {"lr", "betas", "eps", "weight_decay"}
