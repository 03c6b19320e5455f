import math
import re

import pytest
import torch

from tea_lightning.tea import adjust


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.arccos(cos.clamp(-1, 1))


def _random_pair(n: int = 6, d: int = 32, seed: int = 0, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    v = 3.0 * torch.randn(n, d, generator=gen, dtype=dtype)  # learned rows: longer than the concept word
    t = 0.5 * torch.randn(n, d, generator=gen, dtype=dtype)
    return v, t


def test_zero_rho_and_alpha_returns_v_exactly():
    v, t = _random_pair(dtype=torch.float32)
    assert torch.equal(adjust(v, t, rho=0.0, alpha=0.0), v)


def test_full_rho_and_alpha_returns_target():
    v, t = _random_pair(dtype=torch.float32)
    torch.testing.assert_close(adjust(v, t, rho=1.0, alpha=1.0), t, atol=1e-5, rtol=1e-5)


def test_quarter_turn_in_the_plane_matches_hand_computation():
    # |v| = 2, |t| = 4, alpha = 0.5 -> m = 3; theta = 90 deg, rho = 0.25 -> 22.5 deg from v, 67.5 deg from t.
    v = torch.tensor([2.0, 0.0])
    t = torch.tensor([0.0, 4.0])
    expected = 3.0 * torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)])
    torch.testing.assert_close(adjust(v, t, rho=0.25, alpha=0.5), expected)


@pytest.mark.parametrize("rho, alpha", [(0.2, 0.5), (0.1, 0.0), (0.7, 1.0), (1.0, 0.3)])
def test_result_norm_is_the_mixed_norm(rho, alpha):
    v, t = _random_pair()
    expected = (1 - alpha) * v.norm(dim=-1) + alpha * t.norm(dim=-1)
    torch.testing.assert_close(adjust(v, t, rho=rho, alpha=alpha).norm(dim=-1), expected)


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.2, 0.5, 0.9, 1.0])
def test_angle_to_target_shrinks_by_one_minus_rho(rho):
    v, t = _random_pair()
    out = adjust(v, t, rho=rho, alpha=0.5)
    torch.testing.assert_close(_angle(out, t), (1 - rho) * _angle(v, t), atol=1e-6, rtol=1e-6)


def test_result_stays_in_the_plane_of_v_and_target():
    v, t = _random_pair(d=16)
    out = adjust(v, t, rho=0.3, alpha=0.5)
    for row, vi, ti in zip(out, v, t, strict=True):
        basis, _ = torch.linalg.qr(torch.stack([vi, ti], dim=1))  # [d, 2]
        torch.testing.assert_close(basis @ (basis.T @ row), row)


def test_rho_zero_changes_only_the_norm():
    v, t = _random_pair()
    out = adjust(v, t, rho=0.0, alpha=0.5)
    m = 0.5 * v.norm(dim=-1, keepdim=True) + 0.5 * t.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, m * v / v.norm(dim=-1, keepdim=True))
    assert not torch.allclose(out.norm(dim=-1), v.norm(dim=-1))


def test_batched_rows_match_row_by_row():
    v, t = _random_pair(n=5, dtype=torch.float32)
    rows = torch.stack([adjust(vi, ti, rho=0.2, alpha=0.5) for vi, ti in zip(v, t, strict=True)])
    torch.testing.assert_close(adjust(v, t, rho=0.2, alpha=0.5), rows)


def test_target_vector_broadcasts_over_leading_dimensions():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(2, 3, 8, generator=gen)  # e.g. [batch, positions, d]
    t = torch.randn(8, generator=gen)
    out = adjust(v, t, rho=0.2, alpha=0.5)
    assert out.shape == v.shape
    torch.testing.assert_close(out, adjust(v, t.expand_as(v).clone(), rho=0.2, alpha=0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_returns_its_dtype(dtype):
    v, t = _random_pair(d=768, dtype=torch.float32)
    v, t = v.to(dtype), t.to(dtype)
    out = adjust(v, t, rho=0.2, alpha=0.5)
    assert out.dtype == dtype
    reference = adjust(v.float(), t.float(), rho=0.2, alpha=0.5).to(dtype)
    torch.testing.assert_close(out, reference, atol=0, rtol=0)  # computed in fp32, rounded once


@pytest.mark.parametrize("rho", [0.0, 0.2, 1.0])
def test_parallel_target_gives_finite_rescaled_v(rho):
    v = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    t = torch.tensor([[2.0, 4.0, 6.0], [2.0, 4.0, 6.0 + 1e-6]])  # exactly and almost parallel
    out = adjust(v, t, rho=rho, alpha=0.5)
    expected = 1.5 * v  # m = 0.5|v| + 0.5·2|v|, direction unchanged
    torch.testing.assert_close(out, expected)


def test_antiparallel_target_turns_through_the_smallest_component_axis():
    # v = e_0, t = -3 e_0: no unique plane; the documented choice is the plane of v and e_1 (first smallest |v_k|).
    v = torch.tensor([1.0, 0.0, 0.0])
    t = torch.tensor([-3.0, 0.0, 0.0])
    out = adjust(v, t, rho=0.2, alpha=0.5)
    expected = 2.0 * torch.tensor([math.cos(0.2 * math.pi), math.sin(0.2 * math.pi), 0.0])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(_angle(out, t), torch.tensor(0.8 * math.pi))


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5, 1.0])
def test_antiparallel_random_inputs_are_finite_with_mixed_norm(rho):
    v, _ = _random_pair(dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    t = -0.5 * v + 1e-6 * torch.randn(v.shape, generator=gen)  # almost antiparallel
    t[0] = -0.5 * v[0]  # exactly antiparallel
    out = adjust(v, t, rho=rho, alpha=0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=-1), 0.75 * v.norm(dim=-1))
    torch.testing.assert_close(_angle(out, t), torch.full((v.shape[0],), (1 - rho) * math.pi), atol=2e-2, rtol=0)


def test_near_antiparallel_just_above_threshold_keeps_the_angle_property():
    theta = math.pi - 0.05  # sin(theta) = 0.05, above the fp32 fallback threshold of 1e-2
    v = torch.tensor([1.0, 0.0])
    t = torch.tensor([math.cos(theta), math.sin(theta)])
    out = adjust(v, t, rho=0.2, alpha=0.0)
    torch.testing.assert_close(out, torch.tensor([math.cos(0.2 * theta), math.sin(0.2 * theta)]))


@pytest.mark.parametrize("name", ["rho", "alpha"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.2"])
def test_factor_outside_unit_interval_raises_with_the_value(name, value):
    v, t = _random_pair()
    with pytest.raises(ValueError, match=re.escape(f"{name} must be a float in [0, 1], got {value!r}")):
        adjust(v, t, **{name: value})


def test_zero_norm_vector_raises():
    v, t = _random_pair()
    v[2] = 0.0
    with pytest.raises(ValueError, match="non-zero norm"):
        adjust(v, t)


@pytest.mark.parametrize("target_shape", [(6, 31), (4, 32)])
def test_shapes_that_do_not_broadcast_raise(target_shape):
    v, _ = _random_pair()
    with pytest.raises(ValueError, match=re.escape(str(target_shape))):
        adjust(v, torch.ones(target_shape, dtype=v.dtype))
