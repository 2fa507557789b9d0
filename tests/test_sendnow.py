"""sendnow.send_now() over real sockets: writes in place while the peer keeps up, refuses (so the
caller queues) once the peer stops reading, and never reorders or loses what it wrote."""

import asyncio

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from sendnow import WRITE_LIMIT, send_now


async def test_writes_until_the_peer_falls_behind_then_refuses():
    received: list[bytes] = []
    reading = asyncio.Event()

    async def slow_reader(ws):
        await reading.wait()
        async for message in ws:
            received.append(message)

    async with serve(slow_reader, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
            sent = 0
            try:
                for i in range(20_000):  # 32 MB: far beyond the kernel's socket buffers
                    if not send_now(ws, i.to_bytes(4, "big") * 400):
                        break
                    sent += 1
                    if i % 50 == 0:
                        await asyncio.sleep(0)  # let the transport push to the kernel
                else:
                    raise AssertionError("send_now() never refused a peer that does not read")
                assert ws.transport.get_write_buffer_size() > WRITE_LIMIT
            finally:
                reading.set()
            async with asyncio.timeout(10):
                while len(received) < sent:
                    await asyncio.sleep(0.01)
            assert [int.from_bytes(m[:4], "big") for m in received] == list(range(sent))


async def test_refuses_a_closed_connection():
    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await connect(f"ws://127.0.0.1:{port}")
        await ws.close()
        assert send_now(ws, "late") is False
