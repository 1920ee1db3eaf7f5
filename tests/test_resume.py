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
        # what srun --kill-on-bad-exit or a launcher does once another rank has exited: a leaving rank keeps its 75
        os.kill(os.getpid(), signal.SIGTERM)
        return exc.code, backup._fit.global_step
    return None, None


def test_a_signal_on_one_rank_backs_up_every_rank_at_one_step(tmp_path, uninterrupted):
    """Checks start every 2 steps: the signal at step 3 is in the all-reduce started at step 4, read at step 6. A
    SIGTERM that reaches a rank as it leaves (the first rank to exit makes srun or the launcher end the others) does
    not turn its exit code 75 into a death by signal."""
    results = run_ranks(_signalled_run, 2, str(tmp_path), timeout=200)
    assert results == [(75, 6), (75, 6)]
    payload = torch.load(tmp_path / "backup.pt", weights_only=True)
    assert payload["global_step"] == 6 and payload["position"] == {"epoch": 1, "step": 1, "in_epoch": True}
    weights, history = train(str(tmp_path), 1000)
    assert relative_difference(weights, uninterrupted[0]) < EXACT
    assert relative_difference(history, uninterrupted[1]) < EXACT


class _CountingRows(torch.utils.data.IterableDataset):
    """Rows of (x, y) from a cursor, with its own state (torchdata's Stateful protocol); ``reads`` counts rows read."""

    def __init__(self, x, y):
        self.x, self.y, self.cursor, self.reads = x, y, 0, 0

    def __iter__(self):
        while self.cursor < len(self.x):
            k = self.cursor
            self.cursor += 1
            self.reads += 1
            yield self.x[k], self.y[k]
        self.cursor = 0   # the next pass starts again

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = state["cursor"]


def _stateful_loader():
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(_CountingRows(*data()), batch_size=7)


def _resume_stateful(backup_dir):
    loader = _stateful_loader()
    result = train(backup_dir, 1, x=loader, batch_size=None, validation_split=0.0, steps_per_epoch=3, epochs=5)
    return result, loader.dataset.reads


@pytest.mark.filterwarnings("ignore:.*set_vital")
def test_a_stateful_stream_resumes_from_its_own_state(tmp_path):
    """A StatefulDataLoader is put back with load_state_dict: the resumed run reads only the rows after the backup
    (no fast-forward), and ends as the uninterrupted run, on 1 process and on 2 ranks."""
    pytest.importorskip("torchdata.stateful_dataloader")
    kw = dict(batch_size=None, validation_split=0.0, steps_per_epoch=3, epochs=5)
    reference = _stateful_loader()
    ref_weights, ref_history = train(None, x=reference, **kw)
    assert reference.dataset.reads == 60 + 6 * 7   # 9 batches a pass: epochs 0-2 are pass 1, 3-4 half of pass 2
    for world in (1, 2):
        folder = str(tmp_path / f"w{world}")
        assert train(folder, 1, (3, 1), x=_stateful_loader(), **kw) == "stopped"   # last backup: epoch 3, step 0
        saved = torch.load(os.path.join(folder, "backup.pt"), weights_only=True)["stream"]
        assert saved["pass_steps"] == 1 and saved["source_state"]["dataset_state"] == {"cursor": 7}
        results = [_resume_stateful(folder)] if world == 1 else run_ranks(_resume_stateful, 2, folder, timeout=200)
        for (weights, history), reads in results:
            # one batch peeked before the backup is read (fit looks at the first item to know the outputs), then the
            # 5 batches after the backup; fast-forwarding would read the pass's consumed batch again (7 more)
            assert reads == 7 + 5 * 7
            assert relative_difference(weights, ref_weights) < EXACT
            assert relative_difference(history, ref_history) < EXACT


def _checkpointed_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(4, 8, dtype=torch.float64), nn.Tanh(), nn.Linear(8, 2, dtype=torch.float64)])
    schedule = dfit.optimizers.schedules.ExponentialDecay(0.05, decay_steps=3, decay_rate=0.7)
    model.compile(optimizer=dfit.optimizers.Adam(schedule), loss="mse", metrics=["mae"])
    return model


def _weights(model):
    return [p.detach().numpy().copy() for p in model.module.parameters()]


def _resume_from_checkpoint(path, kw):
    resumed = dfit.load_model(path)
    history = resumed.fit(*data(), epochs=5, initial_epoch=2, **kw)
    return _weights(resumed), history.history, history.epoch


@pytest.mark.parametrize("steps", [None, 2])
def test_initial_epoch_resumes_from_a_model_checkpoint(tmp_path, steps):
    """Keras' way to resume: ModelCheckpoint saves the model each epoch; a new process loads the file and calls
    fit(initial_epoch=k). The optimizer's moments and step (hence the schedule) come back from the file, and the
    shuffle is a function of (seed, epoch), so epochs k.. equal the uninterrupted run's, here on 1 and 2 ranks
    (with steps_per_epoch=2, epoch 2 is the last third of the first pass)."""
    x, y = data()
    kw = dict(batch_size=8, seed=5, verbose=0, validation_split=0.2, steps_per_epoch=steps)
    reference = _checkpointed_model()
    ref_history = reference.fit(x, y, epochs=5, **kw).history
    first = _checkpointed_model()
    path = str(tmp_path / "ckpt-{epoch:02d}.dfit")
    first.fit(x, y, epochs=2, callbacks=[dfit.callbacks.ModelCheckpoint(path, monitor="loss")], **kw)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-01.dfit", "ckpt-02.dfit"]
    saved = str(tmp_path / "ckpt-02.dfit")
    for weights, history, epochs in [_resume_from_checkpoint(saved, kw)] + run_ranks(
            _resume_from_checkpoint, 2, saved, kw, timeout=200):
        assert epochs == [2, 3, 4]
        assert relative_difference(weights, _weights(reference)) < EXACT
        assert relative_difference(history, {k: v[2:] for k, v in ref_history.items()}) < EXACT
    # the weights alone (save_weights_only, as in Keras) lose the optimizer's state: a fresh Adam differs
    weights_only = _checkpointed_model()
    weights_only.load_weights(saved)
    weights_only.fit(x, y, epochs=5, initial_epoch=2, **kw)
    assert relative_difference(_weights(weights_only), _weights(reference)) > 1e-6
