#!/usr/bin/env python
"""The shuffle at scale (issue 17): dfit's stateless permutation vs a materialised one, in one run.

    python benchmarks/shuffle.py [--rounds 7] [--big 1e7,1e8] [--no-append]     (~1-2 min on 2 cores)
    python benchmarks/shuffle.py --quick --no-append                             (a smoke run, seconds)

1. Pass setup at n = 1e9: building a pass's plan (``sharding.GlobalBatchPlan``) and computing the first step's
   rows, time (median of many) and Python-allocated memory (tracemalloc peak).
2. Per step: computing a rank's rows of each global batch as ``fit`` does (``sharding.epoch_rows``, shuffled)
   for the SMALL configuration of run.py (global batch 64, 1 and 2 ranks, n = 32768 and n = 1e9), next to a
   hand-written SMALL training step (MLP 64-256-256-10, SGD, cross-entropy, 1 thread) timed in the same rounds.
3. A whole pass of one rank's indices among 8 replicas at n = 1e7 and 1e8, each case in a fresh process (time, and
   growth of the peak RSS with VmHWM reset just before the pass): torch's ``DistributedSampler``
   (``list(iter(sampler))``, what a DataLoader consumes),
   dfit's former rule (``numpy.random.default_rng([seed, pass]).permutation(n)`` on every rank) and dfit now
   (``epoch_rows`` over the pass at global batch 8192, iterated, not kept).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

WHOLE_PASS = r"""
import json, sys, time
import numpy as np, torch
from torch.utils.data import DistributedSampler
from dfit.data.sharding import epoch_rows
torch.set_num_threads(1)
way, n = sys.argv[1], int(float(sys.argv[2]))
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:   # resets the peak (VmHWM) to the current RSS
    f.write("5")
before = status_kib("VmRSS")
t0 = time.perf_counter()
if way == "DistributedSampler":
    sampler = DistributedSampler(range(n), num_replicas=8, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(1)
    count = len(list(iter(sampler)))
elif way == "dfit former":
    order = np.random.default_rng([0, 1]).permutation(n)
    count = len(order[0::8])   # any rank's share: the permutation is built whole either way
else:
    count = sum(len(rows) for rows, _ in epoch_rows(n, 8192, 1, None, True, 0, 0, 8))
seconds = time.perf_counter() - t0
after = status_kib("VmHWM")
print(json.dumps({"seconds": seconds, "peak_growth_kib": after - before, "rows": count}))
"""


def pass_setup(n: int, repeats: int) -> tuple[float, float, float]:
    """(median µs to build a pass's plan, median µs for plan + first step's rows, tracemalloc peak KiB)."""
    from dfit.data.sharding import GlobalBatchPlan

    build, first = [], []
    for k in range(repeats):
        t0 = time.perf_counter()
        plan = GlobalBatchPlan(n, 64, 3, 8, True, 0, k)
        t1 = time.perf_counter()
        plan.rows(0)
        t2 = time.perf_counter()
        build.append(t1 - t0)
        first.append(t2 - t0)
    tracemalloc.start()
    plan = GlobalBatchPlan(n, 64, 3, 8, True, 0, repeats)
    plan.rows(0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return 1e6 * common.median(build), 1e6 * common.median(first), peak / 1024


def small_step_timer(steps: int):
    """A function timing `steps` hand-written SMALL training steps; returns seconds per step."""
    import torch
    from torch import nn

    net = common.make_module("SMALL")
    opt = torch.optim.SGD(net.parameters(), lr=common.LR)
    loss_fn = nn.CrossEntropyLoss()
    x, y = common.make_data(64 * steps)

    def run() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(x), 64):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
        return (time.perf_counter() - t0) / steps
    return run


def index_timer(n: int, world: int, steps: int):
    """A function timing rank 0's rows of `steps` shuffled SMALL steps (global batch 64); seconds per step."""
    from dfit.data.sharding import epoch_rows

    epoch = [0]

    def run() -> float:
        epoch[0] += 1
        t0 = time.perf_counter()
        count = 0
        for _rows, _size in epoch_rows(n, 64, epoch[0], steps, True, 0, 0, world):
            count += 1
        return (time.perf_counter() - t0) / count
    return run


def whole_pass(way: str, n: float) -> dict:
    r = subprocess.run([sys.executable, "-c", WHOLE_PASS, way, str(n)], capture_output=True, text=True,
                       env=common.clean_env(), timeout=900)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=512, help="steps per timed block (SMALL: 512 a pass)")
    ap.add_argument("--big", default="1e7,1e8", help="n for the whole-pass comparison, comma-separated")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 64 steps, whole passes at n = 1e6")
    ap.add_argument("--results", default=str(common.HERE / "RESULTS.md"))
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.big = 2, 64, "1e6"

    import torch

    torch.set_num_threads(1)
    lines = []
    build_us, first_us, peak_kib = pass_setup(10 ** 9, 200 if not args.quick else 20)
    lines += ["| n | build a pass's plan (µs) | plan + first step's rows (µs) | memory (tracemalloc peak, KiB) |",
              "|---|---|---|---|",
              f"| 1e9 | {build_us:,.1f} | {first_us:,.1f} | {peak_kib:,.1f} |", ""]

    timers = {"SMALL training step (hand-written, 1 thread)": small_step_timer(args.steps)}
    for n in (32768, 10 ** 9):
        for world in (1, 2):
            timers[f"rank 0's rows (fit's epoch_rows), n = {n:,}, {world} rank(s)"] = index_timer(n, world, args.steps)
    for run in timers.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, run in timers.items():
            times[name].append(run())
    step = common.median(times["SMALL training step (hand-written, 1 thread)"])
    lines += ["| per step | µs/step (median) | % of the SMALL step |", "|---|---|---|"]
    for name, ts in times.items():
        t = common.median(ts)
        lines.append(f"| {name} | {1e6 * t:,.1f} | {100 * t / step:.2f} % |")
    lines.append("")

    lines += ["| n | way (8 replicas, rank 0, one pass) | seconds | peak RSS growth (MiB) |", "|---|---|---|---|"]
    for n in (float(v) for v in args.big.split(",")):
        for way in ("DistributedSampler", "dfit former", "dfit now"):
            got = whole_pass(way, n)
            if "error" in got:
                lines.append(f"| {n:.0e} | {way} | failed: {got['error']} | — |")
            else:
                lines.append(f"| {n:.0e} | {way} | {got['seconds']:.2f} | {got['peak_growth_kib'] / 1024:,.1f} |")
    report = common.report("shuffle", f"python benchmarks/shuffle.py {' '.join(argv or sys.argv[1:])}",
                           f"1 thread; {args.rounds} interleaved rounds of {args.steps} steps for the per-step "
                           "table.", lines)
    common.publish(report, args.results, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
