r"""Experiment 2: the toy model of superposition, as a Hydra experiment.

One run (config ``conf/tms.yaml``):

1. data: ``n`` samples from ``data/tms_sparse`` (x = μ e_i, Chen et al. 2023)
   or ``data/tms_bernoulli`` (x_i = 0 with probability S, else U[0, 1];
   Elhage et al. 2022); importances :math:`I_i = \text{decay}^i`;
2. optionally move q along a symmetry path (``symmetry=permutation``:
   uniform importance and sparsity make q invariant under permutations of
   the features; ``symmetry.operation=break`` moves q towards a tilted q1
   that lacks that invariance, q_h = (1 - h) q + h q1);
3. train w* (float64, Adam then full-batch L-BFGS; :func:`slt.training.train`)
   from a seeded Xavier init or from a named k-gon (``init.kind=kgon``) on the
   unperturbed q (``train.online=true``: Adam on fresh minibatches of q, as
   Elhage et al. train, with ``heldout_loss`` on fresh samples recorded).  Along a symmetry path ``symmetry.mode`` says where λ̂ is
   measured: ``quenched`` (default) at this w*, held fixed for every h;
   ``retrained`` at w*_h, trained on the weighted q_h itself from the same
   init (minibatches drawn ∝ weight, exact weighted L-BFGS finish), with the
   distance ``w_star_shift`` = ‖w*_h − w*‖ and the loss drop
   ``retrain_loss_drop`` = L_h(w*) − L_h(w*_h) recorded;
4. classify the critical point (:func:`slt.models.classify_tms_point`: k-gon,
   dead features, positive-bias dead features, antipodal pairs) and compute
   feature dimensionalities :math:`D_i = \lVert W_i\rVert^2 / \sum_j (\hat W_i\cdot W_j)^2`;
5. estimate λ̂ (:func:`slt.estimate_llc` with ``sampler/`` settings) and
   compare with the closed form (:func:`slt.theory.tms_llc`) when one exists
   (6 features, 2 hidden, high-sparsity data, uniform importance), plus the
   free-energy proxy :math:`F \approx n L_n(w^*) + \hat\lambda \log n`.

Usage::

    python -m experiments.tms                                  # one run
    python -m experiments.tms -m seed=0,1,2                    # sweep -> summary.csv
    python -m experiments.tms -m experiment=tms_phase          # 5-gon vs 6-gon over n
    python -m experiments.tms -m experiment=tms_elhage hydra/launcher=parallel
    python -m experiments.tms -m experiment=tms_symmetry_retrained   # w*_h re-trained on q_h

Results: ``${SLT_RESULTS_DIR:-results}/{runs,sweeps}/<name>/<overrides>/result.json``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

import slt
from experiments import _runlib
from slt.models import (
    classify_tms_point,
    geometric_importance,
    kgon_parameters,
    make_tms_loss,
    tms_loss,
    tms_population_loss,
)
from slt.geometry import feature_dimensionality
from slt.training import full_batch_loss_and_grad_norm, train


HESSIAN_TOL = 1e-6  # eigenvalues below HESSIAN_TOL · max(1, largest) count as zero
#: the Hessian (d backward passes over the data, d = m·n + n) is skipped above this many parameters
#: (hessian_rank and the bounds are then recorded as null): 6×2 has d = 18, the 200×20 fig_dims model 4200
HESSIAN_MAX_PARAMS = 1000


def hessian_rank(model: ToyModelOfSuperposition, X: Any, loss: Any) -> tuple[int, list[float]]:
    """Rank and eigenvalues of the Hessian of the full-data loss at the model's (W, b), in float64.

    ``X``: a tensor, or a weighted :class:`slt.Data` (then the weighted mean loss).
    ReLU makes the loss piecewise smooth; at a trained point no sample sits exactly on a kink,
    so the Hessian exists.  Gives the bounds d₁/2 ≤ λ ≤ (d + d₁)/4 (:func:`slt.theory.hessian_rank_bounds`).
    """
    W0, b0 = model.W.detach().double(), model.b.detach().double()
    m, n = W0.shape
    wts = None
    if isinstance(X, slt.Data):
        wts = None if X.weights is None else X.weights.double() / X.weights.double().sum()
        X = X.x
    Xd = X.double()

    def f(w: torch.Tensor) -> torch.Tensor:
        W, b = w[: m * n].view(m, n), w[m * n:]
        out = torch.relu((Xd @ W.T) @ W + b)
        return loss(out, Xd) if wts is None else (loss.per_sample(out, Xd) * wts).sum()

    H = torch.autograd.functional.hessian(f, torch.cat([W0.reshape(-1), b0]))
    eig = torch.linalg.eigvalsh(0.5 * (H + H.T))
    thr = HESSIAN_TOL * max(1.0, float(eig.abs().max()))
    return int((eig > thr).sum()), eig.tolist()


def _validate(cfg: DictConfig) -> None:
    if cfg.init.kind not in ("random", "kgon"):
        raise ValueError(f"invalid config value init.kind={cfg.init.kind!r}: must be one of ['random', 'kgon']")
    if cfg.init.kind == "kgon" and not 1 <= cfg.init.k <= cfg.model.n_features:
        raise ValueError(f"invalid config value init.k={cfg.init.k}: must be in [1, model.n_features={cfg.model.n_features}]")
    if cfg.data.n < 2:
        raise ValueError(f"invalid config value data.n={cfg.data.n}: must be an integer >= 2")
    if "sparsity" in cfg.data and not 0.0 <= cfg.data.sparsity < 1.0:
        raise ValueError(f"invalid config value data.sparsity={cfg.data.sparsity}: must be in [0, 1)")
    if not cfg.importance_decay > 0:
        raise ValueError(f"invalid config value importance_decay={cfg.importance_decay}: must be positive")
    std = cfg.init.get("std", None)
    if std is not None and not (math.isfinite(float(std)) and float(std) > 0):
        raise ValueError(f"invalid config value init.std={std}: must be a positive number (or null for Xavier)")
    if std is not None and cfg.init.kind != "random":
        raise ValueError(f"invalid config value init.std={std}: applies to init.kind=random only (got {cfg.init.kind!r})")
    if cfg.init.noise < 0:
        raise ValueError(f"invalid config value init.noise={cfg.init.noise}: must be non-negative")
    path = cfg.symmetry.operation != "none" and cfg.symmetry.group != "none"
    if cfg.train.get("online", False) and path and cfg.symmetry.mode == "retrained":
        raise ValueError(
            "invalid config value train.online=True: not supported with symmetry.mode=retrained "
            "(w*_h is trained on the stored, weighted samples of q_h)"
        )


def _path(cfg: DictConfig, X: torch.Tensor, gen: torch.Generator) -> dict[str, Any] | None:
    """The symmetry path's ``group``, ``q0``, ``q1``, ``h`` and ``qh`` (``None`` without a path)."""
    sym = cfg.symmetry
    if sym.operation == "none" or sym.group == "none":
        return None
    from experiments import _symmetry

    group = _symmetry.make_group(sym.group, int(sym.degree or cfg.model.n_features))
    q0, q1 = _symmetry.path_endpoints(sym, X, group, gen)
    h = float(sym.h)
    return {"group": group, "q0": q0, "q1": q1, "h": h, "qh": _symmetry.mixed(q0, q1, h)}


def _estimate(cfg: DictConfig, model: torch.nn.Module, X: torch.Tensor, loss: Any, path: dict[str, Any] | None):
    """λ̂ at q (no path) or at q_h on the symmetry path, with the covariance
    susceptibility when ``symmetry.susceptibility`` (at the model's w*: w*_0 when
    quenched, w*_h when re-trained); returns (result, metrics)."""
    kw = _runlib.llc_kwargs(cfg.sampler, seed=int(cfg.seed), device=cfg.device, progress=bool(cfg.progress))
    sym = cfg.symmetry
    if path is None:
        return slt.estimate_llc(model, X, loss, **kw), {}
    from slt import symmetry as S

    group, q0, q1, h, qh = path["group"], path["q0"], path["q1"], path["h"], path["qh"]
    kw["nbeta"] = kw.get("nbeta") or slt.default_nbeta(X.shape[0])  # rows of q_h are not samples
    met: dict[str, Any] = {"h": h, "invariance_gap": S.invariance_gap(qh, group, acts_on=sym.acts_on),
                           "invariance_gap_q1": S.invariance_gap(q1, group, acts_on=sym.acts_on)}
    if not sym.susceptibility:
        return slt.estimate_llc(model, qh, loss, **kw), met
    sr = S.llc_susceptibility(model, q0, q1, h, loss_fn=loss, **kw)
    met.update(dllc_dh=sr.dllc_dh, dllc_dh_sem=sr.dllc_dh_sem, mean_term=sr.mean_term, cov_term=sr.cov_term,
               delta_loss_star=sr.delta_loss_star)
    return sr.llc, met


def run(cfg: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    seed = int(cfg.seed)
    gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(4)]  # data, init, train, symmetry
    n_features, n_hidden = int(cfg.model.n_features), int(cfg.model.n_hidden)

    # 1. data and loss
    X = _runlib.instantiate_partial(cfg.data)(generator=gens[0])  # (n, F) float32
    imp = None if cfg.importance_decay == 1.0 else geometric_importance(n_features, float(cfg.importance_decay))
    loss = tms_loss if imp is None else make_tms_loss(imp)

    # 2. model and init
    model = _runlib.instantiate_partial(cfg.model, generator=gens[1]).to(_runlib.torch_dtype(cfg.train.dtype))
    if cfg.init.kind == "random" and cfg.init.get("std", None) is not None:
        with torch.no_grad():  # the same Gaussian draws, rescaled from the Xavier std to init.std
            model.W.mul_(float(cfg.init.std) / type(model).xavier_std(n_features, n_hidden))
    if cfg.init.kind == "kgon":
        p = kgon_parameters(
            int(cfg.init.k), n_features, n_hidden, dead_bias=float(cfg.init.dead_bias), plus=bool(cfg.init.plus)
        )
        model.load_state_dict({k: v.to(model.W.dtype) for k, v in p.items()})
    if cfg.init.noise > 0:
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(cfg.init.noise * torch.randn(prm.shape, generator=gens[1], dtype=prm.dtype))

    # 3. train w* on the unperturbed q (and, re-trained, w*_h on q_h from the same init)
    dtype = model.W.dtype
    path = _path(cfg, X, gens[3])
    retrained = path is not None and cfg.symmetry.mode == "retrained"
    model_h = copy.deepcopy(model) if retrained else None  # the same init

    online = bool(cfg.train.get("online", False))
    sample_q = _runlib.instantiate_partial(cfg.data)

    def fresh(batch_size: int, g: torch.Generator) -> torch.Tensor:  # online training: new samples of q
        return sample_q(n=batch_size, generator=g).to(dtype)

    def fit_on(m: torch.nn.Module, data: Any) -> Any:
        return train(
            m, data, loss, steps=int(cfg.train.steps), lr=float(cfg.train.lr), optimizer=cfg.train.optimizer,
            batch_size=cfg.train.batch_size, weight_decay=float(cfg.train.weight_decay),
            generator=torch.Generator().manual_seed(seed * 1000 + 2),  # = gens[2]: same stream for w* and w*_h
            tol=float(cfg.train.tol), finish=cfg.train.finish, finish_iterations=int(cfg.train.finish_iterations),
            stream=fresh if online else None,
        )

    Xt = X.to(dtype)
    fit = fit_on(model, Xt)
    sym_train: dict[str, Any] = {}
    if path is not None:
        qh_t = path["qh"].to(dtype) if isinstance(path["qh"], torch.Tensor) else path["qh"].to(X.device, dtype)
        sym_train["symmetry_mode"] = str(cfg.symmetry.mode)
        loss_h0, gnorm_h0 = full_batch_loss_and_grad_norm(model, qh_t, loss)
        sym_train.update(loss_qh_at_w_star_q=loss_h0, grad_norm_qh_at_w_star_q=gnorm_h0)
        if retrained:
            assert model_h is not None
            fit0, model0 = fit, model
            if path["h"] == 0.0:  # q_h = q: w*_h = w*
                model_h = model0
            else:
                fit = fit_on(model_h, qh_t)
            model = model_h
            theta0 = torch.cat([p.detach().reshape(-1) for p in model0.parameters()])
            theta_h = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            sym_train.update(
                train_loss_q=fit0.loss, train_grad_norm_q=fit0.grad_norm,
                w_star_shift=float((theta_h - theta0).norm()),
                retrain_loss_drop=loss_h0 - fit.loss,  # L_h(w*) - L_h(w*_h) >= 0
            )
    W, b = model.W.detach().double(), model.b.detach().double()

    # 4. classify (the point λ̂ is measured at; its Hessian on the loss it minimises)
    cls = classify_tms_point(W, b, tol=float(cfg.classify_tol))
    dims = feature_dimensionality(W)
    d = W.numel() + b.numel()
    h_rank: int | None = None
    h_eig: list[float] | None = None
    lo = hi = None
    if d <= HESSIAN_MAX_PARAMS:
        h_rank, h_eig = hessian_rank(model, slt.symmetry.as_data(path["qh"]) if retrained else X, loss)
        lo, hi = slt.theory.hessian_rank_bounds(d, h_rank)

    # 5. λ̂ on q_h
    res, sym_metrics = _estimate(cfg, model, X, loss, path)
    sym_metrics.update(sym_train)

    n = int(cfg.data.n)
    metrics: dict[str, Any] = {
        "point": cls["name"] or f"irregular-{cls['k']}",
        "k": cls["k"],
        "regular": cls["regular"],
        "n_dead": len(cls["dead"]),
        "n_dead_positive_bias": len(cls["dead_positive_bias"]),
        "n_antipodal_pairs": len(cls["antipodal_pairs"]),
        "antipodal_pairs": cls["antipodal_pairs"],
        "length": cls["length"],
        "bias": cls["bias"],
        "train_loss": fit.loss,
        "train_grad_norm": fit.grad_norm,
        "train_converged": fit.converged,
        "model_dimensionality": n_hidden / float(W.square().sum()),
        "d": d,
        "hessian_rank": h_rank,  # of the loss w* was trained on (L_q; re-trained: L_{q_h} at w*_h)
        "hessian_eigenvalues": h_eig,
        "llc_lower_bound": lo,
        "llc_upper_bound": hi,
        "feature_dimensionality": dims.tolist(),
        "W": W.tolist(),
        "b": b.tolist(),
        **_runlib.metrics_from_result(res),
        "free_energy_proxy": n * fit.loss + res.llc_mean * math.log(n),
        **sym_metrics,
        "device": res.config.get("device", cfg.device),
    }
    sparse_data = str(cfg.data._target_).endswith("make_tms_sparse_data")
    if sparse_data:
        metrics["population_loss"] = float(tms_population_loss(W, b, imp))
    else:  # Monte-Carlo population loss on n fresh samples: the gap to train_loss is the fit to the stored ones
        with torch.no_grad():
            fresh_x = sample_q(n=n, generator=torch.Generator().manual_seed(seed * 1000 + 4)).to(dtype)
            metrics["heldout_loss"] = float(loss(model(fresh_x), fresh_x))
    closed = (
        n_features == 6 and n_hidden == 2 and sparse_data and imp is None
        and cls["name"] in slt.theory.TMS_CRITICAL_POINTS
        and (cfg.symmetry.operation == "none" or cfg.symmetry.group == "none" or cfg.symmetry.h == 0.0)
    )
    metrics["llc_theory"] = slt.theory.tms_llc(cls["name"]) if closed else None
    if closed:
        lam = metrics["llc_theory"]
        metrics["relative_error"] = (res.llc_mean - lam) / lam
        metrics["z_theory"] = (res.llc_mean - lam) / res.llc_sem if res.llc_sem > 0 else None
    arrays = {**_runlib.result_arrays(res), "W": W, "b": b}  # traces (C, T), llc_per_chain (C,), obs_*; w*
    print(
        f"[tms] seed={seed} n={n}: {metrics['point']} (L_n={fit.loss:.5f}) λ̂ = {res.llc_mean:.2f} ± {res.llc_sem:.2f}"
        + (f"  closed form {metrics['llc_theory']}" if closed else "")
        + (f"  h={path['h']:g} {cfg.symmetry.mode}" if path is not None else "")
        + (f" (‖w*_h - w*‖ = {metrics['w_star_shift']:.3g})" if "w_star_shift" in metrics else ""),
        flush=True,
    )
    return metrics, arrays


@hydra.main(version_base="1.3", config_path=_runlib.CONF_DIR, config_name="tms")
def main(cfg: DictConfig) -> Any:
    return _runlib.hydra_task(run, _validate)(cfg)


if __name__ == "__main__":
    _runlib.main(main)
