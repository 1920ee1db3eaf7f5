"""History plots with matplotlib (imported only when a plot is asked for)."""
from __future__ import annotations

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


def plot_history(history: dict[str, list[float]], epochs: list[int], path: str | None = None) -> Any:
    """One panel per metric with its training and validation curves; written atomically to ``path``."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metrics = [k for k in history if not k.startswith("val_")]
    metrics += [k[4:] for k in history if k.startswith("val_") and k[4:] not in metrics]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(6, 2.6 * max(len(metrics), 1)), squeeze=False, sharex=True)
    x = [e + 1 for e in epochs]
    for ax, name in zip(axes[:, 0], metrics):
        if name in history:
            ax.plot(x[-len(history[name]):], history[name], marker="o", label="training")
        if f"val_{name}" in history:
            ax.plot(x[-len(history[f"val_{name}"]):], history[f"val_{name}"], marker="o", label="validation")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    axes[-1, 0].set_xlabel("epoch")
    fig.tight_layout()
    if path is not None:
        root, ext = os.path.splitext(path)
        tmp = f"{root}.tmp{ext or '.png'}"
        fig.savefig(tmp)
        os.replace(tmp, path)
        plt.close(fig)
    return fig


class PlotMetrics(Callback):
    """view_metrics: redraw the history plot after every epoch (to a file, or live in Jupyter)."""

    def __init__(self, path: str | None):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        if not dist.is_chief() or self.model.history is None:
            return
        history = self.model.history
        if self.path is not None:
            plot_history(history.history, history.epoch, self.path)
            return
        from IPython import display

        fig = plot_history(history.history, history.epoch)
        display.clear_output(wait=True)
        display.display(fig)
        import matplotlib.pyplot as plt

        plt.close(fig)
