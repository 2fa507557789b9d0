"""The agent benchmark's floor: a bare relay between /agent and the fake agent, nothing else.

    python bench/floor_agent.py --port P --agent-url ws://127.0.0.1:Q/v1/agent/converse --api-key K

Per Twilio socket: wait for `start`, open the agent socket, send a minimal `Settings`, then relay:
caller media -> binary audio; agent audio -> one `media` message and a `mark` (named as the
server names them, so the load generator's checks work); `UserStartedSpeaking` -> `clear`. No
framing, ledger, hub, validation, tools or metrics: what is left of the latency is the cost of
moving the bytes through one Python process on this machine, measured in the same run as the
server for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def relay(twilio, agent_url: str, api_key: str) -> None:
    start = None
    async for message in twilio:
        event = json.loads(message)
        if event.get("event") == "start":
            start = event
            break
    if start is None:
        return
    sid = json.dumps(start["streamSid"])
    call = start["start"]["customParameters"].get("call", "0")
    async with connect(agent_url, additional_headers={"Authorization": f"Token {api_key}"}, compression=None) as agent:
        await agent.recv()  # Welcome
        await agent.send(json.dumps({
            "type": "Settings",
            "audio": {"input": {"encoding": "mulaw", "sample_rate": 8000},
                      "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"}},
            "agent": {"think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}, "prompt": f"bench call {call}"},
                      "greeting": "Hello from the benchmark."}}))

        async def caller_to_agent() -> None:
            async for message in twilio:
                event = json.loads(message)
                if event.get("event") == "media":
                    await agent.send(base64.b64decode(event["media"]["payload"]))
                elif event.get("event") == "stop":
                    return

        async def agent_to_caller() -> None:
            reply, marks = 0, 0
            async for message in agent:
                if isinstance(message, bytes):
                    marks += 1
                    await twilio.send('{"event":"media","streamSid":%s,"media":{"payload":"%s"}}'
                                      % (sid, base64.b64encode(message).decode()))
                    await twilio.send('{"event":"mark","streamSid":%s,"mark":{"name":"r%d/%d"}}' % (sid, reply, marks))
                elif '"AgentStartedSpeaking"' in message:
                    reply += 1
                elif '"UserStartedSpeaking"' in message:
                    await twilio.send('{"event":"clear","streamSid":%s}' % sid)

        tasks = [asyncio.create_task(caller_to_agent()), asyncio.create_task(agent_to_caller())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def main_async(args: argparse.Namespace) -> None:
    async def handler(ws) -> None:
        try:
            await relay(ws, args.agent_url, args.api_key)
        except ConnectionClosed:
            pass

    async with serve(handler, "127.0.0.1", args.port, compression=None, process_request=health):
        print("READY", flush=True)
        await asyncio.Future()


def health(connection, request):
    if request.path == "/healthz":
        return connection.respond(200, "ok\n")
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--agent-url", required=True)
    parser.add_argument("--api-key", required=True)
    try:
        asyncio.run(main_async(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
