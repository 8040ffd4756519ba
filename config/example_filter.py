"""An example filter written in Python, for config/filters.yaml (``python:
example_filter:ApiKeys``; aiolb finds it next to the config file that names it, else
uses its own copy: ``aiolb example example_filter.py`` prints it).

Clients must send one of the configured API keys in ``X-Api-Key``; the upstream is
told which client it is (``X-Client``) and which upstream it is (``X-Upstream``); every
response says how long the proxy held the request (``Server-Timing``). Copy it, and
``proxy/filters/base.py`` documents the hooks.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from proxy.filters import Filter, LocalResponse, Request, Response, UpstreamInfo


class ApiKeys(Filter):
    """401 without a known ``X-Api-Key``; the key's client name goes upstream."""

    class Options(BaseModel):
        """Validated when the config is checked: bad options are FILE:LINE errors."""

        model_config = ConfigDict(extra="forbid")
        #: API key -> client name
        keys: dict[str, str] = Field(min_length=1)
        header: str = "X-Api-Key"

    def request_filter(self, request: Request) -> LocalResponse | None:
        client = self.options.keys.get(request.headers.get(self.options.header) or "")
        if client is None:
            return LocalResponse(401, {"WWW-Authenticate": "ApiKey"}, "401: unknown API key\n")
        request.headers.remove(self.options.header)  # the upstream never sees the key
        request.headers.set("X-Client", client)
        request.state["started"] = time.perf_counter()
        return None

    def upstream_request_filter(self, request: Request, upstream: UpstreamInfo) -> None:
        request.headers.set("X-Upstream", upstream.name)

    async def response_filter(self, request: Request, response: Response) -> None:
        # async: a filter may await here (a lookup, a log call); the response waits
        held = (time.perf_counter() - request.state["started"]) * 1000
        response.headers.add("Server-Timing", f"aiolb;dur={held:.2f}")
