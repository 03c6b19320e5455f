"""Drift measures, method.md §3: how far a learned keyword V* has moved from its concept word c.

Vector level: norm, norm ratio, angle and cosine to c, cosine to the initial value, and where |V*| sits among
the vocabulary row norms. Set level (the paper's Figure 2): L2, Hausdorff, Mahalanobis and KL between sets of
sentence encodings, each an ``[n, d]`` tensor, one row per sentence; ``pool_hidden_states`` turns the text
encoder's output into those rows and ``contextual_distances`` computes everything the drift callback and report log.

All measures are computed in fp64 without gradients and return 0-d float64 tensors (set distances) or Python
floats (vector drift).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# cdist's matmul shortcut (|a|^2 + |b|^2 - 2ab) loses digits and leaves non-zero self-distances.
_EXACT = "donot_use_mm_for_euclid_dist"


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean over a in ``a`` of the mean over b in ``b`` of |a - b|.

    Not zero for a set against itself unless it holds a single point: it averages over all pairs.

    Args:
        a: Set A, ``[n, d]``.
        b: Set B, ``[m, d]``.

    Returns:
        0-d float64 tensor.
    """
    a, b = _check_pair(a, b)
    return torch.cdist(a, b, compute_mode=_EXACT).mean()


def hausdorff_distance(a: Tensor, b: Tensor) -> Tensor:
    """Symmetric Hausdorff distance: max(max_a min_b |a - b|, max_b min_a |a - b|).

    Args:
        a: Set A, ``[n, d]``.
        b: Set B, ``[m, d]``.

    Returns:
        0-d float64 tensor.
    """
    a, b = _check_pair(a, b)
    dist = torch.cdist(a, b, compute_mode=_EXACT)  # [n, m]
    return torch.maximum(dist.min(dim=1).values.max(), dist.min(dim=0).values.max())


def intra_hausdorff(a: Tensor) -> Tensor:
    """Intra-set Hausdorff distance: max over i of min over j != i of |a_i - a_j|.

    The largest nearest-neighbour distance within the set; it shrinks as V* makes every sentence alike.

    Args:
        a: Set A, ``[n, d]`` with n >= 2.

    Returns:
        0-d float64 tensor.
    """
    a = _check_set(a, "a", min_rows=2)
    dist = torch.cdist(a, a, compute_mode=_EXACT)  # [n, n]
    dist.fill_diagonal_(math.inf)
    return dist.min(dim=1).values.max()


DEFAULT_SHRINKAGE = 0.1  # chosen from the measurements in docs/drift_metrics.md (bench/mahalanobis_shrinkage.py)


def check_shrinkage(shrinkage: float, what: str = "shrinkage") -> float:
    """``shrinkage`` itself when it is a number in [0, 1], else a ValueError naming ``what``."""
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"{what} must be a float in [0, 1] (0 = the authors' plain pseudo-inverse, "
                         f"{DEFAULT_SHRINKAGE} = the default), got {shrinkage!r}")
    return float(shrinkage)


def mahalanobis_distance(a: Tensor, b: Tensor, shrinkage: float = 0.0) -> Tensor:
    """Mean over a in ``a`` of sqrt((a - mu_B)^T Sigma^-1 (a - mu_B)), Sigma from ``b``.

    mu_B and Sigma_B are the mean and unbiased covariance (n - 1, like ``numpy.cov``) of ``b``.

    - ``shrinkage`` = 0 (the paper's): Sigma^-1 is the pseudo-inverse of Sigma_B (cut-off d·eps relative to the
      largest eigenvalue, ``torch.linalg.pinv``'s default). With fewer sentences than dimensions (200 against 768)
      Sigma_B is singular: the distance ignores every direction B does not span (moving ``a`` along such a
      direction changes nothing), and which small eigenvalues survive the cut-off depends on the precision, so the
      same sets give very different numbers in fp32 and fp64.
    - ``shrinkage`` = lambda in (0, 1]: Sigma = (1 - lambda)·Sigma_B + lambda·(trace(Sigma_B)/d)·I, full rank, so
      every direction counts (off B's span it is scaled by the mean variance) and the cut-off no longer matters.

    Computed from the SVD of B's centred rows, never forming the d x d matrix, so wide sets (flattened encodings,
    77 x 768) fit in memory: centred = U S V^T gives Sigma_B's non-zero eigenvalues e = S^2 / (m - 1) along V's rows.

    Args:
        a: Set A, ``[n, d]``.
        b: Set B, ``[m, d]`` with m >= 2.
        shrinkage: lambda in [0, 1]; 0 is the plain pseudo-inverse.

    Returns:
        0-d float64 tensor.
    """
    check_shrinkage(shrinkage)
    a, b = _check_pair(a, b, min_rows_b=2)
    m, d = b.shape
    mu = b.mean(dim=0)  # [d]
    diff = a - mu  # [n, d]
    _, s, vh = torch.linalg.svd(b - mu, full_matrices=False)  # s [r], vh [r, d]
    eigenvalues = s.square() / (m - 1)  # [r]
    if shrinkage == 0:
        keep = eigenvalues > d * torch.finfo(eigenvalues.dtype).eps * eigenvalues.max()
        whitened = (diff @ vh[keep].T) / eigenvalues[keep].sqrt()  # [n, r']
        return whitened.square().sum(dim=1).sqrt().mean()
    floor = shrinkage * eigenvalues.sum() / d  # lambda·trace(Sigma_B)/d: the shrunk variance of every direction
    along = diff @ vh.T  # [n, r] coordinates in B's span
    outside = diff - along @ vh  # [n, d] the part B does not span
    squared = (along.square() / ((1 - shrinkage) * eigenvalues + floor)).sum(dim=1) \
        + outside.square().sum(dim=1) / floor
    return squared.sqrt().mean()


def spread(a: Tensor) -> Tensor:
    """Dispersion of a set: the root mean squared distance of its rows to their mean, sqrt(mean_i |a_i - mu|^2).

    It replaces the intra-set Mahalanobis distance, which is a constant: scored against its own mean and
    pseudo-inverse covariance a set's mean squared distance is (n - 1)/n · rank(Sigma) whatever the data, so with
    n <= d every row sits at (n - 1)/sqrt(n) (6.1664 for 40 sentences). The spread moves: it shrinks as the rows
    become alike (V* dominating every sentence) and is 0 for identical rows.

    Args:
        a: Set A, ``[n, d]``.

    Returns:
        0-d float64 tensor.
    """
    a = _check_set(a, "a")
    return (a - a.mean(dim=0)).square().sum(dim=1).mean().sqrt()


def kl_divergence(a: Tensor, b: Tensor, temperature: float = 1.0, cut: str | None = None) -> Tensor:
    """KL(p || q) between the relational structures of two index-aligned sets.

    Rows are L2-normalised; each set's cosine-similarity matrix is divided by ``temperature`` and
    softmax-normalised row-wise, then 1e-8 is added (as the authors' code does, so the rows no longer sum
    exactly to 1). p comes from ``a``, q from ``b``; KL is summed per row and averaged over rows. Row i of
    ``a`` and row i of ``b`` must be the same sentence with different fillers.

    Sets of different sizes (P against S) have no such pairing; ``cut`` says how to force one, and either way row i
    of ``a`` meets row i of ``b`` although they are unrelated sentences:

    - ``"before"``: both sets are cut to their first min(n, m) rows, then compared as above (proper distributions,
      KL >= 0);
    - ``"after"`` (the authors' code): each softmax runs over its whole set, then both matrices are cut to their
      first min(n, m) rows and columns; the cut rows no longer sum to 1, so the value can be negative.

    Args:
        a: Set A, ``[n, d]``.
        b: Set B, ``[n, d]``, index-aligned with ``a`` (any number of rows with ``cut``).
        temperature: tau > 0.
        cut: None (the sets must be the same size), ``"before"`` or ``"after"`` the softmax.

    Returns:
        0-d float64 tensor.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite float (default 1.0), got {temperature!r}")
    if cut not in (None, "before", "after"):
        raise ValueError(f"cut={cut!r}: use None (same-size sets), 'before' or 'after' (the authors') the softmax")
    a, b = _check_pair(a, b)
    if a.shape[0] != b.shape[0] and cut is None:
        raise ValueError(
            f"kl_divergence compares index-aligned sets, so a and b need the same number of rows, got "
            f"{a.shape[0]} and {b.shape[0]}; fill the same sentences with both words"
        )
    rows = min(a.shape[0], b.shape[0])
    if cut == "before":
        a, b = a[:rows], b[:rows]
    p = _similarity_softmax(a, temperature)[:rows, :rows] + 1e-8  # [rows, rows]
    q = _similarity_softmax(b, temperature)[:rows, :rows] + 1e-8  # [rows, rows]
    return (p * (p.log() - q.log())).sum(dim=1).mean()


def _similarity_softmax(x: Tensor, temperature: float) -> Tensor:
    unit = torch.nn.functional.normalize(x, dim=1)
    return torch.softmax(unit @ unit.T / temperature, dim=1)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last dimension (broadcasting), in fp64.

    Raises:
        ValueError: If a vector has zero norm.
    """
    a, b = _as_f64(a), _as_f64(b)
    a_norm, b_norm = a.norm(dim=-1), b.norm(dim=-1)
    if bool((a_norm == 0).any()) or bool((b_norm == 0).any()):
        raise ValueError("cosine of a zero vector is undefined; check the embedding rows passed in")
    return (a * b).sum(dim=-1) / (a_norm * b_norm)


def angle_deg(a: Tensor, b: Tensor) -> Tensor:
    """Angle in degrees along the last dimension (broadcasting): degrees(arccos(clamp(cosine, -1, 1)))."""
    return torch.rad2deg(torch.arccos(cosine(a, b).clamp(-1.0, 1.0)))


def norm_percentile(norm: float | Tensor, vocab_norms: Tensor) -> float:
    """Percentage (0 to 100) of vocabulary row norms strictly below ``norm``.

    Args:
        norm: |V*|, a float or 0-d tensor.
        vocab_norms: ``[V]`` norms of the vocabulary rows, e.g. ``embedding.weight.norm(dim=-1)``.
    """
    vocab_norms = _as_f64(vocab_norms)
    if vocab_norms.ndim != 1 or vocab_norms.numel() == 0:
        raise ValueError(
            f"vocab_norms must be a non-empty 1-D tensor, got shape {tuple(vocab_norms.shape)}; "
            "pass embedding.weight.norm(dim=-1)"
        )
    return 100.0 * (vocab_norms < float(norm)).double().mean().item()


def vector_drift(v: Tensor, concept: Tensor, initial: Tensor, vocab_norms: Tensor) -> dict[str, float]:
    """Vector-level drift of a learned embedding (method.md §3).

    For a multi-vector token (``v`` of shape ``[k, d]``) every entry is the mean over the k vectors of the
    per-vector value (so ``norm_ratio`` is the mean norm over |c|).

    Args:
        v: Learned embedding V*, ``[d]`` or ``[k, d]``.
        concept: Concept-word embedding c, ``[d]``.
        initial: V* at initialisation, same shape as ``v``.
        vocab_norms: ``[V]`` norms of all vocabulary rows.

    Returns:
        ``norm`` |V*|, ``concept_norm`` |c|, ``norm_ratio`` |V*|/|c|, ``cosine_concept`` and
        ``angle_concept_deg`` between V* and c, ``cosine_initial`` between V* and its initial value,
        ``norm_percentile`` the percentage of vocabulary norms strictly below |V*|.
    """
    v = _as_f64(v)
    v = v.unsqueeze(0) if v.ndim == 1 else v  # [k, d]
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"v must be [d] or [k, d] with k >= 1, got shape {tuple(v.shape)}")
    concept = _as_f64(concept)
    if concept.shape != v.shape[1:]:
        raise ValueError(f"concept must be [{v.shape[1]}] like a row of v, got shape {tuple(concept.shape)}")
    initial = _as_f64(initial)
    initial = initial.unsqueeze(0) if initial.ndim == 1 else initial  # [k, d]
    if initial.shape != v.shape:
        raise ValueError(f"initial must have the shape of v {tuple(v.shape)}, got {tuple(initial.shape)}")
    norms = v.norm(dim=-1)  # [k]
    concept_norm = concept.norm()
    return {
        "norm": norms.mean().item(),
        "concept_norm": concept_norm.item(),
        "norm_ratio": (norms / concept_norm).mean().item(),
        "cosine_concept": cosine(v, concept).mean().item(),
        "angle_concept_deg": angle_deg(v, concept).mean().item(),
        "cosine_initial": cosine(v, initial).mean().item(),
        "norm_percentile": sum(norm_percentile(n, vocab_norms) for n in norms) / len(norms),
    }


# --------------------------------------------------------------------------------------- sentence sets (Figure 2)

HIDDEN_STATES = ("last", "eos", "mean", "flatten")


def pool_hidden_states(hidden: Tensor, input_ids: Tensor, eos_token_id: int, hidden_state: str = "last") -> Tensor:
    """One vector per sentence from the text encoder's last hidden state.

    Args:
        hidden: ``[B, L, D]`` last hidden state.
        input_ids: ``[B, L]`` the token ids that produced it (padded to L).
        eos_token_id: id of ``<|endoftext|>``; its first occurrence ends a sentence's real tokens.
        hidden_state: ``last``: position L - 1, a padding position that under the causal mask has seen the whole
            prompt (the authors' choice); ``eos``: the first end-of-text position (CLIP's pooled output); ``mean``:
            the mean over the real tokens, start and end tokens included; ``flatten``: all L positions, ``[B, L·D]``.

    Returns:
        ``[B, D]`` (``[B, L·D]`` for ``flatten``), in the dtype of ``hidden``.
    """
    if hidden_state not in HIDDEN_STATES:
        raise ValueError(f"hidden_state={hidden_state!r} does not exist; choose one of {', '.join(HIDDEN_STATES)}")
    if hidden.ndim != 3 or input_ids.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, L, D] and input_ids [B, L], got {tuple(hidden.shape)} and "
                         f"{tuple(input_ids.shape)}")
    if hidden_state == "last":
        return hidden[:, -1]
    if hidden_state == "flatten":
        return hidden.flatten(1)
    is_eos = input_ids == eos_token_id  # [B, L]
    if not bool(is_eos.any(dim=1).all()):
        raise ValueError(f"a sentence has no end-of-text token (id {eos_token_id}); tokenize with the model's "
                         "tokenizer, padded and truncated to its max length")
    end = is_eos.int().argmax(dim=1)  # [B] first end-of-text position
    if hidden_state == "eos":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), end]
    real = torch.arange(hidden.shape[1], device=hidden.device) <= end.unsqueeze(1)  # [B, L]
    return (hidden * real.unsqueeze(-1)).sum(dim=1) / real.sum(dim=1, keepdim=True)


def contextual_distances(p_keyword: Tensor, p_concept: Tensor, s_keyword: Tensor, temperature: float = 1.0,
                         shrinkage: float = 0.0, reproduce_authors: bool = False) -> dict[str, float]:
    """The paper's Figure 2: how the contextual set P filled with V* relates to P filled with c and to S.

    Args:
        p_keyword: P(V*), ``[n, d]``: the contextual sentences with the keyword in the slot.
        p_concept: P(c), ``[n, d]``: the same sentences, in the same order, with the concept word (for DreamBooth's
            ``base_*`` keys: the same sentences with the keyword, encoded by the base text encoder).
        s_keyword: S(V*), ``[m, d]``: the simple prompts with the keyword.
        temperature: tau of :func:`kl_divergence`.
        shrinkage: lambda of every :func:`mahalanobis_distance` (0: the paper's pseudo-inverse).
        reproduce_authors: Compute as the authors' code did: P(c) scored against P(V*) in ``inter_mahalanobis``
            and ``inter_kl`` (P(c)'s sentences under P(V*)'s covariance; KL(P(c) || P(V*))), and ``simple_kl`` cut
            after the softmax. Default: P(V*) against P(c), the direction of every other distance here (L2 and
            Hausdorff are symmetric), and ``simple_kl`` cut before the softmax.

    Returns:
        ``inter_*`` = d(P(V*), P(c)) for l2, hausdorff, mahalanobis, kl (grows as V* drifts); ``intra_*`` =
        d(P(V*), P(V*)) for l2 (mean pairwise distance), hausdorff (:func:`intra_hausdorff`) and spread
        (:func:`spread`; these shrink as V* makes the sentences alike; no intra Mahalanobis, which is a constant,
        and no intra KL, which is 0 by definition); ``simple_*`` = d(P(V*), S(V*)) for l2, hausdorff, mahalanobis,
        kl (shrink as complex prompts collapse onto simple ones). P and S hold different sentences, so
        ``simple_kl`` pairs the first min(n, m) sentences of each by position (:func:`kl_divergence` with
        ``cut``): the pairs are unrelated sentences, so its level means little; what carries the signal is its
        fall towards 0 as both sets collapse onto V* (every similarity row turns uniform).
    """
    if p_keyword.shape != p_concept.shape:
        raise ValueError(f"P(V*) and P(c) must be the same sentences with different fillers, got shapes "
                         f"{tuple(p_keyword.shape)} and {tuple(p_concept.shape)}")
    first, second = (p_concept, p_keyword) if reproduce_authors else (p_keyword, p_concept)
    inter = pair_distances(first, second, temperature, shrinkage)  # L2 and Hausdorff are symmetric
    values = {
        **{f"inter_{name}": value for name, value in inter.items()},
        "intra_l2": l2_distance(p_keyword, p_keyword),
        "intra_hausdorff": intra_hausdorff(p_keyword),
        "intra_spread": spread(p_keyword),
        "simple_l2": l2_distance(p_keyword, s_keyword),
        "simple_hausdorff": hausdorff_distance(p_keyword, s_keyword),
        "simple_mahalanobis": mahalanobis_distance(p_keyword, s_keyword, shrinkage),
        "simple_kl": kl_divergence(p_keyword, s_keyword, temperature, cut="after" if reproduce_authors else "before"),
    }
    return {name: float(value) for name, value in values.items()}


def paired_drift(a: Tensor, b: Tensor) -> dict[str, float]:
    """Sentence-by-sentence drift of two encodings of the same sentences (the authors' DreamBooth curves):
    ``paired_l2`` = mean_i |a_i - b_i| and ``cosine`` = mean_i cos(a_i, b_i). 0 and 1 for identical encodings.

    Args:
        a: ``[n, d]``.
        b: ``[n, d]``, row i the same sentence as row i of ``a``.
    """
    a, b = _check_pair(a, b)
    if a.shape != b.shape:
        raise ValueError(f"paired drift needs the same sentences twice, got {tuple(a.shape)} and {tuple(b.shape)}")
    return {"paired_l2": (a - b).norm(dim=1).mean().item(), "cosine": cosine(a, b).mean().item()}


def pair_distances(a: Tensor, b: Tensor, temperature: float = 1.0, shrinkage: float = 0.0) -> dict[str, float]:
    """``l2``, ``hausdorff``, ``mahalanobis`` (``a`` scored against ``b``) and ``kl`` (KL(a || b)) of two
    index-aligned sets: the four inter-set distances of Figure 2.

    Args:
        a: ``[n, d]``.
        b: ``[n, d]``, row i the same sentence as row i of ``a``.
        temperature: tau of :func:`kl_divergence`.
        shrinkage: lambda of :func:`mahalanobis_distance`.
    """
    return {"l2": l2_distance(a, b).item(), "hausdorff": hausdorff_distance(a, b).item(),
            "mahalanobis": mahalanobis_distance(a, b, shrinkage).item(), "kl": kl_divergence(a, b, temperature).item()}


SET_KEYS = ("inter_l2", "inter_hausdorff", "inter_mahalanobis", "inter_kl", "intra_l2", "intra_hausdorff",
            "intra_spread", "simple_l2", "simple_hausdorff", "simple_mahalanobis", "simple_kl")


def _as_f64(x: Tensor) -> Tensor:
    # fp64 for stable distances and pseudo-inverses; MPS has no float64, so its tensors move to the CPU.
    device = "cpu" if x.device.type == "mps" else x.device
    return x.detach().to(device=device, dtype=torch.float64)


def _check_set(x: Tensor, name: str, min_rows: int = 1) -> Tensor:
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D [n, d] set (one row per sentence), got shape {tuple(x.shape)}; "
            "torch.stack the vectors"
        )
    if x.shape[0] < min_rows or x.shape[1] == 0:
        raise ValueError(f"{name} needs at least {min_rows} row(s) and a non-empty width, got {tuple(x.shape)}")
    return _as_f64(x)


def _check_pair(a: Tensor, b: Tensor, min_rows_b: int = 1) -> tuple[Tensor, Tensor]:
    a, b = _check_set(a, "a"), _check_set(b, "b", min_rows_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must have the same width, got {a.shape[1]} and {b.shape[1]}; encode both sets with the "
            "same text encoder and pooling"
        )
    return a, b
