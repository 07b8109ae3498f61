"""Host names as clients and URLs write them: the name in a Host header or a URL
authority, and whether it is this machine (loopback)."""

from __future__ import annotations

import ipaddress


def hostname(host: str) -> str:
    """Lower-cased host name of a Host header or URL authority (``host[:port]``,
    ``[v6]:port``), without userinfo, port or trailing dot."""
    host = host.rpartition("@")[2].strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    name, _, _ = host.partition(":")
    return name.rstrip(".")


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without brackets)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
