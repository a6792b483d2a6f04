#!/usr/bin/env bash
# One GPU check of fedjax_med, sized for a 10-minute slot on one H100:
#   1. the machine: nvidia-smi, Python and package versions, jax devices;
#   2. a correctness smoke ON THE GPU: pytest tests/test_client.py tests/test_fedavg.py;
#   3. the full benchmark (ResNet-18 @224 and the BraTS U-Net one hospital at a time inside the
#      round, as their configs train; then many small ResNets vectorised), with a time budget
#      that ends it before the slot does; it rewrites its JSON after every measurement, so even
#      a kill keeps what was measured;
#   4. with the time left (COMPARE_SECONDS), ResNet-18 rounds with the hospitals vmapped
#      (`--clients_in_parallel=0`, K=8 for vmap-vs-sequential), the comparison behind the
#      configs' choice;
#   4b. partial participation (PARTICIPATION_SECONDS): round time with m of K hospitals taking
#      part over the time with all K, vectorised, K=16/64 (m=K/4) and the cross-device shape
#      (configs/chestxray14.py:cross_device, 1,000 hospitals, 50 a round), vmapped and one at a
#      time (launch/participation_benchmark.py; needs the run's dependencies, as step 5 does);
#   4c. many small hospitals (SWEEP_SECONDS): examples/s of the vectorised round of the small
#      ResNet over K = 5, 16, 64, 256 hospitals (`benchmark.py --model=resnet_small
#      --only=scaling_k`), the shape the client axis is for;
#   5. with whatever time is left (GRID_SECONDS, default all of it), the hospital-scale grid
#      (`launch/experiments.py --suite=nih_scale`, most informative runs first); its
#      results.csv / results.md are copied to $OUT. A run cut off by the slot resumes from its
#      checkpoint only where the grid folder (GRID_DIR) is kept.
# Everything is logged under $OUT (default /tmp/fedjax_med_gpu_check):
#   nvidia_smi.txt  env.txt  smoke.log  bench.log  bench_gpu.json  compare.log  bench_gpu_vmap.json
#   participation.jsonl  participation.log  bench_gpu_k_sweep.json  k_sweep.log  grid.log
#   results.csv  results.md
# The peer comparison (launch/peer_benchmark.py) is not a step: it needs torch, which the lent
# GPU machines do not have and whose CUDA wheel is far over what a run can carry.
#
# Usage (from anywhere):  OUT=/some/dir bash launch/gpu_check.sh
#   TOTAL_SECONDS=560   wall-clock budget of the whole script (default 560 s)
#   SMOKE_SECONDS=100   cap of the pytest smoke
#   COMPARE_SECONDS=150 kept for step 4 (0 skips it)
#   PARTICIPATION_SECONDS=120 cap of step 4b (0 skips it)
#   SWEEP_SECONDS=120   cap of step 4c (0 skips it)
#   GRID_SECONDS=       cap of step 5 (default: the time left; 0 skips it)
#   GRID_DIR=/tmp/fedjax_med_nih_grid   the grid's run folders
#   PYTHON=python3      interpreter (needs jax with CUDA, flax, optax, ml_collections)
# Missing pure-Python/abi3 packages can travel as wheels in ./.whl (see launch/README.md); they
# are installed into /tmp/site first, without network.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-/tmp/fedjax_med_gpu_check}
TOTAL_SECONDS=${TOTAL_SECONDS:-560}
SMOKE_SECONDS=${SMOKE_SECONDS:-100}
COMPARE_SECONDS=${COMPARE_SECONDS:-150}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SECONDS=0

echo "== wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
  ls .whl
else
  echo "(no .whl folder: using the installed packages)"
fi

echo "== nvidia-smi"
nvidia-smi 2>&1 | tee "$OUT/nvidia_smi.txt"

echo "== environment"
"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, platform, sys
print('python', platform.python_version(), sys.executable)
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'chex', 'numpy',
             'ml_collections', 'cryptography', 'dp_accounting', 'tensorflow_datasets', 'pytest'):
    try:
        module = importlib.import_module(name)
        print(f'{name:20s} {getattr(module, "__version__", "(no __version__)")}')
    except Exception as e:
        print(f'{name:20s} MISSING ({type(e).__name__}: {e})')
import jax
print('devices', jax.devices())
print('device kind', jax.devices()[0].device_kind, '| backend', jax.default_backend())
for name in ('fedjax_med.rounds', 'fedjax_med.aggregation.secagg_protocol',
             'fedjax_med.privacy.fast_clip'):
    try:
        importlib.import_module(name)
        print(f'import {name}: ok')
    except Exception as e:
        print(f'import {name}: FAILED ({type(e).__name__}: {e})')
EOF

echo "== smoke tests on the GPU (cap ${SMOKE_SECONDS} s)"
if "$PY" -c 'import pytest' 2>/dev/null; then
  # tests/conftest.py defaults JAX_PLATFORMS to cpu; point it at the GPU for this smoke.
  JAX_PLATFORMS=cuda timeout "$SMOKE_SECONDS" "$PY" -m pytest -q -x -p no:cacheprovider -o addopts= \
    tests/test_client.py tests/test_fedavg.py 2>&1 | tee "$OUT/smoke.log"
  echo "smoke exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/smoke.log"
else
  echo "pytest is not installed: smoke skipped" | tee "$OUT/smoke.log"
fi

LEFT=$((TOTAL_SECONDS - SECONDS - COMPARE_SECONDS))
if [ "$LEFT" -lt 60 ]; then
  echo "only ${LEFT} s left: benchmark skipped" | tee "$OUT/bench.log"
  exit 1
fi
# The benchmark checks its budget before each measurement; keep room for the last one to finish
# (a ResNet-18 item compiles for up to a minute or two). A kill still leaves the JSON file.
BUDGET=$((LEFT - 120))
if [ "$BUDGET" -lt 30 ]; then BUDGET=30; fi
echo "== benchmark (full; ${LEFT} s left, measurement budget ${BUDGET} s)"
timeout --signal=INT --kill-after=10 "$((LEFT - 5))" \
  "$PY" launch/benchmark.py --json="$OUT/bench_gpu.json" --budget_s="$BUDGET" \
  2>&1 | tee "$OUT/bench.log"
echo "benchmark exit status: ${PIPESTATUS[0]}; whole check ${SECONDS} s" | tee -a "$OUT/bench.log"

LEFT=$((TOTAL_SECONDS - SECONDS))
if [ "$COMPARE_SECONDS" -gt 0 ] && [ "$LEFT" -ge 60 ]; then
  echo "== ResNet-18 with the hospitals vmapped (${LEFT} s left)"
  timeout --signal=INT --kill-after=10 "$((LEFT - 5))" \
    "$PY" launch/benchmark.py --model=resnet18 --only=federated,vmap,secagg --clients_in_parallel=0 \
    --vmap_k=8 --json="$OUT/bench_gpu_vmap.json" --budget_s="$((LEFT - 60))" \
    2>&1 | tee "$OUT/compare.log"
  echo "comparison exit status: ${PIPESTATUS[0]}; whole check ${SECONDS} s" | tee -a "$OUT/compare.log"
fi

LEFT=$((TOTAL_SECONDS - SECONDS))
PARTICIPATION_SECONDS=${PARTICIPATION_SECONDS:-120}
if [ "$PARTICIPATION_SECONDS" -gt "$LEFT" ]; then PARTICIPATION_SECONDS=$LEFT; fi
if [ "$PARTICIPATION_SECONDS" -ge 30 ]; then
  echo "== partial participation, vmapped then one at a time (${PARTICIPATION_SECONDS} s)"
  timeout --signal=INT --kill-after=10 "$((PARTICIPATION_SECONDS - 5))" bash -c '
    "$0" launch/participation_benchmark.py --cross_device --clients_in_parallel=-1 &&
    "$0" launch/participation_benchmark.py --cross_device --clients_in_parallel=1' "$PY" \
    2>"$OUT/participation.log" | tee "$OUT/participation.jsonl"
  echo "participation exit status: ${PIPESTATUS[0]}; whole check ${SECONDS} s" \
    | tee -a "$OUT/participation.log"
fi

LEFT=$((TOTAL_SECONDS - SECONDS))
SWEEP_SECONDS=${SWEEP_SECONDS:-120}
if [ "$SWEEP_SECONDS" -gt "$LEFT" ]; then SWEEP_SECONDS=$LEFT; fi
if [ "$SWEEP_SECONDS" -ge 45 ]; then
  echo "== many small hospitals: K = 5, 16, 64, 256 vectorised (${SWEEP_SECONDS} s)"
  timeout --signal=INT --kill-after=10 "$((SWEEP_SECONDS - 5))" \
    "$PY" launch/benchmark.py --model=resnet_small --only=scaling_k --scaling_k=5,16,64,256 \
    --json="$OUT/bench_gpu_k_sweep.json" --budget_s="$((SWEEP_SECONDS - 40))" \
    2>&1 | tee "$OUT/k_sweep.log"
  echo "K sweep exit status: ${PIPESTATUS[0]}; whole check ${SECONDS} s" | tee -a "$OUT/k_sweep.log"
fi

LEFT=$((TOTAL_SECONDS - SECONDS))
GRID_SECONDS=${GRID_SECONDS:-$LEFT}
if [ "$GRID_SECONDS" -gt "$LEFT" ]; then GRID_SECONDS=$LEFT; fi
GRID_DIR=${GRID_DIR:-/tmp/fedjax_med_nih_grid}
if [ "$GRID_SECONDS" -ge 90 ]; then
  echo "== hospital-scale grid (--suite=nih_scale, ${GRID_SECONDS} s)"
  timeout --signal=INT --kill-after=20 "$((GRID_SECONDS - 25))" \
    "$PY" launch/experiments.py --suite=nih_scale --workdir="$GRID_DIR" --noreport \
    2>&1 | tee "$OUT/grid.log"
  echo "grid exit status: ${PIPESTATUS[0]}; whole check ${SECONDS} s" | tee -a "$OUT/grid.log"
  # results.csv / results.md of the runs finished so far (a cut-off grid did not write them).
  "$PY" -c 'import sys; sys.path.insert(0, "launch"); import experiments; \
rows = experiments.collect(sys.argv[1]); print(len(rows), "runs in", sys.argv[1])' "$GRID_DIR" \
    2>&1 | tee -a "$OUT/grid.log"
  cp "$GRID_DIR/results.csv" "$GRID_DIR/results.md" "$OUT/" 2>/dev/null || true
fi
