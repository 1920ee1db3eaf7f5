"""Arrays larger than memory, read in place (issue 17 part 2): NumPy memmaps, file-backed tensors, h5py datasets and
Hugging Face datasets train with the same history and weights as the same data in memory, each rank's anonymous
memory does not grow with the file, validation_split makes views, and a truncated file stops every rank."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import dfit
from dfit.data.lazy import ArrowColumns, DataFileError, DiskArray, FileTensor, H5Array, MemmapArray, in_place
from ranks import run_ranks

h5py = pytest.importorskip("h5py")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.timeout(600)
MIB = 1 << 20


def rss_anon() -> int:
    """This process's anonymous resident memory in bytes (``RssAnon`` of /proc/self/status)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakAnon(dfit.callbacks.Callback):
    """The highest RssAnon seen at any batch end of training or validation."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def _seen(self, *args):
        self.peak = max(self.peak, rss_anon())

    on_train_batch_end = on_test_batch_end = on_epoch_end = _seen


def make_model(width: int, dtype=torch.float64, classes: int = 3) -> dfit.Model:
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(width, 4), nn.Tanh(), nn.Linear(4, classes)])
    model.module.to(dtype)
    model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=0.1, momentum=0.9),
                  loss=nn.CrossEntropyLoss(), metrics=["accuracy"], weighted_metrics=["accuracy"])
    return model


def fit_both(make_x, make_y, make_w, width: int, fit_options: dict):
    """Train on the data read in place, then on the same data in memory (a fresh, identical model each)."""
    out = []
    for in_memory in (False, True):
        x, y, w = make_x(), make_y(), make_w()
        if in_memory:
            x, y, w = (None if a is None else np.array(a.numpy() if isinstance(a, torch.Tensor) else a)
                       for a in (x, y, w))
        model = make_model(width)
        history = model.fit(x, y, sample_weight=w, verbose=0, seed=5, **fit_options)
        weights = [p.detach().clone() for p in model.module.parameters()]
        out.append((history.history, weights))
    return out


# -- data files ----------------------------------------------------------------------------------------------
def small_arrays(n=203, width=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, width)).astype(np.float32), rng.integers(0, 3, size=n),
            rng.uniform(0.5, 2.0, size=(n, 1)).astype(np.float32))


def write_npy(folder, n=203, width=5):
    x, y, w = small_arrays(n, width)
    for name, a in (("x", x), ("y", y), ("w", w)):
        np.save(os.path.join(folder, f"{name}.npy"), a)
    return x, y, w


def write_h5(path, n=203, width=5):
    x, y, w = small_arrays(n, width)
    with h5py.File(path, "w") as f:
        f["x"], f["y"], f["w"] = x, y, w[:, 0]
    return x, y, w


def write_hf(folder, n=203, width=5):
    import pyarrow as pa

    x, y, w = small_arrays(n, width)
    table = pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), width),
                      "a": x[:, 0], "b": x[:, 1].astype(np.float64), "label": y, "weight": w[:, 0]})
    datasets.Dataset(table).save_to_disk(folder)
    return x, y, w


# -- exactness on 2 ranks -----------------------------------------------------------------------------------
FIT = dict(batch_size=16, epochs=3, steps_per_epoch=5, shuffle=True, validation_split=0.2)


def _memmap_run(folder):
    load = lambda name: (lambda: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r"))  # noqa: E731
    return fit_both(load("x"), load("y"), load("w"), 5, FIT)


def _h5_run(path):
    f = h5py.File(path, "r")
    return fit_both(lambda: f["x"], lambda: f["y"], lambda: f["w"], 5, FIT)


def _hf_run(folder):
    ds = datasets.load_from_disk(folder)
    out = []
    for data in (dfit.data.columns(ds, x="features", y="label", sample_weight="weight"),
                 (np.array(ds.with_format("numpy")["features"]), np.array(ds["label"]), np.array(ds["weight"]))):
        model = make_model(5)
        if isinstance(data, tuple):
            history = model.fit(data[0], data[1], sample_weight=data[2], verbose=0, seed=5, **FIT)
        else:
            history = model.fit(data, verbose=0, seed=5, **FIT)
        out.append((history.history, [p.detach().clone() for p in model.module.parameters()]))
    return out


def assert_same_runs(results):
    """On every rank: the run read in place equals the run in memory, bit for bit; and every rank agrees."""
    for (on_disk, in_memory) in results:
        assert on_disk[0] == in_memory[0]
        for a, b in zip(on_disk[1], in_memory[1]):
            np.testing.assert_array_equal(a, b)
    assert results[0][0][0] == results[1][0][0]
    for a, b in zip(results[0][0][1], results[1][0][1]):
        np.testing.assert_array_equal(a, b)
    assert set(results[0][0][0]) >= {"loss", "val_loss", "accuracy"}


def test_memmap_trains_like_memory_on_two_ranks(tmp_path):
    x, _, _ = write_npy(tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x)
    assert_same_runs(run_ranks(_memmap_run, 2, str(tmp_path), timeout=300))


def test_h5py_trains_like_memory_on_two_ranks(tmp_path):
    write_h5(tmp_path / "data.h5")
    assert_same_runs(run_ranks(_h5_run, 2, str(tmp_path / "data.h5"), timeout=300))


def test_hugging_face_dataset_trains_like_memory_on_two_ranks(tmp_path):
    write_hf(str(tmp_path / "hf"))
    assert_same_runs(run_ranks(_hf_run, 2, str(tmp_path / "hf"), timeout=300))


def test_file_backed_tensor_trains_like_memory(tmp_path):
    x, y, w = small_arrays()
    for a, name in ((x, "x"), (w, "w")):
        a.tofile(tmp_path / f"{name}.bin")
    for shared in (False, True):
        mapped = lambda name, cols: torch.from_file(  # noqa: E731
            str(tmp_path / f"{name}.bin"), shared=shared, size=len(x) * cols, dtype=torch.float32).view(len(x), cols)
        assert isinstance(in_place(mapped("x", 5)), FileTensor)
        runs = fit_both(lambda: mapped("x", 5), lambda: torch.from_numpy(y), lambda: mapped("w", 1), 5, FIT)
        assert runs[0][0] == runs[1][0]
        for a, b in zip(runs[0][1], runs[1][1]):
            assert torch.equal(a, b)
    assert in_place(torch.zeros(3, 2)) is None    # a tensor in memory is not read "in place"


# -- memory: each rank's anonymous memory does not grow with the file ---------------------------------------
def _anon_growth_run(kind, path, width, steps):
    if kind == "memmap":
        x = np.load(os.path.join(path, "x.npy"), mmap_mode="r")
        data = dict(x=x, y=np.load(os.path.join(path, "y.npy"), mmap_mode="r"))
    elif kind == "h5py":
        f = h5py.File(path, "r")
        data = dict(x=f["x"], y=f["y"])
    else:
        data = dict(x=dfit.data.columns(datasets.load_from_disk(path), x="features", y="label"))
    model = make_model(width, dtype=torch.float64)    # float64: an upfront cast would copy twice the file
    model.fit(np.zeros((64, width)), np.zeros(64, dtype=np.int64),
              epochs=1, batch_size=64, verbose=0)     # a warm-up on 64 rows in memory: the job and the engine
    before, peak = rss_anon(), PeakAnon()
    history = model.fit(**data, batch_size=64, epochs=2, steps_per_epoch=steps, shuffle=True, seed=3,
                        validation_split=0.01, validation_steps=2, callbacks=[peak], verbose=0)
    return {"growth": max(peak.peak, rss_anon()) - before, "loss": history.history["loss"]}


def _write_big_npy(folder, rows, width):
    x = np.lib.format.open_memmap(os.path.join(folder, "x.npy"), mode="w+", dtype=np.float32, shape=(rows, width))
    chunk = 1 << 16
    pattern = np.sin(np.arange(chunk * width, dtype=np.float32)).reshape(chunk, width)
    for a in range(0, rows, chunk):
        x[a:a + chunk] = pattern[:min(chunk, rows - a)]
    x.flush()
    del x
    np.save(os.path.join(folder, "y.npy"), (np.arange(rows) % 3).astype(np.int64))
    return os.path.getsize(os.path.join(folder, "x.npy"))


def test_two_ranks_train_on_a_memmap_over_2_gb_without_copying_it(tmp_path):
    size = _write_big_npy(tmp_path, rows=1_100_000, width=512)
    assert size >= 2 * 10 ** 9
    results = run_ranks(_anon_growth_run, 2, "memmap", str(tmp_path), 512, 4, timeout=500)
    growth = [r["growth"] for r in results]
    print(f"RssAnon growth per rank, {size / 2 ** 30:.2f} GiB memmap: {[round(g / MIB, 1) for g in growth]} MiB")
    assert all(g < 128 * MIB for g in growth), growth
    assert results[0]["loss"] == results[1]["loss"] and all(np.isfinite(results[0]["loss"]))


def test_two_ranks_train_on_h5py_and_arrow_files_without_copying_them(tmp_path):
    import pyarrow as pa

    rows, width = 200_000, 256                       # 205 MB of float32 (410 MB as float64)
    x = np.lib.format.open_memmap(tmp_path / "src.npy", mode="w+", dtype=np.float32, shape=(rows, width))
    x[:] = np.cos(np.arange(rows, dtype=np.float32))[:, None]
    labels = (np.arange(rows) % 3).astype(np.int64)
    with h5py.File(tmp_path / "big.h5", "w") as f:
        f["x"], f["y"] = x, labels
    table = pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x).reshape(-1)), width),
                      "label": labels})
    datasets.Dataset(table).save_to_disk(str(tmp_path / "hf"))
    del x, table
    for kind, path in (("h5py", tmp_path / "big.h5"), ("arrow", tmp_path / "hf")):
        results = run_ranks(_anon_growth_run, 2, kind, str(path), width, 4, timeout=300)
        growth = [r["growth"] for r in results]
        print(f"RssAnon growth per rank, {kind} ({rows * width * 4 / 2 ** 20:.0f} MiB): "
              f"{[round(g / MIB, 1) for g in growth]} MiB")
        assert all(g < 128 * MIB for g in growth), (kind, growth)


# -- views, pickling, conversion ----------------------------------------------------------------------------
def test_validation_split_makes_views_of_the_file(tmp_path):
    x, y, w = write_npy(tmp_path, n=50)
    write_h5(tmp_path / "d.h5", n=50)
    write_hf(str(tmp_path / "hf"), n=50)
    f = h5py.File(tmp_path / "d.h5", "r")
    hf = dfit.data.columns(datasets.load_from_disk(str(tmp_path / "hf")), x=["a", "b"], y="label")
    sources = {"memmap": (np.load(tmp_path / "x.npy", mmap_mode="r"), MemmapArray),
               "h5py": (f["x"], H5Array), "arrow": (hf, ArrowColumns)}
    for name, (source, kind) in sources.items():
        data = dfit.data.adapt(source, None if name == "arrow" else y, float_dtype=torch.float64)
        train, val = data.split(0.2)
        assert isinstance(train.x, kind) and isinstance(val.x, kind), name
        assert (train.x.start, train.x.stop, val.x.start, val.x.stop) == (0, 40, 40, 50)
        expected = x[40:50] if name != "arrow" else np.stack([x[40:50, 0], x[40:50, 1]], 1)
        got = val.x.read(torch.tensor([3, 0, 9, 3]))
        assert got.dtype == torch.float64
        np.testing.assert_array_equal(got.numpy(), expected[[3, 0, 9, 3]].astype(np.float64))
        np.testing.assert_array_equal(val.x.read(slice(2, 5)).numpy(), expected[2:5])
        if name == "memmap":   # the view reads the same mapping: nothing was copied
            assert val.x._arr() is source and np.shares_memory(val.x._arr(), source)


def test_pickled_leaves_open_the_same_file_instead_of_carrying_it(tmp_path):
    from dfit.spawn import _prepare

    x, _, _ = write_npy(tmp_path, n=1000, width=64)
    write_h5(tmp_path / "d.h5", n=1000, width=64)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    for source in (mm, mm[100:900, 3:40], np.asarray(mm)[::2], h5py.File(tmp_path / "d.h5", "r")["x"]):
        leaf = _prepare(source, torch.float64, share=True)        # what multi_gpu_model(spawn) sends each worker
        assert isinstance(leaf, DiskArray)
        blob = pickle.dumps(leaf)
        assert len(blob) < 2000                                     # the file's place, not its 256 KB
        copy = pickle.loads(blob)
        ids = torch.tensor([7, 1, 1, 30])
        expected = np.asarray(source)[[7, 1, 1, 30]].astype(np.float64)
        np.testing.assert_array_equal(copy.read(ids).numpy(), expected)
        np.testing.assert_array_equal(copy[5:9].read(slice(0, 4)).numpy(), np.asarray(source)[5:9])


def test_hugging_face_columns_name_inputs_targets_and_weights(tmp_path):
    x, y, w = write_hf(str(tmp_path / "hf"), n=30)
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    cols = dfit.data.columns(ds, x={"a": "a", "both": ["a", "b"]}, y=("label", "features"), sample_weight="weight")
    ids = torch.tensor([4, 2])
    assert cols.x["a"].read(ids).shape == (2,)
    np.testing.assert_array_equal(cols.x["both"].read(ids).numpy(), np.stack([x[[4, 2], 0], x[[4, 2], 1]], 1))
    assert isinstance(cols.y, list) and cols.y[0].read(ids).tolist() == y[[4, 2]].tolist()
    np.testing.assert_array_equal(cols.y[1].read(ids).numpy(), x[[4, 2]])
    assert len(cols) == 30 and cols.sample_weight.read(ids).tolist() == w[[4, 2], 0].tolist()
    with pytest.raises(ValueError, match=r"names \['nope'\], which the dataset does not have"):
        dfit.data.columns(ds, x="nope")
    model = make_model(5)
    with pytest.raises(TypeError, match=r"dfit\.data\.columns\(ds, x=\.\.\., y=\.\.\.\)"):
        model.fit(ds, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="y and sample_weight must be None"):
        model.fit(dfit.data.columns(ds, x="features"), y, epochs=1, verbose=0)
    history = model.fit(dfit.data.columns(ds, x="features", y="label"), epochs=1, batch_size=8, verbose=0,
                        validation_data=dfit.data.columns(ds, x="features", y="label"))
    assert "val_loss" in history.history
    np.testing.assert_allclose(model.predict(dfit.data.columns(ds, x="features"), verbose=0),
                               model.predict(x.astype(np.float64), verbose=0), rtol=0, atol=0)


def test_class_weight_and_bad_shapes_with_data_read_in_place(tmp_path):
    x, y, w = write_npy(tmp_path, n=40)
    load = lambda name: np.load(tmp_path / f"{name}.npy", mmap_mode="r")  # noqa: E731
    runs = []
    for source in (load, lambda name: np.array(load(name))):
        model = make_model(5)
        history = model.fit(source("x"), source("y"), sample_weight=source("w"), class_weight={0: 2.0, 1: 0.5},
                            batch_size=8, epochs=2, seed=1, verbose=0)
        runs.append(history.history)
    assert runs[0] == runs[1]
    np.save(tmp_path / "w2.npy", np.ones((40, 3), np.float32))
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(samples,\); got \(40, 3\)"):
        make_model(5).fit(load("x"), load("y"), sample_weight=load("w2"), verbose=0)
    np.save(tmp_path / "c.npy", np.array(["a"] * 40))
    with pytest.raises(TypeError, match="unsupported dtype"):
        make_model(5).fit(load("c"), load("y"), verbose=0)


# -- a file truncated while the job runs ----------------------------------------------------------------------
class Truncate(dfit.callbacks.Callback):
    """At the end of epoch 0, on rank ``rank``, cut ``path`` to half its size."""

    def __init__(self, path, rank):
        super().__init__()
        self.path, self.rank = path, rank

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0 and dfit.distributed.rank() == self.rank:
            os.truncate(self.path, os.path.getsize(self.path) // 2)


def _truncated_run(folder, per_rank_files):
    rank = dfit.distributed.rank()
    name = f"x{rank}.npy" if per_rank_files else "x.npy"
    path = os.path.join(folder, name)
    model = make_model(5)
    try:
        model.fit(np.load(path, mmap_mode="r"), np.load(os.path.join(folder, "y.npy")), batch_size=8,
                  epochs=3, shuffle=True, verbose=0, callbacks=[Truncate(path, 0)])
    except DataFileError as exc:
        return {"error": str(exc), "epochs": len(model.history.history.get("loss", []))}
    return {"error": None}


@pytest.mark.parametrize("per_rank_files", [False, True], ids=["shared-file", "one-rank-file"])
def test_a_truncated_file_stops_every_rank_with_an_error_naming_it(tmp_path, per_rank_files):
    write_npy(tmp_path, n=64)
    for r in range(2):
        (tmp_path / f"x{r}.npy").write_bytes((tmp_path / "x.npy").read_bytes())
    results = run_ranks(_truncated_run, 2, str(tmp_path), per_rank_files, timeout=120)
    truncated = str(tmp_path / ("x0.npy" if per_rank_files else "x.npy"))
    for rank, result in enumerate(results):
        assert result["error"] is not None, rank
        assert result["epochs"] == 1               # epoch 0 ran; epoch 1 never started a step
        if rank == 0 or not per_rank_files:
            assert f"the data file {truncated} (x) was truncated while the job ran" in result["error"]
        else:   # rank 1's own file is whole: it stops because rank 0 found its file truncated
            assert "was found truncated or gone on rank(s) [0]" in result["error"]
            assert str(tmp_path / "x1.npy") in result["error"]


def test_a_file_truncated_mid_epoch_is_a_clear_error_not_a_crash(tmp_path):
    write_npy(tmp_path, n=64)
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    data = dfit.data.adapt(x, np.zeros(64, dtype=np.int64), float_dtype=torch.float64)
    batches = data.epoch(0, 8, None, True, 0, 0, 1)
    next(batches)
    os.truncate(tmp_path / "x.npy", 200)
    with pytest.raises(DataFileError, match=r"x\.npy \(x\) was truncated while the job ran: it has 200 bytes"):
        next(batches)


SPAWN_SCRIPT = '''
import json, sys
import h5py, numpy as np, torch
from torch import nn
import dfit

def make():
    torch.manual_seed(0)
    m = dfit.Sequential([nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)])
    m.module.double()
    m.compile(optimizer=torch.optim.SGD(m.module.parameters(), lr=0.1), loss=nn.CrossEntropyLoss())
    return m

if __name__ == "__main__":
    folder = sys.argv[1]
    x = np.load(folder + "/x.npy", mmap_mode="r")
    y = np.load(folder + "/y.npy", mmap_mode="r")
    h5 = h5py.File(folder + "/d.h5", "r")
    kw = dict(batch_size=16, epochs=2, validation_split=0.25, seed=3, verbose=0)
    one = make()
    out = {"memory": one.fit(np.array(x), np.array(y), **kw).history}
    weights = {"memory": [p.detach().reshape(-1).tolist() for p in one.module.parameters()]}
    for name, data in (("memmap", x), ("h5py", h5["x"])):
        par = dfit.multi_gpu_model(make(), gpus=2, start_method="spawn")
        out[name] = par.fit(data, y, **kw).history
        weights[name] = [p.detach().reshape(-1).tolist() for p in par.module.parameters()]
    json.dump({"history": out, "weights": weights}, sys.stdout)
'''


def test_multi_gpu_model_spawn_workers_open_the_same_files(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import launch_env

    write_npy(tmp_path, n=121)
    write_h5(tmp_path / "d.h5", n=121)
    script = tmp_path / "spawn_train.py"
    script.write_text(SPAWN_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], env=launch_env(), capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("memmap", "h5py"):
        assert list(r["history"][name]) == ["loss", "val_loss"]
        for key, want in r["history"]["memory"].items():
            np.testing.assert_allclose(r["history"][name][key], want, rtol=1e-10, err_msg=f"{name} {key}")
        for a, b in zip(r["weights"][name], r["weights"]["memory"]):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
