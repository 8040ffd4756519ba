"""``headers``: set, add and remove request headers (nginx ``proxy_set_header``) and
response headers (``add_header``); values may use ``${client_ip}``, ``${request_id}``
and ``${host}``.

Request changes are made before an upstream is picked, so the filters after this one
(a ``rate_limit`` keyed by a header) see them; response changes when the response
head arrives. Each side applies ``remove``, then ``set``, then ``add``. The names the
proxy writes itself (framing, hop-by-hop, ``X-Forwarded-*``, ``X-Request-ID``,
``Via``) are refused when the config is checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.config.filter_values import header_template
from proxy.filters.base import Filter, Headers, Request, Response

if TYPE_CHECKING:
    from proxy.config.filters import HeaderChangesSpec, HeadersOptions
    from proxy.filters.context import Site

Template = list[tuple[bool, str]]


def render(template: Template, request: Request) -> str:
    """A header value with its ``${...}`` variables filled in from ``request``."""
    out = []
    for variable, text in template:
        if not variable:
            out.append(text)
        elif text == "client_ip":
            out.append(request.client_ip)
        elif text == "request_id":
            out.append(request.request_id)
        else:
            out.append(request.host or "")
    return "".join(out)


class _Changes:
    """One side's changes, compiled."""

    def __init__(self, changes: HeaderChangesSpec) -> None:
        self.remove = list(changes.remove)
        self.set = [(name, header_template(value)) for name, value in changes.set.items()]
        self.add = [(name, header_template(value)) for name, value in changes.add.items()]

    def __bool__(self) -> bool:
        return bool(self.remove or self.set or self.add)

    def apply(self, headers: Headers, request: Request) -> None:
        for name in self.remove:
            headers.remove(name)
        for name, template in self.set:
            headers.set(name, render(template, request))
        for name, template in self.add:
            headers.add(name, render(template, request))


_MEMO_LIMIT = 512


class HeadersFilter(Filter):
    """Request and response header changes (see the module). Response changes without
    variables are a function of the upstream's head alone: kept per head (bounded, like
    the response head cache), so a repeated head is changed once."""

    def __init__(self, options: HeadersOptions, site: Site) -> None:
        super().__init__(options)
        request, response = _Changes(options.request), _Changes(options.response)
        self._request, self._response = request, response
        fixed = not any(v for _, t in (*response.set, *response.add) for v, _ in t)
        self._memo: dict[bytes, bytes] | None = {} if fixed else None
        if not request:  # a side with nothing to do is not a phase of this filter
            self.request_filter = None  # type: ignore[assignment]
        if not response:
            self.response_filter = None  # type: ignore[assignment]

    def request_filter(self, request: Request) -> None:
        self._request.apply(request.headers, request)

    def response_filter(self, request: Request, response: Response) -> None:
        memo = self._memo
        if memo is None:
            self._response.apply(response.headers, request)
            return
        before = response.head()
        after = memo.get(before)
        if after is None:
            self._response.apply(response.headers, request)
            after = response.head()
            if len(memo) >= _MEMO_LIMIT:
                memo.clear()
            memo[before] = after
        response.replace(after)
