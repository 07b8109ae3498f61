"""Host names as clients and URLs write them: the name in a Host header or a URL
authority, whether it is this machine (loopback), and which names the proxy answers to."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

_UNSPECIFIED = frozenset({"0.0.0.0", "[::]", "::", ""})


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


class HostAllowList:
    """Host names the proxy answers to. A web page on ``evil.example`` whose DNS name is
    re-pointed at 127.0.0.1 reaches the proxy with ``Host: evil.example``; refusing
    names the proxy is not known by closes that door (as Vite's and webpack's
    ``allowedHosts`` and Jupyter do). Loopback addresses and ``localhost`` are always
    allowed; ``*.example.com`` allows every name under example.com; ``*`` any name."""

    def __init__(self, names: Iterable[str], *, any_ip: bool = False) -> None:
        names = [n.lower() for n in names]
        self.any_host = "*" in names
        self.any_ip = any_ip
        self._exact = frozenset(n for n in names if not n.startswith("*")) | {"localhost"}
        self._suffixes = tuple(n[1:] for n in names if n.startswith("*."))

    @classmethod
    def for_config(cls, config: Config, *, any_ip: bool = False) -> HostAllowList:
        """The proxy's own names (listen host, every upstream's ``host:``) and
        ``allowed_hosts``."""
        names = [u.match_host for u in config.upstreams if u.match_host]
        listen = hostname(config.listen.host)
        if listen not in _UNSPECIFIED:
            names.append(f"[{listen}]" if ":" in listen and "[" not in listen else listen)
        return cls([*names, *config.allowed_hosts], any_ip=any_ip)

    def allows(self, name: str) -> bool:
        """``name`` as :func:`~sigproxy.hosts.hostname` gives it."""
        if self.any_host or name in self._exact or name.endswith(self._suffixes):
            return True
        try:
            address = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return False
        return self.any_ip or address.is_loopback
