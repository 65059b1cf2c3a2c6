r"""The defaults of :func:`slt.estimate_llc`, in one place.

The engine's signature and the experiment configs (``experiments/_schemas.py``,
``SamplerConf``) both read them from :data:`LLC`, so a default changes in one
line.  ``None`` means "chosen from the problem": ``num_burnin`` = :func:`default_burnin`
(``num_draws // 4``, lengthened to cover the slowest relaxation the localization allows when that is affordable),
``step_size`` adapted during burn-in toward ``target_accept`` (:func:`slt.stepsize.adapt_step_size`), ``nbeta`` =
:func:`slt.default_nbeta` (n / log n), ``localization`` = :func:`slt.default_localization`
(γ = 1, raised tenfold while the chains do not settle: :data:`LOCALIZATION_STEPS`); ``batch_size="auto"`` =
:data:`BATCH_SIZE` samples per step, raised when minibatch noise would bias λ̂ (:data:`BATCH_RAISES`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["LLCDefaults", "LLC", "default_nbeta", "default_localization", "default_burnin", "LOCALIZATION",
           "LOCALIZATION_STEPS", "LOCALIZATION_MIN_DRAWS", "RELAXATION_TIMES", "BURNIN_MAX_FACTOR",
           "BURNIN_MAX_FACTOR_ESCALATED", "BURNIN_MAX_FACTOR_FINAL", "BATCH_SIZE",
           "BATCH_SIZE_MAX", "BATCH_RAISES", "EXTENSION_BUDGET", "FALLBACK_SAMPLERS", "SGHMC_FIRST_BURNIN",
           "ESS_MIN", "HALVING_CHECK_SHARE", "STEP_BIAS_SHARE", "STEP_BIAS_MIN_FACTOR",
           "HALVING_CHECK_MIN_DRAWS", "EXTRAPOLATION_MAX_CHANGE", "relaxation_steps"]

#: γ for ``localization=None`` (where the automatic γ starts).
LOCALIZATION = 1.0
#: With ``localization=None``, how many times γ may be raised tenfold (never above nβ) when a run's
#: chains have not settled (R-hat > 1.1, λ̂ still rising through the draws, or λ̂ not stable when ε
#: halves: :func:`slt.diagnostics.halved_step_estimate`): each raise repeats
#: the run from w* with fresh streams (:func:`slt.engine.localization_levels`).
LOCALIZATION_STEPS = 3
#: Runs with fewer draws than this keep γ as it starts (R-hat and the drift test of a few dozen draws
#: are too noisy to act on: at 20 draws R-hat exceeds 1.1 by chance); their results still report both.
LOCALIZATION_MIN_DRAWS = 100
#: Relaxation times 1/(εγ) that the burn-in at the frozen step covers (:func:`default_burnin`, and the
#: hint of :func:`slt.result.relaxation_hint`).  Measured on a 26k-parameter MLP at γ = 100 (ε = 2.1e-5
#: adapted, 1/(εγ) = 469 steps; fixed ε from w*): λ̂ relaxed with an e-folding of about 250 steps
#: (≈ 0.53/(εγ)): 66.6, 89.7, 101.7, 104.4 over the quarters of 1000 draws after 250 steps of burn-in,
#: toward ≈ 106; at ε/2 it relaxes twice as slowly.  5/(εγ) covers about 9 e-foldings at ε and 4.7
#: at ε/2 — so a run whose burn-in follows this rule is still settled when ε is halved at the same
#: number of steps.
RELAXATION_TIMES = 5
#: :func:`default_burnin` lengthens the burn-in to RELAXATION_TIMES/(εγ) only while that is at most
#: this many times the draws' steps (then at most 4/5 of a run is burn-in); beyond, the run keeps
#: ``num_draws // 4`` and the equilibrium checks (R-hat, drift of λ̂) judge it.
BURNIN_MAX_FACTOR = 4
#: The cap of :data:`BURNIN_MAX_FACTOR` at a γ above the default :data:`LOCALIZATION`: a γ the automatic
#: localization raised because the chains did not settle at a weaker one (or that the user chose, so that a
#: rerun at the γ an automatic run ended on gets the same burn-in) holds directions that need the relaxation
#: whatever it costs up to this many times the draws' steps.  Measured on a 26k-parameter MLP (64-128-128-10,
#: n = 1792), which escalates to γ = 100 where ε adapts to 8.5e-6 on minibatches: 5/(εγ) is 5.9 × the draws,
#: so with the cap of 4 its burn-in stayed a quarter and the run ended with R-hat 1.49 and λ̂ still rising
#: (35 → 68); with 16, burn-in 5892 steps: λ̂ 108.9 ± 2.0, R-hat 1.06, and 105.0 ± 1.8 at ε/2.
BURNIN_MAX_FACTOR_ESCALATED = 16
#: The cap at the last γ a run can use — the automatic γ at the end of its ladder
#: (:func:`slt.engine.localization_levels`), or a γ above :data:`LOCALIZATION` that the user gave — where
#: no stronger γ is left to try: a burn-in beyond :data:`BURNIN_MAX_FACTOR_ESCALATED` there is the price of
#: a converged estimate, and keeping a quarter only returns one flagged as still rising (whose hint costs the
#: same steps again, on top).  Measured on an MNIST-sized MLP (784-64-10, n = 60000, nβ = 5454;
#: ``python benchmarks/real_defaults.py mlp60k``): the ladder ends at γ = 1000 with ε adapted to 1.6e-7,
#: where 5/(εγ) ≈ 30 700 steps = 31 × 1000 draws; under the cap of 16 the defaults kept 250 steps and
#: returned λ̂ 260 ± 21 still rising, while 30 723 steps gave 1590 ± 8, R-hat 1.003.  Intermediate rungs
#: keep :data:`BURNIN_MAX_FACTOR_ESCALATED`: there a raise of γ settles the chains for a tenth of the steps.
BURNIN_MAX_FACTOR_FINAL = 64
#: The minibatch size ``batch_size="auto"`` starts from (full batch when the data have no more samples).
BATCH_SIZE = 256
#: With ``batch_size="auto"``, how many times a run may be repeated with a larger minibatch when its
#: minibatch heating (:func:`slt.diagnostics.minibatch_heating`) would make λ̂ unstable when ε halves
#: (:func:`slt.result.heating_check`).  SGLD's minibatch noise heats the chains by
#: :math:`\tfrac\epsilon8(n\beta)^2\operatorname{tr}\operatorname{Cov}[\nabla L_B]`, and with the default
#: nβ = n/log n that grows with n at a fixed batch (measured: a 5-dimensional Gaussian location model, n = 10⁴,
#: gave λ̂ 13% above its closed form at batch 256, 5% at full batch); the trace falls as 1/batch size
#: (indices drawn with replacement), so the repeat uses the batch at which the measured excess falls to
#: a quarter of what the check allows (full batch once that is at least half the data).
BATCH_RAISES = 1
#: The largest minibatch ``batch_size="auto"`` raises to short of the full batch (16 × :data:`BATCH_SIZE`); a
#: run that would need more keeps its finding and names the fix.
BATCH_SIZE_MAX = 4096
#: With ``extend_draws=True``, the steps an extension of the draws may add, as a multiple of the steps the
#: run had (burn-in and draws at the final γ): a run whose only unsettled findings are R-hat > 1.1 or an
#: effective sample size under :data:`ESS_MIN` (chains stationary — no drift, stable when ε halves, not
#: diffusing — but slow to mix) is continued, doubling its draws, until both pass or this budget is spent,
#: so an extension costs at most this many times
#: the run.  Measured on the README's tiny GPT-2 (n = 96 sequences, γ = 10, ε = 1.8e-4, 2789 burn-in
#: steps): 200 draws gave R-hat 1.28, 1000 gave 1.15, and 200 draws 10 steps apart (2000 steps) 1.09.
EXTENSION_BUDGET = 1.0
#: The least bulk effective sample size of the λ̂ trace, summed over chains, for a run to count as converged
#: (:attr:`slt.LLCResult.converged`).  Below it R-hat and the standard error are themselves too noisy to
#: judge the run by: the error of the mean is 1/√ESS of the trace's spread (a tenth at 100), and R-hat
#: over a few effective draws per chain scatters widely around 1 (Vehtari et al. 2021, "Rank-normalization,
#: folding, and localization", ask for 100 per chain with the stricter R-hat < 1.01; this floor is for
#: the R-hat ≤ 1.1 used here).  A run short of it is extended like one with R-hat > 1.1
#: (``extend_draws``).  Measured on the README's MLP classifier (4 chains, defaults): 200 draws gave ESS 97
#: and λ̂ 4.71 ± 0.48 with R-hat 1.04, 1000 draws ESS 833 and 5.33 ± 0.14.
ESS_MIN = 100.0
#: With ``sampler="auto"``, the samplers tried in this order, each adapted from w* at the γ reached, when SGLD's
#: chains have not settled once the automatic γ can rise no further (and the draws were extended); the first
#: whose run settles — its own checks, and a direct run at ε/2 with the same steps — gives the draws.
#: SGHMC damped critically for the directions only γ holds (``friction="auto"``, α = √(2εγ)) relaxes them in
#: about 1/√(ηγ) steps where SGLD needs 1/(ηγ), at half SGLD's discretisation bias; RMSProp-SGLD moves flat
#: directions 1/a = 10 times faster.  Measured on the README's tiny GPT-2 (γ = 10, ε = 2.0e-4, 4 chains,
#: 500 + 2000 steps): SGLD ESS 42, R-hat 1.10, λ̂ 54.9; SGHMC (α = 0.063) ESS 153, R-hat 1.03, λ̂ 56.1 ± 0.4,
#: and 56.6 ± 0.5 at ε/2.
FALLBACK_SAMPLERS = ("sghmc", "rmsprop_sgld")
#: With ``check_halving=None`` (the default), SGLD's chains are continued at ε/2 once the run has settled — a
#: re-settling of a quarter of the draws' steps, then the draws' steps again — and λ̂ there is compared with the
#: draws' (:func:`slt.engine._continued_halving`), when those steps are at most this share of the run's own steps
#: from w* (burn-in and draws).  The in-run ε/2 estimate (:func:`slt.diagnostics.halved_step_estimate`) reads
#: relaxation off the trace but cannot see SGLD's discretisation bias, which only a run at another step shows:
#: a 2-layer ``nn.TransformerEncoder`` classifier (``benchmarks/real_defaults.py transformer``) converged at
#: γ = 100 with λ̂ 142.0 ± 1.3 while a direct run at ε/2 gave 135.6 ± 2.0.  The share keeps the check where the
#: run is long beside its draws (an escalated γ, a relaxation burn-in: the networks, where such bias was
#: measured) and off the default short runs of the toy models, where it would double their cost.
HALVING_CHECK_SHARE = 0.5
#: With an automatic step size, a plain-SGLD run whose first-order step bias — discretisation and minibatch
#: heating together, :math:`\tfrac\epsilon8(n\beta)^2\,\mathbb E\|\nabla L_B\|^2` over the draws
#: (:func:`slt.diagnostics.step_bias`) — exceeds this share of λ̂ in some group is repeated once with that group's
#: step shrunk to bring it here (runs of at least :data:`LOCALIZATION_MIN_DRAWS` draws).  The adaptation targets a MALA acceptance, which in few dimensions allows
#: εκ/4 ≈ 0.05 and more on every direction: linear regression d = 1, n = 10⁴ read 0.595 ± 0.012 over six seeds
#: against the exact 0.500 at batch 256 (bias predicted 0.090) and 0.544 ± 0.006 at full batch (predicted
#: 0.040), each run "converged".  Networks and the toy models spread their curvature over many directions,
#: most far below the stiffest that sets ε, and read 1.3–2.2% (the README's MLP, TMS 5-/6-gon, a 10-32-5
#: classifier), which this share leaves alone.
STEP_BIAS_SHARE = 0.05
#: The most the step-bias rescale shrinks a step (:data:`STEP_BIAS_SHARE`): a quarter, whose relaxation times
#: are four times the run's.
STEP_BIAS_MIN_FACTOR = 0.25
#: The continued ε/2 check needs at least this many draws (and 3 chains, for the paired z over chains).
HALVING_CHECK_MIN_DRAWS = 10
#: The continued ε/2 check gives the first-order extrapolation 2λ̂(ε/2) − λ̂(ε) only where λ̂ fell by at most
#: this share at ε/2: beyond, the bias is not linear in ε (a Gaussian direction's is εκ/4/(1 − εκ/4)), and at
#: εκ = 3.5 the extrapolation read 1.77 against the ε → 0 value 4.65.
EXTRAPOLATION_MAX_CHANGE = 0.25
#: With ``sampler="auto"`` at full batch, the first of :data:`FALLBACK_SAMPLERS` (critically damped SGHMC) runs
#: *before* SGLD at the last γ a run can use when that γ is above :data:`LOCALIZATION` and SGLD's relaxation
#: burn-in there (:func:`relaxation_steps` at its adapted ε) would exceed this many times the draws' steps: the
#: regime where SGLD's run is mostly burn-in and, measured, where it then did not mix either.  SGHMC relaxes the
#: directions only γ holds in about 1/α of SGLD's steps (α = √(2εγ)); SGLD (full burn-in) and then the rest of
#: the list follow if SGHMC does not settle.  Measured on the README's tiny GPT-2 (γ = 10 at the end of the
#: ladder, SGLD's adapted ε = 1.99e-4 → 5/(εγ) = 2519 steps = 12.6 × its 200 draws): SGLD's run there and its
#: draw extension took about 187 of the call's 242 s and ended at R-hat 1.14, after which SGHMC settled in 44 s
#: (λ̂ 56.08 ± 0.30, 55.78 at ε/2); SGHMC first returns the same draws, the call in about 60 s.  The same factor
#: as :data:`BURNIN_MAX_FACTOR`: beyond it the burn-in would be more than 4/5 of SGLD's run.
SGHMC_FIRST_BURNIN = 4


@dataclass(frozen=True)
class LLCDefaults:
    """Sampling defaults of :func:`slt.estimate_llc` (see its docstring for each)."""

    #: SGLD, followed by critically damped SGHMC and then RMSProp-SGLD (frozen preconditioner) at the γ reached
    #: when SGLD's chains do not settle under the automatic γ (:data:`FALLBACK_SAMPLERS`, :func:`slt.estimate_llc`),
    #: SGHMC first at full batch where SGLD's burn-in would dominate (:data:`SGHMC_FIRST_BURNIN`);
    #: ``"sgld"`` never switches
    sampler: str = "auto"
    num_chains: int = 8
    num_draws: int = 1000
    num_burnin: int | None = None
    num_steps_bw_draws: int = 1
    step_size: float | None = None
    nbeta: float | None = None
    localization: float | None = None
    #: ``"auto"``: :data:`BATCH_SIZE` samples per step, raised once when minibatch noise would bias λ̂
    #: (:data:`BATCH_RAISES`); a number is used as given; ``None`` is the full batch.
    batch_size: int | str | None = "auto"
    mala_every: int = 10
    #: target Metropolis acceptance of the Langevin proposal for the adapted step.  0.99, not
    #: NUTS' 0.8: SGLD has no accept/reject step, so its bias must be kept small by the step
    #: itself.  For a Gaussian direction of curvature κ the bias of E[L] is εκ/4 and the acceptance
    #: deficit about (εκ)³/8 per direction; measured (full batch, 8 chains × 3000 draws) on the DLN
    #: [5, 3, 5] oracle (λ = 6.5): target 0.97 gave +10.8%, 0.99 +6.7%, 0.995 +6.0%, the curvature
    #: rule +7.7%; TMS 5-/6-gon (λ = 7, 8.5): 0.99 gave +7.5% / +4.5% (curvature rule +7.4% / +4.4%).
    target_accept: float = 0.99
    #: continue a run whose chains are stationary but have not mixed (R-hat > 1.1 or an effective sample
    #: size under :data:`ESS_MIN` its only unsettled findings) for more draws: ``True`` within :data:`EXTENSION_BUDGET`, an int caps the draws in all,
    #: ``False`` keeps ``num_draws``
    extend_draws: bool | int = True
    #: continue SGLD's settled chains at ε/2 and compare λ̂ (a direct check of "stable when ε halves", which sees
    #: the discretisation bias the in-run check cannot): ``None`` when it costs at most
    #: :data:`HALVING_CHECK_SHARE` of the run with an automatic step, ``True`` always (SGLD), ``False`` never
    check_halving: bool | None = None

    def asdict(self) -> dict:
        return asdict(self)


#: the defaults in use
LLC = LLCDefaults()


def default_nbeta(n: int) -> float:
    r"""nβ = n / log n: the WBIC inverse temperature β* = 1/log n (Watanabe 2013),
    as used by Lau et al. (2023).  devinterp 2.x instead uses b / log b with the
    batch size b; pass ``nbeta`` to use any other value."""
    if n < 2:
        raise ValueError(f"default nbeta (n / log n) needs n >= 2 samples, got n={n}: pass nbeta explicitly")
    return n / math.log(n)


def default_burnin(num_draws: int, num_steps_bw_draws: int = 1, step_size: float | None = None,
                   localization: float | None = None, relaxation_gain: float = 1.0, final: bool = False) -> int:
    r"""``num_burnin`` for ``num_burnin=None``: the steps from w* at the frozen step before the first
    draw (a step-size adaptation runs before them, as a phase of its own).

    ``num_draws // 4``, lengthened once ε and γ are known to :data:`RELAXATION_TIMES`
    / (εγ) steps when that costs at most :data:`BURNIN_MAX_FACTOR` times the draws' steps
    (:data:`BURNIN_MAX_FACTOR_ESCALATED` times when γ is above the default :data:`LOCALIZATION`,
    :data:`BURNIN_MAX_FACTOR_FINAL` times when that γ is also the last the run can use).  Under the
    localized potential a direction the loss leaves flat is held by γ alone, and SGLD relaxes it at a
    rate εγ per step (:math:`w \leftarrow w - \tfrac{\epsilon}{2}\gamma w + \sqrt{\epsilon}\xi` has
    variance :math:`(1 - e^{-\epsilon\gamma t})/\gamma` after t steps): the slowest relaxation γ
    allows.  A network's near-flat directions relax on that scale (measured on a 26k-parameter MLP at
    γ = 100: a quarter-length burn-in left λ̂ 15% low at the adapted ε and 40% low at ε/2, both
    flagged as still rising).  Toy models at γ = 1, where 1/(εγ) is far beyond the draws, relax by
    their curvature instead and keep ``num_draws // 4`` (the bound would multiply their cost for
    nothing); the run's R-hat and drift checks judge them.

    Parameters
    ----------
    num_draws, num_steps_bw_draws
        The run's draws and steps between draws.
    step_size, localization
        ε and γ; ``None`` while unknown (before adaptation).  A run whose groups (checkpoints,
        restrictions) have steps of their own takes the longest of their burn-ins.
    relaxation_gain
        The sampler's factor on ε in a flat direction (``Sampler.relaxation_gain``: 1 for SGLD, 1/a
        for RMSProp-SGLD, whose preconditioner gives such a direction 1/a times the step): the slowest
        relaxation is then RELAXATION_TIMES / (ε · gain · γ) steps.  Measured on a tiny GPT-2 (the
        README's, n = 96 sequences, γ = 10): RMSProp-SGLD at ε = 2.76e-5 with the SGLD rule's 18 083
        steps over the cap kept a 50-step burn-in and ended with λ̂ rising 14.5 → 26.7 (R-hat 1.82); with
        the gain, 1809 steps: λ̂ 57.8 ± 0.7, R-hat 1.08, converged.
    final
        γ is the last the run can use (the automatic γ at the end of its ladder, or a given γ): above
        :data:`LOCALIZATION` the cap is then :data:`BURNIN_MAX_FACTOR_FINAL`.
    """
    base = num_draws // 4
    if step_size is None or localization is None or not (step_size > 0 and localization > 0):
        return base
    relax = relaxation_steps(step_size, localization, relaxation_gain)
    cap = (BURNIN_MAX_FACTOR if localization <= LOCALIZATION
           else BURNIN_MAX_FACTOR_FINAL if final else BURNIN_MAX_FACTOR_ESCALATED)
    if relax > cap * num_draws * num_steps_bw_draws:
        return base
    return max(base, relax)


def relaxation_steps(step_size: float, localization: float, relaxation_gain: float = 1.0) -> int:
    r"""The burn-in that covers the slowest relaxation γ allows: :data:`RELAXATION_TIMES` / (ε · gain · γ)
    steps, rounded up (see :func:`default_burnin`; ``relaxation_gain`` ≤ 0 counts as 1)."""
    gain = relaxation_gain if relaxation_gain > 0 else 1.0
    return math.ceil(RELAXATION_TIMES / (step_size * gain * localization))


def default_localization() -> float:
    r"""γ = 1: a unit Gaussian prior N(w*, I) around the checkpoint, fixed in n.

    γ must not grow with n: with γ ∝ nβ the localization acts like a fixed L2
    penalty added to the loss and λ̂ → 0 at singular points as n grows
    (measured: normal-crossing w1²w2⁴ at n = 10⁴, λ = 1/4, gave 0.17 with
    γ = 0.01 nβ, 0.12 with γ = 10 and 0.23 ± 0.03 with γ = 1).  A regular
    direction of curvature h is shrunk by 1/(1 + γ/(nβ h)) (the exact
    quadratic formula), negligible once nβ h ≫ 1.  The price of a weak γ is
    slow mixing along flat directions (their variance relaxes in ≈ 1/(εγ) steps, their mean in 2/(εγ)).  With
    ``localization=None`` the engine therefore starts here and raises γ tenfold
    while the chains have not settled (R-hat > 1.1, λ̂ still rising through the
    draws or not stable when ε halves; :data:`LOCALIZATION_STEPS`): networks, whose near-flat directions
    wander, end near the γ ≈ 100 that Lau et al. (2025) use for networks, while
    toy models keep γ = 1.
    """
    return LOCALIZATION
