"""``EpochIterator``: which batches make each epoch, for every input kind — the one place that decides it.

Data of known length (arrays, Datasets) follows ``sharding.epoch_batches`` (Keras 3's rule for
``steps_per_epoch``); a stream keeps its own position across epochs (``StreamData``). The engine's loops only
see the batches.

A resumed epoch (``BackupAndRestore``) starts at step ``start``: data of known length is a function of (seed,
epoch, step), so the first ``start`` batches are skipped (arrays without reading them; other adapters read and
drop them); a stream is put back at its position before the epoch by ``seek`` (its consumed items are read
again and dropped).
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator

from .arrays import Batch
from .sharding import epoch_batches
from .streams import StreamData


class EpochIterator:
    """The epochs of one input: ``epoch(e)`` gives this rank's batches; ``ran_out`` tells the caller the epoch was
    shorter than ``steps``, and ``has_more`` whether another epoch can start (a one-shot stream may be used up)."""

    def __init__(self, data: Any, batch_size: int | None, steps: int | None, shuffle: bool = False, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.data, self.batch_size, self.steps = data, batch_size, steps
        self.shuffle, self.seed, self.rank, self.world = shuffle, seed, rank, world
        self.is_stream = isinstance(data, StreamData)
        self._ran_out = False
        self.learned_steps: int | None = None

    @property
    def per_pass(self) -> int | None:
        """Batches in one pass over the data, when known."""
        return self.data.steps_per_pass(self.batch_size)

    @property
    def steps_hint(self) -> int | None:
        """Steps of an epoch as far as known before running it (for progress bars): None for an unknown stream."""
        per_pass = self.per_pass if self.learned_steps is None else self.learned_steps
        if self.steps is None:
            return per_pass
        return self.steps if per_pass is None else min(self.steps, per_pass) if not self.is_stream else self.steps

    def has_more(self) -> bool:
        """Whether another epoch can start (False only when a one-shot stream is used up)."""
        if not self.is_stream:
            return True
        return self.data.has_next(self.steps, self.rank, self.world)

    def restart(self) -> None:
        """The next epoch starts from the beginning of the data (evaluation; a one-shot stream continues)."""
        if self.is_stream:
            self.data.restart()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch``, from its step ``start`` on (``start > 0``: a resumed epoch; a stream
        must have been put at that position with ``seek``)."""
        if self.is_stream:
            return self._stream_epoch(epoch, start)
        _, batches = epoch_batches(self.per_pass, epoch, self.steps)
        self._ran_out = self.steps is not None and len(batches) < self.steps
        args = (epoch, self.batch_size, self.steps, self.shuffle, self.seed, self.rank, self.world)
        if not start:
            return self.data.epoch(*args)
        if getattr(self.data, "starts_mid_epoch", False):
            return self.data.epoch(*args, start=start)
        return itertools.islice(self.data.epoch(*args), start, None)

    def position(self) -> dict[str, int] | None:
        """Where a stream is (for a backup); None for data of known length (seed, epoch and step say it all)."""
        return self.data.position() if self.is_stream else None

    def track_position(self) -> None:
        """A backup may save this input's position: a stateful stream then keeps a copy of its source's state with
        each item it reads (only then: ``state_dict()`` is not free)."""
        if self.is_stream:
            self.data.track_state = True

    def seek(self, position: dict[str, int] | None) -> None:
        """Put a stream back at ``position()``'s output (its consumed items are read again and dropped)."""
        if self.is_stream and position is not None:
            self.data.seek(position, self.rank, self.world)

    def _stream_epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        steps = None if self.steps is None else self.steps - start   # the rest of a resumed epoch
        yield from self.data.epoch(epoch, self.batch_size, steps, self.shuffle, self.seed, self.rank,
                                   self.world, resume=start > 0)
        if self.steps is None and not self.data.ran_out and self.learned_steps is None and not start:
            self.learned_steps = self.data.last_epoch_steps   # the bar knows the total from the second epoch on

    @property
    def ran_out(self) -> bool:
        """The last epoch ended before ``steps`` because the data ran out (Keras warns)."""
        return self.data.ran_out if self.is_stream else self._ran_out
