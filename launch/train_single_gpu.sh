#!/usr/bin/env bash
# Train fedjax_med on ONE GPU: every hospital of the round is vectorised on that device.
#
# Usage:
#   launch/train_single_gpu.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
# Examples:
#   launch/train_single_gpu.sh configs/chestxray14.py:synthetic /tmp/runs/cxr
#   launch/train_single_gpu.sh configs/chestxray14.py /data/runs/cxr_dp \
#       --config.data.manual_dir=/data/nih --config.dp.target_epsilon=4
#   GPU=2 launch/train_single_gpu.sh configs/brats.py:synthetic /tmp/runs/brats
#
# Environment:
#   GPU=0                               which GPU (CUDA_VISIBLE_DEVICES)
#   PYTHON=python                       interpreter with fedjax_med's dependencies
#   XLA_PYTHON_CLIENT_MEM_FRACTION=.90  share of GPU memory JAX takes up front
# Rerunning the same command resumes from the last checkpoint in WORKDIR.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG=$1
WORKDIR=$2
shift 2
# A relative config path is taken from where the command was typed, then from the repository.
if [ ! -e "${CONFIG%%:*}" ] && [ -e "$REPO/${CONFIG%%:*}" ]; then CONFIG="$REPO/$CONFIG"; fi

export CUDA_VISIBLE_DEVICES=${GPU:-${CUDA_VISIBLE_DEVICES:-0}}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.90}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$WORKDIR"
echo "fedjax_med: $CONFIG -> $WORKDIR on GPU $CUDA_VISIBLE_DEVICES" >&2
exec "${PYTHON:-python}" -m fedjax_med.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
