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
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .data import Batch, Data, LoaderSource, as_source
from .defaults import default_localization, default_nbeta
from .evaluator import PATH_REASONS, ChainEvaluator, choose_path, probe_batch, to_device, validate_model_and_loss
from .losses import LossAdapter
from .params import ParamSpec
from .rng import ChainRNG
from ._runtime import resolve_device

__all__ = ["Target", "prepare_target", "BatchStream"]

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

    def rows(self, num_chains: int) -> Tensor:
        """``(K * C, d)``: ``w*`` of each checkpoint repeated for its ``C`` chains."""
        return self.w_star.repeat_interleave(num_chains, 0)

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
        return self._star

    @property
    def init_loss(self) -> Tensor:
        """``(K,)`` :math:`L_n(w^*)` of each checkpoint."""
        return self.star_losses[1]

    def _compute_star_losses(self) -> tuple[Tensor | None, Tensor]:
        K, source, ev = self.K, self.source, self.evaluator
        star_ps: Tensor | None = None
        if isinstance(source, Data):
            try:
                chunk = max(1, (1 << 22) // max(1, K * int(source.x[0].numel())))
                parts = [
                    ev.per_sample(self.w_star, source.x[i : i + chunk], source.target[i : i + chunk])
                    for i in range(0, source.n, chunk)
                ]
                star_ps = torch.cat(parts, dim=1)
            except Exception:  # noqa: BLE001 - per-sample losses unavailable: forward at w* instead
                star_ps = None
            if star_ps is not None:
                wn = source.normalized_weights()
                init = star_ps.mean(1) if wn is None else (star_ps * wn).sum(1)
            else:
                init = ev.losses(self.w_star, source.full_batch()).detach()
        else:
            tot = torch.zeros(K, dtype=torch.float64, device=self.device)
            count = 0
            for x, y, _ in source.iter_batches():
                b = self._loader_batch(x, y, None)
                with torch.no_grad():
                    tot += ev.losses(self.w_star, b).double() * b.x.shape[0]
                count += b.x.shape[0]
            if count == 0:
                raise ValueError("empty dataset: the DataLoader yielded no batch")
            init = (tot / count).to(self.dtype)
        if not torch.isfinite(init).all():
            bad = (~torch.isfinite(init)).nonzero().flatten().tolist()
            raise ValueError(f"the loss at w* is NaN or inf (checkpoints {bad}); check the model and data")
        return star_ps, init

    def _loader_batch(self, x: Tensor, y: Tensor | None, w: Tensor | None) -> Batch:
        x = to_device(x, self.device, self.dtype)
        y = x if y is None else to_device(y, self.device, self.dtype)
        wts = None
        if w is not None:
            w = w.to(device=self.device, dtype=self.dtype).flatten()
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
        per = max(1, int(data.n * max(1, data.target[0].numel())))
        chunk = max(1, (1 << 22) // per)
        out = []
        with torch.no_grad():
            for i in range(0, flat.shape[0], chunk):
                out.append(self.evaluator.losses(flat[i : i + chunk], batch))
        return torch.cat(out)

    def loss(self, w: Tensor) -> Tensor:
        """``(d,) -> L_n(w)``, differentiable in ``w`` (one autograd pass; for NUTS).

        Models with a hand-written gradient go through :class:`_LossFn`."""
        batch = self.full_batch()
        if self.evaluator.analytic:
            return _LossFn.apply(w, self)
        if self.path == "vmap":
            from torch.func import functional_call

            out = functional_call(self.model, {**self.spec.unflatten(w), **self.evaluator.buffers}, (batch.x,))
            return self.adapter.single_loss(out, batch.y, batch.weights)
        return self.evaluator.losses(w[None], batch)[0]

    def loss_and_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(d,) -> (L_n(w), ∇L_n(w) (d,))``.

        Native models go through the evaluator (hand-written gradients where the
        model has them); other modules through one ``functional_call`` and
        autograd (a single chain needs no ``vmap``)."""
        batch = self.full_batch()
        if self.path != "vmap":
            loss, grad = self.evaluator.loss_and_grad(w[None], batch)
            return loss[0], grad[0]
        from torch.func import functional_call

        with torch.enable_grad():
            p = w.detach().requires_grad_(True)
            out = functional_call(self.model, {**self.spec.unflatten(p), **self.evaluator.buffers}, (batch.x,))
            loss = self.adapter.single_loss(out, batch.y, batch.weights)
            (grad,) = torch.autograd.grad(loss, p)
        return loss.detach(), grad

    # -- minibatches ---------------------------------------------------------------
    def is_full_batch(self, batch_size: int | None) -> bool:
        """Whether ``batch_size`` means full-batch gradients (tensor data, ``None`` or ``>= n``)."""
        return isinstance(self.source, Data) and (batch_size is None or batch_size >= self.source.n)

    def batches(
        self, rng: ChainRNG, num_chains: int, batch_size: int | None, *, control_variate: bool = True,
        shared: bool = False,
    ) -> "BatchStream":
        """The stream of ``(batch, L_B(w*) per row)`` of a run of ``num_chains`` chains per checkpoint."""
        return BatchStream(self, rng, num_chains, batch_size, control_variate, shared)


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
    """

    def __init__(self, target: Target, rng: ChainRNG, num_chains: int, batch_size: int | None,
                 control_variate: bool, shared: bool):
        self.target = target
        self.rng = rng
        self.control_variate = control_variate
        self.full = target.is_full_batch(batch_size)
        source = target.source
        self.batch_size = source.n if self.full else batch_size
        self.shared = shared or isinstance(source, LoaderSource)
        self._shared_index = shared
        self._rows = target.rows(num_chains)  # (K*C, d)
        star_ps, init = target.star_losses
        self._star_ps = star_ps
        self._init = init.repeat_interleave(num_chains)  # (K*C,)
        self._full = source.full_batch() if self.full else None
        if star_ps is not None:  # (K*C, 1) offset of each row's checkpoint in the flattened (K, n) losses
            ckpt = torch.arange(target.K, device=target.device).repeat_interleave(num_chains)
            self._offset = (ckpt * star_ps.shape[1]).unsqueeze(1)

    def _forward_star(self, b: Batch) -> Tensor:
        with torch.no_grad():
            return self.target.evaluator.losses(self._rows, b)

    def __call__(self) -> tuple[Batch, Tensor]:
        if self._full is not None:
            return self._full, self._init
        source = self.target.source
        if isinstance(source, Data):
            idx = self.rng.index(source, self.batch_size, self._shared_index)
            b = source.gather(idx)
            if not self.control_variate:
                return b, self._init
            if self._star_ps is not None:
                flat_idx = (self._offset + idx).reshape(-1)  # index_select: fast on CPU
                return b, self._star_ps.view(-1).index_select(0, flat_idx).view(idx.shape).mean(1)
            return b, self._forward_star(b)
        b = self.target._loader_batch(*source.next_batch())
        if not self.control_variate:
            return b, self._init
        return b, self._forward_star(b)


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
def _checkpoints(
    model: Any, models: Sequence[Any] | None, state_dicts: Sequence[Mapping[str, Tensor]] | None
) -> tuple[nn.Module, list[Mapping[str, Tensor] | nn.Module], bool]:
    """Returns (template module, list of checkpoints, is_batch)."""
    if models is not None and state_dicts is not None:
        raise ValueError("pass either models=[...] or state_dicts=[...], not both")
    if isinstance(model, (list, tuple)):
        if models is not None:
            raise ValueError("pass the checkpoints either as model=[...] or models=[...], not both")
        models, model = model, None
    if models is not None:
        models = list(models)
        if not models:
            raise ValueError("models is empty: no checkpoint to estimate")
        if all(isinstance(m, nn.Module) for m in models):
            template = model if isinstance(model, nn.Module) else models[0]
            return template, models, True
        if all(isinstance(m, Mapping) for m in models):
            state_dicts, models = models, None
        else:
            raise TypeError("models must be a list of nn.Module or of state dicts")
    if state_dicts is not None:
        state_dicts = list(state_dicts)
        if not isinstance(model, nn.Module):
            raise ValueError("state dicts need a template module: estimate_llc(model, data, ..., state_dicts=[...])")
        if not state_dicts:
            raise ValueError("state_dicts is empty: no checkpoint to estimate")
        return model, state_dicts, True
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model, [model], False


def _seeds(seed: int | Sequence[int], K: int) -> list[int]:
    if isinstance(seed, int):
        return [seed + k for k in range(K)]
    seeds = [int(s) for s in seed]
    if len(seeds) != K:
        raise ValueError(f"got {len(seeds)} seeds for {K} checkpoints")
    return seeds


def _stack_loader(source: LoaderSource) -> Data:
    xs, ys, ws = [], [], []
    for x, y, w in source.iter_batches():
        xs.append(x)
        ys.append(y)
        ws.append(w)
    if not xs:
        raise ValueError("empty dataset: the DataLoader yielded no batch")
    y = None if any(v is None for v in ys) else torch.cat(ys)
    w = None if any(v is None for v in ws) else torch.cat([v.flatten() for v in ws])
    return Data(torch.cat(xs), y, w)


def _evaluator(
    model: nn.Module, spec: ParamSpec, adapter: LossAdapter, vectorize: str, rows: Tensor, probe: Batch, caller: str
) -> tuple[ChainEvaluator, str]:
    """The evaluator on the chosen path; with ``vectorize="auto"`` a path that fails on a
    probe falls back to a loop over chains, with a warning naming the error."""
    path = choose_path(model, vectorize)
    evaluator = ChainEvaluator(model, spec, adapter, path)
    reason = PATH_REASONS[path]
    if evaluator.analytic:
        reason += " and a hand-written gradient for this loss (loss_and_grad_chains)"
    try:
        evaluator.loss_and_grad(rows, probe)
    except Exception as e:  # noqa: BLE001 - decide the fallback
        if vectorize != "auto" or path == "loop":
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        warnings.warn(
            f"{caller}: the {path} path failed on this model ({type(e).__name__}: {msg}); "
            "falling back to a sequential loop over chains (slower).",
            RuntimeWarning,
            stacklevel=4,
        )
        reason = f"fallback: {reason} failed with {type(e).__name__}: {msg}"
        evaluator = ChainEvaluator(model, spec, adapter, "loop")
    return evaluator, reason


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
    dtype: torch.dtype = torch.float32,
    vectorize: str = "auto",
    seed: int | Sequence[int] = 0,
    full_data: bool = False,
    caller: str = "slt.estimate_llc",
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

    Returns
    -------
    Target

    Raises
    ------
    ValueError, TypeError
        Bad model, checkpoints, data, loss or dtype (before any sampling).
    """
    template, ckpts, is_batch = _checkpoints(model, models, state_dicts)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if loss_fn is None:
        loss_fn = getattr(template, "default_loss", None)
        if loss_fn is None:
            raise ValueError("loss_fn is required (the model defines no default_loss)")
    dev = resolve_device(device)
    seeds = _seeds(seed, len(ckpts))

    # model and checkpoints
    spec = ParamSpec(template)
    work_model = template
    if any(
        t.device != dev or (t.is_floating_point() and t.dtype != dtype)
        for t in list(template.parameters()) + list(template.buffers())
    ):
        work_model = copy.deepcopy(template).to(device=dev, dtype=dtype)
    rows = [(spec.flatten_module(ck) if isinstance(ck, nn.Module) else spec.flatten_mapping(ck)).to(
        device=dev, dtype=dtype) for ck in ckpts]
    w_star = torch.stack(rows)  # (K, d)
    if not torch.isfinite(w_star).all():
        raise ValueError("the checkpoint parameters contain NaN or inf")

    # data
    source = as_source(data)
    if isinstance(source, LoaderSource) and full_data:
        source = _stack_loader(source)
    if isinstance(source, Data):
        source = source.to(dev, dtype)
    n = source.n
    if n is None and (nbeta is None or callable(nbeta)):
        raise ValueError("the DataLoader's dataset has no length: pass nbeta explicitly")
    adapter = LossAdapter(loss_fn)
    validate_model_and_loss(work_model, adapter, probe_batch(source, 64, dev, dtype))

    # nβ, γ, path
    if nbeta is None:
        nb = default_nbeta(int(n))
    else:
        nb = float(nbeta(int(n))) if callable(nbeta) else float(nbeta)
    gamma = float(localization) if localization is not None else default_localization()
    evaluator, reason = _evaluator(work_model, spec, adapter, vectorize, w_star[:1].repeat(2, 1),
                                   probe_batch(source, 8, dev, dtype), caller)
    return Target(work_model, spec, adapter, evaluator, source, w_star, seeds, nb, gamma, n, dev, dtype, reason,
                  is_batch)
