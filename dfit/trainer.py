"""The loop drivers (Keras 3's ``Trainer``): fit's epochs, validation, callbacks and the agreement to stop;
evaluate's and predict's single passes.

``Model`` checks the arguments and turns the data into adapters (before any collective); the functions here run
the job: ``data.EpochIterator`` decides which batches make each epoch, ``Engine`` runs the steps.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from . import distributed as dist
from .callbacks import BackupAndRestore, Callback, CallbackList, History, ProgbarLogger
from .callbacks.progbar import with_progbar
from .data import EpochIterator
from .metrics import MetricSet
from .resume import FitState

if TYPE_CHECKING:
    from .model import Model

RAN_OUT = ("Your input ran out of data; the epoch ended before `steps_per_epoch` steps. Make sure your data can give "
           "at least `steps_per_epoch * epochs` batches (arrays give ceil(n / batch_size) batches per pass; an epoch "
           "that reaches the end of the data stops there, and the next one starts a new pass).")
INTERRUPTED = ("Your input ran out of data; interrupting training. Make sure that your dataset or generator can "
               "generate at least `steps_per_epoch * epochs` batches (a one-shot iterator cannot start again).")


@dataclass
class FitPlan:
    """What ``Model.fit`` checked and resolved; everything ``run_fit`` needs besides the data."""

    epochs: int
    initial_epoch: int
    verbose: int
    callbacks: list[Callback]
    view_metrics: Any
    batch_size: int | None
    steps_per_epoch: int | None
    shuffle: bool
    seed: int | None
    val_batch_size: int | None
    validation_steps: int | None
    should_validate: Callable[[int], bool]
    output_names: list[str]
    micro_batch_size: int | None = None


def run_fit(model: "Model", train: Any, val: Any, plan: FitPlan) -> History:
    """Run the epochs of ``fit`` on every rank; returns the History (identical on every rank).

    With a ``BackupAndRestore`` callback whose backup exists, training continues from it: the module, callbacks'
    states, History and stream position before ``on_train_begin``; the optimizer, metric states and random
    generators at the resumed step (see ``dfit.resume``)."""
    engine = model._get_engine()
    rank, world = dist.rank(), dist.world_size()
    backups = [cb for cb in plan.callbacks if isinstance(cb, BackupAndRestore)]
    if len(backups) > 1:
        raise ValueError("fit got more than one BackupAndRestore callback; give one")
    backup = backups[0] if backups else None
    seed = plan.seed
    if seed is None and backup is None:
        seed = dist.broadcast_object(int(np.random.SeedSequence().entropy % (2 ** 31)))
    epochs = EpochIterator(train, plan.batch_size, plan.steps_per_epoch, plan.shuffle, seed or 0, rank, world)
    if backup is not None:
        epochs.track_position()
    val_epochs = None if val is None else EpochIterator(val, plan.val_batch_size, plan.validation_steps, False, 0,
                                                        rank, world)
    train_metrics = model._metric_set(plan.output_names)
    val_metrics = model._metric_set(plan.output_names) if val is not None else None

    history = History()
    user_cbs = [cb for cb in plan.callbacks if cb is not backup]
    cbs = user_cbs + [history]  # History after the user's callbacks, as Keras: it sees what they add to the logs
    if plan.verbose and not any(isinstance(cb, ProgbarLogger) for cb in cbs):  # Keras: the user's one replaces it
        cbs.append(ProgbarLogger())
    plot_cb = view_metrics_callback(plan.view_metrics, plan.epochs - plan.initial_epoch, plan.verbose)
    if plot_cb is not None:
        cbs.append(plot_cb)
    payload, position = None, None
    if backup is not None:
        cbs.append(backup)  # last: a backup sees every callback's hooks of that step or epoch done
        fit_state = FitState(model, engine, train, epochs, seed, history, user_cbs, train_metrics,
                             {"batch_size": plan.batch_size, "steps_per_epoch": plan.steps_per_epoch,
                              "shuffle": plan.shuffle, "seed": plan.seed, "outputs": list(plan.output_names)})
        payload = backup.read_backup(fit_state)
        if payload is not None:
            seed = int(payload["seed"])
        elif seed is None:
            seed = dist.broadcast_object(int(np.random.SeedSequence().entropy % (2 ** 31)))
        epochs.seed = fit_state.seed = seed
        if payload is not None:
            position = fit_state.restore_before_begin(payload)
    params = {"verbose": plan.verbose, "epochs": plan.epochs, "steps": plan.steps_per_epoch or epochs.steps_hint,
              "batch_size": plan.batch_size}
    callbacks = CallbackList(cbs, model, params)
    model.history = history
    model.stop_training = False

    completed, warned = False, False
    engine.micro_batch_size = plan.micro_batch_size
    try:
        callbacks.call("on_train_begin", {})
        first_epoch = plan.initial_epoch
        if payload is not None:
            fit_state.restore_history(payload)
            first_epoch = position.epoch
            if not position.in_epoch:
                fit_state.restore_optimizer(payload)
        logs: dict[str, float] = {}
        for epoch in range(first_epoch, plan.epochs):
            if payload is not None and epoch == first_epoch and payload["stop_training"]:
                break   # the backup was written after a callback decided to stop
            resuming = payload is not None and epoch == first_epoch and position.in_epoch
            if not resuming and not epochs.has_more():   # a one-shot stream is used up: Keras ends training here
                _warn_chief(INTERRUPTED)
                break
            callbacks.call("on_epoch_begin", epoch, {})
            first_step, tracker_state = 0, None
            if payload is not None and epoch == first_epoch:
                if position.in_epoch:
                    fit_state.restore_optimizer(payload)
                    first_step, tracker_state = position.step, payload["metrics"]
                fit_state.restore_rng(payload, position)
            logs = engine.train_epoch(epochs.epoch(epoch, first_step), train_metrics, callbacks, plan.output_names,
                                      first_step, tracker_state)
            if epochs.ran_out and not warned:
                warned = True
                _warn_chief(RAN_OUT)
            if params["steps"] is None and epochs.learned_steps is not None:
                params["steps"] = epochs.learned_steps
            if val_epochs is not None and plan.should_validate(epoch):
                val_logs = run_test(model, val_epochs, val_metrics, callbacks, plan.output_names)
                logs.update({f"val_{k}": v for k, v in val_logs.items()})
            callbacks.call("on_epoch_end", epoch, logs)
            if agree_to_stop(model):
                break
        callbacks.call("on_train_end", dict(logs))  # the last epoch's logs, as Keras
        completed = True
    finally:
        engine.micro_batch_size = None
        close(train, val)   # loader workers end with training, also when it fails
        if backup is not None:
            backup.finish(completed)
    return history


def run_test(model: "Model", epochs: EpochIterator, tracker: MetricSet, callbacks: CallbackList,
             output_names: list[str]) -> dict[str, float]:
    """One evaluation pass (validation inside fit, or evaluate): exact logs over all ranks."""
    callbacks.call("on_test_begin", {})
    epochs.restart()
    with contextlib.closing(epochs.epoch(0)) as batches:   # an early exit still ends the loader's workers
        logs = model._get_engine().test_epoch(batches, tracker, callbacks, output_names)
    callbacks.call("on_test_end", logs)
    return logs


def run_evaluate(model: "Model", data: Any, batch_size: int | None, steps: int | None, verbose: int,
                 callbacks: list[Callback] | None, output_names: list[str]) -> dict[str, float]:
    tracker = model._metric_set(output_names)
    model._get_engine()
    epochs = EpochIterator(data, batch_size, steps, rank=dist.rank(), world=dist.world_size())
    callback_list = CallbackList(with_progbar(callbacks, verbose), model,
                                 {"verbose": verbose, "steps": epochs.steps_hint})
    try:
        return run_test(model, epochs, tracker, callback_list, output_names)
    finally:
        close(data)


def run_predict(model: "Model", data: Any, batch_size: int | None, steps: int | None, verbose: int,
                callbacks: list[Callback] | None) -> Any:
    """Every input row exactly once, in input order, on every rank (CPU tensors)."""
    engine = model._get_engine()
    epochs = EpochIterator(data, batch_size, steps, rank=dist.rank(), world=dist.world_size())
    callback_list = CallbackList(with_progbar(callbacks, verbose), model,
                                 {"verbose": verbose, "steps": epochs.steps_hint})
    callback_list.call("on_predict_begin", {})
    try:
        with contextlib.closing(epochs.epoch(0)) as batches:
            out = engine.predict(batches, callback_list)
    finally:
        close(data)
    callback_list.call("on_predict_end", {})
    return out


def agree_to_stop(model: "Model") -> bool:
    """Any rank's stop decision stops every rank (one tiny all-reduce per epoch)."""
    if dist.world_size() == 1:
        return bool(model.stop_training)
    flag = dist.all_reduce_max(torch.tensor([1.0 if model.stop_training else 0.0]))
    model.stop_training = bool(flag.item())
    return model.stop_training


def close(*adapters: Any) -> None:
    """Shut down what the adapters started (loader worker processes)."""
    for adapter in adapters:
        closer = getattr(adapter, "close", None)
        if closer is not None:
            closer()


def _warn_chief(message: str) -> None:
    if dist.is_chief():
        warnings.warn(message, UserWarning, stacklevel=4)


def view_metrics_callback(view_metrics: Any, epochs: int, verbose: int) -> Callback | None:
    """The plot callback ``fit(view_metrics=...)`` asks for, if any."""
    if view_metrics is False or view_metrics is None:
        return None
    if isinstance(view_metrics, str) and view_metrics != "auto":
        from .plotting import PlotMetrics

        return PlotMetrics(path=view_metrics)
    from .plotting import PlotMetrics, wants_live_plot

    if dist.environment() == "spawn":  # a worker of multi_gpu_model: the caller draws from rank 0's epoch logs
        return None
    return PlotMetrics(path=None) if wants_live_plot(view_metrics, epochs, verbose) else None
