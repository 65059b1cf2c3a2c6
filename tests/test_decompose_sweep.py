"""The LLC decomposition as a sweep: one job per subset S, then the Möbius inversion.

Library: :func:`slt.symmetry.estimate_subset` gives exactly the numbers of
:func:`slt.symmetry.decompose` for its subset, and :func:`slt.symmetry.combine`
of those numbers gives exactly its contributions; a missing subset makes NaN
exactly the contributions that need it.  Experiment: ``decompose.py -m
lattice=sweep`` (4 tiny jobs, a subprocess with ``SLT_RESULTS_DIR=tmp_path``)
writes ``decomposition.csv/.json/.png`` into the sweep folder, equal to the
in-process combine of the per-subset records and to the one-job run with the
same config; ``--combine`` names a failed and a missing subset (exit status 1).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments import records
from slt.symmetry import BlockPolarLocation, Cyclic, block_group, combine, decompose, estimate_subset, mobius_inversion
from slt.symmetry.decompose import SubsetEstimate, subset_mask

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

TINY = ["sampler.num_draws=40", "sampler.num_chains=2", "n=40"]


def test_combine_pairs_missing_subsets_and_keys():
    lam = {frozenset(): (2.0, 0.1), frozenset({"a"}): (1.5, 0.2), frozenset({"b"}): (1.5, 0.2), frozenset({"a", "b"}): (1.0, 0.3)}
    res = combine(lam, ["a", "b"])
    c, v = mobius_inversion(torch.tensor([2.0, 1.5, 1.5, 1.0]), torch.tensor([0.1, 0.2, 0.2, 0.3], dtype=F64).square())
    assert torch.equal(res.contribution, c) and torch.equal(res.contribution_sem, v.sqrt())
    assert res.complete and res.missing == () and bool(res.defined.all())
    # keys: bitmasks, names, index lists give the same lattice
    assert torch.equal(combine({0: (2.0, 0.1), "a": (1.5, 0.2), (1,): (1.5, 0.2), ("a", 1): (1.0, 0.3)},
                               ["a", "b"]).contribution, c)
    # {b} missing: λ̂({b}), c({b}) and c({a, b}) are NaN; c(∅), c({a}) are still reported
    part = combine({m: x for m, x in zip(range(4), lam.values()) if m != 2}, ["a", "b"])
    assert part.missing == (2,) and not part.complete
    assert part.defined.tolist() == [True, True, False, False]
    assert math.isnan(float(part.llc[2])) and torch.isnan(part.contribution[2:]).all()
    assert torch.equal(part.contribution[:2], c[:2])
    df = part.to_frame()
    assert df["missing"].tolist() == [False, False, True, False] and not df["distinguishable"][3]
    assert "missing: {b}" in str(part)
    part.plot()  # draws with NaN bars
    # a NaN estimate (a record with null) counts as missing
    assert combine({0: (2.0, None), 1: (1.0, 0.1)}, ["a"]).missing == (0,)
    with pytest.raises(ValueError, match="twice"):
        combine({1: (1.0, 0.1), frozenset({"a"}): (1.0, 0.1)}, ["a", "b"])
    with pytest.raises(ValueError, match="unknown group name"):
        combine({frozenset({"c"}): (1.0, 0.1)}, ["a", "b"])
    with pytest.raises(ValueError, match="names="):
        combine({0: (1.0, 0.1)})
    assert subset_mask(["b", "a"], ["a", "b"]) == 3 and subset_mask("b", ["a", "b"]) == 2
    with pytest.raises(ValueError, match="out of range"):
        subset_mask(4, ["a", "b"])


def test_estimate_subset_equals_decompose_cell():
    """Each subset as its own call gives decompose's numbers exactly (same seeds), quenched included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g, dtype=F64) + torch.tensor([1.0, 0, 1.0, 0], dtype=F64)
    rot = Cyclic(4, action="rotation")
    groups = {"rot1": block_group(rot, 0, 2), "rot2": block_group(rot, 1, 2)}
    kw = dict(nbeta=100.0, quenched=True, batch_size=None, num_chains=2, num_draws=30, step_size=1e-3, dtype=F64,
              progress=False, seed=4)
    factory = lambda: BlockPolarLocation(2, dtype=F64)  # noqa: E731
    whole = decompose(factory, x, groups, **kw)
    cells = {frozenset(s): estimate_subset(factory, x, groups, s, **kw) for s in ([], ["rot1"], ["rot2"], ["rot1", "rot2"])}
    assert [c.mask for c in cells.values()] == [0, 1, 2, 3] and cells[frozenset({"rot2"})].label == "{rot2}"
    res = combine(cells)
    for a, b in ((res, whole), (res.quenched if res.quenched else combine({k: c.quenched for k, c in cells.items()}),
                                whole.quenched)):
        assert torch.equal(a.llc, b.llc) and torch.equal(a.llc_sem, b.llc_sem)
        assert torch.equal(a.contribution, b.contribution) and torch.equal(a.contribution_sem, b.contribution_sem)
        assert torch.equal(a.invariance_gap, b.invariance_gap) and torch.equal(a.w_star, b.w_star)
    # a record round trip keeps the numbers exactly
    back = {k: SubsetEstimate.from_dict(json.loads(json.dumps(c.to_dict()))) for k, c in cells.items()}
    assert torch.equal(combine(back).contribution, whole.contribution)
    assert back[frozenset()].quenched.llc == whole.quenched.llc[0].item()


# ---------------------------------------------------------------------------
# the Hydra sweep
# ---------------------------------------------------------------------------
def _env(results: Path) -> dict[str, str]:
    return {**os.environ, "SLT_RESULTS_DIR": str(results), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            "MPLBACKEND": "Agg", "HYDRA_FULL_ERROR": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _decompose(args: list[str], results: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.decompose", *args], cwd=str(results), env=_env(results),
                          capture_output=True, text=True, timeout=300)


def _compose(overrides: list[str], hydra_cfg: bool = False):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from experiments import _runlib  # noqa: F401  (registers the config schemas)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("decompose", overrides=overrides, return_hydra_config=hydra_cfg)
    finally:
        GlobalHydra.instance().clear()


def test_lattice_preset_composes():
    pytest.importorskip("hydra")
    cfg = _compose(["lattice=sweep"], hydra_cfg=True)
    assert str(cfg.hydra.sweeper.params.subset) == "0,1,2,3" and cfg.subset is None
    assert "lattice" in cfg.hydra.job.config.override_dirname.exclude_keys
    assert "subset" not in cfg.hydra.job.config.override_dirname.exclude_keys
    assert _compose([]).subset is None and _compose(["subset=2"]).subset == 2
    from hydra.errors import ConfigCompositionException

    for bad in ("subset=abc", "model.cse=independent", "sampler.num_draw=3"):  # typed schema, at composition
        with pytest.raises(ConfigCompositionException):
            _compose([bad])


def test_lattice_sweep_end_to_end(tmp_path):
    """4 jobs + combine; equal to the in-process combine and to the one-job run; missing subsets named."""
    pytest.importorskip("hydra")
    p = _decompose(["-m", "lattice=sweep", *TINY], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "decompose"
    runs = sorted(d.name for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    assert [r.rsplit(",", 1)[1] for r in runs] == ["subset=0", "subset=1", "subset=2", "subset=3"]
    table = pd.read_csv(sweep / "decomposition.csv", float_precision="round_trip")  # exact floats on every pandas
    assert len(table) == 4 and list(table["subset"]) == ["∅", "{rot1}", "{rot2}", "{rot1, rot2}"]
    assert set(table["status"]) == {"ok"} and not table["missing"].any()
    assert (sweep / "decomposition.png").stat().st_size > 0
    report = json.loads((sweep / "decomposition.json").read_text())["lattices"]
    assert len(report) == 1 and report[0]["complete"] and report[0]["names"] == ["rot1", "rot2"]
    assert set(pd.read_csv(sweep / "summary.csv")["status"]) == {"ok"}

    # the in-process combine of the per-subset records gives the same numbers, exactly
    recs = {r: records.read_json(sweep / r / "result.json") for r in runs}
    pairs = {rec["metrics"]["mask"]: (rec["metrics"]["llc_mean"], rec["metrics"]["llc_sem"]) for rec in recs.values()}
    res = combine(pairs, ["rot1", "rot2"], z=3.0)
    for col, val in (("llc", res.llc), ("llc_sem", res.llc_sem), ("contribution", res.contribution),
                     ("contribution_sem", res.contribution_sem)):
        assert table[col].tolist() == val.tolist(), col

    # ... and so does the whole lattice in one job (subset=null) with the same config
    from experiments import decompose as dexp

    metrics, _ = dexp.run(_compose(TINY), tmp_path)
    one = pd.read_csv(tmp_path / "decomposition.csv", float_precision="round_trip")
    for col in ("llc", "llc_sem", "contribution", "contribution_sem", "invariance_gap"):
        assert one[col].tolist() == table[col].tolist(), col

    # {rot2} failed, {rot1, rot2} was never run: named, NaN where needed, the rest still reported
    bad = tmp_path / "bad"
    shutil.copytree(sweep, bad)
    r2, r3 = runs[2], runs[3]
    rec = records.read_json(bad / r2 / "result.json")
    (bad / r2 / "result.json").unlink()
    records.atomic_write_json(bad / r2 / "failed.json", {**rec, "status": "failed", "error": "RuntimeError: boom"})
    shutil.rmtree(bad / r3)
    c = subprocess.run([sys.executable, "-m", "experiments.decompose", "--combine", str(bad)], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert c.returncode == 1, c.stderr[-2000:]
    assert "subset {rot2} (subset=2) is failed" in c.stdout and "boom" in c.stdout
    assert "subset {rot1, rot2} (subset=3) is missing" in c.stdout  # listed in sweep.json, never started
    part = pd.read_csv(bad / "decomposition.csv")
    assert part["status"].tolist() == ["ok", "ok", "failed", "missing"]
    assert part["missing"].tolist() == [False, False, True, True]
    assert part["contribution"][2:].isna().all() and part["contribution"][:2].tolist() == table["contribution"][:2].tolist()
    miss = json.loads((bad / "decomposition.json").read_text())["lattices"][0]
    assert not miss["complete"] and [m["subset"] for m in miss["missing"]] == ["{rot2}", "{rot1, rot2}"]
    # the in-process function reports the same
    out = dexp.combine_sweep(bad)
    assert list(out.values())[0].missing == (2, 3)


@pytest.mark.slow
def test_lattice_sweep_joblib_launcher(tmp_path):
    """The jobs run in loky workers (the task pickled by value): same table as the basic launcher."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    p = _decompose(["-m", "lattice=sweep", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *TINY], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    table = pd.read_csv(tmp_path / "sweeps" / "decompose" / "decomposition.csv")
    assert set(table["status"]) == {"ok"} and len(table) == 4
    from experiments import decompose as dexp

    dexp.run(_compose(TINY), tmp_path)
    assert pd.read_csv(tmp_path / "decomposition.csv")["contribution"].tolist() == table["contribution"].tolist()
