"""``BackupAndRestore``: Keras' callback, step-exact, on any world size, and the preemption handler.

Keras' meaning: ``fit`` with this callback continues, after a crash, from the last backup in ``backup_dir``
instead of starting again; ``delete_checkpoint`` removes the backup when training completes. dfit's backup is
step-exact (``save_freq`` steps: the resumed run redoes only the steps after the backup, with the partial
epoch's metric states, so its history equals the uninterrupted run's) and continues on any number of ranks
(see ``dfit.resume`` for what a backup holds and the rule for random-number generators).

Cost: at a backup every rank joins one small all-reduce (metric states) and one all-gather (random states);
rank 0 copies the states to the CPU on the training thread and writes them on a background thread (one
write in flight: the next backup waits for it), through a temporary file and a rename, so a crash never leaves
half a backup in place and training does not wait for the disk.

Preemption: SIGTERM (and SIGUSR1 under Slurm) only set a flag. Every ``signal_check_every`` steps the ranks
start one asynchronous all-reduce of their flags and read its result ``signal_check_every`` steps later (one
process reads its flag after every step): no per-step collective. When a signal has been seen, every rank
writes a backup at the same step and the process exits with ``EXIT_PREEMPTED`` (75, "try again"), which a
requeue script or a restarting launcher can tell from a failure.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import torch

from .. import distributed as dist
from ..resume import FORMAT, FitState, Position
from ..serialization import atomic_save, load_file
from .base import Callback

EXIT_PREEMPTED = 75   # EX_TEMPFAIL: the job was preempted after writing a backup; run it again to continue
BACKUP_FILE = "backup.pt"


class _Writer:
    """One background write at a time for one path; a new write (or a reader) waits for the previous one."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, payload: dict[str, Any], path: str) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(payload, path), name="dfit-backup-writer")
        self._thread.start()  # not a daemon: an exiting process finishes its last backup first

    def _write(self, payload: dict[str, Any], path: str) -> None:
        try:
            atomic_save(payload, path)
        except BaseException as exc:  # noqa: BLE001 - raised on the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing the backup failed: {error}") from error


_WRITERS: dict[str, _Writer] = {}


def _writer(path: str) -> _Writer:
    return _WRITERS.setdefault(os.path.abspath(path), _Writer())


class BackupAndRestore(Callback):
    """Back up the whole training state to ``backup_dir`` every epoch (``save_freq="epoch"``) or every
    ``save_freq`` training steps; a ``fit`` with the same arguments finds the backup and continues from it
    exactly (also on another number of processes). ``delete_checkpoint``: remove the backup once training
    completes. ``handle_signals``: SIGTERM (and SIGUSR1 under Slurm) make every rank back up at one step and
    exit with ``EXIT_PREEMPTED``; the ranks agree on it every ``signal_check_every`` steps."""

    reads_logs_at_once = True  # reads no batch logs: a step costs no synchronisation

    def __init__(self, backup_dir: str, save_freq: Any = "epoch", delete_checkpoint: bool = True,
                 handle_signals: bool = True, signal_check_every: int = 16) -> None:
        super().__init__()
        if not backup_dir:
            raise ValueError("Empty `backup_dir` argument passed")
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int)
                                     or save_freq < 1):
            raise ValueError(f"Invalid value for argument `save_freq`. Received: save_freq={save_freq}. "
                             "Expected either 'epoch' or a positive integer value.")
        if isinstance(signal_check_every, bool) or not isinstance(signal_check_every, int) or signal_check_every < 1:
            raise ValueError(f"signal_check_every must be a positive integer; got {signal_check_every!r}")
        self.backup_dir, self.save_freq = str(backup_dir), save_freq
        self.delete_checkpoint, self.handle_signals = bool(delete_checkpoint), bool(handle_signals)
        self.signal_check_every = signal_check_every
        self.path = os.path.join(self.backup_dir, BACKUP_FILE)
        self._fit: FitState | None = None
        self._epoch = 0
        self._signalled = self._leaving = False
        self._previous_handlers: dict[int, Any] = {}
        self._pending_check: tuple[Any, torch.Tensor] | None = None

    # -- used by fit ---------------------------------------------------------------------------------------
    def read_backup(self, fit: FitState) -> dict[str, Any] | None:
        """The backup to continue from (every rank reads the same file), or None; checked against this fit."""
        _writer(self.path).wait()  # a backup this process is still writing
        exists = os.path.exists(self.path)
        seen = dist.all_gather_objects(exists)
        if len(set(seen)) > 1:
            raise RuntimeError(f"the backup {self.path} exists on ranks {[r for r, s in enumerate(seen) if s]} "
                               "only: backup_dir must be on a file system that every rank sees")
        self._fit = fit
        if not exists:
            return None
        payload = load_file(self.path)  # checksums checked, no code run
        if not isinstance(payload, dict):
            raise ValueError(f"{self.path} is not a dfit backup (format {FORMAT} expected)")
        fit.check(payload, self.path)
        return payload

    def attach(self, fit: FitState) -> None:
        self._fit = fit

    def finish(self, completed: bool) -> None:
        """End of fit (also after an error): the last write lands, signal handlers are put back; when training
        completed and ``delete_checkpoint``, rank 0 removes the backup."""
        self._restore_handlers()
        if self._pending_check is not None:
            try:
                self._pending_check[0].wait()
            finally:
                self._pending_check = None
        _writer(self.path).wait()
        if completed and self.delete_checkpoint and dist.is_chief() and os.path.exists(self.path):
            os.remove(self.path)

    # -- hooks ---------------------------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._signalled = self._leaving = False
        if self.handle_signals:
            self._install_handlers()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        fit = self._fit
        fit.global_step += 1
        position = Position(self._epoch, batch + 1, True)
        saved = False
        if self.save_freq != "epoch" and fit.global_step % self.save_freq == 0:
            self.save(position)
            saved = True
        if self.handle_signals and self._preempted(fit.global_step):
            if not saved:
                self.save(position)
            _writer(self.path).wait()
            dist.barrier()   # no rank exits before the backup is on disk (a launcher kills the others on an exit)
            if dist.is_chief():
                print(f"dfit: preempted; backup written to {self.path} at epoch {self._epoch + 1}, step {batch + 1}; "
                      f"exiting with code {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
            self._leaving = True
            raise SystemExit(EXIT_PREEMPTED)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self.save(Position(epoch + 1, 0, False))

    def save(self, position: Position) -> None:
        """Take a backup now (every rank calls it at the same step; rank 0 writes it in the background)."""
        payload = self._fit.snapshot(position, {})
        if payload is not None:
            _writer(self.path).submit(payload, self.path)

    # -- preemption ----------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signums = [signal.SIGTERM] + ([signal.SIGUSR1] if os.environ.get("SLURM_JOB_ID") else [])
        for signum in signums:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        """Put the previous handlers back; a rank leaving after a preemption backup ignores the signals instead:
        when the first rank exits, ``srun --kill-on-bad-exit`` or a launcher SIGTERMs the others, and a rank still
        tearing down would then end by the signal (143) instead of with ``EXIT_PREEMPTED``, and not be requeued."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, signal.SIG_IGN if self._leaving else handler)
        self._previous_handlers = {}

    def _preempted(self, global_step: int) -> bool:
        """Whether every rank agrees that a signal came: at once on one process; on N ranks the all-reduce
        started ``signal_check_every`` steps ago is read (the same answer on every rank), and a new one starts."""
        if not dist._active():
            return self._signalled
        if global_step % self.signal_check_every:
            return False
        agreed = False
        if self._pending_check is not None:
            work, flag = self._pending_check
            work.wait()
            agreed = bool(flag.max().item() > 0)
        flag, _ = dist._comm_tensor(torch.tensor([1.0 if self._signalled else 0.0]))
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        self._pending_check = (work, flag)
        return agreed
