"""``TensorBoard``: scalars in Keras 3's layout, written by rank 0 through torch's ``SummaryWriter``.

``log_dir/train``: ``epoch_<name>`` for every training log and ``epoch_learning_rate`` at step ``epoch``;
with ``update_freq=N`` (or "batch", i.e. 1) also ``batch_<name>`` every N training steps at the global
step count. ``log_dir/validation``: ``epoch_<name>`` of the ``val_`` logs (prefix removed) and
``evaluation_<name>_vs_iterations`` at the number of training steps done. ``histogram_freq=N``: a histogram
of every parameter every N epochs. Batch logs (this rank's running values) are read by rank 0 only, at the
steps it writes; other ranks read nothing and write nothing.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping

from .. import distributed as dist
from .base import Callback


class TensorBoard(Callback):
    """``TensorBoard(log_dir="logs", histogram_freq=0, write_graph=True, write_images=False,
    write_steps_per_second=False, update_freq="epoch", profile_batch=0, embeddings_freq=0,
    embeddings_metadata=None)``. ``write_graph`` is accepted and ignored (torch modules have no Keras graph);
    images, embeddings and profiling are not supported (nonzero values raise)."""

    reads_logs_at_once = True

    def __init__(self, log_dir: str = "logs", histogram_freq: int = 0, write_graph: bool = True,
                 write_images: bool = False, write_steps_per_second: bool = False, update_freq: Any = "epoch",
                 profile_batch: int = 0, embeddings_freq: int = 0, embeddings_metadata: Any = None) -> None:
        super().__init__()
        if update_freq == "batch":
            update_freq = 1
        if update_freq != "epoch" and (isinstance(update_freq, bool) or not isinstance(update_freq, int)
                                       or update_freq < 1):
            raise ValueError(f"update_freq must be 'epoch', 'batch' or a positive integer; got {update_freq!r}")
        if profile_batch:
            raise ValueError("Profiling is not yet available with the torch backend "
                             f"(profile_batch={profile_batch} must be 0)")
        if write_images or embeddings_freq or embeddings_metadata is not None:
            raise NotImplementedError("dfit's TensorBoard writes scalars and histograms; write_images and "
                                      "embeddings are not supported")
        self.log_dir = os.fspath(log_dir)
        self.histogram_freq, self.write_graph = histogram_freq, write_graph
        self.write_steps_per_second, self.update_freq = write_steps_per_second, update_freq
        self._writers: dict[str, Any] = {}
        self._global_train_batch = 0
        self._epoch_start = 0.0
        self._epoch_first_batch = 0
        self._resumed = False
        self._epoch_uncounted = False
        if update_freq != "epoch":  # only then is a batch hook dispatched
            self.on_train_batch_end = self._on_train_batch_end

    def _writer(self, which: str) -> Any:
        if which not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[which] = SummaryWriter(os.path.join(self.log_dir, which))
        return self._writers[which]

    def on_train_begin(self, logs=None):
        if not self._resumed:
            self._global_train_batch = 0
        self._resumed = False


    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start, self._epoch_first_batch = time.monotonic(), self._global_train_batch
        self._epoch_uncounted = True

    def _on_train_batch_end(self, batch, logs=None):
        self._global_train_batch += 1
        if not dist.is_chief() or self._global_train_batch % self.update_freq:
            return
        writer = self._writer("train")
        for name, value in dict(logs or {}).items():
            writer.add_scalar(f"batch_{name}", float(value), self._global_train_batch)

    def on_epoch_end(self, epoch, logs=None):
        self._count_epoch_steps()
        if not dist.is_chief():
            return
        logs = dict(logs or {})
        train = {k: v for k, v in logs.items() if not k.startswith("val_")}
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and getattr(optimizer, "param_groups", None):
            train["learning_rate"] = float(optimizer.param_groups[0]["lr"])
        if self.write_steps_per_second:
            elapsed = max(time.monotonic() - self._epoch_start, 1e-12)
            train["steps_per_second"] = (self._global_train_batch - self._epoch_first_batch) / elapsed
        for name, value in train.items():
            self._writer("train").add_scalar(f"epoch_{name}", float(value), epoch)
        for name, value in logs.items():
            if name.startswith("val_"):
                self._writer("validation").add_scalar(f"epoch_{name[4:]}", float(value), epoch)
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            for name, param in self.model.module.named_parameters():
                self._writer("train").add_histogram(name, param.detach().float().cpu(), epoch)
        self._flush()

    def _count_epoch_steps(self) -> None:
        """Without a batch hook, count this epoch's steps once (at the first of on_test_end/on_epoch_end)."""
        if self.update_freq == "epoch" and self._epoch_uncounted:
            self._global_train_batch += int(self.params.get("steps") or 0)
        self._epoch_uncounted = False

    def on_test_end(self, logs=None):
        self._count_epoch_steps()
        if dist.is_chief() and self.model.optimizer is not None and logs:
            writer = self._writer("validation")
            for name, value in logs.items():
                writer.add_scalar(f"evaluation_{name}_vs_iterations", float(value), self._global_train_batch)

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def _flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"global_train_batch": self._global_train_batch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._global_train_batch = int(state.get("global_train_batch", 0))
        self._resumed = True
