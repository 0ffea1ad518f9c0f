"""Who is on the other end of a connection.

The client address is the socket peer, unless that peer is one of the operator's reverse proxies
(``IDLECLAW_TRUSTED_PROXIES``, CIDRs); then it is the right-most ``X-Forwarded-For`` entry that
is not itself a trusted proxy. A header from anyone else is ignored, so it cannot be forged.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from django.conf import settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    """The networks of a list of CIDRs (validated when the settings load)."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def is_ip(value: str) -> bool:
    """Whether ``value`` is one IP address as written (no network, no zone)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def in_networks(address: str, networks: Iterable[Network]) -> bool:
    """Whether ``address`` is an IP address inside one of ``networks`` (in one spelling,
    ``normalized``: a proxy at 127.0.0.1 reaching a dual-stack socket as ``::ffff:127.0.0.1``
    is still 127.0.0.1)."""
    try:
        ip = ipaddress.ip_address(normalized(address))
    except ValueError:
        return False
    return any(ip in network for network in networks)


def is_trusted_proxy(address: str | None) -> bool:
    """Whether ``address`` is one of the operator's reverse proxies (IDLECLAW_TRUSTED_PROXIES)."""
    proxies = networks(tuple(settings.IDLECLAW_TRUSTED_PROXIES))
    return bool(address) and in_networks(address, proxies)


# The well-known NAT64 prefix (RFC 6052): an IPv4 client behind a NAT64 gateway appears in it.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def normalized(address: str) -> str:
    """``address`` in one spelling: an IPv4 address mapped into IPv6 (``::ffff:1.2.3.4``, what
    a dual-stack socket reports) or translated by NAT64 (``64:ff9b::1.2.3.4``) as plain IPv4,
    IPv6 compressed and without a zone (``fe80::1%eth0``, which no database column takes);
    anything else unchanged."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return str(ip)


def consumer_address(address: str) -> str:
    """What an anonymous consumer at ``address`` is known by: the IPv4 address itself, or for
    IPv6 its network of ``IDLECLAW_IPV6_CONSUMER_PREFIX`` bits (``2001:db8:1:2::/64``)."""
    address = normalized(address)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return address
    prefix = settings.IDLECLAW_IPV6_CONSUMER_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def client_ip(peer: str | None, forwarded_for: str | None) -> str | None:
    """The client's address from the socket peer and an ``X-Forwarded-For`` header value, in one
    spelling (``normalized``)."""
    proxies = networks(tuple(settings.IDLECLAW_TRUSTED_PROXIES))
    if not peer or not proxies or not in_networks(peer, proxies):
        return normalized(peer) if peer else peer
    hops = [hop.strip() for hop in (forwarded_for or "").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not in_networks(hop, proxies):
            try:
                return normalized(str(ipaddress.ip_address(hop)))
            except ValueError:
                return normalized(peer)  # garbage in the header: fall back to the proxy itself
    return normalized(peer)


def scope_client_ip(scope: dict) -> str | None:
    """The client address of an ASGI connection (HTTP or WebSocket)."""
    client = scope.get("client")
    peer = str(client[0]) if client else None
    # Several headers are several proxies appending: read them as one list, in order.
    hops = [
        value.decode("latin-1")
        for name, value in scope.get("headers", ())
        if name.lower() == b"x-forwarded-for"
    ]
    return client_ip(peer, ",".join(hops) or None)
