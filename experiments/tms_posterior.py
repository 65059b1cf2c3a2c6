r"""Bayesian phase transition of the TMS: posterior mass of each k-gon phase, as a Hydra experiment.

One run (config ``conf/tms_posterior.yaml``):

1. data: ``data.n`` samples x = μ e_i (6 features, high-sparsity limit; Chen et al. 2023);
2. :func:`slt.sample_posterior`: replica-exchange SGLD on the global tempered posterior
   :math:`\propto e^{-n\beta L_n(w)} N(w; 0, \sigma_0^2 I)` at every rung
   :math:`n\beta f_r` of a geometric ladder from :math:`n` down to ``ladder.min_nbeta``, chains
   started in groups at the k-gons listed in ``starts`` (the 5-gon and the 6-gon);
3. :func:`slt.basin_fractions` with the label "number of live columns"
   (:func:`slt.models.tms_live_columns`) at every rung: fraction of draws in each phase, s.e. from the
   spread over chains, fractions by starting group and the ``mixed`` verdict (groups agree
   within 3 s.e. and switch phases).

Rung 0 is the Bayesian posterior at sample size n (β = 1).  Hotter rungs are the tempered
posterior :math:`e^{-n\beta L_n}` with :math:`n\beta < n`, which stands in for the posterior at sample size nβ
(same expected loss; the data fluctuations are those of n samples), so one run traces the
transition in nβ.  The prediction from the free energy
:math:`F_k \approx nL_k + \lambda_k\log n` (λ = 7 for the 5-gon, 8.5 for the 6-gon, losses from the
closed forms) crosses at n ≈ 445; Chen et al. report the flip near n ≈ 600.

Records (``result.json`` metrics): ``rung_nbeta`` and, per phase k, ``rung_frac_k{k}``,
``rung_sem_k{k}`` (lists over rungs), ``rung_mixed``, ``rung_max_z``, ``swap_accept``,
``frac_k5``/``frac_k6``/``sem_k5``/``sem_k6``/``mixed`` at β = 1, step sizes, MALA acceptance.
``traces.npz``: the labels of every draw at every rung ``(R, C, T)`` and the β = 1 draws.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

import slt
from experiments import _runlib
from slt.models import kgon_parameters, tms_loss, tms_live_columns

PHASES = (1, 2, 3, 4, 5, 6)


def _validate(cfg: DictConfig) -> None:
    F = int(cfg.model.n_features)
    if int(cfg.model.n_hidden) < 2:
        raise ValueError(f"invalid config value model.n_hidden={cfg.model.n_hidden}: k-gon starts need >= 2")
    if not cfg.starts or any(not 1 <= int(k) <= F for k in cfg.starts):
        raise ValueError(f"invalid config value starts={list(cfg.starts)}: each must be a k-gon with 1 <= k <= {F}")
    if not cfg.prior_std > 0:
        raise ValueError(f"invalid config value prior_std={cfg.prior_std}: must be positive")
    if int(cfg.chains_per_start) < 2:
        raise ValueError(f"invalid config value chains_per_start={cfg.chains_per_start}: need >= 2 (errors come from the chain spread)")
    if not 0 < cfg.live_threshold < 1:
        raise ValueError(f"invalid config value live_threshold={cfg.live_threshold}: must be in (0, 1)")
    if int(cfg.ladder.num) < 1:
        raise ValueError(f"invalid config value ladder.num={cfg.ladder.num}: must be >= 1")
    if int(cfg.ladder.num) > 1 and not 0 < cfg.ladder.min_nbeta < cfg.data.n:
        raise ValueError(f"invalid config value ladder.min_nbeta={cfg.ladder.min_nbeta}: must be in (0, data.n={cfg.data.n})")
    if int(cfg.data.n) < 2:
        raise ValueError(f"invalid config value data.n={cfg.data.n}: must be >= 2")


def run(cfg: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    seed = int(cfg.seed)
    g_data = torch.Generator().manual_seed(seed * 1000)
    X = _runlib.instantiate_partial(cfg.data)(generator=g_data).double()  # (n, F)
    n = X.shape[0]
    F, m = int(cfg.model.n_features), int(cfg.model.n_hidden)
    model = _runlib.instantiate_partial(cfg.model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    starts = [kgon_parameters(int(k), F, m, dead_bias=float(cfg.dead_bias)) for k in cfg.starts]
    labels = [f"{int(k)}-gon" for k in cfg.starts]
    R = int(cfg.ladder.num)
    ladder = slt.phases.geometric_ladder(R, float(cfg.ladder.min_nbeta) / n) if R > 1 else None
    p = cfg.posterior
    t0 = time.perf_counter()
    draws = slt.sample_posterior(
        model, X, tms_loss, prior_std=float(cfg.prior_std), init=starts, init_labels=labels,
        chains_per_init=int(cfg.chains_per_start), num_draws=int(p.num_draws), num_burnin=int(p.num_burnin),
        num_steps_bw_draws=int(p.num_steps_bw_draws), step_size=None if p.step_size is None else float(p.step_size),
        temperatures=ladder, swap_every=int(cfg.ladder.swap_every), seed=seed, device=cfg.device,
        progress=bool(cfg.progress),
    )
    seconds = time.perf_counter() - t0
    thr = float(cfg.live_threshold)

    def classify(prm: dict[str, torch.Tensor]) -> int:
        return tms_live_columns(prm["W"], rel_threshold=thr)

    fr = [slt.basin_fractions(draws, classify, rung=r) for r in range(R)]
    factors = ladder or [1.0]
    metrics: dict[str, Any] = {
        "n": n,
        "rung_nbeta": [n * f for f in factors],
        "rung_mixed": [b.mixed for b in fr],
        "rung_max_z": [b.max_z for b in fr],
        "rung_switches": [float(b.switches.mean()) for b in fr],
        "swap_accept": draws.swap_accept.tolist(),
        "mala_accept": float(draws.mala_accept.mean()),
        "step_size": draws.config["step_size"],
        "rung_step_sizes": draws.config["rung_step_sizes"],
        "hessian_max": draws.config["hessian_max"],
        "num_chains": draws.num_chains,
        "sample_seconds": seconds,
        "mixed": fr[0].mixed,
        "max_z": fr[0].max_z,
        "device": draws.config["device"],
    }
    for k in PHASES:
        metrics[f"rung_frac_k{k}"] = [b.fraction(k) for b in fr]
        metrics[f"rung_sem_k{k}"] = [b.sem.get(k, 0.0) for b in fr]
        metrics[f"frac_k{k}"] = fr[0].fraction(k)
        metrics[f"sem_k{k}"] = fr[0].sem.get(k, 0.0)
    for lab in labels:
        for k in (5, 6):
            metrics[f"frac_k{k}_from_{lab}"] = fr[0].by_init[lab].get(k, 0.0)
    lab_arr = np.stack([np.vectorize(int)(b.labels) for b in fr])  # (R, C, T)
    arrays = {"labels": lab_arr, "draws": draws.draws.numpy(), "loss_trace": draws.loss_trace.numpy()}
    print(f"[tms_posterior] n={n} seed={seed}: β=1 5-gon {fr[0].fraction(5):.3f} ± {fr[0].sem.get(5, 0):.3f}, "
          f"6-gon {fr[0].fraction(6):.3f} ± {fr[0].sem.get(6, 0):.3f} (mixed={fr[0].mixed}); "
          f"{R} rungs, swap acceptance {np.round(draws.swap_accept.numpy(), 2).tolist()}, {seconds:.0f} s", flush=True)
    return metrics, arrays


@hydra.main(version_base="1.3", config_path=_runlib.CONF_DIR, config_name="tms_posterior")
def main(cfg: DictConfig) -> Any:
    return _runlib.hydra_task(run, _validate)(cfg)


if __name__ == "__main__":
    _runlib.main(main)
