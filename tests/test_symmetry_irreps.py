"""Character tables, isotypic projectors and the per-irrep susceptibility spectrum."""
import math

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

from conftest import F64, IGNORE_RUNTIME_WARNINGS, fp_tol, moment_gap_tol

pytestmark = IGNORE_RUNTIME_WARNINGS

# Characters come from the eigenvectors of a random combination of class matrices (Burnside's
# algorithm): they are accurate to ε‖M‖/gap, and the gap of that random combination is not under
# the tests' control (the library itself accepts characters orthonormal to 1e-6).  The checks
# below allow the eigenproblem a condition number up to 1/√ε (half the digits); a wrong character
# or projector is off by O(1/|G|) or more.
CHAR_COND = 1 / math.sqrt(torch.finfo(F64).eps)


def char_err(max_dim: int) -> float:
    """Bound on the error of one computed character value (|χ| ≤ dim)."""
    return fp_tol(F64, scale=max_dim, cond=CHAR_COND)


def susceptibility_rounding(res, n: int) -> tuple[float, dict[str, float]]:
    """Rounding bounds on dλ̂/dh and χ of a SusceptibilityResult whose estimates vanish (or agree) in
    exact arithmetic on the same draws.

    ΔL = L_q1 − L_q0 is a difference of two weighted means of n per-sample losses (positive terms,
    magnitude the recorded full-data losses ``loss_q*``): δΔL = 2 γ_n · max L.  χ = −nβ Cov(φ, ΔL) then moves by
    at most nβ · 2 max|φ| · δΔL, and dλ̂/dh = nβ(E ΔL − ΔL(w*)) − (nβ)² Cov(L, ΔL) by at most
    2 nβ δΔL (1 + 2 max|λ̂ trace|) (|L − E L| ≤ 2 max|λ̂ trace| / nβ).
    """
    obs, nb = res.llc.observables, res.nbeta
    losses = [v for k, v in obs.items() if k.startswith("loss_q")]  # loss_q0 and loss_q1 (or loss_q1[i])
    d_delta = 2 * fp_tol(F64, scale=max(float(v.abs().max()) for v in losses), terms=n)
    chi = {k: nb * 2 * float(obs[k].abs().max()) * d_delta for k in res.chi}
    return 2 * nb * d_delta * (1 + 2 * float(res.llc.llc_trace.abs().max())), chi

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
    max_dim = max(t.dim for t in tab)  # the Gram entries average products of two characters (≤ dim² each)
    gram_tol = 2 * max_dim * char_err(max_dim) + fp_tol(F64, scale=max_dim**2, terms=n)
    assert torch.allclose(X.conj() @ X.T / n, torch.eye(len(tab), dtype=X.dtype), rtol=0, atol=gram_tol)
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
    # P = dim/|G| Σ_g χ(g)* (permutation of the orbit points by g): its entries carry dim · char_err
    # (a unitary-like matrix of norm 1, so P P and P Q carry twice that), plus sums of N terms
    max_dim = max(t.real_dim for t in tab)
    p_err = max_dim * char_err(max_dim)
    tol = 3 * p_err + fp_tol(F64, terms=N)
    for i, P in enumerate(Ps):
        assert torch.allclose(P @ P, P, rtol=0, atol=tol)
        assert P.imag.abs().max() < p_err  # real isotypic components
        for Q in Ps[i + 1:]:
            assert (P @ Q).abs().max() < tol
    assert torch.allclose(sum(Ps), torch.eye(N, dtype=Ps[0].dtype), rtol=0, atol=len(Ps) * p_err)
    # the callable projector agrees with the matrix on a non-linear function
    f = lambda x: torch.sin(x[:, 0]) + x[:, -1] ** 3 + x.sum(1) ** 2  # noqa: E731
    vals = f(pts)
    # the same characters, summed over |G| group elements vs over N points: rounding only
    for t, P in zip(tab, Ps):
        tol = fp_tol(F64, scale=t.real_dim * float(vals.abs().max()), terms=N + G.order + G.degree)
        assert torch.allclose(isotypic_projector(G, t)(f)(pts), (P.real @ vals), rtol=0, atol=tol)


def test_trivial_tilt_keeps_invariance_and_others_break_it():
    G = Dihedral(4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 2, generator=g, dtype=F64) * torch.tensor([1.0, 0.5], dtype=F64) + 0.3
    q = symmetrize(x, G)  # exact orbits
    assert invariance_gap(q, G) < moment_gap_tol(q.x, q.weights)
    f = lambda z: z[:, 0] + z[:, 0] ** 2 + 0.5 * z[:, 0] * z[:, 1]  # noqa: E731
    tilted = {t.name: irrep_tilt(q, G, t, f, 1.0) for t in character_table(G)}
    gaps = {name: invariance_gap(d, G) for name, d in tilted.items()}
    # the trivial component of f is invariant up to the rounding of its |G|-term group average, which
    # the tilt exp(1.0 · c) turns into a relative weight error of |G| · max|f| ulps
    weight_terms = G.order * float(f(q.x).abs().max())
    assert gaps["trivial"] < moment_gap_tol(q.x, tilted["trivial"].weights, weight_terms=weight_terms)
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
    # exact on the 16-angle grid (harmonics up to 3): rounding of a 16-term average of f ∘ g (the
    # rotated points carry γ_2 relative, |∇f| |x| ≤ 3 max|f|) with O(1) weights
    tol = fp_tol(F64, scale=float(f(x).abs().max()), terms=3 * (16 + 2))
    for t in character_table(SO2(), order=3):
        p = isotypic_projector(SO2(), t, order=3)(f)(x)
        assert torch.allclose(p, want[t.name], rtol=0, atol=tol), t.name
        tot = tot + p
    assert torch.allclose(tot, f(x), rtol=0, atol=4 * tol)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown irrep"):
        isotypic_projector(Dihedral(3), "m=7")
    with pytest.raises(ValueError, match="acts on vectors of length 2"):
        isotypic_projector(Dihedral(3), "trivial")(lambda z: z[:, 0])(torch.randn(4, 3))
    with pytest.raises(ValueError, match="closed"):
        projector_matrix(Cyclic(4), "trivial", torch.randn(3, 4, dtype=F64))


def test_irrep_susceptibility_polar_model():
    """Polar location model at a C_4-symmetric q (x̄ = 0 exactly): the model sees only the mean, which
    lives in the m=1 irrep.  The observable μ1(w) = r cos θ responds to the m=1 tilt; the trivial and m=2
    tilts leave the mean at zero, so ΔL is constant and χ, dλ̂/dh vanish exactly.

    Closed form for m=1: with L = ½‖μ − x̄‖² + const and x̄ = 0 the localized posterior factorises,
    r ~ N(0, v_r), θ ~ N(0, v_θ) (SGLD's stationary variances 1/(κ(1 − εκ/4)) at κ = nβ + γ and γ), and
    ΔL = L_{q1} − L_q = −μ·δ + const with δ the tilted mean, so χ = −nβ Cov(μ1, ΔL) = nβ δ1 Var(μ1),
    Var(μ1) = v_r (1 + e^{−2 v_θ})/2.  γ = 10 makes θ relax in 1/(εγ) ≈ 260 steps (at γ = 1 it takes
    2600, and a run of 400 draws gave χ 0.66 against the closed form's 0.36, passing only a "≠ 0" check).
    Tolerance 4 s.e. of the 8 chains' estimate."""
    from slt.symmetry.irreps import character_table, irrep_tilt

    G = Cyclic(4, action="rotation")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 2, generator=g, dtype=F64) + torch.tensor([1.0, 0.0], dtype=F64)
    q = symmetrize(x, G)
    model = PolarGaussianLocation(init=(0.0, 0.0), dtype=F64)
    nb, gamma = slt.default_nbeta(2000), 10.0
    eps = 0.1 / (nb + 1)
    f = lambda z: z[:, 0] + 0.5 * z[:, 0] ** 2 + 0.3 * z[:, 0] * z[:, 1]  # noqa: E731
    spec = irrep_susceptibility(
        model, q, G, f, strength=0.5, nbeta=nb, batch_size=None, num_chains=8, num_draws=2000,
        localization=gamma, step_size=eps, dtype=F64, progress=False,
        observables={"mu1": lambda p: p["w"][:, 0] * torch.cos(p["w"][:, 1])},
    )
    m1 = [t for t in character_table(G) if t.name == "m=1"][0]
    q1 = irrep_tilt(q, G, m1, f, 0.5)
    w1 = q1.weights.double() / q1.weights.double().sum()
    delta1 = float((w1 * q1.x[:, 0]).sum() - q.x[:, 0].mean())
    k = nb + gamma
    v_r, v_theta = 1 / (k * (1 - eps * k / 4)), 1 / (gamma * (1 - eps * gamma / 4))
    chi_exact = nb * delta1 * v_r * (1 + math.exp(-2 * v_theta)) / 2
    names = spec.names
    assert set(names) == {"trivial", "m=1", "m=2"}
    i1 = names.index("m=1")
    chi, sem = spec.chi["mu1"], spec.chi_sem["mu1"]
    assert abs(float(chi[i1]) - chi_exact) < 4 * float(sem[i1]) and chi_exact > 8 * float(sem[i1])
    for nm in ("trivial", "m=2"):
        i = names.index(nm)
        # exactly zero: these tilts leave x̄ = 0, so ΔL is a constant up to rounding
        dllc_tol, chi_tol = susceptibility_rounding(spec.results[i], q.n)
        assert abs(float(chi[i])) < chi_tol["mu1"] and abs(float(spec.dllc_dh[i])) < dllc_tol
    df = spec.to_frame()
    assert list(df["irrep"]) == names
    assert spec.plot() is not None


def _polar_setup():
    G = Cyclic(4, action="rotation")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 2, generator=g, dtype=F64) + torch.tensor([1.0, 0.0], dtype=F64)
    q = symmetrize(x, G)
    model = PolarGaussianLocation(init=(0.3, 0.2), dtype=F64)
    nb = slt.default_nbeta(2000)
    kw = dict(nbeta=nb, batch_size=None, num_chains=3, num_draws=150, localization=1.0, step_size=0.1 / (nb + 1),
              dtype=F64, progress=False, seed=5, observables={"w": lambda p: p["w"]})
    f = lambda z: z[:, 0] + 0.5 * z[:, 0] ** 2 + 0.3 * z[:, 0] * z[:, 1]  # noqa: E731
    return G, q, model, f, kw


def test_irrep_susceptibility_shares_draws_exactly():
    """All irreps come from one run: the numbers equal one llc_susceptibility call per irrep (same seed)."""
    from slt.symmetry import llc_susceptibility

    G, q, model, f, kw = _polar_setup()
    for tilt, st in (("exp", 0.3), ("linear", 0.05)):
        spec = irrep_susceptibility(model, q, G, f, strength=st, tilt=tilt, normalize=tilt == "linear", **kw)
        assert len({id(r.llc) for r in spec.results}) == 1
        for i, nm in enumerate(spec.names):
            q1 = irrep_tilt(q, G, nm, f, st, kind=tilt, normalize=tilt == "linear")
            one = llc_susceptibility(model, q, q1, 0.0, **kw)
            # the same draws; ΔL evaluated in another order (rounding only: a different run is off by O(s.e.))
            dllc_tol, chi_tol = susceptibility_rounding(one, q.n)
            assert abs(one.dllc_dh - float(spec.dllc_dh[i])) < dllc_tol
            assert torch.allclose(one.chi["w"], spec.chi["w"][i], rtol=0, atol=chi_tol["w"])
            assert torch.allclose(one.chi_sem["w"], spec.chi_sem["w"][i], rtol=0, atol=2 * chi_tol["w"])


def test_linear_tilt_is_exactly_linear():
    G, q, model, f, kw = _polar_setup()
    a = irrep_susceptibility(model, q, G, f, strength=0.02, tilt="linear", normalize=True, **kw)
    b = irrep_susceptibility(model, q, G, f, strength=0.04, tilt="linear", normalize=True, **kw)
    # the same draws and ΔL_b = 2 ΔL_a in real arithmetic: rounding of b's and twice a's ΔL
    n = slt.symmetry.as_data(q).n
    for i in range(len(a.names)):
        (db, cb), (da, ca) = susceptibility_rounding(b.results[i], n), susceptibility_rounding(a.results[i], n)
        assert abs(float(b.dllc_dh[i]) - 2 * float(a.dllc_dh[i])) < db + 2 * da
        assert torch.allclose(b.chi["w"][i], 2 * a.chi["w"][i], rtol=0, atol=cb["w"] + 2 * ca["w"])
    # normalized: unit standard deviation of the relative weight change per unit strength, for every irrep
    d = slt.symmetry.as_data(q)
    v = torch.full((d.n,), 1.0 / d.n, dtype=F64) if d.weights is None else d.weights.double() / d.weights.double().sum()
    for t in character_table(G):
        w = irrep_tilt(q, G, t, f, 0.02, kind="linear", normalize=True).weights.double()
        rel = w / v - 1.0
        # weighted means over n rows of O(1)-rounded terms (w / v − 1 is exact to an ulp or two of 1)
        tol = fp_tol(F64, terms=d.n)
        assert abs(float((v * rel).sum())) < tol and abs(float((v * rel.square()).sum().sqrt()) - 0.02) < tol
    with pytest.raises(ValueError, match="too large for a linear tilt"):
        irrep_tilt(q, G, "m=1", f, 50.0, kind="linear", normalize=True)
    with pytest.raises(ValueError, match="kind"):
        irrep_tilt(q, G, "m=1", f, 0.02, kind="quadratic")


def test_tms_selection_rule():
    """Schur's lemma on the TMS 6-gon (C_6 feature shifts, exactly invariant population q on a μ-grid):
    a linear tilt along the m=3 / m=2 Fourier mode of f(x) = x_1 moves the column norms |W_i| only in
    their own mode (|z| > 3.5, about -0.23 per unit tilt as in the README run), and not in any other
    irrep (|z| < 3); ≈ 5 s."""
    from slt.models import ToyModelOfSuperposition, kgon_parameters, tms_loss

    k = 16
    mu = (torch.arange(k, dtype=F64) + 0.5) / k
    x = torch.zeros(6 * k, 6, dtype=F64)
    for i in range(6):
        x[i * k:(i + 1) * k, i] = mu
    G = Cyclic(6)
    model = ToyModelOfSuperposition(6, 2).to(F64)
    model.load_state_dict(kgon_parameters(6))
    f = lambda z: z[:, 0]  # noqa: E731
    obs_irreps = [t.name for t in character_table(G)]  # trivial, m=3, m=1, m=2
    pats = torch.stack([isotypic_projector(G, r)(f)(torch.eye(6, dtype=F64)) for r in obs_irreps])
    pats = pats / pats.norm(dim=1, keepdim=True)  # Fourier modes cos(2π m i / 6), unit norm
    s = 0.1
    spec = irrep_susceptibility(
        model, x, G, f, strength=s, tilt="linear", normalize=True, irreps=["m=3", "m=2"],
        nbeta=slt.default_nbeta(20000), loss_fn=tms_loss, batch_size=None, num_chains=8, num_draws=400,
        num_steps_bw_draws=10, num_burnin=1000, localization=1.0, dtype=F64, seed=0, progress=False, mala_every=0,
        observables={"psi": lambda p: p["W"].norm(dim=1) @ pats.T},
    )
    chi, sem = spec.chi["psi"] / s, spec.chi_sem["psi"] / s  # (2 tilts, 4 observable irreps)
    print(spec.names, chi, sem)
    for i, nm in enumerate(spec.names):
        for j, ob in enumerate(obs_irreps):
            z = float(chi[i, j] / sem[i, j])
            if ob == nm:
                assert z < -3.5, (nm, ob, z)
                assert abs(float(chi[i, j]) + 0.23) < 4 * float(sem[i, j]), (nm, float(chi[i, j]))
            else:
                assert abs(z) < 3.0, (nm, ob, z)
