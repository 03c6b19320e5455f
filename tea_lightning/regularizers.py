"""Training-time regularisers: small objects that turn the learned vectors into one penalty each.

A regulariser is configured in YAML under ``model.init_args.regularizers`` (``class_path`` + ``init_args``); the
module adds each one's value to the diffusion loss and logs it as ``train/<name>``.
"""

from __future__ import annotations

import torch


class Regularizer:
    """Base class. Subclasses set `name` and implement `__call__`.

    `vectors` are the method's learned keyword vectors `[k, D]` (fp32, with gradient); `concept` holds the
    matching concept-word rows `[k, D]` (no gradient). The return value is a 0-d tensor, already weighted.
    """

    name = "regularizer"

    def __call__(self, vectors: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(vectors, concept)")
