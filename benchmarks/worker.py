"""One benchmark worker process: holds ONE runner (a training loop), runs timed epochs on command.

Started by run.py, one process per runner and rank, and kept alive for the whole invocation so
that rounds can be interleaved between runners without paying the import and warm-up again.

Protocol: JSON commands on stdin, one per line; JSON replies on the original stdout, one per line,
prefixed with ``@@BENCH``. Everything the libraries print goes to stderr (fd 1 is redirected there).

Every runner times an epoch the same way: (barrier) t0 ... all steps of the epoch ... (barrier) t1.
With 2 processes the barriers make rank 0's clock cover the slower rank too; with 1 there are none.
Both the wall clock and rank 0's CPU time (time.process_time: all its threads) are recorded; on a
machine shared with other work the CPU time of a single process is far less disturbed than the wall.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402

PREFIX = "@@BENCH "


def _barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()


class Runner:
    """A training loop under test. `run` trains `epochs` epochs and returns per-epoch seconds."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.state: dict[tuple, object] = {}

    def xy(self, n: int):
        if n not in self.data:
            self.data[n] = common.make_data(n)
        return self.data[n]

    def run(self, model: str, shuffle: bool, epochs: int, n: int) -> dict:
        raise NotImplementedError


class _EpochTimer:
    """Shared by the callback-based runners: barrier + clock at epoch begin and end."""

    def __init__(self, world: int):
        self.world = world
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    def begin(self):
        _barrier(self.world)
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def end(self):
        _barrier(self.world)
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)

    def result(self, **extra) -> dict:
        return {"epoch_times": self.times, "cpu_times": self.cpu, **extra}


# --------------------------------------------------------------------------------------------------
# Hand-written loops: the baselines
# --------------------------------------------------------------------------------------------------
class HandRunner(Runner):
    """The plain loop: whole-batch tensor slicing (or per-epoch permutation indexing when shuffled),
    forward, nn.CrossEntropyLoss, backward (DDP all-reduce on 2 processes), SGD step. No metrics, no
    loss logging, no host synchronisation. On N processes each global batch is cut into N contiguous
    parts, exactly as dfit cuts it."""

    def __init__(self, rank, world):
        super().__init__(rank, world)
        if world > 1:
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)

    def _setup(self, model):
        key = model
        if key not in self.state:
            module = common.make_module(model)
            net = nn.parallel.DistributedDataParallel(module) if self.world > 1 else module
            opt = torch.optim.SGD(module.parameters(), lr=common.LR)
            self.state[key] = (net, opt, nn.CrossEntropyLoss(), [0])
        return self.state[key]

    def epoch(self, model, shuffle, n):
        net, opt, crit, counter = self._setup(model)
        x, y = self.xy(n)
        batch = common.MODELS[model][1]
        rank, world = self.rank, self.world
        perm = None
        if shuffle:  # one permutation per epoch, the same on every rank
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + counter[0]))
        counter[0] += 1
        for start in range(0, n, batch):
            lo, hi = common.local_slice(start, min(start + batch, n), rank, world)
            if perm is None:
                xb, yb = x[lo:hi], y[lo:hi]
            else:
                idx = perm[lo:hi]
                xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            loss = crit(net(xb), yb)
            loss.backward()
            opt.step()

    def run(self, model, shuffle, epochs, n):
        timer = _EpochTimer(self.world)
        for _ in range(epochs):
            timer.begin()
            self.epoch(model, shuffle, n)
            timer.end()
        return timer.result()


class HandDataLoaderRunner(HandRunner):
    """The same loop, batches from DataLoader(TensorDataset) (+ DistributedSampler on 2 processes):
    the idiomatic PyTorch way, with per-sample __getitem__ and collate."""

    def epoch(self, model, shuffle, n):
        from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

        net, opt, crit, counter = self._setup(model)
        key = ("dl", model, shuffle, n)
        if key not in self.state:
            ds = TensorDataset(*self.xy(n))
            batch = common.MODELS[model][1] // self.world
            if self.world > 1:
                sampler = DistributedSampler(ds, self.world, self.rank, shuffle=shuffle, seed=0)
                self.state[key] = (DataLoader(ds, batch_size=batch, sampler=sampler), sampler)
            else:
                self.state[key] = (DataLoader(ds, batch_size=batch, shuffle=shuffle), None)
        loader, sampler = self.state[key]
        if sampler is not None:
            sampler.set_epoch(counter[0])
        counter[0] += 1
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = crit(net(xb), yb)
            loss.backward()
            opt.step()


# --------------------------------------------------------------------------------------------------
# dfit
# --------------------------------------------------------------------------------------------------
class DfitRunner(Runner):
    """dfit.Model(module).compile(SGD, nn.CrossEntropyLoss()).fit(X, y, batch_size, shuffle, verbose=0).

    Each rank passes the full X, y; dfit detects the torchrun-style variables and shards each
    global batch. Epochs are timed by a dfit Callback (on_epoch_begin / on_epoch_end)."""

    def __init__(self, rank, world):
        super().__init__(rank, world)
        import dfit  # noqa: F401  (fail at start-up, not in the first round)

        self.dfit = dfit

    def _setup(self, model):
        if model not in self.state:
            module = common.make_module(model)
            m = self.dfit.Model(module)
            m.compile(optimizer=torch.optim.SGD(module.parameters(), lr=common.LR), loss=nn.CrossEntropyLoss())
            self.state[model] = m
        return self.state[model]

    def run(self, model, shuffle, epochs, n):
        m = self._setup(model)
        x, y = self.xy(n)
        timer = _EpochTimer(self.world)
        base = self.dfit.callbacks.Callback

        class Timer(base):
            def on_epoch_begin(self, epoch, logs=None):
                timer.begin()

            def on_epoch_end(self, epoch, logs=None):
                timer.end()

        t0 = time.perf_counter()
        m.fit(x, y, batch_size=common.MODELS[model][1], epochs=epochs, shuffle=shuffle, verbose=0,
              callbacks=[Timer()], seed=0)
        return timer.result(call_time=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# Peers (optional)
# --------------------------------------------------------------------------------------------------
class LightningRunner(Runner):
    """Lightning 2.x: LightningModule (training_step returns the loss, no self.log), a DataLoader over
    TensorDataset (Lightning adds the DistributedSampler), Trainer(accelerator="cpu", devices=N,
    strategy="ddp" on 2) with logger, checkpointing, progress bar and model summary off."""

    def __init__(self, rank, world):
        super().__init__(rank, world)
        import lightning as L

        self.L = L

    def _setup(self, model):
        if model not in self.state:
            L = self.L

            class LM(L.LightningModule):
                def __init__(self, module):
                    super().__init__()
                    self.module = module
                    self.crit = nn.CrossEntropyLoss()

                def training_step(self, batch, batch_idx):
                    xb, yb = batch
                    return self.crit(self.module(xb), yb)

                def configure_optimizers(self):
                    return torch.optim.SGD(self.module.parameters(), lr=common.LR)

            self.state[model] = LM(common.make_module(model))
        return self.state[model]

    def run(self, model, shuffle, epochs, n):
        from torch.utils.data import DataLoader, TensorDataset

        L = self.L
        lm = self._setup(model)
        loader = DataLoader(TensorDataset(*self.xy(n)), batch_size=common.MODELS[model][1] // self.world,
                            shuffle=shuffle)
        timer = _EpochTimer(self.world)

        class Timer(L.Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                timer.begin()

            def on_train_epoch_end(self, trainer, pl_module):
                timer.end()

        trainer = L.Trainer(accelerator="cpu", devices=self.world,
                            strategy="ddp" if self.world > 1 else "auto", max_epochs=epochs,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Timer()])
        t0 = time.perf_counter()
        trainer.fit(lm, loader)
        return timer.result(call_time=time.perf_counter() - t0)


class AccelerateRunner(Runner):
    """HF Accelerate: Accelerator(cpu=True, split_batches=True) so the DataLoader's batch is the global
    batch; prepare(model, optimizer, DataLoader(TensorDataset)); accelerator.backward(loss)."""

    def __init__(self, rank, world):
        super().__init__(rank, world)
        from accelerate import Accelerator

        self.acc = Accelerator(cpu=True, split_batches=True)

    def _setup(self, model, shuffle, n):
        from torch.utils.data import DataLoader, TensorDataset

        key = (model, shuffle, n)
        if key not in self.state:
            module = common.make_module(model)
            opt = torch.optim.SGD(module.parameters(), lr=common.LR)
            loader = DataLoader(TensorDataset(*self.xy(n)), batch_size=common.MODELS[model][1], shuffle=shuffle)
            self.state[key] = (*self.acc.prepare(module, opt, loader), nn.CrossEntropyLoss())
        return self.state[key]

    def run(self, model, shuffle, epochs, n):
        net, opt, loader, crit = self._setup(model, shuffle, n)
        timer = _EpochTimer(self.world)
        for _ in range(epochs):
            timer.begin()
            for xb, yb in loader:
                opt.zero_grad(set_to_none=True)
                loss = crit(net(xb), yb)
                self.acc.backward(loss)
                opt.step()
            timer.end()
        return timer.result()


class KerasRunner(Runner):
    """Keras 3 with the torch backend: Sequential of Dense layers, SGD(0.01),
    SparseCategoricalCrossentropy(from_logits=True), no metrics, fit(..., verbose=0). 1 process only."""

    def __init__(self, rank, world):
        super().__init__(rank, world)
        if world != 1:
            raise ValueError("the Keras runner is single-process")
        os.environ.setdefault("KERAS_BACKEND", "torch")
        import keras

        if keras.backend.backend() != "torch":
            raise RuntimeError(f"Keras backend is {keras.backend.backend()!r}, not 'torch'")
        self.keras = keras

    def _setup(self, model):
        if model not in self.state:
            keras = self.keras
            hidden, _ = common.MODELS[model]
            keras.utils.set_random_seed(0)
            km = keras.Sequential([
                keras.Input((common.N_FEATURES,)),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(common.N_CLASSES),
            ])
            km.compile(optimizer=keras.optimizers.SGD(learning_rate=common.LR),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            self.state[model] = km
        return self.state[model]

    def run(self, model, shuffle, epochs, n):
        km = self._setup(model)
        x, y = self.xy(n)
        timer = _EpochTimer(1)

        class Timer(self.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                timer.begin()

            def on_epoch_end(self, epoch, logs=None):
                timer.end()

        t0 = time.perf_counter()
        km.fit(x.numpy(), y.numpy(), batch_size=common.MODELS[model][1], epochs=epochs, shuffle=shuffle,
               verbose=0, callbacks=[Timer()])
        return timer.result(call_time=time.perf_counter() - t0)


RUNNERS = {
    "hand": HandRunner,
    "hand-dl": HandDataLoaderRunner,
    "dfit": DfitRunner,
    "lightning": LightningRunner,
    "accelerate": AccelerateRunner,
    "keras": KerasRunner,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runner", required=True, choices=sorted(RUNNERS))
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    args = ap.parse_args()

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr
    sys.stdout = sys.stderr

    def reply(obj):
        proto.write(PREFIX + json.dumps(obj) + "\n")
        proto.flush()

    torch.set_num_threads(1)
    try:
        runner = RUNNERS[args.runner](args.rank, args.world)
    except BaseException as exc:  # noqa: BLE001 - reported to the orchestrator, which skips this runner
        reply({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        return
    reply({"ready": True, "pid": os.getpid()})
    warmed: set = set()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        try:
            key = (cmd["model"], cmd["shuffle"], cmd["n"])
            if key not in warmed:  # one untimed warm-up epoch per configuration
                runner.run(cmd["model"], cmd["shuffle"], 1, cmd["n"])
                warmed.add(key)
            out = runner.run(cmd["model"], cmd["shuffle"], cmd["epochs"], cmd["n"])
            reply(out)
        except BaseException as exc:  # noqa: BLE001
            reply({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
            break
    if args.world > 1 and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


if __name__ == "__main__":
    main()
