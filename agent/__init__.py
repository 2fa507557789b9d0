"""Voice agents on `/agent`: a Twilio `<Connect><Stream>` bridged to a speech-to-speech provider.

    playback.py   pure: provider audio cut into 20 ms frames, and the per-call playback ledger
                  (what was sent to Twilio, what the caller has heard, what a `clear` discarded)
    provider.py   the small interface every provider implements, and its typed events
    tools.py      functions the agent may call (AGENT_TOOLS), their JSON schemas, timeouts
    deepgram.py   the Deepgram Voice Agent V1 provider (also used for the embedded agent)
    bridge.py     the Twilio side shared by every provider: one call, one task per direction
    counters.py   the agent's Prometheus counters
"""
