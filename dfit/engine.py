"""The three loops (train / test / predict): the one place where a step happens.

A training step: this rank's part of the global batch -> device -> forward (through DDP when N > 1)
-> per-sample losses, weighted, summed and scaled by ``world / global_batch`` -> backward (DDP all-reduces
the gradients) -> optimizer step -> metrics accumulate on the device. No other collective and no host
synchronisation happens on a step (except the two small all-reduces of each BatchNorm layer on N ranks, see
``batchnorm``); epoch logs come from one all-reduce at the end of the epoch.

On N ranks with ``find_unused_parameters=None`` the very first training step runs without DDP and its
gradients are averaged by ``unused.average_first_step``, which also tells whether DDP must look for
parameters without a gradient; DDP is built right after that step.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from . import batchnorm, unused
from . import distributed as dist
from .callbacks.base import CallbackList, LazyLogs
from .data import Batch
from .data.structure import concat_rows, flatten, index_rows, map_structure
from .losses import CompiledLoss, global_batch_decisions
from .metrics import MetricSet
from .trainer import agree_to_stop

if TYPE_CHECKING:
    from .model import Model

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note`` (Python >= 3.11); on 3.10 the note is left out rather than hiding the error."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def call_module(module: torch.nn.Module, x: Any) -> Any:
    """Positional inputs for a list/tuple, keyword inputs for a dict, else one argument."""
    if isinstance(x, dict):
        return module(**x)
    if isinstance(x, (list, tuple)):
        return module(*x)
    return module(x)


def as_outputs(structure: Any, names: list[str], what: str) -> list[torch.Tensor]:
    """Predictions or targets as a list in output order."""
    if isinstance(structure, torch.Tensor) and len(names) == 1:  # the common case first
        return [structure]
    if isinstance(structure, dict):
        missing = [n for n in names if n not in structure]
        if missing:
            raise ValueError(f"{what} has no entries for outputs {missing}; it has {list(structure)}")
        return [structure[n] for n in names]
    if isinstance(structure, (list, tuple)):
        if len(structure) != len(names):
            raise ValueError(f"{what} has {len(structure)} entries but there are {len(names)} outputs")
        return list(structure)
    if len(names) != 1:
        raise ValueError(f"{what} is a single tensor but there are {len(names)} outputs {names}")
    return [structure]


class Engine:
    """Runs the steps of one compiled model: device placement, DDP, mixed precision and the loops."""

    def __init__(self, model: "Model"):
        self.model = model
        self.device = dist.device()
        self.world = dist.world_size()
        self.rank = dist.rank()
        model.module.to(self.device)
        # Global-batch BatchNorm statistics on N ranks (one traversal here, none per step).
        self.synced_batchnorms = batchnorm.set_synchronized(model.module, model.sync_batchnorm and self.world > 1)
        # None until decided: auto mode decides on the first training step (see _first_step_unused).
        self.find_unused_parameters: bool | None = model.find_unused_parameters if self.world > 1 else False
        self._ddp: torch.nn.Module | None = None
        self.micro_batch_size: int | None = None   # fit(micro_batch_size=M): rows through the model at once
        self._states_synced = False
        self._compiled: torch.nn.Module | None = None
        self._seeds: dict[tuple[float, torch.dtype], torch.Tensor] = {}
        dtype = PRECISIONS[model.precision]
        self.autocast_dtype = dtype
        self.scaler = torch.amp.GradScaler(self.device.type) if dtype is torch.float16 else None

    # -- modules ---------------------------------------------------------------------------------------
    @property
    def train_module(self) -> torch.nn.Module:
        """The module a training step runs: DDP-wrapped on N ranks, torch.compile'd if asked.

        In auto mode (``find_unused_parameters=None``) on N ranks, before the first training step has decided
        whether DDP must look for unused parameters, this is the plain module, its parameters and buffers
        broadcast from rank 0 as DDP's constructor would (``train_epoch`` then averages that step's gradients).
        """
        if self._ddp is None:
            if self.find_unused_parameters is None:
                if not self._states_synced:
                    unused.broadcast_state(self.model.module)
                    self._states_synced = True
                return self.model.module
            module = self.model.module
            if self.world > 1:
                ids = [self.device.index] if self.device.type == "cuda" else None
                module = DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True,
                                                 find_unused_parameters=self.find_unused_parameters)
            if self.model.jit_compile:
                module = torch.compile(module)
            self._ddp = module
        return self._ddp

    def _settle_unused_parameters(self) -> torch.nn.Module:
        """Auto mode, after the first backward on N ranks: average its gradients as DDP would, decide whether
        DDP must look for unused parameters (the same answer on every rank) and build DDP."""
        self.find_unused_parameters = unused.average_first_step(self.model.module, self.world)
        return self.train_module

    @property
    def eval_module(self) -> torch.nn.Module:
        if not self.model.jit_compile:
            return self.model.module
        if self._compiled is None:
            self._compiled = torch.compile(self.model.module)
        return self._compiled

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: Batch) -> Batch:
        """Host batch -> device through pinned memory, asynchronously (torch's caching host allocator
        keeps each pinned block alive until its copy has run)."""
        if self.device.type == "cpu":
            return batch
        move = lambda t: (t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory()).to(  # noqa: E731
            self.device, non_blocking=True)
        w = None if batch.sample_weight is None else move(batch.sample_weight)
        y = None if batch.y is None else map_structure(move, batch.y)
        return Batch(map_structure(move, batch.x), y, w, batch.size, batch.global_size)

    def _prefetched(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """On CUDA, start copying batch k+1 while batch k computes (on the CPU: the batches as they are)."""
        return batches if self.device.type == "cpu" else self._copied_ahead(batches)

    def _copied_ahead(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        pending = None
        for batch in batches:
            ready, pending = pending, self._to_device(batch)
            if ready is not None:
                yield ready
        if pending is not None:
            yield pending

    def _seed(self, loss) -> torch.Tensor:
        """``scale`` as the gradient that starts backward (cached: a step's scale is almost always the same)."""
        key = (loss.scale, loss.value.dtype)
        seed = self._seeds.get(key)
        if seed is None:
            if len(self._seeds) > 64:
                self._seeds.clear()
            seed = self._seeds[key] = torch.tensor(loss.scale, dtype=loss.value.dtype, device=self.device)
        return seed

    # -- the loops -------------------------------------------------------------------------------------
    def _call(self, module: torch.nn.Module, x: Any) -> Any:
        """The module on this rank's rows; an error from inside it says which rank and what shapes it was given."""
        try:
            return call_module(module, x)
        except (RuntimeError, TypeError, ValueError) as exc:   # e.g. "mat1 and mat2 shapes cannot be multiplied"
            shapes = [tuple(t.shape) for t in flatten(x)]
            _add_note(exc, f"[dfit] raised while the model ran on rank {self.rank}'s rows of a batch of x "
                         f"(shape{'s' if len(shapes) > 1 else ''} {', '.join(map(str, shapes))}): check that x has the "
                         "shape and dtype the model expects")
            raise

    def _forward(self, module: torch.nn.Module, batch: Batch, output_names: list[str], loss_fn: CompiledLoss):
        """Forward pass and this rank's loss of the global batch."""
        output = self._call(module, batch.x)
        if loss_fn.from_model:  # the module computed its own loss (compile(loss=None))
            return [], [], loss_fn(output, batch.size, batch.global_size, self.world)
        y_pred = as_outputs(output, output_names, "the model output")
        y_true = as_outputs(batch.y, output_names, "y")
        loss = loss_fn(y_pred, y_true, batch.sample_weight, batch.size, batch.global_size, self.world)
        return y_pred, y_true, loss

    def train_epoch(self, batches: Iterator[Batch], tracker: MetricSet, callbacks: CallbackList,
                    output_names: list[str], first_step: int = 0,
                    tracker_state: torch.Tensor | None = None) -> dict[str, float]:
        """One epoch of training steps; returns the exact epoch logs (identical on every rank).

        A resumed epoch (``BackupAndRestore``): ``batches`` start at step ``first_step`` and ``tracker_state`` is
        the partial epoch's summed metric states (kept on rank 0)."""
        module, optimizer = self.train_module, self.model.optimizer
        loss_fn = self.model.compiled_loss(output_names)
        wants_batches = callbacks.wants_batches("train")
        stops_at_batch = callbacks.stops_at_batch()  # e.g. TerminateOnNaN: all ranks end the epoch at one step
        has_metrics = bool(tracker.metrics)
        self.model.module.train()
        tracker.reset(self.device)
        if tracker_state is not None:
            tracker.load_summed_state(tracker_state, keep=self.rank == 0)
        probing = self.find_unused_parameters is None  # auto mode's first step on N ranks: no DDP yet
        with global_batch_decisions(self.world > 1):
            for step, batch in enumerate(self._prefetched(batches), start=first_step):
                if wants_batches:
                    callbacks.batch_begin("train", step)
                self._backward_in_chunks(module, batch, output_names, loss_fn, tracker, has_metrics)
                if probing:
                    module, probing = self._settle_unused_parameters(), False
                if self.scaler is None:
                    optimizer.step()
                else:
                    self.scaler.step(optimizer)
                    self.scaler.update()
                if wants_batches:
                    callbacks.batch_end("train", step, LazyLogs(lambda: tracker.running(self.device)))
                    if stops_at_batch and agree_to_stop(self.model):
                        break
        return tracker.results(self.device)

    def _backward_in_chunks(self, module: torch.nn.Module, batch: Batch, output_names: list[str], loss_fn: Any,
                            tracker: MetricSet, has_metrics: bool) -> None:
        """Gradients of this rank's part of a global batch, run through the model ``micro_batch_size`` rows at a
        time: every chunk's loss is normalised by the GLOBAL batch, so the accumulated gradient is the one of the
        whole part; DDP all-reduces once, with the last chunk (``no_sync`` before it)."""
        self.model.optimizer.zero_grad(set_to_none=True)
        chunks = split_rows(batch, self.micro_batch_size)
        for i, chunk in enumerate(chunks):
            sync = contextlib.nullcontext() if i == len(chunks) - 1 or not hasattr(module, "no_sync") \
                else module.no_sync()
            with sync:
                try:
                    with self.autocast():
                        y_pred, y_true, loss = self._forward(module, chunk, output_names, loss_fn)
                except RuntimeError as error:
                    if unused.is_unused_error(error):  # DDP's error about the previous step, in our words
                        raise unused.unused_error(self.model.module, self.model.find_unused_parameters) from None
                    raise
                if self.scaler is None:
                    loss.value.backward(self._seed(loss))  # the gradient of value * scale, without a multiply
                else:
                    self.scaler.scale(loss.objective).backward()
            tracker.update_loss(loss.parts, chunk.size)
            if has_metrics:
                tracker.update_metrics([p.detach() for p in y_pred], y_true, chunk.sample_weight)

    @torch.inference_mode()
    def test_epoch(self, batches: Iterator[Batch], tracker: MetricSet, callbacks: CallbackList,
                   output_names: list[str]) -> dict[str, float]:
        """Loss and metrics over all batches of all ranks (no gradients, no DDP)."""
        module, loss_fn = self.eval_module, self.model.compiled_loss(output_names)
        wants_batches = callbacks.wants_batches("test")
        was_training = self.model.module.training
        self.model.module.eval()
        tracker.reset(self.device)
        try:
            with global_batch_decisions(self.world > 1):
                for step, batch in enumerate(self._prefetched(batches)):
                    if wants_batches:
                        callbacks.batch_begin("test", step)
                    with self.autocast():
                        y_pred, y_true, loss = self._forward(module, batch, output_names, loss_fn)
                    tracker.update_loss(loss.parts, batch.size)
                    tracker.update_metrics(y_pred, y_true, batch.sample_weight)
                    if wants_batches:
                        callbacks.batch_end("test", step, LazyLogs(lambda: tracker.running(self.device)))
        finally:
            self.model.module.train(was_training)
        return tracker.results(self.device)

    @torch.inference_mode()
    def predict(self, batches: Iterator[Batch], callbacks: CallbackList) -> Any:
        """Every input row exactly once, in input order, on every rank (CPU tensors)."""
        module = self.eval_module
        wants_batches = callbacks.wants_batches("predict")
        was_training = self.model.module.training
        self.model.module.eval()
        chunks: list[Any] = []
        try:
            for step, batch in enumerate(self._prefetched(batches)):
                if wants_batches:
                    callbacks.batch_begin("predict", step)
                with self.autocast():
                    out = self._call(module, batch.x)
                chunks.append(_to_cpu(out))
                if wants_batches:
                    callbacks.batch_end("predict", step, {"outputs": out})
        finally:
            self.model.module.train(was_training)
        if self.world == 1:
            return concat_rows(chunks)
        per_rank = dist.all_gather_objects(chunks)
        # Global batch k is rank 0's part, then rank 1's, ...: step-major, rank-minor is input order.
        return concat_rows([per_rank[r][k] for k in range(len(chunks)) for r in range(self.world)])


def split_rows(batch: Batch, size: int | None) -> list[Batch]:
    """``batch`` in chunks of at most ``size`` rows (the whole batch when ``size`` is None or not smaller; a rank
    with no rows still runs one empty chunk, so it takes part in the step)."""
    if size is None or batch.size <= size:
        return [batch]
    chunks = []
    for start in range(0, batch.size, size):
        rows = slice(start, min(start + size, batch.size))
        chunks.append(Batch(index_rows(batch.x, rows), None if batch.y is None else index_rows(batch.y, rows),
                            None if batch.sample_weight is None else batch.sample_weight[rows],
                            rows.stop - rows.start, batch.global_size))
    return chunks


def _to_cpu(s: Any) -> Any:
    return map_structure(lambda t: t.detach().float().cpu() if t.dtype in (torch.bfloat16, torch.float16)
                         else t.detach().cpu(), s)
