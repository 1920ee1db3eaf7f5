"""``ModelCheckpoint``: save the model or its weights every epoch or every N steps (Keras 3's arguments).

Only rank 0 writes (``Model.save`` / ``Model.save_weights`` write atomically: a temporary file beside the
target, then a rename), and no rank waits for it. Every rank formats the file name, so a template naming a
key that is not in the logs raises on every rank at once instead of leaving the others waiting.
With ``save_freq=N`` the batch logs (this rank's running values) are read only at the steps that save and
only when the name template or ``save_best_only`` needs them.
"""
from __future__ import annotations

import string
from typing import Any, Mapping

from .. import distributed as dist
from .monitor import MonitorCallback


def _template_fields(filepath: str) -> set[str]:
    return {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(filepath) if field}


class ModelCheckpoint(MonitorCallback):
    """Save to ``filepath`` (a template: ``"ckpt/w.{epoch:02d}-{val_loss:.2f}.pt"``; ``epoch`` is 1-based and
    ``batch`` too, with ``save_freq=N``; other keys come from the logs).

    ``save_best_only``: save only when ``monitor`` improved (``mode``; ``initial_value_threshold`` is the
    value to beat first). ``save_weights_only``: ``model.save_weights`` instead of ``model.save``.
    ``save_freq``: "epoch", or a number of training steps (counted across epochs).
    """

    reads_logs_at_once = True

    def __init__(self, filepath: str, monitor: str = "val_loss", verbose: int = 0, save_best_only: bool = False,
                 save_weights_only: bool = False, mode: str = "auto", save_freq: Any = "epoch",
                 initial_value_threshold: float | None = None) -> None:
        super().__init__(monitor, mode, initial_value_threshold)
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int)
                                     or save_freq < 1):
            raise ValueError(f"Unrecognized save_freq: {save_freq}. Expected save_freq are 'epoch' or integer "
                             "values")
        self.filepath = str(filepath)
        self.verbose, self.save_best_only, self.save_weights_only = verbose, save_best_only, save_weights_only
        self.save_freq = save_freq
        self._needs_logs = bool(_template_fields(self.filepath) - {"epoch", "batch"}) or save_best_only
        self._batches_seen_since_last_saving = 0
        self._current_epoch = 0
        if save_freq != "epoch":  # only then is a batch hook dispatched
            self.on_train_batch_end = self._on_train_batch_end

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor_op is None:
            self._set_monitor_op()
        if self.save_freq == "epoch":
            self._save(epoch, None, dict(logs or {}))

    def _on_train_batch_end(self, batch, logs=None):
        self._batches_seen_since_last_saving += 1
        if self._batches_seen_since_last_saving >= self.save_freq:
            self._batches_seen_since_last_saving = 0
            if self.monitor_op is None:
                self._set_monitor_op()
            self._save(self._current_epoch, batch, dict(logs or {}) if self._needs_logs else {})

    def _file_path(self, epoch: int, batch: int | None, logs: Mapping[str, Any]) -> str:
        fields = dict(logs)
        fields["epoch"] = epoch + 1
        if batch is not None and "batch" not in logs:
            fields["batch"] = batch + 1
        try:
            return self.filepath.format(**fields)
        except KeyError as e:
            raise KeyError(f'Failed to format this callback filepath: "{self.filepath}". Reason: {e}') from None

    def _should_save(self, epoch: int, logs: Mapping[str, Any], filepath: str) -> bool:
        if not self.save_best_only:
            self._say(f"\nEpoch {epoch + 1}: saving model to {filepath}")
            return True
        current = logs.get(self.monitor)
        if current is None:
            if dist.is_chief():
                import warnings

                warnings.warn(f"Can save best model only with {self.monitor} available.", stacklevel=3)
            return True
        best = "None" if self.best is None else f"{self.best:.5f}"
        if self._is_improvement(current, self.best):
            self._say(f"\nEpoch {epoch + 1}: {self.monitor} improved from {best} to {current:.5f}, saving model "
                      f"to {filepath}")
            self.best = current
            return True
        self._say(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best}")
        return False

    def _save(self, epoch: int, batch: int | None, logs: Mapping[str, Any]) -> None:
        filepath = self._file_path(epoch, batch, logs)  # on every rank: a bad template fails everywhere
        if not self._should_save(epoch, logs, filepath) or not dist.is_chief():
            return
        if self.save_weights_only:
            self.model.save_weights(filepath)
        else:
            self.model.save(filepath)

    def _say(self, text: str) -> None:
        if self.verbose > 0 and dist.is_chief():
            print(text)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "batches_seen_since_last_saving": self._batches_seen_since_last_saving}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best", self.best)
        self._batches_seen_since_last_saving = state.get("batches_seen_since_last_saving", 0)
