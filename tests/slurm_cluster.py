"""A throw-away one-node Slurm cluster on localhost, for the launcher tests.

Debian's ``slurm-wlm`` and ``munge`` packages are enough; nothing is written outside ``workdir`` except
munged's socket (the system munged is started when it is not running and left running). The cluster uses
free ports, so concurrent test runs do not collide, and two fake GPUs (``gres/gpu`` without device files)
so the GPU sbatch templates can be submitted unchanged on a CPU machine.

Usage from a shell:  python tests/slurm_cluster.py start DIR   (prints ``export SLURM_CONF=...``)
                     python tests/slurm_cluster.py stop DIR
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

FAKE_GPUS = 2


def available() -> str | None:
    """None when a local Slurm can be started here, else the reason it cannot."""
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "srun", "sinfo", "munged") if not shutil.which(b)
               and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return "Slurm is not installed (missing " + ", ".join(missing) + "; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting a local Slurm needs root (slurmd runs jobs as the submitting user)"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_ok() -> bool:
    try:
        enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if enc.returncode != 0:
            return False
        dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, timeout=10)
        return dec.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_munge() -> None:
    """Start the system munged (as the munge user) unless it already answers."""
    if _munge_ok():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run([shutil.which("mungekey") or "/usr/sbin/mungekey", "--create"], check=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    run_dir.chmod(0o755)
    subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged")], check=True)
    for _ in range(100):
        if _munge_ok():
            return
        time.sleep(0.05)
    raise RuntimeError("munged did not start")


def _node_line() -> str:
    out = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(tok.split("=", 1) for tok in out.split("\n")[0].split() if "=" in tok)
    mem = int(int(fields.get("RealMemory", "1024")) * 0.8)  # below the real figure: never drained as "low"
    keep = ("NodeName", "CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    return (" ".join(f"{k}={fields[k]}" for k in keep if k in fields)
            + f" RealMemory={mem} Gres=gpu:{FAKE_GPUS} NodeAddr=127.0.0.1 State=UNKNOWN")


def write_config(workdir: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    conf = workdir / "slurm.conf"
    conf.write_text(f"""# one-node test cluster written by tests/slurm_cluster.py
ClusterName=dfittest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
KillOnBadExit=1
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
{_node_line()}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    # Fake GPUs: Slurm drops file-less GPUs, so give it character devices that are copies of /dev/null
    # (plain files if mknod is not allowed: slurmd then logs an error but still counts them).
    # The CPU build of torch sees no CUDA in the jobs, which therefore run on gloo.
    for i in range(FAKE_GPUS):
        dev = workdir / f"fakegpu{i}"
        if not dev.exists():
            try:
                os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            except OSError:
                dev.touch()
    (workdir / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={workdir}/fakegpu[0-{FAKE_GPUS - 1}]\n")
    return conf


def _env(conf: Path) -> dict:
    return {**os.environ, "SLURM_CONF": str(conf)}


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def running(workdir: Path) -> bool:
    return _alive(_pid(workdir / "slurmctld.pid")) and _alive(_pid(workdir / "slurmd.pid"))


def start(workdir: str | os.PathLike, timeout: float = 30.0) -> Path:
    """Start munged (if needed), slurmctld and slurmd; wait for the node to be idle. Returns slurm.conf."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "slurm.conf"
    if conf.exists() and running(workdir):
        return conf
    ensure_munge()
    conf = write_config(workdir)
    env = _env(conf)
    subprocess.run([_sbin("slurmctld"), "-c", "-i"], env=env, check=True)  # -c: clean state
    subprocess.run([_sbin("slurmd"), "-c"], env=env, check=True)
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        state = res.stdout.strip()
        if state == "idle":
            return conf
        if state.startswith("inval"):
            break
        if state.startswith(("drain", "down")):
            subprocess.run(["scontrol", "update", f"nodename={socket.gethostname().split('.')[0]}",
                            "state=resume"], env=env, capture_output=True)
        time.sleep(0.2)
    logs = "".join((workdir / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log")
                   if (workdir / f).exists())
    stop(workdir)
    raise RuntimeError(f"the local Slurm node did not become idle (last state {state!r})\n{logs}")


def stop(workdir: str | os.PathLike) -> None:
    """Stop slurmd and slurmctld by the PIDs in their pid files (munged is left running)."""
    workdir = Path(workdir)
    for name in ("slurmd", "slurmctld"):
        pid = _pid(workdir / f"{name}.pid")
        if not _alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    cmd, directory = sys.argv[1], sys.argv[2]
    if cmd == "start":
        print(f"export SLURM_CONF={start(directory)}")
    elif cmd == "stop":
        stop(directory)
    else:
        raise SystemExit(f"unknown command {cmd}")
