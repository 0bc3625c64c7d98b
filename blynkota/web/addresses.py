"""A client's address against configured CIDR ranges, read one way for every check
(trusted.proxies, allowed.administrator.ips, allowed.metrics.ips)."""

import ipaddress

__all__ = ["client_address", "address_in"]


def client_address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address (an IPv4-mapped IPv6 one as IPv4, any %zone dropped); None
    if it is not an IP address."""
    try:
        address = ipaddress.ip_address((text or "").split("%")[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def address_in(text: str | None, networks) -> bool:
    address = client_address(text)
    return address is not None and any(address in network for network in networks)
