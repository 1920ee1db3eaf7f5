#!/usr/bin/env python
"""Data-path benchmark: batches/s out of in-memory tensors, no model.

    python benchmarks/datapath.py [--rounds 7] [--samples 32768] [--batch 64,256] [--no-append]

Ways of getting a batch, single process, one thread, interleaved rounds, median batches/s:
  slice                X[i:i+B]                                     (a view: no copy)
  perm-index           X[perm[i:i+B]]                               (a gather: one copy of the batch)
  perm index_select    X.index_select(0, perm[i:i+B])               (the same gather, less dispatch)
  dfit adapter         dfit.data.adapt(x, y).epoch(...)             (what fit() iterates; shuffle off/on)
  DataLoader           DataLoader(TensorDataset(X, y), batch_size=B[, shuffle=True])
                       (per-sample __getitem__ + default_collate: what most hand-written loops use)
  DataLoader+BatchSampler  DataLoader(TensorDataset, sampler=BatchSampler(...), batch_size=None)
                       (the known whole-batch trick: TensorDataset indexed with a list of indices)
The dfit row uses dfit's internal adapter (not public API); it is skipped with a note if that moves.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def ways(x, y, batch):
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

    n = len(x)
    ds = TensorDataset(x, y)

    def slicing():
        for i in range(0, n, batch):
            yield x[i:i + batch], y[i:i + batch]

    def perm_index():
        perm = torch.randperm(n)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            yield x[idx], y[idx]

    def perm_index_select():
        perm = torch.randperm(n)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            yield x.index_select(0, idx), y.index_select(0, idx)

    out = {"slice": slicing, "perm-index": perm_index, "perm index_select": perm_index_select}
    try:
        import dfit.data as dd

        adapter = dd.adapt(x, y, float_dtype=torch.float32)
        out["dfit adapter, shuffle=False"] = lambda: adapter.epoch(0, batch, None, False, 0, 0, 1)
        out["dfit adapter, shuffle=True"] = lambda: adapter.epoch(0, batch, None, True, 0, 0, 1)
    except Exception as exc:  # noqa: BLE001 - an internal API: report, do not fail
        print(f"note: dfit adapter skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
    out["DataLoader(TensorDataset)"] = lambda: iter(DataLoader(ds, batch_size=batch))
    out["DataLoader(TensorDataset), shuffle=True"] = lambda: iter(DataLoader(ds, batch_size=batch, shuffle=True))
    out["DataLoader + BatchSampler"] = lambda: iter(
        DataLoader(ds, sampler=BatchSampler(SequentialSampler(ds), batch, False), batch_size=None))
    out["DataLoader + BatchSampler, shuffled"] = lambda: iter(
        DataLoader(ds, sampler=BatchSampler(RandomSampler(ds), batch, False), batch_size=None))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--samples", type=int, default=common.N_SAMPLES)
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--results", default=str(common.HERE / "RESULTS.md"))
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    x, y = common.make_data(args.samples)
    lines = ["| batch | way | batches/s | µs/batch | vs slice |", "|---|---|---|---|---|"]
    for batch in (int(b) for b in args.batch.split(",")):
        fns = ways(x, y, batch)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for name, fn in fns.items():  # warm-up
            for _ in fn():
                pass
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                count = 0
                for _b in fn():
                    count += 1
                times[name].append((time.perf_counter() - t0) / count)
        base = common.median(times["slice"])
        for name, ts in times.items():
            t = common.median(ts)
            lines.append(f"| {batch} | {name} | {1 / t:,.0f} | {1e6 * t:,.1f} | {t / base:.1f}x |")
    report = common.report("data path", f"python benchmarks/datapath.py {' '.join(argv or sys.argv[1:])}",
                           f"1 thread; X ({args.samples}, 64) float32; median over {args.rounds} interleaved "
                           "rounds; iteration only (no model).", lines)
    common.publish(report, args.results, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
