"""Seeds derived from indices, so every sample, step and image is a pure function of (seed, index, ...)."""

from __future__ import annotations

import numpy as np


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, index, ...): nearby indices get unrelated streams."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))
