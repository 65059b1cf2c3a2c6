r"""Bayesian phases: sample the global tempered posterior and measure the mass of each basin.

The local learning coefficient describes one critical point.  Which critical point the
posterior *prefers* at sample size n is a global question: the posterior mass of a phase
(a region of parameter space around a family of critical points) is

.. math::

    P_n(\text{phase}) \propto \int_{\text{phase}} e^{-n\beta L_n(w)}\, \varphi(w)\, dw
    \approx \exp\bigl(-n L_n(w^*) - \lambda \log n + O(1)\bigr),

so a phase with lower loss but higher λ wins only once n is large enough (Watanabe's free
energy; Chen, Lau, Mendel, Wei & Murfet 2023, "Dynamical versus Bayesian phase transitions
in a toy model of superposition", arXiv 2310.06301).  The O(1) terms (prior mass, volume of
flat directions, number of symmetric copies) are not known in closed form, which is why the
crossing has to be measured.

:func:`sample_posterior` runs full-batch SGLD on

.. math::

    p(w) \propto \exp\Bigl(-n\beta\, L_n(w) - \frac{\lVert w - \mu_0\rVert^2}{2\sigma_0^2}\Bigr)

(a Gaussian prior :math:`N(\mu_0, \sigma_0^2 I)`; no localization at w*), many chains at once,
started from several points (for instance one group of chains at each competing critical
point).  :func:`basin_fractions` labels every draw with a user classifier and reports the
fraction of draws in each phase with an error from the spread over chains, the fractions by
starting point and the number of phase switches per chain: when chains started in different
phases agree, the fractions measure posterior mass; when they do not (large n, high barriers),
they only measure where the chains started, and ``mixed`` says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._runtime import autograd_allowed, versions
from ._checks import check_int, check_real
from .loop import show_progress
from .params import ParamSpec
from .samplers import LocalizedPotential, langevin_step, mala_acceptance
from .stepsize import power_iteration
from .target import Target, prepare_target, require_one_dataset

__all__ = ["PosteriorDraws", "BasinFractions", "sample_posterior", "basin_fractions", "geometric_ladder"]

#: default ε = STEP_FACTOR / (nβ h_max + 1/σ₀²), h_max the largest Hessian eigenvalue at the starts
STEP_FACTOR = 0.1


@dataclass
class PosteriorDraws:
    """Draws of the global tempered posterior, chains first.

    Attributes
    ----------
    draws
        ``(C, T, d)`` flat parameters (float64, CPU).
    loss_trace
        ``(C, T)`` full-data loss :math:`L_n` at each draw.
    init_index
        ``(C,)`` index of the starting point of each chain.
    init_labels
        Name of each starting point (``len`` = number of starting points).
    spec
        Maps flat vectors to named parameters (:meth:`unflatten`).
    mala_accept
        ``(C,)`` mean MALA acceptance probability of the SGLD proposals at β = 1 (a step-size
        diagnostic: values near 1 mean the discretisation error is small).
    swap_accept
        ``(R - 1,)`` acceptance rate of replica swaps between rungs r and r + 1 of the
        temperature ladder (empty without tempering).
    rung_draws
        ``(R, C, T, d)`` draws of every rung of the ladder (rung 0 = ``draws``), or ``None``
        without tempering: the phase fractions along the ladder show the transition in nβ.
    config
        ``n``, ``nbeta``, ``prior_std``, ``step_size``, draws, seed, timings.
    """

    draws: Tensor
    loss_trace: Tensor
    init_index: Tensor
    init_labels: list[str]
    spec: ParamSpec
    mala_accept: Tensor
    swap_accept: Tensor = field(default_factory=lambda: torch.zeros(0))
    rung_draws: Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_chains(self) -> int:
        return int(self.draws.shape[0])

    @property
    def num_draws(self) -> int:
        return int(self.draws.shape[1])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``(d,)`` flat parameters -> ``{name: tensor}`` shaped like the model's parameters."""
        return self.spec.unflatten(flat)

    def __repr__(self) -> str:  # (the dataclass's repr printed every draw)
        rungs = 1 if self.rung_draws is None else int(self.rung_draws.shape[0])
        return (f"PosteriorDraws({self.num_chains} chains × {self.num_draws} draws of {int(self.draws.shape[-1])} "
                f"parameters, starts {self.init_labels}, {rungs} temperature rung{'s' * (rungs != 1)}, "
                f"MALA acceptance {float(self.mala_accept.float().mean()):.3g})")


@dataclass
class BasinFractions:
    r"""Fraction of posterior draws in each phase.

    Attributes
    ----------
    labels
        ``(C, T)`` object array: the phase of every draw.
    fractions
        ``{phase: fraction of all draws}``.
    sem
        ``{phase: standard error}`` = std over chains of the per-chain fraction / √C (chains are
        independent; autocorrelation within a chain is absorbed in its own fraction).
    by_init
        ``{init label: {phase: fraction}}`` over the chains started at that point.
    by_init_sem
        Same layout, standard errors over those chains.
    switches
        ``(C,)`` number of phase changes between consecutive draws of each chain.
    mixed
        With several starting groups: ``True`` when, for every phase, the fractions of every pair
        of groups agree: Student's t of the difference (per-chain fractions, variance pooled over
        all chains, df = C − K) is below :attr:`threshold`, the t quantile at the two-sided level of
        a normal ``z`` (3: p = 0.0027), so the chains forgot where they started and the fractions
        estimate posterior mass.  (With 4 chains per group the plain z-test flags agreeing groups
        far too often: a chain-spread error from few chains is itself noisy.)  With one group (no such evidence):
        ``True`` when its chains switched phase at least once on average.  ``False`` means the
        fractions may only echo the starting points (the barrier was not crossed often enough).
    max_z
        The largest t statistic between starting groups (``inf`` when groups differ and no chain
        varies).
    threshold
        The t quantile ``max_z`` is compared with (``inf`` with one group).
    """

    labels: np.ndarray
    fractions: dict[Hashable, float]
    sem: dict[Hashable, float]
    by_init: dict[str, dict[Hashable, float]]
    by_init_sem: dict[str, dict[Hashable, float]]
    switches: np.ndarray
    mixed: bool
    max_z: float
    threshold: float = math.inf

    def fraction(self, phase: Hashable) -> float:
        """Fraction of draws in ``phase`` (0 if it never occurred)."""
        return self.fractions.get(phase, 0.0)

    def to_frame(self) -> Any:
        """One row per phase: overall fraction and s.e., then one column pair per starting group."""
        import pandas as pd

        rows = []
        for ph in self.fractions:
            row: dict[str, Any] = {"phase": ph, "fraction": self.fractions[ph], "sem": self.sem[ph]}
            for g in self.by_init:
                row[f"fraction[{g}]"] = self.by_init[g].get(ph, 0.0)
                row[f"sem[{g}]"] = self.by_init_sem[g].get(ph, 0.0)
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {self.fractions[k]:.3f} ± {self.sem[k]:.3f}" for k in self.fractions)
        return (f"BasinFractions({parts}; mixed={self.mixed}, max_z={self.max_z:.2f}, "
                f"switches/chain={float(self.switches.mean()):.1f})")


# ----------------------------------------------------------------------------
def _starts(target: Target, init: Any, init_labels: Sequence[str] | None) -> tuple[Tensor, list[str]]:
    """Starting points as ``(K, d)`` plus their labels."""
    spec: ParamSpec = target.spec
    if init is None:
        pts = [target.w_star[0]]
    elif isinstance(init, Tensor):
        if init.ndim != 2 or init.shape[1] != spec.d:
            raise ValueError(f"init as a tensor must have shape (K, {spec.d}) (flat parameters), "
                             f"got {tuple(init.shape)}")
        pts = list(init)
    elif isinstance(init, (list, tuple)):
        if not init:
            raise ValueError("init is an empty list; pass at least one starting point")
        pts = []
        for i, p in enumerate(init):
            if isinstance(p, nn.Module):
                pts.append(spec.flatten_module(p))
            elif isinstance(p, Mapping):
                missing = [n for n in spec.names if n not in p]
                if missing:
                    raise ValueError(f"init[{i}] lacks parameters {missing}")
                pts.append(spec.flatten_mapping({n: torch.as_tensor(p[n]) for n in spec.names}))
            elif isinstance(p, Tensor) and p.shape == (spec.d,):
                pts.append(p)
            else:
                raise TypeError(f"init[{i}] must be a module, a state dict or a ({spec.d},) tensor, "
                                f"got {type(p).__name__}")
    else:
        raise TypeError(f"init must be None, a (K, d) tensor or a list of modules/state dicts, got {type(init).__name__}")
    starts = torch.stack([torch.as_tensor(p).to(device=target.device, dtype=target.dtype) for p in pts])
    if not torch.isfinite(starts).all():
        raise ValueError("a starting point contains NaN or inf")
    labels = list(init_labels) if init_labels is not None else [f"init{k}" for k in range(starts.shape[0])]
    if len(labels) != starts.shape[0]:
        raise ValueError(f"init_labels has {len(labels)} entries for {starts.shape[0]} starting points")
    return starts, [str(s) for s in labels]


def geometric_ladder(num: int, min_factor: float) -> list[float]:
    r"""Temperature ladder for :func:`sample_posterior`: ``num`` factors
    :math:`\beta_r/\beta = f^{r/(num-1)}`, r = 0 … num − 1, from 1 down to ``min_factor``.

    Geometric spacing keeps the swap acceptance roughly constant along the ladder when the
    heat capacity varies slowly (for a singular model :math:`E_\beta[nL] \approx \lambda/\beta`,
    so adjacent rungs overlap when :math:`\log(\beta_r/\beta_{r+1}) \lesssim 1/\sqrt{\lambda}`).
    """
    num = check_int("num", num, 1)
    f = check_real("min_factor", min_factor, positive=True)
    if f > 1:
        raise ValueError(f"min_factor must be in (0, 1], got {min_factor}")
    if num == 1:
        return [1.0]
    return [float(f ** (r / (num - 1))) for r in range(num)]


from .diagnostics import t_threshold as _t_threshold  # noqa: E402  (Student-t quantile)


def _top_hessian_eigenvalue(target: Target, w: Tensor, iters: int = 20, rel: float = 1e-4) -> float:
    """Largest |eigenvalue| of the Hessian of L_n over the rows of ``w`` (K, d), by power iteration
    (:func:`slt.stepsize.power_iteration`) on central differences
    :math:`(\\nabla L(w+\\delta v) - \\nabla L(w-\\delta v))/2\\delta`, :math:`\\delta = 10^{-4}(1 + \\lVert w\\rVert)`."""
    batch = target.full_batch()
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(w.shape, generator=gen, dtype=w.dtype).to(w.device)
    v = v / v.norm(dim=1, keepdim=True)
    delta = rel * (1.0 + w.norm(dim=1, keepdim=True))
    _, lam = power_iteration(lambda x: target.evaluator.loss_and_grad(x, batch)[1], w, v, iters, delta,
                             central=True)
    return float(lam.max())


@autograd_allowed
def sample_posterior(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[..., Tensor] | None = None,
    *,
    prior_std: float,
    prior_mean: float | Tensor = 0.0,
    init: Any = None,
    init_labels: Sequence[str] | None = None,
    chains_per_init: int = 4,
    nbeta: float | None = None,
    num_draws: int = 200,
    num_burnin: int = 2000,
    num_steps_bw_draws: int = 50,
    step_size: float | None = None,
    temperatures: Sequence[float] | None = None,
    swap_every: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> PosteriorDraws:
    r"""Sample :math:`p(w) \propto e^{-n\beta L_n(w)}\, N(w;\mu_0,\sigma_0^2 I)` with full-batch SGLD.

    Update (Welling & Teh 2011), all chains at once:
    :math:`w \leftarrow w - \tfrac{\epsilon}{2}\bigl(n\beta\nabla L_n(w) + (w-\mu_0)/\sigma_0^2\bigr)
    + \mathcal N(0, \epsilon I)`.

    Parameters
    ----------
    model, data, loss_fn
        As for :func:`slt.estimate_llc` (the module's parameters define the parameter layout and
        are the starting point when ``init`` is None).
    prior_std, prior_mean
        :math:`\sigma_0` and :math:`\mu_0` (a number or a ``(d,)`` tensor) of the Gaussian prior.
        Required: without a prior the posterior of most networks is improper (dead units have
        flat directions of infinite extent), and the prior enters the O(1) part of the free
        energy, so the answer depends on it.
    init, init_labels
        Starting points: a list of modules / state dicts / ``(d,)`` tensors, or a ``(K, d)``
        tensor; ``chains_per_init`` chains start at each.  Start groups of chains in each
        competing phase: agreement between the groups is the evidence of mixing.
    nbeta
        :math:`n\beta`; default n (β = 1, the Bayesian posterior).
    num_draws, num_burnin, num_steps_bw_draws
        Draws kept per chain, steps discarded first, steps between kept draws.
    step_size
        ε.  Default :math:`0.1/(n\beta\, h_{\max} + 1/\sigma_0^2)` with :math:`h_{\max}` the largest
        Hessian eigenvalue of :math:`L_n` over the starting points (power iteration): stable in
        the stiffest direction at the starts.
    temperatures, swap_every
        Replica exchange (parallel tempering; Swendsen & Wang 1986, Geyer 1991): factors
        :math:`1 = f_0 > f_1 > \dots > f_{R-1} > 0` (e.g. :func:`geometric_ladder`); every chain
        gets R replicas at :math:`n\beta f_r` (the prior is not tempered) and every
        ``swap_every`` steps adjacent replicas r, r + 1 (even pairs and odd pairs in turn)
        exchange positions with probability
        :math:`\min\{1, \exp[n\beta (f_r - f_{r+1})(L_n(w_r) - L_n(w_{r+1}))]\}`.
        Hot replicas cross loss barriers and hand the crossing down, so phases separated by
        barriers are sampled in proportion to their mass.  ``draws`` holds the β replica,
        ``rung_draws`` every rung.  Rung r steps with
        :math:`\epsilon_r = \epsilon\,(n\beta h_{\max} + 1/\sigma_0^2)/(n\beta f_r h_{\max} + 1/\sigma_0^2)`,
        the same stability margin as rung 0 (hot rungs would crawl with the cold rung's step).
    seed
        Seeds the chains' noise and the swaps (a private ``torch.Generator``).
    dtype, device, progress
        Precision, device (``"cpu"``, ``"cuda"``, ``"auto"``) and a tqdm progress bar
        (``None``: on a terminal for long runs).

    Returns
    -------
    PosteriorDraws

    Raises
    ------
    ValueError
        Bad arguments (non-positive prior_std, counts < 1, shapes, a ladder that does not start
        at 1 and decrease).
    RuntimeError
        A chain produced NaN/inf (names the chain and step; lower ``step_size``).
    """
    sigma = check_real("prior_std", prior_std, positive=True)
    cpi = check_int("chains_per_init", chains_per_init, 1)
    T = check_int("num_draws", num_draws, 1)
    burn = check_int("num_burnin", num_burnin, 0)
    thin = check_int("num_steps_bw_draws", num_steps_bw_draws, 1)
    check_int("seed", seed, 0)
    if nbeta is not None:
        check_real("nbeta", nbeta, positive=True)
    if isinstance(model, (list, tuple)):
        raise TypeError("sample_posterior takes one model (its parameter layout and default start)")
    target = prepare_target(model, data, loss_fn, dtype=dtype, device=device, full_data=True,
                            nbeta=(lambda n: float(n)) if nbeta is None else nbeta,
                            localization=1.0 / sigma**2, caller="slt.sample_posterior")
    require_one_dataset(target, "slt.sample_posterior")
    nb, gamma, batch = target.nbeta, target.localization, target.full_batch()
    starts, labels = _starts(target, init, init_labels)
    K, d = starts.shape
    if isinstance(prior_mean, Tensor):
        if prior_mean.shape != (d,):
            raise ValueError(f"prior_mean must be a number or a ({d},) tensor, got shape {tuple(prior_mean.shape)}")
        mu = prior_mean.to(device=target.device, dtype=target.dtype)
    else:
        mu = torch.full((d,), float(prior_mean), device=target.device, dtype=target.dtype)
    if not torch.isfinite(mu).all():
        raise ValueError("prior_mean contains NaN or inf")
    ladder = [1.0] if temperatures is None else [float(f) for f in temperatures]
    if not ladder or not all(math.isfinite(f) for f in ladder) or abs(ladder[0] - 1.0) > 1e-12 or any(
        not (0 < b < a) for a, b in zip(ladder, ladder[1:])
    ):
        raise ValueError(f"temperatures must start at 1 and decrease strictly inside (0, 1], got {temperatures!r}")
    every = check_int("swap_every", swap_every, 1)
    R = len(ladder)
    h = _top_hessian_eigenvalue(target, starts)
    if step_size is None:
        eps = STEP_FACTOR / (nb * h + gamma)
    else:
        eps = check_real("step_size", step_size, positive=True)
    # rung r takes ε_r = ε (nβ h + γ) / (nβ f_r h + γ): the same stability margin on every rung
    eps_r = [eps * (nb * h + gamma) / (nb * f * h + gamma) for f in ladder]

    C = K * cpi
    w0 = starts.repeat_interleave(cpi, dim=0)  # (C, d): chains of start k are rows k*cpi ...
    init_index = torch.arange(K).repeat_interleave(cpi)
    # replicas: row r*C + c is chain c at rung r
    kw = {"device": target.device, "dtype": target.dtype}
    fac = torch.tensor(ladder, **kw).repeat_interleave(C)  # (R*C,)
    nbr = nb * fac  # (R*C,) nβ of each row
    e = torch.tensor(eps_r, **kw).repeat_interleave(C).unsqueeze(1)  # (R*C, 1)
    potential = LocalizedPotential(target.evaluator.loss_and_grad, mu.expand(R * C, d), nbr, gamma)
    gen = torch.Generator(device=target.device).manual_seed(int(seed))
    w = w0.repeat(R, 1)  # (R*C, d)
    L, _, U, gU = potential(w, batch)
    swap_tries = torch.zeros(max(R - 1, 0), dtype=torch.float64)
    swap_acc = torch.zeros(max(R - 1, 0), dtype=torch.float64)
    parity = 0
    total = burn + T * thin
    draws = torch.empty(R, C, T, d, dtype=torch.float64)
    losses = torch.empty(C, T, dtype=torch.float64)
    acc_sum = torch.zeros(C, dtype=torch.float64)
    from tqdm.auto import tqdm

    show = show_progress(progress, total * C * R, threshold=500_000)
    # updated every step (redrawn at most every 0.5 s): steps/s, ETA, draws, draws/s, MALA acceptance, swap rate
    bar = tqdm(total=total, disable=not show, desc=f"posterior ({C} chains × {R} rungs)", unit="step",
               leave=False, mininterval=0.5)
    t_post, t_burn = 0.0, None
    t0 = time.perf_counter()
    j = 0
    for t in range(total):
        # SGLD with full-batch gradients: w' = w - ε/2 ∇U(w) + √ε ξ
        w_new = langevin_step(w, gU, torch.randn(w.shape, generator=gen, **kw), e)
        L_n, _, U_n, gU_n = potential(w_new, batch)
        # MALA acceptance of that proposal (diagnostic only; the proposal is always taken)
        acc_sum += mala_acceptance(w, w_new, U, gU, U_n, gU_n, e)[:C].double().cpu()
        w, L, U, gU = w_new, L_n, U_n, gU_n
        if not torch.isfinite(U).all():
            c = int((~torch.isfinite(U)).nonzero()[0])
            raise RuntimeError(f"sample_posterior: chain {c % C} (start {labels[int(init_index[c % C])]!r}, rung {c // C}) "
                               f"became NaN/inf at step {t + 1} with step_size={eps_r[c // C]:.3g}; pass a smaller step_size")
        if R > 1 and t % every == every - 1:
            # propose swaps between rungs (r, r+1), r ≡ parity (mod 2), independently per chain
            rs = torch.arange(parity, R - 1, 2, device=w.device)
            if rs.numel():
                Lv, Pv = L.view(R, C), w.view(R, C, d)
                df = (nb * (fac.view(R, C)[rs, 0] - fac.view(R, C)[rs + 1, 0])).unsqueeze(1)  # (p, 1)
                log_s = df * (Lv[rs] - Lv[rs + 1])  # (p, C)
                u = torch.rand(log_s.shape, generator=gen, **kw)
                acc = torch.log(u) < log_s  # (p, C)
                swap_tries[rs.cpu()] += C
                swap_acc[rs.cpu()] += acc.double().sum(1).cpu()
                newP = Pv.clone()
                a3 = acc.unsqueeze(-1)
                newP[rs] = torch.where(a3, Pv[rs + 1], Pv[rs])
                newP[rs + 1] = torch.where(a3, Pv[rs], Pv[rs + 1])
                w = newP.view(R * C, d)
                L, _, U, gU = potential(w, batch)
            parity = 1 - parity
        if t >= burn and (t - burn) % thin == thin - 1:
            draws[:, :, j] = w.view(R, C, d).double().cpu()
            losses[:, j] = L[:C].double().cpu()
            j += 1
        if show:
            if t == burn - 1 or (burn == 0 and t == 0):
                t_burn = time.perf_counter()
            bar.update(1)
            now = time.perf_counter()
            if now - t_post >= 1.0 or t == total - 1:
                t_post = now
                post = {"draws": f"{j}/{T}"}
                if t_burn is not None and j > 0:
                    post["draws_per_s"] = f"{j / max(now - t_burn, 1e-9):.3g}"
                post["mala"] = f"{float(acc_sum.mean()) / (t + 1):.2f}"
                if R > 1:
                    post["swap"] = f"{float(swap_acc.sum() / swap_tries.sum().clamp_min(1)):.2f}"
                bar.set_postfix(post, refresh=False)
    bar.close()
    config = {"n": target.n, "nbeta": nb, "prior_std": sigma, "step_size": eps, "rung_step_sizes": eps_r,
              "hessian_max": h, "temperatures": ladder, "swap_every": every,
              "step_size_auto": step_size is None, "num_chains": C, "chains_per_init": cpi,
              "num_draws": T, "num_burnin": burn, "num_steps_bw_draws": thin, "seed": int(seed),
              "device": str(target.device), "dtype": str(dtype).replace("torch.", ""),
              "seconds": time.perf_counter() - t0, "num_params": d, "versions": versions()}
    swap_rate = swap_acc / swap_tries.clamp_min(1)
    return PosteriorDraws(draws[0], losses, init_index, labels, target.spec, acc_sum / total, swap_rate,
                          draws if R > 1 else None, config)


def basin_fractions(
    draws: PosteriorDraws,
    classify: Callable[[dict[str, Tensor]], Hashable],
    *,
    z: float = 3.0,
    rung: int = 0,
) -> BasinFractions:
    r"""Label every draw with ``classify(params)`` and measure the fraction in each phase.

    Parameters
    ----------
    draws
        From :func:`sample_posterior`.
    classify
        ``{name: tensor} -> phase label`` (hashable), e.g. the number of live columns of a TMS.
    z
        Agreement level between starting groups for ``mixed``, as a normal z (converted to the
        Student-t quantile with df = C − K).
    rung
        Which rung of the temperature ladder (0 = the target β; others need ``rung_draws``).

    Returns
    -------
    BasinFractions
        Fraction :math:`\hat p_k = \frac1{CT}\sum_{c,t} 1[\text{label}_{ct}=k]` with standard
        error :math:`\mathrm{sd}_c(\hat p_{k,c})/\sqrt C`; the same by starting group; the
        per-chain number of phase switches; and whether the groups agree (``mixed``).
    """
    if not isinstance(draws, PosteriorDraws):
        raise TypeError(f"draws must be a PosteriorDraws (from sample_posterior), got {type(draws).__name__}")
    if rung == 0:
        arr = draws.draws
    else:
        R = 1 if draws.rung_draws is None else draws.rung_draws.shape[0]
        if isinstance(rung, bool) or not isinstance(rung, int) or not 0 <= rung < R:
            raise ValueError(f"rung must be an integer in [0, {R}), got {rung!r} (the ladder has {R} rungs)")
        arr = draws.rung_draws[rung]
    C, T, _ = arr.shape
    labels = np.empty((C, T), dtype=object)
    for c in range(C):
        for t in range(T):
            lab = classify(draws.unflatten(arr[c, t]))
            if isinstance(lab, (Tensor, np.ndarray, np.generic)):  # (a tensor hashes by identity: one label per draw)
                if (lab.numel() if isinstance(lab, Tensor) else np.size(lab)) != 1:
                    raise TypeError(f"classify must return one label, got a {type(lab).__name__} of shape "
                                    f"{tuple(lab.shape)}: return a Python number or string (e.g. int(...))")
                lab = lab.item()
            try:
                hash(lab)
            except TypeError:
                raise TypeError(f"classify must return a hashable label, got {type(lab).__name__}") from None
            labels[c, t] = lab
    phases = sorted(set(labels.ravel().tolist()), key=lambda v: (str(type(v)), v))

    def stats(rows: np.ndarray) -> tuple[dict[Hashable, float], dict[Hashable, float]]:
        sub = labels[rows]
        fr, se = {}, {}
        for ph in phases:
            per = (sub == ph).mean(axis=1)  # per-chain fraction
            fr[ph] = float(per.mean())
            se[ph] = float(per.std(ddof=1) / math.sqrt(len(per))) if len(per) > 1 else float("nan")
        return fr, se

    fractions, sem = stats(np.arange(C))
    by_init, by_init_sem = {}, {}
    idx = draws.init_index.numpy()
    for k, lab in enumerate(draws.init_labels):
        rows = np.nonzero(idx == k)[0]
        by_init[lab], by_init_sem[lab] = stats(rows)
    switches = (labels[:, 1:] != labels[:, :-1]).sum(axis=1) if T > 1 else np.zeros(C, dtype=int)
    groups = list(by_init)
    max_z, thr = 0.0, math.inf
    if len(groups) > 1:
        # H0 "the chains forgot their start": all chains are exchangeable, so the per-chain
        # fractions share one variance, pooled over groups (df = C - K); compare group means
        # with Student's t at the two-sided level of a normal z.
        df_pool = C - len(groups)
        thr = _t_threshold(z, df_pool) if df_pool > 0 else math.inf
        for ph in phases:
            per = (labels == ph).mean(axis=1)  # (C,)
            resid = np.concatenate([per[idx == k] - per[idx == k].mean() for k in range(len(groups))])
            s2 = float((resid**2).sum() / df_pool) if df_pool > 0 else 0.0
            for a in range(len(groups)):
                for b in range(a + 1, len(groups)):
                    na, nb_ = int((idx == a).sum()), int((idx == b).sum())
                    d = abs(by_init[groups[a]][ph] - by_init[groups[b]][ph])
                    se = math.sqrt(s2 * (1 / na + 1 / nb_))
                    zz = d / se if se > 0 else (0.0 if d == 0 else math.inf)
                    max_z = max(max_z, zz)
        mixed = bool(max_z <= thr)
    else:
        mixed = bool(T > 1 and float(switches.mean()) >= 1.0)
    return BasinFractions(labels, fractions, sem, by_init, by_init_sem, switches.astype(int), mixed, max_z, thr)
