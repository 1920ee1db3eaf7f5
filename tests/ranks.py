"""Run a function on N local ranks (gloo, CPU) for tests: fresh processes, a free port, a timeout.

Each rank runs in its own session (process group), so a timeout or a failure ends the rank *and* anything it
started (compile workers, subprocesses), not just the rank.

Ports: ``free_port()`` asks the OS for a free port and closes it, so another process may take it before rank 0
binds it. The ranks' rendezvous is the same one the launchers use (MASTER_ADDR/MASTER_PORT read by
``dfit.distributed.init``), which a ``file://`` init method or a pre-made TCPStore would bypass; so instead
``run_ranks`` retries the whole job on a fresh port when a rank fails with "address already in use".
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import traceback
from typing import Any, Callable

from dfit.distributed import free_port


def _plain(value: Any) -> Any:
    """Tensors as numpy arrays, so results pickle by value (not as shared-memory handles)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


PORT_TRIES = 3
_PORT_TAKEN = ("EADDRINUSE", "address already in use")


def _worker(fn: Callable, rank: int, world: int, port: int, args: tuple, queue: Any) -> None:
    os.setsid()  # its own process group: the parent can end it with everything it started
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    for key in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE"):
        os.environ.pop(key, None)
    try:
        import torch

        torch.set_num_threads(1)
        queue.put((rank, "ok", _plain(fn(*args))))
    except BaseException:  # noqa: BLE001 - the parent reports it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import dfit

        dfit.distributed.shutdown()


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (a rank and whatever it started); quiet if it is gone."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _port_taken(errors: list[str]) -> bool:
    return any(token.lower() in e.lower() for e in errors for token in _PORT_TAKEN)


def _run_once(fn: Callable, world: int, args: tuple, port: int, timeout: float) -> tuple[dict, list[str]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world):
            try:
                rank, status, value = queue.get(timeout=timeout)
            except queue_mod.Empty:
                missing = sorted(set(range(world)) - set(results))
                errors.append(f"ranks {missing} gave no result within {timeout} s")
                break
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            kill_group(p.pid)  # also ends what a finished rank left behind
            if p.is_alive():  # killed before it had its own group
                p.kill()
            p.join(timeout=5)
    return results, errors


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``fn(*args)`` on ``world`` ranks; returns the results in rank order or raises with each rank's error.
    On a timeout every rank's process group is killed. A port taken between ``free_port()`` and rank 0's bind
    is retried on a new port (``PORT_TRIES`` times)."""
    for _ in range(PORT_TRIES):
        results, errors = _run_once(fn, world, args, free_port(), timeout)
        if not (errors and _port_taken(errors)):
            break
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
