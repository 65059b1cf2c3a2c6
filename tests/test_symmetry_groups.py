"""Group axioms as actions on batches, and uniform/Haar sampling in distribution."""

import math

import pytest
import torch

from slt.symmetry import (
    SO,
    SO2,
    Cyclic,
    Dihedral,
    DirectProduct,
    Permutation,
    Reflection,
    SignFlips,
)

from conftest import F64, fp_tol

GROUPS = [
    Cyclic(5),
    Cyclic(6, action="rotation"),
    Permutation(4),
    Permutation(4, generators=[[1, 0, 2, 3], [0, 2, 3, 1]]),
    Reflection(1),
    Reflection(3, normal=[1.0, 2.0, -1.0]),
    SignFlips(3),
    Dihedral(5),
    SO2(),
    SO(3),
    SO(4),
    DirectProduct(SO2(), Reflection(1), Cyclic(3)),
    DirectProduct(Dihedral(3), SignFlips(2)),
]


@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_action_axioms(G):
    gen = torch.Generator().manual_seed(0)
    m = G.degree
    x = torch.randn(32, 3, m, generator=gen, dtype=F64)  # middle dims are acted on too
    a = G.sample(32, gen, dtype=F64)
    b = G.sample(32, gen, dtype=F64)
    e = G.identity(F64)
    assert torch.allclose(G.act(e, x), x)
    # identities of orthogonal matrices (entries ≤ 1, orthonormal to γ_m as sampled) acting on x:
    # at most three m-term products, rounding γ_3m relative to max|x|; a wrong product is off by O(|x|)
    tol = fp_tol(F64, scale=float(x.abs().max()), terms=3 * m)
    assert torch.allclose(G.act(G.compose(a, b), x), G.act(a, G.act(b, x)), rtol=0, atol=tol)
    assert torch.allclose(G.act(G.inverse(a), G.act(a, x)), x, rtol=0, atol=tol)
    # one element on the whole batch == the same element per sample
    assert torch.allclose(G.act(a[0], x), G.act(a[0].expand(32, m, m), x), rtol=0, atol=tol)
    # orthogonal action preserves norms
    norm_tol = fp_tol(F64, scale=float(x.norm(dim=-1).max()), terms=3 * m)
    assert torch.allclose(G.act(a, x).norm(dim=-1), x.norm(dim=-1), rtol=0, atol=norm_tol)


@pytest.mark.parametrize("G", [g for g in GROUPS if g.is_finite], ids=repr)
def test_finite_group_is_closed_and_orders(G):
    E = G.elements(F64)
    assert E.shape[0] == G.order
    assert torch.allclose(E[0], torch.eye(G.degree, dtype=F64))

    # an m-term product of matrices with entries ≤ 1, against an element computed directly, whose
    # cos/sin of a rounded angle 2πk/|G| carry up to 2π ulps
    tol = fp_tol(F64, terms=2 * G.degree + 8)

    def index(g):
        d = (E - g).abs().flatten(1).max(1).values
        assert float(d.min()) < tol, "product left the group"
        return int(d.argmin())

    table = [[index(G.compose(g, h)) for h in E] for g in E]
    for row in table:  # Latin square: every product once per row
        assert sorted(row) == list(range(G.order))
    inv = [index(G.inverse(g)) for g in E]
    assert len(set(inv)) == G.order


def test_known_orders_and_dims():
    assert Cyclic(5).order == 5 and Permutation(4).order == 24 and Dihedral(5).order == 10
    assert SignFlips(3).order == 8 and Reflection(2).order == 2
    assert Permutation(4, generators=[[1, 0, 2, 3], [1, 2, 3, 0]]).order == 24
    assert SO2().dim == 1 and SO(3).dim == 3 and SO(4).dim == 6 and Cyclic(3).dim == 0
    P = DirectProduct(SO2(), Reflection(1), Cyclic(3))
    assert P.degree == 6 and P.dim == 1 and P.order is None
    assert DirectProduct(Dihedral(3), SignFlips(2)).order == 24


def test_cyclic_shift_and_dihedral_geometry():
    x = torch.arange(4.0).reshape(1, 4)
    g1 = Cyclic(4).elements()[1]
    assert Cyclic(4).act(g1, x).tolist() == [[3.0, 0.0, 1.0, 2.0]]
    # D_k maps the k-gon onto itself
    from slt.models import polygon_support

    P = polygon_support(5, dtype=F64)
    # unit vertices moved by 2×2 orthogonal matrices: coordinates off by γ_2; cdist may evaluate
    # |a|² + |b|² − 2a·b, whose rounding (γ_2 · 4) it then takes the square root of; a wrong
    # element maps a vertex ≥ 2 sin(π/10) ≈ 0.6 away from every vertex
    dist_tol = math.sqrt(fp_tol(F64, scale=4.0, terms=2)) + fp_tol(F64, terms=2)
    for g in Dihedral(5).elements(F64):
        gp = P @ g.T
        assert torch.cdist(gp, P).min(1).values.max() < dist_tol


def test_finite_sampling_is_uniform():
    G = Dihedral(4)
    gen = torch.Generator().manual_seed(1)
    N = 8000
    s = G.sample(N, gen, dtype=F64)
    E = G.elements(F64)
    idx = (s.unsqueeze(1) - E.unsqueeze(0)).abs().flatten(2).max(2).values.argmin(1)
    counts = torch.bincount(idx, minlength=G.order).double()
    chi2 = float(((counts - N / G.order) ** 2 / (N / G.order)).sum())
    # chi-square with 7 dof: P(chi2 > 24.3) = 0.001
    assert chi2 < 24.3


@pytest.mark.parametrize("G", [SO2(), SO(3), SO(4)], ids=repr)
def test_haar_rotated_vector_is_uniform_on_sphere(G):
    d = G.degree
    gen = torch.Generator().manual_seed(2)
    N = 20000
    g = G.sample(N, gen, dtype=F64)
    v = torch.zeros(d, dtype=F64)
    v[0] = 1.0
    u = g @ v  # (N, d)
    # uniform on S^{d-1}: E u = 0, E u u^T = I/d; Var(u_i) = 1/d, Var(u_i u_j) = 1/(d(d+2)) (i != j)
    sem_mean = math.sqrt(1.0 / d / N)
    assert (u.mean(0).abs() < 4.5 * sem_mean).all()
    M = u.T @ u / N
    sem_off = math.sqrt(1.0 / (d * (d + 2)) / N)
    off = M - torch.diag(torch.diag(M))
    assert off.abs().max() < 4.5 * sem_off
    var_sq = 3.0 / (d * (d + 2)) - 1.0 / d**2  # Var(u_i^2)
    assert (torch.diag(M) - 1.0 / d).abs().max() < 4.5 * math.sqrt(var_sq / N)
    # Haar samples are proper rotations (det by LU of an orthonormal matrix: γ_(d²) relative)
    assert torch.allclose(torch.linalg.det(g), torch.ones(N, dtype=F64), rtol=0, atol=fp_tol(F64, terms=d * d))


def test_haar_left_invariance_so3():
    """h·g has the law of g: compare the distribution of the rotation angle (KS)."""
    G = SO(3)
    gen = torch.Generator().manual_seed(3)
    N = 4000
    g1 = G.sample(N, gen, dtype=F64)
    h = G.sample(1, gen, dtype=F64)[0]
    g2 = h @ G.sample(N, gen, dtype=F64)

    def angle(g):
        tr = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1)
        return torch.arccos(((tr - 1) / 2).clamp(-1, 1))

    a1, a2 = angle(g1).sort().values, angle(g2).sort().values
    grid = torch.cat([a1, a2]).sort().values
    F1 = torch.searchsorted(a1, grid, right=True).double() / N
    F2 = torch.searchsorted(a2, grid, right=True).double() / N
    ks = float((F1 - F2).abs().max())
    assert ks < 1.63 * math.sqrt(2.0 / N)  # KS two-sample critical value at level 0.01
    # and against the Haar angle law on SO(3): density (1 - cos a)/pi on [0, pi]
    F = (a1 - torch.sin(a1)) / math.pi
    emp = torch.arange(1, N + 1, dtype=F64) / N
    assert float((F - emp).abs().max()) < 1.63 / math.sqrt(N)


def test_so2_angle_uniform_ks():
    gen = torch.Generator().manual_seed(4)
    N = 5000
    g = SO2().sample(N, gen, dtype=F64)
    a = torch.atan2(g[:, 1, 0], g[:, 0, 0]).sort().values
    F = (a + math.pi) / (2 * math.pi)
    emp = torch.arange(1, N + 1, dtype=F64) / N
    assert float((F - emp).abs().max()) < 1.63 / math.sqrt(N)


def test_bad_shapes_and_arguments_raise():
    with pytest.raises(ValueError, match="acts on vectors of length 2"):
        SO2().act(SO2().identity(), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="leading|batch"):
        Cyclic(3).act(Cyclic(3).identity(), torch.zeros(3))
    with pytest.raises(TypeError, match="floating"):
        Cyclic(3).act(Cyclic(3).identity(), torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        Cyclic(0)
    with pytest.raises(ValueError, match="permutation"):
        Permutation(3, generators=[[0, 0, 1]])
    with pytest.raises(ValueError, match="Lie group"):
        SO(3).elements()
    with pytest.raises(ValueError, match="element"):
        Cyclic(3).act(torch.eye(3).expand(4, 3, 3), torch.zeros(5, 3))
    with pytest.raises(TypeError):
        DirectProduct(SO2(), "x")
    with pytest.raises(TypeError, match="generator"):
        SO2().sample(3, generator=0)
