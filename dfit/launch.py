"""``dfit-launch``: run a training script on N processes with torch's own elastic launcher.

    dfit-launch [--nproc-per-node N|auto] [--nnodes M[:N]] [torchrun options] [--max-restarts K] script.py [args]

Everything torchrun accepts is accepted here (rendezvous options are passed through unchanged); dfit-launch
only adds what makes a job end cleanly and restart reliably:

- ``--nproc-per-node auto`` (the default) is one process per visible GPU, or one when there is no GPU.
- One node and no rendezvous given: a private rendezvous on a free localhost port (never a fixed 29500).
- ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: each restart round gets a fresh store, and dfit namespaces its
  process-group keys per attempt, so ``--max-restarts K`` recovers every time, not most of the time.
- Each worker runs the script under torch elastic's ``errors.record``, so a failing rank's traceback reaches
  the launcher; the launcher ends every other rank, prints the failing rank and its traceback, and exits
  with the failing rank's exit code (non-zero).

``python -m dfit.launch`` is the same command.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Sequence

WORKER_FLAG = "--dfit-worker"


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
                          "with torch's elastic launcher. A failing rank ends the job.")
    for action in parser._actions:  # our default: one process per GPU, else one
        if action.dest == "nproc_per_node":
            action.default = os.environ.get("PET_NPROC_PER_NODE", "auto")
            action.help = "processes per node: a number, or 'auto' (one per visible GPU, else 1; default)"
    return parser


def _failure_report(err) -> str:
    """torch's root-cause block, then one line per failed rank: its exit code and exception."""
    lines = [str(err).rstrip(), ""]
    first_rank, _ = err.get_first_failure()
    ordered = sorted(err.failures.items(), key=lambda item: (item[0] != first_rank, item[0]))
    for global_rank, failure in ordered:
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        who = f"dfit-launch: rank {global_rank} (local rank {failure.local_rank})"
        if global_rank != first_rank and failure.exitcode < 0:
            lines.append(f"{who} was ended by the launcher ({failure.signal_name()}) after the first failure")
            continue
        tag = " (first failure)" if global_rank == first_rank else ""
        lines.append(f"{who} failed with exit code {failure.exitcode}{tag}: {message}")
    lines.append("dfit-launch: every other rank was ended; the job failed")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> int:
    """Launch the job described by ``argv`` (dfit-launch's command line); returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import config_from_args, parse_min_max_nnodes

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
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

    config, cmd, cmd_args = config_from_args(args)
    if not args.no_python and not args.run_path:
        # python -u [-m] script args  ->  python -u -m dfit.launch --dfit-worker [-m] script args
        rest = cmd_args[1:]  # drop "-u"
        cmd_args = ["-u", "-m", "dfit.launch", WORKER_FLAG, *rest]
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as err:
        sys.stderr.write(_failure_report(err) + "\n")
        sys.stderr.flush()
        code = err.get_first_failure()[1].exitcode
        return code if 0 < code < 256 else 1
    except SignalException as exc:  # the launcher itself was told to stop (scancel, Ctrl-C, kill)
        sys.stderr.write(f"dfit-launch: received {exc.sigval.name}; every rank was ended\n")
        return 128 + int(exc.sigval)
    return 0


def _worker(argv: list[str]) -> None:
    """Inside one worker: run the user's script (or ``-m module``) as ``__main__`` under errors.record."""
    from torch.distributed.elastic.multiprocessing.errors import record

    module = bool(argv) and argv[0] == "-m"
    if module:
        argv = argv[1:]
    if not argv:
        raise SystemExit("dfit-launch worker: no script given")
    target, script_args = argv[0], argv[1:]

    @record
    def main() -> None:
        sys.argv = [target, *script_args]
        if module:
            sys.path.insert(0, os.getcwd())
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            runpy.run_path(target, run_name="__main__")

    main()


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point of ``dfit-launch``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER_FLAG]:
        _worker(argv[1:])
        return
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
