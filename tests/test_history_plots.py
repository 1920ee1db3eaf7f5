"""History.plot / dfit.plotting, History.to_dataframe and fit's view_metrics (API.md section 5).

The figures are inspected as matplotlib objects (axes, lines, their data), never as pixels."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display in tests; set before pyplot is imported anywhere

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import dfit  # noqa: E402
import dfit.plotting  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    plt.close("all")
    yield
    plt.close("all")


def _fit(epochs: int = 3, **options):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(20, 1))
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(3, 1, dtype=torch.float64)])
    model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=0.05), loss="mse", metrics=["mae"])
    options.setdefault("verbose", 0)
    return model, model.fit(x, y, batch_size=5, epochs=epochs, validation_split=0.25, **options)


def _lines(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def _check_figure(fig, history: dict[str, list[float]], epochs: list[int]) -> None:
    """One axes per metric, labelled by it, with a training and a validation line holding the history."""
    names = [k for k in history if not k.startswith("val_")]
    assert [ax.get_ylabel() for ax in fig.axes] == names
    x = [e + 1 for e in epochs]  # epochs are shown counted from 1, as Keras prints them
    for ax, name in zip(fig.axes, names):
        lines = _lines(ax)
        assert set(lines) == {"training", "validation"}, name
        assert lines["training"] == (x, history[name])
        assert lines["validation"] == (x, history[f"val_{name}"])
    assert fig.axes[-1].get_xlabel() == "epoch"


def test_history_plot_writes_a_png_with_one_axes_per_metric(tmp_path):
    _, history = _fit()
    assert list(history.history) == ["loss", "mae", "val_loss", "val_mae"]
    path = tmp_path / "history.png"
    fig = history.plot(path=str(path))
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["history.png"]  # the temporary file was renamed away
    assert len(fig.axes) == 2
    _check_figure(fig, history.history, history.epoch)
    assert plt.get_fignums() == []  # a figure written to a file is closed


def _panel_frames(png_path) -> int:
    """How many axes frames a column of pixels (40 % across, between x ticks) crosses: 2 black spines each."""
    import matplotlib.image as mpimg

    rgb = mpimg.imread(str(png_path))[..., :3]
    dark = rgb[:, int(rgb.shape[1] * 0.4)].max(axis=1) < 0.25
    return int((np.diff(dark.astype(int)) == 1).sum()) // 2


@pytest.mark.parametrize("metrics", [["loss"], ["loss", "mae"], ["loss", "mae", "mse"]])
def test_history_plot_png_pixels_size_not_blank_one_panel_per_metric(tmp_path, metrics):
    import matplotlib.image as mpimg

    history = {}
    for i, name in enumerate(metrics):
        history[name] = [1.0 + i, 0.6 + i, 0.4 + i]
    for i, name in enumerate(metrics):
        history[f"val_{name}"] = [1.1 + i, 0.8 + i, 0.7 + i]
    h = dfit.callbacks.History()
    h.history, h.epoch = history, [0, 1, 2]
    path = tmp_path / "h.png"
    h.plot(path=str(path))
    rgb = mpimg.imread(str(path))[..., :3]
    assert rgb.shape[:2] == (round(260 * len(metrics)), 600)  # 6 x 2.6 inches per panel at 100 dpi
    drawn = rgb.min(axis=2) < 0.95
    assert 0.03 < drawn.mean() < 0.5  # curves, axes and text, on a white background
    blue = (rgb[..., 2] > 0.6) & (rgb[..., 0] < 0.3)   # the training curves (matplotlib's C0)
    orange = (rgb[..., 0] > 0.9) & (rgb[..., 1] > 0.4) & (rgb[..., 1] < 0.6) & (rgb[..., 2] < 0.2)  # C1
    assert blue.sum() > 200 and orange.sum() > 200
    assert _panel_frames(path) == len(metrics)


def test_history_plot_without_a_path_returns_the_open_figure(tmp_path):
    _, history = _fit(epochs=2)
    fig = history.plot()
    _check_figure(fig, history.history, history.epoch)
    assert plt.get_fignums() == [fig.number]
    assert list(tmp_path.iterdir()) == []


def test_plot_history_directly_with_a_metric_seen_only_in_validation(tmp_path):
    history = {"loss": [3.0, 2.0, 1.0], "val_loss": [3.5, 2.5, 1.5], "val_auc": [0.6, 0.7, 0.8]}
    fig = dfit.plotting.plot_history(history, [0, 1, 2], str(tmp_path / "p.png"))
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "auc"]
    assert set(_lines(fig.axes[0])) == {"training", "validation"}
    assert _lines(fig.axes[1]) == {"validation": ([1, 2, 3], [0.6, 0.7, 0.8])}


def test_to_dataframe_is_indexed_by_epoch():
    model, history = _fit(epochs=3)
    frame = history.to_dataframe()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["loss", "mae", "val_loss", "val_mae"]
    assert frame.index.name == "epoch" and list(frame.index) == [0, 1, 2]
    for key, values in history.history.items():
        assert list(frame[key]) == values
    # a second fit continuing from initial_epoch keeps Keras' epoch numbers
    more = model.fit(np.zeros((4, 3)), np.zeros((4, 1)), epochs=5, initial_epoch=3, verbose=0)
    assert list(more.to_dataframe().index) == [3, 4]


class _PlotSpy:
    """Wraps dfit.plotting.plot_history and history_png, recording (epochs plotted, path) of each call
    (path "png-bytes" for a live plot's image)."""

    def __init__(self):
        self.calls: list[tuple[list[int], str | None]] = []
        self.real, self.real_png = dfit.plotting.plot_history, dfit.plotting.history_png

    def __call__(self, history, epochs, path=None):
        self.calls.append((list(epochs), path))
        return self.real(history, epochs, path)

    def png(self, history, epochs, dpi=80):
        self.calls.append((list(epochs), "png-bytes"))
        return self.real_png(history, epochs, dpi)


@pytest.fixture
def plot_spy(monkeypatch):
    spy = _PlotSpy()
    monkeypatch.setattr(dfit.plotting, "plot_history", spy)
    monkeypatch.setattr(dfit.plotting, "history_png", spy.png)
    return spy


def test_view_metrics_path_writes_the_plot_after_every_epoch(tmp_path, plot_spy):
    path = tmp_path / "live.png"
    seen_at_epoch_begin = []

    class WatchFile(dfit.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen_at_epoch_begin.append(path.exists())

    _, history = _fit(epochs=3, view_metrics=str(path), callbacks=[WatchFile()])
    assert plot_spy.calls == [([0], str(path)), ([0, 1], str(path)), ([0, 1, 2], str(path))]
    assert seen_at_epoch_begin == [False, True, True]  # written at the end of epochs 0 and 1 already
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert plt.get_fignums() == []


@pytest.mark.parametrize("verbose", [0, 1])
def test_view_metrics_auto_does_nothing_outside_a_notebook(plot_spy, verbose, capsys):
    assert not dfit.plotting.in_notebook()
    _fit(epochs=3, verbose=verbose)
    assert plot_spy.calls == [] and plt.get_fignums() == []


@pytest.fixture
def fake_notebook(monkeypatch):
    """in_notebook() true, and IPython's display recording what is shown: ("display", image) for a new output,
    ("update", handle number, image) for an update of an existing one."""
    from IPython import display

    shown: list = []

    class Handle:
        def __init__(self, number):
            self.number = number

        def update(self, obj):
            shown.append(("update", self.number, obj))

    def fake_display(obj, display_id=None):
        shown.append(("display", obj))
        return Handle(len([s for s in shown if s[0] == "display"])) if display_id else None

    def no_clear(wait=False):
        raise AssertionError("clear_output would also wipe the progress bar")

    monkeypatch.setattr(dfit.plotting, "in_notebook", lambda: True)
    monkeypatch.setattr(display, "display", fake_display)
    monkeypatch.setattr(display, "clear_output", no_clear)
    return shown


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_view_metrics_auto_in_a_notebook_updates_one_image_every_epoch(plot_spy, fake_notebook, capsys):
    _fit(epochs=3, verbose=1)
    assert plot_spy.calls == [([0], "png-bytes"), ([0, 1], "png-bytes"), ([0, 1, 2], "png-bytes")]
    # one output created, then updated in place (same handle): not one image per epoch
    assert [item[:2] if item[0] == "update" else item[0] for item in fake_notebook] == \
        ["display", ("update", 1), ("update", 1)]
    images = [item[-1] for item in fake_notebook]
    assert all(type(im).__name__ == "Image" and im.format == "png" for im in images)
    assert len({im.data for im in images}) == 3  # each epoch's image differs (one more point per curve)
    width, height = _png_size(images[-1].data)
    assert (width, height) == (480, 416)  # 6 x 5.2 inches at 80 dpi: two panels (loss, mae)
    assert plt.get_fignums() == []  # nothing left open for the inline backend to show again
    # a second fit draws a new image of its own
    _fit(epochs=2, verbose=1)
    assert [item[0] for item in fake_notebook[3:]] == ["display", "update"]
    assert fake_notebook[4][1] == 2


@pytest.mark.parametrize("options", [{"epochs": 1, "verbose": 1}, {"epochs": 3, "verbose": 0}],
                         ids=["one-epoch", "silent"])
def test_view_metrics_auto_in_a_notebook_needs_epochs_and_verbose(plot_spy, fake_notebook, options, capsys):
    _fit(**options)
    assert plot_spy.calls == [] and fake_notebook == []


def test_view_metrics_false_disables_even_in_a_notebook(plot_spy, fake_notebook, tmp_path, capsys):
    _fit(epochs=3, verbose=1, view_metrics=False)
    assert plot_spy.calls == [] and fake_notebook == []
    assert list(tmp_path.iterdir()) == []


def test_view_metrics_true_forces_the_live_plot(plot_spy, fake_notebook):
    _fit(epochs=2, verbose=0, view_metrics=True)
    assert plot_spy.calls == [([0], "png-bytes"), ([0, 1], "png-bytes")]
    assert [item[0] for item in fake_notebook] == ["display", "update"]
