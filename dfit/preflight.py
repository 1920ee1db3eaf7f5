"""What fit, evaluate and predict check before any collective, and what every rank must agree on.

``check_data`` runs the local checks of in-memory data against the model (NaN/inf, weights, labels against the
model's classes); the ``*_FACTS`` lists and ``compile_facts`` / ``data_facts`` name what ``dfit.agreement``
compares over the ranks in its one collective. A failure on any rank is raised on every rank (see
``dfit.agreement``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import data as data_mod
from . import distributed as dist
from .agreement import DataSample, Facts
from .data import checks
from .engine import PRECISIONS

if TYPE_CHECKING:
    from .model import Model


def output_names(y: Any) -> list[str]:
    """Names of the model outputs, read off the targets: dict keys, or output_1..k for a list."""
    if isinstance(y, dict):
        return list(y)
    if isinstance(y, (list, tuple)):
        return [f"output_{i + 1}" for i in range(len(y))]
    return ["output"]


# What every rank must agree on before the first step (see dfit.agreement), per call.
_COMPILE_FACTS = ["compile(optimizer)", "compile(loss)", "compile(metrics)", "compile(weighted_metrics)",
                  "compile(loss_weights)", "compile(other options)"]
FIT_FACTS = ["batch_size", "epochs", "initial_epoch", "steps_per_epoch", "validation_steps", "validation_batch_size",
             "validation_split", "validation_freq", "shuffle", "seed", "class_weight", "micro_batch_size",
             "per_chunk_batchnorm", *_COMPILE_FACTS, "the training rows", "the training data values",
             "the validation rows", "the validation data values"]
EVALUATE_FACTS = ["batch_size", "steps", *_COMPILE_FACTS, "the rows", "the data values", "the model weights"]
PREDICT_FACTS = ["batch_size", "steps", "the rows", "the data values", "the model weights"]


def check_data(model: "Model", train: Any, val: Any) -> int | None:
    """Local checks of in-memory data against the model (before any collective); returns the number of classes
    of a single-output model trained with a cross-entropy (its output width, 2 for one unit), or None when
    unknown. The model runs once on two rows of x (eval mode, no gradients, on its training device and autocast)
    only for such a loss, whose labels are checked against its output width."""
    if not isinstance(train, data_mod.ArrayData):
        return None
    checks.check_finite(train.x, "x")
    checks.check_finite(train.y, "y")
    checks.check_sample_weight(train.sample_weight)
    loss = model._compile_args.get("loss")
    if loss is None:   # the model computes its own loss from what it is given
        return None
    names = output_names(train.y)
    output = None
    if checks.needs_classes(loss, names):   # one forward of 2 rows, only when labels need it
        # where and as training runs it: on this rank's device (the engine puts the module there too) and under
        # the training autocast (joining the job here is safe: every rank joins it at the agreement anyway)
        model.module.to(dist.device())
        output = checks.probe(model.module, train.x, train.n, "x", PRECISIONS[model.precision])
        checks.check_outputs(output, train.y, names)
    checks.check_labels(loss, train.y, output, names)
    if isinstance(val, data_mod.ArrayData):
        checks.check_like_training(val.x, train.x, "validation_data x", "training x")
        checks.check_like_training(val.y, train.y, "validation_data y", "training y")
        checks.check_finite(val.x, "validation_data x")
        checks.check_finite(val.y, "validation_data y")
        checks.check_sample_weight(val.sample_weight, "validation sample_weight")
        checks.check_labels(loss, val.y, output, names, "validation_data y")
    if isinstance(output, torch.Tensor) and output.dim() >= 2:
        return max(2, int(output.shape[-1]))
    return None


def compile_facts(facts: Facts, model: "Model") -> None:
    """The compile configuration, described stably (names, classes and settings; never addresses)."""
    args = model._compile_args
    for key in ("loss", "metrics", "weighted_metrics", "loss_weights"):
        facts.add(f"compile({key})", args.get(key))
    facts.add("compile(optimizer)", model.optimizer)
    facts.add("compile(other options)", {k: args.get(k) for k in (
        "sample_weight_mode", "jit_compile", "precision", "sync_batchnorm", "find_unused_parameters")})


def data_facts(facts: Facts, data: Any, what: str) -> None:
    """The data's kind and rows, and for arrays in memory a strided sample of x, y and the weights."""
    if isinstance(data, data_mod.StreamData):
        facts.add(f"{what} rows", "a stream", shown="a stream (its batches are compared as they are read)")
        return
    n = getattr(data, "n", None)
    facts.add(f"{what} rows", (type(data).__name__, n), shown=f"{n} rows ({type(data).__name__})")
    if isinstance(data, data_mod.ArrayData):
        facts.add(f"{what} data values", DataSample((data.x, data.y, data.sample_weight)),
                  shown="another sample of values (x, y, sample_weight)")
