"""The dashboard in a real browser (tests/browser.py: Debian's headless Chromium) against the
real server, with real calls: Twilio streams played over sockets, a Deepgram-compatible
recogniser (`local_stt.LocalSTT` with a scripted engine, so the page has words to show), and the
fake Deepgram Voice Agent (`tests/fake_agent.py`) for agent calls.

What a person would check: calls appear, open, lines arrive (interim text shown differently,
then replaced by the final), an agent call's cut lines, barge-in, keys and tools, the call ends;
the token prompt; hostile text shown as text; the page reconnects by itself after a restart and
says so while it cannot. The first test saves a screenshot in test-artifacts/ (printed), the
picture in the README (docs/dashboard.png is a copy of it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from agent.tools import load_tools
from browser import Browser, Page
from conftest import STT_KEY, proxy_settings, start_proxy, wait_for
from engine import BYTES_PER_SECOND, Segment
from fake_agent import FakeAgent, Reply, Script
from fake_openai import Faults as OpenAIFaults
from fake_openai import FakeRealtime
from local_stt import Faults, LocalSTT
from simulate import TwilioStream, run_agent_call
from test_agent import quiet, tone
from test_integration import metric_values

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CLIENT_TOKEN = "dashboard-token-4c9e1f7a2b"

pytestmark = pytest.mark.slow

# --- what the page shows, read as a person would read it ------------------------------------------

ROWS = """return [...document.querySelectorAll('#calls tbody tr')].filter(r => !r.hidden)
                 .map(r => [...r.cells].map(c => c.textContent))"""
LINES = """return [...document.querySelectorAll('#lines li')].map(li => ({
    kind: li.className, who: li.querySelector('.who').textContent, said: li.querySelector('.said').textContent,
    detail: li.querySelector('.detail') ? li.querySelector('.detail').textContent : ''}))"""
FIGURES = """return Object.fromEntries([...document.querySelectorAll('#call-figures div')]
                 .map(d => [d.querySelector('dt').textContent, d.querySelector('dd').textContent]))"""
# Every state of the open call's speech lines, recorded as the page changes them (a test-side
# observer: polling could miss an interim that lives for a second on a busy machine).
RECORD_LINES = """
window.snapshots = [];
const lines = document.getElementById('lines');
new MutationObserver(() => window.snapshots.push([...lines.querySelectorAll('li.speech')].map(li =>
    [li.classList.contains('interim'), li.querySelector('.who').textContent, li.querySelector('.said').textContent])))
  .observe(lines, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def row_of(rows: list[list[str]], call_sid: str) -> dict[str, str] | None:
    names = ["call", "mode", "started", "duration", "parameters", "outcome"]
    return next((dict(zip(names, row)) for row in rows if row[0] == call_sid), None)


# --- a recogniser that says scripted lines ----------------------------------------------------------


class Scripted:
    """An engine factory for the Deepgram-compatible server: channel N "hears" lines[N], one per
    `seconds` of its audio, with an interim of the line's first half at half time (as Deepgram
    sends a hypothesis before it settles). Real protocol messages, real sockets; only the words
    are chosen by the test."""

    def __init__(self, lines: dict[int, list[str]], seconds: float = 2.0):
        self.lines, self.seconds = lines, seconds

    def __call__(self, channel, emit, *, interim_results: bool):
        return ScriptedEngine(list(self.lines.get(channel, [])), emit, int(self.seconds * BYTES_PER_SECOND))


class ScriptedEngine:
    def __init__(self, lines: list[str], emit, window: int):
        self.lines, self.emit, self.window = lines, emit, window
        self.received = 0
        self.done = 0  # lines finished
        self.interim = False

    def feed(self, mulaw: bytes) -> None:
        self.received += len(mulaw)
        while self.done < len(self.lines):
            start = self.done * self.window
            words = self.lines[self.done].split(" ")
            if not self.interim and self.received >= start + self.window // 2:
                self.interim = True
                self.emit(Segment(start / BYTES_PER_SECOND, self.window / 2 / BYTES_PER_SECOND,
                                  " ".join(words[:max(1, len(words) // 2)]), is_final=False))
            elif self.received >= start + self.window:
                self.emit(Segment(start / BYTES_PER_SECOND, self.window / BYTES_PER_SECOND, self.lines[self.done],
                                  is_final=True, speech_final=True))
                self.done, self.interim = self.done + 1, False
            else:
                return

    async def finalize(self) -> None:
        """Nothing pending: each line is final at the end of its window."""

    async def aclose(self) -> None:
        self.lines = []


CALLER = ["Hi, I am calling about my order A17.", "It was supposed to arrive on Monday."]
OTHER = ["Thank you for calling Acme, this is Sam.", "Let me check that for you right away."]
OPENAI_KEY = "sk-test-openai-key-0123456789"
GREETING = "Thank you for calling Acme support, how can I help you with your order today?"


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    browser = Browser()
    yield browser
    browser.close()


@pytest.fixture
async def page(browser):
    page = Page(browser)
    yield page
    await page.open("about:blank")  # the next test starts from nothing (its server is another origin)


class Server:
    """The proxy in this event loop, in front of the scripted recogniser and the fake Voice Agent;
    it can be stopped and started again on the same port (the page's address)."""

    def __init__(self, stt: LocalSTT, agent: FakeAgent, **settings):
        self.stt, self.agent, self.settings = stt, agent, settings
        self.port = 0
        self.proxy = self._stop = self._task = None

    async def start(self) -> "Server":
        settings = proxy_settings(self.stt.url, **{
            "port": self.port, "deepgram_agent_url": self.agent.url, "agent_provider": "deepgram",
            "agent_tools": load_tools(str(ROOT / "examples/tools.py")), **self.settings})
        self.port, self.proxy, self._stop, self._task = await start_proxy(settings)
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self._task, 30)

    def url(self, path: str, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    @property
    def page(self) -> str:
        return self.url("/", "http")


@pytest.fixture
async def servers():
    """Factory: `await servers(lines={...}, script=Script(...), **settings)`; all stopped afterwards."""
    running = []

    async def make(lines: dict[int, list[str]] | None = None, script: Script | None = None,
                   faults: Faults = Faults(), **settings) -> Server:
        stt = LocalSTT(api_key=STT_KEY, engine_factory=Scripted(lines or {0: CALLER, 1: OTHER}), faults=faults)
        await stt.start()
        agent = await FakeAgent(STT_KEY, script).__aenter__()
        server = Server(stt, agent, **settings)
        running.append(server)
        return await server.start()

    yield make
    for server in running:
        if not server._task.done():
            await server.stop()
        await server.agent.__aexit__()
        await server.stt.stop()


async def open_dashboard(page: Page, server: Server) -> None:
    await page.open(server.page)
    await page.wait("return document.getElementById('connection').textContent === 'Live'", what="Live")


async def start_call(server: Server, params: dict[str, str] | None = None) -> tuple[TwilioStream, object]:
    """A transcription call's Twilio socket, `start` sent; the caller plays its audio with `play`."""
    stream = TwilioStream(tracks=["inbound", "outbound"], custom_parameters=params or {})
    twilio = await connect(server.url("/twilio"))
    await twilio.send(stream.start())
    return stream, twilio


async def play(twilio, stream: TwilioStream, seconds: float, first_ms: int = 0) -> int:
    """Both legs in 20 ms frames, in real time; returns the next frame's timestamp."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    for i in range(int(seconds * 50)):
        for track in ("inbound", "outbound"):
            await twilio.send(stream.media(track, first_ms + 20 * i, b"\x42" * 160))
        await asyncio.sleep(max(0.0, began + (i + 1) * 0.02 - loop.time()))
    return first_ms + int(seconds * 1000)


async def hang_up(twilio, stream: TwilioStream) -> None:
    await twilio.send(stream.stop())
    await twilio.close()


# --- the tests -----------------------------------------------------------------------------------------


async def test_calls_appear_live_open_and_their_lines_arrive_then_the_call_ends(page, servers):
    """A transcription call and an agent call, watched from the moment they start. Saves the
    screenshot of the README."""
    script = Script(speed=2.0, replies=[
        Reply("Your order A17 shipped on Monday and arrives tomorrow.", 1.0, ("lookup_order", {"order_id": "A17"}))],
        default_reply=Reply("Is there anything else I can help you with?", 0.8))
    server = await servers(script=script, agent_greeting=GREETING)
    await open_dashboard(page, server)
    assert "No calls yet" in await page.text()
    shown = await page.wait("""const d = document.querySelector('[data-figure=subscribersActive]');
                               return d.textContent !== '–' && d.textContent""", what="health figures")
    assert shown == str(int((await metric_values(server.port))["subscribers_active"]))  # the page itself

    # A transcription call: it appears as soon as it starts, is opened, and its words arrive.
    stream, twilio = await start_call(server, {"tenant": "acme", "queue": "orders"})
    rows = await page.wait(ROWS.replace("return", "const rows =") + "; return rows.length && rows",
                           what="the call's row")
    row = row_of(rows, stream.call_sid)
    assert row["mode"] == "transcription" and row["outcome"] == "in progress"
    assert row["parameters"] == "tenant=acme, queue=orders"
    await page.click_row(stream.call_sid)
    await page.js(RECORD_LINES)
    await play(twilio, stream, 4.2)
    await hang_up(twilio, stream)
    await page.wait("return document.getElementById('call-outcome').textContent === 'complete'", what="the end")
    lines = await page.js(LINES)
    speech = [(line["who"], line["said"]) for line in lines if "speech" in line["kind"]]
    assert speech == [("Caller", CALLER[0]), ("Other party", OTHER[0]), ("Caller", CALLER[1]), ("Other party", OTHER[1])]
    assert not any("interim" in line["kind"] for line in lines)
    assert (lines[-1]["who"], lines[-1]["said"]) == ("Call ended", "complete")
    # Each interim was shown (greyed) where its final then appeared, in the same line.
    snapshots = await page.js("return window.snapshots")
    for n, (who, final) in enumerate(speech):
        half = " ".join(final.split(" ")[:len(final.split(" ")) // 2])
        shown_interim = [i for i, s in enumerate(snapshots) if len(s) > n and s[n] == [True, who, half]]
        replaced = [i for i, s in enumerate(snapshots) if len(s) > n and s[n] == [False, who, final]]
        assert shown_interim and replaced and shown_interim[0] < replaced[0], (n, who)
    figures = await page.js(FIGURES)
    sent = server.stt.connections[-1].sent  # what the recogniser said for this call: the messages
    assert figures["messages"] == str(len(sent)) and figures["gaps"] == "0" and figures["reconnects"] == "0"
    assert figures["audio"] == "4.2 s"
    assert row_of(await page.js(ROWS), stream.call_sid)["outcome"] == "complete"

    # An agent call: the caller talks over the greeting, presses 1 #, the agent looks the order up.
    agent_call = asyncio.create_task(run_agent_call(
        server.url("/agent"), quiet(1.5) + tone(0.6) + quiet(3.5), dtmf=[(4.6, "1#")], tail=1.5,
        params={"tenant": "acme"}))
    agent_sid = await page.wait("""const row = [...document.querySelectorAll('#calls tbody tr')]
        .find(r => r.cells[1].textContent.startsWith('agent')); return row && row.cells[0].textContent""",
                                what="the agent call's row")
    await page.click_row(agent_sid)
    # Meanwhile another call is in progress (its duration ticks in the list).
    waiting, waiting_twilio = await start_call(server, {"tenant": "globex"})
    playing = asyncio.create_task(play(waiting_twilio, waiting, 12))
    result = await agent_call
    assert result.call_sid == agent_sid and result.violations == []
    await page.wait("return document.getElementById('call-outcome').textContent.startsWith('caller_hung_up')",
                    what="the agent call's end")
    lines = await page.js(LINES)
    kinds = [line["who"] for line in lines]
    barge_in = next(line for line in lines if line["who"] == "Barge-in")
    cut = next(line for line in lines if "cut" in line["kind"].split())
    assert cut["who"] == "Agent" and GREETING.startswith(cut["said"]) and cut["said"] != GREETING
    assert f"the whole reply: “{GREETING}”" in cut["detail"]
    assert "the caller spoke over the agent after" in barge_in["said"] and "discarded" in barge_in["said"]
    assert kinds.index("Barge-in") < kinds.index("Tool call") < kinds.index("Tool result")
    tool_call = next(line for line in lines if line["who"] == "Tool call")
    tool_result = next(line for line in lines if line["who"] == "Tool result")
    assert tool_call["said"] == 'lookup_order({"order_id":"A17"})'
    assert tool_result["said"].startswith("lookup_order ok in") and '"status": "shipped on Monday"' in tool_result["said"]
    assert [line["said"] for line in lines if line["who"] == "Key"] == ["1", "#"]
    assert any(line["who"] == "Agent" and line["said"] == script.replies[0].text for line in lines)
    assert any(line["who"] == "Latency" for line in lines)
    figures = await page.js(FIGURES)
    assert (figures["barge-ins"], figures["tool calls"], figures["DTMF"]) == ("1", "1", "2")
    row = row_of(await page.js(ROWS), agent_sid)
    assert row["mode"] == "agent · deepgram" and row["outcome"] == "caller_hung_up"

    rows = await page.js(ROWS)
    assert rows[0][0] == waiting.call_sid and row_of(rows, waiting.call_sid)["outcome"] == "in progress"
    duration = "return document.querySelector('#calls tbody tr').cells[3].textContent"
    ticks = [await page.js(duration)]
    await asyncio.sleep(1.2)
    ticks.append(await page.js(duration))
    assert ticks[0] != ticks[1], ticks  # the call in progress (newest, first) ticks
    shot = await page.screenshot(ARTIFACTS / "dashboard.png")
    print(f"\nscreenshot: {shot}")
    # Nothing was blocked by the Content-Security-Policy and no script failed.
    assert not [entry for entry in await page.console() if entry["level"] == "SEVERE"]
    playing.cancel()
    await waiting_twilio.close()


async def test_hostile_text_from_calls_is_shown_as_text_and_never_runs(page, servers):
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    server = await servers(lines={0: [hostile], 1: ["<b>bold</b> &amp; <i>friends</i>"]},
                           script=Script(greet=False, replies=[
                               Reply('<svg onload="window.pwned=3">', 0.4, ("lookup_order", {"order_id": hostile}))]))
    await open_dashboard(page, server)
    stream, twilio = await start_call(server, {"<i>name</i>": '"><img src=y onerror="window.pwned=4">'})
    await page.wait(f"return document.body.innerText.includes('{stream.call_sid}')", what="the call")
    await page.click_row(stream.call_sid)
    await play(twilio, stream, 2.2)
    await hang_up(twilio, stream)
    await page.wait("return document.getElementById('call-outcome').textContent === 'complete'", what="the end")
    said = [line["said"] for line in await page.js(LINES)]
    assert hostile in said and "<b>bold</b> &amp; <i>friends</i>" in said  # exactly as spoken, as text
    row = row_of(await page.js(ROWS), stream.call_sid)
    assert row["parameters"] == '<i>name</i>="><img src=y onerror="window.pwned=4">'

    result = await run_agent_call(server.url("/agent"), quiet(0.5), dtmf=[(0.2, "9#")], tail=1.0)
    await page.click_row(result.call_sid)
    await page.wait("return document.getElementById('call-outcome').textContent.startsWith('caller_hung_up')",
                    what="the agent call's end")
    lines = await page.js(LINES)
    assert any(line["said"] == '<svg onload="window.pwned=3">' for line in lines)
    assert any(line["said"] == f"lookup_order({json.dumps({'order_id': hostile}, separators=(',', ':'))})"
               for line in lines)
    elements = await page.js("return [...document.querySelectorAll('main *')].map(e => e.tagName.toLowerCase())")
    assert not {"img", "script", "svg", "b", "i"} & set(elements)
    assert await page.js("return window.pwned === undefined")


async def test_with_client_tokens_the_page_asks_for_one_and_shows_nothing_until_it_is_right(page, servers, caplog):
    caplog.set_level(logging.INFO)
    server = await servers(client_tokens=(CLIENT_TOKEN,))
    stream, twilio = await start_call(server, {"tenant": "secret-tenant"})  # in progress before the page opens
    await page.network_events()  # start the record from here
    await page.open(server.page)
    await page.wait("return !document.getElementById('token-form').hidden", what="the token prompt")
    text = await page.text()
    assert stream.call_sid not in text and "secret-tenant" not in text and "Token needed" in text
    assert await page.js("return document.getElementById('main').hidden")

    await page.type("#token", "sub-token-mallory-0000")  # well-formed, wrong
    await page.click("#token-form button")
    await page.wait("return document.getElementById('token-error').textContent.includes('refused')",
                    what="the refusal")
    assert stream.call_sid not in await page.text()
    await page.type("#token", "short")
    await page.click("#token-form button")
    assert "at least 16 characters" in await page.js("return document.getElementById('token-error').textContent")

    await page.type("#token", CLIENT_TOKEN)
    await page.click("#token-form button")
    await page.wait(f"return document.body.innerText.includes('{stream.call_sid}')", what="the call, with the token")
    assert "secret-tenant" in await page.text()
    # The token went in the websocket handshake's Sec-WebSocket-Protocol, never in a URL.
    events = await page.network_events()
    urls = [e["params"].get("url") or e["params"].get("request", {}).get("url", "") for e in events]
    assert urls and not [url for url in urls if CLIENT_TOKEN in url]
    handshakes = [e["params"]["request"]["headers"] for e in events
                  if e["method"] == "Network.webSocketWillSendHandshakeRequest"]
    offered = [value for headers in handshakes for name, value in headers.items()
               if name.lower() == "sec-websocket-protocol"]
    assert f"twilio-transcribe, bearer.{CLIENT_TOKEN}" in offered
    assert CLIENT_TOKEN not in caplog.text and "sub-token-mallory-0000" not in caplog.text

    # The token lasts as long as the tab (a reload reconnects without asking), then can be forgotten.
    await page.open(server.page)
    await page.wait(f"return document.body.innerText.includes('{stream.call_sid}')", what="the call after a reload")
    await page.click("#forget-token")
    await page.wait("return !document.getElementById('token-form').hidden", what="the prompt again")
    assert stream.call_sid not in await page.text()
    await hang_up(twilio, stream)


async def test_the_page_reconnects_by_itself_after_a_restart_and_says_so_meanwhile(page, servers):
    server = await servers()
    await open_dashboard(page, server)
    stream, twilio = await start_call(server)
    await page.wait(f"return document.body.innerText.includes('{stream.call_sid}')", what="the call")
    await play(twilio, stream, 0.5)
    stopping = asyncio.create_task(server.stop())  # SIGTERM: the call is ended, subscribers closed with 1001
    notice = await page.wait("""const n = document.getElementById('notice');
                                return !n.hidden && n.textContent""", what="the disconnection notice")
    assert notice.startswith("Disconnected") and "Reconnecting in" in notice
    assert "Reconnecting" in await page.js("return document.getElementById('connection').textContent")
    await stopping
    await asyncio.sleep(1.5)  # the page retries meanwhile, and says the server cannot be reached
    notice = await page.js("return document.getElementById('notice').textContent")
    assert "Reconnecting in" in notice and "attempt" in notice
    assert row_of(await page.js(ROWS), stream.call_sid)["outcome"] != "in progress"  # ended by the shutdown

    await server.start()  # the same port
    await page.wait("return document.getElementById('connection').textContent === 'Live'", timeout=20,
                    what="Live again")
    assert await page.js("return document.getElementById('notice').hidden")
    after, twilio_after = await start_call(server)
    await page.wait(f"return document.body.innerText.includes('{after.call_sid}')", what="a call after the restart")
    assert row_of(await page.js(ROWS), stream.call_sid) is not None  # the page still shows the earlier call
    await hang_up(twilio_after, after)


async def test_a_page_opened_late_shows_calls_in_progress_and_ended_lately_with_their_history(page, servers):
    server = await servers()
    ended, twilio = await start_call(server, {"tenant": "initech"})
    await play(twilio, ended, 2.2)
    await hang_up(twilio, ended)
    await wait_for(lambda: not server.proxy.hub.has_call(ended.call_sid), what="the first call's end")
    running, twilio = await start_call(server, {"tenant": "hooli"})
    await play(twilio, running, 2.2)  # one line of each side said before the page opens

    await open_dashboard(page, server)
    await page.wait(f"return document.body.innerText.includes('{ended.call_sid}')", what="the ended call")
    rows = await page.js(ROWS)
    assert row_of(rows, ended.call_sid)["outcome"] == "complete"
    assert row_of(rows, running.call_sid)["outcome"] == "in progress"
    assert rows[0][0] == running.call_sid  # newest first
    await page.click_row(running.call_sid)
    said = [line["said"] for line in await page.js(LINES)]
    assert said[:2] == [CALLER[0], OTHER[0]]  # from the call's history
    await page.click_row(ended.call_sid)  # its lines were never seen here: fetched from the history
    await page.wait("return document.querySelectorAll('#lines li.speech').length === 2", what="the ended call's lines")
    assert [line["said"] for line in await page.js(LINES)] == [CALLER[0], OTHER[0], "complete"]

    await page.type("#filter", "initech")
    assert [row[0] for row in await page.js(ROWS)] == [ended.call_sid]
    await page.type("#filter", "check that")  # words said in the call in progress
    await play(twilio, running, 2.0, first_ms=2200)  # its second lines arrive
    await page.wait(f"""const rows = [...document.querySelectorAll('#calls tbody tr')].filter(r => !r.hidden);
                        return rows.length === 1 && rows[0].cells[0].textContent === '{running.call_sid}'""",
                    what="the filter by words said")
    await hang_up(twilio, running)


async def test_the_page_keeps_the_last_300_ended_calls_and_every_call_in_progress(page, servers):
    """A busy server must not make the page grow without end: the page's own bound, exercised by
    feeding its message handler (the same function the websocket feeds) 320 short calls."""
    server = await servers()
    await open_dashboard(page, server)
    kept = await page.js("""
        for (let n = 0; n < 320; n++) {
            const sid = 'CAbusy' + String(n).padStart(4, '0');
            dispatch({type: 'call_started', callSid: sid, customParameters: {}, mode: 'transcription',
                      startTime: new Date(Date.now() - 1000 * (400 - n)).toISOString()});
            if (n < 318) dispatch({type: 'call_ended', callSid: sid, endOfCall: 'complete', duration: 1});
        }
        return [...document.querySelectorAll('#calls tbody tr')].map(r => r.cells[0].textContent)""")
    assert len(kept) == 302  # 300 ended + 2 in progress
    assert "CAbusy0319" in kept and "CAbusy0318" in kept and "CAbusy0017" not in kept and "CAbusy0018" in kept


async def test_a_call_whose_recogniser_fails_shows_the_error_its_outcome_and_the_health_figure(page, servers):
    server = await servers(faults=Faults(reject_status=401), connect_timeout=1.0)
    await open_dashboard(page, server)
    before = int(await page.wait("""const d = document.querySelector('[data-figure=recogniserErrors]');
                                    return d.textContent !== '–' && d.textContent""", what="health"))
    stream, twilio = await start_call(server)
    await page.wait(f"return document.body.innerText.includes('{stream.call_sid}')", what="the call")
    await page.click_row(stream.call_sid)
    await play(twilio, stream, 0.5)
    await hang_up(twilio, stream)
    await page.wait("return document.getElementById('call-outcome').textContent.startsWith('failed')", what="failed")
    errors = [line for line in await page.js(LINES) if line["who"] == "Error"]
    assert errors and errors[0]["said"].startswith("recogniser: ") and "401" in errors[0]["said"]
    assert row_of(await page.js(ROWS), stream.call_sid)["outcome"].startswith("failed: ")
    shown = await page.wait(f"""const d = document.querySelector('[data-figure=recogniserErrors]');
                               return d.textContent === '{before + 1}' && d""", what="the error in health")
    assert "bad" in await page.js("return arguments[0].className", shown)  # shown in red
    assert (await metric_values(server.port))["upstream_errors_total"] == before + 1


async def test_an_openai_call_shows_its_tokens_and_the_fatal_error_that_ended_it(page, servers):
    """The fake OpenAI Realtime server reports usage with every response.done, then fails with a
    server_error: the page shows the tokens the server counted and the error, as text."""
    async with FakeRealtime(OPENAI_KEY, faults=OpenAIFaults(error_after=2.0)) as fake:
        server = await servers(openai_realtime_url=fake.url, openai_api_key=OPENAI_KEY, agent_provider="openai")
        await open_dashboard(page, server)
        watcher = await connect(server.url("/client"))
        await watcher.recv()  # the greeting: calls in progress
        await watcher.send(json.dumps({"type": "subscribe", "callSid": "*"}))
        result = await run_agent_call(server.url("/agent"), quiet(4.0), tail=1.0, max_seconds=10)
        events = []
        while not events or events[-1]["type"] != "call_ended":
            events.append(json.loads(await asyncio.wait_for(watcher.recv(), 10)))
        await watcher.close()
    tokens = [e["tokens"] for e in events if e["type"] == "usage"][-1]
    assert tokens["input"] > 0 and tokens["output"] > 0  # the fake's response.done usage, summed by the server
    await page.click_row(result.call_sid)
    figures = await page.wait(f"""const f = {FIGURES.removeprefix("return ")};
                                  return (f.tokens || '').includes('{tokens["output"]} output') && f""", what="tokens")
    assert figures["tokens"] == ", ".join(f"{n} {kind}" for kind, n in tokens.items())
    fatal = next(e for e in events if e["type"] == "error" and e["fatal"])
    assert "server_error" in fatal["message"]
    error = next(line for line in await page.js(LINES) if line["who"] == "Error")
    assert error["said"] == f"provider, fatal: {fatal['message']}"
    row = row_of(await page.js(ROWS), result.call_sid)
    assert row["mode"] == "agent · openai" and row["outcome"].startswith("failed")


async def test_after_a_dropped_connection_the_page_fills_in_what_it_missed_and_repeats_nothing(page, servers):
    server = await servers(lines={0: CALLER + ["Thanks, bye."], 1: OTHER + ["You are welcome, goodbye."]})
    await open_dashboard(page, server)
    stream, twilio = await start_call(server)
    await page.wait(f"return document.body.innerText.includes('{stream.call_sid}')", what="the call")
    await page.click_row(stream.call_sid)
    position = await play(twilio, stream, 2.2)  # the first line of each side
    await page.wait("return document.querySelectorAll('#lines li.speech:not(.interim)').length === 2", what="2 lines")
    await page.js("socket.close(4000, 'the test cuts the connection')")  # as a network failure would
    await page.wait("return !document.getElementById('notice').hidden", what="the notice")
    position = await play(twilio, stream, 2.0, position)  # the second lines, said while the page is away
    await page.wait("return document.getElementById('connection').textContent === 'Live'", what="Live again")
    await play(twilio, stream, 2.0, position)  # the third, live again
    await hang_up(twilio, stream)
    await page.wait("return document.getElementById('call-outcome').textContent === 'complete'", what="the end")
    said = [(line["who"], line["said"]) for line in await page.js(LINES) if "speech" in line["kind"]]
    assert said == [("Caller", CALLER[0]), ("Other party", OTHER[0]), ("Caller", CALLER[1]), ("Other party", OTHER[1]),
                    ("Caller", "Thanks, bye."), ("Other party", "You are welcome, goodbye.")]
