"""Process-group bootstrap and the few collectives dfit needs.

One place knows how the process was started (torchrun, an srun step, mpirun, dfit's own spawn, or
nothing at all) and turns that into a torch.distributed process group. World size 1 never creates a
process group: every reduction here is then the identity, so one process and N processes run the same code.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "init", "rank", "local_rank", "world_size", "is_chief", "barrier", "shutdown", "environment",
    "device", "backend", "all_reduce_sum", "all_reduce_max", "broadcast_object", "all_gather_objects",
]


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher told this process about its place in the job."""

    environment: str  # "torchrun", "slurm", "mpi", "spawn" or "local"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None


_state: dict[str, Any] = {"info": None, "backend": None, "device": None, "owns_group": False}


def _int_env(env: dict, *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list such as ``node[03-05,9],gpu1`` (-> ``node03``)."""
    nodelist = nodelist.strip()
    head = ""
    depth = 0
    for ch in nodelist:  # cut at the first comma outside brackets
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        head += ch
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    first = rest.split("]", 1)[0].split(",")[0].split("-")[0]
    return prefix + first + rest.split("]", 1)[1] if "]" in rest else prefix + first


def slurm_port(job_id: str | int) -> int:
    """A rendezvous port derived from the job id, so all tasks of a step agree without talking."""
    return 20000 + int(job_id) % 20000


def detect(env: dict | None = None) -> LaunchInfo:
    """Work out the launch environment from the process environment, without any communication.

    Order: dfit spawn, torchrun/torch elastic, Open MPI, MPICH/Hydra/Intel MPI, an srun job step, local.
    A Slurm batch shell outside srun (no ``SLURM_STEP_ID``) is a single local process.
    """
    env = os.environ if env is None else env
    if env.get("DFIT_SPAWN") == "1":
        return LaunchInfo("spawn", int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])),
                          int(env["WORLD_SIZE"]), int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                          env.get("MASTER_ADDR", "127.0.0.1"), _int_env(env, "MASTER_PORT"))
    if env.get("TORCHELASTIC_RUN_ID") is not None or ("RANK" in env and "WORLD_SIZE" in env):
        world = int(env.get("WORLD_SIZE", 1))
        return LaunchInfo("torchrun", int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), world,
                          int(env.get("LOCAL_WORLD_SIZE", world)), env.get("MASTER_ADDR"),
                          _int_env(env, "MASTER_PORT"))
    mpi_rank = _int_env(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    mpi_size = _int_env(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "OMPI_WORLD_SIZE")
    if mpi_rank is not None and mpi_size is not None:
        local = _int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PALS_LOCAL_RANKID",
                         default=mpi_rank)
        local_size = _int_env(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=mpi_size)
        return LaunchInfo("mpi", mpi_rank, local, mpi_size, local_size,
                          env.get("MASTER_ADDR"), _int_env(env, "MASTER_PORT"))
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID") is not None:
        world = _int_env(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or first_host(nodes)
        port = _int_env(env, "MASTER_PORT", default=slurm_port(env.get("SLURM_JOB_ID", "0")))
        local_size = world
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        if per_node:
            local_size = int(per_node.split("(")[0].split(",")[0])
        return LaunchInfo("slurm", int(env["SLURM_PROCID"]), _int_env(env, "SLURM_LOCALID", default=0),
                          world, local_size, addr, port)
    return LaunchInfo("local")


def environment() -> str:
    """Name of the launch environment: torchrun, slurm, mpi, spawn or local."""
    return (_state["info"] or detect()).environment


def _info() -> LaunchInfo:
    return _state["info"] or detect()


def rank() -> int:
    return _info().rank


def local_rank() -> int:
    return _info().local_rank


def world_size() -> int:
    return _info().world_size


def is_chief() -> bool:
    return rank() == 0


def _choose_backend() -> str:
    chosen = os.environ.get("DFIT_BACKEND")
    if chosen:
        return chosen
    return "nccl" if torch.cuda.is_available() else "gloo"


def _timeout(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None and os.environ.get("DFIT_TIMEOUT"):
        timeout = float(os.environ["DFIT_TIMEOUT"])
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    return datetime.timedelta(seconds=float(timeout))


def free_port() -> int:
    """A TCP port that was free on this host a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _mpi_rendezvous(info: LaunchInfo) -> LaunchInfo:
    """Rank 0 picks its host name and a free port; mpi4py hands them to every rank."""
    if info.master_addr and info.master_port:
        return info
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            f"rank {info.rank}: started by MPI but mpi4py is not installed; pip install 'dfit[mpi]'"
        ) from exc
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size:
        raise RuntimeError(
            f"rank {info.rank}: MPI reports {comm.Get_size()} processes but the environment says "
            f"{info.world_size}; is mpi4py using the same MPI runtime as mpirun?"
        )
    address = (socket.gethostname(), free_port()) if comm.Get_rank() == 0 else None
    addr, port = comm.bcast(address, root=0)
    if addr == socket.gethostname():
        addr = "127.0.0.1"
    return LaunchInfo(info.environment, info.rank, info.local_rank, info.world_size,
                      info.local_world_size, addr, port)


def _store(info: LaunchInfo, timeout: datetime.timedelta) -> dist.Store:
    """A key-value store for the rendezvous, namespaced per elastic attempt.

    Under torchrun the agent's store is reused (a port of our own would never get a server) with a
    prefix per restart, so restarted workers never read a dead attempt's addresses.
    """
    if info.master_addr is None or info.master_port is None:
        raise RuntimeError(
            f"rank {info.rank}: no rendezvous address; set MASTER_ADDR and MASTER_PORT"
        )
    if info.environment == "torchrun":
        is_master = False if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else info.rank == 0
    else:
        is_master = info.rank == 0
    store = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=is_master,
                          timeout=timeout, wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "dfit")
    return dist.PrefixStore(f"dfit/{run_id}/attempt_{attempt}/", store)


def init(backend: str | None = None, timeout: float | datetime.timedelta | None = None) -> LaunchInfo:
    """Join the job's process group (idempotent). A single process creates no group at all."""
    if _state["info"] is not None:
        return _state["info"]
    info = detect()
    if info.environment == "mpi" and info.world_size > 1:
        info = _mpi_rendezvous(info)
    backend = backend or _choose_backend()
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError(f"rank {info.rank}: backend 'nccl' needs CUDA; use DFIT_BACKEND=gloo")
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if info.world_size > 1 and not dist.is_initialized():
        td = _timeout(timeout) or datetime.timedelta(minutes=30)
        store = _store(info, td)
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size,
                                timeout=td, **kwargs)
        _state["owns_group"] = True
    _state.update(info=info, backend=backend, device=dev)
    return info


def device() -> torch.device:
    """The device this rank computes on (its GPU under NCCL, else the CPU)."""
    if _state["device"] is None:
        init()
    return _state["device"]


def backend() -> str | None:
    return _state["backend"]


def _active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (if dfit created it) so a later init starts afresh."""
    if _state["owns_group"] and dist.is_initialized():
        dist.destroy_process_group()
    _state.update(info=None, backend=None, device=None, owns_group=False)


def _comm_tensor(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """gloo reduces CPU tensors; NCCL needs them on the GPU."""
    if _state["backend"] == "nccl" and t.device.type != "cuda":
        return t.to(device()), True
    return t, False


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (a new tensor on t's device; identity on one process)."""
    if not _active():
        return t
    work, moved = _comm_tensor(t.clone())
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(t.device) if moved else work


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if not _active():
        return t
    work, moved = _comm_tensor(t.clone())
    dist.all_reduce(work, op=dist.ReduceOp.MAX)
    return work.to(t.device) if moved else work


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=device() if _state["backend"] == "nccl" else None)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
