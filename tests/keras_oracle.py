"""Keras 3 as a test oracle: a seeded differential fuzz of ``dfit`` against Keras itself (issue 18, item 1).

``generate(seed)`` draws a random configuration (a small float32 MLP with one output or two as a list or a
dict; losses by Keras name or as loss objects; metrics by Keras name or as metric objects, AUC/Precision/Recall
included, with non-default arguments and explicit names; an optimizer by name or as an object with non-default
arguments, weight decay, gradient clipping and a learning-rate schedule; sample and class weights; loss
weights; validation split or data; batch sizes that do not divide the data; 1-3 epochs).
``run(config)`` builds the Keras model, copies its initial weights into an equivalent torch module, trains
both on the same data with ``shuffle=False`` (Keras' shuffling cannot be reproduced across frameworks) and
compares ``history.history`` (as dicts: same keys), the final weights, ``evaluate(return_dict=True)`` and
``predict``.

Outcomes: ``"pass"``, ``"refused"`` (dfit refuses the configuration on purpose: ``REFUSED`` below, where each
reason is checked to be the error dfit raises, never silently skipped) or ``"fail"`` with a cause. A known
difference (a Keras quirk, a limit of the oracle, or a dfit bug not fixed yet) is listed in
``KNOWN_DIFFERENCES``; the pytest entry marks such configurations xfail and runs a witness of each under
``xfail(strict=True)`` so that a fix (on either side) shows up as an unexpected pass.

Keras must be imported with ``KERAS_BACKEND=torch``; ``keras()`` does it once per process.

Run more configurations than CI does: ``DFIT_FUZZ_CONFIGS=500 python tests/keras_oracle.py`` prints the figures.
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
import traceback
from collections import Counter, defaultdict
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import dfit

# -- tolerances ---------------------------------------------------------------------------------------------
# Everything runs in float32. RTOL is the issue's bound. ATOL is a floor for values near 0: float32's spacing
# at 1.0 is 1.2e-7, and the two frameworks sum a batch's losses and gradients in different orders (Keras
# averages per batch in float32, dfit sums per sample and normalises by the global batch, logging in float64),
# which leaves absolute differences of a few ulps of the LARGEST term (|terms| ~ 1). A value that is itself
# near 0 (a weight that crossed 0, a loss near 0) cannot be compared relatively; 1e-6 is ~8 ulps at 1.0.
RTOL = 1e-5
ATOL = 1e-6

CI_CONFIGS = 112


# -- the Keras import (once per process) ----------------------------------------------------------------------
_KERAS = None


def keras():
    """The keras module on the torch backend (imported once per process)."""
    global _KERAS
    if _KERAS is None:
        if os.environ.setdefault("KERAS_BACKEND", "torch") != "torch":
            raise RuntimeError("the Keras oracle needs KERAS_BACKEND=torch")
        import keras as k

        _KERAS = k
    return _KERAS


# -- output kinds: the activation of the head, the targets, and the losses/metrics that fit them -------------
@dataclasses.dataclass(frozen=True)
class Head:
    kind: str
    units: int
    activation: str          # "linear", "sigmoid", "softmax", "softplus"
    sparse_rank: int = 1     # sparse labels: shape (n,) when 1, (n, 1) when 2


# loss name -> (head kind, the Keras class, the options its object form may take)
LOSSES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mse": ("regression", "MeanSquaredError", ()),
    "mae": ("regression", "MeanAbsoluteError", ()),
    "mape": ("away_from_zero", "MeanAbsolutePercentageError", ()),
    "msle": ("positive", "MeanSquaredLogarithmicError", ()),
    "huber": ("regression", "Huber", ("delta",)),
    "log_cosh": ("regression", "LogCosh", ()),
    "binary_crossentropy": ("binary", "BinaryCrossentropy", ("from_logits", "label_smoothing")),
    "categorical_crossentropy": ("categorical", "CategoricalCrossentropy", ("from_logits", "label_smoothing")),
    "sparse_categorical_crossentropy": ("sparse", "SparseCategoricalCrossentropy", ("from_logits",)),
    "kl_divergence": ("distribution", "KLDivergence", ()),
    "poisson": ("positive", "Poisson", ()),
    "hinge": ("signed", "Hinge", ()),
    "squared_hinge": ("signed", "SquaredHinge", ()),
    "categorical_hinge": ("categorical_scores", "CategoricalHinge", ()),
    "cosine_similarity": ("regression", "CosineSimilarity", ()),
}

# head kind -> metric names that make sense on it ("accuracy" is resolved by the framework). Only names that
# keras.metrics.get accepts in Keras 3.15: its LogCoshError is 'log_cosh_error' ('logcosh' is refused there).
METRIC_NAMES: dict[str, list[str]] = {
    "regression": ["mse", "mae", "mean_squared_error", "root_mean_squared_error", "log_cosh_error",
                   "cosine_similarity"],
    "away_from_zero": ["mape", "mae", "mse"],
    "positive": ["msle", "poisson", "mae", "mse"],
    "binary": ["accuracy", "binary_accuracy", "binary_crossentropy", "mse", "auc", "precision", "recall"],
    "categorical": ["accuracy", "categorical_accuracy", "top_k_categorical_accuracy", "categorical_crossentropy",
                    "kl_divergence", "mse"],
    "categorical_scores": ["categorical_accuracy", "categorical_hinge", "top_k_categorical_accuracy"],
    "sparse": ["accuracy", "sparse_categorical_accuracy", "sparse_top_k_categorical_accuracy",
               "sparse_categorical_crossentropy"],
    "distribution": ["kl_divergence", "categorical_crossentropy", "mae", "categorical_accuracy"],
    "signed": ["hinge", "squared_hinge", "mae", "mse"],
}

# metric name -> (the metric class, in Keras and in dfit.metrics; the non-default arguments its object form may
# take, one dict drawn). Objects always get an explicit name on both sides: Keras makes an unnamed object's name
# unique in the process ('auc_1' once an AUC() was made before), which dfit does not imitate.
METRIC_CLASSES: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "mse": ("MeanSquaredError", [{}]), "mae": ("MeanAbsoluteError", [{}]),
    "mape": ("MeanAbsolutePercentageError", [{}]), "msle": ("MeanSquaredLogarithmicError", [{}]),
    "mean_squared_error": ("MeanSquaredError", [{}]), "root_mean_squared_error": ("RootMeanSquaredError", [{}]),
    "log_cosh_error": ("LogCoshError", [{}]), "cosine_similarity": ("CosineSimilarity", [{}]),
    "binary_accuracy": ("BinaryAccuracy", [{}, {"threshold": 0.3}, {"threshold": 0.7}]),
    "categorical_accuracy": ("CategoricalAccuracy", [{}]),
    "sparse_categorical_accuracy": ("SparseCategoricalAccuracy", [{}]),
    "top_k_categorical_accuracy": ("TopKCategoricalAccuracy", [{"k": 2}, {"k": 3}]),
    "sparse_top_k_categorical_accuracy": ("SparseTopKCategoricalAccuracy", [{"k": 2}, {"k": 3}]),
    "auc": ("AUC", [{}, {"num_thresholds": 50}, {"curve": "PR"}, {"summation_method": "minoring"},
                    {"summation_method": "majoring", "num_thresholds": 20}]),
    "precision": ("Precision", [{}, {"thresholds": 0.3}, {"thresholds": [0.25, 0.75]}]),
    "recall": ("Recall", [{}, {"thresholds": 0.7}, {"thresholds": [0.4, 0.6]}]),
    "poisson": ("Poisson", [{}]), "kl_divergence": ("KLDivergence", [{}]), "hinge": ("Hinge", [{}]),
    "squared_hinge": ("SquaredHinge", [{}]), "categorical_hinge": ("CategoricalHinge", [{}]),
    "binary_crossentropy": ("BinaryCrossentropy", [{}, {"label_smoothing": 0.1}]),
    "categorical_crossentropy": ("CategoricalCrossentropy", [{}, {"label_smoothing": 0.2}]),
    "sparse_categorical_crossentropy": ("SparseCategoricalCrossentropy", [{}]),
}
# metrics whose object takes from_logits (drawn with it on a head without its activation)
LOGITS_METRICS = {"AUC", "BinaryCrossentropy", "CategoricalCrossentropy", "SparseCategoricalCrossentropy"}

# Keras optimizer name -> (class name, non-default arguments for the object form; one dict drawn, then maybe
# weight decay, one kind of gradient clipping and a learning-rate schedule on top, see _draw_optimizer)
OPTIMIZERS: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "sgd": ("SGD", [{"learning_rate": 0.05}, {"learning_rate": 0.02, "momentum": 0.9},
                    {"learning_rate": 0.02, "momentum": 0.5, "nesterov": True}]),
    "adam": ("Adam", [{"learning_rate": 0.01, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5},
                      {"learning_rate": 0.005, "amsgrad": True}]),
    "adamw": ("AdamW", [{"learning_rate": 0.01, "weight_decay": 0.01, "beta_1": 0.85},
                        {"learning_rate": 0.005, "weight_decay": 0.1, "amsgrad": True}]),
    "rmsprop": ("RMSprop", [{"learning_rate": 0.01, "rho": 0.8, "momentum": 0.5, "centered": True},
                            {"learning_rate": 0.01, "rho": 0.8, "momentum": 0.5},
                            {"learning_rate": 0.003, "centered": True},
                            {"learning_rate": 0.003, "centered": True, "momentum": 0.9, "epsilon": 1e-4}]),
    "adagrad": ("Adagrad", [{"learning_rate": 0.05, "initial_accumulator_value": 0.5, "epsilon": 1e-5}]),
    "adadelta": ("Adadelta", [{"learning_rate": 0.5, "rho": 0.9}]),
    "adamax": ("Adamax", [{"learning_rate": 0.01, "beta_1": 0.8}]),
    "nadam": ("Nadam", [{"learning_rate": 0.01, "beta_1": 0.85, "beta_2": 0.99}]),
    # Keras optimizers that dfit does not offer (see REFUSED)
    "ftrl": ("Ftrl", [{"learning_rate": 0.05}]),
    "lion": ("Lion", [{"learning_rate": 0.001}]),
    "adafactor": ("Adafactor", [{"learning_rate": 0.01}]),
}
DFIT_OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta", "adamax", "nadam")
CLIPS = {"clipnorm": [0.05, 1.0], "clipvalue": [0.01, 0.5], "global_clipnorm": [0.05, 1.0]}


def _schedule(rng: random.Random, lr: float) -> tuple:
    """A learning-rate schedule starting at ``lr`` that changes within a few steps: ("schedule", class, kwargs)."""
    choices = [
        ("ExponentialDecay", {"decay_steps": 3, "decay_rate": 0.8, "staircase": rng.random() < 0.5}),
        ("PiecewiseConstantDecay", {"boundaries": [4, 9], "values": [lr, lr / 2, lr / 5]}),
        ("PolynomialDecay", {"decay_steps": 10, "end_learning_rate": lr / 10, "power": 2.0,
                             "cycle": rng.random() < 0.5}),
        ("InverseTimeDecay", {"decay_steps": 5, "decay_rate": 0.5, "staircase": rng.random() < 0.5}),
        ("CosineDecay", {"decay_steps": 12, "alpha": 0.1}),
        ("CosineDecay", {"decay_steps": 12, "warmup_target": lr * 2, "warmup_steps": 4}),
        ("CosineDecayRestarts", {"first_decay_steps": 4, "t_mul": 2.0, "m_mul": 0.9, "alpha": 0.05}),
    ]
    cls, kwargs = rng.choice(choices)
    if cls != "PiecewiseConstantDecay":
        kwargs = {"initial_learning_rate": lr, **kwargs}
    return ("schedule", cls, kwargs)


# -- a configuration ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    seed: int
    form: str                                 # "single", "list" or "dict"
    n_in: int
    hidden: list[int]
    hidden_activation: str
    heads: list[Head]
    losses: list[tuple]                       # per output: ("name", n) or ("object", class, kwargs)
    metrics: Any                              # per output lists, or a flat list ("flat", [...])
    weighted_metrics: Any
    optimizer: tuple                          # ("name", n) or ("object", n, kwargs)
    n: int
    batch_size: int
    epochs: int
    loss_weights: list[float] | None = None
    sample_weight: bool = False
    class_weight: bool = False
    validation: str = "none"                  # "none", "split", "data", "data_weighted"
    validation_split: float = 0.0

    def output_names(self) -> list[str]:
        if self.form == "dict":
            return ["a", "b"][:len(self.heads)]
        return [f"output_{i + 1}" for i in range(len(self.heads))]

    def loss_names(self) -> list[str]:
        return [spec[1] if spec[0] == "name" else _loss_name_of_class(spec[1]) for spec in self.losses]

    def describe(self) -> str:
        return (f"seed={self.seed} form={self.form} losses={self.losses} metrics={self.metrics} "
                f"weighted={self.weighted_metrics} opt={self.optimizer} n={self.n} bs={self.batch_size} "
                f"epochs={self.epochs} lw={self.loss_weights} sw={self.sample_weight} cw={self.class_weight} "
                f"val={self.validation}")


def _loss_name_of_class(cls: str) -> str:
    return next(name for name, (_, c, _) in LOSSES.items() if c == cls)


def _draw_loss(rng: random.Random, name: str) -> tuple:
    kind, cls, options = LOSSES[name]
    if rng.random() < 0.5:
        return ("name", name)
    kwargs: dict[str, Any] = {}
    for opt in options:
        if opt == "from_logits" and rng.random() < 0.5:
            kwargs["from_logits"] = True
        elif opt == "label_smoothing" and rng.random() < 0.4:
            kwargs["label_smoothing"] = rng.choice([0.1, 0.2])
        elif opt == "delta" and rng.random() < 0.5:
            kwargs["delta"] = rng.choice([0.5, 2.0])
    if rng.random() < 0.15:
        kwargs["reduction"] = "sum"
    return ("object", cls, kwargs)


def _draw_head(rng: random.Random, loss: tuple) -> Head:
    name = loss[1] if loss[0] == "name" else _loss_name_of_class(loss[1])
    kind = LOSSES[name][0]
    logits = loss[0] == "object" and loss[2].get("from_logits", False)
    if kind in ("regression", "away_from_zero", "signed"):
        units = rng.choice([2, 3]) if name == "cosine_similarity" else rng.choice([1, 2, 3])
        return Head(kind, units, "linear")
    if kind == "positive":
        return Head(kind, rng.choice([1, 2]), "softplus")
    if kind == "binary":
        return Head(kind, rng.choice([1, 1, 3]), "linear" if logits else "sigmoid")
    if kind in ("categorical", "distribution"):
        return Head(kind, rng.choice([3, 4, 5, 6]), "linear" if logits else "softmax")
    if kind == "categorical_scores":
        return Head(kind, rng.choice([3, 4, 5, 6]), "linear")
    if kind == "sparse":
        return Head(kind, rng.choice([3, 4, 5, 6]), "linear" if logits else "softmax", sparse_rank=rng.choice([1, 2]))
    raise AssertionError(kind)


def _metric_pool(head: Head) -> list[str]:
    """The metric names that fit ``head`` (top-k metrics with their default k=5 need 5 classes or more)."""
    return [m for m in METRIC_NAMES[head.kind] if "top_k" not in m or head.units >= 5]


def _draw_metric(rng: random.Random, name: str, head: Head) -> tuple:
    """("name", name) or ("object", class, kwargs) with an explicit ``name`` (sometimes not the default one)."""
    if name not in METRIC_CLASSES or rng.random() < 0.4:
        return ("name", name)
    cls, variants = METRIC_CLASSES[name]
    kwargs = dict(rng.choice(variants))
    if cls in LOGITS_METRICS and head.activation == "linear" and head.kind != "sparse" and rng.random() < 0.6:
        kwargs["from_logits"] = True
    if cls in LOGITS_METRICS and head.kind == "sparse" and head.activation == "linear":
        kwargs["from_logits"] = True  # cross-entropy of raw scores would be NaN/inf on both sides
    kwargs["name"] = name if rng.random() < 0.7 else f"my_{name}"
    return ("object", cls, kwargs)


def _draw_optimizer(rng: random.Random) -> tuple:
    """("name", name) or ("object", name, kwargs): kwargs from OPTIMIZERS, maybe with weight decay, one kind of
    clipping and the learning rate as a schedule (("schedule", class, kwargs), built per framework)."""
    roll = rng.random()
    if roll < 0.4:
        name = "sgd"
    elif roll < 0.93:
        name = rng.choice([n for n in DFIT_OPTIMIZER_NAMES if n != "sgd"])
    else:
        name = rng.choice(["ftrl", "lion", "adafactor"])
    cls, variants = OPTIMIZERS[name]
    if name not in DFIT_OPTIMIZER_NAMES or rng.random() < 0.4:
        return ("name", name)
    kwargs = dict(rng.choice(variants))
    if rng.random() < 0.25:
        kwargs["weight_decay"] = rng.choice([0.01, 0.05])
    if rng.random() < 0.35:
        clip = rng.choice(sorted(CLIPS))
        kwargs[clip] = rng.choice(CLIPS[clip])
    if rng.random() < 0.3:
        kwargs["learning_rate"] = _schedule(rng, kwargs["learning_rate"])
    return ("object", name, kwargs)


def generate(seed: int) -> Config:
    """One random configuration; the same seed gives the same configuration (in the same checkout)."""
    rng = random.Random(seed)
    form = rng.choice(["single", "single", "list", "dict"])
    n_out = 1 if form == "single" else 2
    # binary cross-entropy more often than 1 in 15: its head is the one with AUC/Precision/Recall
    losses = [_draw_loss(rng, "binary_crossentropy" if rng.random() < 0.12 else rng.choice(list(LOSSES)))
              for _ in range(n_out)]
    heads = [_draw_head(rng, loss) for loss in losses]
    metrics = [[_draw_metric(rng, m, h) for m in rng.sample(_metric_pool(h), rng.choice([0, 1, 2]))]
               for h in heads]
    weighted = [[_draw_metric(rng, m, h) for m in rng.sample(_metric_pool(h), rng.choice([0, 0, 1]))]
                for h in heads]
    if n_out > 1 and rng.random() < 0.15:
        # Keras 3 maps a flat list of one metric per output positionally (a list of another length is an error)
        common = sorted(set(_metric_pool(heads[0])) & set(_metric_pool(heads[1])) - {"accuracy"})
        if len(common) >= 2:
            metrics = ("flat", [_draw_metric(rng, m, h) for m, h in zip(rng.sample(common, 2), heads)])
    n = rng.randint(24, 72)
    batch_size = rng.randint(4, 16)
    if rng.random() < 0.2:  # sometimes a batch size that divides the data
        batch_size = next((b for b in range(batch_size, 2, -1) if n % b == 0), batch_size)
    config = Config(seed=seed, form=form, n_in=rng.randint(2, 6), hidden=[rng.randint(3, 8)
                    for _ in range(rng.choice([1, 1, 2]))], hidden_activation=rng.choice(["tanh", "relu"]),
                    heads=heads, losses=losses, metrics=metrics, weighted_metrics=weighted,
                    optimizer=_draw_optimizer(rng), n=n, batch_size=batch_size, epochs=rng.randint(1, 3))
    if n_out > 1 and rng.random() < 0.5:
        config.loss_weights = [rng.choice([0.5, 1.0, 2.0]) for _ in range(n_out)]
    classifying = heads[0].kind in ("binary", "categorical", "sparse") and (heads[0].kind != "binary"
                                                                           or heads[0].units == 1)
    # Keras 3 refuses class_weight on several outputs and together with sample_weight: never drawn.
    if n_out == 1 and classifying and rng.random() < 0.35:
        config.class_weight = True
    elif rng.random() < 0.4:
        config.sample_weight = True
    config.validation = rng.choice(["none", "split", "data", "data_weighted"])
    if config.validation == "split":
        config.validation_split = rng.choice([0.2, 0.25, 0.3])
    return config


# -- configurations dfit refuses on purpose (checked: the run must raise this error) -------------------------
@dataclasses.dataclass(frozen=True)
class Refusal:
    reason: str
    applies: Callable[[Config], bool]
    error: type
    match: str


def _repeated_metric(config: Config) -> bool:
    """One output given the same metric name twice (e.g. 'mse' drawn as its class and as 'mean_squared_error')."""
    lists = [config.metrics[1]] if isinstance(config.metrics, tuple) else config.metrics
    for plain in lists:
        names = [metric_log_name(m) for m in plain]
        if len(names) != len(set(names)):
            return True
    return False


REFUSED: list[Refusal] = [
    Refusal("Keras optimizers outside API.md section 1's list (ftrl, lion, adafactor): dfit names eight",
            lambda c: c.optimizer[1] not in DFIT_OPTIMIZER_NAMES, ValueError, "Unknown optimizer"),
    Refusal("the same metric twice on one output: dfit refuses two log entries with one name",
            _repeated_metric, ValueError, "two metrics are both named"),
]


def refusal_of(config: Config) -> Refusal | None:
    return next((r for r in REFUSED if r.applies(config)), None)


# -- known differences (Keras quirks, oracle limits, dfit bugs not fixed yet) --------------------------------
@dataclasses.dataclass(frozen=True)
class KnownDifference:
    """A difference from Keras that is known and explained. ``symptoms``: the failure causes it explains
    (a failure with another cause is still a failure). ``witness``: a seed whose configuration shows it, run by
    a strict xfail test so that the fix shows up."""
    group: str
    applies: Callable[[Config], bool]
    symptoms: tuple[str, ...]
    witness: int


def metric_log_name(spec: tuple) -> str:
    """The name a drawn metric logs under (before any output prefix)."""
    return spec[1] if spec[0] == "name" else spec[2]["name"]


def _metric_names(config: Config) -> list[str]:
    out = []
    for spec in (config.metrics, config.weighted_metrics):
        items = spec[1] if isinstance(spec, tuple) else [m for per in spec for m in per]
        out += [metric_log_name(m) for m in items]
    return out


_VALUES = ("history values differ", "final weights differ", "evaluate values differ", "predict differs")
KNOWN_DIFFERENCES: list[KnownDifference] = [
    KnownDifference("Keras quirk: keras.losses.cosine_similarity has a NaN gradient where a prediction is exactly the "
                    "zero vector (a dead ReLU layer with Keras' zero initial biases), so the Keras run is NaN from the "
                    "first step; dfit's gradient there is finite, as Keras' formula defines it "
                    "(test_keras_regressions.py::test_cosine_similarity_normalizes_with_keras_epsilon)",
                    lambda c: "cosine_similarity" in c.loss_names(),
                    ("Keras diverged", "all elements of input should be between 0 and 1"), witness=370),
    KnownDifference("oracle limit: a MAPE loss (100 * |error| / |target|, often with reduction='sum') makes the "
                    "weights grow 10-1e5 times within a few steps; the two runs agree to float32 rounding at the "
                    "first step and the growth, and the kinks of |error| and ReLU crossed on one side only, "
                    "amplify it past rtol 1e-5 (traced step by step: seeds 124, 250, 376, 398, 477)",
                    lambda c: "mape" in c.loss_names(), _VALUES, witness=376),
]


def known_differences(config: Config) -> list[KnownDifference]:
    """The known differences that apply (none for a refused configuration)."""
    if refusal_of(config) is not None:
        return []
    return [k for k in KNOWN_DIFFERENCES if k.applies(config)]


def explaining(config: Config, outcome: "Outcome") -> KnownDifference | None:
    """The known difference that explains a failure: it applies and the failure is one of its symptoms."""
    if outcome.status != "fail":
        return None
    return next((k for k in known_differences(config) if any(s in outcome.cause for s in k.symptoms)), None)


# -- data -------------------------------------------------------------------------------------------------
def _targets(rng: np.random.Generator, head: Head, n: int) -> np.ndarray:
    u = head.units
    if head.kind == "regression":
        return rng.normal(size=(n, u)).astype("float32")
    if head.kind == "away_from_zero":
        return (rng.uniform(0.5, 2.0, size=(n, u)) * rng.choice([-1, 1], size=(n, u))).astype("float32")
    if head.kind == "positive":
        return rng.uniform(0.0, 3.0, size=(n, u)).astype("float32")
    if head.kind == "binary":
        return rng.integers(0, 2, size=(n, u)).astype("float32")
    if head.kind in ("categorical", "categorical_scores"):
        return np.eye(u, dtype="float32")[rng.integers(0, u, size=n)]
    if head.kind == "sparse":
        labels = rng.integers(0, u, size=n)
        return labels if head.sparse_rank == 1 else labels.reshape(n, 1)
    if head.kind == "distribution":
        e = np.exp(rng.normal(size=(n, u)))
        return (e / e.sum(axis=1, keepdims=True)).astype("float32")
    if head.kind == "signed":
        return rng.choice([-1.0, 1.0] if rng.random() < 0.5 else [0.0, 1.0], size=(n, u)).astype("float32")
    raise AssertionError(head.kind)


def _structure(config: Config, per_output: list[Any]) -> Any:
    if config.form == "single":
        return per_output[0]
    if config.form == "dict":
        return dict(zip(config.output_names(), per_output))
    return list(per_output)


def make_data(config: Config, rng: np.random.Generator, n: int) -> tuple[np.ndarray, Any, np.ndarray]:
    x = rng.normal(size=(n, config.n_in)).astype("float32")
    ys = [_targets(rng, h, n) for h in config.heads]
    sw = rng.uniform(0.2, 2.0, size=n).astype("float32")
    return x, _structure(config, ys), sw


def class_weights(config: Config) -> dict[int, float]:
    classes = 2 if config.heads[0].kind == "binary" else config.heads[0].units
    return {c: 0.5 + 0.5 * c for c in range(classes) if c != 1}  # class 1 left out: weighs 1.0


# -- models -------------------------------------------------------------------------------------------------
class TorchMLP(nn.Module):
    """The torch twin of the Keras model: Linear layers, the same activations and output structure."""

    def __init__(self, config: Config):
        super().__init__()
        sizes = [config.n_in] + config.hidden
        self.trunk = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.heads = nn.ModuleList(nn.Linear(sizes[-1], h.units) for h in config.heads)
        self.hidden_activation = torch.tanh if config.hidden_activation == "tanh" else torch.relu
        self.activations = [h.activation for h in config.heads]
        self.form, self.names = config.form, config.output_names()

    def forward(self, x):
        for layer in self.trunk:
            x = self.hidden_activation(layer(x))
        outs = [_torch_activation(a, head(x)) for a, head in zip(self.activations, self.heads)]
        if self.form == "single":
            return outs[0]
        if self.form == "dict":
            return dict(zip(self.names, outs))
        return outs

    def linears(self) -> list[nn.Linear]:
        return list(self.trunk) + list(self.heads)


def _torch_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    return {"linear": lambda t: t, "sigmoid": torch.sigmoid, "softmax": lambda t: torch.softmax(t, dim=-1),
            "softplus": torch.nn.functional.softplus}[name](x)


def keras_model(config: Config):
    k = keras()
    inp = k.Input((config.n_in,))
    h = inp
    for units in config.hidden:
        h = k.layers.Dense(units, activation=config.hidden_activation)(h)
    outs = [k.layers.Dense(head.units, activation=head.activation, name=name)(h)
            for head, name in zip(config.heads, config.output_names())]
    return k.Model(inp, _structure(config, outs))


def keras_dense_layers(model) -> list:
    k = keras()
    return [layer for layer in model.layers if isinstance(layer, k.layers.Dense)]


def copy_weights(kmodel, tmodule: TorchMLP) -> None:
    """Keras Dense kernel (in, out) -> torch Linear weight (out, in); the bias as is."""
    with torch.no_grad():
        for dense, linear in zip(keras_dense_layers(kmodel), tmodule.linears(), strict=True):
            kernel, bias = dense.get_weights()
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
            linear.bias.copy_(torch.from_numpy(bias))


# -- compile arguments for either framework ----------------------------------------------------------------
def _loss_arg(lib: str, spec: tuple) -> Any:
    if spec[0] == "name":
        return spec[1]
    module = keras().losses if lib == "keras" else dfit.losses
    return getattr(module, spec[1])(**spec[2])


def _metric_arg(lib: str, spec: tuple) -> Any:
    if spec[0] == "name":
        return spec[1]
    module = keras().metrics if lib == "keras" else dfit.metrics
    return getattr(module, spec[1])(**spec[2])


def _optimizer_arg(lib: str, spec: tuple) -> Any:
    if spec[0] == "name":
        return spec[1]
    cls = OPTIMIZERS[spec[1]][0]
    module = keras().optimizers if lib == "keras" else dfit.optimizers
    kwargs = dict(spec[2])
    lr = kwargs.get("learning_rate")
    if isinstance(lr, tuple):  # ("schedule", class, kwargs)
        kwargs["learning_rate"] = getattr(module.schedules, lr[1])(**lr[2])
    return getattr(module, cls)(**kwargs)


def _per_output_arg(config: Config, values: list[Any]) -> Any:
    if config.form == "single":
        return values[0]
    if config.form == "dict":
        return dict(zip(config.output_names(), values))
    return values


def _metrics_arg(lib: str, config: Config, spec: Any) -> Any:
    if isinstance(spec, tuple):  # ("flat", [...])
        return [_metric_arg(lib, m) for m in spec[1]]
    per = [[_metric_arg(lib, m) for m in ms] for ms in spec]
    if not any(per):
        return None
    return _per_output_arg(config, per)


def compile_args(lib: str, config: Config) -> dict[str, Any]:
    args = dict(optimizer=_optimizer_arg(lib, config.optimizer),
                loss=_per_output_arg(config, [_loss_arg(lib, s) for s in config.losses]),
                metrics=_metrics_arg(lib, config, config.metrics),
                weighted_metrics=_metrics_arg(lib, config, config.weighted_metrics))
    if config.loss_weights is not None:
        args["loss_weights"] = _per_output_arg(config, config.loss_weights)
    return args


# -- one comparison ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    status: str              # "pass", "refused", "fail"
    cause: str = ""          # the refusal's reason or the failure's group
    detail: str = ""


class Mismatch(AssertionError):
    def __init__(self, cause: str, detail: str):
        super().__init__(f"{cause}: {detail}")
        self.cause, self.detail = cause, detail


def _flat(structure: Any) -> list[np.ndarray]:
    if isinstance(structure, dict):
        return [np.asarray(structure[k]) for k in sorted(structure)]
    if isinstance(structure, (list, tuple)):
        return [np.asarray(s) for s in structure]
    return [np.asarray(structure)]


def _close(a: Any, b: Any) -> bool:
    return bool(np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=RTOL, atol=ATOL,
                            equal_nan=True))


def compare_logs(what: str, expected: dict, got: dict) -> None:
    if set(expected) != set(got):
        raise Mismatch(f"{what} keys differ", f"Keras only {sorted(set(expected) - set(got))}, "
                                              f"dfit only {sorted(set(got) - set(expected))}")
    if any(np.isnan(expected[k]).any() and not np.isnan(got[k]).any() for k in expected):
        raise Mismatch("Keras diverged (NaN)", "; ".join(f"{k}: Keras {expected[k]} dfit {got[k]}" for k in expected))
    bad = [k for k in sorted(expected) if not _close(expected[k], got[k])]
    if bad:
        raise Mismatch(f"{what} values differ", "; ".join(f"{k}: Keras {expected[k]} dfit {got[k]}" for k in bad))


def _fit_kwargs(config: Config, lib: str, data: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = dict(batch_size=config.batch_size, epochs=config.epochs, shuffle=False, verbose=0)
    if config.sample_weight:
        kw["sample_weight"] = data["sw"]
    if config.class_weight:
        kw["class_weight"] = class_weights(config)
    if config.validation == "split":
        kw["validation_split"] = config.validation_split
    elif config.validation == "data":
        kw["validation_data"] = (data["xv"], data["yv"])
    elif config.validation == "data_weighted":
        kw["validation_data"] = (data["xv"], data["yv"], data["swv"])
    if lib == "dfit":
        kw["view_metrics"] = False
    return kw


def run(config: Config) -> Outcome:
    """Train Keras and dfit on ``config`` and compare; never raises for a difference (returns an Outcome)."""
    rng = np.random.default_rng(config.seed)
    x, y, sw = make_data(config, rng, config.n)
    xv, yv, swv = make_data(config, rng, max(5, config.n // 4))
    data = dict(sw=sw, xv=xv, yv=yv, swv=swv)

    k = keras()
    k.utils.set_random_seed(config.seed)
    kmodel = keras_model(config)
    module = TorchMLP(config)
    copy_weights(kmodel, module)

    refusal = refusal_of(config)
    model = dfit.Model(module)
    try:
        model.compile(**compile_args("dfit", config))
        dhist = model.fit(x, y, **_fit_kwargs(config, "dfit", data)).history
    except Exception as exc:  # noqa: BLE001 - every exception is an outcome
        if refusal is not None and isinstance(exc, refusal.error) and refusal.match in str(exc):
            return Outcome("refused", refusal.reason)
        return Outcome("fail", f"dfit raised {type(exc).__name__}: {_first_line(exc)}", traceback.format_exc())
    if refusal is not None:
        return Outcome("fail", f"dfit accepted a configuration listed as refused ({refusal.reason})")

    try:
        kmodel.compile(**compile_args("keras", config))
        khist = kmodel.fit(x, y, **_fit_kwargs(config, "keras", data)).history
    except Exception as exc:  # noqa: BLE001
        return Outcome("fail", f"Keras raised {type(exc).__name__} (fix the generator): {_first_line(exc)}",
                       traceback.format_exc())

    try:
        compare_logs("history", khist, dhist)
        for i, (dense, linear) in enumerate(zip(keras_dense_layers(kmodel), module.linears())):
            kernel, bias = dense.get_weights()
            if not (_close(kernel.T, linear.weight.detach().numpy()) and _close(bias, linear.bias.detach().numpy())):
                diff = float(np.abs(kernel.T - linear.weight.detach().numpy()).max())
                raise Mismatch("final weights differ", f"layer {i}: max |diff| {diff:.3g}")
        ew = dict(sample_weight=swv) if config.validation == "data_weighted" else {}
        kev = kmodel.evaluate(xv, yv, batch_size=config.batch_size, verbose=0, return_dict=True, **ew)
        dev = model.evaluate(xv, yv, batch_size=config.batch_size, verbose=0, return_dict=True, **ew)
        compare_logs("evaluate", kev, dev)
        kpred, dpred = kmodel.predict(xv, batch_size=config.batch_size, verbose=0), model.predict(xv)
        for a, b in zip(_flat(kpred), _flat(dpred), strict=True):
            if not _close(a, b):
                raise Mismatch("predict differs", f"max |diff| {float(np.abs(a - b).max()):.3g}")
    except Mismatch as m:
        return Outcome("fail", m.cause, m.detail)
    return Outcome("pass")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:160]


def configs(count: int | None = None, start: int = 0) -> list[Config]:
    """The seeds CI runs (``CI_CONFIGS``), or ``DFIT_FUZZ_CONFIGS`` of them."""
    count = count or int(os.environ.get("DFIT_FUZZ_CONFIGS", CI_CONFIGS))
    return [generate(seed) for seed in range(start, start + count)]


def main() -> None:
    """Run the fuzz and print the figures: passed, refused by reason, failed grouped by cause."""
    count = int(sys.argv[1]) if len(sys.argv) > 1 else None
    t0 = time.monotonic()
    status: Counter = Counter()
    groups: dict[str, list[str]] = defaultdict(list)
    known_results: Counter = Counter()
    by_optimizer: Counter = Counter()
    for config in configs(count):
        try:
            outcome = run(config)
        except Exception as exc:  # noqa: BLE001
            outcome = Outcome("fail", f"harness error {type(exc).__name__}: {_first_line(exc)}")
        known = explaining(config, outcome)
        status[outcome.status] += 1
        if outcome.status != "pass":
            key = f"[{outcome.status}] {outcome.cause}"
            if known is not None:
                key = f"[known: {known.group}] {key}"
            last = outcome.detail.strip().splitlines()[-1][:300] if outcome.detail else ""
            groups[key].append(f"{config.describe()} :: {last}")
        if known is not None:
            known_results[known.group] += 1
        by_optimizer[(config.optimizer[1], outcome.status)] += 1
    print(f"{sum(status.values())} configurations in {time.monotonic() - t0:.0f} s: {dict(status)}")
    for group, n in sorted(known_results.items()):
        print(f"  explained by known difference {group!r}: {n}")
    print("  by optimizer:", ", ".join(f"{o} {st} {n}" for (o, st), n in sorted(by_optimizer.items())))
    for key, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"\n{len(items):4d}  {key}")
        for item in items[:4]:
            print(f"        {item}")


if __name__ == "__main__":
    main()
