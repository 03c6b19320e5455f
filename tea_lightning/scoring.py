"""The scores of one generated image, the way the paper computes them (method.md §4): the models and the math.

One image gets five numbers:

- CLIP-T three ways, 100·max(cos, 0) between the CLIP image embedding and the text embedding of the full prompt
  (the template filled with the concept word, never the learned keyword), of the concept segment ("a man") and of
  the context segment ("wearing glasses and playing a guitar");
- CLIP-I, 100·cos between the CLIP image embeddings of the image and of the reference images (mean over all
  references, or one anchor image as the authors did);
- DINO-I, the same with a DINO backbone (``facebook/dinov2-base`` with the mean of all output tokens as the
  authors did, or the CLS token as DreamBooth-style work does).

The score math (:func:`clip_t`, :func:`image_alignment`) is pure torch on embeddings; :class:`ClipEncoder` and
:class:`DinoEncoder` load the models from a hub id or a local folder (checked from its config alone by
:func:`clip_source` and :func:`dino_source`), and :func:`encode_images` embeds image files batch by batch.

CLIP is run with transformers' ``CLIPModel`` directly, computing exactly what torchmetrics' ``CLIPScore`` computes
per image (the tests check the two agree): torchmetrics 1.9 fails on transformers 5, whose ``get_image_features``
returns an output object (Lightning-AI/torchmetrics#3407), and only loads hub ids containing "openai".
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tea_lightning.images import read_image
from tea_lightning.prompt_sets import EvalPrompt, fill

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dinov2-base"
DINO_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit")


# ------------------------------------------------------------------------------------------------------ the scores


def _unit(features: torch.Tensor) -> torch.Tensor:
    return features.float() / features.float().norm(dim=-1, keepdim=True)


def clip_t(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP text-image score of each row pair, 100·max(cos, 0) (torchmetrics' ``CLIPScore`` for one image).

    Args:
        image_features: ``[N, D]`` CLIP image embeddings (any norm).
        text_features: ``[N, D]`` CLIP text embeddings, row i belonging to image i.
    """
    return 100 * (_unit(image_features) * _unit(text_features)).sum(-1).clamp(min=0)  # [N]


def image_alignment(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Image-image score of each row against a reference set: 100·cos, averaged over the references.

    Args:
        features: ``[N, D]`` embeddings of generated images.
        references: ``[R, D]`` embeddings of the reference images (R = 1 for the single-anchor mode).
    """
    return 100 * (_unit(features) @ _unit(references).T).mean(-1)  # [N]


def segment_texts(row: EvalPrompt, concept_word: str) -> tuple[str, str, str]:
    """The three texts CLIP-T scores an image against: full prompt, concept segment, context segment.

    The full prompt is the template filled with the concept word ("A photo of a man wearing glasses"), not the
    keyword the model learned, which CLIP's text encoder has never seen.
    """
    return fill(row.prompt, concept_word), fill(row.concept, concept_word), row.context


# ------------------------------------------------------------------------------------------------------- models


def _model_source(name_or_path: str, what: str, model_types: Sequence[str], example: str) -> str:
    """Check that `name_or_path` is a hub id or local folder of one of `model_types`, reading only its config."""
    from transformers import AutoConfig

    expanded = os.path.expanduser(name_or_path)
    fix = (f"give a hub id (e.g. {example!r}; downloaded once beforehand when working offline) or a local folder "
           f"written by save_pretrained")
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ValueError(f"{what}={name_or_path!r} is a folder without config.json, not a transformers model: "
                             f"{fix}")
        source = expanded
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"{what}={name_or_path!r}: no such model folder; {fix}")
    else:
        source = name_or_path
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:  # offline and not cached, a typo in a hub id, an unknown model type
        reason = str(error).rstrip(".")
        raise FileNotFoundError(f"Could not load {what}={name_or_path!r}: {reason}. {fix[0].upper()}{fix[1:]}") \
            from error
    if config.model_type not in model_types:
        raise ValueError(f"{what}={name_or_path!r} is a {config.model_type!r} model, not one of {list(model_types)}; "
                         f"{fix}")
    return source


def _image_processor(source: str):
    # The PIL backend whatever is installed: scores must not depend on whether torchvision happens to be present
    # (transformers 5 prefers torchvision's resize when it is), and PIL is what the authors' transformers 4 used.
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(source, backend="pil")
    return AutoImageProcessor.from_pretrained(source, use_fast=False)


def _projected(output: Any) -> torch.Tensor:
    """`get_*_features` returns a tensor in transformers 4 and an output object (projection in `pooler_output`) in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEncoder:
    """CLIP image and text embeddings (unit norm, fp32, on CPU), from a hub id or a local folder.

    Args:
        source: Hub id or folder, checked with `clip_source`.
        device: Where the model runs.
    """

    def __init__(self, source: str, device: torch.device) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.device = device
        self.model = CLIPModel.from_pretrained(source).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.processor = _image_processor(source)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The model's input for one image (resize, crop, normalise): ``[3, H, W]``."""
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``[N, D]`` of preprocessed images ``[N, 3, H, W]``."""
        return _unit(_projected(self.model.get_image_features(pixel_values=pixels.to(self.device)))).cpu()

    @torch.inference_mode()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _unit(_projected(self.model.get_text_features(**tokens))).cpu()  # [N, D]


class DinoEncoder:
    """DINO image embeddings (unit norm, fp32, on CPU): the mean of all output tokens, or the CLS token.

    Args:
        source: Hub id or folder, checked with `dino_source`.
        pooling: ``mean`` (all output tokens, as the TEA authors did with DINOv2) or ``cls`` (DreamBooth-style).
        device: Where the model runs.
    """

    def __init__(self, source: str, pooling: str, device: torch.device) -> None:
        from transformers import AutoModel

        self.device, self.pooling = device, pooling
        self.model = AutoModel.from_pretrained(source).to(device).eval()
        self.processor = _image_processor(source)

    pixels = ClipEncoder.pixels  # the same call on this model's own image processor

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``[N, D]`` of preprocessed images ``[N, 3, H, W]``."""
        tokens = self.model(pixel_values=pixels.to(self.device)).last_hidden_state  # [N, 1 + patches (+ regs), D]
        pooled = tokens.mean(1) if self.pooling == "mean" else tokens[:, 0]
        return _unit(pooled).cpu()


def clip_source(name_or_path: str) -> str:
    """Validate a CLIP model (hub id or local folder) from its config alone; return what `from_pretrained` takes."""
    return _model_source(name_or_path, "clip_model", ("clip",), DEFAULT_CLIP)


def dino_source(name_or_path: str) -> str:
    """Validate a DINO/ViT backbone (hub id or local folder) from its config alone."""
    return _model_source(name_or_path, "dino_model", DINO_MODEL_TYPES, DEFAULT_DINO)


def _prefetched(items: Sequence[Any], batch_size: int, prepare: Callable[[Any], Any], workers: int):
    """Yield `prepare(item)` results batch by batch, computed in `workers` threads up to two batches ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead: deque[list[Future]] = deque()
        for start in range(0, len(items), batch_size):
            ahead.append([pool.submit(prepare, item) for item in items[start:start + batch_size]])
            if len(ahead) > 2:
                yield [future.result() for future in ahead.popleft()]
        while ahead:
            yield [future.result() for future in ahead.popleft()]


def encode_images(paths: Sequence[Path], clip: ClipEncoder, dino: DinoEncoder, batch_size: int,
                  workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and DINO embeddings of image files, `batch_size` images per forward pass.

    Decoding and preprocessing (PIL, which releases the GIL) run in `workers` threads (default: the CPU count, at
    most 8) while the models work on the previous batch: on a GPU they, not the models, set the pace.

    Returns:
        ``([N, D_clip], [N, D_dino])`` unit vectors on the CPU.
    """
    def prepare(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_image(path)
        return clip.pixels(image), dino.pixels(image)

    workers = workers or min(8, os.cpu_count() or 1)
    clip_out, dino_out = [], []
    for batch in _prefetched(paths, batch_size, prepare, workers):
        clip_pixels, dino_pixels = (torch.stack(part) for part in zip(*batch, strict=True))  # [B, 3, H, W]
        clip_out.append(clip.embed(clip_pixels))
        dino_out.append(dino.embed(dino_pixels))
    return torch.cat(clip_out), torch.cat(dino_out)
