"""`make demo`: pgwarden end to end on this machine, with no cluster and nothing installed by hand.

Why it exists: a newcomer should see in about a minute what pgwarden does, and what a user looks at while
it does it, without a Kubernetes cluster or a PostgreSQL server of their own. The demo starts what a cluster
would provide (etcd + kube-apiserver with RBAC: the test harness's `ControlPlane`) and a throwaway
PostgreSQL, installs `manifests/` with kubectl as a user would, and runs the operator as a local process
authenticated as the ServiceAccount those manifests create (a TokenRequest token), so the RBAC shipped
there is the RBAC seen working. No kubelet runs here, so the PostgreSQL "pod" is an API object whose
status says Running at the local server's address, as the end-to-end tests do.

It ends by itself, exits 0 only if the idle sessions were terminated (their clients got FATAL 57P01) while
the excluded and the busy session survived, and stops everything it started in `finally` blocks, on
Ctrl-C and SIGTERM too. Every wait polls with a deadline. Run it with `make demo`, which builds the
control-plane binaries and fetches PostgreSQL first.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, cast

import psycopg
import yaml
from kubernetes import client

from pgwarden.policy.api import API_VERSION, CREDENTIALS_LABEL, GROUP, KIND, PLURAL, VERSION, EventReason
from tests.harness.controlplane import ControlPlane, log_tail, pid_alive
from tests.harness.k8s import create_running_pod
from tests.harness.pgbinaries import selected_versions
from tests.harness.postgres import PgServer, Session, free_port, running_server, wait_for

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "demo"
OPERATOR_NAMESPACE = "pgwarden-system"  # where manifests/ puts the ServiceAccount the ClusterRole is bound to
SERVICE_ACCOUNT = "pgwarden"
SA_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{SERVICE_ACCOUNT}"
CRD = "postgrespolicies.pgwarden.dev"
PG_HOST = "127.0.77.1"  # a loopback address of its own, as a pod would have its own IP
POD = "db-0"
POD_LABELS = {"app": "postgres"}
POLICY = "idle-reaper"
STATE_AGE = "5s"
INTERVAL = "30s"
EXCLUDED_APP = "pg_dump"  # the protected session's application_name, matched by `exclude.applicationNames`
IDLE_SESSIONS = 3

APPLY_TIMEOUT = 60.0  # `kubectl apply -k`, retried while the new CRDs become served
OPERATOR_START_TIMEOUT = 60.0  # until /healthz answers
ENFORCE_TIMEOUT = 60.0  # from the policy's creation until the idle sessions must be gone
SURVIVE_SECONDS = 8.0  # the spared sessions are watched this long afterwards (more than stateAge)
REPORT_TIMEOUT = 20.0  # for the status totals and the Event to show the terminations
STOP_TIMEOUT = 20.0  # for the operator to exit on SIGTERM before it is killed
POLL = 1.0


# -- output ------------------------------------------------------------------------------------------------


class Console:
    """Section headers with the time since start, and commands shown as a user would type them."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.step = 0

    def clock(self) -> str:
        return f"t+{time.monotonic() - self.started:.0f}s"

    def section(self, title: str) -> None:
        self.step += 1
        header = f"== {self.step}. {title} "
        print(f"\n{header}{'=' * max(3, 100 - len(header) - 8)} {self.clock():>6}")

    def say(self, text: str) -> None:
        print(textwrap.fill(text, width=100, break_on_hyphens=False))

    def command(self, shown: str, output: str) -> None:
        print(f"$ {shown}")
        print(textwrap.indent(output.rstrip("\n"), "  ") if output.strip() else "  (no output)")


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A left-aligned text table, the way kubectl prints one."""
    cells = [[str(h) for h in header], *[["" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


# -- kubectl -----------------------------------------------------------------------------------------------


class Kubectl:
    """The control plane's kubectl (built from the pinned module), run and shown without the kubeconfig flag."""

    def __init__(self, plane: ControlPlane, console: Console) -> None:
        self.plane = plane
        self.console = console

    def run(self, *args: str, kubeconfig: Path | None = None) -> str:
        done = self.plane.kubectl(*args, kubeconfig=kubeconfig, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}{done.stdout}")
        return done.stdout

    def show(self, *args: str, shown: str | None = None, kubeconfig: Path | None = None) -> str:
        output = self.run(*args, kubeconfig=kubeconfig)
        self.console.command(shown or "kubectl " + " ".join(args), output)
        return output

    def apply_manifests(self) -> None:
        """`kubectl apply -k manifests/`, again if it failed only because a CRD it had just created was not served.

        One apply creates the CRDs and an object of one of those kinds (the ClusterKopfPeering); the API
        server needs a moment before it serves a new kind, so the first apply may end with "ensure CRDs are
        installed first". Applying again is what users and GitOps tools (which retry) do.
        """
        deadline = time.monotonic() + APPLY_TIMEOUT
        shown = "kubectl apply -k manifests/"
        while True:
            done = self.plane.kubectl("apply", "-k", str(REPO / "manifests"), check=False)
            if done.returncode == 0:
                self.console.command(shown, done.stdout)
                return
            if "ensure CRDs are installed first" not in done.stderr or time.monotonic() > deadline:
                raise RuntimeError(f"kubectl apply -k manifests/ failed:\n{done.stderr}")
            self.console.command(shown, done.stdout + done.stderr.replace(str(REPO) + "/", ""))
            shown = "kubectl apply -k manifests/   # again: the new CRDs are served now"
            time.sleep(POLL)


# -- PostgreSQL --------------------------------------------------------------------------------------------

ACTIVITY = """
SELECT pid, usename, application_name, coalesce(host(client_addr), 'socket'), state,
       coalesce(extract(epoch FROM now() - state_change)::int, 0), left(query, 24)
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
ORDER BY pid
"""
ACTIVITY_HEADER = ("PID", "USER", "APPLICATION", "CLIENT", "STATE", "AGE(s)", "QUERY", "EXPECTED")


def pg_major() -> str:
    """18, or the first major PGWARDEN_PG_VERSIONS names (what `make assets` fetched)."""
    return selected_versions()[0] if os.environ.get("PGWARDEN_PG_VERSIONS") else "18"


@dataclass
class Sessions:
    """The client sessions the demo opened, by what should happen to them."""

    idle: list[Session]
    protected: Session
    busy: Session

    def expectation(self, pid: int, user: str) -> str:
        if pid in {s.pid for s in self.idle}:
            return f"terminated after {STATE_AGE} idle"
        if pid == self.protected.pid:
            return f"kept: excluded ({EXCLUDED_APP}*)"
        if pid == self.busy.pid:
            return "kept: busy (active)"
        return "kept: pgwarden's own" if user == SERVICE_ACCOUNT else ""


def activity(monitor: psycopg.Connection[Any], sessions: Sessions) -> list[tuple[Any, ...]]:
    """pg_stat_activity's client sessions (less the demo's own), each with what should happen to it."""
    rows = monitor.execute(ACTIVITY).fetchall()
    return [(*row, sessions.expectation(row[0], row[1])) for row in rows]


def open_sessions(server: PgServer, password: str, console: Console) -> Sessions:
    """Three idle application sessions, one excluded by name, one busy in a long query."""
    idle = [
        server.open_session("idle", user="app", password=password, application_name="web") for _ in range(IDLE_SESSIONS)
    ]
    protected = server.open_session("idle", user="app", password=password, application_name=EXCLUDED_APP)
    busy = server.open_session("active", user="app", password=password, application_name="web", sleep_seconds=600)
    console.say(
        f"As role `app` over TCP: {IDLE_SESSIONS} idle sessions (application `web`), one idle `{EXCLUDED_APP}` "
        "session the policy excludes by name, and one busy session running SELECT pg_sleep(600)."
    )
    return Sessions(idle, protected, busy)


def query_result(session: Session) -> str:
    """What `SELECT 1` gets on the session's own connection: its row, or the SQLSTATE and message."""
    try:
        return str(session.conn.execute("SELECT 1").fetchone())
    except psycopg.Error as error:
        return f"{error.sqlstate} {str(error).strip()}"


# -- the operator ------------------------------------------------------------------------------------------


def deployment_args(replaced: Collection[str]) -> list[str]:
    """The container args of manifests/' Deployment, with the `replaced` options kept as bare flags.

    The demo runs the operator with exactly the Deployment's arguments and ServiceAccount, so what it shows
    working is what a cluster would run; only the ports change, to free ones, since this is one machine.
    """
    deployment = yaml.safe_load((REPO / "manifests" / "operator" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args: list[str] = []
    skip_value = False
    for arg in container.get("args", []):
        name = arg.split("=", 1)[0]
        if skip_value:
            skip_value = False
        elif name in replaced:
            args.append(name)
            skip_value = "=" not in arg  # `--metrics-port 9090`: drop the value too
        else:
            args.append(arg)
    return args + [name for name in replaced if name not in args]


class Operator:
    """`python -m pgwarden run`, as the Deployment would run it, in its own session with its log in a file."""

    def __init__(self, kubeconfig: Path, log_path: Path) -> None:
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.log_path = log_path
        ports = {"--metrics-port": self.metrics_port, "--health-port": self.health_port}
        self.args = ["run", *(f"{a}={ports[a]}" if a in ports else a for a in deployment_args(ports))]
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONPATH=str(REPO / "operator"))
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgwarden", *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the demo only, which then stops this in order
            )

    def _get(self, port: int, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            return None

    def wait_healthy(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}:\n{log_tail(self.log_path)}")
            return self._get(self.health_port, "/healthz") is not None

        wait_for(ready, timeout=OPERATOR_START_TIMEOUT, interval=0.2, message="the operator's /healthz")

    def metrics(self, prefix: str) -> list[str]:
        text = self._get(self.metrics_port, "/metrics") or ""
        return [line for line in text.splitlines() if line.startswith(prefix)]

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {self.proc.returncode}:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        """SIGTERM (kopf finishes its handlers), then SIGKILL to the whole session after STOP_TIMEOUT."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT)


# -- Kubernetes objects ------------------------------------------------------------------------------------


def policy_manifest(port: int) -> dict[str, Any]:
    """The seed's idle-connection reaper with a short threshold, aimed at the demo pod."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": POLICY, "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": POD_LABELS},
            "connection": {"port": port, "credentialsSecret": {"name": "pg-credentials"}},
            "interval": INTERVAL,
            "sessions": [{"name": "idle", "action": "terminate", "states": ["idle"], "stateAge": STATE_AGE}],
            "exclude": {"users": ["postgres"], "applicationNames": [f"{EXCLUDED_APP}*"]},
        },
    }


def policy_status(api: client.ApiClient) -> dict[str, Any]:
    body = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, POLICY)
    return dict(cast(dict[str, Any], body).get("status") or {})


def policy_events(api: client.ApiClient) -> list[Any]:
    selector = "involvedObject.kind=PostgresPolicy"
    return list(client.CoreV1Api(api).list_namespaced_event(NAMESPACE, field_selector=selector).items)


EVERYONE = ("selfsubject", "clustertrustbundles")  # granted to all authenticated users by default roles


def resource_rules(listing: str) -> list[tuple[str, str, str]]:
    """`kubectl auth can-i --list` reduced to the rules on resources that this identity was given."""
    header, *lines = listing.splitlines()
    urls, names, verbs = (header.index(title) for title in ("Non-Resource URLs", "Resource Names", "Verbs"))
    rules = []
    for line in lines:
        resource = line[:urls].strip()
        if resource and not resource.startswith(EVERYONE):
            rules.append((resource, line[names:verbs].strip(), line[verbs:].strip()))
    return sorted(rules)


RuleKey = tuple[str, str]  # (resource as `kubectl auth can-i --list` names it, its resource names)


def granted(rules: Sequence[tuple[str, str, str]]) -> dict[RuleKey, set[str]]:
    """`resource_rules` output as {(resource, names): verbs}, rows for the same key merged."""
    found: dict[RuleKey, set[str]] = {}
    for resource, names, verbs in rules:
        found.setdefault((resource, names), set()).update(verbs.strip("[]").split())
    return found


def clusterrole_grants() -> dict[RuleKey, set[str]]:
    """What manifests/rbac/clusterrole.yaml grants, keyed the way `kubectl auth can-i --list` prints it."""
    path = REPO / "manifests" / "rbac" / "clusterrole.yaml"
    (role,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "ClusterRole"]
    rows = []
    for rule in role["rules"]:
        names = f"[{' '.join(rule.get('resourceNames', []))}]"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                base, _, sub = resource.partition("/")
                shown = (f"{base}.{group}" if group else base) + (f"/{sub}" if sub else "")
                rows.append((shown, names, " ".join(rule["verbs"])))
    return granted(rows)


def without_age(output: str) -> str:
    """kubectl's table with the AGE column blanked, to tell a real change from the clock ticking."""
    lines = output.splitlines()
    if not lines:
        return output
    match = re.search(r"AGE\s+", lines[0])
    if match is None:
        return output
    start, end = match.span()
    return "\n".join(line[:start] + line[end:] for line in lines)


# -- the steps ---------------------------------------------------------------------------------------------


@dataclass
class Demo:
    console: Console
    workdir: Path
    stack: contextlib.ExitStack
    plane: ControlPlane | None = None
    kubectl: Kubectl | None = None
    api: client.ApiClient | None = None
    server: PgServer | None = None
    operator: Operator | None = None
    rbac_exact: bool = False  # the ServiceAccount may do exactly what manifests/rbac/clusterrole.yaml grants

    def start_control_plane(self) -> tuple[ControlPlane, Kubectl, client.ApiClient]:
        self.console.section("Kubernetes API server (etcd + kube-apiserver, RBAC on) on 127.0.0.1")
        plane = ControlPlane(self.workdir / "controlplane", kubeconfig=self.workdir / "admin.kubeconfig")
        self.stack.callback(self._stop_control_plane, plane)
        plane.start()
        self.plane, self.kubectl = plane, Kubectl(plane, self.console)
        self.api = self.stack.enter_context(plane.api_client())
        self.console.say(
            f"kube-apiserver at {plane.server}, up in {plane.timings['total']:.1f}s. No kubelet, scheduler or "
            "controller-manager: objects are stored and validated, but nothing starts containers."
        )
        self.kubectl.show("version")
        return plane, self.kubectl, self.api

    def _stop_control_plane(self, plane: ControlPlane) -> None:
        plane.stop(remove=False)  # the work dir, logs included, is removed (or kept) at the very end
        print("  control plane stopped (kube-apiserver, etcd)")

    def start_postgres(self) -> PgServer:
        major = pg_major()
        self.console.section(f"PostgreSQL {major} on {PG_HOST}")
        self.stack.callback(print, "  PostgreSQL stopped and its data directory removed")
        server = self.stack.enter_context(running_server(major, host=PG_HOST, hba="password"))
        self.server = server
        (version,) = server.execute("SHOW server_version")[0]
        self.console.say(
            f"PostgreSQL {version} listening on {server.host}:{server.port}; TCP clients log in with a "
            "password (scram-sha-256). This address plays the pod IP."
        )
        return server

    def install_manifests(self, kubectl: Kubectl) -> None:
        self.console.section("Install pgwarden: kubectl apply -k manifests/")
        kubectl.apply_manifests()
        kubectl.show("wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=30s")
        kubectl.show("get", "deployment/pgwarden", "serviceaccount/pgwarden", "-n", OPERATOR_NAMESPACE)
        self.console.say(
            "The Deployment stays at 0 ready replicas: no controller-manager or kubelet runs here, so its pods are "
            "never created or started. The demo runs its command, `pgwarden run` with the Deployment's args, as a "
            f"local process instead, with a token of the Deployment's ServiceAccount {OPERATOR_NAMESPACE}/"
            f"{SERVICE_ACCOUNT}."
        )

    def prepare_namespace(self, kubectl: Kubectl, api: client.ApiClient, server: PgServer) -> str:
        """The demo namespace, a least-privilege PostgreSQL role for pgwarden, its Secret, the pod."""
        self.console.section(f"Namespace `{NAMESPACE}`, a PostgreSQL role for pgwarden, its Secret, a pod")
        kubectl.show("create", "namespace", NAMESPACE)
        password = secrets.token_urlsafe(18)  # the demo's throwaway roles share one random password
        server.create_role(SERVICE_ACCOUNT, password=password, grants=("pg_signal_backend", "pg_read_all_stats"))
        server.create_role("app", password=password)
        print(
            "$ psql -c 'CREATE ROLE pgwarden LOGIN PASSWORD ...; "
            "GRANT pg_signal_backend, pg_read_all_stats TO pgwarden'\n"
            "  (least privilege: signal non-superuser backends, read every session in pg_stat_activity)"
        )
        kubectl.run(
            "create", "secret", "generic", "pg-credentials", "-n", NAMESPACE,
            f"--from-literal=username={SERVICE_ACCOUNT}", f"--from-literal=password={password}",
        )  # fmt: skip
        self.console.command(
            f"kubectl create secret generic pg-credentials -n {NAMESPACE} "
            f"--from-literal=username={SERVICE_ACCOUNT} --from-literal=password=...",
            "secret/pg-credentials created",
        )
        # pgwarden reads only Secrets that opt in: a policy could otherwise name any Secret of the namespace.
        kubectl.show("label", "secret", "pg-credentials", "-n", NAMESPACE, f"{CREDENTIALS_LABEL}=true")
        create_running_pod(api, NAMESPACE, POD, POD_LABELS, server.host, image=f"postgres:{server.major}")
        print(f"(pod {POD} created, and its status written through pods/status as kubelet would: Running at {PG_HOST})")
        kubectl.show("get", "pods", "-n", NAMESPACE, "-o", "wide", "--show-labels")
        return password

    def start_operator(self, plane: ControlPlane, kubectl: Kubectl) -> Operator:
        self.console.section(f"Run the operator as the ServiceAccount {OPERATOR_NAMESPACE}/{SERVICE_ACCOUNT}")
        token = plane.token_for(OPERATOR_NAMESPACE, SERVICE_ACCOUNT, expiration_seconds=3600)
        kubeconfig = plane.kubeconfig_for_token(token, self.workdir / "pgwarden.kubeconfig")
        print(f"(a token from the TokenRequest API, for {SA_USER})")
        rules = resource_rules(kubectl.run("auth", "can-i", "--list", "-n", NAMESPACE, kubeconfig=kubeconfig))
        self.console.command(
            f"kubectl auth can-i --list -n {NAMESPACE}   # as {SA_USER}; resource rules only",
            table(rules, ("RESOURCES", "RESOURCE NAMES", "VERBS")),
        )
        self.rbac_exact = granted(rules) == clusterrole_grants()
        print(
            "  (left out: the discovery URLs and self-reviews every authenticated identity may use)\n"
            + (
                "  Exactly what manifests/rbac/clusterrole.yaml grants, nothing more; for example:"
                if self.rbac_exact
                else "  NOT what manifests/rbac/clusterrole.yaml grants (see the Result); for example:"
            )
        )
        for verb, resource in (("list", "secrets"), ("delete", "pods"), ("update", "postgrespolicies")):
            answer = plane.kubectl("auth", "can-i", verb, resource, "-n", NAMESPACE, kubeconfig=kubeconfig, check=False)
            print(f"$ kubectl auth can-i {verb} {resource} -n {NAMESPACE}   -> {answer.stdout.strip()}")
        self.stack.callback(print, "  operator stopped")
        operator = Operator(kubeconfig, self.workdir / "operator.log")
        self.operator = operator
        self.stack.callback(operator.stop)
        print(f"$ KUBECONFIG=pgwarden.kubeconfig pgwarden {' '.join(operator.args)}   # the Deployment's args")
        operator.wait_healthy()
        print(
            f"  up (pid {operator.proc.pid}); /healthz on :{operator.health_port}, /metrics on :{operator.metrics_port}"
        )
        return operator

    def create_policy(self, kubectl: Kubectl, server: PgServer) -> None:
        self.console.section(f"The idle-connection policy: terminate sessions idle for more than {STATE_AGE}")
        path = self.workdir / "policy.yaml"
        path.write_text(yaml.safe_dump(policy_manifest(server.port), sort_keys=False))
        print("$ cat policy.yaml")
        print(textwrap.indent(path.read_text().rstrip(), "  "))
        kubectl.show("apply", "-f", str(path), shown="kubectl apply -f policy.yaml")
        self.console.say(
            "pgwarden evaluates the pod when the policy appears and again as each idle session crosses 5s (at least "
            "every 30s). Its default blast-radius limit (limits.maxFractionPerCycle: 0.5 of the client sessions) "
            "may spread the terminations over two cycles a second apart."
        )

    def watch(self, kubectl: Kubectl, api: client.ApiClient, operator: Operator, sessions: Sessions) -> None:
        """Print what changes, as it changes, until the idle sessions are gone and reported (or time is up)."""
        self.console.section("Watching: sessions, the policy, its Events")
        assert self.server is not None
        monitor = self.stack.enter_context(self.server.connect(application_name="pgwarden-demo-monitor"))
        idle = {s.pid for s in sessions.idle}
        spared = {sessions.protected.pid, sessions.busy.pid}
        began = time.monotonic()
        deadline = began + ENFORCE_TIMEOUT
        last_sessions: object = None
        last_policy = ""
        seen_events: set[str] = set()
        gone_at: float | None = None
        while True:
            operator.check_running()
            rows = activity(monitor, sessions)
            key = [(r[0], r[4]) for r in rows if r[1] != SERVICE_ACCOUNT]
            if key != last_sessions:
                last_sessions = key
                print(f"\n[{self.console.clock()}] sessions in pg_stat_activity:")
                print(textwrap.indent(table(rows, ACTIVITY_HEADER), "  "))
            policy = kubectl.run("get", "pgpolicy", "-n", NAMESPACE, "-o", "wide")
            if without_age(policy) != without_age(last_policy):
                last_policy = policy
                print(f"\n[{self.console.clock()}]")
                self.console.command(f"kubectl get pgpolicy -n {NAMESPACE} -o wide", policy)
            events = policy_events(api)
            if {e.metadata.uid for e in events} - seen_events:
                seen_events |= {e.metadata.uid for e in events}
                print(f"\n[{self.console.clock()}]")
                kubectl.show("get", "events", "-n", NAMESPACE, "--field-selector", "involvedObject.kind=PostgresPolicy")
            present = {r[0] for r in rows}
            if gone_at is None and not idle & present:
                gone_at = time.monotonic()
                deadline = gone_at + max(SURVIVE_SECONDS, REPORT_TIMEOUT)
                print(f"\n[{self.console.clock()}] the {IDLE_SESSIONS} idle sessions are gone; watching the others")
            reported = (policy_status(api).get("totals") or {}).get("terminated", 0) >= IDLE_SESSIONS and any(
                e.reason == EventReason.SESSIONS_TERMINATED for e in events
            )
            if gone_at is not None and reported and time.monotonic() - gone_at >= SURVIVE_SECONDS:
                return
            if not spared <= present or time.monotonic() > deadline:
                return  # a spared session died, or time is up: the verdict says which
            time.sleep(POLL)

    def verdict(self, kubectl: Kubectl, operator: Operator, sessions: Sessions) -> bool:
        """Check on PostgreSQL, at the clients themselves and in the operator's log; True only if all is right."""
        self.console.section("Result")
        assert self.server is not None
        checks: list[tuple[bool, str]] = []
        for session in sessions.idle:
            gone = not self.server.alive(session.pid)
            client_saw = query_result(session)
            checks.append(
                (gone and client_saw.startswith("57P01"), f"idle pid {session.pid}: gone; its client got {client_saw}")
            )
        state = self.server.state_of(sessions.protected.pid)
        client_saw = query_result(sessions.protected)
        checks.append(
            (
                state == "idle" and client_saw == "(1,)",
                f"{EXCLUDED_APP} pid {sessions.protected.pid}: {state}; SELECT 1 still answers {client_saw}",
            )
        )
        state = self.server.state_of(sessions.busy.pid)
        checks.append((state == "active", f"busy pid {sessions.busy.pid}: {state}, still in pg_sleep(600)"))
        checks.append((self.rbac_exact, f"{SA_USER} may do exactly what manifests/rbac/clusterrole.yaml grants"))
        denied = [line for line in operator.log_path.read_text(errors="replace").splitlines() if "Forbidden" in line]
        checks.append((not denied, f"the operator, as {SA_USER}, was denied nothing ({len(denied)} 403s in its log)"))
        for good, text in checks:
            print(f"  {'ok  ' if good else 'FAIL'} {text}")
        ok = all(good for good, _ in checks)
        print()
        kubectl.show("get", "pgpolicy", "-n", NAMESPACE, "-o", "wide")
        metrics = operator.metrics("pgwarden_actions_total{")
        self.console.command(
            f"curl -s 127.0.0.1:{operator.metrics_port}/metrics | grep ^pgwarden_actions_total", "\n".join(metrics)
        )
        return ok


# -- main --------------------------------------------------------------------------------------------------


INTERRUPTED: list[int] = []  # signals received; a step that failed because of one was interrupted, not broken


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C and SIGTERM: note it and unwind, so the `finally` blocks stop what was started."""
    INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # show progress through `tee` too
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job keeps ignoring Ctrl-C
        signal.signal(signal.SIGINT, _interrupt)
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-demo-"))
    workdir.chmod(0o755)
    stack = contextlib.ExitStack()
    demo = Demo(console, workdir, stack)
    return_code = 1  # until the verdict says otherwise
    print("pgwarden demo: a local Kubernetes API server and PostgreSQL, the manifests, the operator, a policy.")
    print("Everything runs on this machine, on 127.0.0.0/8, and is stopped at the end (also on Ctrl-C).")
    try:
        plane, kubectl, api = demo.start_control_plane()
        server = demo.start_postgres()
        demo.install_manifests(kubectl)
        password = demo.prepare_namespace(kubectl, api, server)
        console.section("Client sessions")
        sessions = open_sessions(server, password, console)
        operator = demo.start_operator(plane, kubectl)
        demo.create_policy(kubectl, server)
        demo.watch(kubectl, api, operator, sessions)
        return_code = 0 if demo.verdict(kubectl, operator, sessions) else 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return_code = 130
    except Exception as error:
        # Ctrl-C reaches the whole process group: a child (initdb, kubectl) may fail of it before we see it.
        return_code = 130 if INTERRUPTED else 1
        print(f"\n{'interrupted' if INTERRUPTED else 'demo failed'}: {error}", file=sys.stderr)
    finally:
        _cleanup(console, stack, demo, keep_workdir=return_code == 1)
    if return_code == 0:
        print(f"\nDemo passed in {time.monotonic() - console.started:.0f}s: idle sessions terminated, the others kept.")
    elif return_code == 1:
        print(f"\nDemo FAILED; its logs (operator.log, controlplane/*.log) are kept in {workdir}", file=sys.stderr)
    return return_code


def _started_processes(demo: Demo) -> dict[str, int]:
    """What the demo started and must have stopped: operator, postmaster, kube-apiserver, etcd."""
    found: dict[str, int] = {}
    if demo.operator is not None:
        found["operator"] = demo.operator.proc.pid
    if demo.server is not None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            found["postgres"] = int((demo.server.datadir / "postmaster.pid").read_text().split()[0])
    if demo.plane is not None:
        found |= demo.plane.pids
    return found


def _cleanup(console: Console, stack: contextlib.ExitStack, demo: Demo, *, keep_workdir: bool) -> None:
    """Stop the operator, PostgreSQL and the control plane (in that order), deaf to further Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    console.section("Cleaning up")
    started = _started_processes(demo)
    stack.close()
    leftovers = [f"{name} (pid {pid})" for name, pid in started.items() if pid_alive(pid)]
    if leftovers:
        print(f"  STILL RUNNING: {', '.join(leftovers)}")
    elif started:
        print(f"  nothing left running ({', '.join(started)} stopped)")
    if not keep_workdir:
        shutil.rmtree(demo.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
