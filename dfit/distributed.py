"""Process-group bootstrap and the few collectives dfit needs.

One place knows how the process was started (torchrun, an srun step, mpirun, dfit's own spawn, or
nothing at all) and turns that into a torch.distributed process group. World size 1 never creates a
process group: every reduction here is then the identity, so one process and N processes run the same code.

Failure policy (``dfit.failures``): in a multi-process job an unhandled exception on any rank ends the whole job
and says which rank failed, a worker whose launcher died ends, and a collective that times out names the ranks
that stopped making progress. The exception hook is installed when this module is imported inside such a job, so
a failure before the first ``fit`` is covered too.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "init", "rank", "local_rank", "world_size", "is_chief", "barrier", "shutdown", "environment",
    "device", "backend", "all_reduce_sum", "all_reduce_max", "broadcast_object", "all_gather_objects",
    "CollectiveTimeout", "explain_timeout", "install_failure_hooks", "watch_parent",
]

_log = logging.getLogger("dfit.distributed")

# The rendezvous store is served by someone other than rank 0 (dfit's spawning parent process).
EXTERNAL_STORE_ENV = "DFIT_EXTERNAL_STORE"


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


def _int_env(env: Any, *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def _expand_brackets(spec: str) -> list[str]:
    """``03-05,9`` -> ``["03", "04", "05", "9"]`` (zero padding kept)."""
    out: list[str] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        elif part:
            out.append(part)
    return out


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list such as ``node[03-05,9],gpu1`` (-> ``node03``).

    Handles several bracket groups in one name (``rack[1-2]-node[07-08]`` -> ``rack1-node07``).
    """
    nodelist = nodelist.strip()
    head = ""
    depth = 0
    for ch in nodelist:  # cut at the first comma outside brackets
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        head += ch
    host = ""
    rest = head
    while "[" in rest:
        prefix, rest = rest.split("[", 1)
        inside, rest = rest.split("]", 1) if "]" in rest else (rest, "")
        host += prefix + _expand_brackets(inside)[0]
    return host + rest


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from Slurm's compressed ``2(x3),1`` notation."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        if "(x" in part:
            n, rep = part.rstrip(")").split("(x")
            counts.extend([int(n)] * int(rep))
        elif part:
            counts.append(int(part))
    if not counts:
        return 1
    return counts[node_id] if 0 <= node_id < len(counts) else counts[0]


def slurm_port(job_id: str | int, step_id: str | int = 0) -> int:
    """A rendezvous port derived from the job id, so all tasks of a step agree without talking.

    The step id is mixed in so two steps of one job running at once do not collide. The range
    (20000-32767) stays below Linux's ephemeral ports, where outgoing connections would compete.
    """
    try:
        step = int(step_id)
    except (TypeError, ValueError):
        step = 0
    return 20000 + (int(job_id) * 31 + step) % 12768


def _slurm_step(env: Any) -> LaunchInfo | None:
    """The task's place in an srun job step, or None outside one (e.g. in the batch shell of sbatch)."""
    step = env.get("SLURM_STEP_ID")
    if step is None or not step.isdigit() or env.get("SLURM_PROCID") is None:
        return None
    world = _int_env(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    addr = env.get("MASTER_ADDR") or first_host(nodes)
    port = _int_env(env, "MASTER_PORT", default=slurm_port(env.get("SLURM_JOB_ID", "0"), step))
    local_size = world
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        local_size = _tasks_on_node(per_node, _int_env(env, "SLURM_NODEID", default=0))
    return LaunchInfo("slurm", int(env["SLURM_PROCID"]), _int_env(env, "SLURM_LOCALID", default=0),
                      world, local_size, addr, port)


def detect(env: Any = None) -> LaunchInfo:
    """Work out the launch environment from the process environment, without any communication.

    Order: dfit spawn, torchrun/torch elastic, Open MPI, MPICH/Hydra/Intel MPI/MVAPICH, an srun job step,
    local. MPI comes before Slurm because ``mpirun`` inside an allocation starts its daemons with srun
    (their children see the daemon step's SLURM_* values). A Slurm batch shell outside srun (no numeric
    ``SLURM_STEP_ID``) is a single local process even though ``SLURM_NTASKS`` says otherwise.
    """
    env = os.environ if env is None else env
    if env.get("DFIT_SPAWN") == "1":
        world = _int_env(env, "WORLD_SIZE", default=1)
        rank_ = _int_env(env, "RANK", default=0)
        return LaunchInfo("spawn", rank_, _int_env(env, "LOCAL_RANK", default=rank_), world,
                          _int_env(env, "LOCAL_WORLD_SIZE", default=world),
                          env.get("MASTER_ADDR", "127.0.0.1"), _int_env(env, "MASTER_PORT"))
    if env.get("TORCHELASTIC_RUN_ID") is not None or ("RANK" in env and "WORLD_SIZE" in env):
        world = _int_env(env, "WORLD_SIZE", default=1)
        return LaunchInfo("torchrun", _int_env(env, "RANK", default=0), _int_env(env, "LOCAL_RANK", default=0),
                          world, _int_env(env, "LOCAL_WORLD_SIZE", default=world), env.get("MASTER_ADDR"),
                          _int_env(env, "MASTER_PORT"))
    # Open MPI, then MPICH/Hydra and Intel MPI (PMI_*), MVAPICH2, Cray PALS.
    mpi_rank = _int_env(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PALS_RANKID",
                        "PMIX_RANK")
    mpi_size = _int_env(env, "OMPI_COMM_WORLD_SIZE", "OMPI_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
    if mpi_rank is not None and mpi_size is not None:
        local = _int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                         "PALS_LOCAL_RANKID", default=mpi_rank)
        local_size = _int_env(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                              "MV2_COMM_WORLD_LOCAL_SIZE", default=mpi_size)
        return LaunchInfo("mpi", mpi_rank, local, mpi_size, local_size,
                          env.get("MASTER_ADDR"), _int_env(env, "MASTER_PORT"))
    slurm = _slurm_step(env)
    if slurm is not None:
        return slurm
    return LaunchInfo("local")


def environment() -> str:
    """Name of the launch environment: torchrun, slurm, mpi, spawn or local."""
    return _info().environment


def _info() -> LaunchInfo:
    return _state["info"] or detect()


def rank() -> int:
    """This process's global rank (0 on one process)."""
    return _info().rank


def local_rank() -> int:
    """This process's rank on its node (its GPU index under NCCL)."""
    return _info().local_rank


def world_size() -> int:
    """Number of processes in the job."""
    return _info().world_size


def is_chief() -> bool:
    """True on rank 0, the only rank with side effects (printing, files)."""
    return rank() == 0


def _choose_backend() -> str:
    chosen = os.environ.get("DFIT_BACKEND")
    if chosen:
        return chosen
    return "nccl" if torch.cuda.is_available() else "gloo"


# How long a collective waits for the other ranks before failing (DFIT_TIMEOUT overrides, in seconds). Long enough
# for rank 0 to write a large checkpoint or run a slow callback while the others wait, short enough that a stalled
# or vanished rank ends a job in minutes, not torch's 30.
DEFAULT_TIMEOUT_S = 600.0


def _timeout(timeout: float | datetime.timedelta | None) -> datetime.timedelta:
    if timeout is None and os.environ.get("DFIT_TIMEOUT"):
        text = os.environ["DFIT_TIMEOUT"]
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"DFIT_TIMEOUT={text!r} is not a number of seconds") from None
    if timeout is None:
        timeout = DEFAULT_TIMEOUT_S
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    if timeout.total_seconds() <= 0:
        raise ValueError(f"the collective timeout must be positive; got {timeout.total_seconds():g} s")
    return timeout


def free_port() -> int:
    """A TCP port that was free on this host a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _mpi_module():
    """mpi4py's MPI module (importing it initialises MPI), or None when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI


def _under_elastic_agent() -> bool:
    return os.environ.get("TORCHELASTIC_RUN_ID") is not None


# --------------------------------------------------------------------------------------------------
# Rendezvous

def _mpi_rendezvous(info: LaunchInfo, timeout: datetime.timedelta) -> tuple[LaunchInfo, dist.Store | None]:
    """Rank 0 opens the store on a port the OS picks; mpi4py hands its address to every rank.

    Returns the rank's info with the address filled in, and rank 0's already-open store.
    """
    if info.master_addr and info.master_port:
        return info, None
    MPI = _mpi_module()
    if MPI is None:
        slurm = _slurm_step(os.environ)  # srun --mpi=pmi2/pmix: Slurm's variables say the same, no mpi4py needed
        if slurm is not None and (slurm.rank, slurm.world_size) == (info.rank, info.world_size):
            return LaunchInfo(info.environment, info.rank, info.local_rank, info.world_size,
                              info.local_world_size, slurm.master_addr, slurm.master_port), None
        raise RuntimeError(
            f"rank {info.rank}: started by MPI but mpi4py is not installed; pip install 'dfit[mpi]' "
            "(or set MASTER_ADDR and MASTER_PORT)"
        )
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size:
        raise RuntimeError(
            f"rank {info.rank}: MPI reports {comm.Get_size()} processes but the environment says "
            f"{info.world_size}; is mpi4py using the same MPI runtime as mpirun? (under srun use "
            "--mpi=pmi2 or leave MPI out: dfit reads the SLURM variables)"
        )
    store = None
    address = None
    if comm.Get_rank() == 0:
        store = dist.TCPStore("127.0.0.1", 0, info.world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        address = (socket.gethostname(), store.port)
    addr, port = comm.bcast(address, root=0)
    if addr == socket.gethostname():
        addr = "127.0.0.1"
    new = LaunchInfo(info.environment, info.rank, info.local_rank, info.world_size,
                     info.local_world_size, addr, port)
    return new, store


def _store(info: LaunchInfo, timeout: datetime.timedelta, server: dist.Store | None = None) -> dist.Store:
    """A key-value store for the rendezvous, namespaced per elastic attempt.

    Under torchrun the agent's store is reused when it says so (``TORCHELASTIC_USE_AGENT_STORE``; a port of
    our own would never get a server), with a prefix per restart, so restarted workers never read a dead
    attempt's gloo addresses.
    """
    if server is None:
        if info.master_addr is None or info.master_port is None:
            raise RuntimeError(
                f"rank {info.rank}: no rendezvous address; set MASTER_ADDR and MASTER_PORT"
            )
        external = (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                    or os.environ.get(EXTERNAL_STORE_ENV) == "1")
        server = dist.TCPStore(info.master_addr, info.master_port, info.world_size,
                               is_master=(not external and info.rank == 0), timeout=timeout,
                               wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "dfit")
    return dist.PrefixStore(f"dfit/{run_id}/attempt_{attempt}/", server)


def init(backend: str | None = None, timeout: float | datetime.timedelta | None = None) -> LaunchInfo:
    """Join the job's process group (idempotent). A single process creates no group at all.

    ``backend``: ``nccl`` with one GPU per local rank when CUDA is present, else ``gloo``
    (``DFIT_BACKEND`` overrides). ``timeout`` in seconds (``DFIT_TIMEOUT``; default ``DEFAULT_TIMEOUT_S``, 10
    minutes) bounds every collective; when one times out, the error names the ranks that stopped making progress
    (``explain_timeout``).
    """
    if _state["info"] is not None:
        return _state["info"]
    info = detect()
    failures.install_failure_hooks(info)
    if info.environment == "torchrun" and _under_elastic_agent():
        failures.watch_parent()  # torchrun's agent killed -> this worker ends (dfit-launch starts it earlier)
    backend = backend or _choose_backend()
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError(f"rank {info.rank}: backend 'nccl' needs CUDA; use DFIT_BACKEND=gloo")
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if info.world_size > 1 and not dist.is_initialized():
        td = _timeout(timeout)
        server = None
        if info.environment == "mpi":
            info, server = _mpi_rendezvous(info, td)
        store = _store(info, td, server)
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        _log.debug("rank %d/%d (%s): init_process_group(%s) via %s:%s", info.rank, info.world_size,
                   info.environment, backend, info.master_addr, info.master_port)
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size,
                                timeout=td, **kwargs)
        _state["owns_group"] = True
        _state["timeout"] = td.total_seconds()
        atexit.register(_leave_at_exit)
        try:
            failures.start_heartbeat(info)
        except Exception as exc:  # a missing heartbeat only makes a stall report less precise
            _log.debug("rank %d: no heartbeat: %s", info.rank, exc)
    _state.update(info=info, backend=backend, device=dev)
    return info


def device() -> torch.device:
    """The device this rank computes on (its GPU under NCCL, else the CPU)."""
    if _state["device"] is None:
        init()
    return _state["device"]


def backend() -> str | None:
    """The process-group backend chosen by ``init`` (None before it)."""
    return _state["backend"]


def _active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if _active():
        dist.barrier()


def mark_failing() -> None:
    """This process is ending because of an error: exit at once, without the orderly leave of ``_leave_at_exit``
    (which would let the other ranks fail first, and so be reported as the first failure)."""
    _state["failing"] = True


def _leave_at_exit() -> None:
    """Free what still uses the group (a DDP wrapper in a model/engine cycle), then leave it: a gloo group left to
    the interpreter's teardown aborts the process now and then ("terminate called without an active exception")."""
    if _state.get("failing"):
        return
    import gc

    gc.collect()
    shutdown()


def shutdown() -> None:
    """Leave the process group (if dfit created it) so a later init starts afresh."""
    beat = _state.get("heartbeat")
    if beat is not None:
        beat[1].set()  # the heartbeat thread ends at its next tick
    if _state["owns_group"] and dist.is_initialized():
        dist.destroy_process_group()
    _state.update(info=None, backend=None, device=None, owns_group=False, heartbeat=None, timeout=None)


def _comm_tensor(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """gloo reduces CPU tensors; NCCL needs them on the GPU."""
    if _state["backend"] == "nccl" and t.device.type != "cuda":
        return t.to(device()), True
    return t, False


def _all_reduce(t: torch.Tensor, op: "dist.ReduceOp") -> torch.Tensor:
    """``op`` over all ranks into a new tensor on t's device (identity on one process)."""
    if not _active():
        return t
    work, moved = _comm_tensor(t.clone())
    dist.all_reduce(work, op=op)
    return work.to(t.device) if moved else work


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``t`` over all ranks."""
    return _all_reduce(t, dist.ReduceOp.MAX)


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


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape everywhere) stacked in rank order: shape ``(world, *t.shape)``."""
    if not _active():
        return t.unsqueeze(0)
    # a summed table with this rank's row filled in: the same result as an all-gather, for small tensors, through
    # the all-reduce every backend does well (gloo's all_gather leaves a thread that aborts the process at exit)
    table = torch.zeros((world_size(), *t.shape), dtype=t.dtype, device=t.device)
    table[rank()] = t
    return all_reduce_sum(table)


def format_exception(exc: BaseException) -> str:
    """A traceback string prefixed with this rank, for failure messages."""
    body = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"rank {rank()}: {body}"


from . import failures  # noqa: E402 - it uses this module's job state; re-exported for callers
from .failures import CollectiveTimeout, explain_timeout, install_failure_hooks, watch_parent  # noqa: E402,F401

# Inside a multi-process job, make a failure anywhere after `import dfit` end the job.
try:
    install_failure_hooks()
except Exception as _exc:  # never let a hook problem break the import
    _log.debug("failure hooks not installed: %s", _exc)
