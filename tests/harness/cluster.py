"""A real single-node Kubernetes on this machine: `python -m tests.harness.cluster up|status|down`.

The e2e tier fakes what a kubelet does (Pods patched to Running with 127.x addresses), so it cannot see
what only a real node shows: the image as built, the non-root user, the read-only root filesystem,
probes, ServiceAccount tokens, pod networking. This module runs the whole thing, v1.37.2 like the
control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd (Debian's) with
runc, a kubelet and kube-proxy, pods on a bridge that reaches only this machine. No CoreDNS: pods reach
the API server through the `kubernetes` Service's IP (in their environment) and tests use pod IPs.

Layout: the admin kubeconfig, a matching kubectl, PKI, configs, logs and the pid file live in
`.cluster/` of the checkout; runtime state in `/run/pgwarden-cluster` and `/var/lib/pgwarden-cluster`;
binaries, images and containerd's content store in the cache (`PGWARDEN_CACHE`), so a warm bring-up
takes seconds. `down` stops everything, undoes what the pieces changed on the host and compares the
host with the snapshot taken before `up` (tests/harness/cluster_host.py): it fails if anything is left.

Why these settings (found on a trial on this machine kind, see the README): cgroup v1 only, hence
`failCgroupV1: false` and the cgroupfs driver; the sandbox lacks CAP_SYS_RESOURCE, hence containerd's
`restrict_oom_score_adj`; kube-proxy starts after the Node exists; `ipMasq: false` and a FORWARD drop
for anything leaving the bridge keep pods on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.harness.cluster_host import (
    Snapshot,
    remove_iptables_chains,
    remove_new_cgroups,
    restore_sysctls,
    unmount_under,
    write_sysctl,
)
from tests.harness.controlplane import (
    _cert_pem,
    _certificate,
    _http_ok,
    _key_pem,
    _key_usage,
    _leaf,
    _name,
    _new_key,
    _write,
    log_tail,
    pid_alive,
    terminate,
    write_kubeconfig,
)
from tests.harness.controlplane_assets import K8S_VERSION, REPO_ROOT
from tests.harness.paths import cache_root
from tests.harness.postgres import wait_for
from tests.harness.process_state import live_processes, read_state

STATE_DIR = REPO_ROOT / ".cluster"
KUBECONFIG = STATE_DIR / "kubeconfig"
KUBECTL = STATE_DIR / "bin" / "kubectl"
STATE_FILE = STATE_DIR / "state.json"
BASELINE_FILE = STATE_DIR / "baseline.json"
RUN_DIR = Path("/run/pgwarden-cluster")
DATA_DIR = Path("/var/lib/pgwarden-cluster")
CONTAINERD_SOCK = RUN_DIR / "containerd.sock"
MARKERS = (str(RUN_DIR), str(DATA_DIR), str(STATE_DIR))  # every process of ours names one of these

NODE_NAME = "pgwarden-node"
BRIDGE = "pgwbr0"
POD_CIDR = "10.88.0.0/16"
POD_GATEWAY = "10.88.0.1"
SERVICE_CIDR = "10.96.0.0/24"
KUBERNETES_SERVICE_IP = "10.96.0.1"
API_PORT = 16443
ETCD_CLIENT_PORT = 12379
ETCD_PEER_PORT = 12380
KUBELET_HEALTHZ_PORT = 10248
PROXY_HEALTHZ_PORT = 10256
PAUSE_IMAGE = "localhost/pause:pgwarden"
ISOLATION_CHAIN = "PGWARDEN-ISOLATE"
AUDIT_LOG = DATA_DIR / "audit.log"  # the API server's record of who did what (removed by `down`)
# Started in this order, stopped in the reverse; the kubelet needs containerd, kube-proxy the Node.
ORDER = (
    "containerd",
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
)
STARTUP_TIMEOUT = 120.0  # each step; a few seconds warm, slower while other engineers load the cores


def log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


# -- binaries ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bins:
    """Where each executable comes from: the Go builds in the cache, containerd and runc from Debian."""

    control_plane: Path
    node: Path

    def path(self, name: str) -> str:
        if name in ("etcd", "kube-apiserver", "kubectl"):
            return str(self.control_plane / name)
        if name == "containerd":
            return shutil.which("containerd") or "/usr/bin/containerd"
        return str(self.node / name)


def ensure_packages() -> None:
    """Debian's containerd, runc, CNI plugins, iptables, debootstrap and buildah, installed once."""
    subprocess.run(["bash", str(REPO_ROOT / "hack" / "cluster-deps.sh")], check=True)


def ensure_binaries() -> Bins:
    """Build (first time only, see hack/cluster-build.sh) and locate every binary."""
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "cluster-build.sh")], stdout=subprocess.PIPE, text=True, check=True
    )
    node = Path(done.stdout.strip().splitlines()[-1])
    control_plane = node.parents[2] / "controlplane"
    (built,) = control_plane.glob(f"k8s-{K8S_VERSION}-etcd-*/bin")
    return Bins(control_plane=built, node=node)


# -- PKI and kubeconfigs ----------------------------------------------------------------------------------------


def host_address() -> str:
    """The address of the interface carrying the default route: pods reach the API server there."""
    routes = json.loads(
        subprocess.run(
            ["ip", "-j", "-4", "route", "show", "default"], capture_output=True, text=True, check=True
        ).stdout
    )
    device = routes[0]["dev"]
    addresses = json.loads(
        subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "dev", device], capture_output=True, text=True, check=True
        ).stdout
    )
    return str(addresses[0]["addr_info"][0]["local"])


def write_pki(directory: Path, host: str) -> None:
    """CA, API serving cert (all names pods and the host use), admin, kubelet client, SA key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _new_key()
    ca = _certificate(
        _name("pgwarden-cluster-ca"),
        ca_key,
        None,
        ca_key,
        [(x509.BasicConstraints(ca=True, path_length=None), True), (_key_usage(cert_sign=True), True)],
    )
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", host, KUBERNETES_SERVICE_IP)
    ]
    names += [
        x509.DNSName(n)
        for n in (
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
    ]
    leaves = {
        "apiserver": (_name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, [x509.SubjectAlternativeName(names)]),
        "admin": (_name("admin", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH, []),
        "kubelet": (_name(f"system:node:{NODE_NAME}", "system:nodes"), ExtendedKeyUsageOID.CLIENT_AUTH, []),
    }
    _write(directory / "ca.crt", _cert_pem(ca))
    _write(directory / "ca.key", _key_pem(ca_key), 0o600)
    for stem, (subject, usage, extra) in leaves.items():
        key = _new_key()
        _write(directory / f"{stem}.crt", _cert_pem(_leaf(subject, key, ca, ca_key, usage, *extra)))
        _write(directory / f"{stem}.key", _key_pem(key), 0o600)
    sa_key = _new_key()
    _write(directory / "sa.key", _key_pem(sa_key), 0o600)
    public = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(directory / "sa.pub", public)


def cert_user(pki: Path, stem: str) -> dict[str, str]:
    return {"client-certificate": str(pki / f"{stem}.crt"), "client-key": str(pki / f"{stem}.key")}


# -- configuration files -----------------------------------------------------------------------------------------


def containerd_config() -> str:
    """containerd 1.6 with the CRI plugin on our own socket and directories (never the system's)."""
    root = cache_root() / "cluster" / "containerd"  # the content store: imported images survive `down`
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{root}"
state = "{RUN_DIR}/containerd"
[grpc]
  address = "{CONTAINERD_SOCK}"
[ttrpc]
  address = "{CONTAINERD_SOCK}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # The sandbox's root lacks CAP_SYS_RESOURCE: a negative oom_score_adj would fail every pod start.
  restrict_oom_score_adj = true
  enable_selinux = false
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{DATA_DIR}/cni/net.d"
"""


def cni_config() -> dict[str, Any]:
    """A bridge with host-local addresses; no masquerading, so nothing leaves the machine as the host."""
    return {
        "cniVersion": "1.0.0",
        "name": "pgwarden",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(DATA_DIR / "cni" / "ipam"),
                },
            },
            {"type": "loopback"},
        ],
    }


def kubelet_config(pki: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,  # this machine has cgroup v1 only (its own manager lives there)
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCK}",
        "authentication": {
            "x509": {"clientCAFile": str(pki / "ca.crt")},
            "webhook": {"enabled": True},
            "anonymous": {"enabled": False},
        },
        "authorization": {"mode": "Webhook"},
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": KUBELET_HEALTHZ_PORT,
        "readOnlyPort": 0,
        "resolvConf": str(STATE_DIR / "resolv.conf"),
        "podLogsDir": str(DATA_DIR / "pod-logs"),
        # Imported images have no registry to come back from: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "serializeImagePulls": False,
        "failSwapOn": False,
    }


def proxy_config() -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(STATE_DIR / "admin.kubeconfig")},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "healthzBindAddress": f"127.0.0.1:{PROXY_HEALTHZ_PORT}",
        "metricsBindAddress": "127.0.0.1:10249",
        # Zero: leave the host's conntrack limits alone (nothing to restore afterwards).
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False},  # else it sets route_localnet on every interface
    }


def audit_policy() -> dict[str, Any]:
    """What the API server records, at Metadata level (who, which verb, which object; never bodies, so no
    Secret's data): every request by pgwarden's namespace's ServiceAccounts, and every write to pgwarden's
    own resources by anyone. Tests read AUDIT_LOG to prove which identity the operator acts as; nothing
    else is kept, so the log stays small."""
    writes = ["create", "update", "patch", "delete"]
    return {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [
            {"level": "Metadata", "userGroups": ["system:serviceaccounts:pgwarden-system"]},
            {"level": "Metadata", "verbs": writes, "resources": [{"group": "pgwarden.dev"}]},
            {"level": "None"},
        ],
    }


def write_configs(host: str) -> None:
    pki = STATE_DIR / "pki"
    server = f"https://{host}:{API_PORT}"
    write_kubeconfig(
        KUBECONFIG, server=server, ca=pki / "ca.crt", user=cert_user(pki, "admin"), name="pgwarden-cluster"
    )
    shutil.copy(KUBECONFIG, STATE_DIR / "admin.kubeconfig")
    write_kubeconfig(
        STATE_DIR / "kubelet.kubeconfig",
        server=server,
        ca=pki / "ca.crt",
        user=cert_user(pki, "kubelet"),
        name="pgwarden-cluster",
    )
    (STATE_DIR / "containerd.toml").write_text(containerd_config())
    (STATE_DIR / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(pki)))
    (STATE_DIR / "kube-proxy.yaml").write_text(yaml.safe_dump(proxy_config()))
    (STATE_DIR / "audit-policy.yaml").write_text(yaml.safe_dump(audit_policy()))
    (STATE_DIR / "resolv.conf").write_text("# no DNS in pods: they use Service and pod IPs\n")
    cni = DATA_DIR / "cni" / "net.d"
    cni.mkdir(parents=True, exist_ok=True)
    (cni / "10-pgwarden.conflist").write_text(json.dumps(cni_config(), indent=1))


def argv_for(name: str, bins: Bins, host: str) -> list[str]:
    pki = STATE_DIR / "pki"
    admin = str(STATE_DIR / "admin.kubeconfig")
    exe = bins.path(name)
    if name == "containerd":
        return [exe, "--config", str(STATE_DIR / "containerd.toml")]
    if name == "etcd":
        return [
            exe,
            f"--data-dir={DATA_DIR / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--advertise-client-urls=http://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--listen-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}",
            f"--initial-cluster=default=http://127.0.0.1:{ETCD_PEER_PORT}",
            "--unsafe-no-fsync=true",
        ]
    if name == "kube-apiserver":
        return [
            exe,
            f"--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--bind-address={host}",
            f"--advertise-address={host}",  # pods reach it through the `kubernetes` Service
            f"--secure-port={API_PORT}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={pki / 'admin.crt'}",
            f"--kubelet-client-key={pki / 'admin.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--audit-policy-file={STATE_DIR / 'audit-policy.yaml'}",
            f"--audit-log-path={AUDIT_LOG}",
            "--audit-log-maxsize=20",  # MB, then rotated once: a long session cannot fill the disk
            "--audit-log-maxbackup=1",
        ]
    if name == "kube-controller-manager":
        return [
            exe,
            f"--kubeconfig={admin}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ]
    if name == "kube-scheduler":
        return [exe, f"--kubeconfig={admin}", "--bind-address=127.0.0.1", "--leader-elect=false"]
    if name == "kubelet":
        return [
            exe,
            f"--config={STATE_DIR / 'kubelet.yaml'}",
            f"--kubeconfig={STATE_DIR / 'kubelet.kubeconfig'}",
            f"--root-dir={DATA_DIR / 'kubelet'}",
            f"--cert-dir={DATA_DIR / 'kubelet' / 'pki'}",  # its default is not under --root-dir
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={host}",
        ]
    if name == "kube-proxy":
        return [exe, f"--config={STATE_DIR / 'kube-proxy.yaml'}"]
    raise ValueError(name)


# -- processes and state ------------------------------------------------------------------------------------------


def running() -> bool:
    """Whether a cluster started from this checkout is up (every component alive)."""
    state = read_state(STATE_FILE)
    return state is not None and set(live_processes(state)) == set(ORDER)


# The processes this Python process started (`up` from a test fixture): reaped by `down`, so no zombie
# and no "subprocess still running" warning. A `make cluster` run's children outlive it (own sessions).
_CHILDREN: dict[str, subprocess.Popen[bytes]] = {}


def spawn(name: str, argv: list[str], state: dict[str, Any]) -> None:
    logs = STATE_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("ab") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    _CHILDREN[name] = process  # kept, not garbage-collected while it runs; reaped in down()
    state["processes"][name] = [process.pid, argv[0]]
    STATE_FILE.write_text(json.dumps(state, indent=1))


def wait_ready(name: str, state: dict[str, Any], ready: Any, what: str) -> None:
    """Poll `ready` until true; fail early, with the log's tail, if the process died."""
    pid = state["processes"][name][0]

    def check() -> bool:
        if not pid_alive(pid):
            raise RuntimeError(f"{name} exited:\n{log_tail(STATE_DIR / 'logs' / f'{name}.log')}")
        return bool(ready())

    try:
        wait_for(check, timeout=STARTUP_TIMEOUT, interval=0.2, message=what)
    except TimeoutError as error:
        raise TimeoutError(f"{error}\n{log_tail(STATE_DIR / 'logs' / f'{name}.log')}") from error


def kubectl(
    *args: str, check: bool = True, timeout: float = 60, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KUBECTL), f"--kubeconfig={KUBECONFIG}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def ctr(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ctr", "--address", str(CONTAINERD_SOCK), "-n", "k8s.io", *args], capture_output=True, text=True, check=check
    )


# -- host networking ----------------------------------------------------------------------------------------------


def setup_network() -> None:
    """Forwarding on, bridge netfilter on (kube-proxy's Service rules see bridged packets), the pod bridge
    made by us (so the Service range can be routed onto it before the first pod), and a FORWARD chain
    that drops anything entering or leaving the bridge from or to another interface."""
    write_sysctl("net/ipv4/ip_forward", "1")
    write_sysctl("net/bridge/bridge-nf-call-iptables", "1")
    write_sysctl("net/bridge/bridge-nf-call-ip6tables", "1")
    ip = ["ip"]
    subprocess.run([*ip, "link", "add", BRIDGE, "type", "bridge"], check=True)
    subprocess.run([*ip, "addr", "add", f"{POD_GATEWAY}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE], check=True)
    subprocess.run([*ip, "link", "set", BRIDGE, "up"], check=True)
    # A packet to an unallocated Service IP goes to the bridge and dies there, never to the default route.
    subprocess.run([*ip, "route", "add", SERVICE_CIDR, "dev", BRIDGE], check=True)
    iptables = ["iptables", "-w"]
    subprocess.run([*iptables, "-N", ISOLATION_CHAIN], check=True)
    subprocess.run([*iptables, "-A", ISOLATION_CHAIN, "-i", BRIDGE, "-o", BRIDGE, "-j", "RETURN"], check=True)
    subprocess.run([*iptables, "-A", ISOLATION_CHAIN, "-i", BRIDGE, "-j", "DROP"], check=True)
    subprocess.run([*iptables, "-A", ISOLATION_CHAIN, "-o", BRIDGE, "-j", "DROP"], check=True)
    subprocess.run([*iptables, "-I", "FORWARD", "1", "-j", ISOLATION_CHAIN], check=True)


# -- images ------------------------------------------------------------------------------------------------------


def load_images() -> None:
    """Import the image archives `make image` saved (and the pause image) that containerd lacks or that
    were rebuilt since; containerd's store is in the cache, so this is a no-op when warm."""
    images = cache_root() / "images"
    if not (images / "pause.tar").exists():
        subprocess.run(["bash", str(REPO_ROOT / "hack" / "image-build.sh"), "pause"], check=True)
    stamps_file = cache_root() / "cluster" / "imported.json"
    stamps: dict[str, float] = json.loads(stamps_file.read_text()) if stamps_file.exists() else {}
    present = ctr("images", "ls", "-q").stdout.split()
    for archive in sorted(images.glob("*.tar")):
        if archive.name.startswith("debian-"):
            continue  # the debootstrap tree, not an image
        mtime = archive.stat().st_mtime
        if stamps.get(archive.name) == mtime and present:
            continue
        ctr("images", "import", str(archive), check=True)
        stamps[archive.name] = mtime
        log(f"imported {archive.name}")
    stamps_file.write_text(json.dumps(stamps))


# -- up ----------------------------------------------------------------------------------------------------------


def _api_ready(host: str) -> bool:
    context = ssl.create_default_context(cafile=str(STATE_DIR / "pki" / "ca.crt"))
    return _http_ok(host, API_PORT, "/readyz", context)


def _node_ready() -> bool:
    done = kubectl(
        "get", "node", NODE_NAME, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False
    )
    return done.stdout.strip() == "True"


def up() -> int:
    if running():
        log(f"already running; KUBECONFIG={KUBECONFIG}")
        return 0
    if read_state(STATE_FILE) is not None:
        log("a previous cluster left state behind; taking it down first")
        down()
    started = time.monotonic()
    ensure_packages()
    bins = ensure_binaries()
    built = time.monotonic()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    Snapshot.take(MARKERS).save(BASELINE_FILE)
    state: dict[str, Any] = {"processes": {}, "started": datetime.datetime.now(datetime.UTC).isoformat()}
    STATE_FILE.write_text(json.dumps(state))
    try:
        _bring_up(bins, state)
    except BaseException:
        log("bring-up failed; tearing down what was started")
        down()
        raise
    log(
        f"up in {time.monotonic() - started:.1f}s ({time.monotonic() - built:.1f}s after the builds); "
        f"export KUBECONFIG={KUBECONFIG}; kubectl: {KUBECTL}"
    )
    return 0


def _bring_up(bins: Bins, state: dict[str, Any]) -> None:
    host = host_address()
    state["host"] = host
    write_pki(STATE_DIR / "pki", host)
    KUBECTL.parent.mkdir(parents=True, exist_ok=True)
    KUBECTL.unlink(missing_ok=True)
    KUBECTL.symlink_to(bins.path("kubectl"))
    for directory in (RUN_DIR, DATA_DIR):
        directory.mkdir(parents=True, exist_ok=True)
    write_configs(host)
    setup_network()
    spawn("containerd", argv_for("containerd", bins, host), state)
    spawn("etcd", argv_for("etcd", bins, host), state)
    wait_ready("containerd", state, lambda: ctr("version").returncode == 0, "containerd")
    load_images()
    wait_ready("etcd", state, lambda: _http_ok("127.0.0.1", ETCD_CLIENT_PORT, "/health"), "etcd /health")
    spawn("kube-apiserver", argv_for("kube-apiserver", bins, host), state)
    wait_ready("kube-apiserver", state, lambda: _api_ready(host), "kube-apiserver /readyz")
    for name in ("kube-controller-manager", "kube-scheduler", "kubelet"):
        spawn(name, argv_for(name, bins, host), state)
    wait_ready("kubelet", state, _node_ready, f"node {NODE_NAME} Ready")
    spawn("kube-proxy", argv_for("kube-proxy", bins, host), state)  # exits if the Node does not exist yet
    wait_ready("kube-proxy", state, lambda: _http_ok("127.0.0.1", PROXY_HEALTHZ_PORT, "/healthz"), "kube-proxy synced")
    wait_ready(
        "kube-controller-manager",
        state,
        lambda: kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
        "the default ServiceAccount",
    )


# -- down --------------------------------------------------------------------------------------------------------


def _delete_pods(state: dict[str, Any]) -> None:
    """Stop the controllers (nothing re-creates pods), delete every pod and let the kubelet tear them
    down: that runs CNI DEL, so veths and addresses go the normal way."""
    live = live_processes(state)
    for name in ("kube-controller-manager", "kube-scheduler"):
        if name in live:
            terminate(live[name])
    if "kube-apiserver" not in live or "kubelet" not in live:
        return
    kubectl(
        "delete",
        "pods",
        "--all",
        "--all-namespaces",
        "--grace-period=0",
        "--force",
        "--wait=false",
        check=False,
        timeout=120,
    )
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not ctr("tasks", "ls", "-q").stdout.split(), timeout=90, interval=0.5, message="pods to stop")


def _task_removed(task: str) -> Callable[[], bool]:
    return lambda: ctr("tasks", "rm", "-f", task).returncode == 0


def _remove_containers() -> None:
    """What the kubelet did not get to: tasks killed, containers (and their snapshots) removed."""
    for task in ctr("tasks", "ls", "-q").stdout.split():
        ctr("tasks", "kill", "-s", "SIGKILL", task)
    for task in ctr("tasks", "ls", "-q").stdout.split():
        with contextlib.suppress(TimeoutError):
            wait_for(_task_removed(task), timeout=10, interval=0.2, message=f"task {task} removed")
    for container in ctr("containers", "ls", "-q").stdout.split():
        ctr("containers", "rm", container)


def _stop_processes(state: dict[str, Any]) -> None:
    live = live_processes(state)
    for name in reversed(ORDER):
        if name in live:
            terminate(live[name])
    for child in _CHILDREN.values():
        child.poll()
    _CHILDREN.clear()
    # containerd's shims outlive it by design; ours name our socket.
    for line in Snapshot.take(MARKERS).processes:
        pid, argv0 = line.split(maxsplit=1)
        if Path(argv0).name.startswith("containerd-shim"):  # never anything else that names our paths
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not Snapshot.take(MARKERS).processes, timeout=10, interval=0.2, message="shims to exit")


def down() -> int:
    """Stop everything, undo host changes, and compare with the snapshot taken before `up`."""
    state = read_state(STATE_FILE) or {"processes": {}}
    baseline = Snapshot.load(BASELINE_FILE) if BASELINE_FILE.exists() else None
    bins: Bins | None = None
    with contextlib.suppress(subprocess.CalledProcessError, ValueError, OSError):
        bins = ensure_binaries()
    _delete_pods(state)
    live = live_processes(state)
    for name in ("kube-proxy", "kubelet"):
        if name in live:
            terminate(live[name])
    if bins is not None:  # kube-proxy's own clean-up: every KUBE-* chain and rule, v4 and v6
        subprocess.run([bins.path("kube-proxy"), "--cleanup"], capture_output=True, check=False)
    if "containerd" in live:
        _remove_containers()
    _stop_processes(state)
    netns = Path("/run/netns")
    for pinned in netns.glob("cni-*") if netns.exists() else []:
        subprocess.run(["umount", str(pinned)], capture_output=True, check=False)
        pinned.unlink(missing_ok=True)
    unmount_under(RUN_DIR, DATA_DIR, cache_root() / "cluster" / "containerd", netns)
    if baseline is None:
        log("no baseline snapshot: nothing known about the host before `up`")
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        return 0
    remove_iptables_chains(("KUBE-", "CNI-", ISOLATION_CHAIN), baseline)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
    for veth in Path("/sys/class/net").iterdir():
        if veth.name.startswith("veth") and veth.name not in baseline.links:
            subprocess.run(["ip", "link", "del", veth.name], capture_output=True, check=False)
    remove_new_cgroups(baseline)
    restore_sysctls(baseline)
    for directory in (RUN_DIR, DATA_DIR):
        shutil.rmtree(directory, ignore_errors=True)
    # Fixed paths: shim sockets, pinned netns, libcni's cache, log links, the kubelet's device-plugin socket.
    for path in (
        "/run/containerd",
        "/run/netns",
        "/var/lib/cni",
        "/var/log/pods",
        "/var/log/containers",
        "/var/lib/kubelet",
    ):
        if path not in baseline.paths:
            shutil.rmtree(path, ignore_errors=True)
    problems = baseline.left_behind(Snapshot.take(MARKERS))
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    if problems:
        log("left behind:\n  " + "\n  ".join(problems))
        return 1
    log("down; the host is as it was before `up` (processes, mounts, iptables, links, routes, cgroups, sysctls)")
    return 0


def status() -> int:
    state = read_state(STATE_FILE)
    if state is None:
        print("no cluster")
        return 1
    live = live_processes(state)
    for name in ORDER:
        print(f"{name:25} {'running pid ' + str(live[name]) if name in live else 'NOT running'}")
    print(f"KUBECONFIG={KUBECONFIG}\nkubectl: {KUBECTL}")
    return 0 if set(live) == set(ORDER) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "status", "down"])
    command = parser.parse_args(argv).command
    return {"up": up, "status": status, "down": down}[command]()


if __name__ == "__main__":
    sys.exit(main())
