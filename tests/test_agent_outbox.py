"""The providers' sending side (agent/outbox.py) over a real socket whose peer stops reading."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.frames import Opcode
from websockets.server import ServerProtocol

from agent.outbox import Outbox
from agent.provider import ProviderStats
from conftest import wait_for

SOCKET_BUFFER = 65536  # what the peer reads at a time


class SlowPeer:
    """A websocket server that takes nothing from its socket until `reading` is set, so that the
    sender's kernel and transport buffers fill up (websockets' own server keeps reading into
    memory). The protocol is websockets' sans-I/O `ServerProtocol`."""

    def __init__(self):
        self.reading = asyncio.Event()
        self.received: list[str | bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=SOCKET_BUFFER)
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol = ServerProtocol(max_size=None)
        while not (requests := protocol.events_received()):
            protocol.receive_data(await reader.read(SOCKET_BUFFER))
        protocol.send_response(protocol.accept(requests[0]))
        writer.write(b"".join(protocol.data_to_send()))
        await self.reading.wait()
        while data := await reader.read(SOCKET_BUFFER):
            protocol.receive_data(data)
            for frame in protocol.events_received():
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    self.received.append(frame.data.decode() if frame.opcode is Opcode.TEXT else frame.data)
            writer.write(b"".join(protocol.data_to_send()))  # the closing handshake's answer
            if protocol.close_expected():
                break
        writer.close()


async def test_a_full_queue_drops_the_oldest_waiting_audio_never_the_message_being_written_or_a_control():
    peer = SlowPeer()
    async with peer as url:
        async with connect(url, max_size=None) as ws:
            stats = ProviderStats()
            outbox = Outbox(stats, max_audio=16000)
            outbox.start(ws, "test outbox")
            try:
                big = b"\x01" * 4_000_000  # 160 bytes of audio in a message far larger than the kernel's buffers
                outbox.audio(big, 160)  # written at once
                first = b"\x02" * 160  # queued: the writer waits on the socket to write it
                outbox.audio(first, len(first))
                await asyncio.sleep(0.1)
                assert ws.transport.get_write_buffer_size() > 0, "the connection must be full for this test"
                outbox.send("a tool result")
                frames = [bytes([3 + i % 200]) * 160 for i in range(200)]  # 32,000 bytes: twice the bound
                for frame in frames:
                    outbox.audio(frame, len(frame))
            finally:
                peer.reading.set()
            await wait_for(lambda: peer.received and peer.received[-1] == frames[-1], what="the last frame")
            await outbox.close()

    kept = frames[-(16000 - len(first)) // 160:]  # the bound holds the frame being written and the newest
    assert peer.received == [big, first, "a tool result", *kept]
    assert stats.audio_in_bytes == 160 + len(first) + 200 * 160
    assert stats.audio_unsent_bytes == (200 - len(kept)) * 160
