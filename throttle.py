"""Rate-limiting for log lines about repeated events (bad frames, an overloaded recogniser).

A flood of the same problem must neither fill the disk nor hide that it is still happening:
the first occurrence is logged at once, later ones at most once per interval, with how many
happened since the last line.
"""

from __future__ import annotations

import time


class Throttle:
    def __init__(self, interval: float):
        self.interval = interval
        self._last = -float("inf")
        self._unreported = 0

    def hit(self) -> int:
        """Count one occurrence; return how many to report now, or 0 to stay quiet."""
        self._unreported += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            return 0
        self._last = now
        count, self._unreported = self._unreported, 0
        return count
