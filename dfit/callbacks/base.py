"""``Callback`` with the Keras hooks, and ``CallbackList``, which dispatches to them."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator

_BATCH_HOOKS = {
    mode: (f"on_{mode}_batch_begin", f"on_{mode}_batch_end") for mode in ("train", "test", "predict")
}


class Callback:
    """Base class of callbacks: override the hooks you need. ``self.model`` and ``self.params`` are set by fit."""

    # True for callbacks that read batch logs only inside the hook (if at all): they get them lazily,
    # so a step costs no device synchronisation unless the logs are actually read.
    reads_logs_at_once = False
    # True for callbacks whose train-batch hooks may set ``model.stop_training`` to end the epoch at that
    # step (``TerminateOnNaN``): fit then agrees on the flag after every step (one tiny all-reduce on N
    # ranks), so every rank ends the epoch at the same step. Otherwise a stop takes effect at the epoch end.
    stops_at_batch = False

    def __init__(self) -> None:
        self.model: Any = None
        self.params: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this callback (counters, best values); {} if nothing."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s output; the next ``on_train_begin`` then continues from it."""

    def set_model(self, model: Any) -> None:
        self.model = model

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def on_train_begin(self, logs=None): ...
    def on_train_end(self, logs=None): ...
    def on_epoch_begin(self, epoch, logs=None): ...
    def on_epoch_end(self, epoch, logs=None): ...
    def on_train_batch_begin(self, batch, logs=None):
        self.on_batch_begin(batch, logs)  # Keras 2's hook, called from the train one as Keras 3 does

    def on_train_batch_end(self, batch, logs=None):
        self.on_batch_end(batch, logs)

    def on_batch_begin(self, batch, logs=None): ...
    def on_batch_end(self, batch, logs=None): ...
    def on_test_begin(self, logs=None): ...
    def on_test_end(self, logs=None): ...
    def on_test_batch_begin(self, batch, logs=None): ...
    def on_test_batch_end(self, batch, logs=None): ...
    def on_predict_begin(self, logs=None): ...
    def on_predict_end(self, logs=None): ...
    def on_predict_batch_begin(self, batch, logs=None): ...
    def on_predict_batch_end(self, batch, logs=None): ...


_KERAS2_HOOKS = {"on_train_batch_begin": "on_batch_begin", "on_train_batch_end": "on_batch_end"}


def _overrides(cb: Callback, hook: str) -> bool:
    """Whether ``cb`` does something in ``hook`` (a subclass method, or a function set on the instance;
    for the train-batch hooks, also Keras 2's ``on_batch_*`` that they call)."""
    if hook in vars(cb) or getattr(type(cb), hook, None) is not getattr(Callback, hook):
        return True
    return hook in _KERAS2_HOOKS and _overrides(cb, _KERAS2_HOOKS[hook])


class LazyLogs(Mapping):
    """Batch logs computed only when a callback reads them (reading costs a device synchronisation)."""

    def __init__(self, compute: Callable[[], dict[str, float]]):
        self._compute, self._logs = compute, None

    def _get(self) -> dict[str, float]:
        if self._logs is None:
            self._logs = self._compute()
        return self._logs

    def __getitem__(self, key: str) -> float:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class CallbackList:
    """The callbacks of one fit/evaluate/predict call; batch hooks run only where a callback has them."""

    def __init__(self, callbacks: list[Callback] | None, model: Any, params: dict[str, Any]):
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be dfit.callbacks.Callback instances; got {type(cb).__name__}")
        self.model, self.params = model, params
        for cb in self.callbacks:
            cb.set_model(model)
            cb.set_params(params)
        self._batch_users = {
            hook: [cb for cb in self.callbacks if _overrides(cb, hook)]
            for hooks in _BATCH_HOOKS.values() for hook in hooks
        }

    def wants_batches(self, mode: str) -> bool:
        begin, end = _BATCH_HOOKS[mode]
        return bool(self._batch_users[begin] or self._batch_users[end])

    def batch_begin(self, mode: str, batch: int) -> None:
        for cb in self._batch_users[_BATCH_HOOKS[mode][0]]:
            getattr(cb, _BATCH_HOOKS[mode][0])(batch, {})

    def batch_end(self, mode: str, batch: int, logs: Mapping) -> None:
        hook = _BATCH_HOOKS[mode][1]
        users = self._batch_users[hook]
        if isinstance(logs, LazyLogs) and any(not getattr(cb, "reads_logs_at_once", False) for cb in users):
            logs = dict(logs)  # a callback may keep the logs: give it this batch's values, as Keras does
        for cb in users:
            getattr(cb, hook)(batch, logs)

    def stops_at_batch(self) -> bool:
        """Whether a train-batch hook may end the epoch (fit then agrees on ``stop_training`` every step)."""
        return any(getattr(cb, "stops_at_batch", False) for cb in self._batch_users["on_train_batch_end"])

    def call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)
