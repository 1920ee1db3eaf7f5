"""``CSVLogger``: one CSV row per epoch (Keras 3's columns), written by rank 0, atomically.

The file is rewritten whole after each epoch (a temporary file, then a rename), so a reader or a crash never
sees half a row. Columns are Keras': ``epoch`` (0-based), then the log keys sorted; when the logs have no
``val_`` keys, Keras adds a ``val_`` column for each key anyway (filled with ``NA``).
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from typing import Any, Mapping

from .. import distributed as dist
from .base import Callback
from .files import atomic_write_text


def _cell(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, Iterable) and getattr(value, "ndim", 1) != 0:
        return f'"[{", ".join(map(str, value))}]"'
    return value


class CSVLogger(Callback):
    """``CSVLogger(filename, separator=",", append=False)``: with ``append`` the rows follow the file's
    existing content (and no second header is written)."""

    def __init__(self, filename: str, separator: str = ",", append: bool = False) -> None:
        super().__init__()
        self.filename, self.sep, self.append = os.fspath(filename), separator, append
        self.keys: list[str] | None = None
        self._text = ""
        self._header = True

    def on_train_begin(self, logs=None):
        self.keys, self._text, self._header = None, "", True
        if self.append and os.path.exists(self.filename) and dist.is_chief():
            with open(self.filename, newline="") as fh:
                self._text = fh.read()
            self._header = not self._text.split("\n", 1)[0]
        if not self.append and dist.is_chief():
            atomic_write_text(self.filename, "")  # Keras opens the file with "w" at the start of training

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.keys is None:
            self.keys = sorted(logs)
            if self.keys and not any(k.startswith("val_") for k in self.keys):
                self.keys += [f"val_{k}" for k in self.keys]
        if not dist.is_chief():
            return
        out = io.StringIO()

        class Dialect(csv.excel):
            delimiter = self.sep

        writer = csv.DictWriter(out, fieldnames=["epoch"] + self.keys, dialect=Dialect)
        if self._header:
            writer.writeheader()
            self._header = False
        writer.writerow({"epoch": epoch, **{k: _cell(logs.get(k, "NA")) for k in self.keys}})
        self._text += out.getvalue()
        atomic_write_text(self.filename, self._text)

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.keys = state.get("keys")
