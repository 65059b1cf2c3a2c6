r"""The prepared problem every estimator samples: model, parameters, data, loss and w*.

:func:`prepare_target` does the set-up once — checkpoints, device and dtype,
the flat parameter layout, the data source, the loss adapter, a check that the
model and loss run on the data, the computation path (with a fallback to a
loop), nβ and γ — and returns a :class:`Target`.  :func:`slt.estimate_llc`,
:func:`slt.nuts_llc`, :func:`slt.reference.wbic`,
:func:`slt.reference.multitemperature_llc`, :func:`slt.sample_posterior` and
the symmetry module's observables all start from it; no other module repeats
the set-up.

Layout
------
``K`` checkpoints share one architecture; ``w_star`` is ``(K, d)``.  A batched
run of ``C`` chains per checkpoint works on ``K * C`` rows, checkpoint-major
(:meth:`Target.rows`: chain ``c`` of checkpoint ``k`` is row ``k * C + c``).

Inputs and outputs
------------------
Data may be tensors or mappings of tensors (:mod:`slt.data`: the model is
called as ``model(**x)`` for a mapping, and the loss receives ``(output,
target)`` with the target the inputs themselves when there is no separate
``y``); model outputs may be tensors, tuples, dicts or dataclasses such as a
Hugging Face ``ModelOutput`` (:mod:`slt.evaluator`).

Train-mode notes
----------------
Active dropout (``nn.Dropout*`` or a module in training mode with a positive
``*drop*`` rate, e.g. Hugging Face attention dropout) makes the loss random, and
BatchNorm in training mode normalises by batch statistics: both make vmap fail
(a loop runs instead) and bias λ̂.  :func:`prepare_target` warns once per call
with the modules and the fix (``model.eval()``) and records the notes in
:attr:`Target.issues`.

Losses at w*
------------
For tensor data the per-sample losses at every ``w*`` are computed once
(:attr:`Target.star_losses`, ``(K, n)``), so the control variate
:math:`L_B(w^*)` of a minibatch is a gather, not a forward pass
(:meth:`Target.batches`); :math:`L_n(w^*)` (:attr:`Target.init_loss`) is their
(weighted) mean.
"""

from __future__ import annotations

import copy
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_int
from .compiled import COMPILE_MIN_SECONDS, compile_step
from .data import Batch, Data, LoaderSource, _map, as_source, num_rows, random_items, row_numel
from .defaults import default_localization, default_nbeta
from .groups import Groups, concat_data, split_data
from .evaluator import (PATH_REASONS, ChainEvaluator, choose_path, resolve_autocast, probe_batch, to_device,
                        validate_model_and_loss, check_gradients_reach, check_padding_rows, gradient_mismatch_issue, saturation_issue, SATURATED_LOSS,
                        hf_attention_configs, out_of_memory, _dense, _names)
from .losses import (LossAdapter, candidate_means, count_weighted_mean, label_count_options, label_counts,
                     label_weighted, model_loss, weighted_mean)
from .params import ParamSpec, unwrap as _unwrap
from .result import RANDOM_ISSUES
from .rng import ChainRNG
from ._runtime import resolve_device, autograd_allowed, user_stacklevel

__all__ = ["Target", "prepare_target", "BatchStream", "train_mode_issues", "is_norm_train_issue",
           "batch_statistics_issue", "random_forward_issue", "fastest_path",
           "checkpoint_state_differences", "checkpoint_modules", "checkpoint_state_batchable", "require_one_dataset"]

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(eq=False)
class Target:
    r"""A model, its data and loss, and the checkpoints ``w*``, prepared for sampling.

    Attributes
    ----------
    model
        The module evaluated: the user's, or a copy on ``device``/``dtype`` when it
        lives elsewhere (the user's module is never modified).
    spec
        Names, shapes and offsets of the sampled (``requires_grad``) parameters.
    adapter
        The loss (per-chain, per-sample and weighted forms).
    evaluator
        Batched losses and gradients on the chosen path.
    source
        :class:`slt.Data` on the device, or a :class:`slt.data.LoaderSource` (streamed).
    w_star
        ``(K, d)`` flat parameters of the checkpoints.
    seeds
        ``(K,)`` seed of each checkpoint's random streams.
    nbeta, localization
        :math:`n\beta` and :math:`\gamma` of :math:`U(w) = n\beta L_n(w) + \frac\gamma2\|w-w^*\|^2`.
    n
        Number of samples (``None`` for a loader without a length).
    device, dtype
        Where and in which precision everything is computed.
    path_reason
        Why :attr:`path` was chosen.
    is_batch
        Whether several checkpoints were given (estimators then return lists).
    issues
        Notes on the model's state found at set-up (dropout active, BatchNorm in
        training mode), each naming the modules and the fix; empty when none.  Each is
        a reason for ``converged = False`` in the results.
    notes
        What was found at set-up that does not bias λ̂ but is worth knowing (a
        DataLoader that shuffles with the global random state: runs do not repeat);
        warned once and recorded as ``config["setup_notes"]``.
    """

    model: nn.Module
    spec: ParamSpec
    adapter: LossAdapter
    evaluator: ChainEvaluator
    source: Data | LoaderSource
    w_star: Tensor
    seeds: list[int]
    nbeta: float
    localization: float
    n: int | None
    device: torch.device
    dtype: torch.dtype
    path_reason: str
    is_batch: bool = False
    _star: tuple[Tensor | None, Tensor] | None = field(default=None, repr=False)
    #: ``(n,)`` how much each sample weighs in the loss's mean over a batch
    #: (:meth:`slt.losses.LossAdapter.counts`), or ``None``: all the same
    _star_counts: Tensor | None = field(default=None, repr=False)
    #: the model's own loss (``loss_fn`` omitted): the per-sample form of it that the control variate looks
    #: up (one of :data:`slt.losses.model_loss.per_sample_forms`), or ``None``
    own_per_sample: Callable[[Any, Any], Tensor] | None = field(default=None, repr=False)
    issues: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: elements per sample of the inputs or outputs, whichever is larger (sizes the chunks of the
    #: losses at w*: a language model's logits are vocab times its token ids); ``None``: the input size
    _row_numel: int | None = field(default=None, repr=False)
    #: restrictions and data distributions (refined LLCs); the default: none
    groups: "Groups" = field(default_factory=lambda: Groups())
    #: whether γ is automatic (``localization=None``): the engine then raises it tenfold while the
    #: chains do not settle (:func:`slt.engine.localization_levels`)
    localization_auto: bool = False

    # -- shape ---------------------------------------------------------------
    @property
    def K(self) -> int:
        """Number of checkpoints."""
        return int(self.w_star.shape[0])

    @property
    def d(self) -> int:
        """Number of sampled parameters."""
        return self.spec.d

    @property
    def path(self) -> str:
        return self.evaluator.path

    @property
    def loss_fn(self) -> LossFn:
        return self.adapter.loss_fn

    @property
    def G(self) -> int:
        """Number of groups of chains: checkpoints × restrictions × data distributions
        (checkpoint-major, then restriction, then distribution); ``K`` without refinement."""
        return self.K * self.groups.M * self.groups.D

    @property
    def group_checkpoint(self) -> Tensor:
        """``(G,)`` the checkpoint of each group."""
        return torch.arange(self.K, device=self.device).repeat_interleave(self.groups.M * self.groups.D)

    @property
    def group_seeds(self) -> list[int]:
        """``(G,)`` seed of each group: its checkpoint's (restrictions and distributions of one
        checkpoint share its random streams, so a restriction to every parameter reproduces the
        unrestricted run bit for bit)."""
        per = self.groups.M * self.groups.D
        return [s for s in self.seeds for _ in range(per)]

    @property
    def group_init_loss(self) -> Tensor:
        """``(G,)`` :math:`L_n(w^*)` of each group (on its own distribution)."""
        star_ps, init = self.star_losses
        g = self.groups
        if g.parts is None:
            return init.repeat_interleave(g.M)
        if star_ps is None:  # a loss without per-sample losses: each distribution by forward passes
            per = torch.stack([self._forward_losses(part) for part in g.parts], 1)
        else:
            per = torch.stack([g.range_mean(star_ps, i, self._star_counts) for i in range(g.D)], 1)  # (K, D)
        return per.unsqueeze(1).expand(self.K, g.M, g.D).reshape(-1)

    def rows(self, num_chains: int) -> Tensor:
        """``(G * C, d)``: ``w*`` of each group repeated for its ``C`` chains (read-only: with
        one checkpoint a broadcast view, no parameter-sized copy per chain)."""
        if self.K == 1:
            return self.w_star.expand(self.G * num_chains, self.d)
        return self.w_star.repeat_interleave(self.groups.M * self.groups.D * num_chains, 0)

    def arrange(self, per_group: list[Any]) -> Any:
        """Results of the ``G`` groups in the caller's shape: one result, a list over checkpoints,
        ``{restriction: ...}``, ``{distribution: ...}`` or ``{restriction: {distribution: ...}}``."""
        K, g = self.K, self.groups

        def ckpts(m: int, i: int) -> Any:
            out = [per_group[(k * g.M + m) * g.D + i] for k in range(K)]
            return out if self.is_batch else out[0]

        def dists(m: int) -> Any:
            if g.data_labels is None:
                return ckpts(m, 0)
            return {lab: ckpts(m, i) for i, lab in enumerate(g.data_labels)}

        if g.restrict_labels is None:
            return dists(0)
        return {lab: dists(m) for m, lab in enumerate(g.restrict_labels)}

    def group_labels(self, group: int) -> dict[str, Any]:
        """``{"checkpoint": k, "restriction": label or None, "data": label or None}`` of a group."""
        g = self.groups
        k, rest = divmod(group, g.M * g.D)
        m, i = divmod(rest, g.D)
        return {"checkpoint": k, "restriction": None if g.restrict_labels is None else g.restrict_labels[m],
                "data": None if g.data_labels is None else g.data_labels[i]}

    # -- losses at w* ----------------------------------------------------------
    @property
    def star_losses(self) -> tuple[Tensor | None, Tensor]:
        r"""``(per-sample losses (K, n) or None, L_n(w*) (K,))``, computed once.

        Per-sample losses exist for tensor data whose loss has a per-sample form
        (native or by ``vmap``); otherwise :math:`L_n(w^*)` comes from a forward
        pass (streamed over a loader).  Raises ``ValueError`` when a loss at w* is
        NaN or inf."""
        if self._star is None:
            self._star = self._compute_star_losses()
            self._note_uncounted_samples()
        return self._star

    def _note_uncounted_samples(self) -> None:
        """A note (and warning) when samples of tensor data carry no counted target in a loss that averages over
        counted targets (labels all -100 or ``ignore_index``; a causal LM's own loss, a token mean): they add
        nothing to L_n yet count in n, and so in nβ (8 such sequences beside 96 moved nβ 21.0 → 23.7)."""
        c = self._star_counts
        if c is None or not isinstance(self.source, Data):
            return
        empty = int((c.reshape(-1) == 0).sum())
        if not empty:
            return
        self.notes.append(f"{empty} of the {self.source.n} samples have no counted target (labels all -100 or "
                          "ignore_index): the loss averages over counted targets, so they add nothing to L_n, yet "
                          "each counts as a sample (in n, and so in nβ); drop them from the data, or pass nbeta")
        warnings.warn(f"slt: {self.notes[-1]}", RuntimeWarning, stacklevel=user_stacklevel())

    @property
    def init_loss(self) -> Tensor:
        """``(K,)`` :math:`L_n(w^*)` of each checkpoint."""
        return self.star_losses[1]

    def _compute_star_losses(self) -> tuple[Tensor | None, Tensor]:
        K, source, ev = self.K, self.source, self.evaluator
        star_ps: Tensor | None = None
        if isinstance(source, Data) and self.adapter.per_sample_error is not None:
            star_ps = self._own_loss_lookup()
            if star_ps is None:
                self._refuse_broadcast_loss()
                self._note_forward_control_variate("per-sample losses lifted from it are unavailable or are not "
                                                   "each sample's own loss")
                init = self._forward_losses(source)
            else:
                c = self._star_counts
                init = star_ps.mean(1) if c is None else count_weighted_mean(star_ps, c.unsqueeze(0), 1)
        elif isinstance(source, Data):
            try:
                star_ps = self._per_sample_at_star()
            except Exception:  # noqa: BLE001 - per-sample losses unavailable: forward at w* instead
                star_ps = None
                self._refuse_broadcast_loss()
            if star_ps is not None:
                self._star_counts = self.adapter.counts(source.target, 1, star_ps.dtype)
                if not self.adapter.has_native_per_sample:
                    star_ps = self._check_decomposition(star_ps)
            if star_ps is not None:
                wn = source.normalized_weights()
                c = self._star_counts
                if wn is not None:
                    init = weighted_mean(star_ps, wn.to(star_ps), None if c is None else c.to(star_ps), 1)
                elif c is not None:
                    init = count_weighted_mean(star_ps, c.unsqueeze(0), 1)
                else:
                    init = star_ps.mean(1)
            else:
                init = self._forward_losses(source)
        else:
            tot = torch.zeros(K, dtype=torch.float64, device=self.device)
            count = 0
            # (every sample once: a loader that drops its last batch or shuffles is read in index order)
            read, order = source.in_order()
            # (a sampler that chooses the samples: say so; a shuffle read in index order changes nothing here)
            if order and order.startswith("the DataLoader's sampler") and order not in self.notes:
                self.notes.append(order)
            # each batch's loss and what it weighs; a loss that averages over labelled tokens weighs them, a
            # rule told by the first batch that can tell (slt.target.Target._label_rule)
            rule = "rows" if self.adapter.has_native_per_sample else None
            seen = []  # per batch: its loss (K,) and its weight under each rule (numbers, not the batch)
            for x, y, w in read.iter_batches():
                b = self._loader_batch(x, y, w)
                with torch.no_grad():
                    loss = ev.losses(self.w_star, b).double()
                seen.append((loss, {r: self._batch_weight(b, w, r) for r in ("rows", "all", "shifted")}))
                if rule is None:
                    rule = self._label_rule(b)
            rule = rule or "rows"
            for loss, weights in seen:
                tot += loss * weights[rule]
                count += weights[rule]
            if not seen or count == 0:
                raise ValueError("empty dataset: the DataLoader yielded no batch")
            init = (tot / count).to(self.dtype)
        if not torch.isfinite(init).all():
            bad = (~torch.isfinite(init)).nonzero().flatten().tolist()
            raise ValueError(f"the loss at w* is NaN or inf (checkpoints {bad}); check the model and data")
        return star_ps, init

    def _per_sample_at_star(self, adapter: LossAdapter | None = None, source: Data | None = None) -> Tensor:
        """``(K, n)`` per-sample losses at w* over the data, or over ``source`` (of ``adapter``'s loss when
        given), in chunks."""
        source = self.source if source is None else source
        per_row = int(source.x[0].numel()) if self._row_numel is None else self._row_numel
        chunk = max(1, (1 << 22) // max(1, self.K * per_row))
        return torch.cat([
            self.evaluator.per_sample(self.w_star, source.x[i : i + chunk], source.target[i : i + chunk], adapter)
            for i in range(0, source.n, chunk)
        ], dim=1)

    def _own_loss_lookup(self) -> Tensor | None:
        """Per-sample losses at w* for the control variate of a loss with no per-sample lift (a Hugging
        Face model's own ``output.loss``: :func:`slt.losses.model_loss`), from the first of its
        ``per_sample_forms`` that reproduces it (:meth:`_fitted`); ``None`` when none does."""
        first = torch.arange(min(self.source.n, 64))
        head = _rows_of(self.source, first)
        whole: list[Tensor] = []
        for form in getattr(self.adapter.loss_fn, "per_sample_forms", ()):
            adapter = LossAdapter(self.adapter.loss_fn, per_sample=form)
            try:  # on the first rows, before a pass over all the data
                ps = self._per_sample_at_star(adapter, head)
                whole = whole or [self._loss_on_rows(first)]
                if not any(_agrees(mean, whole[0]) for mean in candidate_means(ps, head.target)):
                    continue
                star_ps = self._per_sample_at_star(adapter)
            except Exception:  # noqa: BLE001 - this form does not fit the model's outputs
                continue
            fitted, counts, _ = self._fitted(star_ps)
            if fitted is not None:
                self._star_counts, self.own_per_sample = counts, form
                return fitted
        return None

    def _fitted(self, star_ps: Tensor) -> tuple[Tensor | None, Tensor | None, str]:
        """``(per-sample losses, counts, why not)``: ``star_ps`` as they are when they are finite and
        their mean gives ``loss_fn`` on the first (up to 64) samples and on as many spread over the
        data; else weighted by the labelled tokens of each sample (:func:`slt.losses.label_counts`)
        when that mean does; else ``(None, None, why)``.  Both row sets are checked for either form:
        data whose first rows carry equally many labels (no padding there) fit the plain mean there
        even when the loss is a mean over labelled tokens."""
        source = self.source
        m = min(source.n, 64)
        first = torch.arange(m)
        spread = torch.linspace(0, source.n - 1, m).round().long().unique()  # rows across the whole set
        whole = self._loss_on_rows(first)
        at_spread: list[Tensor] = []

        def fits(mean_of: Callable[[Tensor], Tensor]) -> bool:
            if not _agrees(mean_of(first), whole):
                return False
            if not at_spread:
                at_spread.append(self._loss_on_rows(spread))
            return _agrees(mean_of(spread), at_spread[0])

        finite = bool(torch.isfinite(star_ps).all())
        if finite and fits(lambda rows: star_ps[:, rows].mean(1)):
            return star_ps, None, ""
        for counts in label_counts(source.target):  # a mean over labelled entries (-100 ignored)
            counts = counts.to(device=star_ps.device, dtype=star_ps.dtype)
            weighted = label_weighted(star_ps, counts)

            def counted(rows: Tensor, weighted: Tensor = weighted, counts: Tensor = counts) -> Tensor:
                return count_weighted_mean(weighted[:, rows], counts[rows].unsqueeze(0), 1)

            if weighted is not None and fits(counted):
                return weighted, counts, ""
        mean = star_ps[:, first].mean(1)
        why = ("some samples' losses are NaN or inf on their own" if not finite else
               f"on the first {m} samples their mean is {float(mean[0]):.6g} and the loss {float(whole[0]):.6g}"
               if not _agrees(mean, whole) else
               f"their mean gives the loss on the first {m} samples but not on {len(spread)} spread over the data")
        return None, None, why

    def _check_decomposition(self, star_ps: Tensor) -> Tensor | None:
        r"""The per-sample losses lifted from ``loss_fn`` (by ``vmap``, one sample at a time), if they
        average to ``loss_fn`` on the first (up to 64) samples and are finite, else ``None``.

        The control variate gathers them on every minibatch, so they must add up to the loss the
        chains follow.  A loss that averages over something other than samples (tokens whose label
        is ``-100``, a mask) or couples the samples of a batch does not decompose: its per-sample
        mean differs from it (a token-level cross-entropy with 40% of labels ignored: 0.393 vs
        0.401, λ̂ 8% high; a loss on centred logits: λ̂ = −14).  Then the loss at w* on each
        minibatch is a forward pass at w* instead (one more evaluation per step), weighted data
        and per-sample methods are refused with the reason, and a note says so.  A mean over the
        labelled tokens of integer labels with -100 ignored (:func:`slt.losses.label_counts`: all positions, or
        positions 1: for a shifted causal-LM loss) is tried first: weighted by each sample's labelled
        tokens, checked on the first rows and on rows spread over the data, it stays a lookup."""
        fitted, counts, why = self._fitted(star_ps)
        if fitted is not None and counts is None:
            return fitted
        if fitted is not None:
            self._star_counts = counts
            # the lookup is exact, yet a sample's own loss is not its share of loss_fn's mean
            self.adapter.per_sample_error = (
                "loss_fn averages over labelled tokens (labels -100 ignored), not over samples: weighted "
                "data, data-refined LLCs over distributions of different sizes and per-sample methods need "
                "per-sample losses: use F.cross_entropy on (samples, classes, tokens) outputs (exact counts), "
                "or register a per_sample form (slt.losses.register_per_sample) whose mean over a batch is "
                "loss_fn")
            return fitted
        if self.adapter.trailing_one is not None and isinstance(self.source, Data):
            raise self._broadcast_error(why)
        self.adapter.per_sample_error = (
            f"loss_fn is not the mean of per-sample losses ({why}: it averages over something other than "
            "samples, e.g. tokens whose label is -100, or couples the samples of a batch); weighted data, "
            "data-refined LLCs over distributions of different sizes and per-sample methods need per-sample "
            "losses: give loss_fn a per_sample form "
            "(slt.losses.register_per_sample) whose mean over a batch is loss_fn")
        self._note_forward_control_variate(why)
        return None

    def _broadcast_error(self, why: str) -> ValueError:
        """The error for a loss that broadcasts an output and a target that differ by a trailing 1."""
        o, t = ("n",) + self.adapter.trailing_one[0][1:], ("n",) + self.adapter.trailing_one[1][1:]
        o, t = (f"({', '.join(map(str, v))}{',' if len(v) == 1 else ''})" for v in (o, t))
        return ValueError(  # (n, 1) against (n,): a hand-written loss broadcasting them
            f"loss_fn is not the mean of per-sample losses ({why}), and the model's output {o} and the target "
            f"{t} differ by a trailing 1: a loss written as ((out - y) ** 2).mean() (or GaussianNLLLoss on a (n, 1) "
            "mean against (n,) targets) broadcasts them to (n, n) and is not the loss of each sample. Reshape the "
            "target (e.g. Y.reshape(-1, 1)) or the output (out.squeeze(-1)) so that they match")

    def _refuse_broadcast_loss(self, rows: int = 8) -> None:
        """Where no per-sample form could be lifted from ``loss_fn`` (vmap over samples failed) and the output
        and the target differ by a trailing 1: compare its value on the first ``rows`` samples as one batch
        with the mean of its values on each alone (a loop), and raise :meth:`_broadcast_error` when they
        differ (the loss broadcasts the two to (n, n))."""
        if self.adapter.trailing_one is None or not isinstance(self.source, Data) or self.adapter.loss_fn is model_loss:
            return  # (a model's own loss, e.g. a mean over labelled tokens, is not a mean over samples anyway)
        m = min(rows, self.source.n)
        if m < 2:
            return
        with torch.no_grad():
            batch = self._loss_on_rows(torch.arange(m))
            alone = torch.stack([self._loss_on_rows(torch.arange(i, i + 1)) for i in range(m)]).mean(0)
        tol = 1e-4 * float(batch.abs().max()) + 64 * torch.finfo(self.dtype).eps
        if bool(((batch - alone).abs() > tol).any()):
            raise self._broadcast_error(f"on the first {m} samples it gives {float(batch[0]):.6g} as one batch and "
                                        f"{float(alone[0]):.6g} as the mean of each sample's")

    def _loss_on_rows(self, rows: Tensor) -> Tensor:
        """``(K,)`` ``loss_fn`` at w* on the given rows of the data, as one batch."""
        with torch.no_grad():
            return self.evaluator.losses(self.w_star, _rows_of(self.source, rows).full_batch())

    def _note_forward_control_variate(self, why: str) -> None:
        if any(i.startswith(RANDOM_ISSUES) for i in self.issues):  # (warned of at set-up)
            self.notes.append(f"the loss is random (see its set-up note), so its per-sample losses differ from it "
                              f"({why}): the loss at w* on each minibatch (the control variate) is a forward pass at "
                              "w* (one more evaluation per step) instead of a lookup")
            return
        self.notes.append(
            f"loss_fn is not the mean of per-sample losses ({why}), so the loss at w* on each minibatch (the "
            "control variate) is a forward pass at w* (one more evaluation per step) instead of a lookup; to "
            "make it a lookup, use a loss that averages over samples (e.g. slt.losses.causal_lm for language "
            "models) or register its per-sample form (slt.losses.register_per_sample). A loss that couples the "
            "samples of a batch (a contrastive loss such as InfoNCE) is, besides, not estimated without bias by a "
            "minibatch's loss: the chains then sample a potential of the batch size, so compare runs at one "
            "batch_size, or pass batch_size=None")
        warnings.warn(f"slt: {self.notes[-1]}", RuntimeWarning, stacklevel=user_stacklevel())

    def _forward_losses(self, source: Data) -> Tensor:
        """``(K,)`` :math:`L_n(w^*)` by forward passes of ``loss_fn``: one batch when the data fit
        the per-sample chunk rule, else chunks combined by their number of samples."""
        per_row = int(source.x[0].numel()) if self._row_numel is None else self._row_numel
        chunk = max(1, (1 << 24) // max(1, self.K * per_row))
        if source.n <= chunk or source.weights is not None:
            with torch.no_grad():
                return self.evaluator.losses(self.w_star, source.full_batch()).detach()
        tot = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        for i in range(0, source.n, chunk):
            part = _rows_of(source, slice(i, i + chunk))
            with torch.no_grad():
                tot += self.evaluator.losses(self.w_star, part.full_batch()).double() * part.n
        return (tot / source.n).to(self.dtype)

    def _batch_weight(self, b: Batch, w: Tensor | None, rule: str = "rows") -> float:
        """What a loader's batch weighs in :math:`L_n` (batches combined as :func:`slt.losses.weighted_mean`
        combines samples): its summed sample weights times counts (class weights, labelled tokens), or its
        rows.  A class-weighted cross-entropy over batches of a loader read L(w*) 0.9258 against 0.9208, and
        a loader of (x, y, weights) its unweighted loss.  ``rule``: how a loss without known counts averages
        (:meth:`_label_rule`): over rows, or over the labelled entries of all positions or positions 1:."""
        c = self.adapter.counts(b.y, 1, self.dtype) if isinstance(b.y, Tensor) else None
        if c is None and rule != "rows":  # a mean over labelled entries (Target._label_rule)
            c = label_count_options(b.y, min_ndim=2).get(rule)
            c = None if c is None else c.to(device=self.device, dtype=self.dtype)
        w = None if w is None else w.to(device=self.device, dtype=self.dtype).flatten()
        if c is not None and w is not None:
            return float((w * c.flatten()).sum())
        if c is not None:
            return float(c.sum())
        return float(w.sum()) if w is not None else float(num_rows(b.x))

    def _label_rule(self, b: Batch) -> str | None:
        """Which mean ``loss_fn`` takes over a loader batch whose target holds integer labels (a tensor, or a
        mapping's ``"labels"``): ``"rows"``, ``"all"`` or ``"shifted"`` (a mean over the labelled entries of
        all positions, or of positions 1: as a causal LM's own loss shifts them; -100 ignored), told by the loss
        of the batch against its halves' losses mixed by each rule's counts; ``None`` when the batch cannot
        tell them apart (the rules' mixes agree) or has no such labels."""
        options = label_count_options(b.y, min_ndim=2)
        B = num_rows(b.x)
        if not options or B < 2 or b.weights is not None:  # (weighted batches: their halves' weights differ)
            return None
        h = B // 2

        def half(sl: slice) -> Batch:
            x = _map(lambda t: t[sl], b.x)
            return Batch(x, x if b.y is b.x else _map(lambda t: t[sl], b.y), None, True)

        halves = [half(slice(0, h)), half(slice(h, B))]
        with torch.no_grad():
            whole = self.evaluator.losses(self.w_star[:1], b).double().cpu()
            parts = torch.cat([self.evaluator.losses(self.w_star[:1], hb).double().cpu() for hb in halves])
        mixes = {}
        for name, c in [("rows", torch.tensor([h, B - h]))] + list(options.items()):
            c = c.double().cpu() if name == "rows" else torch.stack([c[:h].sum(), c[h:].sum()]).double().cpu()
            if bool((c > 0).all()):
                mixes[name] = (c * parts).sum().reshape(1) / c.sum()
        if len(mixes) < 2 or all(_agrees(m, next(iter(mixes.values()))) for m in mixes.values()):
            return None  # the rules give the same loss here: this batch cannot tell them apart
        return next((name for name, m in mixes.items() if _agrees(m, whole)), "rows")

    def _loader_batch(self, x: Any, y: Any, w: Tensor | None) -> Batch:
        x = to_device(x, self.device, self.dtype)
        y = x if y is None else to_device(y, self.device, self.dtype)
        wts = None
        if w is not None:
            w = w.to(device=self.device, dtype=self.dtype).flatten()
            if not bool(w.sum() > 0):
                raise ValueError(
                    f"a DataLoader batch's third field, read as the samples' weights, sums to {float(w.sum()):g} "
                    "on a batch of " f"{w.numel()} samples: no sample of it carries mass (weights must be "
                    "non-negative, not all zero on a batch). If the field holds labels, groups or ids, not weights, "
                    "yield (x, y) batches, or pass the inputs as a mapping ({'x': x, 'ids': ids}, y)")
            wts = w / w.sum()
        return Batch(x, y, wts, True)

    # -- full-data evaluations (tensor data) --------------------------------------
    def _data(self) -> Data:
        if not isinstance(self.source, Data):
            raise TypeError("full-data losses need tensor data; prepare the target with full_data=True")
        return self.source

    def full_batch(self) -> Batch:
        """The whole dataset as one batch shared by all chains."""
        return self._data().full_batch()

    def losses(self, flat: Tensor) -> Tensor:
        """``(m, d) -> (m,)`` full-data losses :math:`L_n`, no grad, chunked over ``m``."""
        data = self._data()
        batch = data.full_batch()
        per_row = row_numel(data.target) if self._row_numel is None else self._row_numel
        per = max(1, int(data.n * max(1, per_row)))
        chunk = max(1, (1 << 22) // per)
        out = []
        with torch.no_grad():
            for i in range(0, flat.shape[0], chunk):
                out.append(self.evaluator.losses(flat[i : i + chunk], batch))
        return torch.cat(out)

    def loss(self, w: Tensor) -> Tensor:
        """``(d,) -> L_n(w)``, differentiable in ``w`` (one autograd pass; for NUTS).

        Models with a hand-written gradient go through :class:`_LossFn`."""
        self._one_state("loss")
        batch = self.full_batch()
        if self.evaluator.analytic:
            return _LossFn.apply(w, self)
        if self.path == "vmap":
            out = self.evaluator.call({**self.spec.unflatten(w), **self.evaluator.buffers}, batch.x)
            return self.adapter.single_loss(out, batch.y, batch.weights)
        return self.evaluator.losses(w[None], batch)[0]

    def loss_and_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(d,) -> (L_n(w), ∇L_n(w) (d,))``.

        Native models go through the evaluator (hand-written gradients where the
        model has them); other modules through one ``functional_call`` and
        autograd (a single chain needs no ``vmap``)."""
        self._one_state("loss_and_grad")
        batch = self.full_batch()
        if self.path != "vmap":
            loss, grad = self.evaluator.loss_and_grad(w[None], batch)
            return loss[0], grad[0]
        with torch.enable_grad():
            p = w.detach().requires_grad_(True)
            params = {**self.spec.unflatten(p), **self.evaluator.buffers}
            with self.evaluator.slots.holding(params):  # through the backward pass (activation checkpointing)
                out = self.evaluator.call(params, batch.x)
                loss = self.adapter.single_loss(out, batch.y, batch.weights)
                (grad,) = torch.autograd.grad(loss, p)
        return loss.detach(), grad

    def _one_state(self, what: str) -> None:
        """Refuse a single-point evaluation when the checkpoints hold different buffers: a point does not say
        whose apply."""
        if self.evaluator.checkpoint_tensors:
            raise ValueError(f"Target.{what}(w) takes one point, but the checkpoints differ in buffers or frozen "
                             "parameters: prepare one target per checkpoint")

    # -- minibatches ---------------------------------------------------------------
    def is_full_batch(self, batch_size: int | None) -> bool:
        """Whether ``batch_size`` means full-batch gradients (tensor data, ``None`` or ``>= n``)."""
        return isinstance(self.source, Data) and (batch_size is None or batch_size >= self.source.n)

    def batches(
        self, rng: ChainRNG, num_chains: int, batch_size: int | None, *, control_variate: bool = True,
        shared: bool = False,
    ) -> "BatchStream":
        """The stream of ``(batch, L_B(w*) per row)`` of a run of ``num_chains`` chains per checkpoint; a
        stream of a minibatch per chain on a model whose vmap path needs shared inputs switches the target
        to the loop over chains first (:meth:`inputs_per_row`)."""
        stream = BatchStream(self, rng, num_chains, batch_size, control_variate, shared)
        if stream.per_row_inputs:
            self.inputs_per_row()
        return stream

    def inputs_per_row(self) -> None:
        """Prepare the evaluation for inputs that differ per row: on a model whose vmap path fails then
        while it works on shared inputs (:class:`PerRowFailure`: a forward that branches on its input
        values), switch to the loop over chains with the fallback warning, or raise the failure when
        ``vectorize="vmap"`` was asked for."""
        failure = self.evaluator.per_row_failure
        if failure is None or self.evaluator.path != "vmap":
            return
        what = (f"the vmap path failed on this model with a minibatch per chain ({failure.error}){failure.hint}; "
                "it works where the chains share their inputs (a full batch, or a DataLoader's batches)")
        if failure.explicit:
            raise RuntimeError(f"{failure.caller}: vectorize='vmap': {what}; pass one of those, or vectorize='loop'")
        warnings.warn(f"{failure.caller}: {what}; falling back to a sequential loop over chains (slower).",
                      RuntimeWarning, stacklevel=user_stacklevel())
        self.evaluator = _like(self.evaluator, "loop")
        self.path_reason = f"fallback: {self.path_reason} failed with a minibatch per chain ({failure.error})"


class BatchStream:
    r"""Every call returns the next ``(Batch, L_B(w^*) (K*C,))``.

    Full batch: the whole dataset and :math:`L_n(w^*)`.  Tensor data: ``batch_size``
    indices per row drawn i.i.d. (with replacement, by weight for weighted data)
    from the checkpoint's index stream (``shared``: one draw for all chains of a
    checkpoint), and the control variate gathered from the per-sample losses at
    ``w*`` (a forward pass at ``w*`` when they are unavailable).  A loader: its
    next batch, shared by all chains, and a forward pass at ``w*``.  With
    ``control_variate=False`` the second element is :math:`L_n(w^*)`.

    Attributes
    ----------
    full
        Whether the gradients are full-batch (deterministic potential).
    batch_size
        Samples per row and step (``n`` at full batch).
    shared
        Whether chains of a checkpoint share their batches (always for a loader).
    per_row_inputs
        Whether the rows' inputs are given per row (tensor data's minibatches, a data-refined full batch).
    """

    def __init__(self, target: Target, rng: ChainRNG, num_chains: int, batch_size: int | None,
                 control_variate: bool, shared: bool):
        self.target = target
        self.rng = rng
        self.control_variate = control_variate
        self.full = target.is_full_batch(batch_size)
        source = target.source
        self.batch_size = source.n if self.full else batch_size
        if isinstance(source, LoaderSource) and source.batch_size is not None:
            # the loader's batches are what the run uses (at most its dataset: batch_size=1000 over 400 rows)
            self.batch_size = source.batch_size if source.n is None else min(source.batch_size, int(source.n))
        self.shared = shared or isinstance(source, LoaderSource)
        self._shared_index = shared
        self._rows = target.rows(num_chains)  # (G*C, d)
        star_ps, init = target.star_losses
        self._star_ps = star_ps
        self._init = target.group_init_loss.repeat_interleave(num_chains)  # (G*C,)
        groups = target.groups
        self._parts = None  # data-refined: each group's own dataset and its first row in the source
        if groups.parts is not None:
            self._parts = [groups.parts[g % groups.D] for g in range(target.G)]
            first = torch.tensor(groups.offsets, device=target.device).repeat(target.K * groups.M)
            self._data_offset = first.repeat_interleave(num_chains).unsqueeze(1)  # (G*C, 1)
        self._full = None
        if self.full:
            self._full = source.full_batch() if groups.parts is None else self._group_full_batch(num_chains)
        #: whether the rows' inputs are given per row (tensor data's minibatches, drawn per chain or, with
        #: ``shared``, per checkpoint; a data-refined full batch: each group its own distribution)
        self.per_row_inputs = (isinstance(source, Data) and not self.full) or (self.full and groups.parts is not None)
        if star_ps is not None:  # (G*C, 1) offset of each row's checkpoint in the flattened (K, n) losses
            ckpt = target.group_checkpoint.repeat_interleave(num_chains)
            self._offset = (ckpt * star_ps.shape[1]).unsqueeze(1)

    def _group_full_batch(self, num_chains: int) -> Batch:
        """Full batch of a data-refined run: each row its own distribution's rows (padded to the
        largest with zero weight), as a per-row batch (``rows × n`` samples in memory)."""
        groups, dev = self.target.groups, self.target.device
        n_max = max(p.n for p in groups.parts)
        plain = all(p.n == n_max and p.weights is None for p in groups.parts)  # no padding: no weights needed
        idx, wts = [], []
        for part, lo in zip(groups.parts, groups.offsets):
            i = torch.arange(n_max, device=dev) % part.n + lo
            w = part.normalized_weights()
            w = torch.full((part.n,), 1.0 / part.n, device=dev) if w is None else w.to(dev)
            wts.append(torch.cat([w, w.new_zeros(n_max - part.n)]).to(self.target.dtype))
            idx.append(i)
        per_group = torch.arange(self.target.G, device=dev) % groups.D
        rows = per_group.repeat_interleave(num_chains)
        b = self.target.source.gather(torch.stack(idx)[rows])
        return Batch(b.x, b.y, None if plain else torch.stack(wts)[rows], False)

    def _forward_star(self, b: Batch) -> Tensor:
        with torch.no_grad():
            return self.target.evaluator.losses(self._rows, b)

    #: the last ``(batch, L_B(w*))`` returned (:func:`slt.loop.next_batch` steps a state that
    #: carries its evaluation on it again, also across loops, e.g. adaptation then sampling)
    last: tuple[Batch, Tensor] | None = None

    def __call__(self) -> tuple[Batch, Tensor]:
        self.last = self._next()
        return self.last

    def _next(self) -> tuple[Batch, Tensor]:
        if self._full is not None:
            return self._full, self._init
        source = self.target.source
        if isinstance(source, Data):
            if self._parts is None:
                idx = self.rng.index(source, self.batch_size, self._shared_index)
            else:  # each group draws from its own distribution's rows of the concatenated source
                idx = self.rng.index(self._parts, self.batch_size, self._shared_index) + self._data_offset
            b = source.gather(idx)
            if not self.control_variate:
                return b, self._init
            if self._star_ps is not None:
                flat_idx = (self._offset + idx).reshape(-1)  # index_select: fast on CPU
                star = self._star_ps.view(-1).index_select(0, flat_idx).view(idx.shape)
                counts = self.target._star_counts
                if counts is None:
                    return b, star.mean(1)
                c = counts.index_select(0, idx.reshape(-1)).view(idx.shape)
                return b, count_weighted_mean(star, c, 1)
            return b, self._forward_star(b)
        b = self.target._loader_batch(*source.next_batch())
        if not self.control_variate:
            return b, self._init
        return b, self._forward_star(b)


def _agrees(mean: Tensor, whole: Tensor) -> bool:
    """Per-sample losses' mean ``(K,)`` equals ``loss_fn`` ``(K,)`` to rounding (relative to the largest)."""
    scale = whole.abs().max().clamp_min(torch.finfo(whole.dtype).tiny)
    return bool(((mean - whole).abs() <= 1e-4 * scale + 1e-6).all())


def _rows_of(source: Data, rows: slice | Tensor) -> Data:
    """Some rows of a dataset (a slice or an index tensor), unweighted (inputs without a target stay so)."""
    return Data(source.x[rows], None if source.y is None else source.y[rows], None)


class _LossFn(torch.autograd.Function):
    """L_n(w) with the evaluator's gradient (hand-written on the toy models)."""

    @staticmethod
    def forward(ctx, w: Tensor, target: Target) -> Tensor:  # type: ignore[override]
        loss, grad = target.loss_and_grad(w.detach())
        ctx.save_for_backward(grad)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return g * grad, None


# ----------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------
#: the dtypes a run computes in (parameters, gradients, sampler, losses)
RUN_DTYPES = (torch.float32, torch.float64)


def resolve_dtype(dtype: torch.dtype | None, template: nn.Module) -> tuple[torch.dtype, str | None]:
    """The run's dtype and a note for the run's record (``None``: nothing to say).

    ``dtype`` given: float32 or float64 (anything else is an error).  ``None``: the model's own
    precision — the promoted dtype of its floating-point parameters (a float64 model runs in
    float64, a float32 one in float32); half-precision parameters (bfloat16, float16) run in
    float32 on a copy, with a note: a Langevin step moves a weight by about √ε ≈ 10⁻³ of its
    scale or less, below the 2⁻⁸ relative resolution of bfloat16, so chains sampled in it would
    barely move and λ̂ would be meaningless (``autocast=`` runs the forward in half precision
    with float32 parameters instead)."""
    if dtype is not None:
        if dtype not in RUN_DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.float64 (or None: the model's), got {dtype}")
        return dtype, None
    floats = [p.dtype for p in template.parameters() if p.is_floating_point()]
    if not floats:
        return torch.float32, None
    found = floats[0]
    for t in floats[1:]:
        found = torch.promote_types(found, t)
    if found in RUN_DTYPES:
        mixed = sorted({str(t).replace("torch.", "") for t in floats})
        return found, (None if len(mixed) == 1 else f"the model's parameters mix {' and '.join(mixed)}: sampled in "
                       f"{str(found).replace('torch.', '')}, their common precision, on a copy")
    halves = sorted({str(t).replace("torch.", "") for t in floats if t not in RUN_DTYPES})
    return torch.float32, (f"the model's parameters are {', '.join(halves)}: sampled in float32 on a copy (a "
                           "Langevin step is below half precision's resolution); autocast='bf16' or 'fp16' runs "
                           "the forward in half precision instead")


def _check_module(m: Any, what: str) -> None:
    """Refuse modules slt cannot call with substituted parameters, naming the fix."""
    if not isinstance(m, nn.Module):
        return
    if isinstance(m, torch.jit.ScriptModule):
        raise TypeError(
            f"{what} is a TorchScript module (torch.jit.script / torch.jit.trace): slt calls the model with each "
            "chain's parameters substituted (torch.func.functional_call), which TorchScript modules do not "
            "support; pass the original nn.Module (the one that was scripted)")
    lazy = [n for n, t in list(m.named_parameters()) + list(m.named_buffers())
            if isinstance(t, nn.parameter.UninitializedTensorMixin)]
    if lazy:
        raise ValueError(
            f"{what} has uninitialized lazy parameters ({_names(lazy)}: nn.LazyLinear, nn.LazyConv2d, ...) "
            "whose shapes are set by the first forward pass: train it, or call it once on a batch "
            "(model(x)), before estimating")


#: the weight files a Hugging Face checkpoint directory (``save_pretrained``, a ``Trainer``'s
#: ``checkpoint-500/``; a PEFT model's adapters) holds, in the order they are looked for; a sharded one
#: has an index instead
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
HF_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _loaded(ck: Any, k: int) -> Any:
    """A checkpoint given as a path (``str`` or ``os.PathLike``): a file — ``.safetensors`` read with
    ``safetensors.torch.load_file``, any other with ``torch.load(..., weights_only=True)`` (tensors and
    containers, onto the CPU) — or a Hugging Face checkpoint directory (:func:`_directory_state`);
    anything else as it is."""
    if not isinstance(ck, (str, os.PathLike)):
        return ck
    if os.path.isdir(ck):
        return _directory_state(str(ck), k)
    if str(ck).endswith(".safetensors"):
        return _safetensors(str(ck), k)
    try:
        return torch.load(ck, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {k}: no such file {str(ck)!r}") from None
    except Exception as e:  # noqa: BLE001 - unpickling refused or a corrupt file: say which and what to do
        raise ValueError(
            f"checkpoint {k} ({str(ck)!r}) could not be read by torch.load(..., weights_only=True) "
            f"({type(e).__name__}): a file holding a pickled module or "
            "other objects must be loaded by you (torch.load(path, weights_only=False), only for a file you "
            "trust); pass the module or its state_dict()") from e


def _safetensors(path: str, k: int) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f"checkpoint {k} ({path!r}) is a .safetensors file: pip install safetensors") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {k}: no such file {path!r}")
    return load_file(path, device="cpu")


def _directory_state(path: str, k: int) -> dict[str, Any]:
    """The state dict in a Hugging Face checkpoint directory: its ``model.safetensors`` or
    ``pytorch_model.bin``, or the shards its index lists (``*.index.json``, ``"weight_map"``), merged."""
    import json

    for name in HF_WEIGHT_FILES:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return _loaded(f, k)
    for name in HF_WEIGHT_INDEXES:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            with open(f) as fh:
                shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
            if not shards:
                raise ValueError(f"checkpoint {k}: {f!r} lists no weight files (its 'weight_map' is empty)")
            state: dict[str, Any] = {}
            for shard in shards:
                state.update(_loaded(os.path.join(path, shard), k))
            return state
    found = sorted(os.listdir(path))
    raise FileNotFoundError(
        f"checkpoint {k}: the directory {path!r} holds none of {', '.join(HF_WEIGHT_FILES + HF_WEIGHT_INDEXES)} "
        f"(a Hugging Face checkpoint's weights); it has {', '.join(found[:8]) or 'no files'}"
        f"{' …' if len(found) > 8 else ''}: pass the weight file itself")


def checkpoint_state(model: nn.Module, checkpoint: Any, index: int = 0) -> Mapping[str, Any]:
    """The state dict of ``model`` 's parameters inside a checkpoint as researchers save them.

    ``checkpoint`` is a state dict, a file path (read with ``torch.load(..., weights_only=True)``, or
    ``safetensors`` for a ``.safetensors`` file), a Hugging Face checkpoint directory (its
    ``model.safetensors``, ``pytorch_model.bin`` or sharded weights: ``save_pretrained``, a ``Trainer``'s
    ``checkpoint-500/``), a
    training checkpoint holding the state dict under one key (``{"model": ..., "optimizer": ...,
    "step": ...}``, Lightning's ``{"state_dict": ...}``), or a state dict saved under a key prefix
    (``"module."``, ``"_orig_mod."``, ``"model."``).  Errors name the checkpoint by ``index``."""
    sd = _unprefixed(_loaded(checkpoint, index), _unwrap(model), index)
    if not isinstance(sd, Mapping):
        raise TypeError(f"checkpoint {index} is a {type(sd).__name__}, not a state dict (a mapping name -> tensor)")
    return sd


def _empty_sequences(loss_fn: Any, source: Data) -> str | None:
    """A note when :func:`slt.losses.causal_lm` finds sequences with no next-token position in the data
    (all padding): each counts in n and nβ and adds 0 to the loss, lowering L_n (8 such rows beside 24
    moved L(w*) 0.209 → 0.157 and nβ 7.6 → 9.2)."""
    from .losses import causal_lm, causal_lm_empty_rows

    if loss_fn is not causal_lm and getattr(loss_fn, "func", None) is not causal_lm:  # (or a functools.partial)
        return None
    try:
        k = causal_lm_empty_rows(source.x if source.y is None else source.y)
    except (KeyError, TypeError):  # not token data: the loss check names it
        return None
    if not k:
        return None
    return (f"{k} of the {source.n} sequences have no next-token position (all padding, all -100, or one token): "
            "causal_lm gives each a loss of 0, yet each counts as a sample (in n, and so in nβ), which lowers L_n; "
            "drop them from the data")


def _check_checkpoint_lists(models: Any, state_dicts: Any) -> None:
    """Refuse ``models``/``state_dicts`` that are not lists of checkpoints: a mapping (one state dict, or
    checkpoints by label, whose keys were read as file names) or an iterator (a generator is read once, and
    the checkpoints are resolved more than once: "state_dicts is empty")."""
    for name, given in (("models", models), ("state_dicts", state_dicts)):
        if isinstance(given, Mapping):
            tensors = any(isinstance(v, Tensor) for v in given.values())
            raise TypeError(
                f"{name} takes a list of checkpoints, got a mapping" + (
                    f" of tensors (one state dict): pass {name}=[state_dict]" if tensors else
                    f" (labels {', '.join(map(repr, list(given)[:3]))}{', ...' if len(given) > 3 else ''}): pass "
                    f"{name}=list(checkpoints.values()); the results come back in that order"))
        if isinstance(given, Iterator):
            raise TypeError(f"{name} is an iterator (a generator), which can be read only once while slt reads the "
                            f"checkpoints more than once: pass a list, {name}=list(...)")
        if isinstance(given, (str, bytes, os.PathLike)):  # (a string is a sequence of one-letter "files")
            raise TypeError(f"{name} takes a list of checkpoints, got one path {str(given)!r}: pass {name}=[path], or "
                            f"the files of a pattern in training order, e.g. {name}=sorted(glob.glob(...), "
                            "key=lambda f: int(re.findall(r'\\d+', f)[-1]))")


def load_checkpoint_files(model: Any, models: Sequence[Any] | None, state_dicts: Sequence[Any] | None
                          ) -> tuple[Any, list[Any] | None, list[Any] | None, list[str | None] | None]:
    """``(model, models, state_dicts, files)`` with the checkpoints given as file paths read, once
    (:func:`_loaded`), for callers that resolve the checkpoints more than once; ``files`` names each
    checkpoint's file (``None`` for one given in memory), or is ``None`` when no file was given."""
    _check_checkpoint_lists(models, state_dicts)
    given = model if isinstance(model, (list, tuple)) else models if models is not None else state_dicts
    files = None if given is None else [str(c) if isinstance(c, (str, os.PathLike)) else None for c in given]

    if files is not None and all(f is not None for f in files):
        _warn_unordered_files(files)

    def each(items: Sequence[Any] | None) -> list[Any] | None:
        return None if items is None else [_loaded(c, k) for k, c in enumerate(items)]

    return (each(model) if isinstance(model, (list, tuple)) else model, each(models), each(state_dicts),
            files if files is not None and any(f is not None for f in files) else None)


def _warn_unordered_files(files: list[str]) -> None:
    """Warn when the checkpoint files' names carry training steps out of order: ``sorted(glob(...))`` sorts
    ``checkpoint-100`` before ``checkpoint-20``, so a curve's results (one per file, in the order given)
    came misordered, silently."""
    from .plotting import steps_from_names

    steps = steps_from_names(files)
    if steps is None or all(a <= b for a, b in zip(steps, steps[1:])):
        return
    shown = ", ".join(os.path.basename(os.path.normpath(f)) for f in files[:4]) + (", ..." if len(files) > 4 else "")
    warnings.warn(f"slt: the checkpoint files are not in the order of the steps in their names ({shown}): the "
                  "results come in the order given; sort the files by step, e.g. sorted(files, key=lambda f: "
                  "int(re.findall(r'\\d+', os.path.basename(f))[-1]))", RuntimeWarning, stacklevel=user_stacklevel())


def _params_in(sd: Mapping[Any, Any], names: list[str]) -> Mapping[Any, Any] | None:
    """``sd`` when it holds some of ``names``; its entries under the one key prefix that holds all of
    them, without the prefix; else ``None``."""
    if any(n in sd for n in names):
        return sd
    for key in sd:
        if isinstance(key, str) and key.endswith("." + names[0]):
            prefix = key[: len(key) - len(names[0])]
            if all(prefix + n in sd for n in names):
                return {kk[len(prefix):]: v for kk, v in sd.items() if isinstance(kk, str) and kk.startswith(prefix)}
    return None


def _with_adapter_names(sd: Mapping[Any, Any], template: nn.Module, names: list[str]) -> Mapping[Any, Any]:
    """A PEFT model's saved adapters (``save_pretrained``'s ``adapter_model.safetensors``,
    ``get_peft_model_state_dict``) are keyed without the adapter's name (``….lora_A.weight`` for the
    parameter ``….lora_A.default.weight``): the keys with it, when the template is a PEFT model (its
    ``peft_config`` names the adapters) and the checkpoint holds none of its parameters by name."""
    adapters = getattr(template, "peft_config", None)
    if not isinstance(adapters, Mapping) or any(n in sd for n in names):
        return sd
    for a in adapters:
        plain = {n.replace(f".{a}.", ".", 1): n for n in names if f".{a}." in n}
        if any(key in plain for key in sd):
            return {plain.get(key, key): v for key, v in sd.items()}
    return sd


def _unprefixed(sd: Any, template: nn.Module, k: int = 0) -> Any:
    """The state dict of the template's parameters inside a checkpoint mapping.

    A mapping holding the template's sampled parameters by name is returned as it is.  Otherwise,
    the keys under one prefix (saved from a data-parallel or ``torch.compile`` wrapper: ``"module.…"``,
    ``"_orig_mod.…"``; from a Lightning module: ``"model.…"``) without it; or the one value that is
    such a mapping (a training checkpoint ``{"model": state_dict, "optimizer": ..., "step": ...}``).
    Several such values (``"model"`` and ``"ema"``) or none: an error that names the keys."""
    if not isinstance(sd, Mapping) or not sd:
        return sd
    names = [n for n, p in template.named_parameters() if p.requires_grad]
    if not names:
        return sd
    sd = _with_adapter_names(sd, template, names)
    found = _params_in(sd, names)
    if found is not None:
        return found
    inner = {key: _params_in(v, names) for key, v in sd.items() if isinstance(v, Mapping) and v}
    holding = [key for key, v in inner.items() if v is not None]
    if len(holding) == 1:
        return inner[holding[0]]
    keys = ", ".join(repr(kk) for kk in list(sd)[:8]) + (", ..." if len(sd) > 8 else "")
    if holding:
        raise ValueError(
            f"checkpoint {k} holds the model's parameters under several keys ({', '.join(map(repr, holding))}): "
            f"pass the one to estimate, e.g. state_dicts=[ckpt[{holding[0]!r}], ...]")
    raise ValueError(
        f"checkpoint {k} holds none of the model's parameters (e.g. {names[0]!r}), under any prefix or key; its "
        f"keys are {keys}: pass the model's state_dict() (or the entry of the checkpoint that holds it)")


def _checkpoints(
    model: Any, models: Sequence[Any] | None, state_dicts: Sequence[Mapping[str, Tensor]] | None,
    caller: str | None = None,
) -> tuple[nn.Module, list[Mapping[str, Tensor] | nn.Module], bool]:
    """Returns (template module, list of checkpoints, is_batch).  Data-parallel wrappers are unwrapped
    and their ``"module."`` key prefix dropped from state dicts (:func:`_unwrap`); checkpoints that would
    mix in the template's state are refused (:func:`_check_state_dict`).  ``caller``: warn, naming it, of
    what the checks let through (the checkpoints are resolved several times per call; one warns)."""
    template, ckpts, is_batch = _checkpoint_list(model, models, state_dicts)
    template = _unwrap(template)
    _check_module(template, "the model")
    ckpts = [_unprefixed(_unwrap(c), template, k) for k, c in enumerate(ckpts)]
    attrs: dict[str, list[int]] = {}
    for k, c in enumerate(ckpts):
        if isinstance(c, Mapping):
            ckpts[k] = _check_state_dict(c, template, k, caller)
        elif c is not template:
            _check_module(c, f"checkpoint {k}")
            _same_architecture(c, template, k)
            for a in _same_function(c, template, k):
                attrs.setdefault(a, []).append(k)
    if attrs and caller is not None:
        which = sorted({k for ks in attrs.values() for k in ks})
        warnings.warn(f"{caller}: checkpoint{'s' * (len(which) > 1)} {', '.join(map(str, which))} "
                      f"{'differ' if len(which) > 1 else 'differs'} from the "
                      f"template in attributes ({_names(list(attrs))}); a batched run evaluates every checkpoint with "
                      "the template's forward and attributes, its own tensors substituted: if these choose what the "
                      "forward computes, estimate those checkpoints in calls of their own", RuntimeWarning,
                      stacklevel=user_stacklevel())
    return template, ckpts, is_batch


#: the attribute types :func:`_same_function` compares: strings and flags, which name a forward's path (an
#: activation, pre- or post-norm); numbers only on PyTorch's own modules, since training loops keep counters and
#: rates on the user's (helper 36: ``steps``, ``lr_used`` warned on every checkpoint of one run)
_FLAGS = (bool, str, type(None))


def _same_function(ck: nn.Module, template: nn.Module, k: int) -> list[str]:
    """Refuse a checkpoint module whose modules are of other classes than the template's: a batched run
    evaluates every checkpoint with the template's forward (its modules, the checkpoint's tensors), so a
    checkpoint of a subclass with its own forward, or a ``Sequential`` with ``ReLU`` where the template has
    ``Tanh``, ran as the template (helper 35: λ̂ and L(w*) bit for bit the template's, no warning).  Returns the
    attributes that differ (``"act = 'relu' against the template's 'tanh'"``; strings and flags, and numbers on
    PyTorch's own modules, :data:`_FLAGS`): they may choose the forward's path (an activation named in the
    constructor, LeakyReLU's slope), which the run takes from the template."""
    mine, theirs = dict(template.named_modules()), dict(ck.named_modules())
    differ = [f"{n or 'the module itself'}: {type(theirs[n]).__name__} where the template has {type(m).__name__}"
              for n, m in mine.items() if n in theirs and type(theirs[n]) is not type(m)]
    differ += [f"{n}: {type(theirs[n]).__name__}, which the template lacks" for n in theirs if n not in mine]
    differ += [f"{n}: the template's {type(m).__name__}, which it lacks" for n, m in mine.items() if n not in theirs]
    if differ:
        raise ValueError(f"checkpoint {k} is not made of the template's modules ({_names(differ)}); a batched run "
                         "evaluates every checkpoint with the template's forward (the model or the first checkpoint), "
                         "its own tensors substituted: estimate it in a call of its own")
    attrs = []
    for n, m in mine.items():
        a, b = vars(m), vars(theirs[n])
        # PyTorch's own modules keep hyperparameters, not counters, as attributes: numbers too (LeakyReLU's slope)
        kinds = _FLAGS + (int, float) if type(m).__module__.startswith("torch.nn") else _FLAGS
        for key, v in a.items():
            if key.startswith("_") or key == "training" or not isinstance(v, kinds) or key not in b:
                continue
            w = b[key]
            if isinstance(w, kinds) and w != v and not (v != v and w != w):
                attrs.append(f"{n + '.' if n else ''}{key} = {w!r} against the template's {v!r}")
    return attrs


def _same_architecture(ck: nn.Module, template: nn.Module, k: int) -> None:
    """Refuse a checkpoint module that is not the template's architecture: parameters or buffers the
    template lacks (a 2-layer checkpoint of a 1-layer template ran as the 1-layer model, its second layer
    dropped), or of other shapes; then the state checks of :func:`_check_state_dict`."""
    own = {n: tuple(t.shape) for n, t in template.state_dict(keep_vars=True).items() if isinstance(t, Tensor)}
    theirs = {n: tuple(t.shape) for n, t in ck.state_dict(keep_vars=True).items() if isinstance(t, Tensor)}
    extra, missing = [n for n in theirs if n not in own], [n for n in own if n not in theirs]
    shaped = [f"{n} {theirs[n]} vs {own[n]}" for n in theirs if n in own and theirs[n] != own[n]]
    if extra or missing or shaped:
        what = "; ".join(w for w in (f"it has {_names(extra)}, which the model does not" if extra else "",
                                     f"it lacks {_names(missing)}" if missing else "",
                                     f"shapes differ: {_names(shaped)}" if shaped else "") if w)
        raise ValueError(f"checkpoint {k} ({type(ck).__name__}) is not the architecture of the template "
                         f"({type(template).__name__}, the model or the first checkpoint): {what}; a batched run "
                         "needs checkpoints of one architecture (estimate the others in calls of their own)")
    _check_state_dict(ck.state_dict(keep_vars=True), template, k, None)  # (no extra entries: same names)


def _check_state_dict(sd: Mapping[Any, Any], template: nn.Module, k: int, caller: str | None) -> Mapping[Any, Any]:
    """Refuse a checkpoint mapping that would silently mix in the template's state: one that lacks
    persistent floating-point buffers of the model (BatchNorm's running statistics: a parameters-only dict
    ``dict(model.named_parameters())`` of a trained BatchNorm network ran with a fresh template's, L(w*)
    75 against 0.26), or gives two different values to one tied tensor (``enc.weight`` and ``dec.weight``
    of a model that ties them: slt read the first name, ``load_state_dict`` keeps the last), or holds
    tensors of modules the model does not have (another architecture: a 2-layer GPT-2's state dict in a
    1-layer template ran as the 1-layer model).  Other entries the model does not have (a buffer an older
    version saved) are ignored, with a warning when ``caller`` is given.  BatchNorm's step counter may be
    absent (it matters only in training mode).  Returns ``sd``, with a tied tensor's value under the
    model's first name for it when the checkpoint has it under another only."""
    own = template.state_dict(keep_vars=True)
    params = dict(template.named_parameters(remove_duplicate=False))
    tied: dict[int, list[str]] = {}
    for n, t in list(params.items()) + list(template.named_buffers(remove_duplicate=False)):
        tied.setdefault(id(t), []).append(n)
    # (a PEFT model's saved adapters hold only the adapters: the base model's state is the template's by design)
    missing = [] if isinstance(getattr(template, "peft_config", None), Mapping) else [
        n for n, t in own.items() if n not in params and isinstance(t, Tensor) and t.is_floating_point()
        and not any(a in sd for a in tied.get(id(t), [n]))]
    if missing:
        raise ValueError(
            f"checkpoint {k} lacks the model's buffers {_names(missing)}: their values would be the template's, "
            "not the checkpoint's (BatchNorm's running statistics of another model or none), and λ̂ would be that "
            "model's; pass the checkpoint's full state_dict() (not only its parameters)")
    for names in tied.values():
        given = [n for n in names if isinstance(sd.get(n), Tensor)]
        if len(given) > 1 and not all(sd[n].shape == sd[given[0]].shape and torch.equal(
                _dense(sd[n].detach().cpu()), _dense(sd[given[0]].detach().cpu())) for n in given[1:]):
            raise ValueError(
                f"checkpoint {k} gives different values to {', '.join(map(repr, given))}, which are one tensor in "
                "the model (tied weights): a checkpoint of a model that does not tie them? Estimate it with that "
                "model, or keep the one entry that holds the tied value")
    extra = [n for n in sd if isinstance(n, str) and n not in own]
    submodules = dict(template.named_modules()) if extra else {}
    foreign = [n for n in extra if n.rpartition(".")[0] not in submodules]
    if foreign:  # entries of modules the model does not have: another architecture (more layers, another head)
        raise ValueError(
            f"checkpoint {k} holds tensors of modules the model does not have ({_names(foreign)}): it is the "
            "checkpoint of another architecture (e.g. more layers), whose weights the run would drop; build the "
            "template with the checkpoint's configuration")
    if extra and caller is not None:  # (e.g. buffers an older version of the model saved, as GPT-2's attn.masked_bias)
        warnings.warn(
            f"{caller}: checkpoint {k} has entries the model does not have ({_names(extra)}): they are ignored; is "
            "it the checkpoint of another architecture?", RuntimeWarning, stacklevel=user_stacklevel())
    filled = {names[0]: sd[given[0]] for names in tied.values()
              if names[0] not in sd and (given := [n for n in names[1:] if n in sd])}
    return {**sd, **filled} if filled else sd


def checkpoint_state_differences(model: Any, models: Sequence[Any] | None = None,
                                 state_dicts: Sequence[Mapping[str, Tensor]] | None = None) -> list[str]:
    """Names of the buffers and frozen parameters whose values differ between the checkpoints.

    A batched run over checkpoints substitutes each checkpoint's *sampled* parameters into one
    template, whose buffers (BatchNorm's running statistics) and frozen parameters would serve every
    checkpoint.  When they differ between checkpoints (a BatchNorm network saved during training), each
    checkpoint needs its own: :func:`slt.estimate_llc` then gives each row its checkpoint's
    (``prepare_target(..., checkpoint_state=True)``), or runs the checkpoints one at a time where that
    cannot be batched (:func:`checkpoint_state_batchable`, :func:`checkpoint_modules`).  Empty for one
    checkpoint, or when they agree."""
    template, ckpts, is_batch = _checkpoints(model, models, state_dicts)
    return _state_differences(template, ckpts) if is_batch else []


def _state_differences(template: nn.Module, ckpts: list[Any]) -> list[str]:
    """:func:`checkpoint_state_differences` of resolved checkpoints (modules or state dicts)."""
    # BatchNorm's step counter differs between any two training checkpoints and matters only in training
    # mode (momentum=None), which is reported separately: not a difference here
    fixed = {n: t for n, t in template.named_buffers() if not n.endswith("num_batches_tracked")}
    fixed.update({n: p for n, p in template.named_parameters() if not p.requires_grad})
    differ: set[str] = set()
    for ck in ckpts:
        if ck is template or not fixed:
            continue
        state = _state_of(ck)
        for name, ref in fixed.items():
            other = state.get(name)
            if isinstance(other, Tensor) and not (other.shape == ref.shape and torch.equal(_dense(other.to(ref)),
                                                                                         _dense(ref))):
                differ.add(name)
    return [name for name in fixed if name in differ]


def _state_of(ck: Any) -> Mapping[str, Any]:
    """A checkpoint's tensors by name: a module's parameters and buffers, or the state dict itself."""
    return {**dict(ck.named_parameters()), **dict(ck.named_buffers())} if isinstance(ck, nn.Module) else ck


def checkpoint_state_batchable(model: Any, models: Sequence[Any] | None = None,
                               state_dicts: Sequence[Mapping[str, Tensor]] | None = None,
                               differ: list[str] | None = None) -> bool:
    """Whether checkpoints whose buffers or frozen parameters differ can run in one batched computation
    (``prepare_target(..., checkpoint_state=True)``): on the vmap and loop paths, with dense tensors; not a
    model with its own chain dimension (``forward_chains``), a sparse buffer that differs, nor differing
    tensors larger in all than the sampled parameters (each vmapped evaluation gathers them per row: a
    BatchNorm network's statistics are a small fraction of its parameters, a differing frozen embedding
    would not be).  ``differ``: :func:`checkpoint_state_differences` of the same checkpoints, when known
    (their tensors are not compared again)."""
    template, ckpts, is_batch = _checkpoints(model, models, state_dicts)
    if differ is None:
        differ = _state_differences(template, ckpts) if is_batch else []
    return not is_batch or _state_batchable(template, differ)


def _state_batchable(template: nn.Module, differ: list[str]) -> bool:
    """:func:`checkpoint_state_batchable` of a resolved template and its differing names."""
    if hasattr(template, "forward_chains"):
        return False
    own = _state_of(template)
    sampled = sum(p.numel() for p in template.parameters() if p.requires_grad)
    return (all(own[n].layout == torch.strided for n in differ)
            and sum(own[n].numel() for n in differ) <= sampled)


def _mode_differences(template: nn.Module, ckpts: list[Any]) -> str:
    """A note when checkpoint modules are in another training mode than the template (``model.train()``
    on some, ``eval()`` on others): one batched computation calls the template, whose modes then hold for
    every checkpoint; empty when they agree (or the checkpoints are state dicts)."""
    own = [m.training for m in template.modules()]
    odd = [k for k, ck in enumerate(ckpts) if isinstance(ck, nn.Module) and ck is not template
           and [m.training for m in ck.modules()] != own]
    if not odd:
        return ""
    mode = "eval" if not template.training else "training"
    return (f"checkpoint(s) {odd} are not in the template's (checkpoint 0's) {mode} mode: one batched computation "
            f"runs every checkpoint in the template's modes; call .eval() (or .train()) on all of them alike")


def _refuse_frozen_differences(template: nn.Module, ckpts: list[Any]) -> None:
    """Refuse checkpoint modules that freeze other parameters than the template (``requires_grad``): one call
    samples one set of parameters, the template's, so a checkpoint with its own frozen layer was sampled
    with it moving (λ̂ 29.9 against 14.1 in its own call), silently."""
    own = {n: p.requires_grad for n, p in template.named_parameters()}
    for k, ck in enumerate(ckpts):
        if not isinstance(ck, nn.Module) or ck is template:
            continue
        odd = [n for n, p in ck.named_parameters() if n in own and p.requires_grad != own[n]]
        if odd:
            raise ValueError(
                f"checkpoint {k} freezes other parameters than the template (checkpoint 0 or model): "
                f"requires_grad differs on {_names(odd)}; one call samples one set of parameters, the "
                "template's: set requires_grad alike on every checkpoint, or estimate them in separate calls")


def _checkpoint_state(template: nn.Module, ckpts: list[Any], names: list[str], dev: torch.device,
                      dtype: torch.dtype) -> dict[str, Tensor]:
    """``name -> (K, *shape)``: each checkpoint's value of the buffers and frozen parameters ``names`` (a
    state dict without an entry keeps the template's), floating ones in ``dtype``, on ``dev``."""
    own = _state_of(template)
    states = [_state_of(ck) for ck in ckpts]
    out: dict[str, Tensor] = {}
    keep_above = _kept_above(template, dtype)
    for name in names:
        ref = own[name].detach()
        vals = [(v if isinstance(v := st.get(name), Tensor) else ref).detach().to(device=dev) for st in states]
        stacked = torch.stack(vals)
        keep = stacked.is_floating_point() and _wider(ref, keep_above)
        out[name] = stacked.to(dtype) if stacked.is_floating_point() and not keep else stacked.to(ref.dtype)
    return out


def copy_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for a module that holds a tensor computed from its parameters as a plain
    attribute (``torch.nn.utils.prune``, the older ``weight_norm``/``spectral_norm``: ``module.weight``,
    refreshed by a forward pre-hook), which ``deepcopy`` refuses ("Only Tensors created explicitly by the
    user (graph leaves) support the deepcopy protocol"): such attributes are copied detached, and the hook
    recomputes them at the copy's first call."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as e:
        if "graph leaves" not in str(e):
            raise
    derived = [(m, k, v) for m in model.modules() for k, v in vars(m).items()
               if isinstance(v, Tensor) and v.grad_fn is not None]
    try:
        for m, k, v in derived:
            m.__dict__[k] = v.detach()
        return copy.deepcopy(model)
    finally:
        for m, k, v in derived:
            m.__dict__[k] = v


#: the complex dtype of a real one's precision (a complex buffer follows the run's dtype at its own kind)
_COMPLEX_OF = {torch.float64: torch.complex128, torch.float32: torch.complex64, torch.float16: torch.complex32}


def _wider(t: Tensor, dtype: torch.dtype) -> bool:
    """A floating-point tensor of more precision than ``dtype`` (a float64 buffer in a float32 run)."""
    return t.is_floating_point() and torch.finfo(t.dtype).bits > torch.finfo(dtype).bits


def _kept_above(module: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The precision above which a buffer keeps its own dtype in a run in ``dtype``: the wider of ``dtype`` and
    the module's parameters' (a float64 buffer of a float32 model stays float64; a float64 model run in float32
    on request casts its float64 buffers with its parameters)."""
    floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
    return max([dtype] + floats, key=lambda d: torch.finfo(d).bits)


def module_to(module: nn.Module, device: torch.device, dtype: torch.dtype, keep_above: torch.dtype | None = None
              ) -> nn.Module:
    """``module.to(device=device, dtype=dtype)`` that keeps complex tensors complex: ``nn.Module.to``
    casts a complex buffer to the real ``dtype`` and drops its imaginary part (a model computing
    ``(fc(x) * phase * phase.conj()).real`` then computed another function).  Floating-point tensors
    take ``dtype``, complex ones the complex dtype of its precision, others only move; a floating-point
    buffer of more precision than ``keep_above`` (:func:`_kept_above`), when given, keeps its own (a float64
    offset of 1e8 + 0.37 in a float32 model, cast, made L(w*) 0.146 against the user's 0.0095: another
    function)."""
    cdtype = _COMPLEX_OF.get(dtype)
    wide = set() if keep_above is None else {id(b) for b in module.buffers() if _wider(b, keep_above)}

    def cast(t: Tensor) -> Tensor:
        if t.is_floating_point() and id(t) not in wide:
            return t.to(device=device, dtype=dtype)
        if t.is_complex() and cdtype is not None:
            return t.to(device=device, dtype=cdtype)
        return t.to(device=device)

    return module._apply(cast)


def checkpoint_modules(model: Any, models: Sequence[Any] | None = None,
                       state_dicts: Sequence[Mapping[str, Tensor]] | None = None) -> list[nn.Module]:
    """Each checkpoint as a module holding all of its state: a module as given, a state dict loaded
    into a copy of the template (entries it lacks keep the template's)."""
    template, ckpts, _ = _checkpoints(model, models, state_dicts)
    out = []
    for ck in ckpts:
        if isinstance(ck, nn.Module):
            out.append(ck)
        else:
            m = copy_module(template)
            m.load_state_dict(ck, strict=False)
            out.append(m)
    return out


def _checkpoint_list(
    model: Any, models: Sequence[Any] | None, state_dicts: Sequence[Mapping[str, Tensor]] | None
) -> tuple[nn.Module, list[Mapping[str, Tensor] | nn.Module], bool]:
    if models is not None and state_dicts is not None:
        raise ValueError("pass either models=[...] or state_dicts=[...], not both")
    _check_checkpoint_lists(models, state_dicts)
    if isinstance(model, (list, tuple)):
        if models is not None or state_dicts is not None:
            other = "models" if models is not None else "state_dicts"
            raise ValueError(f"pass the checkpoints either as model=[...] or {other}=[...], not both (with "
                             "state_dicts, model is the template module)")
        models, model = model, None
    if models is not None:
        models = [_loaded(m, k) for k, m in enumerate(models)]
        if not models:
            raise ValueError("models is empty: no checkpoint to estimate")
        if all(isinstance(m, nn.Module) for m in models):
            template = model if isinstance(model, nn.Module) else models[0]
            return template, models, True
        if all(isinstance(m, Mapping) for m in models):
            state_dicts, models = models, None
        else:
            raise TypeError("models must be a list of nn.Module, or of state dicts or files holding them")
    if state_dicts is not None:
        state_dicts = [_loaded(sd, k) for k, sd in enumerate(state_dicts)]
        bad = [(k, type(sd).__name__) for k, sd in enumerate(state_dicts) if not isinstance(sd, (Mapping, nn.Module))]
        if bad:
            raise TypeError(f"state_dicts must hold mappings name -> tensor (or paths of files holding them); "
                            f"checkpoint {bad[0][0]} is a {bad[0][1]}")
        if not isinstance(model, nn.Module):
            raise ValueError("state dicts need a template module: estimate_llc(model, data, ..., state_dicts=[...])")
        if not state_dicts:
            raise ValueError("state_dicts is empty: no checkpoint to estimate")
        return model, state_dicts, True
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model, [model], False


def _flat_checkpoint(spec: ParamSpec, ck: Any, k: int, K: int) -> Tensor:
    """Checkpoint ``k``'s sampled parameters, flat ``(d,)``; a shape or key error names the checkpoint when
    the call has several ("parameter '2.weight' has shape (16, 17) in the checkpoint" did not say which)."""
    try:
        return spec.flatten_module(ck) if isinstance(ck, nn.Module) else spec.flatten_mapping(ck)
    except (ValueError, KeyError) as e:
        if K == 1:
            raise
        raise type(e)(f"checkpoint {k}: {e.args[0] if e.args else e}") from e


def _seeds(seed: int | Sequence[int], K: int) -> list[int]:
    """The seed of each of ``K`` checkpoints: ``seed + k``, or the ``K`` seeds given (Python or NumPy integers,
    0-d integer tensors), each of magnitude below 2⁶² (the streams derived from it stay within 64 bits)."""
    def one(name: str, s: Any) -> int:
        if isinstance(s, Tensor) and s.ndim == 0 and not s.is_floating_point():
            s = int(s)
        value = check_int(name, s)
        if abs(value) >= 1 << 62:
            raise ValueError(f"{name} must be an integer of magnitude below 2**62, got {value}")
        return value

    if isinstance(seed, (numbers.Integral, str, bytes)) or not hasattr(seed, "__iter__") or (
            isinstance(seed, Tensor) and seed.ndim == 0):
        base = one("seed", seed)
        return [base + k for k in range(K)]
    seeds = [one("seed[i]", s) for s in seed]
    if len(seeds) != K:
        raise ValueError(f"got {len(seeds)} seeds for {K} checkpoints")
    return seeds


# ----------------------------------------------------------------------------
# train-mode notes
# ----------------------------------------------------------------------------
def _dropout_rate_attrs(module: nn.Module) -> list[str]:
    """Float attributes of a module that name a positive drop rate (``attention_dropout``,
    ``dropout``, ``drop_path_rate``, ``resid_pdrop``, ...): functional dropout in ``forward``."""
    out = []
    for k, v in vars(module).items():
        if k.startswith("_") or isinstance(v, bool) or not isinstance(v, (float, int)):
            continue
        if "drop" in k.lower() and 0 < float(v) <= 1:
            out.append(k)
    return out


def _module_label(name: str, m: nn.Module) -> str:
    """A module's name in a set-up note, with its class where the name is only indices (a Sequential's ``0``,
    ``1.2``)."""
    return f"{name} ({type(m).__name__})" if name.replace(".", "").isdigit() else name


def train_mode_issues(model: nn.Module) -> list[str]:
    """Notes on modules whose training mode makes the loss random or batch-dependent.

    * dropout active: an ``nn.Dropout*`` (any ``_DropoutNd``, ``AlphaDropout``) with ``p > 0``,
      or a module (Hugging Face attention, ``nn.MultiheadAttention``) with a positive ``*drop*``
      rate attribute, in training mode;
    * BatchNorm in training mode (a sample's output depends on its batch);
    * another norm with running statistics (``InstanceNorm*d(track_running_stats=True)``) in training mode:
      it normalises each sample by its own statistics, but writes the running ones at every forward (and
      eval mode uses those instead), so vmap cannot batch it.

    Returns a list of messages naming the modules and the fix (empty when there is none); a message about
    norms is recognised by :func:`is_norm_train_issue`."""
    dropout: list[str] = []
    norms: list[str] = []
    running: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if not m.training:
            continue
        label = _module_label(name, m)
        if isinstance(m, nn.modules.dropout._DropoutNd):
            if float(m.p) > 0:
                dropout.append(label)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            norms.append(label)
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            running.setdefault(type(m).__name__, []).append(label)
        elif rates := _dropout_rate_attrs(m):
            dropout.append(f"{name or '<model>'} ({', '.join(rates)})")
    issues = []
    if dropout:
        issues.append(
            f"dropout active in {_names(dropout)}: call model.eval() (dropout makes the loss random, so λ̂ is "
            "biased and vmap falls back to a loop)"
        )
    if norms:
        issues.append(f"BatchNorm in train mode in {_names(norms)}: call model.eval() to use the batched path")
    if running:
        kinds = " / ".join(sorted(running))
        labels = [label for group in running.values() for label in group]
        issues.append(f"{kinds} with running statistics in train mode in {_names(labels)}: it writes them at every "
                      "forward (each sample is still normalised by its own statistics); call model.eval() to use "
                      "the batched path (eval mode normalises by the running statistics instead)")
    return issues


def is_norm_train_issue(issue: str) -> bool:
    """Whether a note of :func:`train_mode_issues` is about a norm layer in training mode (BatchNorm, or
    another norm with running statistics)."""
    head = issue.split(" in train mode", 1)[0]
    return " in train mode" in issue and (head == "BatchNorm" or head.endswith("with running statistics"))


def batch_statistics_issue(model: nn.Module) -> str | None:
    """A note when a BatchNorm module normalises by the statistics of the batch it is given even in eval
    mode (``track_running_stats=False``, or running statistics removed): a sample's output then depends on
    the other samples of its minibatch, so a minibatch's loss is not an unbiased estimate of
    :math:`L_n(w)` (a full-batch forward), the chains sample another potential, and λ̂ depends on the
    batch size.  (In training mode :func:`train_mode_issues` names it.)  ``None`` when there is none."""
    mods = [_module_label(name, m) or "<model>" for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training
            and (not m.track_running_stats or m.running_mean is None)]
    if not mods:
        return None
    verb = "normalises" if len(mods) == 1 else "normalise"
    return (f"{_names(mods)} {verb} by each batch's statistics even in eval mode (BatchNorm without running "
            "statistics): a sample's output depends on the other samples of its minibatch, so a minibatch's loss "
            "is not an unbiased estimate of L_n and λ̂ depends on the batch size; pass batch_size=None (full batch: "
            "L_n itself), or give the model running statistics (track_running_stats=True, trained, then eval())")


def use_cache_note(model: nn.Module, adapter: LossAdapter, probe: Batch) -> str | None:
    """A note when the loss of a model that takes ``use_cache`` (Hugging Face) differs between the call slt makes,
    with ``use_cache=False`` (a loss needs no key/value cache), and the model's own default on the first samples:
    in transformers 5, packed sequences (``position_ids`` restarting, no attention mask) are told apart only
    without a cache object, so the two calls are different networks (documents isolated or not: 2.993 against
    2.984 untrained, 0.709 against 5.03 trained).  ``None`` when they agree or the inputs set ``use_cache``."""
    from .evaluator import _first_rows, _takes_use_cache, call_module, module_aliases, own_tensors

    x, y = _first_rows(probe, 2)
    if not isinstance(x, Mapping) or "use_cache" in x or not _takes_use_cache(type(model)):
        return None
    try:
        with torch.no_grad():
            ours = adapter.loss_fn(call_module(model, own_tensors(model), x, module_aliases(model)), y)
            theirs = adapter.loss_fn(model(**x), y)
    except Exception:  # noqa: BLE001 - the model's default call is not this check's business
        return None
    if not (isinstance(ours, Tensor) and isinstance(theirs, Tensor)) or ours.shape != theirs.shape:
        return None
    scale = float(theirs.detach().abs().max()) + 1e-12
    if float((ours.detach() - theirs.detach()).abs().max()) <= 1e-5 * scale:  # (float32 rounding: ~1e-7)
        return None
    return (f"the model's loss differs between slt's call, with use_cache=False ({float(ours):.6g} on the first "
            f"samples), and its default call ({float(theirs):.6g}): the model computes another function without a "
            "key/value cache (packed sequences, position_ids restarting without an attention mask, are told apart "
            "only then in transformers 5), and slt samples the use_cache=False one; to sample the other, give the "
            "documents an attention mask (or a use_cache entry in the inputs)")


def random_forward_issue(model: nn.Module, probe: Batch, loss_fn: Callable | None = None) -> str | None:
    """A note when two forward passes on the same inputs differ although no dropout module is active
    (``F.dropout(x, p, training=True)``, noise drawn in ``forward``), or two evaluations of ``loss_fn``
    on the same output differ (a sampled softmax, negative sampling): the loss is then a random
    function of w, so the draws scatter below L(w*) and λ̂ means nothing.  The global random state is
    left as it was.  ``None`` when both are deterministic (or cannot be run twice)."""
    from .evaluator import call_module, module_aliases, own_tensors
    from .losses import _flatten

    x = _map(lambda t: t[:2], probe.x)
    y = x if probe.y is probe.x else _map(lambda t: t[:2], probe.y)
    aliases = module_aliases(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    outs, losses = [], []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for _ in range(2):
                out = call_module(model, own_tensors(model, params), x, aliases)
                outs.append([t for t in _flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()])
            if loss_fn is not None:
                losses = [loss_fn(out, y) for _ in range(2)]
    except Exception:  # noqa: BLE001 - validate_model_and_loss has reported what matters
        return None

    def same(a: Tensor, b: Tensor) -> bool:  # up to rounding (non-deterministic GPU kernels reorder sums)
        scale = float(a.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if a.numel() else 0.0
        return a.shape == b.shape and bool(torch.isclose(a, b, rtol=1e-4, atol=1e-5 * scale, equal_nan=True).all())

    if not all(same(a, b) for a, b in zip(*outs)):
        return ("the model's output is random (two forward passes on the same inputs differ, with no dropout module "
                "active: F.dropout(..., training=True) or noise drawn in forward?): the loss is then a random "
                "function of w, so λ̂ is meaningless (the draws fall below L(w*)) and vmap falls back to a loop; "
                "make forward deterministic when model.training is False, then call model.eval()")
    if len(losses) == 2 and all(isinstance(v, Tensor) for v in losses) and not same(losses[0], losses[1]):
        return ("the loss is random (two evaluations of loss_fn on the same model output differ: a sampled softmax, "
                "negative sampling or noise in the loss?): λ̂ is then meaningless (the draws fall below L(w*)); "
                "make loss_fn deterministic (e.g. fixed negatives, or the full softmax)")
    return None


@dataclass(frozen=True)
class PerRowFailure:
    """How the vmap path failed on a model when each chain had its own inputs, while it worked on inputs
    shared by the chains (a forward that branches on its input values, ``if (x > c).any()``, where vmap
    maps the inputs): ``error`` (type and first line), the fix ``hint`` (:func:`_fallback_hint`), whether
    the path was ``explicit`` (``vectorize="vmap"``: an error then, not a fallback) and the ``caller``."""

    error: str
    hint: str
    explicit: bool
    caller: str


def _with_eager_attention(evaluator: ChainEvaluator, model: nn.Module, call: Callable[[], Any]) -> str:
    """Run ``call`` (a probe of ``evaluator``); where it fails on the vmap path because Hugging Face
    attention branches on the attention mask, run it again with the model's attention configs as
    ``"eager"`` (the same maths; kept in ``evaluator.hf_eager``).  Returns what to add to the path's reason
    ('' without the retry); a failure of the retry raises the first error."""
    try:
        call()
        return ""
    except Exception as e:  # noqa: BLE001 - Hugging Face sdpa attention: retried as eager (same maths)
        configs = hf_attention_configs(model) if evaluator.path == "vmap" else []
        if not (configs and "data-dependent control flow" in str(e)):
            raise
        evaluator.hf_eager = configs
        try:
            call()
        except Exception:  # noqa: BLE001 - not the attention: report the first failure
            evaluator.hf_eager = []
            raise e from None
    impls = sorted({str(c._attn_implementation) for c in configs})
    return (f"; Hugging Face attention {', '.join(map(repr, impls))} run as 'eager' under vmap (the same "
            "attention; the other branches on the attention mask, which vmap cannot batch over chains)")


def _random_operation_issue(e: Exception, issues: Sequence[str]) -> str | None:
    """The issue that the model or ``loss_fn`` draws random numbers, when vmap refused a random operation and
    no issue names the randomness yet (:func:`random_forward_issue` compares two forward passes, which agree
    by chance for a rare draw: stochastic depth at p = 0.05 was caught in 9 of 50 set-ups and read λ̂ 5.4–5.6
    against 4.6 without it, converged)."""
    if "randomness" not in str(e) or any(i.startswith(RANDOM_ISSUES) for i in issues):
        return None
    return ("the model or loss_fn draws random numbers (vmap refused a random operation: torch.rand, randn, "
            "bernoulli, F.dropout(..., training=True), ...); two forward passes on the probe agreed, but a forward "
            "or loss that is random makes the loss a random function of w, so λ̂ is meaningless: make them "
            "deterministic when model.training is False, then call model.eval()")


def _fallback_hint(e: Exception, model: nn.Module, issues: list[str], eager_tried: bool = False) -> str:
    """What to do about a vmap failure, when the cause is recognisable (``eager_tried``: the vmap path
    was retried with Hugging Face attention run as ``"eager"`` and failed again)."""
    msg = str(e)
    if "Expected dtype int32/int64 for index" in msg:  # (cross_entropy takes uint8 labels outside vmap only)
        return (" — an index is neither int64 nor int32, usually a classification loss's labels (uint8 from an "
                "image dataset): pass y.long() to use the batched path")
    if "is_contiguous inside of vmap for memory_format" in msg:
        return (" — a tensor is in a memory format other than contiguous (channels_last inputs or weights), which "
                "vmap cannot query: pass X.contiguous() (and model.to(memory_format=torch.contiguous_format)) to use "
                "the batched path")
    if "random" in msg and any(i.startswith("dropout") for i in issues):
        return " — dropout is active: call model.eval()"
    if "random" in msg and any(i.startswith("the model's output is random") for i in issues):
        return " — the model draws random numbers in forward: make it deterministic in eval mode"
    if "random" in msg and any(i.startswith("the loss is random") for i in issues):
        return " — loss_fn draws random numbers: make it deterministic"
    if "random" in msg and any(i.startswith("the model or loss_fn draws random") for i in issues):
        return " — the model or loss_fn draws random numbers: make them deterministic in eval mode"
    if norm := next((i for i in issues if is_norm_train_issue(i)), None):
        return f" — {norm.split(' in train mode', 1)[0]} in train mode: call model.eval() to use the batched path"
    # Hugging Face's enable_input_require_grads() (which gradient_checkpointing_enable() calls too) hooks the input
    # embeddings to call requires_grad_() on their output: vmap refuses it, with or without checkpointing
    if any(getattr(m, "_require_grads_hooks", None) or getattr(m, "_require_grads_hook", None)
           for m in model.modules()):
        return (" — Hugging Face's enable_input_require_grads() hook is on the input embeddings (gradient_checkpointing"
                "_enable() adds it): it calls requires_grad_() on their output, which vmap cannot batch over chains; "
                "call model.disable_input_require_grads() to use the batched path (the parameters' gradients are the "
                "same)")
    # transformers 5 renamed the flag and warns on the old name: read the old one only where the new is absent
    flag = ("is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing")
            else "is_gradient_checkpointing")
    if getattr(model, flag, False) and model.training:  # (Hugging Face checkpoints only in train mode)
        disable = ("activation_checkpointing_disable" if hasattr(model, "activation_checkpointing_disable")
                   else "gradient_checkpointing_disable")
        return (" — Hugging Face gradient checkpointing is on: it recomputes activations during backward, which "
                f"vmap cannot batch over chains; call model.{disable}() to use the batched path (it saves "
                "memory, the gradients are the same)")
    # torch 2.3's non-reentrant checkpoint saves its inputs through _NoopSaveInputs, which has no vmap rule
    if type(e).__name__ == "CheckpointError" or "torch.utils.checkpoint" in msg or "_NoopSaveInputs" in msg:
        return (" — the model recomputes part of its forward during backward (activation checkpointing, "
                "torch.utils.checkpoint), which runs outside vmap; the loop recomputes it at each chain's "
                "parameters (same gradients, one chain at a time)")
    reads_data = "accessing `data` under vmap" in msg
    # on torch 2.3 a PackedSequence fails earlier, where the module reads its .data
    if any(f"aten::{op}" in msg for op in ("lstm", "gru", "rnn_tanh", "rnn_relu")) or (
            reads_data and any(isinstance(m, nn.RNNBase) for m in model.modules())):
        return (" — a recurrent layer on packed sequences (nn.utils.rnn.PackedSequence) runs PyTorch's fused "
                "kernel, which vmap cannot batch over chains (slt batches nn.LSTM/GRU/RNN on padded tensors): "
                "pass padded sequences and read each one's output at its last valid step to use the batched path")
    sparse = [n for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    if sparse and "sparse" in msg:
        return (f" — {_names(sparse, 3)}: an embedding with sparse=True gives sparse gradients, which vmap cannot batch; set "
                "its .sparse = False (the same values and gradients, dense) to use the batched path")
    if reads_data:
        return (" — the model reads a tensor's .data in forward, which vmap cannot batch over chains: use the "
                "tensor itself (or .detach()) to use the batched path")
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if "data-dependent control flow" in msg:
        if eager_tried:
            return (f" — retried with Hugging Face attention {attn!r} run as 'eager': the model still branches on "
                    "tensor values (e.g. an encoder's mask creation checks the attention mask for padding), which "
                    "vmap cannot batch over chains")
        if attn not in (None, "eager"):
            return (f" — Hugging Face attention {attn!r} branches on the attention mask, which vmap cannot "
                    "batch over chains: load the model with attn_implementation=\"eager\" "
                    "(or model.set_attn_implementation(\"eager\")) to use the batched path")
        return " — the model branches on tensor values (data-dependent control flow), which vmap cannot batch"
    if ".item()" in msg or "tolist" in msg or "_local_scalar_dense" in msg:
        return (" — the model reads a tensor's value as a Python number in forward (.item(), int(t), float(t), "
                ".tolist(); pack_padded_sequence reads its lengths so), which vmap cannot batch over chains: keep it "
                "a tensor (torch.where instead of if, padded sequences instead of packed) to use the batched path")
    return ""


def _evaluator(
    model: nn.Module, spec: ParamSpec, adapter: LossAdapter, vectorize: str, rows: Tensor, probe: Batch, caller: str,
    structured: bool = False, issues: Sequence[str] = (), per_chain_probe: bool = False,
    autocast: torch.dtype | None = None,
) -> tuple[ChainEvaluator, str]:
    """The evaluator on the chosen path; with ``vectorize="auto"`` a path that fails on a
    probe (shared by the chains, and for vmap also one batch per chain) falls back to a loop
    over chains, with a warning naming the error and, when recognisable, the fix."""
    path = choose_path(model, vectorize)
    evaluator = ChainEvaluator(model, spec, adapter, path, structured=structured, autocast=autocast)
    reason = PATH_REASONS[path]
    if evaluator.analytic:
        reason += " and a hand-written gradient for this loss (loss_and_grad_chains)"
    def probe_path() -> None:
        evaluator.loss_and_grad(rows, probe)
        if path == "vmap" and per_chain_probe:  # minibatches differ per chain: vmap maps the inputs too
            evaluator.loss_and_grad(rows, probe.per_chain(rows.shape[0]))

    try:
        reason += _with_eager_attention(evaluator, model, probe_path)
    except Exception as e:  # noqa: BLE001 - decide the fallback
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        # (the retry with eager attention ran exactly where this holds: _with_eager_attention)
        eager_tried = path == "vmap" and "data-dependent control flow" in str(e) and bool(hf_attention_configs(model))
        random = _random_operation_issue(e, issues)
        if random and isinstance(issues, list):
            issues.append(random)
            warnings.warn(f"{caller}: {random}", RuntimeWarning, stacklevel=user_stacklevel())
        hint = _fallback_hint(e, model, list(issues), eager_tried)
        if path == "vmap" and per_chain_probe:
            try:  # vmap may work where the chains share their inputs (a full batch, a DataLoader): the loop is
                # then needed only for a minibatch per chain, decided when a run's batches are known (Target.batches)
                reason += _with_eager_attention(evaluator, model, lambda: evaluator.loss_and_grad(rows, probe))
                evaluator.per_row_failure = PerRowFailure(f"{type(e).__name__}: {msg}", hint, vectorize != "auto",
                                                          caller)
                return evaluator, reason
            except Exception:  # noqa: BLE001 - the shared inputs fail too: the fallback below
                pass
        if path == "loop" or isinstance(e, MemoryError) or out_of_memory(e):  # (memory errors name their own fix)
            raise
        if vectorize != "auto":  # the path was asked for: its error, with what it means and the way out
            raise RuntimeError(f"{caller}: vectorize={vectorize!r}: the {path} path failed on this model "
                               f"({type(e).__name__}: {msg}){hint}; pass vectorize='auto' (it falls back to a loop "
                               "over chains) or 'loop'") from e
        warnings.warn(
            f"{caller}: the {path} path failed on this model ({type(e).__name__}: {msg}){hint}; "
            "falling back to a sequential loop over chains (slower).",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        reason = f"fallback: {reason} failed with {type(e).__name__}: {msg}"  # the fix: in the warning and issues
        evaluator = ChainEvaluator(model, spec, adapter, "loop", structured=structured, autocast=autocast)
    return evaluator, reason


@autograd_allowed
def require_one_dataset(target: Target, caller: str) -> None:
    """``ValueError`` when ``data`` was a mapping of distributions (:func:`prepare_target` concatenates them into
    one source): for callers that sample one posterior, where that union would be read silently as the data."""
    if target.groups.D > 1:
        raise ValueError(f"{caller}: data must be one data set; a mapping of data sets {target.groups.data_labels} is "
                         "sampled as one posterior per distribution only by slt.estimate_llc (data-refined LLCs): call "
                         f"{caller} once per distribution, data=data[label]")


def prepare_target(
    model: nn.Module | Sequence[nn.Module] | None,
    data: Any,
    loss_fn: LossFn | None = None,
    *,
    models: Sequence[nn.Module | Mapping[str, Tensor]] | None = None,
    state_dicts: Sequence[Mapping[str, Tensor]] | None = None,
    nbeta: float | Callable[[int], float] | None = None,
    localization: float | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    vectorize: str = "auto",
    seed: int | Sequence[int] = 0,
    full_data: bool = False,
    caller: str = "slt.estimate_llc",
    restrict_to: Any = None,
    autocast: Any = None,
    checkpoint_state: bool = False,
) -> Target:
    r"""Prepare ``(model, data, loss)`` and the checkpoints ``w*`` for sampling.

    Steps: resolve the checkpoints (``model``, ``models=[...]`` or a template with
    ``state_dicts=[...]``); copy the module to ``device``/``dtype`` when needed
    (never modifying the user's); flatten the sampled parameters of every
    checkpoint into ``w_star (K, d)``; convert the data (:func:`slt.data.as_source`;
    ``full_data=True`` stacks a DataLoader into tensors); run the model and the
    loss on a few samples and fail with a message naming the problem; choose the
    computation path (:mod:`slt.evaluator`), falling back from ``vmap`` to a loop
    with a warning when ``vectorize="auto"``; resolve nβ and γ.

    Parameters
    ----------
    model, data, loss_fn, models, state_dicts
        As for :func:`slt.estimate_llc`.
    nbeta
        nβ; ``None``: :func:`slt.default_nbeta` (n / log n); a callable: ``nbeta(n)``.
    localization
        γ; ``None``: :func:`slt.default_localization`.
    device, dtype, vectorize
        As for :func:`slt.estimate_llc`.
    seed
        ``int``: checkpoint ``k`` gets ``seed + k``; or one seed per checkpoint.
    full_data
        Stack a DataLoader into tensors (estimators that need the full batch).
    caller
        Named in warnings.
    restrict_to
        Weight restriction(s) (:func:`slt.restrict.resolve_restrictions`): a glob, a module or parameter,
        a list of those, a callable, per-parameter masks, or ``{label: restriction}``; ``None``: every sampled
        parameter.  ``data`` may be ``{label: dataset}`` (data-refined LLC, :mod:`slt.groups`).
    autocast
        ``None`` (default), ``"bf16"`` or ``"fp16"``: the model's forward (and its backward) run
        under ``torch.autocast`` in that precision — mixed precision for large models on a GPU.
        Its outputs are cast back to ``dtype`` before the loss, and the parameters, gradients,
        sampler, losses at w* (the control variate: same precision at both points) stay in
        ``dtype``.  Chains then run in a loop (``vectorize="auto"`` or ``"loop"``; ``"vmap"`` is
        refused: under ``torch.vmap`` autocast misses some ops, e.g. a linear layer with a bias).
        Rounding adds noise of relative size ~2⁻⁸ (bf16) to each loss, so check λ̂ against a
        full-precision run of the same job before relying on it.  On a CPU it is correct but
        rarely faster.
    checkpoint_state
        Checkpoints whose buffers or frozen parameters differ (a BatchNorm network's running
        statistics saved during training): ``True`` gives every row its checkpoint's own
        (:attr:`slt.evaluator.ChainEvaluator.checkpoint_tensors`; the vmap and loop paths, for
        the estimators built on :func:`slt.engine.sample_target`); ``False`` (default) refuses them.

    Returns
    -------
    Target

    Raises
    ------
    ValueError, TypeError
        Bad model, checkpoints, data, loss or dtype (before any sampling).
    """
    template, ckpts, is_batch = _checkpoints(model, models, state_dicts, caller)
    differ = _state_differences(template, ckpts) if is_batch else []
    if differ and not (checkpoint_state and _state_batchable(template, differ)):
        raise ValueError(
            f"the checkpoints differ in buffers or frozen parameters ({_names(differ)}), which this computation "
            "would take from a single template (slt.estimate_llc and slt.bif give each chain its checkpoint's own; "
            "with forward_chains or a sparse buffer that differs, estimate_llc runs them one at a time): pass one "
            "checkpoint per call")
    dtype, dtype_note = resolve_dtype(dtype, template)
    half = resolve_autocast(autocast)
    if half is not None and vectorize in ("vmap", "compile"):
        raise ValueError("autocast runs the model in a loop over chains: torch.vmap does not apply autocast to "
                         "every op (a linear layer with a bias stays in float32 under vmap in torch 2.x); pass "
                         "vectorize='auto' or 'loop'")
    if half is not None and vectorize == "auto" and not hasattr(template, "forward_chains"):
        vectorize = "loop"
    if loss_fn is None:  # the model's own: a default_loss, else the loss in its output (model_loss)
        loss_fn = getattr(template, "default_loss", None) or model_loss
    dev = resolve_device(device)
    seeds = _seeds(seed, len(ckpts))

    # model and checkpoints
    spec = ParamSpec(template)
    work_model = template
    keep_above = _kept_above(template, dtype)
    if any(t.device != dev or (t.is_floating_point() and t.dtype != dtype) for t in template.parameters()) or any(
            t.device != dev or (t.is_floating_point() and t.dtype != dtype and not _wider(t, keep_above))
            for t in template.buffers()):
        work_model = module_to(copy_module(template), dev, dtype, keep_above)
    rows = [_flat_checkpoint(spec, ck, k, len(ckpts)).to(device=dev, dtype=dtype) for k, ck in enumerate(ckpts)]
    w_star = torch.stack(rows)  # (K, d)
    if not torch.isfinite(w_star).all():
        bad = [f"checkpoint {k}: {name!r}" for k in range(w_star.shape[0])
               for name, v in spec.unflatten(w_star[k]).items() if not torch.isfinite(v).all()]
        raise ValueError(f"the checkpoint parameters contain NaN or inf ({_names(bad)})")
    frozen_bad = [n for n, p in work_model.named_parameters()
                  if not p.requires_grad and p.is_floating_point() and not torch.isfinite(p).all()]
    if frozen_bad:
        raise ValueError(f"the model's frozen parameters contain NaN or inf ({_names(frozen_bad)})")
    issues = train_mode_issues(work_model)
    if issues:
        warnings.warn(f"{caller}: " + "; ".join(issues), RuntimeWarning, stacklevel=user_stacklevel())
    modes = _mode_differences(template, ckpts)
    _refuse_frozen_differences(template, ckpts)

    # data (a mapping {label: dataset}: one distribution per label, concatenated into one source)
    split = split_data(data)
    parts = offsets = None
    if split is not None:
        data, parts, offsets = concat_data(split[1])
        if (nbeta is None or callable(nbeta)) and len({p.support for p in parts}) > 1:
            raise ValueError(
                f"the distributions of data have different sizes {[p.support for p in parts]}: pass nbeta explicitly, as a "
                "number (one nβ for all, so that their refined LLCs are comparable)")
    source = as_source(data)
    notes: list[str] = [] if dtype_note is None else [dtype_note]

    def warned(note: str | None) -> None:  # a setup note the user is also warned of
        if note:
            notes.append(note)
            warnings.warn(f"{caller}: {note}", RuntimeWarning, stacklevel=user_stacklevel())

    if isinstance(source, LoaderSource) and random_items(source.loader.dataset):
        if full_data:
            warned("the DataLoader's dataset items are random (two reads of item 0 differ: augmentation in "
                   "__getitem__?): its data were read once, so the run samples the loss of that one draw of them; "
                   "to measure on fixed data, pass the dataset without its random transforms")
        else:
            issues.append("the data are random: two reads of the DataLoader's dataset item 0 differ (augmentation in "
                          "__getitem__?), so each batch's loss is a random function of w and λ̂ measures the "
                          "augmentation's noise as well; measure on fixed data: pass the dataset without its random "
                          "transforms")
            warnings.warn(f"{caller}: {issues[-1]}", RuntimeWarning, stacklevel=user_stacklevel())
    if isinstance(source, LoaderSource) and full_data:  # every sample once, in the dataset's order
        source, order, _ = source.in_memory()
        notes += [order] if order else []
    warned(modes)
    if isinstance(source, LoaderSource) and source.never_read:
        warned(f"the DataLoader drops its last batch (drop_last=True) and does not shuffle: its last "
               f"{source.never_read} samples never enter the run (the chains sample the loss of the others), "
               f"while n = {source.n} and L(w*) count them; pass drop_last=False (or shuffle=True)")
    if isinstance(source, LoaderSource) and source.unseeded_shuffle:
        warned("the DataLoader shuffles with PyTorch's global random state (its sampler has no generator), "
               "so runs with the same seed see different batches and differ: to make a run repeatable, build the "
               "loader for it with DataLoader(..., generator=torch.Generator().manual_seed(s))")
    if isinstance(source, Data):
        source = source.to(dev, dtype)
        warned(_empty_sequences(loss_fn, source))
    if isinstance(source, LoaderSource) and source.n is None and (nbeta is None or callable(nbeta)):
        notes.append(f"the DataLoader's dataset has no length (an IterableDataset): n = {source.count()} samples, "
                     "counted in one pass over it (the default nβ and the loss at w* need n)")
    n = source.n if parts is None else parts[0].support
    if parts is None and isinstance(source, Data) and source.support < source.n:
        n = source.support
        notes.append(f"n = {n}: the rows of positive weight ({source.n - n} of the {source.n} rows have weight 0, are "
                     "never drawn and count in no mean)")
    if isinstance(loss_fn, nn.Module) and any(
            t.is_floating_point() and (t.dtype != dtype or t.device != dev)
            for t in list(loss_fn.parameters()) + list(loss_fn.buffers())):
        # a loss module's tensors (CrossEntropyLoss's class weights) follow the run, like the model's copy
        loss_fn = module_to(copy.deepcopy(loss_fn), dev, dtype)
    adapter = LossAdapter(loss_fn)
    probe = probe_batch(source, 64, dev, dtype)
    try:
        out = validate_model_and_loss(work_model, adapter, probe)
    except ValueError as e:
        # the first rows' loss is 0/0 where every target there is ignored (data sorted or padded: labels -100):
        # rows spread over the data decide
        if not (str(e).startswith("the loss at w* is NaN") and isinstance(source, Data) and source.n > 64):
            raise
        spread = _rows_of(source, torch.linspace(0, source.n - 1, 64).round().long().unique()).full_batch()
        out = validate_model_and_loss(work_model, adapter, spread)
        probe = spread
    random = None if any(i.startswith("dropout") for i in issues) else random_forward_issue(
        work_model, probe, adapter.loss_fn)
    if random:
        issues.append(random)
        warnings.warn(f"{caller}: {random}", RuntimeWarning, stacklevel=user_stacklevel())
    if not any(i.startswith(RANDOM_ISSUES) for i in issues):  # (two random forwards differ anyway)
        warned(use_cache_note(work_model, adapter, probe))
    unused = check_gradients_reach(work_model, spec, adapter, probe, w_star[0],
                                   original=template if template is not work_model else None)
    notes += [unused] if unused else []
    # (not under autocast, whose rounding swamps the differences, nor for a random loss)
    if half is None and not any(i.startswith(RANDOM_ISSUES) for i in issues):
        mismatch = gradient_mismatch_issue(work_model, spec, adapter, probe, w_star[0])
        if mismatch:
            issues.append(mismatch)
            warnings.warn(f"{caller}: {mismatch}", RuntimeWarning, stacklevel=user_stacklevel())

    structured = not (isinstance(probe.x, Tensor) and isinstance(probe.y, Tensor) and isinstance(out, Tensor))
    # chunks of the losses at w* are sized by the larger of input and output per sample (a language
    # model's logits are vocab times its token ids)
    from .losses import _flatten

    rows_probe = max(1, min(2, num_rows(probe.x)))
    out_size = sum(t.numel() for t in _flatten(out)[0] if isinstance(t, Tensor)) // rows_probe
    row_size = max(1, row_numel(probe.x), int(out_size))

    # nβ, γ, path
    if nbeta is None:
        nb = default_nbeta(int(n))
    else:
        nb = float(nbeta(int(n))) if callable(nbeta) else float(nbeta)
    gamma = float(localization) if localization is not None else default_localization()
    evaluator, reason = _evaluator(work_model, spec, adapter, vectorize, w_star[:1].repeat(2, 1),
                                   probe_batch(source, 8, dev, dtype), caller, structured, issues,
                                   per_chain_probe=isinstance(source, Data), autocast=half)
    if half is not None and evaluator.path == "loop":
        reason = f"autocast ({half}): a loop over chains (vmap does not apply autocast to every op)"
    if differ:  # each row evaluates with its checkpoint's buffers
        evaluator.checkpoint_tensors = _checkpoint_state(work_model, ckpts, differ, dev, dtype)
        notes.append(f"the checkpoints differ in buffers or frozen parameters ({_names(differ)}): each checkpoint's "
                     "chains run with its own")
    # (restrictions name the user's model: its modules and parameters, which the run's copy does not share)
    groups = _groups(restrict_to, template, spec, split, parts, offsets, dev, dtype)
    check_padding_rows(work_model, spec, adapter, probe, w_star[0], groups.masks)
    if groups.masks is not None:  # gradients only of the parameters some restriction moves
        evaluator.grad_names = set().union(*groups.moved_names(spec))
    target = Target(work_model, spec, adapter, evaluator, source, w_star, seeds, nb, gamma, n, dev, dtype, reason,
                    is_batch, issues=issues, notes=notes, _row_numel=row_size, groups=groups,
                    localization_auto=localization is None)
    if half is None and not any(i.startswith(RANDOM_ISSUES) for i in issues):
        _note_saturation(target, probe, caller)
    return target


def _note_saturation(target: Target, probe: Batch, caller: str) -> None:
    """Add :func:`slt.evaluator.saturation_issue` of the first checkpoint whose L_n(w*) over all the data is at most
    :data:`slt.evaluator.SATURATED_LOSS` to the target's issues (and warn): a probe of the first rows alone read a
    true minimum whose few hard samples came last as saturated (helper 36)."""
    init = target.init_loss
    for k in range(target.K):
        if not abs(float(init[k])) <= SATURATED_LOSS:
            continue
        saturated = saturation_issue(target.model, target.spec, target.adapter, probe, target.w_star[k])
        if saturated:
            saturated = (f"checkpoint {k}: " if target.K > 1 else "") + saturated
            target.issues.append(saturated)
            warnings.warn(f"{caller}: {saturated}", RuntimeWarning, stacklevel=user_stacklevel())
            return


def _groups(restrict_to: Any, model: nn.Module, spec: ParamSpec, split: Any, parts: Any, offsets: Any,
            dev: torch.device, dtype: torch.dtype) -> Groups:
    """The run's restrictions (masks from :func:`slt.restrict.resolve_restrictions`) and distributions."""
    labels = masks = None
    if restrict_to is not None:
        from .restrict import resolve_restrictions

        labels, masks = resolve_restrictions(restrict_to, model, spec)
        masks = masks.to(device=dev, dtype=dtype)
    return Groups(labels, masks, None if split is None else split[0],
                  None if parts is None else [p.to(dev, dtype) for p in parts], offsets)


#: :func:`fastest_path` replaces vmap by the loop only when the loop is measured this much faster ...
PATH_MARGIN = 1.10
#: ... and only when one vmap step costs at least this long (below it the choice saves little, and the
#: path of small models stays fixed, so their runs are reproducible bit for bit).
PATH_MIN_SECONDS = 5e-3
#: decisions of :func:`fastest_path` in this process, by model class, parameter shapes, rows, batch size,
#: device, dtype and data structure
_PATH_DECISIONS: dict[tuple, tuple[Any, str, float]] = {}


def _step_seconds(evaluator: ChainEvaluator, rows: Tensor, batch: Batch, repeats: int) -> float:
    """Fastest of ``repeats`` timed ``loss_and_grad`` calls after one warm-up call."""
    return _interleaved_seconds({0: evaluator}, rows, batch, repeats)[0]


def _interleaved_seconds(evaluators: Mapping[Any, ChainEvaluator], rows: Tensor, batch: Batch,
                         repeats: int) -> dict[Any, float]:
    """Fastest of ``repeats`` timed ``loss_and_grad`` calls of each evaluator after one warm-up call
    each, the candidates taking turns (a slow spell of a shared machine then hits all of them, not
    the one that happened to be timed during it)."""
    for ev in evaluators.values():
        ev.loss_and_grad(rows, batch)
    best = {k: float("inf") for k in evaluators}
    for _ in range(repeats):
        for k, ev in evaluators.items():
            t = time.perf_counter()
            _, g = ev.loss_and_grad(rows, batch)
            if g.is_cuda:
                torch.cuda.synchronize(g.device)
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def fastest_path(target: Target, rows: Tensor, batch_size: int | None, repeats: int = 3, *,
                 num_steps: int | None = None, shared: bool = False, compile: bool | None = None) -> Target:
    r"""Choose the computation of a run's gradient evaluations by timing the candidates: ``vmap``,
    the loop over chains, and ``torch.compile`` of the vmapped step (:mod:`slt.compiled`).

    On a CPU a loop of per-chain ``functional_call`` + autograd can beat ``vmap`` (measured 1.42×
    faster on a small BatchNorm CNN), so a fixed preference is wrong.  For a target on the vmap path
    with tensor data, time one ``loss_and_grad`` of all ``rows`` (``(R, d)``, the run's chains) on a
    batch of ``batch_size`` samples (per chain, as the run draws them; one batch for all rows when
    ``shared``) on each path (fastest of ``repeats`` after a warm-up; no random numbers are drawn)
    and keep the loop when it is :data:`PATH_MARGIN` times faster and a vmap step costs at least
    :data:`PATH_MIN_SECONDS`.  Then, when vmap stays and the run's ``num_steps`` evaluations would
    take at least :data:`slt.compiled.COMPILE_MIN_SECONDS` (or ``compile=True``: asked for), compile
    the vmapped step and keep it when it is :data:`PATH_MARGIN` times faster (``compile=True``: kept
    whenever it compiles); ``compile=False`` never tries.  One chain (one row, no restriction) runs
    the loop without timing: vmap of one row only adds dispatch.  Not for restricted (weight-refined) runs
    nor autocast.  Returns the target, its evaluator and ``path_reason`` updated (the timings are in
    the reason).  The decisions are remembered for the same kind of job (model class, parameter
    shapes, rows, batch size, device, dtype) for the rest of the process, so repeated runs with one
    seed agree bit for bit; across processes the path may differ (results then agree to float
    rounding): pass ``vectorize="vmap"``, ``"loop"`` or ``"compile"`` to pin it.
    """
    if target.path != "vmap" or not isinstance(target.source, Data):
        if compile:
            warnings.warn(f"vectorize='compile' needs the vmap path and tensor data (here: the {target.path} path, "
                          f"{type(target.source).__name__}): running uncompiled", RuntimeWarning,
                          stacklevel=user_stacklevel())
        return target
    if rows.shape[0] == 1 and not compile and target.groups.masks is None:
        # one chain: vmap over one row computes what the loop computes, plus its batching rules' dispatch
        # (a 10.2M-parameter DLN on an H200: 2.35 against 2.02 ms a step; a 0.16M one on a CPU: 2.85 against
        # 2.38), and with a short step the timing would keep vmap without measuring (PATH_MIN_SECONDS)
        target.evaluator = _like(target.evaluator, "loop")
        target.path_reason = "loop over chains: one chain (vmap of one row only adds its batching overhead)"
        return target
    key = (type(target.model).__qualname__, tuple(map(tuple, target.spec.shapes)), rows.shape[0], batch_size,
           str(target.device), target.dtype, target.evaluator.structured, shared,
           bool(target.evaluator.checkpoint_tensors))
    if not compile:
        if key not in _PATH_DECISIONS:  # once per kind of job in this process: repeated runs agree bit for bit
            if len(_PATH_DECISIONS) > 256:
                _PATH_DECISIONS.clear()
            _PATH_DECISIONS[key] = _measure_paths(target, rows, _probe_rows(target, rows.shape[0], batch_size, shared),
                                                  repeats)
        choice, timing, seconds = _PATH_DECISIONS[key]
        if choice == "loop":
            target.evaluator = _like(target.evaluator, "loop")
        elif choice is not None:  # vmap in blocks of rows
            target.evaluator.max_rows = int(choice)
        if timing:
            target.path_reason = (f"loop over chains: {timing}" if choice == "loop"
                                  else f"{target.path_reason}; {timing}")
        if choice == "loop" or compile is False or num_steps is None:
            return target
        if seconds * num_steps < COMPILE_MIN_SECONDS:
            return target
    why_not = ("weight-refined runs (restrictions)" if target.groups.masks is not None
               else "autocast" if target.evaluator.autocast is not None
               else "checkpoints that differ in buffers" if target.evaluator.checkpoint_tensors else None)
    if why_not is not None:
        if compile:
            warnings.warn(f"vectorize='compile' is not used for {why_not}: running uncompiled", RuntimeWarning,
                          stacklevel=user_stacklevel())
        return target
    return _compile_path(target, rows, _probe_rows(target, rows.shape[0], batch_size, shared), repeats, key,
                         bool(compile))


#: compile decisions of :func:`fastest_path` in this process (same key as :data:`_PATH_DECISIONS`):
#: ``(compiles, faster, reason)`` — whether the step compiled as one graph, whether it was measured
#: :data:`PATH_MARGIN` faster than the eager step, and the timings or the error
_COMPILE_DECISIONS: dict[tuple, tuple[bool, bool, str]] = {}


def _compile_path(target: Target, rows: Tensor, batch: Batch, repeats: int, key: tuple, asked: bool) -> Target:
    """Compile the target's vmapped step (:func:`slt.compiled.compile_step`) and keep it when asked
    or measured :data:`PATH_MARGIN` faster than the eager evaluator; a model that does not compile
    as one graph keeps the eager path, with the error in ``path_reason`` (and a warning when asked)."""
    ev = target.evaluator
    known = _COMPILE_DECISIONS.get(key)
    error = known[2] if known is not None and not known[0] else None
    if error is None and known is not None and not (asked or known[1]):  # measured slower before: no compiling
        target.path_reason = (f"{target.path_reason}; not compiled (torch.compile): {known[2]} "
                              "(measured earlier in this process)")
        return target
    if error is None:
        try:
            step, t_compile = compile_step(ev, rows, batch, VMAP_BLOCK_ROWS)
        except Exception as e:  # noqa: BLE001 - torch.compile's many failure types: keep the eager path
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            error = f"{type(e).__name__}: {msg[:300]}"
            _COMPILE_DECISIONS[key] = (False, False, error)
    if error is not None:
        if asked:
            warnings.warn(f"vectorize='compile': torch.compile could not compile this model as one graph "
                          f"({error}); running the uncompiled vmap path", RuntimeWarning, stacklevel=user_stacklevel())
        target.path_reason = f"{target.path_reason}; not compiled (torch.compile failed: {error})"
        return target
    if known is not None:  # measured before in this process: the same choice, without timing again
        faster = known[1]
        timing = f"{known[2]} (measured earlier in this process; this call compiled in {t_compile:.3g} s)"
    else:
        times = _interleaved_seconds({"eager": ev, "compiled": SimpleNamespace(loss_and_grad=step)},
                                     rows.contiguous(), batch, repeats)
        faster = times["compiled"] * PATH_MARGIN < times["eager"]
        timing = (f"{1e3 * times['compiled']:.3g} ms vs {1e3 * times['eager']:.3g} ms eager per step of "
                  f"{rows.shape[0]} chains, compiled in {t_compile:.3g} s")
        _COMPILE_DECISIONS[key] = (True, faster, timing)
        step.calls = 0  # the run's evaluations are counted from here
    keep = asked or faster
    if keep:
        ev.compiled = step
        ev.max_rows = None  # the compiled step has its own blocks (CompiledStep.block)
    target.path_reason = f"{target.path_reason}; {'compiled' if keep else 'not compiled'} (torch.compile): {timing}"
    return target


def _probe_rows(target: Target, R: int, batch_size: int | None, shared: bool) -> Batch:
    """A minibatch shaped as a run's: per row (``batch_size`` samples each), one for all rows when
    ``shared``, or the whole data set (full batch)."""
    size = target.source.n if batch_size is None else min(batch_size, target.source.n)
    if batch_size is not None and batch_size < target.source.n:
        idx = torch.arange((1 if shared else R) * size, device=target.device).view(-1, size) % target.source.n
        batch = target.source.gather(idx)
        if shared:
            x = _map(lambda v: v[0], batch.x)
            return Batch(x, x if batch.y is batch.x else _map(lambda v: v[0], batch.y), None, True)
        return batch
    return probe_batch(target.source, size, target.device, target.dtype)


def _like(evaluator: ChainEvaluator, path: str) -> ChainEvaluator:
    """An evaluator of the same model, parameters and loss on ``path`` (same gradient set)."""
    out = ChainEvaluator(evaluator.model, evaluator.spec, evaluator.adapter, path, structured=evaluator.structured,
                         autocast=evaluator.autocast)
    out.grad_names = evaluator.grad_names
    out.hf_eager = evaluator.hf_eager
    out.per_row_failure = evaluator.per_row_failure if path == "vmap" else None
    out.checkpoint_tensors = evaluator.checkpoint_tensors
    return out


#: rows per block of vmap in :func:`fastest_path`: with more rows than this (and a step long enough to
#: matter), vmap runs in blocks of this many rows unless vmap of all rows or the loop is measured
#: :data:`PATH_MARGIN` faster.  With many chains the activations of one vmapped step outgrow the caches:
#: a 105k-parameter GPT-2 at 32 rows ran 9.6 ms per chain-step in blocks of 8 against 11.4 all at once,
#: while timed probes of single steps differed by only ~4% (so blocking is the default, not a candidate)
VMAP_BLOCK_ROWS = 8


def _measure_paths(target: Target, rows: Tensor, batch: Batch, repeats: int) -> tuple[Any, str, float]:
    """``(choice, timings, seconds)`` for :func:`fastest_path`: ``None`` (vmap of all rows), an int
    (vmap in blocks of that many rows: the default with more than :data:`VMAP_BLOCK_ROWS` rows) or
    ``"loop"``, and the chosen evaluation's seconds per step; ``(None, "", t)`` when a vmap step is too
    short for the choice to matter (the others are then not timed).  An alternative replaces the
    default only when it is :data:`PATH_MARGIN` times faster."""
    R = rows.shape[0]
    t_vmap = _step_seconds(target.evaluator, rows, batch, repeats)
    if t_vmap < PATH_MIN_SECONDS:
        return None, "", t_vmap
    candidates: dict[Any, ChainEvaluator] = {None: target.evaluator, "loop": _like(target.evaluator, "loop")}
    if R > VMAP_BLOCK_ROWS:
        candidates[VMAP_BLOCK_ROWS] = _like(target.evaluator, "vmap")
        candidates[VMAP_BLOCK_ROWS].max_rows = VMAP_BLOCK_ROWS
    times = _interleaved_seconds(candidates, rows, batch, repeats)  # vmap timed again, in turn with the others
    times = {k: times[k] for k in ("loop", VMAP_BLOCK_ROWS, None) if k in times}  # the order of the reason
    default = VMAP_BLOCK_ROWS if R > VMAP_BLOCK_ROWS else None
    best = min(times, key=times.get)
    parts = [f"{1e3 * t:.3g} ms ({'loop' if k == 'loop' else 'vmap' if k is None else f'vmap in blocks of {k}'})"
             for k, t in times.items()]
    timing = f"measured {' vs '.join(parts)} per step of {R} chains"
    choice = best if times[best] * PATH_MARGIN < times[default] else default
    return choice, timing, times[choice]