"""Rebuild ``summary.csv`` (and ``summary.parquet`` with pyarrow) of one or more sweep folders.

Runs automatically at the end of a multirun; run it by hand after a sweep in
which a job failed (Hydra then skips its end-of-sweep callback), after a
killed sweep, or while a Slurm sweep is still running::

    python -m experiments.collect results/sweeps/tms_phase [more sweep dirs ...]

Every run folder becomes one row: ``status`` is ``ok`` (``result.json``),
``failed`` (``failed.json``; ``error`` holds the message), ``incomplete``
(started, neither file) or ``missing`` (listed in ``sweep.json``, never
started).  The printed table shows the settings that differ between the runs (the swept
overrides); the files hold every column.  Exit status 0 when every run is ok, 1 otherwise (2 for a bad path).
"""

from __future__ import annotations

import argparse
import sys

from experiments import records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dirs", nargs="+", help="sweep folders (<results>/sweeps/<name>)")
    ap.add_argument("--quiet", action="store_true", help="do not print the table")
    args = ap.parse_args(argv)
    code = 0
    for d in args.sweep_dirs:
        try:
            df = records.collect(d)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        counts = records.status_counts(df)
        msg = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no runs"
        print(f"{d}: {len(df)} runs ({msg}) -> {records.summary_files()}")
        if not args.quiet and len(df):
            swept = [k for k in df.attrs.get("override_keys", []) if df[k].astype(str).nunique() > 1]
            cols = [c for c in ("run", "status", *swept, "llc_mean", "llc_sem", "point", "error") if c in df.columns]
            with __import__("pandas").option_context("display.width", 160, "display.max_colwidth", 60):
                print(df[cols].to_string(index=False))
        if counts["ok"] != len(df):
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
