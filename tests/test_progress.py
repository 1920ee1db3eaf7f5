"""ProgbarLogger: in-place redraws leave no stale characters, evaluate/predict draw a bar (fit's validation
does not), whole progress lines on a non-terminal, and verbose="auto"."""
from __future__ import annotations

import io
import re
import sys

import numpy as np
import pytest

import dfit.plotting
from dfit.callbacks import ProgbarLogger
from dfit.model import _resolve_verbose
from core_helpers import Recorder, frozen_model, mse_rows, row_ids

pytestmark = pytest.mark.timeout(60)


class _Tty(io.StringIO):
    def isatty(self):
        return True


class _Clock:
    """A fake ``monotonic``: each call returns the time set by the test."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def screen(text: str) -> list[str]:
    """What a terminal shows for ``text``: ``\\r`` returns to the line start and later characters overwrite."""
    lines = []
    for raw in text.split("\n"):
        cells: list[str] = []
        col = 0
        for ch in raw:
            if ch == "\r":
                col = 0
                continue
            if col < len(cells):
                cells[col] = ch
            else:
                cells.append(ch)
            col += 1
        lines.append("".join(cells).rstrip())
    return lines


def _driven_bar(params: dict, interactive: bool, line_interval: float = 5.0):
    stream, clock = io.StringIO(), _Clock()
    bar = ProgbarLogger(interval=0.0, stream=stream, interactive=interactive, line_interval=line_interval)
    bar._now = clock
    bar.set_params(params)
    return bar, stream, clock


def count_of(line: str) -> str:
    return re.match(r"\s*\d+/\w+", line).group()


# -- 1. stale characters --------------------------------------------------------------------------------------
def test_redrawn_shorter_line_leaves_no_stale_characters():
    bar, stream, clock = _driven_bar({"verbose": 1, "epochs": 1, "steps": 100}, interactive=True)
    bar.on_train_begin()
    bar.on_epoch_begin(0)
    clock.t = 100.0
    bar.on_train_batch_end(0, {"loss": 1.5e-4, "accuracy": 0.09532})  # ETA 2:45, loss 1.5000e-04
    clock.t = 150.0
    bar.on_train_batch_end(98, {"loss": 0.5, "accuracy": 0.0953})     # ETA 1s, loss 0.5000: shorter
    shown = screen(stream.getvalue())[-1]
    assert shown == f" 99/100 [{'=' * 28}>.] - ETA: 1s - loss: 0.5000 - accuracy: 0.0953", shown
    clock.t = 151.0
    bar.on_train_batch_end(99, {"loss": 0.25})
    bar.on_epoch_end(0, {"loss": 0.25})                                 # final line: shorter still
    out = stream.getvalue()
    assert out.endswith("\n")
    assert screen(out)[-2] == f"100/100 [{'=' * 30}] - 2:31 2s/step - loss: 0.2500"


# -- 2. evaluate / predict draw a bar; validation inside fit does not ---------------------------------------
def test_evaluate_verbose_1_draws_a_bar_with_the_logs(monkeypatch):
    fake = _Tty()
    monkeypatch.setattr(sys, "stdout", fake)
    x, y = row_ids(10), np.ones((10, 1))
    model = frozen_model(Recorder(w=0.5), metrics=["mae"])
    loss, mae = model.evaluate(x, y, batch_size=4, verbose=1)
    assert loss == pytest.approx(mse_rows(0.5 * x, y).mean(), rel=1e-12)
    out = fake.getvalue()
    assert "Epoch" not in out and out.startswith("\r") and out.endswith("\n")
    final = screen(out)[-2]
    assert re.fullmatch(rf"3/3 \[={{30}}\] - \d+s \d+(us|ms|s)/step - loss: {loss:.4f} - mae: {mae:.4f}",
                        final), final


def test_evaluate_bar_redraws_with_eta_and_running_logs():
    stream = io.StringIO()
    model = frozen_model(Recorder(w=0.5))
    model.evaluate(row_ids(6), np.ones((6, 1)), batch_size=2, verbose=1,
                   callbacks=[ProgbarLogger(interval=0.0, stream=stream, interactive=True)])
    out = stream.getvalue()
    first = mse_rows(0.5 * row_ids(2), np.ones((2, 1))).mean()
    assert f"\r1/3 [=========>....................] - ETA: 0s - loss: {first:.4f}" in out, out
    assert re.search(r"\r3/3 \[={30}\] - \d+s \d+(us|ms|s)/step - loss: \d+\.\d{4} *\n$", out), out


@pytest.mark.parametrize("verbose, pattern", [
    (1, r"3/3 \[={30}\] - \d+s \d+(us|ms|s)/step"),
    (2, r"3/3 - \d+s - \d+(us|ms|s)/step"),
])
def test_predict_verbose_prints_a_bar_or_a_final_line(monkeypatch, verbose, pattern):
    fake = _Tty()
    monkeypatch.setattr(sys, "stdout", fake)
    out = frozen_model(Recorder()).predict(row_ids(5), batch_size=2, verbose=verbose)
    assert out.shape == (5, 1)
    lines = screen(fake.getvalue())
    assert lines[-1] == "" and len(lines) == 2, lines
    assert re.fullmatch(pattern, lines[0]), lines[0]  # no logs: the outputs are not shown


def test_predict_verbose_0_prints_nothing(capsys):
    frozen_model(Recorder()).predict(row_ids(5), batch_size=2)
    assert capsys.readouterr().out == ""


def test_fit_validation_prints_no_bar_and_a_reused_logger_then_draws_evaluate(monkeypatch):
    stream = io.StringIO()
    bar = ProgbarLogger(interval=0.0, stream=stream, interactive=True)
    model = frozen_model(Recorder())
    # 6 training rows in 3 steps of 2, 4 validation rows in 2 steps of 2
    model.fit(row_ids(10), np.zeros((10, 1)), epochs=2, batch_size=2, validation_split=0.4, shuffle=False,
              verbose=1, callbacks=[bar])
    lines = screen(stream.getvalue())
    assert [line.split(" [")[0] for line in lines if line] == ["Epoch 1/2", "3/3", "Epoch 2/2", "3/3"]
    assert "/2 [" not in stream.getvalue() and "val_loss" in lines[1]
    stream.seek(0)
    stream.truncate()
    model.evaluate(row_ids(4), np.zeros((4, 1)), batch_size=2, verbose=1, callbacks=[bar])
    assert screen(stream.getvalue())[-2].startswith("2/2 [" + "=" * 30 + "]")


# -- 3. verbose=1 on a non-terminal: whole lines ------------------------------------------------------------
def _run_steps(bar, clock, n, seconds_per_step=1.0):
    bar.on_train_begin()
    bar.on_epoch_begin(0)
    for step in range(n):
        clock.t = (step + 1) * seconds_per_step
        bar.on_train_batch_end(step, {"loss": 1.0})
    bar.on_epoch_end(0, {"loss": 1.0})


def test_non_terminal_prints_a_line_per_tenth_of_the_steps():
    bar, stream, clock = _driven_bar({"verbose": 1, "epochs": 1, "steps": 20}, interactive=False, line_interval=0)
    _run_steps(bar, clock, 20)
    out = stream.getvalue()
    assert "\r" not in out
    counts = [count_of(line) for line in out.splitlines()[1:]]
    assert counts == [f"{k:>2d}/20" for k in range(2, 20, 2)] + ["20/20"]
    assert all("ETA" in line for line in out.splitlines()[1:-1])


def test_non_terminal_lines_are_at_least_line_interval_apart():
    bar, stream, clock = _driven_bar({"verbose": 1, "epochs": 1, "steps": 20}, interactive=False)
    _run_steps(bar, clock, 20)  # one second a step, line_interval 5 s
    counts = [count_of(line) for line in stream.getvalue().splitlines()[1:]]
    assert counts == [" 5/20", "10/20", "15/20", "20/20"]


def test_non_terminal_with_unknown_steps_spaces_lines_out():
    bar, stream, clock = _driven_bar({"verbose": 1, "epochs": 1, "steps": None}, interactive=False)
    _run_steps(bar, clock, 60)
    counts = [count_of(line) for line in stream.getvalue().splitlines()[1:]]
    # gaps of max(5 s, half the time elapsed at the previous line)
    assert counts == ["5/Unknown", "10/Unknown", "15/Unknown", "23/Unknown", "35/Unknown", "53/Unknown", "60/60"]


# -- verbose="auto" -------------------------------------------------------------------------------------------
def test_auto_verbose_is_1_on_a_terminal_and_2_on_a_file_or_slurm_log(monkeypatch):
    monkeypatch.setattr(sys, "stdout", _Tty())
    assert _resolve_verbose("auto") == 1
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.delenv("PYCHARM_HOSTED", raising=False)
    assert _resolve_verbose("auto") == 2


def test_auto_verbose_is_1_in_a_notebook(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # ipykernel's stream is no tty
    monkeypatch.delenv("PYCHARM_HOSTED", raising=False)
    monkeypatch.setattr(dfit.plotting, "in_notebook", lambda: True)
    assert _resolve_verbose("auto") == 1
