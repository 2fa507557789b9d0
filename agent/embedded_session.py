"""One connection to the embedded agent: the Voice Agent V1 conversation, as Deepgram runs it.

Three tasks per connection, one per direction plus the agent's own turns:

* the reader (`_receive`, the connection handler's task) takes the client's frames: audio goes
  to the `Listener` (voice activity and recogniser), JSON to `_on_message`. It never waits on
  anything but the socket, so `UserStartedSpeaking` goes out as soon as the detector fires.
* the writer (`_write`) sends the `Outbox` in order. The outbox is bounded: the agent's audio
  waits for room (`put_audio`), events never wait, and a client that stops reading altogether
  is disconnected once `outbox_limit` messages are queued.
* the turn worker (`_perform_turns`) performs one `Turn` at a time: the greeting, an answer to
  what the caller said, or an injected agent message. A barge-in cancels the turn in progress;
  nothing of it is sent after that (its queued audio is dropped from the outbox too).

A reply is spoken sentence by sentence: `ConversationText` (assistant) with the sentence, then
its audio. `AgentStartedSpeaking` (and, for an answer to the caller, `LatencyReport`) precede
the first audio of a reply, `AgentAudioDone` follows its last. Audio goes out in
`output_chunk` frames at most `output_lead` seconds ahead of real time, so that a barge-in
leaves little audio to clear on the Twilio side and "stop sending the rest" means something.

Fatal problems send Deepgram's `Error` and close the socket: 1008 when the client broke the
protocol (`UNPARSABLE_CLIENT_MESSAGE`, `NON_SETTINGS_MESSAGE_BEFORE_SETTINGS`,
`SETTINGS_ALREADY_APPLIED`, `INVALID_SETTINGS`), 1011 when the server cannot go on
(`CLIENT_MESSAGE_TIMEOUT`, `FAILED_TO_START_LISTENING`, `FAILED_TO_SPEAK`,
`INTERNAL_SERVER_ERROR`). The close reason is the error code. Nothing one connection does
reaches another: every piece of state here belongs to the session.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Union

from prometheus_client import Counter
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

import metrics
from agent import server_protocol as p
from agent.brain import Brain, Conversation, Thought, ThinkError, function_error
from agent.listen import FrameClassifier, Listener, SpeechGate, Utterance
from agent.voice import Voice, VoiceError, split_sentences
from engine import BYTES_PER_SECOND, EngineFactory
from throttle import Throttle

log = logging.getLogger(__name__)

APOLOGY = "Sorry, I could not come up with an answer just now. Please say that again."
NO_ANSWER = "Sorry, I have no answer to that."
CLOSE_PROTOCOL = 1008  # the client broke the protocol
CLOSE_SERVER = 1011  # the server cannot go on
BAD_INPUT_LOG_INTERVAL = 10.0

sessions_total = Counter("embedded_agent_sessions", "Connections to the embedded agent that sent Settings",
                         registry=metrics.REGISTRY)
turns_total = Counter("embedded_agent_turns", "Caller turns the embedded agent answered (spoken or injected)",
                      registry=metrics.REGISTRY)
barge_ins_total = Counter("embedded_agent_barge_ins", "Replies of the embedded agent cut by the caller",
                          registry=metrics.REGISTRY)
function_calls_total = Counter("embedded_agent_function_calls", "FunctionCallRequests sent by the embedded agent",
                               registry=metrics.REGISTRY)
errors_total = Counter("embedded_agent_errors", "Error messages sent by the embedded agent (connection closed)",
                       ["code"], registry=metrics.REGISTRY)
warnings_total = Counter("embedded_agent_warnings", "Warning messages sent by the embedded agent", ["code"],
                         registry=metrics.REGISTRY)
bad_input_total = Counter("embedded_agent_bad_input", "Client messages the embedded agent could not use, by kind",
                          ["kind"], registry=metrics.REGISTRY)
_bad_input_throttles: defaultdict[str, Throttle] = defaultdict(lambda: Throttle(BAD_INPUT_LOG_INTERVAL))


@dataclass(frozen=True)
class Tuning:
    """Timings and bounds of a session; the defaults are what the server runs with."""

    idle_timeout: float = 10.0  # no message from the client for this long: CLIENT_MESSAGE_TIMEOUT
    function_timeout: float = 10.0  # waiting for a FunctionCallResponse (the Twilio side's tools time out at 5 s)
    output_lead: float = 1.0  # seconds of reply audio sent ahead of real time
    output_chunk: float = 0.1  # seconds of audio per binary frame
    outbox_limit: int = 256  # messages queued for a client that does not read: disconnected
    audio_in_flight: int = 4  # audio frames queued for the writer before the speaker waits
    max_turns_queued: int = 16
    max_function_rounds: int = 4  # think -> call functions -> think again, at most this often per turn
    speech_onset_frames: int = 3  # 20 ms frames of speech in a row that make UserStartedSpeaking
    speech_hangover_frames: int = 15  # 20 ms frames of non-speech in a row that end speech
    close_timeout: float = 5.0  # for the last messages (an Error) to reach the client


@dataclass
class Parts:
    """What sessions hear, think and speak with; shared by the server's sessions."""

    engine_factory: EngineFactory
    classifier_factory: Callable[[], FrameClassifier]
    voice: Voice
    brain: Brain


@dataclass
class SessionRecord:
    """What one connection did: for the close log line, and for tests to inspect."""

    request_id: str
    opened: float = field(default_factory=time.monotonic)
    closed: float | None = None
    audio_in_bytes: int = 0
    audio_out_bytes: int = 0
    turns: int = 0
    barge_ins: int = 0
    error: str | None = None  # the code of the Error sent, if any


# --- Turns and the outbox -------------------------------------------------------------------


@dataclass(frozen=True)
class Say:
    """Speak `text` as the agent (the greeting, an InjectAgentMessage)."""

    text: str


@dataclass(frozen=True)
class Answer:
    """Answer what the caller said (or what the client injected as the caller)."""

    text: str
    ended_at: float  # when the caller's speech ended (or the injection arrived)
    recognised_at: float
    spoken: bool  # heard by the recogniser, not injected


Turn = Union[Say, Answer]


class TurnQueue:
    """Turns waiting for the worker; bounded, and an `interrupt` injection goes first."""

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[Turn] = collections.deque()
        self._limit = limit
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, turn: Turn, *, front: bool = False) -> bool:
        if len(self._items) >= self._limit:
            return False
        (self._items.appendleft if front else self._items.append)(turn)
        self._ready.set()
        return True

    async def pop(self) -> Turn:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


class OutboxFull(Exception):
    pass


class Outbox:
    """Messages for the client, in order. Audio waits for room; events raise when full."""

    def __init__(self, limit: int, audio_limit: int) -> None:
        self._items: collections.deque[str | bytes | Close] = collections.deque()
        self._limit = limit
        self._audio_limit = audio_limit
        self._audio = 0  # audio frames in `_items`
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self.closed = False  # a Close is queued: nothing more is taken

    def put_event(self, text: str) -> None:
        if self.closed:
            return
        if len(self._items) >= self._limit:
            raise OutboxFull
        self._items.append(text)
        self._ready.set()

    async def put_audio(self, data: bytes) -> None:
        while self._audio >= self._audio_limit and not self.closed:
            self._room.clear()
            await self._room.wait()
        if self.closed:
            return
        self._items.append(data)
        self._audio += 1
        self._ready.set()

    def drop_audio(self) -> None:
        """Forget the audio not yet sent (barge-in); events stay, in order."""
        if self._audio:
            self._items = collections.deque(m for m in self._items if not isinstance(m, bytes))
            self._audio = 0
            self._room.set()

    def close(self, code: int, reason: str) -> None:
        """Send what is queued (but no more audio), then close the socket."""
        self.drop_audio()
        self._items.append(Close(code, reason))
        self.closed = True
        self._ready.set()
        self._room.set()

    async def get(self) -> str | bytes | Close:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, bytes):
            self._audio -= 1
            self._room.set()
        return item


@dataclass
class Playback:
    """How much of a reply has been sent since it started, to keep `output_lead` ahead of real time."""

    start: float
    sent: float = 0.0  # seconds of audio


@dataclass(frozen=True)
class Timing:
    """Where a reply's latency went, for AgentStartedSpeaking and LatencyReport."""

    since: float  # the caller's speech ended (or the injection / greeting began)
    stt: float | None = None  # recogniser: end of speech -> transcript
    ttt: float = 0.0  # thinking
    report: bool = False  # send a LatencyReport (answers to the caller only)
    tool: bool = False  # the thought was a tool call


class Fatal(Exception):
    def __init__(self, code: str, description: str, close_code: int) -> None:
        super().__init__(description)
        self.code, self.description, self.close_code = code, description, close_code


# --- The session ----------------------------------------------------------------------------


class Session:
    def __init__(self, ws: ServerConnection, record: SessionRecord, parts: Parts, tuning: Tuning) -> None:
        self._ws = ws
        self.record = record
        self._parts = parts
        self._tuning = tuning
        self._outbox = Outbox(tuning.outbox_limit, tuning.audio_in_flight)
        self._conversation: Conversation | None = None  # set by Settings
        self._listener: Listener | None = None
        self._turns = TurnQueue(tuning.max_turns_queued)
        self._current: asyncio.Task | None = None  # the turn being performed
        self._speaking = False  # the current turn has sent audio and not yet AgentAudioDone
        self._pending_calls: dict[str, tuple[str, asyncio.Future[str]]] = {}  # id -> (name, result)
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        try:
            self._send(p.welcome(self.record.request_id))
            await self._receive()
        finally:
            await self._stop_tasks()
            if self._outbox.closed:  # an Error is on its way: let it reach the client
                try:
                    async with asyncio.timeout(self._tuning.close_timeout):
                        await writer
                except TimeoutError:
                    pass
            writer.cancel()
            await self._ws.close()

    async def _stop_tasks(self) -> None:
        tasks = [t for t in (*self._tasks, self._current) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.aclose()

    # --- reading ---------------------------------------------------------------------------

    async def _receive(self) -> None:
        idle_timeout = self._tuning.idle_timeout
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(idle_timeout) as idle:
                async for message in self._ws:
                    idle.reschedule(loop.time() + idle_timeout)
                    self._on_message(message)
                    if self._outbox.closed:
                        return
        except TimeoutError:
            self._fail(p.CLIENT_MESSAGE_TIMEOUT, f"no message from the client for {idle_timeout:g} s", CLOSE_SERVER)
        except Fatal as fatal:
            self._fail(fatal.code, fatal.description, fatal.close_code)
        except ConnectionClosed:
            pass

    def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            if self._listener is None:
                raise Fatal(p.NON_SETTINGS_MESSAGE_BEFORE_SETTINGS, "audio arrived before Settings", CLOSE_PROTOCOL)
            self.record.audio_in_bytes += len(message)
            try:
                self._listener.feed(message)
            except Exception as exc:  # a broken recogniser must end the call audibly, not hang it
                log.exception("%s: the recogniser failed", self.record.request_id)
                raise Fatal(p.INTERNAL_SERVER_ERROR, f"the recogniser failed: {type(exc).__name__}", CLOSE_SERVER) from None
            return
        try:
            msg = p.parse_client_message(message)
        except p.ProtocolError as exc:
            raise Fatal(exc.code, exc.description, CLOSE_PROTOCOL) from None
        if isinstance(msg, p.KeepAlive):  # allowed at any time: it only proves the client is there
            return
        if isinstance(msg, p.Settings):
            if self._conversation is not None:
                raise Fatal(p.SETTINGS_ALREADY_APPLIED, "Settings can be sent once per connection", CLOSE_PROTOCOL)
            self._apply(msg.config)
            return
        if self._conversation is None:
            raise Fatal(p.NON_SETTINGS_MESSAGE_BEFORE_SETTINGS, f"{type(msg).__name__} arrived before Settings",
                        CLOSE_PROTOCOL)
        conversation = self._conversation
        match msg:
            case p.InjectUserMessage(content=content):
                now = time.monotonic()
                self._user_turn(Answer(content, now, now, spoken=False))
            case p.InjectAgentMessage(message=text, behavior=behavior):
                self._inject_agent_message(text, behavior)
            case p.UpdatePrompt(prompt=prompt):  # Deepgram adds to the prompt, it does not replace it
                conversation.prompt = f"{conversation.prompt}\n{prompt}" if conversation.prompt else prompt
                self._send(p.prompt_updated())
            case p.UpdateThink(prompt=prompt, functions=functions, skipped_functions=skipped):
                conversation.prompt, conversation.functions = prompt, functions
                self._send(p.think_updated())
                self._warn_skipped(skipped)
            case p.FunctionCallResponse():
                self._on_function_response(msg)
            case p.ForceEndTurn():
                assert self._listener is not None
                self._spawn(self._listener.finalize())
            case p.Unsupported(type=kind):
                self._warn(p.UNSUPPORTED_MESSAGE, f"{kind} has no effect on the embedded agent")

    def _apply(self, config: p.AgentConfig) -> None:
        parts, tuning = self._parts, self._tuning
        try:
            self._listener = Listener(
                parts.engine_factory, parts.classifier_factory(),
                SpeechGate(tuning.speech_onset_frames, tuning.speech_hangover_frames),
                self._on_speech_started, self._on_utterance,
            )
        except Exception as exc:
            log.exception("%s: cannot start the recogniser", self.record.request_id)
            raise Fatal(p.FAILED_TO_START_LISTENING, f"the recogniser did not start: {exc}", CLOSE_SERVER) from None
        self._conversation = Conversation(config.prompt, config.functions)
        sessions_total.inc()
        self._send(p.settings_applied())
        self._warn_skipped(config.skipped_functions)
        self._spawn(self._perform_turns())
        if config.greeting:
            self._turns.push(Say(config.greeting))

    def _warn_skipped(self, names: tuple[str, ...]) -> None:
        if names:
            self._warn(p.UNSUPPORTED_MESSAGE, f"server-side functions (with an endpoint) are not offered by the "
                                              f"embedded agent: {', '.join(names)}")

    # --- what the caller does ---------------------------------------------------------------

    def _on_speech_started(self) -> None:
        """The caller started speaking: stop the reply in progress, tell the client at once."""
        if self._interrupt(speech=True):
            self.record.barge_ins += 1
            barge_ins_total.inc()
        self._send(p.user_started_speaking())

    def _on_utterance(self, utterance: Utterance) -> None:
        self._user_turn(Answer(utterance.text, utterance.ended_at, utterance.recognised_at, spoken=True))

    def _user_turn(self, answer: Answer) -> None:
        """A new caller turn replaces whatever the agent is still saying or preparing.

        A turn recognised while an earlier answer was already being spoken (the recogniser
        lags the detector) is a barge-in too; an injected one (DTMF) stops the reply but is
        not speech, so it sends no UserStartedSpeaking.
        """
        was_speaking = self._speaking
        if self._interrupt(speech=answer.spoken) and answer.spoken and was_speaking:
            self.record.barge_ins += 1
            barge_ins_total.inc()
            self._send(p.user_started_speaking())
        self._send(p.conversation_text("user", answer.text))
        if not self._turns.push(answer):
            self._bad_input("turn_queue_full", f"more than {self._tuning.max_turns_queued} turns waiting; "
                                               f"dropped: {answer.text[:60]!r}")

    def _interrupt(self, *, speech: bool) -> bool:
        """Cancel the turn in progress and drop its unsent audio; True if there was one.

        A reply cut by anything but the caller's speech (DTMF, an `interrupt` injection) ends
        with `AgentAudioDone`: the client has no `UserStartedSpeaking` to tell it so.
        """
        self._outbox.drop_audio()
        if self._current is None or self._current.done():
            return False
        if self._speaking and not speech:
            self._send(p.agent_audio_done())
        self._speaking = False
        self._current.cancel()
        return True

    def _inject_agent_message(self, text: str, behavior: str) -> None:
        busy = (self._current is not None and not self._current.done()) or len(self._turns) > 0
        if behavior == "default" and (busy or (self._listener is not None and self._listener.in_speech)):
            self._send(p.injection_refused("the user or the agent is mid-turn; use behavior queue or interrupt"))
            return
        if behavior == "interrupt":
            self._interrupt(speech=False)
        if not self._turns.push(Say(text), front=behavior == "interrupt"):
            self._send(p.injection_refused(f"more than {self._tuning.max_turns_queued} turns are waiting"))

    def _on_function_response(self, response: p.FunctionCallResponse) -> None:
        call_id = response.id
        if call_id is None:  # `id` is optional in the model: match by name if that is unambiguous
            ids = [i for i, (name, _) in self._pending_calls.items() if name == response.name]
            call_id = ids[0] if len(ids) == 1 else None
        pending = self._pending_calls.get(call_id) if call_id is not None else None
        if pending is None or pending[1].done():
            self._bad_input("unexpected_function_response",
                            f"FunctionCallResponse for no pending call (id={response.id!r}, name={response.name!r})")
            return
        pending[1].set_result(response.content)

    # --- the agent's turns -------------------------------------------------------------------

    async def _perform_turns(self) -> None:
        while not self._outbox.closed:
            turn = await self._turns.pop()
            self._current = asyncio.create_task(self._perform(turn))
            await asyncio.wait([self._current])

    async def _perform(self, turn: Turn) -> None:
        try:
            if isinstance(turn, Say):
                spoken: list[str] = []
                try:
                    await self._say(turn.text, spoken, Timing(since=time.monotonic()))
                finally:
                    self._conversation.add_assistant(" ".join(spoken))
            else:
                await self._answer(turn)
        except VoiceError as exc:
            log.error("%s: speech failed: %s", self.record.request_id, exc)
            self._fail(p.FAILED_TO_SPEAK, f"the voice failed: {exc}", CLOSE_SERVER)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: turn failed", self.record.request_id)
            self._fail(p.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}", CLOSE_SERVER)

    async def _answer(self, turn: Answer) -> None:
        """Think, speak, call functions and think again until the agent has nothing to call."""
        conversation = self._conversation
        conversation.add_user(turn.text)
        self.record.turns += 1
        turns_total.inc()
        stt = turn.recognised_at - turn.ended_at if turn.spoken else None
        for round_ in range(self._tuning.max_function_rounds):
            self._send(p.agent_thinking(self._parts.brain.description))
            started = time.monotonic()
            try:
                thought = await self._parts.brain.think(conversation)
            except ThinkError as exc:
                log.warning("%s: %s", self.record.request_id, exc)
                self._warn(p.THINK_REQUEST_FAILED, str(exc))
                thought = Thought(APOLOGY)
            ttt = time.monotonic() - started
            if round_ == 0 and not thought.text and not thought.calls:
                thought = Thought(NO_ANSWER)
            timing = Timing(since=turn.ended_at if round_ == 0 else started, stt=stt, ttt=ttt,
                            report=round_ == 0, tool=bool(thought.calls))
            spoken: list[str] = []
            requested: list[p.FunctionCall] = []
            results: dict[str, str] = {}
            try:
                if thought.text:
                    await self._say(thought.text, spoken, timing)
                if thought.calls:
                    await self._call(thought.calls, requested, results)
            finally:  # the history holds what was said and asked, even when a barge-in cut it
                conversation.add_assistant(" ".join(spoken), tuple(requested))
                for call in requested:
                    conversation.add_result(call.id, results.get(call.id, function_error("cancelled: the caller spoke")))
            if not thought.calls:
                return

    async def _say(self, text: str, spoken: list[str], timing: Timing) -> None:
        """Speak `text`, sentence by sentence, synthesising the next while this one plays."""
        sentences = split_sentences(text)
        if not sentences:
            return
        playback: Playback | None = None
        upcoming = asyncio.create_task(self._synthesize(sentences[0]))
        try:
            for i, sentence in enumerate(sentences):
                audio, tts = await upcoming
                if i + 1 < len(sentences):
                    upcoming = asyncio.create_task(self._synthesize(sentences[i + 1]))
                self._send(p.conversation_text("assistant", sentence))
                spoken.append(sentence)
                if playback is None:
                    playback = Playback(start=time.monotonic())
                    self._started_speaking(timing, tts, playback.start)
                await self._play(audio, playback)
            self._send(p.agent_audio_done())
        finally:
            self._speaking = False
            if not upcoming.done():
                upcoming.cancel()
            elif not upcoming.cancelled():
                upcoming.exception()  # retrieved: a failure of a sentence never spoken is not news

    def _started_speaking(self, timing: Timing, tts: float, now: float) -> None:
        self._speaking = True
        total = now - timing.since
        self._send(p.agent_started_speaking(total, tts, timing.ttt))
        if timing.report:
            self._send(p.latency_report(
                stt_latency=timing.stt,
                ttt_token_latency=timing.ttt,  # the whole answer comes at once: first token = all tokens
                ttt_tool_latency=timing.ttt if timing.tool else None,
                ttt_text_latency=None if timing.tool else timing.ttt,
                tts_latency=tts,
                total_latency=total,
            ))

    async def _synthesize(self, sentence: str) -> tuple[bytes, float]:
        """(audio, seconds it took); one retry, since a second failure is not a fluke."""
        started = time.monotonic()
        try:
            audio = await self._parts.voice.synthesize(sentence)
        except VoiceError as exc:
            log.warning("%s: speech failed, retrying once: %s", self.record.request_id, exc)
            audio = await self._parts.voice.synthesize(sentence)
        return audio, time.monotonic() - started

    async def _play(self, audio: bytes, playback: Playback) -> None:
        chunk = max(1, round(self._tuning.output_chunk * BYTES_PER_SECOND))
        for offset in range(0, len(audio), chunk):
            piece = audio[offset : offset + chunk]
            ahead = playback.sent - (time.monotonic() - playback.start)
            if ahead < 0:  # the client has played everything sent (a slow synthesis): start the clock again
                playback.start = time.monotonic() - playback.sent
            elif ahead > self._tuning.output_lead:
                await asyncio.sleep(ahead - self._tuning.output_lead)
            await self._outbox.put_audio(piece)
            playback.sent += len(piece) / BYTES_PER_SECOND
            self.record.audio_out_bytes += len(piece)

    async def _call(self, calls: tuple[p.FunctionCall, ...], requested: list[p.FunctionCall],
                    results: dict[str, str]) -> None:
        """Ask the client to run the functions it declared; wait for their results (bounded)."""
        conversation = self._conversation
        known = [c for c in calls if conversation.function(c.name) is not None]
        for call in calls:
            if conversation.function(call.name) is None:
                results[call.id] = function_error(f"there is no function named {call.name}")
                self._warn(p.FUNCTION_CALL_FAILED, f"the agent called {call.name}, which Settings does not declare")
        loop = asyncio.get_running_loop()
        futures = {c.id: loop.create_future() for c in known}
        self._pending_calls.update({c.id: (c.name, futures[c.id]) for c in known})
        requested.extend(calls)
        try:
            if known:
                self._send(p.function_call_request(known))
                function_calls_total.inc(len(known))
                await asyncio.wait(futures.values(), timeout=self._tuning.function_timeout)
        finally:
            for call_id in futures:
                self._pending_calls.pop(call_id, None)
        for call in known:
            future = futures[call.id]
            if future.done():
                results[call.id] = future.result()
            else:
                results[call.id] = function_error(f"no FunctionCallResponse within {self._tuning.function_timeout:g} s")
                self._warn(p.FUNCTION_CALL_FAILED, f"{call.name} ({call.id}): no FunctionCallResponse within "
                                                   f"{self._tuning.function_timeout:g} s")

    # --- writing -----------------------------------------------------------------------------

    async def _write(self) -> None:
        while True:
            item = await self._outbox.get()
            if isinstance(item, Close):
                await self._ws.close(item.code, item.reason)
                return
            try:
                await self._ws.send(item)
            except ConnectionClosed:
                return

    def _send(self, text: str) -> None:
        try:
            self._outbox.put_event(text)
        except OutboxFull:
            if not self._outbox.closed:
                self._bad_input("client_not_reading", f"{self._tuning.outbox_limit} messages waiting; disconnecting")
                self._outbox.closed = True
                self._ws.transport.abort()  # it reads nothing, so a close handshake would only wait

    def _warn(self, code: str, description: str) -> None:
        warnings_total.labels(code).inc()
        self._send(p.warning(code, description))

    def _fail(self, code: str, description: str, close_code: int) -> None:
        """Send Deepgram's Error, then close; nothing is sent after it."""
        if self._outbox.closed:
            return
        log.warning("%s: Error %s: %s", self.record.request_id, code, description)
        self.record.error = code
        errors_total.labels(code).inc()
        if self._current is not None and self._current is not asyncio.current_task():
            self._current.cancel()
        self._send(p.error(code, description))
        self._outbox.close(close_code, code)

    def _bad_input(self, kind: str, description: str) -> None:
        bad_input_total.labels(kind).inc()
        count = _bad_input_throttles[kind].hit()
        if count:
            log.warning("%s: %s (%d of this kind since the last such line)", self.record.request_id, description, count)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
