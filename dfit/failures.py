"""When a rank fails, stalls or loses its launcher: the job ends quickly, on every rank, naming the rank.

- An unhandled exception on one rank (``install_failure_hooks``): the traceback is printed naming the rank and
  recorded for torch elastic's launcher; under MPI the job is aborted (MPI's default lets the others wait forever).
- A launcher that dies (``watch_parent``): its workers end too, never training on as orphans.
- A rank that stalls (``start_heartbeat``, ``explain_timeout``): a heartbeat in the rendezvous store, read when a
  collective times out, names the ranks that stopped making progress, and those ranks end too.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
import traceback
from typing import Any

import torch.distributed as dist

from .distributed import LaunchInfo, _info, _mpi_module, _state, _timeout, detect, mark_failing

def _failure_hook(info: LaunchInfo, previous):
    """sys.excepthook for a rank of a multi-process job: print the traceback naming the rank, record it for
    torch elastic, and under MPI abort the whole job.

    It writes to the real stderr (``sys.__stderr__``) itself: torch's own excepthook, installed later by
    ``init_process_group``, buffers the output of the hook it wraps and would lose it to ``MPI_Abort``.
    """
    def hook(exc_type, exc, tb):
        out = sys.__stderr__
        mark_failing()
        explained = explain_timeout(exc) if isinstance(exc, BaseException) else None
        if explained is not None:
            exc_type, exc = CollectiveTimeout, explained
        try:
            if out is None:
                previous(exc_type, exc, tb)
            else:
                lines = [f"[dfit] rank {info.rank} of {info.world_size} ({info.environment}) failed with an "
                         f"unhandled {exc_type.__name__}: {exc}\n"]
                lines += traceback.format_exception(exc_type, exc, tb)
                text = "".join(lines)
                out.write("".join(f"[rank{info.rank}]: {line}\n" for line in text.rstrip("\n").split("\n")))
                out.flush()
            _write_error_file(info, f"{exc_type.__name__}: {exc}",
                              "".join(traceback.format_exception(exc_type, exc, tb)))
        finally:
            if info.environment == "mpi" and not issubclass(exc_type, KeyboardInterrupt):
                mpi = _mpi_module()
                if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
                    if out is not None:
                        out.write(f"[rank{info.rank}]: [dfit] aborting the MPI job (MPI_Abort)\n")
                        out.flush()
                    sys.stdout.flush()
                    # Give mpiexec's stdio forwarding a moment: Abort tears the job down at once.
                    time.sleep(float(os.environ.get("DFIT_MPI_ABORT_DELAY", "0.2")))
                    mpi.COMM_WORLD.Abort(1)

    hook._dfit_failure_hook = True  # type: ignore[attr-defined]
    return hook


def install_failure_hooks(info: LaunchInfo | None = None) -> None:
    """Make an unhandled exception on one rank end the whole job, with a message naming the rank.

    Idempotent; does nothing on a single process. Under MPI it imports mpi4py (MPI_Init) so the
    excepthook can call ``MPI_Abort``; all ranks import dfit at start-up, so Init is collective-safe.
    """
    info = info or detect()
    if info.world_size <= 1 or getattr(sys.excepthook, "_dfit_failure_hook", False):
        return
    if info.environment == "mpi":
        _mpi_module()  # initialise MPI now, while every rank is starting up
    sys.excepthook = _failure_hook(info, sys.excepthook)


# --------------------------------------------------------------------------------------------------
# No orphans: a worker whose launcher died ends too.

PARENT_POLL_S = 0.5
_parent_watch: dict[str, Any] = {"thread": None}


def watch_parent(interval: float = PARENT_POLL_S) -> None:
    """End this process (exit code 1, one line on stderr) within ``interval`` seconds of its parent's death.

    Under ``dfit-launch`` and ``torchrun`` the parent is torch elastic's agent: when the launcher is SIGKILLed it
    cannot end its workers, which would train on as orphans. A daemon thread compares ``os.getppid()`` with
    the parent seen at start (a dead parent's children are handed to another process). Idempotent."""
    thread = _parent_watch["thread"]
    if thread is not None and thread.is_alive():
        return
    parent = os.getppid()
    _kill_me_with_parent()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                try:
                    sys.__stderr__.write(f"[dfit] rank {os.environ.get('RANK', '?')}: the launcher (pid {parent}) "
                                         "is gone; ending this worker\n")
                    sys.__stderr__.flush()
                except Exception:  # noqa: BLE001 - stderr may have gone with the launcher
                    pass
                finally:
                    os._exit(1)

    thread = threading.Thread(target=watch, name="dfit-parent-watch", daemon=True)
    thread.start()
    _parent_watch["thread"] = thread


def _kill_me_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this process when the thread that started it ends (``PR_SET_PDEATHSIG``);
    the launcher's main thread starts its workers. The polling thread of ``watch_parent`` covers the rest."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------------------------------
# Stalled ranks: a heartbeat in the store, read when a collective times out.
#
# Every rank's background thread writes, every HEARTBEAT_S seconds, how many collectives it has entered (the
# process group's sequence number, which DDP's gradient all-reduces count in too) and the time. That is one store
# write and one key check per second on a connection of its own, never a collective. When a collective times out,
# the rank that waited reads every rank's count: the ranks behind the others are the ones that stopped making
# progress. It names them in its error, and flags them in the store; a flagged rank's thread prints where its main
# thread is stuck and ends the process, so every rank ends with an error that names the stalled rank.

HEARTBEAT_S = 1.0
HEARTBEAT_RANKS_PER_S = 512   # above this many ranks the beat slows down: the store serves ~2 requests a beat a rank


def heartbeat_interval(world: int) -> float:
    """Seconds between a rank's beats: ``HEARTBEAT_S``, longer on big jobs so the store sees at most about
    ``2 * HEARTBEAT_RANKS_PER_S`` requests a second whatever the number of ranks."""
    return HEARTBEAT_S * max(1.0, world / HEARTBEAT_RANKS_PER_S)
_HEARTBEAT = "heartbeat/"


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than the timeout (``DFIT_TIMEOUT``); the message names the ranks behind."""


def _sequence() -> int:
    try:
        return int(dist.distributed_c10d._get_default_group()._get_sequence_number_for_group())
    except Exception:  # noqa: BLE001 - no group, or a backend without sequence numbers
        return -1


def start_heartbeat(info: LaunchInfo) -> None:
    """Start this rank's heartbeat thread (on a store connection of its own); stopped by ``shutdown``."""
    if info.master_addr is None or info.master_port is None or _state.get("heartbeat") is not None:
        return
    client = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False,
                           timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "dfit")
    store = dist.PrefixStore(f"dfit/{run_id}/attempt_{attempt}/{_HEARTBEAT}", client)
    main = threading.main_thread()
    stop = threading.Event()

    def beat() -> None:
        me = info.rank
        while not stop.is_set():
            try:
                store.set(f"progress/{me}", f"{_sequence()} {time.time():.3f}")
                if store.check([f"stalled/{me}"]):
                    _end_stalled_rank(info, store.get(f"stalled/{me}").decode(), main, store)
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
                return
            stop.wait(heartbeat_interval(info.world_size))

    thread = threading.Thread(target=beat, name="dfit-heartbeat", daemon=True)
    thread.start()
    _state["heartbeat"] = (store, stop, thread)


STALLED_GRACE_S = 8.0  # a flagged rank waits this long for the launcher to end it (the waiting ranks fail first)


def _end_stalled_rank(info: LaunchInfo, why: str, main: threading.Thread, store: Any) -> None:
    """Called on a stalled rank's heartbeat thread once another rank timed out waiting for it: say so, with where
    its main thread is, and end the process (after a moment: the rank that timed out is the first failure)."""
    frame = sys._current_frames().get(main.ident)
    where = traceback.format_stack(frame)[-3:] if frame is not None else []
    message = (f"rank {info.rank} stopped making progress: {why}; ending it. Its main thread is at:\n"
               + "".join(where).rstrip("\n"))
    try:
        store.set(f"ack/{info.rank}", "1")
    except Exception:  # noqa: BLE001
        pass
    out = sys.__stderr__
    if out is not None:
        out.write("".join(f"[rank{info.rank}]: [dfit] {line}\n" for line in message.split("\n")))
        out.flush()
    time.sleep(STALLED_GRACE_S)
    os._exit(1)


# How a collective's timeout reads: gloo "Timed out waiting 600000ms for recv operation", NCCL's watchdog "collective
# operation timeout", a store "Socket Timeout" / "wait timeout". Only errors of torch.distributed count (a
# DataLoader's "timed out after 5 seconds" is not a collective's).
_TIMEOUT_SIGNS = ("timed out waiting", "collective operation timeout", "socket timeout", "wait timeout")


def _looks_like_timeout(exc: BaseException) -> bool:
    if isinstance(exc, CollectiveTimeout):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    from_c10d = isinstance(exc, getattr(dist, "DistError", ())) or any(k in text for k in ("gloo", "nccl", "c10d"))
    return from_c10d and any(sign in text for sign in _TIMEOUT_SIGNS)


def explain_timeout(exc: BaseException) -> CollectiveTimeout | None:
    """For an exception raised by a collective that timed out: a ``CollectiveTimeout`` naming the timeout and the
    ranks that stopped making progress (read from the heartbeat), after flagging them so they end too; None for
    any other exception, or when there is no heartbeat to read."""
    beat = _state.get("heartbeat")
    if isinstance(exc, CollectiveTimeout) or beat is None or not _looks_like_timeout(exc):
        return None
    store, _, _ = beat
    me, world = _info().rank, _info().world_size
    progress: dict[int, tuple[int, float]] = {}
    keys = [f"progress/{r}" for r in range(world)]
    try:
        if store.check(keys):   # the usual case: two requests, however many ranks wait
            found = dict(zip(range(world), store.multi_get(keys)))
        else:
            found = {r: store.get(key) for r, key in enumerate(keys) if store.check([key])}
    except Exception:  # noqa: BLE001 - the store is gone
        return None
    for r, value in found.items():
        seq, stamp = value.decode().split()
        progress[r] = (int(seq), float(stamp))
    progress[me] = (_sequence(), time.time())
    ahead = max(seq for seq, _ in progress.values())
    now = time.time()
    behind = sorted(r for r, (seq, _) in progress.items() if seq < ahead)
    silent = sorted(r for r, (_, stamp) in progress.items() if now - stamp > 3 * heartbeat_interval(world) + 2)
    never = sorted(set(range(world)) - set(progress))
    timeout = _state.get("timeout") or _timeout(None).total_seconds()
    parts = []
    if behind:
        parts.append(f"{_rank_list(behind)} stopped making progress (at collective "
                     f"{', '.join(str(progress[r][0]) for r in behind)}; rank {me} waited in collective {ahead})")
    if silent:
        parts.append(f"{_rank_list(silent)} stopped answering (no heartbeat for "
                     f"{now - max(progress[r][1] for r in silent):.0f} s: killed, or frozen)")
    if never:
        parts.append(f"{_rank_list(never)} never reported any progress")
    if not parts:
        parts.append("every rank reached the same collective: they may be waiting in different ones "
                     "(ranks that disagree on the steps they run)")
    for r in behind:
        try:
            store.set(f"stalled/{r}", f"rank {me} waited {timeout:g} s (DFIT_TIMEOUT) for it in a collective")
        except Exception:  # noqa: BLE001
            break
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    error = CollectiveTimeout(f"a collective timed out after {timeout:g} s (DFIT_TIMEOUT) on rank {me}: "
                              + "; ".join(parts) + f". torch: {first}")
    error.__cause__ = exc
    out = sys.__stderr__
    if out is not None:  # at once: a launcher may end this rank when another waiting rank fails first
        out.write(f"[rank{me}]: [dfit] CollectiveTimeout: {error}\n")
        out.flush()
    # the stalled ranks see their flag while the store still runs
    deadline = time.time() + heartbeat_interval(world) + 1.0
    while behind and time.time() < deadline:
        try:
            if all(store.check([f"ack/{r}"]) for r in behind):
                break
        except Exception:  # noqa: BLE001
            break
        time.sleep(0.05)
    return error


def _rank_list(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _write_error_file(info: LaunchInfo, message: str, callstack: str) -> None:
    """What torch's errors.record writes, so torch elastic's launcher reports it (first writer wins)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if info.environment != "torchrun" or not error_file or os.path.exists(error_file):
        return
    import json

    data = {"message": {"message": message, "extraInfo": {"py_callstack": callstack,
                                                          "timestamp": str(int(time.time()))}}}
    try:
        with open(error_file, "w") as fh:
            json.dump(data, fh)
    except OSError:
        pass
