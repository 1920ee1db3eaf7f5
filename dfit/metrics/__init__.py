"""Keras 3 metrics as additive states, summed across ranks by one all-reduce per epoch (exact on N ranks).

``Metric`` is the base class users subclass (``add_variable``, ``update_state``, ``result``); every state must
add up across ranks. ``MetricSet`` is the compiled set of one loop; ``get`` and ``check`` resolve identifiers.
"""
from .base import Mean, MeanMetricWrapper, Metric, Sum, Variable
from .classes import (Accuracy, BinaryAccuracy, BinaryCrossentropy, CategoricalAccuracy, CategoricalCrossentropy,
                      CategoricalHinge, CosineSimilarity, Hinge, KLDivergence, LogCoshError, MeanAbsoluteError,
                      MeanAbsolutePercentageError, MeanSquaredError, MeanSquaredLogarithmicError, Poisson,
                      RootMeanSquaredError, SparseCategoricalAccuracy, SparseCategoricalCrossentropy,
                      SparseTopKCategoricalAccuracy, SquaredHinge, TopKCategoricalAccuracy)
from .compiled import MetricSet, ShapeResolvedAccuracy, TorchMetric, check, get
from .confusion import AUC, FalseNegatives, FalsePositives, Precision, Recall, TrueNegatives, TruePositives
from .functions import (accuracy, binary_accuracy, categorical_accuracy, cosine_similarity,
                        sparse_categorical_accuracy, sparse_top_k_categorical_accuracy, top_k_categorical_accuracy)

__all__ = [
    "Metric", "Variable", "Mean", "Sum", "MeanMetricWrapper", "Accuracy", "BinaryAccuracy", "CategoricalAccuracy",
    "SparseCategoricalAccuracy", "TopKCategoricalAccuracy", "SparseTopKCategoricalAccuracy", "MeanSquaredError",
    "RootMeanSquaredError", "MeanAbsoluteError", "MeanAbsolutePercentageError", "MeanSquaredLogarithmicError",
    "CosineSimilarity", "LogCoshError", "BinaryCrossentropy", "CategoricalCrossentropy",
    "SparseCategoricalCrossentropy", "KLDivergence", "Poisson", "Hinge", "SquaredHinge", "CategoricalHinge",
    "TruePositives", "FalsePositives", "TrueNegatives", "FalseNegatives", "Precision", "Recall", "AUC",
    "MetricSet", "get", "check", "accuracy", "binary_accuracy", "categorical_accuracy",
    "sparse_categorical_accuracy", "top_k_categorical_accuracy", "sparse_top_k_categorical_accuracy",
    "cosine_similarity", "ShapeResolvedAccuracy", "TorchMetric",
]
