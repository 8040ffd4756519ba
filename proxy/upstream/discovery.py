"""DNS service discovery: ``url: dns://NAME:PORT`` upstreams follow what NAME resolves to.

Theory of operation
-------------------
A pool entry ``dns://web-headless.default.svc.cluster.local:8000`` stands for one
upstream per address (A and AAAA) the name has: a Kubernetes headless Service, a
Consul DNS name, any DNS-based discovery. ``Discovery`` runs one loop per such entry:
resolve, hand the addresses to ``Pool.set_discovered`` (which keeps the ``Upstream``
objects, and so the health, ejections, drains and in-flight counts, of addresses that
stay), then sleep ``dns_refresh``, or less when the records' TTL is shorter. A failed
resolution keeps the last good set and is logged; an answer with no address is taken
as it is (the service has no endpoints: 503 until it has).

Resolvers: by default the system's (``getaddrinfo``: ``/etc/hosts``, search domains),
which reports no TTL. With ``dns_resolver: HOST:PORT`` the pool asks that DNS server
directly over UDP (``query``, below: a few dozen lines of RFC 1035, no dependency) and
honours the TTLs it returns.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from proxy.config.values import split_host_port

if TYPE_CHECKING:
    from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb")

A, AAAA = 1, 28
MIN_REFRESH = 1.0  # seconds: a TTL of 0 does not turn refreshes into a busy loop
QUERY_TIMEOUT = 2.0


class ResolveError(Exception):
    """The name could not be resolved now (the last good set stays)."""


# -- a minimal DNS client (RFC 1035), for ``dns_resolver`` ------------------------------------


def build_query(name: str, qtype: int, ident: int) -> bytes:
    header = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)  # recursion desired
    labels = b"".join(
        bytes([len(part)]) + part for part in name.rstrip(".").encode("idna").split(b".")
    )
    return header + labels + b"\0" + struct.pack("!HH", qtype, 1)


def _skip_name(data: bytes, pos: int) -> int:
    while True:
        length = data[pos]
        if length & 0xC0 == 0xC0:  # a compression pointer ends the name
            return pos + 2
        if length == 0:
            return pos + 1
        pos += 1 + length


def parse_answer(data: bytes, ident: int) -> tuple[list[str], int | None]:
    """Addresses and the smallest TTL in a response (None: no records); raises
    ``ResolveError`` for an error response."""
    if len(data) < 12:
        raise ResolveError("short DNS response")
    rid, flags, qdcount, ancount, _, _ = struct.unpack("!HHHHHH", data[:12])
    if rid != ident:
        raise ResolveError("DNS response for another query")
    rcode = flags & 0xF
    if rcode == 3:  # NXDOMAIN: the name does not exist
        raise ResolveError("no such name (NXDOMAIN)")
    if rcode:
        raise ResolveError(f"DNS error (rcode {rcode})")
    pos = 12
    for _ in range(qdcount):
        pos = _skip_name(data, pos) + 4
    addresses: list[str] = []
    ttl: int | None = None
    for _ in range(ancount):
        pos = _skip_name(data, pos)
        rtype, _, rttl, rdlen = struct.unpack("!HHIH", data[pos : pos + 10])
        pos += 10
        rdata = data[pos : pos + rdlen]
        pos += rdlen
        if rtype == A and rdlen == 4:
            addresses.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == AAAA and rdlen == 16:
            addresses.append(socket.inet_ntop(socket.AF_INET6, rdata))
        else:
            continue  # CNAMEs and others: the addresses follow in the same answer
        ttl = rttl if ttl is None else min(ttl, rttl)
    return addresses, ttl


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def query(server: tuple[str, int], name: str, qtype: int) -> tuple[list[str], int | None]:
    """Ask ``server`` for ``name``'s records of ``qtype`` (A or AAAA) over UDP."""
    loop = asyncio.get_running_loop()
    ident = random.getrandbits(16)
    transport, proto = await loop.create_datagram_endpoint(_Exchange, remote_addr=server)
    try:
        transport.sendto(build_query(name, qtype, ident))
        async with asyncio.timeout(QUERY_TIMEOUT):
            data = await proto.answer
    except TimeoutError:
        where = f"{server[0]}:{server[1]}"
        raise ResolveError(f"no answer from {where} in {QUERY_TIMEOUT:g}s") from None
    except OSError as exc:
        raise ResolveError(f"{server[0]}:{server[1]}: {exc.strerror or exc}") from None
    finally:
        transport.close()
    return parse_answer(data, ident)


async def resolve(name: str, resolver: str | None) -> tuple[list[str], float | None]:
    """Every address of ``name`` (A and AAAA), sorted, and the TTL when known."""
    if resolver is not None:
        server = split_host_port(resolver)
        found: list[str] = []
        ttls: list[int] = []
        for qtype in (A, AAAA):
            addresses, ttl = await query(server, name, qtype)
            found += addresses
            if ttl is not None:
                ttls.append(ttl)
        return sorted(set(found)), float(min(ttls)) if ttls else None
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ResolveError(str(exc.strerror or exc).lower()) from None
    return sorted({str(info[4][0]) for info in infos}), None


# -- the refresh loops -------------------------------------------------------------------------


class Discovery:
    """One refresh loop per ``dns://`` entry of every pool; ``changed`` is called after
    a pool's upstream set changed (the server re-syncs health checks)."""

    def __init__(self, changed: Callable[[], None]) -> None:
        self.changed = changed
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._pools: Mapping[str, Pool] = {}

    async def start(self, pools: Mapping[str, Pool]) -> None:
        """Resolve every entry once (so the first requests have upstreams), then loop."""
        self._pools = pools
        entries = list(self._entries(pools))
        await asyncio.gather(*(self.refresh(pool, key) for pool, key in entries))
        self.sync(pools)

    def sync(self, pools: Mapping[str, Pool]) -> None:
        """Loop over exactly the entries of ``pools`` (after a reload)."""
        self._pools = pools
        wanted = {(pool.name, key): pool for pool, key in self._entries(pools)}
        for k in [k for k in self._tasks if k not in wanted]:
            self._tasks.pop(k).cancel()
        for k in wanted:
            if k not in self._tasks:
                self._tasks[k] = asyncio.get_running_loop().create_task(self._run(*k))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _entries(pools: Mapping[str, Pool]) -> Iterable[tuple[Pool, str]]:
        for pool in pools.values():
            for key in pool.discovered:
                yield pool, key

    async def refresh(self, pool: Pool, key: str) -> float:
        """Resolve one entry now; the seconds until the next refresh."""
        name = pool.dns_specs[key].host
        try:
            addresses, ttl = await resolve(name, pool.dns_resolver)
        except (ResolveError, OSError) as exc:
            log.warning(
                "pool %s: cannot resolve %s (%s); keeping the last %d addresses",
                pool.name, name, exc, len(pool.discovered[key]),
            )  # fmt: skip
            return pool.dns_refresh
        if pool.set_discovered(key, addresses):
            log.info("pool %s: %s resolves to %s", pool.name, name, ", ".join(addresses) or
                     "nothing")  # fmt: skip
            self.changed()
        if ttl is None:
            return pool.dns_refresh
        return max(MIN_REFRESH, min(pool.dns_refresh, ttl))

    async def _run(self, pool_name: str, key: str) -> None:
        pool = self._pools[pool_name]
        await asyncio.sleep(pool.dns_refresh if pool.discovered[key] else 0)
        while True:
            pool = self._pools.get(pool_name, pool)  # a reload may have replaced it
            if key not in pool.discovered:
                return
            await asyncio.sleep(await self.refresh(pool, key))

    def __repr__(self) -> str:
        return f"<Discovery [{len(self._tasks)} names]>"
