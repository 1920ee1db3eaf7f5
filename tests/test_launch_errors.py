"""dfit-launch's short traceback: the launcher's frames dropped, the user's last frames and the raising one kept."""
from __future__ import annotations

import os

import torch

import dfit
from dfit.launch_errors import short_traceback

DFIT = os.path.dirname(dfit.__file__)
TORCH = os.path.dirname(torch.__file__)


def _frame(path, line, func, code, carets=False):
    out = f'  File "{path}", line {line}, in {func}\n    {code}\n'
    return out + ("    ^^^^^^^^\n" if carets else "")


def test_short_traceback_keeps_user_frames_and_the_raising_frame():
    stack = ("Traceback (most recent call last):\n"
             + _frame("<frozen runpy>", 198, "_run_module_as_main", "x")
             + _frame(os.path.join(DFIT, "launch.py"), 210, "<module>", "main()")
             + _frame("/home/me/train.py", 40, "<module>", "main()")
             + _frame("/home/me/train.py", 30, "main", "model.fit(x, y)", carets=True)
             + _frame(os.path.join(DFIT, "model.py"), 228, "fit", "logs = engine.train_epoch()")
             + _frame(os.path.join(DFIT, "engine.py"), 150, "train_epoch", "module(x)")
             + _frame(os.path.join(TORCH, "nn", "modules", "linear.py"), 125, "forward", "return F.linear()")
             + "RuntimeError: mat1 and mat2 shapes cannot be multiplied\n")
    assert short_traceback(stack) == [
        "Traceback (most recent call last):",
        '  File "/home/me/train.py", line 40, in <module>',
        "    main()",
        '  File "/home/me/train.py", line 30, in main',
        "    model.fit(x, y)",
        "  ... 2 more frames",
        f'  File "{os.path.join(TORCH, "nn", "modules", "linear.py")}", line 125, in forward',
        "    return F.linear()",
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied",
    ]


def test_short_traceback_shows_the_last_of_chained_exceptions_and_few_user_frames():
    first = "Traceback (most recent call last):\n" + _frame("/a.py", 1, "f", "g()") + "KeyError: 'x'\n"
    user = "".join(_frame("/home/me/t.py", n, f"f{n}", f"f{n + 1}()") for n in range(1, 7))
    stack = (first + "\nDuring handling of the above exception, another exception occurred:\n\n"
             + "Traceback (most recent call last):\n" + user + "ValueError: no x\n")
    out = short_traceback(stack, user_frames=3)
    assert out[1] == "  ... 3 more frames" and out[-1] == "ValueError: no x"
    assert [line for line in out if line.startswith("  File")] == [
        f'  File "/home/me/t.py", line {n}, in f{n}' for n in (4, 5, 6)]
    assert "KeyError" not in "\n".join(out)
