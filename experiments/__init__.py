"""Runnable experiments on top of the ``slt`` library (not part of it; ``slt`` never imports them).

Run every entry point as a module from the repository root::

    python -m experiments.quickstart                 # plain argparse jobs
    python -m experiments.compare_nuts --job tms
    python -m experiments.tms -m seed=0,1,2          # Hydra entry points (conf/<name>.yaml)
    python -m experiments.llc | expfam | tms_curve | tms_posterior | decompose
    python -m experiments.collect results/sweeps/tms # rebuild a sweep's summary
    python -m experiments.figures all

Modules: :mod:`experiments._runlib` (Hydra glue: run folders, skip/resume,
the collect callback, the config -> :func:`slt.estimate_llc` contract),
:mod:`experiments._schemas` (typed config schemas), :mod:`experiments.records`
(atomic run records, sweep scans and summaries), :mod:`experiments._symmetry`
(symmetry paths from config).
"""
