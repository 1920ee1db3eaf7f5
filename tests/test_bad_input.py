"""The bad-input catalogue on 2 ranks: every mistake raises a clear ValueError/TypeError on EVERY rank, fast.

One 2-rank job (gloo, collective timeout 20 s so a hang fails fast) tries every mistake of
``bad_input_catalogue.MISTAKES`` in sequence on both ranks and returns what each rank raised; the parametrized
tests below assert, per mistake, the type and a message saying what is wrong and how to fix it, on both ranks.
Some mistakes are made on rank 1 only (another data length, batch size, seed, ...): the one collective at the
start of fit/evaluate/predict (``dfit.agreement``) must turn them into the same error on both ranks.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dfit
from bad_input_catalogue import MISTAKES, try_all
from ranks import run_ranks

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def outcomes():
    per_rank = run_ranks(try_all, 2, list(MISTAKES), 20.0, timeout=480)
    return [{name: (kind, message) for name, kind, message in rank_results} for rank_results in per_rank]


def test_the_catalogue_has_at_least_45_distinct_mistakes():
    assert len(MISTAKES) >= 45
    assert sum(name.startswith("rank1_") for name in MISTAKES) >= 10


@pytest.mark.parametrize("name", list(MISTAKES))
def test_every_rank_raises_a_clear_error(outcomes, name):
    _, expected, pattern = MISTAKES[name]
    for rank, results in enumerate(outcomes):
        assert name in results, f"rank {rank} never got to {name!r} (an earlier mistake put the ranks out of step)"
        kind, message = results[name]
        assert kind == expected.__name__, f"rank {rank}: {name} ended with {kind}: {message}"
        assert re.search(pattern, message), f"rank {rank}: {name}: {message!r} does not match {pattern!r}"


def test_a_disagreement_names_the_argument_the_ranks_and_this_ranks_value(outcomes):
    for rank, results in enumerate(outcomes):
        message = results["rank1_batch_size"][1]
        assert f"this rank ({rank}) has batch_size={8 if rank == 0 else 16}" in message
        assert "ranks [0] vs [1]" in message and "Every rank must call fit with the same arguments" in message


def test_a_failure_on_one_rank_is_raised_on_the_others_with_its_rank(outcomes):
    rank0, rank1 = (results["rank1_only_fails_a_check"][1] for results in outcomes)
    assert rank1 == "batch_size must be a positive integer or None; got -3"
    assert rank0 == "rank 1: " + rank1


def test_initial_epoch_at_or_past_epochs_trains_nothing_and_says_so_once():
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(2, 1)])
    model.compile("sgd", "mse")
    before = [p.detach().clone() for p in model.module.parameters()]
    with pytest.warns(UserWarning, match=r"initial_epoch=3, epochs=2\) trains nothing.*epochs=initial_epoch \+ k"):
        history = model.fit(np.ones((8, 2)), np.ones((8, 1)), epochs=2, initial_epoch=3, verbose=0)
    assert history.history == {}   # Keras 3: the loop over range(initial_epoch, epochs) runs no epoch
    assert all(torch.equal(a, b) for a, b in zip(before, model.module.parameters()))


def test_the_checks_add_no_collective_on_one_process(monkeypatch):
    calls = []
    real = dfit.distributed._all_reduce

    def recording(t, op):
        calls.append(t.dtype)   # the agreement's vector is the only int64 one
        return real(t, op)

    monkeypatch.setattr(dfit.distributed, "_all_reduce", recording)
    model = dfit.Sequential([nn.Linear(2, 1)])
    model.compile("sgd", "mse")
    model.fit(np.ones((8, 2)), np.ones((8, 1)), epochs=1, verbose=0)
    model.evaluate(np.ones((8, 2)), np.ones((8, 1)), verbose=0)
    model.predict(np.ones((8, 2)))
    assert torch.int64 not in calls


def test_the_probe_restores_every_layers_mode_and_draws_no_random_numbers():
    model = dfit.Sequential([nn.Linear(2, 3), nn.Dropout(0.5), nn.BatchNorm1d(3), nn.Linear(3, 3)])
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.module.train()
    model.module[2].eval()   # a frozen BatchNorm stays frozen
    state = torch.get_rng_state()
    from dfit.data import checks

    checks.probe(model.module, torch.ones(4, 2), 4, "x")
    assert torch.equal(state, torch.get_rng_state())
    assert [m.training for m in model.module] == [True, True, False, True]


def test_a_non_picklable_model_for_the_spawn_mode_is_a_clear_error():
    class Unpicklable(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 1)
            self.hook = lambda t: t

        def forward(self, x):
            return self.hook(self.layer(x))

    model = dfit.Model(Unpicklable())
    model.compile("sgd", "mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"start_method='spawn' must pickle the model.*make the model picklable"):
            dfit.multi_gpu_model(model, gpus=2, start_method="spawn").fit(np.ones((8, 2)), np.ones((8, 1)), epochs=1,
                                                                          verbose=0)
