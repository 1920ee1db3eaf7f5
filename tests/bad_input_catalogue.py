"""The bad-input catalogue: mistakes a user makes with fit/evaluate/predict, each tried on every rank of a job.

``MISTAKES`` maps a name to ``(call, expected exception type, regex of the message)``. ``call(rank)`` makes the
mistake (some only on rank 1). ``try_all`` runs them in sequence on one rank of a job and returns
``[(name, exception type name or None, message)]``; a mistake that returns normally is SILENT. After each mistake
the ranks check they are still in step (one tiny all-reduce), so one mistake that desynchronised the ranks is
named instead of spoiling the ones after it.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

N = 40
RATE = 0.05


def _x(n=N, width=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, width))


def _labels(n=N, classes=3, seed=1):
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _yr(n=N, seed=2):
    return np.random.default_rng(seed).normal(size=(n, 1))


def _clf(**compile_args):
    import dfit

    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(4, 3), nn.Softmax(dim=-1)])
    options = dict(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    options.update(compile_args)
    model.compile(**options)
    return model


def _reg(**compile_args):
    import dfit

    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(4, 1)])
    options = dict(optimizer="sgd", loss="mse")
    options.update(compile_args)
    model.compile(**options)
    return model


def _binary():
    import dfit

    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(4, 1), nn.Sigmoid()])
    model.compile("sgd", "binary_crossentropy")
    return model


class TwoHeads(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        self.a, self.b, self.as_dict = nn.Linear(4, 1), nn.Linear(4, 1), as_dict

    def forward(self, x):
        if self.as_dict:
            return {"a": self.a(x), "b": self.b(x)}
        return self.a(x), self.b(x)


def _fit(model, *args, **kwargs):
    kwargs.setdefault("verbose", 0)
    kwargs.setdefault("epochs", 2)
    kwargs.setdefault("batch_size", 8)
    return model.fit(*args, **kwargs)


def _on_rank1(rank, a, b):
    return b if rank == 1 else a


def _stream(rank, bad):
    x, y = _x(), _labels()
    for i in range(0, N, 8):
        if bad and i == 16:
            yield "not a batch"
        else:
            yield x[i:i + 8], y[i:i + 8]


def _mean_loss(y_true, y_pred):
    return (y_pred - y_true).square().mean()


class _Unpicklable(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.hook = lambda t: t   # a lambda attribute: pickle cannot send it to a spawned worker

    def forward(self, x):
        return self.hook(self.layer(x))


def _bn_model(sync):
    import dfit

    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)])
    model.compile("sgd", "mse", sync_batchnorm=sync)
    return model


# --------------------------------------------------------------------------------------------------------------
# name -> (call(rank), expected type, message regex: what is wrong, and how to fix it)
FIX = "Every rank must call"
MISTAKES = {
    # -- arguments, the same on every rank --------------------------------------------------------------------
    "fit_before_compile": (lambda r: __import__("dfit").Sequential([nn.Linear(4, 1)]).fit(_x(), _yr(), verbose=0),
                           RuntimeError, r"compile\(\) before fit"),
    "evaluate_before_compile": (lambda r: __import__("dfit").Sequential([nn.Linear(4, 1)]).evaluate(
        _x(), _yr(), verbose=0), RuntimeError, r"compile\(\) before"),
    "unknown_loss": (lambda r: _reg(loss="mean_squared_eror"), ValueError, r"Unknown loss 'mean_squared_eror'.*Known"),
    "unknown_metric": (lambda r: _reg(metrics=["acuracy"]), ValueError, r"(?i)unknown metric.*acuracy"),
    "unknown_optimizer": (lambda r: _reg(optimizer="adamm"), ValueError, r"(?i)unknown optimizer.*adamm"),
    "loss_class_not_instance": (lambda r: _reg(loss=__import__("dfit").losses.MeanSquaredError), TypeError,
                                r"is a class; pass an instance"),
    "x_y_length_mismatch": (lambda r: _fit(_reg(), _x(), _yr(N - 1)), ValueError,
                            r"cardinality.*same number of samples.*x: 40.*y: 39"),
    "sample_weight_length": (lambda r: _fit(_reg(), _x(), _yr(), sample_weight=np.ones(N - 2)), ValueError,
                             r"sample_weight has 38 rows but x has 40"),
    "sample_weight_shape": (lambda r: _fit(_reg(), _x(), _yr(), sample_weight=np.ones((N, 2))), ValueError,
                            r"sample_weight must have shape \(samples,\).*temporal"),
    "sample_weight_negative": (lambda r: _fit(_reg(), _x(), _yr(), sample_weight=-np.ones(N)), ValueError,
                               r"sample_weight has negative values.*row 0.*non-negative"),
    "sample_weight_nan": (lambda r: _fit(_reg(), _x(), _yr(), sample_weight=np.r_[np.ones(5), np.nan, np.ones(34)]),
                          ValueError, r"sample_weight.*NaN or inf.*row 5"),
    "x_nan": (lambda r: _fit(_reg(), np.where(np.arange(N)[:, None] == 7, np.nan, _x()), _yr()), ValueError,
              r"^x has NaN or inf.*row 7.*Remove or impute"),
    "y_inf": (lambda r: _fit(_reg(), _x(), np.where(np.arange(N)[:, None] == 3, np.inf, _yr())), ValueError,
              r"y has NaN or inf.*row 3"),
    "validation_x_nan": (lambda r: _fit(_reg(), _x(), _yr(), validation_data=(np.full((8, 4), np.nan), _yr(8))),
                         ValueError, r"validation_data x has NaN or inf.*row 0"),
    "validation_split_above_1": (lambda r: _fit(_reg(), _x(), _yr(), validation_split=1.5), ValueError,
                                 r"validation_split must be a float in \[0, 1\)"),
    "validation_split_negative": (lambda r: _fit(_reg(), _x(), _yr(), validation_split=-0.1), ValueError,
                                  r"validation_split must be a float in \[0, 1\)"),
    "validation_split_no_train_rows": (lambda r: _fit(_reg(), _x(3), _yr(3), validation_split=0.9), ValueError,
                                       r"(?i)validation_split.*(no|0) (training )?(rows|samples)"),
    "validation_split_with_stream": (lambda r: _fit(_clf(), _stream(r, False), batch_size=None,
                                                    validation_split=0.2), ValueError, r"validation_split.*stream"),
    "validation_data_arity_1": (lambda r: _fit(_reg(), _x(), _yr(), validation_data=(_x(8),)), ValueError,
                                r"validation_data must be a tuple \(x_val, y_val\)"),
    "validation_data_arity_4": (lambda r: _fit(_reg(), _x(), _yr(), validation_data=(_x(8), _yr(8), None, None)),
                                ValueError, r"validation_data must be a tuple \(x_val, y_val\)"),
    "validation_data_width": (lambda r: _fit(_reg(), _x(), _yr(), validation_data=(_x(8, width=5), _yr(8))),
                              ValueError, r"validation_data x.*\(5,\).*training x.*\(4,\)"),
    "validation_y_width": (lambda r: _fit(_reg(), _x(), _yr(), validation_data=(_x(8), np.ones((8, 2)))),
                           ValueError, r"validation_data y.*\(2,\).*training y.*\(1,\)"),
    # torch's own message with dfit's note (rank, shapes), raised on every rank at the first step (the model is run
    # ahead only for cross-entropies)
    "x_width_for_model": (lambda r: _fit(_reg(), _x(width=5), _yr()), RuntimeError,
                          r"mat1 and mat2 shapes cannot be multiplied \(4x5 and 4x1\)(.|\n)*"
                          r"rank \d's rows of a batch of x \(shape \(4, 5\)\): check that x has the shape"),
    "x_width_for_classifier": (lambda r: _fit(_clf(), _x(width=5), _labels()), ValueError,
                               r"model cannot be called on the first rows of x \(shape \(2, 5\)\).*shape and dtype"),
    "predict_width": (lambda r: _reg().predict(_x(width=6), verbose=0), RuntimeError,
                      r"mat1 and mat2 shapes cannot be multiplied \(16x6 and 4x1\)(.|\n)*check that x has the shape"),
    "class_weight_string_keys": (lambda r: _fit(_clf(), _x(), _labels(), class_weight={"a": 1.0}), TypeError,
                                 r"class_weight keys must be integer class ids.*'a'"),
    "class_weight_float_keys": (lambda r: _fit(_clf(), _x(), _labels(), class_weight={0.5: 1.0}), TypeError,
                                r"class_weight keys must be integer class ids.*0.5"),
    "class_weight_unknown_class": (lambda r: _fit(_clf(), _x(), _labels(), class_weight={0: 1.0, 7: 2.0}),
                                   ValueError, r"class_weight names class 7.*3 classes.*0\.\.2"),
    "class_weight_negative": (lambda r: _fit(_clf(), _x(), _labels(), class_weight={0: -1.0}), ValueError,
                              r"class_weight.*class 0.*-1.0.*non-negative"),
    "class_weight_not_a_dict": (lambda r: _fit(_clf(), _x(), _labels(), class_weight=[1.0, 2.0, 3.0]), TypeError,
                                r"class_weight must be a dict"),
    "batch_size_zero": (lambda r: _fit(_reg(), _x(), _yr(), batch_size=0), ValueError,
                        r"batch_size must be a positive integer"),
    "batch_size_float": (lambda r: _fit(_reg(), _x(), _yr(), batch_size=2.5), ValueError,
                         r"batch_size must be a positive integer"),
    "steps_per_epoch_zero": (lambda r: _fit(_reg(), _x(), _yr(), steps_per_epoch=0), ValueError,
                             r"steps_per_epoch must be a positive integer"),
    "validation_steps_float": (lambda r: _fit(_reg(), _x(), _yr(), validation_split=0.2, validation_steps=1.5),
                               ValueError, r"validation_steps must be a positive integer"),
    "evaluate_steps_negative": (lambda r: _reg().evaluate(_x(), _yr(), steps=-1, verbose=0), ValueError,
                                r"steps must be a positive integer"),
    "epochs_negative": (lambda r: _fit(_reg(), _x(), _yr(), epochs=-1), ValueError,
                        r"epochs must be a non-negative integer"),
    "epochs_string": (lambda r: _fit(_reg(), _x(), _yr(), epochs="10"), ValueError,
                      r"epochs must be a non-negative integer"),
    "shuffle_string": (lambda r: _fit(_reg(), _x(), _yr(), shuffle="batch"), TypeError,
                       r"shuffle must be True or False"),
    "seed_float": (lambda r: _fit(_reg(), _x(), _yr(), seed=1.5), TypeError, r"seed must be an integer"),
    "verbose_bad": (lambda r: _fit(_reg(), _x(), _yr(), verbose=5), ValueError, r"verbose must be 0, 1, 2"),
    "validation_freq_zero": (lambda r: _fit(_reg(), _x(), _yr(), validation_split=0.2, validation_freq=0),
                             ValueError, r"validation_freq must be >= 1"),
    "empty_arrays": (lambda r: _fit(_reg(), _x()[:0], _yr()[:0]), ValueError, r"Empty input: x has 0 samples"),
    "strings_as_data": (lambda r: _fit(_reg(), np.array(["a", "b"] * 20), _yr()), TypeError,
                        r"unsupported dtype.*expected numbers"),
    "objects_as_data": (lambda r: _fit(_reg(), [object()] * N, _yr()), TypeError,
                        r"(?i)(python objects|unsupported)"),
    "x_is_none": (lambda r: _fit(_reg(), None, _yr()), ValueError, r"x is required"),
    "missing_targets": (lambda r: _fit(_reg(), _x()), ValueError, r"comes without targets: pass y"),
    "targets_keys_match_no_output": (lambda r: _fit(_two_heads(as_dict=True), _x(), {"c": _yr(), "d": _yr()}),
                                     ValueError, r"model output has no entries for outputs \['c', 'd'\]; it has "
                                                 r"\['a', 'b'\]"),
    "tuple_output_single_target": (lambda r: _fit(_two_heads(), _x(), _yr()), ValueError,
                                   r"model output has 2 entries but there are 1 outputs"),
    "tuple_output_classifier": (lambda r: _fit(_two_heads_ce(), _x(), _labels()), ValueError,
                                r"model returns a tuple of 2 outputs but y is a single array.*one tensor"),
    # -- labels and losses -------------------------------------------------------------------------------------
    "labels_out_of_range": (lambda r: _fit(_clf(), _x(), np.r_[_labels(N - 1), 5]), ValueError,
                            r"class ids in 0\.\.2.*3 classes.*label 5 at row 39"),
    "labels_negative": (lambda r: _fit(_clf(), _x(), np.r_[-1, _labels(N - 1)]), ValueError,
                        r"labels.*-1.*row 0"),
    "labels_fractional": (lambda r: _fit(_clf(), _x(), _labels() + 0.5), ValueError,
                          r"labels must be integer class ids.*0.5|1.5|2.5"),
    "binary_labels_outside_0_1": (lambda r: _fit(_binary(), _x(), _labels()), ValueError,
                                  r"binary_crossentropy.*labels in \[0, 1\].*2.*row"),
    "categorical_ce_integer_labels": (lambda r: _fit(_clf(loss="categorical_crossentropy", metrics=None), _x(),
                                                     _labels()), ValueError,
                                      r"categorical_crossentropy.*one-hot.*sparse_categorical_crossentropy"),
    "categorical_ce_integer_labels_column": (lambda r: _fit(_clf(loss="categorical_crossentropy", metrics=None),
                                                            _x(), _labels()[:, None]), ValueError,
                                             r"categorical_crossentropy.*one-hot.*\(40, 1\)"),
    "scalar_loss_with_sample_weight": (lambda r: _fit(_reg(loss=_mean_loss), _x(), _yr(), sample_weight=np.ones(N)),
                                       ValueError, r"returned a scalar.*one value per sample"),
    "float16_model_on_cpu": (lambda r: _fit(_half(), _x(), _yr()), ValueError,
                             r"float16.*CPU.*float32.*16-mixed"),
    "micro_batch_with_batchnorm": (lambda r: _fit(_bn_model(True), _x(), _yr(), micro_batch_size=2), ValueError,
                                   r"micro_batch_size would change what BatchNorm"),
    "batchnorm_one_row_part_unsynced": (lambda r: _fit(_bn_model(False), _x(18), _yr(18), batch_size=16,
                                                       shuffle=False), ValueError,
                                        r"BatchNorm.*1 row.*rank.*batch_size"),
    "stream_with_batch_size": (lambda r: _fit(_reg(), _stream(r, False), batch_size=8), ValueError,
                               r"batch_size must be None when the input is a stream"),
    # -- mistakes that differ between ranks --------------------------------------------------------------------
    "rank1_data_length": (lambda r: _fit(_reg(), _x(_on_rank1(r, N, N - 1)), _yr(_on_rank1(r, N, N - 1))),
                          ValueError, r"ranks disagree on the training rows.*ranks \[0\] vs \[1\].*" + FIX),
    "rank1_batch_size": (lambda r: _fit(_reg(), _x(), _yr(), batch_size=_on_rank1(r, 8, 16)), ValueError,
                         r"ranks disagree on batch_size.*\[0\] vs \[1\]"),
    "rank1_epochs": (lambda r: _fit(_reg(), _x(), _yr(), epochs=_on_rank1(r, 2, 3)), ValueError,
                     r"ranks disagree on epochs"),
    "rank1_validation_split": (lambda r: _fit(_reg(), _x(), _yr(), validation_split=_on_rank1(r, 0.1, 0.2)),
                               ValueError, r"ranks disagree on validation_split"),
    "rank1_class_weight": (lambda r: _fit(_clf(), _x(), _labels(), class_weight=_on_rank1(r, {0: 1.0}, {0: 2.0})),
                           ValueError, r"ranks disagree on class_weight"),
    "rank1_seed": (lambda r: _fit(_reg(), _x(), _yr(), seed=_on_rank1(r, 1, 2)), ValueError,
                   r"ranks disagree on seed"),
    "rank1_shuffle": (lambda r: _fit(_reg(), _x(), _yr(), shuffle=_on_rank1(r, True, False)), ValueError,
                      r"ranks disagree on shuffle"),
    "rank1_sample_weight": (lambda r: _fit(_reg(), _x(), _yr(), sample_weight=np.full(N, _on_rank1(r, 1.0, 2.0))),
                            ValueError, r"ranks disagree on the training data values"),
    "rank1_sample_weight_missing": (lambda r: _fit(_reg(), _x(), _yr(), sample_weight=_on_rank1(r, np.ones(N), None)),
                                    ValueError, r"ranks disagree on the training data"),
    "rank1_x_values": (lambda r: _fit(_reg(), _x(seed=_on_rank1(r, 0, 9)), _yr()), ValueError,
                       r"ranks disagree on the training data values"),
    "rank1_nan_in_x": (lambda r: _fit(_reg(), _on_rank1(r, _x(), np.where(np.arange(N)[:, None] == 7, np.nan, _x())),
                                      _yr()), ValueError, r"^(rank 1: )?x has NaN or inf.*row 7"),
    "rank1_malformed_stream": (lambda r: _fit(_clf(), _stream(r, r == 1), batch_size=None), TypeError,
                               r"rank 1: x \(a stream item's x\): unsupported type str"),
    "rank1_metrics": (lambda r: _fit(_clf(metrics=_on_rank1(r, ["accuracy"], ["accuracy", "mse"])), _x(),
                                     _labels()), ValueError, r"ranks disagree on compile\(metrics\)"),
    "rank1_loss": (lambda r: _fit(_reg(loss=_on_rank1(r, "mse", "mae")), _x(), _yr()), ValueError,
                   r"ranks disagree on compile\(loss\)"),
    "rank1_optimizer": (lambda r: _fit(_reg(optimizer=_on_rank1(r, "sgd", "adam")), _x(), _yr()), ValueError,
                        r"ranks disagree on compile\(optimizer\)"),
    "rank1_validation_data_rows": (lambda r: _fit(_reg(), _x(), _yr(), validation_data=(
        _x(_on_rank1(r, 8, 9)), _yr(_on_rank1(r, 8, 9)))), ValueError, r"ranks disagree on the validation rows"),
    "rank1_evaluate_rows": (lambda r: _reg().evaluate(_x(_on_rank1(r, 40, 48)), _yr(_on_rank1(r, 40, 48)),
                                                      verbose=0), ValueError,
                            r"ranks disagree on the rows.*evaluate"),
    "rank1_evaluate_batch_size": (lambda r: _reg().evaluate(_x(), _yr(), batch_size=_on_rank1(r, 8, 10), verbose=0),
                                  ValueError, r"ranks disagree on batch_size"),
    "rank1_predict_rows": (lambda r: _reg().predict(_x(_on_rank1(r, 40, 41)), verbose=0), ValueError,
                           r"ranks disagree on the rows.*predict"),
    "rank1_evaluate_weights": (lambda r: _weights_differ(r).evaluate(_x(), _yr(), verbose=0), ValueError,
                               r"ranks disagree on the model weights.*same weights"),
    "rank1_only_fails_a_check": (lambda r: _fit(_reg(), _x(), _yr(), batch_size=_on_rank1(r, 8, -3)), ValueError,
                                 r"^(rank 1: )?batch_size must be a positive integer"),
}


def _two_heads(as_dict=False):
    import dfit

    torch.manual_seed(0)
    model = dfit.Model(TwoHeads(as_dict))
    model.compile("sgd", "mse")
    return model


def _two_heads_ce():
    import dfit

    torch.manual_seed(0)
    model = dfit.Model(TwoHeads())
    model.compile("sgd", "sparse_categorical_crossentropy")
    return model


def _half():
    model = _reg()
    model.module.half()
    return model


def _weights_differ(rank):
    model = _reg()
    with torch.no_grad():
        model.module[0].weight.add_(float(rank))
    return model


def in_step() -> str | None:
    """None when every rank reached this point for the same mistake; else what went wrong (one tiny all-reduce)."""
    import dfit

    if dfit.distributed.world_size() == 1:
        return None
    try:
        dfit.distributed.init()
        t = dfit.distributed.all_reduce_sum(torch.ones(1, dtype=torch.float64))
        return None if int(t.item()) == dfit.distributed.world_size() else f"out of step: {t.item()}"
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def try_one(name: str, rank: int) -> tuple[str, str | None, str]:
    call = MISTAKES[name][0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(rank)
    except Exception as exc:  # noqa: BLE001 - what we measure
        return name, type(exc).__name__, "\n".join([str(exc), *getattr(exc, "__notes__", [])])
    return name, None, "SILENT: returned normally"


def try_all(names: list[str], timeout: float = 20.0) -> list[tuple[str, str | None, str]]:
    """Every named mistake on this rank, in order; then an in-step check after each one."""
    os.environ["DFIT_TIMEOUT"] = str(timeout)
    import dfit

    rank = dfit.distributed.rank()
    out = []
    for name in names:
        result = try_one(name, rank)
        problem = in_step()
        if problem is not None:
            result = (result[0], result[1], result[2] + f" [then {problem}]")
            out.append(result)
            break
        out.append(result)
    return out


def try_single(name: str, timeout: float = 15.0):
    """One mistake (a job of its own, for measuring)."""
    return try_all([name], timeout)
