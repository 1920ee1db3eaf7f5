"""SIGKILL a process while it saves checkpoints, N times at random moments; check what it leaves (issue 15).

    PYTHONPATH=. python benchmarks/kill_while_saving.py [--repetitions 50] [--seed 0] [--width 1000]

Each repetition forks a writer that saves a model over and over to one path, alternating ``save_weights`` and
``save`` (weights, config, optimizer state), every parameter filled with the save's number; it appends each
number to a log once the save returned. After a random delay the writer is SIGKILLed. Then:
- the checkpoint must load (checksums checked) and be whole: every parameter holds one number, at least the
  last number the writer logged (a newer one when the kill landed between the rename and the log);
- the writer's temporary file, when the kill caught a write half-way, must be gone after the next successful
  save (this process saves once), and nothing else but the checkpoint may remain in the folder.
Prints a JSON line of figures; exits 1 when any repetition broke a rule. ``tests/test_faults.py`` runs 3.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time

import torch
from torch import nn

import dfit
from dfit import serialization


def _model(width: int) -> dfit.Sequential:
    model = dfit.Sequential([nn.Linear(width, 2 * width), nn.Linear(2 * width, 4)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _fill(model: dfit.Sequential, number: int) -> None:
    with torch.no_grad():
        for p in model.module.parameters():
            p.fill_(float(number))


def _writer(model: dfit.Sequential, path: str, log_fd: int, first: int) -> None:
    """The forked child: save forever, logging each finished save's number."""
    number = first
    while True:
        _fill(model, number)
        if number % 2:
            model.save(path)
        else:
            model.save_weights(path)
        os.write(log_fd, f"{number}\n".encode())
        number += 1


def _last_logged(log: str) -> int | None:
    with open(log) as fh:
        lines = [ln for ln in fh.read().split("\n")[:-1] if ln]  # a line without its newline was not finished
    return int(lines[-1]) if lines else None


def _number_in(model: dfit.Sequential, path: str) -> int:
    model.load_weights(path)
    values = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()]).unique()
    if len(values) != 1:
        raise AssertionError(f"{path} mixes saves: parameters hold {values[:5].tolist()}")
    return int(values.item())


def kill_while_saving(folder: str, repetitions: int = 50, seed: int = 0, width: int = 1000,
                      max_delay: float = 0.5) -> dict:
    """Run the experiment in ``folder``; returns the figures (see the module docstring)."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    path = os.path.join(folder, "model.pt")
    log = os.path.join(folder, "saves.log")
    model = _model(width)
    _fill(model, 0)
    model.save_weights(path)
    save_s = []
    for _ in range(3):
        start = time.perf_counter()
        model.save(path)
        save_s.append(time.perf_counter() - start)
    figures = {"repetitions": repetitions, "checkpoint_bytes": os.path.getsize(path),
               "seconds_per_save": round(sorted(save_s)[1], 4), "killed_mid_write": 0, "loadable": 0,
               "whole_and_not_older": 0, "temp_files_after_next_save": 0, "other_files_left": 0, "failures": []}
    previous, number = 0, 1  # the save in the file before the writer starts; the writer's first number
    for rep in range(repetitions):
        open(log, "w").close()
        log_fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        pid = os.fork()
        if pid == 0:  # the writer; never returns
            try:
                _writer(model, path, log_fd, number)
            finally:
                os._exit(1)
        os.close(log_fd)
        time.sleep(rng.uniform(0.0, max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        temps = [n for n in os.listdir(folder) if n.startswith(serialization.temp_prefix(path))]
        figures["killed_mid_write"] += bool(temps)
        logged = _last_logged(log)
        floor = previous if logged is None else logged
        try:
            found = _number_in(model, path)
            figures["loadable"] += 1
            if found >= floor:
                figures["whole_and_not_older"] += 1
            else:
                figures["failures"].append(f"rep {rep}: holds save {found}, older than {floor} (saved before)")
        except Exception as exc:  # noqa: BLE001 - counted and reported
            figures["failures"].append(f"rep {rep}: {type(exc).__name__}: {exc}")
        previous = max(floor, number) + 2  # past anything the writer may have saved (logged or not)
        _fill(model, previous)
        model.save(path)  # the next successful save: removes the dead writer's temporary file
        number = previous + 1
        left = [n for n in os.listdir(folder) if n not in ("model.pt", "saves.log")]
        temps = [n for n in left if n.startswith(serialization.temp_prefix(path))]
        figures["temp_files_after_next_save"] += len(temps)
        figures["other_files_left"] += len(left) - len(temps)
        if left:
            figures["failures"].append(f"rep {rep}: left in the folder after the next save: {left}")
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repetitions", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=1000, help="model: Linear(width, 2*width), Linear(2*width, 4)")
    p.add_argument("--max-delay", type=float, default=0.5, help="the kill comes after uniform(0, this) seconds")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dfit-kill-while-saving-") as folder:
        figures = kill_while_saving(folder, args.repetitions, args.seed, args.width, args.max_delay)
    print(json.dumps(figures))
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
