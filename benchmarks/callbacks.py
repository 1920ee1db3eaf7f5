#!/usr/bin/env python
"""Callbacks benchmark (issue 13): ModelCheckpoint + EarlyStopping + CSVLogger against no callbacks.

    python benchmarks/callbacks.py [--rounds 15] [--samples 32768] [--worlds 1,2] [--no-append]

The SMALL configuration of ``benchmarks/run.py`` (MLP 64-256-256-10, X (32768, 64) float32, global batch 64,
SGD lr 0.01, CrossEntropyLoss, shuffle=False, no metrics). Two variants trained in the same processes,
interleaved rounds of one epoch each (``benchmarks/interleaved.py``):
  none        model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
  callbacks   the same with ModelCheckpoint("w.{epoch:02d}.pt", monitor="loss") (saves every epoch),
              EarlyStopping(monitor="loss", patience=5) and CSVLogger("log.csv")
The time per step includes the epoch-end work (the checkpoint written by rank 0, the CSV row), spread over the
epoch's 512 steps. Target (issue 13): callbacks / none <= 1.02 (no per-step collective or host sync).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import interleaved  # noqa: E402

LABELS = {"none": "fit, no callbacks", "callbacks": "fit + ModelCheckpoint + EarlyStopping + CSVLogger"}
TARGET = 1.02


def worker(args) -> None:
    import torch
    from torch import nn

    import dfit

    hidden, batch = common.MODELS["SMALL"]
    x, y = common.make_data(args.samples)
    out = Path(tempfile.mkdtemp(prefix=f"dfit-bench-cb{args.rank}-"))

    def make():
        model = dfit.Model(common.make_module("SMALL"))
        model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=common.LR),
                      loss=nn.CrossEntropyLoss())
        return model

    plain, watched = make(), make()
    steps = common.steps_per_epoch(args.samples, batch)

    def none() -> int:
        plain.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        return steps

    last: list = []

    def with_callbacks() -> int:
        last[:] = cbs = [dfit.callbacks.ModelCheckpoint(str(out / "w.{epoch:02d}.pt"), monitor="loss"),
               dfit.callbacks.EarlyStopping(monitor="loss", patience=5),
               dfit.callbacks.CSVLogger(str(out / "log.csv"))]
        watched.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=cbs)
        return steps

    def epoch_end_work() -> dict[str, list[float]]:
        """The three callbacks' own epoch-end work (the checkpoint write, the CSV row), timed alone."""
        logs = {"loss": 1.0}
        spent = []
        for epoch in range(10):
            t0 = time.perf_counter()
            for cb in last:
                cb.on_epoch_end(epoch, dict(logs))
            spent.append(time.perf_counter() - t0)
        return {"epoch_end_s": spent}

    interleaved.run_rounds({"none": none, "callbacks": with_callbacks}, args.rounds, args.rank, epoch_end_work)
    if args.rank == 0:
        assert (out / "w.01.pt").exists() and (out / "log.csv").exists(), "the callbacks wrote nothing"
    dfit.distributed.shutdown()


def main(argv=None) -> int:
    launched = interleaved.command_line(__file__, __doc__, worker, argv)
    if launched is None:
        return 0
    args, results, (load_before, load_after, elapsed) = launched
    head = interleaved.header(
        "Callbacks (issue 13)", f"SMALL (MLP 64-256-256-10, {args.samples} samples, global batch 64, one epoch "
        "per round), interleaved rounds in the same processes", load_before, load_after, elapsed)
    verdicts = []
    for world, times in results.items():
        ratio = interleaved.statistics.median(interleaved.ratios(times, "callbacks", "none"))
        cpu_ratio = interleaved.statistics.median(interleaved.ratios(times, "cpu:callbacks", "cpu:none"))
        end_ms = interleaved.statistics.median(times["epoch_end_s"]) * 1e3
        step_us = interleaved.statistics.median(times["none"]) * 1e6
        steps = -(-args.samples // 64)
        verdicts.append(f"- {world} process(es): callbacks / none = {ratio:.3f} (target <= {TARGET}) -> "
                        f"{'MET' if ratio <= TARGET else 'NOT MET'}; CPU time {cpu_ratio:.3f}; fastest rounds' ratio "
                        f"{interleaved.fastest_ratio(times, 'callbacks', 'none'):.3f}; the callbacks' epoch-end "
                        f"work alone (rank 0: checkpoint write with fsync, CSV row) {end_ms:.1f} ms per epoch = "
                        f"{end_ms * 1e3 / (steps * step_us) * 100:.2f} % of an epoch of {steps} steps")
    text = "\n".join([head, "", *interleaved.table(results, LABELS, "none"), "", *verdicts, ""])
    common.publish(text, args.results, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
