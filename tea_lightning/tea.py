"""Test-time embedding adjustment (TEA), method.md §2.

A learned keyword embedding v drifts from its concept word t in norm and in direction. TEA pulls it back at
inference: both are rescaled to the mixed norm m = (1 - alpha)|v| + alpha|t|, then v turns towards t by the
fraction rho of the angle between them, along the great circle (SLERP).

The letters follow method.md, not the paper, which swaps them: the paper's alpha is our ``rho`` and its beta
our ``alpha``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def adjust(v: Tensor, target: Tensor, rho: float = 0.2, alpha: float = 0.5) -> Tensor:
    """Rescale ``v`` to the mixed norm and rotate it towards ``target`` (method.md §2).

    With v' = m·v/|v|, t' = m·t/|t| and theta = arccos(clamp(<v/|v|, t/|t|>, -1, 1)) the result is the SLERP
    ``sin((1 - rho)·theta)/sin(theta)·v' + sin(rho·theta)/sin(theta)·t'``, so ``|result| = m`` and
    ``angle(result, target) = (1 - rho)·theta``. ``rho = alpha = 0`` returns ``v`` and ``rho = alpha = 1``
    returns ``target``; ``rho = 0`` alone changes only the norm.

    Where sin(theta) is too small to divide by:

    - parallel (theta near 0): linear interpolation ``(1 - rho)·v' + rho·t'``, rescaled to norm m;
    - antiparallel (theta near pi): there is no unique great circle from v to t, so the rotation uses a fixed
      plane: the one spanned by v and the basis vector e_k, where k indexes v's smallest-magnitude component
      (e_k Gram-Schmidt-orthogonalised against v gives u). The result ``m·(cos(rho·theta)·v/|v| +
      sin(rho·theta)·u)`` is deterministic, finite, has norm m and lies at angle (1 - rho)·theta from t (up to
      the residual angle between -v and t, below the threshold).

    "Too small" is ``sin(theta) < 30·sqrt(eps)`` of the compute dtype (1e-2, about 0.6 degrees, in fp32).
    arccos near ±1 resolves the angle only to about sqrt(eps); SLERP near pi divides that error by sin(theta),
    so a smaller threshold would turn v in a wrong direction near antiparallel.

    Args:
        v: Learned embedding(s), ``[..., d]`` with d >= 2 (one row per vector of a multi-vector token, or one
            per prompt position).
        target: Concept-word embedding, broadcastable to ``v`` (e.g. ``[d]`` against ``v`` of ``[n, d]``).
        rho: Rotation factor in [0, 1]: the fraction of the angle to turn from v towards target.
        alpha: Norm factor in [0, 1]: 0 keeps |v|, 1 takes |target|.

    Returns:
        The adjusted embedding(s), shape ``broadcast(v, target)``, dtype of ``v``.

    Raises:
        ValueError: If rho or alpha is outside [0, 1], the shapes do not broadcast, d < 2, or a vector has
            zero norm.
    """
    _check_factor("rho", rho)
    _check_factor("alpha", alpha)
    if not (v.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"v and target must be floating-point tensors, got {v.dtype} and {target.dtype}")
    if v.ndim == 0 or target.ndim == 0 or v.shape[-1] != target.shape[-1]:
        raise ValueError(
            f"v {tuple(v.shape)} and target {tuple(target.shape)} must share the last (embedding) dimension"
        )
    if v.shape[-1] < 2:
        raise ValueError(f"TEA rotates embeddings, so it needs an embedding dimension >= 2, got {v.shape[-1]}")
    try:
        shape = torch.broadcast_shapes(v.shape, target.shape)
    except RuntimeError as error:
        raise ValueError(f"target {tuple(target.shape)} does not broadcast to v {tuple(v.shape)}") from error

    # fp32 at least: fp16/bf16 rows lose the angle in arccos. Not fp64 by force: MPS has no float64.
    dtype = torch.promote_types(torch.promote_types(v.dtype, target.dtype), torch.float32)
    v_full = v.to(dtype).expand(shape)  # [..., d]
    t_full = target.to(dtype).expand(shape)  # [..., d]
    v_norm = v_full.norm(dim=-1, keepdim=True)  # [..., 1]
    t_norm = t_full.norm(dim=-1, keepdim=True)  # [..., 1]
    if bool((v_norm == 0).any()) or bool((t_norm == 0).any()):
        raise ValueError("v and target must have non-zero norm in every row: a zero vector has no direction")
    if rho == 0 and alpha == 0:
        # Identity; skipping the rescale keeps v bit-exact instead of m·v/|v| with rounding.
        return v.expand(shape).clone()

    v_hat = v_full / v_norm
    t_hat = t_full / t_norm
    m = (1 - alpha) * v_norm + alpha * t_norm  # [..., 1]
    cos = (v_hat * t_hat).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)  # [..., 1]
    sin = torch.sin(theta)

    # SLERP is linear in v' and t', which share the norm m: interpolate unit vectors and scale by m once.
    degenerate = sin < 30 * math.sqrt(torch.finfo(dtype).eps)
    safe_sin = torch.where(degenerate, torch.ones_like(sin), sin)  # no 0/0, so no NaN even in discarded entries
    slerp = (torch.sin((1 - rho) * theta) * v_hat + torch.sin(rho * theta) * t_hat) / safe_sin
    lerp = (1 - rho) * v_hat + rho * t_hat
    turn = torch.cos(rho * theta) * v_hat + torch.sin(rho * theta) * _orthogonal_unit(v_hat)
    direction = torch.where(degenerate, torch.where(cos > 0, lerp, turn), slerp)
    # Exact for SLERP and the antiparallel turn up to rounding; required for the linear fallback.
    result = m * direction / direction.norm(dim=-1, keepdim=True)
    return result.to(v.dtype)


def _orthogonal_unit(v_hat: Tensor) -> Tensor:
    """Unit vector orthogonal to each unit row of ``v_hat``: e_k minus its projection, k = argmin |v_hat_k|.

    The smallest component keeps e_k far from v (|v_hat_k| <= 1/sqrt(d)), so the residual has norm at least
    sqrt(1 - 1/d) and never cancels; argmin picks the first index on ties, so the choice is deterministic.
    """
    k = v_hat.abs().argmin(dim=-1, keepdim=True)  # [..., 1]
    e_k = torch.zeros_like(v_hat).scatter_(-1, k, 1.0)
    u = e_k - v_hat.gather(-1, k) * v_hat
    return u / u.norm(dim=-1, keepdim=True)


def _check_factor(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
