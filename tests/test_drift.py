import numpy as np
import pytest
import torch
from scipy.spatial.distance import directed_hausdorff
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from tea_lightning import drift

# (n, m, d): fewer sentences than dimensions (singular covariance, the paper's 200 x 768 case) and more.
SHAPES = [(7, 9, 12), (30, 25, 5), (6, 10, 300)]


def _sets(n: int, m: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(loc=0.3, size=(m, d))


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).float()  # encoders hand over fp32


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(np.float64)  # the reference sees the same rounded inputs


@pytest.mark.parametrize("n, m, d", SHAPES)
def test_l2_distance_matches_a_double_loop(n, m, d):
    a, b = _sets(n, m, d)
    expected = np.mean([np.mean([np.linalg.norm(x - y) for y in _f32(b)]) for x in _f32(a)])
    assert drift.l2_distance(_t(a), _t(b)).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n, m, d", SHAPES)
def test_hausdorff_distance_matches_scipy(n, m, d):
    a, b = _f32(_sets(n, m, d)[0]), _f32(_sets(n, m, d)[1])
    expected = max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])
    assert drift.hausdorff_distance(_t(a), _t(b)).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n, m, d", SHAPES)
def test_intra_hausdorff_is_the_largest_nearest_neighbour_distance(n, m, d):
    a = _f32(_sets(n, m, d)[0])
    dist = np.linalg.norm(a[:, None, :] - a[None, :, :], axis=-1)
    np.fill_diagonal(dist, np.inf)
    assert drift.intra_hausdorff(_t(a)).item() == pytest.approx(dist.min(axis=1).max(), rel=1e-12)


def _numpy_mahalanobis(a: np.ndarray, b: np.ndarray, shrinkage: float) -> float:
    cov = np.cov(b, rowvar=False)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / d * np.eye(d)
    precision = np.linalg.pinv(cov, rcond=d * np.finfo(np.float64).eps, hermitian=True)  # torch's default cut-off
    diff = a - b.mean(axis=0)
    return float(np.mean(np.sqrt(np.maximum(np.einsum("nd,de,ne->n", diff, precision, diff), 0))))


@pytest.mark.parametrize("n, m, d", SHAPES)
@pytest.mark.parametrize("shrinkage", [0.0, 0.3])
def test_mahalanobis_distance_matches_numpy_pinv(n, m, d, shrinkage):
    a, b = (_f32(x) for x in _sets(n, m, d))
    expected = _numpy_mahalanobis(a, b, shrinkage)
    assert drift.mahalanobis_distance(_t(a), _t(b), shrinkage=shrinkage).item() == pytest.approx(expected, rel=1e-8)


def test_mahalanobis_distance_with_full_rank_covariance_matches_scipy():
    a, b = (_f32(x) for x in _sets(10, 40, 4))
    inverse = np.linalg.inv(np.cov(b, rowvar=False))
    expected = np.mean([scipy_mahalanobis(x, b.mean(axis=0), inverse) for x in a])
    assert drift.mahalanobis_distance(_t(a), _t(b)).item() == pytest.approx(expected, rel=1e-10)


def test_mahalanobis_distance_of_the_mean_of_b_is_zero():
    _, b = _sets(5, 4, 10)
    assert drift.mahalanobis_distance(_t(b).mean(dim=0, keepdim=True), _t(b)).item() == pytest.approx(0, abs=1e-6)


def test_shrinkage_makes_singular_covariance_see_directions_outside_b():
    a, b = _sets(5, 3, 10)  # B spans 2 of 10 directions
    plain = drift.mahalanobis_distance(_t(a), _t(b)).item()
    shrunk = drift.mahalanobis_distance(_t(a), _t(b), shrinkage=0.5).item()
    assert np.isfinite(plain) and np.isfinite(shrunk) and shrunk != pytest.approx(plain)


def _off_span(b: np.ndarray, seed: int = 3) -> np.ndarray:
    """A unit direction orthogonal to every centred row of b (outside B's span)."""
    centred = b - b.mean(axis=0)
    v = np.random.default_rng(seed).normal(size=b.shape[1])
    v -= np.linalg.lstsq(centred.T, v, rcond=None)[0] @ centred
    return v / np.linalg.norm(v)


def test_plain_mahalanobis_is_blind_off_the_span_of_b_and_shrinkage_sees_it():
    a, b = _sets(20, 15, 60)  # 15 sentences in 60 dimensions: B spans 14
    u = _off_span(b)
    plain = [drift.mahalanobis_distance(torch.from_numpy(a + c * u), torch.from_numpy(b)).item() for c in (0, 10, 100)]
    shrunk = [drift.mahalanobis_distance(torch.from_numpy(a + c * u), torch.from_numpy(b), 0.1).item()
              for c in (0, 10, 100)]
    assert plain == pytest.approx([plain[0]] * 3, rel=1e-6), "an offset outside B's span changed the plain distance"
    assert shrunk[0] < shrunk[1] < shrunk[2], "shrinkage did not see an offset outside B's span"


def test_shrunk_mahalanobis_agrees_in_fp32_and_fp64_and_the_plain_one_need_not():
    # Nearly rank-deficient B (the eigenvalues spread over many decades, as real encodings do): the plain
    # pseudo-inverse keeps a different set of eigenvalues in each precision; shrinkage makes that irrelevant.
    rng = np.random.default_rng(4)
    b = rng.normal(size=(30, 80)) * np.logspace(0, -9, 80)
    a = rng.normal(size=(10, 80)) * 0.5
    wide, narrow = torch.from_numpy, lambda x: torch.from_numpy(x).float()
    shrunk = [drift.mahalanobis_distance(f(a), f(b), 0.1).item() for f in (wide, narrow)]
    assert shrunk[0] == pytest.approx(shrunk[1], rel=1e-3)


def test_spread_is_the_root_mean_squared_distance_to_the_centroid():
    a = _f32(_sets(9, 9, 5)[0])
    expected = np.sqrt(np.mean(np.sum((a - a.mean(axis=0)) ** 2, axis=1)))
    assert drift.spread(_t(a)).item() == pytest.approx(expected, rel=1e-12)
    assert drift.spread(torch.ones(4, 3)).item() == 0


def test_intra_set_mahalanobis_is_the_constant_that_spread_replaces():
    # Why there is no intra Mahalanobis: with n <= d every row of a set sits at (n - 1)/sqrt(n) from its own mean.
    for scale in (0.01, 1.0, 100.0):
        a = _t(_sets(40, 40, 768)[0] * scale)
        assert drift.mahalanobis_distance(a, a).item() == pytest.approx(39 / np.sqrt(40), rel=1e-4)
    spreads = [drift.spread(_t(_sets(40, 40, 768)[0] * scale)).item() for scale in (0.01, 1.0, 100.0)]
    assert spreads[0] < spreads[1] < spreads[2]


def _numpy_kl(a: np.ndarray, b: np.ndarray, temperature: float) -> float:
    def probabilities(x: np.ndarray) -> np.ndarray:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        logits = unit @ unit.T / temperature
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True) + 1e-8

    p, q = probabilities(a), probabilities(b)
    return float(np.mean(np.sum(p * np.log(p / q), axis=1)))


@pytest.mark.parametrize("n, m, d", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_kl_divergence_matches_numpy(n, m, d, temperature):
    a, b = _f32(_sets(n, n, d)[0]), _f32(_sets(n, n, d)[1])
    expected = _numpy_kl(a, b, temperature)
    assert expected > 0
    assert drift.kl_divergence(_t(a), _t(b), temperature=temperature).item() == pytest.approx(expected, rel=1e-10)


def _numpy_kl_cut(a: np.ndarray, b: np.ndarray, cut: str) -> float:
    def probabilities(x: np.ndarray) -> np.ndarray:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        logits = unit @ unit.T
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    k = min(len(a), len(b))
    if cut == "before":
        p, q = probabilities(a[:k]), probabilities(b[:k])
    else:  # the authors': softmax over each whole set, then the first k rows and columns
        p, q = probabilities(a)[:k, :k], probabilities(b)[:k, :k]
    p, q = p + 1e-8, q + 1e-8
    return float(np.mean(np.sum(p * np.log(p / q), axis=1)))


@pytest.mark.parametrize("cut", ["before", "after"])
def test_kl_of_sets_of_different_sizes_cuts_as_documented(cut):
    a, b = (_f32(x) for x in _sets(12, 7, 6))
    expected = _numpy_kl_cut(a, b, cut)
    assert drift.kl_divergence(_t(a), _t(b), cut=cut).item() == pytest.approx(expected, rel=1e-9)


def test_l2_distance_of_a_set_to_itself_is_positive_unless_one_point():
    a = _t(_sets(6, 6, 8)[0])
    assert drift.l2_distance(a, a).item() > 0
    assert drift.l2_distance(a[:1], a[:1]).item() == 0


def test_hausdorff_and_kl_of_a_set_to_itself_are_zero():
    a = _t(_sets(40, 40, 768)[0])  # > 25 rows: where cdist's matmul shortcut would leave ~1e-6 self-distances
    assert drift.hausdorff_distance(a, a).item() == 0
    assert drift.kl_divergence(a, a).item() == 0


def test_intra_hausdorff_of_a_set_of_duplicates_is_zero():
    a = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0]])
    assert drift.intra_hausdorff(a).item() == 0


def test_set_distances_return_0d_tensors():
    a, b = (_t(x) for x in _sets(5, 5, 3))
    for value in [
        drift.l2_distance(a, b),
        drift.hausdorff_distance(a, b),
        drift.intra_hausdorff(a),
        drift.mahalanobis_distance(a, b),
        drift.kl_divergence(a, b),
        drift.spread(a),
    ]:
        assert isinstance(value, torch.Tensor) and value.ndim == 0


def test_vector_drift_of_a_scaled_concept_has_ratio_two_and_cosine_one():
    concept = torch.tensor([0.3, -0.4, 1.2])  # |c| = 1.3
    report = drift.vector_drift(2 * concept, concept, concept, vocab_norms=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert report["norm"] == pytest.approx(2.6)
    assert report["concept_norm"] == pytest.approx(1.3)
    assert report["norm_ratio"] == pytest.approx(2.0)
    assert report["cosine_concept"] == pytest.approx(1.0)
    assert report["angle_concept_deg"] == pytest.approx(0.0, abs=1e-5)
    assert report["cosine_initial"] == pytest.approx(1.0)
    assert report["norm_percentile"] == pytest.approx(50.0)  # 1.0 and 2.0 lie below 2.6


def test_vector_drift_averages_over_the_vectors_of_a_multi_vector_token():
    concept = torch.tensor([1.0, 0.0])
    v = torch.tensor([[2.0, 0.0], [0.0, 4.0]])  # along c, and at 90 degrees with twice the norm
    initial = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    report = drift.vector_drift(v, concept, initial, vocab_norms=torch.arange(1.0, 11.0))
    assert report == pytest.approx(
        {
            "norm": 3.0,
            "concept_norm": 1.0,
            "norm_ratio": 3.0,
            "cosine_concept": 0.5,
            "angle_concept_deg": 45.0,
            "cosine_initial": 0.5,
            "norm_percentile": 20.0,  # |2| -> 10 % (only 1 below), |4| -> 30 %
        }
    )


@pytest.mark.parametrize("norm, expected", [(0.5, 0.0), (3.0, 20.0), (3.5, 30.0), (11.0, 100.0)])
def test_norm_percentile_counts_vocabulary_norms_strictly_below(norm, expected):
    assert drift.norm_percentile(norm, torch.arange(1.0, 11.0)) == pytest.approx(expected)


def test_cosine_and_angle_of_a_diagonal():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert drift.cosine(a, b).item() == pytest.approx(2**-0.5)
    assert drift.angle_deg(a, b).item() == pytest.approx(45.0)


_A = torch.ones(4, 3)
BAD_SET_CALLS = [
    pytest.param(lambda: drift.l2_distance(torch.ones(3), _A), "2-D", id="1-D set"),
    pytest.param(lambda: drift.hausdorff_distance(_A, torch.ones(2, 4, 3)), "2-D", id="3-D set"),
    pytest.param(lambda: drift.l2_distance(_A, torch.ones(4, 5)), "same width", id="mismatched width"),
    pytest.param(lambda: drift.hausdorff_distance(torch.ones(0, 3), _A), "at least 1 row", id="empty set"),
    pytest.param(lambda: drift.intra_hausdorff(torch.ones(1, 3)), "at least 2 row", id="intra single row"),
    pytest.param(lambda: drift.mahalanobis_distance(_A, torch.ones(1, 3)), "at least 2 row", id="cov one row"),
    pytest.param(lambda: drift.mahalanobis_distance(_A, _A, shrinkage=1.5), "got 1.5", id="shrinkage above 1"),
    pytest.param(lambda: drift.mahalanobis_distance(_A, _A, shrinkage=-0.1), "got -0.1", id="shrinkage below 0"),
    pytest.param(lambda: drift.kl_divergence(_A, _A, cut="middle"), "'before' or 'after'", id="kl cut"),
    pytest.param(lambda: drift.kl_divergence(_A, _A, temperature=0.0), "got 0.0", id="zero temperature"),
    pytest.param(lambda: drift.kl_divergence(_A, _A, temperature=-1.0), "got -1.0", id="negative temperature"),
    pytest.param(lambda: drift.kl_divergence(_A, torch.ones(5, 3)), "4 and 5", id="kl unaligned rows"),
    pytest.param(lambda: drift.cosine(torch.zeros(3), torch.ones(3)), "zero vector", id="zero vector cosine"),
    pytest.param(lambda: drift.norm_percentile(1.0, torch.ones(2, 2)), "1-D", id="vocab norms matrix"),
    pytest.param(lambda: drift.vector_drift(torch.ones(3), torch.ones(4), torch.ones(3), _A[0]), "concept", id="c"),
    pytest.param(lambda: drift.vector_drift(torch.ones(2, 3), torch.ones(3), torch.ones(3), _A[0]), "initial", id="i"),
]


@pytest.mark.parametrize("call, message", BAD_SET_CALLS)
def test_bad_input_raises_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_pooled_hidden_states_pick_the_documented_positions():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    ids = torch.tensor([[7, 1, 9, 9, 9], [7, 1, 2, 3, 9]])  # 9 = end of text, then padding with it
    assert torch.equal(drift.pool_hidden_states(hidden, ids, 9, "last"), hidden[:, 4])
    assert torch.equal(drift.pool_hidden_states(hidden, ids, 9, "eos"), torch.stack([hidden[0, 2], hidden[1, 4]]))
    assert torch.equal(drift.pool_hidden_states(hidden, ids, 9, "mean"),
                       torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)]))
    assert drift.pool_hidden_states(hidden, ids, 9, "flatten").shape == (2, 15)


def test_contextual_distances_of_a_keyword_that_changes_nothing():
    p = _t(_sets(12, 12, 16)[0])
    s = _t(_sets(12, 9, 16)[1])
    values = drift.contextual_distances(p, p.clone(), s)
    assert set(values) == {f"{kind}_{metric}" for kind in ("inter", "simple")
                           for metric in ("l2", "hausdorff", "mahalanobis", "kl")} | {
        "intra_l2", "intra_hausdorff", "intra_spread"} == set(drift.SET_KEYS)
    assert values["inter_hausdorff"] == 0 and values["inter_kl"] == 0
    assert values["inter_l2"] == pytest.approx(values["intra_l2"])  # both the mean over all pairs of P
    # P and S differ in size: KL pairs the first min(n, m) sentences of each, cut before the softmax.
    assert values["simple_kl"] == pytest.approx(drift.kl_divergence(p[:9], s).item())


def test_reproducing_the_authors_scores_p_of_c_against_p_of_the_keyword_and_cuts_kl_after_the_softmax():
    p, c = _t(_sets(12, 12, 16)[0]), _t(_sets(12, 12, 16, seed=2)[1])
    s = _t(_sets(12, 9, 16)[1])
    ours = drift.contextual_distances(p, c, s, shrinkage=0.2)
    authors = drift.contextual_distances(p, c, s, shrinkage=0.2, reproduce_authors=True)
    assert authors["inter_mahalanobis"] == pytest.approx(drift.mahalanobis_distance(c, p, 0.2).item())
    assert authors["inter_kl"] == pytest.approx(drift.kl_divergence(c, p).item())
    assert authors["simple_kl"] == pytest.approx(drift.kl_divergence(p, s, cut="after").item())
    assert ours["inter_mahalanobis"] == pytest.approx(drift.mahalanobis_distance(p, c, 0.2).item())
    assert authors["inter_mahalanobis"] != pytest.approx(ours["inter_mahalanobis"])
    assert {k: v for k, v in authors.items() if k in ("inter_l2", "inter_hausdorff", "intra_spread")} == \
        pytest.approx({k: v for k, v in ours.items() if k in ("inter_l2", "inter_hausdorff", "intra_spread")})


def test_a_dominating_keyword_shrinks_intra_and_simple_distances():
    rng = np.random.default_rng(1)
    context_p, context_s = _t(rng.normal(size=(20, 16))), _t(rng.normal(size=(15, 16)))
    keyword = _t(rng.normal(size=16)) * 10
    mild = drift.contextual_distances(context_p + 0.1 * keyword, context_p, context_s + 0.1 * keyword)
    dominated = drift.contextual_distances(0.2 * context_p + keyword, context_p, 0.2 * context_s + keyword)
    assert dominated["intra_l2"] < mild["intra_l2"] and dominated["intra_hausdorff"] < mild["intra_hausdorff"]
    assert dominated["intra_spread"] < mild["intra_spread"]
    assert dominated["simple_l2"] < mild["simple_l2"] and dominated["simple_kl"] < mild["simple_kl"]
    assert dominated["inter_kl"] > mild["inter_kl"]
