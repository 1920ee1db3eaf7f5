#!/usr/bin/env bash
# dfit under MPI (MPICH/Hydra from `pip install 'dfit[mpi]'`, Open MPI, Intel MPI, MVAPICH).
# MPI only starts the processes: dfit reads the rank and size from MPI's variables, mpi4py hands rank 0's
# address to the others, and training runs on torch.distributed (gloo / NCCL). An unhandled exception on
# any rank calls MPI_Abort, so the whole job ends instead of waiting forever.
#
#   NP=4 launch/mpirun.sh examples/digits.py --epochs 20
#   NP=8 HOSTS=node01:4,node02:4 launch/mpirun.sh train.py      # several machines
#
# Edit / override:
#   NP=2              total number of processes (one per GPU)
#   HOSTS=            MPICH/Intel: host list `h1:4,h2:4`; Open MPI: `h1:4,h2:4` as well (--host)
#   MPIEXEC=mpiexec   the launcher of the MPI your mpi4py was built with (the pip `mpich` one by default)
#   PYTHON=python
set -euo pipefail
NP=${NP:-2}
PYTHON=${PYTHON:-python}
MPIEXEC=${MPIEXEC:-mpiexec}
if [ $# -eq 0 ]; then set -- examples/digits.py; fi
args=(-n "$NP")
if [ -n "${HOSTS:-}" ]; then args+=(--host "$HOSTS"); fi
if "$MPIEXEC" --version 2>&1 | grep -qi "open mpi"; then
    # Open MPI: root needs these two; shared memory + loopback is enough on one machine.
    export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1} OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
    args+=(-x PATH -x PYTHONPATH -x OMP_NUM_THREADS)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$MPIEXEC" "${args[@]}" "$PYTHON" "$@"
