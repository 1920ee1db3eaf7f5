"""Input kinds (numpy, torch, pandas, lists, dicts, Datasets), multi-input/multi-output models, dtypes, bad input."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import dfit
from core_helpers import F64, Recorder, fixed_linear, frozen_model, mse_rows, row_ids

pytestmark = pytest.mark.timeout(60)
RNG = np.random.default_rng(99)


class TwoInputs(nn.Module):
    """y = a @ wa + b @ wb, positional or by keyword; records which arguments it received."""

    def __init__(self):
        super().__init__()
        self.la = fixed_linear([[1.0, -2.0]], [0.5])
        self.lb = fixed_linear([[3.0]], [0.0])
        self.received = []

    def forward(self, a, b):
        self.received.append((a.shape, b.shape))
        return self.la(a) + self.lb(b)


def _two_input_data(n=9):
    a, b = RNG.normal(size=(n, 2)), RNG.normal(size=(n, 1))
    y = RNG.normal(size=(n, 1))
    pred = a @ np.array([[1.0], [-2.0]]) + 0.5 + 3.0 * b
    return a, b, y, pred


def test_list_inputs_are_positional_arguments():
    a, b, y, pred = _two_input_data()
    module = TwoInputs()
    model = frozen_model(module)
    history = model.fit([a, b], y, epochs=1, batch_size=4, verbose=0, shuffle=False)
    assert module.received[0] == (torch.Size([4, 2]), torch.Size([4, 1]))
    assert history.history["loss"][0] == pytest.approx(mse_rows(pred, y).mean(), rel=1e-12)
    np.testing.assert_allclose(model.predict([a, b], batch_size=4), pred, rtol=1e-12)
    assert model.evaluate([a, b], y, verbose=0) == pytest.approx(mse_rows(pred, y).mean(), rel=1e-12)


def test_dict_inputs_are_keyword_arguments():
    a, b, y, pred = _two_input_data()
    module = TwoInputs()
    model = frozen_model(module)
    # keys in the opposite order of the signature: they must be matched by name, not position
    history = model.fit({"b": b, "a": a}, y, epochs=1, batch_size=5, verbose=0)
    assert history.history["loss"][0] == pytest.approx(mse_rows(pred, y).mean(), rel=1e-12)
    np.testing.assert_allclose(model.predict({"b": b, "a": a}), pred, rtol=1e-12)


def test_tuple_inputs_are_positional_too():
    a, b, y, pred = _two_input_data()
    model = frozen_model(TwoInputs())
    np.testing.assert_allclose(model.predict((a, b)), pred, rtol=1e-12)


class TwoOutputs(nn.Module):
    def __init__(self, as_dict: bool):
        super().__init__()
        self.as_dict = as_dict
        self.l1 = fixed_linear([[2.0]], [0.0])
        self.l2 = fixed_linear([[1.0], [-1.0]], [0.0, 1.0])

    def forward(self, x):
        out1, out2 = self.l1(x), self.l2(x)
        return {"score": out1, "pair": out2} if self.as_dict else [out1, out2]


def _two_output_data(n=7):
    x = RNG.normal(size=(n, 1))
    y1, y2 = RNG.normal(size=(n, 1)), RNG.normal(size=(n, 2))
    p1 = 2.0 * x
    p2 = np.concatenate([x, 1.0 - x], axis=1)
    return x, y1, y2, p1, p2


def test_multi_output_list_with_per_output_losses_and_loss_weights():
    x, y1, y2, p1, p2 = _two_output_data()
    model = frozen_model(TwoOutputs(False), loss=["mse", "mae"], loss_weights=[2.0, 0.5], metrics=["mse", "mse"])
    history = model.fit(x, [y1, y2], epochs=1, batch_size=3, verbose=0, validation_split=0.3)
    logs = {k: v[0] for k, v in history.history.items()}
    assert list(logs) == ["loss", "output_1_loss", "output_2_loss", "output_1_mse", "output_2_mse",
                          "val_loss", "val_output_1_loss", "val_output_2_loss", "val_output_1_mse", "val_output_2_mse"]
    tr, va = slice(0, 4), slice(4, 7)
    l1 = mse_rows(p1, y1)
    l2 = np.abs(p2 - y2).mean(-1)
    assert logs["output_1_loss"] == pytest.approx(l1[tr].mean(), rel=1e-12)
    assert logs["output_2_loss"] == pytest.approx(l2[tr].mean(), rel=1e-12)
    assert logs["loss"] == pytest.approx(2.0 * l1[tr].mean() + 0.5 * l2[tr].mean(), rel=1e-12)
    assert logs["val_loss"] == pytest.approx(2.0 * l1[va].mean() + 0.5 * l2[va].mean(), rel=1e-12)
    assert logs["output_2_mse"] == pytest.approx(mse_rows(p2, y2)[tr].mean(), rel=1e-12)
    preds = model.predict(x)
    assert isinstance(preds, list) and len(preds) == 2
    np.testing.assert_allclose(preds[0], p1, rtol=1e-12)
    np.testing.assert_allclose(preds[1], p2, rtol=1e-12)


def test_multi_output_dict_with_dict_losses_and_loss_weights():
    x, y1, y2, p1, p2 = _two_output_data()
    model = frozen_model(TwoOutputs(True), loss={"score": "mse", "pair": "mae"},
                         loss_weights={"score": 0.25, "pair": 4.0}, metrics={"pair": ["mse"]})
    history = model.fit(x, {"pair": y2, "score": y1}, epochs=1, verbose=0)
    logs = {k: v[0] for k, v in history.history.items()}
    assert set(logs) == {"loss", "score_loss", "pair_loss", "pair_mse"}
    l1, l2 = mse_rows(p1, y1).mean(), np.abs(p2 - y2).mean()
    assert logs["score_loss"] == pytest.approx(l1, rel=1e-12)
    assert logs["pair_loss"] == pytest.approx(l2, rel=1e-12)
    assert logs["loss"] == pytest.approx(0.25 * l1 + 4.0 * l2, rel=1e-12)
    preds = model.predict(x)
    assert set(preds) == {"score", "pair"}
    np.testing.assert_allclose(preds["pair"], p2, rtol=1e-12)
    result = model.evaluate(x, {"score": y1, "pair": y2}, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(logs["loss"], rel=1e-12)


def test_multi_output_single_loss_applies_to_every_output():
    x, y1, y2, p1, p2 = _two_output_data()
    model = frozen_model(TwoOutputs(False), loss="mse")
    total, o1, o2 = model.evaluate(x, [y1, y2], verbose=0)
    assert o1 == pytest.approx(mse_rows(p1, y1).mean(), rel=1e-12)
    assert o2 == pytest.approx(mse_rows(p2, y2).mean(), rel=1e-12)
    assert total == pytest.approx(o1 + o2, rel=1e-12)


def test_multi_output_sample_weights_weigh_every_output():
    x, y1, y2, p1, p2 = _two_output_data()
    w = RNG.uniform(0, 2, size=len(x))
    model = frozen_model(TwoOutputs(False), loss=["mse", "mse"])
    total, o1, o2 = model.evaluate(x, [y1, y2], sample_weight=w, verbose=0)
    assert o1 == pytest.approx((w * mse_rows(p1, y1)).sum() / len(x), rel=1e-12)
    assert total == pytest.approx((w * (mse_rows(p1, y1) + mse_rows(p2, y2))).sum() / len(x), rel=1e-12)


def test_multi_output_mismatches_are_clear_errors():
    x, y1, y2, _, _ = _two_output_data()
    model = frozen_model(TwoOutputs(False), loss=["mse", "mse", "mse"])
    with pytest.raises(ValueError, match="loss has 3 entries, one per model output, but the targets y describe 2 outputs"):
        model.fit(x, [y1, y2], epochs=1, verbose=0)
    model = frozen_model(TwoOutputs(True), loss={"score": "mse", "nope": "mse"})
    with pytest.raises(ValueError, match=r"loss names outputs \['nope'\] that have no targets in y"):
        model.fit(x, {"score": y1, "pair": y2}, epochs=1, verbose=0)
    model = frozen_model(TwoOutputs(True), loss="mse")
    with pytest.raises(ValueError, match=r"the model output has no entries for outputs \['other'\]"):
        model.fit(x, {"score": y1, "other": y2}, epochs=1, verbose=0)
    model = frozen_model(TwoOutputs(False), loss="mse")
    with pytest.raises(ValueError, match="the model output has 2 entries but there are 1 outputs"):
        model.fit(x, y1, epochs=1, verbose=0)


# -- array kinds --------------------------------------------------------------------------------------------
def _expected_loss(x, y, w=0.5, b=0.25):
    return mse_rows(np.asarray(x, np.float64) * w + b, np.asarray(y, np.float64)).mean()


@pytest.mark.parametrize("kind", ["numpy", "torch", "pandas", "list_of_lists", "numpy_f32"])
def test_array_kinds_give_the_same_loss(kind):
    x, y = RNG.normal(size=(9, 1)), RNG.normal(size=(9, 1))
    if kind == "torch":
        xs, ys = torch.tensor(x), torch.tensor(y)
    elif kind == "pandas":
        xs, ys = pd.DataFrame({"f": x[:, 0]}), pd.Series(y[:, 0], name="target")
    elif kind == "list_of_lists":
        xs, ys = x.tolist(), y.tolist()
    else:
        xs, ys = (x.astype(np.float32), y.astype(np.float32)) if kind == "numpy_f32" else (x, y)
    model = frozen_model(Recorder(w=0.5, b=0.25))
    history = model.fit(xs, ys, epochs=1, verbose=0, batch_size=4)
    ref_x, ref_y = (x.astype(np.float32), y.astype(np.float32)) if kind == "numpy_f32" else (x, y)
    assert history.history["loss"][0] == pytest.approx(_expected_loss(ref_x, ref_y), rel=1e-12)
    np.testing.assert_allclose(model.predict(xs), np.asarray(ref_x, np.float64) * 0.5 + 0.25, rtol=1e-12)


def test_pandas_dataframe_with_several_columns_and_series_labels():
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": [0.0, 1.0, 0.0, 1.0]})
    y = pd.Series([1.0, 0.0, 2.0, 1.0])
    module = fixed_linear([[1.0, -1.0]], [0.0])
    model = frozen_model(module)
    loss = model.evaluate(df, y, verbose=0)
    pred = df["a"].to_numpy() - df["b"].to_numpy()
    assert loss == pytest.approx(((pred - y.to_numpy()) ** 2).mean(), rel=1e-12)


def test_float64_module_casts_inputs_and_keeps_integer_labels():
    seen = {}

    def loss(y_true, y_pred):  # Keras' argument order
        seen["pred"], seen["true"] = y_pred.dtype, y_true.dtype
        return torch.nn.functional.cross_entropy(y_pred, y_true, reduction="none")

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = fixed_linear(np.eye(3), np.zeros(3))

        def forward(self, x):
            seen["x"] = x.dtype
            return self.lin(x)

    x = RNG.normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 2, 1, 0], dtype=np.int64)
    model = frozen_model(Probe(), loss=loss)
    model.fit(x, labels, epochs=1, verbose=0, sample_weight=np.ones(6, dtype=np.float32))
    assert seen == {"x": torch.float64, "pred": torch.float64, "true": torch.int64}
    assert model.predict(x).dtype == np.float64


def test_float32_module_casts_float64_inputs_down():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x):
            seen["x"] = x.dtype
            return self.lin(x)

    model = dfit.Model(Probe())
    model.compile("sgd", "mse")
    model.fit(RNG.normal(size=(4, 2)), RNG.normal(size=(4, 1)), epochs=1, verbose=0)
    assert seen["x"] == torch.float32
    assert model.predict(RNG.normal(size=(4, 2))).dtype == np.float32


class PairDataset(Dataset):
    """A map-style dataset that counts __getitem__ calls."""

    def __init__(self, x, y, w=None):
        self.x, self.y, self.w = x, y, w
        self.reads = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads.append(i)
        item = (torch.tensor(self.x[i]), torch.tensor(self.y[i]))
        return item + ((torch.tensor(self.w[i]),) if self.w is not None else ())


def test_map_style_dataset_is_like_an_array():
    x, y = RNG.normal(size=(10, 1)), RNG.normal(size=(10, 1))
    w = RNG.uniform(0, 2, size=10)
    ds = PairDataset(x, y, w)
    model = frozen_model(Recorder(w=0.5, b=0.25))
    clear = dfit.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: ds.reads.clear())
    history = model.fit(ds, epochs=1, batch_size=3, verbose=0, validation_split=0.3, shuffle=False,
                        callbacks=[clear])
    per = w * mse_rows(x * 0.5 + 0.25, y)
    assert history.history["loss"][0] == pytest.approx(per[:7].sum() / 7, rel=1e-12)
    assert history.history["val_loss"][0] == pytest.approx(per[7:].sum() / 3, rel=1e-12)
    assert ds.reads == list(range(10))  # every row read once per epoch, train rows then validation rows
    assert model.evaluate(ds, verbose=0) == pytest.approx(per.mean(), rel=1e-12)


def test_map_style_dataset_shuffles_like_arrays():
    n = 11
    ds = PairDataset(row_ids(n), np.zeros((n, 1)))
    rec = Recorder()
    frozen_model(rec).fit(ds, epochs=1, batch_size=4, verbose=0, seed=3)
    rec_arr = Recorder()
    frozen_model(rec_arr).fit(row_ids(n), np.zeros((n, 1)), epochs=1, batch_size=4, verbose=0, seed=3)
    assert rec.rows(True) == rec_arr.rows(True)


def test_map_style_dataset_multi_output_and_class_weight():
    x = RNG.normal(size=(6, 1))
    y1, y2 = RNG.normal(size=(6, 1)), RNG.normal(size=(6, 1))

    class Items(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.tensor(x[i]), {"a": torch.tensor(y1[i]), "b": torch.tensor(y2[i])}

    class Out(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = fixed_linear([[1.0], [2.0]], [0.0, 0.0])

        def forward(self, v):
            out = self.lin(v)
            return {"a": out[:, :1], "b": out[:, 1:]}

    model = frozen_model(Out())
    logs = model.evaluate(Items(), verbose=0, return_dict=True)
    assert logs["a_loss"] == pytest.approx(mse_rows(x, y1).mean(), rel=1e-12)
    assert logs["b_loss"] == pytest.approx(mse_rows(2 * x, y2).mean(), rel=1e-12)
    with pytest.raises(NotImplementedError, match="class_weight"):
        model.fit(PairDataset(x, y1), epochs=1, verbose=0, class_weight={0: 1.0})


def test_map_style_dataset_with_y_is_rejected():
    ds = PairDataset(row_ids(4), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="Dataset"):
        frozen_model(Recorder()).fit(ds, np.zeros((4, 1)), epochs=1, verbose=0)


def test_tensor_dataset_with_and_without_weights():
    x, y = RNG.normal(size=(8, 1)), RNG.normal(size=(8, 1))
    w = RNG.uniform(0, 2, size=8)
    model = frozen_model(Recorder(w=0.5, b=0.25))
    per = mse_rows(x * 0.5 + 0.25, y)
    history = model.fit(TensorDataset(torch.tensor(x), torch.tensor(y)), epochs=1, verbose=0, batch_size=3)
    assert history.history["loss"][0] == pytest.approx(per.mean(), rel=1e-12)
    history = model.fit(TensorDataset(torch.tensor(x), torch.tensor(y), torch.tensor(w)), epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx((w * per).sum() / 8, rel=1e-12)
    np.testing.assert_allclose(model.predict(TensorDataset(torch.tensor(x))), x * 0.5 + 0.25, rtol=1e-12)


def test_a_generator_with_steps_per_epoch_trains_like_its_arrays():
    """API.md: an infinite generator with steps_per_epoch yields one batch per global step."""
    x, y = RNG.normal(size=(4, 1)), RNG.normal(size=(4, 1))

    def gen():
        while True:
            yield x, y

    history = frozen_model(Recorder()).fit(gen(), epochs=2, steps_per_epoch=2, verbose=0)
    assert history.history["loss"] == pytest.approx([_expected_loss(x, y, 1.0, 0.0)] * 2, rel=1e-12)


# -- bad input ----------------------------------------------------------------------------------------------
def test_mismatched_lengths():
    model = frozen_model(Recorder())
    with pytest.raises(ValueError, match=r"cardinality.*x: 5, y: 4"):
        model.fit(row_ids(5), np.zeros((4, 1)), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="sample_weight has 3 rows but x has 5"):
        model.fit(row_ids(5), np.zeros((5, 1)), sample_weight=np.ones(3), epochs=1, verbose=0)
    module = TwoInputs()
    with pytest.raises(ValueError, match="cardinality"):
        frozen_model(module).fit([np.zeros((5, 2)), np.zeros((6, 1))], np.zeros((5, 1)), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="cardinality"):
        model.evaluate(row_ids(5), np.zeros((6, 1)), verbose=0)
    with pytest.raises(ValueError, match="cardinality"):
        model.fit(row_ids(5), np.zeros((5, 1)), epochs=1, verbose=0,
                  validation_data=(row_ids(3), np.zeros((2, 1))))


@pytest.mark.parametrize("bad, message", [
    ("text", "x: unsupported type str"), (object(), "x: unsupported type object"),
    (np.array(["a", "b"]), "x: unsupported dtype <U1; expected numbers"),
    (np.array([{}, {}], dtype=object), "x: cannot turn an array of Python objects into a tensor"),
], ids=["str", "object", "unicode-array", "object-array"])
def test_wrong_input_types(bad, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        frozen_model(Recorder()).fit(bad, np.zeros((2, 1)), epochs=1, verbose=0)


def test_empty_and_missing_input():
    model = frozen_model(Recorder())
    with pytest.raises(ValueError, match="0 samples"):
        model.fit(np.zeros((0, 1)), np.zeros((0, 1)), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="required"):
        model.fit(None, np.zeros((2, 1)), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="scalar"):
        model.predict(np.array(3.0))


def test_missing_targets_are_a_clear_error():
    model = frozen_model(Recorder())
    with pytest.raises(ValueError, match="without targets"):
        model.fit(row_ids(4), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="without targets"):
        model.evaluate(row_ids(4), verbose=0)
    with pytest.raises(ValueError, match="without targets"):
        model.fit(row_ids(4), np.zeros((4, 1)), epochs=1, verbose=0, validation_data=(row_ids(2), None))
    with pytest.raises(ValueError, match="without targets"):
        model.train_on_batch(row_ids(4))
    with pytest.raises(ValueError, match="without targets"):
        model.fit(TensorDataset(torch.tensor(row_ids(4))), epochs=1, verbose=0)
    np.testing.assert_array_equal(model.predict(row_ids(4)), row_ids(4))  # predict needs none


def test_module_must_be_a_torch_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dfit.Model(lambda x: x)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dfit.Sequential([nn.Linear(1, 1), "relu"])


# -- the global-batch arithmetic (dfit.data.sharding), rank by rank in one process ----------------------------------
from dfit.data import sharding as S  # noqa: E402
from dfit.data.shuffle import perm  # noqa: E402


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 10, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_part_bounds_split_contiguously_with_the_extra_rows_first(n, world):
    bounds = [S.part_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
    sizes = [stop - start for start, stop in bounds]
    assert sizes == [n // world + (1 if r < n % world else 0) for r in range(world)]


def test_part_bounds_by_hand():
    assert [S.part_bounds(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [S.part_bounds(2, 3, r) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]


def test_num_batches_counts_the_last_partial_batch():
    assert [S.num_batches(n, 3) for n in (0, 1, 3, 4, 9, 10)] == [0, 1, 1, 2, 3, 4]


def _whole_pass(n, seed, pass_index):
    """The whole shuffle of a pass, for comparison (dfit itself never builds it)."""
    return perm(torch.arange(n), n, seed, pass_index)


def test_shuffled_rows_are_the_pass_permutation_at_this_ranks_positions_only():
    plan = S.GlobalBatchPlan(10**9, 64, 1, 3, shuffle=True, seed=5, pass_index=2)
    rows, size = plan.rows(7)
    lo, hi = 7 * 64 + 22, 7 * 64 + 43                 # 64 rows over 3 ranks: parts of 22, 21, 21
    assert size == 64 and torch.equal(rows, perm(torch.arange(lo, hi), 10**9, 5, 2))
    assert rows.dtype == torch.int64 and len(set(rows.tolist())) == 21


@pytest.mark.parametrize("world", [1, 3])
def test_rows_of_many_steps_equal_rows_of_each_step(world, monkeypatch):
    monkeypatch.setattr(S, "ROWS_PER_CALL", 7)          # several calls of perm, one cut mid-way through a step
    for n, steps in [(23, range(0, 5)), (23, range(2, 5)), (20, range(1, 4)), (23, range(4, 5))]:
        for rank in range(world):
            plan = S.GlobalBatchPlan(n, 5, rank, world, True, 3, 1)
            got = list(plan.rows_of(steps))
            want = [plan.rows(step) for step in steps]
            assert [size for _, size in got] == [size for _, size in want]
            assert all(torch.equal(g, w) for (g, _), (w, _) in zip(got, want))


def _global_batches(n, batch_size, world, shuffle, seed=3, pass_index=0):
    """Per step: the rows of all ranks concatenated in rank order, and the global sizes each rank reports."""
    plans = [S.GlobalBatchPlan(n, batch_size, r, world, shuffle, seed, pass_index) for r in range(world)]
    out = []
    for step in range(S.num_batches(n, batch_size)):
        parts = [plan.rows(step) for plan in plans]
        rows = [torch.arange(n)[r].tolist() for r, _ in parts]
        sizes = {size for _, size in parts}
        assert len(sizes) == 1, f"ranks disagree on the global batch size at step {step}: {sizes}"
        out.append(([i for part in rows for i in part], sizes.pop(), [len(r) for r in rows]))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_global_batches_are_the_same_on_any_number_of_ranks(world, shuffle):
    n, batch_size = 23, 5  # 4 full batches and one of 3 rows (fewer than some worlds' ranks + 1)
    order = _whole_pass(n, 3, 0).tolist() if shuffle else list(range(n))
    got = _global_batches(n, batch_size, world, shuffle)
    assert [rows for rows, _, _ in got] == [order[i:i + batch_size] for i in range(0, n, batch_size)]
    assert [size for _, size, _ in got] == [5, 5, 5, 5, 3]
    for rows, size, lengths in got:
        assert lengths == [S.part_bounds(size, world, r)[1] - S.part_bounds(size, world, r)[0] for r in range(world)]


def test_unshuffled_rows_are_slices_and_shuffled_rows_index_tensors():
    plan = S.GlobalBatchPlan(10, 4, 1, 2, shuffle=False, seed=0, pass_index=0)
    assert plan.rows(0) == (slice(2, 4), 4)
    assert plan.rows(2) == (slice(9, 10), 2)
    shuffled = S.GlobalBatchPlan(10, 4, 1, 2, shuffle=True, seed=0, pass_index=0)
    rows, size = shuffled.rows(2)
    assert size == 2 and torch.equal(rows, _whole_pass(10, 0, 0)[9:10])


def test_epoch_batches_follow_keras_steps_per_epoch():
    assert S.epoch_batches(10, 3, None) == (3, range(10))
    assert S.epoch_batches(10, 3, 10) == (3, range(10))
    assert S.epoch_batches(10, 3, 25) == (3, range(10))
    # 4 steps per epoch over 10 batches: epochs (0..3), (4..7), (8, 9), then a new pass
    assert [S.epoch_batches(10, e, 4) for e in range(4)] == [
        (0, range(0, 4)), (0, range(4, 8)), (0, range(8, 10)), (1, range(0, 4))]
    assert [S.epoch_batches(6, e, 3) for e in range(3)] == [(0, range(0, 3)), (0, range(3, 6)), (1, range(0, 3))]


def test_epoch_rows_on_every_rank_make_up_the_global_epoch():
    n, batch_size, steps, seed = 17, 4, 3, 5   # 5 batches a pass: epochs of 3 and 2 batches
    for epoch in range(3):
        pass_index = epoch // 2
        order = _whole_pass(n, seed, pass_index)
        want_batches = range(0, 3) if epoch % 2 == 0 else range(3, 5)
        per_rank = [list(S.epoch_rows(n, batch_size, epoch, steps, True, seed, r, 2)) for r in range(2)]
        assert [len(p) for p in per_rank] == [len(want_batches)] * 2
        for k, step in enumerate(want_batches):
            rows = torch.cat([per_rank[r][k][0] for r in range(2)])
            assert torch.equal(rows, order[step * batch_size:min((step + 1) * batch_size, n)])
            assert {per_rank[r][k][1] for r in range(2)} == {min(batch_size, n - step * batch_size)}


def test_batch_size_for_follows_keras():
    assert S.batch_size_for(100, 16, None) == 16
    assert S.batch_size_for(100, 16, 3) == 16
    assert S.batch_size_for(100, None, 7) == 15       # ceil(100 / 7)
    assert S.batch_size_for(100, None, 100) == 1
    assert S.batch_size_for(0, None, 5) == 1
    assert S.batch_size_for(100, None, None) == 32
    assert S.batch_size_for(100, None, 0) == 32


def test_split_point_keeps_the_last_rows_for_validation():
    assert S.split_point(10, 0.2) == 8
    assert S.split_point(10, 0.25) == 7   # int(7.5): Keras truncates
    assert S.split_point(2, 0.5) == 1
    with pytest.raises(ValueError, match=r"validation_split=0.0 of 10 samples leaves no validation samples"):
        S.split_point(10, 0.0)
    with pytest.raises(ValueError, match=r"validation_split=0.95 of 10 samples leaves no training samples"):
        S.split_point(10, 0.95)
    with pytest.raises(ValueError, match="no training samples"):
        S.split_point(10, 1.0)
