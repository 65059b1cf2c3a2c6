r"""Decompose the LLC over the symmetries of q, as a Hydra experiment (``conf/decompose.yaml``).

One run builds q (``n`` rows of :math:`N(\text{shift}, I)` on :math:`\mathbb R^2\times\mathbb R^2`,
or on :math:`\mathbb R^2` for ``case=dihedral``), the groups, and calls
:func:`slt.symmetry.decompose`: λ̂ on every joint symmetrization :math:`q_S` (re-trained
:math:`w^*_S`), Möbius contributions :math:`c(S) = \sum_{T\subseteq S}(-1)^{|S|-|T|}\hat\lambda(T)`
with propagated errors.  Writes ``decomposition.csv`` (one row per subset) and
``decomposition.png`` (λ̂(S) and c(S) bar charts) next to ``result.json``.

Cases (exact answers in :mod:`slt.symmetry.decompose`):

* ``independent``: two polar location blocks, a rotation group per block:
  λ = 2, 3/2, 3/2, 1, so c = 2, −½, −½, 0 (no interaction);
* ``shared_angle``: the blocks share their angle: λ = 3/2, 3/2, 3/2, 1, so
  c({1}) = c({2}) = 0 and c({1,2}) = −½ (a pure interaction);
* ``dihedral``: one polar block, a mirror and C_3 rotations (non-commuting;
  jointly they generate D_3).

Susceptibility spectra by irrep (:func:`slt.symmetry.irrep_susceptibility`; writes
``spectrum.csv`` and ``spectrum.png``; ``model.case=...``):

* ``spectrum_expfam``: the polar exponential family
  :math:`p(s) \propto \exp(r\langle(\cos\varphi, \sin\varphi), s\rangle)` on the hexagon at the
  uniform (D_6-invariant) q, w* = 0; q tilted along each D_6 isotypic component of
  :math:`f(s) = s_1 + s_1^2 + s_1 s_2`; observable :math:`r\cos\varphi`;
* ``spectrum_tms``: the TMS 6-gon (6 features, 2 hidden, high-sparsity data made exactly
  invariant under cyclic feature shifts C_6, which the 6-gon emulates by a rotation of the hidden
  plane); q tilted along each Fourier mode of :math:`f(x) = \sum_i a_i x_i`, a = (1, ½, 0, 0, 0, 0);
  observables: the column norms :math:`\lVert W_i\rVert`.

Usage::

    python experiments/decompose.py
    python experiments/decompose.py -m model.case=independent,shared_angle
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runlib  # noqa: E402
from _schemas import SamplerConf, _Base  # noqa: E402

import slt  # noqa: E402
from slt.models import PolarGaussianLocation  # noqa: E402
from slt.symmetry import SO2, BlockPolarLocation, Cyclic, Reflection, block_group, decompose  # noqa: E402


@dataclass
class DecomposeModelConf:
    case: str = "independent"
    group: str = "cyclic4"


@dataclass
class DecomposeConfig(_Base):
    """``decompose.yaml`` (see the file for the meaning of each key); checked in :func:`_validate`."""

    name: str = "decompose"
    model: DecomposeModelConf = field(default_factory=DecomposeModelConf)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    n: int = 250
    shift: float = 1.0
    nbeta_n: int = 2000
    orbit_samples: int = 16
    z: float = 3.0
    retrain: bool = True
    quenched: bool = False
    step_factor: float = 0.1


def _validate(cfg: DictConfig) -> None:
    try:  # typed check of every key (misspelled keys, wrong types), before any work
        OmegaConf.merge(OmegaConf.structured(DecomposeConfig), cfg)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"invalid decompose config: {e}") from None
    cases = ["independent", "shared_angle", "dihedral", "spectrum_expfam", "spectrum_tms"]
    if cfg.model.case not in cases:
        raise ValueError(f"invalid config value model.case={cfg.model.case!r}: must be one of {cases}")
    if cfg.model.group not in ("cyclic4", "so2"):
        raise ValueError(f"invalid config value model.group={cfg.model.group!r}: must be one of ['cyclic4', 'so2']")
    for key in ("n", "nbeta_n", "orbit_samples"):
        if int(cfg[key]) < (2 if key in ("n", "nbeta_n") else 1):
            raise ValueError(f"invalid config value {key}={cfg[key]}: too small")
    for key in ("z", "step_factor"):
        if not float(cfg[key]) > 0:
            raise ValueError(f"invalid config value {key}={cfg[key]}: must be positive")


def _llc_kwargs(cfg: DictConfig, nb: float, curvature: float) -> dict[str, Any]:
    kw = {k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items()
          if not k.startswith("_") and k != "nbeta"}
    gamma = 1.0 if kw.get("localization") is None else float(kw["localization"])
    kw["localization"] = gamma
    if kw.get("step_size") is None:
        kw["step_size"] = float(cfg.step_factor) / (nb * curvature + gamma)
    kw.update(device=cfg.device, progress=bool(cfg.progress))
    return kw


def _spectrum(cfg: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from slt.models import ParametricFeatureFamily, ToyModelOfSuperposition, kgon_parameters, make_tms_sparse_data, tms_loss
    from slt.models.expfam import polygon_support
    from slt.symmetry import Dihedral, compress, irrep_susceptibility, symmetrize

    f64 = torch.float64
    gen = torch.Generator().manual_seed(int(cfg.seed))
    nb = slt.default_nbeta(int(cfg.nbeta_n))
    if cfg.model.case == "spectrum_expfam":
        supp = polygon_support(6, dtype=f64)
        q = slt.Data(supp, None, torch.full((6,), 1 / 6, dtype=f64))
        model = ParametricFeatureFamily.polar(supp)
        model = model.to(f64)
        group = Dihedral(6)
        f = lambda z: z[:, 0] + z[:, 0] ** 2 + z[:, 0] * z[:, 1]  # noqa: E731
        obs = {"r_cos_phi": lambda p: p["theta1"][:, 0] * torch.cos(p["theta2"][:, 0])}
        kw = _llc_kwargs(cfg, nb, 1.0)
    else:
        X = make_tms_sparse_data(int(cfg.n), 6, gen, dtype=f64)
        group = Cyclic(6)
        q = compress(symmetrize(X, group))
        model = ToyModelOfSuperposition(6, 2).to(f64)
        model.load_state_dict({k: v.to(f64) for k, v in kgon_parameters(6).items()})
        a = torch.tensor([1.0, 0.5, 0, 0, 0, 0], dtype=f64)
        f = lambda z: z @ a  # noqa: E731
        obs = {"norm_W": lambda p: p["W"].norm(dim=1)}
        kw = _llc_kwargs(cfg, nb, 1.0)
        kw.pop("step_size")  # TMS: the engine's curvature-based default unless sampler.step_size is set
        if cfg.sampler.step_size is not None:
            kw["step_size"] = float(cfg.sampler.step_size)
        kw["loss_fn"] = tms_loss
    spec = irrep_susceptibility(
        model, q, group, f, strength=float(cfg.shift), nbeta=nb, observables=obs, dtype=f64, seed=int(cfg.seed), **kw,
    )
    df = spec.to_frame()
    df.to_csv(out_dir / "spectrum.csv", index=False)
    import matplotlib

    matplotlib.use("Agg")
    spec.plot().savefig(out_dir / "spectrum.png", dpi=120)
    print(spec, flush=True)
    for k, v in spec.chi.items():
        print(f"  chi[{k}] per irrep:", v.tolist(), "±", spec.chi_sem[k].tolist())
    metrics = {"nbeta": nb, "table": df.to_dict(orient="list"), "device": cfg.device,
               "chi": {k: v.tolist() for k, v in spec.chi.items()},
               "chi_sem": {k: v.tolist() for k, v in spec.chi_sem.items()}}
    return metrics, {"dllc_dh": spec.dllc_dh, "dllc_dh_sem": spec.dllc_dh_sem}


def run(cfg: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if str(cfg.model.case).startswith("spectrum_"):
        return _spectrum(cfg, out_dir)
    f64 = torch.float64
    gen = torch.Generator().manual_seed(int(cfg.seed))
    nb = slt.default_nbeta(int(cfg.nbeta_n))
    s = float(cfg.shift)
    if cfg.model.case == "dihedral":
        x = torch.randn(int(cfg.n), 2, generator=gen, dtype=f64) + torch.tensor([0.6 * s, 0.8 * s], dtype=f64)
        groups = {"mirror": Reflection(2, normal=[0.0, 1.0]), "C3": Cyclic(3, action="rotation")}
        factory = lambda: PolarGaussianLocation(dtype=f64)  # noqa: E731
    else:
        x = torch.randn(int(cfg.n), 4, generator=gen, dtype=f64) + torch.tensor([s, 0.0, s, 0.0], dtype=f64)
        rot = SO2() if cfg.model.group == "so2" else Cyclic(4, action="rotation")
        groups = {"rot1": block_group(rot, 0, 2), "rot2": block_group(rot, 1, 2)}
        shared = cfg.model.case == "shared_angle"
        factory = lambda: BlockPolarLocation(2, shared_angle=shared, dtype=f64)  # noqa: E731
    res = decompose(
        factory, x, groups, nbeta=nb, retrain=bool(cfg.retrain), quenched=bool(cfg.quenched),
        orbit_samples=int(cfg.orbit_samples), symmetrize_seed=int(cfg.seed), seed=int(cfg.seed), z=float(cfg.z),
        dtype=f64, **_llc_kwargs(cfg, nb, 2.5),
    )
    df = res.to_frame()
    if res.quenched is not None:
        import pandas as pd

        df = pd.concat([df, res.quenched.to_frame()], ignore_index=True)
    df.to_csv(out_dir / "decomposition.csv", index=False)
    import matplotlib

    matplotlib.use("Agg")
    fig = res.plot(title=f"LLC decomposition: {cfg.model.case}, {cfg.model.group}")
    fig.savefig(out_dir / "decomposition.png", dpi=120)
    print(res, flush=True)
    metrics: dict[str, Any] = {"nbeta": nb, "table": df.to_dict(orient="list"), "device": cfg.device}
    for m, lab in enumerate(res.labels):
        key = "S" + "".join(str(i + 1) for i in range(res.k) if m >> i & 1) if m else "S0"
        metrics[f"llc_{key}"] = float(res.llc[m])
        metrics[f"llc_sem_{key}"] = float(res.llc_sem[m])
        metrics[f"c_{key}"] = float(res.contribution[m])
        metrics[f"c_sem_{key}"] = float(res.contribution_sem[m])
    arrays = {"llc": res.llc, "llc_sem": res.llc_sem, "contribution": res.contribution,
              "contribution_sem": res.contribution_sem, "w_star": res.w_star}
    return metrics, arrays


@hydra.main(version_base="1.3", config_path=_runlib.CONF_DIR, config_name="decompose")
def main(cfg: DictConfig) -> Any:
    return _runlib.hydra_task(run, _validate)(cfg)


if __name__ == "__main__":
    _runlib.main(main)
