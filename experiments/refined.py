r"""Refined LLCs of attention heads over training (Wang et al. 2024, arXiv 2410.02984), in miniature.

One run (config ``conf/refined.yaml``):

1. data: ``data.n`` training and ``data.n_eval`` held-out sequences of a random Markov chain in
   which one random segment is copied further on (:func:`experiments._induction.make_induction_data`):
   inside the copy the next token is predictable by induction;
2. train a 2-layer attention-only transformer (:class:`experiments._induction.AttnOnlyTransformer`,
   ``torch.nn.MultiheadAttention`` layers) from a seeded init with minibatch Adam (``training.*``),
   keeping the held-out loss (all / induction / other positions) every ``training.log_every`` steps
   and a checkpoint at ``training.num_checkpoints`` log-spaced steps;
3. per checkpoint and head: the induction score (attention from t to the token after the previous
   occurrence of x_t) and the previous-token score (attention to t − 1), on held-out sequences; each
   head is classified at the last checkpoint (``induction`` / ``previous-token`` / ``other``,
   threshold ``score_threshold``);
4. **weight-refined** LLC of every head at every checkpoint in one batched call,
   ``slt.estimate_llc(model, (X, Y), loss, state_dicts=[...], restrict_to=slt.restrict.heads(model))``
   (only the head's rows of ``in_proj_weight`` and columns of ``out_proj.weight`` move);
5. **data-refined** LLC (all weights move) of every checkpoint on the induction positions, the other
   positions and all positions: ``data = {"induction": (X, Y_ind), "other": (X, Y_other), "all": (X, Y)}``
   with the labels outside each set ``-100`` and a per-sequence loss that ignores them
   (:func:`experiments._induction.token_ce`).  Checkpoint j uses seed ``seed + j`` in both calls.

Records (``result.json`` metrics): ``ckpt_step``, ``ckpt_loss`` / ``ckpt_loss_induction`` /
``ckpt_loss_other`` (held-out), ``heads`` (labels ``l{layer}h{head}``), ``head_class``,
``head_induction_score`` / ``head_previous_score`` / ``head_rllc_mean`` / ``head_rllc_sem``
(lists per head of lists per checkpoint), ``data_llc_mean`` / ``data_llc_sem`` (per data set, lists per
checkpoint), ``head_rhat`` / ``data_rhat`` (R-hat over chains, same layout), ``rllc_num_draws`` / ``dllc_num_draws`` (draws per chain as run: more than ``sampler.num_draws``
when ``extend_draws`` continued unmixed chains), ``curve_step`` / ``curve_loss`` / ``curve_loss_induction`` /
``curve_loss_other``; ``traces.npz``
the per-chain λ̂ (``head_llc_per_chain`` (heads, K, C), ``data_<set>_llc_per_chain`` (K, C)) and the
scores.

Usage::

    python -m experiments.refined -m seed=0       # one run (sweep folder, read by the figure)
    python -m experiments.figures refined
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

import slt
from experiments import _induction as ind
from experiments import _runlib
from experiments._schemas import RefinedConfig  # noqa: F401  (schema of refined.yaml)
from experiments.tms_curve import checkpoint_steps


def _validate(cfg: DictConfig) -> None:
    m, d, t = cfg.model, cfg.data, cfg.training
    for key in ("vocab", "d_model", "n_heads", "n_layers", "context"):
        if int(m[key]) < 1:
            raise ValueError(f"invalid config value model.{key}={m[key]}: must be an integer >= 1")
    if m.d_model % m.n_heads:
        raise ValueError(f"invalid config value model.d_model={m.d_model}: must be a multiple of model.n_heads={m.n_heads}")
    if not 2 <= d.min_len <= d.max_len or 2 * d.max_len > m.context + 1:
        raise ValueError(f"invalid config value data.min_len={d.min_len}, data.max_len={d.max_len}: need "
                         f"2 <= min_len <= max_len and 2 * max_len <= model.context + 1 = {m.context + 1}")
    for key in ("n", "n_eval"):
        if int(d[key]) < 2:
            raise ValueError(f"invalid config value data.{key}={d[key]}: must be an integer >= 2")
    if not d.concentration > 0:
        raise ValueError(f"invalid config value data.concentration={d.concentration}: must be positive")
    for key in ("steps", "batch_size", "num_checkpoints", "first_checkpoint", "log_every"):
        if int(t[key]) < 1:
            raise ValueError(f"invalid config value training.{key}={t[key]}: must be an integer >= 1")
    if t.first_checkpoint > t.steps:
        raise ValueError(f"invalid config value training.first_checkpoint={t.first_checkpoint}: "
                         f"must be <= training.steps={t.steps}")
    if not t.lr > 0:
        raise ValueError(f"invalid config value training.lr={t.lr}: must be positive")
    if not 0 < cfg.score_threshold < 1:
        raise ValueError(f"invalid config value score_threshold={cfg.score_threshold}: must be in (0, 1)")
    if cfg.sampler.sampler == "sgnht":
        raise ValueError("invalid config value sampler.sampler=sgnht: weight-refined LLCs (restrict_to) need "
                         "sgld, rmsprop_sgld or sghmc")


def masked_labels(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``y`` with the positions outside ``keep`` set to ``-100`` (ignored by :func:`_induction.token_ce`)."""
    return torch.where(keep, y, torch.full_like(y, ind.IGNORE))


def head_restrictions(model: ind.AttnOnlyTransformer) -> dict[str, Any]:
    """``slt.restrict.heads(model)``: ``{"l{layer}h{head}": {param_name: index}}``, checked to hold
    exactly the heads of :func:`_induction.head_labels` (the labels of the scores), in that order."""
    from slt.restrict import heads

    found = heads(model)
    labels = ind.head_labels(model.n_layers, model.n_heads)
    if list(found) != labels:
        raise RuntimeError(f"slt.restrict.heads labels {list(found)} differ from the model's heads {labels}")
    return found


@torch.no_grad()
def _losses(model: torch.nn.Module, X: torch.Tensor, Y: torch.Tensor, Yi: torch.Tensor, Yo: torch.Tensor) -> tuple[float, float, float]:
    logits = model(X)
    return float(ind.token_ce(logits, Y)), float(ind.token_ce(logits, Yi)), float(ind.token_ce(logits, Yo))


def run(cfg: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    seed = int(cfg.seed)
    g_data, g_init, g_batch = (torch.Generator().manual_seed(seed * 1000 + i) for i in range(3))
    m, d, tc = cfg.model, cfg.data, cfg.training
    train = ind.make_induction_data(int(d.n), int(m.vocab), int(m.context), int(d.min_len), int(d.max_len),
                                    concentration=float(d.concentration), generator=g_data)
    ev = ind.make_induction_data(int(d.n_eval), int(m.vocab), int(m.context), int(d.min_len), int(d.max_len),
                                 generator=g_data, transitions=train["transitions"])
    X, Y = train["x"], train["y"]
    Xe, Ye = ev["x"], ev["y"]
    Ye_ind, Ye_oth = masked_labels(Ye, ev["induction"]), masked_labels(Ye, ~ev["induction"])
    model = ind.AttnOnlyTransformer(int(m.vocab), int(m.d_model), int(m.n_heads), int(m.n_layers), int(m.context),
                                    bool(m.layer_norm), generator=g_init)

    steps, bs = int(tc.steps), int(tc.batch_size)
    ckpts = set(checkpoint_steps(steps, int(tc.num_checkpoints), int(tc.first_checkpoint)))
    opt = torch.optim.Adam(model.parameters(), lr=float(tc.lr))
    curve: dict[str, list] = {"step": [], "loss": [], "loss_induction": [], "loss_other": []}
    ck: dict[str, list] = {"step": [], "loss": [], "loss_induction": [], "loss_other": [], "train_loss": []}
    states, ind_scores, prev_scores = [], [], []
    t0 = time.perf_counter()
    n = X.shape[0]
    for t in range(steps + 1):
        if t in ckpts or t % int(tc.log_every) == 0:
            model.eval()
            lo = _losses(model, Xe, Ye, Ye_ind, Ye_oth)
            if t % int(tc.log_every) == 0:
                for k, v in zip(("loss", "loss_induction", "loss_other"), lo):
                    curve[k].append(v)
                curve["step"].append(t)
            if t in ckpts:
                for k, v in zip(("loss", "loss_induction", "loss_other"), lo):
                    ck[k].append(v)
                ck["step"].append(t)
                with torch.no_grad():
                    ck["train_loss"].append(float(ind.token_ce(model(X), Y)))
                s = ind.head_scores(model, Xe, ev["induction"], ev["offset"])
                ind_scores.append(s["induction"].reshape(-1))
                prev_scores.append(s["previous"].reshape(-1))
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            model.train()
        if t == steps:
            break
        idx = torch.randint(0, n, (bs,), generator=g_batch)
        opt.zero_grad()
        ind.token_ce(model(X[idx]), Y[idx]).backward()
        opt.step()
    train_seconds = time.perf_counter() - t0
    model.eval()

    labels = ind.head_labels(int(m.n_layers), int(m.n_heads))
    S_ind = torch.stack(ind_scores, 1)  # (heads, K)
    S_prev = torch.stack(prev_scores, 1)
    classes = ind.classify_heads(S_ind[:, -1], S_prev[:, -1], float(cfg.score_threshold))

    # 4. weight-refined: every head x checkpoint x chain in one batched call
    kw = _runlib.llc_kwargs(cfg.sampler, seed=seed, device=cfg.device, progress=bool(cfg.progress))
    t1 = time.perf_counter()
    rres = slt.estimate_llc(model, (X, Y), ind.token_ce, state_dicts=states, restrict_to=head_restrictions(model), **kw)
    rllc_seconds = time.perf_counter() - t1

    # 5. data-refined: induction / other / all positions of the training sequences, all weights
    dres: dict[str, list] = {}
    dllc_seconds = 0.0
    if cfg.data_refined:
        sets = {"induction": (X, masked_labels(Y, train["induction"])),
                "other": (X, masked_labels(Y, ~train["induction"])),
                "all": (X, Y)}
        t2 = time.perf_counter()
        dres = slt.estimate_llc(model, sets, ind.token_ce, state_dicts=states, **kw)
        dllc_seconds = time.perf_counter() - t2

    first = rres[labels[0]][0]
    metrics: dict[str, Any] = {
        "ckpt_step": ck["step"],
        "ckpt_loss": ck["loss"],
        "ckpt_loss_induction": ck["loss_induction"],
        "ckpt_loss_other": ck["loss_other"],
        "ckpt_train_loss": ck["train_loss"],
        "heads": labels,
        "head_class": classes,
        "head_induction_score": S_ind.tolist(),
        "head_previous_score": S_prev.tolist(),
        "head_rllc_mean": [[r.llc_mean for r in rres[h]] for h in labels],
        "head_rllc_sem": [[r.llc_sem for r in rres[h]] for h in labels],
        "head_frac_below_init": [[float(r.diagnostics.get("frac_below_init", float("nan"))) for r in rres[h]]
                                 for h in labels],
        "data_sets": list(dres),
        "data_llc_mean": {k: [r.llc_mean for r in v] for k, v in dres.items()},
        "data_llc_sem": {k: [r.llc_sem for r in v] for k, v in dres.items()},
        "curve_step": curve["step"],
        "curve_loss": curve["loss"],
        "curve_loss_induction": curve["loss_induction"],
        "curve_loss_other": curve["loss_other"],
        "induction_fraction": float(train["induction"].float().mean()),
        "final_loss": ck["loss"][-1],
        "final_loss_induction": ck["loss_induction"][-1],
        "num_checkpoints": len(states),
        "num_params": sum(p.numel() for p in model.parameters()),
        "n_induction_heads": classes.count("induction"),
        "n_previous_token_heads": classes.count("previous-token"),
        "train_seconds": train_seconds,
        "rllc_seconds": rllc_seconds,
        "dllc_seconds": dllc_seconds,
        "nbeta": first.config.get("nbeta"),
        "localization": first.config.get("localization"),
        # draws per chain as run (more than sampler.num_draws when extend_draws continued unmixed chains)
        "rllc_num_draws": first.num_draws,
        "dllc_num_draws": next(iter(dres.values()))[0].num_draws if dres else None,
        "head_step_size": [[float(r.step_size) for r in rres[h]] for h in labels],
        "head_rhat": [[float(r.diagnostics.get("rhat", float("nan"))) for r in rres[h]] for h in labels],
        "data_rhat": {k: [float(r.diagnostics.get("rhat", float("nan"))) for r in v] for k, v in dres.items()},
        "head_mala_acceptance": [[float(r.diagnostics.get("mala_acceptance", float("nan"))) for r in rres[h]]
                                 for h in labels],
        "data_frac_below_init": {k: [float(r.diagnostics.get("frac_below_init", float("nan"))) for r in v]
                                 for k, v in dres.items()},
        "data_step_size": {k: [float(r.step_size) for r in v] for k, v in dres.items()},
        "chain_steps_per_second": float(first.diagnostics.get("chain_steps_per_second", float("nan"))),
        "device": first.config.get("device", cfg.device),
    }
    arrays: dict[str, Any] = {
        "head_llc_per_chain": torch.stack([torch.stack([torch.as_tensor(r.llc_per_chain) for r in rres[h]]) for h in labels]),
        "head_induction_score": S_ind,
        "head_previous_score": S_prev,
    }
    for k, v in dres.items():
        arrays.update(_runlib.result_arrays(v, prefix=f"data_{k}_", traces=False))
    top = max(range(len(labels)), key=lambda i: float(S_ind[i, -1]))
    print(f"[refined] seed={seed}: {len(states)} checkpoints, train {train_seconds:.1f} s, rLLC {rllc_seconds:.1f} s, "
          f"data-refined {dllc_seconds:.1f} s; held-out loss {ck['loss'][0]:.3f} -> {ck['loss'][-1]:.3f} "
          f"(induction positions {ck['loss_induction'][-1]:.3f}); heads {dict(zip(labels, classes))}; "
          f"top induction score {labels[top]} {float(S_ind[top, -1]):.2f}", flush=True)
    return metrics, arrays


@hydra.main(version_base="1.3", config_path=_runlib.CONF_DIR, config_name="refined")
def main(cfg: DictConfig) -> Any:
    return _runlib.hydra_task(run, _validate)(cfg)


if __name__ == "__main__":
    _runlib.main(main)
