"""This instance's picture of every call in the cluster: who carries it, and which ended lately.

Pure code fed by the Redis hub's reader, tested without Redis (tests/test_redishub_registry.py).

Two sources keep it right:
- the lifecycle stream, entry by entry, as segments start and end (milliseconds behind);
- a snapshot every heartbeat of every instance's `owned` hash and whether its `alive` key is
  still there, taken together with the lifecycle stream's last id, so the reader applies the
  lifecycle entries up to that id first and the snapshot then agrees with them exactly.

An instance whose `alive` key has been missing for `dead_after` seconds (three heartbeats) is
gone: its segments are dropped, and a call left with none has *vanished* (its subscribers are
told `call_ended` with `"endOfCall": "lost"`). After this reader reconnects to Redis every
instance gets the full time again to re-register (a restarted Redis starts empty).
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
        self.seen_alive: dict[str, float] = {}

    def remote_owners(self, call_sid: str) -> dict[Owner, str]:
        call = self.calls.get(call_sid)
        return {o: i for o, i in call.owners.items() if o[0] != self.me} if call else {}

    def ended_call(self, call_sid: str, now: float) -> tuple[str, str] | None:
        """(call_started, call_ended) of a call that ended within the history window."""
        self._forget_old(now)
        found = self.ended.get(call_sid)
        return (found[1], found[2]) if found else None

    # --- the lifecycle stream --------------------------------------------------------------

    def lifecycle(self, fields: dict[str, str], now: float) -> list[Change]:
        call_sid, owner = fields["c"], (fields["o"], int(fields["g"]))
        self.seen_alive[owner[0]] = now
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
        listed: dict[str, dict[str, str]] = {}
        for instance, alive, owned in instances:
            if instance == self.me:
                continue
            self.seen_alive.setdefault(instance, now)
            if alive:
                self.seen_alive[instance] = now
                listed[instance] = owned
        for instance, owned in listed.items():
            for call_sid, value in owned.items():
                record = json.loads(value)
                changes += self._segment(call_sid, (instance, int(record["g"])), record["i"], record["d"])
        # A live instance's segment that its hash no longer lists ended without a lifecycle
        # entry reaching us (a Redis restart lost it): drop it like a dead instance's.
        gone = [(sid, o) for sid, call in self.calls.items() for o in call.owners
                if o[0] in listed and sid not in listed[o[0]]]
        gone += [(sid, o) for sid, call in self.calls.items() for o in call.owners
                 if o[0] != self.me and now - self.seen_alive.setdefault(o[0], now) > self.dead_after]
        for call_sid, owner in gone:
            call = self.calls.get(call_sid)
            if call is not None:
                call.owners.pop(owner, None)
                if not call.owners:
                    del self.calls[call_sid]
                    changes.append(Change("vanished", call_sid))
        return changes

    def dead_instances(self, now: float) -> list[str]:
        """Instances not seen alive for `dead_after` seconds (to clean their keys up)."""
        return [i for i, seen in self.seen_alive.items() if i != self.me and now - seen > self.dead_after]

    def forget_instance(self, instance: str) -> None:
        self.seen_alive.pop(instance, None)

    def grace(self, now: float) -> None:
        """Reconnected: every instance gets the full `dead_after` again to re-register."""
        for instance in self.seen_alive:
            self.seen_alive[instance] = now
