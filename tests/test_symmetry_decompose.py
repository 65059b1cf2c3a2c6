r"""LLC decomposition over the subset lattice of symmetries (Möbius inversion).

Known answer: two independent polar location blocks (x ∈ R² × R², a rotation
group on each block): λ(∅) = 2, λ({i}) = 3/2, λ({1,2}) = 1 ⇒ c({i}) = −½,
c({1,2}) = 0.  The posterior factorizes over blocks, so the exact finite-n
value of every λ(S) is a sum of two 2-D quadratures of the same localized
posterior (as in test_symmetry_llc); λ̂(S) and c(S) are compared with those
within 4 propagated standard errors.  Interaction: one shared angle
(μ_b = r_b (cos φ, sin φ)): c({1}) = c({2}) = 0, c({1,2}) = −½.
"""

import math

import pytest
import torch

import slt
from slt.symmetry import SO2, Cyclic, Dihedral, Permutation, Reflection
from slt.symmetry.decompose import (
    BlockPolarLocation,
    block_group,
    decompose,
    generated_group,
    groups_commute,
    joint_symmetrize,
    mobius_inversion,
)

from conftest import F64, IGNORE_RUNTIME_WARNINGS, fp_tol, moment_gap_tol, polar_mean, quadrature_llc

pytestmark = IGNORE_RUNTIME_WARNINGS

QUAD_NUM = 801  # grid points a side of each block's quadrature


def quadrature_block(w_star, xbar, nbeta, gamma):
    """Exact E[nβ(L(w) − L(w*))] for one polar block, L = ½|r u(φ) − x̄|²."""
    half = (8 / math.sqrt(nbeta) + 0.05, 8 / math.sqrt(gamma))
    return quadrature_llc(polar_mean, w_star, xbar, nbeta, gamma, half, num=QUAD_NUM)


def additivity_tol(exact: torch.Tensor) -> float:
    """Rounding bound of c({1,2}) = λ(∅) − λ({1}) − λ({2}) + λ({1,2}), which is exactly 0 when the
    blocks are independent (each λ(S) is a sum of per-block quadratures that depend on S only
    through that block).  Each quadrature sums QUAD_NUM² positive terms p·nβL (L(w*) = 0 at the
    closed-form w*, so nothing cancels) to its value: γ_(QUAD_NUM²) relative; the block means and
    w* entering them agree across subsets up to γ_n, whose effect is far smaller.  An interaction
    is O(½) (see test_interaction_shared_angle_fast)."""
    return sum(fp_tol(F64, scale=abs(float(v)), terms=QUAD_NUM**2) for v in exact)


def test_mobius_inversion_known_values():
    lam = torch.tensor([2.0, 1.5, 1.5, 1.0])  # ∅, {1}, {2}, {1,2}
    c, v = mobius_inversion(lam, torch.tensor([0.01, 0.02, 0.03, 0.04]))
    assert torch.allclose(c, torch.tensor([2.0, -0.5, -0.5, 0.0], dtype=F64))
    assert torch.allclose(v, torch.tensor([0.01, 0.03, 0.04, 0.10], dtype=F64))
    # inversion of the zeta transform on k = 3
    g = torch.Generator().manual_seed(0)
    c3 = torch.randn(8, generator=g, dtype=F64)
    zeta = torch.tensor([sum(float(c3[t]) for t in range(8) if t & s == t) for s in range(8)], dtype=F64)
    assert torch.allclose(mobius_inversion(zeta)[0], c3)
    with pytest.raises(ValueError, match="2\\^k"):
        mobius_inversion(torch.ones(3))


def test_commutation_and_generated_group():
    r1, r2 = block_group(SO2(), 0, 2), block_group(SO2(), 1, 2)
    assert groups_commute(r1, r2)
    # a mirror and the rotations by 2π/4 do not commute; together they generate D_4 (order 8)
    mirror = Reflection(2, normal=[0.0, 1.0])
    rot = Cyclic(4, action="rotation")
    assert not groups_commute(mirror, rot)
    D = generated_group([mirror, rot])
    assert D.order == 8 and D.order == Dihedral(4).order
    # cyclic shift and reversal of 3 coordinates generate S_3
    rev = Permutation(3, generators=[[2, 1, 0]])
    assert generated_group([Cyclic(3), rev]).order == 6


def test_bad_input_errors():
    x = torch.randn(50, 4, dtype=F64)
    model = BlockPolarLocation(2, dtype=F64)
    with pytest.raises(ValueError, match="does not act on the data"):
        decompose(model, x, [SO2()], num_draws=10)
    with pytest.raises(TypeError, match="Group"):
        decompose(model, x, [block_group(SO2(), 0, 2), "rot"], num_draws=10)
    # SO(2) on block 1 and the swap of the blocks do not commute: no joint symmetrization
    swap = Permutation(4, generators=[[2, 3, 0, 1]])
    with pytest.raises(ValueError, match="do not commute"):
        decompose(model, x, [block_group(SO2(), 0, 2), swap], num_draws=10)
    with pytest.raises(ValueError, match="factory"):
        decompose(lambda: BlockPolarLocation(2), x, [block_group(SO2(), 0, 2)], retrain=False)
    # two mirrors at an irrational angle generate an infinite group
    a = math.pi * (math.sqrt(2) - 1)
    m1, m2 = Reflection(2, normal=[0.0, 1.0]), Reflection(2, normal=[math.sin(a), math.cos(a)])
    with pytest.raises(ValueError, match="cannot be symmetrized jointly"):
        joint_symmetrize(torch.randn(5, 2), [m1, m2])


def _blocks_data(n, seed, shift=(1.0, 0.0, 1.0, 0.0)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64) + torch.tensor(shift, dtype=F64)


def _run(shared, groups, x, nb, chains, draws, orbit_samples=None, seed=0):
    gamma = 1.0
    eps = 0.1 / (nb * 2.5 + gamma)  # Hessian eigenvalues ≤ max(1, r²) with r ≈ |x̄_b| ≤ 1.5
    return decompose(
        lambda: BlockPolarLocation(2, shared_angle=shared, dtype=F64), x, groups, nbeta=nb,
        orbit_samples=orbit_samples, batch_size=None, num_chains=chains, num_draws=draws, num_steps_bw_draws=4,
        localization=gamma, step_size=eps, dtype=F64, progress=False, seed=seed,
    )


def _exact_independent(res, x_sym, nb):
    """Exact finite-n λ(S) = sum over blocks of the 2-D quadrature at each q_S."""
    out = []
    for mask, d in enumerate(x_sym):
        w = res.w_star[mask]
        xb = d
        out.append(sum(quadrature_block(w[2 * b:2 * b + 2], xb[2 * b:2 * b + 2], nb, 1.0) for b in range(2)))
    return torch.tensor(out, dtype=F64)


def _means(res):
    return [slt.models.expfam.weighted_mean(r_data.x, r_data.weights) for r_data in res]


def test_known_answer_independent_blocks_fast():
    """C_4 rotations on each block (exact orbits: centred blocks have x̄_b = 0 exactly).

    λ̂(S) and c(S) match the exact finite-n values within 4 propagated s.e., and the
    exact values are within 5% of the asymptotic 2, 3/2, 3/2, 1 / c = 2, −½, −½, 0."""
    x = _blocks_data(250, 0)
    nb = slt.default_nbeta(2000)
    groups = {"rot1": block_group(Cyclic(4, action="rotation"), 0, 2),
              "rot2": block_group(Cyclic(4, action="rotation"), 1, 2)}
    res = _run(False, groups, x, nb, chains=6, draws=600)
    qs = [x] + [joint_symmetrize(x, [groups[k] for k in ks]) for ks in (["rot1"], ["rot2"], ["rot1", "rot2"])]
    means = [slt.models.expfam.weighted_mean(slt.symmetry.as_data(q).x, slt.symmetry.as_data(q).weights) for q in qs]
    exact = _exact_independent(res, means, nb)
    c_exact, _ = mobius_inversion(exact)
    print(res, "\nexact λ(S):", exact.tolist(), "exact c(S):", c_exact.tolist())
    assert torch.allclose(exact, torch.tensor([2.0, 1.5, 1.5, 1.0], dtype=F64), rtol=0.05)
    assert abs(float(c_exact[3])) < additivity_tol(exact)  # additivity: no interaction, exactly
    assert ((res.llc - exact).abs() < 4 * res.llc_sem).all(), (res.llc, exact, res.llc_sem)
    assert ((res.contribution - c_exact).abs() < 4 * res.contribution_sem).all()
    assert not bool(res.distinguishable[3])  # the interaction is not distinguishable from zero
    q12 = slt.symmetry.as_data(qs[3])
    assert float(res.invariance_gap[3]) < moment_gap_tol(q12.x, q12.weights) < float(res.invariance_gap[0])
    df = res.to_frame()
    assert list(df["subset"]) == ["∅", "{rot1}", "{rot2}", "{rot1, rot2}"]
    fig = res.plot()
    assert len(fig.axes) == 2


def test_interaction_shared_angle_fast():
    """One shared angle: the block rotations can only be emulated jointly → c({1,2}) ≈ −½, c({i}) ≈ 0."""
    x = _blocks_data(250, 1)
    nb = slt.default_nbeta(2000)
    groups = {"rot1": block_group(Cyclic(4, action="rotation"), 0, 2),
              "rot2": block_group(Cyclic(4, action="rotation"), 1, 2)}
    res = _run(True, groups, x, nb, chains=6, draws=600)
    print(res)
    c12, s12 = res.contribution_of(["rot1", "rot2"])
    assert c12 + 3 * s12 < 0 and bool(res.distinguishable[3])  # non-zero (z = 3) and negative
    # exact finite-n values: the fully centred point has K = ½(r1² + r2²) exactly, so
    # λ({1,2}) = nβ/(nβ + γ) · 2/2; the others are regular quadratic up to O(1/(nβ r²)).
    lam12 = nb / (nb + 1.0)
    assert abs(float(res.llc[3]) - lam12) < 4 * float(res.llc_sem[3])
    for m in (1, 2):
        assert abs(float(res.contribution[m])) < 4 * float(res.contribution_sem[m]) + 0.1
    assert abs(c12 + 0.5) < 4 * s12 + 0.1


@pytest.mark.slow
def test_known_answer_so2_blocks():
    """SO(2) on each block with Haar orbits (16 per row): exact finite-n values by quadrature;
    x̄ of a centred block is O((16 n)^{-1/2}), so the exact values sit slightly above ½ per centred block."""
    x = _blocks_data(1000, 2)
    nb = slt.default_nbeta(1000)
    groups = {"rot1": block_group(SO2(), 0, 2), "rot2": block_group(SO2(), 1, 2)}
    res = _run(False, groups, x, nb, chains=8, draws=800, orbit_samples=16, seed=3)
    qs = [x] + [joint_symmetrize(x, [groups[k] for k in ks], orbit_samples=16, _index=idx)
                for ks, idx in ((["rot1"], [0]), (["rot2"], [1]), (["rot1", "rot2"], [0, 1]))]
    means = [slt.models.expfam.weighted_mean(slt.symmetry.as_data(q).x, slt.symmetry.as_data(q).weights) for q in qs]
    exact = _exact_independent(res, means, nb)
    c_exact, _ = mobius_inversion(exact)
    print(res, "\nexact λ(S):", exact.tolist(), "exact c(S):", c_exact.tolist())
    assert abs(float(c_exact[3])) < additivity_tol(exact)  # common orbit randomness: the same x̄_b in every subset
    assert torch.allclose(exact, torch.tensor([2.0, 1.5, 1.5, 1.0], dtype=F64), atol=0.15)
    assert ((res.llc - exact).abs() < 4 * res.llc_sem).all(), (res.llc, exact, res.llc_sem)
    assert ((res.contribution - c_exact).abs() < 4 * res.contribution_sem).all()
    assert bool(res.distinguishable[1]) and bool(res.distinguishable[2]) and not bool(res.distinguishable[3])


@pytest.mark.slow
def test_interaction_dihedral_non_commuting():
    """Non-commuting finite groups on one plane: a mirror and C_3 rotations (jointly: D_3).

    Polar location model, q shifted off the mirror axis.  The mirror alone moves x̄ onto its
    axis but not to 0 (λ stays 1); C_3 and D_3 centre q (λ = ½): c({mirror}) = 0,
    c({C3}) = −½ and c({mirror, C3}) = ½ − 1 − ½ + 1 = 0 (the mirror adds nothing on top of C_3)."""
    from slt.models import PolarGaussianLocation

    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 2, generator=g, dtype=F64) + torch.tensor([0.6, 0.8], dtype=F64)
    nb = slt.default_nbeta(2000)
    groups = {"mirror": Reflection(2, normal=[0.0, 1.0]), "C3": Cyclic(3, action="rotation")}
    res = decompose(lambda: PolarGaussianLocation(dtype=F64), x, groups, nbeta=nb, batch_size=None, num_chains=4,
                    num_draws=500, num_steps_bw_draws=4, localization=1.0, step_size=0.05 / (nb + 1), dtype=F64,
                    progress=False)
    print(res)
    # mirror alone: x̄ moves to the axis, still non-zero: regular (λ = 1); C3 and D3 centre q (λ = ½)
    for m, lam in ((0, 1.0), (1, 1.0), (2, 0.5), (3, 0.5)):
        assert abs(float(res.llc[m]) - lam) < 4 * float(res.llc_sem[m]) + 0.05
    # the C3 effect is −½ alone, and adding the mirror on top of C3 changes nothing, so the
    # interaction c({mirror, C3}) = λ(D3) − λ(mirror) − λ(C3) + λ(∅) = ½ − 1 − ½ + 1 = 0
    assert abs(float(res.contribution[3])) < 4 * float(res.contribution_sem[3]) + 0.05


def test_experiment_writes_table_and_figure(tmp_path):
    """``python -m experiments.decompose`` end to end (tiny run): result.json, decomposition.csv/png; bad case rejected."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SLT_RESULTS_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "experiments.decompose", "model.case=shared_angle", "sampler.num_draws=60",
           "sampler.num_chains=2", "n=40"]
    out = subprocess.run(cmd, cwd=str(root), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = next((tmp_path / "runs" / "decompose").iterdir())
    df = pd.read_csv(run_dir / "decomposition.csv")
    assert list(df["subset"]) == ["∅", "{rot1}", "{rot2}", "{rot1, rot2}"]
    assert (run_dir / "decomposition.png").stat().st_size > 0 and (run_dir / "result.json").exists()
    bad = subprocess.run(cmd[:3] + ["model.case=bogus"], cwd=str(root), env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "invalid config value model.case='bogus'" in bad.stderr


def test_quenched_variant_shares_w_star():
    x = _blocks_data(40, 5)
    groups = [block_group(Cyclic(4, action="rotation"), 0, 2)]
    res = decompose(lambda: BlockPolarLocation(2, dtype=F64), x, groups, quenched=True, nbeta=100.0,
                    batch_size=None, num_chains=2, num_draws=20, step_size=1e-4, dtype=F64, progress=False)
    assert res.mode == "retrained" and res.quenched is not None and res.quenched.mode == "quenched"
    assert not torch.allclose(res.w_star[0], res.w_star[1])  # re-trained on q_{G1}: r1 → 0
    assert torch.allclose(res.quenched.w_star[0], res.quenched.w_star[1])
    assert res.names == ("G1",) and res.labels == ["∅", "{G1}"]
