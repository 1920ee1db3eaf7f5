#!/usr/bin/env python
"""Loader benchmark: a map-style Dataset with ~200 µs of Python work per item, read on 2 worker processes.

    python benchmarks/loaders.py [--rounds 5] [--items 2048] [--item-us 200] [--quick] [--no-append]

Two runners, at 1 and 2 processes (gloo, CPU), items/s of one training epoch (global batch 64, a tiny linear
model, so loading dominates):
  dfit                 model.fit(dataset, batch_size=64, workers=2, shuffle=True, seed=0, verbose=0)
  hand-written loop    DataLoader(dataset, batch_size=64 / N, sampler=DistributedSampler(shuffle=True),
                       num_workers=2) + DDP on N processes (the plain model on 1), SGD, CrossEntropyLoss
Each (runner, world size) runs in fresh processes per round, rounds interleaved in a shuffled order; in a run,
one untimed warm-up epoch, then ``--epochs`` epochs timed on rank 0 between barriers (worker start-up included,
as both runners start their workers each epoch). Reported: median items/s and the median over rounds of the
per-round ratio dfit / hand (target >= 0.95).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BATCH = 64


def busy(loops: int) -> int:
    """Pure-Python work (holds the GIL, as real per-item decoding/augmentation in Python does)."""
    acc = 0
    for i in range(loops):
        acc = (acc + i * i) % 1000003
    return acc


def calibrate(item_us: float) -> int:
    """Loop count of ``busy`` that takes ``item_us`` microseconds here (best of a few)."""
    loops = 10000
    best = min(_timed(loops) for _ in range(5))
    return max(1, int(loops * item_us * 1e-6 / best))


def _timed(loops: int) -> float:
    t = time.perf_counter()
    busy(loops)
    return time.perf_counter() - t


class SlowItems:
    """Map-style: item i is a (64,) float32 vector and a label, after ``loops`` of Python work."""

    def __init__(self, n: int, loops: int):
        self.n, self.loops = n, loops

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        busy(self.loops)
        g = torch.Generator().manual_seed(int(i))
        return torch.randn(64, generator=g), int(i) % 10


def worker(args) -> None:
    """One rank of one runner: warm-up epoch, then timed epochs; rank 0 prints a JSON line."""
    os.environ.update(RANK=str(args.rank), LOCAL_RANK=str(args.rank), WORLD_SIZE=str(args.world),
                      LOCAL_WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    import torch
    import torch.distributed as tdist
    from torch import nn
    from torch.utils.data import Dataset

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    ds_cls = type("SlowItemsDataset", (SlowItems, Dataset), {})
    dataset = ds_cls(args.items, args.loops)
    torch.manual_seed(0)
    net = nn.Linear(64, 10)
    times: list[float] = []

    def barrier():
        if args.world > 1:
            tdist.barrier()

    if args.runner == "dfit":
        import dfit

        class Timer(dfit.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                barrier()
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                barrier()
                times.append(time.perf_counter() - self.t0)

        model = dfit.Model(net)
        model.compile(optimizer=torch.optim.SGD(net.parameters(), lr=0.01), loss=nn.CrossEntropyLoss())
        model.fit(dataset, batch_size=BATCH, epochs=1 + args.epochs, workers=2, shuffle=True, seed=0, verbose=0,
                  callbacks=[Timer()])
        dfit.distributed.shutdown()
    else:
        from torch.utils.data import DataLoader, DistributedSampler

        if args.world > 1:
            tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                     world_size=args.world)
            module = nn.parallel.DistributedDataParallel(net)
        else:
            module = net
        sampler = DistributedSampler(dataset, num_replicas=args.world, rank=args.rank, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=BATCH // args.world, sampler=sampler, num_workers=2)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        loss_fn = nn.CrossEntropyLoss()
        for epoch in range(1 + args.epochs):
            sampler.set_epoch(epoch)
            barrier()
            t0 = time.perf_counter()
            for xb, yb in loader:
                opt.zero_grad(set_to_none=True)
                loss_fn(module(xb), yb).backward()
                opt.step()
            barrier()
            times.append(time.perf_counter() - t0)
        if args.world > 1:
            tdist.destroy_process_group()
    if args.rank == 0:
        timed = times[1:]  # the first epoch warms up
        print(json.dumps({"items_per_s": args.items / statistics.median(timed), "epochs": timed}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(runner: str, world: int, args) -> float:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--runner", runner, "--rank", str(r),
                               "--world", str(world), "--port", str(port), "--items", str(args.items),
                               "--loops", str(args.loops), "--epochs", str(args.epochs)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    outs = [p.communicate(timeout=600) for p in procs]
    reported = [line for line in outs[0][0].splitlines() if line.startswith("{")]
    if not reported:
        raise RuntimeError(f"{runner} on {world} process(es) failed:\n" + "\n".join(e[-3000:] for _, e in outs))
    for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
        if p.returncode != 0:  # after rank 0 reported: noted, not hidden
            ABNORMAL_EXITS.append(f"{runner} on {world} process(es), rank {rank}: exit code {p.returncode} after "
                                  f"the timed epochs ({err.strip().splitlines()[-1] if err.strip() else 'no stderr'})")
    return json.loads(reported[-1])["items_per_s"]


ABNORMAL_EXITS: list[str] = []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--items", type=int, default=2048)
    p.add_argument("--item-us", type=float, default=200.0)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per run (after one warm-up epoch)")
    p.add_argument("--quick", action="store_true", help="smoke: 256 items, 1 round, 1 timed epoch")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--runner", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--loops", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.items, args.rounds, args.epochs = 256, 1, 1
    args.loops = calibrate(args.item_us)
    load_before = os.getloadavg()
    start = time.perf_counter()
    results: dict[tuple[str, int], list[float]] = {}
    order = [(runner, world) for world in (1, 2) for runner in ("dfit", "hand")]
    for _ in range(args.rounds):
        random.shuffle(order)
        for runner, world in order:
            results.setdefault((runner, world), []).append(run_group(runner, world, args))
    load_after = os.getloadavg()
    lines = ["| processes | runner | rounds | median items/s | dfit / hand (median of per-round ratios) | range |",
             "|---|---|---|---|---|---|"]
    verdicts = []
    for world in (1, 2):
        ratios = [d / h for d, h in zip(results[("dfit", world)], results[("hand", world)])]
        ratio = statistics.median(ratios)
        for runner in ("hand", "dfit"):
            cell = f"{ratio:.3f}" if runner == "dfit" else "1.000"
            rng = f"{min(ratios):.3f}..{max(ratios):.3f}" if runner == "dfit" else "—"
            name = "dfit fit(workers=2)" if runner == "dfit" else "hand loop, DataLoader(num_workers=2)" + (
                " + DistributedSampler + DDP" if world > 1 else "")
            lines.append(f"| {world} | {name} | {args.rounds} | {statistics.median(results[(runner, world)]):,.0f} "
                         f"| {cell} | {rng} |")
        verdicts.append(f"- {world} process(es): dfit / hand = {ratio:.3f} (target >= 0.95) -> "
                        f"{'MET' if ratio >= 0.95 else 'NOT MET'}")
    header = (f"### Loaders (issue 12): {datetime.date.today().isoformat()}, {os.cpu_count()} cores, CPU, "
              f"{args.items} items x ~{args.item_us:.0f} µs of Python work ({args.loops} loops), global batch "
              f"{BATCH}, {args.epochs} timed epoch(s) per run; load average {load_before[0]:.1f} before, "
              f"{load_after[0]:.1f} after; {time.perf_counter() - start:.0f} s")
    notes = [f"- note: {line}" for line in ABNORMAL_EXITS]
    text = "\n".join([header, "", *lines, "", *verdicts, *notes, ""])
    print(text)
    if not args.no_append:
        with open(args.results, "a") as f:
            f.write("\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
