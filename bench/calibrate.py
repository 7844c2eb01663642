"""What a hit may cost: the budget of Python work per request on this machine.

A bare uvloop protocol, the floor of any Python server: llhttp (httptools) with a
header callback, a SHA-256 of the `Authorization` value and prebuilt answer bytes; then
the same with a fixed amount of Python busy-work per request. Each runs on the server
core under the bench's wrk (the same connections, script and client core as the hit
rounds of `make bench`), with nginx in the same run as the reference. The table says
how many microseconds of Python a hit may cost for a given share of nginx's rate here:
a hit of the proxy is that floor plus its own Python (`python -m bench.hit_parts`).

    python -m bench.calibrate [--busy 0,5,10,15,20,30] [--seconds 5]

On a VM the curve is not a straight line: the slower the server, the more often the
load generator sleeps, and the more each answer's write costs in waking it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from .harness import (
    NGINX,
    SERVER_CORE,
    BenchError,
    Processes,
    client_core,
    invoice_path,
    start_listening,
    start_servers,
    wrk,
    wrk_script,
)

BODY = b'{"id":"hot-000","total":12345}' * 4
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)


def serve(port: int, busy_us: float) -> None:
    """The bare protocol on 127.0.0.1:`port`, `busy_us` of Python work per request."""
    import httptools
    import uvloop

    busy_s = busy_us / 1e6

    class Bare(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.authorization = b""

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() == b"authorization":
                self.authorization = value

        def on_message_complete(self) -> None:
            hashlib.sha256(self.authorization).digest()
            if busy_s:
                end = time.perf_counter() + busy_s
                while time.perf_counter() < end:
                    pass
            self.transport.write(ANSWER)  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Bare, "127.0.0.1", port, backlog=512)
        await server.serve_forever()

    uvloop.run(main())


def measure(busy: list[float], seconds: int, connections: int) -> list[tuple[str, float]]:
    workdir = Path(tempfile.mkdtemp(prefix="invoice-proxy-calibrate-"))
    processes = Processes()
    rows: list[tuple[str, float]] = []
    try:
        with client_core():
            servers = start_servers(processes, workdir, hot_ids=["hot-000"])
            script = workdir / "hot.lua"
            wrk_script(script, [invoice_path("hot-000")], servers.authorization)
            nginx = servers.ports[NGINX]
            wrk(nginx, script, 2, connections)  # nginx fetches and caches the invoice
            rows.append(("nginx proxy_cache", wrk(nginx, script, seconds, connections)))
            for busy_us in busy:
                argv = partial(_serve_argv, busy_us)
                log = workdir / f"bare-{busy_us:g}.log"
                port, process = start_listening(
                    processes, "the bare protocol", SERVER_CORE, argv, log
                )
                rows.append((f"bare + {busy_us:g} us", wrk(port, script, seconds, connections)))
                process.terminate()
                process.wait(timeout=10)
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _serve_argv(busy_us: float, port: int) -> list[str]:
    return [sys.executable, "-m", "bench.calibrate", "--busy", str(busy_us), "--serve", str(port)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.calibrate", description=__doc__)
    parser.add_argument("--busy", default="0,5,10,15,20,30", help="us of Python per request")
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # a server's port
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, float(args.busy))
        return
    try:
        rows = measure([float(b) for b in args.busy.split(",")], args.seconds, args.connections)
    except BenchError as exc:
        raise SystemExit(str(exc)) from None
    nginx = rows[0][1]
    print(f"wrk -t1 -c{args.connections} -d{args.seconds}s, server on core {SERVER_CORE}")
    print("| server | req/s | us per request | / nginx |")
    print("| --- | ---: | ---: | ---: |")
    for name, rps in rows:
        print(f"| {name} | {rps:,.0f} | {1e6 / rps:.1f} | {rps / nginx:.2f} |")


if __name__ == "__main__":
    main()
