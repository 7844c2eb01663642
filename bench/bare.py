"""The floor for any aiohttp service: invoice bodies from a dict, nothing else.

No authentication, logging or metrics: what aiohttp and uvloop alone cost per request,
so the table can say how much of the gap to nginx is aiohttp's and how much the proxy's.

    python -m bench.bare --port P --ids hot-000,hot-001,...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

import uvloop
from aiohttp import web

from proxy.standin import make_invoice


def make_app(organization: str, ids: list[str]) -> web.Application:
    bodies = {
        (organization, invoice_id): json.dumps(make_invoice(invoice_id)).encode()
        for invoice_id in ids
    }

    async def get(request: web.Request) -> web.Response:
        info = request.match_info
        body = bodies.get((info["organization"], info["id"]))
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/organizations/{organization}/invoices/{id}", get)
    return app


async def serve(port: int, organization: str, ids: list[str]) -> None:
    runner = web.AppRunner(make_app(organization, ids), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, backlog=512).start()
        print(f"bare listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--organization", default="acme")
    parser.add_argument("--ids", required=True, help="comma-separated invoice ids")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.port, args.organization, args.ids.split(",")))


if __name__ == "__main__":
    main()
