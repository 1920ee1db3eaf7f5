#!/usr/bin/env python
"""Optimizer step time: dfit's Keras-rule optimizers vs torch's foreach Adam and RMSprop.

    python benchmarks/optimizers.py [--rounds 15] [--steps 10] [--no-append]

The parameters: 25 (448 x 448) weight matrices and 25 biases (50 tensors, 5.03 M float32 numbers), with
fixed random gradients. Each optimizer has its own copy. A round times ``--steps`` calls of ``step()`` of
every optimizer in turn (interleaved, so a change of machine load hits all of them alike); the ratio of an
optimizer to torch's is taken per round and its median reported, with the quartiles.

Target: dfit Adam / torch Adam(foreach=True) and dfit RMSprop / torch RMSprop(foreach=True) <= 1.05.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402
from dfit import optimizers  # noqa: E402

LAYERS, WIDTH = 25, 448


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(LAYERS):
        for shape in ((WIDTH, WIDTH), (WIDTH,)):
            p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.05)
            p.grad = torch.randn(shape, generator=gen)
            params.append(p)
    return params


def contenders() -> dict[str, torch.optim.Optimizer]:
    # Keras' defaults, in each library's names
    made = {
        "torch Adam (foreach)": lambda p: torch.optim.Adam(p, lr=1e-3, eps=1e-7, foreach=True),
        "torch RMSprop (foreach)": lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9, eps=1e-7, foreach=True),
        "dfit Adam": lambda p: optimizers.Adam().bind(p),
        "dfit RMSprop": lambda p: optimizers.RMSprop().bind(p),
        "dfit AdamW": lambda p: optimizers.AdamW().bind(p),
        "dfit SGD (momentum 0.9)": lambda p: optimizers.SGD(momentum=0.9).bind(p),
        "dfit Adagrad": lambda p: optimizers.Adagrad().bind(p),
        "dfit Adadelta": lambda p: optimizers.Adadelta().bind(p),
        "dfit Adamax": lambda p: optimizers.Adamax().bind(p),
        "dfit Nadam": lambda p: optimizers.Nadam().bind(p),
        "dfit Adam (global_clipnorm)": lambda p: optimizers.Adam(global_clipnorm=1.0).bind(p),
    }
    return {name: build(make_params()) for name, build in made.items()}


def time_steps(opt: torch.optim.Optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    opts = contenders()
    n_tensors = len(opts["dfit Adam"].param_groups[0]["params"])
    n_numbers = sum(p.numel() for p in opts["dfit Adam"].param_groups[0]["params"])
    for opt in opts.values():  # state allocated, kernels warm
        time_steps(opt, 3)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in opts}
    wall = time.perf_counter()
    for _ in range(args.rounds):
        for name, opt in opts.items():
            times[name].append(time_steps(opt, args.steps))
    wall = time.perf_counter() - wall
    load_after = os.getloadavg()

    info = common.machine_info()
    lines = [f"## Optimizer step time ({info['date']})", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, CPU only, torch {info['torch']}, "
             f"{torch.get_num_threads()} threads, commit {info['commit']}. Load average (1 min) "
             f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (the machine is shared).",
             f"{n_tensors} parameter tensors, {n_numbers / 1e6:.2f} M float32 numbers; {args.rounds} interleaved "
             f"rounds of {args.steps} steps; ratio = median over rounds of (this / torch's), with quartiles.", "",
             "| optimizer | median ms/step | / torch Adam (foreach) | IQR | / torch RMSprop (foreach) | IQR |",
             "|---|---|---|---|---|---|"]
    ratio = {}
    for name in opts:
        cells = [name, f"{common.median(times[name]) * 1e3:.2f}"]
        for ref in ("torch Adam (foreach)", "torch RMSprop (foreach)"):
            per_round = [a / b for a, b in zip(times[name], times[ref])]
            ratio[(name, ref)] = common.median(per_round)
            q1, q3 = common.quartiles(per_round)
            cells += [f"{ratio[(name, ref)]:.3f}", f"{q1:.3f}..{q3:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Targets (Keras-rule optimizers, issue: exact Keras optimizers):"]
    for ours, ref in (("dfit Adam", "torch Adam (foreach)"), ("dfit RMSprop", "torch RMSprop (foreach)")):
        value = ratio[(ours, ref)]
        lines.append(f"- {ours} / {ref}: {value:.3f} (target <= 1.05) -> {'MET' if value <= 1.05 else 'NOT MET'}")
    lines += ["", f"Benchmark wall time: {wall:.0f} s.", ""]
    common.publish("\n".join(lines), args.results, append=not args.no_append)


if __name__ == "__main__":
    main()
