r"""LLC over training for one toy-model-of-superposition run, as a Hydra experiment.

One run (config ``conf/tms_curve.yaml``):

1. data: ``data.n`` samples from ``data/tms_sparse`` (x = μ e_i, Chen et al.
   2023) or ``data/tms_bernoulli``;
2. train from a seeded Xavier init scaled by ``curve.init_scale`` with minibatch Adam (``curve.*``), keeping
   the full-data loss every ``curve.log_every`` steps and a checkpoint
   (state dict) at ``curve.num_checkpoints`` log-spaced steps;
3. classify every checkpoint (:func:`slt.geometry.classify_point`: live
   columns k, k-gon name, feature dimensionalities);
4. estimate λ̂ at **all** checkpoints in one batched call,
   ``slt.estimate_llc(model, X, loss, state_dicts=[...])``: checkpoint j uses
   seed ``seed + j``.

Records (``result.json`` metrics): ``ckpt_step``, ``ckpt_loss``, ``ckpt_llc_mean``,
``ckpt_llc_sem``, ``ckpt_k``, ``ckpt_point``, ``ckpt_frac_below_init``
(lists, one entry per checkpoint), ``curve_step``, ``curve_loss`` (the loss
curve), the final ``W``/``b``; ``traces.npz`` holds the checkpoints'
``W``/``b`` and per-chain λ̂.

Usage::

    python -m experiments.tms_curve                       # one run
    python -m experiments.tms_curve -m seed=0,1,2         # a sweep
    python -m experiments.figures curve
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

import slt
from experiments import _runlib
from experiments._schemas import CurveConf, TMSCurveConfig  # noqa: F401  (schema of tms_curve.yaml)
from slt.models import geometric_importance, make_tms_loss, tms_loss


def _validate(cfg: DictConfig) -> None:
    # keys and types are checked when the config is composed (tms_curve_schema, in the launching
    # process: a job-time OmegaConf.structured() of a dataclass defined here is not picklable by
    # the joblib launcher's workers); the values here, at the start of the job
    c = cfg.curve
    for key in ("steps", "num_checkpoints", "log_every", "batch_size", "first_checkpoint"):
        if int(c[key]) < 1:
            raise ValueError(f"invalid config value curve.{key}={c[key]}: must be an integer >= 1")
    if c.first_checkpoint > c.steps:
        raise ValueError(f"invalid config value curve.first_checkpoint={c.first_checkpoint}: must be <= curve.steps={c.steps}")
    if not c.init_scale > 0:
        raise ValueError(f"invalid config value curve.init_scale={c.init_scale}: must be positive")
    if not c.lr > 0:
        raise ValueError(f"invalid config value curve.lr={c.lr}: must be positive")
    if cfg.data.n < 2:
        raise ValueError(f"invalid config value data.n={cfg.data.n}: must be an integer >= 2")
    if not cfg.importance_decay > 0:
        raise ValueError(f"invalid config value importance_decay={cfg.importance_decay}: must be positive")


def checkpoint_steps(steps: int, num: int, first: int = 1) -> list[int]:
    """Step 0 and about ``num - 1`` log-spaced steps in ``[first, steps]`` (distinct, sorted)."""
    ls = np.unique(np.round(np.geomspace(first, steps, max(num - 1, 1))).astype(int))
    return [0] + [int(s) for s in ls if s > 0]


def run(cfg: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    seed = int(cfg.seed)
    g_data, g_init, g_batch = (torch.Generator().manual_seed(seed * 1000 + i) for i in range(3))
    n_features = int(cfg.model.n_features)
    X = _runlib.instantiate_partial(cfg.data)(generator=g_data)  # (n, F) float32
    imp = None if cfg.importance_decay == 1.0 else geometric_importance(n_features, float(cfg.importance_decay))
    loss = tms_loss if imp is None else make_tms_loss(imp)
    model = _runlib.instantiate_partial(cfg.model, generator=g_init)
    with torch.no_grad():
        model.W.mul_(float(cfg.curve.init_scale))  # small init: plateaus near k-gons (Chen et al. 2023)

    c = cfg.curve
    steps, bs = int(c.steps), int(c.batch_size)
    ckpts = set(checkpoint_steps(steps, int(c.num_checkpoints), int(c.first_checkpoint)))
    opt = torch.optim.Adam(model.parameters(), lr=float(c.lr))
    curve_step, curve_loss, ck_step, ck_loss, states = [], [], [], [], []
    t0 = time.perf_counter()
    n = X.shape[0]
    for t in range(steps + 1):
        if t in ckpts or t % int(c.log_every) == 0:
            with torch.no_grad():
                full = float(loss(model(X), X))
            if t % int(c.log_every) == 0:
                curve_step.append(t)
                curve_loss.append(full)
            if t in ckpts:
                ck_step.append(t)
                ck_loss.append(full)
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if t == steps:
            break
        idx = torch.randint(0, n, (bs,), generator=g_batch)
        opt.zero_grad()
        loss(model(X[idx]), X[idx]).backward()
        opt.step()
    train_seconds = time.perf_counter() - t0

    kinds = [slt.geometry.classify_point(s["W"].double(), s["b"].double(), tol=float(cfg.classify_tol)) for s in states]
    kw = _runlib.llc_kwargs(cfg.sampler, seed=seed, device=cfg.device, progress=bool(cfg.progress))
    t1 = time.perf_counter()
    results = slt.estimate_llc(model, X, loss, state_dicts=states, **kw)
    llc_seconds = time.perf_counter() - t1

    W_final, b_final = states[-1]["W"].double(), states[-1]["b"].double()
    metrics: dict[str, Any] = {
        "ckpt_step": ck_step,
        "ckpt_loss": ck_loss,
        "ckpt_llc_mean": [r.llc_mean for r in results],
        "ckpt_llc_sem": [r.llc_sem for r in results],
        "ckpt_frac_below_init": [float(r.diagnostics.get("frac_below_init", float("nan"))) for r in results],
        "ckpt_k": [int(k["k"]) for k in kinds],
        "ckpt_point": [k["name"] or f"irregular-{k['k']}" for k in kinds],
        "curve_step": curve_step,
        "curve_loss": curve_loss,
        "final_point": kinds[-1]["name"] or f"irregular-{kinds[-1]['k']}",
        "final_loss": ck_loss[-1],
        "final_llc_mean": results[-1].llc_mean,
        "final_llc_sem": results[-1].llc_sem,
        "W": W_final.tolist(),
        "b": b_final.tolist(),
        "num_checkpoints": len(states),
        "train_seconds": train_seconds,
        "llc_seconds": llc_seconds,
        "nbeta": results[0].config.get("nbeta"),
        "localization": results[0].config.get("localization"),
        "device": results[0].config.get("device", cfg.device),
    }
    arrays = {
        "ckpt_W": torch.stack([s["W"] for s in states]),  # (K, m, n)
        "ckpt_b": torch.stack([s["b"] for s in states]),  # (K, n)
        **_runlib.result_arrays(results, prefix="ckpt_", traces=False),  # ckpt_llc_per_chain (K, C)
    }
    print(f"[tms_curve] seed={seed}: {len(states)} checkpoints, train {train_seconds:.1f} s, batched λ̂ {llc_seconds:.1f} s; "
          f"final {metrics['final_point']} L={ck_loss[-1]:.5f} λ̂ = {results[-1].llc_mean:.2f} ± {results[-1].llc_sem:.2f}; "
          f"live columns over training: {sorted(set(metrics['ckpt_k']))}", flush=True)
    return metrics, arrays


@hydra.main(version_base="1.3", config_path=_runlib.CONF_DIR, config_name="tms_curve")
def main(cfg: DictConfig) -> Any:
    return _runlib.hydra_task(run, _validate)(cfg)


if __name__ == "__main__":
    _runlib.main(main)
