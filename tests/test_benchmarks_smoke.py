"""The benchmark harness runs end to end in a tiny mode and prints well-formed tables.

Never asserts a time or a ratio's value (that is what benchmarks/RESULTS.md is for): only that every
runner produced a row, the numbers parse, and the baseline's ratio to itself is 1.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def _run(args: list[str], timeout: int = 240) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=str(REPO),
                       timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r.stdout


def _table(text: str, first_header_cell: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header_cell} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert set(lines[start + 1].replace("|", "").strip()) <= {"-"}
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    assert all(len(r) == len(header) for r in rows), (header, rows)
    return header, rows


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_run_quick_prints_every_runner_and_does_not_touch_results(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = _run([str(BENCH / "run.py"), "--quick", "--samples", "512", "--rounds", "1", "--wide-rounds", "1",
                "--runners", "hand,dfit", "--configs", "SMALL,SMALL+shuf,WIDE", "--import-repeats", "1",
                "--results", str(results)])
    header, rows = _table(out, "config")
    assert header[:6] == ["config", "runner", "procs", "rounds", "samples/s", "µs/step"]
    seen = {(r[0], r[1], r[2]) for r in rows}
    for cfg in ("SMALL", "SMALL+shuf", "WIDE"):
        assert (cfg, "hand-written loop (slicing)", "1") in seen
        assert (cfg, "hand-written DDP loop (slicing)", "2") in seen
        assert (cfg, "dfit fit()", "1") in seen
        assert (cfg, "dfit fit()", "2") in seen
    for r in rows:
        assert _num(r[4]) > 0 and _num(r[5]) > 0
        ratio = _num(r[6])
        assert ratio > 0
        if r[1].startswith("hand-written") and "DataLoader" not in r[1]:
            assert ratio == 1.0
    imp_header, imp_rows = _table(out, "import")
    assert {r[0] for r in imp_rows} >= {"import torch", "import dfit"}
    assert "Targets (issue 6):" in out
    assert re.search(r"SMALL dfit / hand-written loop \(slicing\), 1 proc: \d", out)
    # --results given: the report is appended there, and only there
    text = results.read_text()
    assert "| config | runner |" in text and "Machine:" in text


def test_datapath_quick():
    out = _run([str(BENCH / "datapath.py"), "--rounds", "1", "--samples", "1024", "--batch", "64", "--no-append"])
    header, rows = _table(out, "batch")
    ways = {r[1] for r in rows}
    assert {"slice", "DataLoader(TensorDataset)", "dfit adapter, shuffle=False"} <= ways
    assert all(_num(r[2]) > 0 for r in rows)


def test_memory_quick_measures_both_workers():
    out = _run([str(BENCH / "memory.py"), "--gb", "0.01", "--methods", "fork", "--inputs", "torch",
                "--no-append"], timeout=280)
    header, rows = _table(out, "start method")
    assert len(rows) == 1
    assert rows[0][0] == "fork"
    assert len(rows[0][3].split(",")) == 2  # one USS figure per worker


def test_gpu_benchmark_skips_without_cuda_and_runs_a_cpu_smoke():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu.py itself")
    assert "skipped" in _run([str(BENCH / "gpu.py")])
    out = _run([str(BENCH / "gpu.py"), "--cpu-smoke", "--models", "resnet,transformer",
                "--precisions", "32,bf16-mixed", "--no-append"])
    header, rows = _table(out, "workload")
    assert {(r[0], r[1]) for r in rows} == {("resnet", "32"), ("resnet", "bf16-mixed"),
                                            ("transformer", "32"), ("transformer", "bf16-mixed")}
    assert all(_num(r[4]) > 0 and _num(r[5]) > 0 for r in rows)


def _rows_by(rows: list[list[str]]) -> dict[tuple[str, str], list[str]]:
    return {(r[0], r[1]): r for r in rows}


def test_callbacks_benchmark_tiny(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = _run([str(BENCH / "callbacks.py"), "--rounds", "1", "--samples", "256", "--results", str(results)])
    header, rows = _table(out, "processes")
    assert header[:4] == ["processes", "variant", "rounds", "median µs/step"]
    got = _rows_by(rows)
    for world in ("1", "2"):
        assert _num(got[(world, "fit, no callbacks")][4]) == 1.0
        row = got[(world, "fit + ModelCheckpoint + EarlyStopping + CSVLogger")]
        assert _num(row[3]) > 0 and _num(row[4]) > 0
    assert re.search(r"- 2 process\(es\): callbacks / none = \d+\.\d+ \(target <= 1.02\)", out)
    assert re.search(r"epoch-end work alone .* \d+\.\d ms per epoch", out)
    assert "### Callbacks (issue 13)" in results.read_text()


def test_streams_benchmark_tiny():
    out = _run([str(BENCH / "streams.py"), "--rounds", "1", "--samples", "256", "--no-append"])
    header, rows = _table(out, "processes")
    got = _rows_by(rows)
    for world in ("1", "2"):
        assert _num(got[(world, "arrays")][4]) == 1.0
        for variant in ("generator (default mode)", "generator, agreement every step (k=1)",
                        "dfit.data.per_rank(fn)"):
            assert _num(got[(world, variant)][3]) > 0 and _num(got[(world, variant)][4]) > 0
    assert re.search(r"- 2 process\(es\): generator / arrays = \d+\.\d+, per_rank / arrays = \d+\.\d+", out)


def test_resume_benchmark_tiny(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = _run([str(BENCH / "resume.py"), "--rounds", "1", "--samples", "512", "--micro", "0,64",
                "--micro-batches", "256", "--micro-samples", "512", "--micro-repeats", "1", "--results", str(results)])
    header, rows = _table(out, "processes")
    got = _rows_by(rows)
    assert _num(got[("1", "fit, no callbacks")][4]) == 1.0
    for variant in ("BackupAndRestore(save_freq=100)", "BackupAndRestore(epoch, handle_signals=False)",
                    "BackupAndRestore(epoch, handle_signals=True)"):
        assert _num(got[("1", variant)][3]) > 0 and _num(got[("1", variant)][4]) > 0
    assert ("2", "fit, no callbacks") not in got   # one process unless --worlds asks for more
    m_header, m_rows = _table(out, "global batch")
    assert [(r[0], r[1]) for r in m_rows] == [("256", "whole batch (None)"), ("256", "64")]
    assert all(_num(r[3]) > 0 and _num(r[5]) > 0 for r in m_rows)
    assert _num(m_rows[0][4]) == 1.0
    assert re.search(r"- 1 process\(es\): BackupAndRestore\(save_freq=100\) / none = \d+\.\d+ \(target <= 1.05\)",
                     out)
    assert re.search(r"handle_signals armed / not = \d+\.\d+", out)
    assert "### Resume (issue 14)" in results.read_text()


def test_shuffle_benchmark_quick():
    out = _run([str(BENCH / "shuffle.py"), "--quick", "--no-append"])
    _, setup = _table(out, "n")
    assert setup[0][0] == "1e9" and all(_num(c) >= 0 for c in setup[0][1:])
    _, per_step = _table(out, "per step")
    assert len(per_step) == 5 and per_step[0][2] == "100.00 %"
    assert all(_num(r[1]) > 0 for r in per_step)
    whole = out[out.index("| n | way"):]
    _, passes = _table(whole, "n")
    assert [r[1] for r in passes] == ["DistributedSampler", "dfit former", "dfit now"]
    assert all(_num(r[2]) >= 0 for r in passes)
