"""`python -m pgwarden ...` with tracemalloc on and a snapshot dumped on SIGUSR1 (bench/operator_memory.py).

The operator itself carries no debugging hook: this launcher, used only by the benchmark, installs the
handler and runs pgwarden's entry point in the same process. The first SIGUSR1 starts tracing (from then
on: tracing from the start slowed the operator's start-up past ten minutes on 2 cores, and the imports are
measured apart, as RSS); each SIGUSR1 writes `$PGWARDEN_BENCH_SNAPSHOT.N` (N counts from 0; the first is
empty) and, beside it, `.N.types.json`: the count and shallow size (sys.getsizeof) of the objects the
collector tracks, by type. So the last snapshot holds what was allocated after the first and is still live.

    PGWARDEN_BENCH_SNAPSHOT=/tmp/op python bench/traced_operator.py run --namespace NS --standalone
"""

from __future__ import annotations

import collections
import gc
import json
import os
import runpy
import signal
import sys
import tracemalloc
from types import FrameType

FRAMES = 8  # enough to reach the pgwarden frame behind most allocations made inside a library


def write_types(path: str) -> None:
    """Objects by type: (count, shallow bytes), the largest first (what tracemalloc's lines do not name)."""
    count: collections.Counter[str] = collections.Counter()
    size: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        count[name] += 1
        size[name] += sys.getsizeof(obj)
    table = {name: [count[name], size[name]] for name, _ in size.most_common(60)}
    with open(path, "w") as out:
        json.dump(table, out)


def main() -> None:
    prefix = os.environ["PGWARDEN_BENCH_SNAPSHOT"]
    taken = 0

    def dump(_signum: int, _frame: FrameType | None) -> None:
        nonlocal taken
        if not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)
        snapshot = tracemalloc.take_snapshot()
        write_types(f"{prefix}.{taken}.types.json")
        snapshot.dump(f"{prefix}.{taken}.tmp")
        os.replace(f"{prefix}.{taken}.tmp", f"{prefix}.{taken}")  # written last and whole: the bench polls for it
        taken += 1

    signal.signal(signal.SIGUSR1, dump)
    sys.argv = ["pgwarden", *sys.argv[1:]]
    runpy.run_module("pgwarden", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
