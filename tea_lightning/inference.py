"""Generation with test-time embedding adjustment (TEA) from any checkpoint, through the stock pipeline.

TEA changes only the text embeddings; the images come from the stock pipeline of the model's family
(`StableDiffusionPipeline` or `StableDiffusionXLPipeline`) called with `prompt_embeds` and `negative_prompt_embeds`
(SDXL: and the pooled ones) (method.md §2):

- **token level** (a learned token row exists: Textual Inversion, Custom Diffusion's modifier token): while the
  prompt is encoded, a temporary forward hook on each text encoder's input embedding splices `adjust(row, concept
  row)` in wherever a learned token's id appears (SDXL: each encoder's row towards the concept word's row in that
  encoder), and is removed afterwards. Nothing the model holds is modified, and the same code serves a loaded file
  and a module in the middle of training.
- **prompt level** (DreamBooth; any method with `mode="prompt"`): the prompt with the keyword and the target prompt
  with the concept word in its place are both encoded, and each position of the first is adjusted towards its
  partner in the second (`align="span"`: every token with its true counterpart; `align="position"`: position i
  with position i, as the authors did); on SDXL each encoder's part of the states on its own. The negative prompt
  is never adjusted.
- **mixed** (a LoRA and an embedding together, `mode="auto"`): each concept at its own level. The learned rows are
  adjusted while both prompts are encoded, and the target prompt replaces only the keywords without learned rows.

SDXL's pooled embedding (the second encoder's projected end-of-text state, added to the UNet's timestep embedding)
follows TEA at every level. At token level it comes out of the same forward pass as the states, from the adjusted
rows. At prompt level it is adjusted towards the target prompt's pooled embedding with the same rho and alpha: it
is the end-of-text position of the second encoder, which both alignments pair with the target's end of text, and a
keyword that dominates the prompt dominates this summary too; left alone it would keep the collapsed keyword's
global signal in every UNet block. rho = alpha = 0 leaves it bit for bit.

Each image's initial noise comes from its own generator seeded from (seed, prompt index, image index), so baseline
and TEA images of the same index start from the same noise whatever the batch; and both are made in identically
composed batches, so with rho = alpha = 0 they are equal bit for bit.

Output layout: `out/<tag>/p{prompt:03d}-i{image:03d}.png` with a sidecar `.json` of the same stem (tag is
`baseline` or `tea-rho{rho:g}-alpha{alpha:g}`), `out/grid.png` (one row per prompt, labelled, one column per
setting, the first four images of each side by side), and `out/run.json` (the settings, checked when a run is
resumed).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image
from tqdm.auto import tqdm

from tea_lightning import checkpoints, personalized
from tea_lightning.adapters import adapters_disabled
from tea_lightning.checkpoints import Concept
from tea_lightning.components import text_parts
from tea_lightning.conditioning import PromptEmbeds, pipeline_arguments, split, widths
from tea_lightning.conditioning import encode as encode_conditioning
from tea_lightning.devices import resolve_device
from tea_lightning.export import check_writable_folder, remove_stale_temporaries, write_json, write_png
from tea_lightning.grids import table
from tea_lightning.personalized import Personalized
from tea_lightning.prompting import Prompt, pairing, parse_prompt, token_spans
from tea_lightning.seeding import sample_seed
from tea_lightning.tea import adjust
from tea_lightning.tokens import LearnedTokens

SCHEDULERS = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "pndm": PNDMScheduler, "ddpm": DDPMScheduler}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RUN_JSON = "run.json"
# A sanity bound on the images of one call: 100,000 SD 1.5 images take about a day on one A100. More is a typo, and
# the list of jobs alone would not fit in memory.
MAX_IMAGES = 100_000
GRID = "grid.png"
GRID_IMAGES = 4  # images per prompt and setting shown in the grid; the files hold them all


@dataclass
class ImageRecord:
    """One generated image and how it was made (its sidecar JSON holds every field but `path`).

    `mode` is "baseline" or "tea"; `rho`, `alpha` and `level` ("token" | "prompt" | "mixed") are None for baseline
    images.
    `prompt` is the prompt as given to the model (keyword filled in), `template` the same with `{}` in place of
    each keyword. With several concepts, `keyword` and `concept_word` list them joined by ", ".
    """

    path: str
    tag: str
    prompt: str
    template: str
    prompt_index: int
    image_index: int
    seed: int
    mode: str
    rho: float | None
    alpha: float | None
    level: str | None
    checkpoint: str
    base_model: str
    keyword: str
    concept_word: str
    scheduler: str
    steps: int
    guidance: float
    resolution: int


@dataclass(frozen=True)
class Setting:
    """Baseline (rho = alpha = None) or TEA with the factors rho and alpha."""

    rho: float | None = None
    alpha: float | None = None

    @property
    def tag(self) -> str:
        return "baseline" if self.rho is None else f"tea-rho{self.rho:g}-alpha{self.alpha:g}"

    @property
    def label(self) -> str:
        return "baseline" if self.rho is None else f"TEA rho {self.rho:g}, alpha {self.alpha:g}"


# ------------------------------------------------------------------------------------------------ embeddings


@torch.no_grad()
def encode(pipe, texts: Sequence[str]) -> PromptEmbeds:
    """`texts` exactly as the stock pipeline of the family encodes a prompt (`tea_lightning.conditioning`)."""
    return encode_conditioning(*text_parts(pipe), texts)


@torch.no_grad()
def negative_embeddings(pipe, negative_prompt: str | None) -> PromptEmbeds:
    """The negative prompt's embeddings (one row), as the stock pipeline makes them: SDXL models that set
    `force_zeros_for_empty_prompt` (the base model does) use zeros when no negative prompt is given."""
    embeds = encode(pipe, [negative_prompt or ""])
    if not negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        return PromptEmbeds(torch.zeros_like(embeds.states), torch.zeros_like(embeds.pooled))
    return embeds


def _splice(patch: LearnedTokens, module, args, output):
    return patch.splice(args[0], output)


@contextmanager
def adjusted_rows(model: Personalized, rho: float, alpha: float) -> Iterator[None]:
    """While inside, each text encoder sees each of its learned rows adjusted towards its concept row (token
    level)."""
    encoders = text_parts(model.pipe)[1]
    handles = []
    try:
        for rows in model.rows:
            table = encoders[rows.encoder].get_input_embeddings()
            patch = LearnedTokens(adjust(rows.vectors, rows.targets, rho, alpha), rows.first_id)
            patch.requires_grad_(False).to(table.weight.device)
            handles.append(table.register_forward_hook(functools.partial(_splice, patch)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def prompt_embeddings(model: Personalized, prompts: Sequence[Prompt], setting: Setting, *, level: str = "token",
                      align: str = "span", target_encoder: str = "adapted",
                      concept_reduce: str = "error") -> PromptEmbeds:
    """Text embeddings of `prompts` under `setting` (baseline or TEA at `level`: token, prompt or mixed, see the
    module docstring): states `[B, 77, D]` and, for SDXL, pooled `[B, P]`."""
    pipe = model.pipe
    texts = [p.model_text for p in prompts]
    if setting.rho is None:
        return encode(pipe, texts)
    if level == "token":
        with adjusted_rows(model, setting.rho, setting.alpha):
            return encode(pipe, texts)
    tokenizers, encoders = text_parts(pipe)
    if level == "mixed":
        prompts = [p.without_learned() for p in prompts]
    with adjusted_rows(model, setting.rho, setting.alpha) if level == "mixed" else nullcontext():
        embeds = encode(pipe, texts)
        with adapters_disabled(*encoders) if target_encoder == "base" else nullcontext():
            target = encode(pipe, [p.target_text for p in prompts]).to(torch.float32)
    parts = []
    for tokenizer, states, target_states in zip(tokenizers, split(embeds.states, widths(encoders)),
                                                split(target.states, widths(encoders)), strict=True):
        weights = torch.stack([pairing(tokenizer, p, align, concept_reduce) for p in prompts]).to(states.device)
        paired = weights @ target_states  # [B, 77, D_e]: each position's partner in the target prompt
        adjusted = adjust(states, paired, setting.rho, setting.alpha)
        # A position already equal to its partner (the text before the keyword) is kept bit for bit.
        parts.append(torch.where((states.float() == paired).all(dim=-1, keepdim=True), states, adjusted))
    pooled = None if embeds.pooled is None else adjust(embeds.pooled, target.pooled, setting.rho, setting.alpha)
    return PromptEmbeds(torch.cat(parts, dim=-1), pooled)


# ------------------------------------------------------------------------------------------------ images


def make_scheduler(name: str, config):
    """A scheduler by short name, with the model's own noise schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is unknown; choose one of {sorted(SCHEDULERS)}.")
    return SCHEDULERS[name].from_config(config)


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of one image: a pure function of (seed, prompt index, image index)."""
    return sample_seed(seed, prompt_index, image_index)


@torch.no_grad()
def render(pipe, embeds: PromptEmbeds, negative: PromptEmbeds, seeds: Sequence[int], *, steps: int,
           guidance: float, resolution: int) -> list[Image.Image]:
    """Run the stock pipeline on `embeds` (N prompts) and `negative` (one row); image n starts from the noise of its
    own seed."""
    unet = pipe.unet
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    size = resolution // pipe.vae_scale_factor
    # Drawn in fp32 on the CPU: the same initial noise on every device and in every precision.
    latents = torch.stack([torch.randn(unet.config.in_channels, size, size, generator=g) for g in generators])
    return pipe(**pipeline_arguments(embeds, negative), latents=latents.to(unet.device, unet.dtype),
                generator=generators, num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                width=resolution, output_type="pil").images


def render_jobs(model: Personalized, prompts: Sequence[Prompt], jobs: Sequence[tuple[int, int]], setting: Setting,
                negative: PromptEmbeds, *, seed: int, steps: int, guidance: float, resolution: int, level: str,
                align: str = "span", target_encoder: str = "adapted",
                concept_reduce: str = "error") -> list[Image.Image]:
    """The images of `jobs` [(prompt index, image index)] under `setting`, in one pipeline call."""
    used = sorted({p for p, _ in jobs})
    embeds = prompt_embeddings(model, [prompts[p] for p in used], setting, level=level, align=align,
                               target_encoder=target_encoder, concept_reduce=concept_reduce)
    rows = embeds.select([used.index(p) for p, _ in jobs])  # N prompts
    return render(model.pipe, rows, negative, [image_seed(seed, p, i) for p, i in jobs], steps=steps,
                  guidance=guidance, resolution=resolution)


# ------------------------------------------------------------------------------------------------ generate


def tea_level(concepts: Sequence[Concept], mode: str, kind: str) -> str:
    """The level TEA runs at: `mode` token or prompt for every concept, or for auto each concept's own (token when
    its keyword holds learned rows, prompt otherwise): "token", "prompt" or "mixed" when both meet."""
    if mode == "prompt":
        return "prompt"
    without = [c.keyword for c in concepts if not c.learned]
    if mode == "token" and without:
        raise ValueError(f"mode='token' needs learned token rows, and the keyword(s) {without} of the {kind} have "
                         "none; use mode 'auto' (each keyword at its own level) or 'prompt'.")
    if not without:
        return "token"
    return "prompt" if len(without) == len(concepts) else "mixed"


def check_factors(name: str, values: Sequence[float]) -> list[float]:
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty; give at least one value in [0, 1].")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value!r} is outside [0, 1]; TEA's factors are fractions (0 keeps the learned "
                             "embedding, 1 takes the concept word's).")
    return list(dict.fromkeys(float(v) for v in values))


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}.")


def _check_out(out: Path, settings: dict) -> None:
    """Never overwrite silently: a folder is resumed only when it was made with the same settings."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    record = out / RUN_JSON
    if not record.is_file():
        raise ValueError(f"out={str(out)!r} already holds files that tea-lightning did not write; choose a new or "
                         "empty folder (nothing is overwritten).")
    try:
        old = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(record)!r} is not valid JSON ({error}); choose a new --out folder, or delete this one "
                         "to start over.") from error
    differ = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in settings if old.get(k) != settings.get(k)]
    if differ:
        raise ValueError(f"out={str(out)!r} holds images made with other settings ({'; '.join(differ)}). Choose a "
                         "new --out folder or delete this one; nothing was overwritten.")


def _resolve_device(device: str | None, dtype: str) -> tuple[torch.device, str]:
    device = resolve_device(device)
    if dtype == "auto":
        dtype = "fp16" if device.type == "cuda" else "fp32"
    _check_choice("dtype", dtype, [*DTYPES, "auto"])
    return device, dtype


def generate(checkpoint: str | Path | Sequence[str | Path], prompts: Sequence[str], out: str | Path, *,
             rhos: Sequence[float] | None = None, alphas: Sequence[float] = (0.5,), compare: bool = True,
             num_images: int = 4, seed: int = 0, batch_size: int = 4, pretrained: str | None = None,
             scheduler: str = "dpm", steps: int = 50, guidance: float = 7.0, resolution: int | None = None,
             mode: str = "auto", align: str = "span", target_encoder: str = "adapted", target: str = "word",
             concepts: Mapping[str, str] | Sequence[str] | None = None, negative_prompt: str | None = None,
             device: str | None = None, concept_word: str | None = None, concept_reduce: str = "error",
             dtype: str = "auto", progress: bool = True) -> list[ImageRecord]:
    """Generate images with TEA (and the baseline) from any checkpoint; see the module docstring for the layout.

    Args:
        checkpoint: An export folder, a `.ckpt`, or a diffusers / AUTOMATIC1111 / kohya / LoRA / Custom Diffusion
            file (`tea_lightning.checkpoints.ACCEPTED`); several for several concepts.
        prompts: Templates with one `{}` for the keyword, or prompts that hold the keyword(s) literally.
        out: Output folder; an existing one is resumed only if it was made with the same settings.
        rhos: Rotation factors in [0, 1]; every (rho, alpha) pair is generated (a sweep). Default: the authors'
            for the checkpoint's method, 0.1 for DreamBooth and 0.2 otherwise (`checkpoints.default_rho`).
        alphas: Norm factors in [0, 1].
        compare: Also generate the baseline (no TEA) from the same seeds.
        num_images: Images per prompt.
        seed: Base seed; image i of prompt p uses the seed derived from (seed, p, i).
        batch_size: Images per pipeline call.
        pretrained: Base model; default: the one the checkpoint records, else SD 1.5 (SDXL base for SDXL files).
        scheduler: dpm (DPM-Solver multistep, the paper's), ddim, euler, euler_a, pndm or ddpm.
        steps: Denoising steps.
        guidance: Classifier-free guidance scale.
        resolution: Image size in pixels (multiple of 8); default: the model's.
        mode: auto (each keyword at its own level: token when it holds learned rows, else prompt), token or
            prompt.
        align: Prompt level: span (true counterparts) or position (the authors' position-by-position pairing).
        target_encoder: Prompt level: adapted (the fine-tuned text encoder, as the authors) or base (adapters off).
        target: Prompt level: what replaces the keyword in the target prompt. word: the concept word ("<new1> cat"
            → "cat"); modifier: only the learned tokens ("<new1> cat" → "cat cat"), the authors' Custom Diffusion
            (with mode="prompt", align="position").
        concepts: {keyword: concept word} (or "keyword=word" strings): names or overrides each concept.
        negative_prompt: Negative prompt (never adjusted); default: empty.
        device: cuda, cpu, ...; default: cuda when present.
        concept_word: The concept word of the checkpoint's only keyword, when the checkpoint does not record it.
        concept_reduce: error (a several-token concept word is an error) or mean (use the mean of its rows).
        dtype: auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16.
        progress: Show a progress bar.

    Returns:
        One record per image of this call (finished ones from an earlier run included), settings-major.
    """
    # Everything a user can get wrong is checked before the model loads.
    rhos = None if rhos is None else check_factors("rho", rhos)
    alphas = check_factors("alpha", alphas)
    for name, value in (("num_images", num_images), ("batch_size", batch_size), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; use a whole number of at least 1.")
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise ValueError(f"resolution={resolution} is not a positive multiple of 8 (the VAE's factor); try 512.")
    _check_choice("scheduler", scheduler, list(SCHEDULERS))
    _check_choice("mode", mode, ["auto", "token", "prompt"])
    _check_choice("align", align, ["span", "position"])
    _check_choice("target_encoder", target_encoder, ["adapted", "base"])
    _check_choice("target", target, ["word", "modifier"])
    _check_choice("concept_reduce", concept_reduce, ["error", "mean"])
    torch_device, dtype = _resolve_device(device, dtype)
    out = Path(out).expanduser()
    check_writable_folder(out, "out")
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (templates with '{}' or holding the keyword).")
    settings_count = int(compare) + len(rhos or [None]) * len(alphas)  # no rhos: the method's default, one
    total = len(prompts) * num_images * settings_count
    if total > MAX_IMAGES:
        raise ValueError(f"num_images={num_images} asks for {total:,} images ({len(prompts)} prompt(s) x {num_images} "
                         f"x {settings_count} setting(s)), more than the {MAX_IMAGES:,} one run makes. Lower "
                         "--num_images (4 is usual), or split the prompts over several runs.")

    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    if not paths:
        raise ValueError("checkpoint is empty; give the path of an export folder or an embedding/LoRA file.")
    source = checkpoints.merge([checkpoints.read(p, pretrained) for p in paths])
    rhos = [checkpoints.default_rho(source)] if rhos is None else rhos
    found = checkpoints.resolve_concepts(source.concepts, concept_word, concepts)
    if target == "modifier":
        found = checkpoints.modifier_targets(found, list(source.embeddings))
    parsed = [parse_prompt(p, found) for p in prompts]
    base = personalized.base_model(source, pretrained)
    # The checkpoint is known by its content: a folder resumes only with the very tensors that started it.
    settings = {"checkpoint_fingerprint": checkpoints.fingerprint(source), "base_model": base,
                "prompts": [p.text for p in parsed],
                "negative_prompt": negative_prompt or "", "seed": seed, "scheduler": scheduler, "steps": steps,
                "guidance": float(guidance), "resolution": resolution, "mode": mode, "align": align,
                "target_encoder": target_encoder, "concepts": [[c.keyword, c.concept_word] for c in found],
                **({"target": target} if target != "word" else {}),
                "concept_reduce": concept_reduce, "dtype": dtype}
    _check_out(out, settings)

    model = personalized.build(source, found, pretrained, concept_reduce)
    pipe = model.pipe
    parsed = [parse_prompt(p, model.concepts) for p in prompts]  # with multi-vector phrases
    for prompt in parsed:
        token_spans(pipe.tokenizer, prompt)
    level = tea_level(model.concepts, mode, source.kind)
    if level != "token":
        for prompt in parsed:
            for tokenizer in text_parts(pipe)[0]:
                pairing(tokenizer, prompt.without_learned() if level == "mixed" else prompt, align, concept_reduce)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.to(torch_device)
    if dtype != "fp32":
        pipe.to(dtype=DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # what a killed run left half-written
    write_json({**settings, "checkpoint": source.path}, out / RUN_JSON)
    runs = ([Setting()] if compare else []) + [Setting(r, a) for r in rhos for a in alphas]
    jobs = [(p, i) for p in range(len(parsed)) for i in range(num_images)]

    def record(setting: Setting, p: int, i: int) -> ImageRecord:
        return ImageRecord(
            path=str(out / setting.tag / f"p{p:03d}-i{i:03d}.png"), tag=setting.tag, prompt=parsed[p].text,
            template=parsed[p].template, prompt_index=p, image_index=i, seed=image_seed(seed, p, i),
            mode="baseline" if setting.rho is None else "tea", rho=setting.rho, alpha=setting.alpha,
            level=None if setting.rho is None else level, checkpoint=source.path, base_model=base,
            keyword=", ".join(c.keyword for c in found), concept_word=", ".join(c.concept_word for c in found),
            scheduler=scheduler, steps=steps, guidance=float(guidance), resolution=resolution)

    def finished(r: ImageRecord) -> bool:
        return Path(r.path).is_file() and Path(r.path).with_suffix(".json").is_file()

    # Every setting runs the same batches of (prompt, image) pairs, so baseline and TEA differ only by TEA.
    batches = [jobs[s:s + batch_size] for s in range(0, len(jobs), batch_size)]
    todo = [(b, s) for b in batches for s in runs if not all(finished(record(s, p, i)) for p, i in b)]
    with torch.no_grad():
        negative = negative_embeddings(pipe, negative_prompt)
        with tqdm(total=sum(len(b) for b, _ in todo), unit="image", desc="generating", disable=not progress) as bar:
            for batch, setting in todo:
                images = render_jobs(model, parsed, batch, setting, negative, seed=seed, steps=steps,
                                     guidance=guidance, resolution=resolution, level=level, align=align,
                                     target_encoder=target_encoder, concept_reduce=concept_reduce)
                for (p, i), image in zip(batch, images, strict=True):
                    r = record(setting, p, i)
                    if not finished(r):
                        write_png(image, Path(r.path))
                        fields = {k: v for k, v in asdict(r).items() if k != "path"}
                        write_json(fields, Path(r.path).with_suffix(".json"))  # last: marks the image finished
                bar.update(len(batch))

    records = [record(s, p, i) for s in runs for p, i in jobs]
    shown = range(min(num_images, GRID_IMAGES))
    cells = [[[_load(record(s, p, i).path) for i in shown] for s in runs] for p in range(len(parsed))]
    write_png(table(cells, [p.text for p in parsed], [s.label for s in runs]), out / GRID)
    return records


def _load(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def sample_grid(module, templates: Sequence[str], *, rho: float = 0.2, alpha: float = 0.5, num_images: int = 1,
                seed: int = 0, steps: int = 25, guidance: float = 7.0, resolution: int | None = None,
                scheduler: str = "dpm") -> Image.Image:
    """Baseline and TEA images of a method's current state, as a table: one row per template, one column per
    setting. Used by the `SampleImages` callback; runs on the module's own parts, in their precision."""
    model = personalized.from_module(module, make_scheduler(scheduler, module.noise_scheduler.config))
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    prompts = [parse_prompt(t, model.concepts) for t in templates]
    level = tea_level(model.concepts, "auto", type(module).__name__)
    for prompt in prompts:
        pairing(pipe.tokenizer, prompt) if level == "prompt" else token_spans(pipe.tokenizer, prompt)
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    jobs = [(p, i) for p in range(len(prompts)) for i in range(num_images)]
    settings = [Setting(), Setting(rho, alpha)]
    with torch.no_grad():
        negative = negative_embeddings(pipe, None)
        columns = [render_jobs(model, prompts, jobs, s, negative, seed=seed, steps=steps, guidance=guidance,
                               resolution=resolution, level=level) for s in settings]
    cells = [[column[p * num_images:(p + 1) * num_images] for column in columns] for p in range(len(prompts))]
    return table(cells, [p.text for p in prompts], [s.label for s in settings])


__all__ = ["ImageRecord", "Setting", "generate", "prompt_embeddings", "render", "sample_grid"]
