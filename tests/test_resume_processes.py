"""Resume with real processes: a rank SIGKILLed mid-epoch under ``dfit-launch --max-restarts 1``, and a job
preempted by SIGTERM under dfit-launch, end with the uninterrupted run's weights and history (rel < 1e-9)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, _kill_job, launch_env, run_job, tagged_pids
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)


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


def _two_node_job(tmp_path: Path, lose: int) -> tuple[list[subprocess.Popen], list[str], list[str]]:
    """Two dfit-launch agents on this machine acting as two nodes of one elastic job (c10d rendezvous, 1 to 2 nodes,
    --max-restarts 1); once a backup exists, node ``lose`` (0 hosts the rendezvous store) is lost: its agent and its
    worker SIGKILLed. Returns the agents, their tags and their stderr."""
    out, backup, ready, started = (tmp_path / name for name in ("out.json", "backup", "ready", "started"))
    port, run_id = _free_port(), f"lost-node-{uuid.uuid4().hex[:8]}"
    node = [*dfit_launch()[:-1], "1", "--nnodes", "1:2", "--max-restarts", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
            "--rdzv-conf", "last_call_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=2",
            str(SCRIPT), "--out", str(out), "--backup", str(backup), "--save-freq", "2",
            "--ready", str(ready), "--ready-step", "7", "--step-sleep", "0.3", "--started", str(started)]
    tags = [f"dfit-job-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    agents, errs = [], ["", ""]
    try:
        for tag in tags:   # the first agent hosts the rendezvous store (the second one starts once it listens)
            agents.append(subprocess.Popen(node, env=launch_env(DFIT_TEST_JOB=tag), cwd=REPO, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, start_new_session=True))
            _wait_listening(port, agents[0])
        deadline = time.time() + 150
        while not ready.exists():
            assert all(a.poll() is None for a in agents) and time.time() < deadline, \
                [a.communicate()[1][-3000:] for a in agents if a.poll() is not None]
            time.sleep(0.05)
        assert (backup / "backup.pt").exists(), "no backup before the node was lost"
        _kill_job(agents[lose].pid, tags[lose])
        lost_at = time.time()
        errs[lose] = agents[lose].communicate(timeout=30)[1]
        errs[1 - lose] = agents[1 - lose].communicate(timeout=200)[1]
        print(f"the surviving agent ended {time.time() - lost_at:.1f} s after the node was lost")
    finally:
        for agent, tag in zip(agents, tags):
            _kill_job(agent.pid, tag)
            agent.wait(timeout=30)
    assert not [pid for tag in tags for pid in tagged_pids(tag)], "a process of the job is left behind"
    return agents, tags, errs


def test_a_lost_node_re_forms_on_the_survivor_and_resumes(tmp_path, uninterrupted):
    """The second node is lost: the first agent's worker fails in its next collective, the agent re-forms the job
    alone, the worker restores the backup on one process and finishes with the uninterrupted run's weights and
    history."""
    agents, _, errs = _two_node_job(tmp_path, lose=1)
    assert agents[0].returncode == 0, errs[0][-4000:]
    got = _check(tmp_path / "out.json", uninterrupted)
    assert got["world_size"] == 1 and got["restart"] == "1", (got["world_size"], got["restart"])
    first, again = (tmp_path / "started").read_text().split("\n")[:2]
    assert first == "0:0 2", first          # the job started on two nodes
    position, world = again.split()          # and started again on one, from the backup (not from step 0)
    assert world == "1" and tuple(map(int, position.split(":"))) >= (1, 1), again
    assert not (tmp_path / "backup" / "backup.pt").exists()


def test_losing_the_rendezvous_host_ends_the_job_and_a_restart_resumes(tmp_path, uninterrupted):
    """The node hosting the c10d rendezvous store is lost: the survivor cannot re-form (torch's c10d backend keeps
    the store on that node), so it must END (non-zero, nothing left behind), not hang; the job started again (as a
    scheduler's requeue would) resumes from the backup and ends as the uninterrupted run."""
    agents, _, errs = _two_node_job(tmp_path, lose=0)
    assert agents[1].returncode != 0, errs[1][-4000:]
    assert "dfit-launch: lost the rendezvous store at 127.0.0.1:" in errs[1], errs[1][-4000:]
    assert "dfit/launch.py" not in errs[1], errs[1][-4000:]   # no traceback of the launcher itself
    assert (tmp_path / "backup" / "backup.pt").exists()
    res = run_job(dfit_launch() + [str(SCRIPT), "--out", str(tmp_path / "out.json"), "--backup",
                                   str(tmp_path / "backup"), "--save-freq", "2"], timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _check(tmp_path / "out.json", uninterrupted)["world_size"] == 2


def _slurm_log(slurm, job: str) -> str:
    """slurmctld's lines about ``job`` (for a failure message)."""
    log = Path(slurm.conf).parent / "slurmctld.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return "\n".join(line for line in lines if f"JobId={job}" in line or f"job {job}" in line)[-3000:]


REQUEUE_FIT = ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"]   # this machine (see test_launchers)


def test_a_requeued_slurm_job_resumes_exactly(slurm, tmp_path, uninterrupted):
    """slurm/requeue.sbatch, submitted unchanged: mid-epoch every task gets SIGUSR1 (what --signal=USR1@120 sends
    before the time limit; here from scancel, at a known step), the ranks back up at one agreed step and exit with
    75, the script requeues the job, and the second run resumes from the backup and ends as the uninterrupted one."""
    out, backup, ready = tmp_path / "out.json", tmp_path / "backup", tmp_path / "ready"
    output = tmp_path / "job.out"
    env = slurm.env()
    res = subprocess.run(["sbatch", "--parsable", f"--output={output}", *REQUEUE_FIT,
                          str(REPO / "slurm" / "requeue.sbatch"), str(SCRIPT), "--out", str(out), "--backup",
                          str(backup), "--save-freq", "1000", "--ready", str(ready), "--ready-step", "3",
                          "--step-sleep", "0.2"], env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    deadline = time.time() + 120
    while not ready.exists():
        assert time.time() < deadline, output.read_text() if output.exists() else "no output"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True, timeout=30)
    deadline = time.time() + 120
    while "JobState=PENDING" not in (state := subprocess.run(["scontrol", "-o", "show", "job", job], env=env,
                                                             capture_output=True, text=True).stdout):
        assert time.time() < deadline and any(f"JobState={k}" in state for k in ("RUNNING", "COMPLETING")), \
            (state, output.read_text()[-2000:], _slurm_log(slurm, job))
        time.sleep(0.2)
    # Slurm holds a requeued job for a while (Reason=BeginTime, about two minutes); an operator may release it
    # sooner, but not at once: a start in the same second as the requeue finds the job's credential still revoked
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], env=env, check=True, timeout=30)
    info = slurm.wait(job, 200, env)
    log = output.read_text()
    assert info["state"] == "COMPLETED", (info, log[-3000:])
    assert "dfit: run 0 of job" in log and "dfit: run 1 of job" in log, log[-3000:]
    assert "requeueing job" in log and "dfit: preempted; backup written" in log, log[-3000:]
    got = _check(out, uninterrupted)
    assert got["world_size"] == 2
    assert not (backup / "backup.pt").exists()   # the finished run removed its backup
