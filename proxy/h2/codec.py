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
lets h2 walk (and drop the closed ones) only at the limit, and ``forget`` drops a
stream the caller is done with. hpack logs every header at DEBUG (cookies and tokens
included): its logger is silenced.

The frames of an ordinary exchange are built and parsed here rather than by h2's frame
objects (``hyperframe``) and dispatch, which cost more than the rest of the proxy: a
response's HEADERS (and CONTINUATION) and DATA frames are framed by hand, a request's
HEADERS on a new stream and DATA on an open one are parsed in place when a read holds
them whole. Either way h2's own state is moved by its own calls (the stream's state
machine, the flow-control windows, the decoder, the content-length it tracks), so h2
still judges every other frame, and ``tests/unit/test_h2_codec.py`` checks that the two
ways give the same events, answers and state. This took a 20-byte h2c request through
to HTTP/1.1 from 496,000 to 238,000 instructions (``loadtests/hotpath_count.py``).
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
import h2.stream
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


_CLOSED: Final = h2.stream.StreamState.CLOSED
_CONN_CLOSED: Final = h2.connection.ConnectionState.CLOSED
_SEND_HEADERS: Final = h2.stream.StreamInputs.SEND_HEADERS
_SEND_INFORMATIONAL: Final = h2.stream.StreamInputs.SEND_INFORMATIONAL_HEADERS
_SEND_DATA: Final = h2.stream.StreamInputs.SEND_DATA
_SEND_END: Final = h2.stream.StreamInputs.SEND_END_STREAM
_RECV_HEADERS: Final = h2.stream.StreamInputs.RECV_HEADERS
_RECV_END: Final = h2.stream.StreamInputs.RECV_END_STREAM
_SEND_HEADERS_CONN: Final = h2.connection.ConnectionInputs.SEND_HEADERS
_RECV_DATA_CONN: Final = h2.connection.ConnectionInputs.RECV_DATA
_RECV_HEADERS_CONN: Final = h2.connection.ConnectionInputs.RECV_HEADERS
#: DATA at least this long is written from the caller's buffer, not copied (``out_chunks``).
_COPY_BELOW: Final = 4096
#: The stream states a DATA frame may come in (h2 answers any other one itself).
_RECEIVING: Final = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL)


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
        """``headers`` without the ``_UNINDEXED`` fields, and those fields' encoding
        (RFC 7541 6.2.2, 6.2.3: a literal name and value, no Huffman coding)."""
        kept: list[Any] = []
        literals: list[bytes] = []
        for field in headers:
            prefix = _LITERAL_NAMES.get(field[0])
            if prefix is None:
                kept.append(field)
                continue
            value = field[1]
            n = len(value)
            if n < 127:
                literals += (prefix, _LENGTHS[n], value)
            else:
                literals += (prefix, bytes(hpack.hpack.encode_integer(n, 7)), value)
        return kept, b"".join(literals)


def _literal_name(name: bytes, never: bool) -> bytes:
    """The first bytes of a literal field called ``name``: never indexed (0x10) or
    not indexed (0x00), its name's length and the name."""
    flag = hpack.hpack.INDEX_NEVER if never else hpack.hpack.INDEX_NONE
    return flag + bytes(hpack.hpack.encode_integer(len(name), 7)) + name


#: The start of each ``_UNINDEXED`` field's encoding, by name.
_LITERAL_NAMES: Final = {
    **{name: _literal_name(name, True) for name in _SENSITIVE},
    **{name: _literal_name(name, False) for name in _VOLATILE},
}
#: A value's length below 127, as its one byte (no Huffman flag).
_LENGTHS: Final = tuple(bytes((n,)) for n in range(127))


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

    __slots__ = ("_chunks", "_conn", "_frames", "_server", "frames_sent")

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
        self._server = not client_side
        self._chunks: list[bytes | bytearray | memoryview] = []  # queued, not copied
        self.frames_sent = 0  # DATA frames ``send_pieces`` sent, over the connection's life

    # -- in --------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """The events in ``data`` (raises ``CodecError`` for a connection error); none
        once the connection ended with an error (what the peer still sends is moot).

        The frames a request and its body come in (a new stream's HEADERS, DATA on an
        open stream) are taken here when whole: parsed in place, then h2's own state
        calls (the stream's state machine, the windows, the decoder), without h2's
        frame buffer, frame objects and dispatch; every other frame, or a frame cut by
        the end of the read, goes to h2 as it came, in order."""
        conn = self._conn
        if self.over:
            return []
        out: list[Event] = []
        frames = self._frames
        try:
            if frames._data or frames._preamble_len or frames._headers_buffer:
                self._convert(conn.receive_data(data), out)
                return out
            at, n = 0, len(data)
            max_frame = conn.max_inbound_frame_size
            while n - at >= 9:
                length = int.from_bytes(data[at : at + 3], "big")
                end = at + 9 + length
                if end > n or length > max_frame:
                    break
                kind, flags = data[at + 3], data[at + 4]
                sid = int.from_bytes(data[at + 5 : at + 9], "big") & 0x7FFFFFFF
                if kind == 0 and not flags & 0x08:  # DATA, unpadded
                    stream = conn.streams.get(sid)
                    if stream is not None and stream.state_machine.state in _RECEIVING:
                        frames.frames += 1
                        conn.state_machine.process_input(_RECV_DATA_CONN)
                        conn._inbound_flow_control_window_manager.window_consumed(length)
                        sent, events = stream.receive_data(
                            data[at + 9 : end], flags & 1 == 1, length
                        )
                        if sent:
                            conn._prepare_for_sending(sent)
                        self._convert(events, out)
                        at = end
                        continue
                elif (
                    kind == 1 and flags & 0x2C == 0x04 and self._server  # END_HEADERS only
                    and sid & 1 and sid > conn.highest_inbound_stream_id
                    and length <= frames.max_block
                    and len(conn.streams) < conn.local_settings.max_concurrent_streams
                ):  # fmt: skip
                    frames.frames += 1
                    headers = h2.connection._decode_headers(conn.decoder, data[at + 9 : end])
                    conn.state_machine.process_input(_RECV_HEADERS_CONN)
                    stream = conn._begin_new_stream(sid, h2.connection.AllowedStreamIDs.ODD)
                    sm = stream.state_machine  # as ``H2Stream.receive_headers`` moves it
                    sm.process_input(_RECV_HEADERS)
                    ended = flags & 1 == 1
                    if ended:
                        sm.process_input(_RECV_END)
                    stream._initialize_content_length(headers)  # what DATA must add up to
                    out.append((REQUEST, sid, headers, ended))
                    if ended:
                        out.append((END, sid))
                    at = end
                    continue
                elif (
                    kind == 1 and flags & 0x2C == 0x04 and not self._server
                    and length <= frames.max_block
                ):  # fmt: skip
                    stream = conn.streams.get(sid)
                    if stream is not None and stream.state_machine.state in _RECEIVING:
                        # a response, informational head or trailers: h2's own call
                        frames.frames += 1
                        headers = h2.connection._decode_headers(conn.decoder, data[at + 9 : end])
                        conn.state_machine.process_input(_RECV_HEADERS_CONN)
                        sent, events = stream.receive_headers(headers, flags & 1 == 1, None)
                        if sent:
                            conn._prepare_for_sending(sent)
                        self._convert(events, out)
                        at = end
                        continue
                # any other frame: h2's, on its own (a header block it leaves open
                # takes the rest of the read with it)
                self._convert(conn.receive_data(data[at:end]), out)
                at = end
                if frames._headers_buffer or self.over:
                    break
            if at < n and not self.over:
                self._convert(conn.receive_data(data[at:]), out)
        except h2.exceptions.ProtocolError as exc:
            code = int(getattr(exc, "error_code", PROTOCOL_ERROR))
            if not self.over:  # (h2 ended it, if it raised)
                conn._terminate_connection(code)  # type: ignore[arg-type]
            raise CodecError(str(exc) or type(exc).__name__, code) from None
        return out

    @staticmethod
    def _convert(events: list[Any], out: list[Event]) -> None:
        """h2's events as ours, appended to ``out``."""
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

    def ack(self, stream_id: int, length: int) -> None:
        """``length`` flow-controlled bytes of ``stream_id`` were taken: the peer may send
        as many again (a WINDOW_UPDATE goes out when enough have gathered)."""
        if length:
            self._conn.acknowledge_received_data(length, stream_id)

    # -- out -------------------------------------------------------------------------------

    def send_headers(self, stream_id: int, headers: Headers, end: bool = False) -> None:
        """(Nothing if the peer reset the stream meanwhile, or the connection is over.)

        On a stream that exists (a response, informational or not; trailers) the frames
        are built here: the stream's state moves as h2 would move it, and the block is
        the same encoder's, but h2's frame objects, header re-encoding and validation
        flags (some 40 calls a response) are skipped. A new stream (a request to an
        upstream) likewise, once h2's checks for a new stream pass (its id, the peer's
        stream limit); else h2 sends it (and raises what it raises)."""
        conn = self._conn
        stream = conn.streams.get(stream_id)
        if stream is None:
            if (
                self._server or stream_id <= conn.highest_outbound_stream_id
                or not stream_id & 1 or conn.state_machine.state is _CONN_CLOSED
                or conn.open_outbound_streams >= conn.remote_settings.max_concurrent_streams
            ):  # fmt: skip
                try:
                    conn.send_headers(stream_id, headers, end_stream=end)
                except _GONE:
                    pass
                return
            conn.state_machine.process_input(_SEND_HEADERS_CONN)
            stream = conn._begin_new_stream(stream_id, h2.connection.AllowedStreamIDs.ODD)
            for name, value in headers:  # (HEAD: a response with no body, h2 knows)
                if name == b":method":
                    stream.request_method = value
                    break
        sm = stream.state_machine
        if sm.state is _CLOSED or conn.state_machine.state is _CONN_CLOSED:
            return
        informational = not sm.client and headers[0][1][:1] == b"1"
        sm.process_input(_SEND_INFORMATIONAL if informational else _SEND_HEADERS)
        block = conn.encoder.encode(headers)
        size = conn.max_outbound_frame_size
        sid = stream_id.to_bytes(4, "big")
        out = conn._data_to_send
        if end:
            sm.process_input(_SEND_END)
        n = len(block)
        if n <= size:
            out += n.to_bytes(3, "big") + (b"\x01\x05" if end else b"\x01\x04") + sid
            out += block
            return
        first = block[:size]  # HEADERS, then CONTINUATION frames, the last with END_HEADERS
        out += size.to_bytes(3, "big") + (b"\x01\x01" if end else b"\x01\x00") + sid + first
        for at in range(size, n, size):
            piece = block[at : at + size]
            last = at + size >= n
            out += len(piece).to_bytes(3, "big") + (b"\x09\x04" if last else b"\x09\x00") + sid
            out += piece

    def send_data(self, stream_id: int, data: bytes | memoryview, end: bool = False) -> None:
        """Send ``data`` (no more than ``window(stream_id)``), in frames of the peer's
        maximum size. The frames are built here (h2's state moves and windows shrink
        as its ``send_data`` would have them, without a frame object per frame)."""
        conn = self._conn
        stream = conn.streams.get(stream_id)
        if stream is None:
            return
        sm = stream.state_machine
        if sm.state is _CLOSED or conn.state_machine.state is _CONN_CLOSED:
            return
        n = len(data)
        if n > conn.outbound_flow_control_window or n > stream.outbound_flow_control_window:
            raise h2.exceptions.FlowControlError(f"{n} bytes over the window of {stream_id}")
        sm.process_input(_SEND_DATA)
        if end:
            sm.process_input(_SEND_END)
        size = conn.max_outbound_frame_size
        sid = stream_id.to_bytes(4, "big")
        out = conn._data_to_send
        if n < _COPY_BELOW:  # into the buffer, as h2 would
            out += n.to_bytes(3, "big") + (b"\x00\x01" if end else b"\x00\x00") + sid
            out += data
        else:  # the body is not copied: its frames' headers go between its pieces
            chunks = self._chunks
            if out:
                chunks.append(out)
                conn._data_to_send = bytearray()
            view = memoryview(data) if n > size else data
            for at in range(0, n, size):
                piece = view[at : at + size] if n > size else view
                last = end and at + size >= n
                chunks.append(
                    len(piece).to_bytes(3, "big") + (b"\x00\x01" if last else b"\x00\x00") + sid
                )
                chunks.append(piece)
        conn.outbound_flow_control_window -= n
        stream.outbound_flow_control_window -= n

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
        self.send_data(stream_id, b"", True)

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

    def out(self) -> bytes | bytearray:
        """The frames queued since the last call, in one buffer."""
        chunks = self.out_chunks()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # type: ignore[return-value]

    def out_chunks(self) -> list[bytes | bytearray | memoryview]:
        """The frames queued since the last call, for ``writelines``: large bodies as
        the caller gave them (a vectored write, not a copy), between their frames'
        headers and the other frames."""
        conn = self._conn
        data = conn._data_to_send
        chunks = self._chunks
        if chunks:
            if data:
                chunks.append(data)
                conn._data_to_send = bytearray()
            self._chunks = []
            return chunks
        if data:
            conn._data_to_send = bytearray()
            return [data]
        return []

    # -- state -----------------------------------------------------------------------------

    @property
    def over(self) -> bool:
        """The connection ended (an error; h2 takes nothing more)."""
        return self._conn.state_machine.state is _CONN_CLOSED

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

    def forget(self, stream_id: int) -> None:
        """The caller is done with ``stream_id``: if it is closed, h2 keeps only how it
        closed (as its walk over all streams would, at the open-stream limit)."""
        conn = self._conn
        stream = conn.streams.get(stream_id)
        if stream is not None and stream.state_machine.state is _CLOSED:
            del conn.streams[stream_id]
            conn._closed_streams[stream_id] = stream.closed_by

    def is_open(self, stream_id: int) -> bool:
        stream = self._conn.streams.get(stream_id)
        return stream is not None and not stream.closed
