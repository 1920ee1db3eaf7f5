#!/usr/bin/env python
"""dfit vs hand-written PyTorch loops (and Lightning / Accelerate / Keras when installed), in one run.

    python benchmarks/run.py                 # full run (~8-10 min on 2 cores), appends to RESULTS.md
    python benchmarks/run.py --quick         # a smoke run on a small slice of the data (~1 min)
    python benchmarks/run.py --rounds 7 --small-epochs 3 --no-peers --no-append

Every runner lives in its own worker process(es) (benchmarks/worker.py), started once; the
orchestrator then runs interleaved ROUNDS: in each round every runner trains the same number of
epochs on every configuration, in a shuffled order, one runner at a time (so the 2 cores are never
shared between two runners). Ratios are taken per round against the baseline with the same process
count and configuration, and reported as the median over rounds with the min..max spread.

Configurations (X (32768, 64) float32, y in [0, 10), SGD lr 0.01, nn.CrossEntropyLoss, no metrics):
  SMALL        MLP 64-256-256-10,   global batch 64,  shuffle=False
  SMALL+shuf   the same with one permutation per epoch (hand loop: perm indexing; dfit: shuffle=True)
  WIDE         MLP 64-2048-2048-10, global batch 256, shuffle=False
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the repo: dfit without installing it
import common  # noqa: E402

PREFIX = "@@BENCH "
WORKER = str(common.HERE / "worker.py")

LABELS = {
    "hand": "hand-written loop (slicing)",
    "hand-dl": "hand-written loop, DataLoader(TensorDataset)",
    "dfit": "dfit fit()",
    "lightning": "Lightning Trainer.fit",
    "accelerate": "Accelerate loop",
    "keras": "Keras 3 fit (torch backend)",
}
PEERS = ("lightning", "accelerate", "keras")
IMPORTS = {"torch": "torch", "dfit": "dfit", "lightning": "lightning", "accelerate": "accelerate",
           "keras": "keras"}


@dataclass(frozen=True)
class Config:
    name: str
    model: str
    shuffle: bool
    epochs: int


@dataclass
class Group:
    """One runner on `world` processes: its worker process(es) and reader threads."""

    runner: str
    world: int
    procs: list = field(default_factory=list)
    queues: list = field(default_factory=list)
    error: str | None = None
    log: object = None

    @property
    def key(self):
        return (self.runner, self.world)


def _reader(stream, q):
    for line in stream:
        if line.startswith(PREFIX):
            q.put(json.loads(line[len(PREFIX):]))
    q.put({"error": "worker exited", "eof": True})


def start_group(runner: str, world: int, port: int, logdir: Path, nice: int = 0) -> Group:
    g = Group(runner, world)
    g.log = open(logdir / f"{runner}-{world}.log", "w")
    for rank in range(world):
        env = common.clean_env()
        if world > 1:
            env.update(common.ddp_env(rank, world, port))
        p = subprocess.Popen([sys.executable, WORKER, "--runner", runner, "--rank", str(rank), "--world", str(world)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=g.log, text=True, env=env,
                             cwd=str(common.REPO), preexec_fn=(lambda: os.nice(nice)) if nice else None)
        q: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(p.stdout, q), daemon=True).start()
        g.procs.append(p)
        g.queues.append(q)
    return g


def collect(g: Group, timeout: float) -> list[dict]:
    """One reply from every rank of the group (an error reply, or a timeout, disables the group)."""
    replies = []
    deadline = time.monotonic() + timeout
    for q in g.queues:
        try:
            replies.append(q.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            replies.append({"error": f"no reply within {timeout:.0f} s"})
    errors = [r for r in replies if "error" in r]
    if errors:
        g.error = errors[0]["error"]
        tb = errors[0].get("traceback")
        if tb:
            g.log.write(tb)
            g.log.flush()
        stop_group(g)
    return replies


def send(g: Group, cmd: dict) -> None:
    for p in g.procs:
        p.stdin.write(json.dumps(cmd) + "\n")
        p.stdin.flush()


def stop_group(g: Group) -> None:
    for p in g.procs:
        if p.poll() is None:
            try:
                p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                p.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
    for p in g.procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# --------------------------------------------------------------------------------------------------
def import_times(names: list[str], repeats: int) -> dict[str, list[float]]:
    """Seconds spent in `import NAME`, each measured in a fresh interpreter, repeats interleaved."""
    code = ("import time, sys; t = time.perf_counter(); import {mod}; "
            "sys.stdout.write(repr(time.perf_counter() - t))")
    env = common.clean_env()
    out: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for name in names:
            r = subprocess.run([sys.executable, "-c", code.format(mod=IMPORTS[name])], capture_output=True,
                               text=True, env=env, cwd=str(common.REPO), timeout=120)
            if r.returncode == 0:
                out[name].append(float(r.stdout.strip().splitlines()[-1]))
    return {k: v for k, v in out.items() if v}


def available(name: str) -> bool:
    if name == "dfit":
        try:
            spec = importlib.util.find_spec("dfit")
        except (ImportError, ValueError):
            return False
        return spec is not None
    return importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------------------------------
def fmt_ratio(values):
    if not values:
        return "", ""
    lo, hi = min(values), max(values)
    return f"{common.median(values):.3f}", f"{lo:.3f}..{hi:.3f}"


def _epoch(reply: dict) -> float:
    """Mean seconds per timed epoch in one round."""
    return sum(reply["epoch_times"]) / len(reply["epoch_times"])


def _cpu(reply: dict) -> float:
    """Mean CPU seconds (rank 0, all threads) per timed epoch in one round."""
    return sum(reply["cpu_times"]) / len(reply["cpu_times"])


def _best(reply: dict) -> float:
    return min(reply["epoch_times"])


def label(runner: str, world: int) -> str:
    if runner == "hand" and world > 1:
        return "hand-written DDP loop (slicing)"
    return LABELS[runner]


def build_table(configs, groups, results, n, baselines) -> tuple[str, dict]:
    """Markdown table + a dict of median ratios {(config, runner, world): ratio}."""
    header = ("| config | runner | procs | rounds | samples/s | µs/step | ratio vs baseline (median) | "
              "ratio min..max | IQR of ratio | ratio of best epochs | CPU-time ratio (median) | "
              "fit() setup ms |")
    lines = [header, "|" + "---|" * 12]
    ratios: dict = {}
    cpu_ratios: dict = {}
    for cfg in configs:
        batch = common.MODELS[cfg.model][1]
        steps = common.steps_per_epoch(n, batch)
        for (runner, world) in sorted({k[1:] for k in results if k[0] == cfg.name},
                                      key=lambda k: (k[1], ORDER.index(k[0]))):
            rounds = results[(cfg.name, runner, world)]
            if not rounds:
                continue
            per_round = [_epoch(r) for r in rounds]
            epoch_s = common.median(per_round)
            base = {b["round"]: b for b in results.get((cfg.name, baselines[world], world), [])}
            rr = [_epoch(r) / _epoch(base[r["round"]]) for r in rounds if r["round"] in base]
            med, span = fmt_ratio(rr)
            q1, q3 = common.quartiles(rr) if rr else (float("nan"), float("nan"))
            iqr = f"{q3 - q1:.3f}" if rr else ""
            ratios[(cfg.name, runner, world)] = common.median(rr) if rr else float("nan")
            best_base = min((_best(b) for b in base.values()), default=float("nan"))
            best = f"{min(_best(r) for r in rounds) / best_base:.3f}" if base else ""
            cr = [_cpu(r) / _cpu(base[r["round"]]) for r in rounds if r["round"] in base]
            cpu_ratio = f"{common.median(cr):.3f}" if cr else ""
            cpu_ratios[(cfg.name, runner, world)] = common.median(cr) if cr else float("nan")
            setup = [r["call_time"] - sum(r["epoch_times"]) for r in rounds if "call_time" in r]
            setup_s = f"{1e3 * common.median(setup):.1f}" if setup else "—"
            lines.append(f"| {cfg.name} | {label(runner, world)} | {world} | {len(rounds)} | {n / epoch_s:,.0f} | "
                         f"{1e6 * epoch_s / steps:,.0f} | {med} | {span} | {iqr} | {best} | {cpu_ratio} | {setup_s} |")
    return "\n".join(lines), ratios, cpu_ratios


ORDER = ["hand", "dfit", "hand-dl", "lightning", "accelerate", "keras"]


def targets(ratios, imports, baselines, cpu_ratios=None) -> list[str]:
    out = []
    cpu_ratios = cpu_ratios or {}

    def check(label, value, limit, less=True, key=None):
        if value != value:  # nan: not measured
            out.append(f"- {label}: not measured")
            return
        ok = value <= limit if less else value >= limit
        cpu = cpu_ratios.get(key, float("nan")) if key else float("nan")
        out.append(f"- {label}: {value:.3f} (target {'<=' if less else '>='} {limit}) -> "
                   f"{'MET' if ok else 'MISSED'}" + (f" (CPU-time ratio {cpu:.3f})" if cpu == cpu else ""))

    nan = float("nan")
    for world in (1, 2):
        check(f"SMALL dfit / {label(baselines[world], world)}, {world} proc", ratios.get(("SMALL", "dfit", world), nan), 1.05,
              key=("SMALL", "dfit", world))
    for world in (1, 2):
        check(f"SMALL+shuf dfit / {label(baselines[world], world)}, {world} proc",
              ratios.get(("SMALL+shuf", "dfit", world), nan), 1.05, key=("SMALL+shuf", "dfit", world))
    for world in (1, 2):
        check(f"WIDE dfit / {label(baselines[world], world)}, {world} proc", ratios.get(("WIDE", "dfit", world), nan), 1.02,
              key=("WIDE", "dfit", world))
    d1 = ratios.get(("SMALL", "dfit", 1), nan)
    for peer, limit in (("lightning", 1.6), ("keras", 3.5), ("accelerate", None)):
        r = ratios.get(("SMALL", peer, 1), nan)
        if limit is None:
            if r == r:
                out.append(f"- SMALL 1 proc, Accelerate time / dfit time: {r / d1:.2f} (no target)")
            continue
        check(f"SMALL 1 proc, {peer} time / dfit time", r / d1 if r == r else nan, limit, less=False)
    if "torch" in imports and "dfit" in imports:
        # The fastest of the repeats: the intrinsic cost (a loaded machine only ever adds to it).
        delta = min(imports["dfit"]) - min(imports["torch"])
        check("import dfit - import torch (s, fastest of the repeats each)", delta, 0.3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the SMALL configs (default 10)")
    ap.add_argument("--wide-rounds", type=int, default=3,
                    help="rounds that include WIDE (default 3; a WIDE epoch takes ~12 s on 1 process here)")
    ap.add_argument("--small-epochs", type=int, default=1, help="timed SMALL epochs per runner per round")
    ap.add_argument("--wide-epochs", type=int, default=1, help="timed WIDE epochs per runner per round")
    ap.add_argument("--samples", type=int, default=common.N_SAMPLES, help="rows of X (default 32768)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: 2048 rows, 2 rounds, 1 epoch each, 2 import repeats, no peers")
    ap.add_argument("--configs", default="SMALL,SMALL+shuf,WIDE", help="comma-separated subset")
    ap.add_argument("--runners", default=None, help="comma-separated subset of " + ",".join(ORDER))
    ap.add_argument("--no-peers", action="store_true", help="skip Lightning / Accelerate / Keras")
    ap.add_argument("--peers", action="store_true", help="run the peers even in --quick mode")
    ap.add_argument("--peers-everywhere", action="store_true",
                    help="run the peers on SMALL+shuf and WIDE too (default: SMALL only)")
    ap.add_argument("--no-dataloader", action="store_true", help="skip the DataLoader(TensorDataset) loop")
    ap.add_argument("--import-repeats", type=int, default=5)
    ap.add_argument("--results", default=str(common.HERE / "RESULTS.md"), help="file to append the result to")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one command may take")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-round runner order")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness increment for the workers (negative, as root, to shield the timing from "
                         "other work on a shared machine; recorded in the report)")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples = min(args.samples, 2048)
        args.rounds = min(args.rounds, 2)
        args.wide_rounds = min(args.wide_rounds, 2)
        args.small_epochs = args.wide_epochs = 1
        args.import_repeats = min(args.import_repeats, 2)
        args.no_peers = not args.peers

    t_start = time.perf_counter()
    n = args.samples
    wanted = set(args.runners.split(",")) if args.runners else set(ORDER)
    if args.no_peers:
        wanted -= set(PEERS)
    if args.no_dataloader:
        wanted.discard("hand-dl")
    notes = []
    for name in sorted(wanted):
        if name in ("dfit", *PEERS) and not available(name):
            notes.append(f"{name}: not importable here, skipped")
            wanted.discard(name)

    all_configs = {
        "SMALL": Config("SMALL", "SMALL", False, args.small_epochs),
        "SMALL+shuf": Config("SMALL+shuf", "SMALL", True, args.small_epochs),
        "WIDE": Config("WIDE", "WIDE", False, args.wide_epochs),
    }
    configs = [all_configs[c] for c in args.configs.split(",")]
    baselines = {1: "hand", 2: "hand"}

    def plan(cfg: Config) -> list[tuple[str, int]]:
        keys = []
        for runner in ORDER:
            if runner not in wanted:
                continue
            if runner in PEERS and cfg.name != "SMALL" and not args.peers_everywhere:
                continue
            if runner == "hand-dl" and cfg.model != "SMALL":
                continue
            for world in (1, 2):
                if runner == "keras" and world == 2:
                    continue  # Keras 3 has no multi-process data parallelism on the torch backend
                keys.append((runner, world))
        return keys

    # ---- import times first, on a quiet machine
    imp_names = [m for m in ("torch", "dfit", *PEERS) if m in ("torch",) or m in wanted]
    print(f"import times: {args.import_repeats} fresh interpreters each ...", flush=True)
    imports = import_times(imp_names, args.import_repeats)

    # ---- start every worker process once
    logdir = Path(tempfile.mkdtemp(prefix="dfit-bench-"))
    needed = sorted({k for cfg in configs for k in plan(cfg)}, key=lambda k: (k[1], ORDER.index(k[0])))
    ports = common.free_ports(len(needed))
    groups: dict[tuple, Group] = {}
    print(f"starting {sum(w for _, w in needed)} worker processes (logs in {logdir}) ...", flush=True)
    for (runner, world), port in zip(needed, ports):
        groups[(runner, world)] = start_group(runner, world, port, logdir, args.nice)
    for g in groups.values():
        collect(g, timeout=300)
        if g.error:
            notes.append(f"{label(g.runner, g.world)} on {g.world} proc: failed to start ({g.error}); log {g.log.name}")

    # ---- interleaved rounds
    results: dict[tuple, list[dict]] = {}
    rng = random.Random(args.seed)
    total_rounds = max(args.rounds, args.wide_rounds if any(c.model == "WIDE" for c in configs) else 0)
    load_before = os.getloadavg()
    for rnd in range(total_rounds):
        t_round = time.perf_counter()
        for cfg in configs:
            if rnd >= (args.wide_rounds if cfg.model == "WIDE" else args.rounds):
                continue
            order = [k for k in plan(cfg) if not groups[k].error]
            rng.shuffle(order)
            for key in order:
                g = groups[key]
                if g.error:
                    continue
                send(g, {"cmd": "run", "model": cfg.model, "shuffle": cfg.shuffle, "epochs": cfg.epochs, "n": n})
                replies = collect(g, args.timeout)
                if g.error:
                    notes.append(f"{label(g.runner, g.world)} on {g.world} proc failed in round {rnd + 1} on "
                                 f"{cfg.name}: {g.error}; log {g.log.name}")
                    continue
                replies[0]["round"] = rnd
                results.setdefault((cfg.name, *key), []).append(replies[0])
        print(f"round {rnd + 1}/{total_rounds} done in {time.perf_counter() - t_round:.1f} s", flush=True)

    load_after = os.getloadavg()
    for g in groups.values():
        stop_group(g)

    # A round whose baseline failed has no ratio for that round (matched by round index).
    table, ratios, cpu_ratios = build_table(configs, groups, results, n, baselines)
    info = common.machine_info()
    imp_lines = ["| import | median s | min s | max s | repeats |", "|---|---|---|---|---|"]
    for name, vals in imports.items():
        imp_lines.append(f"| import {IMPORTS[name]} | {common.median(vals):.3f} | {min(vals):.3f} | "
                         f"{max(vals):.3f} | {len(vals)} |")
    if "torch" in imports and "dfit" in imports:
        imp_lines.append(f"| import dfit - import torch | "
                         f"{common.median(imports['dfit']) - common.median(imports['torch']):+.3f} | "
                         f"{min(imports['dfit']) - min(imports['torch']):+.3f} | | |")
    tgt = targets(ratios, imports, baselines, cpu_ratios)
    versions = []
    for name in PEERS:
        if name in wanted:
            try:
                from importlib.metadata import version
                versions.append(f"{name} {version(name)}")
            except Exception:  # noqa: BLE001
                pass
    cmd = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = "\n".join([
        f"## {info['date']} — {cmd.strip()}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; Python {info['python']}, "
        f"torch {info['torch']}" + (", " + ", ".join(versions) if versions else "") +
        f"; dfit commit {info['commit']}; 1 thread per process, gloo.",
        f"Data: X ({n}, 64) float32; interleaved rounds (runner order shuffled each round): {args.rounds} "
        f"for SMALL, {args.wide_rounds} for WIDE; per round and runner {args.small_epochs} timed SMALL "
        f"epoch(s), {args.wide_epochs} timed WIDE epoch(s), after one untimed warm-up epoch per "
        f"configuration. Baseline for every ratio: the hand-written loop with the same process count "
        f"(2 processes: DDP), same round. µs/step and samples/s: medians over rounds. "
        f"'ratio of best epochs': fastest epoch / baseline's fastest; 'CPU-time ratio': the same ratio of "
        f"rank 0's process CPU time (both far less disturbed by other work on the machine than the wall "
        f"clock; the targets are judged on the wall-clock median). "
        f"Load average before / after the rounds: {load_before[0]:.2f} / {load_after[0]:.2f} "
        f"(other work on the machine inflates the spread)"
        f"{f'; workers ran at niceness {args.nice:+d}' if args.nice else ''}.",
        "",
        table,
        "",
        *imp_lines,
        "",
        "Targets (issue 6):",
        *tgt,
        *(["", "Notes:", *[f"- {x}" for x in notes]] if notes else []),
        "",
        f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s.",
        "",
    ])
    print()
    common.publish(report, args.results, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
