"""Faults injected for real (issue 15): damaged and hostile checkpoints, a writer killed mid-save, a killed
launcher, a stalled rank. Each multi-process test has a timeout and its own free ports."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dfit
from dfit import serialization
from dfit.serialization import CheckpointError
from conftest import REPO, _kill_job, launch_env, listening_sockets, ports_of, run_job, tagged_pids
from core_helpers import F64

pytestmark = pytest.mark.timeout(120)


def _model(seed: int = 1) -> dfit.Sequential:
    torch.manual_seed(seed)
    model = dfit.Sequential([nn.Linear(3, 4, dtype=F64), nn.Tanh(), nn.Linear(4, 2, dtype=F64)], name="net")
    model.compile(optimizer="adam", loss="mse")
    return model


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def _assert_unchanged(model, before: dict) -> None:
    after = model.module.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)


def _loaders(path: str):
    """Every way dfit reads a checkpoint, each on a fresh model of the saved architecture."""
    def weights():
        _model(7).load_weights(path)

    def model():
        dfit.load_model(path)

    def backup():
        from dfit.resume import FitState  # noqa: F401 - read_backup only needs its check()

        cb = dfit.callbacks.BackupAndRestore(os.path.dirname(path))

        class _Fit:
            def check(self, payload, where):
                return None

        cb.read_backup(_Fit())

    return {"load_weights": weights, "load_model": model, "BackupAndRestore": backup}


# --------------------------------------------------------------------------------------------------
# Damaged and hostile files: a clear error naming the file, nothing loaded, nothing run

@pytest.fixture
def saved(tmp_path):
    """A full model file saved as backup.pt (so BackupAndRestore reads it too) and its model."""
    model = _model()
    path = tmp_path / "backup.pt"
    model.save(str(path))
    return model, path


@pytest.mark.parametrize("keep", [0, 0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("loader", ["load_weights", "load_model", "BackupAndRestore"])
def test_truncated_checkpoint_is_a_clear_error(saved, keep, loader):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=rf"{path} is not a readable checkpoint: not a complete torch zip "
                                              r"archive .*truncated"):
        _loaders(str(path))[loader]()


@pytest.mark.parametrize("loader", ["load_weights", "load_model", "BackupAndRestore"])
def test_random_bytes_are_a_clear_error(saved, loader):
    _, path = saved
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=rf"{path} is not a readable checkpoint"):
        _loaders(str(path))[loader]()


def _record_span(path: Path, suffix: str) -> tuple[int, int]:
    """(offset, size) of the bytes of the zip record whose name ends with ``suffix``."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    header = info.header_offset
    name_len, extra_len = int.from_bytes(data[header + 26:header + 28], "little"), \
        int.from_bytes(data[header + 28:header + 30], "little")
    return header + 30 + name_len + extra_len, info.file_size


@pytest.mark.parametrize("loader", ["load_weights", "load_model", "BackupAndRestore"])
def test_a_flipped_byte_in_tensor_data_is_found_by_the_checksum(saved, loader):
    model, path = saved
    start, size = _record_span(path, "/data/0")
    data = bytearray(path.read_bytes())
    data[start + size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    before = _weights(model)
    with pytest.raises(CheckpointError, match=rf"{path} is damaged: the checksum \(CRC-32\) of its record "
                                              r"'[^']*/data/0' does not match"):
        _loaders(str(path))[loader]()
    _assert_unchanged(model, before)


def test_every_single_byte_flip_is_refused_or_harmless(tmp_path):
    """Flip each byte of a small weights file in turn: the load fails with a CheckpointError, or it gives exactly
    the saved weights (a byte that nothing reads, e.g. alignment padding). Never other weights."""
    model = dfit.Sequential([nn.Linear(2, 2, dtype=F64)])
    path = tmp_path / "w.pt"
    model.save_weights(str(path))
    data = path.read_bytes()
    want = _weights(model)
    refused = 0
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        path.write_bytes(bytes(flipped))
        other = dfit.Sequential([nn.Linear(2, 2, dtype=F64)])
        try:
            other.load_weights(str(path))
        except CheckpointError as exc:
            assert str(path) in str(exc)
            refused += 1
            continue
        got = other.module.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), f"byte {i}"
    assert refused > len(data) // 2  # the bytes that matter: headers, the pickle, the tensor data


def test_a_checkpoint_of_another_model_names_the_keys(tmp_path):
    path = tmp_path / "w.pt"
    _model().save_weights(str(path))
    other = dfit.Sequential([nn.Linear(3, 4, dtype=F64), nn.Linear(4, 3, dtype=F64), nn.ReLU(),
                             nn.Linear(3, 1, dtype=F64)])
    before = _weights(other)
    with pytest.raises(CheckpointError) as info:
        other.load_weights(str(path))
    message = str(info.value)
    assert message.startswith(f"{path} does not fit this model (Sequential): ")
    assert "missing keys: linear_2.weight, linear_2.bias" in message
    assert "shape mismatches: linear_1.weight (file (2, 4), model (3, 4)), linear_1.bias (file (2,), model (3,))" \
        in message
    _assert_unchanged(other, before)  # nothing half-loaded
    with pytest.raises(CheckpointError, match=r"holds a list, not a state dict"):
        torch.save([1, 2], str(path))
        other.load_weights(str(path))


class _CreatesAFile:
    """Unpickling this runs ``open(marker, "w")``: what a hostile checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch zip", "plain pickle"])
@pytest.mark.parametrize("loader", ["load_weights", "load_model", "BackupAndRestore"])
def test_a_pickle_that_would_run_code_runs_nothing(tmp_path, container, loader):
    marker = tmp_path / "pwned"
    path = tmp_path / "backup.pt"
    payload = {"format": serialization.FORMAT, "state_dict": {"w": _CreatesAFile(str(marker))}}
    if container == "torch zip":
        torch.save(payload, str(path))  # valid checksums: only the content is hostile
        pickle.loads(pickle.dumps(_CreatesAFile(str(tmp_path / "probe"))))  # the payload does run when unpickled
        assert (tmp_path / "probe").exists()
        match = rf"{path} holds objects other than tensors and plain containers, which dfit never loads"
    else:
        path.write_bytes(pickle.dumps(payload))
        match = rf"{path} is not a readable checkpoint"
    with pytest.raises(CheckpointError, match=match):
        _loaders(str(path))[loader]()
    assert not marker.exists()


def test_checkpoints_of_the_previous_version_still_load(tmp_path):
    """Until now dfit wrote plain ``torch.save`` files: they keep loading (torch's zip records carry CRC-32s)."""
    model = _model()
    torch.save(model.module.state_dict(), str(tmp_path / "old.pt"))
    fresh = _model(9)
    fresh.load_weights(str(tmp_path / "old.pt"))
    _assert_unchanged(fresh, _weights(model))


# --------------------------------------------------------------------------------------------------
# Atomic writes: temporary files are recognisable and the next save removes those of dead writers

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_save_removes_temporary_files_of_dead_writers_only(tmp_path):
    target = tmp_path / "model.pt"
    host = serialization._host()
    prefix = serialization.temp_prefix(str(target))
    dead = tmp_path / f"{prefix}{_dead_pid()}.abc123@{host}"
    alive = tmp_path / f"{prefix}{os.getppid()}.def456@{host}"           # a live writer: left alone
    foreign_new = tmp_path / f"{prefix}1234.ghi789@another-host"          # another host, recent: left alone
    foreign_old = tmp_path / f"{prefix}1234.jkl012@another-host"          # another host, untouched for 2 h
    other_target = tmp_path / f"{serialization.temp_prefix(str(tmp_path / 'b.pt'))}{_dead_pid()}.x@{host}"
    for f in (dead, alive, foreign_new, foreign_old, other_target):
        f.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(foreign_old, (old, old))
    _model().save(str(target))
    assert sorted(os.listdir(tmp_path)) == sorted(["model.pt", alive.name, foreign_new.name, other_target.name])


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "log.txt"
    serialization.atomic_write(str(target), lambda fh: fh.write("old"), mode="w")

    def fail(fh):
        fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        serialization.atomic_write(str(target), fail, mode="w")
    assert os.listdir(tmp_path) == ["log.txt"] and target.read_text() == "old"


def test_killed_while_saving_leaves_a_loadable_checkpoint_and_no_temporary_file(tmp_path):
    """benchmarks/kill_while_saving.py with a few repetitions (its 50-repetition figures are in the closing note)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from kill_while_saving import kill_while_saving
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    figures = kill_while_saving(str(tmp_path), repetitions=4, seed=1, width=300, max_delay=0.3)
    assert figures["failures"] == []
    assert figures["loadable"] == figures["whole_and_not_older"] == 4
    assert figures["temp_files_after_next_save"] == figures["other_files_left"] == 0


# --------------------------------------------------------------------------------------------------
# Multi-process faults under real launchers (tests/fault_job.py)

JOB = REPO / "tests" / "fault_job.py"
PY = sys.executable


def _launcher(name: str, nproc: int = 2) -> list[str]:
    if name == "torchrun":
        return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [PY, "-m", "dfit.launch", "--nproc-per-node", str(nproc)]


def _wait(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("launcher", ["dfit-launch", "torchrun"])
def test_sigkill_of_the_launcher_ends_its_workers(launcher, tmp_path):

    tag = f"dfit-job-{uuid.uuid4().hex[:12]}"
    ready = tmp_path / "ready"
    ready.mkdir()
    env = launch_env(DFIT_TEST_JOB=tag)
    proc = subprocess.Popen(_launcher(launcher) + [str(JOB), "--epochs", "100000", "--step-sleep", "0.005",
                                                   "--ready-dir", str(ready)],
                            env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # (workers end silently: PR_SET_PDEATHSIG)
    try:
        started = _wait(lambda: len(os.listdir(ready)) == 2 or proc.poll() is not None, timeout=120, step=0.2)
        assert started and proc.poll() is None, f"the job did not start training: {proc.stderr.read()[-3000:]}"
        workers = [p for p in tagged_pids(tag) if p != proc.pid]
        ports = ports_of(tagged_pids(tag))
        assert len(workers) >= 2 and ports, (workers, ports)
        proc.kill()
        killed = time.time()
        proc.wait()
        assert _wait(lambda: not tagged_pids(tag), timeout=10), f"{launcher}: workers left: {tagged_pids(tag)}"
        took = time.time() - killed
        # a killed process shows as a zombie while its other threads still exit: its sockets close a moment later
        assert _wait(lambda: not ports & set(listening_sockets().values()), timeout=5), \
            f"{launcher}: ports still listening: {ports & set(listening_sockets().values())}"
        print(f"\n[launcher SIGKILLed] {launcher}: every worker ended {took:.2f} s later; "
              f"ports {sorted(ports)} closed")
    finally:
        _kill_job(proc.pid, tag)


@pytest.mark.timeout(150)
def test_dfit_launch_leaves_no_folder_in_the_temp_directory(tmp_path):

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = tmp / f"dfit-launch-logs-{_dead_pid()}-abc"         # left by a SIGKILLed launcher: removed
    live = tmp / f"dfit-launch-logs-{os.getpid()}-def"         # a launcher still running: kept
    dead.mkdir()
    live.mkdir()
    res = run_job(_launcher("dfit-launch") + [str(JOB), "--epochs", "1"], timeout=120,
                  env=launch_env(TMPDIR=str(tmp)))
    assert res.returncode == 0, res.stderr[-3000:]
    # torchinductor_<user> is torch's compile cache, one per user and shared by every run (not a per-run folder)
    assert sorted(n for n in os.listdir(tmp) if not n.startswith("torchinductor_")) == [live.name]


STALL_TIMEOUT = 5


@pytest.mark.timeout(180)
@pytest.mark.parametrize("launcher, nproc", [("dfit-launch", 3), ("torchrun", 2)])
def test_a_stalled_rank_is_named_by_every_rank(launcher, nproc, tmp_path):
    """Rank 1 sleeps inside a step: the ranks waiting for it time out after DFIT_TIMEOUT and name it; rank 1
    says it stopped making progress and where; the job ends non-zero with nothing left running."""

    stamp, report = tmp_path / "stall", tmp_path / "report.log"
    extra = ["--error-report", str(report)] if launcher == "dfit-launch" else []
    res = run_job(_launcher(launcher, nproc) + extra + [str(JOB), "--epochs", "3", "--stall-rank", "1",
                                                        "--stall-seconds", "300", "--stall-stamp", str(stamp)],
                  timeout=150, env=launch_env(DFIT_TIMEOUT=str(STALL_TIMEOUT)))
    ended = time.time()
    assert res.returncode != 0
    text = res.stdout + res.stderr + (report.read_text() if report.exists() else "")
    waiting = [r for r in range(nproc) if r != 1]
    for r in waiting:  # each waiting rank says it on its stderr at once (the launcher may end it right after)
        assert (f"[rank{r}]: [dfit] CollectiveTimeout: a collective timed out after {STALL_TIMEOUT} s (DFIT_TIMEOUT) "
                f"on rank {r}: rank 1 stopped making progress") in res.stderr, text[-4000:]
    assert "CollectiveTimeout: a collective timed out" in (text.split("dfit-launch: rank ", 1)[-1]
                                                           if launcher == "dfit-launch" else text)
    assert (f"[rank1]: [dfit] rank 1 stopped making progress: rank {waiting[0]} waited {STALL_TIMEOUT} s "
            "(DFIT_TIMEOUT) for it in a collective; ending it. Its main thread is at:") in res.stderr \
        or (f"rank {waiting[-1]} waited {STALL_TIMEOUT} s" in res.stderr), res.stderr[-4000:]
    assert "time.sleep(self.args.stall_seconds)" in res.stderr  # where the stalled rank was
    took = ended - float(stamp.read_text())
    print(f"\n[stalled rank] {launcher} x{nproc}: job ended {took:.2f} s after the stall began "
          f"(DFIT_TIMEOUT={STALL_TIMEOUT})")
    assert took < STALL_TIMEOUT + 25  # the target is DFIT_TIMEOUT + 10 s (figures in the closing note)


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["sigkill-rank-1", "sigterm-launcher"])
@pytest.mark.parametrize("launcher", ["dfit-launch", "torchrun"])
def test_a_killed_rank_or_a_terminated_launcher_ends_the_job_leaving_nothing(launcher, fault, tmp_path):
    """SIGKILL of one rank mid-training, or SIGTERM to the launcher: the launcher exits non-zero, says what
    happened, and no process of the job or port of its rendezvous is left."""

    tag = f"dfit-job-{uuid.uuid4().hex[:12]}"
    ready = tmp_path / "ready"
    ready.mkdir()
    proc = subprocess.Popen(_launcher(launcher) + [str(JOB), "--epochs", "100000", "--step-sleep", "0.005",
                                                   "--ready-dir", str(ready)],
                            env=launch_env(DFIT_TEST_JOB=tag), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        started = _wait(lambda: len(os.listdir(ready)) == 2 or proc.poll() is not None, timeout=120, step=0.2)
        assert started and proc.poll() is None, f"the job did not start training: {proc.stderr.read()[-3000:]}"
        ports = ports_of(tagged_pids(tag))
        if fault == "sigkill-rank-1":
            victim = next(p for p in tagged_pids(tag) if p != proc.pid and _rank_of(p) == 1)
            os.kill(victim, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGTERM)
        hit = time.time()
        err = proc.communicate(timeout=60)[1]
        took = time.time() - hit
        assert proc.returncode != 0, err[-3000:]
        want = "SIGKILL" if fault == "sigkill-rank-1" else "SIGTERM"
        assert want in err, err[-3000:]
        assert _wait(lambda: not tagged_pids(tag), timeout=10), f"{launcher}: processes left: {tagged_pids(tag)}"
        assert _wait(lambda: not ports & set(listening_sockets().values()), timeout=5), \
            f"{launcher}: ports still listening: {ports & set(listening_sockets().values())}"
        print(f"\n[{fault}] {launcher}: the launcher exited {proc.returncode} {took:.2f} s later; nothing left")
    finally:
        _kill_job(proc.pid, tag)
