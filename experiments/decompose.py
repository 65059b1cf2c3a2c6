r"""Decompose the LLC over the symmetries of q, as a Hydra experiment (``conf/decompose.yaml``).

One run builds q (``n`` rows of :math:`N(\text{shift}, I)` on :math:`\mathbb R^2\times\mathbb R^2`,
or on :math:`\mathbb R^2` for ``case=dihedral``), the groups, and calls
:func:`slt.symmetry.decompose`: λ̂ on every joint symmetrization :math:`q_S` (re-trained
:math:`w^*_S`), Möbius contributions :math:`c(S) = \sum_{T\subseteq S}(-1)^{|S|-|T|}\hat\lambda(T)`
with propagated errors.  Writes ``decomposition.csv`` (one row per subset) and
``decomposition.png`` (λ̂(S) and c(S) bar charts) next to ``result.json``.

Cases (exact answers in :mod:`slt.symmetry.decompose`):

* ``independent``: two polar location blocks, a rotation group per block:
  λ = 2, 3/2, 3/2, 1, so c = 2, −½, −½, 0 (no interaction);
* ``shared_angle``: the blocks share their angle: λ = 3/2, 3/2, 3/2, 1, so
  c({1}) = c({2}) = 0 and c({1,2}) = −½ (a pure interaction);
* ``dihedral``: one polar block, a mirror and C_3 rotations (non-commuting;
  jointly they generate D_3).

Susceptibility spectra by irrep (:func:`slt.symmetry.irrep_susceptibility`; writes
``spectrum.csv`` and ``spectrum.png``; ``model.case=...``):

* ``spectrum_expfam``: the polar exponential family
  :math:`p(s) \propto \exp(r\langle(\cos\varphi, \sin\varphi), s\rangle)` on the hexagon at the
  uniform (D_6-invariant) q, w* = 0; q tilted along each D_6 isotypic component of
  :math:`f(s) = s_1 + s_1^2 + s_1 s_2`; observable :math:`r\cos\varphi`;
* ``spectrum_tms``: the TMS 6-gon (6 features, 2 hidden) at the population q of the high-sparsity
  data, x = μ e_i on a midpoint grid of ``n`` values of μ per feature (6n rows, exactly invariant
  under the cyclic feature shifts C_6, which the 6-gon emulates by a rotation of the hidden plane);
  full-batch SGLD at nβ = ``nbeta_n``/log ``nbeta_n`` (use ≥ 20000: at nβ = 263 the chains drift away
  from the 6-gon: λ̂ ≈ 12 > d/2 = 9, R-hat 1.25).  q is tilted *linearly*, with unit standard
  deviation per irrep (:func:`slt.symmetry.irrep_tilt` ``kind="linear", normalize=True``, strength
  ``shift``), along each Fourier mode of :math:`f(x) = x_1`; observables: the column norms
  :math:`\lVert W_i\rVert` and their projections on each irrep's tilt pattern
  :math:`\cos(2\pi m i/6)` (``norm_W_irrep``, one number per irrep).  Reported per unit tilt, with
  the Gaussian (Laplace) prediction from the population Hessian; Schur's lemma: the tilt along
  irrep ρ moves only the ρ part of the norms, and :math:`d\hat\lambda/dh = 0` for ρ ≠ trivial.

The lattice as a sweep (one job per subset)
------------------------------------------
``subset=<bitmask>`` estimates only :math:`\hat\lambda(S)` for one subset
(:func:`slt.symmetry.estimate_subset`; bit 0 = the first group, ``rot1`` or
``mirror``, bit 1 = the second, ``rot2`` or ``C3``; ``subset=null``, the
default, runs the whole lattice in one job).  ``lattice=sweep`` fans the
:math:`2^k = 4` subsets out as a multirun (``hydra.sweeper.params.subset=0,1,2,3``),
one ``result.json`` per subset, resumable and launcher-agnostic like every other
sweep; at the end of the multirun :func:`combine_sweep` reads the per-subset
records, Möbius-inverts them (:func:`slt.symmetry.combine`) and writes
``decomposition.csv``, ``decomposition.json`` and ``decomposition.png`` into the
sweep folder.  Run it by hand (after a failed job, or while a Slurm sweep is
still running) with ``python -m experiments.decompose --combine <sweep dir>``:
a missing or failed subset is named, its λ̂ and every contribution that needs it
are NaN, the others are reported (exit status 1 when a lattice is incomplete).
With the same config, the sweep gives exactly the numbers of the one-job run.

Usage::

    python -m experiments.decompose
    python -m experiments.decompose -m model.case=independent,shared_angle
    python -m experiments.decompose -m lattice=sweep                  # 4 jobs + combine
    python -m experiments.decompose -m lattice=sweep model.case=independent,shared_angle
    python -m experiments.decompose -m subset=0,1,2,3                 # the same 4 jobs, spelled out
    python -m experiments.decompose --combine results/sweeps/decompose
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig

import slt
from experiments import _runlib, records
from experiments._schemas import DecomposeConfig, DecomposeModelConf  # noqa: F401  (schema of decompose.yaml)
from slt.models import PolarGaussianLocation
from slt.symmetry import SO2, BlockPolarLocation, Cyclic, Reflection, block_group, decompose
from slt.symmetry.decompose import SubsetEstimate, combine, estimate_subset

#: the decomposition cases and their number of groups k (subset bitmasks are 0 .. 2^k - 1)
LATTICE_CASES = {"independent": 2, "shared_angle": 2, "dihedral": 2}


def _validate(cfg: DictConfig) -> None:
    # keys and types are checked when the config is composed (decompose_schema, in the launching
    # process: a job-time OmegaConf.structured() of a dataclass that a parallel launcher pickled by
    # value breaks on dataclasses.MISSING); the values here, at the start of the job
    cases = ["independent", "shared_angle", "dihedral", "spectrum_expfam", "spectrum_tms"]
    if cfg.model.case not in cases:
        raise ValueError(f"invalid config value model.case={cfg.model.case!r}: must be one of {cases}")
    if cfg.model.group not in ("cyclic4", "so2"):
        raise ValueError(f"invalid config value model.group={cfg.model.group!r}: must be one of ['cyclic4', 'so2']")
    for key in ("n", "nbeta_n", "orbit_samples"):
        if int(cfg[key]) < (2 if key in ("n", "nbeta_n") else 1):
            raise ValueError(f"invalid config value {key}={cfg[key]}: too small")
    for key in ("z", "step_factor"):
        if not float(cfg[key]) > 0:
            raise ValueError(f"invalid config value {key}={cfg[key]}: must be positive")
    if cfg.get("subset") is not None:
        k = LATTICE_CASES.get(cfg.model.case)
        if k is None:
            raise ValueError(f"invalid config value subset={cfg.subset}: model.case={cfg.model.case} has no subset "
                             "lattice (use subset=null)")
        if not 0 <= int(cfg.subset) < 2**k:
            raise ValueError(f"invalid config value subset={cfg.subset}: must be a bitmask in 0..{2**k - 1} "
                             f"(model.case={cfg.model.case} has {k} groups)")


def _llc_kwargs(cfg: DictConfig, nb: float, curvature: float) -> dict[str, Any]:
    """:func:`_runlib.llc_kwargs` of ``sampler`` without ``nbeta`` (the callers pass nβ from ``nbeta_n``),
    with γ = 1 and ε = step_factor / (nβ·curvature + γ) where the config leaves them null."""
    kw = _runlib.llc_kwargs(cfg.sampler, device=cfg.device, progress=bool(cfg.progress))
    kw.pop("nbeta", None)
    gamma = 1.0 if kw.get("localization") is None else float(kw["localization"])
    kw["localization"] = gamma
    if kw.get("step_size") is None:
        kw["step_size"] = float(cfg.step_factor) / (nb * curvature + gamma)
    return kw


def _tms_grid_data(k: int, dtype: torch.dtype = torch.float64) -> "slt.Data":
    r"""The population q of the high-sparsity TMS data (x = μ e_i, i uniform, μ ~ U[0, 1]) on a
    midpoint grid: ``6 k`` rows μ = (j + ½)/k, equal weights; exactly invariant under every feature
    permutation, so under the C_6 shifts (and the reflections) that the 6-gon emulates."""
    mu = (torch.arange(k, dtype=dtype) + 0.5) / k
    x = torch.zeros(6 * k, 6, dtype=dtype)
    for i in range(6):
        x[i * k:(i + 1) * k, i] = mu
    return slt.Data(x, None, torch.full((6 * k,), 1.0 / (6 * k), dtype=dtype))


def _tms_linear_response(model: torch.nn.Module, q: "slt.Data", tilts: list["slt.Data"], observables: dict[str, Any],
                         nb: float, gamma: float, *, fd_step: float = 1e-2) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    r"""Gaussian (Laplace) predictions at w*, per tilt (divide by its strength for per unit tilt).

    With :math:`\Sigma = (n\beta H + \gamma)^{-1}` on the complement of the hidden-plane rotation
    (an exact symmetry of the loss, the observables and :math:`\Delta L`; its orbit is a circle, not
    the line a Gaussian would put there), the covariance estimator's targets for a Gaussian posterior:
    :math:`\chi = -n\beta\,\nabla\varphi^T\Sigma\,\nabla\Delta L` (``name -> (R, ...)``) and
    :math:`d\hat\lambda/dh = \tfrac12 n\beta\gamma\operatorname{tr}(\nabla^2\Delta L\,\Sigma^2)`
    (``(R,)``: the mean and covariance terms cancel up to the localization; 0 for non-trivial irreps).

    ``q`` and ``tilts`` should be a fine grid (the population).  The Hessians are central differences
    (step ``fd_step``) of the autograd gradient: autograd's own Hessian at a ReLU network misses the
    δ-function term where an output switches on while its target is non-zero (the 6-gon's
    own-feature threshold μ = −b/l²); on the 6-gon it overestimates the two softest curvatures by about
    45% (0.030 and 0.052 instead of 0.021 and 0.039) and predicts half the measured trivial response.
    """
    from torch.func import functional_call, grad, jacrev

    from slt.models import tms_loss

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()]).double()
    d = w0.numel()
    eye = torch.eye(d, dtype=w0.dtype)

    def unflat(w):
        out, i = {}, 0
        for n, sh in zip(names, shapes):
            k = int(torch.Size(sh).numel())
            out[n] = w[i:i + k].reshape(sh)
            i += k
        return out

    def loss(w, data):
        per = tms_loss.per_sample(functional_call(model, unflat(w), (data.x,)), data.x)
        return (per * data.weights).sum() / data.weights.sum()

    def fd_hessian(fn):
        g = grad(fn)
        h = torch.stack([(g(w0 + fd_step * e) - g(w0 - fd_step * e)) / (2 * fd_step) for e in eye])
        return (h + h.T) / 2

    p0 = unflat(w0)
    tangent = torch.cat([(torch.stack([-p0[n][1], p0[n][0]]) if n == "W" else torch.zeros_like(p0[n])).reshape(-1)
                         for n in names])  # d/dθ of the hidden-plane rotation R_θ W
    Q = torch.linalg.qr(torch.cat([(tangent / tangent.norm())[:, None], eye], 1))[0][:, 1:d]  # its complement
    H = fd_hessian(lambda w: loss(w, q))
    sigma = Q @ torch.linalg.inv(Q.T @ (nb * H + gamma * eye) @ Q) @ Q.T
    gL = torch.stack([grad(lambda w, t=t: loss(w, t) - loss(w, q))(w0) for t in tilts])  # (R, d)
    chi = {}
    for k, fn in observables.items():
        J = jacrev(lambda w: fn({n: v.unsqueeze(0) for n, v in unflat(w).items()})[0])(w0)  # (..., d)
        chi[k] = -nb * (gL @ sigma @ J.reshape(-1, d).T).reshape(len(tilts), *J.shape[:-1])
    dllc = torch.stack([0.5 * nb * gamma * torch.trace(fd_hessian(lambda w, t=t: loss(w, t) - loss(w, q)) @ sigma @ sigma)
                        for t in tilts])
    return chi, dllc


def _spectrum(cfg: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from slt.models import ParametricFeatureFamily, ToyModelOfSuperposition, kgon_parameters, tms_loss
    from slt.models.expfam import polygon_support
    from slt.symmetry import Dihedral, irrep_susceptibility
    from slt.symmetry.irreps import character_table, irrep_tilt, isotypic_projector

    f64 = torch.float64
    nb = slt.default_nbeta(int(cfg.nbeta_n))
    tms = cfg.model.case == "spectrum_tms"
    if not tms:
        supp = polygon_support(6, dtype=f64)
        q = slt.Data(supp, None, torch.full((6,), 1 / 6, dtype=f64))
        model = ParametricFeatureFamily.polar(supp)
        model = model.to(f64)
        group = Dihedral(6)
        f = lambda z: z[:, 0] + z[:, 0] ** 2 + z[:, 0] * z[:, 1]  # noqa: E731
        obs = {"r_cos_phi": lambda p: p["theta1"][:, 0] * torch.cos(p["theta2"][:, 0])}
        kw = _llc_kwargs(cfg, nb, 1.0)
        tilt_kw: dict[str, Any] = {}
    else:
        group = Cyclic(6)
        q = _tms_grid_data(int(cfg.n))
        model = ToyModelOfSuperposition(6, 2).to(f64)
        model.load_state_dict({k: v.to(f64) for k, v in kgon_parameters(6).items()})
        f = lambda z: z[:, 0]  # noqa: E731  (a = e_1: every Fourier mode of the features with the same weight)
        table = character_table(group)
        eye = torch.eye(6, dtype=f64)
        # the unit pattern of each irrep's tilt over the features: (P_ρ f)(e_i) / |.|; for C_6 and a = e_1
        # the Fourier modes cos(2π m i/6) (m = 0, 3: (1,...,1), (1,-1,...); m = 1, 2: cos only, sin unexcited)
        pats = torch.stack([p / p.norm() for p in (isotypic_projector(group, t)(f)(eye) for t in table)])
        obs = {"norm_W": lambda p: p["W"].norm(dim=1),  # (C, 6) column norms |W_i|
               "norm_W_irrep": lambda p: p["W"].norm(dim=1) @ pats.T.to(p["W"].dtype)}  # (C, R) their irrep parts
        kw = _llc_kwargs(cfg, nb, 1.0)
        kw.pop("step_size")  # TMS: the engine's curvature-based default unless sampler.step_size is set
        if cfg.sampler.step_size is not None:
            kw["step_size"] = float(cfg.sampler.step_size)
        kw["loss_fn"] = tms_loss
        tilt_kw = {"tilt": "linear", "normalize": True}
    s = float(cfg.shift)
    spec = irrep_susceptibility(
        model, q, group, f, strength=s, nbeta=nb, observables=obs, dtype=f64, seed=int(cfg.seed), **tilt_kw, **kw,
    )
    df = spec.to_frame()
    df.to_csv(out_dir / "spectrum.csv", index=False)
    import matplotlib

    matplotlib.use("Agg")
    print(spec, flush=True)
    metrics: dict[str, Any] = {"nbeta": nb, "table": df.to_dict(orient="list"), "device": cfg.device,
                               "chi": {k: v.tolist() for k, v in spec.chi.items()},
                               "chi_sem": {k: v.tolist() for k, v in spec.chi_sem.items()}}
    llc = spec.results[0].llc
    metrics.update(llc=llc.llc_mean, llc_sem=llc.llc_sem, rhat=llc.diagnostics.get("rhat"),
                   ess=llc.diagnostics.get("ess"), mala_acceptance=llc.diagnostics.get("mala_acceptance"),
                   step_size=llc.step_size,
                   sampling_seconds=llc.diagnostics.get("seconds"))
    if not tms:
        spec.plot().savefig(out_dir / "spectrum.png", dpi=120)
        for k, v in spec.chi.items():
            print(f"  chi[{k}] per irrep:", v.tolist(), "±", spec.chi_sem[k].tolist())
        return metrics, {"dllc_dh": spec.dllc_dh, "dllc_dh_sem": spec.dllc_dh_sem}
    # TMS: per unit tilt (the linear tilt makes every estimate exactly proportional to s), the Gaussian
    # prediction, and the selection rule: χ[tilt ρ, observable ρ'] = 0 for ρ' ≠ ρ, dλ̂/dh = 0 for ρ ≠ trivial
    gamma = float(kw.get("localization") or 1.0)
    fine = _tms_grid_data(4096)  # the population (midpoint rule, 4096 μ per feature)
    tilts = [irrep_tilt(fine, group, t, f, s, kind="linear", normalize=True) for t in table if t.name in spec.names]
    pred_chi, pred_dllc = _tms_linear_response(model, fine, tilts, obs, nb, gamma)
    pred = {k: v / s for k, v in pred_chi.items()}
    pred_dllc = pred_dllc / s
    R = len(spec.names)
    chi = {k: v / s for k, v in spec.chi.items()}
    sem = {k: v / s for k, v in spec.chi_sem.items()}
    zmat = chi["norm_W_irrep"] / sem["norm_W_irrep"]
    diag = torch.eye(R, dtype=torch.bool)
    dz = spec.dllc_dh / spec.dllc_dh_sem
    summary = {
        "diag_chi": torch.diagonal(chi["norm_W_irrep"]).tolist(), "diag_sem": torch.diagonal(sem["norm_W_irrep"]).tolist(),
        "diag_z": torch.diagonal(zmat).tolist(), "diag_pred": torch.diagonal(pred["norm_W_irrep"]).tolist(),
        "offdiag_max_abs_z": float(zmat[~diag].abs().max()), "offdiag_rms_z": float(zmat[~diag].square().mean().sqrt()),
        "dllc_dh_per_unit": (spec.dllc_dh / s).tolist(), "dllc_dh_per_unit_sem": (spec.dllc_dh_sem / s).tolist(),
        "dllc_dh_z": dz.tolist(), "dllc_dh_pred": pred_dllc.tolist(),
    }
    metrics.update(names=spec.names, strength=s, chi_per_unit=({k: v.tolist() for k, v in chi.items()}),
                   chi_per_unit_sem=({k: v.tolist() for k, v in sem.items()}),
                   chi_pred=({k: v.tolist() for k, v in pred.items()}), selection_rule=summary)
    print(f"  λ̂(w*) = {llc.llc_mean:.3f} ± {llc.llc_sem:.3f} (R-hat {metrics['rhat']:.3f}, ESS {metrics['ess']:.0f})")
    print("  χ[|W| irrep part] per unit tilt, rows = tilt, cols = observable irrep "
          f"({', '.join(spec.names)}); (Gaussian prediction):")
    for i, nm in enumerate(spec.names):
        cells = "  ".join(f"{float(chi['norm_W_irrep'][i, j]):+.3f} ± {float(sem['norm_W_irrep'][i, j]):.3f} "
                          f"({float(pred['norm_W_irrep'][i, j]):+.3f})" for j in range(R))
        print(f"    {nm:<8} {cells}")
    print(f"  diagonal z = {[round(v, 1) for v in summary['diag_z']]}; off-diagonal max |z| = "
          f"{summary['offdiag_max_abs_z']:.2f} (rms {summary['offdiag_rms_z']:.2f})")
    print("  dλ̂/dh per unit tilt (Gaussian prediction): " + ", ".join(
        f"{nm} {float(spec.dllc_dh[i]) / s:+.3g} ± {float(spec.dllc_dh_sem[i]) / s:.2g} ({float(pred_dllc[i]):+.2g})"
        for i, nm in enumerate(spec.names)))
    fig = spec.plot(observables=["norm_W_irrep", "norm_W"], expected={k: v * s for k, v in pred.items()}, scale=1.0 / s,
                    labels={"norm_W_irrep": "observable: irrep part of |W_i|", "norm_W": "χ[|W_i|] per unit tilt"})
    fig.axes[0].plot(range(R), pred_dllc.tolist(), "o", mfc="none", mec="k", label="Gaussian prediction")
    fig.axes[0].legend(fontsize=7)
    fig.axes[0].set_title("dλ̂/dh (±2 s.e.; 0 for ρ ≠ trivial by symmetry)", fontsize=9)
    for ax in fig.axes:
        if ax.get_xlabel() == "component":
            ax.set_xlabel("feature i")
    fig.suptitle(f"TMS 6-gon, C_6 feature shifts: susceptibility per unit linear tilt (nβ = {nb:.0f}; "
                 "dashed / in brackets: Gaussian prediction)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "spectrum.png", dpi=120)
    arrays = {"dllc_dh": spec.dllc_dh, "dllc_dh_sem": spec.dllc_dh_sem,
              **{f"chi_{k}": v for k, v in chi.items()}, **{f"chi_{k}_sem": v for k, v in sem.items()},
              **{f"chi_{k}_pred": v for k, v in pred.items()}, "dllc_dh_pred": pred_dllc}
    return metrics, arrays


def _lattice(cfg: DictConfig) -> tuple[Any, torch.Tensor, dict[str, Any], float]:
    """``(model factory, data, {name: group}, nβ)`` of a decomposition case."""
    f64 = torch.float64
    gen = torch.Generator().manual_seed(int(cfg.seed))
    nb = slt.default_nbeta(int(cfg.nbeta_n))
    s = float(cfg.shift)
    if cfg.model.case == "dihedral":
        x = torch.randn(int(cfg.n), 2, generator=gen, dtype=f64) + torch.tensor([0.6 * s, 0.8 * s], dtype=f64)
        groups = {"mirror": Reflection(2, normal=[0.0, 1.0]), "C3": Cyclic(3, action="rotation")}
        factory = lambda: PolarGaussianLocation(dtype=f64)  # noqa: E731
    else:
        x = torch.randn(int(cfg.n), 4, generator=gen, dtype=f64) + torch.tensor([s, 0.0, s, 0.0], dtype=f64)
        rot = SO2() if cfg.model.group == "so2" else Cyclic(4, action="rotation")
        groups = {"rot1": block_group(rot, 0, 2), "rot2": block_group(rot, 1, 2)}
        shared = cfg.model.case == "shared_angle"
        factory = lambda: BlockPolarLocation(2, shared_angle=shared, dtype=f64)  # noqa: E731
    return factory, x, groups, nb


def _subset_run(cfg: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """One cell of the lattice (``subset=<bitmask>``): λ̂(S) only; :func:`combine_sweep` puts the cells together."""
    factory, x, groups, nb = _lattice(cfg)
    est = estimate_subset(
        factory, x, groups, int(cfg.subset), nbeta=nb, retrain=bool(cfg.retrain), quenched=bool(cfg.quenched),
        orbit_samples=int(cfg.orbit_samples), symmetrize_seed=int(cfg.seed), seed=int(cfg.seed), dtype=torch.float64,
        **_llc_kwargs(cfg, nb, 2.5),
    )
    line = f"[decompose] subset {est.label} (mask {est.mask}): λ̂ = {est.llc:.4f} ± {est.llc_sem:.4f}"
    if est.quenched is not None:
        line += f"; quenched {est.quenched.llc:.4f} ± {est.quenched.llc_sem:.4f}"
    print(line, flush=True)
    metrics: dict[str, Any] = {
        "nbeta": nb, "device": cfg.device, "mask": est.mask, "subset_label": est.label,
        **_runlib.metrics_from_result(est.result), "invariance_gap": est.invariance_gap, "estimate": est.to_dict(),
    }
    return metrics, {**_runlib.result_arrays(est.result), "w_star": est.w_star}


def run(cfg: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if str(cfg.model.case).startswith("spectrum_"):
        return _spectrum(cfg, out_dir)
    if cfg.get("subset") is not None:
        return _subset_run(cfg, out_dir)
    f64 = torch.float64
    factory, x, groups, nb = _lattice(cfg)
    res = decompose(
        factory, x, groups, nbeta=nb, retrain=bool(cfg.retrain), quenched=bool(cfg.quenched),
        orbit_samples=int(cfg.orbit_samples), symmetrize_seed=int(cfg.seed), seed=int(cfg.seed), z=float(cfg.z),
        dtype=f64, **_llc_kwargs(cfg, nb, 2.5),
    )
    df = res.to_frame()
    if res.quenched is not None:
        import pandas as pd

        df = pd.concat([df, res.quenched.to_frame()], ignore_index=True)
    df.to_csv(out_dir / "decomposition.csv", index=False)
    import matplotlib

    matplotlib.use("Agg")
    fig = res.plot(title=f"LLC decomposition: {cfg.model.case}, {cfg.model.group}")
    fig.savefig(out_dir / "decomposition.png", dpi=120)
    print(res, flush=True)
    metrics: dict[str, Any] = {"nbeta": nb, "table": df.to_dict(orient="list"), "device": cfg.device}
    for m, lab in enumerate(res.labels):
        key = "S" + "".join(str(i + 1) for i in range(res.k) if m >> i & 1) if m else "S0"
        metrics[f"llc_{key}"] = float(res.llc[m])
        metrics[f"llc_sem_{key}"] = float(res.llc_sem[m])
        metrics[f"c_{key}"] = float(res.contribution[m])
        metrics[f"c_sem_{key}"] = float(res.contribution_sem[m])
    arrays = {"llc": res.llc, "llc_sem": res.llc_sem, "contribution": res.contribution,
              "contribution_sem": res.contribution_sem, "w_star": res.w_star}
    return metrics, arrays


# ---------------------------------------------------------------------------
# the lattice as a sweep: combine the per-subset records
# ---------------------------------------------------------------------------
#: override keys that do not define a lattice: the subset itself, the preset, and keys
#: that do not change a result
_NOT_LATTICE_KEYS = frozenset({"subset", "lattice", *_runlib.NON_RESULT_KEYS})

#: group names of the decomposition cases (as in :func:`_lattice`), for lattices with no finished subset
_CASE_NAMES = {"independent": ("rot1", "rot2"), "shared_angle": ("rot1", "rot2"), "dihedral": ("mirror", "C3")}


def _lattice_overrides(overrides: Any) -> list[str]:
    """The overrides that name a lattice (all but ``subset=`` and keys that do not change results), sorted."""
    return sorted(str(o) for o in overrides or [] if records.parse_override(str(o))[0] not in _NOT_LATTICE_KEYS)


def _subset_override(overrides: Any) -> Optional[int]:
    for o in overrides or []:
        k, v = records.parse_override(str(o))
        if k == "subset":
            return v if isinstance(v, int) and not isinstance(v, bool) else None
    return None


def _job_subset(job: dict[str, Any]) -> Optional[int]:
    rec = job["record"]
    if rec is not None and isinstance(rec.get("config"), dict) and "subset" in rec["config"]:
        v = rec["config"]["subset"]
        return None if v is None else int(v)
    return _subset_override(job["overrides"])


def _png_bytes(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def combine_sweep(sweep_dir: str | Path, *, quiet: bool = False) -> dict[str, Any]:
    """Combine the per-subset runs of a sweep folder into decompositions (Möbius inversion with errors).

    The runs with ``subset=<bitmask>`` are grouped into lattices by their other
    result-changing overrides (``model.case=shared_angle``, ``seed=1`` ...; the
    lattice ``default`` has none).  For each lattice, every subset with a finished
    run (``result.json``) contributes its λ̂(S) and sem (read back exactly); the
    others are reported with their status (``failed``, ``incomplete``, ``missing``
    from ``sweep.json``, or ``not run``), their λ̂ and every c(S) that needs them
    are NaN (:func:`slt.symmetry.combine`).  Writes, atomically, into the sweep
    folder:

    * ``decomposition.csv``: one row per lattice, mode and subset (``lattice``,
      ``status``, ``run``, then the columns of :meth:`LLCDecomposition.to_frame`);
    * ``decomposition.json``: per lattice its overrides, group names, whether it is
      complete, the missing subsets (with status, run folder and error) and the table;
    * ``decomposition.png`` (one lattice) or ``decomposition-<lattice>.png`` each.

    Idempotent; runs at the end of every multirun of this entry point and by hand
    as ``python -m experiments.decompose --combine <sweep dir>``.

    Parameters
    ----------
    sweep_dir
        ``<results>/sweeps/decompose``.
    quiet
        Print nothing when the sweep holds no per-subset runs (the end-of-sweep hook).

    Returns
    -------
    dict
        ``{lattice: LLCDecomposition}`` (with ``.quenched`` when the runs had ``quenched=true``).

    Raises
    ------
    FileNotFoundError
        If ``sweep_dir`` does not exist.
    """
    import pandas as pd

    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep folder {str(sweep)!r} does not exist")
    groups: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = {}
    for job in records.scan_sweep(sweep):  # {run, status, overrides, record}, as collect sees them
        m = _job_subset(job)
        if m is not None:
            groups.setdefault(tuple(_lattice_overrides(job["overrides"])), []).append((m, job))
    if not groups:
        if not quiet:
            print(f"[combine] {sweep}: no per-subset runs (subset=<bitmask>) to combine", flush=True)
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, Any] = {}
    frames, report = [], []
    figures: dict[str, bytes] = {}
    for key_ovs, cells in sorted(groups.items()):
        key = records.run_dirname(",".join(key_ovs))
        ok = [(m, j) for m, j in cells if j["status"] == "ok"]
        cfg = next((j["record"]["config"] for _, j in cells if j["record"] and j["record"].get("config")), {})
        names: Optional[tuple[str, ...]] = None
        if ok:
            names = tuple(ok[0][1]["record"]["metrics"]["estimate"]["names"])
        elif cfg.get("model", {}).get("case") in _CASE_NAMES:
            names = _CASE_NAMES[cfg["model"]["case"]]
        entry: dict[str, Any] = {"lattice": key, "overrides": list(key_ovs), "names": None if names is None else list(names)}
        if names is None:
            entry.update(complete=False, missing=[{"mask": m, "status": j["status"], "run": j["run"]} for m, j in cells],
                         table=[])
            report.append(entry)
            print(f"[combine] {sweep} [{key}]: no finished subset, nothing to combine "
                  f"({', '.join(j['status'] for _, j in cells)})", flush=True)
            continue
        N = 2 ** len(names)
        status = {m: ("not run", None, None) for m in range(N)}  # mask -> (status, run, error)
        ests: dict[int, SubsetEstimate] = {}
        for m, j in sorted(cells, key=lambda c: (c[1]["status"] == "ok", str((c[1]["record"] or {}).get("finished")))):
            if not 0 <= m < N:
                print(f"[combine] {sweep} [{key}]: run {j['run']} has subset={m}, not a subset of {len(names)} "
                      f"groups ({j['status']}): ignored", flush=True)
                continue
            err = (j["record"] or {}).get("error")
            if j["status"] == "ok":
                ests[m] = SubsetEstimate.from_dict(j["record"]["metrics"]["estimate"])
            status[m] = (j["status"], j["run"], err)
        z = float(cfg.get("z", 3.0))
        res = combine(ests, names, z=z)
        if any(e.quenched is not None for e in ests.values()):
            res.quenched = combine({m: e.quenched for m, e in ests.items() if e.quenched is not None}, names, z=z,
                                   mode="quenched", nbeta=res.nbeta)
        out[key] = res
        df = res.to_frame() if res.quenched is None else pd.concat([res.to_frame(), res.quenched.to_frame()],
                                                                    ignore_index=True)
        df.insert(0, "run", [status[int(m)][1] for m in df["mask"]])
        df.insert(0, "status", [status[int(m)][0] for m in df["mask"]])
        df.insert(0, "lattice", key)
        frames.append(df)
        missing = [{"mask": m, "subset": res.labels[m], "status": status[m][0], "run": status[m][1],
                    "error": status[m][2]} for m in res.missing]
        entry.update(complete=res.complete, missing=missing, table=df.to_dict(orient="records"))
        report.append(entry)
        model = cfg.get("model", {})
        title = f"LLC decomposition (sweep {key}): {model.get('case', '?')}, {model.get('group', '?')}"
        if missing:
            title += f"; missing {', '.join(x['subset'] for x in missing)}"
        fig = res.plot(title=title)
        figures[key] = _png_bytes(fig)
        plt.close(fig)
        print(f"[combine] {sweep} [{key}]: {len(ests)}/{N} subsets", flush=True)
        print(res, flush=True)
        for x in missing:
            print(f"[combine] {sweep} [{key}]: subset {x['subset']} (subset={x['mask']}) is {x['status']}"
                  + (f" ({x['run']})" if x["run"] else "") + (f": {x['error']}" if x["error"] else "")
                  + " -> its λ̂ and every c(S) over it are NaN", flush=True)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["lattice", "status", "run"])
    records.atomic_write_bytes(sweep / "decomposition.csv", table.to_csv(index=False).encode())
    records.atomic_write_json(sweep / "decomposition.json", {"sweep": str(sweep), "updated": _runlib.now(),
                                                               "lattices": report})
    single = len(figures) == 1
    for key, png in figures.items():
        records.atomic_write_bytes(sweep / ("decomposition.png" if single else f"decomposition-{key}.png"), png)
    if not single and (sweep / "decomposition.png").exists():
        (sweep / "decomposition.png").unlink()  # stale: written when the folder held one lattice
    print(f"[combine] {sweep}: {len(report)} lattice(s) -> decomposition.csv, decomposition.json, "
          + ("decomposition.png" if single else "decomposition-<lattice>.png"), flush=True)
    return out


_runlib.on_sweep_end(lambda sweep: combine_sweep(sweep, quiet=True))


@hydra.main(version_base="1.3", config_path=_runlib.CONF_DIR, config_name="decompose")
def main(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.runtime.choices.get("lattice") == "sweep" and hc.mode != RunMode.MULTIRUN:
        raise ValueError("lattice=sweep runs one job per subset as a multirun: add -m "
                         "(python -m experiments.decompose -m lattice=sweep)")
    return _runlib.hydra_task(run, _validate)(cfg)


def _combine_cli(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m experiments.decompose --combine",
        description="Combine the per-subset runs of decompose sweeps (decomposition.csv/.json/.png); "
                    "exit status 1 if a lattice is incomplete, 2 for a bad path.")
    ap.add_argument("--combine", nargs="+", required=True, metavar="SWEEP_DIR", help="<results>/sweeps/decompose")
    args = ap.parse_args(argv)
    code = 0
    for d in args.combine:
        try:
            res = combine_sweep(d)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not res or not all(r.complete for r in res.values()):
            code = 1
    return code


if __name__ == "__main__":
    if "--combine" in sys.argv[1:]:
        sys.exit(_combine_cli(sys.argv[1:]))
    _runlib.main(main)
