"""Adapters that run the same LLC-estimation job through peer libraries.

They exist so that benchmarks and cross-check tests can compare this package's
estimators with other implementations on an identical job.  Peer libraries are
optional dependencies and are imported lazily, inside the adapter functions.
"""

from slt.peers.devinterp import devinterp_llc

__all__ = ["devinterp_llc"]
