"""``dfit-launch``: run a training script on N processes with torch's own elastic launcher.

    dfit-launch [--nproc-per-node N|auto] [--nnodes M[:N]] [torchrun options] [--max-restarts K]
                [--all-ranks-output] [--verbose-errors] [--error-report PATH] script.py [args]

Everything torchrun accepts is accepted here (rendezvous options are passed through unchanged); dfit-launch
only adds what makes a job end cleanly and restart reliably:

- ``--nproc-per-node auto`` (the default) is one process per visible GPU, or one when there is no GPU.
- One node and no rendezvous given: a private rendezvous on a free localhost port (never a fixed 29500).
- ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: each restart round gets a fresh store, and dfit namespaces its
  process-group keys per attempt, so ``--max-restarts K`` recovers every time, not most of the time.
- Workers' stdout is shown from global rank 0 only (a ``print`` appears once, on every number of nodes);
  ``--all-ranks-output`` shows every rank's. stderr (warnings, errors) is shown from every rank. The
  filtering happens inside each worker, by global rank, so a terminal stays a terminal (progress bars) and
  torchrun's own ``--tee``/``--redirects``/``--local-ranks-filter`` still work (giving one of them turns
  dfit's filter off).
- A failing rank records its exception for the launcher, which ends every other rank and prints a short
  report: the rank, its exception and the last frames of its traceback in the user's files; torch's full
  report goes to a file whose path is printed (``--error-report PATH`` chooses it). ``--verbose-errors``
  prints everything on stderr instead, as torchrun does. The exit code is the failing rank's (non-zero).

``python -m dfit.launch`` is the same command.
"""
from __future__ import annotations

import logging
import os
import runpy
import shutil
import sys
import tempfile
import traceback
from typing import Sequence

from . import launch_errors

WORKER_FLAG = "--dfit-worker"
WORKER_OPTION = "--dfit-"  # --dfit-stdout=rank0, --dfit-errors=brief: how the launcher configures a worker


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_nproc(value: str | int) -> int:
    """``auto`` -> one process per visible GPU, else 1; a number -> that number; other torchrun words
    (``gpu``, ``cpu``, ``xpu``) keep torchrun's meaning."""
    text = str(value).strip()
    if text == "auto":
        return max(1, _visible_gpus())
    if text.isdigit():
        n = int(text)
        if n < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {n}")
        return n
    from torch.distributed.run import determine_local_world_size

    return determine_local_world_size(text)


def _parser():
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "dfit-launch"
    parser.description = ("Run a dfit (or any torch.distributed) training script on N processes per node "
                          "with torch's elastic launcher. Only global rank 0's stdout is shown (stderr of "
                          "every rank); a failing rank ends the job with a short report naming it "
                          "(see --all-ranks-output, --verbose-errors, --error-report).")
    for action in parser._actions:  # our default: one process per GPU, else one
        if action.dest == "nproc_per_node":
            action.default = os.environ.get("PET_NPROC_PER_NODE", "auto")
            action.help = "processes per node: a number, or 'auto' (one per visible GPU, else 1; default)"
    group = parser.add_argument_group("dfit-launch output")
    group.add_argument("--all-ranks-output", action="store_true",
                       help="show the stdout of every rank (default: of global rank 0 only; stderr is always "
                            "shown from every rank). Implied by torchrun's --tee, --redirects, "
                            "--local-ranks-filter")
    group.add_argument("--verbose-errors", action="store_true",
                       help="when a rank fails, print every rank's traceback and torch elastic's full report "
                            "(default: the failing rank, its exception and the last frames of its traceback; "
                            "the full report is saved to a file whose path is printed)")
    group.add_argument("--error-report", metavar="PATH", default=None,
                       help="where to save the full failure report (default: a new file "
                            "dfit-launch-failure-<time>-<pid>.log in --log-dir, else in the temp directory)")
    return parser


class _HeldRecords(logging.Handler):
    """Keeps torch elastic's lines about ending the workers, for the report file, instead of stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname).1s %(asctime)s %(name)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _launch(config, entrypoint, cmd_args: list[str], hold_logs: _HeldRecords | None) -> None:
    from torch.distributed.launcher.api import elastic_launch

    logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    propagate = logger.propagate
    if hold_logs is not None:
        logger.addHandler(hold_logs)
        logger.propagate = False
    try:
        elastic_launch(config=config, entrypoint=entrypoint)(*cmd_args)
    finally:
        if hold_logs is not None:
            logger.removeHandler(hold_logs)
            logger.propagate = propagate


LOG_DIR_PREFIX = "dfit-launch-logs-"


def remove_stale_log_dirs() -> None:
    """Remove the private log folders (``dfit-launch-logs-<pid>-*`` in the temp directory) of launchers that no
    longer run: a SIGKILLed dfit-launch cannot remove its own."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        pid = name[len(LOG_DIR_PREFIX):].split("-", 1)[0]
        if not (name.startswith(LOG_DIR_PREFIX) and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        except OSError:
            continue


def run(argv: Sequence[str] | None = None) -> int:
    """Launch the job described by ``argv`` (dfit-launch's command line); returns the exit code."""
    from torch.distributed.run import parse_min_max_nnodes

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    nproc = resolve_nproc(args.nproc_per_node)
    args.nproc_per_node = str(nproc)

    # Rendezvous: one node with nothing given -> a private c10d store on a free port (torchrun --standalone).
    if args.standalone or (parse_min_max_nnodes(args.nnodes)[1] == 1 and args.rdzv_backend == "static"
                           and not args.rdzv_endpoint and args.master_port is None):
        import uuid

        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
        args.standalone = False
    if args.master_port is None:
        args.master_port = 29500

    # A fresh store per restart round (see CLUSTER-NOTES trap 1); dfit also prefixes keys per attempt.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if "OMP_NUM_THREADS" not in os.environ and nproc > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))

    if not args.module and not args.no_python and not os.path.isfile(args.training_script):
        sys.stderr.write(f"dfit-launch: no such script: {args.training_script}\n")
        return 2

    # torch elastic's per-run folder (workers' error files): a private one, removed at the end, unless --log-dir
    # is given (torch would otherwise leave a torchelastic_* folder in the temp directory after every run).
    user_log_dir = args.log_dir
    private_logs = None
    if user_log_dir is None:
        remove_stale_log_dirs()
        private_logs = args.log_dir = tempfile.mkdtemp(prefix=f"{LOG_DIR_PREFIX}{os.getpid()}-")
    try:
        return _run(args, argv, nproc, user_log_dir)
    finally:
        if private_logs is not None:
            shutil.rmtree(private_logs, ignore_errors=True)


def _run(args, argv: list[str], nproc: int, user_log_dir: str | None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import config_from_args

    config, cmd, cmd_args = config_from_args(args)
    wrapped = not args.no_python and not args.run_path
    brief = wrapped and not args.verbose_errors
    if wrapped:
        # python -u [-m] script args  ->  python -u -m dfit.launch --dfit-worker [options] [-m] script args
        torchrun_filters = args.tee != "0" or args.redirects != "0" or bool(args.local_ranks_filter)
        options = [f"{WORKER_OPTION}stdout={'all' if args.all_ranks_output or torchrun_filters else 'rank0'}",
                   f"{WORKER_OPTION}errors={'brief' if brief else 'full'}"]
        rest = cmd_args[1:]  # drop "-u"
        cmd_args = ["-u", "-m", "dfit.launch", WORKER_FLAG, *options, *rest]
    held = _HeldRecords() if brief else None
    try:
        _launch(config, cmd, cmd_args, held)
    except ChildFailedError as err:
        if brief:
            path = launch_errors.save_report(args.error_report or launch_errors.default_report_path(user_log_dir),
                                             err, ["dfit-launch", *argv], held.lines)
            report = launch_errors.brief_report(err, path)
        else:
            report = launch_errors.full_report(err)
        sys.stderr.write(report + "\n")
        sys.stderr.flush()
        code = err.get_first_failure()[1].exitcode
        return code if 0 < code < 256 else 1
    except SignalException as exc:  # the launcher itself was told to stop (scancel, Ctrl-C, kill)
        sys.stderr.write(f"dfit-launch: received {exc.sigval.name}; every rank was ended\n")
        return 128 + int(exc.sigval)
    except RendezvousConnectionError as exc:   # the node hosting the rendezvous store is gone
        if not brief:
            raise
        sys.stderr.write(f"dfit-launch: lost the rendezvous store at {args.rdzv_endpoint} ({exc}); the node that "
                         "hosts it is gone, so this node cannot re-form the job and its workers were ended. Start "
                         "the job again (a BackupAndRestore callback resumes it from its last backup)\n")
        return 1
    if held is not None and held.lines:  # no failure in the end (e.g. after a restart): nothing is hidden
        sys.stderr.write("\n".join(held.lines) + "\n")
    return 0


def _silence_stdout() -> None:
    """Send this process's stdout (Python's and the C library's, and its children's) to the null device."""
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def _record_quietly(exc: Exception) -> None:
    """Write ``exc`` to torch elastic's error file (the launcher reports it) instead of printing it here;
    print a short form only when a restart will follow (the launcher's final report will not show it)."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(exc)
    restarts_left = (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
                     - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    if restarts_left > 0:
        callstack = "".join(traceback.format_exception(exc))
        lines = [f"dfit-launch: rank {os.environ.get('RANK', '?')} failed (a restart follows): "
                 f"{type(exc).__name__}: {exc}", *launch_errors.short_traceback(callstack)]
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()


def _worker(argv: list[str]) -> None:
    """Inside one worker: run the user's script (or ``-m module``) as ``__main__``; its exception is recorded
    for the launcher (torch elastic's error file), and printed here too with ``--dfit-errors=full``."""
    from torch.distributed.elastic.multiprocessing.errors import record

    options = {}
    while argv and argv[0].startswith(WORKER_OPTION) and "=" in argv[0]:
        key, value = argv[0][len(WORKER_OPTION):].split("=", 1)
        options[key] = value
        argv = argv[1:]
    module = bool(argv) and argv[0] == "-m"
    if module:
        argv = argv[1:]
    if not argv:
        raise SystemExit("dfit-launch worker: no script given")
    from .distributed import watch_parent

    watch_parent()  # dfit-launch SIGKILLed -> its agent is gone -> this worker ends too
    target, script_args = argv[0], argv[1:]
    if options.get("stdout") == "rank0" and os.environ.get("RANK", "0") != "0":
        _silence_stdout()

    def main() -> None:
        sys.argv = [target, *script_args]
        if module:
            sys.path.insert(0, os.getcwd())
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            runpy.run_path(target, run_name="__main__")

    if options.get("errors") != "brief":
        record(main)()
        return
    try:
        main()
    except Exception as exc:  # SystemExit and KeyboardInterrupt pass, as under errors.record
        from . import distributed

        distributed.mark_failing()
        _record_quietly(distributed.explain_timeout(exc) or exc)
        sys.exit(1)  # what an unhandled exception exits with


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point of ``dfit-launch``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER_FLAG]:
        _worker(argv[1:])
        return
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
