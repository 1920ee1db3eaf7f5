"""Public names not covered elsewhere: dfit.distributed.barrier / backend / device on 1 and 2 ranks, and the
predict callback hooks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dfit
from ranks import run_ranks


# -- dfit.distributed: backend(), device(), barrier() ----------------------------------------------------
def _backend_device_barrier(marker_dir: str) -> dict:
    import os
    import time
    from pathlib import Path

    from dfit import distributed as dd

    before = dd.backend()
    device = dd.device()  # initialises on first use
    after = dd.backend()
    marker = Path(marker_dir) / "rank1-was-here"
    if dd.rank() == 1:
        time.sleep(1.0)  # rank 0 reaches the barrier first and must wait for this file
        marker.write_text("x")
    dd.barrier()
    seen = marker.exists()
    dd.barrier()  # nobody leaves before every rank has looked
    return {"before": before, "after": after, "device": str(device), "world": dd.world_size(),
            "marker_seen_after_barrier": seen, "group": dd._active(), "pid": os.getpid()}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [1, 2])
def test_backend_device_and_barrier(world, tmp_path):
    results = run_ranks(_backend_device_barrier, world, str(tmp_path), timeout=90)
    for rank, got in enumerate(results):
        assert got["before"] is None, rank  # no backend chosen before init
        assert (got["after"], got["device"], got["world"]) == ("gloo", "cpu", world), rank
        assert got["group"] == (world > 1)  # one process needs no process group: barrier is a no-op
        assert got["marker_seen_after_barrier"] == (world > 1), rank
    assert len({got["pid"] for got in results}) == world


# -- predict hooks ------------------------------------------------------------------------------------
class PredictRecorder(dfit.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.events: list[tuple] = []

    def on_predict_begin(self, logs=None):
        self.events.append(("begin", dict(logs or {})))

    def on_predict_end(self, logs=None):
        self.events.append(("end", dict(logs or {})))

    def on_predict_batch_begin(self, batch, logs=None):
        self.events.append(("batch_begin", batch))

    def on_predict_batch_end(self, batch, logs=None):
        self.events.append(("batch_end", batch, logs["outputs"].detach().clone()))

    def on_train_begin(self, logs=None):
        self.events.append(("train_begin",))

    def on_test_begin(self, logs=None):
        self.events.append(("test_begin",))


def _model():
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(3, 2, dtype=torch.float64)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_predict_hooks_once_and_per_batch_with_the_outputs():
    model = _model()
    x = np.random.default_rng(0).normal(size=(10, 3))
    recorder = PredictRecorder()
    prediction = model.predict(x, batch_size=4, callbacks=[recorder])
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["begin"] + ["batch_begin", "batch_end"] * 3 + ["end"]
    assert [e[1] for e in recorder.events if e[0] in ("batch_begin", "batch_end")] == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        expected = model.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(prediction, expected, rtol=1e-12)
    outputs = [e[2] for e in recorder.events if e[0] == "batch_end"]
    assert [tuple(o.shape) for o in outputs] == [(4, 2), (4, 2), (2, 2)]  # each batch's own rows
    np.testing.assert_allclose(torch.cat(outputs).numpy(), expected, rtol=1e-12)


def test_predict_hooks_are_not_called_by_fit_or_evaluate():
    model = _model()
    x, y = np.zeros((6, 3)), np.zeros((6, 2))
    recorder = PredictRecorder()
    model.fit(x, y, batch_size=3, epochs=1, verbose=0, validation_split=0.5, callbacks=[recorder])
    model.evaluate(x, y, verbose=0, callbacks=[recorder])
    assert [e[0] for e in recorder.events] == ["train_begin", "test_begin", "test_begin"]


def test_predict_begin_and_end_without_batch_hooks_still_run_once():
    class BeginEnd(dfit.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.calls: list[str] = []

        def on_predict_begin(self, logs=None):
            self.calls.append("begin")

        def on_predict_end(self, logs=None):
            self.calls.append("end")

    cb = BeginEnd()
    _model().predict(np.zeros((7, 3)), batch_size=2, callbacks=[cb])
    assert cb.calls == ["begin", "end"]
