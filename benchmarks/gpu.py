#!/usr/bin/env python
"""GPU benchmark: dfit vs a hand-written (DDP) loop on a ResNet-style CNN and a small transformer,
fp32 and bf16 autocast, one process per visible GPU on NCCL.

    python benchmarks/gpu.py                      # every visible GPU; skips cleanly without CUDA
    python benchmarks/gpu.py --nproc 1 --rounds 5
    python benchmarks/gpu.py --cpu-smoke          # tiny sizes on the CPU (gloo): proves the code path

Workloads (synthetic data held in host memory, as a user's arrays would be):
  resnet       ResNet-style CNN (stem 64, 3 stages x 2 basic blocks: 64/128/256, BatchNorm) on
               3x32x32 images, 10 classes, 256 images per GPU per step
  transformer  2 x nn.TransformerEncoderLayer(d_model=256, 8 heads, ff 1024, batch_first) on sequences of
               128 tokens x 256 features, mean-pooled, 10 classes, 64 sequences per GPU per step
Both loops: SGD(lr 0.01, momentum 0.9), nn.CrossEntropyLoss(), no shuffling, no metrics, one warm-up
epoch, then timed epochs in alternating order (torch.cuda.synchronize() at epoch edges).
  hand   x[i:i+B] of a pinned host tensor -> .to(device, non_blocking=True); DDP(model, device_ids=[rank])
         when N > 1; torch.autocast(device, bfloat16) around forward + loss for bf16
  dfit   dfit.Model(module).compile(SGD, CrossEntropyLoss(), precision="32" | "bf16-mixed")
         .fit(x, y, batch_size=B*N, shuffle=False, verbose=0) with the host tensors as given
Target (issue 6): dfit samples/s >= 0.97 x the hand-written loop, fp32 and bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def build(name: str, smoke: bool):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            out = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(out)) + self.skip(x))

    torch.manual_seed(0)
    if name == "resnet":
        w = (8, 16, 32) if smoke else (64, 128, 256)
        layers = [nn.Conv2d(3, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU()]
        cin = w[0]
        for i, c in enumerate(w):
            layers += [Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1)]
            cin = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
        return nn.Sequential(*layers)
    d, ff, layers = (32, 64, 1) if smoke else (256, 1024, 2)

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(d, 8 if d >= 64 else 4, ff, dropout=0.0, batch_first=True),
                layers, enable_nested_tensor=False)
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            return self.head(self.enc(x).mean(dim=1))

    return Transformer()


def make_data(name: str, n: int, smoke: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    if name == "resnet":
        x = torch.randn(n, 3, 32, 32, generator=g)
    else:
        seq, d = (16, 32) if smoke else (128, 256)
        x = torch.randn(n, seq, d, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


def worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    os.environ.update(common.ddp_env(rank, world, port) if world > 1 else {})
    cuda = cfg["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(1)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        backend = "nccl" if cuda else "gloo"
        os.environ["DFIT_BACKEND"] = backend
        kw = {"device_id": dev} if cuda else {}
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kw)

    import dfit

    def sync():
        if cuda:
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    results: dict = {}
    smoke = cfg["smoke"]
    for name in cfg["models"]:
        per_gpu = cfg["batch"][name]
        batch = per_gpu * world
        x, y = make_data(name, cfg["samples"][name], smoke)
        px, py = (x.pin_memory(), y.pin_memory()) if cuda else (x, y)
        n = len(x)
        for precision in cfg["precisions"]:
            amp = torch.bfloat16 if precision == "bf16-mixed" else None

            # -- the hand-written loop
            hmod = build(name, smoke).to(dev)
            hnet = (nn.parallel.DistributedDataParallel(hmod, device_ids=[rank] if cuda else None)
                    if world > 1 else hmod)
            hopt = torch.optim.SGD(hmod.parameters(), lr=0.01, momentum=0.9)
            crit = nn.CrossEntropyLoss()

            def hand_epoch():
                hnet.train()
                for start in range(0, n, batch):
                    lo, hi = common.local_slice(start, min(start + batch, n), rank, world)
                    xb = px[lo:hi].to(dev, non_blocking=True)
                    yb = py[lo:hi].to(dev, non_blocking=True)
                    hopt.zero_grad(set_to_none=True)
                    with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                        loss = crit(hnet(xb), yb)
                    loss.backward()
                    hopt.step()

            def hand(epochs):
                times = []
                for _ in range(epochs):
                    sync()
                    t0 = time.perf_counter()
                    hand_epoch()
                    sync()
                    times.append(time.perf_counter() - t0)
                return times

            # -- dfit
            dmod = build(name, smoke)
            model = dfit.Model(dmod)
            model.compile(optimizer=torch.optim.SGD(dmod.parameters(), lr=0.01, momentum=0.9),
                          loss=nn.CrossEntropyLoss(), precision=precision)
            times_box: list = []

            class Timer(dfit.callbacks.Callback):
                def on_epoch_begin(self, epoch, logs=None):
                    sync()
                    self.t0 = time.perf_counter()

                def on_epoch_end(self, epoch, logs=None):
                    sync()
                    times_box.append(time.perf_counter() - self.t0)

            def dfit_run(epochs):
                times_box.clear()
                model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[Timer()])
                return list(times_box)

            hand(1)
            dfit_run(1)  # warm-up (cudnn autotuning, allocator, DDP buckets)
            rows = {"hand": [], "dfit": []}
            for r in range(cfg["rounds"]):
                order = (("hand", hand), ("dfit", dfit_run)) if r % 2 == 0 else (("dfit", dfit_run), ("hand", hand))
                for label, fn in order:
                    rows[label].append(min(fn(cfg["epochs"])))
            results[f"{name}/{precision}"] = {"n": n, "batch": batch, **rows}
            del hmod, hnet, hopt, dmod, model
            if cuda:
                torch.cuda.empty_cache()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=None, help="processes (default: every visible GPU)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per loop per round (best one counts)")
    ap.add_argument("--models", default="resnet,transformer")
    ap.add_argument("--precisions", default="32,bf16-mixed")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models and data on the CPU (gloo)")
    ap.add_argument("--results", default=str(common.HERE / "RESULTS.md"))
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)

    import torch
    import torch.multiprocessing as mp

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("gpu.py: no CUDA device here; nothing to measure (skipped). "
              "Run it on a GPU machine, or pass --cpu-smoke to exercise the code path on the CPU.")
        return 0
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    world = args.nproc or (1 if smoke else torch.cuda.device_count())
    if not smoke and world > torch.cuda.device_count():
        raise SystemExit(f"--nproc {world} but only {torch.cuda.device_count()} GPUs are visible")
    if smoke:
        args.rounds, args.epochs = min(args.rounds, 1), 1
    cfg = {
        "device": device, "smoke": smoke, "rounds": args.rounds, "epochs": args.epochs,
        "models": args.models.split(","), "precisions": args.precisions.split(","),
        "batch": {"resnet": 8 if smoke else 256, "transformer": 4 if smoke else 64},
        "samples": {"resnet": 64 * world if smoke else 256 * world * 40,
                    "transformer": 32 * world if smoke else 64 * world * 40},
    }
    out = os.path.join(tempfile.mkdtemp(prefix="dfit-gpu-"), "result.json")
    port = common.free_ports(1)[0]
    t0 = time.perf_counter()
    if world == 1:
        worker(0, 1, port, cfg, out)
    else:
        mp.start_processes(worker, args=(world, port, cfg, out), nprocs=world, start_method="spawn")
    with open(out) as fh:
        results = json.load(fh)

    info = common.machine_info()
    gpu = torch.cuda.get_device_name(0) if cuda and not smoke else "none (CPU smoke mode: figures mean nothing)"
    lines = ["| workload | precision | procs | global batch | hand samples/s | dfit samples/s | dfit / hand | "
             "target >= 0.97 |", "|" + "---|" * 8]
    for key, r in results.items():
        name, precision = key.split("/")
        hs = r["n"] / common.median(r["hand"])
        ds = r["n"] / common.median(r["dfit"])
        ok = "MET" if ds / hs >= 0.97 else "MISSED"
        lines.append(f"| {name} | {precision} | {world} | {r['batch']} | {hs:,.0f} | {ds:,.0f} | {ds / hs:.3f} | "
                     f"{ok if not smoke else 'n/a (smoke)'} |")
    report = "\n".join([
        f"## {info['date']} — GPU: python benchmarks/gpu.py {' '.join(argv or sys.argv[1:])}".rstrip(),
        "",
        f"Machine: GPU {gpu} x {world if not smoke else 0}; CPU {info['cpu']}, {info['cores']} cores; "
        f"torch {info['torch']}"
        f"{' (CUDA ' + str(torch.version.cuda) + ')' if cuda else ''}; dfit commit {info['commit']}; "
        f"{'NCCL' if not smoke and world > 1 else ('gloo' if world > 1 else 'one process')}; "
        f"{args.rounds} alternating rounds, best of {args.epochs} epoch(s) per round, median over rounds.",
        "",
        *lines,
        "",
        f"Wall time: {time.perf_counter() - t0:.0f} s.",
        "",
    ])
    common.publish(report, args.results, append=not args.no_append and not smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
