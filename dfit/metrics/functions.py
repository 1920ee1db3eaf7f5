"""Keras' metric functions: per-sample values ``fn(y_true, y_pred) -> (batch,)`` (the last axis reduced)."""
from __future__ import annotations

import torch

from .. import losses as L

__all__ = ["accuracy", "binary_accuracy", "categorical_accuracy", "sparse_categorical_accuracy",
           "top_k_categorical_accuracy", "sparse_top_k_categorical_accuracy", "cosine_similarity"]


def _sparse_labels(y_true, y_pred):
    if y_true.dim() == y_pred.dim() and y_true.shape[-1] == 1:
        y_true = y_true.squeeze(-1)
    return y_true


def accuracy(y_true, y_pred):
    """How often predictions equal targets exactly (per sample: the fraction of equal entries)."""
    y_true = L.align_targets(y_pred, y_true)
    equal = (y_true == y_pred).to(y_pred.dtype if y_pred.is_floating_point() else torch.float64)
    return equal.mean(dim=-1) if equal.dim() > 1 else equal


def binary_accuracy(y_true, y_pred, threshold: float = 0.5):
    """Fraction of entries where ``y_pred > threshold`` equals the 0/1 target."""
    y_true = L.align_targets(y_pred, y_true)
    return ((y_pred > threshold).to(y_true.dtype) == y_true).to(y_pred.dtype).mean(dim=-1)


def categorical_accuracy(y_true, y_pred):
    """Whether the argmax of the prediction is the argmax of the one-hot target."""
    return (y_pred.argmax(dim=-1) == y_true.argmax(dim=-1)).to(y_pred.dtype)


def sparse_categorical_accuracy(y_true, y_pred):
    """Whether the argmax of the prediction is the integer target."""
    return (y_pred.argmax(dim=-1) == _sparse_labels(y_true, y_pred).long()).to(y_pred.dtype)


def sparse_top_k_categorical_accuracy(y_true, y_pred, k: int = 5):
    """Whether the integer target is among the ``k`` largest predictions: as in Keras, whether its score is at
    least the k-th largest score (so a target tied with the k-th score counts as a hit)."""
    kth = y_pred.topk(min(k, y_pred.shape[-1]), dim=-1).values[..., -1:]
    target = y_pred.gather(-1, _sparse_labels(y_true, y_pred).long().unsqueeze(-1))
    return (target >= kth).squeeze(-1).to(y_pred.dtype)


def top_k_categorical_accuracy(y_true, y_pred, k: int = 5):
    """Whether the one-hot target's class is among the ``k`` largest predictions."""
    return sparse_top_k_categorical_accuracy(y_true.argmax(dim=-1), y_pred, k)


def cosine_similarity(y_true, y_pred):
    """The cosine of the angle between targets and predictions (+cos: the loss of the same name is -cos)."""
    return -L.cosine_similarity(y_true, y_pred)
