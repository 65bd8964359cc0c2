"""An HTTP port with bounded connections: how many may be open, and how long one may stay silent.

aiohttp closes a connection that sends no complete request header within its keep-alive timeout
(counted from the connection's start and from each answer; bytes trickling in do not extend it),
so `idle_timeout` bounds slow and idle clients alike. aiohttp has no limit on open connections:
`LimitedSite` answers a connection beyond `max_connections` with a 503 and closes it at once, so
one client cannot hold every file descriptor the process (and its gRPC port) has. A client
that hangs up cancels its call, as on gRPC, so its work still queued or being decoded stops.
"""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web, web_response

#: The Server header of every answer on the HTTP and metrics ports: no Python or aiohttp version
#: for an attacker to look up.
SERVER = "convserve"
_REFUSAL_BODY = b'{"error": "too many connections; retry in a second"}'
#: What a connection beyond the limit gets before it is closed.
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\nRetry-After: 1\r\n\r\n%s"
    % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(REFUSAL)
        transport.close()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted from its creation to its end (aiohttp's own
    count starts only at `connection_made`, after a whole burst of accepts has been let in)."""

    def __init__(self, inner: asyncio.Protocol, open_connections: list[int]) -> None:
        self._inner = inner
        self._open = open_connections
        self._open[0] += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._open[0] -= 1
        self._inner.connection_lost(exc)


async def name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    """An `on_response_prepare` hook: `Server: convserve` on every routed answer."""
    response.headers["Server"] = SERVER


def hide_server_software() -> None:
    """The 400 aiohttp writes itself for a request it cannot parse reaches no application hook: it
    takes aiohttp's module default (`Python/3.11 aiohttp/3.x`), replaced here, once per process."""
    web_response.SERVER_SOFTWARE = SERVER


class LimitedSite(web.BaseSite):
    """A TCP site whose server takes at most `max_connections` open connections."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        max_connections: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=128)
        self._host, self._port, self._max_connections = host, port, max_connections

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        limit, open_connections = self._max_connections, [0]

        def protocol() -> asyncio.BaseProtocol:
            if open_connections[0] >= limit:
                return _Refused()
            return _Counted(server(), open_connections)

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog, reuse_port=False
        )


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    idle_timeout: float,
    max_connections: int,
    shutdown_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve `app` on `host:port` with those bounds; the runner (to clean up) and the bound port."""
    hide_server_software()
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=idle_timeout,
        handler_cancellation=True,  # a client that hangs up cancels its call: decoding stops
    )
    await runner.setup()
    site = LimitedSite(runner, host, port, max_connections, ssl_context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]
