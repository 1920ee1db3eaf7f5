#!/usr/bin/env python
"""Streams benchmark (issue 12): per-step cost of a generator stream and of ``per_rank`` against arrays.

    python benchmarks/streams.py [--rounds 15] [--samples 32768] [--worlds 1,2] [--no-append]

The SMALL configuration of ``benchmarks/run.py`` (MLP 64-256-256-10, X (32768, 64) float32, global batch 64,
SGD lr 0.01, CrossEntropyLoss, shuffle=False), the same data fed four ways, trained in the same processes,
interleaved rounds of one epoch each (``benchmarks/interleaved.py``):
  arrays          model.fit(x, y, batch_size=64, shuffle=False)
  stream          model.fit(gen()) where gen() yields the global batches (x[s:s+64], y[s:s+64]) (default mode:
                  every rank reads every item and keeps its part; ranks agree on what comes next, sizes and a
                  fingerprint of each item, in one small all-gather every k steps, k doubling up to 128)
  stream, k=1     the same with an agreement before every step (dfit.data.streams.AGREE_EVERY = 1): what the
                  batching of agreements saves
  per_rank        model.fit(dfit.data.per_rank(fn)), fn(rank, world) yielding only this rank's rows of each
                  global batch (the same split as arrays)
Reported: median µs/step and the median over rounds of the per-round ratio to arrays.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import interleaved  # noqa: E402

LABELS = {"arrays": "arrays", "stream": "generator (default mode)",
          "stream_k1": "generator, agreement every step (k=1)", "per_rank": "dfit.data.per_rank(fn)"}


def worker(args) -> None:
    import torch
    from torch import nn

    import dfit
    import dfit.data.streams as streams

    _, batch = common.MODELS["SMALL"]
    x, y = common.make_data(args.samples)
    n = len(x)
    steps = common.steps_per_epoch(n, batch)
    default_agree = streams.AGREE_EVERY

    def make():
        model = dfit.Model(common.make_module("SMALL"))
        model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=common.LR),
                      loss=nn.CrossEntropyLoss())
        return model

    models = {name: make() for name in LABELS}

    def global_batches():
        for s in range(0, n, batch):
            yield x[s:s + batch], y[s:s + batch]

    def my_batches(rank: int, world: int):
        for s in range(0, n, batch):
            lo, hi = common.local_slice(s, min(s + batch, n), rank, world)
            yield x[lo:hi], y[lo:hi]

    def arrays() -> int:
        models["arrays"].fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        return steps

    def stream() -> int:
        streams.AGREE_EVERY = default_agree
        models["stream"].fit(global_batches(), epochs=1, verbose=0)
        return steps

    def stream_k1() -> int:
        streams.AGREE_EVERY = 1
        try:
            models["stream_k1"].fit(global_batches(), epochs=1, verbose=0)
        finally:
            streams.AGREE_EVERY = default_agree
        return steps

    def per_rank() -> int:
        models["per_rank"].fit(dfit.data.per_rank(my_batches), epochs=1, verbose=0)
        return steps

    interleaved.run_rounds({"arrays": arrays, "stream": stream, "stream_k1": stream_k1, "per_rank": per_rank},
                           args.rounds, args.rank)
    dfit.distributed.shutdown()


def main(argv=None) -> int:
    launched = interleaved.command_line(__file__, __doc__, worker, argv)
    if launched is None:
        return 0
    args, results, (load_before, load_after, elapsed) = launched
    head = interleaved.header(
        "Streams (issue 12)", f"SMALL (MLP 64-256-256-10, {args.samples} samples, global batch 64, one epoch per "
        "round), the same data as arrays, a generator of global batches and per_rank; interleaved rounds in the "
        "same processes", load_before, load_after, elapsed)
    summary = []
    for world, times in results.items():
        med = {name: interleaved.statistics.median(interleaved.ratios(times, name, "arrays")) for name in LABELS}
        cpu = {name: interleaved.statistics.median(interleaved.ratios(times, f"cpu:{name}", "cpu:arrays"))
               for name in LABELS}
        summary.append(f"- {world} process(es): generator / arrays = {med['stream']:.3f}, per_rank / arrays = "
                       f"{med['per_rank']:.3f}, agreement every step / arrays = {med['stream_k1']:.3f} (wall clock); "
                       f"CPU time: {cpu['stream']:.3f}, {cpu['per_rank']:.3f}, {cpu['stream_k1']:.3f}")
    text = "\n".join([head, "", *interleaved.table(results, LABELS, "arrays"), "", *summary, ""])
    common.publish(text, args.results, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
