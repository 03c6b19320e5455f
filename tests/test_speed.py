"""Training speed-ups (`tea_lightning.speed`): each one must leave what is trained unchanged."""

import importlib.util

import lightning as L
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, CustomDiffusionAttnProcessor2_0

import train
from helpers import ROOT, make_trainer, star_data, ti_module
from tea_lightning.speed import Speed, prepare, set_attention


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


def test_class_prompt_encodings_are_reused_while_keyword_prompts_are_encoded_with_gradients():
    module = ti_module()
    calls: list[int] = []
    module.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    prompts = ["a photo of a star", "a photo of a <v>"]

    first = module.encode_text(prompts)
    second = module.encode_text(prompts)

    assert calls == [2, 1], "the fixed class prompt was encoded again"
    expected = module.encode_prompts(prompts)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    second[1].sum().backward()
    assert module.learned.vectors.grad is not None and module.learned.vectors.grad.abs().sum() > 0


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


def _loss_and_saved_bytes(module) -> tuple[torch.Tensor, int, torch.Tensor]:
    batch = next(iter(star_data(batch_size=2).train_dataloader()))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), sum(saved), module.learned.vectors.grad.clone()


@pytest.mark.filterwarnings("ignore:You are trying to `self.log()`")
def test_gradient_checkpointing_stores_fewer_activations_and_gives_the_same_gradient():
    plain, checkpointed = ti_module(), ti_module()
    prepare(Speed(gradient_checkpointing=True), checkpointed.unet, checkpointed.vae, torch.device("cpu"))

    loss, saved_plain, grad = _loss_and_saved_bytes(plain)
    loss_ckpt, saved_ckpt, grad_ckpt = _loss_and_saved_bytes(checkpointed)

    assert saved_ckpt < 0.7 * saved_plain, (saved_ckpt, saved_plain)
    torch.testing.assert_close(loss_ckpt, loss)
    torch.testing.assert_close(grad_ckpt, grad, rtol=1e-4, atol=1e-7)


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
    with pytest.raises(SystemExit):  # jsonargparse rejects a value outside the Literal
        train.main(["--config", "configs/demo.yaml", "--model.init_args.speed.attention", "flash"], run=False)
