"""Scoring math: CLIP-T and image alignment on hand-made embeddings, and the three texts CLIP-T scores against."""

import math

import torch

from tea_lightning import scoring
from tea_lightning.prompt_sets import EvalPrompt


def test_clip_t_is_cosine_times_100_clamped_at_zero_and_image_alignment_averages_the_references():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[6.0, 8.0], [-1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(scoring.clip_t(a, text), torch.tensor([100.0, 0.0, 100 / math.sqrt(2)]))
    refs = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    expected = torch.tensor([(0.6 + 0.8) / 2, (1 + 0) / 2, (0 + 1) / 2]) * 100
    assert torch.allclose(scoring.image_alignment(a, refs), expected)
    assert scoring.image_alignment(-a[:1], refs[:1]).item() < 0, "image-image cosine is not clamped"


def test_the_three_clip_t_texts_are_the_filled_template_and_the_csv_segments():
    context = "wearing glasses and playing a guitar"
    row = EvalPrompt(f"A photo of a {{}} {context}", "a {}", context)
    assert scoring.segment_texts(row, "man") == (
        "A photo of a man wearing glasses and playing a guitar", "a man", "wearing glasses and playing a guitar")
