"""Streams: generators, iterators, IterableDataset, DataLoader over one, per_rank — exact on N ranks.

Counts are exact: which rows each epoch trains on is read back from a module that records its inputs.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import dfit
from core_helpers import Recorder, frozen_model, row_ids
from ranks import run_ranks

pytestmark = pytest.mark.timeout(240)


def batches_of(n: int, size: int, offset: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(x, y) batches whose x holds row ids offset..offset+n-1 (a Recorder shows which rows were read)."""
    x = row_ids(n) + offset
    return [(x[i:i + size], np.zeros((len(x[i:i + size]), 1))) for i in range(0, n, size)]


class Batches:
    """A re-iterable of batches with a length (like a DataLoader): every iter() starts a new pass."""

    def __init__(self, items):
        self.items = list(items)

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


class Counting:
    """A one-shot iterator over batches that counts how many items were taken from it."""

    def __init__(self, items, repeat: bool = False):
        self.items, self.repeat, self.taken = list(items), repeat, 0

    def __iter__(self):
        return self

    def __next__(self):
        if not self.repeat and self.taken >= len(self.items):
            raise StopIteration
        item = self.items[self.taken % len(self.items)]
        self.taken += 1
        return item


def epochs_seen(rec: Recorder, marks: list[int]) -> list[list[list[int]]]:
    batches = rec.rows(True)
    bounds = marks + [len(batches)]
    return [batches[bounds[i]:bounds[i + 1]] for i in range(len(marks))]


def fit_recording(source, epochs: int, steps=None, **kwargs):
    rec, marks = Recorder(), []
    cb = dfit.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: marks.append(len(rec.rows(True))))
    model = frozen_model(rec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(source, epochs=epochs, steps_per_epoch=steps, verbose=0, callbacks=[cb], **kwargs)
    return epochs_seen(rec, marks), history, [str(w.message) for w in caught], model


B = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_a_one_shot_iterator_continues_across_epochs_and_counts_are_exact():
    it = Counting(batches_of(10, 3), repeat=True)
    seen, history, _, _ = fit_recording(it, epochs=3, steps=3)
    assert seen == [[B[0], B[1], B[2]], [B[3], B[0], B[1]], [B[2], B[3], B[0]]]
    assert it.taken == 9                       # nothing read beyond what the epochs used
    assert history.params["steps"] == 3


def test_a_one_shot_iterator_that_runs_out_ends_training_with_keras_warning():
    it = Counting(batches_of(10, 3))
    seen, history, messages, _ = fit_recording(it, epochs=3, steps=3)
    assert seen == [[B[0], B[1], B[2]], [B[3]]]          # epoch 2 ends when the data does; no epoch 3
    assert history.epoch == [0, 1]
    assert sum("ran out of data" in m for m in messages) >= 1


def test_a_finite_generator_without_steps_is_one_epoch_then_training_ends():
    seen, history, messages, _ = fit_recording((b for b in batches_of(10, 3)), epochs=2)
    assert seen == [B]
    assert history.epoch == [0]
    assert any("interrupting training" in m for m in messages)


def test_a_re_iterable_restarts_each_epoch_and_the_bar_learns_its_length():
    class Batches(IterableDataset):
        def __iter__(self):
            return iter(batches_of(10, 3))

    seen, history, messages, _ = fit_recording(Batches(), epochs=3)
    assert seen == [B, B, B]
    assert not messages
    assert history.params["steps"] == 4          # unknown before epoch 1, learned from it


def test_a_re_iterable_with_steps_continues_through_a_pass_like_arrays():
    seen, _, messages, _ = fit_recording(Batches(batches_of(10, 3)), epochs=3, steps=3)
    # a list of batches: the same rule as arrays (Keras 3): epoch 2 meets the end of the pass and stops there
    assert seen == [[B[0], B[1], B[2]], [B[3]], [B[0], B[1], B[2]]]
    assert sum("ran out of data" in m for m in messages) == 1


def test_a_dataloader_over_an_iterable_dataset_is_a_stream():
    class Rows(IterableDataset):
        def __iter__(self):
            for i in range(10):
                yield torch.tensor([float(i)], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)

    seen, _, _, _ = fit_recording(DataLoader(Rows(), batch_size=3), epochs=2)
    assert seen == [B, B]


def test_workers_read_a_stream_on_a_background_thread_with_the_same_result():
    import threading

    readers = set()

    def gen():
        for x, y in batches_of(10, 3):
            readers.add(threading.current_thread().name)
            yield x, y

    plain, _, _, model = fit_recording(Batches(batches_of(10, 3)), epochs=2)
    class Source:
        def __iter__(self):
            return gen()

    threaded, _, _, _ = fit_recording(Source(), epochs=2, workers=2, max_queue_size=4)
    assert threaded == plain == [B, B]
    assert readers == {"dfit-stream-prefetch"}
    assert not [t for t in threading.enumerate() if t.name == "dfit-stream-prefetch"]   # stopped with fit

    def failing():
        yield batches_of(10, 3)[0]
        raise RuntimeError("the source broke")

    class Failing:
        def __iter__(self):
            return failing()

    with pytest.raises(RuntimeError, match="the source broke"):
        frozen_model(Recorder()).fit(Failing(), epochs=1, verbose=0, workers=1)
    assert not [t for t in threading.enumerate() if t.name == "dfit-stream-prefetch" and t.is_alive()]


def test_validation_steps_evaluate_and_predict_steps_on_streams():
    rec = Recorder()
    model = frozen_model(rec)
    model.fit(Batches(batches_of(10, 3)), epochs=2, validation_data=Batches(batches_of(10, 4, offset=100)),
              validation_steps=2,
              verbose=0)
    assert rec.rows(False) == [[100, 101, 102, 103], [104, 105, 106, 107]] * 2
    rec.calls.clear()
    model.evaluate(Counting(batches_of(10, 3)), steps=2, verbose=0)
    assert rec.rows(False) == [B[0], B[1]]
    rec.calls.clear()
    out = model.predict((x for x, _ in batches_of(10, 3)), steps=3)
    np.testing.assert_allclose(out, row_ids(9))
    assert rec.rows(False) == [B[0], B[1], B[2]]


def test_items_with_sample_weights_and_class_weight():
    x = np.arange(6, dtype=np.float64).reshape(6, 1)
    y = np.ones((6, 1))
    w = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 0.0])
    model = frozen_model(Recorder())
    history = model.fit(Batches([(x[:4], y[:4], w[:4]), (x[4:], y[4:], w[4:])]), epochs=1, verbose=0)
    per = (x - y)[:, 0] ** 2
    want = ((w[:4] * per[:4]).sum() + (w[4:] * per[4:]).sum()) / 6        # Keras' epoch loss: weighted by rows
    assert history.history["loss"][0] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="validation_split is only supported"):
        model.fit(Batches([(x, y)]), epochs=1, verbose=0, validation_split=0.5)
    with pytest.raises(ValueError, match="batch_size must be None when the input is a stream"):
        model.fit(Batches([(x, y)]), epochs=1, verbose=0, batch_size=4)
    with pytest.raises(ValueError, match=r"must be \(x, y\), \(x, y, sample_weight\) or x; got a tuple of 4"):
        model.fit(Batches([(x, y, w, w)]), epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"a batch of the stream x: Data cardinality is ambiguous.*x: 6, y: 5"):
        model.fit(Batches([(x, y[:5])]), epochs=1, verbose=0)


# -- N ranks ------------------------------------------------------------------------------------------------
def _invariance_model():
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)])
    model.module.double()
    model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=0.2), loss="mse", metrics=["mae"])
    return model


def _deterministic_batches():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(23, 3)), rng.normal(size=(23, 1))
    return [(x[i:i + 5], y[i:i + 5]) for i in range(0, 23, 5)]   # the last batch has 3 rows: 3 ranks get 1 each


def train_on_a_generator():
    def gen():
        while True:
            yield from _deterministic_batches()

    model = _invariance_model()
    history = model.fit(gen(), epochs=3, steps_per_epoch=4, validation_data=Batches(_deterministic_batches()), verbose=0)
    evaluation = model.evaluate(iter(_deterministic_batches()), verbose=0, return_dict=True)
    predictions = model.predict(Batches([x for x, _ in _deterministic_batches()]))
    weights = [p.detach().numpy().copy() for p in model.module.parameters()]
    return history.history, weights, evaluation, predictions


def test_a_deterministic_generator_gives_the_same_result_on_1_2_3_ranks():
    one = train_on_a_generator()
    for world in (2, 3):
        got = run_ranks(train_on_a_generator, world)
        for rank_result in got:
            for key in one[0]:
                np.testing.assert_allclose(rank_result[0][key], one[0][key], rtol=1e-9, err_msg=key)
            for a, b in zip(rank_result[1], one[1]):
                np.testing.assert_allclose(a, b, rtol=1e-9)
            assert rank_result[2] == pytest.approx(one[2], rel=1e-9)
            np.testing.assert_allclose(rank_result[3], one[3], rtol=1e-9)


def per_rank_uneven():
    rank = dfit.distributed.rank()

    def mine(r, world):
        # rank 0: 10 batches of 2 rows, rank 1: 7 batches of 3 rows; x holds distinct values per rank
        n, size = (10, 2) if r == 0 else (7, 3)
        for k in range(n):
            x = np.full((size, 1), float(100 * r + k))
            yield x, np.zeros((size, 1))

    model = frozen_model(Recorder(w=1.0, b=0.0))
    history = model.fit(dfit.data.per_rank(mine), epochs=2, verbose=0)
    return rank, history.history["loss"], model.module.rows(True)


def test_per_rank_with_uneven_lengths_ends_every_epoch_on_the_same_step_with_exact_normalisation():
    results = run_ranks(per_rank_uneven, 2, timeout=120)
    # The rule: an epoch ends at the first step where some rank has no batch (here after 7 steps); the batches
    # other ranks still had in that pass are not used. Each step's loss is normalised by its rows over ALL ranks.
    per_step = []
    for k in range(7):
        rows0, rows1 = np.full(2, float(k)), np.full(3, float(100 + k))
        per_step.append(((rows0 ** 2).sum() + (rows1 ** 2).sum()) / 5)
    want = float(np.sum(per_step) * 5 / 35)      # epoch loss: batch losses weighted by their rows
    for rank, losses, rows in results:
        assert losses == pytest.approx([want, want], rel=1e-12)
        assert len(rows) == 14                   # 7 steps in each of the 2 epochs, on both ranks
    assert results[0][2][0] == [0, 0] and results[1][2][0] == [100, 100, 100]


def nondeterministic():
    rank = dfit.distributed.rank()

    def gen():
        rng = np.random.default_rng(rank)           # a different seed on every rank: not the same stream
        while True:
            yield rng.normal(size=(4, 1)), np.zeros((4, 1))

    try:
        frozen_model(Recorder()).fit(gen(), epochs=1, steps_per_epoch=5, verbose=0)
    except ValueError as exc:
        return str(exc)
    return "no error"


def malformed_on_rank_1():
    rank = dfit.distributed.rank()

    def mine(r, world):
        for k in range(5):
            if r == 1 and k == 2:
                yield np.zeros((2, 1)), np.zeros((3, 1))      # x and y of different lengths
            else:
                yield np.zeros((2, 1)), np.zeros((2, 1))

    try:
        frozen_model(Recorder()).fit(dfit.data.per_rank(mine), epochs=1, verbose=0)
    except (ValueError, RuntimeError) as exc:
        return rank, type(exc).__name__, str(exc)
    return rank, None, "no error"


def test_a_nondeterministic_stream_and_a_malformed_batch_stop_every_rank_clearly():
    for message in run_ranks(nondeterministic, 2, timeout=120):
        assert "yields different batches on different ranks" in message and "per_rank" in message
    results = run_ranks(malformed_on_rank_1, 2, timeout=120)
    assert results[1][1] == "ValueError" and "rank 1" in results[1][2] and "x: 2, y: 3" in results[1][2]
    assert results[0][1] == "ValueError" and "failed on rank(s) [1]; rank 1: " in results[0][2] \
        and "x: 2, y: 3" in results[0][2]   # rank 1's own error, raised on rank 0 too


def test_the_deprecated_generator_aliases_accept_generators():
    rec = Recorder()
    model = frozen_model(rec)

    def endless():
        while True:
            yield from batches_of(10, 3)

    with pytest.warns(DeprecationWarning, match="fit_generator is deprecated"):
        history = model.fit_generator(endless(), steps_per_epoch=4, epochs=2, verbose=0)
    assert history.epoch == [0, 1] and rec.rows(True) == B * 2
    with pytest.warns(DeprecationWarning, match="evaluate_generator is deprecated"):
        model.evaluate_generator(endless(), steps=2)
    with pytest.warns(DeprecationWarning, match="predict_generator is deprecated"):
        out = model.predict_generator((x for x, _ in batches_of(10, 3)))
    np.testing.assert_allclose(out, row_ids(10))
