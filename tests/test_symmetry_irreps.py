"""Character tables, isotypic projectors and the per-irrep susceptibility spectrum."""


import pytest
import torch

import slt
from slt.models import PolarGaussianLocation
from slt.symmetry import SO2, Cyclic, Dihedral, DirectProduct, Permutation, Reflection, invariance_gap, symmetrize
from slt.symmetry.irreps import (
    character_table,
    irrep_susceptibility,
    irrep_tilt,
    isotypic_projector,
    projector_matrix,
)

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

GROUPS = [
    Cyclic(5),
    Cyclic(6, action="rotation"),
    Dihedral(3),
    Dihedral(4),
    Permutation(3),
    Permutation(4),
    DirectProduct(Reflection(1), Cyclic(3)),
]


@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_character_table_orthogonality(G):
    """Σ over complex irreps of dim² = |G|; characters orthonormal; trivial first."""
    tab = character_table(G, real=False)
    X = torch.stack([t.character for t in tab])
    n = G.order
    assert sum(t.dim**2 for t in tab) == n
    assert torch.allclose(X.conj() @ X.T / n, torch.eye(len(tab), dtype=X.dtype), atol=1e-8)
    assert tab[0].name == "trivial" and torch.allclose(tab[0].character.real, torch.ones(n, dtype=F64))


def test_known_tables():
    assert [t.real_dim for t in character_table(Cyclic(5))] == [1, 2, 2]  # Fourier modes 0, ±1, ±2
    assert sorted(t.name for t in character_table(Cyclic(5))) == ["m=1", "m=2", "trivial"]
    assert sorted(t.dim for t in character_table(Permutation(4))) == [1, 1, 2, 3, 3]
    assert sorted(t.dim for t in character_table(Dihedral(4))) == [1, 1, 1, 1, 2]
    assert sorted(t.dim for t in character_table(Dihedral(5))) == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="order"):
        character_table(SO2())
    with pytest.raises(ValueError, match="Lie group"):
        character_table(slt.symmetry.SO(3))


def _orbit_points(G, seed=0, num=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(num, G.degree, generator=g, dtype=F64)
    E = G.elements(dtype=F64)
    return torch.cat([base @ e.T for e in E])  # closed under G


@pytest.mark.parametrize("G", GROUPS, ids=repr)
def test_projectors_idempotent_orthogonal_complete(G):
    pts = _orbit_points(G)
    tab = character_table(G)
    Ps = [projector_matrix(G, t, pts) for t in tab]
    N = pts.shape[0]
    for i, P in enumerate(Ps):
        assert torch.allclose(P @ P, P, atol=1e-9)
        assert P.imag.abs().max() < 1e-9  # real isotypic components
        for Q in Ps[i + 1:]:
            assert (P @ Q).abs().max() < 1e-9
    assert torch.allclose(sum(Ps), torch.eye(N, dtype=Ps[0].dtype), atol=1e-9)
    # the callable projector agrees with the matrix on a non-linear function
    f = lambda x: torch.sin(x[:, 0]) + x[:, -1] ** 3 + x.sum(1) ** 2  # noqa: E731
    vals = f(pts)
    for t, P in zip(tab, Ps):
        assert torch.allclose(isotypic_projector(G, t)(f)(pts), (P.real @ vals), atol=1e-9)


def test_trivial_tilt_keeps_invariance_and_others_break_it():
    G = Dihedral(4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 2, generator=g, dtype=F64) * torch.tensor([1.0, 0.5], dtype=F64) + 0.3
    q = symmetrize(x, G)  # exact orbits
    assert invariance_gap(q, G) < 1e-20
    f = lambda z: z[:, 0] + z[:, 0] ** 2 + 0.5 * z[:, 0] * z[:, 1]  # noqa: E731
    gaps = {t.name: invariance_gap(irrep_tilt(q, G, t, f, 1.0), G) for t in character_table(G)}
    assert gaps["trivial"] < 1e-20
    assert max(v for k, v in gaps.items() if k != "trivial") > 1e-3


def test_so2_circular_harmonics():
    """P_m of f(x) = x1 + x1² - x2² + (x1³ - 3 x1 x2²) picks the m = 1, 2, 3 parts exactly (+ the m=0 part)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 2, generator=g, dtype=F64)
    r2 = x.square().sum(1)
    m1 = x[:, 0] + 0.0 * r2
    m2 = x[:, 0] ** 2 - x[:, 1] ** 2
    m3 = x[:, 0] ** 3 - 3 * x[:, 0] * x[:, 1] ** 2
    f = lambda z: z[:, 0] + 2 * z[:, 0] ** 2 + (z[:, 0] ** 3 - 3 * z[:, 0] * z[:, 1] ** 2)  # noqa: E731
    # 2 x1² = r² + (x1² − x2²)
    want = {"trivial": r2, "m=1": m1, "m=2": m2, "m=3": m3}
    tot = torch.zeros(50, dtype=F64)
    for t in character_table(SO2(), order=3):
        p = isotypic_projector(SO2(), t, order=3)(f)(x)
        assert torch.allclose(p, want[t.name], atol=1e-9), t.name
        tot = tot + p
    assert torch.allclose(tot, f(x), atol=1e-9)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown irrep"):
        isotypic_projector(Dihedral(3), "m=7")
    with pytest.raises(ValueError, match="acts on vectors of length 2"):
        isotypic_projector(Dihedral(3), "trivial")(lambda z: z[:, 0])(torch.randn(4, 3))
    with pytest.raises(ValueError, match="closed"):
        projector_matrix(Cyclic(4), "trivial", torch.randn(3, 4, dtype=F64))


def test_irrep_susceptibility_polar_model():
    """Polar location model at a C_4-symmetric q (x̄ = 0 exactly): the model sees only the mean, which
    lives in the m=1 irrep.  The observable μ1(w) responds to the m=1 tilt (χ ≠ 0 beyond 4 s.e.);
    the trivial and m=2 tilts leave the mean at zero, so ΔL is constant and χ, dλ̂/dh vanish exactly."""
    G = Cyclic(4, action="rotation")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 2, generator=g, dtype=F64) + torch.tensor([1.0, 0.0], dtype=F64)
    q = symmetrize(x, G)
    model = PolarGaussianLocation(init=(0.0, 0.0), dtype=F64)
    nb = slt.default_nbeta(2000)
    f = lambda z: z[:, 0] + 0.5 * z[:, 0] ** 2 + 0.3 * z[:, 0] * z[:, 1]  # noqa: E731
    spec = irrep_susceptibility(
        model, q, G, f, strength=0.5, nbeta=nb, batch_size=None, num_chains=4, num_draws=400, localization=1.0,
        step_size=0.1 / (nb + 1), dtype=F64, progress=False,
        observables={"mu1": lambda p: p["w"][:, 0] * torch.cos(p["w"][:, 1])},
    )
    print(spec, spec.chi)
    names = spec.names
    assert set(names) == {"trivial", "m=1", "m=2"}
    i1 = names.index("m=1")
    chi, sem = spec.chi["mu1"], spec.chi_sem["mu1"]
    assert abs(float(chi[i1])) > 4 * float(sem[i1])
    for nm in ("trivial", "m=2"):
        i = names.index(nm)
        assert abs(float(chi[i])) < 1e-8 and abs(float(spec.dllc_dh[i])) < 1e-6
    df = spec.to_frame()
    assert list(df["irrep"]) == names
    assert spec.plot() is not None
