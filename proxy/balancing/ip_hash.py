"""``ip_hash``: the client address chooses a stable upstream.

The address is ``request.client_ip``: the peer address, or the left-most untrusted
``X-Forwarded-For`` address when the listener trusts proxies (the listener decides).
The same address reaches the same upstream for as long as the set of available
upstreams is the same, in every worker process and across restarts.

It is ``consistent_hash`` with ``key: client_ip``: a ketama ring, weights respected,
and when an upstream leaves only its own clients move (HAProxy ``balance source`` with
``hash-type consistent``). Unlike nginx's ``ip_hash``, the whole address is hashed,
not its first three octets. A request with no address is served in round-robin turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proxy.balancing.consistent_hash import ConsistentHash

_OPTIONS = {"key": "client_ip"}


class IpHash(ConsistentHash):
    """A ring keyed by the client address; takes no options."""

    __slots__ = ()

    def __init__(
        self,
        upstreams: Sequence[Any],
        options: Mapping[str, Any],
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(upstreams, _OPTIONS, weights)

    def __repr__(self) -> str:
        return f"<IpHash [{self._ring!r}, fallback next {self._next}]>"
