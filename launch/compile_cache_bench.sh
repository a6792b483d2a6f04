#!/usr/bin/env bash
# Time to the first result with JAX's persistent compilation cache: README's main job for one
# round, with a fresh cache folder (cold) and then the same folder again (warm), alternated twice.
#   bash launch/compile_cache_bench.sh [CONFIG]     (default configs/brats.py:synthetic)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CONFIG=${1:-configs/brats.py:synthetic}
TMP=$(mktemp -d)
for i in 1 2; do
  rm -rf "$TMP/cache"
  for kind in cold warm; do
    rm -rf "$TMP/run"
    start=$(date +%s.%N)
    env -u JAX_COMPILATION_CACHE_DIR python -m fedjax_med.main --config="$CONFIG" \
      --workdir="$TMP/run" --config.num_rounds=1 --compilation_cache="$TMP/cache" \
      > "$TMP/$kind$i.log" 2>&1
    end=$(date +%s.%N)
    round1=$(python -c "import json,sys; print(round(json.loads(open(sys.argv[1]).readline())['time/round_s'], 2))" "$TMP/run/metrics.jsonl")
    echo "$kind$i command_s=$(python -c "print(round($end - $start, 1))") round1_s=$round1"
  done
done
rm -rf "$TMP"
