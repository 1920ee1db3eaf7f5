"""Interleaved rounds of fit() variants inside the same worker processes, at 1 and N processes (gloo, CPU).

Used by ``callbacks.py`` and ``streams.py``. Each world size runs in its own fresh processes (one per rank,
launched like torchrun: RANK/WORLD_SIZE/MASTER_* set, so dfit joins the group on its first fit). Every rank
builds the same variants, runs each once untimed (warm-up, group start), then ``rounds`` rounds: in each round
every variant fits one epoch, in an order shuffled per round (the same on every rank), timed on rank 0
between barriers. Rank 0 prints one JSON line: variant -> per-round seconds per step (wall clock), and
"cpu:" + variant -> the same in CPU seconds of the process (all its threads). On a machine shared with other
jobs the wall-clock ratio also measures when the others ran; the CPU-time ratio measures the work each variant
does (it leaves out time spent waiting, e.g. for the other rank in a collective).
A ratio is taken per round against the baseline variant of the same round, reported as the median over rounds
with its min..max spread.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import common

PREFIX = "@@ROUNDS "

# A variant: () -> number of steps of the one epoch it just trained.
Variant = Callable[[], int]


def _barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def run_rounds(variants: dict[str, Variant], rounds: int, rank: int,
               after: Callable[[], dict[str, list[float]]] | None = None) -> None:
    """In a worker: warm up every variant, run the interleaved rounds, rank 0 prints the per-step times
    (and whatever ``after()`` measures then, under its own keys)."""
    import torch

    torch.set_num_threads(1)
    for fn in variants.values():   # untimed: dfit joins the group, allocators and caches warm up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    times.update({f"cpu:{name}": [] for name in variants})
    for r in range(rounds):
        order = list(variants)
        random.Random(1000 + r).shuffle(order)   # the same order on every rank
        for name in order:
            _barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            steps = variants[name]()
            c1 = time.process_time()
            _barrier()
            times[name].append((time.perf_counter() - t0) / steps)
            times[f"cpu:{name}"].append((c1 - c0) / steps)
    if after is not None:
        times.update(after())
    if rank == 0:
        print(PREFIX + json.dumps(times), flush=True)


def launch(script: str, world: int, extra: list[str], timeout: float = 1800) -> dict[str, list[float]]:
    """Run ``script --worker`` on ``world`` fresh processes; rank 0's per-variant per-step times."""
    port = common.free_ports(1)[0]
    procs = []
    for rank in range(world):
        env = common.clean_env()
        env.update(common.ddp_env(rank, world, port))
        procs.append(subprocess.Popen([sys.executable, script, "--worker", "--rank", str(rank), *extra], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=timeout) for p in procs]
    failed = [(r, p.returncode, err) for r, (p, (_, err)) in enumerate(zip(procs, outs)) if p.returncode != 0]
    if failed:
        raise RuntimeError("\n".join(f"rank {r} of {world} exited with {rc}:\n{err[-3000:]}" for r, rc, err in failed))
    lines = [ln for ln in outs[0][0].splitlines() if ln.startswith(PREFIX)]
    if not lines:
        raise RuntimeError(f"rank 0 of {world} reported nothing:\n{outs[0][0][-2000:]}\n{outs[0][1][-2000:]}")
    return json.loads(lines[-1][len(PREFIX):])


def fastest_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Best round of ``name`` over best round of ``baseline``: the least noise-sensitive figure on a busy machine."""
    return min(times[name]) / min(times[baseline])


def ratios(times: dict[str, list[float]], name: str, baseline: str) -> list[float]:
    return [t / b for t, b in zip(times[name], times[baseline])]


def table(results: dict[int, dict[str, list[float]]], labels: dict[str, str], baseline: str) -> list[str]:
    """Markdown rows: processes, variant, rounds, median µs/step, median per-round ratio, min..max."""
    lines = [f"| processes | variant | rounds | median µs/step | / {labels[baseline]} (median of per-round ratios) "
             "| range | CPU µs/step | CPU-time ratio (median) |", "|---|---|---|---|---|---|---|---|"]
    for world, times in results.items():
        for name, label in labels.items():
            rs = ratios(times, name, baseline)
            cpu = ratios(times, f"cpu:{name}", f"cpu:{baseline}")
            spread = "—" if name == baseline else f"{min(rs):.3f}..{max(rs):.3f}"
            wall_us = statistics.median(times[name]) * 1e6
            cpu_us = statistics.median(times[f"cpu:{name}"]) * 1e6
            lines.append(f"| {world} | {label} | {len(times[name])} | {wall_us:,.1f} | {statistics.median(rs):.3f} "
                         f"| {spread} | {cpu_us:,.1f} | {statistics.median(cpu):.3f} |")
    return lines


def header(title: str, detail: str, load_before: tuple[float, ...], load_after: tuple[float, ...],
           seconds: float) -> str:
    info = common.machine_info()
    return (f"### {title}: {datetime.date.today().isoformat()}, {os.cpu_count()} cores, CPU ({info['cpu']}), "
            f"torch {info['torch']}, commit {info['commit']}; {detail}; load average {load_before[0]:.1f} before, "
            f"{load_after[0]:.1f} after; {seconds:.0f} s")


def command_line(script: str, description: str, worker: Callable[[Any], None], argv=None):
    """The shared command line of the interleaved benchmarks: as a worker, run ``worker(args)`` and return None;
    as the driver, launch the workers for each world size and return ``(args, results, header_parts)`` where
    ``header_parts`` are the loads and elapsed time ``header`` wants."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--samples", type=int, default=common.N_SAMPLES)
    p.add_argument("--worlds", default="1,2", help="process counts, comma-separated")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--results", default=str(common.HERE / "RESULTS.md"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    load_before, start = os.getloadavg(), time.perf_counter()
    results = {world: launch(script, world, ["--rounds", str(args.rounds), "--samples", str(args.samples)])
               for world in [int(w) for w in args.worlds.split(",")]}
    return args, results, (load_before, os.getloadavg(), time.perf_counter() - start)
