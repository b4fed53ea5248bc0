"""A WebSocket server on websockets' public sans-I/O layer.

websockets' `ServerProtocol` (websockets.server) parses and builds the bytes;
this package only pumps them: `Connection` is an asyncio.Protocol that feeds
the socket's bytes to the protocol, writes what the protocol wants written,
and turns the protocol's events into messages for a handler. No private name
of websockets is used, so any websockets >= 15 works.

    server = await serve(handler, "127.0.0.1", 0, process_request=routes)
    port = server.sockets[0].getsockname()[1]
    ...
    server.close()                 # 1001 to open connections
    await server.wait_closed()

    async def handler(conn: Connection) -> None:
        async for message in conn:     # or: await conn.recv()
            await conn.send(message)

The audio fast path: set `conn.audio_sink = fn` (fn(data: bytes) -> bool).
When a complete binary message arrives while the handler waits in recv()
with nothing queued, fn(data) is called first, inside the protocol's
data_received: True means it took the message (recv() keeps waiting;
`conn.fast_frames` counts these), False hands it to recv() as usual. Text,
fragmented messages and anything arriving while the handler is busy or
messages are queued go through the queue, so messages keep their order. An
exception raised by fn is logged and the message is delivered through recv().

Bounds: messages over `max_size` close with 1009; at most `max_queue`
complete messages wait for recv() before reading from the socket pauses
(`conn.reading_paused`, `conn.read_pauses`); send() waits while the write
buffer is over `write_limit` (`conn.writing_paused`); a closing connection
is dropped after `close_timeout`; keepalive pings every `ping_interval`,
closed with 1011 when unanswered for `ping_timeout`.

Logs go to "voice_agent.transports.sansio" (structured extras, connection
ids, never payloads); the protocol's own lines to its ".protocol" child,
whose DEBUG output (frame excerpts) is always off.
"""

from voice_agent.transports.sansio.connection import Connection
from voice_agent.transports.sansio.server import Server, serve
from voice_agent.transports.sansio.settings import (
    Handler,
    ProcessRequest,
    SelectSubprotocol,
    Settings,
)

__all__ = [
    "Connection",
    "Handler",
    "ProcessRequest",
    "SelectSubprotocol",
    "Server",
    "Settings",
    "serve",
]
