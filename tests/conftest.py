"""Shared fixtures. Launcher tests: a clean subprocess environment, process-leak checks, a local Slurm."""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Variables a launcher sets in its children; a test's own job must not inherit the ones of the test runner.
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "DFIT_SPAWN", "DFIT_EXTERNAL_STORE")
_LAUNCH_PREFIXES = ("TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "MV2_", "PALS_", "HYDRA_",
                    "I_MPI_", "PET_")


def launch_env(**extra: str) -> dict:
    """os.environ without any launcher's variables, with this checkout importable and this Python first on
    PATH (so torchrun, dfit-launch, mpiexec from the venv are the ones used)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_job(cmd: list[str], timeout: float, env: dict | None = None, cwd: str | Path = REPO,
            **popen: object) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a new session (its own process group) and return its CompletedProcess (text output).

    On a timeout the whole group is killed (the command and every process it started: a launcher's workers
    cannot outlive it) and an AssertionError carries what it printed so far."""
    tag = f"dfit-job-{uuid.uuid4().hex[:12]}"
    env = dict(env if env is not None else launch_env(), DFIT_TEST_JOB=tag)   # inherited by every descendant
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_job(proc.pid, tag)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} did not end within {timeout} s; its processes were killed.\n"
                             f"stdout:\n{out}\nstderr:\n{err}") from None
    finally:
        _kill_job(proc.pid, tag)  # what the command left running, also in sessions of their own
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_job(pgid: int, tag: str) -> None:
    """Kill the command's process group and every process carrying its tag in the environment (a launcher such
    as torch elastic starts its workers in sessions of their own, outside the group)."""
    _kill_group(pgid)
    needle = f"DFIT_TEST_JOB={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def pids_with(token: str) -> list[int]:
    """PIDs of live processes (not zombies) whose command line contains ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def tagged_pids(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment carries DFIT_TEST_JOB=tag (``run_job`` and ``launch_env``
    tag a job this way; torch elastic's workers inherit it)."""
    needle, found = f"DFIT_TEST_JOB={tag}".encode(), []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0") \
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def listening_sockets() -> dict[int, int]:
    """Listening TCP sockets on this host: inode -> port."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                out[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
    return out


def ports_of(pids: list[int]) -> set[int]:
    """The TCP ports the processes ``pids`` listen on."""
    listening, ports = listening_sockets(), set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and int(target[8:-1]) in listening:
                    ports.add(listening[int(target[8:-1])])
        except OSError:
            continue
    return ports


def wait_no_process(token: str, timeout: float = 10.0) -> list[int]:
    """Wait until no process carries ``token``; returns the ones still alive at the timeout."""
    deadline = time.time() + timeout
    while True:
        left = pids_with(token)
        if not left or time.time() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture
def tag() -> str:
    """A unique token to put on a job's command line, to find its processes afterwards."""
    return f"dfit-test-{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------------------------------------------
# A one-node Slurm on localhost, shared by the xdist workers of one test run (started once, under a lock;
# the last worker to finish stops it).

class LocalSlurm:
    def __init__(self, conf: Path):
        self.conf = conf

    def env(self, **extra: str) -> dict:
        return launch_env(SLURM_CONF=str(self.conf), **extra)

    def submit(self, script: str | Path, args: list[str], options: list[str], output: Path,
               timeout: float = 120.0, env: dict | None = None) -> dict:
        """sbatch the script, wait for the job to end; returns its state, exit code, output and duration."""
        env = env or self.env()
        start = time.time()
        res = subprocess.run(["sbatch", "--parsable", f"--output={output}", *options, str(script), *args],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"sbatch failed: {res.stderr}"
        job = res.stdout.strip().split(";")[0]
        info = self.wait(job, timeout, env)
        info["job_id"] = job
        info["seconds"] = time.time() - start
        info["output"] = output.read_text() if output.exists() else ""
        return info

    def wait(self, job: str, timeout: float, env: dict) -> dict:
        deadline = time.time() + timeout
        fields: dict = {}
        while time.time() < deadline:
            out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True,
                                 text=True).stdout
            fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
            state = fields.get("JobState", "")
            if state and state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"):
                return {"state": state, "exit_code": fields.get("ExitCode", "")}
            time.sleep(0.2)
        subprocess.run(["scancel", job], env=env, capture_output=True)
        raise AssertionError(f"Slurm job {job} did not end within {timeout} s (last: {fields.get('JobState')})")


@pytest.fixture(scope="session")
def slurm():
    sys.path.insert(0, str(Path(__file__).parent))
    import slurm_cluster

    reason = slurm_cluster.available()
    if reason:
        pytest.skip(reason)
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
    base = Path(tempfile.gettempdir()) / f"dfit-slurm-{run_id[:16]}"
    base.mkdir(parents=True, exist_ok=True)
    users = base / "users"
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            conf = slurm_cluster.start(base / "cluster")  # (re)creates base if the other worker removed it
            count = int(users.read_text()) if users.exists() else 0
            users.write_text(str(count + 1))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    yield LocalSlurm(conf)
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            count = int(users.read_text()) - 1
            users.write_text(str(count))
            if count <= 0:
                slurm_cluster.stop(base / "cluster")
                shutil.rmtree(base, ignore_errors=True)  # a worker still arriving recreates it
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
