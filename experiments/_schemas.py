"""Typed schemas of the experiment configs, registered in Hydra's ConfigStore.

Every primary config in ``conf/`` names its schema first in its defaults list
(``- tms_schema``), and every group option names the group's schema
(``- /schema/sampler@_here_``), so a misspelled key (``sampler.num_chain=4``)
or a mistyped value (``sampler.num_draws=abc``) is rejected by OmegaConf
with a message naming the key before anything runs.  Values that type-check
but make no sense (``sampler.num_chains=0``) are rejected by
:func:`validate` at the start of the job, also before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from slt.defaults import LLC

__all__ = [
    "SamplerConf",
    "TrainConf",
    "TMSTrainConf",
    "SymmetryConf",
    "TMSModelConf",
    "TMSSparseDataConf",
    "TMSBernoulliDataConf",
    "TMSInitConf",
    "TMSConfig",
    "ExpFamConfig",
    "LLCConfig",
    "DecomposeModelConf",
    "DecomposeConfig",
    "CurveConf",
    "TMSCurveConfig",
    "register",
    "validate",
]

RESULTS_ROOT = "${oc.env:SLT_RESULTS_DIR,results}"


# ---------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------
@dataclass
class SamplerConf:
    """``sampler/``: keyword arguments of :func:`slt.estimate_llc` (instantiates to a partial of it).

    The defaults are the engine's own (:data:`slt.defaults.LLC`, one place for
    both); a primary config that wants other values sets them (``tms.yaml``:
    ``sampler.num_draws: 4000``).  The entry points turn the node into the
    engine's keyword arguments with :func:`experiments._runlib.llc_kwargs`.
    """

    _target_: str = "slt.estimate_llc"
    _partial_: bool = True
    sampler: str = LLC.sampler
    num_chains: int = LLC.num_chains
    num_draws: int = LLC.num_draws
    num_burnin: Optional[int] = LLC.num_burnin
    num_steps_bw_draws: int = LLC.num_steps_bw_draws
    step_size: Optional[float] = LLC.step_size
    nbeta: Optional[float] = LLC.nbeta
    localization: Optional[float] = LLC.localization
    batch_size: Optional[Union[int, str]] = LLC.batch_size  # a number, null (full batch) or "auto"
    mala_every: int = LLC.mala_every
    extend_draws: Union[bool, int] = LLC.extend_draws  # continue stationary, unmixed chains; false: num_draws
    check_halving: Optional[bool] = LLC.check_halving  # continue settled SGLD chains at ε/2; null: when cheap
    sampler_kwargs: Dict[str, Any] = field(default_factory=dict)  # numbers, or e.g. friction: auto


@dataclass
class TrainConf:
    """Training to w* (:func:`slt.training.train`): main phase, then full-batch L-BFGS."""

    steps: int = 3000
    lr: float = 0.01
    optimizer: str = "adam"
    batch_size: Optional[int] = None
    weight_decay: float = 0.0
    finish: Optional[str] = "lbfgs"
    finish_iterations: int = 1000
    tol: float = 1e-6
    dtype: str = "float64"


@dataclass
class TMSTrainConf(TrainConf):
    """TMS training: as :class:`TrainConf`, plus ``online``.

    ``online``: the main phase draws a fresh minibatch of ``batch_size``
    samples from q at every step (``data`` with ``n = batch_size``), i.e. it
    descends the population loss as Elhage et al. (2022) train their toy
    models, instead of cycling through the ``data.n`` stored samples (which
    overfits them when ``n`` is small against the ``n_hidden × n_features``
    weights).  The finishing phase, if any, and λ̂ still use the stored
    samples.  Needs ``batch_size`` and ``optimizer`` adam or sgd.
    """

    online: bool = False


@dataclass
class SymmetryConf:
    """``symmetry/``: which group acts on the data and what is done to q.

    ``operation``: ``none``; ``symmetrize`` (q_h = (1 - h) q + h q_G);
    ``break`` (q_h = (1 - h) q + h q_s, q_s = :func:`slt.symmetry.break_symmetry`
    of q with strength ``strength``).
    ``group=none`` (or ``operation=none``) uses q as generated.
    ``susceptibility``: also compute the covariance estimate of dλ̂/dh along
    the chosen path at w* held fixed.
    ``mode``: where λ̂ at q_h is measured: ``quenched`` (at the w* of the
    unperturbed q, held fixed along the path) or ``retrained`` (at w*_h,
    trained on q_h itself from the same init).  The TMS entry point does
    both (default ``quenched``); the exponential family always re-trains
    (its ``expfam.yaml`` sets ``retrained`` and rejects ``quenched``).
    """

    group: str = "none"
    degree: Optional[int] = None
    acts_on: str = "x"
    operation: str = "none"
    strength: float = 1.0
    h: float = 0.0
    susceptibility: bool = False
    mode: str = "quenched"


@dataclass
class TMSModelConf:
    """``model/tms``: :class:`slt.models.ToyModelOfSuperposition`."""

    _target_: str = "slt.models.ToyModelOfSuperposition"
    n_features: int = 6
    n_hidden: int = 2


@dataclass
class TMSSparseDataConf:
    """``data/tms_sparse``: high-sparsity limit x = μ e_i (Chen et al. 2023)."""

    _target_: str = "slt.models.make_tms_sparse_data"
    _partial_: bool = True
    n: int = 20000
    n_features: int = "${model.n_features}"  # type: ignore[assignment]


@dataclass
class TMSBernoulliDataConf:
    """``data/tms_bernoulli``: x_i = 0 with probability S, else U[0, 1] (Elhage et al. 2022)."""

    _target_: str = "slt.models.make_tms_data"
    _partial_: bool = True
    n: int = 20000
    n_features: int = "${model.n_features}"  # type: ignore[assignment]
    sparsity: float = 0.9


@dataclass
class TMSInitConf:
    """Starting point of training: ``random`` (seeded Xavier) or the ``kgon`` critical point.

    ``std``: for ``random``, the standard deviation of the Gaussian entries of W
    (``null``: Xavier, sqrt(2 / (n_features + n_hidden))).  Elhage et al.'s
    code applies ``xavier_normal_`` to an (instances, features, hidden)
    tensor, which gives std = sqrt(2 / (n_features·n_hidden + instances·n_hidden)),
    about 0.02 for 200 features × 20 hidden × 20 instances: a much smaller
    start, and at intermediate sparsity a different end point.
    """

    kind: str = "random"
    k: int = 6
    dead_bias: float = -1.0
    plus: bool = False
    noise: float = 0.0
    std: Optional[float] = None


# ---------------------------------------------------------------------------
# primary configs
# ---------------------------------------------------------------------------
@dataclass
class _Base:
    name: str = MISSING
    seed: int = 0
    force: bool = False
    results_root: str = RESULTS_ROOT
    device: str = "cpu"
    save_traces: bool = True
    progress: bool = False


@dataclass
class TMSConfig(_Base):
    """``tms.yaml``: one TMS run: data, training, classification, λ̂ vs closed form."""

    name: str = "tms"
    model: TMSModelConf = field(default_factory=TMSModelConf)
    data: Any = MISSING
    importance_decay: float = 1.0
    init: TMSInitConf = field(default_factory=TMSInitConf)
    train: TMSTrainConf = field(default_factory=TMSTrainConf)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    symmetry: SymmetryConf = field(default_factory=SymmetryConf)
    classify_tol: float = 0.05


@dataclass
class ExpFamModelConf:
    """``model/expfam_*``: finite-sample-space exponential family (:mod:`slt.models.expfam`).

    ``family``: ``fixed`` (p ∝ exp⟨θ, s⟩, T(s) = s, G-equivariant for every
    linear symmetry of the support; λ = d/2) or ``polar``
    (p ∝ exp(r ⟨(cos φ, sin φ), s⟩), features depend on φ).  ``space``:
    ``polygon`` (vertices of the regular ``size``-gon in R²) or ``hypercube``
    ({-1, 1}^size; ``fixed`` only).
    """

    family: str = "fixed"
    space: str = "polygon"
    size: int = 6


@dataclass
class ExpFamDataConf:
    """``data/expfam_teacher``: n samples from a teacher q on the support.

    ``teacher``: ``uniform`` (invariant under every symmetry of the support) or
    ``random`` (probabilities softmax(temperature · N(0, 1)), seeded: not invariant).
    """

    n: int = 5000
    teacher: str = "random"
    temperature: float = 1.0


@dataclass
class ExpFamConfig(_Base):
    """``expfam.yaml``: exponential family under symmetry (experiment 1)."""

    name: str = "expfam"
    model: ExpFamModelConf = field(default_factory=ExpFamModelConf)
    data: ExpFamDataConf = field(default_factory=ExpFamDataConf)
    train: TrainConf = field(default_factory=TrainConf)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    symmetry: SymmetryConf = field(default_factory=SymmetryConf)
    hessian_tol: float = 1e-6


@dataclass
class LLCConfig(_Base):
    """``llc.yaml``: λ̂ of a user's model: ``_target_`` of module and data, checkpoint, loss."""

    name: str = "llc"
    model: Any = MISSING
    data: Any = MISSING
    loss: Any = MISSING
    checkpoint: Optional[str] = None
    train: Optional[TrainConf] = None
    sampler: SamplerConf = field(default_factory=SamplerConf)
    dtype: Optional[str] = "float32"  # null: the model's precision (slt.estimate_llc's dtype=None)
    reference: Any = None
    restrict: Any = None  # null, heads/layers/attention_and_mlp/embeddings/modules, a glob, globs, {label: glob}
    qkv_layout: Optional[str] = None  # restrict=heads on a user's fused q/k/v projection: blocks or per_head
    eval: bool = True  # model.eval() before sampling (dropout off, BatchNorm's running statistics); false: as built


@dataclass
class CurveConf:
    """``tms_curve.yaml`` ``curve``: the minibatch-Adam training that produces the checkpoints."""

    steps: int = 10000
    lr: float = 0.001
    init_scale: float = 0.1
    batch_size: int = 128
    num_checkpoints: int = 32
    log_every: int = 10
    first_checkpoint: int = 50


@dataclass
class TMSCurveConfig(_Base):
    """``tms_curve.yaml``: one TMS training run, λ̂ at its checkpoints in one batched call."""

    name: str = "tms_curve"
    model: TMSModelConf = field(default_factory=TMSModelConf)
    data: Any = MISSING
    importance_decay: float = 1.0
    curve: CurveConf = field(default_factory=CurveConf)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    classify_tol: float = 0.05


@dataclass
class DecomposeModelConf:
    """``decompose.yaml`` ``model``: the case (``independent``, ``shared_angle``, ``dihedral``,
    ``spectrum_expfam``, ``spectrum_tms``) and the per-block rotation group (``cyclic4``, ``so2``)."""

    case: str = "independent"
    group: str = "cyclic4"


@dataclass
class DecomposeConfig(_Base):
    """``decompose.yaml``: LLC decomposition over symmetries (see the file for the meaning of each key).

    ``subset``: ``None`` for the whole lattice in one job, or a bitmask for one λ̂(S).
    """

    name: str = "decompose"
    model: DecomposeModelConf = field(default_factory=DecomposeModelConf)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    n: int = 250
    shift: float = 1.0
    nbeta_n: int = 2000
    orbit_samples: int = 16
    z: float = 3.0
    retrain: bool = True
    quenched: bool = False
    step_factor: float = 0.1
    subset: Optional[int] = None


@dataclass
class LadderConf:
    """``tms_posterior.yaml`` ``ladder``: rungs of the replica-exchange temperature ladder."""

    num: int = 8
    min_nbeta: float = 60.0
    swap_every: int = 10


@dataclass
class PosteriorConf:
    """``tms_posterior.yaml`` ``posterior``: draws of :func:`slt.sample_posterior`."""

    num_draws: int = 200
    num_burnin: int = 10000
    num_steps_bw_draws: int = 50
    step_size: Optional[float] = None


@dataclass
class TMSPosteriorConfig(_Base):
    """``tms_posterior.yaml``: phase fractions of the TMS posterior along a temperature ladder."""

    name: str = "tms_posterior"
    model: TMSModelConf = field(default_factory=TMSModelConf)
    data: Any = MISSING
    prior_std: float = 2.0
    starts: List[int] = field(default_factory=lambda: [5, 6])
    dead_bias: float = -0.5
    chains_per_start: int = 4
    live_threshold: float = 0.5
    ladder: LadderConf = field(default_factory=LadderConf)
    posterior: PosteriorConf = field(default_factory=PosteriorConf)


@dataclass
class RefinedModelConf:
    """``refined.yaml`` ``model``: :class:`experiments._induction.AttnOnlyTransformer`."""

    vocab: int = 48
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    context: int = 32
    layer_norm: bool = True


@dataclass
class RefinedDataConf:
    """``refined.yaml`` ``data``: :func:`experiments._induction.make_induction_data`."""

    n: int = 4096
    n_eval: int = 512
    min_len: int = 8
    max_len: int = 16
    concentration: float = 1.0


@dataclass
class RefinedTrainConf:
    """``refined.yaml`` ``training``: minibatch Adam and the log-spaced checkpoints."""

    steps: int = 3000
    lr: float = 0.01
    batch_size: int = 32
    num_checkpoints: int = 20
    first_checkpoint: int = 20
    log_every: int = 25


@dataclass
class RefinedConfig(_Base):
    """``refined.yaml``: refined LLCs of the attention heads of a 2-layer attention-only transformer
    over training (``experiments/refined.py``; the meaning of each key is in the yaml file)."""

    name: str = "refined"
    model: RefinedModelConf = field(default_factory=RefinedModelConf)
    data: RefinedDataConf = field(default_factory=RefinedDataConf)
    training: RefinedTrainConf = field(default_factory=RefinedTrainConf)  # not "train": that node is TrainConf's
    score_threshold: float = 0.3
    data_refined: bool = True
    sampler: SamplerConf = field(default_factory=SamplerConf)


# ---------------------------------------------------------------------------
# registration and validation
# ---------------------------------------------------------------------------
def register() -> None:
    """Register the schemas (idempotent).  Primary: ``tms_schema``, ``expfam_schema``,
    ``llc_schema``, ``decompose_schema``, ``tms_curve_schema``; group schemas under ``schema/<group>/``."""
    cs = ConfigStore.instance()
    cs.store(name="tms_schema", node=TMSConfig)
    cs.store(name="expfam_schema", node=ExpFamConfig)
    cs.store(name="llc_schema", node=LLCConfig)
    cs.store(name="tms_curve_schema", node=TMSCurveConfig)
    cs.store(name="decompose_schema", node=DecomposeConfig)
    cs.store(name="tms_posterior_schema", node=TMSPosteriorConfig)
    cs.store(name="refined_schema", node=RefinedConfig)
    cs.store(group="schema/sampler", name="sampler", node=SamplerConf)
    cs.store(group="schema/symmetry", name="symmetry", node=SymmetryConf)
    cs.store(group="schema/model", name="tms", node=TMSModelConf)
    cs.store(group="schema/model", name="expfam", node=ExpFamModelConf)
    cs.store(group="schema/data", name="tms_sparse", node=TMSSparseDataConf)
    cs.store(group="schema/data", name="tms_bernoulli", node=TMSBernoulliDataConf)
    cs.store(group="schema/data", name="expfam", node=ExpFamDataConf)


_SAMPLERS = ("sgld", "rmsprop_sgld", "sghmc", "sgnht")  # when the library has no registry to ask
_OPTIMIZERS = ("adam", "sgd", "lbfgs")
_GROUPS = ("none", "cyclic", "permutation", "reflection", "dihedral", "sign_flips")
_OPERATIONS = ("none", "symmetrize", "break")
_SYMMETRY_MODES = ("quenched", "retrained")


def _known_sampler_keys(cfg: Any) -> None:
    """Every key of the ``sampler`` node must be an argument of :func:`slt.estimate_llc`: a key added with ``+``
    (Hydra's own hint for a misspelled one, ``+sampler.num_chain=4``) passed composition and failed only after
    training, with ``estimate_llc() got an unexpected keyword argument``."""
    import difflib
    import inspect

    from slt.engine import estimate_llc  # (the engine's own signature, whatever wraps slt.estimate_llc)

    node = _select(cfg, "sampler")
    if node is None:
        return
    known = set(inspect.signature(estimate_llc).parameters)
    for key in node:
        if str(key).startswith("_") or key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        _fail(f"sampler.{key}", _select(cfg, f"sampler.{key}"),
              "not an argument of slt.estimate_llc" + (f" (did you mean sampler.{close[0]}?)" if close else ""))
    kwargs = _select(cfg, "sampler.sampler_kwargs")
    if kwargs:  # (+sampler.sampler_kwargs.bogus=1 failed after training)
        from slt.engine import check_sampler_kwargs

        try:
            check_sampler_kwargs(_select(cfg, "sampler.sampler") or "auto", dict(kwargs))
        except (TypeError, ValueError) as e:
            _fail("sampler.sampler_kwargs", dict(kwargs), str(e))


def _fail(key: str, value: Any, need: str) -> None:
    raise ValueError(f"invalid config value {key}={value!r}: {need}")


def _int_at_least(cfg: Any, key: str, minimum: int, optional: bool = False) -> None:
    v = _select(cfg, key)
    if v is None and optional:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        _fail(key, v, f"must be an integer >= {minimum}")


def _positive(cfg: Any, key: str, optional: bool = False, allow_zero: bool = False) -> None:
    v = _select(cfg, key)
    if v is None and optional:
        return
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v >= 0 if allow_zero else v > 0):
        _fail(key, v, "must be " + ("non-negative" if allow_zero else "positive"))


def _one_of(cfg: Any, key: str, options: tuple) -> None:
    v = _select(cfg, key)
    if v not in options:
        _fail(key, v, f"must be one of {list(options)}")


def _select(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part] if part in node else None
        if node is None:
            return None
    return node


def _sampler_names() -> tuple[str, ...]:
    """The sampler names the engine accepts (its registry ``slt.samplers.SAMPLERS``)."""
    try:
        from slt.samplers import SAMPLERS

        # "auto": the engine's default (SGLD, then SGHMC or RMSProp-SGLD when SGLD does not settle; SGHMC first
        # where SGLD's burn-in would dominate)
        return ("auto", *SAMPLERS)
    except ImportError:  # pragma: no cover - a library without the registry
        return ("auto", *_SAMPLERS)


def validate(cfg: Any) -> None:
    """Reject values that type-check but are invalid, naming the key (ValueError).

    Checks the keys the experiments share: sampler, train, symmetry, seed; each
    entry point adds its own checks.
    """
    _int_at_least(cfg, "seed", 0)
    if "sampler" in cfg:
        _known_sampler_keys(cfg)
        _one_of(cfg, "sampler.sampler", _sampler_names())
        _int_at_least(cfg, "sampler.num_chains", 1)
        _int_at_least(cfg, "sampler.num_draws", 1)
        _int_at_least(cfg, "sampler.num_burnin", 0, optional=True)
        _int_at_least(cfg, "sampler.num_steps_bw_draws", 1)
        if _select(cfg, "sampler.batch_size") != "auto":
            _int_at_least(cfg, "sampler.batch_size", 1, optional=True)
        _int_at_least(cfg, "sampler.mala_every", 0)
        _positive(cfg, "sampler.step_size", optional=True)
        _positive(cfg, "sampler.nbeta", optional=True)
        _positive(cfg, "sampler.localization", optional=True, allow_zero=True)
    if _select(cfg, "train") is not None:
        _int_at_least(cfg, "train.steps", 0)
        _positive(cfg, "train.lr")
        _one_of(cfg, "train.optimizer", _OPTIMIZERS)
        _one_of(cfg, "train.finish", ("lbfgs", None))
        _one_of(cfg, "train.dtype", ("float32", "float64"))
        _int_at_least(cfg, "train.finish_iterations", 0)
        _int_at_least(cfg, "train.batch_size", 1, optional=True)
        if _select(cfg, "train.online"):
            if _select(cfg, "train.batch_size") is None:
                _fail("train.online", True, "needs train.batch_size (the size of each fresh minibatch)")
            if _select(cfg, "train.optimizer") == "lbfgs":
                _fail("train.online", True, "needs train.optimizer adam or sgd (fresh minibatches every step)")
    if "symmetry" in cfg:
        _one_of(cfg, "symmetry.group", _GROUPS)
        _one_of(cfg, "symmetry.operation", _OPERATIONS)
        _one_of(cfg, "symmetry.acts_on", ("x", "y", "both"))
        _one_of(cfg, "symmetry.mode", _SYMMETRY_MODES)
        h = _select(cfg, "symmetry.h")
        if not 0.0 <= h <= 1.0:
            _fail("symmetry.h", h, "must be in [0, 1] (q_h = (1 - h) q0 + h q1)")
        if not math.isfinite(_select(cfg, "symmetry.strength")):
            _fail("symmetry.strength", _select(cfg, "symmetry.strength"), "must be finite")
    if _select(cfg, "device") not in ("cpu", "auto") and not str(_select(cfg, "device")).startswith("cuda"):
        _fail("device", _select(cfg, "device"), "must be cpu, auto or cuda[:i]")
