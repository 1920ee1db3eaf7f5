"""``ProgbarLogger``: Keras' progress output, printed by rank 0 only.

verbose=1: ``Epoch 3/10`` then a bar with ETA and running loss/metrics, ending with the time per step and
the epoch logs; verbose=2: one line per epoch. The bar reads the (lazy) batch logs at most every
``interval`` seconds, so it adds no device synchronisation to most steps.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Mapping, TextIO

from .. import distributed as dist
from .base import Callback


def format_value(value: float) -> str:
    return f"{value:.4e}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"


def format_logs(logs: Mapping[str, Any]) -> str:
    return "".join(f" - {k}: {format_value(float(v))}" for k, v in logs.items())


def format_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"
    if seconds >= 60:
        return f"{int(seconds // 60)}:{int(seconds % 60):02d}"
    return f"{int(seconds)}s"


def format_per_step(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.0f}s/step"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.0f}ms/step"
    return f"{seconds * 1e6:.0f}us/step"


class ProgbarLogger(Callback):
    """Prints progress like Keras. ``interactive=None`` means: redraw in place on a terminal."""

    WIDTH = 30
    reads_logs_at_once = True

    def __init__(self, interval: float = 0.1, stream: TextIO | None = None, interactive: bool | None = None):
        super().__init__()
        self.interval, self._stream, self._interactive = interval, stream, interactive
        self.verbose, self.epochs, self.target = 0, 1, None
        self._start = self._last = 0.0
        self._seen = 0

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def interactive(self) -> bool:
        if self._interactive is not None:
            return self._interactive
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def on_train_begin(self, logs=None):
        self.verbose = int(self.params.get("verbose", 0)) if dist.is_chief() else 0
        self.epochs = self.params.get("epochs", 1)

    def on_epoch_begin(self, epoch, logs=None):
        if not self.verbose:
            return
        self.target = self.params.get("steps")
        self._seen = 0
        self._start = self._last = time.monotonic()
        self._write(f"Epoch {epoch + 1}/{self.epochs}\n")

    def on_train_batch_end(self, batch, logs=None):
        self._seen = batch + 1
        if self.verbose != 1 or not self.interactive:
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        self._write("\r" + self._bar_line(now, logs or {}, final=False))

    def _bar(self) -> str:
        target = self.target
        digits = len(str(target)) if target else 1
        count = f"{self._seen:>{digits}d}/{target if target else 'Unknown'}"
        if not target:
            return count
        done = int(self.WIDTH * self._seen / target)
        arrow = ">" if self._seen < target and done < self.WIDTH else ""
        bar = "=" * (done - (1 if arrow and done else 0)) + arrow
        return f"{count} [{bar:.<{self.WIDTH}}]"

    def _bar_line(self, now: float, logs: Mapping[str, Any], final: bool) -> str:
        elapsed = now - self._start
        per_step = elapsed / max(self._seen, 1)
        if final:
            timing = f" - {format_duration(elapsed)} {format_per_step(per_step)}"
        elif self.target:
            timing = f" - ETA: {format_duration(per_step * (self.target - self._seen))}"
        else:
            timing = f" - {format_duration(elapsed)}"
        return self._bar() + timing + format_logs(logs)

    def on_epoch_end(self, epoch, logs=None):
        if not self.verbose:
            return
        now = time.monotonic()
        if self.target is None:
            self.target = self._seen
        if self.verbose == 1:
            prefix = "\r" if self.interactive else ""
            self._write(prefix + self._bar_line(now, logs or {}, final=True) + "\n")
        else:
            elapsed = now - self._start
            per_step = format_per_step(elapsed / max(self._seen, 1))
            self._write(f"{self._seen}/{self.target} - {format_duration(elapsed)} - {per_step}"
                        f"{format_logs(logs or {})}\n")
