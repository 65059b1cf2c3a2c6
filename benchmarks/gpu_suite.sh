#!/usr/bin/env bash
# The prepared GPU run of issue #14 item 6, as one command on a lent GPU machine (never in CI), in the
# order of what a lease must bring back first:
#   1. benchmarks/bench_step_cost.py --device cuda: SGLD step / SGD step on a 10.2M-parameter DLN (target
#      ≤ 1.2), with a hand-written SGLD step as the eager floor, slt's loop/vmap paths and 8 chains, and a
#      torch.profiler table;
#   2. benchmarks/bench_generic.py --device cuda: by default the jobs the first GPU run (2026-12-04) left
#      open, the 16-checkpoint curve and the 1M MLP's memory per chain (GENERIC_ARGS="--jobs curve mlp cnn
#      gpt2 mlp1m" for the whole suite: ms per chain-step, slt vs the hand loop and devinterp when it
#      imports, memory per chain from CUDA's allocator);
#   3. tests/test_cuda.py (the CUDA path: paths agree, GPU vs CPU, defaults converge, bf16 autocast);
#   4. benchmarks/bench_refined.py --device cuda: the per-head refined LLC of a GPT-2 (issue #15's target:
#      slt's one batched call ≥ 10× devinterp's runs per head).
# Results go to $OUT (the device tool's folder) or results/gpu.  The machine has torch, transformers and
# pytest but no network and no pyro: slt runs from the checkout (PYTHONPATH), and a folder .whl of cp312
# wheels, when present, is installed into /tmp/site first.  Make it here with benchmarks/gpu_wheels.sh
# (pyro-ppl, which slt needs, and devinterp 2.0.1 with its missing dependencies) and pass carry=[".whl"];
# devinterp is used only if it imports, otherwise the devinterp column is skipped.
# Budget: each part has its own timeout (STEP_TIMEOUT, GENERIC_TIMEOUT, TESTS_TIMEOUT, REFINED_TIMEOUT:
# 110 + 250 + 100 + 90 s), about 9 minutes at most (run it with timeout_s=570), so that with a machine's
# start a second short call still fits a 15-minute lease.
# Files in $OUT: env.txt, step_cost.txt/.json, generic.txt/.json, cuda_tests.txt, refined.txt (7; the device
# tool returns at most 8, so a tee of the whole log into $OUT still fits).  The generic suite writes its JSON
# after every job, so a part cut short leaves what it finished.
# A CPU smoke run of the script itself:
#   DEVICE=cpu STEP_ARGS="--width 200 --variants auto:1 auto:8" GENERIC_ARGS="--quick --jobs mlp --no-memory" \
#     REFINED_ARGS=--quick benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_DISABLE=1
OUT="${OUT:-results/gpu}"
mkdir -p "$OUT"
PY=python3
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
stamp() { echo "== $(date -u +%T) $*"; }
DEVICE="${DEVICE:-cuda}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
} 2>&1 | tee "$OUT/env.txt"
stamp step cost; timeout ${STEP_TIMEOUT:-110} $PY benchmarks/bench_step_cost.py --device "$DEVICE" --profile \
  ${STEP_ARGS:---steps 200 --variants auto:1 loop:1 vmap:1 auto:8} --out "$OUT/step_cost.json" 2>&1 | tee "$OUT/step_cost.txt"
DI=""
$PY -c "from devinterp.slt import sampler; from devinterp.slt.llc import llc" 2>&1 | tail -3 | tee -a "$OUT/env.txt" \
  || DI="--no-devinterp"  # pipefail: the import's own status
stamp generic $DI
timeout ${GENERIC_TIMEOUT:-250} $PY benchmarks/bench_generic.py --device "$DEVICE" $DI --no-train-row --no-mala-row ${GENERIC_ARGS:---jobs curve mlp1m} --out "$OUT/generic.json" \
  2>&1 | grep -v "Warning\|warnings.warn" | tee "$OUT/generic.txt"
stamp tests; timeout ${TESTS_TIMEOUT:-100} $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py 2>&1 | tail -25 | tee "$OUT/cuda_tests.txt"
stamp refined; timeout ${REFINED_TIMEOUT:-90} $PY benchmarks/bench_refined.py --device "$DEVICE" --no-separate ${REFINED_ARGS:-} \
  2>&1 | grep -v "Warning\|warnings.warn" | tee "$OUT/refined.txt"
stamp gpu_suite done
