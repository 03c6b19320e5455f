"""Which Mahalanobis covariance shrinkage to use by default: the evidence behind `drift.DEFAULT_SHRINKAGE`.

    python bench/mahalanobis_shrinkage.py            # about 5 minutes on 2 CPU cores; prints a Markdown table

A keyword row is moved away from its concept row along a fixed path (6 levels: turned 0° to 60° towards a random
direction while its norm grows from 1x to 2.5x that of the concept word, as a Textual Inversion run drifts), and the
contextual sets P(V*) and P(c) are encoded at every level by three text encoders:

- `mini` (the built-in world, 64 wide) with the `last` pooling: 200 sentences > 64 dimensions, a full-rank covariance;
- `mini` with `flatten` (77 x 64 = 4928 dimensions, 120 sentences: singular, like every real case);
- an SD 1.5-size CLIP text encoder (768 wide, random weights: no download) with `last`, 120 sentences < 768 (the
  paper's 200 < 768).

The mini rows use the first 120 sentences of the world's star set (`last` keeps 200: full rank there).

For each shrinkage lambda it reports what the default must get right:

- `tracks drift`: Spearman rank correlation of inter_mahalanobis with the drift level (1 = rises with every step);
- `fp32 vs fp64`: the largest relative difference between our distance (fp64 math) and the same distance computed
  the authors' way in fp32 (`torch.cov`, `torch.linalg.pinv` on the d x d matrix): the pseudo-inverse cut-off is
  relative to the precision, so each keeps a different set of small eigenvalues;
- `off-span`: how much inter_mahalanobis changes (relative) when every P(V*) sentence is moved by one mean
  sentence norm along a direction orthogonal to P(c)'s span (0 = blind to it).
"""

from __future__ import annotations

import math
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python bench/mahalanobis_shrinkage.py`
    sys.path.insert(0, str(ROOT))

from bench.models import CLIP_L  # noqa: E402
from tea_lightning import drift  # noqa: E402
from tea_lightning.conditioning import tokenize  # noqa: E402
from tea_lightning.drift_measure import encode_set  # noqa: E402
from tea_lightning.drift_report import load_text_parts  # noqa: E402
from tea_lightning.prompt_sets import contextual_set, fill, load_templates  # noqa: E402
from tea_lightning.tea import adjust  # noqa: E402
from tea_lightning.tiny import tiny_pipeline  # noqa: E402
from tea_lightning.tokens import add_token_rows, single_token_id  # noqa: E402

SHRINKAGES = (0.0, 0.01, 0.1, 0.3, 1.0)
LEVELS = 6
SENTENCES = 120  # per set: fewer than 768 dimensions as in the paper, and a run of a few minutes on 2 cores


def drift_path(concept: torch.Tensor, levels: int, seed: int = 0) -> list[torch.Tensor]:
    """Rows turned from `concept` towards a random direction (0° to 60°) with norm 1x to 2.5x |concept|."""
    other = torch.randn(concept.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    other -= (other @ concept) / (concept @ concept) * concept  # orthogonal to the concept row
    other = other / other.norm() * concept.norm()
    rows = []
    for t in np.linspace(0, 1, levels):
        turned = adjust(concept, other, rho=float(t) * 60 / 90, alpha=0.0)  # SLERP over 90°, stop at 60° · t
        rows.append(turned / turned.norm() * concept.norm() * (1 + 1.5 * t))
    return rows


def encodings(tokenizer, encoder, templates: list[str], concept_word: str,
              hidden_state: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """P(c) and P(V*) at every drift level (fp32 encodings, as training logs them)."""
    (token_id,) = add_token_rows(tokenizer, encoder, ["<v>"])
    table = encoder.get_input_embeddings()
    concept = table.weight[single_token_id(tokenizer, concept_word)].detach().double()

    def encode(word: str) -> torch.Tensor:
        prompts = [fill(t, word) for t in templates]
        with torch.no_grad():
            (pooled,) = encode_set(lambda batch: encoder(tokenize(tokenizer, batch))[0], prompts,
                                   tokenize(tokenizer, prompts), tokenizer.eos_token_id, hidden_state, 50)
        return pooled

    p_concept = encode(concept_word)
    p_keyword = []
    for row in drift_path(concept, LEVELS):
        with torch.no_grad():
            table.weight[token_id] = row.to(table.weight.dtype)
        p_keyword.append(encode("<v>"))
    return p_concept, p_keyword


def fp32_distance(a: torch.Tensor, precision: torch.Tensor, mean: torch.Tensor) -> float:
    """The authors' computation in fp32: mean of sqrt(diff^T Sigma^+ diff) with a precomputed fp32 pseudo-inverse."""
    diff = a.float() - mean
    return torch.sqrt(((diff @ precision) * diff).sum(dim=1).clamp_min(0)).mean().item()


def fp32_precision(b: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.float()
    cov = torch.cov(b.T)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * cov.trace() / d * torch.eye(d)
    return torch.linalg.pinv(cov, hermitian=True), b.mean(dim=0)


def off_span(p_concept: torch.Tensor, seed: int = 1) -> torch.Tensor | None:
    """A unit direction orthogonal to P(c)'s centred rows, or None when they span every direction."""
    centred = (p_concept - p_concept.mean(0)).double()
    if torch.linalg.matrix_rank(centred) >= centred.shape[1]:
        return None
    v = torch.randn(centred.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    v -= (v @ vh.T) @ vh
    return v / v.norm()


def evaluate(name: str, tokenizer, encoder, templates: list[str], concept_word: str, hidden_state: str) -> list[dict]:
    p_concept, p_keyword = encodings(tokenizer, encoder.float(), templates, concept_word, hidden_state)
    direction = off_span(p_concept)
    rows = []
    for shrinkage in SHRINKAGES:
        curve = [drift.mahalanobis_distance(p, p_concept, shrinkage).item() for p in p_keyword]
        if p_concept.shape[1] <= 1024:  # the dense d x d fp32 pseudo-inverse of a flattened set takes too long here
            precision, mean = fp32_precision(p_concept, shrinkage)
            curve32 = [fp32_distance(p, precision, mean) for p in p_keyword]
        else:
            curve32 = [math.nan] * len(curve)
        tracks = spearmanr(np.arange(LEVELS), curve).statistic
        swing = max(abs(a - b) / abs(a) for a, b in zip(curve, curve32, strict=True))  # NaN when not computed
        if direction is None:
            blind = math.nan
        else:
            last = p_keyword[-1].double()
            moved = drift.mahalanobis_distance(last + last.norm(dim=1).mean() * direction, p_concept, shrinkage)
            blind = abs(moved.item() - curve[-1]) / curve[-1]
        rows.append({"encoder": name, "width": p_concept.shape[1], "sentences": p_concept.shape[0],
                     "shrinkage": shrinkage, "tracks": tracks, "precision": swing, "off_span": blind,
                     "start": curve[0], "end": curve[-1]})
    return rows


def main() -> None:
    (mini_tokenizer,), (mini_encoder,) = load_text_parts("mini")
    star = load_templates(str(ROOT / "tea_lightning/prompts/mini/contextual_star.txt"))
    results = evaluate("mini, last", mini_tokenizer, mini_encoder, star, "star", "last")
    (mini_tokenizer,), (mini_encoder,) = load_text_parts("mini")
    results += evaluate("mini, flatten", mini_tokenizer, mini_encoder, star[:SENTENCES], "star", "flatten")
    torch.manual_seed(0)
    tokenizer = tiny_pipeline().tokenizer
    sd15 = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    results += evaluate("SD 1.5 size (random weights), last", tokenizer, sd15, contextual_set("man")[:SENTENCES], "man",
                        "last")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    print(f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"commit {commit}\n")
    print("| encoder | d | n | shrinkage | tracks drift (Spearman) | fp32 vs fp64 | off-span change | "
          "start → end |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        off = "n/a (full rank)" if math.isnan(r["off_span"]) else f"{r['off_span']:.3g}"
        print(f"| {r['encoder']} | {r['width']} | {r['sentences']} | {r['shrinkage']:g} | {r['tracks']:.3f} | "
              f"{'—' if math.isnan(r['precision']) else format(r['precision'], '.2e')} | {off} | "
              f"{r['start']:.4g} → {r['end']:.4g} |")


if __name__ == "__main__":
    main()
