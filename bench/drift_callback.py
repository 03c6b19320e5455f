"""ContextualDrift's cost: the per-prompt reference loop against our batched path with P(c) cached, side by side.

    .venv/bin/python bench/drift_callback.py                 # tiny model + SD 1.5-size text encoder
    .venv/bin/python bench/drift_callback.py --train-step    # also time a comparable SD 1.5 training step (slow)
    python bench/drift_callback.py --device cuda --bf16 --prompts 1000 --repeats 5 --train-step   # on a GPU

Reference: every sentence of P(V*), P(c) and S(V*) encoded alone, at every measurement (what a straightforward
port of the authors' analysis does). Ours: `ContextualDrift.compute`, P(V*) and S(V*) in batches, P(c) encoded once
(frozen text encoder, Textual Inversion). Both give the same numbers (checked here). The SD 1.5-size text encoder
is built from its public config with random weights (nothing downloads); the prompts are the shipped sets, cut to
`--prompts` sentences per set on CPU (the cost is linear in the number of sentences).

With `--train-step`, a Textual Inversion step at SD 1.5 size and 512 px is estimated from what can be timed here:
the VAE encode plus the UNet forward (batch 1, random weights) times 2.08, the FLOP ratio of the TI UNet
forward+backward to the forward (shared/reference/users-and-costs.md §2.1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python bench/drift_callback.py`
    sys.path.insert(0, str(ROOT))

from bench.models import CLIP_L  # noqa: E402
from tea_lightning import drift  # noqa: E402
from tea_lightning.callbacks import ContextualDrift  # noqa: E402
from tea_lightning.module import DiffusionModule  # noqa: E402
from tea_lightning.prompt_sets import contextual_set, fill, simple_set  # noqa: E402
from tea_lightning.tiny import tiny_pipeline  # noqa: E402
from tea_lightning.tokens import LearnedTokens, add_token_rows, single_token_id  # noqa: E402

TI_FWD_BWD_OVER_FWD = 1669.2 / 803.3  # users-and-costs.md §2.1: UNet fwd+bwd with grad to the context only / fwd


class TextOnlyTextualInversion(torch.nn.Module):
    """The part of the method contract ContextualDrift reads, on any tokenizer and text encoder: a learned `<v>`
    started at the concept row and pushed away from it (as after training)."""

    trains_text_encoder = False
    keyword = "<v>"
    num_text_encoders = 1
    tokenize = DiffusionModule.tokenize
    encode_prompts = DiffusionModule.encode_prompts

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, concept_word: str = "man") -> None:
        super().__init__()
        self.tokenizer, self.text_encoder, self.concept_word = tokenizer, text_encoder.eval(), concept_word
        concept_id = single_token_id(tokenizer, concept_word)
        (first_id,) = add_token_rows(tokenizer, text_encoder, [self.keyword])
        table = text_encoder.get_input_embeddings()
        concept = table.weight[concept_id].detach().float()
        noise = torch.randn(concept.shape, generator=torch.Generator().manual_seed(0)) / concept.numel() ** 0.5
        drifted = 3 * concept + concept.norm() * noise
        self.learned = LearnedTokens(drifted.unsqueeze(0), first_id)
        self.learned.attach(table)

    @property
    def device(self) -> torch.device:
        return self.learned.vectors.device

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    def learned_vectors(self, encoder: int = 0):
        return self.learned.vectors, self.learned.vectors


def per_prompt(module, p_templates: list[str], s_templates: list[str]) -> dict[str, float]:
    """The reference: every sentence alone, all three sets at every measurement."""
    def encode(prompts: list[str]) -> torch.Tensor:
        return torch.cat([module.encode_prompts([p]).states[:, -1].float() for p in prompts])

    with torch.no_grad():
        p_keyword = encode([fill(t, module.keyword) for t in p_templates])
        p_concept = encode([fill(t, module.concept_word) for t in p_templates])
        s_keyword = encode([fill(t, module.keyword) for t in s_templates])
    return drift.contextual_distances(p_keyword, p_concept, s_keyword)


def _timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        result = fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best, result


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(label: str, module, n_prompts: int | None, repeats: int, batch_size: int, autocast) -> dict:
    p_templates = contextual_set(module.concept_word)[:n_prompts]
    s_templates = simple_set()[:n_prompts]
    callback = ContextualDrift(every_n_steps=100, prompt_set=module.concept_word, batch_size=batch_size)
    callback.prompt_templates, callback.simple_templates = p_templates, s_templates
    first, _ = _timed(lambda: callback.compute(module, autocast()), 1)  # tokenizes the sets, encodes P(c) once
    ours, ours_values = _timed(lambda: callback.compute(module, autocast()), repeats)
    with autocast():
        reference, reference_values = _timed(lambda: per_prompt(module, p_templates, s_templates), repeats)
    for key, value in reference_values.items():
        ours_value = ours_values["drift_sets/" + key]
        if abs(ours_value - value) > 1e-3 * abs(value) + 1e-6:  # bf16 kernels differ with the batch shape
            print(f"note: {label} {key}: ours {ours_value:.6g}, reference {value:.6g}")
    return {"label": label, "p": len(p_templates), "s": len(s_templates), "reference": reference, "ours": ours,
            "first": first}


def sd15_unet_and_vae():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4)
    return unet.eval(), vae.eval()


def train_step_estimate(device: torch.device, autocast, repeats: int) -> dict:
    unet, vae = (m.to(device) for m in sd15_unet_and_vae())
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    with torch.no_grad(), autocast():
        image = torch.randn(1, 3, 512, 512, device=device)
        vae_s, latents = _timed(lambda: vae.encode(image).latent_dist.sample(), repeats)
        context = torch.randn(1, 77, 768, device=device)
        unet_s, _ = _timed(lambda: unet(latents, torch.tensor([500], device=device), context).sample, repeats)
    return {"unet_params_m": params, "vae_encode": vae_s, "unet_forward": unet_s,
            "step": vae_s + TI_FWD_BWD_OVER_FWD * unet_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48, help="sentences per set at SD 1.5 size (CPU is slow)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (best is kept)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-step", action="store_true", help="also estimate an SD 1.5 TI step at 512 px")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as trainer.precision bf16-mixed)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)

    def autocast():
        return torch.autocast(device.type, torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    tiny = tiny_pipeline()
    rows = [compare("tiny (hidden 32, 2 layers)",
                    TextOnlyTextualInversion(tiny.tokenizer, tiny.text_encoder).to(device), None, args.repeats,
                    args.batch_size, autocast)]
    sd15_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    rows.append(compare("SD 1.5 text encoder (768, 12 layers), random weights",
                        TextOnlyTextualInversion(tiny_pipeline().tokenizer, sd15_encoder).to(device), args.prompts,
                        args.repeats, args.batch_size, autocast))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); device {device}, bf16 {args.bf16}; "
          f"date {date.today()}; commit {commit}\n")
    print("| model | P, S sentences | reference: per prompt, all 3 sets (s) | ours: batched, P(c) cached (s) "
          "| speed-up | ours, first call (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['p']}, {r['s']} | {r['reference']:.3f} | {r['ours']:.3f} | "
              f"{r['reference'] / r['ours']:.1f}x | {r['first']:.3f} |")
    sd15 = rows[-1]
    full = len(contextual_set("man")) + len(simple_set())  # P(V*) + S(V*) at full size
    per_measurement = sd15["ours"] * full / (sd15["p"] + sd15["s"])
    print(f"\nSD 1.5 size, ours scaled to the full sets ({full} sentences encoded per measurement): "
          f"{per_measurement:.1f} s per measurement on this CPU")
    if args.train_step:
        step = train_step_estimate(device, autocast, 1 if device.type == "cpu" else args.repeats)
        fraction = per_measurement / (per_measurement + 100 * step["step"])
        print(f"SD 1.5 UNet ({step['unet_params_m']:.0f} M parameters) forward at 512 px: {step['unet_forward']:.1f} s;"
              f" VAE encode: {step['vae_encode']:.1f} s; TI step estimate (VAE + {TI_FWD_BWD_OVER_FWD:.2f} x UNet "
              f"forward): {step['step']:.1f} s")
        print(f"ContextualDrift at every_n_steps=100: {100 * fraction:.2f}% of training time on this CPU")


if __name__ == "__main__":
    main()
