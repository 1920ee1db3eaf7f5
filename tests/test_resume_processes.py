"""Resume with real processes: a rank SIGKILLed mid-epoch under ``dfit-launch --max-restarts 1``, and a job
preempted by SIGTERM under dfit-launch, end with the uninterrupted run's weights and history (rel < 1e-9)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, launch_env, run_job
from resume_job import relative_difference, train

pytestmark = pytest.mark.timeout(300)
SCRIPT = REPO / "tests" / "launch_resume.py"
EXACT = 1e-9


def dfit_launch() -> list[str]:
    exe = Path(sys.executable).parent / "dfit-launch"
    return ([str(exe)] if exe.exists() else [sys.executable, "-m", "dfit.launch"]) + ["--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def uninterrupted():
    return train(None)


def _check(out: Path, uninterrupted) -> dict:
    got = json.loads(out.read_text())
    weights = [np.asarray(w) for w in got["weights"]]
    assert relative_difference(weights, uninterrupted[0]) < EXACT
    assert relative_difference(got["history"], uninterrupted[1]) < EXACT
    return got


def sigkill_run(tmp_path: Path, timeout: float = 200) -> tuple[subprocess.CompletedProcess, Path]:
    """One job: rank 1 SIGKILLs itself at epoch 2, batch 1; dfit-launch restarts the job, which resumes."""
    out, backup, marker = tmp_path / "out.json", tmp_path / "backup", tmp_path / "killed-once"
    cmd = dfit_launch() + ["--max-restarts", "1", str(SCRIPT), "--out", str(out), "--backup", str(backup),
                           "--kill-rank", "1", "--kill-at", "1:1", "--kill-marker", str(marker)]
    res = run_job(cmd, timeout=timeout)
    assert marker.exists(), "rank 1 was not killed as planned"
    return res, out


def test_sigkill_of_a_rank_mid_epoch_under_max_restarts(tmp_path, uninterrupted):
    res, out = sigkill_run(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = _check(out, uninterrupted)
    assert got["restart"] == "1" and got["world_size"] == 2
    assert not (tmp_path / "backup" / "backup.pt").exists()


def test_sigterm_to_the_job_backs_up_exits_and_resumes(tmp_path, uninterrupted):
    out, backup, ready = tmp_path / "out.json", tmp_path / "backup", tmp_path / "ready"
    cmd = dfit_launch() + [str(SCRIPT), "--out", str(out), "--backup", str(backup), "--save-freq", "1000",
                           "--ready", str(ready), "--ready-step", "3", "--step-sleep", "0.2"]
    proc = subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)   # to the launcher: torchrun forwards it to the workers
        _, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode != 0 and not out.exists()
    assert "dfit: preempted; backup written" in err, err[-3000:]
    assert "exiting with code 75" in err
    import torch

    position = torch.load(backup / "backup.pt", weights_only=True)["position"]
    assert position["in_epoch"] and position["step"] > 0, position   # a mid-epoch backup at the agreed step
    res = run_job(dfit_launch() + [str(SCRIPT), "--out", str(out), "--backup", str(backup), "--save-freq", "1000"],
                  timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    _check(out, uninterrupted)
