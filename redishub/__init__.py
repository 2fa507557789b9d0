"""Calls and subscribers of many server processes and machines meet through Redis (REDIS_URL).

    hub.py        RedisHub: the in-process Hub for this instance's calls, plus Redis for the rest
    publisher.py  this instance's entries into Redis: bounded queue, one task, never waits a call
    registry.py   the mirror of which calls exist where (pure)
    entries.py    key names, stream entries, repeat and loss accounting (pure)
    scripts.py    the Lua scripts that decide a call's first start and last end atomically

Data model (README "Scaling out"): one Redis stream per call (`tt:call:<callSid>`, trimmed to
about HISTORY_MESSAGES entries and expiring HISTORY_SECONDS after the call), one lifecycle
stream (`tt:calls`), and per instance a heartbeat key (`tt:alive:<id>`) and a hash of the
segments it carries (`tt:owned:<id>`).
"""

from redishub.hub import RedisHub

__all__ = ["RedisHub"]
