"""The real servers the tests run (OpenBao, Redis): free ports, and a process that can be
stopped, or paused to play an outage (SIGSTOP: connections are accepted, nothing answers)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import Iterator
from types import ModuleType

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def port_taken_first(module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A port another socket listens on, which `module.free_port` hands out first (free
    ports after it): the race of a port found free and taken before it is bound."""
    free = module.free_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = int(taken.getsockname()[1])
        found = iter([busy])
        monkeypatch.setattr(module, "free_port", lambda: next(found, None) or free())
        yield busy


class ServerProcess:
    """A server in a subprocess; subclasses start it and set `process`."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False

    def stop(self) -> None:
        """Terminate it (kill if it lingers); connections are refused until started again."""
        if self.process is None:
            return
        if self._paused:
            self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def pause(self) -> None:
        """Hang it (SIGSTOP): connections are accepted, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self._paused = False


def free_ports(count: int) -> list[int]:
    """`count` consecutive free ports on 127.0.0.1 (distinct; consecutive as the admin
    ports of `server.workers` must be: admin_port + i)."""
    for _ in range(50):
        first = free_port()
        try:
            for port in range(first + 1, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(first, first + count))
    raise RuntimeError(f"no {count} consecutive free ports")
