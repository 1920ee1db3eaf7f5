"""History plots with matplotlib (imported only when a plot is asked for), and fit's ``view_metrics``.

``view_metrics``: a path writes the plot there (a PNG, atomically) after every epoch; live, the plot is one
image in the notebook cell that is updated in place after every epoch (one IPython display handle), not a new
image per epoch. Under ``multi_gpu_model`` the workers have no notebook: the calling process draws the live plot
from rank 0's epoch logs (see ``dfit.spawn``).
"""
from __future__ import annotations

import io
import os
import sys
from typing import Any

from . import distributed as dist
from .callbacks.base import Callback


def in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython() if hasattr(shell, "get_ipython") else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def wants_live_plot(view_metrics: Any, epochs: int, verbose: int) -> bool:
    """Whether ``view_metrics`` asks for the live plot: ``True``, or "auto" in a notebook with more than one
    epoch to run and ``verbose > 0``."""
    if view_metrics is True:
        return True
    return isinstance(view_metrics, str) and view_metrics == "auto" and epochs > 1 and verbose > 0 \
        and in_notebook()


def _panels(history: dict[str, list[float]]) -> list[str]:
    """One panel per metric: the training keys in order, then metrics seen only in validation."""
    metrics = [k for k in history if not k.startswith("val_")]
    return metrics + [k[4:] for k in history if k.startswith("val_") and k[4:] not in metrics]


def _draw(fig: Any, history: dict[str, list[float]], epochs: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    metrics = _panels(history)
    axes = fig.subplots(max(len(metrics), 1), 1, squeeze=False, sharex=True)
    x = [e + 1 for e in epochs]  # epochs counted from 1, as Keras prints them
    for ax, name in zip(axes[:, 0], metrics):
        if name in history:
            ax.plot(x[-len(history[name]):], history[name], marker="o", label="training")
        if f"val_{name}" in history:
            ax.plot(x[-len(history[f"val_{name}"]):], history[f"val_{name}"], marker="o", label="validation")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    axes[-1, 0].set_xlabel("epoch")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
    fig.tight_layout()


def _figsize(history: dict[str, list[float]]) -> tuple[float, float]:
    return 6.0, 2.6 * max(len(_panels(history)), 1)


def plot_history(history: dict[str, list[float]], epochs: list[int], path: str | None = None) -> Any:
    """One panel per metric with its training and validation curves; written atomically to ``path``."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=_figsize(history))
    _draw(fig, history, epochs)
    if path is not None:
        root, ext = os.path.splitext(path)
        tmp = f"{root}.tmp{ext or '.png'}"
        fig.savefig(tmp)
        os.replace(tmp, path)
        plt.close(fig)
    return fig


def history_png(history: dict[str, list[float]], epochs: list[int], dpi: int = 80) -> bytes:
    """The plot as PNG bytes, drawn on a figure of its own (no pyplot: nothing left open, no GUI backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=_figsize(history))
    _draw(fig, history, epochs)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class LivePlot:
    """The live plot of one fit: one image in the notebook, replaced in place by ``show``."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.history: dict[str, list[float]] = {}
        self.epochs: list[int] = []

    def add(self, epoch: int, logs: dict[str, float]) -> None:
        """Record one epoch's logs (as ``History`` does) and redraw."""
        self.epochs.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        self.show(self.history, self.epochs)

    def show(self, history: dict[str, list[float]], epochs: list[int]) -> None:
        from IPython import display

        image = display.Image(data=history_png(history, epochs), format="png")
        if self.handle is None:
            self.handle = display.display(image, display_id=True)
        else:
            self.handle.update(image)


class PlotMetrics(Callback):
    """view_metrics: redraw the history plot after every epoch (to a file, or live in Jupyter)."""

    def __init__(self, path: str | None):
        super().__init__()
        self.path = path
        self.live: LivePlot | None = None

    def on_train_begin(self, logs=None):
        self.live = None  # each fit draws its own image

    def on_epoch_end(self, epoch, logs=None):
        if not dist.is_chief() or self.model.history is None:
            return
        history = self.model.history
        if self.path is not None:
            plot_history(history.history, history.epoch, self.path)
            return
        if self.live is None:
            self.live = LivePlot()
        self.live.show(history.history, history.epoch)
