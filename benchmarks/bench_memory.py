"""Peak live memory of slt.estimate_llc on a 1.03M-param MLP, per chain, in units of 4d bytes.

Two measures, each in a fresh child process per (config, C):
  exact: a TorchDispatchMode that tracks every storage created during the call (weak refs) and
         records the peak of the live bytes after every aten op ("live tensors", like a GPU
         allocator's max_memory_allocated); also the peak of live *parameter-sized* bytes
         (storages whose numel is C*d, or C*numel of a parameter, i.e. flat copies and
         per-parameter gradient pieces stacked over chains).
  rss:   VmHWM growth after a clear_refs reset (as bench_generic), with MALLOC_MMAP_THRESHOLD_=65536
         so that every large tensor is its own mmap (freed memory leaves the RSS at once).
copies per chain = (peak(C=8) - peak(C=1)) / 7 / (4 d).
Usage: python benchmarks/bench_memory.py [--configs a,b] [--measure exact|rss|both]
(about 1 minute per configuration and measure on a 2-core CPU; results in the README, Performance).
"""
import argparse, json, os, subprocess, sys, warnings

CONFIGS = {
    "vmap-sgld-adapt": dict(vectorize="vmap", sampler="sgld", step_size=None),
    "vmap-sgld-fixed-nomala": dict(vectorize="vmap", sampler="sgld", step_size=1e-5, mala_every=0),
    "vmap-rmsprop-adapt": dict(vectorize="vmap", sampler="rmsprop_sgld", step_size=None),
    "loop-sgld-adapt": dict(vectorize="loop", sampler="sgld", step_size=None),
    "loop-sgld-fixed-nomala": dict(vectorize="loop", sampler="sgld", step_size=1e-5, mala_every=0),
    "loop-rmsprop-adapt": dict(vectorize="loop", sampler="rmsprop_sgld", step_size=None),
    "vmap-sghmc-fixed": dict(vectorize="vmap", sampler="sghmc", step_size=1e-5),
    "vmap-sgnht-fixed": dict(vectorize="vmap", sampler="sgnht", step_size=1e-5),
}


DEBUG = os.environ.get("MEM_DEBUG") == "1"


def status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])


def child(cfg_name, C, measure):
    import torch
    from torch import nn
    import torch.nn.functional as F
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import slt
    torch.manual_seed(0)
    widths = [64, 700, 700, 700, 10]
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).eval()
    d = sum(p.numel() for p in model.parameters())
    X = torch.randn(1792, 64)
    Y = torch.randint(0, 10, (1792,))
    cfg = dict(CONFIGS[cfg_name])
    kw = dict(num_chains=C, num_draws=6, num_burnin=5, batch_size=256, nbeta=46.0, localization=100.0,
              seed=0, progress=False, **cfg)

    def run():
        return slt.estimate_llc(model, (X, Y), F.cross_entropy, raise_on_divergence=False, **kw)

    out = {"d": d}
    if measure == "exact":
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten
        sizes = {C * d} | {C * p.numel() for p in model.parameters()}

        class Track(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live = {}  # cdata -> (weakref, nbytes, param_sized)
                self.peak = self.peak_param = 0
                self.count_param_allocs = 0
                self.where = {}
                self.snap = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_sparse}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_sparse:
                        try:
                            st = t.untyped_storage()
                        except Exception:
                            continue
                        key = st._cdata
                        if key not in self.live and key not in inputs:
                            nb = st.nbytes()
                            ps = (nb // t.element_size()) in sizes and nb >= 4096
                            self.live[key] = (StorageWeakRef(st), nb, ps)
                            if DEBUG:
                                import traceback
                                fr = [f for f in traceback.extract_stack()[:-1] if "/slt/" in f.filename or "torch/autograd" in f.filename]
                                self.where[key] = (str(func), nb, " < ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in fr[-3:]))
                            self.count_param_allocs += ps
                dead = [k for k, (r, _, _) in self.live.items() if r.expired()]
                for k in dead:
                    del self.live[k]
                tot = sum(nb for _, nb, _ in self.live.values())
                par = sum(nb for _, nb, ps in self.live.values() if ps)
                self.peak = max(self.peak, tot)
                if par > self.peak_param and DEBUG:
                    self.snap = [self.where.get(k) for k, (_, nb, ps) in self.live.items() if ps]
                self.peak_param = max(self.peak_param, par)
                return out

        with Track() as tr:
            res = run()
        out.update(peak=tr.peak, peak_param=tr.peak_param, param_allocs=tr.count_param_allocs)
        if DEBUG:
            for x in tr.snap:
                print("SNAP", x, file=sys.stderr)
    else:
        before = status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        res = run()
        out.update(peak=(status_kb("VmHWM") - before) * 1024)
    out["llc"] = float(res.llc_mean) if hasattr(res, "llc_mean") else None
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--measure", default="both")
    ap.add_argument("--_child", nargs=3)
    a = ap.parse_args()
    if a._child:
        return child(a._child[0], int(a._child[1]), a._child[2])
    measures = ["exact", "rss"] if a.measure == "both" else [a.measure]
    env = dict(os.environ, PYTHONPATH=os.environ.get("SLT_ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    for name in a.configs.split(","):
        row = {}
        for m in measures:
            r = {}
            for C in (1, 8):
                p = subprocess.run([sys.executable, __file__, "--_child", name, str(C), m], capture_output=True,
                                   text=True, env=env)
                if p.returncode:
                    print(name, m, C, "FAILED", p.stderr[-2000:]); break
                r[C] = json.loads(p.stdout.strip().splitlines()[-1])
            else:
                d = r[1]["d"]
                row[m] = (r[8]["peak"] - r[1]["peak"]) / 7 / (4 * d)
                if m == "exact":
                    row["exact_param"] = (r[8]["peak_param"] - r[1]["peak_param"]) / 7 / (4 * d)
                    row["param_allocs@8"] = r[8]["param_allocs"]
                row.setdefault("llc@8", r[8]["llc"])
        print(name, json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
