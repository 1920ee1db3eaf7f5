"""Local checks of in-memory data against the compiled model, run before any collective (inside ``agreement``).

Each raises a ``ValueError``/``TypeError`` that says what is wrong, where, and how to fix it: NaN/inf values, negative
or NaN weights, ``class_weight`` keys and values, labels a loss cannot use, a model that cannot run on ``x`` or
returns another structure than the targets, a float16 model on the CPU, BatchNorm layers that would see one row.
"""
from __future__ import annotations

import numbers
from typing import Any, Mapping

import torch
from torch import nn

from .structure import flatten, index_rows, map_structure
from .sharding import part_bounds

__all__ = ["needs_classes", "check_finite", "check_sample_weight", "check_class_weight", "probe", "check_outputs",
           "check_labels", "check_half_on_cpu", "check_batchnorm_parts", "check_like_training"]


def _first_row(bad: torch.Tensor) -> int:
    """The first row index where the (n, ...) boolean mask ``bad`` is set."""
    return int(bad.reshape(len(bad), -1).any(dim=1).nonzero()[0, 0])


def _leaves(structure: Any, name: str) -> list[tuple[str, torch.Tensor]]:
    if structure is None:
        return []
    if isinstance(structure, torch.Tensor):
        return [(name, structure)]
    if isinstance(structure, dict):
        return [pair for k, v in structure.items() for pair in _leaves(v, f"{name}[{k!r}]")]
    if isinstance(structure, (list, tuple)):
        return [pair for i, v in enumerate(structure) for pair in _leaves(v, f"{name}[{i}]")]
    return []   # not an in-memory tensor (read lazily): checked as it is read, not here


_CHUNK_ELEMENTS = 1 << 24


def check_finite(structure: Any, name: str) -> None:
    """No NaN or inf in the float tensors of ``structure`` (one vectorised pass)."""
    for label, t in _leaves(structure, name):
        if not (t.is_floating_point() and t.numel()):
            continue
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, t[0].numel()))   # a bounded temporary, however big t is
        for first, chunk in zip(range(0, len(t), rows_per_chunk), t.split(rows_per_chunk)):
            if bool(torch.isfinite(chunk).all()):
                continue
            row = first + _first_row(~torch.isfinite(chunk))
            raise ValueError(f"{label} has NaN or inf values (first at row {row}); training on them gives a NaN loss. "
                             "Remove or impute those rows (e.g. np.nan_to_num, or drop them) before fit")


def check_sample_weight(w: torch.Tensor | None, name: str = "sample_weight") -> None:
    if w is None or not isinstance(w, torch.Tensor):
        return
    check_finite(w, name)
    if bool((w < 0).any()):
        raise ValueError(f"{name} has negative values (first at row {_first_row(w < 0)}); weights must be "
                         "non-negative (0 leaves a sample out)")


def check_class_weight(class_weight: Any, classes: int | None) -> None:
    """Keys are integer class ids of the model's classes (when known), values finite and non-negative."""
    if class_weight is None:
        return
    if not isinstance(class_weight, Mapping):
        raise TypeError(f"class_weight must be a dict {{class_id: weight}}; got {type(class_weight).__name__}")
    for k, v in class_weight.items():
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"class_weight keys must be integer class ids (0, 1, ...); got the key {k!r}")
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v) == float(v) \
                or float(v) in (float("inf"), float("-inf")):
            raise ValueError(f"class_weight for class {k} must be a finite number; got {v!r}")
        if float(v) < 0:
            raise ValueError(f"class_weight for class {k} is {float(v)}; weights must be non-negative")
        if int(k) < 0 or (classes is not None and int(k) >= classes):
            known = f"{classes} classes (ids 0..{classes - 1})" if classes else "no classes"
            raise ValueError(f"class_weight names class {int(k)}, but the model has {known}; give weights only "
                             "for the model's classes")


def _shapes(structure: Any) -> str:
    shapes = [tuple(t.shape) for t in flatten(structure) if isinstance(t, torch.Tensor)]
    return str(shapes[0]) if len(shapes) == 1 else str(shapes)


def probe(module: nn.Module, x: Any, n: int, name: str, autocast_dtype: torch.dtype | None = None) -> Any:
    """The module's output for the first rows of ``x`` (two, so a squeeze keeps the batch axis), computed in eval
    mode without gradients, under the autocast training uses (``autocast_dtype``); every submodule's train/eval
    mode is restored. A failure is a clear ValueError."""
    from ..engine import call_module

    if not all(isinstance(t, torch.Tensor) for t in flatten(x)):
        return None
    rows = index_rows(x, slice(0, min(2, n)))
    param = next(iter(module.parameters()), None)
    if param is not None:
        rows = map_structure(lambda t: t.to(param.device), rows)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        device = param.device.type if param is not None else "cpu"
        with torch.no_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return call_module(module, rows)
    except Exception as exc:  # noqa: BLE001 - named and raised again as a ValueError
        raise ValueError(f"the model cannot be called on the first rows of {name} (shape {_shapes(rows)}): "
                         f"{type(exc).__name__}: {exc}. Check that {name} has the shape and dtype the model "
                         "expects") from exc
    finally:
        for m, training in modes:
            m.training = training


def check_outputs(output: Any, y: Any, output_names: list[str]) -> None:
    """The model's output has the structure of the targets: one tensor per target, dict keys that match."""
    if isinstance(output, dict) and isinstance(y, dict):
        if not set(y) <= set(output):
            raise ValueError(f"the targets y have keys {sorted(y)} but the model's outputs are {sorted(output)}; "
                             "name the targets like the model's outputs")
    elif isinstance(output, (tuple, list)) and isinstance(y, torch.Tensor):
        raise ValueError(f"the model returns a {type(output).__name__} of {len(output)} outputs but y is a single "
                         f"array; return one tensor from forward, or pass y as a list of {len(output)} arrays "
                         "(one per output)")
    elif isinstance(output, torch.Tensor) and len(output_names) > 1 and not isinstance(y, dict):
        raise ValueError(f"the model returns one tensor but y has {len(output_names)} targets; pass one array as y")


def _loss_kind(spec: Any) -> tuple[str | None, Any]:
    from .. import losses

    try:
        fn = losses.keras_order(spec)
    except (TypeError, ValueError):
        return None, None
    ignore = None
    if isinstance(fn, losses.LossFunctionWrapper):
        ignore = fn.options.get("ignore_class")
        fn = fn.fn
    kinds = {losses.sparse_categorical_crossentropy: "sparse_categorical_crossentropy",
             losses.binary_crossentropy: "binary_crossentropy",
             losses.categorical_crossentropy: "categorical_crossentropy"}
    return kinds.get(fn), ignore


def needs_classes(loss: Any, output_names: list[str]) -> bool:
    """Whether a compiled loss is a cross-entropy whose labels are checked against the model's output width."""
    try:
        from .. import losses

        specs = losses._per_output(loss, output_names, "loss", None)
    except ValueError:
        return False
    return any(_loss_kind(spec)[0] is not None for spec in specs if spec is not None)


def _as_list(s: Any, names: list[str]) -> list[Any] | None:
    if isinstance(s, torch.Tensor):
        return [s]
    if isinstance(s, dict):
        return [s.get(n) for n in names]
    if isinstance(s, (list, tuple)) and len(s) == len(names):
        return list(s)
    return None


def check_labels(loss: Any, y: Any, output: Any, output_names: list[str], what: str = "y") -> None:
    """Labels that the compiled losses can use, checked against the model's output width."""
    from .. import losses

    if loss is None or y is None or output is None:
        return
    try:
        specs = losses._per_output(loss, output_names, "loss", None)
    except ValueError:
        return
    ys, outs = _as_list(y, output_names), _as_list(output, output_names)
    if ys is None or outs is None:
        return
    for name, spec, yt, out in zip(output_names, specs, ys, outs):
        kind, ignore = _loss_kind(spec)
        if kind is None or not isinstance(yt, torch.Tensor) or not isinstance(out, torch.Tensor) or not yt.numel():
            continue
        label = what if len(output_names) == 1 else f"{what}[{name!r}]"
        classes = out.shape[-1] if out.dim() >= 2 else 1
        if kind == "sparse_categorical_crossentropy":
            _check_class_ids(yt, classes, ignore, label, kind)
        elif kind == "binary_crossentropy":
            bad = (yt < 0) | (yt > 1)
            if bool(bad.any()):
                row = _first_row(bad)
                values = yt.reshape(len(yt), -1)[row].tolist()
                raise ValueError(f"binary_crossentropy needs labels in [0, 1]; {label} has {values} "
                                 f"at row {row}. For more than two classes use a softmax output of one unit per "
                                 "class with sparse_categorical_crossentropy")
        elif kind == "categorical_crossentropy" and classes > 1 and (yt.dim() < out.dim() or yt.shape[-1] != classes):
            raise ValueError(f"categorical_crossentropy needs one-hot targets of width {classes} (the model's "
                             f"output); {label} has shape {tuple(yt.shape)}. For integer class ids use "
                             "sparse_categorical_crossentropy, or one-hot encode the labels")


def _check_class_ids(yt: torch.Tensor, classes: int, ignore: Any, label: str, kind: str) -> None:
    if yt.is_floating_point():
        fractional = yt != yt.round()
        if bool(fractional.any()):
            row = _first_row(fractional)
            raise ValueError(f"{kind} labels must be integer class ids; {label} has "
                             f"{yt.reshape(len(yt), -1)[row].tolist()} at row {row}")
    ids = yt.long()
    bad = ((ids < 0) | (ids >= classes)) & (ids != ignore if ignore is not None else True)
    if bool(bad.any()):
        row = _first_row(bad)
        value = ids.reshape(len(ids), -1)[row][bad.reshape(len(bad), -1)[row]][0].item()
        raise ValueError(f"{kind} labels must be class ids in 0..{classes - 1} (the model has {classes} classes: "
                         f"its output width); {label} has the label {value} at row {row}. Fix the labels, or give "
                         "the model's last layer one unit per class")


def check_half_on_cpu(module: nn.Module, on_gpu: bool) -> None:
    """float16 training on the CPU is not what anyone wants (slow and inexact, not Keras' mixed precision)."""
    if on_gpu:
        return
    halves = sorted({str(p.dtype).replace("torch.", "") for p in module.parameters()
                     if p.dtype in (torch.float16,)})
    if halves:
        raise ValueError(f"the model's parameters are {halves[0]} and training runs on the CPU, where float16 "
                         "arithmetic is slow and loses precision; convert the model to float32 (module.float()), "
                         "and on a GPU use compile(precision='16-mixed') or 'bf16-mixed' for mixed precision")


def check_batchnorm_parts(module: nn.Module, synced: bool, n: int | None, batch_size: int | None, world: int) -> None:
    """Without synchronised BatchNorm, a rank whose part of a global batch has 1 row cannot normalise it (torch
    raises on that rank alone, mid-epoch, and the other ranks would wait)."""
    if synced or world == 1 or n is None or batch_size is None:
        return
    layers = [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    for size in {min(batch_size, n), n % batch_size}:
        for rank in range(world):
            start, stop = part_bounds(size, world, rank)
            if stop - start == 1:
                raise ValueError(
                    f"BatchNorm layer(s) {layers} would get a part of 1 row on rank {rank} (a global batch of {size} "
                    f"rows split over {world} ranks; {n} rows, batch_size={batch_size}) and cannot normalise it "
                    "without synchronised statistics; compile with sync_batchnorm=True (the default), or choose a "
                    "batch_size whose batches give every rank 0 or at least 2 rows")


def check_like_training(val: Any, train: Any, name: str, train_name: str) -> None:
    """Validation arrays have the per-row shapes of the training arrays."""
    vs, ts = _leaves(val, name), _leaves(train, train_name)
    if len(vs) != len(ts):
        raise ValueError(f"{name} has {len(vs)} arrays but {train_name} has {len(ts)}; give validation data of the "
                         "same structure as the training data")
    for (vl, v), (tl, t) in zip(vs, ts):
        if tuple(v.shape[1:]) != tuple(t.shape[1:]):
            raise ValueError(f"{vl} has rows of shape {tuple(v.shape[1:])} but {tl} has rows of shape "
                             f"{tuple(t.shape[1:])}; validation data must have the training data's shape per row")
