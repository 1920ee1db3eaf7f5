"""``ProgbarLogger``: Keras' progress output, printed by rank 0 only.

verbose=1: ``Epoch 3/10`` then a bar with ETA and running loss/metrics, ending with the time per step and
the epoch logs; verbose=2: one line per epoch. ``evaluate`` and ``predict`` get the same bar (no epoch
header); validation inside ``fit`` prints none, as in Keras.

On a terminal (or a notebook) the bar is redrawn in place every ``interval`` seconds, reading the (lazy)
batch logs only then, so it adds no device synchronisation to most steps. Elsewhere (a log file, a Slurm
job) verbose=1 prints whole lines: one per 10 % of the steps at most once every ``line_interval`` seconds,
or, when the number of steps is unknown, at gaps that grow with the elapsed time (a dozen lines or so per
epoch however long it is), then the final line.
"""
from __future__ import annotations

import os
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


def is_interactive(stream: TextIO) -> bool:
    """Whether ``stream`` shows a line redrawn in place: a terminal, or the stdout of a Jupyter kernel or
    of PyCharm's console (what Keras treats as a dynamic display)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
    if stream is sys.stdout or stream is sys.__stdout__:
        from ..plotting import in_notebook

        return in_notebook() or "PYCHARM_HOSTED" in os.environ
    return False


def with_progbar(callbacks: list[Callback] | None, verbose: int) -> list[Callback]:
    """``callbacks`` plus a default ``ProgbarLogger`` when ``verbose`` asks for output and the user gave none
    (Keras: the user's one replaces it)."""
    callbacks = list(callbacks or [])
    if verbose and not any(isinstance(cb, ProgbarLogger) for cb in callbacks):
        callbacks.append(ProgbarLogger())
    return callbacks


class ProgbarLogger(Callback):
    """Prints progress like Keras. ``interactive=None`` means: redraw in place on a terminal or notebook;
    otherwise whole lines at most every ``line_interval`` seconds (verbose=1)."""

    WIDTH = 30
    reads_logs_at_once = True

    def __init__(self, interval: float = 0.1, stream: TextIO | None = None, interactive: bool | None = None,
                 line_interval: float = 5.0):
        super().__init__()
        self.interval, self.line_interval = interval, line_interval
        self._stream, self._interactive = stream, interactive
        self.verbose, self.epochs, self.target = 0, 1, None
        self._in_fit = False   # validation inside fit prints no bar
        self._start = self._last = 0.0
        self._seen = 0
        self._tenths = 0       # progress (in tenths of the steps) of the last whole line printed
        self._drawn = 0        # length of the line now on screen, to blank what a shorter one leaves

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def interactive(self) -> bool:
        if self._interactive is not None:
            return self._interactive
        return is_interactive(self.stream)

    @staticmethod
    def _now() -> float:
        return time.monotonic()

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    # -- the hooks: fit, then evaluate and predict (each only when not inside fit) -----------------------
    def on_train_begin(self, logs=None):
        self._in_fit = True
        self._configure()

    def on_train_end(self, logs=None):
        self._in_fit = False

    def on_epoch_begin(self, epoch, logs=None):
        self._begin()
        if self.verbose:
            self._write(f"Epoch {epoch + 1}/{self.epochs}\n")

    def on_train_batch_end(self, batch, logs=None):
        self._update(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._finish(logs)

    def on_test_begin(self, logs=None):
        if not self._in_fit:
            self._configure()
            self._begin()

    def on_test_batch_end(self, batch, logs=None):
        if not self._in_fit:
            self._update(batch, logs)

    def on_test_end(self, logs=None):
        if not self._in_fit:
            self._finish(logs)

    def on_predict_begin(self, logs=None):
        self._configure()
        self._begin()

    def on_predict_batch_end(self, batch, logs=None):
        self._update(batch, None)  # the batch's outputs are no logs to show

    def on_predict_end(self, logs=None):
        self._finish(None)

    # -- one bar ---------------------------------------------------------------------------------------
    def _configure(self) -> None:
        self.verbose = int(self.params.get("verbose", 0)) if dist.is_chief() else 0
        self.epochs = self.params.get("epochs", 1)

    def _begin(self) -> None:
        self.target = self.params.get("steps")
        self._seen = self._tenths = self._drawn = 0
        self._start = self._last = self._now()

    def _update(self, batch: int, logs: Mapping[str, Any] | None) -> None:
        self._seen = batch + 1
        if self.verbose != 1:
            return
        now = self._now()
        if self.interactive:
            if now - self._last < self.interval:
                return
            self._last = now
            self._redraw(self._bar_line(now, logs or {}, final=False))
        elif self._line_due(now):
            self._last = now
            self._write(self._bar_line(now, logs or {}, final=False) + "\n")

    def _line_due(self, now: float) -> bool:
        """A whole line (non-interactive output): at a new tenth of the steps, ``line_interval`` seconds
        after the last one; with no known total, after a gap of half the time elapsed at the last line."""
        if self.target:
            tenths = self._seen * 10 // self.target
            if self._seen >= self.target or tenths <= self._tenths or now - self._last < self.line_interval:
                return False
            self._tenths = tenths
            return True
        return now - self._last >= max(self.line_interval, (self._last - self._start) / 2)

    def _redraw(self, line: str) -> None:
        """Draw ``line`` over the one on screen, padded with blanks to the old one's length."""
        self._write("\r" + line + " " * max(0, self._drawn - len(line)))
        self._drawn = len(line)

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

    def _finish(self, logs: Mapping[str, Any] | None) -> None:
        if not self.verbose:
            return
        now = self._now()
        if self.target is None:
            self.target = self._seen
        if self.verbose == 1:
            line = self._bar_line(now, logs or {}, final=True)
            if self.interactive:
                self._redraw(line)
                self._write("\n")
                self._drawn = 0
            else:
                self._write(line + "\n")
        else:
            elapsed = now - self._start
            per_step = format_per_step(elapsed / max(self._seen, 1))
            self._write(f"{self._seen}/{self.target} - {format_duration(elapsed)} - {per_step}"
                        f"{format_logs(logs or {})}\n")
