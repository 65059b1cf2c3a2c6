r"""Induction heads in miniature: model, data and per-head scores for ``experiments/refined.py``.

* :class:`AttnOnlyTransformer` — token + learned positional embedding, ``n_layers``
  attention-only layers of :class:`torch.nn.MultiheadAttention` (``batch_first``, causal mask,
  no dropout, no biases, optional pre-LayerNorm) on a residual stream, unembedding.  A plain
  ``nn.Module`` (no optional dependency); :meth:`AttnOnlyTransformer.attention` returns the
  per-head attention patterns.
* :func:`make_induction_data` — sequences of a fixed random Markov chain (bigram statistics
  that the direct path can learn) in which one random segment is copied further on, so that
  inside the copy the next token is predictable by induction ("the token after the previous
  occurrence of the current token") and nowhere else beyond the bigram statistics.  Returns
  ``X`` (inputs), ``Y`` (next tokens) and the masks of the induction positions and of the
  copy offset.
* :func:`head_scores` — per head: the induction score (mean attention from position t of
  the copy to the position right after the previous occurrence of x_t) and the
  previous-token score (mean attention from t to t − 1); :func:`classify_heads`.
* :func:`token_ce` — per-sequence next-token cross-entropy over the positions whose label
  is not ``-100`` (its ``per_sample`` form is registered, so ``slt`` can minibatch it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IGNORE",
    "AttnOnlyTransformer",
    "make_induction_data",
    "token_ce",
    "head_scores",
    "classify_heads",
    "head_labels",
]

#: label of a position excluded from a loss (PyTorch's ``ignore_index`` convention)
IGNORE = -100


class AttnOnlyTransformer(nn.Module):
    """Attention-only transformer: ``embed + pos -> n_layers × (x + MHA(LN?(x))) -> LN? -> unembed``.

    Parameters
    ----------
    vocab, d_model, n_heads, n_layers, context
        Vocabulary size, residual width, heads per layer, layers, maximum sequence length.
    layer_norm
        Pre-LayerNorm before every attention layer and before the unembedding.
    generator
        Seeds the initialization (PyTorch's default inits, drawn under this generator).
    """

    def __init__(self, vocab: int = 48, d_model: int = 32, n_heads: int = 4, n_layers: int = 2, context: int = 32,
                 layer_norm: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.vocab, self.d_model, self.n_heads, self.n_layers, self.context = vocab, d_model, n_heads, n_layers, context
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        self.attn = nn.ModuleList(
            nn.MultiheadAttention(d_model, n_heads, dropout=0.0, bias=False, batch_first=True) for _ in range(n_layers))
        self.ln = nn.ModuleList(nn.LayerNorm(d_model) if layer_norm else nn.Identity() for _ in range(n_layers + 1))
        self.unembed = nn.Linear(d_model, vocab, bias=False)
        self.register_buffer("causal", torch.triu(torch.ones(context, context, dtype=torch.bool), 1), persistent=False)
        self._init(generator)

    @torch.no_grad()
    def _init(self, g: torch.Generator | None) -> None:
        s = 1.0 / math.sqrt(self.d_model)
        self.embed.weight.copy_(torch.randn(self.embed.weight.shape, generator=g))
        self.pos.copy_(torch.randn(self.pos.shape, generator=g))
        for a in self.attn:
            a.in_proj_weight.copy_(torch.randn(a.in_proj_weight.shape, generator=g) * s)
            a.out_proj.weight.copy_(torch.randn(a.out_proj.weight.shape, generator=g) * s)
        self.unembed.weight.copy_(torch.randn(self.unembed.weight.shape, generator=g) * s)

    def _resid(self, x: Tensor) -> Tensor:
        T = x.shape[-1]
        return self.embed(x) + self.pos[:T]

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, T, vocab)`` of token ids ``x`` ``(B, T)``."""
        h = self._resid(x)
        mask = self.causal[: x.shape[-1], : x.shape[-1]]
        for ln, a in zip(self.ln, self.attn):
            z = ln(h)
            h = h + a(z, z, z, attn_mask=mask, need_weights=False)[0]
        return self.unembed(self.ln[-1](h))

    def forward_chains(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``C`` parameter sets at once (``slt``'s native path): ``params`` ``name -> (C, *shape)``,
        tokens ``x`` ``(C, B, T)`` -> logits ``(C, B, T, vocab)``.

        The same function as :meth:`forward` (``nn.MultiheadAttention`` without biases, causal
        mask), written with batched matrix products over the chain dimension, so every chain of
        every checkpoint and restriction runs in one call instead of a Python loop over chains
        (``tests/test_refined_experiment.py`` checks the two agree).
        """
        C, B, T = x.shape
        E, H = self.d_model, self.n_heads
        hd = E // H
        emb = params["embed.weight"]  # (C, V, E)
        h = emb[torch.arange(C, device=x.device)[:, None, None], x] + params["pos"][:, None, :T]  # (C, B, T, E)

        def norm(z: Tensor, i: int) -> Tensor:
            if isinstance(self.ln[i], nn.Identity):
                return z
            ln = self.ln[i]
            z = F.layer_norm(z, (E,), eps=ln.eps)
            return z * params[f"ln.{i}.weight"][:, None, None] + params[f"ln.{i}.bias"][:, None, None]

        for i in range(self.n_layers):
            z = norm(h, i)
            qkv = torch.einsum("cbte,cfe->cbtf", z, params[f"attn.{i}.in_proj_weight"])
            q, k, v = (t.reshape(C * B, T, H, hd).transpose(1, 2) for t in qkv.split(E, -1))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (C B, H, T, hd)
            o = o.transpose(1, 2).reshape(C, B, T, E)
            h = h + torch.einsum("cbte,cfe->cbtf", o, params[f"attn.{i}.out_proj.weight"])
        return torch.einsum("cbte,cve->cbtv", norm(h, self.n_layers), params["unembed.weight"])

    @torch.no_grad()
    def attention(self, x: Tensor) -> Tensor:
        """Attention patterns ``(n_layers, B, n_heads, T, T)`` (query × key) on token ids ``x``."""
        h = self._resid(x)
        mask = self.causal[: x.shape[-1], : x.shape[-1]]
        pats = []
        for ln, a in zip(self.ln, self.attn):
            z = ln(h)
            out, w = a(z, z, z, attn_mask=mask, need_weights=True, average_attn_weights=False)
            pats.append(w)
            h = h + out
        return torch.stack(pats)


def head_labels(n_layers: int, n_heads: int) -> list[str]:
    """``l{layer}h{head}`` for every head, layer-major."""
    return [f"l{i}h{j}" for i in range(n_layers) for j in range(n_heads)]


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def markov_chain(vocab: int, concentration: float, generator: torch.Generator) -> Tensor:
    """A random transition matrix ``(vocab, vocab)``: rows ``softmax(N(0, 1) / concentration)``
    (smaller ``concentration``: peakier bigrams)."""
    logits = torch.randn(vocab, vocab, generator=generator, dtype=torch.float64) / concentration
    return torch.softmax(logits, -1)


def make_induction_data(n: int, vocab: int, context: int, min_len: int, max_len: int, *,
                        concentration: float = 1.0, generator: torch.Generator,
                        transitions: Tensor | None = None) -> dict[str, Tensor]:
    """``n`` sequences of ``context + 1`` tokens: a Markov chain with one segment copied.

    Each sequence is drawn from the chain ``transitions`` (``markov_chain(vocab, concentration)``
    when not given); then a segment of random length ``L ∈ [min_len, max_len]`` starting at a
    random ``a`` is copied to a random ``b ≥ a + L`` (``b + L ≤ context + 1``).

    Returns a dict: ``x`` ``(n, T)`` inputs (tokens ``0..T-1``, ``T = context``), ``y`` ``(n, T)``
    next tokens, ``induction`` ``(n, T)`` bool: positions ``t`` whose token and next token both lie
    in the copy (``b ≤ t ≤ b + L − 2``), so that induction predicts ``y_t``; ``offset`` ``(n,)``
    ``b − a`` (the previous occurrence of ``x_t`` in the copy is at ``t − offset``),
    ``transitions`` the chain.
    """
    if not 2 <= min_len <= max_len or 2 * max_len > context + 1:
        raise ValueError(f"need 2 <= min_len <= max_len and 2 * max_len <= context + 1, got {min_len}, {max_len}, {context}")
    P = markov_chain(vocab, concentration, generator) if transitions is None else transitions
    T1 = context + 1
    seq = torch.empty(n, T1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (n,), generator=generator)
    for t in range(1, T1):
        seq[:, t] = torch.multinomial(P[seq[:, t - 1]], 1, generator=generator).squeeze(1)
    L = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    ind = torch.zeros(n, context, dtype=torch.bool)
    offset = torch.empty(n, dtype=torch.long)
    for i in range(n):
        li = int(L[i])
        # a uniform pair a < b with b - a >= li, both segments inside the sequence
        a = int(u[i, 0] * (T1 - 2 * li + 1))
        b = a + li + int(u[i, 1] * (T1 - a - 2 * li + 1))
        seq[i, b:b + li] = seq[i, a:a + li]
        ind[i, b:b + li - 1] = True
        offset[i] = b - a
    return {"x": seq[:, :-1].contiguous(), "y": seq[:, 1:].contiguous(), "induction": ind, "offset": offset,
            "transitions": P}


# ---------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------
def _token_ce_per_sample(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sequence mean cross-entropy over the positions with ``y != IGNORE``: logits
    ``(..., T, V)``, labels ``(..., T)`` -> ``(...)``; a sequence with no such position gives 0."""
    valid = y != IGNORE
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.clamp_min(0).reshape(-1), reduction="none")
    ce = ce.reshape(y.shape) * valid
    return ce.sum(-1) / valid.sum(-1).clamp_min(1)


def token_ce(logits: Tensor, y: Tensor) -> Tensor:
    """Mean over sequences of the per-sequence next-token cross-entropy (positions labelled
    ``-100`` excluded).  ``token_ce.per_sample`` is its per-sequence form (for ``slt``)."""
    return _token_ce_per_sample(logits, y).mean()


token_ce.per_sample = _token_ce_per_sample  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# head scores
# ---------------------------------------------------------------------------
@torch.no_grad()
def head_scores(model: AttnOnlyTransformer, x: Tensor, induction: Tensor, offset: Tensor) -> dict[str, Tensor]:
    """Per-head attention scores ``(n_layers, n_heads)`` on ``x`` ``(B, T)``.

    ``induction``: mean attention from each position ``t`` of the copy (``induction`` mask, plus
    the copy's last token) to ``t − offset + 1``, the position right after the previous
    occurrence of ``x_t`` (Olsson et al. 2022's induction score); ``previous``: mean attention
    from ``t`` to ``t − 1`` over ``t ≥ 1``.
    """
    A = model.attention(x)  # (Ly, B, H, T, T)
    Ly, B, H, T, _ = A.shape
    # the copy's positions: the induction mask plus one (the copy's last token also attends back)
    copy = induction.clone()
    copy[:, 1:] |= induction[:, :-1]
    bi, ti = copy.nonzero(as_tuple=True)
    src = ti - offset[bi] + 1
    ind = A[:, bi, :, ti, src].mean(0)  # (P, Ly, H): separated advanced indices go first
    t = torch.arange(1, T)
    prev = A[:, :, :, t, t - 1].mean((1, 3))  # (Ly, H)
    return {"induction": ind.reshape(Ly, H), "previous": prev}


def classify_heads(induction: Tensor, previous: Tensor, threshold: float) -> list[str]:
    """``induction`` where the induction score exceeds ``threshold``, else ``previous-token``
    where the previous-token score does, else ``other`` (flattened layer-major, as :func:`head_labels`)."""
    out = []
    for i, p in zip(induction.reshape(-1).tolist(), previous.reshape(-1).tolist()):
        out.append("induction" if i > threshold else "previous-token" if p > threshold else "other")
    return out
