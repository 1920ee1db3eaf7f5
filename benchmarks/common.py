"""Shared pieces of the benchmark harness: data, models, machine description, ports, memory.

Everything here is deterministic so that every process (every runner, every rank) builds the same
data and the same initial weights without talking to the others.
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

N_SAMPLES = 32768
N_FEATURES = 64
N_CLASSES = 10
LR = 0.01

# name -> (hidden width, global batch size)
MODELS = {
    "SMALL": (256, 64),
    "WIDE": (2048, 256),
}


def make_data(n: int = N_SAMPLES, seed: int = 0):
    """X (n, 64) float32 and integer labels y in [0, 10), the same in every process."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g, dtype=torch.float32)
    y = torch.randint(0, N_CLASSES, (n,), generator=g, dtype=torch.int64)
    return x, y


def make_module(name: str, seed: int = 0):
    """MLP 64-h-h-10 with ReLU; identical initial weights in every process."""
    import torch
    from torch import nn

    hidden, _ = MODELS[name]
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(N_FEATURES, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, N_CLASSES),
    )


def steps_per_epoch(n: int, batch: int) -> int:
    return -(-n // batch)


def local_slice(start: int, stop: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous part of global batch [start, stop): sizes differ by at most one."""
    size = stop - start
    base, rem = divmod(size, world)
    lo = start + rank * base + min(rank, rem)
    return lo, lo + base + (1 if rank < rem else 0)


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free a moment ago (all held open while choosing)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ddp_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for a worker (what dfit, Lightning and Accelerate detect)."""
    return {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
        "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "ROLE_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }


def clean_env() -> dict[str, str]:
    """The parent's environment without any launcher variables, with the repo importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                        "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                        "DFIT_SPAWN")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    # one compute thread per process, also for libraries that read these before torch does
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.setdefault("KERAS_BACKEND", "torch")
    return env


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "dfit"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty(dfit)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, str]:
    import torch

    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": git_commit(),
    }


def memory_of(pid: int) -> dict[str, int]:
    """USS / PSS / RSS of a process in bytes, from /proc/PID/smaps_rollup (psutil if that is missing)."""
    try:
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
        uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        return {"uss": uss, "pss": fields.get("Pss", 0), "rss": fields.get("Rss", 0)}
    except (OSError, ValueError):
        import psutil  # optional fallback

        info = psutil.Process(pid).memory_full_info()
        return {"uss": info.uss, "pss": getattr(info, "pss", 0), "rss": info.rss}


def descendants(pid: int) -> list[int]:
    """All live descendant pids of `pid` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def median(values):
    s = sorted(values)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def quartiles(values):
    """(q1, q3) by linear interpolation, as numpy's default."""
    s = sorted(values)
    if not s:
        return float("nan"), float("nan")

    def q(p):
        pos = p * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return q(0.25), q(0.75)


def python_for_workers() -> str:
    return sys.executable


def report(title: str, command: str, settings: str, lines: list[str]) -> str:
    """A results section: a dated title with the command, the machine and ``settings``, then ``lines``."""
    info = machine_info()
    return "\n".join([
        f"## {info['date']} — {title}: {command}".rstrip(),
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}; dfit commit {info['commit']}; "
        + settings,
        "",
        *lines,
        "",
    ])


def publish(report: str, results: str | Path, append: bool) -> None:
    """Print a report and, unless told not to, append it to the results file."""
    print(report)
    if append:
        path = Path(results)
        if not path.exists():
            path.write_text("# Benchmark results\n\nAppended by the scripts in benchmarks/; newest last.\n\n")
        with path.open("a") as f:
            f.write(report + "\n")
        print(f"appended to {results}")
