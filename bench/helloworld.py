"""A hello-world aiohttp server, the reference for the API requests/s of the master.

    python -m bench.helloworld PORT

``GET /`` returns a fixed JSON document of about 1 KB. The server listens on
127.0.0.1 only, with the access log off, as the master serves its API.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web

# About 1 KB once encoded: ten items of a hundred bytes or so.
PAYLOAD = {
    "items": [
        {"id": f"item-{index:04d}", "name": "hello world", "state": "running", "count": index,
         "note": "x" * 12}
        for index in range(10)
    ],
}


async def hello(request: web.Request) -> web.Response:
    return web.json_response(PAYLOAD)


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    asyncio.run(serve(int(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
