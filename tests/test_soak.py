"""Soak: 3 ranks run a few hundred short epochs with callbacks, a stream read on a background thread and step-level
backups. Nothing may grow: open files, threads, anonymous memory (< 5 %); and nothing is left afterwards (no child
process, no listening port of the job)."""
from __future__ import annotations

import gc
import os

import pytest

from conftest import ports_of
from ranks import run_ranks

pytestmark = pytest.mark.timeout(400)
ARRAY_EPOCHS, STREAM_EPOCHS, BASELINE_EPOCH = 200, 100, 20


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:"))


def _resources() -> dict[str, int]:
    import threading

    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "os_threads": len(os.listdir("/proc/self/task")), "rss_anon_kib": _rss_anon_kib()}


def _children() -> list[int]:
    """Live child processes of this process."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(entry))
    return found


def _soak(folder: str) -> dict:
    import numpy as np
    import torch
    from torch import nn

    import dfit

    rank = dfit.distributed.rank()
    samples: list[tuple[str, int, dict]] = []

    class Probe(dfit.callbacks.Callback):
        def __init__(self, phase):
            super().__init__()
            self.phase = phase

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 in (BASELINE_EPOCH, ARRAY_EPOCHS, STREAM_EPOCHS):
                samples.append((self.phase, epoch + 1, _resources()))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = (x @ rng.normal(size=(4, 2))).astype(np.float32)
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])

    def callbacks(phase):
        return [dfit.callbacks.ModelCheckpoint(os.path.join(folder, "best.dfit"), monitor="loss",
                                                save_best_only=True),
                dfit.callbacks.CSVLogger(os.path.join(folder, f"log-{phase}.csv"), append=True),
                dfit.callbacks.EarlyStopping(monitor="loss", patience=10_000),
                dfit.callbacks.ReduceLROnPlateau(monitor="loss", patience=10_000),
                dfit.callbacks.BackupAndRestore(os.path.join(folder, f"backup-{phase}"), save_freq=7),
                Probe(phase)]

    before = _children()
    model.fit(x, y, batch_size=20, epochs=ARRAY_EPOCHS, validation_split=0.2, seed=1, verbose=0,
              callbacks=callbacks("arrays"))

    class Batches:   # a re-iterable stream of 3 global batches a pass
        def __iter__(self):
            return ((x[k:k + 20], y[k:k + 20]) for k in range(0, 60, 20))

    model.fit(Batches(), epochs=STREAM_EPOCHS, workers=1, verbose=0, callbacks=callbacks("stream"))
    model.evaluate(x, y, batch_size=20, verbose=0)
    leftovers = sorted(set(_children()) - set(before))
    del model   # its DDP wrapper holds the process group (and so the store's socket)
    gc.collect()
    dfit.distributed.shutdown()
    return {"rank": rank, "samples": samples, "children": leftovers, "ports": sorted(ports_of([os.getpid()])),
            "master_port": int(os.environ["MASTER_PORT"]),
            "files": sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
            if rank == 0 else None}


def test_soak_three_ranks_nothing_grows_nothing_left(tmp_path):
    results = run_ranks(_soak, 3, str(tmp_path), timeout=380)
    for result in results:
        samples = {(phase, epoch): res for phase, epoch, res in result["samples"]}
        base, end = samples[("arrays", BASELINE_EPOCH)], samples[("stream", STREAM_EPOCHS)]
        mid = samples[("arrays", ARRAY_EPOCHS)]
        where = f"rank {result['rank']}: epoch {BASELINE_EPOCH} {base}, end of arrays {mid}, end {end}"
        assert end["fds"] <= base["fds"] and mid["fds"] <= base["fds"], where
        assert end["threads"] <= base["threads"] + 0 and end["os_threads"] <= base["os_threads"], where
        assert end["rss_anon_kib"] < 1.05 * base["rss_anon_kib"], where
        assert result["children"] == [] and result["ports"] == [], {k: result[k] for k in ("rank", "children", "ports")}
    # backups were removed at the end of each completed fit (their folders are kept, empty); logs hold every epoch
    assert sorted(results[0]["files"]) == ["best.dfit", "log-arrays.csv", "log-stream.csv"]
    for phase, epochs in (("arrays", ARRAY_EPOCHS), ("stream", STREAM_EPOCHS)):
        assert len((tmp_path / f"log-{phase}.csv").read_text().splitlines()) == epochs + 1
