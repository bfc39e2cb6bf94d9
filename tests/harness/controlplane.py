"""A real Kubernetes API server for tests: etcd + kube-apiserver on 127.0.0.1, the envtest model.

pgwarden's controller talks to Kubernetes through kopf and the official client; a fake API would test
our idea of Kubernetes rather than Kubernetes. controller-runtime's envtest showed that etcd and
kube-apiserver alone give real admission, validation, RBAC, CRDs and watches in a few seconds, without
kubelet, scheduler or controller-manager. What that leaves out (Pods stay Pending, namespaces never
finish deleting, no garbage collection) is worked around in `tests/harness/k8s.py`.

`ControlPlane` generates its PKI with `cryptography`, starts both processes in their own sessions on
free ports, waits for `/readyz` and the `default` namespace, writes an admin kubeconfig, and stops
everything again (SIGTERM, then SIGKILL after a timeout).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client

from tests.harness.controlplane_assets import Binaries, find_binaries
from tests.harness.postgres import free_port, wait_for

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 90.0  # readyz + `default` namespace; typically a few seconds, slower on 2 busy cores
STOP_TIMEOUT = 15.0
PORT_ATTEMPTS = 3  # a free port can be taken between choosing it and the server binding it

# -- PKI ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Where the generated certificates and keys live (`apiserver.*` is what --cert-dir looks for)."""

    directory: Path
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    admin_crt: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path

    @classmethod
    def at(cls, directory: Path) -> Pki:
        return cls(
            directory,
            directory / "ca.crt",
            directory / "ca.key",
            directory / "apiserver.crt",
            directory / "apiserver.key",
            directory / "admin.crt",
            directory / "admin.key",
            directory / "sa.key",
            directory / "sa.pub",
        )


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization is not None:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(parts)


def _certificate(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: rsa.RSAPrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """Sign `key`'s public half for `subject`; self-signed when `issuer` is None. Valid one year."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=not cert_sign,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    ca: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    usage: x509.ObjectIdentifier,
    *extra: x509.ExtensionType,
) -> x509.Certificate:
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(cert_sign=False), True),
        (x509.ExtendedKeyUsage([usage]), False),
        *((extension, False) for extension in extra),
    ]
    return _certificate(subject, key, ca, ca_key, extensions)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_pki(directory: Path) -> Pki:
    """A CA, the serving certificate, the admin client certificate and the service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki.at(directory)
    ca_key = _new_key()
    ca = _certificate(
        _name("pgwarden-test-ca"),
        ca_key,
        None,
        ca_key,
        [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (_key_usage(cert_sign=True), True),
        ],
    )
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")])
    server_key, admin_key, sa_key = _new_key(), _new_key(), _new_key()
    server = _leaf(_name("kube-apiserver"), server_key, ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH, san)
    admin = _leaf(_name("admin", "system:masters"), admin_key, ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(pki.ca_crt, _cert_pem(ca))
    _write(pki.ca_key, _key_pem(ca_key), 0o600)
    _write(pki.server_crt, _cert_pem(server))
    _write(pki.server_key, _key_pem(server_key), 0o600)
    _write(pki.admin_crt, _cert_pem(admin))
    _write(pki.admin_key, _key_pem(admin_key), 0o600)
    _write(pki.sa_key, _key_pem(sa_key), 0o600)
    _write(
        pki.sa_pub,
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    return pki


# -- kubeconfig ----------------------------------------------------------------------------------------


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, *, server: str, ca: Path, user: dict[str, str], name: str = "pgwarden-test") -> Path:
    """A one-context kubeconfig with the CA embedded; `user` is a kubeconfig `user` stanza."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, yaml.safe_dump(config, sort_keys=False).encode(), 0o600)
    return path


# -- processes -----------------------------------------------------------------------------------------


class PortInUse(RuntimeError):
    """A server could not bind the port chosen for it; start again with fresh ports."""


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def terminate(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM `pid`, and SIGKILL its whole session if it has not exited after `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not pid_alive(pid), timeout=timeout, interval=0.1, message=f"pid {pid} to exit")
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # own session: pgid == pid
    wait_for(lambda: not pid_alive(pid), timeout=timeout, interval=0.1, message=f"pid {pid} to die")


def log_tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def _http_ok(host: str, port: int, path: str, context: ssl.SSLContext | None = None) -> bool:
    """Whether GET `path` answers 200; connection errors mean "not yet"."""
    conn: http.client.HTTPConnection = (
        http.client.HTTPSConnection(host, port, context=context, timeout=5)
        if context is not None
        else http.client.HTTPConnection(host, port, timeout=5)
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        conn.close()


# -- the control plane ---------------------------------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver with an admin identity; a context manager that always stops both."""

    def __init__(
        self,
        basedir: Path | None = None,
        *,
        kubeconfig: Path | None = None,
        binaries: Binaries | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        self._owns_basedir = basedir is None
        self.basedir = basedir if basedir is not None else Path(tempfile.mkdtemp(prefix="pgwarden-cp-"))
        self.binaries = binaries if binaries is not None else find_binaries()
        self.kubeconfig = kubeconfig if kubeconfig is not None else self.basedir / "admin.kubeconfig"
        self.startup_timeout = startup_timeout
        self.pki = Pki.at(self.basedir / "pki")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.etcd_port = 0
        self.api_port = 0
        self.timings: dict[str, float] = {}
        self._deadline = 0.0  # monotonic time by which start() must have finished

    # -- addresses and credentials ---------------------------------------------------------------------
    @property
    def server(self) -> str:
        return f"https://{HOST}:{self.api_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://{HOST}:{self.etcd_port}"

    @property
    def ca_path(self) -> Path:
        return self.pki.ca_crt

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.processes.items()}

    def log_path(self, name: str) -> Path:
        return self.basedir / f"{name}.log"

    def api_client(self, token: str | None = None) -> client.ApiClient:
        """A client as admin (client certificate), or as the bearer of `token`. The caller closes it."""
        config = client.Configuration(host=self.server)
        config.ssl_ca_cert = str(self.ca_path)
        if token is None:
            config.cert_file = str(self.pki.admin_crt)
            config.key_file = str(self.pki.admin_key)
        else:
            config.api_key = {"BearerToken": token}
            config.api_key_prefix = {"BearerToken": "Bearer"}
        return client.ApiClient(config)

    def token_for(self, namespace: str, serviceaccount: str, expiration_seconds: int = 3600) -> str:
        """A token for the ServiceAccount from the TokenRequest API; the account is created if missing."""
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            try:
                account = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=serviceaccount))
                core.create_namespaced_service_account(namespace, account)
            except client.ApiException as error:
                if error.status != 409:  # 409: it exists already
                    raise
            spec = client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
            request = client.AuthenticationV1TokenRequest(spec=spec)
            response = core.create_namespaced_service_account_token(serviceaccount, namespace, request)
            token = response.status.token if response.status is not None else None
            if not token:
                raise RuntimeError(f"TokenRequest for {namespace}/{serviceaccount} returned no token")
            return token

    def kubeconfig_for_token(self, token: str, path: Path) -> Path:
        """A kubeconfig for this server authenticating with `token` (what an in-cluster pod would use)."""
        return write_kubeconfig(path, server=self.server, ca=self.ca_path, user={"token": token})

    def kubectl(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the matching kubectl (admin kubeconfig unless given), capturing text output."""
        cmd = [
            str(self.binaries.kubectl),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            f"--cache-dir={self.basedir / 'kubectl-cache'}",
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Generate PKI, start etcd then kube-apiserver, wait until the API is usable."""
        began = time.monotonic()
        self._deadline = began + self.startup_timeout
        try:
            self.basedir.mkdir(parents=True, exist_ok=True)
            write_pki(self.pki.directory)
            self._with_fresh_ports("etcd", self._start_etcd)
            self.timings["etcd"] = time.monotonic() - began
            self._with_fresh_ports("kube-apiserver", self._start_apiserver)
            write_kubeconfig(
                self.kubeconfig,
                server=self.server,
                ca=self.ca_path,
                user={
                    "client-certificate-data": _b64(self.pki.admin_crt),
                    "client-key-data": _b64(self.pki.admin_key),
                },
            )
            self._wait_default_namespace()
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - began

    def stop(self, *, remove: bool = True) -> None:
        """Stop kube-apiserver first, then etcd; remove the base dir if `remove` (and it is ours)."""
        for name in ("kube-apiserver", "etcd"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                terminate(proc.pid)
                proc.wait()
        if remove and self._owns_basedir:
            shutil.rmtree(self.basedir, ignore_errors=True)

    # -- internals -------------------------------------------------------------------------------------
    def _with_fresh_ports(self, name: str, start: Callable[[], None]) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                start()
                return
            except PortInUse:
                proc = self.processes.pop(name)
                proc.wait()
                if attempt == PORT_ATTEMPTS:
                    raise

    def _spawn(self, name: str, argv: list[str]) -> None:
        """Start `argv` in its own session (no terminal signals, outlives us if asked), logging to a file."""
        with self.log_path(name).open("wb") as log:  # a retry starts a fresh log
            self.processes[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.basedir,
            )

    def _alive_or_raise(self, name: str) -> None:
        proc = self.processes[name]
        if proc.poll() is None:
            return
        tail = log_tail(self.log_path(name))
        if "address already in use" in tail:
            raise PortInUse(f"{name}: {tail.splitlines()[-1]}")
        raise RuntimeError(f"{name} exited with status {proc.returncode}; log {self.log_path(name)}:\n{tail}")

    def _wait(self, name: str, ready: Callable[[], object], what: str) -> None:
        """Poll `ready` until true within what is left of the start-up budget; fail early if `name` died."""

        def probe() -> bool:
            self._alive_or_raise(name)
            return bool(ready())

        try:
            wait_for(probe, timeout=max(self._deadline - time.monotonic(), 1.0), interval=0.1, message=what)
        except TimeoutError as error:
            raise TimeoutError(f"{error}; log {self.log_path(name)}:\n{log_tail(self.log_path(name))}") from None

    def _start_etcd(self) -> None:
        self.etcd_port, peer = free_port(HOST), free_port(HOST)
        peer_url = f"http://{HOST}:{peer}"
        data = self.basedir / "etcd"
        shutil.rmtree(data, ignore_errors=True)  # a retry must not find a half-initialised member
        self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=pgwarden",
                f"--data-dir={data}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=pgwarden={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        self._wait("etcd", lambda: _http_ok(HOST, self.etcd_port, "/health"), f"etcd /health on {self.etcd_url}")

    def _apiserver_argv(self) -> list[str]:
        # Flags of controller-runtime's envtest. No --advertise-address: loopback is refused for the
        # `kubernetes` Service endpoints; without it the server picks the default-route interface.
        pki = self.pki
        return [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={HOST}",
            f"--secure-port={self.api_port}",
            f"--cert-dir={pki.directory}",
            f"--client-ca-file={pki.ca_crt}",
            f"--service-account-issuer=https://{HOST}:{self.api_port}/",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
        ]

    def _start_apiserver(self) -> None:
        self.api_port = free_port(HOST)
        began = time.monotonic()
        self._spawn("kube-apiserver", self._apiserver_argv())
        context = ssl.create_default_context(cafile=str(self.ca_path))
        self._wait(
            "kube-apiserver",
            lambda: _http_ok(HOST, self.api_port, "/readyz", context),
            f"kube-apiserver /readyz on {self.server}",
        )
        self.timings["readyz"] = time.monotonic() - began

    def _wait_default_namespace(self) -> None:
        began = time.monotonic()
        with self.api_client() as api:
            core = client.CoreV1Api(api)

            def exists() -> bool:
                try:
                    core.read_namespace("default")
                except client.ApiException as error:
                    if error.status == 404:
                        return False
                    raise
                return True

            self._wait("kube-apiserver", exists, "the `default` namespace")
        self.timings["default_namespace"] = time.monotonic() - began
