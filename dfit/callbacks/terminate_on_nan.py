"""``TerminateOnNaN``: end training at the first step whose loss is NaN or infinite, on every rank.

The batch loss is this rank's running value, so a NaN may show on one rank a step before the others; the
callback ORs the finding over the ranks at every step (one tiny all-reduce) and fit agrees on
``stop_training`` at that step (``stops_at_batch``), so every rank ends at the same step. It reads the batch
logs at every step, which synchronises the host with the device.
"""
from __future__ import annotations

import math

import torch

from .. import distributed as dist
from .base import Callback


class TerminateOnNaN(Callback):
    """Stop (``raise_error=False``, Keras' default) or raise ``RuntimeError`` on a NaN/Inf loss."""

    reads_logs_at_once = True
    stops_at_batch = True

    def __init__(self, raise_error: bool = False) -> None:
        super().__init__()
        self.raise_error = raise_error

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        here = bad = loss is not None and not math.isfinite(float(loss))
        if dist.world_size() > 1:
            bad = bool(dist.all_reduce_max(torch.tensor([1.0 if bad else 0.0])).item())
        if not bad:
            return
        if self.raise_error:
            where = "" if here else " (on another rank; this rank's loss is finite)"
            raise RuntimeError(f"NaN or Inf loss encountered at batch {batch}. Loss value: {loss}{where}. "
                               "Terminating training immediately.")
        if dist.is_chief():
            print(f"Batch {batch}: Invalid loss, terminating training")
        self.model.stop_training = True
