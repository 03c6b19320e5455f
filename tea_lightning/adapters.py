"""The layers personalisation adds to a stock UNet and text encoder, named as diffusers names them: LoRA adapters
(peft) and Custom Diffusion's cross-attention processors. Training builds and exports them with these functions;
`checkpoints` checks and installs them from files with the same ones.

diffusers' `unet.load_attn_procs` silently installs nothing for Custom Diffusion files since 0.29
(huggingface/diffusers#9320), so `install_custom_diffusion_weights` builds and loads the processors itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor2_0
from diffusers.utils import convert_state_dict_to_diffusers
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor, nn

from tea_lightning import export

# ----------------------------------------------------------------------------------------------------------- LoRA


def diffusers_lora_layers(model: torch.nn.Module, scale: float) -> dict[str, torch.Tensor]:
    """The model's LoRA tensors with diffusers' key names, `scale` (lora_alpha / rank) folded into the up weights:
    readers assume lora_alpha = rank, and up·down·scale is what the adapter adds."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    return {k: (v.float() * scale if ".up." in k else v.float()).cpu() for k, v in layers.items()}


def check_lora_shapes(path: str | Path, pipe) -> None:
    """Refuse a LoRA file whose tensors do not fit `pipe`'s UNet and text encoder, naming the first misfit.

    diffusers' `load_lora_weights` reports a wrong base model only deep inside peft; this says which key and what to
    do. Layer names follow formats.md: `unet.<module>.lora.{down,up}.weight`,
    `text_encoder.<module>.lora_linear_layer.{down,up}.weight`.
    """
    state = load_file(str(path))
    parts = {"unet": dict(pipe.unet.named_modules()), "text_encoder": dict(pipe.text_encoder.named_modules())}
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        for marker in (".lora.down.", ".lora.up.", ".lora_linear_layer.down.", ".lora_linear_layer.up."):
            if marker in rest:
                name, kind = rest.split(marker)[0], marker.strip(".").split(".")[-1]
                break
        else:
            continue  # kohya keys and alphas: left to diffusers' own converter
        layer = parts.get(prefix, {}).get(name)
        layer = getattr(layer, "base_layer", layer)
        if not isinstance(layer, torch.nn.Linear):
            raise ValueError(f"LoRA file {str(path)!r}: key {key!r} names no linear layer of this model's {prefix}. "
                             "It was trained for another base model; load it into that one.")
        expected = (tensor.shape[0], layer.in_features) if kind == "down" else (layer.out_features, tensor.shape[1])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"LoRA file {str(path)!r}: key {key!r} has shape {list(tensor.shape)}, but this model's "
                             f"layer needs {list(expected)}. It was trained for another base model (e.g. SD 1.x vs "
                             "2.x); load it into that one.")


def tuner_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def _adapted_models(pipe) -> list[torch.nn.Module]:
    """The models a LoRA file may adapt: the UNet and every text encoder of the pipeline (two on SDXL)."""
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    return [pipe.unet, *(e for e in encoders if e is not None)]


# The text widths cross-attention reads in each family, to name the family of a LoRA made for another one.
TEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def _width(width: int) -> str:
    family = TEXT_WIDTHS.get(width)
    return f"{width}-wide ({family})" if family else f"{width}-wide"


def lora_text_width(state: dict[str, Tensor]) -> int | None:
    """How wide the text is that the LoRA's cross-attention key projection reads (its down weight's inputs), in
    diffusers (`attn2.to_k.lora.down`, `attn2.to_k.lora_A`) or kohya (`attn2_to_k.lora_down`) keys; None without
    one."""
    for key, tensor in state.items():
        if "attn2" in key and "to_k" in key and any(m in key for m in ("lora.down.", "lora_A.", "lora_down.")):
            return int(tensor.shape[1])
    return None


def install_lora(pipe, state: dict[str, Tensor], where: str, base: str) -> None:
    width, cross = lora_text_width(state), pipe.unet.config.cross_attention_dim
    if width is not None and width != cross:
        raise ValueError(f"The LoRA in {where} adapts a UNet that reads {_width(width)} text, but {base!r} reads "
                         f"{_width(cross)} text: it was made for another base model. Pass --pretrained with the model "
                         "it was trained on.")
    before = sum(tuner_layers(m) for m in _adapted_models(pipe))
    try:
        pipe.load_lora_weights(dict(state))
    except (RuntimeError, ValueError, KeyError) as error:
        raise ValueError(f"The LoRA in {where} does not fit the base model {base!r} ({error}). Pass --pretrained "
                         "with the model it was trained on.") from error
    if sum(tuner_layers(m) for m in _adapted_models(pipe)) == before:
        raise ValueError(f"The LoRA in {where} matched no layer of {base!r}, so it would change nothing. Pass "
                         "--pretrained with the model it was trained on.")


@contextmanager
def adapters_disabled(*models: torch.nn.Module) -> Iterator[None]:
    """While inside, the models' peft adapters (LoRA) are off: the base encoders (SDXL: both). Trainability is
    restored after."""
    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)
              and not m.disable_adapters]
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


# ------------------------------------------------------------------------------------------------ Custom Diffusion


def cross_attentions(unet: nn.Module) -> dict[str, Attention]:
    """The UNet's cross-attention modules (`…attn2`) by name."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}


def custom_diffusion_processor(attn: Attention, train_q_out: bool, out_bias: bool = True,
                               train_kv: bool = True) -> CustomDiffusionAttnProcessor2_0:
    """A Custom Diffusion processor for `attn` holding copies of its projections (fp32, trainable)."""
    processor = CustomDiffusionAttnProcessor2_0(
        train_kv=train_kv, train_q_out=train_q_out, hidden_size=attn.to_k.out_features,
        cross_attention_dim=attn.to_k.in_features, out_bias=out_bias and attn.to_out[0].bias is not None)
    with torch.no_grad():
        copies = {"to_k_custom_diffusion.weight": attn.to_k.weight, "to_v_custom_diffusion.weight": attn.to_v.weight,
                  "to_q_custom_diffusion.weight": attn.to_q.weight,
                  "to_out_custom_diffusion.0.weight": attn.to_out[0].weight,
                  "to_out_custom_diffusion.0.bias": attn.to_out[0].bias}
        for name, tensor in processor.state_dict(keep_vars=True).items():
            tensor.copy_(copies[name].float())
    return processor.to(attn.to_k.weight.device)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling refusal gets the same advice
        raise ValueError(f"{str(path)!r} could not be read as plain tensors ({error}); it is loaded with "
                         "torch.load(weights_only=True) only, never unpickled in full. Re-save it as "
                         "safetensors.") from error


def load_custom_diffusion(unet: nn.Module, path: str | Path) -> list[str]:
    """Install the Custom Diffusion processors of a weights file into `unet`; return the attention modules changed.

    Every key is checked against the UNet before anything is installed: a file for another base model is refused,
    naming the first key that does not fit. The modifier tokens load with diffusers'
    `pipe.load_textual_inversion(folder / "<new1>.safetensors", token="<new1>")`.

    Args:
        unet: The UNet to change (e.g. `pipe.unet`).
        path: `pytorch_custom_diffusion_weights.safetensors` (or `.bin`), or the export folder holding it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / export.CUSTOM_DIFFUSION_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"No Custom Diffusion weights at {str(path)!r}; give the export folder or the "
                                f"{export.CUSTOM_DIFFUSION_WEIGHTS} file.")
    return install_custom_diffusion_weights(unet, _read_weights(path), where=repr(str(path)))


def install_custom_diffusion_weights(unet: nn.Module, state: dict[str, torch.Tensor], where: str) -> list[str]:
    """Install Custom Diffusion processors from `unet.save_attn_procs` keys into `unet`; return the attention modules
    changed. Every key is checked against the UNet before anything is installed, naming the first that does not fit
    (`where` names the source in errors)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, found, param = key.partition(".processor.")
        if not found:
            raise ValueError(f"{where}: key {key!r} is not a Custom Diffusion processor weight "
                             "(<attention>.processor.to_k_custom_diffusion.weight, ...).")
        groups.setdefault(name, {})[param] = tensor
    modules = dict(unet.named_modules())
    processors = {}
    for name, tensors in sorted(groups.items()):
        attn = modules.get(name)
        if not isinstance(attn, Attention):
            raise ValueError(f"{where}: key {name}.processor.* names no attention module of this UNet; the file "
                             "was trained for another base model.")
        processor = custom_diffusion_processor(
            attn, train_q_out="to_q_custom_diffusion.weight" in tensors,
            out_bias="to_out_custom_diffusion.0.bias" in tensors, train_kv="to_k_custom_diffusion.weight" in tensors)
        expected = processor.state_dict()
        for param in sorted(set(expected) | set(tensors)):
            want, got = expected.get(param), tensors.get(param)
            if want is None or got is None or want.shape != got.shape:
                raise ValueError(
                    f"{where}: key {name}.processor.{param} has shape {None if got is None else list(got.shape)} "
                    f"but this UNet needs {None if want is None else list(want.shape)}. The file was trained for "
                    "another base model (e.g. SD 1.x vs 2.x); load it into that one.")
        processor.load_state_dict(tensors)
        processors[name] = processor.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
    for name, processor in processors.items():
        modules[name].set_processor(processor)
    return sorted(processors)


def install_custom_diffusion(unet, state: dict[str, Tensor], where: str, base: str) -> None:
    """Install Custom Diffusion's cross-attention processors from `unet.save_attn_procs` keys.

    diffusers' own `unet.load_attn_procs` silently installs nothing since 0.29 when called without its private
    `_pipeline` argument (huggingface/diffusers#9320), so `install_custom_diffusion_weights` builds and loads them;
    first, a text width that does not match `base` is named as such.
    """
    cross = unet.config.cross_attention_dim
    for key, value in state.items():
        if key.endswith("to_k_custom_diffusion.weight") and value.shape[1] != cross:
            raise ValueError(f"{where}: the Custom Diffusion weights read {_width(value.shape[1])} text embeddings, "
                             f"but {base!r} has {_width(cross)} ones. Pass --pretrained with the model it was trained "
                             "on.")
    install_custom_diffusion_weights(unet, state, where)
