"""Trainable parameters that get no gradient in a step, on N ranks.

On one process such a parameter (an output without targets, a branch the forward skips) simply keeps no
gradient. DDP must be told (``find_unused_parameters=True``, which costs a graph traversal per step), or it
fails on the next step. dfit's default (``compile(find_unused_parameters=None)``) finds out on the first
training step: that step runs without DDP, its gradients averaged here exactly as DDP would, and DDP is built
afterwards with the answer. Later failures of DDP become a clear error naming the parameters.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as tdist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import distributed as dist

# The start of DDP's message when a parameter got no gradient in the previous step.
DDP_UNUSED_ERROR = "Expected to have finished reduction in the prior iteration"
OPTION = "find_unused_parameters"


def trainable(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def _grouped(tensors: Iterable[torch.Tensor]) -> dict[tuple[torch.dtype, torch.device], list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Rank ``src``'s parameters and buffers on every rank (what DDP's constructor does)."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.numel()]
    with torch.no_grad():
        for group in _grouped(tensors).values():
            flat = _flatten_dense_tensors(group)
            tdist.broadcast(flat, src)
            for t, value in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(value)


def average_first_step(module: nn.Module, world: int) -> bool:
    """After a backward without DDP: average the gradients over ranks as DDP with unused-parameter detection
    would, and say whether any trainable parameter got no gradient on some rank.

    One small all-reduce counts, per parameter, the ranks that gave it a gradient; one all-reduce per dtype
    averages the gradients (a rank that gave none contributes zeros; a parameter no rank used keeps none).
    """
    params = [p for _, p in trainable(module)]
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    counts = dist.all_reduce_sum(used)
    grads = []
    for p, count in zip(params, counts.tolist()):
        if count == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    with torch.no_grad():
        for group in _grouped(grads).values():
            flat = _flatten_dense_tensors([g / world for g in group])  # DDP divides before summing
            tdist.all_reduce(flat)
            for g, value in zip(group, _unflatten_dense_tensors(flat, group)):
                g.copy_(value)
    return bool((counts < world).any())


def is_unused_error(error: BaseException) -> bool:
    return DDP_UNUSED_ERROR in str(error)


def unused_error(module: nn.Module, setting: bool | None) -> RuntimeError:
    """The error that replaces DDP's, naming the parameters that got no gradient on this rank's last step."""
    names = [name for name, p in trainable(module) if p.grad is None]
    listed = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    which = (f" On rank {dist.rank()} these trainable parameters got no gradient in the last step: {listed}."
             if names else "")
    why = ("it was compiled with find_unused_parameters=False" if setting is False else
           "find_unused_parameters=None checks only the first training step, and a later step left "
           "parameters without a gradient")
    return RuntimeError(
        "Some trainable parameters of the model received no gradient in a training step (they did not "
        f"contribute to the loss), and multi-process training was not prepared for that: {why}.{which} "
        "Pass compile(..., find_unused_parameters=True), or freeze those parameters (requires_grad_(False))."
    )
