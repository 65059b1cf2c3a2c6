"""experiments/refined.py: refined LLCs of attention heads over training (tiny sizes: plumbing, not estimates).

The model's batched forward agrees with its own ``forward``; the data put a copied segment where the
induction mask says; a tiny run records the per-head and per-data-set LLCs for every checkpoint,
writes ``traces.npz`` and is skipped when rerun; bad values fail before any work; the figure is made
from a synthetic run record.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.errors import ConfigCompositionException  # noqa: E402

from experiments import _induction as ind  # noqa: E402
from experiments import _runlib, records  # noqa: E402

TINY = [
    "model.vocab=12", "model.d_model=8", "model.n_heads=2", "model.context=12",
    "data.n=48", "data.n_eval=16", "data.min_len=3", "data.max_len=6",
    "training.steps=30", "training.num_checkpoints=3", "training.first_checkpoint=5", "training.log_every=10",
    "sampler.num_chains=2", "sampler.num_draws=6", "sampler.num_burnin=2", "sampler.batch_size=4",
]


def _compose(overrides=()):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=_runlib.CONF_DIR, version_base="1.3"):
            return compose("refined", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("layer_norm", [True, False])
def test_forward_chains_is_forward(layer_norm):
    g = torch.Generator().manual_seed(0)
    models = [ind.AttnOnlyTransformer(11, 8, 2, 2, 10, layer_norm, generator=g) for _ in range(3)]
    x = torch.randint(0, 11, (3, 4, 10), generator=g)
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
              for n, _ in models[0].named_parameters()}
    with torch.no_grad():
        batched = models[0].forward_chains(params, x)
        one = torch.stack([m(xc) for m, xc in zip(models, x)])
    # float32, a few sums of ~10-30 terms of O(1): the two paths differ by rounding only
    assert batched.shape == (3, 4, 10, 11)
    assert torch.allclose(batched, one, atol=1e-5, rtol=1e-5)


def test_induction_data_copies_a_segment():
    g = torch.Generator().manual_seed(1)
    d = ind.make_induction_data(64, 10, 16, 3, 8, generator=g)
    X, Y, M, off = d["x"], d["y"], d["induction"], d["offset"]
    assert X.shape == Y.shape == M.shape == (64, 16) and torch.equal(X[:, 1:], Y[:, :-1])
    b, t = M.nonzero(as_tuple=True)
    # at an induction position, the token and the next one repeat the earlier occurrence
    assert torch.equal(X[b, t], X[b, t - off[b]]) and torch.equal(Y[b, t], Y[b, t - off[b]])
    assert ((M.sum(1) >= 2) & (M.sum(1) <= 7)).all()  # L - 1 positions, L in [3, 8]
    with pytest.raises(ValueError, match="max_len"):
        ind.make_induction_data(4, 10, 8, 3, 6, generator=g)


def test_token_ce_ignores_masked_positions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 3, 5), generator=g)
    keep = torch.rand(2, 3, 5, generator=g) > 0.4
    ym = torch.where(keep, y, torch.full_like(y, ind.IGNORE))
    per = ind.token_ce.per_sample(logits, ym)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), y.reshape(-1), reduction="none").reshape(2, 3, 5)
    ref = (ce * keep).sum(-1) / keep.sum(-1).clamp_min(1)
    assert per.shape == (2, 3) and torch.allclose(per, ref)
    assert torch.allclose(ind.token_ce(logits[0], ym[0]), ref[0].mean())


def test_head_scores_of_known_patterns(monkeypatch):
    """A head attending to t - 1 has previous-token score 1; one attending to the token after the
    previous occurrence has induction score 1; classify_heads names them."""
    g = torch.Generator().manual_seed(3)
    d = ind.make_induction_data(8, 10, 12, 3, 6, generator=g)
    m = ind.AttnOnlyTransformer(10, 8, 2, 1, 12, generator=g)
    B, T = d["x"].shape
    A = torch.zeros(1, B, 2, T, T)
    A[0, :, 0, torch.arange(1, T), torch.arange(T - 1)] = 1.0  # head 0: previous token
    copy = d["induction"].clone()
    copy[:, 1:] |= d["induction"][:, :-1]
    b, t = copy.nonzero(as_tuple=True)
    A[0, b, 1, t, t - d["offset"][b] + 1] = 1.0  # head 1: induction
    monkeypatch.setattr(m, "attention", lambda x: A)
    s = ind.head_scores(m, d["x"], d["induction"], d["offset"])
    assert s["previous"][0, 0] == 1.0 and s["induction"][0, 1] == 1.0
    assert ind.classify_heads(s["induction"], s["previous"], 0.5) == ["previous-token", "induction"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # early checkpoints are not minima; 6 draws: short chains
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_run_records_every_head_and_data_set_and_resumes(tmp_path):
    pytest.importorskip("slt.restrict")
    from experiments import refined

    cfg = _compose(TINY)
    rec = _runlib.execute(refined.run, cfg, tmp_path / "run", ["seed=0"], refined._validate)
    m = rec["metrics"]
    K = len(m["ckpt_step"])
    assert m["ckpt_step"][0] == 0 and m["ckpt_step"][-1] == 30 and K == 3
    assert m["heads"] == ["l0h0", "l0h1", "l1h0", "l1h1"] and len(m["head_class"]) == 4
    for key in ("head_rllc_mean", "head_rllc_sem", "head_induction_score", "head_previous_score"):
        assert np.asarray(m[key]).shape == (4, K), key
    assert all(math.isfinite(v) for row in m["head_rllc_mean"] for v in row)
    assert set(m["data_llc_mean"]) == {"induction", "other", "all"}
    assert all(len(v) == K for v in m["data_llc_mean"].values())
    assert m["curve_step"] == [0, 10, 20, 30] and len(m["curve_loss_induction"]) == 4
    assert m["nbeta"] == cfg.sampler.nbeta and m["localization"] == cfg.sampler.localization
    assert rec["config"]["model"]["d_model"] == 8 and {"slt", "torch"} <= set(rec["versions"])
    tr = np.load(tmp_path / "run" / "traces.npz")
    assert tr["head_llc_per_chain"].shape == (4, K, 2) and tr["data_induction_llc_per_chain"].shape == (K, 2)
    # the summary table flattens the records; the figure reads it
    assert records.collect(tmp_path, write=False)["status"].tolist() == ["ok"]
    # rerun: skipped (the record is returned as written)
    again = _runlib.execute(refined.run, cfg, tmp_path / "run", ["seed=0"], refined._validate)
    assert again["started"] == rec["started"]


@pytest.mark.parametrize("override, key", [
    ("data.max_len=7", "data.max_len"),           # 2 * 7 > context + 1 = 13
    ("model.n_heads=3", "model.d_model"),        # 8 is not a multiple of 3
    ("training.first_checkpoint=99", "training.first_checkpoint"),
    ("score_threshold=1.5", "score_threshold"),
    ("sampler.sampler=sgnht", "sampler.sampler"),
])
def test_invalid_value_fails_before_any_work(tmp_path, override, key):
    from experiments import refined

    def never(*a):
        raise AssertionError("the job started working despite an invalid value")

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _runlib.execute(never, _compose([*TINY, override]), tmp_path / "run", [override], refined._validate)
    assert "Traceback" in json.loads((tmp_path / "run" / "failed.json").read_text())["traceback"]


def test_misspelled_key_is_rejected_at_composition():
    with pytest.raises(ConfigCompositionException):
        _compose(["training.stepz=3"])


def write_synthetic_refined_record(root) -> None:
    """A record shaped like a run's of experiments.refined, with its summary table (also used by
    tests/test_figures.py)."""
    K, steps = 6, [0, 10, 30, 100, 300, 1000]
    x = np.log1p(np.asarray(steps, float))
    heads = ["l0h0", "l0h1", "l1h0", "l1h1"]
    classes = ["previous-token", "other", "induction", "induction"]
    rllc = [list(0.3 * x + i) for i in range(4)]
    metrics = {
        "ckpt_step": steps, "ckpt_loss": list(4 - 0.2 * x), "heads": heads, "head_class": classes,
        "head_rllc_mean": rllc, "head_rllc_sem": [[0.1] * K] * 4,
        "head_induction_score": [list(np.linspace(0.05, v, K)) for v in (0.1, 0.05, 0.7, 0.6)],
        "head_previous_score": [list(np.linspace(0.1, v, K)) for v in (0.6, 0.1, 0.05, 0.05)],
        "head_frac_below_init": [[0.6] + [0.1] * (K - 1)] * 4,  # step 0: hollow markers
        "ckpt_loss_induction": list(3.5 - 0.4 * x),
        "data_frac_below_init": {"induction": [0.1] * K, "other": [0.1] * (K - 1) + [0.7], "all": [0.1] * K},
        "data_llc_mean": {"induction": list(x), "other": list(0.5 * x), "all": list(1.2 * x)},
        "data_llc_sem": {"induction": [0.1] * K, "other": [0.1] * K, "all": [0.1] * K},
        "curve_step": list(range(0, 1001, 50)),
        "curve_loss": list(np.linspace(4, 2.7, 21)),
        "curve_loss_induction": list(np.r_[np.full(10, 3.5), np.linspace(3.5, 0.6, 5), np.full(6, 0.6)]),
        "curve_loss_other": list(np.linspace(4, 3.7, 21)),
        "nbeta": 100.0, "localization": 100.0,
    }
    rec = {"status": "ok", "name": "refined", "seed": 0, "overrides": ["seed=0"], "device": "cpu", "files": [],
           "config": {"name": "refined", "seed": 0, "sampler": {"num_chains": 2, "num_draws": 200}},
           "metrics": metrics}
    records.atomic_write_json(root / "sweeps" / "refined" / "seed=0" / records.RESULT_FILE, rec)
    records.collect(root / "sweeps" / "refined")  # the figure reads the summary table


def test_refined_figure_from_a_synthetic_record(tmp_path):
    """The figure (figures.fig_refined, registered as 'refined') from a record shaped like a run's."""
    from experiments import figures

    write_synthetic_refined_record(tmp_path)
    assert "refined" in figures.FIGURES
    assert figures.main(["refined", "--results", str(tmp_path), "--out", str(tmp_path / "f")]) == 0
    for ext in ("png", "pdf"):
        f = tmp_path / "f" / f"refined.{ext}"
        assert f.exists() and f.stat().st_size > 1000
