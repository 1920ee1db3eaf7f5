"""Launch-environment detection, one environment at a time, from the variables each launcher really sets
(see shared/CLUSTER-NOTES.md), plus the Slurm helpers and the failure hooks."""
from __future__ import annotations

import os
import sys

import pytest

from dfit import distributed as dd
from dfit.distributed import LaunchInfo, detect, first_host, slurm_port

from conftest import launch_env, run_job

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "node1", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "abc",
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}
# What an srun step of a 2-node job with 2 tasks per node sets (task 3 = second task of the second node).
SRUN_STEP = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
             "SLURM_STEP_ID": "0", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
             "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
# The batch shell of `sbatch --ntasks=2`: no step id, but PROCID/NTASKS already there.
SBATCH_SHELL = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1",
                "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "vm", "SLURM_TASKS_PER_NODE": "2"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_RANK": "1"}
MPICH_HYDRA = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
               "PMI_HOSTNAME": "vm"}
INTEL_MPI = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4",
             "I_MPI_ROOT": "/opt/intel/mpi", "I_MPI_HYDRA_TOPOLIB": "hwloc"}
MVAPICH = {"MV2_COMM_WORLD_RANK": "2", "MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "0",
           "MV2_COMM_WORLD_LOCAL_SIZE": "2"}


def documented_slurm_port(job_id: int, step_id: int) -> int:
    """The rule of slurm_port's docstring, written out: 20000 + (job * 31 + step) mod 12768, i.e. a port in
    20000-32767 (below Linux's ephemeral range) that differs between the steps of one job."""
    return 20000 + (job_id * 31 + step_id) % 12768


# SRUN_STEP is step 0 of job 4242: 4242 * 31 = 131502 = 10 * 12768 + 3822.
SRUN_STEP_PORT = 23822
assert documented_slurm_port(4242, 0) == SRUN_STEP_PORT

SPAWN = {"DFIT_SPAWN": "1", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": "12345"}


def test_nothing_is_one_local_process():
    assert detect({}) == LaunchInfo("local")
    assert detect({"PATH": "/usr/bin", "HOME": "/root"}).world_size == 1


def test_torchrun():
    assert detect(TORCHRUN) == LaunchInfo("torchrun", 3, 1, 4, 2, "node1", 29400)


def test_plain_env_rank_and_world_size_is_torchrun_style():
    info = detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (info.environment, info.rank, info.world_size, info.master_port) == ("torchrun", 0, 2, 1)


def test_srun_step():
    info = detect(SRUN_STEP)
    assert info.environment == "slurm"
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (3, 1, 4, 2)
    assert info.master_addr == "gpu07"
    assert info.master_port == SRUN_STEP_PORT


def test_srun_step_master_port_and_addr_can_be_given():
    info = detect({**SRUN_STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"})
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 23456)


def test_sbatch_batch_shell_is_not_a_multi_process_job():
    """SLURM_NTASKS=2 outside srun: trusting it would make `python train.py` wait forever for rank 1."""
    assert detect(SBATCH_SHELL) == LaunchInfo("local")
    # the batch/extern/interactive steps are not srun task steps either
    assert detect({**SBATCH_SHELL, "SLURM_STEP_ID": "batch"}).environment == "local"
    assert detect({**SBATCH_SHELL, "SLURM_STEP_ID": "interactive"}).environment == "local"


@pytest.mark.parametrize("env, want", [
    (OPEN_MPI, (1, 1, 2, 2)),
    (MPICH_HYDRA, (1, 1, 2, 2)),
    (INTEL_MPI, (5, 1, 8, 4)),
    (MVAPICH, (2, 0, 4, 2)),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_WORLD_SIZE": "3"}, (0, 0, 3, 3)),  # Open MPI 5 variant
], ids=["openmpi", "mpich-hydra", "intel-mpi", "mvapich", "openmpi5"])
def test_mpi(env, want):
    info = detect(env)
    assert info.environment == "mpi"
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == want
    assert info.master_addr is None  # mpi4py hands rank 0's address out at init


def test_mpirun_inside_an_allocation_is_mpi_not_slurm():
    """mpirun's daemons are started by srun: its ranks see the daemon step's SLURM_* values."""
    env = {**SRUN_STEP, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", **OPEN_MPI}
    assert detect(env).environment == "mpi" and detect(env).rank == 1


def test_torchrun_inside_an_srun_step_is_torchrun():
    """slurm/multi_node_torchrun.sbatch: srun starts one launcher per node; its workers are torchrun's."""
    info = detect({**SRUN_STEP, **TORCHRUN})
    assert info.environment == "torchrun" and info.rank == 3 and info.world_size == 4


def test_spawn():
    assert detect(SPAWN) == LaunchInfo("spawn", 1, 1, 2, 2, "127.0.0.1", 12345)


def test_bad_integer_is_a_clear_error():
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        detect({"RANK": "0", "WORLD_SIZE": "two"})


@pytest.mark.parametrize("nodelist, first", [
    ("vm", "vm"), ("node[03-05,9],gpu1", "node03"), ("gpu1,node[1-2]", "gpu1"),
    ("rack[1-2]-node[07-08]", "rack1-node07"), ("n[009-011]", "n009"), ("a-b.example.org", "a-b.example.org"),
])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_tasks_per_node():
    assert dd._tasks_on_node("2(x3),1", 0) == 2
    assert dd._tasks_on_node("2(x3),1", 3) == 1
    assert dd._tasks_on_node("4", 0) == 4


def test_slurm_port_range_and_steps():
    ports = {slurm_port(j, s) for j in range(1000, 1100) for s in range(3)}
    assert all(20000 <= p < 32768 for p in ports)  # below Linux's ephemeral range
    for job in (0, 7, 123, 4242, 99999):
        for step in (0, 1, 2):
            assert slurm_port(job, step) == documented_slurm_port(job, step)
    assert (slurm_port(7, 0), slurm_port(7, 1)) == (20217, 20218)
    assert slurm_port("123") == 23813 and slurm_port("123", "batch") == 23813  # a string; a non-numeric step is 0


@pytest.mark.parametrize("env, want", [(SBATCH_SHELL, ("local", 0, 1, 0)), (SRUN_STEP, ("slurm", 3, 4, 1)),
                                       (TORCHRUN, ("torchrun", 3, 4, 1)), (MPICH_HYDRA, ("mpi", 1, 2, 1))],
                         ids=["sbatch-shell", "srun", "torchrun", "mpich"])
def test_public_helpers_read_the_process_environment(env, want, monkeypatch):
    """environment(), rank(), world_size(), local_rank() before init: read from os.environ."""
    monkeypatch.setattr(os, "environ", dict(launch_env(**env)))
    monkeypatch.setitem(dd._state, "info", None)
    assert (dd.environment(), dd.rank(), dd.world_size(), dd.local_rank()) == want
    assert dd.is_chief() == (want[1] == 0)


def test_backend_and_timeout_overrides(monkeypatch):
    monkeypatch.setenv("DFIT_BACKEND", "gloo")
    assert dd._choose_backend() == "gloo"
    monkeypatch.delenv("DFIT_BACKEND")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dd._choose_backend() == "gloo"  # CPUs talk gloo
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dd._choose_backend() == "nccl"  # GPUs talk NCCL
    monkeypatch.setenv("DFIT_TIMEOUT", "42")
    assert dd._timeout(None).total_seconds() == 42
    assert dd._timeout(5).total_seconds() == 5


def test_failure_hook_names_rank_and_records_error_file(tmp_path):
    """Under torchrun the hook writes torch elastic's error file (what errors.record would write)."""
    err = tmp_path / "error.json"
    code = "import dfit.distributed\nraise KeyError('lost')\n"
    res = run_job([sys.executable, "-c", code], timeout=60,
                  env=launch_env(**{**TORCHRUN, "RANK": "1", "TORCHELASTIC_ERROR_FILE": str(err)}))
    assert res.returncode == 1
    assert "[dfit] rank 1 of 4 (torchrun) failed with an unhandled KeyError" in res.stderr
    assert "KeyError: 'lost'" in err.read_text()
    stack = __import__("json").loads(err.read_text())["message"]["extraInfo"]["py_callstack"]
    assert 'File "<string>", line 2' in stack  # the real traceback, not "NoneType: None"


@pytest.mark.parametrize("cuda, gpus, want", [(False, 0, 1), (True, 0, 1), (True, 1, 1), (True, 4, 4)],
                         ids=["no-cuda", "cuda-no-gpu", "one-gpu", "four-gpus"])
def test_resolve_nproc(cuda, gpus, want, monkeypatch):
    """The documented rule: ``auto`` is one process per visible GPU, else 1; a number is that number."""
    from dfit.launch import resolve_nproc

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert resolve_nproc("auto") == want
    assert resolve_nproc("3") == 3 and resolve_nproc(2) == 2
    with pytest.raises(ValueError, match=r"--nproc-per-node must be >= 1, got 0"):
        resolve_nproc("0")


def test_srun_with_pmi2_is_mpi_and_needs_no_mpi4py(monkeypatch):
    """`srun --mpi=pmi2` sets PMI_RANK/PMI_SIZE as well: MPI, but Slurm's variables give the address when
    mpi4py is not installed."""
    env = {**SRUN_STEP, "PMI_RANK": "3", "PMI_SIZE": "4", "PMI_FD": "11", "PMI_JOBID": "4242.0"}
    info = detect(env)
    assert (info.environment, info.rank, info.world_size) == ("mpi", 3, 4)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dd, "_mpi_module", lambda: None)
    got, store = dd._mpi_rendezvous(info, __import__("datetime").timedelta(seconds=5))
    assert store is None and (got.master_addr, got.master_port) == ("gpu07", SRUN_STEP_PORT)
    monkeypatch.setenv("SLURM_PROCID", "0")  # Slurm disagrees (mpiexec's proxies): no silent guess
    with pytest.raises(RuntimeError, match="mpi4py is not installed"):
        dd._mpi_rendezvous(info, __import__("datetime").timedelta(seconds=5))
