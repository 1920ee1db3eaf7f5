"""``dfit.multi_gpu_model``: run ``fit``/``evaluate``/``predict`` of a model on N local worker processes.

The calling process (a script or a Jupyter kernel) starts ``gpus`` workers with torch's own
``torch.multiprocessing.start_processes``, hosts their rendezvous store, waits, and takes back what rank 0
returns: the history and the trained weights (loaded into the caller's model), evaluation results or
predictions. Workers see ``DFIT_SPAWN=1``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``, so inside them ``dfit.distributed`` reports ``environment() == "spawn"``.

Start method: ``fork`` where the platform has it and CUDA is not initialised in the caller. Forked
workers inherit the model and the in-memory data copy-on-write (nothing is pickled or copied per worker)
and classes defined in a notebook just work. With ``spawn``/``forkserver`` the model and arguments are
pickled: numpy arrays and tensors are first moved to shared memory (one copy, shared by all workers), and a
model whose class lives in an interactive ``__main__`` (a notebook) is refused with a clear error.
If one worker fails, the others are ended and the caller gets a ``RuntimeError`` naming the rank, with the
worker's traceback.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import shutil
import sys
import tempfile
from typing import Any, Sequence

import numpy as np
import torch

from . import distributed as dd
from .callbacks.base import Callback

__all__ = ["multi_gpu_model", "ParallelModel"]

_log = logging.getLogger("dfit.spawn")

_WORKER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
               "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "OMPI_COMM_WORLD_RANK",
               "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_RANK",
               "MV2_COMM_WORLD_SIZE", "PALS_RANKID", "SLURM_STEP_ID")


class SpawnError(RuntimeError):
    """A worker of multi_gpu_model failed; the message names its rank and carries its traceback."""


def _default_start_method() -> str:
    import multiprocessing as mp

    if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _check_start_method(method: str, model: Any) -> bytes | None:
    """Refuse what cannot work, with what to do instead; for spawn/forkserver, the pickled model."""
    import multiprocessing as mp

    if method not in mp.get_all_start_methods():
        raise ValueError(f"start_method {method!r} is not available here; choose one of "
                         f"{mp.get_all_start_methods()}")
    if method == "fork":
        if torch.cuda.is_initialized():
            raise RuntimeError(
                "multi_gpu_model: CUDA is already initialised in this process, and forked workers cannot use "
                "it. Keep the model on the CPU before calling multi_gpu_model (each worker moves it to its own "
                "GPU), or restart the kernel; or pass start_method='spawn' with a model class importable "
                "from a .py module.")
        return None
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    interactive = main is None or not main_file or not os.path.isfile(main_file)  # notebook, -c, stdin
    classes = {type(model), type(model.module)} | {type(m) for m in model.module.modules()}
    local = sorted(c.__qualname__ for c in classes if c.__module__ == "__main__")
    if local and interactive:
        raise RuntimeError(
            f"multi_gpu_model: start_method={method!r} must pickle the model into new processes, but "
            f"{', '.join(local)} {'is' if len(local) == 1 else 'are'} defined in this notebook/interactive "
            "session (__main__), which a new process cannot import. Use start_method='fork' (the default on "
            "Linux and macOS), or move the class definitions into a .py module and import them.")
    try:
        return pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise RuntimeError(
            f"multi_gpu_model: start_method={method!r} must pickle the model, and that failed "
            f"({type(exc).__name__}: {exc}). Use start_method='fork', or make the model picklable "
            "(no lambdas or local classes in the module, the loss or the metrics).") from exc


_DATA_ARGS = ("x", "y", "sample_weight", "validation_data")


def _prepare(obj: Any, dtype: torch.dtype, share: bool) -> Any:
    """Arrays inside ``obj`` made ready for the workers, once, in the caller.

    Floating arrays are cast to the model's dtype here (``fit`` would cast them anyway), so the workers do
    not each make their own copy; with ``share`` (spawn/forkserver) arrays are moved to shared memory, one
    copy mapped by every worker. Arrays already right are left untouched: forked workers read them in place.
    Arrays that live in files (memmaps, file-backed tensors, h5py datasets) become ``data.DiskArray`` leaves, which
    pickle as where their data lives: every worker opens the same file, nothing is copied.
    """
    from .data.lazy import in_place

    disk = in_place(obj) if not isinstance(obj, (tuple, list, dict)) else None
    if disk is not None:
        return disk
    if hasattr(obj, "to_numpy") and not isinstance(obj, (np.ndarray, torch.Tensor)):  # pandas
        obj = obj.to_numpy()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf" or obj.dtype == np.float16:
            return obj
        needs_cast = obj.dtype.kind == "f" and torch.from_numpy(obj[:0]).dtype != dtype
        if not (share or needs_cast or not obj.flags.c_contiguous):
            return obj
        t = torch.from_numpy(np.ascontiguousarray(obj))
        return _prepare(t.to(dtype) if needs_cast else t, dtype, share)
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            return obj
        t = obj.detach()
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        t = t.contiguous()
        return t.share_memory_() if share else t
    if isinstance(obj, tuple):
        return tuple(_prepare(o, dtype, share) for o in obj)
    if isinstance(obj, list):
        return [_prepare(o, dtype, share) for o in obj]
    if isinstance(obj, dict):
        return {k: _prepare(v, dtype, share) for k, v in obj.items()}
    return obj


def _prepare_call(model: Any, method: str, args: tuple, kwargs: dict, share: bool) -> tuple[tuple, dict]:
    """The call's data arguments prepared by ``_prepare``; everything else as given."""
    import inspect

    try:
        bound = inspect.signature(getattr(model, method)).bind(*args, **kwargs)
    except TypeError:
        return args, kwargs  # let the real call raise its own clear error, in the worker
    dtype = model._float_dtype()
    for name in _DATA_ARGS:
        if name in bound.arguments:
            bound.arguments[name] = _prepare(bound.arguments[name], dtype, share)
    return bound.args, bound.kwargs


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class _SendEpochLogs(Callback):
    """In a worker (rank 0): put each epoch's logs on the caller's queue, for its live plot.

    ``Queue.put`` hands the item to a feeder thread and returns at once: the worker never waits for the caller.
    """

    def __init__(self, queue: Any) -> None:
        super().__init__()
        self.queue = queue

    def on_epoch_end(self, epoch, logs=None):
        if dd.is_chief():
            self.queue.put((int(epoch), {k: float(v) for k, v in (logs or {}).items()}))


def _with_callback(model: Any, method: str, args: tuple, kwargs: dict, callback: Any) -> tuple[tuple, dict]:
    """The call's arguments with ``callback`` appended to its ``callbacks``."""
    import inspect

    bound = inspect.signature(getattr(model, method)).bind(*args, **kwargs)
    bound.arguments["callbacks"] = list(bound.arguments.get("callbacks") or []) + [callback]
    return bound.args, bound.kwargs


def _live_plot_wanted(model: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``fit(*args, **kwargs)`` asks for the live plot (drawn here, in the caller, from the workers' logs)."""
    import inspect

    from .model import _resolve_verbose
    from .plotting import wants_live_plot

    try:
        bound = inspect.signature(model.fit).bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        return wants_live_plot(a["view_metrics"], int(a["epochs"]) - int(a["initial_epoch"]),
                               _resolve_verbose(a["verbose"]))
    except (TypeError, ValueError, KeyError):
        return False  # the worker's fit raises the clear error


def _worker(local_rank: int, world: int, port: int, model: Any, method: str, args: tuple, kwargs: dict,
            result_dir: str, cuda_ids: Sequence[int] | None, epoch_logs: Any = None) -> None:
    """One worker: join the group through the caller's store, run the method, rank 0 writes the result.

    ``epoch_logs``: a queue on which rank 0 puts each epoch's logs during ``fit`` (for the caller's live plot)."""
    if isinstance(model, bytes):
        # spawn/forkserver: the model comes by value (torch's multiprocessing pickler would put its
        # parameters in shared memory, and every worker would then train the same tensors).
        model = pickle.loads(model)
    for name in _WORKER_ENV:
        os.environ.pop(name, None)
    os.environ.update({"DFIT_SPAWN": "1", "RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
                       "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), dd.EXTERNAL_STORE_ENV: "1"})
    if cuda_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in cuda_ids)
    if not torch.cuda.is_available() or dd._choose_backend() != "nccl":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # A forked worker inherits the caller's single-process state: forget it and join the group afresh.
    dd.shutdown()
    dd.init()
    if epoch_logs is not None and dd.is_chief():
        args, kwargs = _with_callback(model, method, args, kwargs, _SendEpochLogs(epoch_logs))
    result = getattr(model, method)(*args, **kwargs)
    if dd.is_chief():
        payload: dict[str, Any] = {"result": None}
        if method == "fit":
            payload["history"] = {"history": result.history, "epoch": result.epoch,
                                  "params": dict(getattr(result, "params", {}) or {})}
            payload["state_dict"] = _cpu(model.module.state_dict())
            if getattr(model, "optimizer", None) is not None:
                payload["optimizer"] = _cpu(model.optimizer.state_dict())
            payload["stop_training"] = bool(getattr(model, "stop_training", False))
        else:
            payload["result"] = result
        tmp = os.path.join(result_dir, "result.pkl.tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(payload, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, os.path.join(result_dir, "result.pkl"))
    dd.shutdown()


def _draw_epochs(epoch_logs: Any, live: Any) -> None:
    """Draw every epoch's logs that rank 0 has sent since the last call (never waits)."""
    import queue

    while True:
        try:
            epoch, logs = epoch_logs.get_nowait()
        except queue.Empty:
            return
        if getattr(live, "failed", False):
            continue  # keep reading, so that rank 0 never waits on a full pipe
        try:
            live.add(epoch, logs)
        except Exception as exc:  # noqa: BLE001 - a plot that cannot be drawn must not stop training
            live.failed = True
            _log.warning("multi_gpu_model: the live plot could not be drawn (%s: %s); training goes on",
                         type(exc).__name__, exc)


class ParallelModel:
    """What ``multi_gpu_model`` returns: ``fit``/``evaluate``/``predict`` on worker processes.

    The weights live in the wrapped (template) model, as in Keras: after ``fit`` the caller's model holds
    the trained weights and optimizer state. Any other attribute is the wrapped model's.
    """

    def __init__(self, model: Any, gpus: int | Sequence[int] | None = None, start_method: str | None = None,
                 timeout: float | None = None):
        if not hasattr(model, "module") or not hasattr(model, "fit"):
            raise TypeError(f"multi_gpu_model expects a dfit.Model; got {type(model).__name__}")
        self.model = model
        self.cuda_ids: list[int] | None = None
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus is None:
            # All visible GPUs; with none, two CPU processes on gloo (say how many you want with gpus=N).
            self.nprocs = visible or 2
            if not visible:
                _log.info("multi_gpu_model: no GPU visible; using 2 CPU processes on gloo")
        elif isinstance(gpus, (list, tuple, range)):
            self.cuda_ids = [int(g) for g in gpus]
            if not self.cuda_ids or len(set(self.cuda_ids)) != len(self.cuda_ids):
                raise ValueError(f"gpus must list distinct GPU ids; got {list(gpus)}")
            if visible and max(self.cuda_ids) >= visible:
                raise ValueError(f"gpus={list(gpus)} but only {visible} GPU(s) are visible")
            self.nprocs = len(self.cuda_ids)
            if not visible:
                self.cuda_ids = None  # no GPU: the list only says how many CPU processes
        elif isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise ValueError(f"gpus must be a positive integer or a list of GPU ids; got {gpus!r}")
        else:
            if visible and gpus > visible:
                raise ValueError(f"gpus={gpus} but only {visible} GPU(s) are visible")
            self.nprocs = gpus
        if self.cuda_ids is not None and "CUDA_VISIBLE_DEVICES" in os.environ:
            parent = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
            self.cuda_ids = [parent[i] for i in self.cuda_ids]  # type: ignore[misc]
        self.start_method = start_method or _default_start_method()
        self.timeout = timeout

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["model"], name)

    def __repr__(self) -> str:
        return f"ParallelModel({self.model!r}, processes={self.nprocs}, start_method={self.start_method!r})"

    # -- the three parallel methods --------------------------------------------------------------------
    def fit(self, *args: Any, **kwargs: Any):
        """``Model.fit`` on the workers; returns rank 0's History and loads the trained weights here."""
        payload = self._run("fit", args, kwargs)
        model = self.model
        model.module.load_state_dict(payload["state_dict"])
        if payload.get("optimizer") is not None and getattr(model, "optimizer", None) is not None:
            model.optimizer.load_state_dict(payload["optimizer"])
        from .callbacks import History

        history = History()
        history.history = payload["history"]["history"]
        history.epoch = payload["history"]["epoch"]
        history.params = payload["history"]["params"]
        history.set_model(model)
        model.history = history
        model.stop_training = payload.get("stop_training", False)
        return history

    def evaluate(self, *args: Any, **kwargs: Any):
        """``Model.evaluate`` on the workers (exact over all samples); returns its result here."""
        return self._run("evaluate", args, kwargs)["result"]

    def predict(self, *args: Any, **kwargs: Any):
        """``Model.predict`` on the workers; returns every row's prediction, in input order, here."""
        return self._run("predict", args, kwargs)["result"]

    # -- process management ----------------------------------------------------------------------------
    def _run(self, method: str, args: tuple, kwargs: dict) -> dict:
        import torch.distributed as tdist
        import torch.multiprocessing as tmp

        model_blob = _check_start_method(self.start_method, self.model)
        args, kwargs = _prepare_call(self.model, method, args, kwargs, share=self.start_method != "fork")
        timeout = dd._timeout(self.timeout) or datetime.timedelta(minutes=30)
        # The caller hosts the rendezvous store on a port the OS picks: no port race, no fixed port.
        store = tdist.TCPStore("127.0.0.1", 0, self.nprocs, is_master=True, timeout=timeout,
                               wait_for_workers=False)
        result_dir = tempfile.mkdtemp(prefix="dfit-spawn-")
        live = None
        epoch_logs = None
        if method == "fit" and _live_plot_wanted(self.model, args, kwargs):
            from .plotting import LivePlot

            live, epoch_logs = LivePlot(), tmp.get_context(self.start_method).Queue()
        try:
            model = self.model if model_blob is None else model_blob
            context = tmp.start_processes(
                _worker, args=(self.nprocs, store.port, model, method, args, kwargs, result_dir,
                               self.cuda_ids, epoch_logs),
                nprocs=self.nprocs, join=False, daemon=False, start_method=self.start_method)
            try:
                while not context.join(timeout=None if live is None else 0.25):
                    if live is not None:
                        _draw_epochs(epoch_logs, live)
                if live is not None:
                    _draw_epochs(epoch_logs, live)
            except tmp.ProcessRaisedException as exc:
                raise SpawnError(f"multi_gpu_model.{method}: rank {exc.error_index} of {self.nprocs} failed "
                                 f"(the other workers were ended):\n{exc}") from None
            except tmp.ProcessExitedException as exc:
                raise SpawnError(f"multi_gpu_model.{method}: rank {exc.error_index} of {self.nprocs} exited "
                                 f"with code {exc.exit_code} (the other workers were ended): {exc}") from None
            path = os.path.join(result_dir, "result.pkl")
            if not os.path.exists(path):
                raise SpawnError(f"multi_gpu_model.{method}: rank 0 returned no result")
            with open(path, "rb") as fh:  # written a moment ago by our own worker, in a private directory
                return pickle.load(fh)
        finally:
            shutil.rmtree(result_dir, ignore_errors=True)
            del store


def multi_gpu_model(model: Any, gpus: int | Sequence[int] | None = None, start_method: str | None = None,
                    timeout: float | None = None) -> ParallelModel:
    """A model whose ``fit``/``evaluate``/``predict`` run on ``gpus`` worker processes (DDP).

    ``gpus``: a number of processes, or a list of GPU ids; by default every visible GPU, and two CPU
    processes on gloo when there is none. Results (history, trained weights, metrics, predictions) come back
    to this process; the weights are loaded into ``model``. ``start_method``: ``fork`` by default (shares
    in-memory data copy-on-write, works with classes defined in a notebook); ``spawn``/``forkserver``
    need a picklable model whose classes are importable. ``timeout``: seconds for each collective.
    """
    return ParallelModel(model, gpus=gpus, start_method=start_method, timeout=timeout)
