"""``access``: allow or deny by client address (nginx ``allow``/``deny``, Traefik's
IPAllowList); a refused request gets 403.

``deny`` wins; when ``allow`` is given, only addresses in it pass. The address judged
is the client's, unless the client is one of ``trusted_proxies``: then it is the last
``X-Forwarded-For`` entry that is not a trusted proxy (the address the outermost
trusted proxy saw), nginx's ``real_ip_recursive on``. That address becomes the
request's ``client_ip`` for the filters after this one (a ``rate_limit`` by
``client_ip``, ``${client_ip}`` in headers). An entry that is not an address is
refused. IPv4-mapped IPv6 addresses are judged as IPv4. Verdicts are kept per
address (a few thousand), so a returning client costs one dict lookup.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from proxy.filters.base import Filter, LocalResponse, Request

if TYPE_CHECKING:
    from proxy.config.filters import AccessOptions
    from proxy.filters.context import Site

log = logging.getLogger("aiolb")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_MEMO_LIMIT = 4096
_FORBIDDEN = "403 Forbidden: access denied\n"


def address(text: str) -> Address | None:
    """``text`` as an address (IPv4-mapped IPv6 as IPv4), or None if it is not one."""
    try:
        found = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(found, ipaddress.IPv6Address) and found.ipv4_mapped is not None:
        return found.ipv4_mapped
    return found


def _within(found: Address, networks: list[Network]) -> bool:
    return any(found.version == net.version and found in net for net in networks)


class Access(Filter):
    """Address rules (see the module)."""

    def __init__(self, options: AccessOptions, site: Site) -> None:
        super().__init__(options)
        self._allow: list[Network] = [ipaddress.ip_network(n) for n in options.allow]
        self._deny: list[Network] = [ipaddress.ip_network(n) for n in options.deny]
        self._trusted: list[Network] = [ipaddress.ip_network(n) for n in options.trusted_proxies]
        self._verdicts: dict[str, bool] = {}

    def allowed(self, text: str) -> bool:
        """Whether the address ``text`` passes (kept per address)."""
        verdict = self._verdicts.get(text)
        if verdict is None:
            found = address(text)
            verdict = found is not None and not _within(found, self._deny) and (
                not self._allow or _within(found, self._allow)
            )
            if len(self._verdicts) >= _MEMO_LIMIT:
                self._verdicts.clear()
            self._verdicts[text] = verdict
        return verdict

    def client(self, request: Request) -> str:
        """The address to judge: the client's, or the one its trusted proxies saw."""
        peer = request.client_ip
        trusted = self._trusted
        if not trusted:
            return peer
        found = address(peer)
        forwarded = request.ex.found.forwarded_for
        if found is None or forwarded is None or not _within(found, trusted):
            return peer
        hops = [hop.strip() for hop in forwarded.decode("latin-1").split(",")]
        for hop in reversed(hops):
            hop_address = address(hop)
            if hop_address is None or not _within(hop_address, trusted):
                return hop
        return hops[0] if hops else peer

    def request_filter(self, request: Request) -> LocalResponse | None:
        client = self.client(request)
        request.client_ip = client
        if self.allowed(client):
            return None
        if log.isEnabledFor(logging.INFO):
            log.info("403 for %s on route %s: access denied", client, request.route)
        return LocalResponse(403, (), _FORBIDDEN)
