"""Where the master may send a job's callbacks: a user's URL must not reach the master's own services.

A callback URL is user input, sent to from inside the lab's network. By default the master refuses
targets on loopback, link-local (which holds cloud metadata services), unspecified, multicast and
reserved addresses, and the addresses of the master's own interfaces; an admin allows some of them
with ``pumice-master serve --notify-allow CIDR`` (e.g. a receiver on the master's host) and refuses
more with ``--notify-deny CIDR``. The same check runs at submission (naming the URL and the setting),
on every connection the sender opens (after DNS resolution, so a name that resolves elsewhere later
is caught) and on every redirect.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

SCHEMES = ("http", "https")


class Refused(ValueError):
    """A URL the policy refuses; the message names the URL, the address and the setting."""


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """``CIDR`` or single addresses (``127.0.0.1``, ``10.1.0.0/16``, ``::1``), else ValueError."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"bad network {value!r}: expected an address or CIDR, e.g. 127.0.0.1 or "
                             "10.0.0.0/8") from None
    return tuple(networks)


def own_addresses() -> set[Address]:
    """The addresses of this host's interfaces (Linux: /proc; elsewhere the host name's addresses)."""
    found: set[Address] = set()
    trie = Path("/proc/net/fib_trie")
    if trie.exists():
        previous = ""
        for line in trie.read_text().splitlines():
            if "/32 host LOCAL" in line and previous.strip().startswith("|--"):
                found.add(ipaddress.ip_address(previous.strip()[3:].strip()))
            previous = line
    inet6 = Path("/proc/net/if_inet6")
    if inet6.exists():
        for line in inet6.read_text().splitlines():
            raw = line.split()[0]
            if len(raw) == 32:
                found.add(ipaddress.ip_address(":".join(raw[i:i + 4] for i in range(0, 32, 4))))
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(ipaddress.ip_address(info[4][0].split("%")[0]))
    except OSError:
        pass
    return found


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses callbacks may reach (see the module's docstring)."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    #: the setting an admin changes, named in refusals
    setting: str = "pumice-master serve --notify-allow"
    own: frozenset[Address] = field(default_factory=lambda: frozenset(own_addresses()))

    def why_refused(self, address: Address) -> str | None:
        """Why ``address`` may not be reached (None: it may)."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if any(address in net for net in self.allow):
            return None
        if any(address in net for net in self.deny):
            return "an address an admin refused"
        for test, what in ((address.is_loopback, "loopback"), (address.is_link_local, "link-local"),
                           (address.is_unspecified, "unspecified"), (address.is_multicast, "multicast"),
                           (address.is_reserved, "reserved")):
            if test:
                return f"a {what} address"
        if address in self.own:
            return "an address of the master itself"
        return None

    def check_address(self, url: str, address: Address) -> None:
        why = self.why_refused(address)
        if why:
            raise Refused(f"{url_for_display(url)} reaches {address}, {why}, which callbacks may not "
                          f"reach; an admin may allow it with '{self.setting} {address}'")

    def resolve(self, url: str) -> tuple[str, int, list[Address]]:
        """``(host, port, addresses)`` of ``url`` after checking each address (Refused, or OSError
        when the name does not resolve)."""
        host, port = split_target(url)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (UnicodeError, ValueError):  # an IDNA label too long, a NUL in the name
                raise Refused(f"{url_for_display(url)}: {host[:100]!r} is not a valid host name") from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        for address in addresses:
            self.check_address(url, address)
        return host, port, addresses

    def check_submitted(self, url: str) -> None:
        """At submission: the scheme, the host, and every address the host resolves to now. A name
        that does not resolve here passes (the sender checks it again when it connects)."""
        host, _ = split_target(url)
        if "{" in host:  # LAVA's {FIELD} substitution in the host: checked when sending
            return
        with contextlib.suppress(OSError):
            self.resolve(url)


def split_target(url: str) -> tuple[str, int]:
    """``(host, port)`` of an http(s) URL, else Refused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused(f"{url_for_display(url)} is not a valid URL: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise Refused(f"{url_for_display(url)}: callbacks are sent over http or https only, not "
                      f"{parts.scheme or 'a URL without a scheme'}")
    if not parts.hostname:
        raise Refused(f"{url_for_display(url)} has no host")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def url_for_display(url: str) -> str:
    """The URL without user name and password (what logs, refusals and the attempt records show)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return repr(url[:200])
    if parts.username is None and parts.password is None:
        return url[:500]
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()[:500]
