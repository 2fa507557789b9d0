"""The voice agent's Prometheus counters, served at /metrics with the rest (metrics.REGISTRY).

Agent audio moves in provider chunks (a few per second per call), not per 20 ms frame, so plain
Prometheus counters are cheap enough here; they move while calls run.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from metrics import REGISTRY

calls_total = Counter("agent_calls", "Agent calls started, by provider", ["provider"], registry=REGISTRY)
calls_active = Gauge("agent_calls_active", "Agent calls in progress", registry=REGISTRY, multiprocess_mode="livesum")
end_of_call_total = Counter(
    "agent_end_of_call", "Agent calls ended, by how (caller_hung_up, end_call, failed, shutdown)", ["outcome"],
    registry=REGISTRY,
)
turns_total = Counter("agent_turns", "Agent replies spoken (segments of agent audio)", registry=REGISTRY)
barge_ins_total = Counter("agent_barge_ins", "Agent replies cut by the caller (Twilio clear sent)", registry=REGISTRY)
dtmf_total = Counter("agent_dtmf", "Keypresses passed to the agent", registry=REGISTRY)
tool_calls_total = Counter(
    "agent_tool_calls", "Tool calls, by result (ok, unknown_tool, bad_arguments, timeout, exception)", ["result"],
    registry=REGISTRY,
)
audio_sent_bytes = Counter("agent_audio_sent_bytes", "Agent audio sent to Twilio (8 kHz mu-law bytes)",
                           registry=REGISTRY)
audio_played_bytes = Counter("agent_audio_played_bytes", "Agent audio the caller heard (mark echoes, or before a "
                             "clear)", registry=REGISTRY)
audio_discarded_bytes = Counter("agent_audio_discarded_bytes", "Agent audio sent to Twilio then dropped by a clear",
                                registry=REGISTRY)
audio_unsent_bytes = Counter("agent_audio_unsent_bytes", "Agent audio dropped before it was sent (barge-in, "
                             "the call ending)", registry=REGISTRY)
provider_audio_dropped_bytes = Counter(
    "agent_provider_late_audio_bytes", "Audio of an interrupted reply that arrived after the barge-in (dropped)",
    registry=REGISTRY,
)
provider_errors_total = Counter(
    "agent_provider_errors", "Errors and warnings from agent providers, by provider and fatality",
    ["provider", "fatal"],
    registry=REGISTRY,
)
provider_bad_messages = Counter(
    "agent_provider_bad_messages", "Unparsable or unexpected provider messages", ["provider"], registry=REGISTRY,
)
tokens_total = Counter(
    "agent_tokens", "Model tokens used by agent calls (OpenAI's response.done usage), by provider and kind "
    "(input, output, inputText, inputAudio, inputCached, outputText, outputAudio)", ["provider", "kind"],
    registry=REGISTRY,
)
preconnects_total = Counter(
    "agent_preconnects", "Provider sessions opened by the TwiML webhook before the stream, by what became of them "
    "(opened, used, expired, mismatch, evicted)", ["result"], registry=REGISTRY,
)
