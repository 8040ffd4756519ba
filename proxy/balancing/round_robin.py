"""``round_robin``: equal turns over the available upstreams, weights ignored.

Like nginx's and HAProxy's plain round robin with every weight equal: upstream ``i``
gets pick ``i``, ``i + n``, ... O(1) per pick.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proxy.balancing.base import RequestView


class RoundRobin:
    """Equal turns; ``weights`` is accepted for the common signature and ignored."""

    __slots__ = ("_next", "_targets")

    def __init__(
        self,
        upstreams: Sequence[Any],
        options: Mapping[str, Any],
        weights: Sequence[float] | None = None,
    ) -> None:
        self._targets = tuple(upstreams)
        self._next = 0

    def pick(self, request: RequestView) -> Any | None:
        targets = self._targets
        if not targets:
            return None
        i = self._next
        if i >= len(targets):
            i = 0
        self._next = i + 1
        return targets[i]

    def __repr__(self) -> str:
        return f"<RoundRobin [{len(self._targets)} upstreams, next {self._next}]>"
