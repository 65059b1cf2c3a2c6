r"""Run an LLC-estimation job through the peer library devinterp 2.0.1.

A thin adapter: it translates our job description (model at :math:`w^*`, data,
mean loss, :math:`n\beta`, :math:`\gamma`, step size :math:`\epsilon`, chains,
draws, batch size) into one call of devinterp's entry point
``devinterp.slt.llc.llc`` and hands back devinterp's own numbers.  It does not
re-implement or "fix" anything inside devinterp; the few places where devinterp
does something that matters for comparing estimators are documented below, and
where the adapter has to make a choice (the init-loss batches) it is stated.

Everything below was read from the installed devinterp 2.0.1 source
(``site-packages/devinterp``); ``file:line`` references are to that version.

What ``devinterp.slt.llc.llc`` takes
------------------------------------
``llc(model, dataset, observables, *, lr, n_beta, loss_fn=None, **kwargs)``
(``slt/llc.py:23``) calls ``slt.sampling.sample`` and then ``compute_llc``.

* ``dataset`` is a Hugging Face ``datasets.Dataset`` with an ``"input_ids"``
  column.  Rows must have length ``>= 2``: the sampler is written for
  next-token prediction, ``context_length = len(dataset[0]["input_ids"]) - 1``
  (``slt/sampling.py:153``), and every stored loss has a ``token_pos`` axis of
  that length.  It is iterated by a ``torch.utils.data.DataLoader`` with
  ``shuffle=True, drop_last=True`` (``slt/sampler.py:140-146``), so it must be
  in torch format (``Dataset.with_format("torch")``).
* ``loss_fn(model, input_ids) -> (batch, seq-1)`` is a *per-token* loss; the
  gradient step uses ``_loss.mean()`` (``slt/sampler.py:214``).
* ``observables`` is a required dict (we pass ``{}``).

So a non-language model needs a wrapper: we build a dataset whose row ``i`` is
``input_ids = [i, i]`` (context length 1), and a ``loss_fn`` that reads the
sample index from column 0, evaluates our *mean* batch loss
``loss_fn(model(X[idx]), T[idx])`` and broadcasts that scalar to shape
``(B, 1)``.  Since devinterp only ever takes means of this tensor, the
gradient and every recorded mean are exactly those of our mean batch loss.
(The per-sample entries of devinterp's ``sampling_loss_micro`` are therefore
the batch mean repeated, not per-sample losses.)

The chain: parameter mapping
----------------------------
``sample`` builds ``SGMCMC.sgld`` (``"sgmcmc_sgld"``, ``slt/config.py:26``) with
``nbeta=n_beta, lr=lr, localization=localization, noise_level=1.0,
weight_decay=0.0`` (``slt/sampling.py:271-280``).  Its step
(``optim/sgmcmc.py``) is::

    d_p = grad_coef * p.grad * nbeta                     # :478
    d_p += prior_coef * localization * (p - p0)          # :507, optim/prior.py:139
    p  += -0.5 * lr * d_p                                # :514
    p  += sqrt(lr) * N(0, noise_level**2)                # :517-530

with identity preconditioner (all coefficients 1), ``p.grad = ∇ mean(loss)``,
i.e. :math:`\nabla L_B(w)`, and ``p0`` the parameters when the optimizer is
built, i.e. :math:`w^*` (``optim/prior.py:111``; the model is a fresh deepcopy,
``slt/sampler.py:148``).  Hence, with ``noise_level = 1``,

.. math::

    \Delta w = \tfrac{\mathrm{lr}}{2}\bigl[-n\beta\,\nabla L_B(w)
               - \gamma (w - w^*)\bigr] + \mathcal N(0,\ \mathrm{lr}\, I),

which is our SGLD step with **lr = ε (step_size), n_beta = nβ, localization =
γ** — no factor of 2 anywhere: the drift is ``lr/2`` times the gradient of
:math:`U = n\beta L + \tfrac\gamma2\lVert w-w^*\rVert^2` and the noise
*variance* is ``lr``.  The chain targets
:math:`p(w) \propto \exp(-n\beta L_n(w) - \tfrac\gamma2 \lVert w-w^*\rVert^2)`.
(The deprecated ``devinterp.optim.SGLD`` has the same parameterisation,
``optim/sgld.py:236-239``, but ``llc`` does not use it.)

``sampler="rmsprop_sgld"`` selects ``SGMCMC.rmsprop_sgld``
(``optim/sgmcmc.py:714``; ``optim/preconditioner.py:164-182``):
``V ← αV + (1-α) g²`` with ``g = p.grad`` (the *unscaled* loss gradient, not
``nβ g``), ``G = 1/(√V + eps)``, drift ``-(lr/2) G ⊙ ∇U`` and noise
``√(lr G) ⊙ N(0, 1)``; defaults ``alpha = 0.99``, ``eps = 0.1``, no
:math:`\Gamma` correction term, V updated at every step (burn-in and draws): slt's
``rmsprop_sgld(freeze=False)``; slt's default freezes G at the end of burn-in.  The same (ε, nβ, γ)
mapping applies.

Noise and data seeds: chain ``c`` reseeds the *global* torch / numpy /
``random`` RNGs with ``init_seed + c`` (``slt/sampler.py:155``,
``slt/sampling.py:359``) and draws the noise from the global torch RNG; every
chain sees the same minibatch sequence (``match_sampling_input_ids_across_chains``
defaults to True, dataloader seeded with ``init_seed``).  The loader is wrapped
in ``itertools.cycle`` (``slt/sampler.py:96``), which replays the *first epoch's*
shuffle forever: with ``batch_size < n`` the minibatch sequence is periodic
with period ``n // batch_size``, and the ``n mod batch_size`` samples dropped by
``drop_last`` are never seen.  The adapter restores the caller's global RNG
states afterwards.

How devinterp computes the LLC (``compute_llc``, ``slt/llc.py:64-107``)
-------------------------------------------------------------------------
* **Loss recorded before the step.**  At step ``t`` the batch loss
  :math:`L_{B_t}(w_t)` is computed, recorded (``micro_callback``) and then the
  SGLD step is taken (``slt/sampler.py:205-220``).  So the first entry of the
  trace is the loss at :math:`w^*` itself.
* **Every step counts, burn-in included.**  ``loss_trace[c, t]`` (shape
  ``(C, num_burnin + num_draws * num_steps_bw_draws)``) is the loss at *every*
  step, and ``llc_per_chain = n_beta * (loss_trace.mean("step") - init_loss)``:
  burn-in steps are *not* discarded and ``num_steps_bw_draws`` does not thin
  anything (draws only matter for observables).  We additionally return
  ``llc_per_chain_post_burnin`` computed from ``loss_trace[:, num_burnin:]``.
* **init_loss** (``_write_init_loss``, ``slt/sampling.py:547-632``) is the mean
  over ``num_init_loss_batches`` minibatches of the same cycled, shuffled,
  ``drop_last`` loader at :math:`w^*` (model in ``train()`` mode, no grad);
  devinterp's default is 32 batches.  It is *not* a control variate on the
  sampled batches: the estimator is :math:`n\beta(\overline{L_{B_t}(w_t)} -
  \widehat{L}(w^*))` with a separate estimate of :math:`L(w^*)`.  This adapter
  sets ``num_init_loss_batches = n // batch_size`` (exactly one pass of the
  loader) unless told otherwise, so with ``batch_size`` dividing ``n`` the
  subtracted value is the full-data :math:`L_n(w^*)`; otherwise it misses the
  ``n mod batch_size`` samples of the first-epoch shuffle.  Our own
  full-data :math:`L_n(w^*)` is returned as ``init_loss_full`` for comparison.
* **Precision.**  Losses are stored in zarr as ``float32``
  (``slt/sampling.py:42``) whatever the model dtype, and ``llc_mean`` is a
  float32 reduction; with large ``nβ`` the rounding of :math:`L` near
  :math:`L(w^*)` is amplified by ``nβ``.
* ``llc_std`` is ``xarray.DataArray.std()`` over chains, i.e. the population
  standard deviation (``ddof=0``), not the standard error.

Other behaviour worth knowing: the model is put in ``train()`` mode for both the
init loss and the sampling (dropout / batch-norm models behave accordingly);
results are written to a zarr store (here a temporary directory, deleted
afterwards); an existing ``output_path`` is treated as a cache and returned
without sampling (``slt/sampling.py:222``), which is why the adapter always uses
a fresh path.

Cost structure (for timing comparisons): chains run one after another, one
gradient evaluation per step, in a Python loop.  Besides the per-step cost
(forward, backward, optimizer step, buffered zarr write of the step's losses and
``input_ids``), each chain pays a fixed cost: two full ``gc.collect()`` calls
(``slt/sampler.py:192,245``; their cost grows with the number of live Python
objects in the *calling* process) and one pass of the Hugging Face dataset
through the ``DataLoader`` before ``cycle`` caches it.  ``seconds`` includes all
of that, plus devinterp's init-loss pass.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import tempfile
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["devinterp_llc", "DEVINTERP_VERSION"]

DEVINTERP_VERSION = "2.0.1"
"""The devinterp version whose source this adapter was written against."""

_INSTALL_HINT = (
    'devinterp_llc needs the optional peer library devinterp=={v}; install it with '
    '`pip install "slt[devinterp]"`.'
).format(v=DEVINTERP_VERSION)

_SAMPLERS = {"sgld": "sgmcmc_sgld", "rmsprop_sgld": "rmsprop_sgld"}


def _import_devinterp():
    try:
        from datasets import Dataset
        from devinterp.slt import sampler as di_sampler
        from devinterp.slt.llc import llc as di_llc
    except ImportError as exc:  # pragma: no cover - exercised via monkeypatch in tests
        raise ImportError(_INSTALL_HINT) from exc
    try:
        from importlib.metadata import version

        found = version("devinterp")
    except Exception:  # pragma: no cover - metadata missing
        found = None
    if found is not None and found != DEVINTERP_VERSION:
        warnings.warn(
            f"slt.peers.devinterp was written against devinterp {DEVINTERP_VERSION}, "
            f"found {found}; the parameter mapping may no longer hold.",
            stacklevel=3,
        )
    return Dataset, di_sampler, di_llc


@contextmanager
def _preserve_global_rngs(device: str):
    """devinterp reseeds the global torch / numpy / random RNGs per chain."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextmanager
def _quiet_progress(di_sampler, progress: bool):
    """devinterp draws a tqdm bar per chain (``slt/sampler.py:195``); silence it."""
    if progress:
        yield
        return
    original = di_sampler.trange
    di_sampler.trange = functools.partial(original, disable=True)
    try:
        yield
    finally:
        di_sampler.trange = original


def devinterp_llc(
    model: nn.Module,
    X: Tensor,
    Y: Tensor | None,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    nbeta: float,
    step_size: float,
    localization: float,
    num_chains: int,
    num_draws: int,
    num_burnin: int = 0,
    batch_size: int,
    seed: int = 0,
    sampler: str = "sgld",
    device="cpu",
    num_steps_bw_draws: int = 1,
    num_init_loss_batches: int | None = None,
    rmsprop_alpha: float | None = None,
    rmsprop_eps: float | None = None,
    progress: bool = False,
    scratch_dir: str | None = None,
) -> dict[str, Any]:
    r"""Estimate the LLC at ``model``'s current parameters with devinterp 2.0.1.

    Samples the localized tempered posterior
    :math:`p(w) \propto \exp(-n\beta L_n(w) - \tfrac\gamma2\lVert w-w^*\rVert^2)`
    with devinterp's SGLD (or RMSProp-SGLD) and returns devinterp's estimate
    :math:`\hat\lambda = n\beta(\overline{L_{B_t}(w_t)} - L(w^*))`.  See the
    module docstring for the parameter mapping (``lr = step_size``,
    ``n_beta = nbeta``, ``localization = localization``, ``noise_level = 1``) and
    for exactly how devinterp forms the estimate (loss recorded *before* each
    step, burn-in *included* in the average, separate ``init_loss``).

    Parameters
    ----------
    model
        ``nn.Module`` whose current parameters are :math:`w^*`.  Not modified
        (a deepcopy is sampled; all parameters are sampled).
    X, Y
        Data, first dimension ``n``.  ``Y=None`` means a density model: the
        target is ``X``.
    loss_fn
        ``loss_fn(model(X[idx]), target[idx]) -> scalar`` mean loss over the
        batch.
    nbeta, step_size, localization
        :math:`n\beta`, the SGLD step size :math:`\epsilon` (noise variance
        :math:`\epsilon`, drift :math:`\tfrac\epsilon2\nabla U`) and
        :math:`\gamma`.
    num_chains, num_draws, num_burnin, num_steps_bw_draws
        Passed to devinterp as ``num_chains``, ``num_draws``,
        ``num_burnin_steps`` and ``num_steps_bw_draws``; each chain runs
        ``num_burnin + num_draws * num_steps_bw_draws`` steps, all of which
        enter devinterp's LLC.
    batch_size
        Minibatch size (``<= n``; ``n`` means full-batch gradients).
    seed
        devinterp's ``init_seed``: chain ``c`` uses noise seed ``seed + c``; the
        data order is seeded by ``seed`` and shared by all chains.
    sampler
        ``"sgld"`` (devinterp ``"sgmcmc_sgld"``) or ``"rmsprop_sgld"``
        (optionally with ``rmsprop_alpha`` / ``rmsprop_eps``, devinterp defaults
        0.99 / 0.1).
    device
        Device for devinterp's ``device`` argument; data are moved there.
    num_init_loss_batches
        Minibatches averaged for devinterp's ``init_loss``.  Default
        ``n // batch_size`` (one pass of the loader: the full-data loss when
        ``batch_size`` divides ``n``); devinterp's own default is 32.
    progress
        Show devinterp's per-chain tqdm bars.
    scratch_dir
        Parent directory for devinterp's temporary zarr store (default: the
        system temp directory).  devinterp writes every step's losses and
        ``input_ids`` there (``C · T · B`` rows); a RAM-backed directory such as
        ``/dev/shm`` makes writing and the clean-up cheaper.

    Returns
    -------
    dict with

    ``llc_mean``, ``llc_std``
        devinterp's ``llc_mean`` and ``llc_std`` (population std over chains,
        ``ddof=0``), as Python floats.
    ``llc_per_chain``
        ``np.ndarray`` ``(C,)``: :math:`n\beta(\text{mean}_t L_{B_t}(w_t) -
        \text{init\_loss})` over *all* steps.
    ``llc_per_chain_post_burnin``
        ``(C,)``: the same with the first ``num_burnin`` steps dropped (not a
        devinterp output; computed here from ``loss_trace``).
    ``loss_trace``
        ``np.ndarray`` ``(C, T)``, ``T = num_burnin + num_draws *
        num_steps_bw_draws``: batch loss at every step, recorded before the
        step (``loss_trace[:, 0]`` is at :math:`w^*`).
    ``init_loss``
        devinterp's ``init_loss`` (see ``num_init_loss_batches``).
    ``init_loss_full``
        :math:`L_n(w^*)` on all ``n`` samples, computed here (not timed).
    ``seconds``
        Wall time of the ``devinterp.slt.llc.llc`` call only (includes
        devinterp's init-loss pass and its zarr writes).
    ``raw``
        The ``xarray.Dataset`` returned by devinterp, loaded into memory.
    ``config``
        The keyword arguments passed to devinterp.
    """
    Dataset, di_sampler, di_llc = _import_devinterp()

    if sampler not in _SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(_SAMPLERS)}, got {sampler!r}")
    if sampler != "rmsprop_sgld" and (rmsprop_alpha is not None or rmsprop_eps is not None):
        raise ValueError("rmsprop_alpha / rmsprop_eps only apply to sampler='rmsprop_sgld'")
    n = int(X.shape[0])
    if Y is not None and int(Y.shape[0]) != n:
        raise ValueError(f"X and Y disagree on n: {n} vs {int(Y.shape[0])}")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, n={n}], got {batch_size}")
    for name, value in (("num_chains", num_chains), ("num_draws", num_draws),
                        ("num_steps_bw_draws", num_steps_bw_draws)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_burnin < 0:
        raise ValueError(f"num_burnin must be >= 0, got {num_burnin}")
    if num_init_loss_batches is None:
        num_init_loss_batches = n // batch_size

    device = str(device)
    net = copy.deepcopy(model).to(device)
    Xd = X.detach().to(device)
    Td = Xd if Y is None else Y.detach().to(device)

    def per_token_loss(m: nn.Module, input_ids: Tensor) -> Tensor:
        # Row i of the dataset is [i, i]; devinterp wants (B, seq-1) = (B, 1).
        idx = input_ids[:, 0].to(Xd.device)
        loss = loss_fn(m(Xd[idx]), Td[idx])
        if loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar mean loss, got shape {tuple(loss.shape)}"
            )
        return loss.reshape(1, 1).expand(idx.shape[0], 1)

    ids = np.arange(n, dtype=np.int64)
    dataset = Dataset.from_dict({"input_ids": np.stack([ids, ids], axis=1)}).with_format(
        "torch"
    )

    kwargs: dict[str, Any] = dict(
        lr=float(step_size),
        n_beta=float(nbeta),
        localization=float(localization),
        noise_level=1.0,
        llc_weight_decay=0.0,
        num_chains=int(num_chains),
        num_draws=int(num_draws),
        num_burnin_steps=int(num_burnin),
        num_steps_bw_draws=int(num_steps_bw_draws),
        batch_size=int(batch_size),
        num_init_loss_batches=int(num_init_loss_batches),
        gradient_accumulation_steps=1,
        init_seed=int(seed),
        sampling_method=_SAMPLERS[sampler],
        device=device,
    )
    if rmsprop_alpha is not None:
        kwargs["rmsprop_alpha"] = float(rmsprop_alpha)
    if rmsprop_eps is not None:
        kwargs["rmsprop_eps"] = float(rmsprop_eps)

    with tempfile.TemporaryDirectory(prefix="slt_devinterp_", dir=scratch_dir) as tmp:
        with _preserve_global_rngs(device), _quiet_progress(di_sampler, progress):
            t0 = time.perf_counter()
            raw = di_llc(
                net,
                dataset,
                {},
                loss_fn=per_token_loss,
                output_path=os.path.join(tmp, "samples.zarr"),
                **kwargs,
            )
            seconds = time.perf_counter() - t0
        raw = raw.load()  # detach from the zarr store before it is deleted

    with torch.no_grad():
        was_training = net.training
        net.train()  # devinterp evaluates in train mode; match it
        init_loss_full = float(loss_fn(net(Xd), Td))
        net.train(was_training)

    loss_trace = np.asarray(raw["loss_trace"].values, dtype=np.float64)
    init_loss = float(raw["init_loss"].values)
    post = loss_trace[:, num_burnin:]
    return {
        "llc_mean": float(raw["llc_mean"].values),
        "llc_std": float(raw["llc_std"].values),
        "llc_per_chain": np.asarray(raw["llc_per_chain"].values, dtype=np.float64),
        "llc_per_chain_post_burnin": float(nbeta) * (post.mean(axis=1) - init_loss),
        "loss_trace": loss_trace,
        "init_loss": init_loss,
        "init_loss_full": init_loss_full,
        "seconds": seconds,
        "raw": raw,
        "config": dict(kwargs),
    }
