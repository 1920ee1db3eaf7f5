"""The per-step collective budget on 2 ranks: a training step runs only DDP's gradient all-reduce buckets, and an
epoch adds a few small collectives (metrics, agreement) whose number does not grow with the number of steps. So
adding ranks never adds latency-bound work per step.

How it counts (in each rank): every public collective of ``torch.distributed`` (and the private helpers DDP calls
from Python) is wrapped, counting only the outermost call (``all_gather_object`` calls ``all_gather`` inside);
DDP's reducer runs its all-reduces in C++, so the ``DistributedDataParallel`` that dfit's engine builds is replaced
by a subclass that registers a comm hook counting each bucket and then doing what DDP does by default (all-reduce
of the bucket, divided by the world size). A callback marks the start of every step and epoch in the same log.

The check catches a collective added to the step: ``test_an_added_collective_breaks_the_budget`` runs the same
fit with one extra ``all_reduce`` per step patched into the engine's step and asserts the budget check fails.
(Checked as well by hand, 2026-11-26: adding ``dist.all_reduce_sum(torch.zeros(1))`` at the top of
``Engine._backward_in_chunks`` makes ``test_a_step_runs_only_the_gradient_buckets`` fail with
"step 1: ['all_reduce', 'bucket']".)
"""
from __future__ import annotations

import numpy as np
import pytest

from ranks import run_ranks

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "gather_object", "scatter", "scatter_object_list", "barrier",
               "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
               "_broadcast_coalesced", "_verify_params_across_processes")
EPOCH_BUDGET = 4  # collectives per epoch outside its steps: epoch logs, agreement; never growing with steps


def _fit_and_log(rows_per_epoch: list[int], extra_collective_per_step: bool = False) -> list[list]:
    """In a rank: fits (one fit per entry, n rows each, batch 4, 2 epochs) and returns each fit's log of
    collectives and markers: ("epoch", e), ("step", s), a collective's name, or "bucket"."""
    import torch
    import torch.distributed as tdist
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    import dfit
    from dfit import distributed as dist
    from dfit import engine

    log: list = []
    depth = [0]

    def counted(name, original):
        def wrapper(*args, **kwargs):
            if depth[0] == 0:
                log.append(name)
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapper

    for name in COLLECTIVES:
        if hasattr(tdist, name):
            setattr(tdist, name, counted(name, getattr(tdist, name)))

    class CountingDDP(nn.parallel.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

            def hook(state, bucket):
                log.append("bucket")
                depth[0] += 1                     # the hook's own all_reduce is the bucket, not another one
                try:
                    return default_hooks.allreduce_hook(None, bucket)
                finally:
                    depth[0] -= 1
            self.register_comm_hook(None, hook)

    engine.DistributedDataParallel = CountingDDP

    if extra_collective_per_step:                 # the mutant: one more collective in every step
        step = engine.Engine._backward_in_chunks

        def with_extra(self, *args, **kwargs):
            dist.all_reduce_sum(torch.zeros(1))
            return step(self, *args, **kwargs)
        engine.Engine._backward_in_chunks = with_extra

    class Marks(dfit.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            log.append(("epoch", epoch))

        def on_train_batch_begin(self, batch, logs=None):
            log.append(("step", batch))

        def on_train_batch_end(self, batch, logs=None):
            log.append(("step_end", batch))

    logs = []
    rng = np.random.default_rng(0)
    for n in rows_per_epoch:
        torch.manual_seed(0)
        model = dfit.Sequential([nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)])
        model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
        del log[:]
        model.fit(rng.normal(size=(n, 4)), rng.normal(size=(n, 2)), batch_size=4, epochs=2, shuffle=True,
                  verbose=0, callbacks=[Marks()])
        logs.append(list(log))
    return logs


def _by_step(log: list) -> tuple[dict, dict]:
    """(collectives in each (epoch, step), collectives of each epoch outside its steps: between its start and
    the next epoch's, e.g. the epoch logs' all-reduce after the last step)."""
    steps, outside, here, epoch = {}, {}, None, None
    for item in log:
        if isinstance(item, tuple) and item[0] == "epoch":
            epoch, here = item[1], None
            outside.setdefault(epoch, [])
        elif isinstance(item, tuple) and item[0] == "step":
            here = (epoch, item[1])
            steps[here] = []
        elif isinstance(item, tuple) and item[0] == "step_end":
            here = None
        elif here is not None:
            steps[here].append(item)
        elif epoch is not None:
            outside[epoch].append(item)
    return steps, outside


def _budget_violations(log: list) -> list[str]:
    """What breaks the budget: a step (after the very first one of the fit, which builds DDP) doing anything
    but gradient buckets, or a different number of buckets than the other steps; an epoch doing more than
    EPOCH_BUDGET collectives outside its steps."""
    steps, outside = _by_step(log)
    later = [key for key in sorted(steps) if key != (0, 0)]
    problems = [f"step {key}: {steps[key]}" for key in later if set(steps[key]) != {"bucket"}]
    if len({len(steps[key]) for key in later}) > 1:
        problems.append(f"bucket counts differ between steps: {sorted({len(steps[k]) for k in later})}")
    problems += [f"epoch {e}: {calls}" for e, calls in outside.items() if len(calls) > EPOCH_BUDGET]
    return problems


@pytest.fixture(scope="module")
def logs():
    return run_ranks(_fit_and_log, 2, [16, 64], timeout=240)


def test_a_step_runs_only_the_gradient_buckets(logs):
    for rank, (short, long) in enumerate(logs):
        for log in (short, long):
            assert _budget_violations(log) == [], f"rank {rank}"
        steps, _ = _by_step(long)
        assert len(steps) == 2 * 16                               # 64 rows, batch 4, 2 epochs: every step seen
        assert steps[(1, 5)] == ["bucket"]                        # this tiny model is one bucket


def test_an_epochs_collectives_do_not_grow_with_its_steps(logs):
    for short, long in logs:
        (_, outside_short), (_, outside_long) = _by_step(short), _by_step(long)
        assert outside_short == outside_long                      # 4 steps or 16 steps: the same few
        assert 1 <= len(outside_long[1]) <= EPOCH_BUDGET          # at least the epoch logs' all-reduce


def test_an_added_collective_breaks_the_budget():
    for short, in run_ranks(_fit_and_log, 2, [16], True, timeout=240):
        problems = _budget_violations(short)
        assert any("step (1, 2): ['all_reduce', 'bucket']" in p for p in problems), problems
