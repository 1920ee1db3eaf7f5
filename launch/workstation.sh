#!/usr/bin/env bash
# dfit on one machine, one process per GPU (or one process when there is no GPU).
#
#   launch/workstation.sh examples/digits.py --epochs 20
#
# Edit / override with environment variables:
#   NPROC=auto        processes: 'auto' = one per visible GPU (1 without GPU), or a number (e.g. 2 on CPU)
#   GPUS=0,1          restrict to these GPUs (sets CUDA_VISIBLE_DEVICES)
#   MAX_RESTARTS=0    restart the whole job this many times after a failure
#   PYTHON=python     the interpreter of your environment (it must have dfit installed)
set -euo pipefail
NPROC=${NPROC:-auto}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python}
if [ -n "${GPUS:-}" ]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
if [ $# -eq 0 ]; then set -- examples/digits.py; fi
# dfit-launch = torch's elastic launcher (torchrun) on a private localhost rendezvous with a free port;
# a failing rank ends every rank and is reported with its traceback.
exec "$PYTHON" -m dfit.launch --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" "$@"
