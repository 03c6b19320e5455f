"""Training-time regularisers: small objects that turn the learned vectors into one penalty each.

A regulariser is configured in YAML under ``model.init_args.regularizers`` (``class_path`` + ``init_args``); the
module adds each one's value to the diffusion loss and logs it as ``train/<name>``:

```yaml
model:
  init_args:
    regularizers:
      - class_path: tea_lightning.regularizers.NormPenalty
        init_args: {weight: 1.0e-3, max_ratio: 1.5}
      - class_path: tea_lightning.regularizers.DirectionPenalty
        init_args: {weight: 1.0e-3}
```

A new regulariser is a subclass with a `name` and a `__call__`; nothing else changes. The penalties here pull
towards the concept word c, the same anchor TEA corrects towards at inference (method.md §2), so they measure the
same quantities the drift callbacks log (method.md §3).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F


class Regularizer:
    """Base class. Subclasses set `name` and implement `__call__`.

    `vectors` are the method's learned keyword vectors `[k, D]` (fp32, with gradient); `concept` holds the
    matching concept-word rows `[k, D]` (no gradient). The return value is a 0-d tensor, already weighted.
    A regulariser that reads `concept` sets `needs_concept_word = True`, so training refuses to start when the
    method has no concept word.
    """

    name = "regularizer"
    needs_concept_word = False

    def __call__(self, vectors: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(vectors, concept)")


def check_weight(owner: str, weight: float) -> float:
    """A penalty weight: finite and ≥ 0 (0 switches the penalty off but still logs it)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
        raise ValueError(f"{owner}(weight={weight!r}): the weight must be a finite number ≥ 0, e.g. 1e-3.")
    return float(weight)


def norm_ratio(vectors: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
    """|v| / |c| per row `[k]` (differentiable in `vectors`; `concept` is treated as a constant)."""
    return vectors.norm(dim=-1) / concept.detach().norm(dim=-1)


class NormPenalty(Regularizer):
    """Penalise learned vectors whose norm grows past `max_ratio` × the concept word's norm.

    value = weight · mean over the k vectors of max(0, |v|/|c| − max_ratio)². Zero (and no gradient) inside the
    allowed norm; a soft wall outside that pushes harder the further the norm has grown.

    Args:
        weight: Multiplier of the penalty (≥ 0).
        max_ratio: Largest norm ratio |v|/|c| that costs nothing (> 0; 1.0 = the concept word's own norm).
    """

    name = "norm_penalty"
    needs_concept_word = True

    def __init__(self, weight: float = 1e-3, max_ratio: float = 1.5) -> None:
        self.weight = check_weight("NormPenalty", weight)
        if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not 0 < max_ratio < math.inf:
            raise ValueError(f"NormPenalty(max_ratio={max_ratio!r}): the largest free norm ratio |v|/|c| must be a "
                             "finite number > 0, e.g. 1.5.")
        self.max_ratio = float(max_ratio)

    def __call__(self, vectors: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        excess = (norm_ratio(vectors, concept) - self.max_ratio).clamp_min(0)  # [k]
        return self.weight * excess.square().mean()


class DirectionPenalty(Regularizer):
    """Penalise learned vectors that turn away from the concept word: weight · mean over k of (1 − cos(v, c)).

    Args:
        weight: Multiplier of the penalty (≥ 0).
    """

    name = "direction_penalty"
    needs_concept_word = True

    def __init__(self, weight: float = 1e-3) -> None:
        self.weight = check_weight("DirectionPenalty", weight)

    def __call__(self, vectors: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(vectors, concept.detach().to(vectors.dtype), dim=-1)  # [k]
        return self.weight * (1 - cos).mean()


def check_regularizers(module: Any) -> None:
    """Refuse, before the first step, regularisers the method cannot feed.

    Args:
        module: A `DiffusionModule` (reads `regularizers`, `concept_word`, `learned_vectors()`).

    Raises:
        ValueError: Two regularisers log under one name, the method learns no token vectors, or a regulariser
            needs a concept word the method does not have.
    """
    regularizers = module.regularizers
    if not regularizers:
        return
    clashes = [name for name, count in Counter(r.name for r in regularizers).items() if count > 1]
    if clashes:
        raise ValueError(f"model.regularizers has several entries named {clashes}: each is logged as "
                         "train/<name>, so list each regulariser once (combine weights into one entry).")
    method = type(module).__name__
    try:
        module.learned_vectors()
    except NotImplementedError:
        raise ValueError(f"model.regularizers {[r.name for r in regularizers]} act on learned token vectors, but "
                         f"{method} learns none. Remove them, or train a method with a learned token "
                         "(TextualInversion, Custom Diffusion's modifier token).") from None
    needing = [r.name for r in regularizers if r.needs_concept_word]
    if needing and not module.concept_word:
        raise ValueError(f"model.regularizers {needing} pull the keyword towards its concept word, but this "
                         f"{method} has none. Set model.init_args.concept_word, or remove them.")
