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


def standard_text_encoder_names(layers: dict[str, Tensor]) -> dict[str, Tensor]:
    """Text-encoder LoRA keys under the standard module path `text_model.encoder.layers.N…`.

    transformers 5 flattened `CLIPTextModel` (it has no `text_model` module), so peft names its layers
    `encoder.layers.N…`. diffusers on transformers 4 fails on those names (IndexError), diffusers 0.42 strips
    `text_model.` itself, and ComfyUI's and kohya's key maps expect it: the standard name loads everywhere.
    """
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in layers.items()}


def kohya_lora_layers(layers: dict[str, Tensor], prefix: str, alpha: float) -> dict[str, Tensor]:
    """peft LoRA tensors (`<module path>.lora_A.weight` [r, in], `.lora_B.weight` [out, r]) under the names kohya's
    `networks/lora.py` gives them, which AUTOMATIC1111 and ComfyUI load: `<prefix>.<module path>` with every `.`
    turned into `_`, then `.lora_down.weight`, `.lora_up.weight` and `.alpha` (a float scalar; the adapter adds
    alpha/r · up·down). `prefix` is `lora_unet`, or `lora_te` for the text encoder (standard module paths,
    `text_model.encoder.…`, as kohya's transformers names them)."""
    result = {}
    for key, tensor in layers.items():
        path, _, kind = key.rpartition(".lora_")  # kind: "A.weight" (down) or "B.weight" (up)
        name = f"{prefix}.{path}".replace(".", "_")
        result[f"{name}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = tensor.float().cpu()
        result[f"{name}.alpha"] = torch.tensor(float(alpha))
    return result


# The infixes of a LoRA key before its down (A) or up (B) weight: diffusers' UNet and text-encoder names, and peft's.
_LORA_MARKERS = {".lora.down.": "down", ".lora.up.": "up", ".lora_linear_layer.down.": "down",
                 ".lora_linear_layer.up.": "up", ".lora_A.": "down", ".lora_B.": "up"}
_COMPONENT_PREFIXES = ("unet.", "text_encoder.", "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def unet_only(keys) -> bool:
    """Whether LoRA keys are what `unet.save_lora_adapter` writes: UNet module paths without a `unet.` prefix."""
    return not any(key.startswith(_COMPONENT_PREFIXES) for key in keys)


def read_lora(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    return load_file(str(path)) if path.suffix == ".safetensors" else export.load_pickle(path)


def check_lora_shapes(state: dict[str, Tensor], pipe, where: str) -> None:
    """Refuse LoRA tensors that do not fit `pipe`'s UNet and text encoder, naming the first misfit.

    diffusers' `load_lora_weights` reports a wrong base model only deep inside peft; this says which key and what to
    do. Keys are `unet.<module>…` / `text_encoder.<module>…` (diffusers' or peft's names, formats.md) or, for
    `unet.save_lora_adapter` files, UNet module paths alone; kohya keys are left to diffusers' own converter.
    """
    parts = {"unet": dict(pipe.unet.named_modules()), "text_encoder": dict(pipe.text_encoder.named_modules())}
    flat_text_encoder = not hasattr(pipe.text_encoder, "text_model")
    bare = unet_only(state)
    for key, tensor in state.items():
        prefix, _, rest = ("unet", ".", key) if bare else key.partition(".")
        marker = next((m for m in _LORA_MARKERS if m in rest), None)
        if marker is None or prefix not in parts:
            continue  # kohya keys and alphas: left to diffusers' own converter
        name, kind = rest.split(marker)[0], _LORA_MARKERS[marker]
        if prefix == "text_encoder" and flat_text_encoder:
            name = name.removeprefix("text_model.")
        layer = parts[prefix].get(name)
        layer = getattr(layer, "base_layer", layer)
        if not isinstance(layer, torch.nn.Linear):
            raise ValueError(f"The LoRA in {where}: key {key!r} names no linear layer of this model's {prefix}. It "
                             "was trained for another base model; pass --pretrained with that one.")
        expected = (tensor.shape[0], layer.in_features) if kind == "down" else (layer.out_features, tensor.shape[1])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"The LoRA in {where}: key {key!r} has shape {list(tensor.shape)}, but this model's "
                             f"layer needs {list(expected)}. It was trained for another base model (e.g. SD 1.x vs "
                             "2.x); pass --pretrained with that one.")


def tuner_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def install_lora(pipe, path: str | Path, base: str) -> None:
    """Install a LoRA file into `pipe` as stock diffusers loads that file, stored alpha included.

    A pipeline file (`unet.…`/`text_encoder.…` keys, diffusers' or peft's names, or kohya's `lora_unet_…`/`lora_te_…`
    with `.alpha`) goes through `pipe.load_lora_weights`; what `unet.save_lora_adapter` writes (UNet keys without
    a prefix) through `pipe.unet.load_lora_adapter(prefix=None)`. Both read the file themselves, so the peft
    `lora_alpha` a file carries in its metadata is honoured (a bare state dict would lose it).
    """
    path, where = Path(path), repr(str(path))
    state = read_lora(path)
    check_lora_shapes(state, pipe, where)
    before = tuner_layers(pipe.unet) + tuner_layers(pipe.text_encoder)
    try:
        if unet_only(state):
            pipe.unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=None)
        else:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    except (RuntimeError, ValueError, KeyError) as error:
        raise ValueError(f"The LoRA in {where} does not fit the base model {base!r} ({error}). Pass --pretrained "
                         "with the model it was trained on.") from error
    if tuner_layers(pipe.unet) + tuner_layers(pipe.text_encoder) == before:
        raise ValueError(f"The LoRA in {where} matched no layer of {base!r}, so it would change nothing. Pass "
                         "--pretrained with the model it was trained on.")


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """While inside, `model`'s peft adapters (LoRA) are off: the base encoder. Trainability is restored after."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
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


def custom_diffusion_tensors(state: dict, where: str) -> dict[str, Tensor]:
    """The tensors of a `unet.save_attn_procs` file. Pickled files (`--no_safe_serialization`, older diffusers) also
    hold an empty `{}` per processor with nothing trained (self-attention); those are dropped."""
    tensors = {k: v for k, v in state.items() if not (isinstance(v, dict) and not v)}
    bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{where}: entries {bad[:3]} are neither tensors nor the empty entries diffusers writes for "
                         "untrained processors; this is not a Custom Diffusion weights file.")
    return tensors


def load_custom_diffusion(unet: nn.Module, path: str | Path) -> list[str]:
    """Install the Custom Diffusion processors of a weights file into `unet`; return the attention modules changed.

    Every key is checked against the UNet before anything is installed: a file for another base model is refused,
    naming the first key that does not fit. The modifier tokens load with diffusers'
    `pipe.load_textual_inversion(folder / "<new1>.safetensors", token="<new1>")`.

    Args:
        unet: The UNet to change (e.g. `pipe.unet`).
        path: `pytorch_custom_diffusion_weights.safetensors` (or `.bin`, as diffusers' script writes with
            `--no_safe_serialization`), or the folder holding it.
    """
    path = Path(path)
    if path.is_dir():
        names = (export.CUSTOM_DIFFUSION_WEIGHTS, export.CUSTOM_DIFFUSION_WEIGHTS_BIN)
        path = next((path / n for n in names if (path / n).is_file()), path / names[0])
    if not path.is_file():
        raise FileNotFoundError(f"No Custom Diffusion weights at {str(path)!r}; give the export folder or the "
                                f"{export.CUSTOM_DIFFUSION_WEIGHTS} (or .bin) file.")
    state = load_file(str(path)) if path.suffix == ".safetensors" else export.load_pickle(path)
    return install_custom_diffusion_weights(unet, custom_diffusion_tensors(state, repr(str(path))),
                                            where=repr(str(path)))


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
            raise ValueError(f"{where}: the Custom Diffusion weights read {value.shape[1]}-wide text embeddings, but "
                             f"{base!r} has {cross}-wide ones (768 = SD 1.x, 1024 = SD 2.x). Pass --pretrained with "
                             "the model it was trained on.")
    install_custom_diffusion_weights(unet, state, where)
