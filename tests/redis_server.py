"""A real Redis for the tests: `redis-server` (Debian package `redis-server`) on 127.0.0.1.

`RedisServer.start()` runs it on a free port with no persistence (`--save ''
--appendonly no`), so a stop and a start give an empty Redis on the same port: what
a restarted or flushed Redis looks like to the proxy. `pause()`/`resume()`
(SIGSTOP/SIGCONT) make it hang instead: the kernel still accepts connections and
nothing answers, which is what a slow or partitioned Redis looks like.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .processes import ServerProcess, free_port

START_TIMEOUT_S = 10.0
INSTALL = "apt-get install -y --no-install-recommends redis-server (make test does it)"


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate for 127.0.0.1, its key and the CA that signed it (PEM files)."""

    cert_file: Path
    key_file: Path
    ca_file: Path

    def server_arguments(self, port: int) -> list[str]:
        """TLS only (`port 0`), no client certificates asked for, TLS to the primary too."""
        return [
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(self.cert_file),
            "--tls-key-file", str(self.key_file),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", "no",
            "--tls-replication", "yes",
        ]  # fmt: skip

    def connect(self, port: int) -> socket.socket:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        raw = socket.create_connection(("127.0.0.1", port), timeout=2.0)
        try:
            return context.wrap_socket(raw, server_hostname="127.0.0.1")
        except BaseException:
            raw.close()
            raise


def _connect(port: int, tls: TlsFiles | None) -> socket.socket:
    if tls is not None:
        return tls.connect(port)
    return socket.create_connection(("127.0.0.1", port), timeout=2.0)


def redis_server_binary() -> str:
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"redis-server is not installed: {INSTALL}")


class RedisServer(ServerProcess):
    """One `redis-server` process; `url` stays the same across stop() and start()."""

    def __init__(
        self,
        workdir: Path,
        *,
        password: str = "",
        extra: tuple[str, ...] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__()
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.extra = extra  # more redis-server arguments (replicaof, cluster-enabled...)
        self.tls = tls  # TLS only on `port` when set
        scheme = "rediss" if tls else "redis"
        self.url = f"{scheme}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        port = self.tls.server_arguments(self.port) if self.tls else ["--port", str(self.port)]
        args = [
            redis_server_binary(),
            *port,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        args += list(self.extra)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "redis.log", "ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT_S}s")
            time.sleep(0.01)
        return self

    def _answers(self) -> bool:
        try:
            reply = self.command("PING")
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def command(self, *args: str) -> bytes:
        """One command over a plain socket (RESP), authenticated when a password is set.

        Returns the raw first reply line and what follows in the first read; enough
        for PING, FLUSHALL, CONFIG SET and the counters of INFO.
        """
        with _connect(self.port, self.tls) as s:
            if self.password:
                s.sendall(_resp("AUTH", self.password))
                s.recv(1024)
            s.sendall(_resp(*args))
            return s.recv(1 << 16)

    def info_stat(self, name: str) -> int:
        """One integer field of `INFO stats` (e.g. total_commands_processed)."""
        return int(self.info_field("stats", name))

    def info_field(self, section: str, name: str) -> str:
        """One field of `INFO section` (e.g. replication's role)."""
        for line in self.command("INFO", section).decode().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
        raise KeyError(name)

    def dbsize(self) -> int:
        reply = self.command("DBSIZE")
        assert reply.startswith(b":"), reply
        return int(reply[1:].split(b"\r\n", 1)[0])


def _wait(condition: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (OSError, KeyError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SentinelServer(ServerProcess):
    """One Redis Sentinel watching `service` on `primary` (a config file of its own, which
    Sentinel rewrites as it learns the topology)."""

    def __init__(
        self,
        workdir: Path,
        primary: RedisServer,
        *,
        service: str = "mymaster",
        password: str = "",
        down_after_ms: int = 1000,
    ) -> None:
        super().__init__()
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.service = service
        self.tls = primary.tls  # the sentinels speak TLS when the data nodes do
        self.address = f"127.0.0.1:{self.port}"
        if self.tls:
            arguments = self.tls.server_arguments(self.port)
            pairs = zip(arguments[0::2], arguments[1::2], strict=True)
            listen = [f"{name.removeprefix('--')} {value}" for name, value in pairs]
        else:
            listen = [f"port {self.port}"]
        lines = [
            *listen,
            "bind 127.0.0.1",
            f'dir "{workdir}"',
            f"sentinel monitor {service} 127.0.0.1 {primary.port} 2",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} 10000",
            f"sentinel parallel-syncs {service} 1",
        ]
        if primary.password:
            lines.append(f"sentinel auth-pass {service} {primary.password}")
        if password:
            lines.append(f"requirepass {password}")
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "sentinel.conf"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> SentinelServer:
        args = [redis_server_binary(), str(self.config), "--sentinel", "--loglevel", "warning"]
        with open(self.workdir / "sentinel.log", "ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        _wait(lambda: b"+PONG" in self.command("PING"), "sentinel to answer")
        return self

    def command(self, *args: str) -> bytes:
        with _connect(self.port, self.tls) as s:
            if self.password:
                s.sendall(_resp("AUTH", self.password))
                s.recv(1024)
            s.sendall(_resp(*args))
            return s.recv(1 << 16)

    def primary_port(self) -> int:
        reply = self.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(reply.split(b"\r\n")[4])


class SentinelSet:
    """A primary, a replica and three sentinels on 127.0.0.1: what a small HA Redis is."""

    def __init__(
        self,
        workdir: Path,
        *,
        password: str = "",
        sentinel_password: str = "",
        tls: TlsFiles | None = None,
    ) -> None:
        self.primary = RedisServer(workdir / "primary", password=password, tls=tls)
        self.replica = RedisServer(workdir / "replica", password=password, tls=tls)
        self.password = password
        self.sentinel_password = sentinel_password
        self.workdir = workdir
        self.sentinels: list[SentinelServer] = []

    @property
    def nodes(self) -> list[RedisServer]:
        return [self.primary, self.replica]

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def start(self) -> SentinelSet:
        self.primary.start()
        self.replica.extra = ("--replicaof", "127.0.0.1", str(self.primary.port))
        self.replica.start()
        _wait(
            lambda: self.replica.info_field("replication", "master_link_status") == "up",
            "the replica to sync",
        )
        for i in range(3):
            sentinel = SentinelServer(
                self.workdir / f"sentinel{i}", self.primary, password=self.sentinel_password
            )
            self.sentinels.append(sentinel.start())
        # A failover needs every sentinel to know the replica and the other sentinels.
        _wait(self._ready, "the sentinels to know the replica and each other", 20.0)
        return self

    def _ready(self) -> bool:
        for sentinel in self.sentinels:
            info = sentinel.command("SENTINEL", "MASTER", sentinel.service).decode()
            fields = info.split("\r\n")[2::2]
            state = dict(zip(fields[0::2], fields[1::2], strict=False))
            if state.get("num-slaves") != "1" or state.get("num-other-sentinels") != "2":
                return False
        return True

    def current_primary(self) -> RedisServer:
        port = self.sentinels[0].primary_port()
        return next(node for node in self.nodes if node.port == port)

    def failover(self) -> None:
        """`SENTINEL FAILOVER`: the replica becomes the primary, as after a crash."""
        reply = self.sentinels[0].command("SENTINEL", "FAILOVER", self.sentinels[0].service)
        assert reply.startswith(b"+OK"), reply

    def stop(self) -> None:
        for process in [*self.sentinels, self.replica, self.primary]:
            process.stop()


class ClusterSet:
    """Three Redis Cluster primaries on 127.0.0.1, joined with `redis-cli --cluster create`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes = [
            RedisServer(
                workdir / f"node{i}",
                extra=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(workdir / f"node{i}" / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                    # The bus port is port + 10000 by default: past 65535 for a high
                    # free port. One of its own (Redis 7's cluster-port).
                    "--cluster-port",
                    str(free_port()),
                ),
            )
            for i in range(3)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> ClusterSet:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        _wait(
            lambda: (
                all(n.info_field("cluster", "cluster_enabled") == "1" for n in self.nodes)
                and all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes)
            ),
            "the cluster to be ok",
            20.0,
        )
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _resp(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
