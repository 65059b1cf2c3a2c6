r"""Exact references for the LLC: NUTS on the same posterior, SGLD-vs-NUTS reports, WBIC.

SGLD (:func:`slt.estimate_llc`) is biased by its step size and by minibatch
noise.  The references here sample the *same* target without those biases, so
the bias can be measured and a step size chosen.

:func:`nuts_llc`
    The No-U-Turn Sampler (Hoffman & Gelman 2014; Pyro's implementation, a
    Metropolis-corrected Hamiltonian sampler, hence asymptotically exact) on
    exactly the potential SGLD samples,

    .. math:: U(w) = n\beta\,L_n(w) + \tfrac{\gamma}{2}\lVert w - w^*\rVert^2 ,

    with the full-batch loss, the same :math:`n\beta` and :math:`\gamma`
    defaults (:func:`slt.default_nbeta`, :func:`slt.default_localization`),
    returning :math:`\hat\lambda = n\beta(\mathbb E[L_n(w)] - L_n(w^*))` as an
    :class:`slt.LLCResult`.
:func:`compare`
    SGLD at several step sizes and NUTS on one model: a table of
    :math:`\hat\lambda \pm` s.e. per method and a plot of :math:`\hat\lambda`
    against the step size with the NUTS band.
:func:`wbic`, :func:`multitemperature_llc`
    Watanabe's *global* estimators, from the unlocalized posterior with a
    fixed prior :math:`\varphi = N(\mu_0, s^2 I)`:
    :math:`p_\beta(w) \propto \varphi(w)\, e^{-n\beta L_n(w)}`.
    WBIC :math:`= \mathbb E_{\beta}[nL_n]` at :math:`\beta = 1/\log n`
    (Watanabe 2013, JMLR 14, 867-897), and the slope of
    :math:`\mathbb E_\beta[nL_n]` against :math:`1/\beta` over a few
    temperatures near :math:`1/\log n`, which estimates :math:`\lambda` because
    :math:`\mathbb E_\beta[nL_n] = nL_n(w_0) + \lambda/\beta + U_n\sqrt{\lambda/(2\beta)} + O_p(1)`
    (Watanabe 2013, Thm 4).

When which estimator applies
----------------------------
* The global estimators need the *whole* posterior to be sampled: every region
  of low loss, in proportion to its mass.  That is feasible only for small
  models (NUTS: see :data:`NUTS_MAX_PARAMS`), and their target is the global
  :math:`\lambda` of the true parameter set :math:`W_0`, which is what the theory
  of WBIC covers when the truth is realizable (or at least the optimal set is
  essentially unique) and the prior is positive on :math:`W_0`.
* The local estimator (:func:`slt.estimate_llc`, :func:`nuts_llc`) measures the
  geometry around one trained point :math:`w^*` (a critical point that need not
  be global, e.g. the TMS 5-gon).  Use it for networks of realistic size,
  for non-realizable settings, and whenever chains cannot mix between the
  minima.  At a global minimum of a realizable model whose minima are related
  by exact symmetries, both give the same :math:`\lambda`.
* The multi-temperature slope carries, besides its Monte-Carlo error, the
  data-dependent term :math:`U_n\sqrt{\lambda/(2\beta)}` whose slope in
  :math:`1/\beta` is :math:`O(\sqrt{\lambda/\log n})`; in regular models it is
  absent (the slope is :math:`d/2` up to :math:`O(1/(n s^2 h))` prior terms).

Cost of NUTS
------------
Every NUTS draw takes :math:`2^{\text{depth}}` full-batch gradients, each a pass
over all n samples, plus Pyro's Python overhead (≈ 0.5 ms per leapfrog step on
the 2-core development CPU); chains run one after another.  The depth is set by
the posterior's geometry more than by d.  Measured (float64, 2-core CPU,
``python -m experiments.compare_nuts --job scaling`` and the comparison jobs):

=========================================  =====  ======  ============  ==========
posterior                                  d      n       grads/draw    ms/grad
=========================================  =====  ======  ============  ==========
tanh MLP 4-2-1, trained, γ = 1             13     1000    14            1.9
tanh MLP 4-16-1, trained, γ = 1            97     1000    1023 (max)    0.5
TMS 5-gon, γ = 10                          18     20000   ≈ 20          3-5
normal crossing w₁w₂², γ = 1               2      10000   ≈ 10-30       0.3
reduced-rank regression, global, s = 1     12     5000    500-700       0.2
=========================================  =====  ======  ============  ==========

So the default call (4 chains × 1500 iterations) takes minutes on the toy
models and about an hour once trees hit ``max_tree_depth`` (an over-
parametrized network's flat, curved directions), which is where NUTS stops being
practical; above :data:`NUTS_MAX_PARAMS` = 1000 parameters :func:`nuts_llc`
refuses to run unless ``force=True``, and a warning is raised whenever more
than 5% of draws hit ``max_tree_depth``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import check_int, check_real
from ._runtime import intra_op_threads, small_work_threads, versions, autograd_allowed, user_stacklevel
from .data import as_source
from .defaults import default_localization, default_nbeta
from .loop import show_progress
from .params import ParamSpec
from .result import LLCResult
from .target import Target, prepare_target, require_one_dataset

__all__ = [
    "NUTS_MAX_PARAMS",
    "nuts_llc",
    "compare",
    "ComparisonResult",
    "wbic",
    "WBICResult",
    "multitemperature_llc",
    "TemperatureRegression",
]

#: Above this many sampled parameters :func:`nuts_llc` raises unless ``force=True``
#: (measured: see the module docstring; a d = 97 network already needs ~1000
#: gradients per draw).
NUTS_MAX_PARAMS = 1000
#: A dense mass matrix is adapted up to this many parameters (``full_mass=None``).
DENSE_MASS_MAX_PARAMS = 100

Observable = Callable[[Mapping[str, Tensor]], Tensor]


@dataclass(frozen=True)
class _Full:
    """One checkpoint for the full-batch references: the shared :class:`slt.target.Target`
    (a DataLoader stacked into tensors), ``w*`` as ``(d,)``, and :math:`L_n(w^*)` by the same
    full-data loss the draws are scored with (:meth:`Target.losses`), so the control variate
    is exact."""

    target: Target
    w_star: Tensor
    init_loss: float


def _full_target(model: Any, data: Any, loss_fn: Any, dtype: torch.dtype, device: Any, caller: str,
                 nbeta: Any = None, localization: float | None = None) -> _Full:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = prepare_target(model, data, loss_fn, dtype=dtype, device=device, full_data=True, nbeta=nbeta,
                            localization=localization, caller=caller)
    require_one_dataset(target, caller)  # (NUTS would sample the union of the distributions)
    init = float(target.losses(target.w_star)[0])
    if not math.isfinite(init):
        raise ValueError("the loss at w* is NaN or inf; check the model and data")
    return _Full(target, target.w_star[0], init)


def _threads(full: _Full) -> int | None:
    """One CPU thread when a full-batch gradient is tiny (n × d < 2·10⁶)."""
    return small_work_threads(full.target.n * full.target.d, full.target.device)


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Pyro draws from torch's global RNG: seed it inside a fork and restore all
    global RNG states afterwards (the library never changes global RNG state)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda = device is not None and device.type == "cuda"
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # seeds the CPU and (inside the fork) the CUDA generators
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _chain_seeds(seed: int, num_chains: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed))
    return [int(v) for v in torch.randint(0, 2**62, (num_chains,), generator=g)]


# ----------------------------------------------------------------------------
# NUTS
# ----------------------------------------------------------------------------
def _run_nuts(
    full: _Full,
    *,
    nbeta: float,
    gamma: float,
    center: Tensor,
    num_chains: int,
    num_draws: int,
    num_warmup: int,
    seed: int,
    max_tree_depth: int,
    target_accept_prob: float,
    full_mass: bool,
    progress: bool | None,
) -> dict[str, Any]:
    """C sequential NUTS chains on U(w) = nβ L_n(w) + γ/2 ‖w − center‖², started at w*.

    Returns draws (C, T, d), per-draw gradient counts (C, T), Pyro diagnostics.
    """
    from pyro.infer.mcmc import MCMC, NUTS

    counter = {"evals": 0}

    def potential(params: Mapping[str, Tensor]) -> Tensor:
        w = params["w"]
        counter["evals"] += 1
        U = nbeta * full.target.loss(w)
        if gamma > 0:
            U = U + 0.5 * gamma * (w - center).square().sum()
        return U

    from tqdm.auto import tqdm

    # one bar over all chains (they run one after another), updated every iteration (redrawn at most
    # every 0.5 s): iterations/s and ETA of the whole call, the chain and stage, and the last
    # iteration's cost in gradients (2^depth) -- NUTS's cost follows the posterior's geometry
    show = show_progress(progress, num_chains * (num_draws + num_warmup), threshold=1)
    bar = tqdm(total=num_chains * (num_draws + num_warmup), disable=not show, desc="NUTS", unit="it",
               leave=False, mininterval=0.5)
    draws, evals, pyro_diag, step_sizes, warm_secs, secs = [], [], [], [], [], []
    for c, s in enumerate(_chain_seeds(seed, num_chains)):
        per_step: list[int] = []
        mark: dict[str, Any] = {"evals": counter["evals"], "t_warm": None, "t_post": 0.0}  # counter spans chains
        t0 = time.perf_counter()

        def hook(kernel, params, stage, i, per_step=per_step, mark=mark, t0=t0, c=c):
            sampling = stage.startswith("Sample")
            if sampling:
                if mark["t_warm"] is None:
                    mark["t_warm"] = time.perf_counter() - t0
                per_step.append(counter["evals"] - mark["evals"])
                mark["accept"] = float(getattr(kernel, "_mean_accept_prob", float("nan")))  # reset by cleanup()
            if show:
                bar.update(1)
                now = time.perf_counter()
                if now - mark["t_post"] >= 1.0:
                    mark["t_post"] = now
                    post = {"chain": f"{c + 1}/{num_chains}", "stage": "sample" if sampling else "warmup",
                            "grads_per_it": counter["evals"] - mark["evals"]}
                    if sampling and mark["t_warm"] is not None and len(per_step) > 0:
                        post["draws_per_s"] = f"{len(per_step) / max(now - t0 - mark['t_warm'], 1e-9):.3g}"
                    bar.set_postfix(post, refresh=False)
            mark["evals"] = counter["evals"]

        with _seeded_global_rng(s, full.target.device):
            kernel = NUTS(
                potential_fn=potential, adapt_step_size=True, adapt_mass_matrix=True,
                full_mass=full_mass, target_accept_prob=target_accept_prob, max_tree_depth=max_tree_depth,
            )
            mcmc = MCMC(
                kernel, num_samples=num_draws, warmup_steps=num_warmup,
                initial_params={"w": full.w_star.clone()}, hook_fn=hook,
                disable_progbar=True,  # our bar above spans all chains
            )
            mcmc.run()
        secs.append(time.perf_counter() - t0)
        warm_secs.append(mark["t_warm"] or 0.0)
        w = mcmc.get_samples()["w"].reshape(num_draws, full.target.d)
        draws.append(w)
        evals.append(per_step)
        diag = mcmc.diagnostics()
        pyro_diag.append({
            "divergences": len(diag.get("divergences", {}).get("chain 0", [])),
            "acceptance_rate": float(diag.get("acceptance rate", {}).get("chain 0", float("nan"))),
            "mean_accept_prob": float(mark.get("accept", float("nan"))),
        })
        step_sizes.append(float(kernel.step_size))
    bar.close()
    return {
        "draws": torch.stack(draws),  # (C, T, d)
        "grad_evals": torch.tensor(evals, dtype=torch.float64),  # (C, T)
        "pyro": pyro_diag,
        "step_sizes": step_sizes,
        "seconds": secs,
        "warmup_seconds": warm_secs,
    }


def _nuts_result(
    full: _Full,
    run: Mapping[str, Any],
    *,
    nbeta: float,
    gamma: float,
    observables: Mapping[str, Observable] | None,
    config: dict[str, Any],
    max_tree_depth: int,
    caller: str = "slt.reference.nuts_llc",
    global_posterior: bool = False,
) -> LLCResult:
    """The :class:`LLCResult` of a NUTS run; its warnings raised as ``caller``'s (``global_posterior``: the
    global estimators', without the note on draws below L(w*), which says nothing about a global posterior)."""
    target = full.target
    draws = run["draws"]  # (C, T, d)
    C, T, d = draws.shape
    loss_tr = target.losses(draws.reshape(C * T, d)).reshape(C, T).cpu()
    evals = run["grad_evals"]
    depth = torch.log2(evals.clamp_min(1)).ceil()
    divs = [p["divergences"] for p in run["pyro"]]
    warn_list = []
    if sum(divs):
        warn_list.append(f"{sum(divs)} divergent NUTS transitions after warmup (per chain {divs}): "
                         "the posterior has regions NUTS cannot integrate; raise target_accept_prob")
    hit = float((evals >= 2**max_tree_depth - 1).double().mean())  # (a tree of depth D: 2^D − 1 leapfrog steps)
    if hit > 0.05:
        warn_list.append(f"{hit:.0%} of draws hit max_tree_depth={max_tree_depth}: the posterior is "
                         "badly scaled; raise max_tree_depth or the localization")
    diag = {
        "acceptance_rate": float(np.mean([p["acceptance_rate"] for p in run["pyro"]])),
        "acceptance_rate_per_chain": [p["acceptance_rate"] for p in run["pyro"]],
        "mean_accept_prob": float(np.mean([p["mean_accept_prob"] for p in run["pyro"]])),
        "mean_accept_prob_per_chain": [p["mean_accept_prob"] for p in run["pyro"]],
        "divergences": int(sum(divs)), "divergences_per_chain": divs,
        "step_size_per_chain": list(run["step_sizes"]),
        "tree_depth_mean": float(depth.mean()), "tree_depth_max": int(depth.max()),
        "frac_max_tree_depth": hit,
        "grad_evals_per_draw": float(evals.mean()),
        "path": target.path, "path_reason": "full-batch loss through slt.evaluator.ChainEvaluator",
        "seconds": float(sum(run["seconds"])), "warmup_seconds": float(sum(run["warmup_seconds"])),
        "seconds_per_chain": list(run["seconds"]),
    }
    obs: dict[str, Tensor] = {}
    if observables:
        with torch.no_grad():
            for name, f in observables.items():
                vals = f(target.spec.unflatten(draws.reshape(C * T, d).to(target.dtype)))
                obs[name] = vals.detach().reshape(C, T, *vals.shape[1:]).cpu()
    res = LLCResult.from_traces(
        loss_tr, torch.full_like(loss_tr, full.init_loss), nbeta=nbeta, init_loss=full.init_loss,
        step_size=float(np.mean(run["step_sizes"])), localization=gamma, sampler="nuts", observables=obs,
        rhat_threshold=1.05, diagnostics=diag, warnings=warn_list, config=config,
    )
    e = res.diagnostics["ess"]
    res.diagnostics["sem_ess"] = float(res.llc_trace.double().std() / math.sqrt(e)) if e == e and e > 0 else float("nan")
    for w in res.diagnostics["warnings"]:
        if global_posterior and "below L(w*)" in w:
            continue  # (a global posterior's draws fall below the loss at an untrained w*: nothing to say)
        warnings.warn(f"{caller}: {w}", RuntimeWarning, stacklevel=user_stacklevel())
    return res


def _check_nuts_args(num_chains, num_draws, num_warmup, max_tree_depth, target_accept_prob, seed):
    check_int("num_chains", num_chains, 1)
    check_int("num_draws", num_draws, 4)
    if num_warmup is None:
        num_warmup = max(100, num_draws // 2)
    check_int("num_warmup", num_warmup, 0)
    check_int("max_tree_depth", max_tree_depth, 1)
    if not isinstance(target_accept_prob, float) or not 0.0 < target_accept_prob < 1.0:
        raise ValueError(f"target_accept_prob must be a float in (0, 1), got {target_accept_prob!r}")
    seed = check_int("seed", seed)
    return num_warmup


def _size_check(d: int, force: bool) -> None:
    if d > NUTS_MAX_PARAMS and not force:
        raise ValueError(
            f"the model has d = {d} sampled parameters, above NUTS_MAX_PARAMS = {NUTS_MAX_PARAMS}: "
            "full-batch NUTS is impractical at this size (hours per chain; see slt.reference). "
            "Use slt.estimate_llc, or pass force=True"
        )


@autograd_allowed
def nuts_llc(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    nbeta: float | None = None,
    localization: float | None = None,
    num_chains: int = 4,
    num_draws: int = 1000,
    num_warmup: int | None = None,
    seed: int = 0,
    max_tree_depth: int = 10,
    target_accept_prob: float = 0.8,
    full_mass: bool | None = None,
    observables: Mapping[str, Observable] | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = "cpu",
    force: bool = False,
    progress: bool | None = None,
) -> LLCResult:
    r"""LLC by NUTS on exactly the localized tempered posterior SGLD samples.

    Samples :math:`p(w) \propto \exp(-U(w))`,
    :math:`U(w) = n\beta\,L_n(w) + \tfrac{\gamma}{2}\lVert w - w^*\rVert^2` with the
    full-batch loss :math:`L_n`, by Pyro's NUTS (Hoffman & Gelman 2014, JMLR 15;
    dual-averaging step size and windowed mass-matrix adaptation during warmup),
    and returns :math:`\hat\lambda = n\beta(\mathbb E[L_n(w)] - L_n(w^*))`
    (Lau et al. 2023, arXiv 2308.12108).  NUTS is Metropolis-corrected, so it has
    no step-size bias: it is the reference SGLD's bias is measured against.

    Parameters
    ----------
    model, data, loss_fn
        As for :func:`slt.estimate_llc` (any model and data form it accepts; a
        DataLoader is stacked into tensors once, since NUTS needs full batches).
    nbeta, localization
        nβ and γ; defaults :func:`slt.default_nbeta` (n / log n) and
        :func:`slt.default_localization` (γ = 1).  Unlike :func:`slt.estimate_llc`, γ is never raised
        automatically: to check an SGLD result, pass its ``localization=result.localization`` (a ReLU MLP
        2-16-1 whose SGLD run escalated to γ = 10 read 2.88 there; NUTS at its default γ = 1 read 5.27, and
        2.88 at γ = 10).
    num_chains, num_draws, num_warmup
        Chains (run one after another, each from ``w*``), kept draws per chain
        and warmup (adaptation) iterations, default ``max(100, num_draws // 2)``.
    seed
        Chain ``c`` runs Pyro with torch's global RNG seeded from ``(seed, c)``
        inside :func:`torch.random.fork_rng`; the caller's global RNG states
        (torch, NumPy, ``random``) are restored afterwards.
    max_tree_depth, target_accept_prob
        NUTS settings (Pyro defaults 10 and 0.8).
    full_mass
        Adapt a dense mass matrix (default: when d ≤ 100), else diagonal.
    observables
        ``name -> f(params)`` evaluated at the draws (``params``: ``name ->
        (C*T, *shape)``), returned as ``(C, T, ...)``.
    dtype, device
        Default float64 (NUTS's energy error is sensitive to rounding), "cpu".
    force
        Run even above :data:`NUTS_MAX_PARAMS` parameters.
    progress
        A progress bar over all chains (iterations/s, ETA, chain, warmup or sampling, gradients
        of the last iteration, draws/s), updated every iteration; ``None`` (default): on a terminal.

    Returns
    -------
    LLCResult
        ``sampler="nuts"``; ``step_size`` is the mean adapted leapfrog step;
        ``loss_trace`` ``(C, T)`` is :math:`L_n` at the draws and
        ``loss_star_trace`` the constant :math:`L_n(w^*)`.  ``diagnostics`` hold
        R-hat, ESS, ``sem_ess``, Pyro's ``divergences``, ``acceptance_rate``
        (fraction of draws that moved) and ``mean_accept_prob`` (the statistic
        the step-size adaptation targets; per chain too), adapted ``step_size_per_chain``, ``tree_depth_mean`` /
        ``tree_depth_max`` (from the gradient evaluations per draw),
        ``frac_max_tree_depth`` and timings.  ``mala_acceptance`` is NaN.

    Raises
    ------
    ValueError
        Bad arguments or data (before any sampling), or more than
        :data:`NUTS_MAX_PARAMS` parameters without ``force=True``.
    """
    num_warmup = _check_nuts_args(num_chains, num_draws, num_warmup, max_tree_depth, target_accept_prob, seed)
    if nbeta is not None:
        check_real("nbeta", nbeta, positive=True)
    if localization is not None:
        check_real("localization", localization, nonnegative=True)
    if isinstance(model, (list, tuple)):
        raise TypeError("nuts_llc takes one model (checkpoint) at a time")
    spec_d = ParamSpec(model).d if isinstance(model, nn.Module) else 0
    _size_check(spec_d, force)
    full = _full_target(model, data, loss_fn, dtype, device, "slt.nuts_llc", nbeta, localization)
    target = full.target
    nb, gamma = target.nbeta, target.localization
    if full_mass is None:
        full_mass = target.d <= DENSE_MASS_MAX_PARAMS
    with intra_op_threads(_threads(full)):
        run = _run_nuts(
            full, nbeta=nb, gamma=gamma, center=full.w_star, num_chains=num_chains, num_draws=num_draws,
            num_warmup=num_warmup, seed=seed, max_tree_depth=max_tree_depth,
            target_accept_prob=target_accept_prob, full_mass=bool(full_mass), progress=progress,
        )
        config = {
            "num_chains": num_chains, "num_draws": num_draws, "num_warmup": num_warmup, "seed": seed,
            "nbeta": nb, "localization": gamma, "n": target.n, "sampler": "nuts",
            "max_tree_depth": max_tree_depth, "target_accept_prob": target_accept_prob,
            "full_mass": bool(full_mass), "dtype": str(dtype).replace("torch.", ""),
            "device": str(target.device), "path": target.path, "num_params": target.d,
            "batch_size": None, "versions": versions("pyro"),
        }
        return _nuts_result(full, run, nbeta=nb, gamma=gamma, observables=observables, config=config,
                            max_tree_depth=max_tree_depth)


# ----------------------------------------------------------------------------
# SGLD vs NUTS
# ----------------------------------------------------------------------------
@dataclass
class ComparisonResult:
    """SGLD at several step sizes against NUTS on the same posterior.

    Attributes
    ----------
    frame
        pandas DataFrame, one row per run: ``method`` ("sgld"/"nuts"),
        ``step_size``, ``llc_mean``, ``llc_sem``, ``diff`` (SGLD − NUTS),
        ``z`` (diff / combined s.e.), ``acceptance`` (MALA for SGLD; for NUTS
        the mean Metropolis acceptance statistic of the trajectories, which the
        step-size adaptation targets), ``rhat``, ``ess``, ``seconds``.
    sgld
        The :class:`slt.LLCResult` of each step size (ascending).
    nuts
        The NUTS result, or ``None``.
    reference
        An optional known value (e.g. a closed-form λ) shown in the table and plot.
    """

    frame: Any
    sgld: list[LLCResult]
    nuts: LLCResult | None
    reference: float | None = None
    title: str = ""

    @property
    def best_step_size(self) -> float | None:
        """The largest ε such that SGLD at it and at every smaller ε agrees with NUTS
        within 2 combined standard errors (``None`` without NUTS or if none does)."""
        if self.nuts is None:
            return None
        df = self.frame[self.frame["method"] == "sgld"].sort_values("step_size")
        best = None
        for _, row in df.iterrows():
            if abs(row["z"]) <= 2.0:
                best = float(row["step_size"])
            else:
                break
        return best

    def __str__(self) -> str:
        head = f"{'method':<6} {'step size':>10} {'λ̂':>9} {'± s.e.':>8} {'− NUTS':>8} {'z':>6} " \
               f"{'accept':>7} {'R-hat':>6} {'ESS':>6} {'sec':>6}"
        lines = [self.title] if self.title else []
        lines += [head, "-" * len(head)]

        def f(v: Any, spec: str) -> str:
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

        for _, r in self.frame.iterrows():
            lines.append(
                f"{r['method']:<6} {f(r['step_size'], '10.2e')} {f(r['llc_mean'], '9.3f')} "
                f"{f(r['llc_sem'], '8.3f')} {f(r['diff'], '+8.3f')} {f(r['z'], '+6.1f')} "
                f"{f(r['acceptance'], '7.2f')} {f(r['rhat'], '6.3f')} {f(r['ess'], '6.0f')} {f(r['seconds'], '6.1f')}"
            )
        if self.reference is not None:
            lines.append(f"reference λ = {self.reference:g}")
        if self.nuts is not None:
            b = self.best_step_size
            lines.append("largest step size agreeing with NUTS (|z| ≤ 2 there and below): "
                         + ("none" if b is None else f"{b:.2e}"))
        return "\n".join(lines)

    __repr__ = __str__

    def plot(self, ax: Any = None):
        """λ̂ ± s.e. against the SGLD step size (log axis), the NUTS estimate as a
        band (± 2 s.e.), and ``reference`` dashed.  Returns the Figure."""
        from .plotting import _plt

        plt = _plt()
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 4))
        else:
            fig = ax.figure
        df = self.frame[self.frame["method"] == "sgld"].sort_values("step_size")
        ax.errorbar(df["step_size"], df["llc_mean"], yerr=df["llc_sem"], marker="o", ms=4, capsize=2,
                    label="SGLD (± s.e.)")
        if self.nuts is not None:
            m, s = self.nuts.llc_mean, self.nuts.llc_sem
            ax.axhline(m, color="C1", lw=1.2, label=f"NUTS {m:.3g} ± {s:.2g} (band ± 2 s.e.)")
            ax.axhspan(m - 2 * s, m + 2 * s, color="C1", alpha=0.25)
        if self.reference is not None:
            ax.axhline(self.reference, color="k", ls="--", lw=1, label=f"reference λ = {self.reference:g}")
        ax.set_xscale("log")
        ax.set_xlabel("SGLD step size ε")
        ax.set_ylabel(r"$\hat\lambda$")
        ax.set_title(self.title or "SGLD vs NUTS")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


@autograd_allowed
def compare(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    step_sizes: Sequence[float],
    nuts: bool = True,
    nbeta: float | None = None,
    localization: float | None = None,
    num_chains: int = 8,
    num_draws: int = 2000,
    seed: int = 0,
    nuts_chains: int = 4,
    nuts_draws: int = 1000,
    nuts_kwargs: Mapping[str, Any] | None = None,
    reference: float | None = None,
    title: str = "",
    verbose: bool = False,
    progress: bool | None = None,
    **sgld_kwargs: Any,
) -> ComparisonResult:
    r"""SGLD at each step size and NUTS on the same localized posterior.

    Every SGLD run is :func:`slt.estimate_llc` with ``step_size=ε`` and the same
    nβ, γ and seed; the NUTS run is :func:`nuts_llc`.  SGLD's discretisation
    bias is about :math:`\epsilon\kappa/4` per direction of curvature κ (and
    minibatch noise adds about :math:`\epsilon n\beta^2 s/4`), so
    :math:`\hat\lambda_{SGLD}(\epsilon) - \hat\lambda_{NUTS}` should shrink
    roughly linearly in ε; :attr:`ComparisonResult.best_step_size` is the
    largest ε that agrees within 2 s.e.

    Parameters
    ----------
    model, data, loss_fn
        As for :func:`slt.estimate_llc`.
    step_sizes
        SGLD step sizes (positive; run in ascending order).
    nuts
        Also run NUTS (default).
    nbeta, localization
        Shared by all runs (defaults as :func:`slt.estimate_llc`).
    num_chains, num_draws, seed
        For each SGLD run (burn-in as :func:`slt.estimate_llc` chooses unless ``num_burnin`` is
        given in ``sgld_kwargs``).
    nuts_chains, nuts_draws, nuts_kwargs
        For the NUTS run (``nuts_kwargs`` go to :func:`nuts_llc`).
    reference
        A known λ to show (e.g. :func:`slt.theory.tms_llc`).
    title
        Printed above the table and used as the plot title.
    verbose
        Print each row as it finishes.
    progress
        Progress bars of the NUTS run and of each SGLD run (``None``, default: on a terminal).
    **sgld_kwargs
        Passed to :func:`slt.estimate_llc` (e.g. ``batch_size=None``, ``dtype``).

    Returns
    -------
    ComparisonResult
        ``print(result)`` gives the table; ``result.plot()`` the figure.
    """
    import pandas as pd

    from .engine import estimate_llc

    try:
        eps_list = sorted(check_real("step_sizes[i]", e, positive=True) for e in step_sizes)
    except TypeError as e:
        raise ValueError(f"step_sizes must be a sequence of positive numbers, got {step_sizes!r}") from e
    if not eps_list and not nuts:
        raise ValueError("nothing to compare: step_sizes is empty and nuts=False")
    for k in ("step_size", "nbeta", "localization", "num_chains", "num_draws", "seed"):
        if k in sgld_kwargs:
            raise TypeError(f"compare() sets {k!r} itself; pass it as compare's own argument")
    check_int("num_chains", num_chains, 1)
    check_int("num_draws", num_draws, 1)
    check_int("nuts_chains", nuts_chains, 1)
    check_int("nuts_draws", nuts_draws, 4)
    if nbeta is not None:
        check_real("nbeta", nbeta, positive=True)
    if localization is not None:
        check_real("localization", localization, nonnegative=True)
    source = as_source(data)
    n = source.n if source.n is not None or nbeta is not None else source.count()
    nb = float(nbeta) if nbeta is not None else default_nbeta(int(n))
    gamma = float(localization) if localization is not None else default_localization()

    rows, sgld = [], []
    ref = None
    if nuts:
        ref = nuts_llc(model, data, loss_fn, nbeta=nb, localization=gamma, num_chains=nuts_chains,
                       num_draws=nuts_draws, seed=seed, **{"progress": progress, **dict(nuts_kwargs or {})})
        if verbose:
            print(f"NUTS: λ̂ = {ref.llc_mean:.4g} ± {ref.llc_sem:.2g}", flush=True)
    for eps in eps_list:
        r = estimate_llc(model, data, loss_fn, step_size=eps, nbeta=nb, localization=gamma,
                         num_chains=num_chains, num_draws=num_draws, seed=seed,
                         **{"progress": progress, **sgld_kwargs})
        sgld.append(r)
        if verbose:
            print(f"SGLD ε = {eps:.2e}: λ̂ = {r.llc_mean:.4g} ± {r.llc_sem:.2g}", flush=True)
    for eps, r in zip(eps_list, sgld):
        diff = z = float("nan")
        if ref is not None:
            diff = r.llc_mean - ref.llc_mean
            z = diff / math.hypot(r.llc_sem, ref.llc_sem)
        d = r.diagnostics
        rows.append({"method": "sgld", "step_size": eps, "llc_mean": r.llc_mean, "llc_sem": r.llc_sem,
                     "diff": diff, "z": z, "acceptance": d.get("mala_acceptance", float("nan")),
                     "rhat": d.get("rhat", float("nan")), "ess": d.get("ess", float("nan")),
                     "seconds": d.get("seconds", float("nan")) + d.get("setup_seconds", 0.0),
                     "divergent_chains": len(r.divergent_chains)})
    if ref is not None:
        d = ref.diagnostics
        rows.append({"method": "nuts", "step_size": ref.step_size, "llc_mean": ref.llc_mean,
                     "llc_sem": ref.llc_sem, "diff": 0.0, "z": 0.0, "acceptance": d["mean_accept_prob"],
                     "rhat": d["rhat"], "ess": d["ess"], "seconds": d["seconds"],
                     "divergent_chains": d["divergences"]})
    return ComparisonResult(pd.DataFrame(rows), sgld, ref, reference, title)


# ----------------------------------------------------------------------------
# Watanabe's global estimators
# ----------------------------------------------------------------------------
def _prior_center(full: _Full, prior_mean: Any) -> Tensor:
    target, w_star = full.target, full.w_star
    if isinstance(prior_mean, str):
        if prior_mean != "w_star":
            raise ValueError(f"prior_mean must be a number, a (d,) tensor or 'w_star', got {prior_mean!r}")
        return w_star.clone()
    if isinstance(prior_mean, (int, float)) and not isinstance(prior_mean, bool):
        if not math.isfinite(prior_mean):
            raise ValueError(f"prior_mean must be finite, got {prior_mean}")
        return torch.full_like(w_star, float(prior_mean))
    if isinstance(prior_mean, Tensor):
        if prior_mean.shape != (target.d,):
            raise ValueError(f"prior_mean must have shape ({target.d},) (the flat parameters), "
                             f"got {tuple(prior_mean.shape)}")
        if not torch.isfinite(prior_mean).all():
            raise ValueError("prior_mean contains NaN or inf")
        return prior_mean.to(device=target.device, dtype=target.dtype)
    raise TypeError(f"prior_mean must be a number, a tensor or 'w_star', got {type(prior_mean).__name__}")


@dataclass
class TemperatureRegression:
    r"""Multi-temperature estimate of λ: the slope of :math:`\mathbb E_\beta[nL_n]` in :math:`1/\beta`.

    Attributes
    ----------
    betas
        ``(K,)`` inverse temperatures β (not nβ).
    expected_nl, expected_nl_sem
        ``(K,)`` :math:`\mathbb E_\beta[nL_n]` and its Monte-Carlo error.
    llc, llc_sem
        Weighted-least-squares slope (weights 1/s.e.²) and its standard error
        :math:`(\sum_k w_k (x_k - \bar x_w)^2)^{-1/2}`, inflated by
        :math:`\sqrt{\chi^2/\mathrm{dof}}` when the fit is worse than its errors.
    intercept
        The fitted :math:`nL_n(w_0)` (+ O(1) terms).
    chi2, dof
        Goodness of fit of the straight line.
    wbic, wbic_sem
        :math:`\mathbb E_\beta[nL_n]` at :math:`\beta = 1/\log n` when that
        temperature is on the grid, else NaN.
    results
        The per-temperature :class:`slt.LLCResult` (global posterior; their
        ``llc_mean`` is :math:`n\beta(\mathbb E_\beta L_n - L_n(w^*))`).
    """

    n: int
    betas: Tensor
    expected_nl: Tensor
    expected_nl_sem: Tensor
    llc: float
    llc_sem: float
    llc_sem_mc: float
    intercept: float
    chi2: float
    dof: int
    wbic: float
    wbic_sem: float
    prior_std: float | None
    results: list[LLCResult] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"multi-temperature λ = {self.llc:.4g} ± {self.llc_sem:.2g} (slope of E_β[nL_n] in 1/β; "
                 f"MC-only s.e. {self.llc_sem_mc:.2g}, χ²/dof = {self.chi2:.2f}/{self.dof}), n = {self.n}",
                 f"  {'β·log n':>8} {'1/β':>9} {'E_β[nL_n]':>14} {'± s.e.':>9} {'R-hat':>6}"]
        logn = math.log(self.n)
        for b, e, s, r in zip(self.betas.tolist(), self.expected_nl.tolist(), self.expected_nl_sem.tolist(),
                              self.results):
            lines.append(f"  {b * logn:8.3f} {1 / b:9.3f} {e:14.4f} {s:9.4f} {r.diagnostics.get('rhat', float('nan')):6.3f}")
        if self.wbic == self.wbic:
            lines.append(f"  WBIC (β = 1/log n) = {self.wbic:.4f} ± {self.wbic_sem:.2g}")
        return "\n".join(lines)

    __repr__ = __str__

    def plot(self, ax: Any = None):
        """E_β[nL_n] ± s.e. against 1/β with the fitted line.  Returns the Figure."""
        from .plotting import _plt

        plt = _plt()
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 4))
        else:
            fig = ax.figure
        x = (1.0 / self.betas).numpy()
        ax.errorbar(x, self.expected_nl.numpy(), yerr=self.expected_nl_sem.numpy(), fmt="o", capsize=2,
                    label=r"$E_\beta[nL_n]$ (NUTS)")
        xs = np.linspace(x.min(), x.max(), 50)
        ax.plot(xs, self.intercept + self.llc * xs, "-",
                label=f"slope λ = {self.llc:.3g} ± {self.llc_sem:.2g}")
        ax.set_xlabel(r"$1/\beta$")
        ax.set_ylabel(r"$E_\beta[n L_n(w)]$")
        ax.set_title("multi-temperature regression (Watanabe 2013)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def _wls(x: np.ndarray, y: np.ndarray, s: np.ndarray) -> tuple[float, float, float, float, int]:
    """Weighted least squares y ≈ a + b x with weights 1/s²: (b, se_b, a, χ², dof)."""
    w = 1.0 / np.maximum(s, 1e-300) ** 2
    xm = float((w * x).sum() / w.sum())
    ym = float((w * y).sum() / w.sum())
    sxx = float((w * (x - xm) ** 2).sum())
    b = float((w * (x - xm) * (y - ym)).sum() / sxx)
    a = ym - b * xm
    chi2 = float((w * (y - a - b * x) ** 2).sum())
    return b, 1.0 / math.sqrt(sxx), a, chi2, len(x) - 2


def _global_runs(
    model, data, loss_fn, *, betas_rel: Sequence[float], prior_std: float | None, prior_mean: Any,
    num_chains: int, num_draws: int, num_warmup: int | None, seed: int, dtype: torch.dtype, device: Any,
    force: bool, max_tree_depth: int, target_accept_prob: float, full_mass: bool | None, progress: bool | None,
    sampler: str = "nuts", sgld_kwargs: Mapping[str, Any] | None = None, caller: str = "slt.reference",
) -> tuple[_Full, list[float], list[LLCResult]]:
    num_warmup = _check_nuts_args(num_chains, num_draws, num_warmup, max_tree_depth, target_accept_prob, seed)
    if sampler not in ("nuts", "sgld"):
        raise ValueError(f"sampler must be 'nuts' or 'sgld', got {sampler!r}")
    if sampler == "sgld" and not (isinstance(prior_mean, str) and prior_mean == "w_star"):
        raise ValueError("sampler='sgld' runs slt.estimate_llc, whose Gaussian is centred at w*: "
                         "pass prior_mean='w_star'")
    if sampler == "nuts" and sgld_kwargs:
        raise ValueError("sgld_kwargs are only used with sampler='sgld'")
    gamma = 0.0
    if prior_std is not None:
        gamma = 1.0 / check_real("prior_std", prior_std, positive=True) ** 2
    if isinstance(model, (list, tuple)):
        raise TypeError("the global estimators take one model at a time")
    if sampler == "nuts":
        _size_check(ParamSpec(model).d if isinstance(model, nn.Module) else 0, force)
    full = _full_target(model, data, loss_fn, dtype, device, "slt.reference", nbeta=lambda n: float(n))
    target = full.target
    if target.n < 3:
        raise ValueError(f"need n >= 3 samples (β = 1/log n), got n = {target.n}")
    center = _prior_center(full, prior_mean)
    if full_mass is None:
        full_mass = target.d <= DENSE_MASS_MAX_PARAMS
    logn = math.log(target.n)
    betas = [b / logn for b in betas_rel]
    results = []
    with intra_op_threads(_threads(full)):
        for k, beta in enumerate(betas):
            nb = target.n * beta
            if sampler == "sgld":
                from .engine import estimate_llc

                kw = {"batch_size": None, "dtype": dtype, "device": device, "progress": progress,
                      **dict(sgld_kwargs or {})}
                results.append(estimate_llc(model, data, loss_fn, nbeta=nb, localization=gamma,
                                            num_chains=num_chains, num_draws=num_draws, num_burnin=num_warmup,
                                            seed=seed + 7919 * k, **kw))
                continue
            run = _run_nuts(full, nbeta=nb, gamma=gamma, center=center, num_chains=num_chains,
                            num_draws=num_draws, num_warmup=num_warmup, seed=seed + 7919 * k,
                            max_tree_depth=max_tree_depth, target_accept_prob=target_accept_prob,
                            full_mass=bool(full_mass), progress=progress)
            config = {"num_chains": num_chains, "num_draws": num_draws, "num_warmup": num_warmup,
                      "seed": seed + 7919 * k, "nbeta": nb, "beta": beta, "n": target.n, "sampler": "nuts",
                      "prior_std": prior_std, "prior_mean": prior_mean if not isinstance(prior_mean, Tensor)
                      else "tensor", "localization": gamma, "full_mass": bool(full_mass),
                      "num_params": target.d, "versions": versions("pyro")}
            results.append(_nuts_result(full, run, nbeta=nb, gamma=gamma, observables=None, config=config,
                                        max_tree_depth=max_tree_depth, caller=f"{caller} (β = {nb:.4g})",
                                        global_posterior=True))
    return full, betas, results


def _expected_nl(full: _Full, beta: float, r: LLCResult) -> tuple[float, float]:
    """E_β[nL_n] = n L_n(w*) + λ̂/β and its s.e. (λ̂ = nβ(E L_n − L_n(w*)) has the lower variance)."""
    return full.target.n * r.init_loss + r.llc_mean / beta, r.llc_sem / beta


def multitemperature_llc(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    betas: Sequence[float] = (0.5, 0.7, 1.0, 1.4, 2.0),
    prior_std: float | None = 1.0,
    prior_mean: float | Tensor | str = 0.0,
    num_chains: int = 4,
    num_draws: int = 1000,
    num_warmup: int | None = None,
    seed: int = 0,
    max_tree_depth: int = 10,
    target_accept_prob: float = 0.8,
    full_mass: bool | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = "cpu",
    force: bool = False,
    progress: bool | None = None,
    sampler: str = "nuts",
    sgld_kwargs: Mapping[str, Any] | None = None,
) -> TemperatureRegression:
    r"""Global λ from the slope of :math:`\mathbb E_\beta[nL_n]` against :math:`1/\beta`.

    For each :math:`\beta_k` = ``betas[k] / log n`` NUTS samples the global
    tempered posterior :math:`p_\beta(w) \propto \varphi(w)\,e^{-n\beta L_n(w)}`,
    :math:`\varphi = N(\mu_0, s^2 I)` (no localization at ``w*``; ``w*`` is only
    the starting point), and estimates
    :math:`E_k = \mathbb E_{\beta_k}[nL_n] = nL_n(w^*) + \hat\lambda_k/\beta_k`
    with :math:`\hat\lambda_k = n\beta_k(\mathbb E L_n - L_n(w^*))` (a control
    variate: same value, smaller error).  Since
    :math:`\mathbb E_\beta[nL_n] = nL_n(w_0) + \lambda/\beta + U_n\sqrt{\lambda/(2\beta)} + O_p(1)`
    (Watanabe 2013, JMLR 14, Thm 4; Corollary 3 suggests β = β₀/log n),
    the weighted least-squares slope of :math:`E_k` on :math:`1/\beta_k` estimates λ.

    Applies when the posterior can be sampled globally (small models, all low-loss
    regions mixed or related by exact symmetries of loss *and* prior) and the
    truth is realizable with the prior positive on it; the slope then has a
    data-dependent error :math:`O(\sqrt{\lambda/\log n})` from the
    :math:`U_n` term on top of the reported Monte-Carlo error (absent in regular
    models).  Otherwise use the local estimator (:func:`slt.estimate_llc`).

    Parameters
    ----------
    model, data, loss_fn
        As for :func:`slt.estimate_llc`; the model's parameters are the start.
    betas
        β·log n values (default 0.5 … 2 around the WBIC temperature 1).
    prior_std, prior_mean
        The prior :math:`N(\mu_0, s^2 I)`: ``prior_std`` s (``None``: flat, only
        if :math:`e^{-n\beta L_n}` is integrable, e.g. linear regression);
        ``prior_mean`` a number (every coordinate), a flat ``(d,)`` tensor, or
        ``"w_star"``.  Must not depend on the data for the theory to apply.
    num_chains, num_draws, num_warmup, seed, max_tree_depth, target_accept_prob, full_mass, dtype, device, force, progress
        As for :func:`nuts_llc` (temperature k uses seed ``seed + 7919 k``).
    sampler, sgld_kwargs
        ``"nuts"`` (default; exact) or ``"sgld"``: :func:`slt.estimate_llc` with
        ``localization = 1/s²`` (then ``prior_mean`` must be ``"w_star"``),
        full batch unless ``sgld_kwargs`` say otherwise, ``num_warmup`` as burn-in.
        Use SGLD where NUTS is too slow: e.g. reduced-rank regression, whose
        global posterior stretches along the GL(H) orbit A → GA, B → BG⁻¹, takes
        NUTS trees of depth ≈ 9 (500-700 gradients per draw; measured on
        [3, 2, 3], n = 5000).  SGLD's step-size bias (≈ εκ/4) then enters the
        slope: check it with :func:`compare` or a smaller ``step_size``.

    Returns
    -------
    TemperatureRegression
    """
    try:
        rel = [check_real("betas[i]", b, positive=True) for b in betas]
    except TypeError as e:
        raise ValueError(f"betas must be a sequence of positive numbers, got {betas!r}") from e
    if len(set(rel)) < 2:
        raise ValueError(f"need at least 2 distinct temperatures for a slope, got betas={list(betas)}")
    full, bs, results = _global_runs(
        model, data, loss_fn, betas_rel=rel, prior_std=prior_std, prior_mean=prior_mean,
        num_chains=num_chains, num_draws=num_draws, num_warmup=num_warmup, seed=seed, dtype=dtype,
        device=device, force=force, max_tree_depth=max_tree_depth, target_accept_prob=target_accept_prob,
        full_mass=full_mass, progress=progress, sampler=sampler, sgld_kwargs=sgld_kwargs,
        caller="slt.reference.multitemperature_llc",
    )
    e_s = [_expected_nl(full, b, r) for b, r in zip(bs, results)]
    x = np.array([1.0 / b for b in bs])
    y = np.array([v for v, _ in e_s])
    s = np.array([v for _, v in e_s])
    if len(x) >= 3:
        slope, se, icpt, chi2, dof = _wls(x, y, s)
    else:
        slope, se, icpt, chi2, dof = _wls(np.append(x, 0), np.append(y, 0), np.append(s, np.inf))
        chi2, dof = float("nan"), 0
    se_mc = se
    if dof > 0 and chi2 / dof > 1.0:
        se = se * math.sqrt(chi2 / dof)
    wb = wb_se = float("nan")
    for b_rel, (v, sv) in zip(rel, e_s):
        if abs(b_rel - 1.0) < 1e-12:
            wb, wb_se = v, sv
    return TemperatureRegression(
        n=full.target.n, betas=torch.tensor(bs, dtype=torch.float64), expected_nl=torch.tensor(y),
        expected_nl_sem=torch.tensor(s), llc=slope, llc_sem=se, llc_sem_mc=se_mc, intercept=icpt,
        chi2=chi2, dof=dof, wbic=wb, wbic_sem=wb_se, prior_std=prior_std, results=results,
    )


@dataclass
class WBICResult:
    r"""WBIC :math:`= \mathbb E_\beta[nL_n]`, :math:`\beta = 1/\log n` (Watanabe 2013).

    ``wbic`` and ``wbic_sem`` (Monte-Carlo error); ``init_loss`` :math:`L_n(w^*)`;
    ``result`` the NUTS run on the global posterior, whose ``llc_mean``
    :math:`= n\beta(\mathbb E_\beta L_n - L_n(w^*)) = \beta(\mathrm{WBIC} - nL_n(w^*))`
    is a single-temperature λ estimate (biased by :math:`O(\sqrt{\lambda\beta})` and
    by the prior; prefer :func:`multitemperature_llc`).
    """

    wbic: float
    wbic_sem: float
    n: int
    beta: float
    init_loss: float
    result: LLCResult

    def __str__(self) -> str:
        return (f"WBIC = {self.wbic:.4f} ± {self.wbic_sem:.2g} (β = 1/log n = {self.beta:.4g}, n = {self.n}); "
                f"nL_n(w*) = {self.n * self.init_loss:.4f}; β(WBIC − nL_n(w*)) = {self.result.llc_mean:.4g} "
                f"± {self.result.llc_sem:.2g}")

    __repr__ = __str__


def wbic(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    prior_std: float | None = 1.0,
    prior_mean: float | Tensor | str = 0.0,
    num_chains: int = 4,
    num_draws: int = 1000,
    num_warmup: int | None = None,
    seed: int = 0,
    max_tree_depth: int = 10,
    target_accept_prob: float = 0.8,
    full_mass: bool | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = "cpu",
    force: bool = False,
    progress: bool | None = None,
    sampler: str = "nuts",
    sgld_kwargs: Mapping[str, Any] | None = None,
) -> WBICResult:
    r"""Widely applicable Bayesian information criterion by NUTS on the global posterior.

    :math:`\mathrm{WBIC} = \mathbb E_{\beta}[nL_n(w)]` under
    :math:`p_\beta(w) \propto \varphi(w)\,e^{-n\beta L_n(w)}` at
    :math:`\beta = 1/\log n`, :math:`\varphi = N(\mu_0, s^2 I)`; it equals the Bayes
    free energy :math:`F_n = nL_n(w_0) + \lambda\log n + O_p(\sqrt{\log n})`
    to that order (Watanabe 2013, JMLR 14, Thm 4), when the loss is the negative
    log-likelihood per sample (e.g. :func:`slt.models.gaussian_nll`), the truth is
    realizable and the global posterior is sampled.  Parameters as for
    :func:`multitemperature_llc`.
    """
    full, bs, results = _global_runs(
        model, data, loss_fn, betas_rel=[1.0], prior_std=prior_std, prior_mean=prior_mean,
        num_chains=num_chains, num_draws=num_draws, num_warmup=num_warmup, seed=seed, dtype=dtype,
        device=device, force=force, max_tree_depth=max_tree_depth, target_accept_prob=target_accept_prob,
        full_mass=full_mass, progress=progress, sampler=sampler, sgld_kwargs=sgld_kwargs,
        caller="slt.reference.wbic",
    )
    v, s = _expected_nl(full, bs[0], results[0])
    return WBICResult(wbic=v, wbic_sem=s, n=full.target.n, beta=bs[0], init_loss=full.init_loss, result=results[0])
