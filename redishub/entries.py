"""What the Redis hub writes and reads: key names, stream entries, and their bookkeeping.

Pure code (no I/O), tested with properties in tests/test_redishub_entries.py.

Every instance that carries part of a call (a *segment*: the stretch between the first Twilio
`start` it receives for that callSid and the call's end there; a handover to another instance
opens a second segment) appends to the call's stream `tt:call:<callSid>`. Each entry says who
wrote it and where it belongs:

    o  the origin instance's id
    g  the segment's number at that instance
    n  the entry's place in the segment: 0 for its `start`, then 1, 2, … (never reused, even for
       an entry the origin could not publish, so a reader can count what it never got)
    k  start | msg | event | end
    d  start: the segment's `call_started` event; msg: Deepgram's message verbatim;
       event: the JSON event; end: the `call_ended` event
    p  start/end only: "1" if public, i.e. the call's first start (`call_started`) or its last
       end (`call_ended`); a handover's inner starts and ends are not shown to subscribers
    l  start/end only: "1" if the origin already delivered it to its own subscribers

The lifecycle stream `tt:calls` has one entry per segment start and end (k, c = callSid, o, g,
p, i = the id of the matching entry in the call's stream, d = the call's `call_started` for a
start, the `call_ended` for an end).
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "tt:"


@dataclass(frozen=True)
class Keys:
    prefix: str = PREFIX

    def call(self, call_sid: str) -> str:
        return f"{self.prefix}call:{call_sid}"

    @property
    def lifecycle(self) -> str:
        return f"{self.prefix}calls"

    @property
    def instances(self) -> str:
        return f"{self.prefix}instances"

    def alive(self, instance: str) -> str:
        return f"{self.prefix}alive:{instance}"

    def owned(self, instance: str) -> str:
        return f"{self.prefix}owned:{instance}"

    def call_sid(self, key: str) -> str:
        return key[len(self.prefix) + len("call:"):]


START, MSG, EVENT, END = "start", "msg", "event", "end"


@dataclass(slots=True)
class Entry:
    """One entry of a call's stream."""

    id: str
    origin: str
    segment: int
    n: int
    kind: str
    data: str
    public: bool = False
    local: bool = False

    @classmethod
    def parse(cls, entry_id: str, fields: dict[str, str]) -> "Entry":
        return cls(entry_id, fields["o"], int(fields["g"]), int(fields["n"]), fields["k"], fields["d"],
                   fields.get("p") == "1", fields.get("l") == "1")


def fields(origin: str, segment: int, n: int, kind: str, data: str) -> dict[str, str | int]:
    """An entry's fields, as XADD takes them."""
    return {"o": origin, "g": segment, "n": n, "k": kind, "d": data}


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def id_before(entry_id: str) -> str:
    """The largest stream id below `entry_id`: XREAD from it returns `entry_id` first."""
    ms, seq = parse_id(entry_id)
    if seq:
        return f"{ms}-{seq - 1}"
    if ms:
        return f"{ms - 1}-{2**64 - 1}"
    return "0-0"


class SegmentTracker:
    """Per segment, the last entry number delivered: repeats are dropped, holes are counted.

    The publisher retries a batch whose reply it did not get, so an entry may be in a stream
    twice; an entry the origin could not publish, or that Redis lost in a restart, leaves a hole
    in the numbers. The first entry seen of a segment sets where counting starts (a reader that
    joins late has not missed what came before it).
    """

    def __init__(self) -> None:
        self.last: dict[tuple[str, int], int] = {}
        self.missed = 0
        self.repeats = 0

    def accept(self, entry: Entry) -> bool:
        key = (entry.origin, entry.segment)
        last = self.last.get(key)
        if last is not None:
            if entry.n <= last:
                self.repeats += 1
                return False
            self.missed += entry.n - last - 1
        self.last[key] = entry.n
        return True
