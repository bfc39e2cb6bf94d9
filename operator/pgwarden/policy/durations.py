"""Go/Kubernetes-style duration strings (`90s`, `10m`, `1h30m`, `1.5h`, `250ms`).

Kubernetes users write durations this way everywhere, and the CRD validates them with CEL's
`duration()`, which follows Go's `time.ParseDuration`. Parsing here accepts the same grammar so a
spec the API server admits is a spec the model admits. Negative durations are refused: no age can be.
"""

from __future__ import annotations

import re
from datetime import timedelta
from fractions import Fraction

_UNITS_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_MAX_NANOSECONDS = 2**63 - 1  # Go's time.Duration is an int64 of nanoseconds: 2562047h47m16.854775807s
MAX_LENGTH = 64
"""The CRD's maxLength for durations, which lets the API server bound the cost of its CEL rules."""


def parse_duration(text: str) -> timedelta:
    """Parse a Go duration string; raise ValueError with the reason otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"must be a duration string such as '90s' or '1h30m', got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ValueError(f"must be at most {MAX_LENGTH} characters, got {len(text)}")
    raw = text  # no strip(): Go's time.ParseDuration, which the CRD's CEL duration() uses, allows no spaces
    if raw.startswith("-"):
        raise ValueError(f"must not be negative, got {text!r}")
    if raw.startswith("+"):
        raw = raw[1:]
    if raw == "0":
        return timedelta(0)
    if not raw:
        raise ValueError("must be a duration string such as '90s' or '1h30m', got an empty string")
    seconds = 0.0
    nanoseconds = 0  # as Go counts them (each part truncated), to refuse what Go cannot represent
    pos = 0
    for match in _PART.finditer(raw):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS_SECONDS[match.group(2)]
        nanoseconds += int(Fraction(match.group(1)) * round(_UNITS_SECONDS[match.group(2)] * 1e9))
        pos = match.end()
    if pos != len(raw) or pos == 0:
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit (ns, us, ms, s, m, h), e.g. '90s', '10m', '1h30m'"
        )
    if nanoseconds > _GO_MAX_NANOSECONDS:
        raise ValueError(f"{text!r} is longer than the longest Go duration, 2562047h47m16.854775807s")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Shortest Go-style rendering of `value` (`1h30m`, `90s` becomes `1m30s`, `0s`)."""
    total = value.total_seconds()
    if total == 0:
        return "0s"
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if minutes:
        out += f"{int(minutes)}m"
    if seconds:
        out += f"{seconds:g}s" if seconds >= 1 or out else f"{seconds * 1000:g}ms"
    return out
