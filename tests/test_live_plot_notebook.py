"""fit(view_metrics=True) in a real Jupyter kernel: ONE image output per fit, updated in place every epoch.

Also for ``multi_gpu_model(...).fit``, whose workers have no notebook: the kernel draws the plot from rank 0's
epoch logs. The kernel's messages are recorded: each fit cell sends one ``display_data`` and then an
``update_display_data`` per further epoch, and the cell's final output is the plot of all three epochs
(its PNG compared byte for byte with one drawn from the returned History).
"""
from __future__ import annotations

import base64
import hashlib
import textwrap

import pytest

from conftest import REPO, launch_env

SETUP = textwrap.dedent("""
    import hashlib, numpy as np, torch, dfit
    from torch import nn
    from dfit.plotting import history_png
    def make():
        torch.manual_seed(0)
        m = dfit.Model(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
        m.compile(optimizer="adam", loss="mse", metrics=["mae"]); return m
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32"); y = (x @ rng.normal(size=(8, 1))).astype("float32")
""")
FIT = textwrap.dedent("""
    h = make().fit(x, y, batch_size=32, epochs=3, validation_split=0.2, seed=0, verbose=1, view_metrics=True)
    print("PNG", hashlib.sha256(history_png(h.history, h.epoch)).hexdigest(), h.epoch)
""")
MULTI = textwrap.dedent("""
    h2 = dfit.multi_gpu_model(make(), gpus=2).fit(x, y, batch_size=32, epochs=3, validation_split=0.2, seed=0,
                                                  verbose=0, view_metrics=True)
    print("PNG", hashlib.sha256(history_png(h2.history, h2.epoch)).hexdigest(), h2.epoch)
""")


@pytest.mark.timeout(200)
def test_live_plot_is_one_updated_image_in_a_jupyter_cell(monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="needs nbformat, nbclient and ipykernel")
    nbclient = pytest.importorskip("nbclient", reason="needs nbformat, nbclient and ipykernel")
    pytest.importorskip("ipykernel", reason="needs nbformat, nbclient and ipykernel")
    for key, value in launch_env().items():
        monkeypatch.setenv(key, value)

    messages: dict[int, list[str]] = {}

    class Recording(nbclient.NotebookClient):
        def process_message(self, msg, cell, cell_index):
            messages.setdefault(cell_index, []).append(msg["msg_type"])
            return super().process_message(msg, cell, cell_index)

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (SETUP, FIT, MULTI)])
    Recording(nb, timeout=150, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()

    for index in (1, 2):
        outputs = nb.cells[index].outputs
        text = "".join(o.get("text", "") for o in outputs)
        assert not [o for o in outputs if o.output_type == "error"], outputs
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, (index, [o.output_type for o in outputs])
        shown = messages[index]
        assert shown.count("display_data") == 1 and shown.count("update_display_data") == 2, (index, shown)
        digest, epochs = text.split("PNG ", 1)[1].split(" ", 1)
        assert epochs.strip() == "[0, 1, 2]"
        final = base64.b64decode(images[0]["data"]["image/png"])
        assert hashlib.sha256(final).hexdigest() == digest  # the image now shows all three epochs
    fit_text = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert "Epoch 3/3" in fit_text  # the progress bar's output stays beside the plot (no clear_output)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_multi_gpu_model_sends_rank_0_epoch_logs_to_the_callers_live_plot(monkeypatch, start_method):
    """Outside a notebook too (view_metrics=True): the caller receives every epoch's logs, in order, equal to
    the History that comes back, while the workers train (over a multiprocessing queue)."""
    import numpy as np
    import torch
    from torch import nn

    import dfit
    import dfit.plotting

    for key, value in launch_env().items():
        monkeypatch.setenv(key, value)
    received: list = []

    class RecordingPlot:
        def add(self, epoch, logs):
            received.append((epoch, dict(logs)))

    monkeypatch.setattr(dfit.plotting, "LivePlot", RecordingPlot)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)), rng.normal(size=(64, 1))
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(3, 1, dtype=torch.float64)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    history = dfit.multi_gpu_model(model, gpus=2, start_method=start_method).fit(
        x, y, batch_size=16, epochs=3, validation_split=0.25, verbose=0, view_metrics=True, seed=0)
    assert [epoch for epoch, _ in received] == [0, 1, 2]
    for epoch, logs in received:
        assert logs == {key: values[epoch] for key, values in history.history.items()}
    received.clear()
    dfit.multi_gpu_model(model, gpus=2, start_method=start_method).fit(x, y, batch_size=16, epochs=3, verbose=0,
                                                                       view_metrics=False)
    assert received == []  # no live plot asked for: no channel, nothing sent
