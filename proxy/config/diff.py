"""What a reload changes: two configs in, one short phrase per change out.

``describe_changes(old, new)`` compares listeners and pools by name, the upstreams of a
pool by address, and every other section as a whole, for the reload's log line and
its ``POST /api/reload`` answer: ``pool api added (2 upstreams)``, ``pool web:
upstream 10.0.0.4:9000 added, retries changed``, ``listener public: bind
127.0.0.1:8080 -> 127.0.0.1:8081``. Nothing here knows what a reload can apply; the
caller adds "on restart only" where it applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from pydantic import BaseModel

from proxy.config.listeners import ListenerSpec
from proxy.config.models import Config
from proxy.config.pools import PoolSpec

M = TypeVar("M", bound=BaseModel)

_SECTIONS = frozenset({"listeners", "pools"})  # compared item by item


def describe_changes(old: Config, new: Config) -> list[str]:
    """One phrase per change from ``old`` to ``new``; [] when they are the same."""
    listeners = _by_name(old.listeners), _by_name(new.listeners)
    return [
        *_named("listener", *listeners, _listener_changes, _listener_summary),
        *_named("pool", old.pools, new.pools, _pool_changes, _pool_summary),
        *(f"{name} changed" for name in _changed_fields(old, new, _SECTIONS)),
    ]


def _by_name(listeners: list[ListenerSpec]) -> dict[str, ListenerSpec]:
    return {listener.name: listener for listener in listeners}


def _named(
    what: str,
    old: Mapping[str, M],
    new: Mapping[str, M],
    changes: Callable[[M, M], list[str]],
    summary: Callable[[M], str],
) -> Iterator[str]:
    """Added, removed and changed items of one kind, in the new config's order."""
    for name, item in new.items():
        before = old.get(name)
        if before is None:
            yield f"{what} {name} added ({summary(item)})"
        elif before != item:
            yield f"{what} {name}: {', '.join(changes(before, item))}"
    yield from (f"{what} {name} removed" for name in old if name not in new)


def _changed_fields(old: BaseModel, new: BaseModel, skip: frozenset[str]) -> list[str]:
    return [
        name
        for name in type(new).model_fields
        if name not in skip and getattr(old, name) != getattr(new, name)
    ]


def _listener_summary(listener: ListenerSpec) -> str:
    return listener.bind


def _listener_changes(old: ListenerSpec, new: ListenerSpec) -> list[str]:
    out = [] if old.bind == new.bind else [f"bind {old.bind} -> {new.bind}"]
    return out + [f"{name} changed" for name in _changed_fields(old, new, frozenset({"bind"}))]


def _pool_summary(pool: PoolSpec) -> str:
    count = len(pool.upstreams)
    return f"{count} upstream{'s' if count != 1 else ''}"


def _pool_changes(old: PoolSpec, new: PoolSpec) -> list[str]:
    before = {spec.address: spec for spec in old.upstreams}
    after = {spec.address: spec for spec in new.upstreams}
    out = [f"upstream {address} added" for address in after if address not in before]
    out += [f"upstream {address} removed" for address in before if address not in after]
    out += [
        f"upstream {address} changed"
        for address, spec in after.items()
        if address in before and before[address] != spec
    ]
    if list(before) != list(after) and set(before) == set(after):
        out.append("upstream order changed")
    return out + [f"{name} changed" for name in _changed_fields(old, new, frozenset({"upstreams"}))]
