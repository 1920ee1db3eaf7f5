"""A tiny multi-process job using only dfit.distributed, for the launcher tests.

Each "step" all-reduces a number; rank 0 writes the environment, the world and the sums as JSON to --out.
--fail-rank R makes rank R raise ValueError at step 3 of epoch 1 (the others keep stepping).
--fail-once-marker PATH: fail only when PATH does not exist yet (and create it), to test restarts.
"""
import argparse
import json
import os
import time

import torch

from dfit import distributed as dd

p = argparse.ArgumentParser()
p.add_argument("--out")
p.add_argument("--steps", type=int, default=5)
p.add_argument("--fail-rank", type=int, default=None)
p.add_argument("--fail-once-marker", default=None)
p.add_argument("--fail-stamp", default=None, help="write time.time() here when failing")
args = p.parse_args()

info = dd.init()
sums = []
for epoch in (1, 2):
    for step in range(1, args.steps + 1):
        if args.fail_rank == dd.rank() and epoch == 1 and step == 3:
            marker = args.fail_once_marker
            if marker is None or not os.path.exists(marker):
                if marker:
                    open(marker, "w").close()
                if args.fail_stamp:
                    with open(args.fail_stamp, "w") as f:
                        f.write(repr(time.time()))
                raise ValueError(f"boom on rank {dd.rank()} at epoch {epoch} step {step}")
        t = dd.all_reduce_sum(torch.tensor([float(dd.rank() + step)]))
        sums.append(float(t.item()))
        if args.fail_rank is not None and args.fail_rank != dd.rank():
            time.sleep(0.05)
if dd.is_chief() and args.out:
    with open(args.out, "w") as f:
        json.dump({"environment": dd.environment(), "world_size": dd.world_size(), "sums": sums,
                   "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT")}, f)
dd.shutdown()
