r"""λ̂ of a user's model from config (``conf/llc.yaml``).

The module, the data and the loss are named by ``_target_`` (any importable
callable), the trained point w* comes from ``checkpoint`` (a ``torch.save`` d
state dict) or, without one, from training with :func:`slt.training.train`;
the sampler settings are those of ``sampler/``.  One run = one
:func:`slt.estimate_llc` call; ``result.json`` holds λ̂, its standard error,
the diagnostics and (if ``reference`` is set) the comparison with a known λ.

Usage::

    python -m experiments.llc                          # demo: RRR [5, 3, 4], rank 2 (λ = 8)
    python -m experiments.llc model._target_=mypkg.Net data._target_=mypkg.data \
        checkpoint=/path/ckpt.pt train=null loss=torch.nn.functional.cross_entropy
    python -m experiments.llc -m checkpoint=a.pt,b.pt,c.pt train=null   # one run per checkpoint
    python -m experiments.llc 'checkpoint=ckpt/step_*.pt' train=null   # an LLC curve: one batched call
    python -m experiments.llc ... restrict=heads     # weight-refined: every attention head, one batched call
    python -m experiments.llc ... restrict=layers    # (also attention_and_mlp, embeddings, modules, a glob,
                                                     #  a list of globs or a mapping {label: glob})
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

import slt
from experiments import _runlib
from slt.target import checkpoint_state
from slt.training import train


def _validate(cfg: DictConfig) -> None:
    for key in ("model", "data"):
        node = cfg[key]
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"invalid config value {key}={OmegaConf.to_container(node) if isinstance(node, DictConfig) else node!r}: "
                             f"needs a _target_ (the dotted name of a callable)")
    if cfg.checkpoint is None and cfg.train is None:
        raise ValueError("invalid config: checkpoint=null and train=null: give a checkpoint or training settings")
    if cfg.checkpoint is not None and _is_glob(cfg.checkpoint):
        if not checkpoint_files(cfg.checkpoint):
            raise ValueError(f"invalid config value checkpoint={cfg.checkpoint!r}: no file matches the pattern")
        if cfg.train is not None:
            raise ValueError(f"invalid config: checkpoint={cfg.checkpoint!r} is a pattern (an LLC curve over the files "
                             "it matches) and train is set: pass train=null")
    elif cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise ValueError(f"invalid config value checkpoint={cfg.checkpoint!r}: no such file")
    if cfg.dtype not in ("float32", "float64", None):
        raise ValueError(f"invalid config value dtype={cfg.dtype!r}: must be float32, float64 or null (the model's)")
    loss = cfg.loss
    if loss is not None and not isinstance(loss, (str, DictConfig)):
        raise ValueError(f"invalid config value loss={loss!r}: a dotted name, a node with _target_, or null")
    _check_restrict(cfg.get("restrict"))
    if cfg.get("qkv_layout") is not None and cfg.qkv_layout not in slt.restrict.QKV_LAYOUTS:
        raise ValueError(f"invalid config value qkv_layout={cfg.qkv_layout!r}: one of {slt.restrict.QKV_LAYOUTS} "
                         "or null")


#: ``restrict=<name>``: the architecture helpers of :mod:`slt.restrict`, one restriction per component
RESTRICT_HELPERS = ("heads", "layers", "attention_and_mlp", "embeddings", "modules")


def _plain(v: Any) -> Any:
    """A config value as plain Python (lists and dicts for OmegaConf's containers)."""
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def _check_restrict(r: Any) -> None:
    """``restrict``: null, a helper name, a glob, a list of globs, or a mapping ``{label: glob or list of globs}``."""
    def globs(v: Any) -> bool:
        return isinstance(v, str) or (isinstance(v, ListConfig) and len(v) > 0 and all(isinstance(g, str) for g in v))

    if r is None or globs(r):
        return
    if isinstance(r, DictConfig) and len(r) > 0 and all(globs(v) for v in r.values()):
        return
    raise ValueError(f"invalid config value restrict={_plain(r)!r}: "
                     f"null, one of {', '.join(RESTRICT_HELPERS)}, a glob over parameter names, a list of globs or a "
                     "mapping {label: glob or list of globs}")


def restrict_to(cfg: DictConfig, model: torch.nn.Module) -> Any:
    """The ``restrict_to`` of :func:`slt.estimate_llc` that ``cfg.restrict`` names: ``None``; a helper's
    ``{label: ...}`` (``heads`` with ``cfg.qkv_layout``); a glob or list of globs (one restriction); or a
    mapping ``{label: glob or globs}``."""
    r = cfg.get("restrict")
    if r is None:
        return None
    if isinstance(r, str) and r in RESTRICT_HELPERS:
        helper = getattr(slt.restrict, r)
        return helper(model, qkv_layout=cfg.get("qkv_layout")) if r == "heads" else helper(model)
    return _plain(r)


def _is_glob(path: str) -> bool:
    return any(c in str(path) for c in "*?[")


def checkpoint_files(pattern: str) -> list[str]:
    """The files a glob pattern matches, and the Hugging Face checkpoint directories (``checkpoint-500/``
    with a ``model.safetensors``, ``pytorch_model.bin`` or a sharded index), in natural order
    (``step_200.pt`` before ``step_1000.pt``)."""
    import glob
    import re

    def key(path: str) -> list[Any]:
        return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path)]

    from slt.target import HF_WEIGHT_FILES, HF_WEIGHT_INDEXES

    def weights(f: str) -> bool:
        return Path(f).is_file() or any((Path(f) / w).is_file() for w in HF_WEIGHT_FILES + HF_WEIGHT_INDEXES)

    return sorted((f for f in glob.glob(str(pattern)) if weights(f)), key=key)


def _accepts(target: str, name: str) -> bool:
    from hydra.utils import get_object

    try:
        fn = get_object(target)
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    # a named parameter only: a **kwargs callable forwards what it does not know (transformers'
    # from_pretrained to the model's __init__, torch.load to pickle), which then fails on `generator`
    return name in params


def user_keys(overrides: Any) -> set[str]:
    """The config keys a job's command-line ``overrides`` set (Hydra's override grammar: ``data.n=10``,
    ``+model.hidden=32``, ``~reference`` -> ``data.n``, ``model.hidden``, ``reference``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group for o in OverridesParser.create().parse_overrides([str(o) for o in overrides or ()])}


def without_demo(cfg: DictConfig, overrides: Any = ()) -> tuple[DictConfig, list[str]]:
    """``cfg`` without the demo's own settings when the model is not the demo's, and their names.

    ``conf/llc.yaml``'s defaults are a demo (a reduced-rank regression, its data, loss and closed-form
    λ); Hydra merges an override such as ``model._target_=mypkg.Net`` into that node, so the demo's
    keyword arguments (``model.widths``) would reach the user's constructor and the demo's reference
    would be compared with the user's λ̂.  When ``model._target_`` differs from the demo's, every demo
    setting still at its demo value is dropped: the model's and (when ``data._target_`` differs too)
    the data's keyword arguments, the loss (then the model's own, as with ``loss=null``) and the
    reference — except the keys the job's command-line ``overrides`` set (:func:`user_keys`): a user's
    ``data.n=10000`` that happens to equal the demo's was dropped, silently, and the function's own
    default used."""
    demo = OmegaConf.load(Path(_runlib.CONF_DIR) / "llc.yaml")
    if cfg.model._target_ == demo.model._target_:
        return cfg, []
    raw = OmegaConf.to_container(cfg, resolve=False)
    given = user_keys(overrides)

    def set_by_user(path: str) -> bool:
        return any(path == k or path.startswith(k + ".") for k in given)

    dropped: list[str] = []
    nodes = ["model"] + (["data"] if cfg.data._target_ != demo.data._target_ else [])
    if "data" not in nodes:  # the demo's data kept: its references to the model's settings resolved first
        raw["data"] = OmegaConf.to_container(cfg.data, resolve=True)
    for node in nodes:
        for key, value in OmegaConf.to_container(demo[node], resolve=False).items():
            if (key != "_target_" and key in raw[node] and raw[node][key] == value
                    and not set_by_user(f"{node}.{key}")):
                del raw[node][key]
                dropped.append(f"{node}.{key}")
    for key in ("loss", "reference"):
        if (raw[key] is not None and raw[key] == OmegaConf.to_container(demo, resolve=False)[key]
                and not set_by_user(key)):
            raw[key] = None
            dropped.append(key)
    out = OmegaConf.create(raw)
    return out, dropped


def build(cfg: DictConfig, gen: torch.Generator) -> tuple[torch.nn.Module, Any, Any]:
    """Instantiate (model, data, loss) from ``cfg``; passes ``generator=`` where accepted."""
    from hydra.utils import get_object, instantiate

    extra = {"generator": gen} if _accepts(cfg.model._target_, "generator") and "generator" not in cfg.model else {}
    model = instantiate(cfg.model, **extra)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model._target_={cfg.model._target_!r} returned {type(model).__name__}, not a torch.nn.Module")
    extra = {"generator": gen} if _accepts(cfg.data._target_, "generator") and "generator" not in cfg.data else {}
    data = instantiate(cfg.data, **extra)
    if isinstance(data, (tuple, list)) and len(data) > 1:  # NumPy arrays as tensors: (X, Y) may mix them
        data = tuple(torch.as_tensor(t) if isinstance(t, np.ndarray) else t for t in data)
        lead = []
        for t in data:  # keep the leading tensors: (X, Y, teacher) -> (X, Y)
            if not isinstance(t, torch.Tensor):
                break
            lead.append(t)
        if lead and len(lead) < len(data):
            data = tuple(lead) if len(lead) > 1 else lead[0]
    if cfg.loss is None:  # as in slt.estimate_llc: the model's default_loss, else the loss in its output
        loss = getattr(model, "default_loss", None) or slt.losses.model_loss
    elif isinstance(cfg.loss, str):
        loss = get_object(cfg.loss)
    else:
        try:
            loss = instantiate(cfg.loss)
        except Exception as e:  # a loss function's node without _partial_ calls it with no output and target
            if cfg.loss.get("_partial_", False) or "required positional argument" not in str(e):
                raise
            raise TypeError(f"invalid config value loss={_plain(cfg.loss)}: instantiating it called "
                            f"{cfg.loss._target_} without output and target ({_line_with(str(e), 'required positional')}); a "
                            "node that configures a loss function (keyword arguments such as label_smoothing) needs "
                            "_partial_: true, so that it becomes loss(output, target) with those arguments") from e
    if not callable(loss):
        raise TypeError(f"loss={cfg.loss!r} is not callable")
    return model, data, loss


def _line_with(text: str, part: str) -> str:
    """The first line of ``text`` that holds ``part`` (Hydra wraps the callee's error in lines of its own)."""
    return next((line.strip() for line in text.splitlines() if part in line), text.strip())


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load a ``torch.save`` d checkpoint strictly: a state dict, or a training checkpoint holding it
    (``{"model": ...}``, ``{"state_dict": ...}``, under a key prefix; :func:`slt.target.checkpoint_state`)."""
    model.load_state_dict(dict(checkpoint_state(model, path)), strict=True)


#: the config key under which :func:`effective_config` names the demo settings it left out
DROPPED = "demo_settings_dropped"


def effective_config(cfg: DictConfig, overrides: Any = ()) -> DictConfig:
    """The config a job runs with and records (the ``prepare`` of :func:`experiments._runlib.execute`):
    without the demo's settings that the user's model does not take (:func:`without_demo`, keeping
    what the command line set), their names under :data:`DROPPED`.  Before, ``result.json`` and the
    summary recorded the demo's ``model.widths``, ``data.n`` and reference for every user model."""
    out, dropped = without_demo(cfg, overrides)
    if dropped:
        print(f"[llc] model {out.model._target_} is not the demo's: left out the demo's {', '.join(dropped)}",
              flush=True)
    out = OmegaConf.create(OmegaConf.to_container(out, resolve=False))
    out[DROPPED] = dropped
    return out


def input_files(cfg: DictConfig) -> list[str]:
    """The files a run reads (the ``inputs`` of :func:`experiments._runlib.execute`): the checkpoint (a
    file, a Hugging Face folder, or every file a pattern matches) and any ``model``/``data`` keyword argument
    naming an existing file (``data._target_=torch.load +data.f=data.pt``)."""
    ckpt = cfg.get("checkpoint")
    # (a folder: records.fingerprints reads its files, not a Trainer's optimizer state)
    paths = [] if ckpt is None else checkpoint_files(ckpt) if _is_glob(ckpt) else [str(ckpt)]
    for node in ("model", "data"):
        for key, value in _plain(cfg[node]).items():
            if key != "_target_" and isinstance(value, str) and Path(value).is_file():
                paths.append(value)
    return paths


def _float_data(data: Any, dtype: torch.dtype) -> Any:
    """``data`` with its floating-point tensors in ``dtype`` (a tensor, a tuple or list of them, a mapping of
    columns); integer labels and token ids, and other containers (Datasets, loaders), as they are."""
    if isinstance(data, torch.Tensor):
        return data.to(dtype) if data.is_floating_point() else data
    if isinstance(data, (tuple, list)):
        return type(data)(_float_data(t, dtype) for t in data)
    if isinstance(data, dict):
        return {k: _float_data(v, dtype) for k, v in data.items()}
    return data


def run(cfg: DictConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    seed = int(cfg.seed)
    if DROPPED not in cfg:  # called directly, not as a Hydra job (no command line): prepared here
        cfg = effective_config(cfg)
    model, data, loss = build(cfg, torch.Generator().manual_seed(seed))
    restriction = restrict_to(cfg, model)  # from the structure alone: a bad restrict fails before training
    metrics: dict[str, Any] = {}  # (the demo's settings left out are in the recorded config, cfg[DROPPED])
    if cfg.checkpoint is not None and _is_glob(cfg.checkpoint):
        return _curve(cfg, model, data, loss, metrics, restriction, out_dir)
    if cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint)
        metrics["checkpoint"] = str(cfg.checkpoint)
    if cfg.train is not None:
        dt = _runlib.torch_dtype(cfg.train.dtype)
        model = model.to(dt)
        tdata = _float_data(data, dt)  # labels and token ids stay integers
        fit = train(
            model, tdata, loss, steps=int(cfg.train.steps), lr=float(cfg.train.lr), optimizer=cfg.train.optimizer,
            batch_size=cfg.train.batch_size, weight_decay=float(cfg.train.weight_decay),
            generator=torch.Generator().manual_seed(seed + 1), tol=float(cfg.train.tol), finish=cfg.train.finish,
            finish_iterations=int(cfg.train.finish_iterations),
        )
        metrics.update(train_loss=fit.loss, train_grad_norm=fit.grad_norm, train_converged=fit.converged)
    if cfg.get("eval", True):  # dropout off, BatchNorm's running statistics: w* as the trained model uses it
        model.eval()
    res = slt.estimate_llc(model, data, loss, restrict_to=restriction, **_runlib.llc_kwargs(
        cfg.sampler, seed=seed, device=cfg.device, dtype=cfg.dtype, progress=bool(cfg.progress)))
    metrics["num_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(res, dict):  # one result per restriction
        return _refined(cfg, res, metrics)
    metrics.update(_runlib.metrics_from_result(res))
    ref = _reference(cfg)
    if ref is not None:
        metrics.update(llc_reference=ref, relative_error=(res.llc_mean - ref) / ref if ref else None,
                       z_reference=(res.llc_mean - ref) / res.llc_sem if res.llc_sem > 0 else None)
    metrics["device"] = res.config.get("device", cfg.device)
    print(f"[llc] {cfg.model._target_}: λ̂ = {res.llc_mean:.3f} ± {res.llc_sem:.3f}"
          + (f" (reference {metrics['llc_reference']:.3g})" if "llc_reference" in metrics else ""), flush=True)
    return metrics, _runlib.result_arrays(res)


def _reference(cfg: DictConfig) -> float | None:
    if cfg.reference is None:
        return None
    from hydra.utils import instantiate

    return float(instantiate(cfg.reference)) if isinstance(cfg.reference, DictConfig) else float(cfg.reference)


def _curve(cfg: DictConfig, model: torch.nn.Module, data: Any, loss: Any, metrics: dict[str, Any],
           restriction: Any = None, out_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """λ̂ at every checkpoint a pattern matches (``checkpoint='ckpt/step_*.pt'``), in one batched
    :func:`slt.estimate_llc` call (checkpoint k with the random streams of ``seed + k``): per-checkpoint
    lists ``ckpt_*`` and the last checkpoint's summary as ``final_*``; in ``out_dir``, ``results.csv`` (one row
    per result: :func:`slt.results_frame`) and ``llc_curve.png`` (:func:`slt.plot_llc_curve`, x from the
    files' step numbers)."""
    paths = checkpoint_files(cfg.checkpoint)
    states = [checkpoint_state(model, p, k) for k, p in enumerate(paths)]
    if cfg.get("eval", True):
        model.eval()
    results = slt.estimate_llc(model, data, loss, state_dicts=states, restrict_to=restriction,
                               **_runlib.llc_kwargs(cfg.sampler, seed=int(cfg.seed), device=cfg.device,
                                                    dtype=cfg.dtype, progress=bool(cfg.progress)))
    if out_dir is not None:
        _curve_files(results, paths, Path(out_dir))
    if isinstance(results, dict):  # {label: [result per checkpoint]}
        metrics.update(num_checkpoints=len(paths), ckpt_path=paths)
        return _refined(cfg, results, metrics)
    metrics.update(
        num_checkpoints=len(paths), ckpt_path=paths,
        ckpt_llc_mean=[r.llc_mean for r in results], ckpt_llc_sem=[r.llc_sem for r in results],
        ckpt_init_loss=[r.init_loss for r in results], ckpt_converged=[r.converged for r in results],
        ckpt_rhat=[float(r.diagnostics.get("rhat", float("nan"))) for r in results],
        num_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        device=results[-1].config.get("device", cfg.device),
        **_runlib.metrics_from_result(results[-1], prefix="final_"))
    ref = _reference(cfg)
    if ref is not None:
        metrics.update(llc_reference=ref, ckpt_z_reference=[(r.llc_mean - ref) / r.llc_sem if r.llc_sem > 0 else None
                                                            for r in results])
    print(f"[llc] {cfg.model._target_}: {len(paths)} checkpoints in one batched call; λ̂ = "
          + ", ".join(f"{r.llc_mean:.3f}" for r in results), flush=True)
    return metrics, _runlib.result_arrays(results, prefix="ckpt_")


def _curve_files(results: Any, paths: list[str], out: Path) -> None:
    """``results.csv`` and ``llc_curve.png`` of a curve (``results``: a list over checkpoints, or
    ``{label: list}``)."""
    import matplotlib.pyplot as plt

    from slt.plotting import steps_from_names

    frame = slt.results_frame(results)
    frame = frame.drop(columns=["checkpoint_file"], errors="ignore")
    frame.insert(1, "checkpoint_file", [str(paths[k]) for k in frame["checkpoint"]])
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "results.csv", index=False)
    fig = slt.plot_llc_curve(results, x=steps_from_names(paths))
    fig.savefig(out / "llc_curve.png", dpi=120)
    plt.close(fig)


def _refined(cfg: DictConfig, res: dict[str, Any], metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics and arrays of a run with one result per restriction (``{label: result}``, or with checkpoints
    ``{label: [result per checkpoint]}``): ``restrict_labels`` and, aligned with them, ``restrict_llc_mean``,
    ``restrict_llc_sem``, ``restrict_converged``, ``restrict_rhat`` (lists over checkpoints in a curve); the
    arrays of ``traces.npz`` stacked along a leading restriction axis (``restrict_llc_trace`` (M, C, T) or
    (M, K, C, T))."""
    labels = list(res)
    first = next(iter(_leaves(res)))

    def each(f: Any) -> list[Any]:
        return [[f(r) for r in res[k]] if isinstance(res[k], list) else f(res[k]) for k in labels]

    metrics.update(
        restrict=_plain(cfg.restrict), restrict_labels=labels,
        restrict_llc_mean=each(lambda r: r.llc_mean), restrict_llc_sem=each(lambda r: r.llc_sem),
        restrict_converged=each(lambda r: r.converged),
        restrict_rhat=each(lambda r: float(r.diagnostics.get("rhat", float("nan")))),
        restrict_step_size=each(lambda r: float(r.step_size)), restrict_init_loss=each(lambda r: r.init_loss),
        nbeta=first.nbeta, localization=first.localization, num_chains=first.num_chains,
        num_draws=first.num_draws, device=first.config.get("device", cfg.device))
    per = [_runlib.result_arrays(res[k]) for k in labels]
    arrays = {f"restrict_{name}": torch.stack([a[name] for a in per]) for name in per[0]}
    shown = ", ".join(f"{k} {v:.3f}" if not isinstance(v, list) else f"{k} [{', '.join(f'{x:.3f}' for x in v)}]"
                      for k, v in zip(labels[:8], metrics["restrict_llc_mean"][:8]))
    print(f"[llc] {cfg.model._target_}: {len(labels)} restrictions in one batched call; λ̂: {shown}"
          + (" ..." if len(labels) > 8 else ""), flush=True)
    return metrics, arrays


def _leaves(res: Any) -> list[Any]:
    return [r for v in res.values() for r in (v if isinstance(v, list) else [v])]


@hydra.main(version_base="1.3", config_path=_runlib.CONF_DIR, config_name="llc")
def main(cfg: DictConfig) -> Any:
    return _runlib.hydra_task(run, _validate, prepare=effective_config, inputs=input_files)(cfg)


if __name__ == "__main__":
    _runlib.main(main)
