"""An independent data-parallel reference for the launcher tests: plain torch.distributed + DDP, no dfit.

It writes out, by hand, the rules README "What the same result means" documents, and trains the same small
float64 regression that ``tests/launch_train.py`` trains with dfit:

- ``batch_size`` is the GLOBAL batch. Each epoch shuffles by ``shuffled_row(i, n_train, seed, epoch)`` below (the
  keyed Feistel bijection README documents, written out here one Python int at a time), the same on every rank;
  consecutive slices of ``batch_size`` positions of it are the global batches, the last one partial and kept.
- Each global batch of ``size`` rows is split into ``world`` contiguous parts whose sizes differ by at most one,
  the first ``size % world`` ranks taking one row more (a rank may get none and still steps).
- The loss of a step is ``sum(sample_weight * per-sample mse) / size``. DDP AVERAGES gradients over ranks, so
  each rank back-propagates its own part's ``sum(w * l) * world / size``.
- Plain SGD without momentum (``w -= lr * g``), so the gradients' scale shows in the weights.
- Epoch logs as Keras writes them: the batch-size-weighted mean of the step losses (computed before each
  update), i.e. ``sum over the epoch of sum(w * l) / n_train``, and the unweighted ``mae``; summed over ranks
  exactly once per epoch. ``validation_split`` holds out the LAST rows before shuffling; ``val_*`` are the
  same sums over them after the epoch, divided by their number.

Run it as one process (``python tests/reference_ddp.py --out r.json``) or under torchrun
(``torchrun --nproc-per-node N tests/reference_ddp.py --out r.json``); rank 0 writes JSON:
``{"history", "weights" (each parameter, flattened, in module order), "evaluate" ([loss, mae] on all rows,
unweighted), "predict" (all rows), "world_size"}``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# The run both sides train. n_train = int(54 * 0.8) = 43 = 6 * 7 + 1: the last global batch has ONE row, fewer
# than the ranks; 7 rows split unevenly over 2 (4 + 3) and 3 (3 + 2 + 2) ranks; 11 validation rows.
CONFIG = dict(n=54, features=8, batch_size=7, epochs=3, validation_split=0.2, seed=5, learning_rate=0.1)


def make_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n, 8), y (n, 1), sample weights (n,), all float64."""
    rng = np.random.default_rng(0)
    n, f = CONFIG["n"], CONFIG["features"]
    x = rng.normal(size=(n, f))
    y = x @ rng.normal(size=(f, 1)) + 0.1 * rng.normal(size=(n, 1))
    w = rng.uniform(0.5, 1.5, size=n)
    return x, y, w


def make_net() -> nn.Module:
    """The model, float64, its initial weights fixed by torch.manual_seed(0)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(CONFIG["features"], 16), nn.Tanh(), nn.Linear(16, 1)).double()


def my_part(size: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous part of ``size`` rows: sizes differ by at most one, the first
    ``size % world`` ranks take one row more."""
    small = size // world
    extra = size - small * world
    start = rank * small + min(rank, extra)
    return start, start + small + (1 if rank < extra else 0)


def _splitmix64_keys(seed: int, epoch: int, rounds: int = 8) -> list[int]:
    """The round keys: successive splitmix64 outputs from the state ``(seed mod 2**32) * 2**32 + epoch``."""
    mask = 2 ** 64 - 1
    state, keys = (seed % 2 ** 32) * 2 ** 32 + epoch, []
    for _ in range(rounds):
        state = (state + 0x9E3779B97F4A7C15) % 2 ** 64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        keys.append(z ^ (z >> 31))
    return keys


def shuffled_row(i: int, n: int, seed: int, epoch: int) -> int:
    """The row at position ``i`` of the shuffle of ``epoch`` over ``n`` rows.

    ``v`` in [0, 2**bits), 2**bits the smallest power of two >= n, is written as a high part of ``h`` bits and
    a low part of ``l`` bits (h = bits // 2 to start with). Each of the 8 rounds, with key ``k``, maps
    (high, low) to (low, high XOR top-h-bits-of(((low XOR k) * M1 mod 2**64, XOR its top 32 bits) * M2 mod 2**64)),
    then h and l swap; when h = 0 the round flips the one bit by the key's top bit. A result >= n is enciphered
    again until it is < n (cycle walking)."""
    bits = (n - 1).bit_length()
    if bits == 0:
        return i
    mask, keys = 2 ** 64 - 1, _splitmix64_keys(seed, epoch)
    v = i
    while True:
        h, l = bits // 2, bits - bits // 2
        for k in keys:
            high, low = v >> l, v % 2 ** l
            if h == 0:
                v = low ^ (k >> 63)
            else:
                z = ((low ^ k) * 0xBF58476D1CE4E5B9) & mask
                z = ((z ^ (z >> 32)) * 0x94D049BB133111EB) & mask
                v = low * 2 ** h + (high ^ (z >> (64 - h)))
            h, l = l, h
        if v < n:
            return v


def shuffled_order(n: int, seed: int, epoch: int) -> list[int]:
    return [shuffled_row(i, n, seed, epoch) for i in range(n)]


def global_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[first, first + size) of each global batch of a pass over n rows; the last partial one kept."""
    return [(first, min(first + batch_size, n)) for first in range(0, n, batch_size)]


def _sums(net: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(sum of weighted per-sample mse, sum of per-sample mae, output) over these rows."""
    out = net(x)
    err = out - y
    per_sample_mse = (err * err).mean(dim=1)
    weighted = per_sample_mse if w is None else per_sample_mse * w
    return weighted.sum(), err.abs().mean(dim=1).sum(), out


def _all_sum(values: list[float], world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def _evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, rank: int, world: int,
              batch_size: int) -> list[float]:
    """[weighted loss / n, mae / n] over all rows of all ranks (each rank takes its part of every batch)."""
    loss_sum = mae_sum = 0.0
    with torch.no_grad():
        for first, stop in global_batches(len(x), batch_size):
            a, b = my_part(stop - first, world, rank)
            rows = slice(first + a, first + b)
            loss, mae, _ = _sums(net, x[rows], y[rows], None if w is None else w[rows])
            loss_sum += loss.item()
            mae_sum += mae.item()
    loss_sum, mae_sum = _all_sum([loss_sum, mae_sum], world)
    return [loss_sum / len(x), mae_sum / len(x)]


def train(rank: int, world: int) -> dict:
    c = CONFIG
    x_all, y_all, w_all = (torch.from_numpy(a) for a in make_data())
    n_train = int(c["n"] * (1.0 - c["validation_split"]))
    xt, yt, wt = x_all[:n_train], y_all[:n_train], w_all[:n_train]
    xv, yv, wv = x_all[n_train:], y_all[n_train:], w_all[n_train:]
    net = make_net()
    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.SGD(net.parameters(), lr=c["learning_rate"], momentum=0.0)
    history: dict[str, list[float]] = {"loss": [], "mae": [], "val_loss": [], "val_mae": []}
    for epoch in range(c["epochs"]):
        order = torch.tensor(shuffled_order(n_train, c["seed"], epoch), dtype=torch.int64)
        loss_sum = mae_sum = 0.0
        for first, stop in global_batches(n_train, c["batch_size"]):
            size = stop - first
            a, b = my_part(size, world, rank)
            idx = order[first + a:first + b]
            loss, mae, _ = _sums(model, xt[idx], yt[idx], wt[idx])
            opt.zero_grad()
            (loss * (world / size)).backward()  # DDP averages over ranks: the mean of these is sum(w*l)/size
            opt.step()
            loss_sum += loss.item()
            mae_sum += mae.item()
        loss_sum, mae_sum = _all_sum([loss_sum, mae_sum], world)
        val_loss, val_mae = _evaluate(net, xv, yv, wv, rank, world, c["batch_size"])
        history["loss"].append(loss_sum / n_train)
        history["mae"].append(mae_sum / n_train)
        history["val_loss"].append(val_loss)
        history["val_mae"].append(val_mae)
    with torch.no_grad():
        predict = net(x_all)[:, 0].tolist()
    return {"history": history, "world_size": world,
            "weights": [p.detach().reshape(-1).tolist() for p in net.parameters()],
            "evaluate": _evaluate(net, x_all, y_all, None, rank, world, c["batch_size"]),
            "predict": predict}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    result = train(rank, world)
    if rank == 0:
        with open(args.out, "w") as fh:
            json.dump(result, fh)
    if world > 1:
        # free the DDP wrapper (its reducer uses the group) before leaving: a gloo group left to the interpreter's
        # teardown, or destroyed under a live reducer, aborts the process now and then
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
