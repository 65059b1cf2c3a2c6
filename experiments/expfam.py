r"""Experiment 1: an exponential family on a finite sample space under symmetry.

One run (config ``conf/expfam.yaml``):

1. a teacher q on the support (vertices of the regular k-gon, or {-1, 1}^m):
   ``uniform`` or ``random``; ``data.n`` samples from it;
2. the symmetry path (``symmetry/``, :mod:`_symmetry`): q_h = (1 - h) q0 + h q1
   with q1 the symmetrization q_G (``operation=symmetrize``) or a tilted,
   non-invariant q (``operation=break``); data compressed to one weighted row
   per support point (exact weighted loss, cheap full batch);
3. w* = the maximum-likelihood point of q_h (re-trained at every h): exact
   Newton for the fixed-feature family (:meth:`ExponentialFamily.fit`),
   full-batch L-BFGS for the parameter-dependent features;
4. the Hessian of :math:`L_{q_h}` at w*, its rank :math:`d_1` and the bounds
   :math:`d_1/2 \le \lambda \le (d + d_1)/4` (:func:`slt.theory.hessian_rank_bounds`);
5. λ̂ at q_h with nβ = n / log n, and (``symmetry.susceptibility``) the
   quenched susceptibility dλ̂/dh from the same draws
   (:func:`slt.symmetry.llc_susceptibility`);
6. the expected λ where it is known: d/2 for the fixed family (identifiable,
   regular); for the polar family 1/2 when the q_h-mean is zero (the optimum
   r = 0 is degenerate in φ) and 1 otherwise.

Usage::

    python -m experiments.expfam
    python -m experiments.expfam -m experiment=expfam_symmetrize
    python -m experiments.expfam -m experiment=expfam_break seed=0,1,2,3
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

import slt
from experiments import _runlib, _symmetry
from slt import symmetry as S
from slt.models.expfam import (
    ExponentialFamily,
    ParametricFeatureFamily,
    hypercube_support,
    polygon_support,
)


def _validate(cfg: DictConfig) -> None:
    m, d = cfg.model, cfg.data
    if m.family not in ("fixed", "polar"):
        raise ValueError(f"invalid config value model.family={m.family!r}: must be one of ['fixed', 'polar']")
    if m.space not in ("polygon", "hypercube"):
        raise ValueError(f"invalid config value model.space={m.space!r}: must be one of ['polygon', 'hypercube']")
    if m.family == "polar" and m.space != "polygon":
        raise ValueError("invalid config: model.family=polar needs model.space=polygon (planar support)")
    lo = 3 if m.space == "polygon" else 1
    if not lo <= m.size <= (64 if m.space == "polygon" else 10):
        raise ValueError(f"invalid config value model.size={m.size}: out of range for space={m.space}")
    if d.teacher not in ("uniform", "random"):
        raise ValueError(f"invalid config value data.teacher={d.teacher!r}: must be one of ['uniform', 'random']")
    if d.n < 2:
        raise ValueError(f"invalid config value data.n={d.n}: must be an integer >= 2")
    if cfg.symmetry.mode != "retrained":
        raise ValueError(f"invalid config value symmetry.mode={cfg.symmetry.mode!r}: the exponential family "
                         "re-trains w* on every q_h; only 'retrained' is implemented")


def _support(cfg: DictConfig) -> torch.Tensor:
    size = int(cfg.model.size)
    if cfg.model.space == "polygon":
        return polygon_support(size, dtype=torch.float64)
    return hypercube_support(size, dtype=torch.float64)


def _empirical(model: Any, data: Any) -> torch.Tensor:
    """(S,) probabilities of a (weighted) data set over the model's support."""
    d = S.as_data(data)
    idx = model.index_of(d.x)
    w = torch.ones(d.n, dtype=torch.float64) if d.weights is None else d.weights.double()
    q = torch.zeros(model.support.shape[0], dtype=torch.float64).index_add_(0, idx, w)
    return q / q.sum()


def _flat_loss(model: Any, qhat: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def f(w: torch.Tensor) -> torch.Tensor:  # (d,) -> L_q(w) = -Σ_s q(s) log p(s | w)
        params, i = {}, 0
        for n, sh in zip(names, shapes):
            k = int(math.prod(sh))
            params[n] = w[i:i + k].reshape(1, *sh)
            i += k
        return -(qhat * model.log_prob(params)[0]).sum()

    return f


def fit(model: Any, qhat: torch.Tensor, cfg: DictConfig) -> dict[str, Any]:
    """Set the model's parameters to the maximum-likelihood point of ``qhat`` (S,)."""
    if isinstance(model, ExponentialFamily):
        with torch.no_grad():
            model.theta.copy_(model.fit(model.support, qhat))
    else:
        mean = qhat @ model.support.double()  # (2,)
        with torch.no_grad():
            model.theta1.fill_(max(float(mean.norm()), 1e-3))
            model.theta2.fill_(float(torch.atan2(mean[1], mean[0])))
        params = list(model.parameters())
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=int(cfg.train.finish_iterations), tolerance_grad=1e-12,
                                tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")
        f = _flat_loss(model, qhat)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = f(torch.cat([p.reshape(-1) for p in params]))
            loss.backward()
            return loss

        opt.step(closure)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    f = _flat_loss(model, qhat)
    g = torch.autograd.functional.jacobian(f, w)
    return {"fit_loss": float(f(w)), "fit_grad_norm": float(g.norm()), "w_star": w.tolist()}


def hessian_rank(model: Any, qhat: torch.Tensor, tol: float) -> tuple[int, list[float]]:
    """Rank and eigenvalues of the Hessian of L_q at the model's parameters."""
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = torch.autograd.functional.hessian(_flat_loss(model, qhat), w)
    eig = torch.linalg.eigvalsh(0.5 * (H + H.T))
    thr = tol * max(1.0, float(eig.abs().max()))
    return int((eig > thr).sum()), eig.tolist()


def run(cfg: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    seed = int(cfg.seed)
    g_teacher, g_data, g_sym = (torch.Generator().manual_seed(seed * 1000 + i) for i in range(3))
    support = _support(cfg)
    n_s = support.shape[0]
    if cfg.data.teacher == "uniform":
        probs = torch.full((n_s,), 1.0 / n_s, dtype=torch.float64)
    else:
        probs = torch.softmax(float(cfg.data.temperature) * torch.randn(n_s, generator=g_teacher, dtype=torch.float64), 0)
    model: Any = (ExponentialFamily(support) if cfg.model.family == "fixed"
                  else ParametricFeatureFamily.polar(support))
    n = int(cfg.data.n)
    X = model.sample(n, g_data, probs=probs)  # (n, m)

    sym = cfg.symmetry
    met: dict[str, Any] = {"teacher_probs": probs.tolist(), "symmetry_mode": str(sym.mode)}
    group = None
    if sym.operation == "none" or sym.group == "none":
        q0 = q1 = qh = S.compress(X)
        h = 0.0
    else:
        group = _symmetry.make_group(sym.group, int(sym.degree or cfg.model.size), plane=cfg.model.space == "polygon")
        q0, q1 = _symmetry.path_endpoints(sym, X, group, g_sym)
        q0, q1 = S.compress(q0), S.compress(q1)
        h = float(sym.h)
        qh = S.compress(_symmetry.mixed(q0, q1, h))
        met.update(h=h, invariance_gap=S.invariance_gap(qh, group), invariance_gap_q0=S.invariance_gap(q0, group),
                   invariance_gap_q1=S.invariance_gap(q1, group))
    qhat = _empirical(model, qh)
    met.update(fit(model, qhat, cfg))
    d = sum(p.numel() for p in model.parameters())
    rank, eig = hessian_rank(model, qhat, float(cfg.hessian_tol))
    lo, hi = slt.theory.hessian_rank_bounds(d, rank)
    mean_norm = float((qhat @ support).norm())
    if cfg.model.family == "fixed":
        expected = d / 2
    else:
        expected = 0.5 if mean_norm < 1e-9 else 1.0
    met.update(d=d, hessian_rank=rank, hessian_eigenvalues=eig, llc_lower_bound=lo, llc_upper_bound=hi,
               q_mean_norm=mean_norm, llc_expected=expected)

    kw = _runlib.llc_kwargs(cfg.sampler, seed=seed, device=cfg.device, progress=bool(cfg.progress), dtype=torch.float64)
    kw["nbeta"] = kw.get("nbeta") or slt.default_nbeta(n)  # rows are support points, not samples
    if group is not None and sym.susceptibility:
        sr = S.llc_susceptibility(model, q0, q1, h, **kw)
        res = sr.llc
        met.update(dllc_dh=sr.dllc_dh, dllc_dh_sem=sr.dllc_dh_sem, mean_term=sr.mean_term, cov_term=sr.cov_term)
    else:
        res = slt.estimate_llc(model, qh, **kw)
    met.update(_runlib.metrics_from_result(res))
    met["z_expected"] = (res.llc_mean - expected) / res.llc_sem if res.llc_sem > 0 else None
    met["device"] = res.config.get("device", cfg.device)
    print(f"[expfam] {cfg.model.family} seed={seed} h={h:g}: λ̂ = {res.llc_mean:.3f} ± {res.llc_sem:.3f} "
          f"(expected {expected:g}; Hessian rank {rank}/{d}, bounds [{lo:g}, {hi:g}])"
          + (f"  dλ̂/dh = {met['dllc_dh']:.3g} ± {met['dllc_dh_sem']:.2g}" if "dllc_dh" in met else ""), flush=True)
    return met, _runlib.result_arrays(res)


@hydra.main(version_base="1.3", config_path=_runlib.CONF_DIR, config_name="expfam")
def main(cfg: DictConfig) -> Any:
    return _runlib.hydra_task(run, _validate)(cfg)


if __name__ == "__main__":
    _runlib.main(main)
