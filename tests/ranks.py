"""Run a function on N local ranks (gloo, CPU) for tests: fresh processes, a free port, a timeout."""
from __future__ import annotations

import multiprocessing as mp
import os
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


def _worker(fn: Callable, rank: int, world: int, port: int, args: tuple, queue: Any) -> None:
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


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``fn(*args)`` on ``world`` ranks; returns the results in rank order or raises with each rank's error."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
