"""Real gRPC servers for the tests (grpcio, generic handlers on raw bytes: no generated
code), and a raw HTTP/2 client for what grpcio hides (the trailers a call ends with)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from tests.h2_support import exchange
from tests.support import HOST

SERVICE = "t.Echo"
#: Messages up to this size pass (grpcio's default is 4 MiB).
MAX_MESSAGE = 32 * 1024 * 1024
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


@dataclass
class GrpcServer:
    """A grpcio server on 127.0.0.1 that says its ``name`` in every answer."""

    name: str
    server: Any = None
    port: int = 0
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def count(self) -> None:
        with self.lock:
            self.calls += 1

    def start(self, port: int = 0) -> GrpcServer:
        def unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            self.count()
            return self.name.encode() + b":" + req

        def big(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            self.count()
            return req + req[:1]

        def server_stream(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
            self.count()
            for i in range(int(req)):
                yield b"%d" % i

        def client_stream(it: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
            self.count()
            return b"".join(it)

        def bidi(it: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
            self.count()
            for m in it:
                yield self.name.encode() + b":" + m

        def fail(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            self.count()
            ctx.set_trailing_metadata((("x-detail", "why"),))
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request: " + req.decode())

        def slow(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            self.count()
            time.sleep(float(req))
            return b"late"

        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Big": grpc.unary_unary_rpc_method_handler(big),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
        }
        server = grpc.server(futures.ThreadPoolExecutor(16), options=OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = server.add_insecure_port(f"{HOST}:{port}")
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None


async def raw_call(
    port: int, method: str, message: bytes, headers: list[tuple[bytes, bytes]] | None = None,
    timeout: float = 5.0,
) -> tuple[list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]]]:  # fmt: skip
    """One gRPC call with h2 on a new prior-knowledge connection, as no grpcio client
    sends it (no deadline of its own: ``headers`` may carry ``grpc-timeout``): (the
    response headers, the body, the trailers; a trailers-only answer has its status in
    the headers and no trailers)."""
    frame = b"\0" + len(message).to_bytes(4, "big") + message
    return await exchange(port, [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"grpc.test"),
        (b":path", f"/{SERVICE}/{method}".encode()), (b"content-type", b"application/grpc"),
        (b"te", b"trailers"), *(headers or []),
    ], frame, timeout)  # fmt: skip
