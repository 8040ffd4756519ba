"""The PROXY protocol's keys: ``listeners[].proxy_protocol`` (receive) and
``pools.NAME.send_proxy_protocol`` (send); the codec is ``proxy.proxy_protocol``."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import Field

from proxy.config.base import ConfigModel
from proxy.config.filter_values import Cidr


class ProxyProtocolSpec(ConfigModel):
    """Accept a PROXY protocol header (v1 or v2, HAProxy's ``accept-proxy``) from the
    load balancers in ``trusted``: its client address is the client's everywhere (access
    log, ``X-Forwarded-For``, ``access``, ``ip_hash``, rate-limit keys). A peer in
    ``trusted`` must send one within ``timeouts.header`` (before the TLS handshake on a
    TLS listener); a peer outside speaks HTTP directly, and a header from it, a malformed
    header or none in time closes the connection without an answer. A v2 ``LOCAL`` header
    (a load balancer's health probe) keeps the connection's own address."""

    trusted: Annotated[list[Cidr], Field(min_length=1)]
    """The address ranges of the load balancers that send it: ``10.0.0.0/8``,
    ``192.0.2.7``, ``2001:db8::/32``."""

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``trusted`` as networks."""
        return tuple(ipaddress.ip_network(cidr) for cidr in self.trusted)


#: ``pools.NAME.send_proxy_protocol``: the header version written first on each new
#: upstream connection (HAProxy's ``send-proxy`` / ``send-proxy-v2``)
SendProxyProtocol = Literal["v1", "v2"]
