"""The policy engine: decide and act on one PostgreSQL server, with no Kubernetes in it.

Layers, cheapest to test first: `patterns` and `decide` are pure; `observe` (one read of
pg_stat_activity) and `act` (one guarded signal per session) do the I/O; `cycle` composes them into
one evaluation and `scheduler` repeats it on deadlines. `session` keeps a reconnecting connection per
target for the CLI, the sidecar and the controller.
"""

from pgwarden.engine.connection import EngineDsn, connect, parse_dsn
from pgwarden.engine.cycle import run_cycle
from pgwarden.engine.errors import EngineError, InvalidDsn, QueryFailed, TargetUnreachable
from pgwarden.engine.report import ActionRecord, CycleReport, SkipRecord, render_text
from pgwarden.engine.scheduler import run_loop
from pgwarden.engine.session import EngineTarget, TargetSession

__all__ = [
    "ActionRecord",
    "CycleReport",
    "EngineDsn",
    "EngineError",
    "EngineTarget",
    "InvalidDsn",
    "QueryFailed",
    "SkipRecord",
    "TargetSession",
    "TargetUnreachable",
    "connect",
    "parse_dsn",
    "render_text",
    "run_cycle",
    "run_loop",
]
