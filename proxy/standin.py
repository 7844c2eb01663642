"""A PlanetScale stand-in for the tests, the demo and the benchmarks.

It serves `GET /v1/organizations/{organization}/invoices/{id}` as the upstream
OpenAPI document describes, accepts only the service tokens it was given (401 with
PlanetScale-style JSON otherwise), and can be told, per invoice id or for all, to
misbehave: answer slowly, hang, 404, 429 with Retry-After, any 5xx, reset the
connection, cut the body short, or send a malformed, schema-breaking or huge body.
A token can be accepted for one organization only (`accept_only(..., organization=)`,
`--organization-token`), as a PlanetScale service token reads one organization.
It counts what it receives. Control it from Python (`StandIn`) or over HTTP
(`/_control/...`) when it runs in another process (`python -m proxy.standin`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

from aiohttp import web

PLANETSCALE_401 = {"code": "unauthorized", "message": "Unauthorized"}
PLANETSCALE_404 = {"code": "not_found", "message": "Not Found"}
MODES = (
    "ok",  # the invoice (default)
    "not_found",  # 404
    "status",  # answer `status` (429 carries Retry-After: `retry_after`)
    "slow",  # wait `delay_s`, then answer as "ok"
    "hang",  # never answer
    "reset",  # close the connection without an answer
    "truncated",  # promise a longer body than is sent, then close
    "malformed",  # 200 with a body that is not JSON
    "body",  # 200 with `body` (text or bytes) as given and `content_type`
    "huge",  # 200 with a JSON body of `size` bytes
    "stream",  # 200 with a chunked JSON body of `size` bytes, written piece by piece
)


@dataclass(slots=True)
class Behaviour:
    """How the stand-in answers one invoice id (or every id, under "*")."""

    mode: str = "ok"
    status: int = 500
    delay_s: float = 0.0
    retry_after: str | None = "1"
    body: str | bytes = ""  # for "body": text is sent UTF-8 encoded, bytes as they are
    content_type: str = "application/json"
    size: int = 10 * 1024 * 1024
    times: int | None = None  # misbehave this many times, then answer "ok"; None: always


@dataclass(slots=True)
class Stats:
    requests: int = 0
    unauthorized: int = 0
    # By organization: invoice requests, and the tokens they carried (`token_id` only).
    by_organization: Counter[str] = field(default_factory=Counter)
    token_ids: dict[str, set[str]] = field(default_factory=dict)
    by_invoice: Counter[str] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)
    paths: list[str] = field(default_factory=list)
    in_flight: int = 0  # invoice requests being answered now
    max_in_flight: int = 0  # the most at once
    body_bytes_sent: int = 0  # bytes of "stream" bodies written


def make_invoice(invoice_id: str, *, drift: bool = False) -> dict[str, Any]:
    """A deterministic invoice; ids starting with `open-` have a billing period still open."""
    cents = int(hashlib.sha256(invoice_id.encode()).hexdigest()[:6], 16) % 100_000
    open_period = invoice_id.startswith("open-")
    invoice: dict[str, Any] = {
        "id": invoice_id,
        "total": cents / 100,
        "billing_period_start": "2099-01-01T00:00:00.000Z"
        if open_period
        else "2025-01-01T00:00:00.000Z",
        "billing_period_end": "2099-02-01T00:00:00.000Z"
        if open_period
        else "2025-02-01T00:00:00.000Z",
    }
    if drift:
        invoice["total"] = f"{cents / 100:.2f}"
        invoice["paid"] = not open_period
        invoice["overdue"] = False
    return invoice


class StandIn:
    """The stand-in's state: accepted tokens, invoices, behaviours and counters."""

    def __init__(
        self, tokens: list[str], *, drift: bool = False, missing_prefix: str = "missing"
    ) -> None:
        self.tokens: list[str] = list(tokens)  # accepted `token_id:token` headers
        # An organization named here accepts only its own tokens (as a PlanetScale
        # service token reads one organization); the others accept `tokens`.
        self.organization_tokens: dict[str, list[str]] = {}
        self.drift = drift  # serve today's API (paid, overdue, string total)
        self.missing_prefix = missing_prefix  # ids with this prefix do not exist
        self.invoices: dict[str, dict[str, Any]] = {}  # explicit bodies by id
        self.behaviours: dict[str, Behaviour] = {}
        self.stats = Stats()
        self._hang = asyncio.Event()

    def accept_only(self, *tokens: str, organization: str | None = None) -> None:
        """Accept only these tokens: for every organization, or for `organization` alone."""
        if organization is None:
            self.tokens = list(tokens)
        else:
            self.organization_tokens[organization] = list(tokens)

    def accepts(self, organization: str, header: str | None) -> bool:
        return header in self.organization_tokens.get(organization, self.tokens)

    def behave(self, invoice_id: str, behaviour: Behaviour | None) -> None:
        """Set (or with None, clear) the behaviour of one id, or "*" for every id."""
        if behaviour is None:
            self.behaviours.pop(invoice_id, None)
        else:
            self.behaviours[invoice_id] = behaviour

    def requests_for(self, invoice_id: str) -> int:
        return self.stats.by_invoice[invoice_id]

    def release(self) -> None:
        """Let every request held by "hang" finish (answering as "ok")."""
        self._hang.set()

    def _behaviour(self, invoice_id: str) -> Behaviour:
        for key in (invoice_id, "*"):
            behaviour = self.behaviours.get(key)
            if behaviour is not None:
                if behaviour.times is None:
                    return behaviour
                if behaviour.times > 0:
                    behaviour.times -= 1
                    return behaviour
        return Behaviour()

    async def invoice(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.methods[request.method] += 1
        stats.paths.append(request.raw_path)
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            return await self._invoice(request)
        finally:
            stats.in_flight -= 1

    async def _invoice(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        organization = request.match_info["organization"]
        header = request.headers.get("Authorization")
        stats.by_organization[organization] += 1
        stats.token_ids.setdefault(organization, set()).add((header or "").split(":", 1)[0])
        if not self.accepts(organization, header):
            stats.unauthorized += 1
            return web.json_response(PLANETSCALE_401, status=401)
        invoice_id = request.match_info["id"]
        stats.by_invoice[invoice_id] += 1
        b = self._behaviour(invoice_id)
        if b.mode == "slow":
            await asyncio.sleep(b.delay_s)
        elif b.mode == "hang":
            await self._hang.wait()
        elif b.mode == "not_found":
            return web.json_response(PLANETSCALE_404, status=404)
        elif b.mode == "status":
            headers = {"Retry-After": b.retry_after} if b.status == 429 and b.retry_after else {}
            return web.json_response(
                {"code": "error", "message": str(b.status)}, status=b.status, headers=headers
            )
        elif b.mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        elif b.mode == "truncated":
            response = web.StreamResponse(
                headers={"Content-Type": "application/json", "Content-Length": "1000"}
            )
            await response.prepare(request)
            await response.write(b'{"id": "')
            assert request.transport is not None
            request.transport.abort()
            return response
        elif b.mode == "malformed":
            return web.Response(body=b'{"id": "x", "total": ', content_type="application/json")
        elif b.mode == "body":
            raw = b.body.encode() if isinstance(b.body, str) else b.body
            return web.Response(body=raw, headers={"Content-Type": b.content_type})
        elif b.mode == "stream":
            return await self._stream(request, invoice_id, b.size)
        elif b.mode == "huge":
            filler = "x" * max(0, b.size - 40)
            return web.Response(
                body=json.dumps({"id": invoice_id, "filler": filler}).encode(),
                content_type="application/json",
            )
        if invoice_id in self.invoices:
            return web.json_response(self.invoices[invoice_id])
        if invoice_id.startswith(self.missing_prefix):
            return web.json_response(PLANETSCALE_404, status=404)
        return web.json_response(make_invoice(invoice_id, drift=self.drift))

    async def _stream(self, request: web.Request, invoice_id: str, size: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        piece = b"x" * 65536
        sent = 0
        try:
            await response.write(json.dumps({"id": invoice_id})[:-1].encode() + b', "filler": "')
            while sent < size:
                await response.write(piece)
                sent += len(piece)
                self.stats.body_bytes_sent += len(piece)
            await response.write(b'"}')
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading and went away: what this mode is for
        return response

    async def not_found(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        self.stats.methods[request.method] += 1
        self.stats.paths.append(request.raw_path)
        return web.json_response(PLANETSCALE_404, status=404)

    # Control calls, for a stand-in running in another process.
    async def control_behave(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.behave(request.match_info["id"], Behaviour(**data) if data else None)
        return web.json_response({"ok": True})

    async def control_tokens(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.accept_only(*data["tokens"], organization=data.get("organization"))
        return web.json_response({"ok": True})

    async def control_stats(self, _request: web.Request) -> web.Response:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, count) pairs.
        data = {f.name: getattr(self.stats, f.name) for f in fields(self.stats)}
        data.pop("paths")
        data["token_ids"] = {org: sorted(ids) for org, ids in self.stats.token_ids.items()}
        return web.json_response(
            {k: dict(v) if isinstance(v, Counter) else v for k, v in data.items()}
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(
            "/v1/organizations/{organization}/invoices/{id}", self.invoice, allow_head=False
        )
        app.router.add_post("/_control/behave/{id}", self.control_behave)
        app.router.add_post("/_control/tokens", self.control_tokens)
        app.router.add_get("/_control/stats", self.control_stats)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        app.on_shutdown.append(self._release_hung)
        return app

    async def _release_hung(self, _app: web.Application) -> None:
        self._hang.set()  # so shutdown does not wait for requests told to hang


async def start(
    standin: StandIn, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Run the stand-in on host:port (0: a free port); returns the runner and the port."""
    runner = web.AppRunner(standin.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    await web.SockSite(runner, sock).start()
    return runner, int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.standin", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--token", action="append", required=True, help="an accepted token_id:token"
    )
    parser.add_argument(
        "--organization-token",
        action="append",
        default=[],
        metavar="ORG=TOKEN_ID:TOKEN",
        help="a token accepted for ORG only (ORG then refuses every other token)",
    )
    parser.add_argument(
        "--drift", action="store_true", help="serve paid/overdue and a string total"
    )
    args = parser.parse_args(argv)
    standin = StandIn(args.token, drift=args.drift)
    for item in args.organization_token:
        organization, sep, token = item.partition("=")
        if not sep or not organization or not token:
            parser.error(f"--organization-token expects ORG=TOKEN_ID:TOKEN, not {item!r}")
        standin.organization_tokens.setdefault(organization, []).append(token)

    async def run() -> None:
        runner, port = await start(standin, args.host, args.port)
        print(f"standin listening on http://{args.host}:{port}/v1", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
