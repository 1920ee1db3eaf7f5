"""What a ``BackupAndRestore`` backup holds of a running ``fit``, and how every rank puts it back.

A backup is one ``torch.save`` file (loaded with ``weights_only=True``: no code is unpickled) holding:
the module's state, the optimizer's state (its learning rates and step counters included), the gradient scaler,
every callback's ``state_dict()``, ``History`` so far, ``model.stop_training``, the position (the epoch, the steps
of it done, whether its end — validation, ``on_epoch_end`` — is still to run), the partial epoch's metric
states summed over all ranks, the stream position (a stream's pass and consumed items), the fit seed, every
rank's random-number generators (torch, CUDA, numpy, Python), and a fingerprint of the model and the ``fit``
arguments that decide the batches.

Nothing in it depends on the world size: the batches are a function of (seed, epoch, step) and the world
size only splits each global batch; the summed metric states are put back on rank 0 (the other ranks start
the epoch at zero), so the epoch-end all-reduce gives the uninterrupted value on any number of ranks.
Random-number generators: on the same world size each rank gets its own states back; on another world size
each rank ``r`` seeds torch, numpy and Python from ``SeedSequence([seed, epoch, step, r])`` (the rule is
documented in docs/reference.md; a model without randomness is exact either way).
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from . import distributed as dist

if TYPE_CHECKING:
    from .callbacks import Callback, History
    from .data import EpochIterator
    from .engine import Engine
    from .metrics import MetricSet
    from .model import Model

FORMAT = "dfit.backup/1"


@dataclass
class Position:
    """Where training continues: ``step`` steps of ``epoch`` are done; ``in_epoch``: its end is still to run."""

    epoch: int
    step: int
    in_epoch: bool


def cpu_copy(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor copied to the CPU and numpy values as tensors / Python numbers, so that
    it can be written later (off the training thread) and loaded with ``weights_only=True``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(cpu_copy(v) for v in obj)
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# -- random-number generators ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's generators: torch (CPU and CUDA), numpy's global one, Python's ``random``."""
    np_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(), "numpy": cpu_copy(np_state), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = dict(state["numpy"])
    np_state["state"] = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def derived_rng_seed(seed: int, position: Position, rank: int) -> int:
    """The documented rule for another world size: rank ``r``'s generators start from this seed."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, position.epoch, position.step, rank])
               .generate_state(1)[0])


def reseed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# -- the fit state ------------------------------------------------------------------------------------------------
class FitState:
    """The parts of one running ``fit`` a backup holds; ``snapshot`` takes them, ``restore_*`` put them back."""

    def __init__(self, model: "Model", engine: "Engine", train: Any, epochs: "EpochIterator", seed: int,
                 history: "History", callbacks: list["Callback"], train_metrics: "MetricSet",
                 fit_args: Mapping[str, Any]):
        self.model, self.engine, self.train, self.epochs, self.seed = model, engine, train, epochs, seed
        self.history, self.callbacks, self.train_metrics = history, callbacks, train_metrics
        self.fit_args = dict(fit_args)
        self.global_step = 0

    # -- identity ------------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What must match for a backup to continue this fit: parameter names, shapes and dtypes; the optimizer
        class; the data's kind and length; the fit arguments that decide the batches."""
        params = [[name, list(t.shape), str(t.dtype)] for name, t in self.model.module.state_dict().items()]
        return {"parameters": params, "optimizer": type(self.model.optimizer).__name__,
                "data": type(self.train).__name__, "rows": getattr(self.train, "n", None), **self.fit_args}

    def check(self, payload: Mapping[str, Any], path: str) -> None:
        """A clear error (on every rank, before anything is restored) when the backup belongs to another job."""
        if payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a dfit backup (format {payload.get('format')!r})")
        saved, mine = payload["fingerprint"], self.fingerprint()
        differ = sorted(k for k in set(saved) | set(mine)
                        if k != "seed" and saved.get(k) != mine.get(k))
        if mine.get("seed") is not None and saved.get("seed") != mine.get("seed"):
            differ.append("seed")
        if differ:
            detail = "; ".join(f"{k}: backup {_short(saved.get(k))} vs now {_short(mine.get(k))}" for k in differ)
            raise ValueError(f"the backup {path} was written by a different model or different fit arguments "
                             f"({detail}). Restoring it would not continue this training: delete it, or give "
                             "BackupAndRestore another backup_dir")

    # -- taking a backup (every rank: one all-reduce and one all-gather; the payload on rank 0) -----------------
    def snapshot(self, position: Position, extra: Mapping[str, Any]) -> dict[str, Any] | None:
        metrics = self.train_metrics.summed_state(self.engine.device) if position.in_epoch else None
        rngs = dist.all_gather_objects(_to_bytes(cpu_copy(rng_state())))  # bytes: tensors do not all-gather
        if not dist.is_chief():
            return None
        scaler = self.engine.scaler
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint(),
            "position": {"epoch": position.epoch, "step": position.step, "in_epoch": position.in_epoch},
            "global_step": self.global_step,
            "seed": self.seed,
            "world_size": dist.world_size(),
            "module": cpu_copy(self.model.module.state_dict()),
            "optimizer": cpu_copy(self.model.optimizer.state_dict()),
            "scaler": None if scaler is None else cpu_copy(scaler.state_dict()),
            "callbacks": [[type(cb).__qualname__, cpu_copy(cb.state_dict())] for cb in self.callbacks],
            "history": {"history": cpu_copy(self.history.history), "epoch": list(self.history.epoch)},
            "stop_training": bool(self.model.stop_training),
            "metrics": metrics,
            "stream": self.epochs.position(),
            "rng": rngs,
            **cpu_copy(dict(extra)),
        }

    # -- putting it back (every rank, from the same file) --------------------------------------------------
    def restore_before_begin(self, payload: Mapping[str, Any]) -> Position:
        """Module, callbacks' states, stream position: before ``on_train_begin``."""
        self.model.module.load_state_dict(payload["module"])
        by_class: dict[str, list[Any]] = {}
        for name, state in payload["callbacks"]:
            by_class.setdefault(name, []).append(state)
        for cb in self.callbacks:  # the k-th callback of a class gets the k-th saved state of that class
            states = by_class.get(type(cb).__qualname__)
            if states:
                cb.load_state_dict(states.pop(0))
        self.epochs.seek(payload["stream"])
        self.global_step = int(payload["global_step"])
        p = payload["position"]
        return Position(int(p["epoch"]), int(p["step"]), bool(p["in_epoch"]))

    def restore_history(self, payload: Mapping[str, Any]) -> None:
        """After ``on_train_begin`` (which empties ``History.epoch``)."""
        self.history.history = {k: list(v) for k, v in payload["history"]["history"].items()}
        self.history.epoch = list(payload["history"]["epoch"])
        self.model.stop_training = bool(payload["stop_training"])

    def restore_optimizer(self, payload: Mapping[str, Any]) -> None:
        """Optimizer (learning rates included) and gradient scaler: after the resumed epoch's ``on_epoch_begin``
        for a mid-epoch backup, so a schedule applied there is not applied twice."""
        self.model.optimizer.load_state_dict(payload["optimizer"])
        if self.engine.scaler is not None and payload.get("scaler"):
            self.engine.scaler.load_state_dict(payload["scaler"])

    def restore_rng(self, payload: Mapping[str, Any], position: Position) -> None:
        """Right before the first resumed step: this rank's own generators on the same world size, else the
        documented re-derivation (``derived_rng_seed``)."""
        states = payload["rng"]
        if len(states) == dist.world_size():
            set_rng_state(torch.load(io.BytesIO(states[dist.rank()]), weights_only=True))
        else:
            reseed_all(derived_rng_seed(self.seed, position, dist.rank()))


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
