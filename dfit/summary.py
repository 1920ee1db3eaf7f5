"""``Model.summary()``: a Keras-style table of layers, output shapes and parameter counts."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .engine import call_module


def _shape(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return str((None, *out.shape[1:]))
    if isinstance(out, (list, tuple)):
        return ", ".join(_shape(o) for o in out)
    if isinstance(out, dict):
        return ", ".join(f"{k}: {_shape(v)}" for k, v in out.items())
    return "?"


def _output_shapes(module: nn.Module, example: Any) -> dict[str, str]:
    """Run one example row through the module, recording each child's output shape."""
    shapes: dict[str, str] = {}
    if example is None:
        return shapes
    hooks = [child.register_forward_hook(lambda _m, _i, out, n=name: shapes.__setitem__(n, _shape(out)))
             for name, child in module.named_children()]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            from .data.structure import map_structure

            call_module(module, map_structure(lambda t: t.to(device), example))
    except Exception:  # a summary must never fail because the example could not run
        return {}
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def summary_text(name: str, module: nn.Module, example: Any) -> str:
    shapes = _output_shapes(module, example)
    rows = [(f"{n} ({type(c).__name__})", shapes.get(n, "?"), sum(p.numel() for p in c.parameters()))
            for n, c in module.named_children()]
    width = (33, 26, 12)
    line = "_" * sum(width)
    out = [f'Model: "{name}"', line,
           f"{'Layer (type)':<{width[0]}}{'Output Shape':<{width[1]}}{'Param #':>{width[2]}}", "=" * sum(width)]
    for layer, shape, count in rows:
        out.append(f"{layer:<{width[0]}}{shape:<{width[1]}}{count:>{width[2]},}")
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    out += ["=" * sum(width), f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}", line]
    return "\n".join(out)
