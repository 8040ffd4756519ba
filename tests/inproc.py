"""The in-process tier: the real proxy on fake transports, with a virtual clock.

Theory of operation
-------------------
A test builds a real server from a real ``Config`` (``ProxyServer(config, loop)``) and
plays both of its peers, with no socket anywhere (uvicorn's ``MockTransport``, h11's
``ConnectionPair``):

- the *client*: ``Harness.client()`` makes a ``ClientConnection`` as a listener accepting
  a connection does, on a ``FakeTransport``; ``send`` feeds it bytes as reads,
  ``take``/``received`` give what the proxy wrote back.
- the *upstreams*: the server's event loop is a ``FakeNetLoop``, whose
  ``create_connection`` builds the protocol on a ``FakeTransport`` instead of dialling,
  and records it (``Harness.upstream(i)``: the i-th connection the proxy opened). The
  test reads the request bytes the proxy wrote (``request``/``take``), answers with
  ``respond``, ends it with ``close`` (EOF) or ``reset``. An address can refuse
  connections or leave them hanging (``Harness.refuse``, ``Harness.hang``).

Only the edges are touched: bytes in and out of the two kinds of transport, the event
loop's socket API, and the public counters (``Stats``, ``Pool``, ``Upstream``). Nothing
of ``Exchange``, ``ClientConnection`` or the cache is read or patched, so the tier
survives a rewrite of their insides.

Transports behave as asyncio's do, where the proxy can tell: ``pause_writing`` when a
write leaves more than the high-water mark unsent (``stall`` makes the peer stop
reading; ``drain`` reads, and ``resume_writing`` comes at the low-water mark);
``pause_reading`` holds what the peer sends until ``resume_reading``; ``close`` waits
for the unsent bytes, then ``connection_lost`` comes in a later callback.

Time is virtual: the loop's ``time()`` moves only in ``advance(seconds)``, which runs
every timer due on the way (the proxy's clock ticks, retry backoffs, connect and
lock timeouts, filters' sleeps) in order. Every step runs inside the loop, as in
production, and ``settle`` runs it until nothing is ready: no test sleeps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from proxy.server.protocol import ClientConnection

if TYPE_CHECKING:
    from proxy.upstream.pool import Upstream

#: asyncio's default write buffer limits (``set_write_buffer_limits`` changes them).
HIGH_WATER = 64 * 1024

#: Upstream ``i`` (0-based) listens on this port plus ``i``.
BASE_PORT = 9001


class FakeTransport(asyncio.Transport):
    """One end of a connection with no socket; the test is the peer at the other end.

    ``written`` is every byte the protocol wrote; the last ``buffered`` of them are still
    "in the socket buffer" (the peer stalled): those count in ``get_write_buffer_size``
    and drive ``pause_writing``/``resume_writing``.
    """

    def __init__(
        self, loop: FakeNetLoop, protocol: asyncio.BaseProtocol, peername: tuple[str, int]
    ) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.peername = peername
        self.written = bytearray()
        self.taken = 0  # how much of ``written`` the peer has taken (``take``)
        self.buffered = 0
        self.high = HIGH_WATER
        self.low = HIGH_WATER // 4
        self.peer_reading = True
        self.write_paused = False
        self.reading = True  # False while the protocol paused reading
        self.inbox: list[bytes | None] = []  # what the peer sent while reading paused
        self.eof_written = False
        self.closing = False
        self.lost = False
        self.aborted = False

    # -- the protocol's side (asyncio.Transport) ---------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            return  # asyncio drops it too (and warns after a few)
        self.written += data
        if not self.peer_reading:
            self.buffered += len(data)
            self._check_pause()

    def writelines(self, pieces: Any) -> None:
        for piece in pieces:
            self.write(piece)

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low, self.high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        self.high, self.low = high, high // 4 if low is None else low
        self._check_pause()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            if self.inbox:  # delivered in a later callback, as a socket read would be
                self.loop.call_soon(self._deliver)

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if not self.buffered:
            self.loop.call_soon(self._lose, None)

    def abort(self) -> None:
        self.aborted = True
        if self.buffered:  # never sent
            del self.written[len(self.written) - self.buffered :]
            self.buffered = 0
        self.closing = True
        self.loop.call_soon(self._lose, None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peername
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    # -- the peer's side (the test) -----------------------------------------------------

    def feed(self, data: bytes | None) -> None:
        """The peer sends ``data`` (None: end of file)."""
        if self.lost:
            return
        self.inbox.append(data)
        if self.reading:
            self._deliver()

    def reset(self) -> None:
        """The peer resets the connection."""
        self.closing = True
        self._lose(ConnectionResetError(104, "Connection reset by peer"))

    def stall(self) -> None:
        """The peer stops reading: writes from now on stay in the buffer."""
        self.peer_reading = False

    def drain(self, size: int | None = None) -> None:
        """The peer reads ``size`` buffered bytes (all by default), and reads on from now
        on when it read them all."""
        every = size is None
        size = self.buffered if size is None else min(size, self.buffered)
        self.buffered -= size
        if every:
            self.peer_reading = True
        if self.write_paused and self.buffered <= self.low:
            self.write_paused = False
            if not self.lost:
                self.protocol.resume_writing()
        if self.closing and not self.buffered and not self.lost:
            self.loop.call_soon(self._lose, None)

    def sent(self) -> bytes:
        """What the peer has been sent so far (not what still sits in the buffer)."""
        return bytes(self.written[: len(self.written) - self.buffered])

    def take(self) -> bytes:
        """What the peer was sent since the last ``take``."""
        end = len(self.written) - self.buffered
        data, self.taken = bytes(self.written[self.taken : end]), end
        return data

    # -- internals ------------------------------------------------------------------------

    def _check_pause(self) -> None:
        if not self.write_paused and self.buffered > self.high and not self.lost:
            self.write_paused = True
            self.protocol.pause_writing()

    def _deliver(self) -> None:
        while self.inbox and self.reading and not self.lost:
            data = self.inbox.pop(0)
            if data is None:
                keep_open = self.protocol.eof_received()  # type: ignore[attr-defined]
                if not keep_open:
                    self.close()
                return
            if self.closing:  # asyncio stops reading once it closes
                self.inbox.clear()
                return
            self.protocol.data_received(data)  # type: ignore[attr-defined]

    def _lose(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = self.closing = True
        self.inbox.clear()
        self.protocol.connection_lost(exc)


class Peer:
    """The test's end of one fake connection: the client, or an upstream server."""

    def __init__(self, harness: Harness, transport: FakeTransport) -> None:
        self.harness = harness
        self.transport = transport

    def send(self, data: bytes) -> None:
        """Send ``data`` to the proxy (one read), then let the loop settle."""
        self.harness.call(self.transport.feed, data)

    def take(self) -> bytes:
        """What the proxy sent this peer since the last ``take``."""
        return self.transport.take()

    def received(self) -> bytes:
        """Everything the proxy sent this peer."""
        return self.transport.sent()

    def close(self) -> None:
        """The peer closes its end (end of file)."""
        self.harness.call(self.transport.feed, None)

    def reset(self) -> None:
        self.harness.call(self.transport.reset)

    def stall(self) -> None:
        """Stop reading: what the proxy writes from now on fills its buffer."""
        self.transport.stall()

    def drain(self, size: int | None = None) -> None:
        """Read what the proxy's buffer holds (``size`` bytes, or all and read on)."""
        self.harness.call(self.transport.drain, size)

    @property
    def closed(self) -> bool:
        """The proxy closed (or aborted) this connection, or it was lost."""
        return self.transport.closing

    @property
    def lost(self) -> bool:
        """``connection_lost`` has been called on the proxy's protocol."""
        return self.transport.lost

    @property
    def reading(self) -> bool:
        """The proxy reads from this peer (it has not paused reading)."""
        return self.transport.reading


class Client(Peer):
    """A client connection to the proxy's listener."""

    def responses(self, head: bool = False) -> list[Message]:
        """What the proxy has sent, parsed as responses (``head``: to HEAD requests)."""
        return parse_responses(self.received(), head)


class UpstreamPeer(Peer):
    """A connection the proxy opened to an upstream: the test is the server."""

    def __init__(self, harness: Harness, transport: FakeTransport, port: int) -> None:
        super().__init__(harness, transport)
        self.port = port

    def request(self) -> bytes:
        """Everything the proxy sent on this connection (its request or requests)."""
        return self.received()

    def requests(self) -> list[Message]:
        return parse_requests(self.received())

    def respond(self, data: bytes) -> None:
        """Send response bytes to the proxy (one read), having read what it sent so far
        (``take`` and ``Harness.asked`` see only what comes after)."""
        transport = self.transport
        transport.taken = len(transport.written) - transport.buffered
        self.send(data)


class FakeNetLoop(asyncio.SelectorEventLoop):
    """A real asyncio loop with a virtual clock whose ``create_connection`` makes no
    socket: the protocol gets a ``FakeTransport``, and the harness records the peer."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        #: ``port -> "refuse" | "hang" | "hold"``: how an upstream address takes a
        #: connection (default: at once)
        self.plan: dict[int, str] = {}
        #: connections held (``hold``) until the test lets them complete
        self.held: list[asyncio.Future[None]] = []
        self.dials: list[tuple[str, int]] = []  # every connection attempt, in order
        self.on_connect: Callable[[FakeTransport, int], None] = lambda transport, port: None
        self.errors: list[dict[str, Any]] = []
        self.set_exception_handler(lambda loop, context: self.errors.append(context))

    def time(self) -> float:
        return self.now

    async def create_connection(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | None = None,
        port: int | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        assert host is not None and port is not None
        self.dials.append((host, port))
        how = self.plan.get(port)
        if how == "refuse":
            raise ConnectionRefusedError(111, "Connection refused")
        if how == "hang":  # until the proxy's connect timeout cancels it
            await self.create_future()
        if how == "hold":  # until the test completes it (``Harness.complete_connects``)
            waiter = self.create_future()
            self.held.append(waiter)
            await waiter
        protocol = protocol_factory()
        transport = FakeTransport(self, protocol, (host, port))
        protocol.connection_made(transport)
        self.on_connect(transport, port)
        return transport, protocol

    def next_timer(self) -> float | None:
        """When the next live timer is due (asyncio's own heap of them), or None."""
        scheduled: list[asyncio.TimerHandle] = self._scheduled  # type: ignore[attr-defined]
        live = [h.when() for h in scheduled if not h.cancelled()]
        return min(live) if live else None

    def settle(self, limit: int = 10_000) -> None:
        """Run the loop until no callback is ready and no timer is due."""
        for _ in range(limit):
            self.stop()
            self.run_forever()  # one iteration: stop() came first
            if self.errors:
                errors, self.errors = self.errors, []
                raise AssertionError(f"the event loop reported: {errors}")
            due = self.next_timer()
            ready = self._ready  # type: ignore[attr-defined]  # asyncio's callbacks to run
            if not ready and (due is None or due > self.now):
                return
        raise AssertionError("the event loop did not settle")


def base_config(
    upstreams: int = 1,
    pool: dict[str, Any] | None = None,
    route: dict[str, Any] | None = None,
    listener: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A config with listener ``l`` routing everything to pool ``p`` of ``upstreams``
    upstreams on 127.0.0.1 (``BASE_PORT``, ``BASE_PORT + 1``, ...); ``pool``, ``route``
    and ``listener`` add to those sections, ``top`` to the config itself."""
    return {
        "listeners": [
            {"name": "l", "bind": "127.0.0.1:0", "routes": [{"pool": "p", **(route or {})}],
             **(listener or {})}
        ],
        "pools": {
            "p": {"upstreams": [{"url": f"http://127.0.0.1:{BASE_PORT + i}"}
                                for i in range(upstreams)], **(pool or {})}
        },
        **top,
    }  # fmt: skip


class Harness:
    """A real ``ProxyServer`` on a ``FakeNetLoop``: clients in, upstreams out."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.loop = FakeNetLoop()
        self.upstreams: list[UpstreamPeer] = []
        self.loop.on_connect = self._connected
        self.config = Config.model_validate(config)
        self.server = ProxyServer(self.config, self.loop)
        clock = self.server.clock
        for listener in self.server.listeners:  # as ``start_listener`` does, unbound
            clock.add_sweeper(listener.sweep)
        for each in self.server.pools.values():
            clock.add_sweeper(each.sweep)
        clock.start()
        self.clients = 0
        #: the records of the ``aiolb`` logger (warnings and up, by default)
        self.logged: list[logging.LogRecord] = []
        self._log = _Collector(self.logged)
        logging.getLogger("aiolb").addHandler(self._log)

    # -- the server's parts, for counters ---------------------------------------------

    @property
    def pool(self) -> Any:
        """Pool ``p``."""
        return self.server.pools["p"]

    def upstream_of(self, i: int) -> Upstream:
        """Upstream ``i`` of pool ``p`` (its ``conns``, ``idle``, ``stats``)."""
        found: Upstream | None = self.pool.upstream(f"127.0.0.1:{BASE_PORT + i}")
        assert found is not None
        return found

    @property
    def cache(self) -> Any:
        """Cache ``c`` (its ``results``)."""
        return self.server.caches["c"]

    # -- peers ----------------------------------------------------------------------------

    def client(self, listener: int = 0, ip: str = "127.0.0.1") -> Client:
        """A new client connection, accepted by listener ``listener``."""
        protocol = ClientConnection(self.server.listeners[listener])
        self.clients += 1
        transport = FakeTransport(self.loop, protocol, (ip, 40000 + self.clients))
        self.call(protocol.connection_made, transport)
        return Client(self, transport)

    def upstream(self, i: int) -> UpstreamPeer:
        """The ``i``-th connection the proxy opened to any upstream."""
        assert i < len(self.upstreams), f"only {len(self.upstreams)} upstream connections"
        return self.upstreams[i]

    def asked(self) -> UpstreamPeer:
        """The one upstream connection with request bytes not taken yet; takes them."""
        fresh = [u for u in self.upstreams if len(u.transport.written) > u.transport.taken]
        assert len(fresh) == 1, f"{len(fresh)} upstream connections were sent something"
        fresh[0].take()
        return fresh[0]

    def refuse(self, i: int) -> None:
        """Upstream ``i`` refuses connections from now on."""
        self.loop.plan[BASE_PORT + i] = "refuse"

    def hang(self, i: int) -> None:
        """Connections to upstream ``i`` never complete (the connect timeout ends them)."""
        self.loop.plan[BASE_PORT + i] = "hang"

    def hold(self, i: int) -> None:
        """Connections to upstream ``i`` wait for ``complete_connects``."""
        self.loop.plan[BASE_PORT + i] = "hold"

    def complete_connects(self) -> None:
        """The held connection attempts complete now."""
        held, self.loop.held = self.loop.held, []
        for waiter in held:
            if not waiter.done():
                waiter.set_result(None)
        self.settle()

    def accept(self, i: int) -> None:
        """Upstream ``i`` accepts connections at once again."""
        self.loop.plan.pop(BASE_PORT + i, None)

    def _connected(self, transport: FakeTransport, port: int) -> None:
        self.upstreams.append(UpstreamPeer(self, transport, port))

    # -- the loop ----------------------------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the loop, as an I/O callback, then settle."""
        self.loop.call_soon(fn, *args)
        self.loop.settle()

    def settle(self) -> None:
        self.loop.settle()

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` on, running every timer due on the way, in order
        (the proxy's clock ticks every ``resolution``)."""
        loop = self.loop
        end = loop.now + seconds
        loop.settle()
        while True:
            due = loop.next_timer()
            if due is None or due > end:
                break
            loop.now = max(loop.now, due)
            loop.settle()
        loop.now = end
        loop.settle()

    def close(self) -> None:
        logging.getLogger("aiolb").removeHandler(self._log)
        loop = self.loop
        try:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.settle()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
        bugs = [r.getMessage() for r in self.logged if r.getMessage().startswith("bug")]
        assert not bugs, f"the proxy logged bugs: {bugs}"


class _Collector(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def harnesses() -> Iterator[Callable[..., Harness]]:
    """``make(**base_config kwargs)`` or ``make(config=dict)``: harnesses closed after."""
    made: list[Harness] = []

    def make(config: dict[str, Any] | None = None, **kwargs: Any) -> Harness:
        harness = Harness(config if config is not None else base_config(**kwargs))
        made.append(harness)
        return harness

    try:
        yield make
    finally:
        for harness in made:
            harness.close()


# -- HTTP/1.1 messages, as the test peers read them ------------------------------------


@dataclass
class Message:
    """One parsed request or response."""

    start: bytes  # the request line or status line
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    chunked: bool = False
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)  # the last chunk's

    @property
    def status(self) -> int:
        return int(self.start.split(b" ", 2)[1])

    @property
    def method(self) -> bytes:
        return self.start.split(b" ", 1)[0]

    @property
    def target(self) -> bytes:
        return self.start.split(b" ", 2)[1]

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (any case), or None."""
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]


def _parse(data: bytes, response: bool, heads: bool) -> list[Message]:
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            raise AssertionError(f"an incomplete head: {data[pos:]!r}")
        lines = data[pos:end].split(b"\r\n")
        msg = Message(lines[0])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            msg.headers.append((name, value.strip()))
        pos = end + 4
        length = msg.header(b"content-length")
        chunked = b"chunked" in (msg.header(b"transfer-encoding") or b"").lower()
        bodiless = response and (msg.status < 200 or msg.status in (204, 304) or heads)
        if bodiless:
            pass
        elif chunked:
            msg.chunked = True
            body = bytearray()
            while True:
                line_end = data.index(b"\r\n", pos)
                size = int(data[pos:line_end].split(b";")[0], 16)
                pos = line_end + 2
                if size == 0:  # the trailer section, to its blank line
                    while True:
                        line_end = data.index(b"\r\n", pos)
                        line, pos = data[pos:line_end], line_end + 2
                        if not line:
                            break
                        name, _, value = line.partition(b":")
                        msg.trailers.append((name, value.strip()))
                    break
                body += data[pos : pos + size]
                pos += size + 2
            msg.body = bytes(body)
        elif length is not None:
            msg.body = data[pos : pos + int(length)]
            assert len(msg.body) == int(length), f"a short body: {data[pos:]!r}"
            pos += int(length)
        elif response:  # delimited by the close
            msg.body = data[pos:]
            pos = len(data)
        out.append(msg)
    return out


def parse_responses(data: bytes, head: bool = False) -> list[Message]:
    """The responses in ``data`` (``head``: each answers a HEAD request)."""
    return _parse(data, True, head)


def parse_requests(data: bytes) -> list[Message]:
    return _parse(data, False, False)


def get(path: str = "/", host: str = "example.test", extra: bytes = b"") -> bytes:
    """A GET request's bytes."""
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path.encode(), host.encode(), extra)


def ok(body: bytes = b"hello", extra: bytes = b"", status: bytes = b"200 OK") -> bytes:
    """A response with a ``Content-Length`` body."""
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)
