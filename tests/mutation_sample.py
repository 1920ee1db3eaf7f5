"""The mutation run of issue 18 (see tests/README.md): which mutants to run, and the figures per module.

    python tests/mutation_sample.py names     # the mutants to pass to `mutmut run` (after one `mutmut run`
                                              # has generated ./mutants; every mutant of the small modules,
                                              # a seeded uniform sample of the large ones)
    python tests/mutation_sample.py pending   # those of them without a result yet
    python tests/mutation_sample.py figures   # killed / survived / timeout / no tests / not run, per module

Reads mutmut 3's ``mutants/<module>.py.meta`` files; run from the repository root.
"""
from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

# module -> (first-stage sample size or None for every mutant, final sample size). The final sample is a seeded
# uniform sample of the first stage, so it is a uniform sample of the module's mutants with tests; it keeps a run
# on this shared 2-core machine within ~30 minutes.
SAMPLE = {"dfit/data/sharding.py": (None, 25), "dfit/metrics/functions.py": (None, 30), "dfit/engine.py": (40, 15),
          "dfit/losses.py": (60, 20), "dfit/metrics/base.py": (40, 15), "dfit/metrics/compiled.py": (40, 15)}
SEED = 18
NO_TESTS = 33
STATUS = {1: "killed", 3: "killed", 0: "survived", 33: "no tests", 5: "no tests", None: "not run",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"}


def _exit_codes(module: str) -> dict[str, int | None]:
    return json.loads(Path(f"mutants/{module}.meta").read_text())["exit_code_by_key"]


def names() -> dict[str, list[str]]:
    rng = random.Random(SEED)
    picked = {}
    stage1 = {}
    for module, (size, _) in SAMPLE.items():
        codes = _exit_codes(module)
        keys = sorted(k for k, code in codes.items() if code != NO_TESTS)
        stage1[module] = keys if size is None else sorted(rng.sample(keys, size))
    rng = random.Random(SEED + 1)
    for module, (_, size) in SAMPLE.items():
        picked[module] = sorted(rng.sample(stage1[module], size))
    return picked


def pending() -> list[str]:
    """The sampled mutants without a result yet (``mutmut run NAME...`` reruns every name it is given)."""
    return [n for module, ns in names().items() for n in ns if _exit_codes(module)[n] is None]


def figures() -> None:
    print(f"{'module':28} {'mutants':>7} {'no tests':>8} {'run':>4} {'killed':>6} {'timeout':>7} {'survived':>8}"
          f" {'not run':>7}  killed+timeout of run")
    for module, sample in names().items():
        codes = _exit_codes(module)
        c = Counter(STATUS.get(codes[k], "other") for k in sample)
        done = len(sample) - c["not run"]
        caught = c["killed"] + c["timeout"]
        share = f"{100 * caught / done:.1f} %" if done else "-"
        no_tests = sum(1 for code in codes.values() if code == NO_TESTS)
        print(f"{module:28} {len(codes):7} {no_tests:8} {len(sample):4} {c['killed']:6} {c['timeout']:7} "
              f"{c['survived']:8} {c['not run']:7}  {share}")
        for k in sample:
            if codes[k] == 0:
                print(f"    survived: {k}")


if __name__ == "__main__":
    if sys.argv[1:] == ["names"]:
        print("\n".join(n for ns in names().values() for n in ns))
    elif sys.argv[1:] == ["pending"]:
        print("\n".join(pending()))
    elif sys.argv[1:] == ["figures"]:
        figures()
    else:
        sys.exit(__doc__)
