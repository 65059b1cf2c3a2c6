r"""The LLC engine: batched multi-chain, multi-checkpoint SG-MCMC.

:func:`estimate_llc` samples the localized tempered posterior

.. math::

    p(w) \propto \exp\Bigl(-n\beta\,L_n(w) - \tfrac{\gamma}{2}\lVert w - w^*\rVert^2\Bigr)

around each checkpoint ``w*`` and returns the local learning coefficient
estimate :math:`\hat\lambda = n\beta\,(\mathbb E[L_n(w)] - L_n(w^*))` (Lau, Furman,
Wang, Murfet & Wei 2023, arXiv 2308.12108).

All chains of all checkpoints form one batch of ``K * C`` parameter vectors
(checkpoint-major: chain ``c`` of checkpoint ``k`` is row ``k * C + c``), and
every step evaluates them in one computation through one of three paths:

``native``
    the model is a :class:`slt.models.ChainModule` with ``forward_chains``
    (fastest for tiny models);
``vmap``
    ``torch.func.functional_call`` lifted over chains with ``torch.func.vmap``
    (any module vmap supports);
``loop``
    a Python loop over chains (modules vmap cannot handle, e.g. BatchNorm in
    training mode); chosen automatically, with a warning saying why.

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

import contextlib
import copy
import math
import platform
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_int, check_real
from .data import Batch, Data, LoaderSource, as_source
from .diagnostics import ess, llc_standard_error, rhat
from .losses import LossAdapter
from .params import ParamSpec
from .result import LLCResult
from .samplers import LocalizedPotential, build_sampler

__all__ = [
    "estimate_llc",
    "default_nbeta",
    "default_localization",
    "resolve_device",
    "ChainEvaluator",
    "LLCEstimationError",
]

Observable = Callable[[Mapping[str, Tensor]], Tensor]

#: ε = STEP_SIZE_SAFETY / (nβ h_max + γ) for ``step_size=None``.
STEP_SIZE_SAFETY = 0.2
#: γ for ``localization=None``.
LOCALIZATION = 1.0


class LLCEstimationError(RuntimeError):
    """Raised when sampling cannot produce an estimate (e.g. every chain diverged)."""


# ----------------------------------------------------------------------------
# defaults
# ----------------------------------------------------------------------------
def default_nbeta(n: int) -> float:
    r"""nβ = n / log n: the WBIC inverse temperature β* = 1/log n (Watanabe 2013),
    as used by Lau et al. (2023).  devinterp 2.x instead uses b / log b with the
    batch size b; pass ``nbeta`` to use any other value."""
    if n < 2:
        raise ValueError(f"default nbeta needs n >= 2 samples, got n={n}")
    return n / math.log(n)


def default_localization(nbeta: float | None = None) -> float:
    r"""γ = 1: a unit Gaussian prior N(w*, I) around the checkpoint, fixed in n.

    γ must not grow with n: with γ ∝ nβ the localization acts like a fixed L2
    penalty added to the loss and λ̂ → 0 at singular points as n grows
    (measured: normal-crossing w1²w2⁴ at n = 10⁴, λ = 1/4, gave 0.17 with
    γ = 0.01 nβ, 0.12 with γ = 10 and 0.23 ± 0.03 with γ = 1).  A regular
    direction of curvature h is shrunk by 1/(1 + γ/(nβ h)) (the exact
    quadratic formula), negligible once nβ h ≫ 1.  The price of a weak γ is
    slow mixing along flat directions (relaxation ≈ 2/(εγ) steps): check R-hat,
    and for large networks, where many flat directions wander, raise γ with
    :func:`slt.calibrate` (Lau et al. use γ = 100 at nβ ≈ 5000).
    ``nbeta`` is accepted for API symmetry and ignored.
    """
    return LOCALIZATION


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


# ----------------------------------------------------------------------------
# batched loss evaluation
# ----------------------------------------------------------------------------
class ChainEvaluator:
    """Per-chain losses and gradients of C parameter vectors in one computation.

    Parameters
    ----------
    model
        The module (only its structure, buffers and frozen parameters are used).
    spec
        Which parameters are sampled.
    adapter
        The loss.
    path
        ``"native"``, ``"vmap"`` or ``"loop"``.
    """

    def __init__(self, model: nn.Module, spec: ParamSpec, adapter: LossAdapter, path: str):
        if path not in ("native", "vmap", "loop"):
            raise ValueError(f"unknown vectorization path {path!r}")
        if path == "native" and not hasattr(model, "forward_chains"):
            raise ValueError("vectorize='native' needs a model with forward_chains (slt.models.ChainModule)")
        self.model = model
        self.spec = spec
        self.adapter = adapter
        self.path = path
        # hand-written per-chain gradients (tiny toy models): skips autograd entirely
        self.analytic = (
            path == "native"
            and hasattr(model, "supports_analytic_grad")
            and bool(model.supports_analytic_grad(adapter.loss_fn))
        )
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        # functional_call may update buffers in place (BatchNorm running stats in
        # training mode): work on private copies so the user's module is never modified.
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def outputs(self, flat: Tensor, x: Tensor, shared: bool = False) -> Tensor:
        """(C, d), (C, B, ...) -> (C, B, ...) model outputs; with ``shared`` the
        input is one (B, ...) batch for all chains."""
        from torch.func import functional_call

        C = flat.shape[0]
        if shared and self.path != "vmap":
            x = x.unsqueeze(0).expand(C, *x.shape)
        if self.path == "native":
            params = self.spec.unflatten(flat)
            for n, p in self.frozen.items():
                params[n] = p.unsqueeze(0).expand(C, *p.shape)
            return self.model.forward_chains(params, x)
        if self.path == "vmap":
            buffers = self.buffers

            def one(p: Tensor, xb: Tensor) -> Tensor:
                return functional_call(self.model, {**self.spec.unflatten(p), **buffers}, (xb,))

            return torch.vmap(one, in_dims=(0, None if shared else 0))(flat, x)
        outs = []
        for c in range(C):
            params = {**self.spec.unflatten(flat[c]), **self.buffers}
            outs.append(functional_call(self.model, params, (x[c],)))
        return torch.stack(outs)

    def losses(self, flat: Tensor, batch: Batch) -> Tensor:
        """(C, d) -> (C,) minibatch losses (weighted when the batch carries weights)."""
        from torch.func import functional_call

        C = flat.shape[0]
        if self.path == "native":
            b = batch.per_chain(C)
            out = self.outputs(flat, b.x)
            return self.adapter.chain_loss(out, b.y, b.weights)
        if self.path == "vmap":
            buffers = self.buffers

            def one(p: Tensor, xb: Tensor, yb: Tensor, wb: Tensor | None) -> Tensor:
                out = functional_call(self.model, {**self.spec.unflatten(p), **buffers}, (xb,))
                return self.adapter.single_loss(out, yb, wb)

            bd = None if batch.shared else 0  # a shared batch is broadcast, not copied
            in_dims = (0, bd, bd, bd if batch.weights is not None else None)
            return torch.vmap(one, in_dims=in_dims)(flat, batch.x, batch.y, batch.weights)
        res = []
        for c in range(C):
            params = {**self.spec.unflatten(flat[c]), **self.buffers}
            if batch.shared:
                xc, yc, wc = batch.x, batch.y, batch.weights
            else:
                xc, yc = batch.x[c], batch.y[c]
                wc = None if batch.weights is None else batch.weights[c]
            out = functional_call(self.model, params, (xc,))
            res.append(self.adapter.single_loss(out, yc, wc))
        return torch.stack(res)

    def loss_and_grad(self, flat: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(C, d) -> ((C,) losses, (C, d) gradients); chains are independent, so the
        gradient of the summed loss is the per-chain gradient."""
        if self.analytic:
            C = flat.shape[0]
            b = batch.per_chain(C)
            params = self.spec.unflatten(flat)
            for n, p in self.frozen.items():
                params[n] = p.unsqueeze(0).expand(C, *p.shape)
            with torch.no_grad():
                losses, grads = self.model.loss_and_grad_chains(params, b.x, b.y, b.weights, self.adapter.loss_fn)
            grad = torch.cat([grads[n].reshape(C, -1) for n in self.spec.names], dim=1)
            return losses, grad
        with torch.enable_grad():
            p = flat.detach().requires_grad_(True)
            losses = self.losses(p, batch)
            (grad,) = torch.autograd.grad(losses.sum(), p)
        return losses.detach(), grad

    def per_sample(self, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """(K, d), (n, ...), (n, ...) -> (K, n) per-sample losses, no grad."""
        K = flat.shape[0]
        with torch.no_grad():
            out = self.outputs(flat, x, shared=True)
            return self.adapter.per_sample(out, y.unsqueeze(0).expand(K, *y.shape), 2)


# ----------------------------------------------------------------------------
# random streams
# ----------------------------------------------------------------------------
_INDEX_STREAM_OFFSET = 0x5D588B65  # separates the index stream from the noise stream


class ChainRNG:
    """One noise stream and one minibatch-index stream per checkpoint.

    Checkpoint ``k`` draws from generators seeded with ``seeds[k]``, in chunks
    whose size depends only on the per-checkpoint shape, so checkpoint ``k`` of
    a batched call sees exactly the random numbers of a separate call with
    ``seed=seeds[k]``.
    """

    def __init__(self, seeds: Sequence[int], chains: int, device: torch.device):
        self.seeds = [int(s) for s in seeds]
        self.C = chains
        self.device = device
        self.noise_gens = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        self.index_gens = [
            torch.Generator(device=device).manual_seed((s + _INDEX_STREAM_OFFSET) % 2**63)
            for s in self.seeds
        ]
        self._noise: Tensor | None = None
        self._noise_pos = 0
        self._idx: Tensor | None = None
        self._idx_pos = 0

    @staticmethod
    def _chunk(per_stream: int) -> int:
        return max(1, min(64, (1 << 21) // max(per_stream, 1)))

    def normal(self, like: Tensor) -> Tensor:
        """Standard normal noise shaped like ``like`` ((K*C, d))."""
        if self._noise is None or self._noise_pos >= self._noise.shape[0] or self._noise.shape[2:] != like.shape[1:]:
            d_shape = like.shape[1:]
            S = self._chunk(self.C * int(torch.Size(d_shape).numel()))
            parts = [
                torch.randn((S, self.C, *d_shape), generator=g, device=like.device, dtype=like.dtype)
                for g in self.noise_gens
            ]
            self._noise = torch.cat(parts, dim=1)
            self._noise_pos = 0
        out = self._noise[self._noise_pos]
        self._noise_pos += 1
        return out

    def index(self, data: Data, batch_size: int, shared: bool = False) -> Tensor:
        """(K*C, B) minibatch indices; ``shared``: the chains of a checkpoint share them."""
        if self._idx is None or self._idx_pos >= self._idx.shape[0]:
            S = self._chunk(self.C * batch_size)
            c = 1 if shared else self.C
            parts = [
                data.sample_index(S * c, batch_size, g).view(S, c, batch_size).expand(S, self.C, batch_size)
                for g in self.index_gens
            ]
            self._idx = torch.cat(parts, dim=1)
            self._idx_pos = 0
        out = self._idx[self._idx_pos]
        self._idx_pos += 1
        return out


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    from . import __version__

    import numpy

    return {
        "slt": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


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


@contextlib.contextmanager
def _intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block, then restore it."""
    prev = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _choose_path(model: nn.Module, vectorize: str) -> str:
    if vectorize not in ("auto", "native", "vmap", "loop"):
        raise ValueError(f"vectorize must be 'auto', 'native', 'vmap' or 'loop', got {vectorize!r}")
    if vectorize != "auto":
        return vectorize
    return "native" if hasattr(model, "forward_chains") else "vmap"


def _probe_batch(source: Data | LoaderSource, num_chains: int, size: int, device, dtype) -> Batch:
    if isinstance(source, Data):
        m = min(size, source.n)
        sub = Data(source.x[:m], None if source.y is None else source.y[:m], None)
        return sub.full_batch()
    x, y, w = source.next_batch()
    x = _to(x, device, dtype)
    y = x if y is None else _to(y, device, dtype)
    return Batch(x, y, None, None, False, True)


def _to(t: Tensor, device, dtype) -> Tensor:
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def _validate_model_and_loss(
    model: nn.Module, adapter: LossAdapter, probe: Batch
) -> None:
    """Run the model and the loss once on a couple of samples; fail clearly."""
    x = probe.x[:2]
    y = probe.y[:2]
    from torch.func import functional_call

    buffers = {n: b.clone() for n, b in model.named_buffers()}  # never touch the user's buffers
    try:
        with torch.no_grad():
            out = functional_call(model, buffers, (x,))
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"the model failed on a batch of the data (x of shape {tuple(x.shape)}): {e}"
        ) from e
    try:
        loss = adapter.loss_fn(out, y)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"loss_fn failed on model output of shape {tuple(out.shape)} and target of shape "
            f"{tuple(y.shape)}: {e}"
        ) from e
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar (0-d tensor, the mean loss over the batch); got {shape}"
        )
    if adapter.has_native_per_sample:
        ps = adapter.per_sample(out, y, 1)
        if not torch.allclose(ps.mean(), loss, rtol=1e-4, atol=1e-6):
            raise ValueError(
                "the per-sample form of loss_fn does not average to loss_fn: "
                f"{float(ps.mean()):.6g} vs {float(loss):.6g}"
            )


def _probe_points(
    w_star: Tensor, num_probes: int, localization: float, nbeta: float, generator: torch.Generator
) -> Tensor:
    """(K, 1 + num_probes, d): ``w*`` itself, then ``w* + δ`` with
    ``δ ~ N(0, (0.5/√(γ + 0.01 nβ))² I)``, where a singular potential's curvature lives."""
    K, d = w_star.shape
    scale = 0.5 / math.sqrt(localization + 1e-2 * nbeta)
    noise = torch.randn((K, num_probes + 1, d), generator=generator, device=w_star.device, dtype=torch.float32)
    noise = noise.to(w_star.dtype)
    noise[:, 0] = 0.0
    return w_star.unsqueeze(1) + scale * noise


def _combine_probes(values: Tensor) -> Tensor:
    """(K, P) values at w* and its probes -> (K,): max(value at w*, median over probes)."""
    probes = values[:, 1:].median(dim=1).values if values.shape[1] > 1 else values[:, 0]
    return torch.maximum(values[:, 0], probes)


def _power_iteration(
    evaluator: ChainEvaluator, w: Tensor, batch: Batch, generator: torch.Generator, iters: int = 12
) -> Tensor:
    """(N, d) points -> (N,) |largest Hessian eigenvalue of L| at each point, by power
    iteration with finite-difference Hessian-vector products."""
    _, g0 = evaluator.loss_and_grad(w, batch)
    v = torch.randn(w.shape, generator=generator, device=w.device, dtype=torch.float32).to(w.dtype)
    v = v / v.norm(dim=1, keepdim=True)
    eig = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    r = 1e-3 if w.dtype == torch.float32 else 1e-5
    for _ in range(iters):
        _, g1 = evaluator.loss_and_grad(w + r * v, batch)
        hv = (g1 - g0) / r
        eig = (hv * v).sum(1)
        nrm = hv.norm(dim=1, keepdim=True)
        v = torch.where(nrm > 0, hv / nrm.clamp_min(1e-30), v)
    return eig.abs().nan_to_num(0.0)


def _estimate_curvature(
    evaluator: ChainEvaluator, w_star: Tensor, batch_fn: Callable[[], Batch],
    localization: float, nbeta: float, generator: torch.Generator, num_probes: int = 4, iters: int = 12,
) -> Tensor:
    r"""Largest Hessian eigenvalue of L per checkpoint, (K,).

    Power iteration with finite-difference Hessian-vector products
    ``Hv ≈ (∇L(w + r v) − ∇L(w)) / r``, at ``w*`` and at ``num_probes`` points
    ``w* + δ`` with ``δ ~ N(0, (0.5/√γ')² I)`` (``γ' = γ + nβ·1e-2``), where a
    singular potential's curvature lives; returns ``max(h(w*), median_probes h)``.
    """
    K, d = w_star.shape
    P = num_probes + 1
    w = _probe_points(w_star, num_probes, localization, nbeta, generator).reshape(K * P, d)
    eig = _power_iteration(evaluator, w, batch_fn(), generator, iters)
    return _combine_probes(eig.view(K, P))


#: Pilot runs of the automatic step size: chains per checkpoint, steps per round, rounds.
PILOT_CHAINS, PILOT_STEPS, PILOT_ROUNDS = 2, 100, 4


def _pilot_step_size(
    evaluator: ChainEvaluator, w_star: Tensor, batch_fn: Callable[[], Batch], localization: float,
    nbeta: float, eps: float, generator: torch.Generator,
) -> tuple[float, Tensor, int]:
    r"""Refine the automatic step size where the chains actually go.

    At a singular ``w*`` the curvature near ``w*`` says little about the
    curvature a chain meets once it has wandered along the flat directions (for
    :math:`K = \tfrac12 (ab^2)^2` it is 0 at the origin and :math:`n\beta b^4` at
    distance :math:`1/\sqrt\gamma`).  So: run ``PILOT_CHAINS`` full-batch SGLD
    chains per checkpoint for ``PILOT_STEPS`` steps with the current ε,
    measure the largest Hessian eigenvalue :math:`h` at the points reached, and
    set :math:`\epsilon \leftarrow \min(\epsilon, 0.2/(n\beta h + \gamma))`
    (divergence: ε/4); repeat while ε shrinks by more than 20% (at most
    ``PILOT_ROUNDS`` rounds).  ε only ever decreases.

    Returns ``(ε, curvature per checkpoint (K,), rounds run)``.
    """
    K, d = w_star.shape
    Cp = PILOT_CHAINS
    centre = w_star.repeat_interleave(Cp, dim=0)  # (K*Cp, d)
    batch = batch_fn()
    curv = torch.zeros(K, dtype=w_star.dtype, device=w_star.device)
    rounds = 0
    for rounds in range(1, PILOT_ROUNDS + 1):
        w = centre.clone()
        ok = True
        for _ in range(PILOT_STEPS):
            _, g = evaluator.loss_and_grad(w, batch)
            grad_u = nbeta * g + localization * (w - centre)
            noise = torch.randn(w.shape, generator=generator, device=w.device, dtype=torch.float32).to(w.dtype)
            w = w - 0.5 * eps * grad_u + math.sqrt(eps) * noise
        if not torch.isfinite(w).all():
            ok = False
        if ok:
            h = _power_iteration(evaluator, w, batch, generator).view(K, Cp).max(dim=1).values
            ok = bool(torch.isfinite(h).all())
        if not ok:
            eps = eps / 4.0
            continue
        curv = torch.maximum(curv, h)
        new = STEP_SIZE_SAFETY / (nbeta * float(h.max()) + localization)
        if new >= 0.8 * eps:
            break
        eps = new
    return eps, curv, rounds


def _minibatch_gradient_noise(
    evaluator: ChainEvaluator, w_star: Tensor, data: Data, batch_size: int, localization: float,
    nbeta: float, generator: torch.Generator, num_probes: int = 4, num_batches: int = 16,
) -> Tensor:
    r"""Largest eigenvalue of the covariance of the minibatch gradient ∇L_B, (K,).

    Evaluated on ``num_batches`` independent minibatches at ``w*`` and at the
    probe points of :func:`_estimate_curvature`; returns
    ``max(s(w*), median_probes s)``.  SGLD's stationary variance along a
    direction is inflated by the factor ``1 + ε nβ² s / 4`` by minibatch noise
    of variance ``s`` (Welling & Teh 2011, Sec. 4), so ``ε ≤ 0.2 / (nβ² s)``
    keeps that inflation below 5%.
    """
    K, d = w_star.shape
    P, M = num_probes + 1, num_batches
    w = _probe_points(w_star, num_probes, localization, nbeta, generator)
    w = w.unsqueeze(2).expand(K, P, M, d).reshape(K * P * M, d)
    idx = data.sample_index(K * P * M, batch_size, generator)
    _, g = evaluator.loss_and_grad(w, data.gather(idx))
    g = g.view(K * P, M, d)
    g = g - g.mean(1, keepdim=True)
    gram = g @ g.transpose(1, 2) / (M - 1)  # same nonzero spectrum as the d x d covariance
    top = torch.linalg.eigvalsh(gram.double())[:, -1].clamp_min(0.0).nan_to_num(0.0).view(K, P)
    return _combine_probes(top).to(w_star.dtype)


# ----------------------------------------------------------------------------
# the estimator
# ----------------------------------------------------------------------------
def estimate_llc(
    model: nn.Module | Sequence[nn.Module] | None,
    data: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    models: Sequence[nn.Module | Mapping[str, Tensor]] | None = None,
    state_dicts: Sequence[Mapping[str, Tensor]] | None = None,
    num_chains: int = 8,
    num_draws: int = 1000,
    num_burnin: int | None = None,
    num_steps_bw_draws: int = 1,
    step_size: float | None = None,
    nbeta: float | None = None,
    localization: float | None = None,
    batch_size: int | None = 256,
    sampler: str = "sgld",
    sampler_kwargs: Mapping[str, Any] | None = None,
    observables: Mapping[str, Observable] | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | Sequence[int] = 0,
    vectorize: str = "auto",
    mala_every: int = 10,
    divergence_threshold: float | None = None,
    control_variate: bool = True,
    shared_batches: bool = False,
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
        its batches are shared by all chains).
    loss_fn
        ``loss_fn(output, target) -> scalar`` mean loss.  Defaults to
        ``model.default_loss`` when the model defines one.
    models, state_dicts
        Several checkpoints estimated in one batched computation; with
        ``state_dicts``, ``model`` is the template.  Returns a list of results.
    num_chains, num_draws, num_burnin, num_steps_bw_draws
        Chains per checkpoint, recorded draws per chain, steps discarded first
        (default ``num_draws // 4``), and steps between draws.
    step_size
        ε.  Default ``None``: :math:`\epsilon = 0.2/(n\beta\,h_{max} + \gamma)`
        with :math:`h_{max}` the largest Hessian eigenvalue of :math:`L_n` near
        ``w*`` (power iteration; see :func:`_estimate_curvature`), refined by
        short full-batch pilot chains that re-measure the curvature where the
        chains actually go (:func:`_pilot_step_size`; at a singular ``w*`` the
        curvature near ``w*`` can be zero while the flat directions lead to
        stiff regions).  SGLD is
        stable only for :math:`\epsilon\,(n\beta h + \gamma) < 2` in every
        direction, and its discretisation bias in a direction of curvature κ
        is about εκ/4; this default keeps it ≤ 5% in the stiffest direction.
        With minibatches the step is further capped at :math:`0.2/(n\beta^2 s)`,
        :math:`s` the largest eigenvalue of the minibatch-gradient covariance
        (see :func:`_minibatch_gradient_noise`): minibatch noise inflates the
        sampled variance by about :math:`\epsilon n\beta^2 s/4`, kept ≤ 5%.
        Confirm with the MALA acceptance (≈ 0.9 or above) and
        :func:`slt.calibrate`.
    nbeta
        nβ.  Default :func:`default_nbeta` (n / log n, β = 1/log n).
    localization
        γ.  Default :func:`default_localization` (γ = 1, fixed in n).
    batch_size
        Minibatch size; ``None`` or ``>= n`` uses full-batch gradients (no
        minibatch noise, free every-step MALA diagnostic).
    sampler
        ``"sgld"`` or ``"rmsprop_sgld"``; ``sampler_kwargs`` go to it (e.g.
        ``alpha``, ``eps`` for RMSProp).
    observables
        ``name -> f(params)`` with ``params`` a mapping ``name -> (C, *shape)``
        and ``f`` returning ``(C, ...)``; evaluated at every draw, batched over
        chains, returned as ``(C, T, ...)`` in ``result.observables``.
    device, dtype
        ``"cpu"``, ``"cuda"`` or ``"auto"``; ``torch.float32`` or ``torch.float64``.
    seed
        Checkpoint ``k`` uses the random streams of ``seed + k``, or of
        ``seed[k]`` when a list is given (so a batched call reproduces separate
        calls exactly).
    vectorize
        ``"auto"`` (native if the model has ``forward_chains``, else vmap, else
        a loop with a warning), ``"native"``, ``"vmap"``, ``"loop"``.
    mala_every
        Compute the MALA acceptance diagnostic every this many steps (costs one
        extra gradient evaluation each time on minibatches; 0 disables).
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
    LLCResult or list of LLCResult
        One result per checkpoint (a list when several were given).

    Calibration
    -----------
    Check that (i) ``diagnostics["mala_acceptance"]`` is about 0.9 or higher,
    (ii) loss traces have flattened after burn-in (:func:`slt.plot_trace`),
    (iii) ``frac_below_init`` is small (otherwise w* is not a minimum), and
    (iv) λ̂ is stable when the step size is halved (:func:`slt.calibrate`).
    """
    t_setup = time.perf_counter()
    template, ckpts, is_batch = _checkpoints(model, models, state_dicts)
    num_chains = check_int("num_chains", num_chains, 1)
    num_draws = check_int("num_draws", num_draws, 1)
    if num_burnin is None:
        num_burnin = num_draws // 4
    num_burnin = check_int("num_burnin", num_burnin, 0)
    num_steps_bw_draws = check_int("num_steps_bw_draws", num_steps_bw_draws, 1)
    mala_every = check_int("mala_every", mala_every, 0)
    if step_size is not None:
        check_real("step_size", step_size, positive=True)
    if nbeta is not None:
        check_real("nbeta", nbeta, positive=True)
    if localization is not None:
        check_real("localization", localization, nonnegative=True)
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, 1)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if loss_fn is None:
        loss_fn = getattr(template, "default_loss", None)
        if loss_fn is None:
            raise ValueError("loss_fn is required (the model defines no default_loss)")
    dev = resolve_device(device)
    K = len(ckpts)
    if isinstance(seed, int):
        seeds = [seed + k for k in range(K)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != K:
            raise ValueError(f"got {len(seeds)} seeds for {K} checkpoints")

    # --- model, parameters, checkpoints -------------------------------
    spec = ParamSpec(template)
    work_model = template
    needs_copy = any(
        t.device != dev or (t.is_floating_point() and t.dtype != dtype)
        for t in list(template.parameters()) + list(template.buffers())
    )
    if needs_copy:
        work_model = copy.deepcopy(template).to(device=dev, dtype=dtype)
    rows = []
    for ck in ckpts:
        flat = spec.flatten_module(ck) if isinstance(ck, nn.Module) else spec.flatten_mapping(ck)
        rows.append(flat.to(device=dev, dtype=dtype))
    w_star_k = torch.stack(rows)  # (K, d)
    if not torch.isfinite(w_star_k).all():
        raise ValueError("the checkpoint parameters contain NaN or inf")
    C = num_chains
    CT = K * C
    w_star = w_star_k.repeat_interleave(C, 0)  # (K*C, d)
    chain_ckpt = torch.arange(K, device=dev).repeat_interleave(C)

    # --- data ------------------------------------------------------------
    source = as_source(data)
    if isinstance(source, Data):
        source = source.to(dev, dtype)
        n = source.n
    else:
        n = source.n
        if n is None and nbeta is None:
            raise ValueError("the DataLoader's dataset has no length: pass nbeta explicitly")
    adapter = LossAdapter(loss_fn)
    probe = _probe_batch(source, 1, 64, dev, dtype)
    _validate_model_and_loss(work_model, adapter, probe)

    nb = float(nbeta) if nbeta is not None else default_nbeta(int(n))
    gamma = float(localization) if localization is not None else default_localization(nb)
    full_batch = isinstance(source, Data) and (batch_size is None or batch_size >= source.n)
    bsz = source.n if (isinstance(source, Data) and full_batch) else batch_size

    # --- vectorization path ------------------------------------------------
    path = _choose_path(work_model, vectorize)
    evaluator = ChainEvaluator(work_model, spec, adapter, path)
    path_reason = {"native": "model defines forward_chains", "vmap": "torch.func.vmap over functional_call",
                   "loop": "requested"}[path]
    if evaluator.analytic:
        path_reason += " and a hand-written gradient for this loss (loss_and_grad_chains)"
    try:
        evaluator.loss_and_grad(w_star[:2] if CT >= 2 else w_star, _probe_batch(source, min(CT, 2), 8, dev, dtype))
    except Exception as e:  # noqa: BLE001 - decide the fallback
        if vectorize != "auto" or path == "loop":
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        warnings.warn(
            f"slt.estimate_llc: the {path} path failed on this model ({type(e).__name__}: {msg}); "
            "falling back to a sequential loop over chains (slower).",
            RuntimeWarning,
            stacklevel=2,
        )
        path = "loop"
        path_reason = f"fallback: {path_reason} failed with {type(e).__name__}: {msg}"
        evaluator = ChainEvaluator(work_model, spec, adapter, path)

    # --- losses at w*: init loss and the control variate --------------------
    star_ps: Tensor | None = None  # (K, n) per-sample losses at w*
    if isinstance(source, Data):
        try:
            chunk = max(1, (1 << 22) // max(1, K * int(source.x[0].numel())))
            parts = [
                evaluator.per_sample(w_star_k, source.x[i : i + chunk], source.target[i : i + chunk])
                for i in range(0, source.n, chunk)
            ]
            star_ps = torch.cat(parts, dim=1)
        except Exception:  # noqa: BLE001 - per-sample losses unavailable: forward at w* instead
            star_ps = None
        if star_ps is not None:
            wn = source.normalized_weights()
            init_loss_k = star_ps.mean(1) if wn is None else (star_ps * wn).sum(1)
        else:
            init_loss_k = evaluator.losses(w_star_k, source.full_batch()).detach()
    else:
        tot = torch.zeros(K, dtype=torch.float64, device=dev)
        count = 0
        for x, y, w in source.iter_batches():
            x = _to(x, dev, dtype)
            y = x if y is None else _to(y, dev, dtype)
            b = Batch(x, y, None, None, False, True)
            with torch.no_grad():
                tot += evaluator.losses(w_star_k, b).double() * x.shape[0]
            count += x.shape[0]
        if count == 0:
            raise ValueError("empty dataset: the DataLoader yielded no batch")
        init_loss_k = (tot / count).to(dtype)
    if not torch.isfinite(init_loss_k).all():
        bad = (~torch.isfinite(init_loss_k)).nonzero().flatten().tolist()
        raise ValueError(f"the loss at w* is NaN or inf (checkpoints {bad}); check the model and data")
    init_loss = init_loss_k.repeat_interleave(C)  # (K*C,)

    # --- batches -------------------------------------------------------------
    rng = ChainRNG(seeds, C, dev)
    full = source.full_batch() if full_batch else None

    star_offset = None if star_ps is None else (chain_ckpt * star_ps.shape[1]).unsqueeze(1)  # (CT, 1)

    def next_batch() -> tuple[Batch, Tensor]:
        """Returns (batch, L_B(w*) per chain)."""
        if full is not None:
            return full, init_loss
        if isinstance(source, Data):
            idx = rng.index(source, bsz, shared_batches)
            b = source.gather(idx)
            if not control_variate:
                star = init_loss
            elif star_ps is not None:
                flat_idx = (star_offset + idx).reshape(-1)  # index_select: fast on CPU
                star = star_ps.view(-1).index_select(0, flat_idx).view(idx.shape).mean(1)
            else:
                with torch.no_grad():
                    star = evaluator.losses(w_star, b)
            return b, star
        x, y, w = source.next_batch()
        x = _to(x, dev, dtype)
        y = x if y is None else _to(y, dev, dtype)
        wts = None
        if w is not None:
            w = w.to(device=dev, dtype=dtype).flatten()
            wts = w / w.sum()
        b = Batch(x, y, wts, None, False, True)
        if not control_variate:
            return b, init_loss
        with torch.no_grad():
            star = evaluator.losses(w_star, b)
        return b, star

    # --- step size ---------------------------------------------------------------
    curvature = grad_noise = None
    pilot_rounds = 0
    if step_size is None:
        gen = torch.Generator(device=dev).manual_seed(seeds[0] + 1)
        if isinstance(source, Data):
            if source.n <= 1024:
                cur_data = source
            elif source.weights is None:
                cur_data = Data(source.x[:1024], None if source.y is None else source.y[:1024])
            else:  # rows drawn by weight: an unbiased subsample of the weighted data
                rows = source.sample_index(1, 1024, gen).flatten()
                cur_data = Data(source.x[rows], None if source.y is None else source.y[rows])
            batch_fn = cur_data.full_batch
        else:
            first = next_batch()[0]

            def batch_fn(first: Batch = first) -> Batch:
                return first

        curvature = _estimate_curvature(evaluator, w_star_k, batch_fn, gamma, nb, gen)
        h_max = float(curvature.max())
        eps = STEP_SIZE_SAFETY / (nb * h_max + gamma) if (nb * h_max + gamma) > 0 else 1e-4
        pilot_gen = torch.Generator(device=dev).manual_seed(seeds[0] + 2)
        eps, pilot_curv, pilot_rounds = _pilot_step_size(evaluator, w_star_k, batch_fn, gamma, nb, eps, pilot_gen)
        curvature = torch.maximum(curvature, pilot_curv)
        if isinstance(source, Data) and full is None:
            grad_noise = _minibatch_gradient_noise(evaluator, w_star_k, source, bsz, gamma, nb, gen)
            s_max = float(grad_noise.max())
            if s_max > 0:
                eps = min(eps, STEP_SIZE_SAFETY / (nb**2 * s_max))
    else:
        eps = float(step_size)

    potential = LocalizedPotential(evaluator.loss_and_grad, w_star, nb, gamma)
    smp = build_sampler(
        sampler, potential, eps, deterministic=full is not None, mala_every=mala_every,
        **dict(sampler_kwargs or {}),
    )
    state = smp.init(w_star)

    # --- main loop -------------------------------------------------------------------
    num_steps = num_burnin + num_draws * num_steps_bw_draws
    T = num_draws
    loss_tr = torch.empty((CT, T), dtype=dtype, device=dev)
    star_tr = torch.empty((CT, T), dtype=dtype, device=dev)
    burn_tr = torch.empty((CT, num_burnin), dtype=dtype, device=dev)
    obs_tr: dict[str, list[Tensor]] = {k: [] for k in (observables or {})}
    mala_sum = torch.zeros(CT, dtype=torch.float64, device=dev)
    mala_cnt = 0
    thresh = divergence_threshold if divergence_threshold is not None else 1000.0 * max(spec.d, 1)
    diverged = torch.zeros(CT, dtype=torch.bool, device=dev)
    div_step = torch.full((CT,), -1, dtype=torch.long, device=dev)
    check_every = 10 if dev.type == "cpu" else 25  # divergence checks synchronise: not every step

    from tqdm.auto import tqdm

    if num_threads is None and dev.type == "cpu" and CT * (bsz or 1) * spec.d < 2_000_000:
        num_threads = 1
    if num_threads is not None:
        num_threads = check_int("num_threads", num_threads, 1)
    with _intra_op_threads(num_threads):
        show = progress if progress is not None else (sys.stderr.isatty() and num_steps * CT >= 20000)
        bar = tqdm(total=num_steps, disable=not show, desc="LLC", unit="step", leave=False)
        refresh = max(1, num_steps // 100)
        setup_seconds = time.perf_counter() - t_setup
        t0 = time.perf_counter()
        draw = 0
        for t in range(num_steps):
            batch, star = next_batch()
            w_t = state.params  # the draw: loss and observables are taken here
            state, info = smp.step(state, batch, rng)
            in_draws = t >= num_burnin
            if in_draws and (t - num_burnin) % num_steps_bw_draws == 0:
                loss_tr[:, draw] = info.loss
                star_tr[:, draw] = star
                if observables:
                    with torch.no_grad():
                        params_view = spec.unflatten(w_t)
                        for k, f in observables.items():
                            obs_tr[k].append(f(params_view).detach())
                draw += 1
            elif not in_draws:
                burn_tr[:, t] = info.loss
            if info.mala_accept is not None and in_draws:
                mala_sum += info.mala_accept.double().nan_to_num(0.0)
                mala_cnt += 1
            if t % check_every == 0 or t == num_steps - 1:
                bad = ~torch.isfinite(info.loss) | (nb * (info.loss - star) > thresh) | ~torch.isfinite(state.params).all(1)
                bad &= ~diverged
                if bool(bad.any()):
                    div_step = torch.where(bad, torch.full_like(div_step, t), div_step)
                    diverged |= bad
                    params = torch.where(diverged.unsqueeze(1), w_star, state.params)
                    v = state.precond_v
                    if v is not None:
                        v = torch.where(diverged.unsqueeze(1), torch.zeros_like(v), v)
                    state = state._replace(params=params, precond_v=v, cache=None)
            if show and (t % refresh == 0 or t == num_steps - 1):
                bar.update(t + 1 - bar.n)
                if draw > 0:
                    ok = ~diverged
                    run = float((nb * (loss_tr[ok, :draw] - star_tr[ok, :draw])).mean()) if ok.any() else float("nan")
                    el = time.perf_counter() - t0
                    bar.set_postfix(llc=f"{run:.3g}", draws_per_s=f"{draw / max(el, 1e-9):.0f}")
        bar.close()
        seconds = time.perf_counter() - t0

        # --- assemble results ------------------------------------------------------------
        div_idx = diverged.nonzero().flatten().tolist()
        if div_idx:
            steps = div_step[diverged].tolist()
            warnings.warn(
                "slt.estimate_llc: divergent chains (loss or parameters became NaN/inf or "
                f"nβ·ΔL > {thresh:g}) were stopped and excluded: "
                + ", ".join(f"checkpoint {i // C} chain {i % C} at step {s}" for i, s in zip(div_idx, steps))
                + ". Reduce step_size.",
                RuntimeWarning,
                stacklevel=2,
            )
        llc_tr = nb * (loss_tr - star_tr)
        # mask draws of divergent chains from their divergence on
        if div_idx:
            draw_step = num_burnin + torch.arange(T, device=dev) * num_steps_bw_draws
            dead = diverged.unsqueeze(1) & (draw_step.unsqueeze(0) >= div_step.unsqueeze(1))
            llc_tr = llc_tr.masked_fill(dead, float("nan"))
            loss_tr = loss_tr.masked_fill(dead, float("nan"))
        mala = (mala_sum / mala_cnt) if mala_cnt else torch.full((CT,), float("nan"), dtype=torch.float64)
        cfg_common = {
            "num_chains": C, "num_draws": num_draws, "num_burnin": num_burnin,
            "num_steps_bw_draws": num_steps_bw_draws, "step_size": eps, "step_size_auto": step_size is None,
            "nbeta": nb, "localization": gamma, "batch_size": None if full is not None else bsz,
            "n": n, "sampler": smp.name, "sampler_kwargs": dict(sampler_kwargs or {}), "device": str(dev),
            "dtype": str(dtype).replace("torch.", ""), "vectorize": vectorize, "path": path,
            "mala_every": mala_every, "divergence_threshold": thresh,
            "num_threads": num_threads, "control_variate": control_variate, "shared_batches": shared_batches or isinstance(source, LoaderSource), "num_params": spec.d,
            "num_checkpoints": K, "versions": _versions(),
        }
        results = []
        for k in range(K):
            sl = slice(k * C, (k + 1) * C)
            tr = llc_tr[sl].detach().cpu()
            per_chain = tr.mean(1)
            dead_k = diverged[sl].cpu()
            valid = ~dead_k
            per_chain = per_chain.masked_fill(dead_k, float("nan"))
            warn_list = []
            if valid.sum() == 0:
                mean = std = sem = float("nan")
                r = e = sem_c = sem_b = float("nan")
                warn_list.append("every chain diverged: no estimate; reduce step_size")
            else:
                pv = per_chain[valid]
                mean = float(pv.double().mean())
                std = float(pv.double().std()) if pv.numel() > 1 else float("nan")
                sem, sem_c, sem_b = llc_standard_error(pv, tr[valid])
                r = rhat(tr[valid]) if int(valid.sum()) > 1 else float("nan")
                e = ess(tr[valid])
            below = (tr < 0).double().mean(1)
            frac_below = float(below[valid].mean()) if valid.any() else float("nan")
            mala_k = mala[sl].cpu()
            mala_mean = float(mala_k[valid].mean()) if valid.any() and mala_cnt else float("nan")
            if frac_below > 0.5:
                warn_list.append(
                    f"{frac_below:.0%} of draws have a loss below L(w*): w* is probably not a local "
                    "minimum of the loss (train it further); λ̂ is then biased low"
                )
            if mala_cnt and mala_mean < 0.5:
                warn_list.append(f"MALA acceptance {mala_mean:.2f} is low: reduce step_size")
            if r == r and r > 1.1:
                warn_list.append(f"R-hat {r:.2f} > 1.1: chains disagree; run longer or check burn-in")
            diag = {
                "rhat": r, "ess": e, "mala_acceptance": mala_mean,
                "mala_acceptance_per_chain": [float(v) for v in mala_k],
                "frac_below_init": frac_below,
                "frac_below_init_per_chain": [float(v) for v in below],
                "divergent_chains": [i - k * C for i in div_idx if k * C <= i < (k + 1) * C],
                "divergence_step": [int(s) for i, s in zip(range(CT), div_step.tolist()) if k * C <= i < (k + 1) * C and s >= 0],
                "sem_chains": sem_c, "sem_batch_means": sem_b,
                "path": path, "path_reason": path_reason,
                "curvature": None if curvature is None else float(curvature[k]),
                "step_size_pilot_rounds": pilot_rounds,
                "minibatch_gradient_noise": None if grad_noise is None else float(grad_noise[k]),
                "seconds": seconds, "setup_seconds": setup_seconds,
                "chain_steps_per_second": num_steps * CT / max(seconds, 1e-12),
                "warnings": warn_list,
            }
            obs_k = {name: torch.stack(vals, 1)[sl].cpu() for name, vals in obs_tr.items() if vals}
            results.append(
                LLCResult(
                    llc_mean=mean, llc_std=std, llc_sem=sem, llc_per_chain=per_chain,
                    llc_trace=tr, loss_trace=loss_tr[sl].detach().cpu(),
                    loss_star_trace=star_tr[sl].detach().cpu(), init_loss=float(init_loss_k[k]),
                    nbeta=nb, step_size=eps, localization=gamma, sampler=smp.name, diagnostics=diag,
                    observables=obs_k, burnin_loss_trace=burn_tr[sl].detach().cpu(),
                    config={**cfg_common, "seed": seeds[k], "checkpoint": k},
                )
            )
            for w in warn_list:
                warnings.warn(f"slt.estimate_llc (checkpoint {k}): {w}", RuntimeWarning, stacklevel=2)
        return results if is_batch else results[0]

