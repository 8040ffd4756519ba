"""Checks that span sections of a config, run on the raw input data.

Field validation sees one value at a time; these checks compare values across the
whole file: every route names a defined pool, no two listeners (nor a listener and the
admin server) bind the same address, listener names are unique, and no pool lists the
same upstream (or upstream ``name``) twice. They read the raw mapping defensively
(anything malformed is the field validators' business and is skipped here), so their
errors are reported together with the field errors in one ``ValidationError``, each at
the ``loc`` of the offending value: the loader turns that into ``FILE:LINE``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Any, get_args

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType

from proxy.config.values import parse_upstream_url, split_host_port

Loc = tuple[str | int, ...]

_KNOWN_TYPES = frozenset(get_args(ErrorType))
_ADMIN_BIND = "127.0.0.1:9901"  # AdminSpec.bind's default, for inputs without an admin section


def cross_check(data: Mapping[str, Any]) -> list[InitErrorDetails]:
    """All cross-section problems in raw config ``data``, as pydantic error details."""
    listeners = list(_entries(data.get("listeners")))
    pools = data.get("pools")
    caches = data.get("caches", {})
    return [
        *_undefined(listeners, pools if isinstance(pools, Mapping) else None, "pool"),
        *_undefined(listeners, caches if isinstance(caches, Mapping) else None, "cache"),
        *_undefined_split(listeners, pools if isinstance(pools, Mapping) else None),
        *_clashing_binds(listeners, data.get("admin")),
        *_duplicate_names(listeners),
        *_duplicate_route_names(listeners),
        *_duplicate_upstreams(pools if isinstance(pools, Mapping) else {}),
        *_routes_and_redirects(listeners),
        *_empty_pools(pools if isinstance(pools, Mapping) else {}, data.get("providers")),
    ]


def _empty_pools(pools: Mapping[str, Any], providers: object) -> Iterator[InitErrorDetails]:
    """``upstreams: []`` only when a provider (``providers.docker``) can fill the pool;
    ``scale_from_zero.wake: docker`` only with that provider."""
    docker = isinstance(providers, Mapping) and isinstance(providers.get("docker"), Mapping)
    for name, pool in pools.items():
        if not isinstance(pool, Mapping):
            continue
        upstreams = pool.get("upstreams")
        if isinstance(upstreams, list) and not upstreams and not docker:
            message = "a pool needs at least one upstream (or providers.docker to fill it)"
            yield _problem("empty_pool", ("pools", name, "upstreams"), upstreams, message)
        scale = pool.get("scale_from_zero")
        if isinstance(scale, Mapping) and scale.get("wake") == "docker" and not docker:
            loc = ("pools", name, "scale_from_zero", "wake")
            message = "wake: docker needs providers.docker"
            yield _problem("wake_needs_docker", loc, "docker", message)


def merge_errors(
    title: str, exc: ValidationError | None, problems: list[InitErrorDetails]
) -> ValidationError:
    """One ``ValidationError`` holding ``exc``'s errors (if any) followed by ``problems``."""
    details = [_as_details(error) for error in exc.errors()] if exc is not None else []
    return ValidationError.from_exception_data(title, [*details, *problems])


def _as_details(error: Any) -> InitErrorDetails:
    kind = error["type"]
    if kind not in _KNOWN_TYPES:
        kind = PydanticCustomError(kind, "{message}", {"message": error["msg"]})
        return InitErrorDetails(type=kind, loc=error["loc"], input=error["input"])
    ctx = error.get("ctx")
    if ctx is None:
        return InitErrorDetails(type=kind, loc=error["loc"], input=error["input"])
    return InitErrorDetails(type=kind, loc=error["loc"], input=error["input"], ctx=ctx)


def _problem(kind: str, loc: Loc, value: object, message: str) -> InitErrorDetails:
    error = PydanticCustomError(kind, "{message}", {"message": message})
    return InitErrorDetails(type=error, loc=loc, input=value)


def _entries(value: object) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """``(index, item)`` for the mapping items of a list; anything else yields nothing."""
    if isinstance(value, list):
        yield from ((i, item) for i, item in enumerate(value) if isinstance(item, Mapping))


def _undefined(
    listeners: list[tuple[int, Mapping[str, Any]]], defined: Mapping[str, Any] | None, key: str
) -> Iterator[InitErrorDetails]:
    """Routes whose ``key`` (``pool``, ``cache``) names an entry ``defined`` lacks."""
    if defined is None:
        return
    names = ", ".join(str(name) for name in defined) or "none"
    for i, listener in listeners:
        for j, route in _entries(listener.get("routes")):
            name = route.get(key)
            if isinstance(name, str) and name not in defined:
                loc = ("listeners", i, "routes", j, key)
                message = f"{key} {name!r} is not defined (defined {key}s: {names})"
                yield _problem(f"undefined_{key}", loc, name, message)


def _undefined_split(
    listeners: list[tuple[int, Mapping[str, Any]]], defined: Mapping[str, Any] | None
) -> Iterator[InitErrorDetails]:
    """Routes whose ``pools`` entries or ``mirror`` name a pool not defined."""
    if defined is None:
        return
    names = ", ".join(str(name) for name in defined) or "none"
    for i, listener in listeners:
        for j, route in _entries(listener.get("routes")):
            loc = ("listeners", i, "routes", j)
            named: list[tuple[Loc, object]] = [((*loc, "pools", k, "pool"), e.get("pool"))
                     for k, e in _entries(route.get("pools"))]  # fmt: skip
            mirror = route.get("mirror")
            if isinstance(mirror, Mapping):
                named.append(((*loc, "mirror", "pool"), mirror.get("pool")))
            for where, name in named:
                if isinstance(name, str) and name not in defined:
                    message = f"pool {name!r} is not defined (defined pools: {names})"
                    yield _problem("undefined_pool", where, name, message)


def _bind_key(value: object) -> tuple[str, int] | None:
    if not isinstance(value, str):
        return None
    try:
        host, port = split_host_port(value)
    except ValueError:
        return None
    return (host.lower(), port) if port else None  # port 0: a fresh free port each time


def _overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """True if binding both fails or shares traffic: same port, and the same host or a
    wildcard of the other's family (``0.0.0.0`` for IPv4 and names, ``::`` for IPv6;
    asyncio binds ``::`` IPv6-only)."""
    if a[1] != b[1]:
        return False
    if a[0] == b[0]:
        return True
    for wild, other in ((a[0], b[0]), (b[0], a[0])):
        if (wild == "0.0.0.0" and ":" not in other) or (wild == "::" and ":" in other):
            return True
    return False


def _clashing_binds(
    listeners: list[tuple[int, Mapping[str, Any]]], admin: object
) -> Iterator[InitErrorDetails]:
    admin_bind = admin.get("bind", _ADMIN_BIND) if isinstance(admin, Mapping) else _ADMIN_BIND
    seen: list[tuple[tuple[str, int], str]] = []
    if (key := _bind_key(admin_bind)) is not None:
        seen.append((key, "admin.bind"))
    for i, listener in listeners:
        bind = listener.get("bind")
        if (key := _bind_key(bind)) is None:
            continue
        for other, where in seen:
            if _overlap(key, other):
                message = f"bind address {bind!r} is already used by {where}"
                yield _problem("duplicate_bind", ("listeners", i, "bind"), bind, message)
                break
        seen.append((key, f"listeners[{i}]"))


def _repeats(keyed: Iterable[tuple[Any, Hashable | None]]) -> Iterator[tuple[Any, Any]]:
    """``(index, index of its first occurrence)`` for every key seen before (None: skip)."""
    first: dict[Hashable, int] = {}
    for i, key in keyed:
        if key is None:
            continue
        if key in first:
            yield i, first[key]
        else:
            first[key] = i


def _text(item: Mapping[str, Any], key: str) -> str | None:
    value = item.get(key)
    return value if isinstance(value, str) else None


def _duplicate_names(listeners: list[tuple[int, Mapping[str, Any]]]) -> Iterator[InitErrorDetails]:
    by_index = dict(listeners)
    for i, first in _repeats((i, _text(lst, "name")) for i, lst in listeners):
        name = by_index[i]["name"]
        message = f"duplicate listener name {name!r} (also listeners[{first}])"
        yield _problem("duplicate_name", ("listeners", i, "name"), name, message)


def _upstream_key(upstream: Mapping[str, Any]) -> tuple[str, int] | None:
    url = upstream.get("url")
    try:
        return parse_upstream_url(url) if isinstance(url, str) else None
    except ValueError:
        return None


def _routes_and_redirects(
    listeners: list[tuple[int, Mapping[str, Any]]],
) -> Iterator[InitErrorDetails]:
    """Every route needs a pool unless it redirects to https (itself or by its
    listener's ``redirect_https``), a listener needs routes unless it redirects, and
    only plain-HTTP listeners redirect."""
    for i, listener in listeners:
        redirect = listener.get("redirect_https", False)
        routes = listener.get("routes")
        tls = listener.get("tls") is not None
        if tls and redirect:
            message = "redirect_https applies to plain-HTTP listeners; this one has tls"
            yield _problem("redirect_on_tls", ("listeners", i, "redirect_https"), redirect, message)
        if routes is None and not redirect:
            yield _problem("missing", ("listeners", i, "routes"), None, "field required")
        elif routes == [] and not redirect:
            message = "must have at least 1 entry (or set redirect_https)"
            yield _problem("too_short", ("listeners", i, "routes"), routes, message)
        for j, route in _entries(routes):
            route_redirect = route.get("redirect_https")
            loc = ("listeners", i, "routes", j)
            if tls and route_redirect:
                message = "redirect_https applies to plain-HTTP listeners; this one has tls"
                yield _problem("redirect_on_tls", (*loc, "redirect_https"), route_redirect, message)
            redirects = redirect if route_redirect is None else route_redirect
            if route.get("pool") is None and route.get("pools") is None and not redirects:
                yield _problem("missing", (*loc, "pool"), None, "field required")


def _duplicate_upstreams(pools: Mapping[str, Any]) -> Iterator[InitErrorDetails]:
    """The same url twice in a pool, or the same upstream ``name``."""
    for name, pool in pools.items():
        if not isinstance(pool, Mapping):
            continue
        upstreams = dict(_entries(pool.get("upstreams")))
        urls = ((i, _upstream_key(u)) for i, u in upstreams.items())
        for i, first in _repeats(urls):
            url = upstreams[i]["url"]
            message = f"duplicate upstream {url!r} (also upstreams[{first}])"
            yield _problem("duplicate_upstream", ("pools", name, "upstreams", i, "url"), url,
                           message)  # fmt: skip
        for i, first in _repeats((i, _text(u, "name")) for i, u in upstreams.items()):
            label = upstreams[i]["name"]
            message = f"duplicate upstream name {label!r} (also upstreams[{first}])"
            loc = ("pools", name, "upstreams", i, "name")
            yield _problem("duplicate_upstream_name", loc, label, message)


def _duplicate_route_names(
    listeners: list[tuple[int, Mapping[str, Any]]],
) -> Iterator[InitErrorDetails]:
    """Route ``name``s label metrics and rate-limit keys: one route per name."""
    named = [
        ((i, j), _text(route, "name"))
        for i, listener in listeners
        for j, route in _entries(listener.get("routes"))
    ]
    by_place = dict(named)
    for (i, j), (fi, fj) in _repeats(named):
        name = by_place[(i, j)]
        message = f"duplicate route name {name!r} (also listeners[{fi}].routes[{fj}])"
        yield _problem("duplicate_route_name", ("listeners", i, "routes", j, "name"), name,
                       message)  # fmt: skip
