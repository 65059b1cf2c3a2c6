"""Tests for slt.geometry: feature dimensionality, direct sums, Grassmannian clusters."""

from __future__ import annotations

import math

import pytest
import torch

from slt.geometry import (
    chordal_distance,
    classify_point,
    direct_sum_decomposition,
    feature_dimensionality,
    grassmannian_clusters,
    model_dimensionality,
    square_antiprism,
    subspace_projector,
)
from slt.models import ToyModelOfSuperposition, kgon_parameters, make_tms_data, tms_loss
from slt.training import train

from conftest import F64, fp_tol, gen, random_rotation


def dim_tol(W: torch.Tensor) -> float:
    """Rounding bound for feature dimensionalities of W (m, n): ratios of sums of n·m positive
    products, each at most 1 (relative error γ_(nm)); a wrong value is off by O(1/n)."""
    return fp_tol(F64, terms=W.shape[-1] * W.shape[-2])


def poly(k: int, r: float = 1.0) -> torch.Tensor:
    """(2, k) regular k-gon of radius r."""
    a = torch.arange(k, dtype=F64) * 2 * math.pi / k
    return r * torch.stack([a.cos(), a.sin()])


def direct_sum(*blocks: torch.Tensor) -> torch.Tensor:
    """Block-diagonal stacking of (m_g, n_g) configurations: exact direct sum."""
    return torch.block_diag(*blocks)


PAIR = torch.tensor([[1.0, -1.0]], dtype=F64)  # antipodal pair in R^1
BIPYRAMID = direct_sum(poly(3), PAIR)  # (3, 5): triangle ⊕ antipodal pair
PENT_BIPYRAMID = direct_sum(poly(5), PAIR)  # (3, 7)
OCTAHEDRON = direct_sum(PAIR, PAIR, PAIR)  # (3, 6)
CASES = [
    (BIPYRAMID, [[0, 1, 2], [3, 4]], [2, 1], "3-gon ⊕ 2-gon"),
    (PENT_BIPYRAMID, [[0, 1, 2, 3, 4], [5, 6]], [2, 1], "5-gon ⊕ 2-gon"),
    (OCTAHEDRON, [[0, 1], [2, 3], [4, 5]], [1, 1, 1], "2-gon ⊕ 2-gon ⊕ 2-gon"),
]


def random_symmetry(W: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the hidden space, rescale, and permute the features."""
    perm = torch.randperm(W.shape[1], generator=g)
    return 1.7 * (random_rotation(W.shape[0], g) @ W)[:, perm], perm


def permuted_partition(partition: list[list[int]], perm: torch.Tensor) -> list[list[int]]:
    inv = torch.argsort(perm)  # original feature j sits at column inv[j]
    return sorted(sorted(int(inv[j]) for j in grp) for grp in partition)


# ----------------------------------------------------------------------------
# feature dimensionality
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "W,expected",
    [
        (torch.eye(3, dtype=F64), [1.0, 1.0, 1.0]),
        (PAIR, [0.5, 0.5]),
        (poly(5), [0.4] * 5),
        (poly(3, 2.5), [2 / 3] * 3),
        (BIPYRAMID, [2 / 3] * 3 + [0.5] * 2),  # Elhage et al.: 3 × 2/3 and 2 × 1/2, not 5 × 3/5
        (OCTAHEDRON, [0.5] * 6),
    ],
)
def test_feature_dimensionality_known_configurations(W, expected):
    # exact rational values up to float64 round-off on sums of n·m O(1) terms
    assert torch.allclose(feature_dimensionality(W), torch.tensor(expected, dtype=F64), rtol=0, atol=dim_tol(W))
    # the model-level m / ||W||_F^2 of unit columns is m / n
    if torch.allclose(W.norm(dim=0), torch.ones(W.shape[1], dtype=F64)):
        assert float(model_dimensionality(W)) == pytest.approx(W.shape[0] / W.shape[1], abs=dim_tol(W))


def test_feature_dimensionality_zero_column_batch_and_invariances():
    g = gen(0)
    W = torch.cat([poly(5), torch.zeros(2, 1, dtype=F64)], 1)  # a dead sixth feature
    D = feature_dimensionality(W)
    assert D[5] == 0 and torch.allclose(D[:5], torch.full((5,), 0.4, dtype=F64), rtol=0, atol=dim_tol(W))
    assert float(model_dimensionality(torch.zeros(2, 3))) == math.inf
    batch = torch.randn(4, 3, 7, generator=g, dtype=F64)  # (chains, m, n)
    Db = feature_dimensionality(batch)
    assert Db.shape == (4, 7) and model_dimensionality(batch).shape == (4,)
    tol = dim_tol(batch)
    for c in range(4):
        assert torch.allclose(Db[c], feature_dimensionality(batch[c]), rtol=0, atol=tol)
        # rotation and scale invariance, values in (0, 1] (the rotation adds γ_m relative to each entry)
        Wr = 3.0 * random_rotation(3, g) @ batch[c]
        assert torch.allclose(feature_dimensionality(Wr), Db[c], rtol=0, atol=tol + fp_tol(F64, terms=3))
    assert bool(((Db > 0) & (Db <= 1 + tol)).all())
    # float32 input keeps its dtype; tiny columns do not underflow to NaN (float32 round-off, plus
    # the float32 rounding of the input entries)
    tiny = (1e-30 * batch[0]).float()
    Dt = feature_dimensionality(tiny)
    f32_tol = fp_tol(torch.float32, terms=tiny.numel() + 1)
    assert Dt.dtype == torch.float32 and torch.allclose(Dt.double(), Db[0], rtol=0, atol=f32_tol)


# ----------------------------------------------------------------------------
# projectors
# ----------------------------------------------------------------------------
def test_projector_and_chordal_distance():
    g = gen(1)
    V = torch.randn(4, 2, generator=g, dtype=F64)
    P = subspace_projector(V)
    # P = U Uᵀ from a (backward-stable) SVD: U is orthonormal to γ_m, so P is idempotent and
    # symmetric to a few γ_m; a wrong projector is off by O(1)
    tol = fp_tol(F64, terms=4)
    assert torch.allclose(P @ P, P, rtol=0, atol=3 * tol) and torch.allclose(P, P.T, rtol=0, atol=tol)
    assert float(torch.trace(P)) == pytest.approx(2.0, abs=4 * tol)
    # basis independence: another basis of the same plane gives the same P (the computed span
    # moves by γ_m times the condition number of the basis)
    Vb = V @ torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=F64)
    cond = max(float(torch.linalg.cond(V)), float(torch.linalg.cond(Vb)))
    assert torch.allclose(subspace_projector(Vb), P, rtol=0, atol=2 * fp_tol(F64, terms=4, cond=cond))
    # lines at angle theta: d = sin(theta)
    for theta in (0.0, 0.3, math.pi / 2):
        a = torch.tensor([[1.0], [0.0]], dtype=F64)
        b = torch.tensor([[math.cos(theta)], [math.sin(theta)]], dtype=F64)
        d = chordal_distance(subspace_projector(a), subspace_projector(b))
        assert float(d) == pytest.approx(math.sin(theta), abs=fp_tol(F64, terms=4))  # 2-D, O(1) entries
    # rank: an antipodal pair spans a line
    assert float(torch.trace(subspace_projector(torch.tensor([[1.0, -1.0], [0.0, 0.0]])))) == pytest.approx(1.0)


# ----------------------------------------------------------------------------
# direct-sum decomposition
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("W,partition,dims,name", CASES)
def test_exact_direct_sums_recovered(W, partition, dims, name):
    dec = direct_sum_decomposition(W)
    assert dec.partition == partition and dec.dims == dims and dec.name == name
    # exact direct sums: the cosines and BᵀB − I vanish up to the round-off of sums of m·n O(1)
    # products (unit-normalized columns, orthonormal SVD bases); a non-direct sum has them O(0.1)
    tol = fp_tol(F64, terms=W.numel())
    assert dec.is_direct_sum and dec.residual < tol and dec.subspace_residual < tol
    # summand projectors are mutually orthogonal and add up to the projector onto span(W)
    Ps = [s.projector for s in dec.summands]
    for i in range(len(Ps)):
        for j in range(i + 1, len(Ps)):
            assert float((Ps[i] @ Ps[j]).abs().max()) < tol
    assert torch.allclose(sum(Ps), subspace_projector(W), rtol=0, atol=len(Ps) * tol)


@pytest.mark.parametrize("W,partition,dims,name", CASES)
def test_direct_sums_under_rotation_permutation_and_noise(W, partition, dims, name):
    g = gen(2)
    for _ in range(5):
        Wr, perm = random_symmetry(W, g)
        dec = direct_sum_decomposition(Wr)
        assert sorted(dec.partition) == permuted_partition(partition, perm)
        # (the rotation adds γ_m relative to each entry)
        assert sorted(dec.dims) == sorted(dims) and dec.subspace_residual < fp_tol(F64, terms=W.numel() + W.shape[0])
        # noise sigma = 0.01 per coordinate on columns of norm 1.7 (relative 0.006): a
        # cross-summand |cos| is about N(0, 2 (0.006)^2), so tol = 0.1 is > 10 s.d. away,
        # and the smallest within-summand |cos| (pentagon, 0.31) is far above it.
        Wn = Wr + 0.01 * torch.randn(Wr.shape, generator=g, dtype=F64)
        dn = direct_sum_decomposition(Wn)
        assert sorted(dn.partition) == permuted_partition(partition, perm)
        assert sorted(dn.dims) == sorted(dims) and dn.is_direct_sum
        assert 0 < dn.residual < 0.1 and dn.subspace_residual < 0.1
        assert sorted(s.label for s in dn.summands) == sorted(name.split(" ⊕ "))


def test_random_block_direct_sums_recovered():
    """Random blocks in orthogonal coordinate blocks, then rotated: the construction is the answer."""
    g = gen(3)
    for _ in range(10):
        sizes = [(2, 3), (1, 1), (3, 4)]  # (dims, features) per block; generic blocks span their dims
        blocks = [torch.randn(d, k, generator=g, dtype=F64) for d, k in sizes]
        W = direct_sum(*[B / B.norm(dim=0) for B in blocks])  # unit columns: none counts as dead
        Wr, perm = random_symmetry(W, g)
        # exact configuration: tolerances at round-off level (a generic within-block cosine is
        # never below 1e-6, and generic blocks have full rank)
        dec = direct_sum_decomposition(Wr, tol=1e-6, rank_tol=1e-6)
        expected, start = [], 0
        for _, k in sizes:
            expected.append(list(range(start, start + k)))
            start += k
        assert sorted(dec.partition) == permuted_partition(expected, perm)
        assert sorted(dec.dims) == [1, 2, 3]


def test_non_direct_sums_give_one_summand():
    g = gen(4)
    tet = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=F64).T  # (3, 4)
    # three orthogonal features coupled by a fourth: pairwise orthogonality alone is not enough
    coupled = torch.cat([torch.eye(3, dtype=F64), torch.ones(3, 1, dtype=F64) / math.sqrt(3)], 1)
    for W, label in [(tet, "tetrahedron"), (coupled, "4 features in 3 dims"), (poly(7), "7-gon")]:
        for _ in range(3):
            Wr, _ = random_symmetry(W, g)
            dec = direct_sum_decomposition(Wr + 0.01 * torch.randn(Wr.shape, generator=g, dtype=F64))
            assert len(dec.summands) == 1 and not dec.is_direct_sum and dec.residual == 0.0
            assert dec.summands[0].label == label and dec.summands[0].dim == W.shape[0]


def test_agglomerative_step_and_superposed_near_orthogonal_features():
    # group A = {e1, (e1 + e2)/sqrt2} spans the (e1, e2) plane; group B = {e3 + t e2, e3 - t e2 + s e4}:
    # every cross pair has |cos| <= t/sqrt2 = 0.07 < tol, so the graph splits A from B, but B's span
    # contains (2t e2 - s e4)/|.|, at cosine 0.97 to A's plane: the span check must merge them.
    e = torch.eye(4, dtype=F64)
    t, s = 0.1, 0.05
    W = torch.stack([e[0], (e[0] + e[1]) / math.sqrt(2), e[2] + t * e[1], e[2] - t * e[1] + s * e[3]], 1)
    unit = W / W.norm(dim=0)
    assert float((unit[:, :2].T @ unit[:, 2:]).abs().max()) < 0.1  # the premise
    dec = direct_sum_decomposition(W, tol=0.1, rank_tol=0.01)
    assert dec.partition == [[0, 1, 2, 3]] and dec.dims == [4]
    # many nearly orthogonal features in few dims (superposition) are no direct sum
    g = gen(5)
    W2 = torch.randn(20, 60, generator=g, dtype=F64)  # 60 features in R^20, |cos| ~ 0.22
    d2 = direct_sum_decomposition(W2, tol=0.6)
    assert not d2.is_direct_sum
    if d2.total_dim > 20:  # B^T B has a zero eigenvalue, so ||B^T B - I|| >= 1
        # (up to the round-off of the 2-norm of a (total_dim)² matrix of norm ≤ total_dim, sums of 20 products)
        assert d2.subspace_residual >= 1 - fp_tol(F64, scale=d2.total_dim, terms=20)


def test_dead_features_excluded():
    W = torch.cat([BIPYRAMID, torch.zeros(3, 1, dtype=F64), 1e-3 * torch.ones(3, 1, dtype=F64)], 1)
    dec = direct_sum_decomposition(W)
    assert dec.dead == (5, 6) and dec.partition == [[0, 1, 2], [3, 4]]
    empty = direct_sum_decomposition(torch.zeros(3, 4))
    assert empty.summands == () and empty.dead == (0, 1, 2, 3) and empty.name == ""


# ----------------------------------------------------------------------------
# Grassmannian clustering
# ----------------------------------------------------------------------------
def test_grassmannian_clusters_find_summand_planes():
    g = gen(6)
    for W, plane, n_sub in [(BIPYRAMID, [0, 1, 2], 3), (PENT_BIPYRAMID, [0, 1, 2, 3, 4], 10)]:
        for noise in (0.0, 0.01):  # plane jitter ~ noise / sin(angle) << eps = 0.1
            Wr, perm = random_symmetry(W, g)
            Wr = Wr + noise * torch.randn(Wr.shape, generator=g, dtype=F64)
            inv = torch.argsort(perm)
            clusters = grassmannian_clusters(Wr, 2)
            top = clusters[0]
            assert len(top.subsets) == n_sub
            assert list(top.features) == sorted(int(inv[j]) for j in plane)
            assert top.spread < 0.1
            # the summand's plane is the top cluster's plane
            dec = direct_sum_decomposition(Wr)
            P2 = next(s.projector for s in dec.summands if s.dim == 2)
            assert float(chordal_distance(P2, top.projector)) < 0.05
            # "pyramid" planes (one vertex + the antipodal pair) hold 2 subsets each
            assert all(len(c.subsets) == 2 for c in clusters[1:])
    with pytest.raises(ValueError, match="max_subsets"):
        grassmannian_clusters(torch.randn(3, 30, generator=g), 3, max_subsets=100)
    with pytest.raises(ValueError, match="at most the number of hidden dims"):
        grassmannian_clusters(BIPYRAMID, 4)


# ----------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("k,plus,name", [(5, False, "5-gon"), (5, True, "5-gon+"), (6, False, "6-gon")])
def test_classify_point_kgons(k, plus, name):
    p = kgon_parameters(k, plus=plus, dead_bias=-0.1)
    info = classify_point(p["W"], p["b"])
    assert info["name"] == name and info["k"] == k
    D = torch.tensor(info["feature_dimensionality"], dtype=F64)
    assert torch.allclose(D[:k], torch.full((k,), 2 / k, dtype=torch.float64), rtol=0, atol=dim_tol(p["W"]))
    assert bool((D[k:] == 0).all())
    assert info["decomposition"]["dead"] == list(range(k, 6))


def test_classify_point_names_a_trained_kgon_like_its_decomposition():
    """A trained hexagon's biases differ by ~0.02 (finite data), beyond the regularity tolerance:
    it is still named by its decomposition ("6-gon"), never None beside a decomposition "6-gon"."""
    p = kgon_parameters(6, dead_bias=-0.1)
    b = p["b"] + 0.02 * torch.tensor([1.0, -1.0, 0.5, 0.0, -0.5, 1.0], dtype=p["b"].dtype)
    info = classify_point(p["W"], b)
    assert not info["equal_biases"] and not info["regular"]
    assert info["decomposition"]["name"] == "6-gon" and info["name"] == "6-gon"


def test_classify_point_three_dims():
    b = torch.full((5,), -0.2, dtype=F64)
    info = classify_point(BIPYRAMID, b)
    assert info["name"] == "(3-gon ⊕ 2-gon)" and info["direct_sum"] and info["summands"] == [[0, 1, 2], [3, 4]]
    assert info["antipodal_pairs"] == [(3, 4)] and not info["planar"]
    W = torch.cat([BIPYRAMID, torch.zeros(3, 1, dtype=F64)], 1)
    info = classify_point(W, torch.cat([b, torch.tensor([1 / 12], dtype=F64)]))
    assert info["name"] == "(3-gon ⊕ 2-gon)+" and info["dead_positive_bias"] == [5]
    two = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)  # Elhage's low-density picture
    assert classify_point(two, torch.zeros(3))["name"] == "(1-gon ⊕ 1-gon)"
    generic = torch.tensor([[1.0, 0.3, -0.2, 0.5], [0.1, 1.0, 0.4, -0.7], [0.2, -0.1, 1.0, 0.9]], dtype=F64)
    assert classify_point(generic, torch.zeros(4))["name"] is None


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        feature_dimensionality(torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \(m, n\)"):
        direct_sum_decomposition(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="NaN"):
        feature_dimensionality(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="NaN"):
        direct_sum_decomposition(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(TypeError, match="real"):
        feature_dimensionality(torch.ones(2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="array-like"):
        model_dimensionality("abc")
    with pytest.raises(ValueError, match="tol must be in"):
        direct_sum_decomposition(BIPYRAMID, tol=1.5)
    with pytest.raises(ValueError, match="at least one"):
        direct_sum_decomposition(torch.ones(3, 0))
    with pytest.raises(ValueError, match="b must have shape"):
        classify_point(BIPYRAMID, torch.zeros(4))
    with pytest.raises(ValueError, match="same space"):
        chordal_distance(torch.eye(2), torch.eye(3))


def test_square_antiprism_is_recognised_and_has_dimensionality_three_eighths():
    g = gen(40)
    sap = square_antiprism()
    assert sap.shape == (3, 8) and torch.allclose(sap.norm(dim=0), torch.ones(8, dtype=F64))
    assert torch.allclose(feature_dimensionality(sap), torch.full((8,), 3 / 8, dtype=F64))
    # rotated, permuted, slightly noisy, and as a summand next to an antipodal pair in 5 dims
    for _ in range(3):
        Wr, _ = random_symmetry(sap, g)
        Wn = Wr + 0.01 * torch.randn(Wr.shape, generator=g, dtype=F64)
        assert direct_sum_decomposition(Wn).summands[0].label == "square antiprism"
        W5 = torch.zeros(5, 10, dtype=F64)
        W5[:3, :8] = Wn
        W5[3, 8], W5[3, 9] = 1.0, -1.0
        Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))
        dec = direct_sum_decomposition(Q @ W5)
        assert sorted(sm.label for sm in dec.summands) == ["2-gon", "square antiprism"]
    # other 8-point configurations in 3 dims are not: the cube, an antiprism with the wrong height,
    # and a square prism (the squares not turned)
    cube = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=F64).T / math.sqrt(3)
    flat = sap.clone()
    flat[2] *= 0.5
    flat = flat / flat.norm(dim=0)
    prism = sap.clone()
    prism[:2, 1::2] = sap[:2, 0::2]
    prism = prism / prism.norm(dim=0)
    for W in (cube, flat, prism):
        Wr, _ = random_symmetry(W, g)
        assert direct_sum_decomposition(Wr).summands[0].label == "8 features in 3 dims"


@pytest.mark.slow
def test_tetrahedron_beats_pairs_when_dense_and_loses_when_sparse():
    """4 features in 3 dims, uniform importance: trained online (fresh Elhage data every step) from an
    exact tetrahedron and from an exact antipodal pair + 2 dedicated features (2+1+1), each plus noise.
    At S = 0.3 the tetrahedron stays a tetrahedron and has the lower population loss (the 2+1+1 start
    does not stay 2+1+1); at S = 0.8 both stay, and 2+1+1 is lower.  This is why figure 8 shows the
    tetrahedron at S = 0.3 and 2+1+1 from S = 0.6 on.  The losses are compared on the same 10^6 fresh
    samples; the tolerance is 4 Monte-Carlo standard errors of the paired difference (end points of
    the 3000 online steps at lr 1e-3 are not averaged over: the margins found, about 15 and 20 s.e.,
    leave room for that)."""
    tet = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=F64).T / math.sqrt(3)
    pairs = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=F64)

    def fit(W0: torch.Tensor, S: float, seed: int) -> ToyModelOfSuperposition:
        g = gen(seed)
        m = ToyModelOfSuperposition(4, 3, dtype=F64, generator=g)
        with torch.no_grad():
            m.W.copy_(W0 + 0.01 * torch.randn(W0.shape, generator=g, dtype=F64))
            m.b.zero_()
        X = make_tms_data(1000, 4, sparsity=S, generator=g, dtype=F64)

        def fresh(batch_size: int, gg: torch.Generator) -> torch.Tensor:
            return make_tms_data(batch_size, 4, sparsity=S, generator=gg, dtype=F64)

        train(m, X, tms_loss, steps=3000, lr=1e-3, batch_size=4096, stream=fresh, finish=None, generator=g)
        return m

    for S, tet_wins in ((0.3, True), (0.8, False)):
        mt, mp = fit(tet, S, 50), fit(pairs, S, 51)
        Xh = make_tms_data(1_000_000, 4, sparsity=S, generator=gen(52), dtype=F64)
        with torch.no_grad():
            diff = ((mt(Xh) - Xh) ** 2).sum(1) - ((mp(Xh) - Xh) ** 2).sum(1)  # tetrahedron minus 2+1+1
        mean, se = float(diff.mean()), float(diff.std()) / math.sqrt(len(diff))
        assert (mean < -4 * se) if tet_wins else (mean > 4 * se), (S, mean, se)
        assert direct_sum_decomposition(mt.W.detach()).summands[0].label == "tetrahedron"
        if not tet_wins:
            dec = direct_sum_decomposition(mp.W.detach())
            assert sorted(sm.label for sm in dec.summands) == ["1-gon", "1-gon", "2-gon"]
