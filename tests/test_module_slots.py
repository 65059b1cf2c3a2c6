"""Substituting parameters through :class:`slt.evaluator.ModuleSlots` (exact tier): the same calls as
``torch.func.functional_call(..., tie_weights=True)`` — tied weights, buffers updated in place,
a module registered twice, an exception in ``forward`` — with the module left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from slt.evaluator import ModuleSlots, _call_module


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight  # tied, as a language model's embeddings
        self.scale = nn.Parameter(torch.tensor(1.5))  # 0-dim

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)) * self.scale)


def _fresh(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    out.update({n: b.clone() for n, b in model.named_buffers()})
    return out


def _snapshot(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in list(model.named_parameters(remove_duplicate=False))
            + list(model.named_buffers(remove_duplicate=False))]


@pytest.mark.parametrize("train", [False, True])
def test_slots_call_equals_functional_call_with_tied_weights_and_buffers(train):
    torch.manual_seed(0)  # test-side only
    m = Tied().train(train)
    ids = torch.randint(0, 7, (16,), generator=torch.Generator().manual_seed(2))
    before = _snapshot(m)
    values = [t.detach().clone() for _, t in before]
    p1, p2 = _fresh(m), _fresh(m)
    slots = ModuleSlots(m)
    assert slots.covers(p1) and [len(slots.slots[n]) for n in ("emb.weight",)] == [2]  # head.weight tied in
    out = _call_module(m, p1, ids, slots=slots)
    ref = functional_call(m, p2, (ids,))
    assert torch.equal(out, ref)
    # in training mode BatchNorm updates the running statistics it was given, not the module's
    assert torch.equal(p1["norm.running_mean"], p2["norm.running_mean"])
    assert train == (not torch.equal(p1["norm.running_mean"], m.norm.running_mean))
    after = _snapshot(m)  # the module holds its own tensors again, unchanged
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))
    assert all(torch.equal(t, v) for (_, t), v in zip(after, values))
    assert m.head.weight is m.emb.weight


def test_a_module_registered_twice_and_an_exception_leave_the_module_as_it_was():
    lin = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = lin
            self.b = lin  # one module under two names: one slot

        def forward(self, x):
            if x.shape[0] == 0:
                raise RuntimeError("no samples")
            return self.b(self.a(x))

    m = Twice()
    slots = ModuleSlots(m)
    assert slots.slots["a.weight"] == [(lin._parameters, "weight")] and "b.weight" not in slots.slots
    p = {"a.weight": torch.eye(3), "a.bias": torch.zeros(3)}
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(slots.substitute(m, p, (x,), {}), x)
    w = lin.weight
    with pytest.raises(RuntimeError, match="no samples"):
        slots.substitute(m, p, (x[:0],), {})
    assert lin.weight is w and isinstance(lin.weight, nn.Parameter)


def test_names_it_does_not_know_go_to_functional_call():
    m = nn.Linear(2, 1)
    slots = ModuleSlots(m)
    p = {"weight": torch.zeros(1, 2), "nonsense": torch.zeros(1)}
    assert not slots.covers(p)
    x = torch.ones(4, 2)
    assert torch.equal(_call_module(m, p, x, slots=slots), functional_call(m, p, (x,)))  # what it does
    assert not hasattr(m, "nonsense")
