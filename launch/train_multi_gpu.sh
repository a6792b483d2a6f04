#!/usr/bin/env bash
# Train fedjax_med on ALL local GPUs with ONE process: the hospitals (client axis) are sharded
# over the GPUs with NamedSharding(mesh, P('clients')), parameters replicated, and XLA inserts the
# all-reduce of the aggregation. K is padded to a multiple of the GPU count with inert hospitals
# (weight 0), so results do not depend on it (docs/ARCHITECTURE.md: Sharding and the device count).
#
# Usage:
#   launch/train_multi_gpu.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
# Examples:
#   launch/train_multi_gpu.sh configs/chestxray14.py /data/runs/cxr --config.data.manual_dir=/data/nih
#   GPUS=0,1,2,3 launch/train_multi_gpu.sh configs/brats.py:synthetic /tmp/runs/brats
#
# Environment:
#   GPUS=0,1,...                        GPUs to use (default: all visible)
#   PYTHON=python                       interpreter with fedjax_med's dependencies
#   XLA_PYTHON_CLIENT_MEM_FRACTION=.90  share of each GPU's memory JAX takes up front
#
# Several hosts: run this script once per host, on a WORKDIR all hosts share, with
#   NUM_PROCESSES=<hosts> PROCESS_ID=<0..hosts-1> COORDINATOR_ADDRESS=<host0:port>
# The hospitals are sharded over every host's GPUs; process 0 writes metrics and reports and
# Orbax coordinates the checkpoint writes (see launch/README.md).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG=$1
WORKDIR=$2
shift 2
if [ ! -e "${CONFIG%%:*}" ] && [ -e "$REPO/${CONFIG%%:*}" ]; then CONFIG="$REPO/$CONFIG"; fi
PY=${PYTHON:-python}

if [ -n "${GPUS:-}" ]; then export CUDA_VISIBLE_DEVICES=$GPUS; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.90}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$WORKDIR"

NUM_PROCESSES=${NUM_PROCESSES:-1}
if [ "$NUM_PROCESSES" -le 1 ]; then
  "$PY" -c 'import jax; print(f"fedjax_med: {jax.local_device_count()} local device(s):",
                              jax.devices())' >&2
  exec "$PY" -m fedjax_med.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
fi

: "${COORDINATOR_ADDRESS:?set COORDINATOR_ADDRESS=host0:port on every host}"
: "${PROCESS_ID:?set PROCESS_ID=0..NUM_PROCESSES-1 on every host}"
# Every host runs the same command on the same (shared) workdir; fedjax_med.main joins the run
# with jax.distributed.initialize before any other JAX call, and process 0 writes the files.
exec "$PY" -m fedjax_med.main --config="$CONFIG" --workdir="$WORKDIR" \
  --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID" \
  --coordinator_address="$COORDINATOR_ADDRESS" "$@"
