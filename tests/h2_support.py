"""Raw HTTP/2 clients for the tests: the ``h2`` library as a client on asyncio streams
(``H2Client``: requests, windows, what the server sent) and bare frames (``FrameClient``:
whatever an attacker writes, hyperframe and hpack, nothing checked on the way out)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import hyperframe.frame as hf

from tests.support import HOST, wait_for

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB
NO_ERROR = 0x0
REFUSED_STREAM = 0x7


@dataclass
class Reply:
    """What one stream got back."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, if reset

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class H2Client:
    """An HTTP/2 client (the ``h2`` library) on one connection; ``pump`` reads and
    acts on what arrives, so a test decides when windows open (``auto_ack``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: h2.connection.H2Connection) -> None:  # fmt: skip
        self.reader, self.writer, self.conn = reader, writer, conn
        self.replies: dict[int, Reply] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.auto_ack = True
        #: streams whose windows stay shut (their data opens only the connection's)
        self.held: set[int] = set()
        self.window_updates = 0  # WINDOW_UPDATE frames received (any stream)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, port: int, *, context: ssl.SSLContext | None = None, server_name: str = "a.test",
        settings: dict[int, int] | None = None, validate: bool = True,
    ) -> H2Client:  # fmt: skip
        if context is not None:
            reader, writer = await asyncio.open_connection(
                HOST, port, ssl=context, server_hostname=server_name
            )
        else:
            reader, writer = await asyncio.open_connection(HOST, port)
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None,
            validate_outbound_headers=validate, normalize_outbound_headers=validate,
        )  # fmt: skip
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        if settings:
            conn.update_settings(settings)
        client = cls(reader, writer, conn)
        client.flush()
        client._task = asyncio.get_running_loop().create_task(client._run())
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _run(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self._handle(self.conn.receive_data(data))
                self.flush()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed = True

    def _handle(self, events: list[Any]) -> None:
        for e in events:
            sid = getattr(e, "stream_id", None)
            reply = self.replies.setdefault(sid, Reply()) if sid else None
            if isinstance(e, h2.events.ResponseReceived) and reply is not None:
                reply.headers = list(e.headers)
                reply.status = int(dict(e.headers)[b":status"])
            elif isinstance(e, h2.events.DataReceived) and reply is not None:
                reply.body += e.data
                if e.stream_id in self.held:
                    if e.flow_controlled_length:
                        self.conn.increment_flow_control_window(e.flow_controlled_length)
                elif self.auto_ack:
                    self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2.events.StreamEnded) and reply is not None:
                reply.ended = True
            elif isinstance(e, h2.events.StreamReset) and reply is not None:
                reply.reset = int(e.error_code)
            elif isinstance(e, h2.events.WindowUpdated):
                self.window_updates += 1
            elif isinstance(e, h2.events.ConnectionTerminated):
                self.goaway = e

    def start(self, path: str = "/", *, method: str = "GET", authority: str = "a.test",
              headers: list[tuple[bytes, bytes]] | None = None, end: bool = True,
              scheme: str = "http") -> int:  # fmt: skip
        """Send a request head; its stream id."""
        sid = self.conn.get_next_available_stream_id()
        head = [(b":method", method.encode()), (b":scheme", scheme.encode()),
                (b":authority", authority.encode()), (b":path", path.encode())]  # fmt: skip
        self.conn.send_headers(sid, head + (headers or []), end_stream=end)
        self.replies[sid] = Reply()
        self.flush()
        return sid

    async def request(self, path: str = "/", *, body: bytes = b"", timeout: float = 5.0,
                      **kwargs: Any) -> Reply:  # fmt: skip
        sid = self.start(path, end=not body, **kwargs)
        if body:
            await self.send_body(sid, body, timeout=timeout)
        return await self.reply(sid, timeout)

    async def send_body(self, sid: int, body: bytes, *, end: bool = True,
                        timeout: float = 5.0) -> None:  # fmt: skip
        """Send ``body`` as the windows allow (waiting for them to open)."""
        view = memoryview(body)
        while view:
            await wait_for(lambda: self.conn.local_flow_control_window(sid) > 0, timeout)
            n = min(self.conn.local_flow_control_window(sid), len(view),
                    self.conn.max_outbound_frame_size)  # fmt: skip
            self.conn.send_data(sid, view[:n].tobytes())
            view = view[n:]
            self.flush()
            await self.writer.drain()
        if end:
            self.conn.end_stream(sid)
            self.flush()

    async def reply(self, sid: int, timeout: float = 5.0) -> Reply:
        """Wait until stream ``sid`` ended or was reset."""
        reply = self.replies[sid]
        await wait_for(lambda: reply.ended or reply.reset is not None or self.closed, timeout)
        if not (reply.ended or reply.reset is not None):
            raise AssertionError(f"connection closed before stream {sid} ended")
        return reply

    def release(self, sid: int) -> None:
        """Open ``sid``'s window again, by what it was given and kept."""
        self.held.discard(sid)
        reply = self.replies[sid]
        if reply.body:
            self.conn.increment_flow_control_window(len(reply.body), sid)
            self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


class FrameClient:
    """Bare frames: the preface and an empty SETTINGS, then whatever a test writes; the
    server's frames are read as they come (``frames``), its GOAWAY noted."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.frames: list[hf.Frame] = []
        self.goaway: hf.GoAwayFrame | None = None
        self.eof = False
        self.acked = False  # the server's first SETTINGS acknowledged
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, port: int, settings: dict[int, int] | None = None, ack: bool = True
    ) -> FrameClient:
        """``ack`` False: the server's SETTINGS are neither waited for nor acknowledged
        (``ack_settings`` does it later)."""
        reader, writer = await asyncio.open_connection(HOST, port)
        client = cls(reader, writer)
        client.acked = not ack
        frame = hf.SettingsFrame(0, settings=settings or {})
        writer.write(PREFACE + frame.serialize())
        client._task = asyncio.get_running_loop().create_task(client._run())
        # the server's SETTINGS acknowledged before anything else is written, so that
        # the ACK never lands inside a header block a test sends
        if ack:
            await wait_for(lambda: client.acked or client.eof)
        return client

    async def _run(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(9)
                frame, length = hf.Frame.parse_frame_header(memoryview(head))
                frame.parse_body(memoryview(await self.reader.readexactly(length)))
                self.frames.append(frame)
                if isinstance(frame, hf.GoAwayFrame):
                    self.goaway = frame
                elif (
                    isinstance(frame, hf.SettingsFrame)
                    and "ACK" not in frame.flags
                    and not self.acked  # the first only: later ones are a test's to answer
                ):
                    self.writer.write(hf.SettingsFrame(0, flags=["ACK"]).serialize())
                    self.acked = True
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.eof = True

    def ack_settings(self) -> None:
        self.send(hf.SettingsFrame(0, flags=["ACK"]))

    def send(self, *frames: hf.Frame) -> None:
        if not self.writer.is_closing():
            self.writer.write(b"".join(f.serialize() for f in frames))

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError:
            pass

    def headers(self, sid: int, path: str = "/", *, end_stream: bool = True,
                end_headers: bool = True, extra: list[tuple[bytes, bytes]] | None = None,
                method: bytes = b"GET") -> hf.HeadersFrame:  # fmt: skip
        block = self.encoder.encode(
            [(b":method", method), (b":scheme", b"http"), (b":authority", b"a.test"),
             (b":path", path.encode()), *(extra or [])]
        )  # fmt: skip
        flags = (["END_STREAM"] if end_stream else []) + (["END_HEADERS"] if end_headers else [])
        return hf.HeadersFrame(sid, data=block, flags=flags)

    def of_stream(self, sid: int) -> list[hf.Frame]:
        return [f for f in self.frames if f.stream_id == sid]

    def status(self, sid: int) -> int | None:
        """The ``:status`` of the first HEADERS on ``sid`` (decoded in order, so call it
        only once all the server's header blocks before it have been read)."""
        decoder = hpack.Decoder()
        for f in self.frames:
            if isinstance(f, hf.HeadersFrame):
                fields = dict(decoder.decode(f.data, raw=True))
                if f.stream_id == sid:
                    return int(fields[b":status"])
        return None

    def reset_of(self, sid: int) -> int | None:
        for f in self.of_stream(sid):
            if isinstance(f, hf.RstStreamFrame):
                return int(f.error_code)
        return None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def exchange(
    port: int, headers: list[tuple[bytes, bytes]], body: bytes | None = None,
    timeout: float = 5.0,
) -> tuple[list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]]]:  # fmt: skip
    """One request by the ``h2`` library on a new prior-knowledge connection: ``headers``
    (ending the stream, or ``body`` does), then what came back until the stream ended or
    was reset: (the response headers, the body, the trailers)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers, end_stream=body is None)
    if body is not None:
        conn.send_data(sid, body, end_stream=True)
    writer.write(conn.data_to_send())
    head: list[tuple[bytes, bytes]] = []
    got = b""
    trailers: list[tuple[bytes, bytes]] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                data = await reader.read(65536)
                if not data:
                    raise AssertionError("the proxy closed the connection")
                ended = False
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        head = list(ev.headers)
                    elif isinstance(ev, h2.events.DataReceived):
                        got += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        trailers = list(ev.headers)
                    elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                        ended = True
                writer.write(conn.data_to_send())
                if ended:
                    return head, got, trailers
    finally:
        writer.close()
