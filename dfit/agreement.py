"""Checks before training: every rank raises the same clear error, or every rank starts.

``fit``, ``evaluate`` and ``predict`` run all of their argument checks and data adaptation inside
``agreement(call, facts)``. On a job of N processes, leaving that block costs ONE small all-reduce (MIN) of an int64
vector ``[h_1..h_K, -h_1..-h_K, first_failed_rank]``: ``h_i`` is a 62-bit hash of fact i (an argument, the number of
rows, a strided sample of the data, ...) on this rank, so ``min(h_i) != -min(-h_i)`` means the ranks disagree on
fact i, and ``first_failed_rank`` is the lowest rank whose own checks raised (``world`` when none did). Only on those
rare paths is there more talk (one broadcast of the failing rank's error, or one gather of the hashes to name the
ranks per fact), and then every rank raises:

- a rank's check raised: that rank re-raises its own exception, the others raise the same type (``ValueError`` /
  ``TypeError``, else ``RuntimeError``) with ``"rank R: <its message>"``;
- the ranks disagree: ``ValueError`` naming the fact, the groups of ranks and this rank's own value.

One process does no collective at all. Facts are described stably (no object addresses), so equal arguments hash
equally in different processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import numbers
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from . import distributed as dist

__all__ = ["agreement", "Facts", "describe", "DataSample", "WeightsSample", "stable_hash"]

_SAMPLE = 64   # elements read per leaf for a fingerprint
_MASK = (1 << 62) - 1


def stable_hash(text: str) -> int:
    """A 62-bit hash of ``text``, the same in every process (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & _MASK


def _sample(t: torch.Tensor) -> torch.Tensor:
    """<= 64 strided elements of ``t``, read from <= 64 strided rows (no pass over the data)."""
    rows = t.detach()
    if rows.dim() >= 1 and len(rows) > _SAMPLE:
        rows = rows[::len(rows) // _SAMPLE][:_SAMPLE]
    flat = rows.reshape(-1)
    stride = max(1, flat.numel() // _SAMPLE)
    return flat[::stride][:_SAMPLE].cpu()


def _leaf_text(t: Any) -> str:
    from .data.lazy import DiskArray

    if isinstance(t, DiskArray):   # data read in place: its content decides, not its path (each node may hold a copy)
        n = len(t)
        m = min(n, _SAMPLE)   # evenly spaced row ids in integer arithmetic (a float32 linspace rounds past n - 1)
        rows = torch.unique(torch.arange(m, dtype=torch.int64) * max(n - 1, 0) // max(m - 1, 1))
        t = t.read(rows)           # one batched read of <= 64 rows
    if isinstance(t, torch.Tensor):
        sample = _sample(t)
        digest = hashlib.blake2b(sample.contiguous().view(torch.uint8).numpy().tobytes() if sample.numel() else b"",
                                 digest_size=8).hexdigest()
        return f"{tuple(t.shape)}:{t.dtype}:{digest}"
    return describe(t)


class DataSample:
    """A fingerprint of in-memory data: shape, dtype and <= 64 strided elements of every leaf (O(1) to compute)."""

    def __init__(self, structure: Any):
        self.structure = structure

    def text(self) -> str:
        from .data.structure import flatten

        return "[" + ", ".join(_leaf_text(leaf) for leaf in flatten(self.structure)) + "]"


class WeightsSample:
    """A fingerprint of a module's parameters (<= 64 strided elements of each). Buffers are left out: with
    ``sync_batchnorm=False`` each rank keeps its own BatchNorm running statistics by design."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def text(self) -> str:
        return ";".join(f"{name}={_leaf_text(t)}" for name, t in self.module.named_parameters())


def describe(value: Any) -> str:
    """A description of ``value`` that is the same for equal values in any process: no addresses, callables and
    objects by module and qualified name (plus their public settings)."""
    if isinstance(value, (DataSample, WeightsSample)):
        return value.text()
    if value is None or isinstance(value, (bool, str, np.bool_)):
        return repr(value if not isinstance(value, np.bool_) else bool(value))
    if isinstance(value, numbers.Integral):
        return repr(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, Mapping):
        items = sorted(((describe(k), describe(v)) for k, v in value.items()))
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        parts = [describe(v) for v in value]
        if isinstance(value, (set, frozenset)):
            parts.sort()
        return ("[" if isinstance(value, list) else "(") + ", ".join(parts) + ("]" if isinstance(value, list) else ")")
    if isinstance(value, torch.Tensor):
        return _leaf_text(value)
    if isinstance(value, type) or callable(value) and not hasattr(value, "__dict__"):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    kind = type(value)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(value, torch.optim.Optimizer):
        settings = {k: v for k, v in value.defaults.items() if isinstance(v, (numbers.Number, str, bool, tuple))}
        return f"{name}({describe(settings)})"
    if callable(value) and hasattr(value, "__qualname__"):   # functions, methods
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    public = {k: v for k, v in vars(value).items() if not k.startswith("_")} if hasattr(value, "__dict__") else {}
    plain = {k: v for k, v in public.items()
             if v is None or isinstance(v, (numbers.Number, str, bool, tuple, list, dict))}
    return f"{name}({describe(plain)})"


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class Facts:
    """What must be the same on every rank for one call (``fit``, ``evaluate``, ...), in a fixed order of names."""

    def __init__(self, call: str, names: Sequence[str]):
        self.call, self.names = call, list(names)
        self.values: dict[str, Any] = {}
        self.shown: dict[str, str] = {}

    def add(self, name: str, value: Any, shown: str | None = None) -> None:
        """Record fact ``name`` (one of the declared names); ``shown`` is how an error message shows this rank's
        value (default: the description itself, shortened)."""
        if name not in self.names:
            raise KeyError(f"undeclared fact {name!r}")
        self.values[name] = value
        if shown is not None:
            self.shown[name] = shown

    def hashes(self) -> list[int]:
        return [stable_hash(describe(self.values.get(name, "<absent>"))) for name in self.names]

    def show(self, name: str) -> str:
        if name in self.shown:
            return self.shown[name]
        return _short(describe(self.values.get(name, "<absent>")))


_RAISED_AS = {"ValueError": ValueError, "TypeError": TypeError}


def _groups(column: list[int]) -> list[list[int]]:
    """Ranks grouped by equal values, groups in order of their lowest rank."""
    groups: dict[int, list[int]] = {}
    for r, v in enumerate(column):
        groups.setdefault(v, []).append(r)
    return list(groups.values())


@contextlib.contextmanager
def agreement(call: str, names: Sequence[str]) -> Iterator[Facts]:
    """Run a call's checks; on leaving, make every rank raise (or none), as the module docstring says."""
    facts = Facts(call, names)
    error: Exception | None = None
    try:
        yield facts
    except Exception as exc:  # noqa: BLE001 - raised again below, on every rank
        error = exc
    world = dist.world_size()
    if world == 1:
        if error is not None:
            raise error
        return
    dist.init()
    rank, k = dist.rank(), len(facts.names)
    hashes = [0] * k
    if error is None:
        try:   # describing a fact reads data (a sample of a file read in place): it may fail on this rank only
            hashes = facts.hashes()
        except Exception as exc:  # noqa: BLE001 - raised again below, on every rank
            error = exc
    vector = torch.tensor(hashes + [-h for h in hashes] + [rank if error is not None else world], dtype=torch.int64)
    reduced = dist._all_reduce(vector, torch.distributed.ReduceOp.MIN).tolist()
    failed = reduced[-1]
    if failed < world:
        _raise_failure(error, failed, rank)
    differing = [i for i in range(k) if reduced[i] != -reduced[k + i]]
    if differing:
        _raise_disagreement(facts, hashes, differing, rank)


def _raise_failure(error: Exception | None, failed: int, rank: int) -> None:
    """A rank's own check raised: broadcast its (type, message) from the first failing rank."""
    message = (type(error).__name__, str(error)) if rank == failed and error is not None else None
    kind, text = dist.broadcast_object(message, src=failed)
    if error is not None:
        raise error
    raise _RAISED_AS.get(kind, RuntimeError)(f"rank {failed}: {text}")


def _raise_disagreement(facts: Facts, hashes: list[int], differing: list[int], rank: int) -> None:
    table = dist.all_gather_tensor(torch.tensor(hashes, dtype=torch.int64)).tolist()
    lines = []
    for i in differing:
        name = facts.names[i]
        groups = " vs ".join(str(g) for g in _groups([row[i] for row in table]))
        mine = facts.shown.get(name) or f"{name}={facts.show(name)}"
        lines.append(f"ranks disagree on {name}: ranks {groups}; this rank ({rank}) has {mine}")
    raise ValueError("; ".join(lines) + f". Every rank must call {facts.call} with the same arguments and the same "
                     "(global) data: each rank passes all of it, and dfit gives each rank its part")
