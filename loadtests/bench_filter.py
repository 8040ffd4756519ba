"""A filter that does nothing in two phases, for the benchmarks' ``python`` variant:
the cost of calling a user's filter (``python: loadtests.bench_filter:PassThrough``)."""

from __future__ import annotations

from proxy.filters import Filter, Request, Response


class PassThrough(Filter):
    """Reads a header on the way in, sets one on the way out."""

    def request_filter(self, request: Request) -> None:
        request.headers.get("User-Agent")

    def response_filter(self, request: Request, response: Response) -> None:
        response.headers.set("X-Filtered", "1")
