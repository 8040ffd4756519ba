"""The HTTP/2 codec behind one interface: frames in, events out; calls in, frames out.

Theory of operation
-------------------
``Codec`` is all the proxy knows of an HTTP/2 library: ``feed`` parses received bytes
into a list of events (plain tuples, first item the kind below), the ``send_*`` calls
queue frames, ``out`` takes what is queued. Sans-IO: no sockets, no clock. Today it is
the ``h2`` library (python-hyper) underneath; the choice was measured
(``loadtests/h2_codec_bench.py``) and can change here without touching a caller.

Flow control is the caller's: a received DATA frame's flow-controlled length comes with
its event and is handed back with ``ack`` once the bytes are taken (so a stream whose
consumer is slow stops its sender), and ``window`` says how much of a stream may be
sent now.

A connection error (malformed frames or headers, a flood the library refuses) raises
``CodecError``; the GOAWAY that ends the connection is already queued in ``out``.

What a peer can make the codec hold is bounded (``_Frames``): a frame longer than
``max_frame_size`` is refused on its 9-byte header, and a header block on the bytes it
has gathered across CONTINUATION frames (``max_header_list_size``), not only on their
count (64, the library's own bound); a long connection remembers its last 1024 closed
streams, not 65536 (``_Connection``).

Speed: HPACK in pure Python is most of the codec's cost. A header block that changes
nothing in the dynamic table (every field indexed: what a client repeating its requests
sends, and what the proxy sends for a response it sent before in the same second)
decodes and encodes the same way while the table stands, so ``_Decoder`` and
``_Encoder`` remember those, keyed by the table's version (``_Table``: every change
moves it). h2 counts the open streams by walking them all for every new one;
``_Connection`` answers with the streams it holds while that is below the limit, and
lets h2 walk (and drop the closed ones) only at the limit. hpack logs every header at
DEBUG (cookies and tokens included): its logger is silenced.
"""

from __future__ import annotations

from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import hpack
import hpack.hpack
import hpack.table
import hyperframe.frame

# The kinds of events (the first item of each tuple).
REQUEST: Final = 1  # (REQUEST, stream_id, headers, ended)
RESPONSE: Final = 2  # (RESPONSE, stream_id, headers, ended)
INFORMATIONAL: Final = 3  # (INFORMATIONAL, stream_id, headers)
DATA: Final = 4  # (DATA, stream_id, data, flow_length, ended)
TRAILERS: Final = 5  # (TRAILERS, stream_id, headers)  (the stream ends with them)
END: Final = 6  # (END, stream_id)  the peer's side of the stream ended
RESET: Final = 7  # (RESET, stream_id, error_code)
WINDOW: Final = 8  # (WINDOW, stream_id)  0: the connection's window opened
SETTINGS: Final = 9  # (SETTINGS, max_concurrent_streams)  the peer's settings changed
GOAWAY: Final = 10  # (GOAWAY, error_code, last_stream_id, debug_data)
PING: Final = 11  # (PING,)  a PING the codec answered
PING_ACK: Final = 12  # (PING_ACK,)
OTHER: Final = 13  # (OTHER,)  a frame that asks nothing of the caller (priority, ...)

# Error codes (RFC 9113 section 7).
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
ENHANCE_YOUR_CALM: Final = 0xB

#: The connection preface a client sends first (RFC 9113 section 3.4).
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

Headers = list[tuple[bytes, bytes]]
#: (kind, ...): see the kinds above
Event = tuple[Any, ...]


#: What sending on a stream raises when the peer reset it (maybe later in the same read,
#: ``StreamIDTooLowError`` once h2 forgot it) or the connection is over: nothing to send.
_GONE: Final = (
    h2.exceptions.StreamClosedError,
    h2.exceptions.StreamIDTooLowError,
    h2.exceptions.NoSuchStreamError,
)


class _StateMachine(h2.connection.H2ConnectionStateMachine):
    """h2's connection states, but a GOAWAY received leaves the connection open: the
    streams up to its last stream id may still finish (RFC 9113 section 6.8), and the
    caller opens no new one. h2 would refuse every frame after it, even in the same
    read."""

    def process_input(self, input_: h2.connection.ConnectionInputs) -> list[h2.events.Event]:
        if input_ is h2.connection.ConnectionInputs.RECV_GOAWAY:
            return []
        result: list[h2.events.Event] = super().process_input(input_)
        return result


class CodecError(Exception):
    """The connection is over (a protocol error); a GOAWAY is queued in ``out``."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class _Frames(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, bounded in bytes. h2 reads a frame's length but checks it only
    once the whole frame has arrived (a header announcing 16 MiB has the connection
    hold up to 16 MiB first), and bounds a header block by its number of frames only
    (64 CONTINUATION frames of 16 KiB: 1 MiB, whatever the header list limit)."""

    def __init__(self, server: bool, max_block: int) -> None:
        super().__init__(server=server)
        self.max_block = max_block
        self.frames = 0  # frames parsed (a header block counts once)

    def __next__(self) -> hyperframe.frame.Frame:
        try:
            frame = super().__next__()
            self.frames += 1
            return frame
        except StopIteration:  # waiting for more: is what comes allowed at all?
            data = self._data
            if len(data) >= 9 and int.from_bytes(data[:3], "big") > self.max_frame_size:
                raise h2.exceptions.FrameTooLargeError(
                    f"frame of {int.from_bytes(data[:3], 'big')} bytes announced, "
                    f"over {self.max_frame_size}"
                ) from None
            raise

    def _update_header_buffer(self, f: Any) -> Any:
        f = super()._update_header_buffer(f)
        block = self._headers_buffer
        if block and sum(len(x.data) for x in block) > self.max_block:
            raise h2.exceptions.DenialOfServiceError(
                f"header block over {self.max_block} bytes before its end"
            )
        return f


class _Connection(h2.connection.H2Connection):
    """h2's connection, remembering fewer closed streams: h2 keeps how each of the last
    65536 closed (python-hyper/h2#1163), some 8 MB on one long connection; 1024 is
    enough to tell a late frame on a stream we reset (ignored) from a stray one.

    Its open stream counts are the streams it holds (open or closed) while those are
    below the limit they are checked against: an upper bound, so the limit holds, and
    h2's walk over every stream (which also drops the closed ones) runs only at it."""

    MAX_CLOSED_STREAMS = 1024

    @property
    def open_inbound_streams(self) -> int:
        held = len(self.streams)
        if held < self.local_settings.max_concurrent_streams:
            return held
        return int(super().open_inbound_streams)

    @property
    def open_outbound_streams(self) -> int:
        held = len(self.streams)
        if held < self.remote_settings.max_concurrent_streams:
            return held
        return int(super().open_outbound_streams)


class _Table(hpack.table.HeaderTable):
    """An HPACK dynamic table whose ``version`` moves with every change of it."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def add(self, name: bytes, value: bytes) -> None:
        if not self.dynamic_entries and hpack.table.table_entry_size(name, value) > self._maxsize:
            return  # it would empty an empty table: no change (nginx indexes into a 0-byte one)
        self.version += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return int(self._maxsize)

    @maxsize.setter
    def maxsize(self, value: int) -> None:
        self.version += 1
        hpack.table.HeaderTable.maxsize.fset(self, value)  # type: ignore[attr-defined]


#: Header blocks remembered per table version (the rest are decoded or encoded anew).
_CACHED: Final = 64


class _Decoder(hpack.Decoder):
    """hpack's decoder, remembering what blocks that left the table as it was gave."""

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size=max_header_list_size)
        self.header_table = self.table = _Table()
        self.cache: dict[bytes, tuple[Any, ...]] = {}
        self.cached_version = 0

    def decode(self, data: Any, raw: bool = False) -> list[Any]:
        table = self.table
        version = table.version
        cache = self.cache
        if version != self.cached_version:
            cache.clear()
            self.cached_version = version
        block = bytes(data)
        found = cache.get(block)
        if found is not None:
            return list(found)
        headers = list(super().decode(block, raw))
        if table.version == version and len(cache) < _CACHED:
            cache[block] = tuple(headers)
        return headers


#: Fields sent as literals never indexed (RFC 7541 7.1.3): credentials, which a shared
#: compression context must not hold for other clients' requests to probe (upstream
#: connections carry many clients' requests).
_SENSITIVE: Final = frozenset((b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"))
#: Fields whose value is new with almost every message (the proxy's request id, a
#: trace's parent): sent as literals without indexing, so that they neither crowd the
#: dynamic table (each lookup walks it) nor change the blocks the encoder remembers.
_VOLATILE: Final = frozenset((b"x-request-id", b"traceparent", b"tracestate"))
_UNINDEXED: Final = _SENSITIVE | _VOLATILE


class _Encoder(hpack.Encoder):
    """hpack's encoder, remembering the blocks of header lists it could send as they
    were (all indexed: the table unchanged); ``_UNINDEXED`` fields go last, as
    literals that leave the table alone."""

    def __init__(self) -> None:
        super().__init__()
        self.header_table = self.table = _Table()
        self.cache: dict[tuple[Any, ...], bytes] = {}
        self.cached_version = 0

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        table = self.table
        if table.resized or not isinstance(headers, list):
            return bytes(super().encode(headers, huffman))
        version = table.version
        cache = self.cache
        if version != self.cached_version:
            cache.clear()
            self.cached_version = version
        tail = b""
        for name, _ in headers:
            if name in _UNINDEXED:
                headers, tail = self._literals(headers)
                break
        key = tuple(headers)
        found = cache.get(key)
        if found is not None:
            return found + tail if tail else found
        block = bytes(super().encode(headers, huffman))
        if table.version == version and len(cache) < _CACHED:
            cache[key] = block
        return block + tail if tail else block

    def _literals(self, headers: list[Any]) -> tuple[list[Any], bytes]:
        """``headers`` without the ``_UNINDEXED`` fields, and those fields' encoding."""
        kept: list[Any] = []
        literals: list[bytes] = []
        for field in headers:
            name = field[0]
            if name in _SENSITIVE:
                literals.append(self._encode_literal(name, field[1], hpack.hpack.INDEX_NEVER))
            elif name in _VOLATILE:
                literals.append(self._encode_literal(name, field[1], hpack.hpack.INDEX_NONE))
            else:
                kept.append(field)
        return kept, b"".join(literals)


class _Silent:
    """hpack's logger: it logs every header, values included, at DEBUG (a token in an
    operator's debug log), at a cost per header even when DEBUG is off."""

    @staticmethod
    def debug(*args: Any, **kwargs: Any) -> None:
        pass


hpack.hpack.log = _Silent()  # type: ignore[assignment]


class Codec:
    """One HTTP/2 connection's framing state, as a server (``client_side`` False: the
    client side of a client connection) or as a client (to an upstream)."""

    __slots__ = ("_conn", "_frames", "frames_sent")

    def __init__(
        self,
        client_side: bool,
        max_concurrent_streams: int = 128,
        initial_window: int = 65535,
        connection_window: int = 65535,
        max_header_list_size: int = 65536,
        max_frame_size: int = 16384,
        validate_headers: bool = True,
    ) -> None:
        """``validate_headers`` False: received header lists come as they were decoded,
        and the caller checks them (RFC 9113 sections 8.2, 8.3), so a malformed request
        can be an error of its stream rather than of the connection; cookie crumbs are
        not joined either."""
        config = h2.config.H2Configuration(
            client_side=client_side, header_encoding=None,
            validate_inbound_headers=validate_headers,
            normalize_inbound_headers=validate_headers,
            validate_outbound_headers=False, normalize_outbound_headers=False,
        )  # fmt: skip
        conn = _Connection(config)
        conn.state_machine = _StateMachine()
        codes = h2.settings.SettingCodes
        initial = {
            codes.INITIAL_WINDOW_SIZE: initial_window,
            codes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            codes.MAX_FRAME_SIZE: max_frame_size,
            codes.ENABLE_PUSH: 0,
        }
        if client_side:
            initial[codes.MAX_CONCURRENT_STREAMS] = max_concurrent_streams
        conn.local_settings = h2.settings.Settings(client=client_side, initial_values=initial)
        conn.max_inbound_frame_size = max_frame_size
        self._frames = conn.incoming_buffer = _Frames(not client_side, max_header_list_size)
        conn.decoder = _Decoder(max_header_list_size)
        conn.encoder = _Encoder()
        conn.initiate_connection()
        if not client_side:
            # A client may open streams before it has our SETTINGS (RFC 9113 6.5.3: no
            # limit until then). h2 would hold it to the limit at once, a connection
            # error; as a pending setting it applies once acknowledged, and until then
            # the caller refuses the streams over it (REFUSED_STREAM), as nghttp2 does.
            conn.update_settings({codes.MAX_CONCURRENT_STREAMS: max_concurrent_streams})
        if connection_window > 65535:
            conn.increment_flow_control_window(connection_window - 65535)
        self._conn = conn
        self.frames_sent = 0  # DATA frames ``send_pieces`` sent, over the connection's life

    # -- in --------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """The events in ``data`` (raises ``CodecError`` for a connection error); none
        once the connection ended with an error (what the peer still sends is moot)."""
        conn = self._conn
        if conn.state_machine.state is h2.connection.ConnectionState.CLOSED:
            return []
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            code = getattr(exc, "error_code", PROTOCOL_ERROR)
            raise CodecError(str(exc) or type(exc).__name__, int(code)) from None
        out: list[Event] = []
        ev = h2.events
        e: Any
        for e in events:
            cls = e.__class__
            if cls is ev.RequestReceived:
                out.append((REQUEST, e.stream_id, e.headers, e.stream_ended is not None))
            elif cls is ev.DataReceived:
                out.append((DATA, e.stream_id, e.data, e.flow_controlled_length,
                            e.stream_ended is not None))  # fmt: skip
            elif cls is ev.StreamEnded:
                out.append((END, e.stream_id))
            elif cls is ev.ResponseReceived:
                out.append((RESPONSE, e.stream_id, e.headers, e.stream_ended is not None))
            elif cls is ev.TrailersReceived:
                out.append((TRAILERS, e.stream_id, e.headers))
            elif cls is ev.StreamReset:
                out.append((RESET, e.stream_id, int(e.error_code or 0)))
            elif cls is ev.WindowUpdated:
                out.append((WINDOW, e.stream_id))
            elif cls is ev.InformationalResponseReceived:
                out.append((INFORMATIONAL, e.stream_id, e.headers))
            elif cls is ev.RemoteSettingsChanged:
                changed = e.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                out.append((SETTINGS, changed.new_value if changed is not None else None))
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in e.changed_settings:
                    out.append((WINDOW, 0))
            elif cls is ev.ConnectionTerminated:
                out.append((GOAWAY, int(e.error_code or 0), e.last_stream_id or 0,
                            e.additional_data or b""))  # fmt: skip
            elif cls is ev.PingReceived:
                out.append((PING,))
            elif cls is ev.PingAckReceived:
                out.append((PING_ACK,))
            else:
                out.append((OTHER,))
        return out

    def ack(self, stream_id: int, length: int) -> None:
        """``length`` flow-controlled bytes of ``stream_id`` were taken: the peer may send
        as many again (a WINDOW_UPDATE goes out when enough have gathered)."""
        if length:
            self._conn.acknowledge_received_data(length, stream_id)

    # -- out -------------------------------------------------------------------------------

    def send_headers(self, stream_id: int, headers: Headers, end: bool = False) -> None:
        """(Nothing if the peer reset the stream meanwhile, or the connection is over.)"""
        try:
            self._conn.send_headers(stream_id, headers, end_stream=end)
        except _GONE:
            pass

    def send_data(self, stream_id: int, data: bytes | memoryview, end: bool = False) -> None:
        """Send ``data`` (no more than ``window(stream_id)``), in frames of the peer's
        maximum size."""
        conn = self._conn
        size = conn.max_outbound_frame_size
        n = len(data)
        try:
            if n <= size:
                conn.send_data(stream_id, data, end_stream=end)
                return
            view = memoryview(data)
            for at in range(0, n, size):
                piece = view[at : at + size]
                conn.send_data(stream_id, piece, end_stream=end and at + size >= n)
        except _GONE:
            pass

    def send_pieces(self, stream_id: int, pieces: list[bytes | memoryview], end: bool) -> int:
        """Send from the front of ``pieces`` as much as ``stream_id``'s window takes
        (what is sent leaves the list; a piece cut in two leaves its tail), ``end``:
        END_STREAM with the last piece, if it goes. Returns the bytes sent."""
        window = self.window(stream_id)
        sent = 0
        while pieces and window > 0:
            piece = pieces[0]
            n = len(piece)
            if n > window:
                piece, pieces[0] = piece[:window], piece[window:]
                n = window
            else:
                pieces.pop(0)
            window -= n
            sent += n
            self.frames_sent += 1 + (n - 1) // self._conn.max_outbound_frame_size
            self.send_data(stream_id, piece, end and not pieces)
        return sent

    def end(self, stream_id: int) -> None:
        """End our side of ``stream_id`` with an empty DATA frame."""
        try:
            self._conn.end_stream(stream_id)
        except _GONE:
            pass

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        """RST_STREAM (nothing if the stream is already closed)."""
        try:
            self._conn.reset_stream(stream_id, code)
        except _GONE:
            pass

    def goaway(self, code: int = NO_ERROR, last_stream_id: int | None = None) -> None:
        """GOAWAY: an error ends the connection; ``NO_ERROR`` is a graceful one, after
        which the streams up to ``last_stream_id`` still finish (h2 would refuse to send
        anything more after its own GOAWAY, so that one is framed here)."""
        conn = self._conn
        if conn.state_machine.state == h2.connection.ConnectionState.CLOSED:
            return
        if code != NO_ERROR:
            conn.close_connection(code, last_stream_id=last_stream_id)
            return
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = (
            conn.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        )
        frame.error_code = NO_ERROR
        conn._data_to_send += frame.serialize()

    def ping(self, data: bytes = b"\0" * 8) -> None:
        self._conn.ping(data)

    def out(self) -> bytes:
        """The frames queued since the last call."""
        return self._conn.data_to_send()

    # -- state -----------------------------------------------------------------------------

    def window(self, stream_id: int) -> int:
        """How many bytes of ``stream_id``'s body may be sent now."""
        try:
            return self._conn.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return 0

    def next_stream_id(self) -> int:
        return self._conn.get_next_available_stream_id()

    @property
    def peer_max_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS (unlimited: a large number)."""
        return int(self._conn.remote_settings.max_concurrent_streams)

    @property
    def frames_received(self) -> int:
        """Frames parsed so far (a header block and its CONTINUATION frames count once):
        with the events ``feed`` returned, what tells a peer's frames that asked for
        nothing (on a closed stream, say) from those that carried something."""
        return self._frames.frames

    def is_open(self, stream_id: int) -> bool:
        stream = self._conn.streams.get(stream_id)
        return stream is not None and not stream.closed
