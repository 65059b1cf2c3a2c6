"""Hydra experiments: configs compose and instantiate, bad overrides are rejected
readably, multiruns write run records and a summary, reruns skip finished runs,
failed jobs are recorded, the joblib launcher runs and the Slurm preset composes.

End-to-end runs are subprocesses with ``SLT_RESULTS_DIR=tmp_path`` and tiny
sizes (a few hundred samples, tens of draws): they test the plumbing, not the
estimates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

hydra = pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.errors import ConfigCompositionException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import slt  # noqa: E402
from experiments import _runlib, records  # noqa: E402

TINY_TMS = [
    "data.n=300", "train.steps=20", "sampler.num_draws=20", "sampler.num_burnin=5", "sampler.num_chains=2",
]
TINY_LLC = [
    "data.n=200", "train.steps=20", "sampler.num_draws=20", "sampler.num_burnin=5", "sampler.num_chains=2",
]


def _compose(config_name: str, overrides=(), hydra_cfg: bool = False):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name, overrides=list(overrides), return_hydra_config=hydra_cfg)
    finally:
        GlobalHydra.instance().clear()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _run(script: str, args: list[str], results: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLT_RESULTS_DIR": str(results), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "MPLBACKEND": "Agg", "HYDRA_FULL_ERROR": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    module = "experiments." + Path(script).stem  # python -m experiments.<name>, as from the repository root
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=str(results), env=env,
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


# ---------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------
PRIMARY = ["tms", "expfam", "llc"]  # entry points tested here (others test their own configs)


def _composes(primary: str, experiment: str) -> bool:
    try:
        _compose(primary, [f"experiment={experiment}"])
        return True
    except Exception:
        return False


#: experiment file -> the entry points whose config it composes with
EXPERIMENT_OWNERS = {e: [p for p in PRIMARY if _composes(p, e)] for e in _options("experiment")}


def _experiments_for(primary: str) -> list[str]:
    return [e for e, owners in EXPERIMENT_OWNERS.items() if primary in owners]


COMBOS = (
    [(p, []) for p in PRIMARY]
    + [("tms", [f"data={d}"]) for d in _options("data") if d.startswith("tms")]
    + [(p, [f"sampler={s}"]) for p in ("tms", "llc") for s in _options("sampler")]
    + [("tms", [f"symmetry={s}"]) for s in _options("symmetry")]
    + [(p, [f"experiment={e}"]) for p in PRIMARY for e in _experiments_for(p)]
    + [("expfam", [f"model={m}"]) for m in _options("model") if m.startswith("expfam")]
    + [("expfam", [f"symmetry={s}"]) for s in _options("symmetry")]
)


@pytest.mark.parametrize("primary, overrides", COMBOS, ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_every_config_composes_and_instantiates(primary, overrides):
    cfg = _compose(primary, overrides, hydra_cfg=True)
    assert isinstance(cfg.seed, int)  # a top-level key of every experiment
    sweep_dir = str(cfg.hydra.sweep.dir)
    assert sweep_dir.endswith(f"sweeps/{cfg.name}")
    est = instantiate(cfg.sampler)
    assert est.func is slt.estimate_llc if hasattr(est, "func") else callable(est)
    if "_target_" in cfg.model:
        kw = {"generator": torch.Generator().manual_seed(0)}
        model = instantiate(cfg.model, **kw)
        assert isinstance(model, torch.nn.Module)
    if "_target_" in cfg.get("data", {}):
        data = instantiate(cfg.data, **({"n": 50} if "n" in cfg.data else {}), generator=torch.Generator().manual_seed(0))
        if callable(data) and not isinstance(data, (tuple, torch.Tensor)):
            data = data()
        x = data[0] if isinstance(data, tuple) else data
        assert x.shape[0] == 50
    from experiments._schemas import validate

    validate(cfg)


def test_every_experiment_file_belongs_to_an_entry_point():
    for e, owners in EXPERIMENT_OWNERS.items():
        assert owners, f"conf/experiment/{e}.yaml composes with none of {PRIMARY}"
        assert (CONF / "experiment" / f"{e}.yaml").read_text().startswith("# @package _global_")


@pytest.mark.parametrize("launcher, target", [
    ("parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher"), ("slurm_local", "LocalLauncher"),
])
def test_launcher_presets_compose(launcher, target):
    pytest.importorskip(f"hydra_plugins.hydra_{'joblib' if launcher == 'parallel' else 'submitit'}_launcher")
    cfg = _compose("tms", ["experiment=tms_phase", f"hydra/launcher={launcher}"], hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.timeout_min > 0 and cfg.hydra.launcher.max_num_timeout >= 1
        assert str(cfg.hydra.launcher.submitit_folder).startswith(str(cfg.hydra.sweep.dir))
        instantiate(cfg.hydra.launcher)  # builds the launcher object; no cluster is contacted


def test_ray_preset_composes_when_installed():
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    cfg = _compose("tms", ["hydra/launcher=ray_local"], hydra_cfg=True)
    assert "Ray" in cfg.hydra.launcher._target_


@pytest.mark.parametrize("override, words", [
    ("sampler.num_chain=3", ["sampler.num_chain"]),            # misspelled key
    ("sampler.num_draws=abc", ["sampler.num_draws", "abc"]),   # wrong type
    ("data.sparsity=0.5", ["data.sparsity"]),                   # key of another data option
    ("sampler=nuts", ["sampler", "nuts"]),                      # unknown group option
])
def test_bad_override_is_rejected_at_composition(override, words):
    with pytest.raises(ConfigCompositionException) as e:
        _compose("tms", [override])
    text = str(e.value) + str(e.value.__cause__ or "")
    for w in words:
        assert w in text


@pytest.mark.parametrize("override, key", [
    ("sampler.num_chains=0", "sampler.num_chains"),
    ("sampler.sampler=nuts", "sampler.sampler"),
    ("init.kind=grid", "init.kind"),
    ("train.lr=-1", "train.lr"),
    ("data.n=1", "data.n"),
    ("symmetry.mode=frozen", "symmetry.mode"),
    ("train.online=true", "train.online"),  # no train.batch_size in tms.yaml
    ("init.std=-0.1", "init.std"),
    ("+sampler.num_chain=3", "sampler.num_chain"),  # Hydra's hint for the misspelling: failed after training
    ("+sampler.step_sise=0.001", "sampler.step_sise"),
    ("+sampler.sampler_kwargs.bogus=1", "sampler.sampler_kwargs"),
])
def test_invalid_value_fails_before_any_work(tmp_path, override, key):
    from experiments import tms

    cfg = _compose("tms", [override])

    def never(*a):
        raise AssertionError("the job started working despite an invalid value")

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _runlib.execute(never, cfg, tmp_path / "run", [override], tms._validate)
    rec = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert rec["status"] == "failed" and key in rec["error"] and "Traceback" in rec["traceback"]


def test_bad_override_on_the_command_line_is_readable(tmp_path):
    p = _run("tms.py", ["sampler.num_chain=4"], tmp_path, check=False)
    assert p.returncode != 0
    assert "sampler.num_chain" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "results").exists()  # nothing ran


# ---------------------------------------------------------------------------
# records and collect (no Hydra)
# ---------------------------------------------------------------------------
def test_run_dirname_is_deterministic_and_flat():
    assert records.run_dirname("") == "default"
    assert records.run_dirname("seed=0,data.n=100") == "seed=0,data.n=100"
    a = records.run_dirname("checkpoint=/a/b.pt")
    assert "/" not in a and a == records.run_dirname("checkpoint=/a/b.pt") != records.run_dirname("checkpoint=/a_b.pt")
    long = records.run_dirname("x=" + "1" * 500)
    assert len(long) <= 120 and long != records.run_dirname("x=" + "1" * 499)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    records.atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "t": torch.ones(2), "n": np.float32(1.5)})
    records.atomic_write_npz(tmp_path / "t.npz", x=torch.zeros(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.npz"]
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "t": [1.0, 1.0], "n": 1.5}
    assert np.load(tmp_path / "t.npz")["x"].shape == (2, 3)


def test_collect_marks_failed_incomplete_and_missing(tmp_path):
    sweep = tmp_path / "sw"
    ok = {"status": "ok", "overrides": ["seed=0"], "seed": 0, "config": {"seed": 0, "sampler": {"num_chains": 2}},
          "metrics": {"llc_mean": 1.5, "llc_per_chain": [1.0, 2.0], "point": "6-gon"}}
    records.atomic_write_json(sweep / "seed=0" / "result.json", ok)
    records.atomic_write_json(sweep / "seed=1" / "failed.json",
                              {"status": "failed", "overrides": ["seed=1"], "error": "ValueError: boom"})
    (sweep / "seed=2" / ".hydra").mkdir(parents=True)  # started, killed
    (sweep / ".submitit").mkdir()
    records.atomic_write_json(sweep / "sweep.json", {"jobs": [
        {"subdir": f"seed={i}", "overrides": [f"seed={i}"]} for i in range(4)]})
    df = records.collect(sweep)
    assert list(df["run"]) == ["seed=0", "seed=1", "seed=2", "seed=3"]
    assert list(df["status"]) == ["ok", "failed", "incomplete", "missing"]
    assert list(df["seed"]) == [0, 1, 2, 3]
    assert df.loc[1, "error"] == "ValueError: boom"
    assert df.loc[0, "sampler.num_chains"] == 2 and json.loads(df.loc[0, "llc_per_chain"]) == [1.0, 2.0]
    for f in ("summary.parquet", "summary.csv"):
        again = pd.read_parquet(sweep / f) if f.endswith("parquet") else pd.read_csv(sweep / f)
        assert list(again["status"]) == list(df["status"])
    assert df.attrs["override_keys"] == ["seed"]  # collect's printed table shows the swept settings
    assert records.collect(sweep).equals(df)  # idempotent
    with pytest.raises(FileNotFoundError, match="does not exist"):
        records.collect(tmp_path / "nope")


def test_collect_without_a_parquet_engine_writes_the_csv(tmp_path, monkeypatch):
    """The base install has no parquet engine: the summary is the CSV (a stale parquet is removed),
    the messages say what to install, and the figures read the CSV's table."""
    sweep = tmp_path / "sweeps" / "tms"
    records.atomic_write_json(sweep / "seed=0" / "result.json",
                              {"status": "ok", "overrides": ["seed=0"], "metrics": {"llc_mean": 8.0}})
    records.collect(sweep)
    assert (sweep / "summary.parquet").exists() == (records.parquet_engine() is not None)
    (sweep / "summary.parquet").write_bytes(b"stale")
    with monkeypatch.context() as m:  # import pyarrow -> ImportError
        m.setitem(sys.modules, "pyarrow", None)
        m.setitem(sys.modules, "fastparquet", None)
        assert records.parquet_engine() is None
    # (pandas itself would use the pyarrow it found at import, so the switch is patched here)
    monkeypatch.setattr(records, "parquet_engine", lambda: None)
    df = records.collect(sweep)
    assert not (sweep / "summary.parquet").exists()
    assert pd.read_csv(sweep / "summary.csv")["llc_mean"].tolist() == [8.0] == df["llc_mean"].tolist()
    assert "pip install pyarrow" in records.summary_files()
    from experiments import figures

    assert figures.load_sweep(tmp_path, "tms")["llc_mean"].tolist() == [8.0]


def test_failed_end_of_sweep_step_exits_nonzero(tmp_path, monkeypatch, capsys):
    """A documented output that was not written (the summary, or an entry point's own end-of-sweep
    step) makes the command exit 1 with the reason, not 0 after a logged warning."""
    sweep = tmp_path / "sweeps" / "x"
    sweep.mkdir(parents=True)

    def broken(sweep_dir):
        raise ImportError("no module named 'parquetlib'", name="parquetlib")

    monkeypatch.setattr(_runlib, "_SWEEP_ERRORS", [])
    monkeypatch.setattr(_runlib, "_SWEEP_END_HOOKS", [broken])
    errors = _runlib.finish_sweep(sweep)  # reported, not raised (Hydra would only log a callback error)
    assert len(errors) == 1 and "pip install parquetlib" in errors[0]
    assert (sweep / "summary.csv").exists()  # the summary itself was written
    with pytest.raises(SystemExit) as e:
        _runlib.main(lambda: None)
    assert e.value.code == 1
    assert "were not written" in capsys.readouterr().err
    monkeypatch.setattr(_runlib, "_SWEEP_ERRORS", [])
    _runlib.main(lambda: None)  # nothing failed: returns normally


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------
def test_multirun_end_to_end_rerun_and_resume(tmp_path):
    args = ["-m", "seed=0,1", *TINY_TMS]
    p = _run("tms.py", args, tmp_path)
    sweep = tmp_path / "sweeps" / "tms"
    df = pd.read_csv(sweep / "summary.csv")
    assert (sweep / "summary.parquet").exists()
    assert len(df) == 2 and set(df["status"]) == {"ok"} and sorted(df["seed"]) == [0, 1]
    assert {"llc_mean", "llc_sem", "point", "train_loss", "data.n", "sampler.num_draws"} <= set(df.columns)
    runs = sorted(d.name for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    expected = sorted(j["subdir"] for j in json.loads((sweep / "sweep.json").read_text())["jobs"])
    assert runs == expected and len(runs) == 2
    rec = json.loads((sweep / runs[0] / "result.json").read_text())
    assert rec["status"] == "ok" and rec["seed"] in (0, 1) and rec["config"]["data"]["n"] == 300
    assert {"slt", "torch", "python"} <= set(rec["versions"]) and rec["device"] == "cpu"
    assert any(o.startswith("seed=") for o in rec["overrides"])
    tr = np.load(sweep / runs[0] / "traces.npz")
    assert tr["llc_trace"].shape == (2, 20) and tr["loss_trace"].shape == (2, 20)

    # rerun: both skipped (records untouched); then a "killed" run is redone alone
    started = {r: json.loads((sweep / r / "result.json").read_text())["started"] for r in runs}
    (sweep / runs[1] / "result.json").unlink()
    p = _run("tms.py", args, tmp_path)
    assert p.stdout.count("[tms]") + p.stderr.count("[tms]") == 1  # only the removed run worked
    assert json.loads((sweep / runs[0] / "result.json").read_text())["started"] == started[runs[0]]
    assert (sweep / runs[1] / "result.json").exists()
    assert set(pd.read_csv(sweep / "summary.csv")["status"]) == {"ok"}


def test_failing_job_is_recorded_and_collected(tmp_path):
    # widths [2, 0] makes the model constructor raise inside the job
    p = _run("llc.py", ["-m", "model.widths=[3,2,3],[2,0]", "data.rank=1", *TINY_LLC], tmp_path, check=False)
    assert p.returncode != 0  # Hydra reports the failure ...
    sweep = tmp_path / "sweeps" / "llc"
    df = pd.read_csv(sweep / "summary.csv")  # ... and the summary is still written
    assert sorted(df["status"]) == ["failed", "ok"]
    bad = df[df["status"] == "failed"].iloc[0]
    assert "widths" in bad["error"] and "model.widths=_2,0_" in bad["run"]
    failed = json.loads((sweep / bad["run"] / "failed.json").read_text())
    assert "Traceback" in failed["traceback"] and failed["overrides"]
    # standalone collect gives the same table and a non-zero exit status
    c = subprocess.run([sys.executable, "-m", "experiments.collect", str(sweep), "--quiet"], cwd=str(ROOT),
                       capture_output=True, text=True)
    assert c.returncode == 1 and "1 failed" in c.stdout
    assert pd.read_csv(sweep / "summary.csv").equals(df)


def test_joblib_launcher_multirun(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    _run("tms.py", ["-m", "seed=3,4", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *TINY_TMS], tmp_path)
    df = pd.read_csv(tmp_path / "sweeps" / "tms" / "summary.csv")
    assert sorted(df["seed"]) == [3, 4] and set(df["status"]) == {"ok"}


def test_joblib_launcher_tms_curve(tmp_path):
    """tms_curve's schema lives in _schemas (ConfigStore): jobs pickled to joblib workers run."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    _run("tms_curve.py", ["-m", "seed=0,1", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "data.n=200",
                          "curve.steps=40", "curve.num_checkpoints=4", "curve.first_checkpoint=5",
                          "sampler.num_draws=20", "sampler.num_chains=2"], tmp_path)
    df = pd.read_csv(tmp_path / "sweeps" / "tms_curve" / "summary.csv")
    assert sorted(df["seed"]) == [0, 1] and set(df["status"]) == {"ok"}
    # keys and types are checked at composition, before any job
    p = _run("tms_curve.py", ["curve.stepz=3"], tmp_path, check=False)
    assert p.returncode != 0 and "stepz" in p.stdout + p.stderr


def test_llc_from_checkpoint_in_process(tmp_path):
    from experiments import llc

    from slt.models import DeepLinearNetwork

    m = DeepLinearNetwork([3, 2, 3], generator=torch.Generator().manual_seed(5))
    torch.save({"state_dict": m.state_dict()}, tmp_path / "ckpt.pt")
    cfg = _compose("llc", ["model.widths=[3,2,3]", "data.rank=1", f"checkpoint={tmp_path / 'ckpt.pt'}", "train=null",
                           "reference=null", *TINY_LLC[2:]])
    rec = _runlib.execute(llc.run, cfg, tmp_path / "run")
    met = rec["metrics"]
    assert met["checkpoint"].endswith("ckpt.pt") and met["num_params"] == 12 and "train_loss" not in met
    assert np.isfinite(met["llc_mean"]) and met["num_chains"] == 2
    with pytest.raises(ValueError, match="checkpoint"):
        _runlib.execute(llc.run, _compose("llc", ["checkpoint=/no/such.pt"]), tmp_path / "bad", [], llc._validate)


def test_llc_with_the_users_model_leaves_out_the_demos_settings(tmp_path):
    """``model._target_=...`` merges into the demo's node: the demo's keyword arguments (widths) would
    reach the user's constructor and its closed-form reference would be compared with the user's λ̂.
    They are left out and named; the demo data, kept, keeps its resolved settings."""
    from experiments import llc

    rec = _llc_job(["model._target_=torch.nn.Linear", "+model.in_features=5", "+model.out_features=4",
                    "loss=torch.nn.functional.mse_loss", *TINY_LLC[2:]], tmp_path / "run")
    met = rec["metrics"]
    assert rec["config"][llc.DROPPED] == ["model.widths", "reference"] and llc.DROPPED not in met  # recorded once
    assert met["num_params"] == 24 and "llc_reference" not in met and np.isfinite(met["llc_mean"])
    kept, dropped = llc.without_demo(_compose("llc", []))
    assert dropped == [] and kept.model.widths == [5, 3, 4]


def test_llc_passes_a_generator_only_to_callables_that_name_it(tmp_path):
    """``generator=`` went to every callable with ``**kwargs``, which forward what they do not know:
    ``data._target_=torch.load`` failed in pickle, and transformers' ``from_pretrained`` in the model's
    ``__init__`` ("unexpected keyword argument 'generator'").  Now only a named parameter gets it."""
    from experiments import llc

    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=g)
    torch.save((X, X @ torch.randn(5, 4, generator=g)), tmp_path / "data.pt")
    assert not llc._accepts("torch.load", "generator") and llc._accepts("slt.models.DeepLinearNetwork", "generator")
    cfg = _compose("llc", ["model._target_=torch.nn.Linear", "+model.in_features=5", "+model.out_features=4",
                           "data._target_=torch.load", f"+data.f={tmp_path / 'data.pt'}",
                           "loss=torch.nn.functional.mse_loss", *TINY_LLC[2:]])
    met = _runlib.execute(llc.run, cfg, tmp_path / "run")["metrics"]
    assert met["num_params"] == 24 and np.isfinite(met["llc_mean"])


def test_llc_curve_over_checkpoint_files_in_one_call(tmp_path):
    """``checkpoint='dir/step_*.pt'`` estimates every matching file in one batched call, in natural
    order (step_2 < step_10 < step_100), each the same as its own estimate_llc call with seed + k."""
    from experiments import llc

    from slt.models import DeepLinearNetwork

    for k, step in enumerate([100, 2, 10]):
        m = DeepLinearNetwork([3, 2, 3], generator=torch.Generator().manual_seed(step))
        torch.save({"model": m.state_dict(), "step": step}, tmp_path / f"step_{step}.pt")
    common = ["model.widths=[3,2,3]", "data.rank=1", "train=null", "reference=null", "dtype=float64",
              "sampler.sampler=sgld", "sampler.step_size=1e-4", "sampler.nbeta=50", "sampler.localization=10",
              "sampler.extend_draws=false", *TINY_LLC[2:]]  # fixed settings: the same chains up to rounding
    cfg = _compose("llc", [f"checkpoint={tmp_path / 'step_*.pt'}", *common])
    met = _runlib.execute(llc.run, cfg, tmp_path / "curve")["metrics"]
    assert [Path(p).name for p in met["ckpt_path"]] == ["step_2.pt", "step_10.pt", "step_100.pt"]
    assert met["num_checkpoints"] == 3 and met["final_llc_mean"] == met["ckpt_llc_mean"][-1]
    # beside result.json: one row per checkpoint (slt.results_frame) and the curve's figure
    table = pd.read_csv(tmp_path / "curve" / "results.csv")
    assert [Path(p).name for p in table["checkpoint_file"]] == ["step_2.pt", "step_10.pt", "step_100.pt"]
    assert table["llc_mean"].tolist() == pytest.approx(met["ckpt_llc_mean"], rel=1e-12)
    assert (tmp_path / "curve" / "llc_curve.png").stat().st_size > 1000
    model, data, loss = llc.build(cfg, torch.Generator().manual_seed(0))  # the run's data (seed 0)
    for k, path in enumerate(met["ckpt_path"]):
        kw = _runlib.llc_kwargs(cfg.sampler, seed=k, device=cfg.device, dtype=cfg.dtype, progress=False)
        (one,) = slt.estimate_llc(model, data, loss, state_dicts=[path], **kw)
        assert one.llc_mean == pytest.approx(met["ckpt_llc_mean"][k], rel=1e-6)
    for bad, match in [([f"checkpoint={tmp_path / 'none_*.pt'}", *common], "no file matches"),
                       ([f"checkpoint={tmp_path / 'step_*.pt'}", "model.widths=[3,2,3]", "data.rank=1"], "train=null")]:
        with pytest.raises(ValueError, match=match):
            llc._validate(_compose("llc", bad))



def test_llc_weight_refined_from_config(tmp_path, monkeypatch):
    """``restrict=modules`` (any helper of slt.restrict), a glob, or a mapping: one batched call, metrics per
    restriction aligned with ``restrict_labels``, the same numbers as estimate_llc with that restrict_to;
    with a checkpoint pattern, lists over checkpoints; a bad value is refused when the config is checked."""
    from experiments import llc

    from slt.models import DeepLinearNetwork

    fixed = ["model.widths=[3,2,3]", "data.rank=1", "reference=null", "dtype=float64", "sampler.sampler=sgld",
             "sampler.step_size=1e-4", "sampler.nbeta=50", "sampler.localization=10", "sampler.extend_draws=false",
             *TINY_LLC]
    rec = _runlib.execute(llc.run, _compose("llc", ["restrict=modules", *fixed]), tmp_path / "modules")
    met, npz = rec["metrics"], np.load(tmp_path / "modules" / "traces.npz")
    assert met["restrict_labels"] == ["layers.0", "layers.1"] and "llc_mean" not in met
    assert npz["restrict_llc_trace"].shape == (2, 2, 20)
    cfg = _compose("llc", ["restrict=modules", *fixed])
    model, data, loss = llc.build(cfg, torch.Generator().manual_seed(0))
    model = model.double()  # as run() trains: in train.dtype, from the seed + 1 stream
    slt.training.train(model, tuple(t.double() for t in data), loss, steps=20, lr=0.01,
                       generator=torch.Generator().manual_seed(1), tol=1e-6, finish="lbfgs", finish_iterations=1000)
    kw = _runlib.llc_kwargs(cfg.sampler, seed=0, device=cfg.device, dtype=cfg.dtype, progress=False)
    direct = slt.estimate_llc(model, data, loss, restrict_to=slt.restrict.modules(model), **kw)
    assert met["restrict_llc_mean"] == pytest.approx([direct[k].llc_mean for k in met["restrict_labels"]], rel=1e-6)
    met = _runlib.execute(llc.run, _compose("llc", ["restrict={first: 'layers.0.*', both: ['layers.0.*', 'layers.1.*']}",
                                                    *fixed]), tmp_path / "mapping")["metrics"]
    assert met["restrict_labels"] == ["first", "both"]
    met = _runlib.execute(llc.run, _compose("llc", ["restrict=layers.1.*", *fixed]), tmp_path / "glob")["metrics"]
    assert "restrict_labels" not in met and np.isfinite(met["llc_mean"])  # one restriction: one result

    for step in (2, 10):
        m = DeepLinearNetwork([3, 2, 3], generator=torch.Generator().manual_seed(step))
        torch.save(m.state_dict(), tmp_path / f"step_{step}.pt")
    curve = [f"checkpoint={tmp_path / 'step_*.pt'}", "train=null", "restrict=modules",
             *[o for o in fixed if not o.startswith("train.")]]
    rec = _runlib.execute(llc.run, _compose("llc", curve), tmp_path / "curve")
    met = rec["metrics"]
    assert met["num_checkpoints"] == 2 and np.array(met["restrict_llc_mean"]).shape == (2, 2)
    assert np.load(tmp_path / "curve" / "traces.npz")["restrict_llc_trace"].shape == (2, 2, 2, 20)
    for bad in (["restrict=3"], ["restrict={a: 3}"], ["restrict=heads", "qkv_layout=interleaved"]):
        with pytest.raises(ValueError, match="invalid config value (restrict|qkv_layout)"):
            llc._validate(_compose("llc", bad))
    # a restriction the model cannot give (no attention in the demo) fails before training, not after
    calls = []
    monkeypatch.setattr(llc, "train", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="heads: found no attention module in DeepLinearNetwork"):
        llc.run(_compose("llc", ["restrict=heads", *fixed]), tmp_path / "heads")
    assert calls == []


def _llc_job(overrides, out, tmp_path=None):
    """One ``python -m experiments.llc`` job as Hydra runs it: the command line's overrides reach the
    config preparation, and the input files are fingerprinted."""
    from experiments import llc

    return _runlib.execute(llc.run, _compose("llc", overrides), out, list(overrides), llc._validate,
                           prepare=llc.effective_config, inputs=llc.input_files)


def _classification_file(tmp_path, numpy=False):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 4, generator=g)
    Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    f = tmp_path / ("cls_np.pt" if numpy else "cls.pt")
    torch.save((X.numpy(), Y.numpy()) if numpy else (X, Y), f)
    return f


def test_llc_config_path_as_a_user_runs_it(tmp_path, monkeypatch):
    """Found by running ``experiments.llc`` on a user's own classifier (2026-12-07):
    - a setting the user typed that equals the demo's (``data.n=10000``) was dropped as a demo setting;
    - ``result.json`` recorded the demo's ``model.widths``, ``data.n`` and reference for the user's model;
    - training from config cast integer labels to the training dtype (cross_entropy: "expected target
      dtype to be Long") and iterated over a dict batch's keys;
    - the model was sampled as built, in train mode (dropout on: a random loss);
    - NumPy data crashed (``IndexError``), and NumPy labels after tensor inputs were dropped as a
      "teacher", silently;
    - a loss node with keyword arguments but without ``_partial_: true`` failed with no hint."""
    from experiments import llc

    demo_n = ["model._target_=torch.nn.Linear", "+model.in_features=5", "+model.out_features=5",
              "data._target_=slt.models.make_tms_sparse_data", "+data.n_features=5", "data.n=10000"]
    cfg = _compose("llc", demo_n)
    kept, dropped = llc.without_demo(cfg, demo_n)
    assert kept.data.n == 10000 and "data.n" not in dropped and "model.widths" in dropped
    assert "data.n" in llc.without_demo(cfg)[1]  # not typed (e.g. a direct call): the demo's, dropped
    assert llc.user_keys(["+model.hidden=3", "~reference", "data={a: 1}"]) == {"model.hidden", "reference", "data"}

    f = _classification_file(tmp_path)
    seen = []
    real = slt.estimate_llc

    def spy(model, *a, **k):
        seen.append(model.training)
        return real(model, *a, **k)

    monkeypatch.setattr(slt, "estimate_llc", spy)
    user = ["model._target_=torch.nn.Sequential",
            "+model._args_=[{_target_: torch.nn.Linear, in_features: 4, out_features: 3}, "
            "{_target_: torch.nn.Dropout, p: 0.5}]",
            "data._target_=torch.load", f"+data.f={f}", "loss=torch.nn.functional.cross_entropy",
            "train.steps=5", "train.finish=null", "sampler.num_draws=10", "sampler.num_burnin=5",
            "sampler.num_chains=2", "sampler.extend_draws=false"]
    rec = _llc_job(user, tmp_path / "user")
    assert seen == [False]  # sampled in eval mode
    assert "widths" not in rec["config"]["model"] and rec["config"]["reference"] is None
    assert rec["config"][llc.DROPPED] == ["model.widths", "data.widths", "data.rank", "data.n", "reference"]
    assert rec["metrics"]["num_params"] == 15 and np.isfinite(rec["metrics"]["llc_mean"])
    rec = _llc_job([*user, "eval=false"], tmp_path / "as_built")
    assert seen[-1] is True

    g = _classification_file(tmp_path, numpy=True)  # (X, Y) as NumPy arrays (torch.load of a pickled tuple)
    model, data, _ = llc.build(llc.effective_config(_compose("llc", [
        "model._target_=torch.nn.Linear", "+model.in_features=4", "+model.out_features=3",
        "data._target_=torch.load", f"+data.f={g}", "+data.weights_only=false"])), torch.Generator())
    assert isinstance(data, tuple) and len(data) == 2 and data[1].dtype == torch.int64
    with pytest.raises(TypeError, match="_partial_: true"):
        llc.build(llc.effective_config(_compose("llc", [*user[:4], "loss={_target_: torch.nn.functional.cross_entropy, "
                                                                   "label_smoothing: 0.1}"])), torch.Generator())


def test_llc_rerun_recomputes_when_its_input_files_changed(tmp_path):
    """A rerun skipped a finished run whenever its config matched: a checkpoint overwritten by further
    training, or a checkpoint pattern that now matches another file, returned the old numbers with an
    INFO line.  The record now fingerprints the files it read; a rerun with unchanged files still skips."""
    from slt.models import DeepLinearNetwork

    def save(step, path):
        m = DeepLinearNetwork([3, 2, 3], generator=torch.Generator().manual_seed(step))
        torch.save(m.state_dict(), path)

    fixed = ["model.widths=[3,2,3]", "data.rank=1", "reference=null", "train=null", "sampler.num_draws=10",
             "sampler.num_burnin=5", "sampler.num_chains=2", "sampler.extend_draws=false", "data.n=200"]
    save(1, tmp_path / "cur.pt")
    one = [f"checkpoint={tmp_path / 'cur.pt'}", *fixed]
    first = _llc_job(one, tmp_path / "one")
    assert list(first["inputs"]) == [str(tmp_path / "cur.pt")] and len(first["inputs"][str(tmp_path / "cur.pt")]["sha256"]) == 64
    assert _llc_job(one, tmp_path / "one")["finished"] == first["finished"]  # unchanged: skipped
    os.utime(tmp_path / "cur.pt")  # touched, same content: still skipped
    assert _llc_job(one, tmp_path / "one")["finished"] == first["finished"]
    save(2, tmp_path / "cur.pt")  # trained further: recomputed
    again = _llc_job(one, tmp_path / "one")
    assert again["metrics"]["init_loss"] != first["metrics"]["init_loss"]

    (tmp_path / "ck").mkdir()
    for step in (1, 2):
        save(step, tmp_path / "ck" / f"step_{step}.pt")
    curve = [f"checkpoint={tmp_path / 'ck' / 'step_*.pt'}", *fixed]
    assert _llc_job(curve, tmp_path / "curve")["metrics"]["num_checkpoints"] == 2
    save(3, tmp_path / "ck" / "step_3.pt")
    assert _llc_job(curve, tmp_path / "curve")["metrics"]["num_checkpoints"] == 3
    # a Trainer's checkpoint folder: its weights and configs are the inputs, not the optimizer's state
    from experiments import llc

    hf = tmp_path / "out" / "checkpoint-10"
    hf.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "optimizer.pt", "rng_state.pth", "trainer_state.json"):
        (hf / name).write_bytes(b"x")
    files = llc.input_files(_compose("llc", [f"checkpoint={tmp_path / 'out' / 'checkpoint-*'}", "train=null"]))
    assert [Path(f).name for f in files] == ["checkpoint-10"]  # (the folder: records reads the files in it)
    assert [Path(f).name for f in records.fingerprints(files)] == ["config.json", "model.safetensors"]


def test_summary_rows_show_what_the_run_used_and_files_are_readable(tmp_path):
    """``device=auto`` as typed and the result's sampling time shadowed the device the run used and its
    wall time in ``summary.csv``; result files were created 0600 (mkstemp) whatever the umask."""
    rec = {"status": "ok", "overrides": ["device=auto", "seed=3"], "seed": 3, "device": "cpu", "seconds": 0.86,
           "config": {"device": "auto", "seed": 3}, "metrics": {"seconds": 0.30, "llc_mean": 1.0}}
    row = records._row_from_record(rec, "ok")
    assert row["device"] == "cpu" and row["seconds"] == 0.86 and row["metrics.seconds"] == 0.30
    assert row["seed"] == 3 and row["llc_mean"] == 1.0
    old = os.umask(0o022)
    try:
        p = records.atomic_write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


def test_checkpoint_files_include_hugging_face_checkpoint_directories(tmp_path):
    """A Trainer's ``out/checkpoint-*`` directories are checkpoints when they hold weights (natural
    order); a directory without weights, or one holding only a config, is not."""
    from experiments import llc

    for step in (40, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "config.json").write_text("{}")
    (tmp_path / "checkpoint-9.pt").write_bytes(b"")
    found = llc.checkpoint_files(str(tmp_path / "checkpoint-*"))
    assert [Path(f).name for f in found] == ["checkpoint-5", "checkpoint-9.pt", "checkpoint-40"]

def test_tms_skips_the_hessian_of_large_models(tmp_path):
    from experiments import tms

    small = _runlib.execute(tms.run, _compose("tms", TINY_TMS), tmp_path / "small", [], tms._validate)["metrics"]
    assert small["d"] == 18 and small["hessian_rank"] is not None and small["llc_upper_bound"] is not None
    n = tms.HESSIAN_MAX_PARAMS // 10 + 1  # d = 11 n > HESSIAN_MAX_PARAMS
    cfg = _compose("tms", [f"model.n_features={n}", "model.n_hidden=10", "data=tms_bernoulli", *TINY_TMS])
    big = _runlib.execute(tms.run, cfg, tmp_path / "big", [], tms._validate)["metrics"]
    assert big["d"] == 11 * n > tms.HESSIAN_MAX_PARAMS
    assert big["hessian_rank"] is None and big["llc_lower_bound"] is None and len(big["feature_dimensionality"]) == n


@pytest.mark.filterwarnings("ignore:.*R-hat")  # 20 draws: the chains are short
def test_tms_online_training_records_the_heldout_loss(tmp_path):
    """train.online: Adam on fresh minibatches of q (the data config with n = batch_size), w* = the
    online end point (finish=null); init.std rescales the seeded Xavier draws."""
    from experiments import tms

    base = ["data=tms_bernoulli", "data.sparsity=0.5", "model.n_features=8", "model.n_hidden=3",
            "train.batch_size=64", "train.finish=null", *TINY_TMS]
    met = {}
    for tag, extra in (("stored", []), ("online", ["train.online=true"]), ("small", ["train.online=true",
                                                                                    "train.steps=0",
                                                                                    "init.std=0.01"])):
        cfg = _compose("tms", [*base, *extra])
        met[tag] = _runlib.execute(tms.run, cfg, tmp_path / tag, [], tms._validate)["metrics"]
        assert np.isfinite(met[tag]["heldout_loss"]) and "population_loss" not in met[tag]
    assert met["online"]["W"] != met["stored"]["W"]  # different minibatches: a different end point
    W0 = torch.tensor(met["small"]["W"])  # no training: the init itself, std 0.01 instead of sqrt(2/11)
    assert 0.005 < float(W0.std()) < 0.02
    for overrides, key in ((["train.online=true", "train.optimizer=lbfgs"], "train.online"),
                           (["init.kind=kgon", "init.std=0.1"], "init.std"),
                           (["experiment=tms_symmetry_retrained", "train.online=true"], "train.online")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            _runlib.execute(tms.run, _compose("tms", [*base, *overrides]), tmp_path / "bad", [], tms._validate)


TINY_EXPFAM = ["data.n=2000", "sampler.num_draws=400", "sampler.num_chains=4"]


@pytest.mark.parametrize("model, h, rank, expected", [
    ("expfam_polar", 1.0, 1, 0.5),   # symmetrized q: r = 0 optimum, degenerate in φ
    ("expfam_polar", 0.0, 2, 1.0),   # random teacher: regular
    ("expfam_fixed", 1.0, 2, 1.0),   # fixed equivariant features: d/2 whatever q
])
def test_expfam_run_in_process(tmp_path, model, h, rank, expected):
    from experiments import expfam

    cfg = _compose("expfam", [f"model={model}", f"symmetry.h={h}", *TINY_EXPFAM])
    met = _runlib.execute(expfam.run, cfg, tmp_path / "run", [], expfam._validate)["metrics"]
    assert met["hessian_rank"] == rank and met["d"] == 2
    assert (met["llc_lower_bound"], met["llc_upper_bound"]) == (rank / 2, (2 + rank) / 4)
    assert met["llc_expected"] == expected and met["fit_grad_norm"] < 1e-6
    if h == 1.0:
        assert met["invariance_gap"] < 1e-10 < met["invariance_gap_q0"]
    assert np.isfinite(met["dllc_dh"]) and met["dllc_dh_sem"] > 0
    # λ̂ within 4 Monte-Carlo s.e. plus 15% (the finite-n/γ bias of a short run) of the known λ
    assert abs(met["llc_mean"] - expected) < 4 * met["llc_sem"] + 0.15 * expected


def test_tms_symmetry_path_in_process(tmp_path):
    from experiments import tms

    cfg = _compose("tms", ["experiment=tms_symmetry", "symmetry.h=0.5", *TINY_TMS])
    met = _runlib.execute(tms.run, cfg, tmp_path / "run", [], tms._validate)["metrics"]
    assert met["h"] == 0.5 and met["k"] == 6  # n = 300: a slightly irregular hexagon
    assert met["invariance_gap_q1"] > met["invariance_gap"] > 0
    assert np.isfinite(met["dllc_dh"]) and met["llc_theory"] is None  # q_h is not the closed form's q
    assert met["symmetry_mode"] == "quenched" and "w_star_shift" not in met  # the default: w* of q
    assert met["grad_norm_qh_at_w_star_q"] > met["train_grad_norm"]  # ... which is not critical for L_{q_h}


@pytest.mark.filterwarnings("ignore:.*R-hat")  # 20 draws: the chains are short
def test_tms_symmetry_retrained_in_process(tmp_path):
    """symmetry.mode=retrained: w*_h is trained on the weighted q_h from the same 6-gon init;
    at h = 0 it is the w* of q, at h > 0 the minimiser moves and lowers L_h."""
    from experiments import tms

    met = {}
    for h in (0.0, 1.0):
        cfg = _compose("tms", ["experiment=tms_symmetry_retrained", f"symmetry.h={h}", "symmetry.susceptibility=false",
                               *TINY_TMS])
        rec = _runlib.execute(tms.run, cfg, tmp_path / f"h={h}", [], tms._validate)
        assert rec["config"]["symmetry"]["mode"] == "retrained"
        met[h] = rec["metrics"]
        assert met[h]["symmetry_mode"] == "retrained" and met[h]["h"] == h
        assert met[h]["train_grad_norm"] < 1e-5  # a critical point of the (weighted) L_{q_h}
    m0, m1 = met[0.0], met[1.0]
    assert m0["w_star_shift"] == 0.0 and m0["retrain_loss_drop"] == 0.0
    assert m0["train_loss"] == m0["train_loss_q"]
    theta = {h: torch.cat([torch.tensor(m["W"]).flatten(), torch.tensor(m["b"])]) for h, m in met.items()}
    shift = float((theta[1.0] - theta[0.0]).norm())
    assert shift > 1e-3 and shift == pytest.approx(m1["w_star_shift"], rel=1e-6)  # the minimiser moves
    assert m1["train_loss_q"] == pytest.approx(m0["train_loss"], rel=1e-12)  # w*_0 is trained in the same run
    assert m1["retrain_loss_drop"] > 0 and m1["train_loss"] < m1["loss_qh_at_w_star_q"]
    assert m1["grad_norm_qh_at_w_star_q"] > 100 * m1["train_grad_norm"]  # w*_0 is not critical for L_h
    assert np.isfinite(m1["llc_mean"]) and m1["llc_theory"] is None and m0["k"] == m1["k"] == 6


def test_expfam_rejects_quenched_mode(tmp_path):
    from experiments import expfam

    cfg = _compose("expfam", ["symmetry.mode=quenched"])
    with pytest.raises(ValueError, match=r"symmetry\.mode"):
        _runlib.execute(lambda *a: None, cfg, tmp_path / "run", [], expfam._validate)
    assert _compose("expfam").symmetry.mode == "retrained"


@pytest.mark.parametrize("breakage", ["import", "api"])
def test_expected_jobs_fall_back_without_hydra_internals(tmp_path, monkeypatch, caplog, breakage):
    """Another Hydra version: listing the expected jobs warns once, writes no sweep.json, and the
    sweep is still collected."""
    monkeypatch.setenv("SLT_RESULTS_DIR", str(tmp_path))
    cfg = _compose("tms", ["experiment=tms_symmetry", "seed=3"], hydra_cfg=True)
    jobs = _runlib.expected_jobs(cfg)  # Hydra 1.3: one job per h
    assert sorted(j["subdir"] for j in jobs) == [f"experiment=tms_symmetry,seed=3,symmetry.h={h}" for h in
                                                 ("0.0", "0.5", "1.0")]
    if breakage == "import":
        monkeypatch.setitem(sys.modules, "hydra._internal.core_plugins.basic_sweeper", None)
    else:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        monkeypatch.delattr(BasicSweeper, "split_arguments")
    monkeypatch.setattr(_runlib, "_EXPECTED_JOBS_WARNED", False)
    with caplog.at_level("WARNING", logger="slt.experiments"):
        assert _runlib.expected_jobs(cfg) is None
        cb = _runlib.CollectCallback()
        cb.on_multirun_start(cfg)
        cb.on_multirun_start(cfg)
    warned = [r for r in caplog.records if "expected jobs" in r.getMessage()]
    assert len(warned) == 1  # once
    sweep = Path(str(cfg.hydra.sweep.dir))
    assert sweep.is_dir() and not (sweep / "sweep.json").exists()
    records.atomic_write_json(sweep / jobs[0]["subdir"] / "result.json",
                              {"status": "ok", "overrides": jobs[0]["overrides"], "metrics": {"llc_mean": 8.0}})
    cb.on_multirun_end(cfg)
    df = pd.read_csv(sweep / "summary.csv")
    assert list(df["status"]) == ["ok"] and list(df["llc_mean"]) == [8.0]
    assert str(sweep) not in _runlib._PENDING_SWEEPS


def test_a_new_sweep_forgets_an_earlier_sweeps_jobs_that_never_ran(tmp_path, monkeypatch):
    """sweep.json only grew: a job of an abandoned sweep whose folder was deleted stayed "missing" for good and
    collect exited 1 for ever (helper 31).  A new multirun now drops earlier jobs without a folder that it does
    not list itself; jobs with a folder, and its own, stay."""
    monkeypatch.setenv("SLT_RESULTS_DIR", str(tmp_path))
    cfg = _compose("tms", ["experiment=tms_symmetry", "seed=3"], hydra_cfg=True)
    sweep = Path(str(cfg.hydra.sweep.dir))
    records.atomic_write_json(sweep / "sweep.json", {"jobs": [
        {"subdir": "seed=30", "overrides": ["seed=30"]},  # ran: its folder stays
        {"subdir": "seed=31", "overrides": ["seed=31"]},  # never ran / deleted
    ]})
    (sweep / "seed=30").mkdir()
    _runlib.CollectCallback().on_multirun_start(cfg)
    listed = [j["subdir"] for j in records.read_json(sweep / "sweep.json")["jobs"]]
    assert "seed=30" in listed and "seed=31" not in listed
    assert sorted(j["subdir"] for j in _runlib.expected_jobs(cfg)) == sorted(set(listed) - {"seed=30"})
    _runlib._PENDING_SWEEPS.clear()


def test_rerun_skips_unless_config_changed_or_forced(tmp_path):
    calls = []

    def job(cfg, out):
        calls.append(cfg.sampler.num_draws)
        return {"x": 1.0}, {}

    cfg = _compose("tms")
    _runlib.execute(job, cfg, tmp_path)
    _runlib.execute(job, cfg, tmp_path)  # finished: skipped
    cfg.progress = True  # does not change the result: still skipped
    _runlib.execute(job, cfg, tmp_path)
    cfg.sampler.num_draws = 7  # e.g. an edited experiment file: recomputed
    _runlib.execute(job, cfg, tmp_path)
    cfg.force = True
    _runlib.execute(job, cfg, tmp_path)
    assert calls == [4000, 7, 7]


def test_a_recompute_that_fails_or_is_killed_does_not_leave_the_old_result_counted(tmp_path):
    """A stored run recomputed (its config changed) and then killed, or whose new config failed its checks, left
    the old result.json in place: collect counted the job "ok" with the old config's numbers (helper 31: seed=20
    stayed ok at λ̂ 9.499 from lr 0.01 after a rerun at lr 0.02 was killed; 12 runs "12 ok" after every job of
    a rerun failed).  Now the old result is set aside first, so the job reads incomplete or failed; a finished
    recompute removes it."""
    def job(cfg, out):
        if cfg.sampler.num_draws == 13:
            raise KeyboardInterrupt  # killed mid-run (a BaseException: no failed.json)
        return {"x": float(cfg.sampler.num_draws)}, {"t": np.zeros((2, 3))}

    sweep = tmp_path / "sw"
    cfg = _compose("tms")
    _runlib.execute(job, cfg, sweep / "a")
    cfg.sampler.num_draws = 13
    with pytest.raises(KeyboardInterrupt):
        _runlib.execute(job, cfg, sweep / "a")
    assert (sweep / "a" / records.PREVIOUS_FILE).exists() and not (sweep / "a" / records.RESULT_FILE).exists()
    assert list(records.collect(sweep)["status"]) == ["incomplete"]
    cfg.sampler.num_draws = 4000
    _runlib.execute(job, cfg, sweep / "b")
    cfg.sampler.num_draws = -5  # fails its checks
    with pytest.raises(Exception):
        _runlib.execute(job, cfg, sweep / "b", ["sampler.num_draws=-5"], None)
    assert list(records.collect(sweep).set_index("run").loc[["b"], "status"]) == ["failed"]
    cfg.sampler.num_draws = 7
    rec = _runlib.execute(job, cfg, sweep / "b")
    assert rec["metrics"]["x"] == 7.0 and not (sweep / "b" / records.PREVIOUS_FILE).exists()
    assert list(records.collect(sweep).set_index("run").loc[["b"], "status"]) == ["ok"]


def test_a_failure_on_a_key_that_does_not_change_the_result_keeps_the_result(tmp_path):
    """A typo in ``device`` (not part of the result) set every finished run aside and recomputed them all once the
    typo was fixed; and a failed.json newer than a valid result stayed "failed" after the rerun skipped it
    (helper 32).  Now the result stays, the failed attempt reads failed, and the next good rerun clears it."""
    def job(cfg, out):
        return {"x": 1.0}, {}

    sweep = tmp_path / "sw"
    cfg = _compose("tms")
    _runlib.execute(job, cfg, sweep / "a")
    bad = _compose("tms", ["device=bogus"])
    with pytest.raises(ValueError, match="device"):
        _runlib.execute(job, bad, sweep / "a", ["device=bogus"])
    assert (sweep / "a" / records.RESULT_FILE).exists() and not (sweep / "a" / records.PREVIOUS_FILE).exists()
    assert list(records.collect(sweep)["status"]) == ["failed"]  # the latest attempt
    calls = []
    _runlib.execute(lambda c, o: calls.append(1) or ({"x": 2.0}, {}), cfg, sweep / "a")  # skipped: still valid
    assert calls == [] and list(records.collect(sweep)["status"]) == ["ok"]
    (sweep / "a" / records.RESULT_FILE).write_text("null")  # valid JSON, not a record
    assert "holds a JSON NoneType, not a record" in records.collect(sweep)["error"][0]


def test_a_failure_newer_than_the_result_and_unreadable_records_are_named(tmp_path, caplog):
    """collect preferred any result.json over a newer failed.json, and one truncated result.json or sweep.json
    stopped the whole sweep's collect with a bare JSONDecodeError; rerunning that job failed the same way."""
    sweep = tmp_path / "sw"
    ok = {"status": "ok", "overrides": ["seed=0"], "seed": 0, "config": {"seed": 0}, "metrics": {"llc_mean": 1.0}}
    for i in range(3):
        records.atomic_write_json(sweep / f"seed={i}" / "result.json", {**ok, "overrides": [f"seed={i}"], "seed": i})
    records.atomic_write_json(sweep / "seed=1" / "failed.json", {"status": "failed", "overrides": ["seed=1"],
                                                                "error": "ValueError: new config"})
    os.utime(sweep / "seed=1" / "result.json", (1, 1))  # older than the failure
    (sweep / "seed=2" / "result.json").write_text('{"status": "ok", "overr')  # truncated
    (sweep / "sweep.json").write_text('{"jobs": [{"sub')
    df = records.collect(sweep).set_index("run")
    assert list(df["status"]) == ["ok", "failed", "failed"]
    assert df.loc["seed=1", "error"] == "ValueError: new config"
    assert "seed=2/result.json cannot be read (JSONDecodeError" in df.loc["seed=2", "error"]

    def job(cfg, out):
        return {"x": 2.0}, {}

    with caplog.at_level("WARNING"):
        rec = _runlib.execute(job, _compose("tms"), sweep / "seed=2")  # recomputed, not a crash
    assert rec["metrics"]["x"] == 2.0 and "cannot be read" in caplog.text


def test_the_summary_records_the_precision_the_run_used(tmp_path):
    """llc.yaml's dtype: null lets the engine choose; the record said dtype None and only traces.npz showed the
    float64 actually used (helper 31).  The result's summary, hence every run's metrics, now has it."""
    from torch import nn

    X = torch.randn(40, 2, dtype=torch.float64)
    m = nn.Linear(2, 1).double()
    r = slt.estimate_llc(m, (X, X[:, :1]), torch.nn.functional.mse_loss, num_chains=2, num_draws=5,
                         step_size=1e-4, progress=False)
    assert r.summary()["dtype"] == "float64" and _runlib.metrics_from_result(r)["dtype"] == "float64"


def test_save_traces_asked_again_recomputes_a_run_saved_without_them(tmp_path):
    calls = []

    def job(cfg, out):
        calls.append(1)
        return {"x": 1.0}, {"t": np.zeros((2, 3))}

    cfg = _compose("tms")
    cfg.save_traces = False
    _runlib.execute(job, cfg, tmp_path)
    _runlib.execute(job, cfg, tmp_path)  # skipped
    cfg.save_traces = True
    _runlib.execute(job, cfg, tmp_path)  # it was skipped without traces.npz
    _runlib.execute(job, cfg, tmp_path)  # now skipped
    assert len(calls) == 2 and (tmp_path / "traces.npz").exists()


def test_runs_recorded_before_a_key_was_added_still_count_as_finished(tmp_path):
    # a result.json written before train.online / init.std existed: the same run at their old values
    calls = []

    def job(cfg, out):
        calls.append(bool(cfg.train.online))
        return {"x": 1.0}, {}

    cfg = _compose("tms")
    rec = _runlib.execute(job, cfg, tmp_path)
    del rec["config"]["train"]["online"], rec["config"]["init"]["std"]
    records.atomic_write_json(tmp_path / records.RESULT_FILE, rec)
    _runlib.execute(job, cfg, tmp_path)  # online=False, std=None: what the old run did -> skipped
    assert calls == [False]
    cfg.init.std = 0.02  # a new value of an added key: recomputed
    _runlib.execute(job, cfg, tmp_path)
    assert calls == [False, False]
    assert set(_runlib.ADDED_KEYS) == {"train.online", "init.std", "eval", "demo_settings_dropped"}
    # experiments.llc before `eval` (2026-12-07) sampled the model as built: such a run is recomputed in eval
    # mode, unless the new run asks for eval=false
    from experiments import llc

    def job(cfg, out):
        calls.append(cfg.eval)
        return {"x": 1.0}, {}

    cfg = llc.effective_config(_compose("llc", ["eval=false"]))
    rec = _runlib.execute(job, cfg, tmp_path / "llc")
    del rec["config"]["eval"], rec["config"][llc.DROPPED]
    records.atomic_write_json(tmp_path / "llc" / records.RESULT_FILE, rec)
    _runlib.execute(job, cfg, tmp_path / "llc")
    assert len(calls) == 3  # skipped
    _runlib.execute(job, llc.effective_config(_compose("llc")), tmp_path / "llc")
    assert len(calls) == 4  # eval=true: recomputed


# ---------------------------------------------------------------------------
# experiments/tms_posterior.py (Bayesian phases; slt.sample_posterior)
# ---------------------------------------------------------------------------
TINY_POSTERIOR = ["data.n=200", "posterior.num_burnin=20", "posterior.num_draws=6", "posterior.num_steps_bw_draws=3",
                  "ladder.num=3", "chains_per_start=2"]


def test_tms_posterior_config_composes_and_instantiates():
    cfg = _compose("tms_posterior", hydra_cfg=True)
    assert cfg.name == "tms_posterior" and list(cfg.starts) == [5, 6]
    model = instantiate(cfg.model)
    assert (model.n_features, model.n_hidden) == (6, 2)
    X = instantiate(cfg.data)(generator=torch.Generator().manual_seed(0))
    assert X.shape == (cfg.data.n, 6)


def test_tms_posterior_multirun_records_phase_fractions(tmp_path):
    p = _run("tms_posterior.py", ["-m", "seed=0,1", *TINY_POSTERIOR], tmp_path)
    assert "[collect]" in p.stdout + p.stderr
    sweep = tmp_path / "sweeps" / "tms_posterior"
    df = pd.read_csv(sweep / "summary.csv")
    assert len(df) == 2 and (df["status"] == "ok").all()
    recs = {json.loads(f.read_text())["seed"]: f for f in sweep.glob("*/result.json")}
    assert sorted(recs) == [0, 1]
    rec = json.loads(recs[0].read_text())
    m = rec["metrics"]
    assert len(m["rung_nbeta"]) == 3 and m["rung_nbeta"][0] == 200 and m["rung_nbeta"][-1] == pytest.approx(60)
    assert sum(m[f"frac_k{k}"] for k in range(1, 7)) == pytest.approx(1.0)
    assert len(m["swap_accept"]) == 2 and m["num_chains"] == 4
    for key in ("seed", "config", "python", "torch"):
        assert key in rec or key in json.dumps(rec)
    with np.load(recs[0].parent / "traces.npz") as z:
        assert z["labels"].shape == (3, 4, 6) and z["draws"].shape == (4, 6, 18)
    # a rerun skips both finished runs
    p2 = _run("tms_posterior.py", ["-m", "seed=0,1", *TINY_POSTERIOR], tmp_path)
    assert (p2.stdout + p2.stderr).count("skipping") == 2


@pytest.mark.parametrize("override, message", [
    ("prior_stdd=1.0", "prior_stdd"),
    ("prior_std=-1", "prior_std"),
    ("starts=[5,9]", "starts"),
    ("ladder.min_nbeta=500", "ladder.min_nbeta"),
    ("chains_per_start=1", "chains_per_start"),
])
def test_tms_posterior_rejects_bad_values(tmp_path, override, message):
    p = _run("tms_posterior.py", [*TINY_POSTERIOR, override], tmp_path, check=False)
    assert p.returncode != 0
    assert message in p.stdout + p.stderr
