"""``compress``: compress responses for clients that accept it (Traefik ``compress``,
Caddy ``encode``, nginx ``gzip``).

Theory of operation
-------------------
The request hook negotiates: ``negotiate`` picks the encoding from the request's
``Accept-Encoding`` (q-values first, ties by the order of ``encodings``; ``q=0``
refuses, ``*`` stands for what is not named, ``identity`` competes only when named),
or none for HEAD and ``Range`` requests. The choice is ``Request.encoding`` (``gzip``,
``br``, ``zstd`` or ``identity``) and replaces the ``Accept-Encoding`` sent upstream,
so that a route's cache stores one variant per encoding (the exchange looks the cache
up with it) and an upstream that compresses itself uses the same encoding.

The response side is not a ``response_filter``: it changes the body, so the exchange
asks it before the cache sees the head (``ResponseEncoder.encode``), and what the cache
stores is what the client gets: a hit for ``gzip`` is the stored gzip bytes, not
compressed again. ``encode`` leaves a response alone when it is already encoded, a
204/206/304 or below 200, ``no-transform``, gRPC or ``text/event-stream``, not one of
``types``, or shorter than ``min_size`` by its ``Content-Length``; an eligible one gets
``Vary: Accept-Encoding`` (merged into its ``Vary``), and when the client chose an
encoding: ``Content-Encoding``, its ``ETag`` weakened (Envoy's
``weaken_etag_on_compress``), ``Content-Length`` and ``Accept-Ranges`` removed (the
body goes chunked, or as HTTP/2 DATA), and a ``Coder`` for the body.

A body of unknown length (chunked, close-delimited) is compressed whatever its size:
holding its head until ``min_size`` bytes came would stall a streaming response, and
what it costs a short one is a few bytes of framing. The exchange feeds each body piece
to the coder, flushes it at the end of each upstream read (so a streaming response is
never held in the compressor) and finishes it when the body ends; the client's write
buffer holds the upstream as for any response, so nothing holds a whole body.
"""

from __future__ import annotations

import re
import zlib
from typing import TYPE_CHECKING, Any, Final

from proxy.config.filters import COMPRESS_LEVELS
from proxy.filters.base import Filter, Request
from proxy.http.headers import ResponseHead

if TYPE_CHECKING:
    from proxy.config.filters import CompressOptions
    from proxy.filters.context import Site

#: Accept-Encoding items read; a longer list's rest is ignored (a hostile header costs
#: at most this much).
MAX_ITEMS: Final = 32
_QVALUE: Final = re.compile(rb"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)")
_IDENTITY: Final = b"identity"
#: Content types never compressed: a stream of events the client reads as they come,
#: and gRPC (its messages carry their own compression).
_NEVER: Final = (b"text/event-stream", b"application/grpc")


def accepted(header: bytes) -> dict[bytes, float]:
    """The q-value of each coding named in an ``Accept-Encoding`` value (lower case,
    ``x-gzip`` as ``gzip``; the first mention counts; a malformed q-value refuses)."""
    q: dict[bytes, float] = {}
    for item in header.split(b",", MAX_ITEMS)[:MAX_ITEMS]:
        coding, _, params = item.partition(b";")
        coding = coding.strip().lower()
        if not coding:
            continue
        if coding == b"x-gzip":
            coding = b"gzip"
        value = 1.0
        for param in params.split(b";"):
            name, eq, given = param.partition(b"=")
            if eq and name.strip().lower() == b"q":
                given = given.strip()
                value = float(given) if _QVALUE.fullmatch(given) else 0.0
        q.setdefault(coding, value)
    return q


def negotiate(header: bytes | None, offered: tuple[bytes, ...]) -> bytes | None:
    """The encoding of ``offered`` (in the server's order of preference) to answer
    ``header`` (an ``Accept-Encoding`` value, None without one) with, or None for
    the body as it is: the highest q-value wins, ties go to the earlier in
    ``offered``; ``*`` gives its q-value to the codings not named; ``identity`` wins
    only when named with a higher q-value than the best encoding's."""
    if not header:
        return None
    q = accepted(header)
    star = q.get(b"*", 0.0)
    best, best_q = None, 0.0
    for coding in offered:
        value = q.get(coding, star)
        if value > best_q:
            best, best_q = coding, value
    if best is not None and q.get(_IDENTITY, -1.0) > best_q:
        return None
    return best


class Coder:
    """One response body's compressor: ``compress`` a piece (what comes out may be
    empty: the compressor keeps it), ``flush`` what it keeps (at the end of each
    upstream read), ``finish`` at the end of the body."""

    __slots__ = ("_compress", "_finish", "_flush")

    def __init__(self, encoding: bytes, level: int) -> None:
        self._compress: Any
        self._flush: Any
        self._finish: Any
        if encoding == b"gzip":
            z = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: the gzip wrapper
            self._compress, self._finish = z.compress, z.flush
            self._flush = lambda: z.flush(zlib.Z_SYNC_FLUSH)
        elif encoding == b"br":
            import brotli  # type: ignore[import-untyped,import-not-found,unused-ignore]

            b = brotli.Compressor(quality=level)
            self._compress, self._flush, self._finish = b.process, b.flush, b.finish
        else:
            import zstandard  # type: ignore[import-not-found,unused-ignore]

            c = zstandard.ZstdCompressor(level=level).compressobj()
            self._compress, self._finish = c.compress, c.flush
            self._flush = lambda: c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def compress(self, data: bytes | memoryview) -> bytes:
        out: bytes = self._compress(data)
        return out

    def flush(self) -> bytes:
        out: bytes = self._flush()
        return out

    def finish(self) -> bytes:
        out: bytes = self._finish()
        return out


_STRONG_ETAG: Final = re.compile(rb"\r\n(etag)[ \t]*:[ \t]*(?=\")", re.IGNORECASE)


def _mime(value: bytes) -> bytes:
    return value.partition(b";")[0].strip().lower()


class Compress(Filter):
    """The ``compress`` filter (see the module): a request hook that negotiates, and
    the exchange's ``ResponseEncoder`` for the response."""

    def __init__(self, options: CompressOptions, site: Site) -> None:
        super().__init__(options)
        self.offered = tuple(e.encode() for e in options.encodings)
        self.levels = {e.encode(): options.levels.get(e, COMPRESS_LEVELS[e])
                       for e in options.encodings}  # fmt: skip
        self.min_size = options.min_size
        patterns = "|".join(re.escape(t).replace(r"\*", "[^/]*") for t in options.types)
        self._types = re.compile(patterns.encode())

    def request_filter(self, request: Request) -> None:
        headers = request.headers
        chosen = None
        if request.method != "HEAD" and "range" not in headers:
            values = headers.get_all("accept-encoding")
            if values:
                chosen = negotiate(", ".join(values).encode("latin-1"), self.offered)
        request.encoding = encoding = chosen or _IDENTITY
        headers.set("Accept-Encoding", encoding.decode())

    def _not_modified(
        self, request: Request, found: ResponseHead
    ) -> tuple[ResponseHead, None] | None:
        """A 304 to a request that chose an encoding: its strong ``ETag`` weakened, as
        on the compressed response it validates (a cache refreshes its stored head from
        the 304, and the client keeps the validator it got)."""
        if request.encoding in (None, _IDENTITY) or _STRONG_ETAG.search(found.head) is None:
            return None
        copy = found.with_lines(b"")
        copy.head = _STRONG_ETAG.sub(rb"\r\nETag: W/", found.head, count=1)
        return copy, None

    def eligible(self, lines: list[tuple[bytes, bytes]]) -> bool:
        """Whether a response with these header lines (lower-case names) is one to
        compress (its status is already known to carry a body that may be)."""
        ctype = None
        for name, value in lines:
            if name == b"content-encoding":
                return False
            if name == b"content-type" and ctype is None:
                ctype = _mime(value)
            elif (name == b"cache-control" and b"no-transform" in value.lower()) or (
                name == b"content-length" and value.isdigit() and int(value) < self.min_size
            ):
                return False
        if ctype is None or ctype.startswith(_NEVER):
            return False
        return self._types.fullmatch(ctype) is not None

    def encode(
        self, request: Request, status: int, found: ResponseHead, head_only: bool
    ) -> tuple[ResponseHead, Coder | None] | None:
        """``ResponseEncoder.encode``: the head to relay instead of ``found`` and the
        coder of its body (None: the body as it is), or None to leave it alone."""
        if status == 304:
            return self._not_modified(request, found)
        if status < 200 or status in (204, 206):
            return None
        raw = found.head.split(b"\r\n")
        lines = [(n.strip().lower(), v.strip()) for n, _, v in
                 (line.partition(b":") for line in raw[1:] if line)]  # fmt: skip
        if not self.eligible(lines):
            return None
        encoding = request.encoding
        coding = None if head_only or encoding in (None, _IDENTITY) else encoding
        out = [raw[0]]
        vary_done = False
        for (name, value), line in zip(lines, (line for line in raw[1:] if line), strict=True):
            if name == b"vary" and not vary_done:
                vary_done = True
                tokens = {t.strip().lower() for t in value.split(b",")}
                if not tokens & {b"*", b"accept-encoding"}:
                    line = b"Vary: " + (value + b", " if value else b"") + b"Accept-Encoding"
            elif coding is not None:
                if name in (b"content-length", b"accept-ranges"):
                    continue
                if name == b"etag" and not value.startswith(b"W/"):
                    line = b"ETag: W/" + value
            out.append(line)
        if not vary_done:
            out.append(b"Vary: Accept-Encoding")
        if coding is not None:
            out.append(b"Content-Encoding: " + coding)
        copy = found.with_lines(b"")
        copy.head = b"\r\n".join(out) + b"\r\n"
        if coding is None:
            return copy, None
        copy.chunked, copy.has_length, copy.length = True, False, -1
        return copy, Coder(coding, self.levels[coding])
