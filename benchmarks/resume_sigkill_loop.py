"""Run the SIGKILL resume case (tests/test_resume_processes.py) N times and print how many ended exactly.

    PYTHONPATH=. python benchmarks/resume_sigkill_loop.py [N]

Each run: 2 ranks under ``dfit-launch --max-restarts 1``; rank 1 SIGKILLs itself mid-epoch; the restarted job
resumes from BackupAndRestore's backup; success means the final weights and history equal the uninterrupted
run's (float64, relative difference < 1e-9). Not part of CI.
"""
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_resume_processes import _check, sigkill_run  # noqa: E402
from resume_job import train  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    reference = train(None)
    ok, seconds = 0, []
    for k in range(n):
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                res, out = sigkill_run(Path(tmp))
                assert res.returncode == 0, res.stderr[-2000:]
                _check(out, reference)
                ok += 1
                status = "exact"
            except AssertionError as exc:
                status = f"FAILED: {str(exc)[-500:]}"
        seconds.append(time.time() - start)
        print(f"run {k + 1}: {status} ({seconds[-1]:.1f} s)", flush=True)
    print(f"SIGKILL resume: {ok} of {n} runs ended with the uninterrupted weights and history "
          f"(median {sorted(seconds)[len(seconds) // 2]:.1f} s a run)")


if __name__ == "__main__":
    main()
