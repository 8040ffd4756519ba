"""Rise/fall: a health state that flips only after N consecutive opposite results.

HAProxy's ``rise``/``fall``: an upstream that is up goes down after ``fall``
consecutive failed checks, one that is down comes up after ``rise`` consecutive
successes. A result that agrees with the current state resets the streak, so an
upstream alternating success and failure never flips (with thresholds above 1).
"""

from __future__ import annotations


class RiseFall:
    __slots__ = ("fall", "healthy", "last_reason", "rise", "streak")

    def __init__(self, rise: int, fall: int, healthy: bool = True) -> None:
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self.streak = 0  # consecutive results that disagree with ``healthy``
        self.last_reason = ""

    def record(self, ok: bool, reason: str = "") -> bool:
        """Feed one result; True when the state flipped."""
        self.last_reason = reason
        if ok == self.healthy:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < (self.rise if ok else self.fall):
            return False
        self.healthy = ok
        self.streak = 0
        return True

    def __repr__(self) -> str:
        state = "up" if self.healthy else "down"
        return f"<RiseFall [{state}, {self.streak} against, rise {self.rise} fall {self.fall}]>"
