"""What a real single-node cluster changes on the host, and how to put it back.

`make cluster` runs a kubelet, containerd and kube-proxy as root on a shared machine, so `make
cluster-down` must leave that machine as it found it. Instead of trusting a list of undo steps, the
harness records a `Snapshot` of everything those components are known to touch (sysctls, iptables
rules v4 and v6, links, routes, network namespaces, mounts, top-level cgroups, well-known directories,
our processes) before bring-up, undoes what it can after tear-down, and compares: any difference is
reported as left behind. The undo steps are generic (restore recorded sysctls, remove new cgroups,
unmount under our directories), so a component that touches one more setting is caught, not missed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")

# Host settings the pieces change: ours (forwarding, bridge netfilter), the kubelet's kernel defaults,
# kube-proxy's route_localnet and conntrack limits. All are recorded and restored.
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/ipv4/conf/all/route_localnet",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)

# Fixed places the pieces write to whatever their configuration: containerd's shim sockets, libcni's
# result cache, the kubelet's container log links, network namespaces pinned by the CRI plugin.
WELL_KNOWN_PATHS = (
    "/run/containerd",
    "/run/netns",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/etc/cni",
    "/opt/cni",
    "/etc/kubernetes",
)


def _run(*argv: str) -> str:
    """stdout of a host tool, "" if it is missing or fails (a missing tool has changed nothing)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return ""
    return done.stdout if done.returncode == 0 else ""


def read_sysctls() -> dict[str, str]:
    values: dict[str, str] = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = (Path("/proc/sys") / name).read_text().strip()
    return values


def write_sysctl(name: str, value: str) -> None:
    (Path("/proc/sys") / name).write_text(value + "\n")


BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


def iptables_rules(command: str) -> list[str]:
    """`iptables-save` without comments and counters: the rules and chains, comparable over time.

    A table holding nothing but its built-in chains with policy ACCEPT filters nothing, so it counts as
    absent: with the nf_tables backend, the first `iptables` call creates such tables and no iptables
    command can delete them again (only `nft`, which is not installed).
    """
    lines: list[str] = []
    table: list[str] = []
    for line in _run(command).splitlines():
        line = re.sub(r"\s*\[\d+:\d+\]$", "", line)
        if line.startswith("#"):
            continue
        table.append(line)
        if line == "COMMIT":
            chains = [c for c in table if c.startswith(":")]
            empty = len(table) == len(chains) + 2 and all(
                c.split()[0][1:] in BUILTIN_CHAINS and c.split()[1] == "ACCEPT" for c in chains
            )
            if not empty:
                lines += table
            table = []
    return lines + table


def links() -> list[str]:
    return sorted(line.split(":")[1].strip().split("@")[0] for line in _run("ip", "-o", "link", "show").splitlines())


def routes() -> list[str]:
    return sorted(_run("ip", "route", "show").splitlines() + _run("ip", "-6", "route", "show").splitlines())


def mountpoints() -> list[str]:
    """Mount points in /proc/self/mountinfo, in mount order (field 5, octal escapes kept)."""
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def cgroups() -> list[str]:
    """Top-level cgroups of each v1 hierarchy (the kubelet adds `kubepods` to every one)."""
    found = []
    for hierarchy in sorted(CGROUP_ROOT.iterdir()):
        if hierarchy.is_dir() and not hierarchy.is_symlink():
            found += [f"{hierarchy.name}/{child.name}" for child in sorted(hierarchy.iterdir()) if child.is_dir()]
    return found


def processes_marked(markers: tuple[str, ...]) -> list[str]:
    """`pid argv0` of processes whose command line names one of our directories or sockets."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv)
        if any(marker in text for marker in markers):
            found.append(f"{entry.name} {argv[0].decode(errors='replace')}")
    return found


@dataclass
class Snapshot:
    """The host state the cluster may change, as comparable plain data."""

    sysctls: dict[str, str] = field(default_factory=dict)
    iptables: list[str] = field(default_factory=list)
    ip6tables: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)

    @classmethod
    def take(cls, markers: tuple[str, ...]) -> Snapshot:
        return cls(
            sysctls=read_sysctls(),
            iptables=iptables_rules("iptables-save"),
            ip6tables=iptables_rules("ip6tables-save"),
            links=links(),
            routes=routes(),
            mounts=mountpoints(),
            cgroups=cgroups(),
            paths=[p for p in WELL_KNOWN_PATHS if os.path.lexists(p)],
            processes=processes_marked(markers),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Snapshot:
        return cls(**json.loads(path.read_text()))

    def left_behind(self, after: Snapshot) -> list[str]:
        """Human-readable differences from this (the before) to `after`; empty when nothing is left."""
        problems = [f"process still running: {p}" for p in after.processes]
        for name, value in self.sysctls.items():
            if after.sysctls.get(name) != value:
                problems.append(f"sysctl {name}: {after.sysctls.get(name)} (was {value})")
        for label in ("iptables", "ip6tables", "links", "routes", "mounts", "cgroups", "paths"):
            before, now = getattr(self, label), getattr(after, label)
            problems += [f"{label}: added {item}" for item in now if item not in before]
            if label != "mounts":  # others' mounts come and go (an image build); ours are only ever added
                problems += [f"{label}: removed {item}" for item in before if item not in now]
        return problems


# -- undo -------------------------------------------------------------------------------------------------


def restore_sysctls(before: Snapshot) -> None:
    for name, value in before.sysctls.items():
        if read_sysctls().get(name) != value:
            with contextlib.suppress(OSError):
                write_sysctl(name, value)


def unmount_under(*prefixes: Path) -> None:
    """Unmount everything mounted at or below the prefixes, deepest first (lazy as a last resort)."""
    targets = [m for m in mountpoints() if any(m == str(p) or m.startswith(f"{p}/") for p in prefixes)]
    for target in sorted(set(targets), key=lambda m: m.count("/"), reverse=True):
        path = target.encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
        if subprocess.run(["umount", path], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True, check=False)


def remove_new_cgroups(before: Snapshot) -> None:
    """rmdir (leaves first) every top-level cgroup that did not exist before; only empty ones can go."""
    for entry in cgroups():
        if entry in before.cgroups:
            continue
        top = CGROUP_ROOT / entry
        for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def remove_iptables_chains(prefixes: tuple[str, ...], before: Snapshot) -> None:
    """Flush and delete chains whose names start with a prefix, after dropping every jump to them.

    Only chains absent from the before snapshot are touched, so rules someone else owns stay.
    """
    for command, saved in (("iptables", before.iptables), ("ip6tables", before.ip6tables)):
        existing = {line.split()[0][1:] for line in saved if line.startswith(":")}
        table = ""
        ours: list[tuple[str, str]] = []
        for line in iptables_rules(f"{command}-save"):
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                chain = line.split()[0][1:]
                if chain.startswith(prefixes) and chain not in existing:
                    ours.append((table, chain))
        names = {chain for _, chain in ours}
        for line in iptables_rules(f"{command}-save"):
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith("-A ") and (set(line.split()) & names):
                rule = shlex.split(line)[1:]  # comments are quoted
                chain, spec = rule[0], rule[1:]
                if chain not in names:  # a jump from a built-in chain into ours
                    subprocess.run([command, "-t", table, "-D", chain, *spec], capture_output=True, check=False)
        for table_name, chain in ours:
            subprocess.run([command, "-t", table_name, "-F", chain], capture_output=True, check=False)
        for table_name, chain in ours:
            subprocess.run([command, "-t", table_name, "-X", chain], capture_output=True, check=False)
