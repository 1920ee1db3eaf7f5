"""BackupAndRestore: a fit killed (simulated in process) and started again with the same arguments ends with the
uninterrupted run's weights and history (float64, rel < 1e-9), on 1 process and across world sizes."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import dfit
from ranks import run_ranks
from resume_job import Stop, build, data, relative_difference, train

pytestmark = pytest.mark.timeout(300)
EXACT = 1e-9


@pytest.fixture(scope="module")
def uninterrupted():
    return train(None)


@pytest.mark.parametrize("save_freq, stop_at", [("epoch", (1, 2)), (2, (1, 3)), (1, (0, 4)), (3, (2, 0))])
def test_in_process_kill_resumes_exactly(tmp_path, uninterrupted, save_freq, stop_at):
    assert train(str(tmp_path), save_freq, stop_at) == "stopped"
    assert os.listdir(tmp_path) == ["backup.pt"]
    weights, history = train(str(tmp_path), save_freq)
    ref_weights, ref_history = uninterrupted
    assert relative_difference(weights, ref_weights) < EXACT
    assert relative_difference(history, ref_history) < EXACT
    assert os.listdir(tmp_path) == []   # delete_checkpoint=True: removed once training completed


def test_backup_kept_without_delete_and_a_finished_backup_runs_nothing(tmp_path, uninterrupted):
    cb = dfit.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False)
    model = build()
    x, y = data()
    model.fit(x, y, batch_size=10, epochs=3, seed=3, verbose=0, validation_split=0.2, callbacks=[cb])
    assert os.listdir(tmp_path) == ["backup.pt"]
    again = build()
    history = again.fit(x, y, batch_size=10, epochs=3, seed=3, verbose=0, validation_split=0.2, callbacks=[cb])
    assert relative_difference([p.detach().numpy() for p in again.module.parameters()],
                               [p.detach().numpy() for p in model.module.parameters()]) == 0
    assert history.epoch == [0, 1, 2]   # History restored; no epoch ran again


def test_dropout_resumes_exactly_on_the_same_world_size(tmp_path):
    ref_weights, ref_history = train(None, dropout=0.3)
    assert train(str(tmp_path), 2, (1, 1), dropout=0.3) == "stopped"
    weights, history = train(str(tmp_path), 2, dropout=0.3)
    assert relative_difference(weights, ref_weights) < EXACT
    assert relative_difference(history, ref_history) < EXACT


def _stream(x, y):
    def batches():
        for k in range(0, len(x), 7):
            yield x[k:k + 7], y[k:k + 7]
    return batches


class _Reiterable:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return _stream(self.x, self.y)()


@pytest.mark.parametrize("steps", [None, 4])
def test_stream_resumes_by_fast_forwarding(tmp_path, steps):
    """9 batches a pass; with steps_per_epoch=4 epochs run through passes (epoch 2 holds the end of pass 1)."""
    x, y = data()
    kw = dict(batch_size=None, validation_split=0.0, steps_per_epoch=steps, epochs=4)
    ref_weights, ref_history = train(None, x=_Reiterable(x, y), **kw)
    assert train(str(tmp_path), 3, (2, 0), x=_Reiterable(x, y), **kw) == "stopped"
    weights, history = train(str(tmp_path), 3, x=_Reiterable(x, y), **kw)
    assert relative_difference(weights, ref_weights) < EXACT
    assert relative_difference(history, ref_history) < EXACT


def test_backup_of_another_model_or_other_arguments_is_refused(tmp_path):
    assert train(str(tmp_path), 2, (1, 1)) == "stopped"
    x, y = data()
    wider = dfit.Sequential([torch.nn.Linear(4, 9, dtype=torch.float64), torch.nn.Tanh(),
                             torch.nn.Linear(9, 2, dtype=torch.float64)])
    wider.compile(optimizer="sgd", loss="mse")
    cb = dfit.callbacks.BackupAndRestore(str(tmp_path), save_freq=2)
    with pytest.raises(ValueError, match=r"different model or different fit arguments \(.*parameters"):
        wider.fit(x, y, batch_size=10, epochs=3, seed=3, verbose=0, validation_split=0.2, callbacks=[cb])
    with pytest.raises(ValueError, match=r"batch_size: backup 10 vs now 12"):
        build().fit(x, y, batch_size=12, epochs=3, seed=3, verbose=0, validation_split=0.2, callbacks=[cb])
    with pytest.raises(ValueError, match=r"seed: backup 3 vs now 4"):
        build().fit(x, y, batch_size=10, epochs=3, seed=4, verbose=0, validation_split=0.2, callbacks=[cb])


def test_a_crashed_write_leaves_the_previous_backup(tmp_path, monkeypatch, uninterrupted):
    """A write that dies half-way (simulated inside torch.save) never replaces the last good backup."""
    assert train(str(tmp_path), 2, (1, 1)) == "stopped"      # a good backup at epoch 1, step 0... (global step 6)
    good = (tmp_path / "backup.pt").read_bytes()
    import dfit.serialization as serialization

    def dying_fsync(fd):
        raise OSError("disk gone")   # the temporary file holds a (partial) backup; the rename never happens

    monkeypatch.setattr(serialization.os, "fsync", dying_fsync)
    with pytest.raises(RuntimeError, match="writing the backup failed: disk gone"):
        train(str(tmp_path), 2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["backup.pt"] and (tmp_path / "backup.pt").read_bytes() == good
    weights, history = train(str(tmp_path), 2)
    assert relative_difference(weights, uninterrupted[0]) < EXACT
    assert relative_difference(history, uninterrupted[1]) < EXACT


def test_bad_arguments():
    with pytest.raises(ValueError, match="save_freq"):
        dfit.callbacks.BackupAndRestore("d", save_freq=0)
    with pytest.raises(ValueError, match="Empty `backup_dir`"):
        dfit.callbacks.BackupAndRestore("")


# -- another world size: the first run stops on N ranks after a backup, the second resumes on M ranks ------------------
def _first_run(backup_dir, stop_at):
    return train(backup_dir, 2, stop_at)


def _second_run(backup_dir):
    return train(backup_dir, 2)


@pytest.mark.parametrize("first, second, stop_at", [(2, 3, (1, 3)), (3, 1, (0, 4)), (1, 2, (2, 1))])
def test_resume_on_another_world_size(tmp_path, uninterrupted, first, second, stop_at):
    folder = str(tmp_path)
    if first == 1:
        assert _first_run(folder, stop_at) == "stopped"
    else:
        assert run_ranks(_first_run, first, folder, stop_at, timeout=200) == ["stopped"] * first
    assert os.listdir(folder) == ["backup.pt"]
    payload = torch.load(os.path.join(folder, "backup.pt"), weights_only=True)
    assert payload["world_size"] == first and payload["position"]["in_epoch"]
    results = [_second_run(folder)] if second == 1 else run_ranks(_second_run, second, folder, timeout=200)
    for weights, history in results:   # every rank ends with the uninterrupted one-process run's state
        assert relative_difference(weights, uninterrupted[0]) < EXACT
        assert relative_difference(history, uninterrupted[1]) < EXACT
    assert os.listdir(folder) == []


# -- preemption: a signal on ONE rank stops every rank at the same step, after a backup -----------------------------
def _signalled_run(backup_dir):
    import signal

    class SignalRankOne(dfit.callbacks.Callback):
        steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if self.steps == 3 and dfit.distributed.rank() == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    model, (x, y) = build(), data()
    backup = dfit.callbacks.BackupAndRestore(backup_dir, save_freq=1000, signal_check_every=2)
    schedule = dfit.callbacks.TorchScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 4, 0.8),
                                             interval="step")
    try:
        model.fit(x, y, batch_size=10, epochs=3, seed=3, verbose=0, validation_split=0.2,
                  callbacks=[schedule, SignalRankOne(), backup])
    except SystemExit as exc:
        return exc.code, backup._fit.global_step
    return None, None


def test_a_signal_on_one_rank_backs_up_every_rank_at_one_step(tmp_path, uninterrupted):
    """Checks start every 2 steps: the signal at step 3 is in the all-reduce started at step 4, read at step 6."""
    results = run_ranks(_signalled_run, 2, str(tmp_path), timeout=200)
    assert results == [(75, 6), (75, 6)]
    payload = torch.load(tmp_path / "backup.pt", weights_only=True)
    assert payload["global_step"] == 6 and payload["position"] == {"epoch": 1, "step": 1, "in_epoch": True}
    weights, history = train(str(tmp_path), 1000)
    assert relative_difference(weights, uninterrupted[0]) < EXACT
    assert relative_difference(history, uninterrupted[1]) < EXACT
