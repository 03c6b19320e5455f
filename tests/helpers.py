"""Helpers shared by the tests: tiny modules, data and trainers with quiet defaults."""

import functools
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

ROOT = Path(__file__).resolve().parents[1]
STAR_IMAGES = ROOT / "examples" / "pink_star"


def adamw(lr: float):
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


def make_trainer(root: Path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    options = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                   callbacks=list(callbacks))
    options.update(kwargs)
    return L.Trainer(**options)


def star_data(**kwargs):
    from tea_lightning.data import ConceptDataModule

    options = dict(instance_dir=str(STAR_IMAGES), resolution=64, batch_size=2, repeats=10)
    options.update(kwargs)
    return ConceptDataModule(**options)


def ti_module(lr: float = 5e-3, **kwargs):
    from tea_lightning.textual_inversion import TextualInversion

    options = dict(concept_word="star", placeholder="<v>", pretrained="tiny", optimizer=adamw(lr))
    options.update(kwargs)
    return TextualInversion(**options)


class RecordingLogger(Logger):
    """Keeps every `log_metrics` call in memory: what a test reads back of what TensorBoard would show."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def by_step(self) -> dict[int, dict[str, float]]:
        merged: dict[int, dict[str, float]] = {}
        for step, metrics in self.calls:
            merged.setdefault(step, {}).update(metrics)
        return merged


def lora_module(lr: float = 1e-2, **kwargs):
    from tea_lightning.dreambooth_lora import DreamBoothLoRA

    options = dict(concept_word="star", pretrained="tiny", rank=2, optimizer=adamw(lr))
    options.update(kwargs)
    return DreamBoothLoRA(**options)


def cd_module(lr: float = 1e-2, **kwargs):
    from tea_lightning.custom_diffusion import CustomDiffusion

    options = dict(concept_word="star", pretrained="tiny", optimizer=adamw(lr))
    options.update(kwargs)
    return CustomDiffusion(**options)


def trainable_names(module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad]


def frozen_state(module) -> dict:
    """Copies of every tensor that is not trainable."""
    trainable = set(trainable_names(module))
    return {k: v.clone() for k, v in module.state_dict().items() if k not in trainable}


def changed_tensors(before: dict, module) -> list[str]:
    after = module.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def assert_resume_matches_uninterrupted(root: Path, make_module, make_data, steps: int = 4) -> None:
    """Train `steps` straight, and `steps` // 2 + a resume from that `.ckpt` to `steps`: every trainable tensor of the
    two runs must end bit-identical."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = make_module()
    make_trainer(root / "straight", max_steps=steps).fit(straight, make_data())
    half = steps // 2
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=half, save_top_k=-1)
    make_trainer(root / "first", max_steps=half, callbacks=[checkpoint], enable_checkpointing=True).fit(
        make_module(), make_data())
    resumed = make_module()
    make_trainer(root / "resumed", max_steps=steps).fit(resumed, make_data(),
                                                        ckpt_path=str(root / "ckpt" / f"epoch=0-step={half}.ckpt"))
    expected = straight.trainable_state_dict()
    assert list(resumed.trainable_state_dict()) == list(expected)
    for name, tensor in resumed.trainable_state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def kohya_module_names(pipe) -> dict[str, torch.nn.Module]:
    """LoRA names as kohya's networks/lora.py makes them: every Linear or 1x1 Conv2d inside a module of class
    Transformer2DModel (UNet) or CLIPAttention/CLIPMLP (text encoder, under `text_model.` as transformers 4 names
    it), `lora_unet` / `lora_te` + "." + module path + "." + child path, every "." turned into "_"."""
    names = {}
    for prefix, model, classes in (("lora_unet", pipe.unet, {"Transformer2DModel"}),
                                   ("lora_te", pipe.text_encoder, {"CLIPAttention", "CLIPMLP"})):
        root = "text_model." if prefix == "lora_te" and not hasattr(model, "text_model") else ""
        for name, module in model.named_modules():
            if type(module).__name__ in classes:
                for child, layer in module.named_modules():
                    if isinstance(layer, torch.nn.Linear) or (isinstance(layer, torch.nn.Conv2d)
                                                              and layer.kernel_size == (1, 1)):
                        names[f"{prefix}.{root}{name}.{child}".replace(".", "_")] = layer
    return names
