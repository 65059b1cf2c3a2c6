"""Run records on disk: atomic result files and a summary table rebuilt from them.

An experiment run owns one folder.  It finishes by writing ``result.json``
(:func:`atomic_write_json`: a temporary file in the same folder, flushed and
fsynced, then ``os.replace``), so the file's presence marks the run as done
and a killed process never leaves a half-written result.  A run that raises
writes ``failed.json`` with the traceback instead.  Nothing ever appends to a
shared table: :func:`collect` rebuilds ``summary.csv`` (and ``summary.parquet``
when a parquet engine, pyarrow or fastparquet, is installed) of a sweep folder
from the run folders, idempotently, marking failed and missing runs instead of
dropping them.

Sweep folder layout (as written by the Hydra entry points in ``experiments/``)::

    <sweep>/sweep.json              expected jobs (subdir + overrides), optional
    <sweep>/<subdir>/result.json    finished run: status "ok", config, metrics ...
    <sweep>/<subdir>/failed.json    failed run: status "failed", error, traceback
    <sweep>/<subdir>/traces.npz     per-draw traces (chains first)
    <sweep>/summary.csv, summary.parquet (the latter with a parquet engine)

:func:`scan_sweep` reads that layout (each run's status and record);
:func:`collect` turns it into the summary table, and ``decompose.py`` combines
the per-subset records it returns.

Sweep bookkeeping of the experiments, not part of the library (``slt`` never
imports it).  It does not import Hydra; the Hydra glue lives in
:mod:`experiments._runlib`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "RESULT_FILE",
    "FAILED_FILE",
    "SWEEP_FILE",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_npz",
    "read_json",
    "to_jsonable",
    "environment_info",
    "device_name",
    "fingerprints",
    "changed_inputs",
    "run_dirname",
    "parse_override",
    "flatten",
    "scan_sweep",
    "collect",
    "summary_files",
    "parquet_engine",
    "status_counts",
]

RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"
#: where a run's earlier result is kept while it is recomputed (a changed config or input, ``force=true``), and
#: after a recompute that failed or was killed: the scan no longer counts the old numbers as this job's result
PREVIOUS_FILE = "result.previous.json"
SWEEP_FILE = "sweep.json"
SUMMARY_FILES = ("summary.csv", "summary.parquet")
#: what to install when no parquet engine is: the summary is then written as CSV only
PARQUET_HINT = 'pip install pyarrow (or pip install -e ".[test]")'

#: statuses that :func:`collect` reports
STATUSES = ("ok", "failed", "incomplete", "missing")


# ---------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    Readers see either the old file or the complete new one, never a partial
    write; the folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make results private on a shared cluster
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    """The process's umask (read by setting it and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, paths and tuples to plain JSON types.

    Non-finite floats become ``None`` (JSON has no NaN); tensors and arrays
    become (nested) lists.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    mod = type(obj).__module__
    if mod.startswith("torch"):
        import torch

        if isinstance(obj, torch.Tensor):
            return to_jsonable(obj.detach().cpu().tolist())
        return str(obj)  # dtype, device
    return str(obj)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """:func:`to_jsonable` ``obj`` and write it atomically as indented JSON."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def atomic_write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """Write arrays (tensors are converted) to a compressed ``.npz`` atomically."""
    conv = {}
    for k, v in arrays.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        conv[k] = np.asarray(v)
    buf = io.BytesIO()
    np.savez_compressed(buf, **conv)
    return atomic_write_bytes(path, buf.getvalue())


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def read_record(path: str | os.PathLike) -> tuple[Any, str | None]:
    """``(content, None)`` of a JSON record, or ``(None, why)`` when it cannot be read (a file truncated by a
    full disk or a copy cut short): the caller names the file instead of failing with a bare JSONDecodeError."""
    try:
        content = read_json(path)
    except (OSError, ValueError) as e:  # (json.JSONDecodeError is a ValueError)
        return None, f"{path} cannot be read ({type(e).__name__}: {e})"
    if not isinstance(content, dict):
        return None, f"{path} cannot be read (it holds a JSON {type(content).__name__}, not a record)"
    return content, None


# ---------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------
def environment_info(device: Any = None) -> dict[str, Any]:
    """Versions (slt, torch, numpy, python, hydra), host, platform and the device used.

    The versions come from :func:`slt.versions` (the library's one versions
    helper), with Hydra's added when it is installed.  ``device``: the device
    the run used (``"cpu"``, ``"cuda:0"``); for CUDA devices the GPU name is
    added.
    """
    import slt

    versions = slt.versions("hydra")  # slt, torch, numpy, python, platform (+ hydra)
    plat = versions.pop("platform", None) or platform.platform()
    info: dict[str, Any] = {
        "versions": versions,
        "host": platform.node(),
        "platform": plat,
        "device": str(device) if device is not None else "cpu",
    }
    name = device_name(device)
    if name is not None:
        info["device_name"] = name
    return info


def device_name(device: Any) -> str | None:
    """The GPU's name of a CUDA device (``"cuda"``, ``"cuda:1"``), else ``None``."""
    import torch

    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(str(device)))
    return None


# ---------------------------------------------------------------------------
# input files: what a finished run read, so that a rerun notices when they change
# ---------------------------------------------------------------------------
#: files of a Hugging Face Trainer's checkpoint folder that are not the model (not fingerprinted: the optimizer
#: state alone is twice the weights)
TRAINER_STATE = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args", "scaler")


def _files_of(path: str | os.PathLike) -> list[Path]:
    """A file, or the files directly inside a folder (a Hugging Face checkpoint: weights, index, configs,
    tokenizer), without hidden files and a Trainer's optimizer, scheduler and random state
    (:data:`TRAINER_STATE`)."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.iterdir()
                      if f.is_file() and not f.name.startswith(".") and not f.name.startswith(TRAINER_STATE))
    return [p] if p.is_file() else []


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprints(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """``{file: {"size", "mtime_ns", "sha256"}}`` of the files ``paths`` name (a folder: the files in it)."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        for f in _files_of(path):
            st = f.stat()
            out[str(f)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(f)}
    return out


def changed_inputs(stored: Mapping[str, Mapping[str, Any]], paths: Iterable[str | os.PathLike]) -> list[str]:
    """The files among ``paths`` (folders: the files in them) that differ from their ``stored``
    :func:`fingerprints`, and stored files no longer among them (a checkpoint glob that matches more or fewer
    files).  A file of the same size and modification time counts as unchanged without reading it; otherwise
    its SHA-256 decides (a ``touch`` changes nothing, an overwrite with other weights does)."""
    now = {str(f): f for p in paths for f in _files_of(p)}
    changed = sorted(set(stored) ^ set(now))
    for name in sorted(set(stored) & set(now)):
        old, st = stored[name], now[name].stat()
        if old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            continue
        if old.get("size") != st.st_size or old.get("sha256") != _sha256(now[name]):
            changed.append(name)
    return changed


# ---------------------------------------------------------------------------
# run folder names
# ---------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-]")


def run_dirname(override_dirname: str, max_len: int = 120) -> str:
    """Deterministic folder name for a job from its ``override_dirname``.

    ``""`` (no overrides) becomes ``"default"``; characters other than
    letters, digits and ``. _ = , + -`` (path separators, brackets, quotes)
    become ``_``, so a path-valued override never creates nested folders;
    names longer than ``max_len`` are cut and suffixed with 10 hex digits of
    their SHA-1, so distinct override sets stay distinct.
    """
    if not isinstance(override_dirname, str):
        raise TypeError(f"override_dirname must be a str, got {type(override_dirname).__name__}")
    if override_dirname == "":
        return "default"
    safe = _UNSAFE.sub("_", override_dirname)
    if safe in (".", "..") or safe.startswith("."):
        safe = "_" + safe
    if len(safe) > max_len or safe != override_dirname:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
        if len(safe) > max_len:
            safe = safe[: max_len - 11]
        safe = f"{safe}-{digest}" if safe != override_dirname else safe
    return safe


def parse_override(override: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)`` with the value parsed as a scalar when it is one.

    ``+key=v``/``++key=v``/``~key`` prefixes are dropped from the key; ints,
    floats, ``true``/``false`` and ``null`` are converted, anything else
    (lists, strings) is kept as text.
    """
    key, sep, val = override.partition("=")
    key = key.lstrip("+~")
    if not sep:
        return key, None
    low = val.strip().lower()
    if low in ("true", "false"):
        return key, low == "true"
    if low in ("null", "none"):
        return key, None
    for cast in (int, float):
        try:
            return key, cast(val)
        except ValueError:
            pass
    return key, val.strip("'\"")


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings -> one level with dotted keys; lists are kept as values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------
# collect
# ---------------------------------------------------------------------------
def _cell(v: Any) -> Any:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(to_jsonable(v))
    return v


#: keys of a record itself (not of its metrics or config) that are summary columns: they take precedence
#: over a metric or an override of the same name (``device=auto`` as typed against the device the run
#: used; a result's sampling ``seconds`` against the run's), which keep theirs as ``metrics.<key>``
RECORD_COLUMNS = ("seed", "seconds", "device", "device_name", "started", "finished", "error")


def _row_from_record(rec: Mapping[str, Any], status: str) -> dict[str, Any]:
    row: dict[str, Any] = {"status": status}
    for k in RECORD_COLUMNS:
        if k in rec:
            row[k] = _cell(rec[k])
    for o in rec.get("overrides", []) or []:
        k, v = parse_override(str(o))
        row.setdefault(k, v)
    for k, v in flatten(rec.get("metrics", {}) or {}).items():
        row.setdefault(f"metrics.{k}" if k in RECORD_COLUMNS and k in rec else k, _cell(v))
    for k, v in flatten(rec.get("config", {}) or {}).items():
        row.setdefault(k, _cell(v))
    return row


def _read_overrides_yaml(path: Path) -> list[str]:
    # Hydra writes a YAML list of strings ("- seed=0"); read it without a YAML dependency
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("- "):
            out.append(line[2:].strip().strip("'\""))
    return out


def _arrow_safe(df):
    """Object columns holding mixed types become strings (parquet needs one type per column)."""
    import pandas as pd

    for c in df.columns:
        if df[c].dtype == object:
            kinds = {type(v) for v in df[c] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1:
                if kinds <= {int, float}:
                    df[c] = pd.to_numeric(df[c])
                else:
                    df[c] = df[c].map(lambda v: None if v is None else str(v))
    return df


def scan_sweep(
    sweep_dir: str | os.PathLike,
    *,
    expected: Iterable[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every run of a sweep folder with its status and record.

    Returns one ``{"run", "status", "overrides", "record"}`` per run folder (in
    name order) and then per expected job without a folder (in the order of
    ``sweep.json``, then ``expected``):

    * ``status="ok"``: the folder has ``result.json``; ``record`` is its content;
    * ``"failed"``: ``failed.json`` and no ``result.json`` (or a ``failed.json`` newer than it); ``record`` is
      its content (``error``, ``traceback`` ...); also a record that cannot be read (``error`` names the file);
    * ``"incomplete"``: the folder exists but holds neither (a killed or
      still-running job); ``record`` is ``None`` and ``overrides`` come from
      ``sweep.json`` or the job's ``.hydra/overrides.yaml``;
    * ``"missing"``: listed in ``<sweep>/sweep.json`` (or ``expected``) but no
      folder exists (never started); ``record`` is ``None``.

    ``overrides`` of an ok or failed run are those stored in its record.
    Folders whose names start with ``.`` (``.submitit``) or ``_`` are skipped,
    and so are folders that are neither a run nor an expected job.  Reads
    only; :func:`collect` builds the summary table from it.

    Raises
    ------
    FileNotFoundError
        If ``sweep_dir`` does not exist.
    """
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep folder {str(sweep)!r} does not exist")
    jobs: dict[str, list[str]] = {}
    sweep_file = sweep / SWEEP_FILE
    if sweep_file.exists():
        listed, why = read_record(sweep_file)
        if why is not None:  # (the run folders still say what ran; only never-started jobs go unlisted)
            log.warning("%s: the expected jobs are not known; the run folders are scanned without it", why)
        for j in (listed or {}).get("jobs", []) if isinstance(listed, dict) else []:
            jobs[str(j["subdir"])] = list(j.get("overrides", []))
    for j in expected or []:
        jobs[str(j["subdir"])] = list(j.get("overrides", []))

    runs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for d in sorted(p for p in sweep.iterdir() if p.is_dir()):
        if d.name.startswith((".", "_")):
            continue
        res, fail = d / RESULT_FILE, d / FAILED_FILE
        if res.exists() or fail.exists():
            # a failure newer than the result is the job's latest word (the result is an earlier config's)
            ok = res.exists() and not (fail.exists() and fail.stat().st_mtime > res.stat().st_mtime)
            rec, why = read_record(res if ok else fail)
            if why is not None:  # a corrupt record: failed, naming the file (rerunning the job recomputes it)
                ovs = jobs.get(d.name) or (_read_overrides_yaml(d / ".hydra" / "overrides.yaml")
                                           if (d / ".hydra" / "overrides.yaml").exists() else [])
                rec, ok = {"overrides": list(ovs), "error": why}, False
            status = "ok" if ok else "failed"
            runs.append({"run": d.name, "status": status, "overrides": list(rec.get("overrides", []) or []),
                         "record": rec})
        elif d.name in jobs or (d / ".hydra").is_dir() or (d / PREVIOUS_FILE).exists():
            ovs = jobs.get(d.name)
            if ovs is None and (d / ".hydra" / "overrides.yaml").exists():
                ovs = _read_overrides_yaml(d / ".hydra" / "overrides.yaml")
            runs.append({"run": d.name, "status": "incomplete", "overrides": list(ovs or []), "record": None})
        else:
            continue  # some other folder
        seen.add(d.name)
    for subdir, ovs in jobs.items():
        if subdir not in seen:
            runs.append({"run": subdir, "status": "missing", "overrides": list(ovs), "record": None})
    return runs


def collect(
    sweep_dir: str | os.PathLike,
    *,
    expected: Iterable[Mapping[str, Any]] | None = None,
    write: bool = True,
):
    """Rebuild the summary table of a sweep from its run folders.

    One row per run of :func:`scan_sweep` (each run folder, and each expected
    job without a folder):

    * ``status="ok"``: the folder has ``result.json``; its overrides, metrics
      and (flattened, dotted) config become columns;
    * ``"failed"``: ``failed.json`` and no ``result.json``; ``error`` holds the
      exception's message;
    * ``"incomplete"``: the folder exists but holds neither (a killed or
      still-running job);
    * ``"missing"``: listed in ``<sweep>/sweep.json`` (or ``expected``) but no
      folder exists (never started).

    Folders whose names start with ``.`` (``.submitit``) or ``_`` are skipped.
    Idempotent: run it as often as you like (at the end of a multirun, by hand
    after a failure or while a sweep is running).

    Parameters
    ----------
    sweep_dir
        The sweep folder (``<results>/sweeps/<name>``).
    expected
        Extra expected jobs ``{"subdir": str, "overrides": [str, ...]}``,
        merged with those in ``sweep.json``.
    write
        Write ``summary.csv`` atomically into ``sweep_dir``, and ``summary.parquet``
        when a parquet engine is installed (:func:`parquet_engine`; the base install
        has none, and the CSV holds the same table).

    Returns
    -------
    pandas.DataFrame
        Columns ``run``, ``status``, the override keys, the metrics, then the
        config; rows sorted by ``run``.

    Raises
    ------
    FileNotFoundError
        If ``sweep_dir`` does not exist.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    override_keys: dict[str, None] = {}
    for r in scan_sweep(sweep_dir, expected=expected):
        rec = r["record"] if r["record"] is not None else {"overrides": r["overrides"]}
        override_keys.update((parse_override(str(o))[0], None) for o in rec.get("overrides", []) or [])
        row = _row_from_record(rec, r["status"])
        if r["status"] == "failed":
            row["error"] = rec.get("error")
        row["run"] = r["run"]
        rows.append(row)

    sweep = Path(sweep_dir)
    df = pd.DataFrame(rows)
    if len(df):
        first = ["run", "status"]
        df = df[first + [c for c in df.columns if c not in first]].sort_values("run", kind="stable")
        df = df.reset_index(drop=True)
    else:
        df = pd.DataFrame(columns=["run", "status"])
    df = _arrow_safe(df)
    df.attrs["override_keys"] = [k for k in override_keys if k in df.columns]  # the swept settings, for display
    if write:
        atomic_write_bytes(sweep / "summary.csv", df.to_csv(index=False).encode())
        if parquet_engine() is not None:
            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
            atomic_write_bytes(sweep / "summary.parquet", buf.getvalue())
        elif (sweep / "summary.parquet").exists():
            (sweep / "summary.parquet").unlink()  # stale: the CSV is the current table
    return df


def parquet_engine() -> str | None:
    """``"pyarrow"`` or ``"fastparquet"`` if pandas can write parquet here, else ``None``."""
    import importlib

    for name in ("pyarrow", "fastparquet"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return name
    return None


def summary_files() -> str:
    """The summary files :func:`collect` writes on this install, for messages."""
    return "summary.csv, summary.parquet" if parquet_engine() is not None else \
        f"summary.csv (no summary.parquet: no parquet engine; {PARQUET_HINT})"


def status_counts(df) -> dict[str, int]:
    """``{"ok": .., "failed": .., "incomplete": .., "missing": ..}`` of a :func:`collect` table."""
    counts = {s: 0 for s in STATUSES}
    if len(df):
        for s, c in df["status"].value_counts().items():
            counts[str(s)] = int(c)
    return counts
