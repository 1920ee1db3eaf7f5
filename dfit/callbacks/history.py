"""``History``: the per-epoch logs of a fit, with Keras' attributes."""
from __future__ import annotations

from typing import Any

from .base import Callback


class History(Callback):
    """Records epoch logs: ``history`` (key -> list), ``epoch`` (epoch indices), ``params``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []

    def on_train_begin(self, logs=None):
        self.epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)

    def to_dataframe(self) -> Any:
        """The history as a pandas DataFrame indexed by epoch."""
        import pandas as pd

        return pd.DataFrame(self.history, index=pd.Index(self.epoch, name="epoch"))

    def plot(self, path: str | None = None) -> Any:
        """One panel per metric, training and validation curves; saved to ``path`` if given."""
        from ..plotting import plot_history

        return plot_history(self.history, self.epoch, path)
