"""``Model`` and ``Sequential``: Keras' compile / fit / evaluate / predict for any torch module.

``fit`` checks every argument and turns the data into adapters before any collective (so bad input
raises on every rank instead of hanging), then runs epochs through ``engine.Engine``.
"""
from __future__ import annotations

import numbers
import sys
import warnings
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from . import data as data_mod
from . import distributed as dist
from . import losses as losses_mod
from . import metrics as metrics_mod
from . import optimizers, serialization
from .callbacks import Callback, CallbackList, History
from .callbacks.progbar import is_interactive
from .engine import PRECISIONS, Engine
from . import trainer
from .data import EpochIterator
from . import preflight
from .agreement import WeightsSample, agreement
from .data import checks
from .data.sharding import batch_size_for
from .metrics import MetricSet

_NOT_COMPILED = "You must call compile() before fit/evaluate/train_on_batch/test_on_batch"

def _check_positive_int(value: Any, name: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}; got {value!r}")


def _resolve_verbose(verbose: Any) -> int:
    if verbose == "auto":  # Keras: 1; dfit: 2 where no bar can be redrawn (a log file, a Slurm batch job)
        return 1 if is_interactive(sys.stdout) else 2
    if verbose not in (0, 1, 2, True, False):
        raise ValueError(f"verbose must be 0, 1, 2 or 'auto'; got {verbose!r}")
    return int(verbose)


def _to_numpy(s: Any) -> Any:
    if isinstance(s, dict):
        return {k: _to_numpy(v) for k, v in s.items()}
    if isinstance(s, (list, tuple)):
        return [_to_numpy(v) for v in s]
    return s.numpy()


def _validate_every(validation_freq: Any) -> Callable[[int], bool]:
    """Keras' validation_freq: an int (every k epochs) or a collection of 1-based epochs."""
    if isinstance(validation_freq, numbers.Integral) and not isinstance(validation_freq, bool):
        if validation_freq < 1:
            raise ValueError(f"validation_freq must be >= 1; got {validation_freq}")
        return lambda epoch: (epoch + 1) % int(validation_freq) == 0
    if isinstance(validation_freq, Iterable) and not isinstance(validation_freq, (str, bytes)):
        chosen = {int(e) for e in validation_freq}
        return lambda epoch: (epoch + 1) in chosen
    raise ValueError(f"validation_freq must be an int or a list of epochs; got {validation_freq!r}")


class Model:
    """Wraps any ``torch.nn.Module`` with Keras' training API, run as data-parallel training."""

    def __init__(self, module: nn.Module, name: str | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"dfit.Model wraps a torch.nn.Module; got {type(module).__name__}")
        self.module = module
        self.name = name or type(module).__name__.lower()
        self.optimizer: torch.optim.Optimizer | None = None
        self.stop_training = False
        self.history: History | None = None
        self.compiled = False
        self.precision = "32"
        self.jit_compile = False
        self.sync_batchnorm = True
        self.find_unused_parameters: bool | None = None
        self._compile_args: dict[str, Any] = {}
        self._losses: dict[tuple[str, ...], losses_mod.CompiledLoss] = {}
        self._engine: Engine | None = None
        self._example: Any = None  # one input row, for summary()'s output shapes

    # -- compile ---------------------------------------------------------------------------------------
    def compile(self, optimizer: Any = "rmsprop", loss: Any = None, metrics: Any = None, loss_weights: Any = None,
                weighted_metrics: Any = None, sample_weight_mode: str | None = None, jit_compile: bool = False,
                precision: str = "32", sync_batchnorm: bool = True, find_unused_parameters: bool | None = None,
                **kwargs: Any) -> None:
        """Configure training, as Keras. Names are checked here, before any process talks to another.

        Two options of N-rank training (no effect on one process):
        ``sync_batchnorm`` (default True): BatchNorm layers normalise by the statistics of the GLOBAL batch,
        so N ranks give one rank's result; False uses each rank's own rows (faster, changes the result).
        ``find_unused_parameters`` (default None: found on the first training step): whether DDP must expect
        trainable parameters that get no gradient in a step; True/False force it.
        """
        if kwargs:
            raise TypeError(f"compile() got unexpected arguments {sorted(kwargs)}")
        if not isinstance(sync_batchnorm, bool):
            raise TypeError(f"sync_batchnorm must be True or False; got {sync_batchnorm!r}")
        if find_unused_parameters is not None and not isinstance(find_unused_parameters, bool):
            raise TypeError(f"find_unused_parameters must be None, True or False; got {find_unused_parameters!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}; got {precision!r}")
        if sample_weight_mode not in (None, "temporal"):
            raise ValueError(f"sample_weight_mode must be None or 'temporal'; got {sample_weight_mode!r}")
        optimizers.check(optimizer)
        for spec in (loss.values() if isinstance(loss, Mapping) else loss if isinstance(loss, (list, tuple))
                     else [loss]):
            if spec is not None:
                losses_mod.get(spec)
        metrics_mod.check(metrics)
        metrics_mod.check(weighted_metrics)
        if loss is None and (metrics or weighted_metrics):
            raise ValueError("metrics need predictions and targets, but compile() got no loss (the model computes "
                             "its own); give a loss, or compute the metrics in the model")
        self.optimizer = optimizers.build(optimizer, self.module.parameters())
        self._compile_args = dict(optimizer=optimizer if isinstance(optimizer, str) else None, loss=loss,
                                  metrics=metrics, loss_weights=loss_weights, weighted_metrics=weighted_metrics,
                                  sample_weight_mode=sample_weight_mode, jit_compile=jit_compile, precision=precision,
                                  sync_batchnorm=sync_batchnorm, find_unused_parameters=find_unused_parameters)
        self.precision, self.jit_compile = precision, bool(jit_compile)
        self.sync_batchnorm, self.find_unused_parameters = sync_batchnorm, find_unused_parameters
        self._losses = {}
        self._engine = None
        self._metrics_names = None
        self.compiled = True

    def compiled_loss(self, output_names: list[str]) -> losses_mod.CompiledLoss | losses_mod.ModelComputedLoss:
        """The loss of the outputs ``output_names`` (``compile(loss=None)``: the loss the module computes)."""
        if self._compile_args.get("loss") is None:
            return losses_mod.ModelComputedLoss()
        key = tuple(output_names)
        if key not in self._losses:
            self._losses[key] = losses_mod.CompiledLoss(self._compile_args["loss"],
                                                        self._compile_args["loss_weights"], output_names)
        return self._losses[key]

    def _metric_set(self, output_names: list[str]) -> MetricSet:
        args = self._compile_args
        metric_set = MetricSet(self.compiled_loss(output_names), args["metrics"], args["weighted_metrics"],
                               output_names)
        self._metrics_names = metric_set.names
        return metric_set

    @property
    def metrics_names(self) -> list[str]:
        """The log keys of the last compiled configuration used (``['loss', 'mae', ...]``, no ``val_``).

        Keras 3 returns ``['loss', 'compile_metrics']``; dfit returns the names the logs actually carry. They
        depend on the outputs (per-output prefixes), so before the first fit/evaluate after ``compile()`` only
        ``['loss']`` is known (``[]`` when not compiled)."""
        if getattr(self, "_metrics_names", None) is not None:
            return list(self._metrics_names)
        return ["loss"] if getattr(self, "compiled", False) else []

    def _float_dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def _get_engine(self) -> Engine:
        """The engine for the current job (rebuilt if the model moved to another job, e.g. into a worker)."""
        dist.init()
        engine = self._engine
        if engine is None or engine.world != dist.world_size() or engine.device != dist.device():
            self._engine = Engine(self)
        return self._engine

    def _adapt(self, x: Any, y: Any = None, sample_weight: Any = None, what: str = "x", targets: bool = True,
               loading: data_mod.LoadOptions | None = None):
        temporal = self._compile_args.get("sample_weight_mode") == "temporal"
        data = data_mod.adapt(x, y, sample_weight, float_dtype=self._float_dtype(), temporal=temporal, what=what,
                              loading=loading)
        targets = targets and self._compile_args.get("loss") is not None  # a model-computed loss needs no y
        if targets and isinstance(data, (data_mod.ArrayData, data_mod.DatasetData, data_mod.StreamData)) \
                and data.y is None:
            raise ValueError(f"{what} comes without targets: pass y (or a Dataset or stream whose items are (x, y))")
        return data

    def _remember_example(self, adapter: Any) -> None:
        if self._example is None and isinstance(adapter, data_mod.ArrayData):
            from .data.lazy import read_rows

            self._example = read_rows(adapter.x, slice(0, 1))

    # -- fit -------------------------------------------------------------------------------------------
    def fit(self, x: Any = None, y: Any = None, batch_size: int | None = None, epochs: int = 10,
            verbose: Any = "auto", callbacks: list[Callback] | None = None, view_metrics: Any = "auto",
            validation_split: float = 0.0, validation_data: Any = None, shuffle: bool = True,
            class_weight: Mapping[int, float] | None = None, sample_weight: Any = None, initial_epoch: int = 0,
            steps_per_epoch: int | None = None, validation_steps: int | None = None,
            validation_batch_size: int | None = None, validation_freq: Any = 1, workers: int = 0,
            use_multiprocessing: bool = False, max_queue_size: int = 10, seed: int | None = None,
            micro_batch_size: int | None = None, per_chunk_batchnorm: bool = False) -> History:
        """Train for ``epochs`` (the final epoch index), as Keras' fit, on every rank of the job.

        ``micro_batch_size=M``: a rank runs at most M rows through the model at once (gradients accumulate over
        the chunks of its part of each global batch); it never changes the result. A BatchNorm layer would see
        chunks instead of the batch, so it is refused unless ``per_chunk_batchnorm=True`` (which changes the
        result)."""
        # 1. every check, before any collective; then one collective: every rank raises, or all agree ---------
        with agreement("fit", preflight.FIT_FACTS) as facts:
            if not self.compiled:
                raise RuntimeError(_NOT_COMPILED)
            _check_positive_int(batch_size, "batch_size")
            _check_positive_int(validation_batch_size, "validation_batch_size")
            _check_positive_int(steps_per_epoch, "steps_per_epoch")
            _check_positive_int(validation_steps, "validation_steps")
            _check_positive_int(micro_batch_size, "micro_batch_size")
            if micro_batch_size is not None and not per_chunk_batchnorm:
                _refuse_chunked_batchnorm(self.module)
            for value, name in ((epochs, "epochs"), (initial_epoch, "initial_epoch")):
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                    raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
            if not isinstance(validation_split, numbers.Real) or not 0.0 <= validation_split < 1.0:
                raise ValueError(f"validation_split must be a float in [0, 1); got {validation_split!r}")
            if not isinstance(shuffle, (bool, np.bool_)):
                raise TypeError(f"shuffle must be True or False; got {shuffle!r}")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
                raise TypeError(f"seed must be an integer or None; got {seed!r}")
            data_mod.check_loading_arguments(workers, use_multiprocessing, max_queue_size)
            loading = data_mod.LoadOptions.from_fit(int(workers), int(max_queue_size))
            verbose = _resolve_verbose(verbose)
            should_validate = _validate_every(validation_freq)
            checks.check_half_on_cpu(self.module, dist._choose_backend() == "nccl")
            train = self._adapt(x, y, sample_weight, loading=loading)
            val = None
            if validation_data is not None:
                val = self._adapt_validation(validation_data, loading)
            elif validation_split:
                train, val = train.split(float(validation_split))
            classes = preflight.check_data(self, train, val)
            checks.check_class_weight(class_weight, classes)
            if class_weight is not None and isinstance(train, data_mod.StreamData):
                train = train.with_class_weight(class_weight)   # applied to each batch as it is read
            elif class_weight is not None:
                cw = data_mod.class_weight_tensor(train.y, class_weight, self._float_dtype())
                if train.sample_weight is not None:
                    w = data_mod.materialize(train.sample_weight)
                    cw = cw.reshape(cw.shape + (1,) * (w.dim() - cw.dim())) * w
                train = train.with_weights(cw)
            plan_batch_size = _batch_size(train, batch_size, steps_per_epoch)
            plan_val_batch_size = None if val is None else _batch_size(val, validation_batch_size or batch_size,
                                                                       validation_steps)
            # (a DataLoader with drop_last may leave no batch: an error here)
            if not isinstance(train, data_mod.StreamData):
                train.steps_per_pass(plan_batch_size)
                checks.check_batchnorm_parts(self.module, self.sync_batchnorm, train.n, plan_batch_size,
                                             dist.world_size())
            if val is not None and not isinstance(val, data_mod.StreamData):
                val.steps_per_pass(plan_val_batch_size)
            for name, value in (("batch_size", batch_size), ("epochs", epochs), ("initial_epoch", initial_epoch),
                                ("steps_per_epoch", steps_per_epoch), ("validation_steps", validation_steps),
                                ("validation_batch_size", validation_batch_size),
                                ("validation_split", validation_split), ("validation_freq", validation_freq),
                                ("shuffle", bool(shuffle)), ("seed", seed), ("class_weight", class_weight),
                                ("micro_batch_size", micro_batch_size), ("per_chunk_batchnorm", per_chunk_batchnorm)):
                facts.add(name, value)
            preflight.compile_facts(facts, self)
            preflight.data_facts(facts, train, "the training")
            if val is not None:
                preflight.data_facts(facts, val, "the validation")
        if initial_epoch >= epochs and dist.is_chief():
            warnings.warn(f"fit(initial_epoch={initial_epoch}, epochs={epochs}) trains nothing: epochs is the index of "
                          "the last epoch, not a number of epochs to add (to train k more epochs pass "
                          "epochs=initial_epoch + k)", UserWarning, stacklevel=2)
        output_names = preflight.output_names(train.y)
        self._remember_example(train)
        plan = trainer.FitPlan(
            epochs=epochs, initial_epoch=initial_epoch, verbose=verbose, callbacks=list(callbacks or []),
            view_metrics=view_metrics, batch_size=plan_batch_size, steps_per_epoch=steps_per_epoch,
            shuffle=bool(shuffle), seed=seed, val_batch_size=plan_val_batch_size,
            validation_steps=validation_steps, should_validate=should_validate, output_names=output_names,
            micro_batch_size=micro_batch_size)
        return trainer.run_fit(self, train, val, plan)

    def _adapt_validation(self, validation_data: Any, loading: data_mod.LoadOptions | None = None):
        if isinstance(validation_data, (torch.utils.data.Dataset, torch.utils.data.DataLoader,
                                        data_mod.Columns)) or data_mod.is_stream(validation_data):
            return self._adapt(validation_data, what="validation_data", loading=loading)
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
            raise ValueError("validation_data must be a tuple (x_val, y_val) or (x_val, y_val, val_sample_weight)")
        return self._adapt(*validation_data, what="validation_data x")

    # -- evaluate / predict ----------------------------------------------------------------------------
    def evaluate(self, x: Any = None, y: Any = None, batch_size: int | None = None, verbose: Any = "auto",
                 sample_weight: Any = None, steps: int | None = None, callbacks: list[Callback] | None = None,
                 return_dict: bool = False, workers: int = 0, use_multiprocessing: bool = False,
                 max_queue_size: int = 10) -> Any:
        """Loss (and metrics) over all samples of all ranks: a scalar, ``[loss, *metrics]`` or a dict.

        ``workers``, ``use_multiprocessing``, ``max_queue_size``: as in ``fit`` (loading a map-style Dataset)."""
        with agreement("evaluate", preflight.EVALUATE_FACTS) as facts:
            if not self.compiled:
                raise RuntimeError(_NOT_COMPILED)
            _check_positive_int(batch_size, "batch_size")
            _check_positive_int(steps, "steps")
            data_mod.check_loading_arguments(workers, use_multiprocessing, max_queue_size)
            verbose = _resolve_verbose(verbose)
            data = self._adapt(x, y, sample_weight, loading=data_mod.LoadOptions.from_fit(int(workers),
                                                                                           int(max_queue_size)))
            preflight.check_data(self, data, None)
            facts.add("batch_size", batch_size)
            facts.add("steps", steps)
            preflight.compile_facts(facts, self)
            preflight.data_facts(facts, data, "the")
            facts.add("the model weights", WeightsSample(self.module),
                      shown="other weights (load the same weights on every rank, e.g. seed the model's construction)")
        self._remember_example(data)
        logs = trainer.run_evaluate(self, data, _batch_size(data, batch_size, steps), steps, verbose, callbacks,
                                    preflight.output_names(data.y))
        return _keras_result(logs, return_dict)

    def predict(self, x: Any, batch_size: int | None = None, verbose: Any = 0, steps: int | None = None,
                callbacks: list[Callback] | None = None, workers: int = 0, use_multiprocessing: bool = False,
                max_queue_size: int = 10) -> Any:
        """Predictions for every input row exactly once, in input order, returned on every rank (numpy).

        ``workers``, ``use_multiprocessing``, ``max_queue_size``: as in ``fit`` (loading a map-style Dataset).
        A user's DataLoader with ``drop_last=True`` leaves out its partial last batch here too."""
        with agreement("predict", preflight.PREDICT_FACTS) as facts:
            _check_positive_int(batch_size, "batch_size")
            _check_positive_int(steps, "steps")
            data_mod.check_loading_arguments(workers, use_multiprocessing, max_queue_size)
            verbose = _resolve_verbose(verbose)
            data = self._adapt(x, targets=False, loading=data_mod.LoadOptions.from_fit(int(workers),
                                                                                        int(max_queue_size)))
            if isinstance(data, data_mod.ArrayData):
                checks.check_finite(data.x, "x")
            facts.add("batch_size", batch_size)
            facts.add("steps", steps)
            preflight.data_facts(facts, data, "the")
            facts.add("the model weights", WeightsSample(self.module),
                      shown="other weights (load the same weights on every rank, e.g. seed the model's construction)")
        self._remember_example(data)
        return _to_numpy(trainer.run_predict(self, data, _batch_size(data, batch_size, steps), steps, verbose,
                                             callbacks))

    # -- single batches --------------------------------------------------------------------------------
    def train_on_batch(self, x: Any, y: Any = None, sample_weight: Any = None,
                       class_weight: Mapping[int, float] | None = None, return_dict: bool = False) -> Any:
        """One optimizer step on one GLOBAL batch (split across ranks); returns its loss and metrics."""
        if not self.compiled:
            raise RuntimeError(_NOT_COMPILED)
        data = self._adapt(x, y, sample_weight)
        if class_weight is not None:
            cw = data_mod.class_weight_tensor(data.y, class_weight, self._float_dtype())
            w = data.sample_weight
            data = data.with_weights(cw if w is None else cw * data_mod.materialize(w))
        names = preflight.output_names(data.y)
        tracker = self._metric_set(names)
        engine = self._get_engine()
        batches = data.epoch(0, data.n, None, False, 0, dist.rank(), dist.world_size())
        try:
            logs = engine.train_epoch(batches, tracker, CallbackList([], self, {}), names)
        finally:
            trainer.close(data)
        return _keras_result(logs, return_dict)

    def test_on_batch(self, x: Any, y: Any = None, sample_weight: Any = None, return_dict: bool = False) -> Any:
        if not self.compiled:
            raise RuntimeError(_NOT_COMPILED)
        data = self._adapt(x, y, sample_weight)
        names = preflight.output_names(data.y)
        self._get_engine()
        epochs = EpochIterator(data, data.n, None, rank=dist.rank(), world=dist.world_size())
        logs = trainer.run_test(self, epochs, self._metric_set(names), CallbackList([], self, {}), names)
        return _keras_result(logs, return_dict)

    def predict_on_batch(self, x: Any) -> Any:
        data = self._adapt(x, targets=False)
        self._remember_example(data)
        return _to_numpy(trainer.run_predict(self, data, data.n, None, 0, None))

    # -- deprecated Keras aliases ----------------------------------------------------------------------
    # Keras 2's signatures (positional order and defaults), forwarded by keyword.
    def fit_generator(self, generator: Any, steps_per_epoch: int | None = None, epochs: int = 1, verbose: Any = 1,
                      callbacks: list[Callback] | None = None, validation_data: Any = None,
                      validation_steps: int | None = None, validation_freq: Any = 1,
                      class_weight: Mapping[int, float] | None = None, max_queue_size: int = 10, workers: int = 1,
                      use_multiprocessing: bool = False, shuffle: bool = True, initial_epoch: int = 0) -> History:
        warnings.warn("fit_generator is deprecated; use fit, which accepts generators", DeprecationWarning, 2)
        return self.fit(generator, steps_per_epoch=steps_per_epoch, epochs=epochs, verbose=verbose,
                        callbacks=callbacks, validation_data=validation_data, validation_steps=validation_steps,
                        validation_freq=validation_freq, class_weight=class_weight, max_queue_size=max_queue_size,
                        workers=workers, use_multiprocessing=use_multiprocessing, shuffle=shuffle,
                        initial_epoch=initial_epoch)

    def evaluate_generator(self, generator: Any, steps: int | None = None, callbacks: list[Callback] | None = None,
                           max_queue_size: int = 10, workers: int = 1, use_multiprocessing: bool = False,
                           verbose: Any = 0) -> Any:
        warnings.warn("evaluate_generator is deprecated; use evaluate", DeprecationWarning, 2)
        return self.evaluate(generator, steps=steps, callbacks=callbacks, verbose=verbose)

    def predict_generator(self, generator: Any, steps: int | None = None, callbacks: list[Callback] | None = None,
                          max_queue_size: int = 10, workers: int = 1, use_multiprocessing: bool = False,
                          verbose: Any = 0) -> Any:
        warnings.warn("predict_generator is deprecated; use predict", DeprecationWarning, 2)
        return self.predict(generator, steps=steps, callbacks=callbacks, verbose=verbose)

    def predict_proba(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        warnings.warn("predict_proba is deprecated; use predict", DeprecationWarning, 2)
        return self.predict(x, *args, **kwargs)

    # -- layers, config, saving ------------------------------------------------------------------------
    def summary(self, print_fn: Callable[[str], Any] | None = None) -> None:
        """Print the layers, their output shapes (once the model has seen data) and parameter counts."""
        from .summary import summary_text

        if dist.is_chief() or print_fn is not None:
            (print_fn or print)(summary_text(self.name, self.module, self._example))

    def count_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def get_layer(self, name: str | None = None, index: int | None = None) -> nn.Module:
        """A child module by name or by index (Keras' get_layer)."""
        children = list(self.module.named_children())
        if (name is None) == (index is None):
            raise ValueError("get_layer needs exactly one of name= or index=")
        if index is not None:
            if not -len(children) <= index < len(children):
                raise ValueError(f"index {index} is out of range: the model has {len(children)} layers")
            return children[index][1]
        for child_name, child in children:
            if child_name == name:
                return child
        raise ValueError(f"No such layer: {name!r}. Layers: {[n for n, _ in children]}")

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.module.children())

    def get_config(self) -> dict[str, Any]:
        return serialization.model_config(self)

    def get_weights(self) -> list[np.ndarray]:
        return [t.detach().cpu().numpy() for t in self.module.state_dict().values()]

    def set_weights(self, weights: list[Any]) -> None:
        state = self.module.state_dict()
        if len(weights) != len(state):
            raise ValueError(f"expected {len(state)} arrays, got {len(weights)}")
        self.module.load_state_dict({k: torch.as_tensor(np.asarray(w)) for k, w in zip(state, weights)})

    def save(self, path: str) -> None:
        serialization.save_model(self, path)

    def save_weights(self, path: str) -> None:
        serialization.save_weights(self, path)

    def load_weights(self, path: str) -> None:
        serialization.load_weights(self, path)


def _refuse_chunked_batchnorm(module: nn.Module) -> None:
    """micro_batch_size must not change the result: a layer that normalises over its batch would."""
    layers = [name or type(module).__name__ for name, m in module.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if layers:
        raise ValueError(
            f"micro_batch_size would change what BatchNorm layer(s) {layers} compute (they would normalise each "
            "chunk instead of the batch); leave micro_batch_size=None, or pass per_chunk_batchnorm=True to accept "
            "per-chunk statistics (the result then depends on micro_batch_size)")


def _keras_result(logs: dict[str, float], return_dict: bool) -> Any:
    if return_dict:
        return dict(logs)
    values = list(logs.values())
    return values[0] if len(values) == 1 else values


def _batch_size(data: Any, batch_size: int | None, steps: int | None) -> int | None:
    """Keras' batch size for ``data`` (see ``batch_size_for``); a stream's items are its batches."""
    if isinstance(data, data_mod.StreamData):
        if batch_size is not None:
            raise ValueError("batch_size must be None when the input is a stream: each item of the stream is a batch")
        return None
    # a user's DataLoader brings its batch size (the global batch) unless fit's says otherwise
    return batch_size_for(data.n, batch_size or getattr(data, "batch_size", None), steps)


class Sequential(Model):
    """A linear stack of layers (Keras' Sequential) over ``nn.Sequential``, layers named like Keras."""

    def __init__(self, layers: Iterable[nn.Module] | None = None, name: str | None = None):
        super().__init__(nn.Sequential(), name=name or "sequential")
        for layer in layers or []:
            self.add(layer)

    def add(self, layer: nn.Module, name: str | None = None) -> None:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"Sequential layers must be torch.nn.Module instances; got {type(layer).__name__}")
        existing = dict(self.module.named_children())
        if name is None:
            base, k = type(layer).__name__.lower(), 0
            name = base
            while name in existing:
                k += 1
                name = f"{base}_{k}"
        elif name in existing:
            raise ValueError(f"a layer named {name!r} already exists")
        self.module.add_module(name, layer)

    def pop_layer(self) -> nn.Module:
        """Remove and return the last layer."""
        names = [n for n, _ in self.module.named_children()]
        if not names:
            raise ValueError("There are no layers in the model")
        layer = getattr(self.module, names[-1])
        delattr(self.module, names[-1])
        return layer

    pop = pop_layer

    @classmethod
    def from_config(cls, config: Mapping[str, Any], custom_objects: Mapping[str, type] | None = None) -> "Sequential":
        model = cls(name=config.get("name"))
        for entry in config["layers"]:
            model.add(serialization.layer_from_config(entry, custom_objects), name=entry.get("name"))
        return model


def load_model(path: str, module: nn.Module | None = None, custom_objects: Mapping[str, type] | None = None,
               compile: bool = True) -> Model:  # noqa: A002 - Keras' argument name
    """A model saved by ``Model.save``; a non-Sequential model needs its (untrained) ``module`` instance."""
    return serialization.load_model(path, module=module, custom_objects=custom_objects, compile=compile,
                                    model_classes={"Model": Model, "Sequential": Sequential})

