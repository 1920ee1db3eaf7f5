"""How ``dfit-launch`` reports a failing rank: a few lines on stderr, the full torch elastic report in a file.

The short form names the rank, its exception and the last frames of the traceback that are in the user's
own files (plus the frame that raised, wherever it is); the launcher's and runpy's frames never show.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from typing import Any, Iterable

USER_FRAMES = 3
_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line \d+')
_CARETS = re.compile(r"^\s*[\^~]+\s*$")


def _library_dirs() -> tuple[str, ...]:
    import torch

    dfit_dir = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))  # site-packages
    return tuple(os.path.join(d, "") for d in (dfit_dir, torch_dir, sys.base_prefix, sys.prefix))


def _is_launcher_frame(path: str) -> bool:
    """Frames that only start the user's script: runpy, dfit.launch, torch elastic's record wrapper."""
    return (path.startswith("<frozen runpy") or path.endswith(os.sep + "runpy.py")
            or path.endswith(os.path.join("dfit", "launch.py"))
            or path.endswith(os.path.join("elastic", "multiprocessing", "errors", "__init__.py")))


def _frames(callstack: str) -> tuple[list[list[str]], list[str]]:
    """The frames (each its lines, carets dropped) and the exception lines of the LAST traceback in
    ``callstack`` (the exception that ended the process, after any chained ones)."""
    lines = callstack.rstrip("\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    lines = lines[starts[-1] + 1:] if starts else lines
    frames: list[list[str]] = []
    tail: list[str] = []
    for line in lines:
        if _FRAME.match(line):
            frames.append([line])
        elif frames and line.startswith("    ") and not tail:
            if not _CARETS.match(line):
                frames[-1].append(line)
        elif line.strip():
            tail.append(line)
    return frames, tail


def short_traceback(callstack: str, user_frames: int = USER_FRAMES) -> list[str]:
    """The last ``user_frames`` frames in the user's files, and the frame that raised (if elsewhere)."""
    frames, tail = _frames(callstack)
    frames = [f for f in frames if not _is_launcher_frame(_FRAME.match(f[0])["file"])]
    if not frames:
        return tail
    library = _library_dirs()
    user = [i for i, f in enumerate(frames) if not os.path.abspath(_FRAME.match(f[0])["file"]).startswith(library)]
    keep = sorted(set(user[-user_frames:]) | {len(frames) - 1})
    out = ["Traceback (most recent call last):"]
    previous = -1
    for i in keep:
        if i > previous + 1:
            out.append(f"  ... {i - previous - 1} more frame{'s' if i - previous - 1 > 1 else ''}")
        out += frames[i]
        previous = i
    return out + tail


def failure_message(failure: Any) -> tuple[str, str]:
    """(exception text, traceback text) of a torch elastic ``ProcessFailure``; empty without an error file."""
    message = failure.message
    if isinstance(message, dict):
        return message.get("message", ""), message.get("extraInfo", {}).get("py_callstack", "")
    has_file = failure.error_file_data and failure.error_file_data.get("message")
    return (str(message) if has_file else ""), ""


def describe_exit(failure: Any) -> str:
    if failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    return f"failed with exit code {failure.exitcode}"


def brief_rank_failure(global_rank: int, failure: Any, first: bool) -> list[str]:
    """The failing rank, its exception and a short traceback."""
    text, callstack = failure_message(failure)
    tag = " (first failure)" if first else ""
    head = f"dfit-launch: rank {global_rank} (local rank {failure.local_rank}) {describe_exit(failure)}{tag}"
    if not text:
        return [head + ": no Python exception was recorded (its stderr above may say why)"]
    lines = short_traceback(callstack)
    if lines and lines[-1] == text:  # the header says it already
        lines.pop()
    return [f"{head}: {text}"] + lines


def _ranks(ranks: Iterable[int]) -> str:
    ranks = sorted(ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def brief_report(err: Any, report_path: str | None) -> str:
    """A few lines: the first failure in full, the other ranks in one line, where the full report is."""
    first_rank, first = err.get_first_failure()
    lines = brief_rank_failure(first_rank, first, first=len(err.failures) > 1)
    others = {r: f for r, f in err.failures.items() if r != first_rank}
    ended = [r for r, f in others.items() if f.exitcode < 0]
    failed = [r for r, f in others.items() if f.exitcode >= 0]
    if failed:
        lines.append(f"dfit-launch: {_ranks(failed)} failed too, after rank {first_rank}")
    if ended:
        lines.append(f"dfit-launch: {_ranks(ended)} ended by the launcher after the first failure")
    where = (f"full report (every rank, whole tracebacks): {report_path}" if report_path
             else "the full report could not be saved; rerun with --verbose-errors")
    lines.append(f"dfit-launch: the job failed; {where}")
    return "\n".join(lines)


def full_report(err: Any) -> str:
    """torch's root-cause block, then one line per failed rank: its exit code and exception (as before)."""
    lines = [str(err).rstrip(), ""]
    first_rank, _ = err.get_first_failure()
    ordered = sorted(err.failures.items(), key=lambda item: (item[0] != first_rank, item[0]))
    for global_rank, failure in ordered:
        text, _ = failure_message(failure)
        who = f"dfit-launch: rank {global_rank} (local rank {failure.local_rank})"
        if global_rank != first_rank and failure.exitcode < 0:
            lines.append(f"{who} was ended by the launcher ({failure.signal_name()}) after the first failure")
            continue
        tag = " (first failure)" if global_rank == first_rank else ""
        lines.append(f"{who} failed with exit code {failure.exitcode}{tag}: {text or failure.message}")
    lines.append("dfit-launch: every other rank was ended; the job failed")
    return "\n".join(lines)


def default_report_path(log_dir: str | None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(log_dir or tempfile.gettempdir(), f"dfit-launch-failure-{stamp}-{os.getpid()}.log")


def save_report(path: str, err: Any, command: list[str], log_lines: list[str]) -> str | None:
    """Write the full report (and the launcher's log lines about ending the workers) to ``path``; returns the
    path, or None when it cannot be written."""
    text = [f"dfit-launch failure report, {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "command: " + " ".join(command), "", full_report(err)]
    if log_lines:
        text += ["", "torch elastic log:"] + log_lines
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            fh.write("\n".join(text) + "\n")
    except OSError:
        return None
    return os.path.abspath(path)
