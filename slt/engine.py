r"""The LLC engine: batched multi-chain, multi-checkpoint SG-MCMC.

:func:`estimate_llc` samples the localized tempered posterior

.. math::

    p(w) \propto \exp\Bigl(-n\beta\,L_n(w) - \tfrac{\gamma}{2}\lVert w - w^*\rVert^2\Bigr)

around each checkpoint ``w*`` and returns the local learning coefficient
estimate :math:`\hat\lambda = n\beta\,(\mathbb E[L_n(w)] - L_n(w^*))` (Lau, Furman,
Wang, Murfet & Wei 2023, arXiv 2308.12108).

It is a composition of named steps, each its own module:

1. :func:`slt.target.prepare_target` — model, parameters, data, loss, ``w*``,
   nβ, γ and the computation path (``native``, ``vmap`` or ``loop``;
   :mod:`slt.evaluator`);
2. :func:`slt.stepsize.adapt_step_size` — the step size, adapted during burn-in
   unless given;
3. :func:`slt.loop.run_chains` — the sampler (:mod:`slt.samplers`, chosen by
   name or value) folded over the target's minibatch stream;
4. :meth:`slt.LLCResult.from_traces` — estimates and diagnostics per checkpoint.

All chains of all checkpoints form one batch of ``K * C`` parameter vectors
(checkpoint-major: chain ``c`` of checkpoint ``k`` is row ``k * C + c``).

Minibatch noise and the control variate
---------------------------------------
Each draw records :math:`n\beta\,(L_{B_t}(w_t) - L_{B_t}(w^*))`: the loss at
``w*`` on the *same* minibatch is subtracted, which cancels the
batch-to-batch fluctuation of the data average that does not depend on ``w``.
For tensor data the per-sample losses at ``w*`` are computed once, so the
control variate is a gather, not a forward pass.  Chains draw independent
minibatches (i.i.d. indices with replacement), and the reported standard error
is the larger of the chain-replicate error and a batch-means error on the
chain-averaged trace, so noise that chains share (e.g. a user DataLoader) is
not hidden by the spread across chains.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_flag, check_int, is_bool, check_observable_value, check_observables, check_real, probe_observables
from ._runtime import (autograd_allowed, intra_op_threads, resolve_device, retained_heap, small_work_threads,
                       user_stacklevel, versions)
from .data import LoaderSource, num_rows, row_numel
from .defaults import (BATCH_RAISES, BATCH_SIZE, BATCH_SIZE_MAX, EXTENSION_BUDGET, EXTRAPOLATION_MAX_CHANGE,
                       FALLBACK_SAMPLERS, HALVING_CHECK_MIN_DRAWS, HALVING_CHECK_SHARE, LLC, LOCALIZATION,
                       LOCALIZATION_MIN_DRAWS, LOCALIZATION_STEPS, RELAXATION_TIMES, SGHMC_FIRST_BURNIN,
                       STEP_BIAS_MIN_FACTOR, STEP_BIAS_SHARE, default_burnin,
                       default_localization, default_nbeta, relaxation_steps)
from .diagnostics import (changed, free_diffusion, halved_step_estimate, llc_standard_error, minibatch_heating,
                          step_bias)
from .evaluator import ChainEvaluator, fused_summary
from .groups import Groups
from .loop import Divergence, Trace, run_chains, show_progress
from .result import (FALLBACK_NAMES, HEATING_SHARE, PRECISION_SHARE, UNSETTLED, LLCResult, _halving_gap, equilibrium_checks, heating_check,
                     precision_problem, resolution_problem)
from .rng import ChainRNG
from .samplers import SAMPLERS, LocalizedPotential, SamplerSpec, build_sampler, resolve_sampler
from .samplers.base import column_chunks, rowsum64
from .stepsize import (ADAPT_EXTENSIONS, ADAPT_MIN_STEPS, JUMP_FACTOR, STEP_SIZE_SAFETY, adapt_step_size, auto_step_size,
                       gradient_noise_trace, initial_step_size, stable_step_size)
from .target import (Target, _seeds, batch_statistics_issue, checkpoint_modules, checkpoint_state_batchable,
                     checkpoint_state_differences, fastest_path, load_checkpoint_files, prepare_target)

__all__ = [
    "estimate_llc",
    "sample_target",
    "Sampling",
    "default_nbeta",
    "default_localization",
    "resolve_device",
    "ChainEvaluator",
    "ChainRNG",
    "LLCEstimationError",
    "STEP_SIZE_SAFETY",
]

Observable = Callable[[Mapping[str, Tensor]], Tensor]


class LLCEstimationError(RuntimeError):
    """Raised when sampling cannot produce an estimate (e.g. every chain diverged)."""


@autograd_allowed
def estimate_llc(
    model: nn.Module | Sequence[nn.Module] | None,
    data: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    models: Sequence[nn.Module | Mapping[str, Tensor]] | None = None,
    state_dicts: Sequence[Mapping[str, Tensor]] | None = None,
    num_chains: int = LLC.num_chains,
    num_draws: int = LLC.num_draws,
    num_burnin: int | None = LLC.num_burnin,
    num_steps_bw_draws: int = LLC.num_steps_bw_draws,
    step_size: float | str | None = LLC.step_size,
    nbeta: float | None = LLC.nbeta,
    localization: float | None = LLC.localization,
    batch_size: int | str | None = LLC.batch_size,
    sampler: str | SamplerSpec = LLC.sampler,
    sampler_kwargs: Mapping[str, Any] | None = None,
    observables: Mapping[str, Observable] | None = None,
    restrict_to: Any = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    autocast: Any = None,
    seed: int | Sequence[int] = 0,
    vectorize: str = "auto",
    mala_every: int = LLC.mala_every,
    target_accept: float = LLC.target_accept,
    divergence_threshold: float | None = None,
    control_variate: bool = True,
    shared_batches: bool = False,
    raise_on_divergence: bool = True,
    extend_draws: bool | int = LLC.extend_draws,
    check_halving: bool | None = LLC.check_halving,
    num_threads: int | None = None,
    progress: bool | None = None,
) -> LLCResult | list[LLCResult]:
    r"""Estimate the local learning coefficient of one or many checkpoints.

    Samples :math:`p(w) \propto \exp(-n\beta L_n(w) - \frac{\gamma}{2}\|w-w^*\|^2)`
    with SG-MCMC from ``w*`` (the model's current parameters) and returns
    :math:`\hat\lambda = n\beta(\mathbb E[L_n(w)] - L_n(w^*))` (Lau et al. 2023).

    Parameters
    ----------
    model
        A ``torch.nn.Module`` whose parameters are ``w*``; or a list of modules
        (checkpoints, same architecture).  Its ``requires_grad`` parameters are
        sampled; frozen ones are held fixed.  It is evaluated in the mode it is
        in (call ``model.eval()`` to switch off dropout); it is never modified.
    data
        ``(X, Y)``, ``X`` alone (density model: ``loss_fn(model(x), x)``),
        ``(X, Y, weights)``, :class:`slt.Data`, a ``Dataset`` (items ``x``,
        ``(x, y)`` or ``(x, y, weight)``) or a ``DataLoader`` (streamed;
        its batches are shared by all chains).  ``{label: dataset}`` (values tuples,
        :class:`slt.Data` or ``Dataset`` s — a mapping of tensors is one dataset's columns):
        the data-refined LLC of each distribution q′ (posterior and estimator both on q′;
        Wang et al. 2024), batched; the distributions need one nβ (given, or equal sizes).
    loss_fn
        ``loss_fn(output, target) -> scalar`` mean loss.  Defaults to
        ``model.default_loss`` when the model defines one, else to the loss in the
        model's output (:func:`slt.losses.model_loss`: a Hugging Face model called with
        ``labels`` in the batch).
    models, state_dicts
        Several checkpoints estimated in one batched computation; with
        ``state_dicts``, ``model`` is the template.  Returns a list of results.
        A state dict may be a file path (read by ``torch.load(..., weights_only=True)``), a
        training checkpoint holding it under one key (``{"model": ..., "optimizer": ...}``), or
        saved under a prefix (``"module."``, ``"_orig_mod."``, Lightning's ``"model."``).
        Checkpoints whose buffers or frozen parameters differ (BatchNorm statistics) run in
        the same batched computation, each chain with its checkpoint's own (on a model with
        ``forward_chains``, a sparse buffer that differs, or differing tensors larger than the
        sampled parameters: one at a time, with the seeds a batched run gives them).
    num_chains, num_draws, num_burnin, num_steps_bw_draws
        Chains per checkpoint, recorded draws per chain, steps discarded first, and steps between
        draws.  The burn-in runs from ``w*`` at the frozen step (after the step-size adaptation, if
        any, which is a phase of its own).  ``num_burnin=None`` (default): ``num_draws // 4``,
        lengthened once ε and γ are known to ``RELAXATION_TIMES`` = 5 relaxation times 1/(εγ) of a
        direction only the localization holds, when that is at most ``BURNIN_MAX_FACTOR`` = 4 times
        the draws' steps (16 times at γ > 1, where the automatic localization goes when chains do not
        settle at γ = 1; 64 times at the last γ the run can use — the automatic γ at the end of its
        ladder, or a given γ > 1 — where no stronger γ is left; :func:`slt.defaults.default_burnin`):
        then λ̂ is still settled when ε is
        halved at the same number of steps.  The burn-in used is ``config["num_burnin"]`` (its rule
        ``config["num_burnin_rule"]``: ``"quarter"``, ``"relaxation"`` or ``"given"``).
    step_size
        ε.  Default ``None`` (= ``"adapt"``): for 4/5 of ``num_burnin`` steps (of ``num_draws // 4``
        with the automatic burn-in), at least ``ADAPT_MIN_STEPS`` = 50, and for up to three more windows
        while the acceptance is still far below its target (:func:`slt.stepsize.adapt_step_size`;
        ``diagnostics["adapt_steps"]``, ``["adapt_extensions"]``) before the burn-in, dual
        averaging (Hoffman & Gelman 2014, as NUTS/Stan adapt their step) drives
        ε toward a Metropolis acceptance of ``target_accept`` for the Langevin
        proposal on the potential being sampled (same minibatch at both
        points), one ε per checkpoint, starting from
        :math:`0.2/(n\beta h(w^*) + \gamma)`; a chain that diverges while adapting
        halves its checkpoint's ε and restarts from ``w*``; then ε is frozen
        (:func:`slt.stepsize.adapt_step_size`) and the chains start again from ``w*``: SGLD
        has no accept/reject step, so the adaptation's exploratory first steps (up to
        10 ε₀) move the chains for real, and where the loss leaves its flat neighbourhood of
        ``w*`` abruptly (a trained GRU) they would otherwise sit far out at a step too small
        to bring them back.  SGLD has no accept/reject step:
        the acceptance only measures its discretisation error, whose bias on
        E[L] is about εκ/4 in a direction of curvature κ.  ``"curvature"``: the
        earlier one-shot rule :math:`\epsilon = 0.2/(n\beta\,h_{max} + \gamma)`
        with :math:`h_{max}` measured near ``w*`` and by short pilot chains,
        capped at :math:`0.2/(n\beta^2 s)` with minibatch-gradient noise
        :math:`s` (:func:`slt.stepsize.auto_step_size`); it is cheap but returns
        steps far too small on networks (chains that do not move) and too large
        on higher-order singularities.  With either automatic rule, a run in
        which chains diverge is repeated with the step of those checkpoints
        halved (at most ``MAX_HALVINGS`` = 2 times; ``diagnostics["step_size_halvings"]``).
        A number is used as given.
    nbeta
        nβ.  Default :func:`default_nbeta` (n / log n, β = 1/log n).
    localization
        γ.  Default ``None``: automatic — γ = 1 (:func:`default_localization`, fixed in n), and
        while the draws show that the chains have not settled (R-hat > 1.1 or λ̂ still rising
        through the draws, in any group; runs of at least ``LOCALIZATION_MIN_DRAWS`` = 100 draws)
        the whole run is repeated from w* with γ ten times larger, at most
        ``LOCALIZATION_STEPS`` = 3 times and never above nβ.  Toy models settle at
        γ = 1 and are unchanged; a network's near-flat directions keep chains wandering away from
        w* at γ = 1 (measured: a trained 26k-parameter MLP gave λ̂ ≈ 516 with R-hat 1.18 at γ = 1,
        517 with R-hat 1.78 at γ = 10, and settled at γ = 100 with λ̂ ≈ 104 and R-hat 1.06), and the
        estimand is then the LLC at the smallest γ of the ladder at which the chains equilibrate.
        One γ serves all groups (checkpoints stay comparable).  The γ used is ``result.localization``;
        the levels tried and why are in ``config["localization_escalations"]``.  A number is used
        as given and never raised.
    batch_size
        Minibatch size; ``None`` or ``>= n`` uses full-batch gradients (no
        minibatch noise, free every-step MALA diagnostic).  ``"auto"`` (the default):
        :data:`slt.defaults.BATCH_SIZE` = 256 samples per step, and when the run's minibatch
        heating (the first-order excess :math:`\tfrac\epsilon8(n\beta)^2\operatorname{tr}\operatorname{Cov}
        [\nabla L_B]` that minibatch noise adds to λ̂; plain SGLD on tensor data) would make λ̂
        drop when ε halves (:func:`slt.result.heating_check`), the run is repeated once at the
        same γ with the batch at which the measured excess falls to a quarter of what the check
        allows (at most :data:`slt.defaults.BATCH_SIZE_MAX`; the full batch once that is half the
        data or more): the noise trace falls as 1/batch size.  One batch size serves every group (as one γ does).
        The batches tried and why are in ``config["batch_size_raises"]``.  A number is used as
        given (the finding, if any, names the fix).
    sampler
        A name — ``"sgld"``, ``"rmsprop_sgld"``, ``"sghmc"`` or ``"sgnht"`` — with
        ``sampler_kwargs`` going to it (e.g. ``alpha``, ``eps`` for RMSProp,
        ``friction`` for SGHMC), or a value such as
        ``slt.samplers.sghmc(friction=0.05)`` (a :class:`slt.samplers.SamplerSpec`;
        see :mod:`slt.samplers`).  ``"auto"`` (default): SGLD; with the automatic γ and the
        adapted step size, when its chains have still not settled once γ can rise no further and
        the draws were extended, the run is repeated at the γ reached with the samplers of
        :data:`slt.defaults.FALLBACK_SAMPLERS` in turn: SGHMC with ``friction="auto"`` (critical
        damping of the directions only γ holds, α = √(2εγ): they relax in about 1/√(ηγ) steps instead
        of SGLD's 1/(ηγ); full batch only, since minibatch noise heats it 1/α times more than SGLD),
        then RMSProp-SGLD (preconditioner adapted during burn-in, then frozen, so that its draws target
        the posterior).  The first whose draws settled is returned: its own checks pass, and a direct
        run at ε/2 with the same steps and seeds gives the same λ̂ within Monte-Carlo error (the in-run
        halving estimate assumes SGLD's dynamics in a metric fixed from w*).  ``config["sampler_fallback"]``
        says what was tried and why (``["tried"]``, one record per sampler); ``config["sampler"]`` is the
        sampler of the returned draws.  With ``"auto"`` the ``sampler_kwargs`` are SGLD's (a key it does not
        take is refused); a fallback takes those of them it accepts (``config["sampler_kwargs"]`` records what
        the returned draws' sampler got).  At full batch, where SGLD's burn-in at the last γ (above 1) would
        exceed :data:`slt.defaults.SGHMC_FIRST_BURNIN` times the draws' steps (5/(εγ) at its adapted ε),
        SGHMC runs first there, and SGLD (with that burn-in) and RMSProp-SGLD only if it does not settle
        (``config["sampler_fallback"]["first"]``: SGLD's ε, burn-in and draws' steps).  Neither is the first choice
        elsewhere: SGHMC's underdamped stiff
        directions decorrelate only every 1/α steps (a 5-dimensional Gaussian: λ̂'s standard error
        0.19 against SGLD's 0.075 from the same draws), and on the known answers of
        ``benchmarks/minibatch_defaults.py`` RMSProp-SGLD sits above SGLD (batch 256: +12–22% against
        +10–14%; full batch: +4–11% against +3–8%).
    observables
        ``name -> f(params)`` with ``params`` a mapping ``name -> (C, *shape)``
        and ``f`` returning ``(C, ...)``; evaluated at every draw, batched over
        chains, returned as ``(C, T, ...)`` in ``result.observables``.
    autocast
        ``None`` (default), ``"bf16"`` or ``"fp16"``: mixed precision for large models on a GPU —
        the model runs under ``torch.autocast`` in that precision; the loss, the losses at w*, the
        gradients and the sampler stay in ``dtype`` (:func:`slt.prepare_target`).  Check λ̂
        against a full-precision run of the same job once.
    restrict_to
        Weight-refined LLC (Wang et al. 2024, arXiv 2410.02984): only the selected parameters
        move, the others stay at ``w*`` (the loss gradient and the noise of each chain are masked).
        A glob over parameter names (``"blocks.0.attn.*"``), a submodule or parameter of the model, a list
        of those (their union), a callable
        ``(name, param) -> bool | bool mask | index``, per-parameter masks ``{name: mask or
        index}`` (parts of a tensor, e.g. one head's slice of a fused QKV matrix), or a mapping
        ``{label: any of those}`` — then the result is ``{label: result}`` and all restrictions ×
        checkpoints × chains run as one batched computation (:mod:`slt.restrict` builds the usual
        ones: ``heads``, ``layers``, ``attention_and_mlp``, ``embeddings``).  Restrictions of one
        checkpoint share its random streams; at a given ``step_size`` a restriction to every
        parameter is the unrestricted run bit for bit (the adapted step is adapted per group, each
        restriction on its own rows).  Not with ``sampler="sgnht"``.
    device, dtype
        ``"cpu"``, ``"cuda"`` or ``"auto"``; ``torch.float32``, ``torch.float64`` or ``None``
        (default): the model's precision (a float64 model runs in float64; bfloat16/float16
        parameters run in float32 on a copy, with a note in ``config["setup_notes"]``).
    seed
        Checkpoint ``k`` uses the random streams of ``seed + k``, or of
        ``seed[k]`` when a list is given (so a batched call reproduces separate
        calls, to the rounding of batched evaluation, when the shared settings agree).
    vectorize
        ``"auto"`` (native if the model has ``forward_chains``; else vmap or a
        loop over chains, whichever is measured faster, and for runs that
        would take over a minute ``torch.compile`` of the vmapped step when
        measured faster still, :mod:`slt.compiled`; a loop with a warning when
        vmap fails), ``"native"``, ``"vmap"``, ``"loop"``, ``"compile"``
        (vmap with its step compiled; a warning and the uncompiled step when
        the model does not compile as one graph).
    mala_every
        Compute the MALA acceptance diagnostic every this many steps (0 disables).
        On minibatches it costs one extra gradient evaluation each time (free at
        full batch).  The draws never reuse that evaluation as the next step's on
        the same batch (``sampler_kwargs={"reuse_batch": True}`` would): a draw's
        loss taken on the batch that just moved the chain is biased low (measured
        on the DLN [5, 3, 5] oracle at ε = 1.43e-3, batch 256: λ̂ 10.39 without
        the diagnostic, 9.46 reusing every 10th batch, 6.53 every 2nd).
    target_accept
        With the adapted step: the target Metropolis acceptance of the
        Langevin proposal (default 0.99; see :data:`slt.defaults.LLC`).
    divergence_threshold
        A chain is divergent when its loss or parameters become non-finite or
        :math:`n\beta(L_B(w) - L_B(w^*))` exceeds this (default
        ``1000 * max(d, 1)``).  Divergent chains are frozen, excluded from the
        estimate and reported (warning and ``diagnostics["divergent_chains"]``).
    control_variate
        Subtract ``L_B(w*)`` on the same minibatch (default).  ``False`` records
        ``nβ (L_B(w_t) − L_n(w*))``, which carries the full batch-to-batch noise
        of the data average; only for comparison.
    shared_batches
        All chains of a checkpoint use the same minibatch at each step (default:
        independent minibatches per chain).  The reported ``llc_sem`` includes the
        noise this makes common to all chains.
    raise_on_divergence
        When every chain of a checkpoint diverged, raise
        :class:`LLCEstimationError` naming the cause and a step size that ran
        from ``w*`` without divergence (default); ``False`` returns NaN for it.
    extend_draws
        ``True`` (default): when the run's only unsettled findings are R-hat > 1.1 or an effective
        sample size under ``ESS_MIN`` = 100 — the chains are stationary (no drift of λ̂ through the
        draws, stable when ε halves, not diffusing freely, not "barely moved") but have not yet mixed,
        or not for long enough — they are continued from where they are, on the same random streams
        (the draws of one longer run), the draws doubled each time, until R-hat ≤ 1.1 and ESS ≥ 100
        in every such group or the extension's steps reach
        ``EXTENSION_BUDGET`` = 1 times the run's own (burn-in and draws): at most twice the run's
        cost, and no new burn-in.  Only runs of at least ``LOCALIZATION_MIN_DRAWS`` = 100 draws, and
        with the automatic γ only at its last level (earlier levels raise γ instead).  The draws
        are then more than ``num_draws`` (``result.num_draws``; ``config["num_draws_requested"]`` and
        ``config["draw_extensions"]`` say how and why).  An int caps the draws in all; ``False``
        keeps ``num_draws``.  An extension is a sequential decision on R-hat, so the R-hat it stops
        at is slightly optimistic; the other checks are read on all draws.
    check_halving
        A direct check of "λ̂ stable when ε halves" for SGLD: once the run has settled, its chains are
        continued at ε/2 from where they ended — a quarter of the draws' steps (as run, extensions
        included) to re-settle, then the draws' steps again — and λ̂ there is compared with the draws'
        λ̂, chain by chain (paired z; the rule of :func:`slt.diagnostics.changed`: beyond 2% of λ̂ and Student's t at 3σ).
        A change is a reason for ``converged = False`` naming SGLD's discretisation bias and the settings
        of a run at ε/2; ``result.diagnostics["halving_direct"]`` records both estimates, z and the
        first-order extrapolation 2λ̂(ε/2) − λ̂(ε) with its s.e. (where λ̂ fell by at most 25%).  Only groups
        whose run settled are judged.  The in-run halving estimate read off the trace sees the
        chains' relaxation but not this bias (SGLD's stationary law moves with ε).  ``None`` (default): with
        an automatic step, when the check's steps are at most ``HALVING_CHECK_SHARE`` = 1/2 of the run's
        own (burn-in and draws: a long relaxation burn-in, as networks at an escalated γ need); ``True``:
        always (SGLD, at least 3 chains and 10 draws); ``False``: never.  Its draws are not part of the result;
        ``config["halving_check"]`` records what it cost, or why it did not run (``None``: ``False``).
    num_threads
        Intra-op CPU threads while sampling (restored afterwards).  Default:
        1 when a step's work is tiny (chains × batch × parameters < 2·10⁶, e.g.
        the toy models), where thread synchronisation costs more than it
        saves (measured 25% faster on TMS, 2 cores); otherwise unchanged.
    progress
        Show a progress bar with draws/s and the running LLC (``None``: when
        attached to a terminal).

    Returns
    -------
    LLCResult, list of LLCResult, or a mapping of them
        One result per checkpoint (a list when several were given); ``{label: ...}`` of those per
        restriction when ``restrict_to`` is a mapping, per distribution when ``data`` is a mapping
        of datasets, ``{restriction: {distribution: ...}}`` with both.  ``result.converged`` and
        ``result.convergence_reasons`` give the verdict.

    Calibration
    -----------
    Check that (i) ``diagnostics["mala_acceptance"]`` is about 0.9 or higher,
    (ii) loss traces have flattened after burn-in (:func:`slt.plot_trace`),
    (iii) ``frac_below_init`` is small (otherwise w* is not a minimum), and
    (iv) λ̂ is stable when the step size is halved (:func:`slt.calibrate`).
    """

    t_setup = time.perf_counter()
    _check_arguments(num_chains, num_draws, num_burnin, num_steps_bw_draws, mala_every, step_size, nbeta,
                     localization, batch_size, target_accept)
    control_variate, shared_batches, raise_on_divergence, extend_draws, check_halving, progress = _check_flags(
        control_variate, shared_batches, raise_on_divergence, extend_draws, check_halving, progress)
    check_sampler_kwargs(sampler, sampler_kwargs)
    check_observables("slt.estimate_llc", observables)
    model, models, state_dicts, files = load_checkpoint_files(model, models, state_dicts)  # paths read once
    differ = checkpoint_state_differences(model, models, state_dicts)
    if differ and not checkpoint_state_batchable(model, models, state_dicts, differ):
        # 0. checkpoints whose buffers differ, on a model with its own chain dimension, with sparse buffers or with
        # differing tensors larger than the sampled parameters: one run each, as if batched (otherwise each row of
        # the batched run holds its checkpoint's buffers)
        each = _each_checkpoint(checkpoint_modules(model, models, state_dicts), differ, data, loss_fn, seed, dict(
            num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin, num_steps_bw_draws=num_steps_bw_draws,
            step_size=step_size, nbeta=nbeta, localization=localization, batch_size=batch_size, sampler=sampler,
            sampler_kwargs=sampler_kwargs, observables=observables, restrict_to=restrict_to, device=device,
            dtype=dtype, autocast=autocast, vectorize=vectorize, mala_every=mala_every, target_accept=target_accept,
            divergence_threshold=divergence_threshold, control_variate=control_variate,
            shared_batches=shared_batches, raise_on_divergence=raise_on_divergence, extend_draws=extend_draws,
            check_halving=check_halving, num_threads=num_threads, progress=progress))
        return _with_files(files, each)

    # 1. the target: model, data, loss, w*, nβ, γ, and the groups (restrictions, distributions)
    target = prepare_target(model, data, loss_fn, models=models, state_dicts=state_dicts, nbeta=nbeta,
                            localization=localization, device=device, dtype=dtype, vectorize=vectorize, seed=seed,
                            restrict_to=restrict_to, autocast=autocast, checkpoint_state=True)
    # 2.-3. step size and sampler, folded over the minibatches
    run = sample_target(
        target, num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
        num_steps_bw_draws=num_steps_bw_draws, step_size=step_size, batch_size=batch_size, sampler=sampler,
        sampler_kwargs=sampler_kwargs, observables=observables, vectorize=vectorize, mala_every=mala_every,
        target_accept=target_accept, divergence_threshold=divergence_threshold, control_variate=control_variate,
        shared_batches=shared_batches, raise_on_divergence=raise_on_divergence, extend_draws=extend_draws,
        check_halving=check_halving, num_threads=num_threads, progress=progress, started=t_setup)
    # 4. one result per group, in the caller's shape
    results = run.results()
    _warn_groups(target, [res.diagnostics["warnings"] for res in results])
    return _with_files(files, target.arrange(results))


def _warn_groups(target: Target, found: list[list[str]]) -> None:
    """Each group's warnings (``found[g]``), one ``RuntimeWarning`` per kind: a warning that several groups
    raise with only its numbers differing (R-hat 1.22 at checkpoint 0, 1.18 at checkpoint 1, ...) is shown
    once, with the groups it holds for (``checkpoints 0–3``) and each differing number as the range of its
    values (:func:`_number_ranges`); each result's ``diagnostics["warnings"]`` keeps its own.  A 16-checkpoint
    curve raised up to 16 of each."""
    for _, groups, msg in _merge_findings([(g, "", w) for g, ws in enumerate(found) for w in ws]):
        where = _where_all(target, groups)
        warnings.warn(f"slt.estimate_llc{f' ({where})' if where else ''}: {msg}", RuntimeWarning,
                      stacklevel=user_stacklevel())


def _merge_findings(found: list[tuple[Any, str, str]]) -> list[tuple[str, list[Any], str]]:
    """``(group, key, text)`` findings -> one ``(key, groups, text)`` per kind, in order of first appearance:
    the texts of one ``key`` that differ only in their numbers are one kind, its text with each differing
    number as the range of its values (:func:`_number_ranges`)."""
    kinds: dict[tuple[str, str], list[tuple[Any, str]]] = {}
    for g, key, text in found:
        kinds.setdefault((key, _NUMBER.sub("#", text)), []).append((g, text))
    return [(key, [g for g, _ in items], _number_ranges([t for _, t in items])) for (key, _), items in kinds.items()]


#: a number in a warning's text (what differs between the groups that raise the same warning); not a digit of
#: a name (``l0h1``, ``blocks.0.attn``)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?![\w.]*[A-Za-z_])")


def _number_ranges(texts: list[str]) -> str:
    """One text for several that differ only in their numbers: each number that differs becomes the range of
    its values, ``lowest–highest`` as written (``R-hat 1.111–1.218 > 1.1``)."""
    first = texts[0]
    found = [list(_NUMBER.finditer(t)) for t in texts]
    out, end = [], 0
    for i, m in enumerate(found[0]):
        written = [f[i].group() for f in found]
        values = [float(w) for w in written]
        if len(set(values)) > 1:
            lo, hi = written[values.index(min(values))], written[values.index(max(values))]
            out.append(first[end:m.start()] + f"{lo}–{hi}")
            end = m.end()
    return "".join(out) + first[end:]


_PLURAL = {"checkpoint": "checkpoints", "restriction": "restrictions", "data": "data"}


def _where(target: Target, g: int) -> str:
    """Group ``g``'s labels for a message: ``checkpoint 2``, ``checkpoint 0, restriction 'l0h1'``, ... (the
    checkpoint only where the call has several: ``""`` for one model, unrestricted, on one distribution)."""
    return ", ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}"
                     for k, v in target.group_labels(g).items() if v is not None and _named(target, k))


def _named(target: Target, key: str) -> bool:
    """Whether a group label is named in messages: the checkpoint only in a call with several."""
    return key != "checkpoint" or target.K > 1


def _where_all(target: Target, groups: list[int]) -> str:
    """The labels of several groups: ``checkpoints 0–3, 7`` where only the checkpoint differs (likewise a
    restriction or a data label: ``checkpoint 0, restrictions 'l0h0', 'l0h1'``); where several labels differ
    and the groups are every combination of their values, the product (``checkpoints 0–2 × 8 restrictions
    'l0h0' … 'l1h3'``); otherwise each group's own, the first :data:`WHERE_SHOWN` of them and a count."""
    if len(groups) == 1:
        return _where(target, groups[0])
    labels = [target.group_labels(g) for g in groups]
    varying = [k for k in labels[0] if len({repr(lb[k]) for lb in labels}) > 1]
    values = {k: list(dict.fromkeys(lb[k] for lb in labels)) for k in varying}
    combos = {tuple(repr(lb[k]) for k in varying) for lb in labels}
    if len(combos) != len(labels) or len(combos) != math.prod(len(v) for v in values.values()):
        shown = "; ".join(_where(target, g) for g in groups[:WHERE_SHOWN])
        return shown + (f"; and {len(groups) - WHERE_SHOWN} more" if len(groups) > WHERE_SHOWN else "")
    parts, product, at = [], [], None
    for k, v in labels[0].items():
        if v is None or not _named(target, k):
            continue
        if k not in values:
            parts.append(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}")
            continue
        at = len(parts) if at is None else at
        vs = values[k]
        if all(isinstance(x, int) for x in vs):
            product.append(f"{_PLURAL[k]} {_ranges(sorted(vs))}")
        elif len(vs) <= 4:
            product.append(f"{_PLURAL[k]} {', '.join(map(repr, vs))}")
        else:
            product.append(f"{len(vs)} {_PLURAL[k]} {vs[0]!r} … {vs[-1]!r}")
    parts.insert(len(parts) if at is None else at, " × ".join(product))
    return ", ".join(parts)


#: groups named one by one in a warning whose groups are no product of their labels' values (:func:`_where_all`)
WHERE_SHOWN = 6


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0–3, 7"``."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if v == start else f"{start}–{v}" if v > start + 1 else f"{start}, {v}")
            start = None
    return ", ".join(out)


def _warn_jumps(adapt: Any, target: Target, caller: str) -> None:
    """Name the groups whose loss :func:`slt.stepsize.jump_ratio` found to jump, so that adaptation toward
    a Metropolis acceptance near 1 had collapsed their step (the run used ε₀ instead)."""
    if adapt is None or adapt.collapsed is None or adapt.collapse_cause != "jumps":
        return  # (SGHMC's collapse, "friction", is no jump: print(result) names it)
    coarse = dict(_precision_problems(target, PRECISION_SHARE))  # (a loss the dtype cannot resolve jumps by rounding)
    for g in (adapt.collapsed != adapt.step_size).nonzero().flatten().tolist():
        where = _where(target, g)
        warnings.warn(
            f"{caller}{f' ({where})' if where else ''}: the loss jumps where the chains step (it is discontinuous in "
            "w, e.g. top-k routing in a mixture of experts, argmax or rounding in forward): the Metropolis error of "
            f"the Langevin proposal fell only {float(adapt.jump_ratio[g]):.1f}× for a {JUMP_FACTOR:g}× smaller step "
            f"(a smooth loss: about {JUMP_FACTOR ** 1.5:g}×), so no step reaches the target acceptance, and "
            f"adapting toward it drove ε down to {float(adapt.collapsed[g]):.3g}, where the chains barely move. The "
            f"run used ε₀ = {float(adapt.step_size[g]):.3g} from the curvature at w* instead; the halving check "
            "says whether λ̂ depends on it. Pass step_size to choose it yourself (a sweep: slt.calibrate)."
            + (f" Here the jumps are likely rounding: {coarse[g]}." if g in coarse else ""),
            RuntimeWarning, stacklevel=user_stacklevel())


def _each_checkpoint(modules: list[nn.Module], differ: list[str], data: Any, loss_fn: Any, seed: Any,
                     kwargs: dict[str, Any]) -> Any:
    """:func:`estimate_llc` of each checkpoint in its own run, with the seed it has in a batched run
    (``seed + k``, or ``seed[k]``), the results in the batched call's shape (lists at the leaves) and
    each run's warnings re-labelled with its checkpoint."""
    seeds = _seeds(seed, len(modules))
    note = (f"the checkpoints differ in buffers or frozen parameters ({', '.join(differ[:4])}"
            f"{f' and {len(differ) - 4} more' if len(differ) > 4 else ''}), which a batched run cannot hold per "
            "checkpoint here (a model with forward_chains, a sparse buffer, or differing tensors larger than the "
            "sampled parameters): each checkpoint was estimated in its own run (same seeds as a batched run)")
    outs, found = [], []
    for k, (module, s) in enumerate(zip(modules, seeds)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                res = estimate_llc(module, data, loss_fn, seed=s, **kwargs)
            except LLCEstimationError as e:
                msg = str(e)  # the run held one model: name its checkpoint
                raise LLCEstimationError(msg.replace("every chain of ", f"every chain of checkpoint {k}, ", 1)
                                         if "every chain of " in msg else
                                         msg.replace("every chain ", f"every chain of checkpoint {k} ", 1)) from e
        found += [(k, w) for w in caught]
        for r in _leaves(res):
            r.config.update(checkpoint=k, num_checkpoints=len(modules))
            r.config["setup_notes"] = [note] + list(r.config.get("setup_notes", []))
        outs.append(res)
    _warn_runs(found)
    return _stack(outs)


def _warn_runs(found: list[tuple[int, Any]]) -> None:
    """The warnings of one run per checkpoint (``(k, caught warning)``), labelled with their checkpoint: the
    runs' warnings (``slt.estimate_llc: …``, ``slt.estimate_llc (restriction 'a'): …``: each run holds one model)
    grouped over the checkpoints as a batched call groups them (:func:`_warn_groups`), every other warning as it
    was raised."""
    findings = []
    for k, w in found:
        msg = str(w.message)
        if w.category is RuntimeWarning and msg.startswith("slt.estimate_llc: "):
            findings.append((k, "", msg[len("slt.estimate_llc: "):]))
        elif w.category is RuntimeWarning and msg.startswith("slt.estimate_llc (") and "): " in msg:
            rest, body = msg[len("slt.estimate_llc ("):].split("): ", 1)  # rest: "restriction 'a'"
            findings.append((k, ", " + rest, body))
        else:
            warnings.warn(msg, w.category, stacklevel=user_stacklevel())
    for rest, ks, msg in _merge_findings(findings):
        where = f"checkpoint {ks[0]}" if len(ks) == 1 else f"checkpoints {_ranges(ks)}"
        warnings.warn(f"slt.estimate_llc ({where}{rest}): {msg}", RuntimeWarning, stacklevel=user_stacklevel())


def _with_files(files: list[str | None] | None, res: Any) -> Any:
    """``res`` with ``config["checkpoint_file"]`` of each result, the file its checkpoint was read from
    (as it is when no checkpoint came from a file)."""
    for r in _leaves(res) if files is not None else []:
        r.config["checkpoint_file"] = files[int(r.config.get("checkpoint", 0))]
    return res


def _leaves(res: Any) -> list[LLCResult]:
    """The results in an :func:`estimate_llc` return value (a result, or lists and mappings of them)."""
    if isinstance(res, dict):
        return [r for v in res.values() for r in _leaves(v)]
    return [r for v in res for r in _leaves(v)] if isinstance(res, list) else [res]


def _stack(outs: list[Any]) -> Any:
    """``[result of checkpoint k]`` -> the batched shape: a list, or mappings of lists."""
    if isinstance(outs[0], dict):
        return {key: _stack([o[key] for o in outs]) for key in outs[0]}
    return list(outs)


@dataclass
class Sampling:
    """One sampling run of a prepared target, before it is summarised (:meth:`results`).

    Attributes
    ----------
    target
        The prepared target (its groups: checkpoints × restrictions × distributions).
    trace
        The run's :class:`slt.loop.Trace` (rows ``G * C``).
    step_size
        ε: a number, or ``(G*C, 1)`` per row.
    rule
        ``"adapt"``, ``"curvature"`` or ``"given"``.
    auto, adapt
        The curvature rule's :class:`slt.stepsize.StepSize` or the
        :class:`slt.stepsize.Adaptation` (``None`` when not used).
    halvings
        Times the step of diverging groups was halved and the run repeated.
    num_chains, num_steps, n_adapt
        Chains per group, steps of the run from w* (burn-in and draws) and the adaptation's steps
        before it.
    sampler
        The bound sampler's name.
    setup_seconds, adapt_seconds
        Set-up time (preparation included when ``started`` was given) and adaptation time.
    config
        What the run used (recorded with every result).
    """

    target: Any
    trace: Trace
    step_size: float | Tensor
    rule: str
    auto: Any
    adapt: Any
    halvings: int
    num_chains: int
    num_steps: int
    n_adapt: int
    sampler: str
    setup_seconds: float
    adapt_seconds: float
    config: dict[str, Any]
    #: per group, warnings about the run as a whole (e.g. the automatic γ reached its limit)
    notes: dict[int, str] = field(default_factory=dict)
    #: ``(G*C,)`` the estimate of each row at half its step with the same steps (:func:`_halved_estimates`)
    halved: Tensor | None = None
    #: ``(G*C,)`` the first-order excess of each row's λ̂ from minibatch noise (:func:`slt.diagnostics.minibatch_heating`;
    #: ``None`` at full batch)
    heating: Tensor | None = None
    #: ``(G*C,)`` each row's spread at the end of the run over a free walk's (:func:`slt.diagnostics.free_diffusion`;
    #: plain SGLD, else ``None``)
    diffusion: Tensor | None = None
    #: per group, the continued ε/2 check (:func:`_continued_halving`; ``None``: not run)
    direct: dict[int, dict[str, Any]] | None = None
    #: per group whose automatic step was shrunk for SGLD's step bias: ``{"fraction", "factor"}``
    #: (:func:`_step_bias_rescale`)
    bias_rescale: dict[int, dict[str, float]] | None = None

    def group_step_size(self, g: int) -> float:
        eps = self.step_size
        return float(eps[g * self.num_chains]) if isinstance(eps, Tensor) else float(eps)

    def results(self) -> list[LLCResult]:
        """One :class:`slt.LLCResult` per group (``G``), in group order."""
        target, C, trace = self.target, self.num_chains, self.trace
        init = target.group_init_loss
        dims = _moved_dims(target, target.G * C)
        masks = target.groups.masks
        halved, heating, diffusion = self.halved, self.heating, self.diffusion
        gsq = trace.grad_sq  # (plain SGLD; None for the other samplers)
        bias = None if gsq is None or self.sampler != "sgld" else step_bias(gsq, self.step_size, target.nbeta)
        times = _draw_times(trace, self.config["num_burnin"], self.config["num_steps_bw_draws"])
        out = []
        for g in range(target.G):
            tr = trace.rows(slice(g * C, (g + 1) * C))
            labels = target.group_labels(g)
            diag = {
                "path": target.path, "path_reason": target.path_reason,
                "seconds": trace.seconds, "setup_seconds": self.setup_seconds, "adapt_seconds": self.adapt_seconds,
                "chain_steps_per_second": self.num_steps * target.G * C / max(trace.seconds, 1e-12),
                "step_size_halvings": self.halvings,
            }
            diag.update(_step_size_diagnostics(self.auto, self.adapt, g, labels["checkpoint"]))
            shrunk = (self.bias_rescale or {}).get(g)
            diag["step_bias_rescale"] = None if shrunk is None else {
                **shrunk, "from": self.group_step_size(g) / shrunk["factor"], "to": self.group_step_size(g)}
            check = None if self.direct is None else self.direct.get(g)
            diag["halving_direct"] = None if check is None else {k: v for k, v in check.items() if k != "message"}
            notes = [self.notes[g]] if g in self.notes else []
            if check is not None and check["message"]:
                notes.append(check["message"])
            eps_g = self.group_step_size(g)
            config = {**self.config, "step_size": eps_g, "seed": target.group_seeds[g], **labels}
            mask = None if masks is None else masks[g // target.groups.D % target.groups.M]
            if mask is not None:
                config["restricted_params"] = int(mask.sum())
            if target.groups.parts is not None:  # data-refined: the size of this group's own distribution
                config["n"] = int(target.groups.parts[g % target.groups.D].support)
            coarse = resolution_problem(target.w_star[labels["checkpoint"]], eps_g, self.sampler, target.dtype, mask)
            if coarse:  # (a reason for converged = False, warned with the others)
                notes.append(coarse)
            out.append(LLCResult.from_traces(
                tr.loss, tr.star, nbeta=target.nbeta, init_loss=float(init[g]), step_size=eps_g,
                localization=target.localization, sampler=self.sampler, burnin=tr.burnin, observables=tr.observables,
                diverged=tr.diverged, divergence_step=tr.divergence_step, draw_steps=tr.draw_steps, mala=tr.mala,
                halved=None if halved is None else halved[g * C:(g + 1) * C],
                heating=None if heating is None else heating[g * C:(g + 1) * C],
                step_bias=None if bias is None else bias[g * C:(g + 1) * C],
                diffusion=None if diffusion is None else diffusion[g * C:(g + 1) * C], draw_times=times,
                dims=float(dims[g * C]) if isinstance(dims, Tensor) else float(dims),
                slope=tr.slope, slope_check=target.groups.parts is None, issues=target.issues,
                diagnostics=diag, config=config,
                warnings=notes or None,
            ))
        return out


def _note_prior_scale(target: Target, caller: str) -> Target:
    """The target with a note (``config["setup_notes"]``, printed; warned beyond :data:`PRIOR_SCALE_WARN` × nβ) when
    a given γ exceeds nβ: the localization then
    sets the scale of every direction whose loss curvature is below γ/nβ > 1, and λ̂ falls toward 0 as γ grows,
    "converged" (helper 34: a 3-4-1 MLP at nβ = 94 read 2.6 at γ = 10, 0.74 at 300, 0.035 at 10⁴, 0.0003 at 10⁶).
    The automatic γ never goes there (:func:`localization_levels`)."""
    gamma, nb = float(target.localization), float(target.nbeta)
    if target.localization_auto or not gamma > nb:
        return target
    note = (f"localization γ = {gamma:g} exceeds nβ = {nb:.4g}: the localization, not the loss, holds every direction "
            f"whose loss curvature is below γ/nβ = {gamma / nb:.3g}, so λ̂ counts only the directions stiffer than "
            "that and falls toward 0 as γ grows; it is not comparable with estimates at γ below nβ (the automatic "
            "γ stays below it: localization=None)")
    if note in target.notes:
        return target
    if gamma > PRIOR_SCALE_WARN * nb:  # (far beyond: most of a network's directions are the prior's)
        warnings.warn(f"{caller}: {note}", RuntimeWarning, stacklevel=user_stacklevel())
    return replace(target, notes=[*target.notes, note])


#: :func:`_note_prior_scale` warns (beyond noting) when a given γ exceeds this many times nβ
PRIOR_SCALE_WARN = 10.0


def _note_batch_statistics(target: Target, minibatches: bool) -> Target:
    """The target with :func:`slt.target.batch_statistics_issue` among its issues (and warned) when its
    model normalises by batch statistics in eval mode and the run draws minibatches: the estimate is then
    of another potential than n·β·L_n, so it is not converged (a full-batch run is exact)."""
    note = batch_statistics_issue(target.model) if minibatches else None
    if note is None or note in target.issues:
        return target
    warnings.warn(f"slt: {note}", RuntimeWarning, stacklevel=user_stacklevel())
    return replace(target, issues=[*target.issues, note])


def _note_loader_cycle(target: Target, thin: int) -> Target:
    """The target with an issue (and warned) when its DataLoader does not shuffle and the draws, taken every
    ``thin`` steps, fall on only some positions of its fixed cycle of batches: each draw's loss is then always
    read on the same few batches, just after the chains stepped on the ones before them (a time-ordered
    regression at ``num_steps_bw_draws`` = its 4 batches read λ̂ 1.64 ± 0.04 against 2.05, converged)."""
    cycle = target.source.fixed_cycle if isinstance(target.source, LoaderSource) else None
    common = math.gcd(int(thin), cycle) if cycle else 1
    if common == 1:
        return target
    note = (f"the DataLoader does not shuffle, so it yields the same cycle of {cycle} batches every epoch, and "
            f"the draws, every {thin} steps, fall on only {cycle // common} of its {cycle} positions: every draw's "
            "loss is read on the same batches. Pass shuffle=True with a generator (DataLoader(..., shuffle=True, "
            "generator=torch.Generator().manual_seed(s))), or the dataset itself (slt then draws independent "
            "minibatches), or a num_steps_bw_draws with no common factor with the cycle")
    warnings.warn(f"slt: {note}", RuntimeWarning, stacklevel=user_stacklevel())
    return replace(target, issues=[*target.issues, note])


@autograd_allowed
def sample_target(
    target: Any,
    *,
    num_chains: int = LLC.num_chains,
    num_draws: int = LLC.num_draws,
    num_burnin: int | None = LLC.num_burnin,
    num_steps_bw_draws: int = LLC.num_steps_bw_draws,
    step_size: float | str | None = LLC.step_size,
    batch_size: int | str | None = LLC.batch_size,
    sampler: str | SamplerSpec = LLC.sampler,
    sampler_kwargs: Mapping[str, Any] | None = None,
    observables: Mapping[str, Observable] | None = None,
    on_draw: Callable[[Tensor], None] | None = None,
    on_start: Callable[[], None] | None = None,
    vectorize: str = "auto",
    mala_every: int = LLC.mala_every,
    target_accept: float = LLC.target_accept,
    divergence_threshold: float | None = None,
    control_variate: bool = True,
    shared_batches: bool = False,
    raise_on_divergence: bool = True,
    extend_draws: bool | int = LLC.extend_draws,
    check_halving: bool | None = LLC.check_halving,
    num_threads: int | None = None,
    progress: bool | None = None,
    started: float | None = None,
    caller: str = "slt.estimate_llc",
) -> Sampling:
    r"""Sample a prepared target (:func:`slt.prepare_target`): the engine behind
    :func:`estimate_llc` and every estimator built on its runs (e.g. :func:`slt.bif`).

    Arguments as for :func:`estimate_llc`; ``on_draw(params)`` is called at every draw with the
    ``(G*C, d)`` parameters of all rows (without grad; rows of diverged chains sit at ``w*``, see
    ``trace.diverged``), for estimators that accumulate their own statistics online; ``on_start()``
    before the draws of every run (a run whose chains diverged under an automatic step is repeated
    with a halved step: statistics gathered by ``on_draw`` start over).  ``started``:
    a ``time.perf_counter()`` stamp from before the target was prepared (counted as set-up); ``caller``:
    the public function named in warnings and errors.

    Steps: the minibatch stream (:meth:`slt.target.Target.batches`); the path (``vectorize="auto"``:
    :func:`slt.target.fastest_path`); the step size (adapted during burn-in, the curvature rule,
    or given); :func:`slt.loop.run_chains`, repeated with the step of diverging groups halved
    under an automatic rule; with the automatic γ (``localization=None`` at preparation) the whole
    run repeated from fresh streams with γ ten times larger while any group has not settled
    (:func:`localization_levels`; ``on_start`` is called again); with ``sampler="auto"`` the fallback samplers
    at the last γ, or critically damped SGHMC first there where SGLD's run would be mostly burn-in
    (:data:`slt.defaults.SGHMC_FIRST_BURNIN`); an :class:`LLCEstimationError` when every chain of a group diverged.
    """
    t_setup = time.perf_counter() if started is None else started
    burnin_auto = num_burnin is None
    num_chains, num_draws, num_burnin, num_steps_bw_draws, mala_every, batch_size = _check_arguments(
        num_chains, num_draws, num_burnin, num_steps_bw_draws, mala_every, step_size, None, None,
        batch_size, target_accept)
    control_variate, shared_batches, raise_on_divergence, extend_draws, check_halving, progress = _check_flags(
        control_variate, shared_batches, raise_on_divergence, extend_draws, check_halving, progress)
    auto_sampler = isinstance(sampler, str) and sampler.lower() == "auto"
    check_sampler_kwargs(sampler, sampler_kwargs)
    spec = resolve_sampler(sampler)
    _check_restrictable(spec, target)
    batch_auto = batch_size == "auto"
    _check_loader_batch_size(target, batch_size, caller)
    if batch_auto:
        batch_size = BATCH_SIZE
    target = _note_batch_statistics(target, minibatches=batch_size is not None or isinstance(target.source, LoaderSource))
    target = _note_loader_cycle(target, num_steps_bw_draws)
    probe_observables(caller, observables, target)
    _check_precision(target)
    target = _note_prior_scale(target, caller)
    C, G, dev = num_chains, target.G, target.device
    rows = target.rows(C)  # (G*C, d)
    if isinstance(step_size, Tensor) and step_size.numel() == 1:  # (a 0-d tensor or array: its number)
        step_size = float(step_size)
    rule = _step_size_rule(step_size)
    kw = dict(sampler_kwargs or {})
    num_steps = num_burnin + num_draws * num_steps_bw_draws
    thresh = divergence_threshold if divergence_threshold is not None else 1000.0 * max(target.d, 1)
    n_adapt = max(ADAPT_MIN_STEPS, num_burnin - num_burnin // 5) if rule == "adapt" else 0
    gammas = localization_levels(target)
    escalations: list[dict[str, Any]] = []
    batch_raises: list[dict[str, Any]] = []
    if num_threads is not None:
        num_threads = check_int("num_threads", num_threads, 1)
    slopes: dict[int | None, Tensor | None] = {}  # the slope at w* by batch size, shared by this call's runs

    first_spec = spec

    def run_once(target: Any, batch_size: int | None, choose: str | None, spec: SamplerSpec = spec,
                 fixed: tuple[Tensor | float, int, int] | None = None, defer_costly: bool = False) -> dict[str, Any]:
        """One run (:func:`_run_at`) with this call's settings; ``fixed = (ε, num_steps, num_burnin)``: a
        check run at that step and length instead, without observables or the estimator's hooks."""
        # sampler="auto": sampler_kwargs are SGLD's (check_sampler_kwargs); a fallback takes those it accepts
        kw_s = kw if spec is first_spec else {k: v for k, v in kw.items() if spec.accepts(k)}
        if fixed is None:
            return _run_at(target, rows, spec, rule, step_size, kw_s, C, num_steps, num_burnin, burnin_auto, n_adapt,
                           num_steps_bw_draws, batch_size, control_variate, shared_batches, mala_every,
                           target_accept, thresh, num_threads, observables, on_draw, on_start, choose, progress,
                           t_setup, slopes, final_level=target.localization >= gammas[-1], defer_costly=defer_costly,
                           heating_handled=(batch_auto and len(batch_raises) < BATCH_RAISES
                                            and not isinstance(target.source, LoaderSource)))
        eps, steps, burnin = fixed
        return _run_at(target, rows, spec, "given", eps, kw_s, C, steps, burnin, False, 0, num_steps_bw_draws,
                       batch_size, control_variate, shared_batches, mala_every, target_accept, thresh,
                       num_threads, None, None, None, choose, progress, t_setup)

    def attempt(name: str) -> dict[str, Any]:
        """A run of sampler ``name`` (its spec's defaults, e.g. ``friction="auto"``, recorded in the config) at the
        target's γ, extended while unmixed, judged by its own checks and, when they pass, by a direct run at
        ε/2 with the same steps (the in-run halving estimate assumes SGLD in a fixed metric)."""
        alt_spec = SAMPLERS[name]()
        alt = run_once(target, batch_size, None, alt_spec)
        alt_ext = _extend_while_unmixed(alt, target, rows, extend_draws, num_draws, alt["thin"], G, C,
                                        observables, on_draw, thresh, progress)
        alt.pop("final", None)
        alt_halved, alt_unsettled = _verdict(alt, target, G, C, alt["thin"])
        seconds = alt["trace"].seconds + alt["adapt_seconds"] + sum(e["seconds"] for e in alt_ext)
        halving = None
        if not alt_unsettled:
            half = run_once(target, batch_size, None, alt_spec,
                            fixed=(alt["eps"] / 2, alt["num_steps"], alt["num_burnin"]))
            half.pop("final", None)
            seconds += half["trace"].seconds
            halving = _direct_halving(alt["trace"], half["trace"], target.nbeta, G, C)
            alt_unsettled = {g: [h["message"]] for g, h in halving.items() if h["message"]}
        record = {"sampler": alt_spec.name, "settled": not alt_unsettled, "halving": halving,
                  "seconds": seconds, "reasons_after": _reasons(alt_unsettled, target)}
        return {"run": alt, "extensions": alt_ext, "halved": alt_halved, "spec": alt_spec, "record": record}

    judge = target.localization_auto and num_draws >= LOCALIZATION_MIN_DRAWS  # (fewer draws: too noisy to act on)
    # sampler="auto" with the adapted step: SGHMC before SGLD where SGLD's run at the last γ would be mostly burn-in
    # (full batch; _run_at stops after adapting SGLD's step and says so with run["deferred"])
    auto_fallback = auto_sampler and rule == "adapt" and on_draw is None
    level_extensions: list[dict[str, Any]] = []  # draws added at the γ kept (before the ladder would raise it)
    for level, gamma in enumerate(gammas):  # γ raised tenfold while the chains do not settle (automatic γ)
        level_extensions = []
        target = replace(target, localization=gamma) if gamma != target.localization else target
        last_level = level == len(gammas) - 1
        run = run_once(target, batch_size, vectorize if level == 0 else None,
                       defer_costly=auto_fallback and judge and last_level and gamma > LOCALIZATION)
        target = run["target"]
        if "deferred" in run:
            break
        while batch_auto and len(batch_raises) < BATCH_RAISES:  # minibatch noise heats the chains: a larger batch
            raised = _raised_batch(run, target, spec, C, batch_size)
            if raised is None:
                break
            batch_raises.append({**raised, "localization": gamma,
                                 "seconds": run["trace"].seconds + run["adapt_seconds"]})
            batch_size = raised["to"]
            run.pop("final", None)
            run = run_once(target, batch_size, None)
            target = run["target"]
        halved, unsettled = _verdict(run, target, G, C, run["thin"], judge)
        if unsettled and not last_level and _only_unmixed(run, target, G, C, run["thin"], unsettled):
            # chains that relaxed but have not mixed yet: more draws at this γ, not a tenfold γ, which biases λ̂ low
            # wherever γ rivals the loss's curvature (a redundant scale direction: R-hat 1.102 at ESS 39 raised γ
            # 1 → 10 → 100 = 0.7 nβ and λ̂ came out 3.1 against 5)
            level_extensions = _extend_while_unmixed(run, target, rows, extend_draws, num_draws, run["thin"],
                                                     G, C, observables, on_draw, thresh, progress)
            if level_extensions:
                halved, unsettled = _verdict(run, target, G, C, run["thin"], judge)
        if not unsettled or last_level:
            break
        escalations.append({"localization": gamma, "seconds": run["trace"].seconds + run["adapt_seconds"],
                            "reasons": _reasons(unsettled, target), "draw_extensions": level_extensions,
                            # (for print(result): which groups drove it, and their first finding)
                            "groups": [w for g in unsettled if (w := _where(target, g))],
                            "finding": next(iter(unsettled.values()))[0]})
        run.pop("final", None)
    first_name, tried, adopted, extensions = spec.name, [], False, list(level_extensions)
    direct: dict[str, Any] | None = None  # the continued ε/2 check (_continued_halving)
    first = run.get("deferred")
    if first is not None:  # critically damped SGHMC first; SGLD with its whole burn-in if it does not settle
        first = {**first, "seconds": run["adapt_seconds"]}
        alt = attempt(FALLBACK_SAMPLERS[0])
        tried.append(alt["record"])
        if alt["record"]["settled"]:
            run, extensions, halved, unsettled, spec = alt["run"], alt["extensions"], alt["halved"], {}, alt["spec"]
            adopted = True
        else:  # SGLD's deferred run goes on from its adapted step (its adaptation is in first["seconds"])
            run = run["resume"]()
            target = run["target"]
            halved, unsettled = _verdict(run, target, G, C, run["thin"], judge)
    if not adopted:
        # chains stationary but not yet mixed: continue them (no new burn-in) rather than report R-hat > 1.1
        more = _extend_while_unmixed(run, target, rows, extend_draws, num_draws, run["thin"], G, C,
                                     observables, on_draw, thresh, progress)
        if more:
            halved, unsettled = _verdict(run, target, G, C, run["thin"], judge)
        extensions = extensions + more
        # the draws at ε against the same chains continued at ε/2 (before their state is dropped)
        direct = _continued_halving(run, target, spec, rows, check_halving, rule, unsettled if judge else None,
                                    run["thin"], G, C, thresh, progress)
        run.pop("final", None)
        if first is not None:
            tried.append({"sampler": first_name, "settled": not unsettled, "halving": None,
                          "seconds": run["trace"].seconds + sum(e["seconds"] for e in extensions),
                          "reasons_after": _reasons(unsettled, target)})
    # sampler="auto": SGLD's chains have not settled at the γ reached.  SGHMC damped critically for the directions
    # γ alone holds relaxes them in ~1/√(ηγ) steps instead of 1/(ηγ); RMSProp-SGLD (preconditioner frozen after
    # burn-in) moves flat directions 1/a times faster.  The first whose run settles replaces SGLD's.
    # (only with the adapted step: a given ε was chosen for SGLD; and not for estimators whose online
    # statistics follow one run)
    reasons = (_reasons(unsettled, target) if first is None
               else [f"at γ = {target.localization:g}, SGLD's adapted ε = {first['step_size']:.3g} would need a burn-in"
                     f" of {RELAXATION_TIMES}/(εγ) = {first['relaxation_steps']} steps, {first['relaxation_steps'] / first['draw_steps']:.1f}"
                     f" × the draws' {first['draw_steps']}"])
    if auto_fallback and unsettled:
        for name in _fallback_samplers(run["batches"].full):
            if any(t["sampler"] == name for t in tried):
                continue
            alt = attempt(name)
            tried.append(alt["record"])
            if alt["record"]["settled"]:
                run, extensions, halved, unsettled, spec = (alt["run"], alt["extensions"], alt["halved"], {},
                                                            alt["spec"])
                break
    if check_halving is not False and run["smp"].name != "sgld":  # (a fallback's draws; SGHMC first, adopted)
        direct = _not_sgld(run["smp"].name)
    fallback = None
    if tried:
        last = tried[-1]
        fallback = {"from": first_name, "to": last["sampler"], "localization": target.localization,
                    "reasons": reasons, "settled": last["settled"], "halving": last["halving"],
                    "seconds": sum(t["seconds"] for t in tried), "tried": tried, "first": first}
        if not last["settled"]:
            fallback["reasons_after"] = last["reasons_after"]
    # groups still unsettled after γ was raised: say that the automatic γ ran out
    others = [] if fallback is None else [t["sampler"] for t in fallback["tried"] if t["sampler"] != first_name]
    tried_text = (" (" + " and ".join(FALLBACK_NAMES[t][0] if t in FALLBACK_NAMES else t for t in others)
                  + ", tried at that γ, did not settle either)" if others
                  else "" if auto_sampler
                  else ", or sampler='sghmc' or 'rmsprop_sgld'" if run["batches"].full  # (SGHMC runs hot on minibatches)
                  else ", or sampler='rmsprop_sgld'")
    limit = {g: (f"the automatic localization was raised to γ = {target.localization:g} ({_ladder_end(gammas, target.nbeta)})"
                 " and the chains still have not settled: pass a larger localization, more num_burnin/num_draws"
                 + tried_text)
             for g in unsettled} if escalations else {}
    trace, eps, smp, batches, potential = run["trace"], run["eps"], run["smp"], run["batches"], run["potential"]
    auto, adapt, halvings, kw = run["auto"], run["adapt"], run["halvings"], run["kw"]
    setup_seconds, adapt_seconds = run["setup_seconds"], run["adapt_seconds"]
    num_threads, num_burnin, num_steps = run["num_threads"], run["num_burnin"], run["num_steps"]
    if raise_on_divergence:  # before the warning: the error names the same chains
        _raise_if_all_diverged(trace.diverged.view(G, C).all(1), spec, potential, target, rows, eps, thresh,
                               min(200, num_steps), None if batches.full else batches.batch_size, kw)
    _warn_divergent(trace.diverged, trace.divergence_step, C, thresh, caller, target)
    _warn_jumps(adapt, target, caller)
    config = {
        "num_chains": C, "num_draws": int(trace.loss.shape[1]), "num_draws_requested": num_draws,
        "draw_extensions": extensions, "num_burnin": num_burnin,
        "num_burnin_rule": ("given" if not burnin_auto else "relaxation" if num_burnin > num_draws // 4
                            else "quarter"),
        "num_steps_bw_draws": run["thin"], "step_size_auto": rule != "given", "step_size_rule": rule,
        "target_accept": target_accept if rule == "adapt" else None,
        "nbeta": target.nbeta, "localization": target.localization,
        "batch_size": None if batches.full else batches.batch_size,
        "batch_size_rule": "loader" if isinstance(target.source, LoaderSource) else "auto" if batch_auto else "given",
        "batch_size_raises": batch_raises, "n": target.n, "sampler": smp.name,
        "sampler_requested": sampler if isinstance(sampler, str) else spec.name, "sampler_fallback": fallback,
        "relaxation_gain": float(getattr(smp, "relaxation_gain", 1.0)),
        "sampler_kwargs": {**spec.kwargs, **dict(sampler_kwargs or {})}, "device": str(dev),
        "dtype": str(target.dtype).replace("torch.", ""), "vectorize": vectorize, "path": target.path,
        "compiled_calls": None if target.evaluator.compiled is None else target.evaluator.compiled.calls,
        "autocast": None if target.evaluator.autocast is None else str(target.evaluator.autocast).replace("torch.", ""),
        "fused_activations": fused_summary(target.evaluator.fused),
        "setup_notes": list(target.notes) + list(getattr(target.evaluator, "notes", [])),
        "mala_every": mala_every, "divergence_threshold": thresh, "num_threads": num_threads,
        "allocator": run["allocator"], "control_variate": control_variate, "shared_batches": batches.shared,
        "num_params": target.d,
        "num_checkpoints": target.K, "versions": versions(),
        "localization_auto": target.localization_auto, "localization_escalations": escalations,
        "check_halving": check_halving,
        "halving_check": None if direct is None else {k: v for k, v in direct.items() if k != "groups"},
    }
    return Sampling(target, trace, eps, rule, auto, adapt, halvings, C, num_steps, n_adapt, smp.name,
                    setup_seconds, adapt_seconds, config, notes=limit, halved=halved, heating=run["heating"],
                    diffusion=run["diffusion"], direct=None if direct is None else direct.get("groups"),
                    bias_rescale=run.get("bias_rescale"))


def _fallback_samplers(full_batch: bool) -> tuple[str, ...]:
    """:data:`slt.defaults.FALLBACK_SAMPLERS`, without SGHMC on minibatches: its velocity keeps the gradient
    noise for 1/α steps, so minibatch noise heats it 1/α times more than SGLD (measured at every default on
    the known answers of ``benchmarks/minibatch_defaults.py``, 2026-12-06: with the critical friction at γ = 1
    λ̂ read +19% to +82% above them at the batch the heating check raised to, +89% to +677% at batch 256,
    against SGLD's +10% to +14%; at full batch +5% to +8%, SGLD's +3% to +8%)."""
    return tuple(s for s in FALLBACK_SAMPLERS if full_batch or s != "sghmc")



def _check_loader_batch_size(target: Any, batch_size: Any, caller: str) -> None:
    """Warn that a ``batch_size`` a DataLoader's run cannot honour is ignored: the run takes the loader's
    batches as they come (a full-batch request ran on the loader's batches of 4, silently, recorded as
    given; ``config["batch_size_rule"]`` is now ``"loader"``)."""
    source = target.source
    if not isinstance(source, LoaderSource) or batch_size == "auto":
        return
    own = source.batch_size
    if batch_size is not None and batch_size == own:
        return
    asked = "full batch (batch_size=None)" if batch_size is None else f"batch_size={batch_size}"
    warnings.warn(
        f"{caller}: data is a DataLoader, whose batches ({own if own is not None else 'of its own size'}) are "
        f"the run's: {asked} is ignored; leave batch_size at its default, or pass the data as tensors or a Dataset "
        "(then slt draws batches of the size asked for, or uses all of the data at batch_size=None)",
        RuntimeWarning, stacklevel=user_stacklevel())


def _run_at(target, rows, spec, rule, step_size, kw, C, num_steps, num_burnin, burnin_auto, n_adapt, thin, batch_size,
            control_variate, shared_batches, mala_every, target_accept, thresh, num_threads, observables,
            on_draw, on_start, choose, progress, t_setup, slopes=None, final_level=False,
            defer_costly=False, heating_handled=False) -> dict[str, Any]:
    """One run at the target's γ, from fresh random streams: the minibatch stream, the path
    (measured when ``choose`` is ``"auto"``; compiled when ``"compile"``), the step size (adapted,
    curvature rule or given), the burn-in (with ``burnin_auto``, :func:`slt.defaults.default_burnin` at the
    run's ε and γ; ``final_level``: γ is the last the run can use, see its ``final``), and the sampler folded
    over the batches, repeated with the step of diverging groups halved under an automatic rule.  ``slopes``: the call's slope estimates by batch size
    (:func:`slope_gradient`, taken once: w*, the data and the seeds do not change between its runs), or
    ``None`` for a check run that records no slope.  ``defer_costly``: at full batch with the automatic burn-in,
    stop once the step is adapted when the relaxation burn-in would exceed :data:`slt.defaults.SGHMC_FIRST_BURNIN`
    times the draws' steps, returning ``{"deferred": {...}, "target", "adapt_seconds", "resume"}`` instead of a run
    (``resume()`` goes on with the run as it would have gone: the same streams, path and adapted step).
    With an automatic step at the default acceptance target, a plain-SGLD run whose step bias exceeds
    :data:`slt.defaults.STEP_BIAS_SHARE` of λ̂ in some group is repeated once at that group's shrunk step
    (:func:`_step_bias_rescale`: the discretisation part when ``heating_handled``, i.e. the caller raises an
    automatic batch for the heating, else the whole bias) with the steps between draws and the automatic
    burn-in stretched by the same factor (``run["thin"]``, ``run["bias_rescale"]``)."""
    G, dev = target.G, target.device
    rng = ChainRNG(target.group_seeds, C, dev)
    batches = target.batches(rng, C, batch_size, control_variate=control_variate, shared=shared_batches)
    noise = _MaskedNoise(rng, target.groups, target.K) if target.groups.masks is not None else rng
    auto = auto_step_size(target, batches) if rule == "curvature" else None
    kw = {"deterministic": batches.full, **kw}
    if num_threads is None:
        num_threads = small_work_threads(G * C * (batches.batch_size or 1) * target.d, dev)

    def sample(allocator: Any) -> dict[str, Any]:
        """The sampler from w* at the frozen step ε (the burn-in, the draws, halvings of a diverging automatic
        step) and the end-of-run readings."""
        nonlocal eps, num_burnin, num_steps
        # the slope at w*: each draw's displacement projected on it (w* not a minimum, slt.result.slope_finding)
        found = None
        if slopes is not None:
            key = None if batches.full else batches.batch_size
            found = slopes[key] if key in slopes else slopes.setdefault(key, slope_gradient(target, key))
        slope = None if found is None else _slope_dots(rows, found, target.K, target.groups.M, C)
        rescaled: dict[int, dict[str, float]] = {}
        stretch, first_burnin = 1, num_burnin
        while True:  # (twice at most: again after an automatic step was shrunk for SGLD's step bias)
            final, trace, smp, halvings = run_once(slope, stretch, first_burnin)
            heating, diffusion = _end_of_run(target, rows, smp, potential, batches, final, eps, num_steps)
            # (an automatic step at the default acceptance target: another target_accept chooses its step's bias;
            # and runs of at least LOCALIZATION_MIN_DRAWS draws: fewer are too noisy to act on, as for γ)
            if not (rule == "curvature" or rule == "adapt" and target_accept == LLC.target_accept) or rescaled \
                    or smp.name != "sgld" or num_draws < LOCALIZATION_MIN_DRAWS:
                break
            rescaled = _step_bias_rescale(trace, eps, target.nbeta, G, C, heating if heating_handled else None)
            if not rescaled:
                break
            # the run again at the shrunk steps over the same time ε·t: its burn-in (automatic) and the steps
            # between draws `stretch` times longer, so the slow directions relax and mix as far as in the first run
            eps = _scale_steps(eps, rescaled, G, C, target.dtype, dev)
            stretch, first_burnin = math.ceil(1 / min(f["factor"] for f in rescaled.values()) - 1e-9), num_burnin
            for f in rescaled.values():
                f["stretch"] = stretch
            del final, trace
        return {"target": target, "trace": trace, "eps": eps, "smp": smp, "batches": batches, "potential": potential,
                "heating": heating, "diffusion": diffusion, "auto": auto, "adapt": adapt, "halvings": halvings, "kw": kw,
                "setup_seconds": setup_seconds, "adapt_seconds": adapt_seconds, "num_threads": num_threads, "num_burnin": num_burnin,
                "num_steps": num_steps, "allocator": allocator, "final": final, "noise": noise, "slope": slope,
                "bias_rescale": rescaled, "thin": thin * stretch}

    def run_once(slope: Any, stretch: int = 1, first_burnin: int = 0) -> tuple[Any, Trace, Any, int]:
        """The run from w* at ε (the burn-in and the draws), repeated with the step of diverging groups
        halved under an automatic rule: ``(final state, trace, sampler, halvings)`` (``slope``: the slope
        probe, :func:`_slope_dots`; ``stretch``: a factor on the steps between draws and on the automatic
        burn-in, at least ``stretch × first_burnin``)."""
        nonlocal eps, num_burnin, num_steps
        step = thin * stretch
        for halvings in range(MAX_HALVINGS + 1 if rule != "given" else 1):
            smp = build_sampler(spec, potential, eps, mala_every=mala_every, **kw)
            if burnin_auto:  # cover the slowest relaxation γ allows at this ε, when affordable
                # (RMSProp-SGLD moves flat directions 1/a times faster, critically damped SGHMC about 1/α)
                gain = float(getattr(smp, "relaxation_gain", 1.0))
                # (each group's own rule, the longest of them: a group whose relaxation is beyond the cap does
                # not shorten the burn-in of one within it)
                num_burnin = max([stretch * first_burnin] + [
                    default_burnin(num_draws, step, e, target.localization, gain, final=final_level)
                    for e in _group_steps(eps)])
            num_steps = num_burnin + num_draws * step
            if on_start is not None:
                on_start()
            final, trace = run_chains(
                smp, build_sampler(spec, potential, 1.0, mala_every=0, **kw).init(rows),
                batches, noise, num_steps,
                num_burnin=num_burnin, thin=step, observe=_observe(target.spec, observables, on_draw),
                divergence=Divergence(thresh, target.nbeta, rows, 10 if dev.type == "cpu" else 25),
                nbeta=target.nbeta, progress=show_progress(progress, num_steps * G * C), slope=slope,
                slope_every=SLOPE_EVERY,
            )
            bad = trace.diverged.view(G, C).any(1)
            if rule == "given" or halvings == MAX_HALVINGS or not bool(bad.any()):
                break
            eps = _halve(eps, bad, C, target.dtype)
            del final
        return final, trace, smp, halvings

    with intra_op_threads(num_threads), retained_heap(dev) as allocator:
        if choose in ("auto", "compile"):  # vmap, the loop or the compiled step, whichever is measured faster here
            target = fastest_path(target, rows, None if batches.full else batches.batch_size, num_steps=num_steps,
                                  shared=batches.shared, compile=True if choose == "compile" else None)
        if (target.path == "vmap" and target.groups.masks is not None and target.evaluator.row_plan is None
                and not target.evaluator.row_plan_failed):
            plan = target.groups.row_plan(target.K, C, target.spec)  # restricted rows share what they can
            if plan is not None:
                target.evaluator.row_plan = (rows.shape[0], [(r.to(dev), n) for r, n in plan])
        potential = LocalizedPotential(_loss_and_grad(target), rows, target.nbeta, target.localization)
        probe = build_sampler(spec, potential, 1.0, mala_every=0, **kw)
        state = probe.init(rows)
        setup_seconds = time.perf_counter() - t_setup
        adapt = None
        if rule == "adapt":
            eps0, _ = initial_step_size(target, batches)
            state, adapt = adapt_step_size(spec, potential, state, batches, noise, n_adapt,
                                           eps0, C, threshold=thresh,
                                           target_accept=target_accept, extensions=ADAPT_EXTENSIONS, **kw)
        eps = (auto.step_size if auto is not None
               else (step_size if isinstance(step_size, Tensor) else float(step_size)) if adapt is None
               else adapt.step_size.to(target.dtype).repeat_interleave(C).unsqueeze(1))
        adapt_seconds = time.perf_counter() - t_setup - setup_seconds

        # the sampler, folded over the batches, from w* at the frozen step: the adapted chains' positions are
        # not kept.  SGLD has no accept/reject step, so the adaptation's first steps (dual averaging explores
        # from 10 ε₀) move the chains for real, and where the loss leaves its flat neighbourhood of w* abruptly
        # they land where the step that adaptation settles on cannot bring them back (a trained GRU: two steps at
        # 1.8e-6 raised nβ(L − L*) from 0 to 25, then ε fell to 5.8e-9, at which γ = 100 relaxes over 2·10⁶
        # steps).  An automatic step that lets chains diverge is halved and the run repeated, also from w*.
        del state
        num_draws = (num_steps - num_burnin) // thin
        if defer_costly and batches.full and burnin_auto:
            relax = relaxation_steps(_smallest(eps), target.localization)
            if relax > SGHMC_FIRST_BURNIN * num_draws * thin:
                def resume() -> dict[str, Any]:  # the run as it would have gone on: same streams, step and path
                    with intra_op_threads(num_threads), retained_heap(dev) as allocator:
                        return sample(allocator)
                return {"deferred": {"step_size": _smallest(eps), "relaxation_steps": relax,
                                     "draw_steps": num_draws * thin},
                        "target": target, "adapt_seconds": adapt_seconds, "resume": resume}
        return sample(allocator)


def _end_of_run(target, rows, smp, potential, batches, final, eps, num_steps) -> tuple[Tensor | None, Tensor | None]:
    """``(heating, diffusion)`` read at the chains' final positions (``None`` where they do not apply)."""
    heating = diffusion = None
    # SGLD, or SGLD in a fixed diagonal metric G (RMSProp-SGLD once its preconditioner is frozen), or SGHMC read
    # as SGLD at ε/α (Sampler.friction); the checks' formulas do not hold for a running preconditioner or a thermostat
    metric = smp.metric(final) if getattr(smp, "metric", None) is not None else None
    friction = getattr(smp, "friction", None)
    if smp.name != "sgld" and metric is None and friction is None:
        return heating, diffusion
    if friction is not None:
        eps = eps / friction
    # how far the chains spread, against a free walk's ε·t·tr G (SGLD: G = I, tr G = d)
    dims = (_moved_dims(target, rows.shape[0]) if metric is None
            else _metric_trace(target, metric, final.params).cpu())
    diffusion = free_diffusion(potential.squared_distance(final.params), eps, num_steps, dims)
    # minibatch noise heats the chains: its first-order excess of λ̂, at the final positions
    if not batches.full:
        mask = None if target.groups.masks is None else (lambda t: target.groups.apply_mask(t, target.K))
        noise_trace = gradient_noise_trace(potential, final.params, batches, HEATING_BATCHES, mask, metric)
        heating = minibatch_heating(noise_trace, eps, target.nbeta).cpu()
    return heating, diffusion


def _extend_while_unmixed(run: dict[str, Any], target: Any, rows: Tensor, extend_draws: bool | int, num_draws: int,
                          thin: int, G: int, C: int, observables: Any, on_draw: Any, thresh: float,
                          progress: bool | None) -> list[dict[str, Any]]:
    """Continue ``run`` (in place: its trace, final state, step count, heating and diffusion) while some
    group's only unsettled findings are R-hat > 1.1 or too few effective draws (:func:`_unmixed`), doubling
    the draws each time within the budget of
    ``extend_draws`` (see :func:`estimate_llc`).  Returns one record per extension: ``{"from", "to"
    (draws), "rhat" (the groups' worst R-hat before it), "seconds"}``."""
    if extend_draws is False or num_draws < LOCALIZATION_MIN_DRAWS or run.get("final") is None:
        return []
    # (the cap is the run's, set at its first extension: later calls on the same run, e.g. after it was extended
    # at a γ the ladder kept, do not grow it with the steps already added)
    max_draws = run.setdefault("draw_cap", num_draws + int(EXTENSION_BUDGET * run["num_steps"]) // thin
                               if extend_draws is True else int(extend_draws))
    out: list[dict[str, Any]] = []
    while True:
        T = int(run["trace"].loss.shape[1])
        worst = _unmixed(run, target, G, C, thin)
        new_T = min(2 * T, max_draws)
        if worst is None or new_T <= T:
            return out
        extra = (new_T - T) * thin
        dev = target.device
        with intra_op_threads(run["num_threads"]), retained_heap(dev):
            final, more = run_chains(
                run["smp"], run["final"], run["batches"], run["noise"], extra, num_burnin=0, thin=thin,
                observe=_observe(target.spec, observables, on_draw), slope=run.get("slope"), slope_every=SLOPE_EVERY,
                divergence=Divergence(thresh, target.nbeta, rows, 10 if dev.type == "cpu" else 25),
                nbeta=target.nbeta, progress=show_progress(progress, extra * G * C), desc="LLC (more draws)",
                start=run["num_steps"])
            run["final"], run["trace"], run["num_steps"] = final, run["trace"].then(more), run["num_steps"] + extra
            run["heating"], run["diffusion"] = _end_of_run(target, rows, run["smp"], run["potential"], run["batches"],
                                                           final, run["eps"], run["num_steps"])
        out.append({"from": T, "to": new_T, "rhat": worst, "seconds": more.seconds})


def _verdict(run: Mapping[str, Any], target: Any, G: int, C: int, thin: int,
             judge: bool = True) -> tuple[Tensor, dict[int, list[str]]]:
    """``(halved, unsettled)`` of a run: its in-run ε/2 estimates (:func:`_halved_estimates`) and the groups
    that have not settled (:func:`_unsettled`; ``{}`` without ``judge``)."""
    halved = _halved_estimates(run["trace"], run["eps"], target.nbeta, run["num_burnin"], run["num_steps"])
    if not judge:
        return halved, {}
    unsettled = _unsettled(run["trace"], target.nbeta, G, C, halved, diffusion=run["diffusion"],
                           times=_draw_times(run["trace"], run["num_burnin"], thin), **_relaxation(run, target))
    below = _below_start(run["trace"], G, C) if target.groups.parts is None else set()
    return halved, {g: m for g, m in unsettled.items() if g not in below}


def _below_start(trace: Trace, G: int, C: int) -> set[int]:
    """Groups whose valid chains' draws are mostly below L(w*): w* is not a minimum of their loss (their
    results say so), which no larger γ, longer run or other sampler mends, so they do not drive the call's
    escalation (an untrained first checkpoint raised γ 1 → 10 for a whole curve: a trained one read 9.83 at
    γ = 10 against 17.02 alone).  Not for data-refined groups, whose loss need not be minimal at w*."""
    below = (trace.loss - trace.star < 0).double().mean(1).view(G, C)
    valid = ~trace.diverged.view(G, C).to(below.device)
    return {g for g in range(G) if bool(valid[g].any()) and float(below[g][valid[g]].mean()) > 0.5}


def _reasons(unsettled: Mapping[int, list[str]], target: Target) -> list[str]:
    """The findings of :func:`_unsettled`, each with its group's labels where the call has several groups
    (``"checkpoint 0: R-hat ..."``; :func:`_where`)."""
    return [f"{where}: {m}" if (where := _where(target, g)) else m for g, ms in unsettled.items() for m in ms]


def _paired_halving(trace: Trace, half: Trace, nbeta: float, G: int, C: int,
                    skip: Any = ()) -> dict[int, tuple[Tensor, Tensor, float, float, float, bool]]:
    """By group (not in ``skip``, with at least 3 chains valid in both): ``(full, half_tr, λ̂(ε/2), λ̂, z,
    changed)`` of ``trace`` against ``half`` (its ε/2 counterpart), ``full`` and ``half_tr`` the valid chains'
    ``nβ(L − L*)`` traces, z the paired z of the per-chain differences (:func:`slt.result._halving_gap`, as the
    in-run check) and ``changed`` the rule of :func:`slt.diagnostics.changed` (two-sided)."""
    full_tr = (nbeta * (trace.loss - trace.star)).detach().cpu().double()
    half_tr = (nbeta * (half.loss - half.star)).detach().cpu().double()
    out: dict[int, tuple[Tensor, Tensor, float, float, float, bool]] = {}
    for g in range(G):
        rows = slice(g * C, (g + 1) * C)
        ok = ~(trace.diverged[rows] | half.diverged[rows]).cpu()
        if g in skip or int(ok.sum()) < 3:
            continue
        full, halved = full_tr[rows][ok], half_tr[rows][ok]
        gap = _halving_gap(full, halved.mean(1))
        if gap is None:
            continue
        llc_half, llc, z = gap
        out[g] = (full, halved, llc_half, llc, z, changed(abs(llc - llc_half), abs(z), llc, int(ok.sum())))
    return out


def _direct_halving(trace: Trace, half: Trace, nbeta: float, G: int, C: int) -> dict[int, dict[str, Any]]:
    """By group: λ̂ of ``trace`` and of ``half`` (the same run at ε/2 with the same steps and seeds), the
    paired z of the per-chain differences and a message when λ̂ is not stable when ε halves (the change
    beyond 2% of λ̂ and beyond Student's t at a normal 3σ; :func:`_paired_halving`), else ``None``."""
    return {g: {"llc": llc, "llc_at_half_step": llc_half, "z": z,
                "message": (f"λ̂ is not stable when ε halves: a run at ε/2 with the same steps gave {llc_half:.4g} "
                            f"against {llc:.4g} (paired z = {z:.1f}): the chains relax more slowly than the run "
                            "lasts" if bad else None)}
            for g, (_, _, llc_half, llc, z, bad) in _paired_halving(trace, half, nbeta, G, C).items()}


def _not_sgld(name: str) -> dict[str, str]:
    """The record of a continued ε/2 check that did not run because the draws are another sampler's."""
    return {"skipped": f"the draws are {name}'s: the continued check is SGLD's (a fallback sampler is checked by a "
                       "direct run at ε/2, config['sampler_fallback'])"}


def _continued_halving(run: dict[str, Any], target: Any, spec: SamplerSpec, rows: Tensor, check: bool | None,
                       rule: str, unsettled: Mapping[int, Any] | None, thin: int, G: int, C: int, thresh: float,
                       progress: bool | None) -> dict[str, Any] | None:
    r"""The direct ε/2 check of a settled SGLD run (``check_halving``, see :func:`estimate_llc`): ``None`` with
    ``check_halving=False``, else what it found or ``{"skipped": why}``.

    SGLD's stationary law moves with ε: for a Gaussian direction of curvature κ of U the draws' variance is
    :math:`1/(\kappa(1 - \epsilon\kappa/4))` (Euler–Maruyama, :math:`w \leftarrow (1-\epsilon\kappa/2)w +
    \sqrt\epsilon\,\xi`), so λ̂ carries an :math:`O(\epsilon)` discretisation bias that no reading of one run's
    trace can see (on minibatches the heating by gradient noise, also ∝ ε, adds to it).  The chains,
    stationary at ε, are continued at ε/2 from where they ended: a quarter of the draws' steps ``D`` (as run,
    extensions included) lets the directions whose law moved re-settle (the bias sits in the stiff
    directions, εκ not small, which relax within a few 1/(εκ) steps), then ``D`` steps give the draws.  Per
    chain c the change :math:`d_c = \bar\lambda_c(\epsilon/2) - \bar\lambda_c(\epsilon)` shares the chain's
    slow directions and is compared across chains (paired z, :func:`slt.result._halving_gap`; the rule of
    :func:`slt.diagnostics.changed`, two-sided: a rise means the chains were still relaxing).  Only groups
    whose run settled are judged (``unsettled``: the groups with findings, ``None`` to compute them).

    Returns ``{"step_size_factor": 0.5, "burnin", "draw_steps", "seconds", "groups": {g: {"llc",
    "llc_at_half_step", "llc_at_half_step_sem", "z", "extrapolated", "extrapolated_sem", "message"}}}``:
    ``extrapolated`` = 2λ̂(ε/2) − λ̂(ε), first order in ε, with its s.e. over chains (``None`` where λ̂ rose or
    the change exceeds :data:`EXTRAPOLATION_MAX_CHANGE` of λ̂, beyond first order); ``message`` ``None`` when
    stable."""
    if check is False:
        return None
    smp, final = run.get("smp"), run.get("final")
    name = getattr(smp, "name", spec.name)
    if name != "sgld" or final is None:
        return _not_sgld(name)
    T = int(run["trace"].loss.shape[1])
    D = T * thin
    B = max(D // 4, 1)
    if check is None and rule == "given":
        return {"skipped": "the step size was given (check_halving=True checks it)"}
    if C < 3 or T < HALVING_CHECK_MIN_DRAWS:
        return {"skipped": f"it needs at least 3 chains and {HALVING_CHECK_MIN_DRAWS} draws (the run has {C} × {T})"}
    if check is None and T < LOCALIZATION_MIN_DRAWS:
        return {"skipped": f"fewer than {LOCALIZATION_MIN_DRAWS} draws (check_halving=True checks it)"}
    if check is None and B + D > HALVING_CHECK_SHARE * run["num_steps"]:
        return {"skipped": f"its {B + D} steps ({B} to re-settle, then the draws' {D}) would be more than "
                           f"{HALVING_CHECK_SHARE:g} of the run's {run['num_steps']} (check_halving=True runs it)"}
    if unsettled is None:
        unsettled = _verdict(run, target, G, C, thin)[1]
    if len(unsettled) == G:
        return {"skipped": "the run has not settled (its findings come first)"}
    half = build_sampler(spec, run["potential"], run["eps"] / 2, mala_every=0, **run["kw"])
    dev = target.device
    with intra_op_threads(run["num_threads"]), retained_heap(dev):
        _, more = run_chains(
            half, final, run["batches"], run["noise"], B + D, num_burnin=B, thin=thin,
            divergence=Divergence(thresh, target.nbeta, rows, 10 if dev.type == "cpu" else 25),
            nbeta=target.nbeta, progress=show_progress(progress, (B + D) * G * C), desc="LLC (check at ε/2)",
            start=run["num_steps"])
    eps = run["eps"]
    groups: dict[int, dict[str, Any]] = {}
    for g, (full, halved, llc_half, llc, z, bad) in _paired_halving(run["trace"], more, target.nbeta, G, C,
                                                                       skip=unsettled).items():
        eps_g = float(eps[g * C]) if isinstance(eps, Tensor) else float(eps)
        means, full_means = halved.mean(1), full.mean(1)
        change = (llc_half - llc) / max(abs(llc), 1e-12)
        extrapolated = extrapolated_sem = None
        if llc_half < llc and -change <= EXTRAPOLATION_MAX_CHANGE:
            ex = 2 * means - full_means
            extrapolated, extrapolated_sem = float(ex.mean()), float(ex.std() / ex.numel() ** 0.5)
        message = None
        if bad:
            heat = "" if run["batches"].full else " and minibatch heating"
            if llc_half < llc:
                cause = (f"SGLD's discretisation bias{heat} at this step (its stationary law moves with ε, which the "
                         f"run's own checks cannot see); a run at step_size={eps_g / 2:.3g} (localization="
                         f"{target.localization:g}, num_burnin at least twice this run's {run['num_burnin']}) halves "
                         "it" + (", as does a larger batch_size the heating" if heat else "")
                         + (f", and 2·λ̂(ε/2) − λ̂(ε) = {extrapolated:.4g} ± {extrapolated_sem:.2g} removes it to first "
                            "order" if extrapolated is not None
                            else "; the change is too large for a first-order correction: run at a smaller step"))
            else:
                cause = (f"the chains were still relaxing (λ̂ rose as they went on): run longer (num_burnin beyond "
                         f"this run's {run['num_burnin']})")
            message = (f"λ̂ is not stable when ε halves: the chains continued at ε/2 = {eps_g / 2:.3g} ({B} steps to "
                       f"re-settle, then {D}) read {llc_half:.4g} against {llc:.4g} ({change:+.1%}, paired "
                       f"z = {z:.1f}): " + cause)
        groups[g] = {"llc": llc, "llc_at_half_step": llc_half,
                     "llc_at_half_step_sem": float(means.std() / means.numel() ** 0.5), "z": z,
                     "extrapolated": extrapolated, "extrapolated_sem": extrapolated_sem, "message": message}
    return {"step_size_factor": 0.5, "burnin": B, "draw_steps": D, "seconds": more.seconds, "groups": groups}


def _run_findings(run: Mapping[str, Any], target: Any, G: int, C: int, thin: int) -> dict[int, tuple[float, list]]:
    """:func:`_findings` of ``run`` (its in-run ε/2 estimates, diffusion and draw times)."""
    halved = _halved_estimates(run["trace"], run["eps"], target.nbeta, run["num_burnin"], run["num_steps"])
    return _findings(run["trace"], target.nbeta, G, C, halved, diffusion=run["diffusion"],
                     times=_draw_times(run["trace"], run["num_burnin"], thin), **_relaxation(run, target))


def _relaxation(run: Mapping[str, Any], target: Any) -> dict[str, Any]:
    """What :func:`slt.result.equilibrium_checks` needs for its ``"unexplored"`` finding: the run's step
    (a number, or ``(R,)`` per row), γ, sampler and its ``relaxation_gain``."""
    smp = run.get("smp")  # (None: a run record without its sampler; the finding is then not judged)
    return {"eps": run["eps"], "localization": getattr(target, "localization", None),
            "sampler": getattr(smp, "name", None), "relaxation_gain": float(getattr(smp, "relaxation_gain", 1.0))}


def _cured_by_draws(found: list) -> bool:
    """Whether a group's findings are only R-hat > 1.1 or an effective sample size under
    :data:`slt.defaults.ESS_MIN` — what more draws cure, not, e.g., chains that barely moved, whose R-hat
    more draws at the same step would not cure."""
    return {kind for kind, _ in found} <= {"rhat", "ess"}


def _only_unmixed(run: Mapping[str, Any], target: Any, G: int, C: int, thin: int,
                  unsettled: Mapping[int, list[str]]) -> bool:
    """Whether every group of ``unsettled`` has only the findings more draws cure (:func:`_cured_by_draws`)."""
    found = _run_findings(run, target, G, C, thin)
    return bool(unsettled) and all(g in found and _cured_by_draws(found[g][1]) for g in unsettled)


def _unmixed(run: Mapping[str, Any], target: Any, G: int, C: int, thin: int) -> float | None:
    """The largest R-hat over the groups whose only findings more draws cure (:func:`_cured_by_draws`), or
    ``None`` when there is none."""
    rhats = [r for r, found in _run_findings(run, target, G, C, thin).values() if _cured_by_draws(found)]
    return max(rhats) if rhats else None


def _raised_batch(run: Mapping[str, Any], target: Any, spec: SamplerSpec, C: int,
                  batch_size: int) -> dict[str, Any] | None:
    r"""The larger minibatch a ``batch_size="auto"`` run is repeated with, or ``None``.

    ``None`` unless some group's minibatch heating :math:`\Delta` (``run["heating"]``, plain SGLD on
    minibatches) makes :func:`slt.result.heating_check` fire or exceeds :data:`slt.defaults.STEP_BIAS_SHARE`
    of λ̂ (a bias within the finding's Monte-Carlo margin is still a bias), the data are tensors (a DataLoader's
    batches are the user's), and the batch can grow.  The gradient-noise trace of i.i.d. indices
    falls as 1/batch size, so the batch is raised by the largest factor
    :math:`\Delta / (a/4)` over those groups,
    :math:`a = 2\max(\min(2\,\mathrm{s.e.}, h\hat\lambda), 0.02\,\hat\lambda)` (h =
    :data:`slt.result.HEATING_SHARE`) the excess the check allows (a margin for the noise of the trace and for the larger ε the
    adaptation may find), at least doubled, at most :data:`slt.defaults.BATCH_SIZE_MAX`, and the
    full batch once that is at least half the data.  Returns ``{"from", "to" (None:
    full batch), "excess", "fraction", "llc", "sem"}`` of the group that needed most."""
    heating, trace = run["heating"], run["trace"]
    if heating is None or isinstance(target.source, LoaderSource) or run["batches"].full:
        return None
    tr = (target.nbeta * (trace.loss - trace.star)).detach().cpu()  # (G*C, T)
    worst = None
    for g in range(target.G):
        rows = slice(g * C, (g + 1) * C)
        valid = ~trace.diverged[rows].cpu()
        if int(valid.sum()) < 2:
            continue
        t = tr[rows][valid]
        llc = float(t.double().mean())
        sem = llc_standard_error(t.mean(1), t)[0]
        excess = float(heating[rows][valid].double().nanmean())
        if not abs(llc) > 0:  # (λ̂ = 0: one draw at w*, or a loss that never moved: no share to judge)
            continue
        # (also beyond STEP_BIAS_SHARE of λ̂, a systematic bias the finding's Monte-Carlo margin lets through:
        # the step rescale leaves the heating to this rule, _step_bias_rescale)
        if heating_check(excess, llc, sem) is None and not excess > STEP_BIAS_SHARE * abs(llc):
            continue
        # Δ over a quarter of the allowed excess (heating_check: Δ/2 ≤ max(2%, min(2 s.e., HEATING_SHARE)) of λ̂)
        factor = excess / max(min(sem, 0.5 * HEATING_SHARE * abs(llc)), 0.01 * abs(llc))
        if worst is None or factor > worst[0]:
            worst = (factor, excess, llc, sem)
    if worst is None:
        return None
    factor, excess, llc, sem = worst
    new = max(2 * batch_size, math.ceil(batch_size * factor))
    if new > BATCH_SIZE_MAX:
        if batch_size >= BATCH_SIZE_MAX:
            return None
        new = BATCH_SIZE_MAX
    if 2 * new >= target.source.n:  # tensor data here (a loader returned above): the full batch is source.n
        new = None
    return {"from": batch_size, "to": new, "excess": excess, "fraction": excess / llc, "llc": llc, "sem": sem}


def localization_levels(target: Any) -> list[float]:
    r"""The γ values a run may use: the given γ alone, or for the automatic γ (``localization=None``)
    :data:`slt.defaults.LOCALIZATION` and then tenfold steps while the chains do not settle, at most
    :data:`slt.defaults.LOCALIZATION_STEPS` of them and never above nβ (beyond which the prior, not
    the loss, would set the scale of every direction of curvature ≲ 1).  Runs of fewer than
    :data:`slt.defaults.LOCALIZATION_MIN_DRAWS` draws keep the first level (their R-hat and drift are
    too noisy to act on; the result still reports them)."""
    g0 = float(target.localization)
    if not target.localization_auto:
        return [g0]
    levels = [g0]
    while len(levels) <= LOCALIZATION_STEPS and levels[-1] * 10 <= target.nbeta:
        levels.append(levels[-1] * 10)
    return levels


def _ladder_end(levels: list[float], nbeta: float) -> str:
    """Why the automatic γ stopped at ``levels[-1]`` (:func:`localization_levels`): the number of raises or nβ."""
    if len(levels) > LOCALIZATION_STEPS:
        return f"its limit: at most {LOCALIZATION_STEPS} tenfold raises"
    return f"its limit: the next tenfold raise, γ = {levels[-1] * 10:g}, would exceed nβ = {nbeta:.4g}"


def _unsettled(trace: Trace, nbeta: float, G: int, C: int, halved: Tensor | None = None,
               diffusion: Tensor | None = None, times: Tensor | None = None, **relaxation: Any) -> dict[int, list[str]]:
    """Why the run has not reached equilibrium, by group: R-hat above 1.1, λ̂ still rising through
    the draws, not stable when ε halves (``halved``: ``(G*C,)`` from :func:`_halved_estimates`),
    growing while the chains still diffuse freely (``diffusion`` ``(G*C,)``, ``times`` ``(T,)``) or
    an SGLD run far shorter than one relaxation time (``relaxation``: :func:`_findings`), over
    the group's valid chains (:func:`slt.result.equilibrium_checks`); empty when every group settled."""
    out = _findings(trace, nbeta, G, C, halved, diffusion, times, **relaxation)
    return {g: msgs for g, (_, found) in out.items() if (msgs := [m for kind, m in found if kind in UNSETTLED])}


def _findings(trace: Trace, nbeta: float, G: int, C: int, halved: Tensor | None = None,
              diffusion: Tensor | None = None, times: Tensor | None = None, eps: float | Tensor | None = None,
              localization: float | None = None, sampler: str | None = None,
              relaxation_gain: float = 1.0) -> dict[int, tuple[float, list]]:
    """By group with any finding: ``(R-hat, [(kind, message), ...])`` of
    :func:`slt.result.equilibrium_checks` over the group's valid chains (``eps``, a number or ``(G*C,)``,
    ``localization``, ``sampler`` and ``relaxation_gain`` for its ``"unexplored"`` finding)."""
    tr = nbeta * (trace.loss - trace.star)  # (G*C, T)
    R = tr.shape[0]
    eps_rows = (eps.reshape(-1).double().cpu() if isinstance(eps, Tensor) and eps.numel() > 1
                else None if eps is None else torch.full((R,), float(eps), dtype=torch.float64))
    out: dict[int, Any] = {}
    for g in range(G):
        rows = slice(g * C, (g + 1) * C)
        valid = ~trace.diverged[rows]
        if int(valid.sum()) < 2:
            continue
        mala = trace.mala[rows][valid] if trace.mala is not None else None
        mala_mean = float(mala.double().mean()) if mala is not None else None
        r, _, found = equilibrium_checks(tr[rows][valid].detach().cpu(), mala_mean,
                                         halved=None if halved is None else halved[rows][valid.cpu()],
                                         diffusion=None if diffusion is None else diffusion[rows][valid.cpu()],
                                         times=times, localization=localization, sampler=sampler,
                                         relaxation_gain=relaxation_gain,
                                         step_size=None if eps_rows is None else float(eps_rows[rows][valid.cpu()].mean()))
        if found:
            out[g] = (r, found)
    return out


class _MaskedNoise:
    """The run's noise source with each row's noise multiplied by its restriction's mask (masked
    coordinates get neither gradient nor noise, so they stay at w*)."""

    def __init__(self, rng: ChainRNG, groups: Any, K: int):
        self.rng, self.groups, self.K = rng, groups, K

    def normal(self, like: Tensor) -> Tensor:
        return self.groups.apply_mask(self.rng.normal(like), self.K)

    def mask(self, t: Tensor) -> Tensor:
        """``t`` (R, d) with each row's masked coordinates zeroed (noise drawn elsewhere)."""
        return self.groups.apply_mask(t, self.K)

    def owned_normal(self, like: Tensor) -> Tensor:
        """Noise the caller owns (:func:`slt.samplers.base.owned_normal`), masked in place."""
        return self.groups.apply_mask(self.rng.owned_normal(like), self.K)


def _loss_and_grad(target: Any) -> Callable[[Tensor, Any], tuple[Tensor, Tensor]]:
    """The evaluator's ``loss_and_grad``; with restrictions the gradient of each row is masked."""
    ev, groups = target.evaluator, target.groups
    if groups.masks is None:
        return ev.loss_and_grad

    def masked(params: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        loss, grad = ev.loss_and_grad(params, batch)
        return loss, groups.apply_mask(grad, target.K)

    return masked


def _check_restrictable(spec: SamplerSpec, target: Any) -> None:
    """SGNHT's thermostat averages the kinetic energy over all d coordinates: with masked
    coordinates (always at rest) it would heat the free ones."""
    if target.groups.masks is not None and spec.name == "sgnht":
        raise ValueError("restrict_to does not work with sgnht (its thermostat averages over every parameter, "
                         "masked ones included): use sgld, rmsprop_sgld or sghmc")


def _check_arguments(num_chains, num_draws, num_burnin, num_steps_bw_draws, mala_every, step_size, nbeta,
                     localization, batch_size, target_accept) -> tuple:
    """Validated counts ``(num_chains, num_draws, num_burnin, num_steps_bw_draws, mala_every, batch_size)``;
    a clear error for any bad argument, before anything is prepared."""
    num_chains = check_int("num_chains", num_chains, 1)
    num_draws = check_int("num_draws", num_draws, 1)
    num_burnin = check_int("num_burnin", num_draws // 4 if num_burnin is None else num_burnin, 0)
    num_steps_bw_draws = check_int("num_steps_bw_draws", num_steps_bw_draws, 1)
    mala_every = check_int("mala_every", mala_every, 0)
    if _step_size_rule(step_size) == "given":
        check_real("step_size", step_size, positive=True)
    if nbeta is not None:
        check_real("nbeta", nbeta, positive=True)
    if localization is not None:
        check_real("localization", localization, nonnegative=True)
    if isinstance(batch_size, str):
        if batch_size != "auto":
            raise ValueError(f"batch_size must be a positive integer, None (full batch) or 'auto', got {batch_size!r}")
    elif batch_size is not None:
        batch_size = check_int("batch_size", batch_size, 1)
    if not (isinstance(target_accept, (int, float)) and 0.0 < target_accept < 1.0):
        raise ValueError(f"target_accept must lie in (0, 1), got {target_accept!r}")
    return num_chains, num_draws, num_burnin, num_steps_bw_draws, mala_every, batch_size


def check_sampler_kwargs(sampler: Any, sampler_kwargs: Mapping[str, Any] | None) -> None:
    """A clear error, before anything is prepared, for a ``sampler_kwargs`` key the sampler does not take (it
    failed later with ``sgld() got an unexpected keyword argument``) or one that is the engine's own argument
    (``mala_every``, ``step_size``: "got multiple values").  ``sampler="auto"`` starts with SGLD, whose
    arguments its keys must be."""
    spec = resolve_sampler(sampler)  # (an unknown sampler name is named here too, with or without kwargs)
    if not sampler_kwargs:
        return
    if not isinstance(sampler_kwargs, Mapping):
        raise TypeError(f"sampler_kwargs must be a mapping of argument names to values, got {type(sampler_kwargs).__name__}")
    own = {"step_size": "step_size=", "mala_every": "mala_every=", "potential": None,
           "deterministic": None}  # (deterministic: the engine sets it from the batch: a full batch is deterministic)
    try:
        params = inspect.signature(spec.factory).parameters
    except (TypeError, ValueError):  # (a factory without a signature: it says for itself)
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = sorted(k for k in params if k not in own)
    for key in sampler_kwargs:
        if key in own:
            fix = (f"pass it as slt.estimate_llc's own {own[key]}" if own[key]
                   else "the engine sets it (a full batch is deterministic)")
            raise ValueError(f"sampler_kwargs[{key!r}] is not the sampler's to take: {fix}")
        if key not in params:
            close = difflib.get_close_matches(str(key), takes, n=1)
            auto = isinstance(sampler, str) and sampler.lower() == "auto"
            raise ValueError(f"sampler_kwargs[{key!r}]: the {spec.name} sampler takes no such argument"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; it takes {', '.join(takes) or 'none'}"
                             + (" (sampler='auto' starts with SGLD and gives a fallback sampler those of its keys "
                                "the fallback takes: to set another sampler's arguments, name it, e.g. "
                                "sampler='sghmc', or pass slt.samplers.sghmc(friction=...))" if auto else ""))


def _check_flags(control_variate, shared_batches, raise_on_divergence, extend_draws, check_halving,
                 progress) -> tuple:
    """The switches as Python bools (``None`` kept where it means "automatic"; ``extend_draws`` may also be a
    count); a clear error for anything else, such as ``check_halving="no"``, which would otherwise act as ``True``."""
    return (check_flag("control_variate", control_variate), check_flag("shared_batches", shared_batches),
            check_flag("raise_on_divergence", raise_on_divergence),
            check_flag("extend_draws", extend_draws) if is_bool(extend_draws) else check_int("extend_draws", extend_draws, 0),
            check_flag("check_halving", check_halving, none=True), check_flag("progress", progress, none=True))


#: With an automatic step size, how many times a run whose chains diverged is repeated with the
#: step of the affected checkpoints halved.
MAX_HALVINGS = 2
#: minibatches at each chain's final position from which the gradient-noise trace of the heating
#: estimate is taken (:func:`slt.stepsize.gradient_noise_trace`; costs as many gradient evaluations)
HEATING_BATCHES = 4
#: The automatic step-size rules by name (``step_size=None`` is the default rule).
STEP_SIZE_RULES = ("adapt", "curvature")


def _step_size_rule(step_size: float | str | None) -> str:
    """``"adapt"`` (the default, ``None``), ``"curvature"``, or ``"given"`` for a number."""
    if step_size is None:
        return "adapt"
    if isinstance(step_size, str):
        if step_size not in STEP_SIZE_RULES:
            raise ValueError(f"step_size must be a positive number, None, or one of {STEP_SIZE_RULES}, got {step_size!r}")
        return step_size
    return "given"


def _halved_estimates(trace: Trace, eps: float | Tensor, nbeta: float, num_burnin: int, num_steps: int) -> Tensor:
    """``(R,)`` the estimate each row would give at half its step with the same steps
    (:func:`slt.diagnostics.halved_step_estimate`), from the run's recorded steps: the burn-in and the
    draws, all at the frozen step from w*."""
    R = trace.loss.shape[0]
    eps_rows = (eps.reshape(-1).double().cpu() if isinstance(eps, Tensor)
                else torch.full((R,), float(eps), dtype=torch.float64))
    burn = nbeta * (trace.burnin - trace.burnin_star).detach().cpu().double()
    steps = torch.cat([torch.arange(burn.shape[1], dtype=torch.float64), trace.draw_steps.cpu().double()])
    times = steps.unsqueeze(0) * eps_rows.unsqueeze(1)  # τ = ε t at each recorded step
    values = torch.cat([burn, nbeta * (trace.loss - trace.star).detach().cpu().double()], 1)
    return halved_step_estimate(values, times, eps_rows, num_burnin, num_steps)


def _draw_times(trace: Trace, num_burnin: int, thin: int) -> Tensor:
    """``(T,)`` steps from w* at each draw of a run (the draw at loop step t is taken before that step)."""
    T = trace.loss.shape[1]
    return num_burnin + torch.arange(T, dtype=torch.float64) * thin


def _moved_dims(target: Any, R: int) -> Tensor | int:
    """Coordinates each of the ``R`` rows moves: ``d``, or per row for restricted runs (rows in
    ``(K, M, D·C)`` order, as :meth:`slt.groups.Groups.apply_mask`)."""
    masks = target.groups.masks
    if masks is None:
        return target.d
    M = masks.shape[0]
    counts = masks.sum(1).double().cpu()
    return counts.view(1, M, 1).expand(target.K, M, R // (target.K * M)).reshape(R)


def _metric_trace(target: Any, metric: Any, params: Tensor) -> Tensor:
    """tr G over the coordinates each row of ``params`` (R, d) moves (all of them, or a restriction's:
    :meth:`slt.groups.Groups.apply_mask`), (R,) float64, from the columns ``metric(sl)`` of a fixed diagonal
    preconditioner."""
    out = torch.zeros(params.shape[0], dtype=torch.float64, device=params.device)
    for sl in column_chunks(params):
        out += rowsum64(target.groups.apply_mask(metric(sl), target.K, sl))
    return out


def _group_steps(eps: float | Tensor) -> list[float]:
    """The distinct steps of a run (a number, or per row ``(R, 1)``)."""
    return sorted(set(eps.reshape(-1).tolist())) if isinstance(eps, Tensor) else [float(eps)]


def _smallest(eps: float | Tensor) -> float:
    """The smallest step of a run (a number, or per row ``(R, 1)``)."""
    return float(eps.min()) if isinstance(eps, Tensor) else float(eps)


def _step_bias_rescale(trace: Trace, eps: float | Tensor, nbeta: float, G: int, C: int,
                       heating: Tensor | None = None) -> dict[int, dict[str, float]]:
    """By group whose first-order step bias (:func:`slt.diagnostics.step_bias`) exceeds
    :data:`slt.defaults.STEP_BIAS_SHARE` of its λ̂ over its valid chains — less the minibatch heating
    (``heating`` ``(G*C,)``, :func:`slt.diagnostics.minibatch_heating`; ``None``: not subtracted) where that
    exceeds the share and twice the rest (the discretisation), which ``batch_size="auto"`` then answers with a
    larger batch (:func:`_raised_batch`) — ``{"fraction": bias / λ̂, "factor"}``,
    the factor on ε that brings it to that share (at least :data:`slt.defaults.STEP_BIAS_MIN_FACTOR`); empty
    when none does or the sampler did not report ‖∇L_B‖²."""
    gsq = trace.grad_sq
    if gsq is None:
        return {}
    bias = step_bias(gsq, eps, nbeta)
    heat = None if heating is None else heating.double().cpu().nan_to_num(0.0)
    values = nbeta * (trace.loss - trace.star).detach().double().cpu()
    out: dict[int, dict[str, float]] = {}
    for g in range(G):
        rows = slice(g * C, (g + 1) * C)
        ok = ~trace.diverged[rows].cpu()
        if not bool(ok.any()):
            continue
        llc, b = float(values[rows][ok].mean()), float(bias[rows][ok].mean())
        h = 0.0 if heat is None else float(heat[rows][ok].mean())
        # heating over twice the discretisation part: the batch rule answers it (after the shrink its share, f·h,
        # is still twice STEP_BIAS_SHARE: clear of the trace's noise); otherwise a step shrunk for the whole bias
        # leaves the heating below the share
        if h > 2 * max(b - h, 0.0) and h > STEP_BIAS_SHARE * abs(llc):
            b -= h
        if llc > 0 and b > STEP_BIAS_SHARE * llc:  # (b is NaN-free: a nan comparison is False)
            out[g] = {"fraction": b / llc, "factor": max(STEP_BIAS_SHARE * llc / b, STEP_BIAS_MIN_FACTOR)}
    return out


def _scale_steps(eps: float | Tensor, factors: Mapping[int, Mapping[str, float]], G: int, C: int,
                 dtype: torch.dtype, device: Any) -> Tensor:
    """Per-row steps ``(G*C, 1)`` with each group of ``factors`` multiplied by its ``"factor"``."""
    rows = (eps.clone() if isinstance(eps, Tensor)
            else torch.full((G * C, 1), float(eps), dtype=dtype, device=device))
    for g, f in factors.items():
        rows[g * C:(g + 1) * C] *= f["factor"]
    return rows


def _halve(eps: float | Tensor, checkpoints: Tensor, C: int, dtype: torch.dtype) -> Tensor:
    """Per-row steps ``(K*C, 1)`` with those of ``checkpoints`` (K,) bool halved."""
    K = checkpoints.shape[0]
    rows = eps.clone() if isinstance(eps, Tensor) else torch.full((K * C, 1), float(eps), dtype=dtype,
                                                                  device=checkpoints.device)
    return torch.where(checkpoints.repeat_interleave(C).unsqueeze(1).to(rows.device), rows / 2, rows)


def _observe(spec: Any, observables: Mapping[str, Observable] | None,
             on_draw: Callable[[Tensor], None] | None = None) -> Callable[[Tensor], dict] | None:
    """The run loop's ``observe``: user observables take named parameters ``name -> (R, *shape)``;
    ``on_draw(params (R, d))`` is called first (online statistics, nothing stored)."""
    if not observables and on_draw is None:
        return None

    def observe(w: Tensor) -> dict:
        if on_draw is not None:
            on_draw(w)
        params = spec.unflatten(w)
        out = {}
        for k, f in (observables or {}).items():
            out[k] = f(params)
            check_observable_value("slt.estimate_llc", k, out[k], w.shape[0])
        return out

    return observe


#: minibatches (of the run's size) at most whose gradients at w* are averaged for the slope check
#: (:func:`slope_gradient`)
SLOPE_BATCHES = 32
#: an exact pass over tensor data may evaluate chunks larger than the run's batch, up to this many input
#: (or output) elements over the rows
SLOPE_CHUNK_ELEMENTS = 1 << 20
#: the batches are split into this many folds (round robin), each with its own mean gradient: their
#: spread gives the error of the slope estimate's own noise (:meth:`slt.result.LLCResult.from_traces`)
SLOPE_FOLDS = 4
#: the slope check projects every this many draws (one pass over the ``(G·C, d)`` parameters each time: at
#: every draw that cost 4% of a step of the 18-parameter TMS and 6% of the 1M-parameter MLP's on a CPU)
SLOPE_EVERY = 10
#: the slope check's minibatch streams are seeded this far from the run's (the run's are untouched)
_SLOPE_SEED_OFFSET = 0x510BE


def slope_gradient(target: Any, batch_size: int | None) -> Tensor | None:
    r"""``(K·D, F, d)`` estimates of the slope :math:`\nabla L(w^*)` of each checkpoint's loss on each
    distribution, in ``F`` independent folds; ``None`` when one is not finite.

    Exact (one fold) where a pass over the data costs at most :data:`SLOPE_BATCHES` gradient evaluations
    of the run's batch size (or of larger chunks of at most :data:`SLOPE_CHUNK_ELEMENTS` input or
    output elements): full batch;
    unweighted tensor data in consecutive chunks (their gradients weighted by size); a loader that ends
    within that many batches.  Otherwise the mean gradient at w* on
    :data:`SLOPE_BATCHES` minibatches of the run's size — the estimator whose mean the sampler's drift
    follows — from index streams of their own (a loader: its first batches), dealt round robin into
    :data:`SLOPE_FOLDS` folds (their gradients, ``F`` parameter-sized copies per checkpoint and
    distribution, are held through the run; fewer folds would leave too few degrees of freedom for
    their spread: with 2 the error of a slope on the location model came out at 0.07 for a true 0.25).
    Either way the run's minibatches and noise are those of a run without
    the check, and the estimate's noise is independent of the chains, so :math:`\hat g\cdot(w - w^*)`
    averaged over the draws is unbiased for :math:`\nabla L(w^*)\cdot\mathbb E[w - w^*]`; the folds'
    spread measures that noise's share of the error (:func:`slt.result.slope_record`).  A restriction
    needs no gradient of its own: its rows move only its coordinates, which the unrestricted gradient
    projects the same.  Costs at most :data:`SLOPE_BATCHES` gradient evaluations of ``K·D`` rows."""
    if SLOPE_BATCHES < 1:  # the check switched off
        return None
    g = target.groups
    plain = target if g.masks is None else replace(
        target, groups=Groups(data_labels=g.data_labels, parts=g.parts, offsets=g.offsets))
    rows = plain.rows(1)
    plan, folds = _slope_batches(plain, batch_size, rows.shape[0])
    out = torch.zeros(rows.shape[0], folds, rows.shape[1], dtype=rows.dtype, device=rows.device)
    for batch, fold, weight in plan:
        out[:, fold].add_(plain.evaluator.loss_and_grad(rows, batch)[1].detach(), alpha=weight)
    return out if bool(torch.isfinite(out).all()) else None


def _slope_batches(plain: Any, batch_size: int | None, rows: int) -> tuple[Any, int]:
    """``(iterable of (batch, fold, weight), folds)`` for :func:`slope_gradient`: the batches of ``rows``
    rows (one per checkpoint and distribution) and the weight of each in its fold's mean."""
    source = plain.source
    if isinstance(source, LoaderSource):
        with source.random_state_kept():  # the run's later passes shuffle as they would have
            got = [plain._loader_batch(*b) for _, b in zip(range(SLOPE_BATCHES + 1), source.iter_batches())]
        if len(got) <= SLOPE_BATCHES:  # the whole pass: weighted by size
            sizes = [num_rows(b.x) for b in got]
            return [(b, 0, m / sum(sizes)) for b, m in zip(got, sizes)], 1
        return _round_robin(got[:SLOPE_BATCHES], SLOPE_BATCHES)
    stream = plain.batches(ChainRNG([s + _SLOPE_SEED_OFFSET for s in plain.group_seeds], 1, plain.device), 1,
                           batch_size, control_variate=False)
    if stream.full:
        return [(stream()[0], 0, 1.0)], 1
    # an exact pass in chunks of the run's batch size, or larger ones of at most SLOPE_CHUNK_ELEMENTS
    n = int(source.n)
    b = max(int(stream.batch_size), SLOPE_CHUNK_ELEMENTS // (rows * max(1, plain._row_numel or row_numel(source.x))))
    if -(-n // b) <= SLOPE_BATCHES and source.weights is None and plain.groups.parts is None:
        return ((source.gather(torch.arange(lo, min(lo + b, n), device=plain.device).expand(rows, -1)), 0,
                 (min(lo + b, n) - lo) / n) for lo in range(0, n, b)), 1
    return _round_robin((stream()[0] for _ in range(SLOPE_BATCHES)), SLOPE_BATCHES)


def _round_robin(batches: Any, count: int) -> tuple[Any, int]:
    """``(plan, folds)``: the ``count`` ``batches`` dealt round robin into :data:`SLOPE_FOLDS` folds, each
    the mean of its own (lazily: one batch held at a time)."""
    folds = min(SLOPE_FOLDS, count)
    sizes = [len(range(f, count, folds)) for f in range(folds)]
    return ((b, j % folds, 1.0 / sizes[j % folds]) for j, b in enumerate(batches)), folds


def _slope_dots(rows: Tensor, grad: Tensor, K: int, M: int, C: int) -> Callable[[Tensor], Tensor]:
    r"""``w (G·C, d) -> (G·C, F)`` each row's displacement from w* projected on each fold of its checkpoint's
    and distribution's slope (``grad`` ``(K·D, F, d)``, :func:`slope_gradient`), :math:`\hat g_f\cdot(w - w^*)`
    in float64, rows in ``(K, M, D, C)`` order, a chunk of columns at a time (no parameter-sized temporary)."""
    D, F = grad.shape[0] // K, grad.shape[1]

    def dots(w: Tensor) -> Tensor:
        out = torch.zeros(K, M, D, C, F, dtype=torch.float64, device=w.device)
        for sl in column_chunks(w):
            delta = (w[:, sl] - rows[:, sl]).view(K, M, D, C, -1)
            out += torch.einsum("kmdcx,kdfx->kmdcf", delta, grad[:, :, sl].view(K, D, F, -1)).double()
        return out.view(w.shape[0], F)

    return dots


def _step_size_diagnostics(auto: Any, adapt: Any, g: int, k: int) -> dict[str, Any]:
    """How group ``g`` (of checkpoint ``k``) got its step size (curvature rule or adaptation)."""
    if auto is not None:
        return {"curvature": float(auto.curvature[k]), "step_size_pilot_rounds": auto.pilot_rounds,
                "minibatch_gradient_noise": None if auto.grad_noise is None else float(auto.grad_noise[k])}
    if adapt is not None:
        collapsed = (float(adapt.collapsed[g]) if adapt.collapsed is not None
                     and bool(adapt.collapsed[g] != adapt.step_size[g]) else None)
        return {"step_size_initial": float(adapt.initial[g]), "adapt_steps": adapt.steps,
                "adapt_extensions": adapt.extensions,
                "adapt_acceptance": float(adapt.accept[g]), "adapt_back_offs": int(adapt.back_offs[g]),
                "adapt_resets": int(adapt.resets[g]),
                "adapt_jump_ratio": None if adapt.jump_ratio is None else float(adapt.jump_ratio[g]),
                "step_size_collapsed": collapsed,
                "step_size_collapse_cause": None if collapsed is None else adapt.collapse_cause}
    return {}


def _raise_if_all_diverged(all_dead: Tensor, spec, potential, target, rows: Tensor, eps, threshold: float,
                           steps: int, batch_size: int | None, kw: Mapping[str, Any]) -> None:
    """:class:`LLCEstimationError` when every chain of a checkpoint diverged, with a step size that ran
    ``steps`` steps from w* without divergence (:func:`slt.stepsize.stable_step_size`)."""
    if not bool(all_dead.any()):
        return
    bad = all_dead.nonzero().flatten().tolist()
    where = "; ".join(_where(target, g) for g in bad)
    C = rows.shape[0] // all_dead.shape[0]
    eps_max = float(eps.max()) if isinstance(eps, Tensor) else float(eps)
    rng = ChainRNG([s + 0x2F1 for s in target.group_seeds], C, target.device)
    sug = stable_step_size(spec, potential, rows, target.batches(rng, C, batch_size), rng, eps_max, steps=steps,
                           threshold=threshold, **kw)
    fix = (f"step_size={sug:.3g} ran {steps} steps from w* without divergence: pass it"
           if sug is not None else "no step size down to ε/1024 ran without divergence: check the model and loss")
    coarse = [p for p in _precision_problems(target, PRECISION_SHARE) if p[0] in bad]
    cause = f" Likely cause: {_where(target, coarse[0][0]) + ': ' if where else ''}{coarse[0][1]}." if coarse else ""
    raise LLCEstimationError(
        f"every chain{f' of {where}' if where else ''} diverged at step_size={eps_max:.3g} (the loss or parameters became "
        f"NaN/inf, or nβ·ΔL exceeded {threshold:g}): the step is too large for the posterior's stiffest "
        f"directions. {fix}; raise_on_divergence=False returns NaN instead.{cause}"
    )


def _precision_problems(target: Any, share: float = 1.0) -> list[tuple[int, str]]:
    """``(group, why)`` for each group whose loss at w* the dtype cannot resolve in λ̂'s units beyond ``share``
    × d/2 (:func:`slt.result.precision_problem`)."""
    dims = _moved_dims(target, target.G)
    init = target.group_init_loss
    out = []
    for g in range(target.G):
        d = float(dims[g]) if isinstance(dims, Tensor) else float(dims)
        why = precision_problem(target.nbeta, float(init[g]), target.dtype, d, share)
        if why is not None:
            out.append((g, why))
    return out


def _check_precision(target: Any) -> None:
    """:class:`LLCEstimationError` before sampling when the dtype cannot resolve any λ̂ of some group (one
    rounding of L(w*), in λ̂'s units, above d/2: :func:`slt.result.precision_problem`)."""
    found = _precision_problems(target)
    if found:
        g, why = found[0]
        where = _where(target, g)
        raise LLCEstimationError(f"{where + ': ' if where else ''}{why}.")


def _warn_divergent(diverged: Tensor, divergence_step: Tensor, num_chains: int, threshold: float, caller: str,
                    target: Any) -> None:
    idx = diverged.nonzero().flatten().tolist()
    if not idx:
        return
    steps = divergence_step[diverged].tolist()

    def chain(i: int) -> str:  # "checkpoint 1, restriction 'a' chain 0", or "chain 0" for a single model
        where = _where(target, i // num_chains)
        return f"{where + ' ' if where else ''}chain {i % num_chains}"

    warnings.warn(
        f"{caller}: divergent chains (loss or parameters became NaN/inf or "
        f"nβ·ΔL > {threshold:g}) were stopped and excluded: "
        + "; ".join(f"{chain(i)} at step {s}" for i, s in zip(idx, steps))
        + ". Reduce step_size.",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
