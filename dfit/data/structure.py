"""Nested inputs and outputs: a tensor, or a list/tuple/dict of them (one level or more)."""
from __future__ import annotations

from typing import Any, Callable

import torch


def map_structure(fn: Callable[[Any], Any], s: Any) -> Any:
    """Apply ``fn`` to every leaf, keeping lists, tuples and dicts."""
    if isinstance(s, dict):
        return {k: map_structure(fn, v) for k, v in s.items()}
    if isinstance(s, (list, tuple)):
        return type(s)(map_structure(fn, v) for v in s)
    return fn(s)


def flatten(s: Any) -> list[Any]:
    """The leaves of a structure, depth first, dict values in key insertion order."""
    if isinstance(s, dict):
        return [leaf for v in s.values() for leaf in flatten(v)]
    if isinstance(s, (list, tuple)):
        return [leaf for v in s for leaf in flatten(v)]
    return [s]


def first_leaf(s: Any) -> Any:
    return flatten(s)[0]


def num_rows(s: Any) -> int:
    return len(first_leaf(s))


def index_rows(s: Any, idx: torch.Tensor | slice) -> Any:
    """Rows ``idx`` (a slice gives views, an index tensor gathers) of every leaf."""
    if isinstance(s, torch.Tensor):  # the common case, without the generic walk
        return s[idx] if isinstance(idx, slice) else s.index_select(0, idx)
    if isinstance(idx, slice):
        return map_structure(lambda t: t[idx], s)
    return map_structure(lambda t: t.index_select(0, idx), s)


def concat_rows(parts: list[Any]) -> Any:
    """Concatenate structures of tensors along the batch axis."""
    head = parts[0]
    if isinstance(head, dict):
        return {k: concat_rows([p[k] for p in parts]) for k in head}
    if isinstance(head, (list, tuple)):
        return type(head)(concat_rows([p[i] for p in parts]) for i in range(len(head)))
    return torch.cat(parts, dim=0)
