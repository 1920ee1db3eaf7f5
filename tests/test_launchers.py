"""Real launchers on gloo: torchrun, dfit-launch, mpiexec, multi_gpu_model and a local Slurm (srun, sbatch).

Each launcher trains tests/launch_train.py (float64, plain SGD, a batch size that does not divide the data, a
last global batch smaller than the world) on 2 or 3 processes, and its history, weights, evaluate and predict
must equal, to a relative 1e-9, those of tests/reference_ddp.py, a hand-written torch DDP loop that does not
import dfit, run as 1 process and as 3 processes under torchrun. The failing-rank tests make rank 1 raise at step 3 of epoch 1 and check that the job ends non-zero, names the
rank and the exception, and leaves no process behind; they print how long the job took to end.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, launch_env, run_job, wait_no_process

TRAIN = REPO / "tests" / "launch_train.py"
REFERENCE = REPO / "tests" / "reference_ddp.py"
DIGITS = REPO / "examples" / "digits.py"
PY = sys.executable
RTOL = 1e-9  # float64: N processes == 1 process == the hand-written reference


def run(cmd: list[str], timeout: float = 150, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    """Run a job in its own process group (killed whole on a timeout: no worker outlives it)."""
    return run_job([str(c) for c in cmd], timeout=timeout, env=env, **popen)


def run_stdin(script: str, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python -` reading ``script`` from stdin: its __main__ is a module with no file, as in a notebook."""
    path = tmp_path / "stdin_script.py"
    path.write_text(script)
    with open(path) as stdin:
        return run([PY, "-"], timeout=timeout, stdin=stdin)


def assert_same_history(got: dict, want: dict) -> None:
    """float32 runs (the digits example): equal up to float32 rounding."""
    assert list(got) == list(want), (list(got), list(want))
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=2e-6, err_msg=key)


def relative_difference(got, want) -> float:
    """max |got - want| / max |want| (want not all zero)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_matches(got: dict, want: dict, label: str) -> float:
    """History (same keys, same order), every parameter, evaluate and predict equal to RTOL; returns and
    prints the largest relative difference."""
    assert list(got["history"]) == list(want["history"]), (list(got["history"]), list(want["history"]))
    diffs = {f"history[{k!r}]": relative_difference(got["history"][k], v) for k, v in want["history"].items()}
    assert len(got["weights"]) == len(want["weights"])
    diffs.update({f"weights[{i}]": relative_difference(g, w) for i, (g, w) in enumerate(zip(got["weights"],
                                                                                         want["weights"]))})
    diffs["evaluate"] = relative_difference(got["evaluate"], want["evaluate"])
    diffs["predict"] = relative_difference(got["predict"], want["predict"])
    worst = max(diffs, key=diffs.get)
    print(f"\n[float64] {label}: max relative difference {diffs[worst]:.2e} ({worst})")
    bad = {k: v for k, v in diffs.items() if not v < RTOL}
    assert not bad, f"{label}: relative differences above {RTOL}: {bad}"
    return diffs[worst]


def assert_matches_references(got: dict, references: dict, label: str) -> None:
    for name, want in references.items():
        assert_matches(got, want, f"{label} vs {name}")


def _load(path: Path) -> dict:
    assert path.exists(), f"rank 0 wrote no result to {path}"
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> dict:
    """tests/reference_ddp.py (no dfit) as 1 process and as 3 processes under torchrun."""
    tmp = tmp_path_factory.mktemp("ref")
    found = {}
    for name, prefix, world in (("reference 1 process", [PY], 1),
                                ("reference torchrun 3 processes", _launcher("torchrun", 3), 3)):
        out = tmp / f"reference-{world}.json"
        res = run(prefix + [REFERENCE, "--out", out])
        assert res.returncode == 0, res.stderr[-3000:]
        found[name] = _load(out)
        assert found[name]["world_size"] == world
    return found


@pytest.fixture(scope="session")
def digits_reference(tmp_path_factory) -> dict:
    """The one-process history of examples/digits.py for 2 epochs."""
    out = tmp_path_factory.mktemp("ref") / "digits.json"
    res = run([PY, DIGITS, "--epochs", "2", "--verbose", "0", "--history-out", out])
    assert res.returncode == 0, res.stderr
    return _load(out)


def _launcher(name: str, nproc: int = 2) -> list[str]:
    if name == "torchrun":
        return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    if name == "mpiexec":
        return [_mpiexec(), "-n", str(nproc), PY]
    exe = Path(PY).parent / "dfit-launch"
    return ([str(exe)] if exe.exists() else [PY, "-m", "dfit.launch"]) + ["--nproc-per-node", str(nproc)]


def _mpiexec() -> str:
    exe = Path(PY).parent / "mpiexec"
    if not exe.exists():
        pytest.skip("mpiexec not installed in this environment (pip install 'dfit[mpi]')")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py not installed (pip install 'dfit[mpi]')")
    return str(exe)


# ----------------------------------------------------------------------------------------------------
# N processes == 1 process == the hand-written DDP reference, in float64, under each launcher

@pytest.mark.timeout(150)
def test_reference_is_world_size_invariant_and_trains(references):
    one, three = references.values()
    assert_matches(three, one, "reference torchrun 3 vs reference 1 process")
    loss = one["history"]["loss"]
    # it really trains: gradients move the weights (SGD at lr 0.1 on 7-row batches is noisy from epoch to epoch,
    # so the best later epoch is compared, not the last: with the Feistel shuffle seed 5 gives 3.99, 0.37, 0.97)
    assert min(loss[1:]) < 0.25 * loss[0], loss


@pytest.mark.timeout(150)
@pytest.mark.parametrize("launcher, nproc, environment", [
    ("torchrun", 2, "torchrun"),
    ("dfit-launch", 3, "torchrun"),
    ("mpiexec", 2, "mpi"),
])
def test_launcher_float64_equals_reference(launcher, nproc, environment, references, tmp_path):
    out = tmp_path / "train.json"
    res = run(_launcher(launcher, nproc) + [TRAIN, "--out", out])
    assert res.returncode == 0, res.stderr[-3000:]
    got = _load(out)
    assert (got["world_size"], got["environment"]) == (nproc, environment)
    assert_matches_references(got, references, f"{launcher} {nproc} processes")


@pytest.mark.timeout(150)
def test_digits_example_under_dfit_launch(digits_reference, tmp_path):
    """The README's example (float32, Adam) under dfit-launch equals its one-process run up to float32
    rounding; exactness is checked in float64 above."""
    out = tmp_path / "h.json"
    res = run(_launcher("dfit-launch") + [DIGITS, "--epochs", "2", "--verbose", "0", "--history-out", out])
    assert res.returncode == 0, res.stderr[-3000:]
    got = _load(out)
    assert (got["world_size"], got["environment"]) == (2, "torchrun")
    assert_same_history(got["history"], digits_reference["history"])


@pytest.mark.timeout(150)
def test_dfit_launch_max_restarts_recovers(references, tmp_path):
    """Rank 1 dies at step 3 after the process group is up; the restarted round must rendezvous afresh."""
    out, marker = tmp_path / "h.json", tmp_path / "failed-once"
    res = run(_launcher("dfit-launch") + ["--max-restarts", "1", TRAIN, "--out", out, "--fail-rank", "1",
                                          "--fail-once-marker", marker])
    assert res.returncode == 0, res.stderr[-3000:]
    assert marker.exists(), "the first attempt did not fail as planned"
    # the restarted attempt's failure is shown briefly by the worker (no final report will show it)
    assert "dfit-launch: rank 1 failed (a restart follows): ValueError: injected failure" in res.stderr
    assert "raise ValueError" in res.stderr and "Root Cause" not in res.stderr
    got = _load(out)
    assert got["restart"] == "1" and got["world_size"] == 2
    assert_matches_references(got, references, "dfit-launch after a restart")


# ----------------------------------------------------------------------------------------------------
# multi_gpu_model from a Python process; the model class is defined in __main__ of a script fed on stdin,
# i.e. a module with no file, as in a notebook.

MULTI_GPU_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, torch, dfit
    from torch import nn
    sys.path.insert(0, "tests")
    from reference_ddp import CONFIG as c, make_data

    class Net(nn.Module):                       # defined in __main__, as in a notebook
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 1)   # reference_ddp.make_net's layers
        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    def make():
        torch.manual_seed(0)
        m = dfit.Model(Net().double())
        m.compile(optimizer=dfit.optimizers.SGD(learning_rate=c["learning_rate"]), loss="mse", metrics=["mae"])
        return m

    def result(model, history):
        return {"history": history.history, "epoch": history.epoch,
                "weights": [p.detach().reshape(-1).tolist() for p in model.module.parameters()],
                "evaluate": model.evaluate(x, y, batch_size=c["batch_size"], verbose=0),
                "predict": model.predict(x, batch_size=c["batch_size"])[:, 0].tolist()}

    x, y, w = make_data()
    kw = dict(sample_weight=w, batch_size=c["batch_size"], epochs=c["epochs"],
              validation_split=c["validation_split"], seed=c["seed"], verbose=0)
    one = make()
    r = {"one": result(one, one.fit(x, y, **kw))}
    par = dfit.multi_gpu_model(make(), gpus=3)
    r["par"] = result(par, par.fit(x, y, **kw))
    # a second fit continues from the returned weights and optimizer state, like the 1-process model
    r["one_again"] = result(one, one.fit(x, y, **kw))
    r["par_again"] = result(par, par.fit(x, y, **kw))
    json.dump(r, sys.stdout)
""")


@pytest.mark.timeout(150)
def test_multi_gpu_model_float64_equals_reference(references, tmp_path):
    res = run_stdin(MULTI_GPU_SCRIPT, tmp_path, timeout=140)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["par"]["epoch"] == r["one"]["epoch"] == list(range(3))
    assert_matches_references(r["one"], references, "dfit 1 process")
    assert_matches_references(r["par"], references, "multi_gpu_model 3 processes")
    assert_matches(r["par_again"], r["one_again"], "multi_gpu_model second fit vs 1 process second fit")
    assert relative_difference(r["one_again"]["weights"][0], r["one"]["weights"][0]) > 1e-3  # it trained on


SPAWN_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, torch, dfit
    from torch import nn

    class Net(nn.Module):                       # importable: this file is __main__ with a __file__
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    def make():
        torch.manual_seed(1)
        m = dfit.Model(Net().double())
        m.compile(optimizer=dfit.optimizers.SGD(learning_rate=0.1), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
        return m

    if __name__ == "__main__":
        rng = np.random.default_rng(1)
        x = rng.normal(size=(121, 6))
        y = rng.integers(0, 3, size=121)
        kw = dict(batch_size=16, epochs=2, validation_split=0.25, seed=3, verbose=0)
        one = make()
        h1 = one.fit(x, y, **kw)
        par = dfit.multi_gpu_model(make(), gpus=2, start_method="spawn")
        h2 = par.fit(x, y, **kw)
        weights = lambda m: [p.detach().reshape(-1).tolist() for p in m.module.parameters()]
        json.dump({"h1": h1.history, "h2": h2.history, "w1": weights(one), "w2": weights(par)}, sys.stdout)
""")


@pytest.mark.timeout(120)
def test_multi_gpu_model_spawn_start_method(tmp_path):
    script = tmp_path / "spawn_train.py"
    script.write_text(SPAWN_SCRIPT)
    res = run([PY, script], timeout=110)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert list(r["h2"]) == list(r["h1"]) == ["loss", "accuracy", "val_loss", "val_accuracy"]
    for key, want in r["h1"].items():
        assert relative_difference(r["h2"][key], want) < RTOL, key
    for got, want in zip(r["w2"], r["w1"], strict=True):
        assert relative_difference(got, want) < RTOL


def test_multi_gpu_model_failing_worker_names_rank():
    import torch

    import dfit

    class Boom(dfit.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2 and dfit.distributed.rank() == 1:
                raise ValueError("boom in worker")

    torch.manual_seed(0)
    model = dfit.Sequential([torch.nn.Linear(4, 1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((64, 4), np.float32)
    start = time.time()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2.*ValueError: boom in worker"):
        dfit.multi_gpu_model(model, gpus=2).fit(x, x[:, :1], batch_size=8, epochs=50, verbose=0,
                                                callbacks=[Boom()])
    assert time.time() - start < 60


@pytest.mark.timeout(60)
def test_multi_gpu_model_spawn_refuses_notebook_class(tmp_path):
    script = textwrap.dedent("""
        import torch, dfit
        class Net(torch.nn.Linear):
            pass
        m = dfit.Model(Net(2, 1)); m.compile(optimizer="sgd", loss="mse")
        try:
            dfit.multi_gpu_model(m, gpus=2, start_method="spawn").fit(torch.zeros(8, 2), torch.zeros(8, 1))
        except RuntimeError as e:
            print("ERROR:", e)
    """)
    res = run_stdin(script, tmp_path, timeout=50)
    assert "ERROR:" in res.stdout, res.stderr[-2000:]
    assert "Net" in res.stdout and "start_method='fork'" in res.stdout and ".py module" in res.stdout


# ----------------------------------------------------------------------------------------------------
# A failing rank ends the job

def _check_failure(res: subprocess.CompletedProcess, tag: str, stamp: Path, label: str, names_rank: str) -> float:
    """The job failed, showing the exception, and the LAUNCHER's own report names the failing rank
    (``names_rank``, a regex matched with the injected message itself removed)."""
    ended = time.time()
    text = res.stdout + res.stderr
    assert res.returncode != 0, f"{label}: exit code 0 after a failing rank"
    assert "ValueError" in text and "injected failure on rank 1" in text, text[-3000:]
    assert re.search(names_rank, text.replace("injected failure on rank 1", "")), text[-3000:]
    left = wait_no_process(tag, timeout=10)
    assert not left, f"{label}: processes left running: {left}"
    assert stamp.exists(), f"{label}: the failure was never injected"
    took = ended - float(stamp.read_text())
    print(f"\n[failing rank] {label}: job ended {took:.2f} s after the exception (exit code {res.returncode})")
    return took


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher", ["dfit-launch", "torchrun"])
def test_failing_rank_ends_job_elastic(launcher, tag, tmp_path):
    stamp = tmp_path / "stamp"
    res = run(_launcher(launcher) + [TRAIN, "--fail-rank", "1", "--fail-stamp", stamp, "--tag", tag], timeout=110)
    names_rank = (r"dfit-launch: rank 1 \(local rank 1\) failed" if launcher == "dfit-launch"
                  else r"rank\s*: 1 \(local_rank: 1\)")  # torch's elastic report
    took = _check_failure(res, tag, stamp, launcher, names_rank)
    assert "raise ValueError" in res.stderr, "the failing rank's traceback did not reach the launcher"
    if launcher == "dfit-launch":  # the short report; torch's full one is in the file it names
        assert "dfit-launch: rank 1 (local rank 1) failed with exit code 1 (first failure): ValueError" in res.stderr
        assert "Root Cause" not in res.stderr and "[rank0]" not in res.stderr
        full = Path(res.stderr.strip().splitlines()[-1].rsplit(": ", 1)[1]).read_text()
        assert "Root Cause" in full and "raise ValueError" in full
    else:
        assert "Root Cause" in res.stderr  # torch's report, with the worker's traceback from the error file
    assert took < 30


# ----------------------------------------------------------------------------------------------------
# dfit-launch's defaults: rank 0's stdout, every rank's stderr, a short failure report

RANKS_PRINT = textwrap.dedent("""
    import os, sys, time
    rank = int(os.environ["RANK"])

    def load(step):
        if rank == 1 and step == 2:
            raise ValueError(f"bad shard {step} on rank {rank}")

    def train():
        for step in range(3):
            load(step)

    print("hello from a rank", flush=True)
    print(f"a warning from rank {rank}", file=sys.stderr, flush=True)
    if "--fail" in sys.argv:
        if rank == 0:
            time.sleep(60)      # ended by the launcher when rank 1 fails
        train()
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags, copies", [([], 1), (["--all-ranks-output"], 2)], ids=["default", "all-ranks"])
def test_dfit_launch_stdout_from_rank_0_unless_asked(flags, copies, tmp_path):
    script = tmp_path / "ranks_print.py"
    script.write_text(RANKS_PRINT)
    res = run(_launcher("dfit-launch") + flags + [script], timeout=100)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("hello from a rank") == copies, res.stdout
    assert "a warning from rank 0" in res.stderr and "a warning from rank 1" in res.stderr  # stderr: every rank


@pytest.mark.timeout(120)
def test_dfit_launch_short_failure_report(tag, tmp_path):
    script = tmp_path / "ranks_print.py"
    script.write_text(RANKS_PRINT)
    report = tmp_path / "logs" / "failure.log"
    res = run(_launcher("dfit-launch") + ["--error-report", report, script, "--fail", "--tag", tag], timeout=100)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if "a warning from rank" not in line]
    assert len(lines) <= 11, res.stderr
    assert lines[0] == ("dfit-launch: rank 1 (local rank 1) failed with exit code 1 (first failure): "
                        "ValueError: bad shard 2 on rank 1"), lines
    assert lines[1:] == [
        "Traceback (most recent call last):",
        f'  File "{script}", line 18, in <module>',
        "    train()",
        f'  File "{script}", line 11, in train',
        "    load(step)",
        f'  File "{script}", line 7, in load',
        '    raise ValueError(f"bad shard {step} on rank {rank}")',
        "dfit-launch: rank 0 ended by the launcher after the first failure",
        f"dfit-launch: the job failed; full report (every rank, whole tracebacks): {report}",
    ], res.stderr
    full = report.read_text()
    assert "Root Cause" in full and "Traceback (most recent call last)" in full and "in <module>" in full
    assert "rank 1 (local rank 1) failed with exit code 1 (first failure): ValueError: bad shard 2" in full
    assert not wait_no_process(tag, timeout=10)


@pytest.mark.timeout(120)
def test_dfit_launch_verbose_errors_prints_the_full_report(tmp_path):
    script = tmp_path / "ranks_print.py"
    script.write_text(RANKS_PRINT)
    res = run(_launcher("dfit-launch") + ["--verbose-errors", script, "--fail"], timeout=100)
    assert res.returncode == 1
    assert "Root Cause" in res.stderr and "in <module>" in res.stderr and "full report" not in res.stderr
    assert "dfit-launch: rank 1 (local rank 1) failed with exit code 1 (first failure): ValueError" in res.stderr


def test_dfit_launch_help_documents_its_flags():
    res = run(_launcher("dfit-launch")[:-2] + ["--help"], timeout=60)
    assert res.returncode == 0
    for flag in ("--all-ranks-output", "--verbose-errors", "--error-report", "--nproc-per-node"):
        assert flag in res.stdout, flag


@pytest.mark.timeout(120)
def test_failing_rank_ends_job_mpiexec(tag, tmp_path):
    stamp = tmp_path / "stamp"
    res = run([_mpiexec(), "-n", "2", PY, TRAIN, "--fail-rank", "1", "--fail-stamp", stamp, "--tag", tag],
              timeout=110)
    took = _check_failure(res, tag, stamp, "mpiexec", r"\[dfit\] rank 1 of 2 \(mpi\) failed")
    assert "[dfit] rank 1 of 2 (mpi) failed" in res.stderr and "MPI_Abort" in res.stderr + res.stdout
    assert took < 30


# ----------------------------------------------------------------------------------------------------
# Slurm (a one-node cluster on localhost, started by the `slurm` fixture)

# Options that make each template fit this one machine (2 CPUs, 2 fake GPUs, one node); the templates
# themselves are submitted unchanged.
TEMPLATE_FIT = {
    "one_node_gpus.sbatch": ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"],
    "multi_node_srun.sbatch": ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"],
    "multi_node_torchrun.sbatch": ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=2", "--cpus-per-task=2"],
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("template", sorted(TEMPLATE_FIT))
def test_slurm_template(template, slurm, references, tmp_path):
    """Each template, submitted with sbatch (srun starting 2 tasks, or torchrun 2 workers inside one), trains
    the float64 script and equals the hand-written reference."""
    out = tmp_path / "train.json"
    job = slurm.submit(REPO / "slurm" / template, [str(TRAIN), "--out", str(out)], TEMPLATE_FIT[template],
                       tmp_path / "job.out", timeout=150)
    assert job["state"] == "COMPLETED", job
    got = _load(out)
    want_env = "torchrun" if "torchrun" in template else "slurm"
    assert (got["world_size"], got["environment"]) == (2, want_env), got
    assert_matches_references(got, references, f"sbatch {template}")


@pytest.mark.timeout(120)
def test_slurm_batch_shell_is_one_process(slurm, tmp_path):
    """Inside sbatch but outside srun, SLURM_NTASKS=2 is set, yet `python train.py` is ONE process."""
    script = tmp_path / "plain.sbatch"
    out = tmp_path / "r.json"
    script.write_text(f"#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --cpus-per-task=1\n"
                      f"{PY} -c 'import dfit.distributed as d; print(\"DETECT\", d.detect())'\n"
                      f"{PY} {REPO / 'tests' / 'launch_tiny.py'} --out {out}\n")
    job = slurm.submit(script, [], [], tmp_path / "job.out", timeout=100)
    assert job["state"] == "COMPLETED", job
    assert "DETECT LaunchInfo(environment='local'" in job["output"], job["output"]
    got = _load(out)
    assert (got["world_size"], got["environment"]) == (1, "local")


@pytest.mark.timeout(120)
def test_srun_with_mpi_pmi2(slurm, tmp_path):
    """`srun --mpi=pmi2` gives the MPICH wheel a real MPI world: detected as MPI, and it trains."""
    _mpiexec()
    out = tmp_path / "r.json"
    res = run(["srun", "--kill-on-bad-exit=1", "--mpi=pmi2", "-n", "2", "--cpus-per-task=1", PY,
               REPO / "tests" / "launch_tiny.py", "--out", out], env=slurm.env(), timeout=110)
    if res.returncode != 0 and "pmi2" in res.stderr and "plugin" in res.stderr.lower():
        pytest.skip(f"this Slurm has no usable mpi/pmi2 plugin: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    got = _load(out)
    assert (got["environment"], got["world_size"]) == ("mpi", 2)
    assert got["sums"][:3] == [3.0, 5.0, 7.0]


@pytest.mark.timeout(120)
def test_failing_rank_ends_job_srun(slurm, tag, tmp_path):
    stamp = tmp_path / "stamp"
    res = run(["srun", "--kill-on-bad-exit=1", "-n", "2", "--cpus-per-task=1", PY, TRAIN, "--fail-rank", "1",
               "--fail-stamp", stamp, "--tag", tag], env=slurm.env(), timeout=110)
    took = _check_failure(res, tag, stamp, "srun", r"\[dfit\] rank 1 of 2 \(slurm\) failed")
    assert "[dfit] rank 1 of 2 (slurm) failed" in res.stderr
    assert took < 30


@pytest.mark.timeout(150)
def test_failing_rank_ends_job_sbatch_template(slurm, tag, tmp_path):
    """The same through a template: the job fails (not hangs) and its output names the rank."""
    stamp = tmp_path / "stamp"
    job = slurm.submit(REPO / "slurm" / "one_node_gpus.sbatch",
                       [str(TRAIN), "--fail-rank", "1", "--fail-stamp", str(stamp), "--tag", tag],
                       TEMPLATE_FIT["one_node_gpus.sbatch"], tmp_path / "job.out", timeout=120)
    assert job["state"] == "FAILED", job
    assert "[dfit] rank 1 of 2 (slurm) failed" in job["output"] and "injected failure" in job["output"]
    assert not wait_no_process(tag, timeout=10)


# ----------------------------------------------------------------------------------------------------
# launch/ scripts

@pytest.mark.timeout(120)
@pytest.mark.parametrize("script, env", [
    ("workstation.sh", {"NPROC": "2"}),
    ("mpirun.sh", {"NP": "2"}),
], ids=["workstation", "mpirun"])
def test_launch_scripts(script, env, tmp_path):
    if script == "mpirun.sh":
        _mpiexec()
    out = tmp_path / "r.json"
    res = run(["bash", REPO / "launch" / script, REPO / "tests" / "launch_tiny.py", "--out", out],
              env=launch_env(**env), timeout=110)
    assert res.returncode == 0, res.stderr[-3000:]
    got = _load(out)
    assert got["world_size"] == 2 and got["sums"][:3] == [3.0, 5.0, 7.0]


# ----------------------------------------------------------------------------------------------------
# multi_gpu_model in a real Jupyter kernel, the model class defined in a notebook cell

NOTEBOOK_CELLS = [
    textwrap.dedent("""
        import numpy as np, torch, dfit
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__(); self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 1)
            def forward(self, x): return self.b(torch.tanh(self.a(x)))
        def make():
            torch.manual_seed(0); m = dfit.Model(Net().double())
            m.compile(optimizer=dfit.optimizers.SGD(learning_rate=0.1), loss="mse"); return m
        rng = np.random.default_rng(0)
        x = rng.normal(size=(250, 8)); y = x @ rng.normal(size=(8, 1))
        h1 = make().fit(x, y, batch_size=32, epochs=3, validation_split=0.2, seed=0, verbose=0)
    """),
    textwrap.dedent("""
        m2 = make()
        h2 = dfit.multi_gpu_model(m2, gpus=2).fit(x, y, batch_size=32, epochs=3, validation_split=0.2, seed=0,
                                                  verbose=0)
        print("RESULT", max(abs(a - b) / abs(b) for a, b in zip(h1.history["val_loss"], h2.history["val_loss"])),
              dfit.distributed.environment())
    """),
    textwrap.dedent("""
        try:
            dfit.multi_gpu_model(make(), gpus=2, start_method="spawn").fit(x, y, verbose=0)
        except RuntimeError as e:
            print("SPAWN-ERROR", e)
    """),
]


@pytest.mark.timeout(150)
def test_multi_gpu_model_in_a_jupyter_notebook(monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="needs nbformat, nbclient and ipykernel")
    nbclient = pytest.importorskip("nbclient", reason="needs nbformat, nbclient and ipykernel")
    pytest.importorskip("ipykernel", reason="needs nbformat, nbclient and ipykernel")
    for key, value in launch_env().items():
        monkeypatch.setenv(key, value)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in NOTEBOOK_CELLS])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
                            ).execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    result = [line for line in text.splitlines() if line.startswith("RESULT")]
    assert result, text
    diff, env = result[0].split()[1:]
    assert float(diff) < RTOL and env == "local"  # the notebook's own process stays a single process
    assert "SPAWN-ERROR" in text and "Net" in text and "start_method='fork'" in text
