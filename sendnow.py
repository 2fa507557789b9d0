"""Writing a whole websocket message from synchronous code, when the socket keeps up.

The proxy forwards small messages at a high rate: audio frames to Deepgram, transcripts to
subscribers. Sending each with `await ws.send()` from a writer task costs a task wake-up per
message; writing it in place with websockets' synchronous `broadcast()` does not (measured in the
README's Performance section). `broadcast()` has no flow control, so `send_now()` checks the
transport's buffer first: above the limit it returns False, the caller queues the message, and
its writer task sends the queue with `await ws.send()`, which waits for the buffer to drain.
"""

from __future__ import annotations

from websockets.asyncio.connection import Connection, broadcast
from websockets.exceptions import ConcurrencyError
from websockets.protocol import State

WRITE_LIMIT = 2**15  # bytes; websockets' own default high-water mark for drain()


def send_now(ws: Connection, message: str | bytes) -> bool:
    """Write `message` now if `ws` is open and its buffer is below WRITE_LIMIT; else False.

    A write that fails because the connection is breaking still counts as written: the
    connection's reader sees it close, and the caller treats the message like any other sent
    just before the break (the upstream replays it; a subscriber is gone).
    """
    if ws.state is not State.OPEN or ws.transport.get_write_buffer_size() > WRITE_LIMIT:
        return False
    try:
        broadcast([ws], message, raise_exceptions=True)
    except ExceptionGroup as group:
        if group.subgroup(ConcurrencyError):  # a fragmented send in progress: nothing was written
            return False
    return True
