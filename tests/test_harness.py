"""The test harness itself: subprocess jobs and ranks end with everything they started; a port taken between
free_port() and the rendezvous is retried."""
from __future__ import annotations

import socket
import sys

import pytest

import ranks
from conftest import launch_env, run_job, wait_no_process

pytestmark = pytest.mark.timeout(180)


def _sleeper_code(tag: str) -> str:
    """Python that starts a grandchild carrying ``tag`` on its command line, then sleeps."""
    return ("import subprocess, sys, time\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', {tag!r}])\n"
            "print('started', flush=True)\n"
            "time.sleep(300)\n")


def test_run_job_returns_the_output_and_exit_code():
    res = run_job([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                  timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")


def test_run_job_timeout_kills_the_whole_process_group(tag):
    with pytest.raises(AssertionError, match=r"did not end within 3 s; its processes were killed(.|\n)*started"):
        run_job([sys.executable, "-c", _sleeper_code(tag), tag], timeout=3, env=launch_env())
    assert wait_no_process(tag, timeout=10) == []


def _rank_that_hangs(tag: str) -> None:
    import subprocess
    import time

    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", tag])
    time.sleep(300)


def test_run_ranks_timeout_kills_each_rank_and_what_it_started(tag):
    with pytest.raises(AssertionError, match=r"ranks \[0, 1\] gave no result within 5 s"):
        ranks.run_ranks(_rank_that_hangs, 2, tag, timeout=5)
    assert wait_no_process(tag, timeout=10) == []


def _world_sum() -> tuple[int, int]:
    import torch

    import dfit

    dfit.distributed.init()
    t = torch.tensor([dfit.distributed.rank() + 1.0])
    torch.distributed.all_reduce(t)
    return dfit.distributed.world_size(), int(t.item())


def test_run_ranks_retries_when_the_port_is_taken(monkeypatch):
    """The race free_port() leaves open, forced: the first port handed out is already listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        handed: list[int] = []
        real = ranks.free_port

        def racy_free_port() -> int:
            handed.append(busy.getsockname()[1] if not handed else real())
            return handed[-1]

        monkeypatch.setattr(ranks, "free_port", racy_free_port)
        assert ranks.run_ranks(_world_sum, 2, timeout=60) == [(2, 3), (2, 3)]
    assert len(handed) == 2 and handed[0] != handed[1]


def test_run_ranks_does_not_retry_other_failures(monkeypatch):
    calls: list[int] = []
    real = ranks.free_port
    monkeypatch.setattr(ranks, "free_port", lambda: calls.append(1) or real())
    with pytest.raises(AssertionError, match=r"rank \d:\n(.|\n)*ZeroDivisionError"):
        ranks.run_ranks(_divide_by_zero, 2, timeout=60)
    assert len(calls) == 1


def _divide_by_zero() -> float:
    return 1 / 0
