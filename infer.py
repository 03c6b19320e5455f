"""Generate images with test-time embedding adjustment (TEA) from any saved checkpoint.

    python infer.py --checkpoint runs/demo/lightning_logs/version_0/exports/final \\
        --prompt "a photo of <pink-star> on a beach" --rho 0.2 --alpha 0.5 --num_images 4 --out samples/demo

List options take several values or repeat: `--rho 0 0.1 0.2 0.4`, `--concept "<man>=man" --concept "<dog>=dog"`.
"""

from __future__ import annotations

import inspect
import json
import sys
import typing
from typing import Literal

from jsonargparse import CLI

from tea_lightning.user_errors import run_command

EPILOG = ("Example: python infer.py --checkpoint runs/demo/lightning_logs/version_0/exports/final --prompt \"a photo "
          "of <pink-star> on a beach\" --out samples/demo. List options take several values or repeat: --rho 0 0.1 "
          "0.2 --alpha 0.5 sweeps a grid; --concept \"<man>=man\" --concept \"<dog>=dog\" names two concepts.")


def infer(checkpoint: list[str], prompt: list[str] | None = None, prompts_file: str | None = None,
          out: str = "samples", rho: tuple[float, ...] | None = None, alpha: tuple[float, ...] = (0.5,),
          compare: bool = True, num_images: int = 4, seed: int = 0, batch_size: int = 4,
          pretrained: str | None = None, scheduler: Literal["dpm", "ddim", "euler", "euler_a", "pndm", "ddpm"] = "dpm",
          steps: int = 50, guidance: float = 7.0, resolution: int | None = None,
          mode: Literal["auto", "token", "prompt"] = "auto", align: Literal["span", "position"] = "span",
          target_encoder: Literal["adapted", "base"] = "adapted", target: Literal["word", "modifier"] = "word",
          concept: list[str] | None = None,
          concept_word: str | None = None, concept_reduce: Literal["error", "mean"] = "error",
          negative_prompt: str | None = None, device: str | None = None,
          dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto") -> None:
    """Generate images with TEA, and the baseline from the same seeds, from any saved checkpoint.

    Writes OUT/<tag>/pPPP-iIII.png with a JSON record each (tag: baseline or tea-rhoR-alphaA), a grid
    (OUT/grid.png: a labelled row per prompt, a column per setting) and OUT/run.json. An existing OUT is resumed
    (finished images are skipped) only when it was made with the same settings; it is never overwritten.

    Args:
        checkpoint: Export folder (exports/final), .ckpt, learned_embeds.safetensors, AUTOMATIC1111 .pt/.safetensors,
            kohya embedding, SDXL embedding (clip_l + clip_g), LoRA file (diffusers, peft or kohya keys, SD or SDXL)
            or Custom Diffusion weights; several for several concepts.
        prompt: Prompts holding the keyword ("a photo of <v> wearing glasses") or templates with {} for it.
        prompts_file: A CSV with a 'prompt' column ({} marks the keyword) or a text file, one prompt per line.
        out: Output folder.
        rho: Rotation factors in [0, 1] (how far the keyword turns towards its concept word); several sweep.
            Default: the authors' for the checkpoint's method, 0.1 for DreamBooth LoRA and 0.2 otherwise.
        alpha: Norm factors in [0, 1] (0 keeps the learned norm, 1 takes the concept word's).
        compare: Also generate the baseline (no TEA) from the same seeds.
        num_images: Images per prompt.
        seed: Base seed; each image's seed derives from (seed, prompt index, image index).
        batch_size: Images per pipeline call.
        pretrained: Base model (hub id or folder); default: the one the checkpoint records, else SD 1.5 (the SDXL
            base model for SDXL embeddings and LoRAs).
        scheduler: dpm is DPM-Solver multistep, the paper's.
        steps: Denoising steps.
        guidance: Classifier-free guidance scale.
        resolution: Image size in pixels (multiple of 8); default: the model's.
        mode: auto: each keyword at its own level, token when it holds learned rows (TI, Custom Diffusion), else
            prompt (DreamBooth LoRA); token or prompt: every keyword at that level.
        align: Prompt level: span pairs every token with its true counterpart; position pairs position i with i
            (the authors' code).
        target_encoder: Prompt level: encode the target prompt with the adapted (fine-tuned) or base text encoder.
        target: Prompt level: word puts the concept word in the keyword's place in the target prompt ("<new1> cat"
            → "cat"); modifier replaces only the learned tokens ("<new1> cat" → "cat cat"). The authors applied TEA
            to Custom Diffusion with --mode prompt --target modifier --align position.
        concept: KEYWORD=WORD, one per concept ("<man>=man", "sks dog=dog"): names a keyword a file does not record
            and the concept word TEA pulls it towards.
        concept_word: The concept word of the only keyword, when the checkpoint does not record it ("man").
        concept_reduce: A concept word of several tokens: error, or mean (pull towards the mean of its rows).
        negative_prompt: Negative prompt (never adjusted).
        device: cuda, cpu, ...; default: cuda when present.
        dtype: auto is fp16 on CUDA and fp32 elsewhere.
    """
    from tea_lightning.inference import generate
    from tea_lightning.prompting import read_prompts_file

    prompts = list(prompt or []) + (read_prompts_file(prompts_file) if prompts_file else [])
    if not prompts:
        raise ValueError("No prompt: pass --prompt \"a photo of <v> wearing glasses\" or --prompts_file prompts.csv.")
    records = generate(checkpoint, prompts, out, rhos=rho, alphas=alpha, compare=compare,
                       num_images=num_images, seed=seed, batch_size=batch_size, pretrained=pretrained,
                       scheduler=scheduler, steps=steps, guidance=guidance, resolution=resolution, mode=mode,
                       align=align, target_encoder=target_encoder, target=target, concepts=concept,
                       negative_prompt=negative_prompt,
                       device=device, concept_word=concept_word, concept_reduce=concept_reduce, dtype=dtype)
    tags = sorted({r.tag for r in records})
    print(f"{len(records)} images in {out}/ ({', '.join(tags)}); grid: {out}/grid.png")


def _list_options() -> set[str]:
    hints = {name: str(hint) for name, hint in typing.get_type_hints(infer).items()}
    names = inspect.signature(infer).parameters
    return {f"--{name}" for name in names if "list" in hints[name] or "tuple" in hints[name]}


def normalize_argv(argv: list[str]) -> list[str]:
    """Let list options take several values (`--rho 0 0.1`) and repeat (`--concept a=b --concept c=d`) by turning
    them into the JSON lists jsonargparse reads (`--rho '["0", "0.1"]'`)."""
    lists = _list_options()
    values: dict[str, list[str]] = {}
    rest: list[str] = []
    current = None
    for arg in argv:
        name, eq, value = arg.partition("=")
        if arg.startswith("--"):
            current = name if name in lists else None
            if current is None:
                rest.append(arg)
            else:
                values.setdefault(current, [])
                if eq:
                    values[current].append(value)
        elif current is not None:
            values[current].append(arg)
        else:
            rest.append(arg)
    for name, items in values.items():
        if len(items) == 1 and items[0].lstrip().startswith("["):
            rest += [name, items[0]]  # already a list
        else:
            rest += [name, json.dumps(items)]
    return rest


def main(args: list[str] | None = None) -> None:
    CLI(infer, as_positional=False, args=normalize_argv(sys.argv[1:] if args is None else list(args)),
        epilog=EPILOG, exit_on_error=False)


if __name__ == "__main__":
    run_command(main, prog="infer.py")
