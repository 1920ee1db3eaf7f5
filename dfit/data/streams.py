"""Streams: generators, iterators, ``IterableDataset``, a ``DataLoader`` over one, any iterable of batches.

Two modes, one rule for ends. By default every item is a GLOBAL batch: every rank reads the same stream and
keeps its contiguous part of each item (as for an array batch), so any world size gives the same result; the
stream must then be deterministic, and dfit checks it. ``per_rank(fn)``: ``fn(rank, world_size)`` gives this
rank's own batches; a step's loss is normalised by the rows of that step over ALL ranks.

Ranks agree on what comes next without a per-step collective: each rank reads ahead up to ``k`` items, then one
small all-gather shares how many items each rank has, their sizes and (default mode) a fingerprint of each. All
ranks then run ``min(available)`` steps. ``k`` doubles from 1 up to ``AGREE_EVERY``, bounded by a memory budget
for the items read ahead. So ranks always end a pass on the same step, a malformed item or a failing stream on
one rank stops every rank with a clear error, and a stream that differs between ranks is caught.
"""
from __future__ import annotations

import collections
import copy
import itertools
import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .. import distributed as dist
from .arrays import Batch, check_lengths, to_structure
from .sharding import part_bounds
from .structure import flatten, index_rows
from .weights import class_weight_tensor, sample_weight_tensor

AGREE_EVERY = int(os.environ.get("DFIT_STREAM_AGREE_EVERY", "128"))      # the most steps between agreements
READ_AHEAD_BYTES = int(os.environ.get("DFIT_STREAM_READ_AHEAD_MB", "256")) * 2 ** 20


class per_rank:  # noqa: N801 - used like a function: x=dfit.data.per_rank(fn)
    """``fn(rank, world_size) -> iterable`` whose items are this rank's own batches (each rank reads only its own).

    ``fn`` is called again at the start of each pass, so a generator function restarts like a re-iterable.
    """

    def __init__(self, fn: Callable[[int, int], Iterable]):
        if not callable(fn):
            raise TypeError(f"per_rank() needs a function fn(rank, world_size) -> iterable; got {type(fn).__name__}")
        self.fn = fn


def is_stream(x: Any) -> bool:
    """Whether ``x`` is read as a stream of batches (not an array, not a map-style Dataset)."""
    if isinstance(x, (per_rank, IterableDataset)):
        return True
    if isinstance(x, DataLoader):
        return isinstance(x.dataset, IterableDataset)
    if isinstance(x, (list, tuple, dict, str, bytes, Dataset, torch.Tensor)) or hasattr(x, "shape") \
            or hasattr(x, "to_numpy"):
        return False
    return hasattr(x, "__iter__") or hasattr(x, "__next__")


def _fingerprint(structure: Any) -> float:
    """A cheap number that differs when two batches differ: sums of a few strided elements of every leaf."""
    total = 0.0
    for i, leaf in enumerate(flatten(structure)):
        flat = leaf.reshape(-1)
        stride = max(1, flat.numel() // 64)
        total += float(flat[::stride][:64].to(torch.float64).sum()) * (i + 1) + flat.numel() * 1e-3
    return total


def _nbytes(structure: Any) -> int:
    return sum(leaf.element_size() * leaf.numel() for leaf in flatten(structure))


class _Prefetcher:
    """Reads a pass of the source on a background thread, at most ``size`` items ahead (``fit(workers>0)``).

    The items come out in order, exceptions are re-raised where the item would have come, and ``close`` stops the
    thread (a generator is only ever advanced by that one thread)."""

    _END = object()

    def __init__(self, iterator: Iterator, size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterator,), name="dfit-stream-prefetch", daemon=True)
        self._thread.start()

    def _run(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(("error", exc))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._queue.put((kind, value))   # stay at the end (or keep raising)
        if kind == "end":
            raise StopIteration
        raise value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _Item:
    """One converted stream item: tensors, rows, and (default mode) its fingerprint."""

    __slots__ = ("x", "y", "w", "n", "fingerprint", "nbytes", "state")

    def __init__(self, x, y, w, n, fingerprint, nbytes, state):
        self.x, self.y, self.w, self.n, self.fingerprint, self.nbytes = x, y, w, n, fingerprint, nbytes
        self.state = state   # the source's state_dict() right after this item (a stateful source), else None




class StreamData:
    """A stream of batches behind the adapter interface (``epoch(...) -> Iterator[Batch]``)."""

    n = None
    sample_weight = None

    def __init__(self, source: Any, float_dtype: torch.dtype, temporal: bool = False, what: str = "x",
                 prefetch: int = 0):
        self.source, self.float_dtype, self.temporal, self.what = source, float_dtype, temporal, what
        self.prefetch = prefetch   # items read ahead on a background thread (0: read on the training thread)
        self.per_rank = isinstance(source, per_rank)
        self.one_shot = not self.per_rank and iter(source) is source
        # a source with its own state (torchdata's StatefulDataLoader): a backup keeps it instead of a count
        self.stateful = not (self.per_rank or self.one_shot) and callable(getattr(source, "state_dict", None)) \
            and callable(getattr(source, "load_state_dict", None))
        self._consumed_state: Any = None   # the source's state after the last item given to training
        self.track_state = False           # set by fit when a BackupAndRestore may save the position
        self.class_weight: dict | None = None
        self._iterator: Iterator | None = None
        self._passes = 0
        self._pass_steps = 0      # items of the current pass given to training (the position a backup keeps)
        self._pushback: collections.deque = collections.deque()   # raw items peeked before training
        self._buffer: collections.deque[_Item] = collections.deque()
        self._ready: collections.deque[tuple[_Item, int]] = collections.deque()
        self._k = 1
        self._pass_ended = False
        self.ran_out = False      # the last epoch ended before its steps because the data ended
        self.last_epoch_steps = 0

    # -- what the rest of dfit asks of an adapter --------------------------------------------------------------
    def steps_per_pass(self, batch_size: int | None = None) -> int | None:
        """Batches in one pass when the source knows its length (a DataLoader, a list-like), else None."""
        if self.per_rank or self.one_shot:
            return None
        try:
            return len(self.source)
        except TypeError:
            return None

    @property
    def y(self) -> Any:
        """The targets of the first item (None for ``x``-only items): names the model's outputs."""
        item = self._peek()
        return None if item is None else item.y

    def split(self, validation_split: float):
        raise ValueError("validation_split is only supported for arrays, tensors and map-style Datasets; with a "
                         "stream, pass validation_data instead")

    def with_weights(self, sample_weight):
        raise ValueError("sample_weight cannot be given with a stream: yield (x, y, sample_weight) items instead")

    def with_class_weight(self, class_weight: dict) -> "StreamData":
        self.class_weight = dict(class_weight)
        return self

    # -- reading -------------------------------------------------------------------------------------------
    def _open_pass(self, rank: int, world: int) -> bool:
        """Start a new pass over the source; False for a one-shot iterator that was already read."""
        if self.one_shot and self._passes > 0:
            return False
        self._passes += 1
        self._pass_steps = 0
        self._consumed_state = None
        self._close_prefetcher()
        iterator = iter(self.source.fn(rank, world)) if self.per_rank else iter(self.source)
        iterator = self._with_states(iterator)
        self._iterator = _Prefetcher(iterator, self.prefetch) if self.prefetch else iterator
        self._pass_ended = False
        return True

    def _with_states(self, iterator: Iterator) -> Iterator[tuple[Any, Any]]:
        """(item, a copy of the source's state right after it, while ``track_state``; else None). The state is taken
        by whichever thread reads the source."""
        for item in iterator:
            yield item, (copy.deepcopy(self.source.state_dict()) if self.stateful and self.track_state else None)

    def _close_prefetcher(self) -> None:
        if isinstance(self._iterator, _Prefetcher):
            self._iterator.close()

    def close(self) -> None:
        """Stop the background reader, if any (at the end of fit/evaluate/predict)."""
        self._close_prefetcher()

    # -- position (BackupAndRestore) -----------------------------------------------------------------------
    def position(self) -> dict[str, Any]:
        """The pass (1-based) and the items of it that training consumed; the same on every rank. A stateful
        source adds its ``state_dict()`` as it was right after the last consumed item."""
        position: dict[str, Any] = {"passes": self._passes, "pass_steps": self._pass_steps}
        if self.stateful and self._pass_steps and self._consumed_state is not None:
            position["source_state"] = self._consumed_state
        return position

    def seek(self, position: dict[str, Any], rank: int, world: int) -> None:
        """Continue after ``position``. A stateful source is given its saved state back (``load_state_dict``) and
        reads on from there. Otherwise open that pass again (a one-shot iterator: the pass it is in) and read and
        drop its consumed items: exact when the stream gives the same items again (a deterministic stream);
        ``per_rank`` streams resume exactly on the same world size only."""
        passes, consumed = int(position["passes"]), int(position["pass_steps"])
        self._buffer.clear()
        self._ready.clear()
        if not self.one_shot:
            self._pushback.clear()
            self._close_prefetcher()
            self._iterator, self._passes = None, max(0, passes - 1)
        state = position.get("source_state")
        if self.stateful and state is not None:
            self.source.load_state_dict(state)
            self._open_pass(rank, world)
            self._passes, self._pass_steps, self._consumed_state = passes, consumed, state
            return
        if self._iterator is None and not self._open_pass(rank, world):
            return
        self._passes = max(self._passes, passes)
        for _ in range(consumed):
            try:
                self._next_raw()
            except StopIteration:
                self._pass_ended = True
                break
        self._pass_steps = consumed

    def _peek(self) -> _Item | None:
        """The next item without consuming it (opens the first pass if needed; runs before any collective)."""
        if self._ready:
            return self._ready[0][0]
        if self._buffer:
            return self._buffer[0]
        if not self._pushback:
            if self._iterator is None and not self._open_pass(dist.rank(), dist.world_size()):
                return None
            try:
                self._pushback.append(next(self._iterator))
            except StopIteration:
                self._pass_ended = True
                return None
        return self._convert(*self._pushback[0])

    def _next_raw(self) -> tuple[Any, Any]:
        """The next raw item and the source's state after it (None unless the source is stateful)."""
        if self._pushback:
            return self._pushback.popleft()
        return next(self._iterator)

    def _convert(self, item: Any, state: Any = None) -> _Item:
        """An item as tensors: ``(x, y)``, ``(x, y, sample_weight)`` or ``x`` (a list is read as a tuple, as Keras)."""
        if isinstance(item, list):
            item = tuple(item)
        if isinstance(item, tuple):
            if len(item) not in (1, 2, 3):
                raise ValueError(f"each item of the stream {self.what} must be (x, y), (x, y, sample_weight) or x; "
                                 f"got a tuple of {len(item)} elements")
            x, y, w = (item + (None, None))[:3]
        else:
            x, y, w = item, None, None
        xs = to_structure(x, f"{self.what} (a stream item's x)", self.float_dtype)
        ys = None if y is None else to_structure(y, f"{self.what} (a stream item's y)", self.float_dtype)
        try:
            n = check_lengths({"x": xs, "y": ys, "sample_weight": w if isinstance(w, torch.Tensor) else None})
        except ValueError as exc:
            raise ValueError(f"a batch of the stream {self.what}: {exc}") from None
        ws = None if w is None else sample_weight_tensor(w, n, self.temporal, self.float_dtype)
        if self.class_weight is not None and ys is not None:
            cw = class_weight_tensor(ys, self.class_weight, self.float_dtype)
            ws = cw if ws is None else cw.reshape(cw.shape + (1,) * (ws.dim() - cw.dim())) * ws
        fingerprint = 0.0 if self.per_rank else _fingerprint((xs, ys) if ys is not None else xs)
        return _Item(xs, ys, ws, n, fingerprint, _nbytes(xs), state)

    def _read_ahead(self, k: int) -> BaseException | None:
        """Fill the buffer to ``k`` items (fewer if the pass ends); return the error that stopped it, if any."""
        while len(self._buffer) < k and not self._pass_ended:
            try:
                raw, state = self._next_raw()
            except StopIteration:
                self._pass_ended = True
                break
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                return exc
            try:
                self._buffer.append(self._convert(raw, state))
            except (ValueError, TypeError) as exc:
                return exc
        return None

    def _agree(self, limit: int | None, rank: int, world: int) -> None:
        """Read ahead, then agree with every rank on the next steps (one all-gather); queue them as ready."""
        k = self._k if limit is None else max(1, min(self._k, limit))
        error = self._read_ahead(k)
        avail = min(len(self._buffer), k)
        if world == 1:
            if error is not None:
                raise error
            take, sizes = avail, [item.n for item in itertools.islice(self._buffer, avail)]
        else:
            take, sizes = self._agree_with_ranks(k, avail, error, rank, world)
        for size in sizes[:take]:
            item = self._buffer.popleft()
            self._ready.append((item, size))
        if take == 0:                      # every rank agrees: the pass is over (leftovers of other ranks dropped)
            self._close_prefetcher()
            self._pass_ended, self._iterator = True, None
            self._buffer.clear()
            self._pushback.clear()
        budget = max(1, READ_AHEAD_BYTES // max(1, max((i.nbytes for i, _ in self._ready), default=1)))
        self._k = max(1, min(self._k * 2, AGREE_EVERY, budget))

    def _agree_with_ranks(self, k: int, avail: int, error: BaseException | None, rank: int,
                          world: int) -> tuple[int, list[int]]:
        mine = torch.zeros(2 + 2 * k, dtype=torch.float64)
        mine[0], mine[1] = avail, 1.0 if error is not None else 0.0
        for j, item in enumerate(itertools.islice(self._buffer, avail)):
            mine[2 + j], mine[2 + k + j] = item.fingerprint, item.n
        table = dist.all_gather_tensor(mine)
        failed = [r for r in range(world) if table[r, 1] > 0]
        if failed:   # the first failing rank's error, raised on every rank (one broadcast, on this rare path)
            first = failed[0]
            kind, text = dist.broadcast_object((type(error).__name__, str(error)) if rank == first else None, src=first)
            if error is not None:
                raise type(error)(f"rank {rank}: {error}") from error
            raised = {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)
            raise raised(f"the stream {self.what} failed on rank(s) {failed}; rank {first}: {text}")
        counts = table[:, 0].long().tolist()
        take = min(counts)
        if self.per_rank:
            return take, table[:, 2 + k:2 + k + take].sum(dim=0).long().tolist()
        fingerprints, rows = table[:, 2:2 + take], table[:, 2 + k:2 + k + take]
        if len(set(counts)) > 1 or not bool((fingerprints == fingerprints[0]).all()) \
                or not bool((rows == rows[0]).all()):
            raise ValueError(
                f"the stream {self.what} yields different batches on different ranks (rank batch counts {counts}). "
                "By default every item is a GLOBAL batch that all ranks read and split, so the stream must give the "
                "same items in the same order on every rank: seed its randomness identically on every rank, or wrap "
                "a function fn(rank, world_size) that gives each rank its own batches in dfit.data.per_rank(fn)"
            )
        return take, [int(v) for v in rows[0].tolist()]

    def restart(self) -> None:
        """Start the next epoch at the beginning of a new pass (evaluation does, as Keras); a one-shot iterator
        cannot and continues."""
        if self.one_shot or self._iterator is None:
            return
        self._close_prefetcher()
        self._iterator, self._pass_ended = None, False
        self._pushback.clear()
        self._buffer.clear()
        self._ready.clear()

    def has_next(self, steps: int | None, rank: int, world: int) -> bool:
        """Whether another step can be read (agreeing with every rank); starts a new pass where a pass has ended and
        the source can restart. False only when a one-shot iterator is used up."""
        if self._ready:
            return True
        if self._iterator is None and not self._open_pass(rank, world):
            return False
        self._agree(steps, rank, world)
        if not self._ready and self._open_pass(rank, world):   # the last epoch ended exactly at the end of a pass
            self._agree(steps, rank, world)
            if not self._ready:
                raise ValueError(f"the stream {self.what} gave no batches in a whole pass")
        return bool(self._ready)

    def epoch(self, epoch: int, batch_size: int | None, steps: int | None, shuffle: bool, seed: int,
              rank: int, world: int, resume: bool = False) -> Iterator[Batch]:
        """The batches of one epoch. Without ``steps`` an epoch is one pass. With ``steps``, epochs continue through
        a pass, and the epoch that meets its end stops there (``ran_out``); the next epoch starts a new pass —
        a one-shot iterator has none (``has_next`` is False: training ends, as Keras). ``resume``: the rest of an epoch
        after ``seek`` (its pass only; ``steps`` is what is left of it)."""
        self.ran_out, taken = False, 0
        if not resume and not self.has_next(steps, rank, world):
            self.ran_out = True
            return
        while steps is None or taken < steps:
            if not self._ready:
                self._agree(None if steps is None else steps - taken, rank, world)
            if not self._ready:          # every rank agrees: the pass is over
                self.ran_out = steps is not None
                break
            item, global_size = self._ready.popleft()
            self._pass_steps += 1
            self._consumed_state = item.state
            yield self._batch(item, global_size, rank, world)
            taken += 1
        self.last_epoch_steps = taken

    def _batch(self, item: _Item, global_size: int, rank: int, world: int) -> Batch:
        if self.per_rank or world == 1:
            return Batch(item.x, item.y, item.w, item.n, global_size)
        start, stop = part_bounds(item.n, world, rank)
        rows = slice(start, stop)
        y = None if item.y is None else index_rows(item.y, rows)
        w = None if item.w is None else item.w[rows]
        return Batch(index_rows(item.x, rows), y, w, stop - start, item.n)
