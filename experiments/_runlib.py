"""Hydra glue shared by the entry points in ``experiments/`` (never imported by ``slt``).

The entry points run as modules from the repository root
(``python -m experiments.tms ...``) and import this one as
``experiments._runlib``; Hydra's callback target is
``experiments._runlib.CollectCallback`` (``conf/common.yaml``).

* :func:`execute` runs one job in its run folder: validate the config, skip if
  ``result.json`` exists (unless ``force=true``), run, write ``traces.npz`` and
  then ``result.json`` atomically; on an exception write ``failed.json`` with
  the traceback and re-raise.  It takes ``(cfg, out_dir)`` so tests can call
  it without Hydra's runtime.
* :func:`hydra_task` turns a ``run(cfg, out_dir) -> (metrics, arrays)``
  function into a ``@hydra.main`` task that finds its folder through
  ``HydraConfig.get().runtime.output_dir``.
* :class:`CollectCallback` writes ``sweep.json`` (the expected jobs) when a
  multirun starts and rebuilds ``summary.csv`` (and ``summary.parquet`` with a
  parquet engine) when it ends, then runs the entry point's own end-of-sweep
  steps registered with :func:`on_sweep_end` (e.g. ``decompose.py`` combines
  its per-subset runs); :func:`main` also does both when Hydra skipped
  ``on_multirun_end`` because a job failed, and exits with status 1 when one
  of these steps failed (its outputs were not written).  Listing the expected
  jobs uses Hydra 1.3's BasicSweeper internals; where they are missing or
  changed (another Hydra version) it warns once and writes no list, and
  collect still works (it then cannot report never-started jobs as ``missing``).
* the ``slt_dirname`` resolver gives every job a deterministic folder name
  from its overrides (:func:`experiments.records.run_dirname`).
* :func:`llc_kwargs` is the one config -> engine contract (the ``sampler``
  node as keyword arguments of :func:`slt.estimate_llc`), :func:`result_arrays`
  the one :class:`slt.LLCResult` -> ``traces.npz`` contract and
  :func:`metrics_from_result` its scalar summary for ``result.json``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from experiments import _schemas, records

log = logging.getLogger("slt.experiments")

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

RunFn = Callable[[DictConfig, Path], "tuple[dict[str, Any], dict[str, Any]]"]

OmegaConf.register_new_resolver("slt_dirname", records.run_dirname, replace=True)
_schemas.register()

#: sweep folders whose multirun started in this process and were not yet collected
_PENDING_SWEEPS: list[str] = []

#: functions ``fn(sweep_dir)`` run after the summary at the end of every multirun (:func:`on_sweep_end`)
_SWEEP_END_HOOKS: list[Callable[[str], Any]] = []

#: end-of-sweep steps that failed in this process (their outputs were not written): :func:`main` exits 1
_SWEEP_ERRORS: list[str] = []


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


#: keys that do not change a run's result (also excluded from the run folder name)
NON_RESULT_KEYS = ("name", "force", "device", "progress", "results_root", "save_traces")


#: config keys added after runs were recorded, with the value that reproduces those older runs: a
#: stored run without the key counts as made with this value (so adding a field to a schema does not
#: make every finished sweep recompute)
ADDED_KEYS: dict[str, Any] = {
    "train.online": False,  # TMS online training (fresh minibatches), added 2026-11
    "init.std": None,  # TMS random-init std (None: Xavier), added 2026-11
    "eval": False,  # llc: the model sampled in eval mode (runs before sampled it as built), added 2026-12-07
    "demo_settings_dropped": [],  # llc: the demo's settings left out (experiments.llc.effective_config), 2026-12-07
}


def _comparable(config: Any) -> Any:
    """The config as stored in result.json, without the keys that do not change the result."""
    return records.to_jsonable({k: v for k, v in dict(config).items() if k not in NON_RESULT_KEYS})


def _without_added_defaults(new: Any, old: Any) -> Any:
    """``new`` minus each :data:`ADDED_KEYS` key that ``old`` lacks and ``new`` holds at its old value."""
    new = copy.deepcopy(new)
    for dotted, value in ADDED_KEYS.items():
        *parents, leaf = dotted.split(".")
        n, o = new, old
        for part in parents:
            n = n.get(part) if isinstance(n, dict) else None
            o = o.get(part) if isinstance(o, dict) else None
        if isinstance(n, dict) and isinstance(o, dict) and leaf in n and leaf not in o and n[leaf] == value:
            del n[leaf]
    return new


def same_config(stored: Any, current: Any) -> bool:
    """Whether a stored run's config gives the same result as ``current`` (ignoring
    :data:`NON_RESULT_KEYS` and :data:`ADDED_KEYS` at their old values)."""
    old, new = _comparable(stored), _comparable(current)
    return _without_added_defaults(new, old) == old


def _traces_wanted(cfg: DictConfig, old: Mapping[str, Any]) -> bool:
    """Whether ``cfg`` asks for traces that the stored run did not save (``save_traces`` is not part of the
    compared config: a run made with ``save_traces=false`` was skipped without them when they were asked for)."""
    stored = (old.get("config") or {}).get("save_traces", True)
    return bool(cfg.get("save_traces", True)) and stored is False and "traces.npz" not in (old.get("files") or [])


def _stale(res_file: Path, config: Any) -> bool:
    """Whether a stored result is not this config's (unreadable, or made with a config that gives another result):
    a failure of ``config`` then sets it aside.  A failure on a key that does not change the result (a typo in
    ``device``) or before the config is known keeps it (it was moved aside, and every finished run recomputed)."""
    if config is None or not res_file.exists():
        return False
    old, why = records.read_record(res_file)
    return why is not None or not same_config(old.get("config", {}), config)


def _set_aside(out: Path) -> None:
    """Keep a run folder's stored result as :data:`records.PREVIOUS_FILE` (its traces as ``traces.previous.npz``)
    before the job runs again: the scan counts a job as done only by a ``result.json`` of its current config."""
    for name, kept in ((records.RESULT_FILE, records.PREVIOUS_FILE), ("traces.npz", "traces.previous.npz")):
        if (out / name).exists():
            os.replace(out / name, out / kept)
            log.info("%s: the earlier %s is kept as %s until this run ends", out, name, kept)


def execute(
    run: RunFn,
    cfg: DictConfig,
    out_dir: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    validate: Callable[[DictConfig], None] | None = None,
    prepare: Callable[[DictConfig, list[str]], DictConfig] | None = None,
    inputs: Callable[[DictConfig], list[str]] | None = None,
) -> dict[str, Any]:
    """Run one job in ``out_dir`` and return its record (the content of ``result.json``).

    A finished run (``result.json`` present) is skipped unless ``cfg.force`` or
    its stored config differs from ``cfg`` (apart from :data:`NON_RESULT_KEYS`),
    e.g. because an experiment file was edited since, or a file it read has changed
    (``inputs``: a checkpoint overwritten by further training, a checkpoint glob
    that now matches more files).

    Parameters
    ----------
    run
        ``run(cfg, out_dir) -> (metrics, arrays)``: ``metrics`` a JSON-able
        dict (scalars become summary columns), ``arrays`` name -> array written
        to ``traces.npz`` (chains first) when ``cfg.save_traces``.
    cfg
        The job's composed config (with ``seed``).
    out_dir
        The run folder.
    overrides
        The job's command-line overrides (recorded; become summary columns).
    validate
        Extra value checks run before anything else (after :func:`_schemas.validate`).
    prepare
        ``prepare(cfg, overrides) -> cfg``: the config the job runs with and records (``experiments.llc``:
        without the demo's settings), applied first.
    inputs
        ``inputs(cfg) -> paths``: the files (or folders) the run reads, fingerprinted in the record
        (``inputs``: :func:`records.fingerprints`) and compared before a finished run is skipped.
    """
    out = Path(out_dir)
    res_file = out / records.RESULT_FILE
    fail_file = out / records.FAILED_FILE
    t0 = time.perf_counter()
    base: dict[str, Any] = {"name": cfg.get("name"), "seed": cfg.get("seed"), "overrides": list(overrides)}
    try:
        if prepare is not None:
            cfg = prepare(cfg, list(overrides))
        base["config"] = OmegaConf.to_container(cfg, resolve=True)
        base.update(started=now(), **records.environment_info(cfg.get("device", "cpu")))
        _schemas.validate(cfg)  # bad values fail here, before any work (and are recorded)
        if validate is not None:
            validate(cfg)
        paths = [] if inputs is None else inputs(cfg)
        if res_file.exists() and not cfg.get("force", False):
            old, why = records.read_record(res_file)
            if why is not None:
                log.warning("%s: recomputing (the unreadable file is kept as %s)", why, records.PREVIOUS_FILE)
            else:
                changed = records.changed_inputs(old.get("inputs", {}), paths)
                lost = _traces_wanted(cfg, old)
                if same_config(old.get("config", {}), base["config"]) and not changed and not lost:
                    log.info("skipping %s: %s exists (force=true recomputes)", out, records.RESULT_FILE)
                    if fail_file.exists():  # (an attempt that failed since, e.g. on a typo in device: not this run)
                        fail_file.unlink()
                    return old
                if changed:
                    log.warning("%s: input files changed since the stored run (%s): recomputing", out,
                                ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else ""))
                elif lost:
                    log.warning("%s: the stored run saved no traces (save_traces=false then): recomputing", out)
                else:
                    log.warning("%s: the stored run used a different config (an experiment file changed?): "
                                "recomputing", out)
        _set_aside(out)  # (a recompute killed or failed must not leave the old numbers counted as this job's)
        if paths:
            base["inputs"] = records.fingerprints(paths)
        out.mkdir(parents=True, exist_ok=True)
        if fail_file.exists():
            fail_file.unlink()
        metrics, arrays = run(cfg, out)
    except Exception as e:
        if _stale(res_file, base.get("config")):  # (a failing config that is not the stored run's: its numbers go)
            _set_aside(out)
        records.atomic_write_json(
            fail_file,
            {
                "status": "failed",
                **base,
                "finished": now(),
                "seconds": time.perf_counter() - t0,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            },
        )
        log.error("job failed (%s): %s; wrote %s", out, e, fail_file)
        raise
    seconds = time.perf_counter() - t0
    files = []
    if arrays and cfg.get("save_traces", True):
        records.atomic_write_npz(out / "traces.npz", **arrays)
        files.append("traces.npz")
    device = metrics.pop("device", base["device"])  # the device the run used (cfg's may be "auto")
    name = records.device_name(device)
    if name is not None:
        base["device_name"] = name
    record = {
        "status": "ok",
        **base,
        "device": device,
        "finished": now(),
        "seconds": seconds,
        "files": files,
        "metrics": metrics,
    }
    records.atomic_write_json(res_file, record)  # last: its presence marks the run as done
    for kept in (records.PREVIOUS_FILE, "traces.previous.npz"):  # (superseded now that this run is done)
        if (out / kept).exists():
            (out / kept).unlink()
    log.info("wrote %s (%.1f s)", res_file, seconds)
    return records.read_json(res_file)


def hydra_task(run: RunFn, validate: Callable[[DictConfig], None] | None = None,
               prepare: Callable[[DictConfig, list[str]], DictConfig] | None = None,
               inputs: Callable[[DictConfig], list[str]] | None = None) -> Callable[[DictConfig], Any]:
    """A Hydra task function running ``run`` through :func:`execute` in the job's output folder."""

    def task(cfg: DictConfig) -> dict[str, Any]:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        rec = execute(run, cfg, hc.runtime.output_dir, list(hc.overrides.task), validate, prepare, inputs)
        return rec.get("metrics", {})

    task.__name__ = getattr(run, "__name__", "task")
    return task


# ---------------------------------------------------------------------------
# expected jobs and collect
# ---------------------------------------------------------------------------
_EXPECTED_JOBS_WARNED = False


def _warn_expected_jobs_once(error: BaseException) -> None:
    global _EXPECTED_JOBS_WARNED
    if not _EXPECTED_JOBS_WARNED:
        _EXPECTED_JOBS_WARNED = True
        log.warning(
            "cannot list a sweep's expected jobs with this Hydra version (%s: %s); writing no sweep.json job "
            "list: the summary still lists every started run, but not never-started ones as 'missing'",
            type(error).__name__, error,
        )


def expected_jobs(config: DictConfig) -> list[dict[str, Any]] | None:
    """The jobs a basic-sweeper multirun will launch: ``[{"subdir", "overrides"}]``.

    Expands ``hydra.sweeper.params`` and the command-line overrides the way
    Hydra's BasicSweeper does and names each job's folder with the same
    ``override_dirname`` rules as the jobs themselves.  Returns ``[]`` for
    other sweepers, and ``None`` (after a warning, once per process) when
    the Hydra internals this relies on (Hydra 1.3:
    ``hydra._internal.core_plugins.basic_sweeper``,
    ``hydra._internal.config_loader_impl``) cannot be imported or behave
    differently.
    """
    hcfg = config.hydra
    if "basic_sweeper" not in str(hcfg.sweeper.get("_target_", "")):
        return []
    try:
        return _basic_sweeper_jobs(hcfg)
    except Exception as e:  # ImportError, AttributeError, TypeError ...: another Hydra version
        _warn_expected_jobs_once(e)
        return None


def _basic_sweeper_jobs(hcfg: DictConfig) -> list[dict[str, Any]]:
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = hcfg.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(hcfg.overrides.task)
    parser = OverridesParser.create()
    batches = BasicSweeper.split_arguments(parser.parse_overrides(args), None)
    od = hcfg.job.config.override_dirname
    out = []
    if not batches:
        return []
    for job in batches[0]:
        parsed = parser.parse_overrides(job)
        name = get_overrides_dirname(parsed, list(od.exclude_keys), od.item_sep, od.kv_sep)
        out.append({"subdir": records.run_dirname(name), "overrides": list(job)})
    return out


def collect_sweep(sweep_dir: str | os.PathLike) -> Any:
    """:func:`experiments.records.collect` with a one-line report of the statuses."""
    df = records.collect(sweep_dir)
    counts = records.status_counts(df)
    msg = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    print(f"[collect] {sweep_dir}: {len(df)} runs ({msg or 'none'}) -> {records.summary_files()}", flush=True)
    return df


def on_sweep_end(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """Register ``fn(sweep_dir)`` to run after :func:`collect_sweep` at the end of each multirun.

    For an entry point's own aggregation over its jobs (``decompose.py``: the
    Möbius inversion of the per-subset runs).  Runs in the launching process,
    also when a job failed (see :func:`main`); must be idempotent and callable
    on its own.  An exception in ``fn`` is reported (and makes :func:`main` exit
    with status 1), never raised inside the sweep.  Returns ``fn``.
    """
    _SWEEP_END_HOOKS.append(fn)
    return fn


def finish_sweep(sweep_dir: str | os.PathLike) -> list[str]:
    """:func:`collect_sweep`, then the :func:`on_sweep_end` hooks.

    Errors are reported on stderr and recorded (not raised: Hydra would only log
    them as a callback warning), so :func:`main` exits with status 1 after the
    sweep.  Returns this call's error messages (empty when every output was written).
    """
    errors = []
    steps = [("collect", collect_sweep)] + [(getattr(fn, "__name__", str(fn)), fn) for fn in _SWEEP_END_HOOKS]
    for name, fn in steps:
        try:
            fn(str(sweep_dir))
        except Exception as e:  # noqa: BLE001 - reported, and main() exits non-zero
            msg = f"{name} failed for {sweep_dir}: {type(e).__name__}: {e}"
            if isinstance(e, ImportError):
                msg += f" (install the missing package: pip install {e.name or '...'})"
            log.error("end-of-sweep step %s", msg)
            print(f"[sweep end] {msg}", file=sys.stderr, flush=True)
            errors.append(msg)
            if name == "collect":
                break  # the later steps read what collect writes
    _SWEEP_ERRORS.extend(errors)
    return errors


try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object  # type: ignore[assignment,misc]


class CollectCallback(_Callback):  # type: ignore[misc,valid-type]
    """Record the expected jobs at the start of a multirun; collect (and run the
    :func:`on_sweep_end` hooks) at its end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        sweep.mkdir(parents=True, exist_ok=True)
        _PENDING_SWEEPS.append(str(sweep))  # collected at the end whatever happens below
        try:
            jobs = expected_jobs(config)
        except Exception as e:  # never block a sweep on bookkeeping
            _warn_expected_jobs_once(e)
            jobs = None
        if jobs is None:  # no list: sweep.json is left as it is
            return
        try:
            old, why = (records.read_record(sweep / records.SWEEP_FILE) if (sweep / records.SWEEP_FILE).exists()
                        else ({}, None))
            if why is not None:  # unreadable: kept aside, and the list starts again from this sweep's jobs
                log.warning("%s: kept as %s and rewritten with this sweep's jobs", why, records.SWEEP_FILE + ".corrupt")
                os.replace(sweep / records.SWEEP_FILE, sweep / (records.SWEEP_FILE + ".corrupt"))
                old = {}
            now_listed = {j["subdir"] for j in jobs}
            # an earlier sweep's job that never started here (or whose folder was deleted) and that this sweep does
            # not list is nobody's to run: it stayed "missing" for good, and collect exited 1 for ever
            dropped = [j["subdir"] for j in old.get("jobs", [])
                       if j["subdir"] not in now_listed and not (sweep / j["subdir"]).is_dir()]
            if dropped:
                log.info("%s: %d job(s) listed by an earlier sweep and never run (or deleted) are no longer "
                         "expected: %s", sweep / records.SWEEP_FILE, len(dropped),
                         ", ".join(dropped[:3]) + (" ..." if len(dropped) > 3 else ""))
            merged = {j["subdir"]: j for j in old.get("jobs", []) if j["subdir"] not in dropped}
            merged.update({j["subdir"]: j for j in jobs})
            records.atomic_write_json(
                sweep / records.SWEEP_FILE,
                {"name": config.get("name"), "updated": now(), "jobs": list(merged.values())},
            )
        except Exception as e:  # a corrupt sweep.json must not block the sweep
            log.warning("could not update %s: %s", sweep / records.SWEEP_FILE, e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = str(config.hydra.sweep.dir)
        finish_sweep(sweep)
        while sweep in _PENDING_SWEEPS:
            _PENDING_SWEEPS.remove(sweep)


def main(hydra_main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function; if a multirun ended without collecting
    (Hydra skips ``on_multirun_end`` when a job failed), collect anyway.

    Jobs that a launcher runs in other processes (joblib's loky workers,
    submitit on this machine or on Slurm) unpickle the task and import
    :mod:`experiments` by name, like this process: loky workers inherit its
    module search path, and submitit's ``python -m`` job processes start in its
    working directory (the repository root, where ``python -m experiments.<name>``
    was run) or see the same ``PYTHONPATH``.
    """
    try:
        hydra_main()
    finally:
        for sweep in list(_PENDING_SWEEPS):
            _PENDING_SWEEPS.remove(sweep)
            finish_sweep(sweep)
    if _SWEEP_ERRORS:
        print(f"error: {len(_SWEEP_ERRORS)} end-of-sweep step(s) failed, so their outputs were not written:\n  "
              + "\n  ".join(_SWEEP_ERRORS), file=sys.stderr, flush=True)
        sys.exit(1)


def torch_dtype(name: Any):
    """``"float32"``/``"float64"`` -> the torch dtype (a torch dtype is returned as is)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    return {"float32": torch.float32, "float64": torch.float64}[name]


#: the one function every config-driven entry point hands the ``sampler`` node to
ESTIMATOR = "slt.estimate_llc"


def llc_kwargs(sampler: Any, **extra: Any) -> dict[str, Any]:
    """The ``sampler`` config node as keyword arguments of :func:`slt.estimate_llc`.

    The one config -> engine contract of the entry points: the node
    (``conf/sampler/*.yaml`` over :class:`experiments._schemas.SamplerConf`,
    whose defaults are :data:`slt.defaults.LLC`) is resolved to plain
    Python (``sampler_kwargs`` a ``dict``), Hydra's ``_target_``/``_partial_``
    are dropped, then ``extra`` (``seed=``, ``device=``, ``progress=``,
    ``dtype=`` ...) is added.  A ``dtype`` given by name (``"float64"``) becomes
    the torch dtype.

    Raises
    ------
    ValueError
        If the node's ``_target_`` names another function than
        :func:`slt.estimate_llc` (every entry point calls the engine itself).
    """
    node = as_mapping(sampler) if sampler is not None else {}
    target = node.get("_target_")
    if target is not None and target != ESTIMATOR:
        raise ValueError(f"invalid config value sampler._target_={target!r}: the entry points call {ESTIMATOR} "
                         "with the sampler node's keys (set sampler.sampler to choose the algorithm)")
    kw = {k: copy.deepcopy(v) for k, v in node.items() if not str(k).startswith("_")}
    kw.update(extra)
    if isinstance(kw.get("dtype"), str):
        kw["dtype"] = torch_dtype(kw["dtype"])
    return kw


#: per-chain arrays of an :class:`slt.LLCResult` saved in ``traces.npz`` (chains first), then ``obs_<name>``
TRACE_ARRAYS = ("llc_trace", "loss_trace", "loss_star_trace", "llc_per_chain")


def result_arrays(result: Any, *, prefix: str = "", traces: bool = True) -> dict[str, Any]:
    """The arrays of an :class:`slt.LLCResult` (or a list of them) written to ``traces.npz``.

    The one result -> ``traces.npz`` contract of the entry points: with
    ``traces`` (the default) :data:`TRACE_ARRAYS` (``llc_trace``,
    ``loss_trace``, ``loss_star_trace`` ``(C, T)``; ``llc_per_chain`` ``(C,)``)
    and each observable as ``obs_<name>`` ``(C, T, ...)``; without, only
    ``llc_per_chain``.  A list of results (one per checkpoint of a batched
    call) gives each array stacked along a leading checkpoint axis ``(K, ...)``.
    Every name is prefixed by ``prefix`` (``tms_curve``: ``ckpt_``).
    """
    import torch

    def one(r: Any) -> dict[str, Any]:
        names = TRACE_ARRAYS if traces else ("llc_per_chain",)
        out = {k: torch.as_tensor(getattr(r, k)) for k in names}
        if traces:
            out.update({f"obs_{k}": torch.as_tensor(v) for k, v in (r.observables or {}).items()})
        return out

    if isinstance(result, (list, tuple)):
        per = [one(r) for r in result]
        arrays = {k: torch.stack([a[k] for a in per]) for k in (per[0] if per else {})}
    else:
        arrays = one(result)
    return {prefix + k: v for k, v in arrays.items()}


def instantiate_partial(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` for a node (partial or not) with extra keyword arguments."""
    from hydra.utils import instantiate

    return instantiate(node, **kwargs)


def metrics_from_result(result: Any, prefix: str = "") -> dict[str, Any]:
    """Scalar summary of an :class:`slt.LLCResult` (``llc_mean``, ``llc_sem``, diagnostics ...)."""
    s = result.summary()
    out = {}
    for k, v in s.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[prefix + k] = v
        elif k == "llc_per_chain":
            out[prefix + k] = v
    return out


def as_mapping(x: Any) -> Mapping[str, Any]:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else dict(x)
