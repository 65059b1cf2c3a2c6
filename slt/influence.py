r"""Bayesian influence functions, the loss kernel and per-sample susceptibilities.

All three are (co)variances of per-sample losses under the localized tempered posterior that
:func:`slt.estimate_llc` samples,

.. math::

    p(w) \propto \exp\Bigl(-n\beta\,L_n(w) - \tfrac{\gamma}{2}\lVert w - w^*\rVert^2\Bigr),
    \qquad L_n(w) = \tfrac1n \textstyle\sum_i \ell_i(w),

estimated from one SG-MCMC run (:func:`slt.engine.sample_target`; the LLC of the run comes with
every result as :attr:`InfluenceResult.llc`).

Bayesian influence function (Kreer, Wu, Adam, Furman & Hoogland 2025, arXiv 2509.26544)
    :math:`\mathrm{BIF}(z_i, \varphi_j) = -\operatorname{Cov}_p(\ell_i(w), \varphi_j(w))` with
    :math:`\ell_i` the loss of training sample ``i`` and :math:`\varphi_j` the loss of query sample
    ``j`` or a user observable; :func:`bif`.  ``normalize=True`` gives
    :math:`-\operatorname{Corr}_p` (devinterp's default; no minus sign there: devinterp reports
    :math:`+\operatorname{Corr}`).
Loss kernel (arXiv 2509.26537)
    :math:`K_{ij} = \operatorname{Corr}_p(\ell_i, \ell_j)` of one set of samples (``+``, a positive
    semi-definite kernel; ``normalize=False``: the covariance); :func:`loss_kernel`.
Per-sample susceptibilities (Baker, Wang, Hoogland, Pathak & Murfet 2025, arXiv 2504.18274)
    :math:`\chi_{\varphi,i} = -\beta\,\operatorname{Cov}_p(\varphi, \ell_i)` with
    :math:`\beta = n\beta/n` (weighted data, normalised weights :math:`u_i`: :math:`n\beta\,u_i` in place of
    β); :func:`per_sample_susceptibility`.  Normalisation: this is the exact
    derivative :math:`\partial E[\varphi]/\partial c_i` of the posterior with sample ``i``'s loss
    counted :math:`1 + c_i` times, :math:`p_c \propto \exp(-\beta\sum_i(1+c_i)\ell_i - \frac\gamma2
    \lVert w-w^*\rVert^2)`; so for any reweighting :math:`c = h\,\delta`,
    :math:`\frac{d}{dh}E_h[\varphi]\big|_0 = \sum_i \delta_i\,\chi_{\varphi,i}`
    (:meth:`SusceptibilityResult.total`).  With :math:`\sum_i u_i\delta_i = 0` this is the mixture path
    :math:`q_h = (1-h)q_0 + h q_1` of :func:`slt.symmetry.llc_susceptibility` (``q1`` = the samples
    with weights :math:`u_i(1+\delta_i)`, :math:`u_i = 1/n` unweighted), whose
    :math:`\chi_\varphi = -n\beta\operatorname{Cov}(\varphi, L_{q_1} - L_{q_0})` it reproduces.  Baker et al.
    report :math:`-\operatorname{Cov}(\varphi, \ell_z - L_n)` (no :math:`n\beta`, relative to the sampling loss):
    :attr:`SusceptibilityResult.baker`.
    The LLC's own per-sample decomposition is
    :math:`\lambda_i = \beta(E[\ell_i] - \ell_i(w^*)) - n\beta^2\operatorname{Cov}(L_n, \ell_i)`,
    with :math:`\sum_i\delta_i\lambda_i = d\hat\lambda/dh` of the same path.

Component-localized observables: with ``restrict_to`` (a mapping of weight restrictions, e.g.
:func:`slt.restrict.heads`) every component ``C`` is sampled with only its weights moving (all
components in one batched run), and the default observable is the sampling loss
:math:`\varphi_C(w) = L_n(w_C, w^*_{\bar C})`: the loss restricted to the component's effect, as
in Baker et al.; one result per component.

Per-token values for causal language models (``per_token=True``): the per-token next-token losses
:math:`\ell_{i,t} = -\log p(x_{i,t+1}\mid x_{i,\le t})` (shape ``(n, T-1)`` per data set, 0 at
invalid positions; :func:`causal_lm_tokens`) take the place of :math:`\ell_i`; ``sum_tokens=True``
sums them over each sequence first (covariances are bilinear, so this equals summing the token-level
covariance; correlations are those of the summed losses).  Per-token susceptibilities carry the same
scale :math:`n\beta/n` as the per-sample ones, with the token's loss :math:`\ell_{i,t}` in place of
:math:`\ell_i`: for :func:`slt.losses.causal_lm` (the mean over a sequence's ``V_i`` valid tokens, so a token
weighs :math:`1/V_i` in its sequence's loss) :math:`\chi_{\varphi,i} = \sum_t \chi_{\varphi,(i,t)} / V_i`, and
:math:`\chi_{\varphi,(i,t)}` is :math:`V_i` times the response to reweighting that one token in the loss
(``scale`` is nβ/n for every token, whatever its sequence's ``V_i``).

Estimation
----------
Nothing of size ``n × draws`` is stored.  At every draw the per-sample losses of all chains,
``A (R, n_a)`` and ``B (R, n_b)``, update per-row running means and co-moments (Welford's
recurrence, :class:`OnlineCovariance`); the cross co-moment is ``(R, n_a, n_b)`` — unavoidable for
the full matrix (it is the output's size times the number of chains; with the per-chain covariances
taken from it at the end, twice that is checked against ``max_bytes``).  At the end the chains of a
group are combined with Chan et al.'s parallel formula
into the covariance *about the group mean* (the sample covariance of all draws pooled: chains
started at one ``w*`` that have not fully mixed differ in their means, and that spread is part of the
posterior's covariance which a pooled *within-chain* covariance would drop; it is also devinterp's
``"stack"``).  The standard error of each entry is the spread of the per-chain estimates,
:math:`\mathrm{sd}_c(\widehat{\mathrm{Cov}}_c)/\sqrt{C}` (per-chain correlations when normalised).
Diverged chains (:attr:`slt.loop.Trace.diverged`) are excluded; a run that the engine repeats with a
halved step starts the statistics afresh.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._runtime import autograd_allowed, user_stacklevel
from ._checks import check_int, check_observables, probe_observables
from .defaults import LLC
from .data import Data, _plain, as_source, row_numel
from .losses import _logits, _tokens_and_mask
from .result import LLCResult

__all__ = [
    "OnlineCovariance",
    "InfluenceResult",
    "SusceptibilityResult",
    "bif",
    "loss_kernel",
    "per_sample_susceptibility",
    "causal_lm_tokens",
]

Observable = Callable[[Mapping[str, Tensor]], Tensor]
#: default limit on the bytes of the cross co-moment ``(R, n_a, n_b)`` (float64)
MAX_BYTES = 8 << 30
#: elements of model output (and input) evaluated per chunk of samples, over all chains
CHUNK_ELEMENTS = 1 << 22
#: keyword arguments that go to :func:`slt.prepare_target` (the others go to :func:`slt.engine.sample_target`)
_PREPARE_KEYS = ("models", "state_dicts", "nbeta", "localization", "device", "dtype", "vectorize", "seed", "autocast",
                 "restrict_to")


# ----------------------------------------------------------------------------
# the online accumulator
# ----------------------------------------------------------------------------
class OnlineCovariance:
    r"""Per-row running means and co-moments of two vectors ``A (R, n_a)`` and ``B (R, n_b)``.

    Welford's recurrence per row: after the ``t``-th draw, with :math:`\delta = a - \bar a_{t-1}`,
    :math:`\bar a_t = \bar a_{t-1} + \delta/t` and the co-moment
    :math:`M_{ab} \mathrel{+}= \delta\,(b - \bar b_t)^\top` (likewise the variances' :math:`M_{aa}`,
    :math:`M_{bb}` diagonals).  ``same=True``: ``B`` is ``A`` (the loss kernel; no second copy).
    Memory: ``R·n_a·n_b`` float64 for the cross moment.  :meth:`combine` pools rows (chains) with
    the parallel formula of Chan, Golub & LeVeque (1979).
    """

    def __init__(self, rows: int, n_a: int, n_b: int | None = None, *, device: Any = "cpu",
                 dtype: torch.dtype = torch.float64, cross: bool = True):
        self.same = n_b is None
        n_b = n_a if n_b is None else n_b
        self.R, self.n_a, self.n_b, self.cross = rows, n_a, n_b, cross
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        self.count = 0
        self.mean_a, self.m2_a = z(rows, n_a), z(rows, n_a)
        self.mean_b, self.m2_b = (self.mean_a, self.m2_a) if self.same else (z(rows, n_b), z(rows, n_b))
        self.m_ab = z(rows, n_a, n_b) if cross else None

    def reset(self) -> None:
        self.count = 0
        for t in (self.mean_a, self.m2_a, self.mean_b, self.m2_b, self.m_ab):
            if t is not None:
                t.zero_()

    def update(self, a: Tensor, b: Tensor | None = None) -> None:
        """One draw: ``a (R, n_a)``, ``b (R, n_b)`` (omitted when ``same``)."""
        a = a.to(self.mean_a.dtype)
        self.count += 1
        t = self.count
        da = a - self.mean_a
        self.mean_a.add_(da / t)
        da_new = a - self.mean_a
        self.m2_a.addcmul_(da, da_new)
        if self.same:
            db_new = da_new
        else:
            b = b.to(self.mean_b.dtype)
            db = b - self.mean_b
            self.mean_b.add_(db / t)
            db_new = b - self.mean_b
            self.m2_b.addcmul_(db, db_new)
        if self.m_ab is not None:
            self.m_ab.baddbmm_(da.unsqueeze(2), db_new.unsqueeze(1))

    def combine(self, rows: Sequence[int] | Tensor) -> dict[str, Tensor]:
        r"""Pool ``rows`` (each with ``count`` draws): means, variances and the covariance about the pooled
        mean (divisor ``N - 1``), and per-row covariances / variances (divisor ``count - 1``)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.mean_a.device)
        t, k = self.count, int(idx.numel())
        # consecutive rows (a group's chains, none excluded): a view of the cross moment, not a copy
        first = int(idx[0]) if k else 0
        span = slice(first, first + k) if k and idx.tolist() == list(range(first, first + k)) else idx
        N = t * k
        ma, mb = self.mean_a[idx], self.mean_b[idx]
        ga, gb = ma.mean(0), mb.mean(0)
        ca, cb = ma - ga, mb - gb
        out = {
            "mean_a": ga, "mean_b": gb,
            "var_a": (self.m2_a[idx].sum(0) + t * (ca * ca).sum(0)) / max(N - 1, 1),
            "var_b": (self.m2_b[idx].sum(0) + t * (cb * cb).sum(0)) / max(N - 1, 1),
            "row_var_a": self.m2_a[idx] / max(t - 1, 1),
            "row_var_b": self.m2_b[idx] / max(t - 1, 1),
        }
        if self.m_ab is not None:
            m = self.m_ab[span]
            out["cov"] = (m.sum(0) + t * torch.einsum("ca,cb->ab", ca, cb)) / max(N - 1, 1)
            out["row_cov"] = m / max(t - 1, 1)
        return out


# ----------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------
@dataclass
class InfluenceResult:
    r"""A BIF or loss-kernel matrix of one group (checkpoint × restriction).

    Attributes
    ----------
    values, sem
        ``(n_train, n_query)`` (``(n_train, T-1, n_query, T-1)`` per token;
        ``(n_train[, T-1], n_obs)`` for observables): :math:`-\operatorname{Cov}` (:func:`bif`) or
        :math:`+\operatorname{Cov}` (:func:`loss_kernel`), or the correlations when ``normalized``;
        and the standard error of each entry (chain spread / √C).
    kind
        ``"bif"`` or ``"loss_kernel"``.
    normalized
        Correlations instead of covariances.
    row_labels, col_labels
        ``"train[i]"`` rows; ``"query[j]"`` (or ``"train[j]"``) or the observables' names as columns.
    mean_rows, var_rows, mean_cols, var_cols
        Posterior means and variances of the row / column quantities (same leading shapes).
    token_mask
        ``(n, T-1)`` valid positions of the row data set (per-token runs), else ``None``.
    num_chains_used
        Chains combined (diverged ones excluded).
    llc
        The run's :class:`slt.LLCResult` for this group.
    config
        The run's settings (``kind``, ``normalize``, ``per_token`` ... and the engine's).
    """

    values: Tensor
    sem: Tensor
    kind: str
    normalized: bool
    row_labels: list[str]
    col_labels: list[str]
    mean_rows: Tensor
    var_rows: Tensor
    mean_cols: Tensor
    var_cols: Tensor
    num_chains_used: int
    llc: LLCResult | None = None
    token_mask: Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def __str__(self) -> str:
        what = {"bif": "BIF −Corr" if self.normalized else "BIF −Cov",
                "loss_kernel": "loss kernel Corr" if self.normalized else "loss kernel Cov"}[self.kind]
        v = self.values
        llc = "" if self.llc is None else f"; λ̂ = {self.llc.llc_mean:.4g} ± {self.llc.llc_sem:.2g}"
        return (f"{what}: shape {tuple(v.shape)}, range [{float(v.min()):.4g}, {float(v.max()):.4g}], "
                f"median s.e. {float(self.sem.flatten().nanmedian()):.2g}, {self.num_chains_used} chains{llc}")


@dataclass
class SusceptibilityResult:
    r"""Per-sample (or per-token) susceptibilities of one group (checkpoint × restriction).

    Attributes
    ----------
    values, sem
        ``(n[, T-1], n_obs)``: :math:`\chi_{\varphi,i} = -s_i\operatorname{Cov}(\varphi, \ell_i)` with
        :math:`s_i` = :attr:`scale` (module docstring: the response of :math:`E[\varphi]` to counting
        sample ``i`` :math:`1+c_i` times), and their standard errors.
    scale
        ``(n[, T-1])``: :math:`s_i = n\beta\,u_i`, ``u`` the normalised data weights (:math:`\beta = n\beta/n`
        for unweighted data and for probe samples).
    baker
        ``(n[, T-1], n_obs)``: :math:`-\operatorname{Cov}(\varphi, \ell_z - L_n)`, the normalisation of
        Baker et al. (2025): no :math:`n\beta`, relative to the sampling loss.
    observables
        Column names; ``"loss"`` is the sampling loss :math:`L_n` (component-localized under a
        restriction).
    llc_values, llc_sem
        ``(n[, T-1])``: :math:`\lambda_i = s_i(E[\ell_i] - \ell_i(w^*)) - n\beta\,s_i\operatorname{Cov}(L_n,
        \ell_i)`, the per-sample decomposition of :math:`d\hat\lambda/dh`.
    nbeta, n, beta
        :math:`n\beta`, the number of training samples and :math:`\beta = n\beta/n`.
    mean_losses, star_losses
        :math:`E[\ell_i]` and :math:`\ell_i(w^*)`.
    restriction
        The group's restriction label (``None`` when unrestricted).
    token_mask, num_chains_used, llc, config
        As for :class:`InfluenceResult`.
    """

    values: Tensor
    sem: Tensor
    observables: list[str]
    llc_values: Tensor
    llc_sem: Tensor
    scale: Tensor
    baker: Tensor
    nbeta: float
    n: int
    mean_losses: Tensor
    star_losses: Tensor
    num_chains_used: int
    restriction: str | None = None
    llc: LLCResult | None = None
    token_mask: Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def beta(self) -> float:
        return self.nbeta / self.n

    def chi(self, name: str) -> Tensor:
        """The contributions ``(n[, T-1])`` of one observable."""
        return self.values[..., self.observables.index(name)]

    def total(self, delta: Tensor) -> dict[str, float]:
        r""":math:`\sum_i \delta_i\chi_{\varphi,i}` for every observable and :math:`\sum_i\delta_i\lambda_i`
        (key ``"llc"``): the derivative at ``h = 0`` along the reweighting :math:`c = h\,\delta`
        (``delta`` shaped like :attr:`llc_values`)."""
        delta = torch.as_tensor(delta, dtype=self.values.dtype)
        if delta.shape != self.llc_values.shape:
            raise ValueError(f"delta must have shape {tuple(self.llc_values.shape)}, got {tuple(delta.shape)}")
        lead = tuple(range(delta.ndim))
        chi = torch.tensordot(delta, self.values, dims=(lead, lead))
        out = {k: float(chi[j]) for j, k in enumerate(self.observables)}
        out["llc"] = float((delta * self.llc_values).sum())
        return out

    def __str__(self) -> str:
        head = f"per-sample susceptibilities{'' if self.restriction is None else f' [{self.restriction}]'}"
        return (f"{head}: shape {tuple(self.values.shape)}, observables {self.observables}, β = {self.beta:.4g}, "
                f"{self.num_chains_used} chains")


# ----------------------------------------------------------------------------
# per-sample and per-token losses of many parameter rows
# ----------------------------------------------------------------------------
def causal_lm_tokens(output: Any, target: Any) -> Tensor:
    r"""Per-token next-token losses ``(..., T-1)`` of a causal LM (0 at invalid positions).

    The same shift and validity rule as :func:`slt.losses.causal_lm` (position ``t`` predicts token
    ``t+1``; ``-100`` labels and padding are invalid), without the average over positions."""
    logits = _logits(output)
    ids, _ = _tokens_and_mask(target)
    if tuple(logits.shape[:-1]) != tuple(ids.shape):
        raise ValueError(f"causal_lm_tokens: logits of shape {tuple(logits.shape)} do not match token ids of "
                         f"shape {tuple(ids.shape)}")
    nxt = ids[..., 1:]
    logp = torch.log_softmax(logits[..., :-1, :], dim=-1)
    nll = -logp.gather(-1, nxt.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    return nll * _token_valid(target).to(nll.dtype)  # (raises for non-integer ids)


def _token_valid(target: Any) -> Tensor:
    """``(..., T-1)`` bool: positions whose next token counts (as :func:`slt.losses.causal_lm`)."""
    ids, mask = _tokens_and_mask(target)
    if ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    valid = ids[..., 1:] != -100
    if mask is not None:
        m = mask.bool()
        valid = valid & m[..., 1:] & m[..., :-1]
    return valid


class _Losses:
    """Per-sample (or per-token) losses ``(R, n[, T-1])`` of a data set at parameter rows, chunked over
    samples: the target's own per-sample losses, an explicit per-sample loss, or per-token losses."""

    def __init__(self, target: Any, data: Data, fn: Callable | None, per_token: bool, sum_tokens: bool,
                 rows: int, name: str):
        self.target, self.data, self.fn, self.rows = target, data, fn, rows
        self.per_token, self.sum_tokens = per_token, sum_tokens
        self.n = data.n
        per_row = max(row_numel(data.x), target._row_numel or 1)
        self.chunk = max(1, CHUNK_ELEMENTS // max(1, rows * per_row))
        self.mask = None
        if per_token:
            try:
                self.mask = _token_valid(_plain(data.target)).cpu()
            except (KeyError, TypeError) as e:
                raise ValueError(f"per_token=True needs token ids in {name} (a tensor of ids or a mapping with "
                                 f"'input_ids' / 'labels'): {e}") from e
            if self.mask.dim() != 2 or self.mask.shape[0] != self.n:
                raise ValueError(
                    f"per_token=True needs token sequences in {name}: ids of shape (n, T), one row per sample; got "
                    f"shape {tuple(self.mask.shape[:-1]) + (self.mask.shape[-1] + 1,)} (per-token values are for "
                    "sequence models: a classifier's targets hold one value per sample)")
        self.shape = (self.n,) if (not per_token or sum_tokens) else (self.n, int(self.mask.shape[-1]))
        self._probe(target.w_star, name)

    def _probe(self, w: Tensor, name: str) -> None:
        """Evaluate the first two samples at w*: a model or loss that fails on this data set, or per-sample
        losses of the wrong size, are named with the real error before any sampling."""
        m = min(2, self.n)
        try:
            with torch.no_grad():
                v = self._losses(w, self.data.x[:m], self.data.target[:m])
        except Exception as e:  # noqa: BLE001 - re-raised with the data set's name
            raise ValueError(f"the model or the per-sample loss failed on the first samples of {name} "
                             f"({type(e).__name__}: {e})") from e
        if self.per_token and self.sum_tokens:
            v = v.sum(-1)
        self._check_size(v.reshape(w.shape[0], -1).shape[1], m, name)

    def _check_size(self, got: int, m: int, name: str) -> None:
        """``got`` values per parameter row for ``m`` samples: one per sample (per valid token position)."""
        each = self.size // self.n
        if got != m * each:
            per = got / m
            raise ValueError(
                f"the per-sample loss returned {per:g} values per sample of {name}, expected {each}"
                + (" (one per token position of a sequence)" if each > 1 else " (one loss per sample: a "
                   "per_sample_loss must reduce every other dimension, e.g. .mean(-1) over a model's outputs)"))

    def _losses(self, flat: Tensor, x: Any, y: Any) -> Tensor:
        """Per-sample (or per-token) losses of samples ``x, y`` at the rows ``flat``."""
        if self.fn is None:
            return self.target.evaluator.per_sample(flat, x, y)
        return _apply(self.target.evaluator, flat, x, y, self.fn)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    def __call__(self, flat: Tensor) -> Tensor:
        """``(R, d) -> (R, size)`` flattened, no grad."""
        d = self.data
        parts = []
        with torch.no_grad():
            for i in range(0, self.n, self.chunk):
                v = self._losses(flat, d.x[i:i + self.chunk], d.target[i:i + self.chunk])
                if self.per_token and self.sum_tokens:
                    v = v.sum(-1)
                parts.append(v.reshape(flat.shape[0], -1))
        out = torch.cat(parts, 1)
        if out.shape[1] != self.size:
            self._check_size(out.shape[1], self.n, "the data")
        return out


def _apply(ev: Any, flat: Tensor, x: Any, y: Any, fn: Callable) -> Tensor:
    """``fn(output, target)`` per row of ``flat`` on the evaluator's path: ``(R, B[, ...])``
    (:meth:`slt.evaluator.ChainEvaluator.apply_rows`; checkpoints with their own buffers: each row its own)."""
    return ev.apply_rows(flat, _plain(x), _plain(y), lambda out, t, lead: fn(out, t))


def _observable_columns(spec: Any, observables: Mapping[str, Observable], flat: Tensor) -> tuple[Tensor, list[str]]:
    """``(R, n_obs)`` values of the observables at ``flat`` (each ``(R,)`` or ``(R, k)``) and column names."""
    R = flat.shape[0]
    params = spec.unflatten(flat)
    cols, names = [], []
    with torch.no_grad():
        for k, f in observables.items():
            v = f(params)
            if not isinstance(v, Tensor) or v.ndim < 1 or v.shape[0] != R:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"observable {k!r} must return a tensor (R, ...) with R = {R} rows (one per "
                                 f"chain), got {got}")
            v = v.reshape(R, -1)
            cols.append(v)
            names += [k] if v.shape[1] == 1 else [f"{k}[{j}]" for j in range(v.shape[1])]
    return torch.cat(cols, 1), names


# ----------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------
def _split_kwargs(caller: str, kwargs: Mapping[str, Any]) -> tuple[dict, dict]:
    import inspect

    from .engine import sample_target

    prep = {k: v for k, v in kwargs.items() if k in _PREPARE_KEYS}
    samp = {k: v for k, v in kwargs.items() if k not in _PREPARE_KEYS}
    for bad in ("observables", "on_draw", "started"):
        if bad in samp:
            raise TypeError(f"{caller}: {bad!r} cannot be passed through to the sampler here")
    known = inspect.signature(sample_target).parameters
    for k in samp:
        if k not in known:
            hint = (" (the loss kernel is one data set's: for the losses of another set use "
                    "slt.bif(..., query=...))" if k == "query" else "")
            raise TypeError(f"{caller}() got an unexpected keyword argument {k!r}{hint}")
    return prep, samp


def _prepare(model: Any, data: Any, loss_fn: Any, caller: str, prep: dict) -> Any:
    from .target import prepare_target, require_one_dataset

    target = prepare_target(model, data, loss_fn, full_data=True, caller=caller, checkpoint_state=True, **prep)
    require_one_dataset(target, caller)
    if not isinstance(target.source, Data):
        raise TypeError(f"{caller}: the data must be in memory (tensors, a Dataset or a finite DataLoader)")
    return target


def _check_data(caller: str, name: str, data: Any, target: Any, validate: bool = False) -> Data:
    """``data`` (a query or probe set) in memory on the target's device.  ``validate``: its losses come
    from ``loss_fn`` (not an explicit per-sample loss), so it gets the checks the training data got
    (:func:`slt.evaluator.validate_model_and_loss`: shapes that the loss would broadcast, labels that
    do not fit the output, NaN) and must have targets when the training data has them."""
    try:
        d = as_source(data)
    except (TypeError, ValueError) as e:  # re-raised with the argument's name
        hint = (" (a single sample keeps its batch dimension: X[:1], Y[:1] rather than X[0], Y[0])"
                if "disagree on the number of samples" in str(e) else "")
        raise type(e)(f"{caller}: {name}: {e}{hint}") from e
    if not isinstance(d, Data):  # every sample once, in the dataset's order (rows of the result)
        d, order, reread = d.in_memory()
        if order and not reread:  # (a loader read again in index order needs no warning: its rows are the dataset's)
            warnings.warn(f"{caller}: {name}: {order}", RuntimeWarning, stacklevel=user_stacklevel())
    if d.n < 1:
        raise ValueError(f"{caller}: {name} is empty")
    d = d.to(target.device, target.dtype)
    if validate:
        from .evaluator import probe_batch, validate_model_and_loss

        train = target.source
        if isinstance(train, Data) and train.y is not None and d.y is None:
            raise ValueError(f"{caller}: {name} has inputs only, while the data has targets: give it as "
                             f"(inputs, targets) like the data (the loss of a sample needs its target)")
        try:
            validate_model_and_loss(target.model, target.adapter, probe_batch(d, 64, target.device, target.dtype))
        except ValueError as e:
            raise ValueError(f"{caller}: {name}: {e}") from e
    return d


def _setup(caller: str, model: Any, data: Any, loss_fn: Any, kwargs: dict, per_sample_loss: Any,
           per_token: bool) -> tuple[Any, dict, int, int, Any]:
    """``(target, sampling options, chains per group C, rows R = G·C, per-sample loss or None)``:
    the shared start of every estimator here (one prepared target, options split between
    :func:`slt.prepare_target` and :func:`slt.engine.sample_target`)."""
    from torch.utils.data import DataLoader

    from .target import train_mode_issues

    prep, samp = _split_kwargs(caller, kwargs)
    _refuse_batch_statistics(caller, train_mode_issues(model) if isinstance(model, nn.Module) else [])
    target = _prepare(model, data, loss_fn, caller, prep)
    _refuse_batch_statistics(caller, target.issues)
    if isinstance(data, DataLoader) and "batch_size" not in samp and data.batch_size is not None:
        samp["batch_size"] = data.batch_size  # the loader's batch size is the run's, as in slt.estimate_llc
    C = check_int("num_chains", samp.get("num_chains", LLC.num_chains), 1)
    samp["num_chains"] = C
    if "num_draws" in samp and check_int("num_draws", samp["num_draws"], 1) < 2:
        raise ValueError(f"{caller}: num_draws={samp['num_draws']}: the covariances are taken over each chain's draws "
                         "(one draw has none; pooled over chains it would be the spread between chains' starts): "
                         "pass num_draws >= 2 (hundreds for a usable value)")
    if C == 1:
        warnings.warn(f"{caller}: num_chains=1: the standard errors come from the spread between chains, so they "
                      "are NaN; use at least 2 chains (4 or more for a usable error)", RuntimeWarning,
                      stacklevel=user_stacklevel())
    fn = per_sample_loss if per_sample_loss is not None else (causal_lm_tokens if per_token else None)
    if fn is not None and not callable(fn):
        raise TypeError(f"{caller}: per_sample_loss must be callable (output, target) -> per-sample losses")
    return target, samp, C, target.G * C, fn


def _check_per_sample_loss(caller: str, target: Any, fn: Callable) -> None:
    r"""Warn when an explicit ``per_sample_loss`` is not the decomposition of ``loss_fn``: on the first 64
    training samples at w* its values should equal the per-sample losses whose (weighted) mean is the
    sampling loss :math:`L_n` (:meth:`slt.evaluator.ChainEvaluator.per_sample`, checked against
    ``loss_fn`` at set-up).  BIF values scale with the per-sample losses, and the per-sample
    susceptibilities' normalisation :math:`n\beta u_i` assumes :math:`L_n = \sum_i u_i \ell_i`: a sum
    over a model's outputs where ``loss_fn`` averages them gave a BIF 4× and susceptibilities 2× too large.
    Nothing is checked when ``loss_fn``'s per-sample form is unavailable (the model's own loss)."""
    d = target.source
    m = min(64, d.n)
    w = target.w_star[:1]
    with torch.no_grad():
        try:
            ref = target.evaluator.per_sample(w, d.x[:m], d.target[:m])
        except Exception:  # noqa: BLE001 - no per-sample form of loss_fn to compare with
            return
        try:
            mine = _apply(target.evaluator, w, d.x[:m], d.target[:m], fn)
        except Exception:  # noqa: BLE001 - _Losses' probe reports it with the data set's name
            return
    if not isinstance(mine, Tensor) or mine.numel() != ref.numel():
        return  # (the size check of _Losses reports it)
    mine, ref = mine.reshape(ref.shape).double(), ref.double()
    tol = 1e-3 * float(ref.abs().max()) + 64 * torch.finfo(target.dtype).eps
    if bool(((mine - ref).abs() <= tol).all()):
        return
    ratio = float(mine.sum() / ref.sum()) if float(ref.sum()) != 0 else float("nan")
    warnings.warn(
        f"{caller}: per_sample_loss is not the per-sample decomposition of loss_fn: on the first {m} samples of the "
        f"data its values differ from the losses whose mean is loss_fn's (their sums' ratio: {ratio:.4g}; e.g. a sum "
        "over a model's outputs where loss_fn averages them). Influence values scale with the per-sample losses, and "
        "per-sample susceptibilities assume L_n is their (weighted) mean: pass a per_sample_loss whose mean over "
        "samples is loss_fn, or omit it", RuntimeWarning, stacklevel=user_stacklevel())


def _refuse_batch_statistics(caller: str, issues: list[str]) -> None:
    """A BatchNorm in train mode (one of ``issues``, :func:`slt.target.train_mode_issues`) is an error here: a
    sample's loss would depend on the samples evaluated with it (a query sample's loss changed 0.93 → 1.42
    between a query of 6 and of 3 at the same draws)."""
    norms = [i for i in issues if i.startswith("BatchNorm in train mode")]
    if norms:
        raise ValueError(f"{caller}: {norms[0].split(':')[0]}: a sample's loss then depends on the other samples "
                         "of the batch it is evaluated in (batch statistics), so per-sample losses are not defined; "
                         "call model.eval()")


def _own_per_sample(target: Any) -> Callable | None:
    r"""With ``loss_fn`` omitted, the model's own loss (a Hugging Face ``output.loss``: one number per batch,
    :func:`slt.losses.model_loss`) has no per-sample lift; its per-sample form that the control variate
    looks up (:attr:`slt.target.Target.own_per_sample`: for a causal LM, the mean next-token cross-entropy
    over the sequence's labelled tokens) is each sample's loss :math:`\ell_i`.  ``None`` otherwise."""
    if target.adapter.per_sample_error is None:
        return None
    target.star_losses  # noqa: B018 - the set-up that finds the form
    return target.own_per_sample


def _own_label(own: Callable) -> str:
    """``config["per_sample_loss"]`` of a run on the model's own loss: the form's name and first line."""
    doc = (own.__doc__ or "").strip()
    return f"the model's own loss per sample ({own.__name__}: {doc.splitlines()[0].rstrip('.') if doc else ''})"


def _run(caller: str, target: Any, acc: OnlineCovariance, draw: Callable[[Tensor], None], samp: dict) -> Any:
    """Sample ``target`` with ``draw(params)`` at every draw; the statistics restart with every repeat of
    the run (the engine halves the step of diverging groups and runs again)."""
    from .engine import sample_target

    return sample_target(target, on_draw=draw, on_start=acc.reset, caller=caller, **samp)


def _good_rows(run: Any, g: int, C: int, acc: OnlineCovariance) -> list[int]:
    """Rows of group ``g`` whose chains did not diverge (and whose statistics are finite)."""
    dead = run.trace.diverged.view(-1).cpu()
    rows = [g * C + c for c in range(C) if not bool(dead[g * C + c])]
    finite = torch.isfinite(acc.mean_a[rows]).all(1) & torch.isfinite(acc.mean_b[rows]).all(1)
    return [r for r, ok in zip(rows, finite.tolist()) if ok]


def _check_memory(caller: str, R: int, n_a: int, n_b: int, max_bytes: float, split: str = "") -> None:
    """Refuse a run whose covariances would not fit in ``max_bytes``: the cross co-moment ``(R, n_a, n_b)``
    float64, its per-chain covariances at the end (one more such array) and a few ``(n_a, n_b)`` arrays (the
    pooled covariance, its standard error, the result); measured: a loss kernel of 3000 samples × 4 chains
    (cross moment 288 MB) peaked 840 MB above the process's other memory, 1251 MB before the per-group rows
    were a view and the per-chain correlations were taken in place."""
    need = 8 * (2 * R + 4) * n_a * n_b
    if need > max_bytes:
        raise ValueError(
            f"{caller}: the covariances need {need / 2**30:.3g} GiB (the cross co-moment of chains×groups {R} × "
            f"{n_a} × {n_b} float64, the per-chain covariances at the end and the results), "
            f"over max_bytes={max_bytes / 2**30:.3g} GiB: use fewer chains, {split or 'fewer samples'}, or raise max_bytes")


#: how a covariance too large for ``max_bytes`` splits (:func:`_check_memory`), by what the call compares
_SPLIT = {
    "query": "split the query set into chunks (one call per chunk with the same seed gives the same draws)",
    "same": ("compute it in column blocks with slt.bif(model, data, loss_fn, query=<a slice of the same data>, ...) "
             "(same seed, same draws; normalize=True gives −1 × the loss kernel's correlations)"),
}


def _spread(per_chain: Tensor) -> Tensor:
    k = per_chain.shape[0]
    if k < 2:
        return torch.full(per_chain.shape[1:], float("nan"), dtype=per_chain.dtype, device=per_chain.device)
    return per_chain.std(0) / math.sqrt(k)


def _corr(cov: Tensor, var_a: Tensor, var_b: Tensor) -> Tensor:
    """``cov / sqrt(var_a var_b)``, in place in ``cov`` (a fresh array: the per-chain covariances are as
    large as the cross co-moment)."""
    return cov.div_(var_a.sqrt().unsqueeze(-1)).div_(var_b.sqrt().unsqueeze(-2))


def _warn_constant(caller: str, var: Tensor, mask: Tensor | None, what: str) -> None:
    """Warn when some losses did not vary over the draws: their correlations are 0/0 (NaN)."""
    flat = var.detach().cpu()
    if mask is not None and mask.shape == flat.shape:
        flat = flat[mask.cpu().bool()]
    zero = int((flat == 0).sum())
    value = "value" if what == "observables" else "loss"
    if zero and zero == flat.numel():  # nothing varied: the sampled parameters do not reach these values
        warnings.warn(
            f"{caller}: none of the {flat.numel()} {what} has a {value} that varied over the draws, so their "
            "correlations are 0/0 and are NaN: the parameters sampled do not change them (a restriction the "
            f"loss does not see{', or observables constant in the parameters' if value == 'value' else ''})",
            RuntimeWarning, stacklevel=user_stacklevel())
    elif zero:
        warnings.warn(
            f"{caller}: {zero} of {flat.numel()} {what} have a {value} that did not vary over the draws ("
            + ("a loss that is 0 to the dtype's precision: a saturated, confidently right sample" if value == "loss"
               else "constant in the parameters") + "), so their correlations are 0/0 and "
            "are NaN; normalize=False gives the covariances (0 there)"
            + (", dtype=torch.float64 resolves smaller losses" if value == "loss" else ""),
            RuntimeWarning, stacklevel=user_stacklevel())


def _covariances(caller: str, model: Any, data: Any, loss_fn: Any, *, query: Any, observables: Any,
                 normalize: bool, sign: float, kind: str, per_token: bool, sum_tokens: bool,
                 per_sample_loss: Callable | None, max_bytes: float, kwargs: dict) -> Any:
    if not isinstance(normalize, bool):
        raise TypeError(f"{caller}: normalize must be True or False, got {normalize!r}")
    if sum_tokens and not per_token:
        raise ValueError(f"{caller}: sum_tokens=True needs per_token=True")
    obs = check_observables(caller, observables)
    if query is not None and obs:
        raise ValueError(f"{caller}: pass query (per-sample losses of another set) or observables, not both")
    target, samp, C, R, fn = _setup(caller, model, data, loss_fn, kwargs, per_sample_loss, per_token)
    probe_observables(caller, obs, target)
    own = _own_per_sample(target) if fn is None else None
    validate = fn is None  # the per-sample losses are loss_fn's: query data gets the training data's checks
    fn = own or fn
    if per_sample_loss is not None and not per_token:
        _check_per_sample_loss(caller, target, per_sample_loss)
    rows_losses = _Losses(target, target.source, fn, per_token, sum_tokens, R, "data")
    same = (query is None and not obs) or query is data
    cols_losses = None
    if same:
        col_labels = [f"train[{j}]" for j in range(rows_losses.n)]
    elif query is not None:
        cols_losses = _Losses(target, _check_data(caller, "query", query, target, validate=validate), fn, per_token,
                              sum_tokens, R, "query")
        col_labels = [f"query[{j}]" for j in range(cols_losses.n)]
    else:
        _, col_labels = _observable_columns(target.spec, obs, target.w_star[:1].expand(1, target.d))
    n_a = rows_losses.size
    n_b = n_a if same else cols_losses.size if cols_losses is not None else len(col_labels)
    _check_memory(caller, R, n_a, n_b, max_bytes,
                  _SPLIT["same"] if same else _SPLIT["query"] if cols_losses is not None else "")
    acc = OnlineCovariance(R, n_a, None if same else n_b, device=target.device)

    def draw(params: Tensor) -> None:
        a = rows_losses(params)
        if acc.same:
            acc.update(a)
        elif cols_losses is not None:
            acc.update(a, cols_losses(params))
        else:
            acc.update(a, _observable_columns(target.spec, obs, params)[0])

    run = _run(caller, target, acc, draw, samp)
    llcs = run.results()
    config = {"kind": kind, "normalize": normalize, "per_token": per_token, "sum_tokens": sum_tokens,
              "query": "data" if same else "observables" if obs else "query", **run.config}
    if own is not None:
        config["per_sample_loss"] = _own_label(own)
    row_shape = rows_losses.shape
    col_shape = row_shape if same else cols_losses.shape if cols_losses is not None else (len(col_labels),)
    out = []
    for g in range(target.G):
        good = _good_rows(run, g, C, acc)
        if not good:
            nan = torch.full((*row_shape, *col_shape), float("nan"), dtype=torch.float64)
            out.append(InfluenceResult(nan, nan.clone(), kind, normalize, _labels("train", row_shape), col_labels,
                                       torch.full(row_shape, float("nan")), torch.full(row_shape, float("nan")),
                                       torch.full(col_shape, float("nan")), torch.full(col_shape, float("nan")), 0,
                                       llcs[g], rows_losses.mask, {**config, **target.group_labels(g)}))
            continue
        st = acc.combine(good)
        if normalize:
            _warn_constant(caller, st["var_a"].reshape(row_shape), rows_losses.mask, "training samples")
            if not same:
                _warn_constant(caller, st["var_b"].reshape(col_shape),
                               cols_losses.mask if cols_losses is not None else None,
                               "query samples" if cols_losses is not None else "observables")
            val = _corr(st["cov"], st["var_a"], st["var_b"])
            per = _corr(st["row_cov"], st["row_var_a"], st["row_var_b"])
        else:
            val, per = st["cov"], st["row_cov"]
        val, sem = (sign * val).cpu(), _spread(per).cpu()
        out.append(InfluenceResult(
            values=val.reshape(*row_shape, *col_shape), sem=sem.reshape(*row_shape, *col_shape), kind=kind,
            normalized=normalize, row_labels=_labels("train", row_shape), col_labels=col_labels,
            mean_rows=st["mean_a"].cpu().reshape(row_shape), var_rows=st["var_a"].cpu().reshape(row_shape),
            mean_cols=st["mean_b"].cpu().reshape(col_shape), var_cols=st["var_b"].cpu().reshape(col_shape),
            num_chains_used=len(good), llc=llcs[g], token_mask=rows_losses.mask,
            config={**config, **target.group_labels(g)},
        ))
    return target.arrange(out)


def _labels(prefix: str, shape: tuple[int, ...]) -> list[str]:
    return [f"{prefix}[{i}]" for i in range(shape[0])]


# ----------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------
@autograd_allowed
def bif(
    model: nn.Module | Sequence[nn.Module] | None,
    data: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    query: Any = None,
    observables: Mapping[str, Observable] | None = None,
    normalize: bool = False,
    per_token: bool = False,
    sum_tokens: bool = False,
    per_sample_loss: Callable[[Any, Any], Tensor] | None = None,
    max_bytes: float = MAX_BYTES,
    **kwargs: Any,
) -> InfluenceResult | list | dict:
    r"""Bayesian influence functions :math:`\mathrm{BIF}_{ij} = -\operatorname{Cov}_p(\ell_i(w), \varphi_j(w))`.

    Kreer et al. (2025, arXiv 2509.26544): the covariance, under the localized tempered posterior of
    ``(model, data, loss_fn)`` (the one :func:`slt.estimate_llc` samples), between the loss
    :math:`\ell_i` of each training sample and each query quantity :math:`\varphi_j`: the loss of a
    query sample (``query``), or a user observable (``observables``); with neither, the training
    samples themselves (``(n, n)``).  No Hessian is inverted.  For a regular model and large
    :math:`n\beta` the BIF tends to :math:`-\beta^{-1}\nabla\ell_i^\top H^{-1}\nabla\varphi_j`, the classical
    influence function up to scale.

    Parameters
    ----------
    model, data, loss_fn
        As for :func:`slt.estimate_llc` (one data set in memory: a ``DataLoader`` is read once, in its
        dataset's order, and its batch size is the run's unless ``batch_size`` is given; a model in eval
        mode: BatchNorm in train mode is an error, since a sample's loss would depend on its batch;
        ``loss_fn`` the mean loss, default
        ``model.default_loss``, else the loss the model returns: a Hugging Face model's ``output.loss``
        when the batch has ``labels``, whose per-sample form found at set-up — for a causal LM the mean
        next-token cross-entropy over each sequence's labelled tokens — is then each sample's
        :math:`\ell_i`, named in ``config["per_sample_loss"]``).
    query
        A data set of the same kind as ``data``: columns are its per-sample losses.
    observables
        ``name -> f(params)`` with ``params`` ``name -> (R, *shape)`` returning ``(R,)`` (or ``(R, k)``:
        ``k`` columns): columns are their values (not together with ``query``).
    normalize
        ``True``: :math:`-\operatorname{Corr}` (devinterp's default scale, with the BIF's sign).
    per_token
        Per-token losses of a causal LM (:func:`causal_lm_tokens`, or ``per_sample_loss`` returning
        ``(..., B, T-1)``): ``values`` is ``(n_train, T-1, n_query, T-1)`` (``(n_train, T-1, n_obs)`` with
        observables).  ``sum_tokens=True`` sums each sequence's token losses first: ``(n_train, n_query)``.
    per_sample_loss
        ``f(output, target) -> (..., B)`` per-sample losses (leading dims as the output's), used instead of
        the per-sample form of ``loss_fn`` (which is exact for the known PyTorch losses and
        :func:`slt.losses.causal_lm`, and a ``vmap`` over samples otherwise).  The sampler still uses
        ``loss_fn``; a warning says when, on the first training samples at w*, it is not the per-sample
        decomposition of ``loss_fn`` (e.g. a sum over outputs where ``loss_fn`` averages them).
    max_bytes
        Limit on the covariances' memory: ``8·(2R + 4)·n_train·n_query`` bytes, ``R`` = chains × groups (the
        cross co-moment, the per-chain covariances it gives at the end, and the results; measured: a loss
        kernel of 3000 samples × 4 chains peaked 840 MB above the process's other memory, for 864 MB counted).
    **kwargs
        :func:`slt.prepare_target`'s ``nbeta``, ``localization``, ``device``, ``dtype``, ``seed``,
        ``restrict_to``, ``models``, ... and :func:`slt.engine.sample_target`'s ``num_chains``,
        ``num_draws``, ``step_size``, ``batch_size``, ``sampler`` ... (as for :func:`slt.estimate_llc`).

    Returns
    -------
    InfluenceResult
        Or a list / mapping of them, shaped as :func:`slt.estimate_llc`'s results (checkpoints,
        restrictions).  ``.values``, ``.sem`` (chain spread), ``.llc`` (the run's LLC).

    Notes
    -----
    Evaluating every per-sample loss at every draw costs one forward pass over ``data`` (and ``query``)
    per draw; the covariance accumulates online (module docstring), so memory does not grow with draws.
    """
    return _covariances("slt.bif", model, data, loss_fn, query=query, observables=observables,
                        normalize=normalize, sign=-1.0, kind="bif", per_token=per_token, sum_tokens=sum_tokens,
                        per_sample_loss=per_sample_loss, max_bytes=max_bytes, kwargs=kwargs)


@autograd_allowed
def loss_kernel(
    model: nn.Module | Sequence[nn.Module] | None,
    data: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    normalize: bool = True,
    per_token: bool = False,
    sum_tokens: bool = False,
    per_sample_loss: Callable[[Any, Any], Tensor] | None = None,
    max_bytes: float = MAX_BYTES,
    **kwargs: Any,
) -> InfluenceResult | list | dict:
    r"""The loss kernel :math:`K_{ij} = \operatorname{Corr}_p(\ell_i(w), \ell_j(w))` of one data set (arXiv 2509.26537).

    The correlation matrix of the per-sample losses under the localized posterior (``normalize=False``:
    the covariance, :math:`= -\mathrm{BIF}` of the set with itself): symmetric, positive semi-definite,
    unit diagonal.  Arguments as for :func:`bif`; ``values`` is ``(n, n)`` (``(n, T-1, n, T-1)`` per token).
    """
    return _covariances("slt.loss_kernel", model, data, loss_fn, query=None, observables=None,
                        normalize=normalize, sign=1.0, kind="loss_kernel", per_token=per_token,
                        sum_tokens=sum_tokens, per_sample_loss=per_sample_loss, max_bytes=max_bytes, kwargs=kwargs)


@autograd_allowed
def per_sample_susceptibility(
    model: nn.Module | Sequence[nn.Module] | None,
    data: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    observables: Mapping[str, Observable] | None = None,
    probe: Any = None,
    per_token: bool = False,
    per_sample_loss: Callable[[Any, Any], Tensor] | None = None,
    max_bytes: float = MAX_BYTES,
    **kwargs: Any,
) -> SusceptibilityResult | list | dict:
    r"""Per-sample (per-token) susceptibilities :math:`\chi_{\varphi,i} = -\beta\operatorname{Cov}_p(\varphi, \ell_i)`.

    Baker et al. (2025, arXiv 2504.18274) with the normalisation of the module docstring:
    :math:`\beta = n\beta/n` (:math:`n\beta\,u_i` for data with normalised weights :math:`u_i`) and
    :math:`\chi_{\varphi,i} = \partial E[\varphi]/\partial c_i` for the posterior
    :math:`\propto\exp(-\beta\sum_i(1+c_i)\ell_i(w) - \frac\gamma2\lVert w-w^*\rVert^2)`, so that the
    susceptibility of any perturbation that reweights the samples by :math:`1 + h\delta_i` is
    :math:`\sum_i\delta_i\chi_{\varphi,i}` (:meth:`SusceptibilityResult.total`; the mixture path of
    :func:`slt.symmetry.llc_susceptibility` when :math:`\sum_i u_i\delta_i = 0`).  Also returned: the
    per-sample decomposition of the LLC's susceptibility,
    :math:`\lambda_i = \beta(E[\ell_i] - \ell_i(w^*)) - n\beta^2\operatorname{Cov}(L_n, \ell_i)`.

    Parameters
    ----------
    model, data, loss_fn
        As for :func:`slt.estimate_llc` (``data``: the sampling distribution, one data set in memory).  With
        the model's own loss (``loss_fn`` omitted; as :func:`bif`), a mean over the batch's labelled tokens,
        :math:`L_n = \sum_i u_i\ell_i` with :math:`u_i` sample i's share of the labelled tokens: the weights
        of weighted data.  Likewise a cross-entropy with class weights or ``ignore_index`` (PyTorch's mean
        divides by the summed weights of the counted targets): :math:`u_i = c_i/\sum_j c_j`, :math:`c_i`
        sample i's weight (0 when ignored).
    observables
        ``name -> f(params)`` returning ``(R,)`` or ``(R, k)``; the sampling loss :math:`L_n(w)` is always
        included as ``"loss"``: under ``restrict_to`` it is the component-localized observable of Baker
        et al. (only the component's weights move).
    probe
        Samples whose contributions are wanted (default: ``data``'s own); for a sample ``z`` outside the
        training set :math:`\chi_{\varphi,z}` is the response to adding it with count :math:`c_z`.
        ``L_n`` then costs one extra pass over ``data`` per draw.
    per_token
        Per-token contributions of a causal LM: ``values`` ``(n, T-1, n_obs)`` (0 rows at invalid
        positions; :attr:`SusceptibilityResult.token_mask`).
    per_sample_loss, max_bytes, **kwargs
        As for :func:`bif`; ``restrict_to={label: ...}`` gives one result per component from one run.

    Returns
    -------
    SusceptibilityResult
        Or a list / mapping of them (checkpoints, restrictions), as :func:`slt.estimate_llc`.
    """
    caller = "slt.per_sample_susceptibility"
    obs = check_observables(caller, observables)
    if "loss" in obs:
        raise ValueError(f"{caller}: the observable name 'loss' is reserved for the sampling loss L_n")
    target, samp, C, R, fn = _setup(caller, model, data, loss_fn, kwargs, per_sample_loss, per_token)
    probe_observables(caller, obs, target)
    train = target.source
    # the model's own loss (loss_fn omitted): its per-sample form gives ℓ_i and L_n
    own = _own_per_sample(target)
    if per_sample_loss is not None and not per_token:
        _check_per_sample_loss(caller, target, per_sample_loss)
    probe_data = train if probe is None else _check_data(caller, "probe", probe, target,
                                                         validate=fn is None and own is None)
    zs = _Losses(target, probe_data, fn or own, per_token, False, R, "probe" if probe is not None else "data")
    # L_n: from the same losses when they are the training set's per-sample losses, else one more pass
    reuse = probe is None and not per_token and per_sample_loss is None
    train_losses = None if reuse else _Losses(target, train, own, False, False, R, "data")
    wn = train.normalized_weights()
    target.star_losses  # noqa: B018 - the set-up that finds the loss's counts (target._star_counts)
    if target._star_counts is not None:
        # a mean over counted targets (labelled tokens of the model's own loss; class weights or ignore_index of a
        # cross-entropy): sample i weighs u_i ∝ (its weight ×) its count in L_n (slt.losses.weighted_mean)
        counts = target._star_counts.double()
        if wn is not None and own is None:
            counts = counts * wn.double().to(counts.device)
        wn = (counts / counts.sum()).to(device=target.device, dtype=target.dtype)

    def sampling_loss(per_sample: Tensor) -> Tensor:
        return per_sample.mean(1) if wn is None else per_sample @ wn.to(per_sample)

    _, obs_names = _observable_columns(target.spec, obs, target.w_star[:1]) if obs else (None, [])
    names = ["loss", *obs_names]
    n_a = zs.size + 1  # the probe's losses, then L_n (for Cov(L_n, φ) in the Baker normalisation)
    _check_memory(caller, R, n_a, len(names), max_bytes)
    acc = OnlineCovariance(R, n_a, len(names), device=target.device)

    def draw(params: Tensor) -> None:
        z = zs(params)
        L = sampling_loss(z if reuse else train_losses(params))
        b = L.unsqueeze(1)
        if obs:
            b = torch.cat([b, _observable_columns(target.spec, obs, params)[0].to(b)], 1)
        acc.update(torch.cat([z, L.unsqueeze(1)], 1), b)

    run = _run(caller, target, acc, draw, samp)
    llcs = run.results()
    star = zs(target.w_star).double().cpu()  # (K, size) ℓ_z(w*)
    nb, n = float(target.nbeta), int(target.n)
    # s_i = nβ u_i: the potential's weight of sample i (β = nβ/n unweighted; probe samples: β)
    scale = torch.full((zs.n,), nb / n, dtype=torch.float64)
    if probe is None and wn is not None:
        scale = nb * wn.double().cpu()
    if len(zs.shape) > 1:
        scale = scale[:, None].expand(zs.shape)
    s_flat = scale.reshape(-1)
    out = []
    M, D = target.groups.M, target.groups.D
    for g in range(target.G):
        labels = target.group_labels(g)
        good = _good_rows(run, g, C, acc)
        k = g // (M * D)
        if not good:
            nan, nan_z = (torch.full(sh, float("nan"), dtype=torch.float64)
                          for sh in ((*zs.shape, len(names)), zs.shape))
            out.append(SusceptibilityResult(
                values=nan, sem=nan.clone(), observables=names, llc_values=nan_z, llc_sem=nan_z.clone(),
                scale=scale.clone(), baker=nan.clone(), nbeta=nb, n=n, mean_losses=nan_z.clone(),
                star_losses=star[k].reshape(zs.shape), num_chains_used=0, restriction=labels["restriction"],
                llc=llcs[g], token_mask=zs.mask, config={**run.config, **labels}))
            continue
        st = acc.combine(good)
        cov, per = st["cov"].cpu(), st["row_cov"].cpu()  # (n_a, n_obs), (C, n_a, n_obs)
        chi, chi_per = -s_flat[:, None] * cov[:-1], -s_flat[:, None] * per[:, :-1]
        mean_z, mean_z_per = st["mean_a"].cpu()[:-1], acc.mean_a[good].cpu()[:, :-1]
        lam = s_flat * (mean_z - star[k]) - nb * s_flat * cov[:-1, 0]
        lam_per = s_flat * (mean_z_per - star[k]) - nb * s_flat * per[:, :-1, 0]
        baker = -(cov[:-1] - cov[-1])
        out.append(SusceptibilityResult(
            values=chi.reshape(*zs.shape, len(names)), sem=_spread(chi_per).reshape(*zs.shape, len(names)),
            observables=names, llc_values=lam.reshape(zs.shape), llc_sem=_spread(lam_per).reshape(zs.shape),
            scale=scale.clone(), baker=baker.reshape(*zs.shape, len(names)), nbeta=nb, n=n,
            mean_losses=mean_z.reshape(zs.shape),
            star_losses=star[k].reshape(zs.shape), num_chains_used=len(good), restriction=labels["restriction"],
            llc=llcs[g], token_mask=zs.mask,
            config={"kind": "per_sample_susceptibility", "per_token": per_token,
                    "probe": probe is not None, **run.config, **labels,
                    **({"per_sample_loss": _own_label(own)} if own is not None else {})},
        ))
    return target.arrange(out)
