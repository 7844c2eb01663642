"""The real servers the tests run (OpenBao, Redis): free ports, and a process that can be
stopped, or paused to play an outage (SIGSTOP: connections are accepted, nothing answers)."""

from __future__ import annotations

import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
