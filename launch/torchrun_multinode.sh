#!/usr/bin/env bash
# dfit on several machines without a scheduler: run this SAME command on every node.
#
#   NNODES=2 HEAD=node01 launch/torchrun_multinode.sh examples/digits.py --epochs 20
#
# Edit / override:
#   NNODES=2          number of machines (or MIN:MAX for an elastic job, e.g. 1:4)
#   HEAD=node01       a host every node can reach; its launcher hosts the rendezvous (c10d store)
#   PORT=29400        rendezvous TCP port on HEAD (open it in the firewall)
#   NPROC=auto        processes per node: one per visible GPU (1 without GPU), or a number
#   JOB_ID=dfit       any string, the same on all nodes; change it for each new job
#   MAX_RESTARTS=0    restarts of the whole job after a failure
#   PYTHON=python
# With several networks, choose the one to use: export GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0
set -euo pipefail
: "${HEAD:?set HEAD to the host name of the first node}"
NNODES=${NNODES:-2}
PORT=${PORT:-29400}
NPROC=${NPROC:-auto}
JOB_ID=${JOB_ID:-dfit}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python}
if [ $# -eq 0 ]; then set -- examples/digits.py; fi
# dfit-launch accepts every torchrun option; plain `torchrun` with the same options works too.
exec "$PYTHON" -m dfit.launch --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "$JOB_ID" \
    --max-restarts "$MAX_RESTARTS" "$@"
