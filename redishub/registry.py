"""This instance's picture of every call in the cluster: who carries it, and which ended lately.

Pure code fed by the Redis hub's reader, tested without Redis (tests/test_redishub_registry.py).

Two sources keep it right:
- the lifecycle stream, entry by entry, as segments start and end (milliseconds behind);
- a snapshot every heartbeat of every instance's `owned` hash and whether its `alive` key is
  still there, taken together with the lifecycle stream's last id, so the reader applies the
  lifecycle entries up to that id first and the snapshot then agrees with them exactly.

An instance whose `alive` key is gone (it expires three heartbeats after the instance's last
one) is gone too: its segments are dropped, and a call left with none has *vanished* (its
subscribers are told `call_ended` with `"endOfCall": "lost"`). For `dead_after` seconds after
this reader reconnects to Redis no instance is declared gone: a restarted Redis starts empty,
and every instance needs a moment to register again.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from redishub.entries import END, START

Owner = tuple[str, int]  # (instance, segment number)


@dataclass
class KnownCall:
    call_sid: str
    started: str  # the call's `call_started` event (its first segment's)
    start_time: str
    owners: dict[Owner, str] = field(default_factory=dict)  # -> id of the segment's start in the call's stream


class Change(NamedTuple):
    kind: str  # "segment" (a segment started), "ended" (the call's last segment ended), "vanished"
    call_sid: str
    owner: Owner | None = None
    start_id: str | None = None


class Registry:
    def __init__(self, me: str, *, history_seconds: float, dead_after: float):
        self.me = me
        self.history_seconds = history_seconds
        self.dead_after = dead_after
        self.calls: dict[str, KnownCall] = {}
        self.ended: OrderedDict[str, tuple[float, str, str]] = OrderedDict()  # -> (until, started, call_ended)
        self.alive: dict[str, bool] = {}  # other instances, as the last snapshot found them
        self.grace_until = 0.0

    def remote_owners(self, call_sid: str) -> dict[Owner, str]:
        call = self.calls.get(call_sid)
        return {o: i for o, i in call.owners.items() if o[0] != self.me} if call else {}

    def ended_call(self, call_sid: str, now: float) -> tuple[str, str] | None:
        """(call_started, call_ended) of a call that ended within the history window."""
        self._forget_old(now)
        found = self.ended.get(call_sid)
        return (found[1], found[2]) if found else None

    def ended_calls(self, now: float) -> dict[str, tuple[float, str, str]]:
        """Every call that ended within the history window: {callSid: (until, call_started, call_ended)}."""
        self._forget_old(now)
        return dict(self.ended)

    # --- the lifecycle stream --------------------------------------------------------------

    def lifecycle(self, fields: dict[str, str], now: float) -> list[Change]:
        call_sid, owner = fields["c"], (fields["o"], int(fields["g"]))
        if fields["k"] == START:
            return self._segment(call_sid, owner, fields["i"], fields["d"])
        if fields["k"] == END:
            call = self.calls.get(call_sid)
            if call is not None:
                call.owners.pop(owner, None)
            if fields.get("p") == "1":
                return self._ended(call_sid, fields["d"], now)
        return []

    def _segment(self, call_sid: str, owner: Owner, start_id: str, started: str) -> list[Change]:
        call = self.calls.get(call_sid)
        if call is None:
            self.ended.pop(call_sid, None)  # a callSid used again
            call = self.calls[call_sid] = KnownCall(call_sid, started, json.loads(started).get("startTime", ""))
        if owner in call.owners:
            return []
        call.owners[owner] = start_id
        return [Change("segment", call_sid, owner, start_id)]

    def _ended(self, call_sid: str, call_ended: str, now: float) -> list[Change]:
        call = self.calls.pop(call_sid, None)
        if call is None:
            return []
        self.ended[call_sid] = (now + self.history_seconds, call.started, call_ended)
        self._forget_old(now)
        return [Change("ended", call_sid)]

    def _forget_old(self, now: float) -> None:
        while self.ended:
            call_sid, (until, _, _) = next(iter(self.ended.items()))
            if until > now:
                break
            del self.ended[call_sid]

    # --- snapshots and dead instances ------------------------------------------------------

    def snapshot(self, instances: list[tuple[str, bool, dict[str, str]]], now: float) -> list[Change]:
        """Every instance as Redis has it: (id, alive, {callSid: owned value}), taken right
        after the lifecycle entries this registry has applied."""
        changes: list[Change] = []
        self.alive = {instance: alive for instance, alive, _ in instances if instance != self.me}
        listed = {instance: owned for instance, alive, owned in instances if alive and instance != self.me}
        for instance, owned in listed.items():
            for call_sid, value in owned.items():
                try:
                    record = json.loads(value)
                    changes += self._segment(call_sid, (instance, int(record["g"])), record["i"], record["d"])
                except (KeyError, ValueError, TypeError):  # not written by this code: not a segment
                    continue
        # A live instance's segment that its hash no longer lists ended without its lifecycle
        # entry reaching us (a Redis restart lost it); a segment of an instance that is not alive
        # is over. Either way it goes, and a call with no segment left has vanished.
        dead = now >= self.grace_until
        gone = [(sid, o) for sid, call in self.calls.items() for o in call.owners
                if o[0] != self.me and (sid not in listed[o[0]] if o[0] in listed else dead)]
        for call_sid, owner in gone:
            call = self.calls.get(call_sid)
            if call is not None:
                call.owners.pop(owner, None)
                if not call.owners:
                    del self.calls[call_sid]
                    changes.append(Change("vanished", call_sid))
        return changes

    def dead_instances(self, now: float) -> list[str]:
        """Instances registered but not alive (to clean their keys up)."""
        return [i for i, alive in self.alive.items() if not alive] if now >= self.grace_until else []

    def forget_instance(self, instance: str) -> None:
        self.alive.pop(instance, None)

    def grace(self, now: float) -> None:
        """Reconnected: give every instance `dead_after` to register again."""
        self.grace_until = now + self.dead_after
