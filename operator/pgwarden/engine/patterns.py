"""Policy patterns (fnmatch globs, CIDRs) in the two forms the engine needs: SQL parameters and Python checks.

The observation query narrows sessions in PostgreSQL, so a glob must become a PostgreSQL regular
expression (ARE) that means exactly what `fnmatch.fnmatchcase` means; `decide` then checks the same
globs again in Python. The regex is always passed as a query parameter, never spliced into SQL text:
escaping here is about meaning, not about safety.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from fnmatch import fnmatchcase

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# ASCII characters that are plain letters or digits in an ARE; every other ASCII character is escaped with
# a backslash, which an ARE reads as "this character, literally", inside and outside bracket expressions.
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def _literal(char: str) -> str:
    if char in _PLAIN or ord(char) > 127:
        return char
    if ord(char) < 32 or ord(char) == 127:
        # Control characters are not special in an ARE, and `\` before one would be an unknown escape.
        return char
    return "\\" + char


def _set_items(body: str) -> list[tuple[str, str]]:
    """Split the inside of a glob `[...]` (without `!`) into (low, high) ranges the way fnmatch does.

    fnmatch reads `a-c` as a range, a `-` first or last as a literal, and after a range the next `-`
    search starts past the range's end (so `a-c-e` is a-c, '-', 'e'); ranges with low > high are dropped
    together with their end points, exactly as `fnmatch.translate` drops them.
    """
    if "-" not in body:
        return [(c, c) for c in body]
    chunks: list[str] = []
    start = 0
    k = 1
    while True:
        k = body.find("-", k)
        if k < 0:
            break
        chunks.append(body[start:k])
        start = k + 1
        k = k + 3
    last = body[start:]
    if last:
        chunks.append(last)
    else:
        chunks[-1] += "-"
    for k in range(len(chunks) - 1, 0, -1):
        if chunks[k - 1][-1] > chunks[k][0]:
            chunks[k - 1] = chunks[k - 1][:-1] + chunks[k][1:]
            del chunks[k]
    items: list[tuple[str, str]] = []
    for index, chunk in enumerate(chunks):
        chars = list(chunk)
        if index > 0 and chars:
            # The first character of every chunk after the first closes a range opened by the previous chunk.
            low = items.pop()[0]
            items.append((low, chars.pop(0)))
        items.extend((c, c) for c in chars)
    return items


def glob_to_regex(pattern: str) -> str | None:
    """The body of an ARE equivalent to `fnmatchcase(name, pattern)`, or None if it can match nothing.

    The result is unanchored; `anchored_alternation` anchors and joins several.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not out or out[-1] != ".*":
                out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(_literal("["))
                continue
            body = pattern[i:j]
            i = j + 1
            negate = body.startswith("!")
            items = _set_items(body[1:] if negate else body)
            if not items:
                if negate:
                    out.append(".")  # a negated empty set is any character, as in fnmatch
                    continue
                return None  # an empty set: the whole pattern can never match
            members = "".join(_literal(lo) if lo == hi else f"{_literal(lo)}-{_literal(hi)}" for lo, hi in items)
            out.append(f"[{'^' if negate else ''}{members}]")
        else:
            out.append(_literal(c))
    return "".join(out)


def glob_to_like(pattern: str) -> str | None:
    """A LIKE pattern equivalent to the glob, or None if it has a `[...]` set (LIKE has no sets).

    LIKE is far cheaper than a regex per session; `\\` is LIKE's default escape character.
    An unclosed `[` is a literal in fnmatch, but leaving those to the regex path keeps this simple.
    """
    if "[" in pattern:
        return None
    out: list[str] = []
    for char in pattern:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_\\":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def anchored_alternation(patterns: Sequence[str]) -> str | None:
    """One anchored ARE matching a name that matches any of `patterns`; None if none of them can match."""
    bodies = [body for body in (glob_to_regex(p) for p in patterns) if body is not None]
    if not bodies:
        return None
    return "^(?:" + "|".join(bodies) + ")$"


def matches_any(value: str | None, patterns: Sequence[str]) -> bool:
    """fnmatch semantics, case-sensitive; an empty list matches anything, a NULL value only an empty list."""
    if not patterns:
        return True
    if value is None:
        return False
    return any(fnmatchcase(value, p) for p in patterns)


def networks(cidrs: Sequence[str]) -> list[IpNetwork]:
    """Parse the model's (already validated) CIDRs, host bits allowed as Kubernetes users write them."""
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def address_in(address: str | None, nets: Sequence[IpNetwork]) -> bool:
    """Whether a client address lies in any network; an empty list matches all, incl. Unix sockets (None)."""
    if not nets:
        return True
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in nets)
