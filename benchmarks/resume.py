#!/usr/bin/env python
"""Resume benchmark (issue 14): what BackupAndRestore, its preemption handling and micro_batch_size cost.

    python benchmarks/resume.py [--rounds 9] [--samples 32768] [--worlds 1] [--micro 0,64,16] [--no-append]

The WIDE configuration of ``benchmarks/run.py`` (MLP 64-2048-2048-10, X (32768, 64) float32, global batch 256,
SGD lr 0.01, CrossEntropyLoss, shuffle=False, no metrics; 128 steps per epoch). Four variants trained in the same
processes, interleaved rounds of one epoch each (``benchmarks/interleaved.py``):
  none        model.fit(x, y, batch_size=256, epochs=1, shuffle=False, verbose=0)
  backup100   the same with BackupAndRestore(dir, save_freq=100) (default handle_signals=True): one step-exact
              backup of the whole training state per epoch (written in the background by rank 0), removed at the end
  unarmed     BackupAndRestore(dir, save_freq="epoch", handle_signals=False)
  armed       BackupAndRestore(dir, save_freq="epoch", handle_signals=True): SIGTERM/SIGUSR1 handlers installed and the
              ranks' agreement on a signal every 16 steps; no signal is ever sent
Targets: backup100 / none <= 1.05; armed / unarmed: no measurable per-step cost.

Then micro_batch_size: for each M (0 = the whole batch at once) a fresh process trains one epoch of WIDE
(--micro-samples rows) with fit(micro_batch_size=M) after an untimed warm-up step and reports the time per step and
its peak resident memory (``resource.getrusage`` maxrss) above what it held before its first fit (the data, the model,
torch itself), under a fixed glibc mmap threshold (64 KiB) so that RSS follows the live tensors. At WIDE's global
batch 256 the activations (~2 MiB per layer output) are small next to the weights and gradients (17 MiB each), and
accumulating chunk gradients needs one more gradient-sized buffer in flight; at global batch 4096 the activations
dominate, which is where the knob is meant to help.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import interleaved  # noqa: E402

LABELS = {"none": "fit, no callbacks", "backup100": "BackupAndRestore(save_freq=100)",
          "unarmed": "BackupAndRestore(epoch, handle_signals=False)",
          "armed": "BackupAndRestore(epoch, handle_signals=True)"}
TARGET = 1.05
MICRO_PREFIX = "@@MICRO "


def _compiled(dfit, torch, nn):
    model = dfit.Model(common.make_module("WIDE"))
    model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=common.LR), loss=nn.CrossEntropyLoss())
    return model


def worker(args) -> None:
    import torch
    from torch import nn

    import dfit

    _, batch = common.MODELS["WIDE"]
    x, y = common.make_data(args.samples)
    root = Path(tempfile.gettempdir()) / f"dfit-bench-resume-{os.getppid()}"   # the same on every rank
    steps = common.steps_per_epoch(args.samples, batch)
    models = {name: _compiled(dfit, torch, nn) for name in LABELS}
    wrote: list[bool] = []

    def variant(name: str, make_callbacks):
        def fit_once() -> int:
            cbs = make_callbacks()
            models[name].fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=cbs)
            return steps
        return fit_once

    def backup100():
        cb = dfit.callbacks.BackupAndRestore(str(root / "b100"), save_freq=100)
        wrote.append(True)
        return [cb]

    variants = {
        "none": variant("none", lambda: []),
        "backup100": variant("backup100", backup100),
        "unarmed": variant("unarmed", lambda: [dfit.callbacks.BackupAndRestore(str(root / "un"),
                                                                               handle_signals=False)]),
        "armed": variant("armed", lambda: [dfit.callbacks.BackupAndRestore(str(root / "ar"), handle_signals=True)]),
    }
    interleaved.run_rounds(variants, args.rounds, args.rank)
    dfit.distributed.shutdown()
    if args.rank == 0:
        assert wrote, "BackupAndRestore never ran"
        shutil.rmtree(root, ignore_errors=True)


def micro_worker(samples: int, micro: int, batch: int) -> None:
    """One fresh process: one epoch of WIDE at global batch ``batch`` with fit(micro_batch_size=micro or None);
    prints the time per step and the peak memory."""
    import torch
    from torch import nn

    import dfit

    torch.set_num_threads(1)
    x, y = common.make_data(samples)
    model = _compiled(dfit, torch, nn)
    size = micro or None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.fit(x[:batch], y[:batch], batch_size=batch, epochs=1, shuffle=False, verbose=0, micro_batch_size=size)
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, micro_batch_size=size)
    per_step = (time.perf_counter() - t0) / common.steps_per_epoch(samples, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(MICRO_PREFIX + json.dumps({"micro": micro, "batch": batch, "step_s": per_step, "peak": peak, "before": before}),
          flush=True)


def run_micro(samples: int, sizes: list[int], repeats: int, batch: int) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {m: [] for m in sizes}
    env = common.clean_env()
    # a fixed mmap threshold: every tensor of 64 KiB or more is its own mapping, returned to the system when freed,
    # so the peak RSS follows the live tensors (glibc's default, dynamic threshold keeps freed chunks in the heap)
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    for _ in range(repeats):
        for m in sizes:
            r = subprocess.run([sys.executable, __file__, "--micro-worker", str(m), "--samples", str(samples),
                                "--micro-batch", str(batch)], env=env, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                raise RuntimeError(f"micro_batch_size={m} exited with {r.returncode}:\n{r.stderr[-3000:]}")
            line = [ln for ln in r.stdout.splitlines() if ln.startswith(MICRO_PREFIX)][-1]
            out[m].append(json.loads(line[len(MICRO_PREFIX):]))
    return out


def micro_table(micro: dict[int, list[dict]]) -> list[str]:
    median = interleaved.statistics.median
    lines = ["| global batch | micro_batch_size | runs | median ms/step | / first row | peak RSS MiB | peak above pre-fit MiB |",
             "|---|---|---|---|---|---|---|"]
    base = median(r["step_s"] for r in next(iter(micro.values())))
    for m, runs in micro.items():
        step = median(r["step_s"] for r in runs)
        peak = median(r["peak"] for r in runs) / 2**20
        extra = median(r["peak"] - r["before"] for r in runs) / 2**20
        label = "whole batch (None)" if m == 0 else str(m)
        lines.append(f"| {runs[0]['batch']} | {label} | {len(runs)} | {step * 1e3:.2f} | {step / base:.3f} | {peak:,.1f} | {extra:,.1f} |")
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--micro-worker", type=int, default=None)
    p.add_argument("--micro", default="0,64,16", help="micro_batch_size values, 0 = the whole batch")
    p.add_argument("--micro-repeats", type=int, default=2)
    p.add_argument("--micro-batches", default="256,4096", help="global batches for the micro_batch_size part")
    p.add_argument("--micro-samples", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=common.N_SAMPLES)
    own, rest = p.parse_known_args(argv)
    if own.micro_worker is not None:
        micro_worker(own.samples, own.micro_worker, own.micro_batch)
        return 0
    if "--worker" not in rest and not any(a.startswith("--worlds") for a in rest):
        rest += ["--worlds", "1"]
    rest += ["--samples", str(own.samples)]
    if "--rounds" not in rest and "--worker" not in rest:
        rest += ["--rounds", "9"]
    launched = interleaved.command_line(__file__, __doc__, worker, rest)
    if launched is None:
        return 0
    args, results, (load_before, load_after, elapsed) = launched
    t0 = time.perf_counter()
    micros = {b: run_micro(own.micro_samples, [int(m) for m in own.micro.split(",")], own.micro_repeats, b)
              for b in (int(b) for b in own.micro_batches.split(","))}
    load_after = os.getloadavg()
    head = interleaved.header(
        "Resume (issue 14)", f"WIDE (MLP 64-2048-2048-10, {args.samples} samples, global batch 256, one epoch per "
        "round), interleaved rounds in the same processes; micro_batch_size in a fresh process per run",
        load_before, load_after, elapsed + time.perf_counter() - t0)
    median = interleaved.statistics.median
    verdicts = []
    for world, times in results.items():
        backup = median(interleaved.ratios(times, "backup100", "none"))
        armed = median(interleaved.ratios(times, "armed", "unarmed"))
        rs = interleaved.ratios(times, "armed", "unarmed")
        verdicts.append(
            f"- {world} process(es): BackupAndRestore(save_freq=100) / none = {backup:.3f} (target <= {TARGET}) -> "
            f"{'MET' if backup <= TARGET else 'NOT MET'} (CPU time "
            f"{median(interleaved.ratios(times, 'cpu:backup100', 'cpu:none')):.3f}); handle_signals armed / not = "
            f"{armed:.3f} (range {min(rs):.3f}..{max(rs):.3f}, CPU time "
            f"{median(interleaved.ratios(times, 'cpu:armed', 'cpu:unarmed')):.3f})")
    for batch, micro in micros.items():
        steps = {m: median(r["step_s"] for r in runs) for m, runs in micro.items()}
        extras = {m: median(r["peak"] - r["before"] for r in runs) / 2**20 for m, runs in micro.items()}
        verdicts.append(f"- micro_batch_size at global batch {batch}: peak memory above the pre-fit level "
                        + ", ".join(f"{'None' if m == 0 else m}: {extras[m]:.1f} MiB" for m in micro)
                        + "; time per step " + ", ".join(f"{'None' if m == 0 else m}: {steps[m] * 1e3:.2f} ms"
                                                        for m in micro))
    micro_rows = micro_table(next(iter(micros.values())))
    for micro in list(micros.values())[1:]:
        micro_rows += micro_table(micro)[2:]
    text = "\n".join([head, "", *interleaved.table(results, LABELS, "none"), "", *micro_rows, "", *verdicts, ""])
    common.publish(text, args.results, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
