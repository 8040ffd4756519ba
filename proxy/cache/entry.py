"""A stored response, and what a hit sends from it.

An ``Entry`` keeps what a hit needs ready: ``head``, the status line and the header
lines to send (every header the proxy forwarded but the framing ones and ``Age``,
each line ending in CRLF), and the body; a hit adds ``Age``, ``Cache-Status``,
``Content-Length`` and ``Connection``. ``headers`` (lower-case names), ``cc`` and the
times feed ``proxy.cache.policy``. With ``surrogate`` (the cache reads
``Surrogate-Control``), that header is kept in ``lines`` and ``headers`` but never sent.
A 304 from a revalidation updates the entry in place (``refresh``, RFC 9111 4.3.4).
"""

from __future__ import annotations

from typing import Final

from proxy.cache.policy import Directives, initial_age, lifetime, response_directives

#: Headers a stored response does not keep: the proxy writes its own framing and
#: ``Age``, and ``Cache-Status`` from an upstream cache would be stale on a hit.
_NOT_STORED: Final = frozenset(
    {b"age", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
     b"cache-status"}
)
#: Headers a 304 must not change: they describe the stored body (RFC 9111 3.2).
_NOT_UPDATED: Final = frozenset(
    (b"content-length", b"content-encoding", b"content-range", b"content-md5",
     b"transfer-encoding")
)

Line = tuple[bytes, bytes, bytes]  # lower-case name, value, the line as it came


def parse_head(head: bytes) -> tuple[bytes, list[Line]]:
    """A response head as the proxy forwards it (``ResponseHead.head``: the status
    line and header lines, each ending in CRLF) -> (status line, header lines)."""
    lines = head.split(b"\r\n")
    if lines and not lines[-1]:
        lines.pop()
    found = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        found.append((name.strip().lower(), value.strip(), line))
    return lines[0], found


class Entry:
    """One stored response of a cache key and variant."""

    __slots__ = (
        "age0",
        "body",
        "cc",
        "head",
        "headers",
        "key",
        "lifetime",
        "lines",
        "response_time",
        "shown",
        "size",
        "status",
        "status_line",
        "surrogate",
        "variant",
        "vary",
    )

    def __init__(
        self,
        key: bytes,
        vary: tuple[bytes, ...],
        variant: tuple[bytes, ...],
        head: bytes,
        body: bytes,
        times: tuple[float, float],
        default_ttl: float | None,
        surrogate: bool = False,
    ) -> None:
        """``head``: as forwarded; ``times``: (request sent, response received), Unix
        times; ``vary``/``variant``: the request header names the response varies on
        and their values in the request that fetched it; ``surrogate``: go by its
        ``Surrogate-Control`` (and do not send it)."""
        self.key = key
        self.surrogate = surrogate
        self.vary = vary
        self.variant = variant
        self.body = body
        self.status_line, lines = parse_head(head)
        self.status = int(self.status_line[9:12])
        self.lines: list[Line] = []
        #: the last hit's (age, ttl, status, Connection) and the head it sent
        self.shown: tuple[tuple[int, int, bytes, bytes], bytes] | None = None
        self._update(lines, times, default_ttl)

    def _update(self, lines: list[Line], times: tuple[float, float], ttl: float | None) -> None:
        """Take ``lines`` (the upstream's ``Age`` counts in the age, then goes) and
        restart the clock at ``times``."""
        self.lines = [line for line in lines if line[0] not in _NOT_STORED]
        self.headers = [(name, value) for name, value, _ in self.lines]
        ages = [(name, value) for name, value, _ in lines if name == b"age"]
        self.cc = response_directives(self.headers, self.surrogate)
        shown = ([raw for name, _, raw in self.lines if name != b"surrogate-control"]
                 if self.surrogate and Directives.surrogate(self.headers)  # ours: not sent
                 else [raw for *_, raw in self.lines])  # fmt: skip
        self.head = b"\r\n".join([self.status_line, *shown]) + b"\r\n"
        self.size = len(self.head) + len(self.body) + len(self.key) + 64
        self.age0 = initial_age([*self.headers, *ages], *times)
        self.response_time = times[1]
        self.lifetime = lifetime(self.status, self.cc, self.headers, ttl)
        self.shown = None

    def meta(self) -> dict[str, object]:
        """Everything but the body, as JSON-able values (the Redis store's record)."""
        stored = b"\r\n".join([self.status_line, *(raw for *_, raw in self.lines)]) + b"\r\n"
        return {
            "head": stored.decode("latin-1"),  # Surrogate-Control included: not ``head``
            "surrogate": self.surrogate,
            "age0": self.age0,
            "response_time": self.response_time,
            "lifetime": self.lifetime,
        }

    @classmethod
    def restore(cls, key: bytes, vary: tuple[bytes, ...], variant: tuple[bytes, ...],
                meta: dict[str, object], body: bytes) -> Entry:  # fmt: skip
        """The entry ``meta()`` described (its head holds no ``Age``; the times carry it)."""
        entry = cls(key, vary, variant, str(meta["head"]).encode("latin-1"), body, (0.0, 0.0),
                    None, meta.get("surrogate") is True)  # fmt: skip
        entry.age0 = float(meta["age0"])  # type: ignore[arg-type]
        entry.response_time = float(meta["response_time"])  # type: ignore[arg-type]
        entry.lifetime = float(meta["lifetime"])  # type: ignore[arg-type]
        return entry

    def age(self, now: float) -> float:
        """Current age at ``now`` (Unix time)."""
        return self.age0 + (now - self.response_time)

    def ttl(self, now: float) -> float:
        """Seconds left fresh at ``now``; negative once stale (RFC 9211's ``ttl``)."""
        return self.lifetime - self.age(now)

    def refresh(self, head: bytes, times: tuple[float, float], ttl: float | None) -> bool:
        """A 304 confirmed this entry: its header lines replace the stored ones of the
        same names (but those describing the stored body), and the clock restarts.
        False (nothing changed) when the 304 names another strong validator: it is
        not about this response (RFC 9111 4.3.4)."""
        _, fresh = parse_head(head)
        etag = next((value for name, value, _ in fresh if name == b"etag"), None)
        mine = next((value for name, value in self.headers if name == b"etag"), None)
        if etag is not None and not etag.startswith(b"W/") and etag != mine:
            return False
        names = {line[0] for line in fresh if line[0] not in _NOT_UPDATED}
        merged = [line for line in self.lines if line[0] not in names]
        merged += [line for line in fresh if line[0] in names]
        self._update(merged, times, ttl)
        return True

    def __repr__(self) -> str:
        return f"<Entry {self.key[:60]!r} [{self.status}, {len(self.body)} bytes]>"
