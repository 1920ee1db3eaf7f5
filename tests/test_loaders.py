"""Map-style Datasets and users' DataLoaders: loader workers, exact resharding on N ranks, errors, clean shutdown."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, SubsetRandomSampler

import dfit
from core_helpers import Recorder, frozen_model, mse_rows, row_ids
from ranks import _plain, run_ranks

pytestmark = pytest.mark.timeout(300)


class Pairs(Dataset):
    """``(x[i], y[i])``; with ``log_dir`` every read is appended to ``reads-<RANK>-<pid>.txt`` as "epoch index"
    (so reads done in loader worker processes are counted too); reading a row of ``fail_rows`` raises."""

    def __init__(self, x, y, log_dir: str | None = None, fail_rows=()):
        self.x, self.y, self.log_dir, self.fail_rows = x, y, log_dir, set(fail_rows)
        self.epoch = None
        self.epochs_set: list[int] = []

    def __len__(self):
        return len(self.x)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.epochs_set.append(epoch)

    def __getitem__(self, i):
        if i in self.fail_rows:
            raise ValueError(f"boom at row {i}")
        if self.log_dir is not None:
            path = Path(self.log_dir) / f"reads-{os.environ.get('RANK', '0')}-{os.getpid()}.txt"
            with open(path, "a") as f:
                f.write(f"{self.epoch} {i}\n")
        return torch.tensor(self.x[i]), torch.tensor(self.y[i])


def reads(log_dir: str, rank: int) -> dict[int | None, list[int]]:
    """The rows rank ``rank`` read, by epoch (from every process of that rank; None: before the first epoch)."""
    out: dict[int | None, list[int]] = {}
    for path in Path(log_dir).glob(f"reads-{rank}-*.txt"):
        for line in path.read_text().split("\n"):
            if line:
                epoch, i = line.split()
                out.setdefault(None if epoch == "None" else int(epoch), []).append(int(i))
    return out


def data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.integers(0, 3, size=n)


def make_model():
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)])
    model.module.double()
    model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=0.2, momentum=0.9),
                  loss=nn.CrossEntropyLoss(), metrics=["accuracy"])
    return model


def weights(model):
    return {k: v.detach().clone().numpy() for k, v in model.module.state_dict().items()}


def run(train, validation, evaluate_on, predict_on, **fit_kwargs):
    """fit / evaluate / predict one model; everything that must not depend on world size or workers."""
    model = make_model()
    train = train if isinstance(train, tuple) else (train,)
    history = model.fit(*train, validation_data=validation, epochs=3, seed=7, verbose=0, **fit_kwargs)
    ev = model.evaluate(*evaluate_on, verbose=0, return_dict=True)
    pred = model.predict(predict_on)
    return {"history": history.history, "weights": weights(model), "evaluate": ev, "predict": pred}


N, N_VAL, B = 23, 9, 5  # 23 = 4 * 5 + 3 rows; 9 validation rows in batches of 4 leave a last batch of ONE row


def rank_checks(log_dir: str) -> dict:
    """Runs on every rank (1, 2 or 3): several checks in one job, since starting ranks is the slow part."""
    # run_ranks starts ranks as daemonic "spawn" children; launchers start plain processes (loader workers may be
    # started, by fork on Linux), as here
    mp.current_process().daemon = False
    mp.set_start_method("fork", force=True)
    x, y = data(N)
    xv, yv = data(N_VAL, seed=1)
    out = {}
    # a user's DataLoader (shuffle=True, 2 workers), validation and evaluate/predict through loaders
    out["loader"] = run(DataLoader(Pairs(x, y), batch_size=B, shuffle=True, num_workers=2),
                        DataLoader(Pairs(xv, yv), batch_size=4, num_workers=2),
                        (DataLoader(Pairs(xv, yv), batch_size=4, num_workers=2),),
                        DataLoader(Pairs(x, y), batch_size=4, num_workers=2))
    # the same data as arrays, same seed
    out["arrays"] = run((x, y), (xv, yv), (xv, yv), x, batch_size=B, validation_batch_size=4)
    # a map-style Dataset with workers=0 and workers=2
    for workers in (0, 2):
        out[f"workers={workers}"] = run(Pairs(x, y), Pairs(xv, yv), (Pairs(xv, yv),), Pairs(x, y), batch_size=B,
                                        validation_batch_size=4, workers=workers)
    # reads per rank, per epoch, with 2 workers
    counting = Pairs(x, y, log_dir=log_dir)
    make_model().fit(DataLoader(counting, batch_size=B, shuffle=True, num_workers=2), epochs=2, seed=3, verbose=0)
    # a worker's exception on every rank (rows 1..3 are in every rank's part of the first batch; row 0, which
    # names the outputs, is read in the training process)
    try:
        make_model().fit(DataLoader(Pairs(x, y, fail_rows={1, 2, 3}), batch_size=4, num_workers=2), epochs=1, seed=3,
                         verbose=0)
        out["failure"] = None
    except ValueError as exc:
        out["failure"] = str(exc)
    out["children"] = len(mp.active_children())
    return out


def assert_close(a, b, what: str, rtol: float = 1e-9):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    worst = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12))) if a.size else 0.0
    assert worst < rtol, f"{what}: relative difference {worst:.3e}"


def assert_same_run(r, ref, what: str):
    assert list(r["history"]) == list(ref["history"]), what
    for key in ref["history"]:
        assert_close(r["history"][key], ref["history"][key], f"{what} history[{key!r}]")
    for key in ref["weights"]:
        assert_close(r["weights"][key], ref["weights"][key], f"{what} weight {key}")
    for key in ref["evaluate"]:
        assert_close(r["evaluate"][key], ref["evaluate"][key], f"{what} evaluate[{key!r}]")
    assert_close(r["predict"], ref["predict"], f"{what} predict")


# Hand-counted rows per rank and epoch: global batches 5,5,5,5,3 split into contiguous parts of sizes that
# differ by at most one (the first ranks take the extra row).
EXPECTED_READS = {1: [23], 2: [4 * 3 + 2, 4 * 2 + 1], 3: [4 * 2 + 1, 4 * 2 + 1, 4 * 1 + 1]}


def test_loaders_and_workers_are_world_size_invariant(tmp_path):
    results = {}
    for world in (1, 2, 3):
        log_dir = tmp_path / f"world{world}"
        log_dir.mkdir()
        results[world] = (run_ranks(rank_checks, world, str(log_dir), timeout=280), log_dir)
    ref = results[1][0][0]["loader"]
    assert ref["history"]["loss"][0] > ref["history"]["loss"][-1] > 0  # it trained
    assert ref["predict"].shape == (N, 3) and set(ref["evaluate"]) == {"loss", "accuracy"}
    for world, (per_rank, log_dir) in results.items():
        for rank, r in enumerate(per_rank):
            tag = f"world {world} rank {rank}"
            for case in ("loader", "arrays", "workers=0", "workers=2"):
                assert_same_run(r[case], ref, f"{tag} {case}")
            # the worker's exception names the rank, keeps the worker's traceback; no worker is left behind
            assert r["failure"] is not None and f"rank {rank} of {world}" in r["failure"], r["failure"]
            assert "boom at row" in r["failure"] and "Traceback" in r["failure"]
            assert r["children"] == 0
        # each rank fetched only its own rows: hand-counted per rank, and together each row once per epoch
        for rank in range(world):  # before training: the first item, once, to name the outputs
            assert reads(str(log_dir), rank)[None] == [0]
        for epoch in (0, 1):
            by_rank = [reads(str(log_dir), rank).get(epoch, []) for rank in range(world)]
            assert [len(rows) for rows in by_rank] == EXPECTED_READS[world], f"world {world} epoch {epoch}"
            assert sorted(i for rows in by_rank for i in rows) == list(range(N))


# -- one process ------------------------------------------------------------------------------------------

def test_a_loader_shuffles_only_when_its_sampler_and_fit_both_say_so():
    n = 11
    ds = Pairs(row_ids(n), np.zeros((n, 1)))
    seen = {}
    for name, loader_shuffle, fit_shuffle in (("seq", False, True), ("rand", True, True), ("off", True, False)):
        rec = Recorder()
        frozen_model(rec).fit(DataLoader(ds, batch_size=4, shuffle=loader_shuffle), shuffle=fit_shuffle,
                              epochs=1, seed=3, verbose=0)
        seen[name] = rec.rows(True)
    rec = Recorder()
    frozen_model(rec).fit(row_ids(n), np.zeros((n, 1)), batch_size=4, epochs=1, seed=3, verbose=0)
    assert seen["seq"] == seen["off"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert seen["rand"] == rec.rows(True) != seen["seq"]  # dfit's (seed, epoch) permutation, as for arrays


def test_the_loader_batch_size_is_the_global_batch_unless_fit_gives_one():
    n = 10
    ds = Pairs(row_ids(n), np.zeros((n, 1)))
    rec = Recorder()
    model = frozen_model(rec)
    model.fit(DataLoader(ds, batch_size=4), epochs=1, verbose=0)
    assert [len(r) for r in rec.rows(True)] == [4, 4, 2]
    rec.calls.clear()
    model.fit(DataLoader(ds, batch_size=4), batch_size=6, epochs=1, verbose=0)
    assert [len(r) for r in rec.rows(True)] == [6, 4]
    rec.calls.clear()
    model.fit(DataLoader(ds, batch_size=4), validation_data=DataLoader(ds, batch_size=3), epochs=1, verbose=0)
    assert [len(r) for r in rec.rows(False)] == [3, 3, 3, 1]
    rec.calls.clear()
    model.predict(DataLoader(ds, batch_size=7))
    assert [len(r) for r in rec.rows(False)] == [7, 3]


def test_drop_last_leaves_out_the_partial_last_global_batch():
    n = 11
    x, y = row_ids(n), np.random.default_rng(0).normal(size=(n, 1))
    rec = Recorder(w=0.5)
    history = frozen_model(rec).fit(DataLoader(Pairs(x, y), batch_size=4, shuffle=True, drop_last=True),
                                    epochs=2, seed=1, verbose=0)
    batches = rec.rows(True)
    assert [len(b) for b in batches] == [4, 4, 4, 4]
    for epoch in (0, 1):
        rows = [i for b in batches[2 * epoch:2 * epoch + 2] for i in b]
        assert len(set(rows)) == 8
        per = mse_rows(x[rows] * 0.5, y[rows])
        assert history.history["loss"][epoch] == pytest.approx(per.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="drop_last=True.*fewer than the global batch size 16"):
        frozen_model(Recorder()).fit(DataLoader(Pairs(x, y), batch_size=16, drop_last=True), epochs=1, verbose=0)


def test_loaders_that_cannot_be_resharded_are_refused_clearly():
    n = 8
    ds = Pairs(row_ids(n), np.zeros((n, 1)))
    model = frozen_model(Recorder())
    with pytest.raises(ValueError, match="sampler SubsetRandomSampler cannot be resharded.*supported"):
        model.fit(DataLoader(ds, batch_size=2, sampler=SubsetRandomSampler(range(4))), verbose=0)
    with pytest.raises(ValueError, match="custom batch_sampler cannot be resharded"):
        model.fit(DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 3, False)), verbose=0)
    with pytest.raises(ValueError, match="batch_size=None"):
        model.fit(DataLoader(ds, batch_size=None), verbose=0)
    with pytest.raises(ValueError, match="replacement"):
        model.fit(DataLoader(ds, batch_size=2, sampler=torch.utils.data.RandomSampler(ds, replacement=True)),
                  verbose=0)
    with pytest.raises(ValueError, match="workers=2 was given with a DataLoader of num_workers=0"):
        model.fit(DataLoader(ds, batch_size=2), workers=2, verbose=0)
    with pytest.raises(ValueError, match="y and sample_weight must be None when x is a DataLoader"):
        model.fit(DataLoader(ds, batch_size=2), np.zeros(n), verbose=0)


def test_loading_arguments_are_checked():
    x, y = row_ids(4), np.zeros((4, 1))
    model = frozen_model(Recorder())
    with pytest.raises(ValueError, match="use_multiprocessing=True needs workers > 0"):
        model.fit(x, y, use_multiprocessing=True, verbose=0)
    with pytest.raises(ValueError, match="workers must be a non-negative integer"):
        model.fit(x, y, workers=-1, verbose=0)
    with pytest.raises(ValueError, match="max_queue_size must be a positive integer"):
        model.evaluate(x, y, max_queue_size=0, verbose=0)
    with pytest.raises(TypeError, match="use_multiprocessing must be True or False"):
        model.predict(x, use_multiprocessing="yes")
    # accepted: processes, said twice
    model.fit(Pairs(x, y), workers=1, use_multiprocessing=True, epochs=1, verbose=0)


def test_max_queue_size_bounds_the_prefetch_and_workers_are_processes():
    options = dfit.data.LoadOptions.from_fit(workers=2, max_queue_size=5)
    assert (options.num_workers, options.prefetch_factor) == (2, 3)  # ceil(5 / 2) batches per worker
    assert dfit.data.LoadOptions.from_fit(workers=4, max_queue_size=1).prefetch_factor == 1
    x, y = row_ids(6), np.zeros((6, 1))
    adapter = dfit.data.adapt(Pairs(x, y), float_dtype=torch.float64, loading=options)
    batches = adapter.epoch(0, 2, None, False, 0, 0, 1)
    next(batches)
    assert adapter._loader.num_workers == 2 and adapter._loader.prefetch_factor == 3
    assert len(mp.active_children()) == 2
    batches.close()  # stopping early shuts the workers down
    assert mp.active_children() == []


def test_a_worker_exception_names_the_rank_and_leaves_no_worker_behind():
    x, y = row_ids(8), np.zeros((8, 1))
    for loader_kwargs in ({"num_workers": 2}, {"num_workers": 2, "persistent_workers": True}):
        with pytest.raises(ValueError, match=r"(?s)\[rank 0 of 1, loading data\].*worker process.*boom at row 5"):
            frozen_model(Recorder()).fit(DataLoader(Pairs(x, y, fail_rows={5}), batch_size=4, **loader_kwargs),
                                         shuffle=False, epochs=1, verbose=0)
        assert mp.active_children() == []
    with pytest.raises(ValueError, match=r"\[rank 0 of 1, loading data\] boom at row 1"):  # in-process too
        frozen_model(Recorder()).fit(Pairs(x, y, fail_rows={1}), epochs=1, verbose=0)


def test_persistent_workers_live_through_fit_and_end_with_it():
    x, y = row_ids(8), np.zeros((8, 1))
    alive = []
    counter = dfit.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: alive.append(len(mp.active_children())))
    loader = DataLoader(Pairs(x, y), batch_size=4, num_workers=2, persistent_workers=True)
    frozen_model(Recorder()).fit(loader, epochs=3, verbose=0, callbacks=[counter])
    assert alive == [2, 2, 2]
    assert mp.active_children() == []


def test_set_epoch_is_called_and_validation_split_splits_row_ids():
    n = 10
    x, y = row_ids(n), np.zeros((n, 1))
    ds = Pairs(x, y)
    rec = Recorder()
    frozen_model(rec).fit(DataLoader(ds, batch_size=4, num_workers=2), validation_split=0.3, epochs=2, verbose=0)
    assert sorted(i for b in rec.rows(True) for i in b) == sorted(list(range(7)) * 2)
    assert [i for b in rec.rows(False) for i in b] == [7, 8, 9] * 2
    assert ds.epochs_set == [0, 0, 1, 0]  # training epoch e, then validation (epoch 0)


def test_a_collate_fn_is_used_and_its_pairs_are_x_and_y():
    n = 6
    x, y = np.random.default_rng(0).normal(size=(n, 1)), np.random.default_rng(1).normal(size=(n, 1))

    class Dicts(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"features": x[i].tolist(), "target": y[i].tolist()}

    def collate(items):  # float32 lists: dfit casts them to the model's float64
        return (torch.tensor([it["features"] for it in items], dtype=torch.float32),
                torch.tensor([it["target"] for it in items], dtype=torch.float32))

    model = frozen_model(Recorder(w=0.5, b=0.25))
    loss = model.evaluate(DataLoader(Dicts(), batch_size=4, collate_fn=collate, num_workers=1), verbose=0)
    assert loss == pytest.approx(mse_rows(x * 0.5 + 0.25, y.astype(np.float32).astype(np.float64)).mean(), rel=1e-6)
    assert model.module.calls[0][1].dtype == torch.float64


# -- the example ------------------------------------------------------------------------------------------

def test_the_digits_images_example_runs_alone_and_under_dfit_launch(tmp_path):
    """examples/digits_images.py for 1 epoch: plain python and 2 ranks (2 workers each) give the same history."""
    import json
    import subprocess
    import sys

    from conftest import REPO, launch_env

    example = REPO / "examples" / "digits_images.py"
    launcher = Path(sys.executable).parent / "dfit-launch"
    launch = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "dfit.launch"]
    histories = []
    for i, prefix in enumerate(([sys.executable], launch + ["--nproc-per-node", "2"])):
        out = tmp_path / f"history{i}.json"
        res = subprocess.run(prefix + [str(example), "--epochs", "1", "--verbose", "0", "--history-out", str(out)],
                             cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "2 loader worker(s) each" in res.stdout
        histories.append(json.loads(out.read_text()))
    assert [h["world_size"] for h in histories] == [1, 2]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(histories[1]["history"][key], histories[0]["history"][key], rtol=2e-5, atol=2e-6)
    assert histories[0]["history"]["val_accuracy"][0] > 0.3  # it learned something in one epoch
