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
import subprocess
import time
from pathlib import Path

from .processes import ServerProcess, free_port

START_TIMEOUT_S = 10.0
INSTALL = "apt-get install -y --no-install-recommends redis-server (make test does it)"


def redis_server_binary() -> str:
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"redis-server is not installed: {INSTALL}")


class RedisServer(ServerProcess):
    """One `redis-server` process; `url` stays the same across stop() and start()."""

    def __init__(self, workdir: Path, *, password: str = "") -> None:
        super().__init__()
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
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
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as s:
            if self.password:
                s.sendall(_resp("AUTH", self.password))
                s.recv(1024)
            s.sendall(_resp(*args))
            return s.recv(1 << 16)

    def info_stat(self, name: str) -> int:
        """One integer field of `INFO stats` (e.g. total_commands_processed)."""
        for line in self.command("INFO", "stats").decode().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return int(value)
        raise KeyError(name)


def _resp(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
