"""The worker's file policy: what a job may make the agent read from the worker itself.

The agent runs jobs as root on the lab box. Left alone, any submitter could have it copy a file of
the worker (``file:///etc/shadow``, ``/proc/self/environ``, a local git repository) or the answer of a
service that only the worker reaches (``http://127.0.0.1:...``, ``http://169.254.169.254/``) into a
board, a log or a results page. LAVA 2023.01 lets them; Pumice refuses them unless the worker's
dispatcher configuration allows them, with two keys (default: nothing allowed):

``allowed_file_dirs: [DIR, ...]``
    ``file://`` URLs (images, test definitions) and local git repositories (a path, or a ``file://``
    URL, as a test definition's ``repository``) are read only from under these directories. Both
    sides are compared with their symlinks and ``..`` resolved: a symlink under an allowed directory
    that points to ``/etc/shadow`` is refused.
``allowed_local_addresses: [ADDRESS, ...]``
    URLs (http, https, git, ssh) may reach the worker's own addresses only when listed here:
    loopback (127.0.0.0/8, ::1), link-local (169.254.0.0/16, fe80::/10), the unspecified address
    (0.0.0.0, ::, which connect to the worker itself) and, when the job runs, any address of the
    worker's own interfaces. An entry is an address (``127.0.0.1``), a network (``127.0.0.0/8``) or
    an address and a port (``127.0.0.1:8080``, ``[::1]:8080``).

Where it is checked (one module, three places):

- **The master, at submission, and its scheduler**, from the job's text: file paths normalised
  (``..`` removed, symlinks cannot be seen from there), addresses written as numbers (also
  ``127.1`` and ``2130706433``), and ``localhost`` names (RFC 6761). A job goes only to workers
  whose policy allows it; it is refused when no worker that could run it does.
- **pumice-run, when it validates a job** (``--validate`` too): the same, with symlinks resolved
  on the worker. Host names are not resolved then (validation touches nothing).
- **When the agent fetches** (defence in depth): a file is opened first and the file actually
  opened (its ``/proc/self/fd`` link) must lie under an allowed directory; an http(s) download
  resolves the host itself, checks each address (also against the worker's own interfaces) and
  connects only to an address it checked, for the first request, every redirect and a proxy, so a
  name that resolves to a public address once and to 127.0.0.1 the next time (DNS rebinding) never
  reaches the worker; a git host is resolved and checked before cloning, and for http(s) git is
  told to use the checked addresses (``http.curloptResolve``). Through a proxy, the address checked
  is the proxy's (the proxy resolves the URL's host).

The files QEMU's command line names are judged by :mod:`agent.qemu_policy` (which options are the
job's, what each reads, writes or runs); the files it reads outside the job's own are accesses of
kind ``file`` here, allowed by ``allowed_file_dirs`` like file URLs.

Every refusal starts with :data:`REFUSED`: it is a lab's policy, not a feature Pumice lacks
("not implemented: ..."), and reports count it apart.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple
from urllib.parse import urlsplit

from agent.errors import JobError

if TYPE_CHECKING:  # socket is imported when a check needs it: validating a job does not
    import socket

#: the words every refusal starts with
REFUSED = "refused by the worker's file policy"
#: the dispatcher configuration's keys
DIRS_KEY = "allowed_file_dirs"
ADDRESSES_KEY = "allowed_local_addresses"
#: the port a URL of each scheme reaches when it names none
DEFAULT_PORTS = {"http": 80, "https": 443, "git": 9418, "ssh": 22, "git+ssh": 22, "ssh+git": 22}
#: names that always mean the host itself (RFC 6761 and Debian's /etc/hosts); ``*.localhost`` too
LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
#: addresses that are the worker itself whatever its interfaces: (network, what it is)
LOCAL_NETWORKS = tuple((ipaddress.ip_network(net), what) for net, what in (
    ("127.0.0.0/8", "a loopback address"), ("::1/128", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"), ("fe80::/10", "a link-local address"),
    ("0.0.0.0/8", "the unspecified address"), ("::/128", "the unspecified address")))
#: what an address of one of the worker's interfaces is called in a refusal
OWN_ADDRESS = "an address"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class PolicyRefusal(JobError):
    """A job asked for something the worker's file policy does not allow (a Job error: the job's
    fault, the device is not suspect)."""


class Access(NamedTuple):
    """Something a job reads: a ``url`` (an image, a test definition), a ``git`` repository, or a
    ``file`` of the worker that QEMU opens (:mod:`agent.qemu_policy`; ``location`` is its path)."""

    kind: str
    location: str
    #: where the job names it (a YAML path), for faults
    path: tuple = ()
    #: what names it, in refusals (default: ``location``), e.g. "QEMU option '-kernel /srv/vmlinuz'"
    via: str = ""


class Target(NamedTuple):
    """What an access reaches on the worker itself: a ``file`` path, or ``addresses`` at ``port``."""

    file: str | None = None
    addresses: tuple[Address, ...] = ()
    port: int | None = None


def accesses(definition: Mapping) -> list[Access]:
    """Every URL and git repository the job's actions read: each ``url`` in an action block (deploy
    images, at any depth) and each test definition's ``repository`` (git or url)."""
    found: list[Access] = []
    actions = definition.get("actions")
    for index, block in enumerate(actions if isinstance(actions, list) else []):
        if isinstance(block, dict):
            for section, params in block.items():
                found.extend(_walk(params, ("actions", index, section)))
    return found


def _walk(node: Any, path: tuple) -> Iterator[Access]:
    if isinstance(node, dict):
        source = node.get("from") if "repository" in node else None
        if source in ("git", "url") and isinstance(node["repository"], str):
            yield Access(source, node["repository"], path + ("repository",))
        for key, value in node.items():
            if key == "repository" and source is not None:
                continue  # an inline definition's text runs on the board: its keys are not fetched
            if key == "url" and isinstance(value, str):
                yield Access("url", value, path + (key,))
            elif isinstance(value, dict | list):
                yield from _walk(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, path + (index,))


def local_accesses(definition: Mapping) -> list[Access]:
    """The accesses of the job that reach the worker itself, as far as its text tells (file URLs,
    local git repositories, addresses written as numbers, localhost names): what a worker's policy
    must allow for the job to run there."""
    return [access for access in accesses(definition) if target(access) is not None]


# ---- what an access reaches ----

def scheme_of(url: str) -> str:
    """The scheme of ``url`` ("" when it is not a URL at all)."""
    try:
        return urlsplit(url).scheme
    except ValueError:
        return ""


def file_path(url: str) -> str:
    """The path a ``file://`` URL names on the worker, as the download opens it (the URL's path,
    not unquoted: LAVA opens it so too)."""
    return urlsplit(url).path


def git_kind(repository: str) -> str:
    """How git reads ``repository``, by git's own rules (transport.c, connect.c): ``helper``
    (``transport::address``, a remote helper), ``url`` (``scheme://...``), ``scp``
    (``[user@]host:path`` over ssh: a colon before any slash) or ``path`` (a local path)."""
    if re.match(_GIT_HELPER, repository):
        return "helper"
    if re.match(_URL_SCHEME, repository):
        return "url"
    if ":" in repository.split("/", 1)[0]:
        return "scp"
    return "path"


#: git's URL scheme characters (is_urlschemechar), before "::" (a helper) or "://" (a URL)
_GIT_HELPER = r"[A-Za-z0-9][A-Za-z0-9+.-]*::"
_URL_SCHEME = r"[A-Za-z0-9][A-Za-z0-9+.-]*://"


def host_of(access: Access) -> tuple[str, int | None] | None:
    """The host and port a network access connects to (None for a local file or path)."""
    location = access.location
    if access.kind == "git" and git_kind(location) == "scp":
        if not location.startswith("["):
            return location.split(":", 1)[0].rpartition("@")[2].lower(), 22
        # [user@host:port]:path or [::1]:path
        inner = location[1:location.find("]")].rpartition("@")[2] if "]" in location else ""
        host, port = inner, 22
        if inner.count(":") == 1:
            host, _, number = inner.partition(":")
            port = int(number) if number.isdigit() else 22
        return host.lower(), port
    try:
        parts = urlsplit(location)
        port = parts.port
    except ValueError:  # not a URL that anything could connect to
        return None
    if parts.scheme == "file" or not parts.netloc:
        return None
    return (parts.hostname or "").lower(), port or DEFAULT_PORTS.get(parts.scheme)


def literal_addresses(host: str) -> tuple[Address, ...] | None:
    """The addresses ``host`` means without asking a resolver: an IP literal in any form the C
    library accepts (``127.1``, ``0x7f000001``, ``2130706433``, ``[::ffff:127.0.0.1]``), or a
    localhost name (127.0.0.1 and ::1). None for a name only a resolver can answer."""
    host = host.strip("[]").rstrip(".").lower()
    if host in LOCALHOST_NAMES or host.endswith(".localhost"):
        return (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
    if ":" in host:
        try:
            return (_plain(ipaddress.ip_address(host)),)
        except ValueError:
            return None
    if host and set(host) <= frozenset("0123456789abcdefx.") and host[0].isdigit():
        import socket

        try:  # inet_aton's forms are what getaddrinfo (and so urllib and git) connect to
            return (ipaddress.ip_address(socket.inet_aton(host)),)
        except OSError:
            return None
    return None


def _plain(address: Address) -> Address:
    """An IPv4-mapped IPv6 address as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def local_kind(address: Address) -> str | None:
    """What ``address`` is on any host (loopback, link-local, unspecified), or None."""
    address = _plain(address)
    for network, what in LOCAL_NETWORKS:
        if address.version == network.version and address in network:
            return what
    return None


def target(access: Access) -> Target | None:
    """What ``access`` reaches on the worker itself, as far as its text tells; None: nothing."""
    if access.kind == "file":
        return Target(file=access.location)
    kind = git_kind(access.location) if access.kind == "git" else "url"
    if kind in ("path", "helper"):  # a helper is refused whatever the directories (FilePolicy.reason)
        return Target(file=access.location)
    if kind == "url" and scheme_of(access.location) == "file":
        return Target(file=file_path(access.location))
    where = host_of(access)
    if where is None:
        return None
    host, port = where
    addresses = literal_addresses(host)
    if addresses is None or not any(local_kind(a) for a in addresses):
        return None
    return Target(addresses=tuple(a for a in addresses if local_kind(a)), port=port)


# ---- the policy ----

class Reason(NamedTuple):
    """Why a policy refuses an access: what it reaches, and the key that would allow it (None: no
    setting allows it)."""

    what: str
    key: str | None = None

    def message(self, policy: FilePolicy) -> str:
        """The refusal on a worker with ``policy``."""
        if self.key is None:
            return f"{REFUSED}: {self.what}"
        return (f"{REFUSED}: {self.what}; {self.key} ({policy.values(self.key)}) of the worker's dispatcher "
                "configuration does not allow it")


@dataclass(frozen=True)
class FilePolicy:
    """A worker's file policy (see the module's docstring), from its dispatcher configuration."""

    #: directories (as written) under which files and local git repositories may be read
    dirs: tuple[str, ...] = ()
    #: (network, port or None) pairs the worker's own addresses may be reached at
    addresses: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None], ...] = ()

    @classmethod
    def from_dispatcher(cls, config: Mapping | None) -> FilePolicy:
        """The policy of a dispatcher configuration; ValueError naming the key for a bad value."""
        config = config or {}
        dirs = config.get(DIRS_KEY) or []
        if not isinstance(dirs, list) or not all(isinstance(d, str) and d.startswith("/") for d in dirs):
            raise ValueError(f"{DIRS_KEY}: a list of absolute directories, e.g. [/srv/lava-images]")
        entries = config.get(ADDRESSES_KEY) or []
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError(f"{ADDRESSES_KEY}: a list of addresses, networks or address:port, "
                             "e.g. [127.0.0.1:8080, '[::1]:8080', 169.254.169.254]")
        return cls(tuple(dirs), tuple(_address_entry(entry) for entry in entries))

    # -- the checks (static: from the job's text) -----------------------------------------------------
    def refusal(self, access: Access, resolve: bool = False) -> str | None:
        """Why ``access`` is refused (a message starting with :data:`REFUSED`), or None. With
        ``resolve`` (on the worker), file paths are compared with their symlinks resolved."""
        reason = self.reason(access, resolve)
        return reason.message(self) if reason else None

    def allows_all(self, found: Iterable[Access]) -> bool:
        """Whether every access in ``found`` is allowed (without resolving: the master's view)."""
        return all(self.reason(access, False) is None for access in found)

    def reason(self, access: Access, resolve: bool = False) -> Reason | None:
        """What ``access`` reaches that this policy does not allow, and the setting that would."""
        if access.kind == "git" and git_kind(access.location) == "helper":
            return Reason(f"{access.location} uses a git remote helper ('transport::address'), which is "
                          "never allowed: give the repository as a URL")
        if scheme_of(access.location) == "file" and urlsplit(access.location).netloc not in ("", "localhost"):
            return Reason(f"{access.location} names another host: a file URL names a file of this worker "
                          "(file:///path)")
        where = target(access)
        if where is None:
            return None
        if where.file is not None:
            return self.file_reason(access.via or access.location, where.file, resolve)
        for address in where.addresses:
            if self.allows_address(address, where.port):
                return None
        address = where.addresses[0]
        return self.address_reason(access.location, address, where.port, local_kind(address) or OWN_ADDRESS)

    def file_reason(self, location: str, path: str, resolve: bool) -> Reason | None:
        """Why reading ``path`` (named by ``location``) is refused, or None when it is allowed."""
        if resolve:
            real = os.path.realpath(path)
        else:  # on the master: ``..`` removed; a relative path leads where only the worker can tell
            real = posixpath.normpath("/" + path.lstrip("/")) if path.startswith("/") else path
        dirs = [os.path.realpath(d) if resolve else posixpath.normpath(d) for d in self.dirs]
        if any(real == d or real.startswith(d.rstrip("/") + "/") for d in dirs):
            return None
        return Reason(f"{location} reads {real} on the worker", DIRS_KEY)

    def allows_address(self, address: Address, port: int | None) -> bool:
        address = _plain(address)
        return any(address.version == network.version and address in network
                   and (allowed is None or allowed == port) for network, allowed in self.addresses)

    def address_reason(self, location: str, address: Address, port: int | None, what: str) -> Reason:
        at = str(address) if port is None else f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        return Reason(f"{location} reaches {at}, {what} of the worker", ADDRESSES_KEY)

    def values(self, key: str) -> str:
        """What this policy sets ``key`` to, as refusals show it (``none set`` when empty)."""
        values = self.dirs if key == DIRS_KEY else [_entry_text(n, p) for n, p in self.addresses]
        return ", ".join(values) if values else "none set"

    # -- at fetch time (on the worker) -------------------------------------------------------------------
    def open_file(self, url: str) -> BinaryIO:
        """Open the file a ``file://`` URL names, for reading, if the file actually opened lies under
        an allowed directory (checked on the open descriptor: no race with a symlink swapped in);
        PolicyRefusal otherwise, OSError when it cannot be opened."""
        if scheme_of(url) != "file":
            raise PolicyRefusal(f"{REFUSED}: {url} is not a file URL")
        refusal = self.refusal(Access("url", url), resolve=True)  # a clear message before touching it
        if refusal:
            raise PolicyRefusal(refusal)
        handle = open(file_path(url), "rb")  # noqa: SIM115 (returned to the caller)
        try:
            opened = os.readlink(f"/proc/self/fd/{handle.fileno()}")
        except OSError:  # no /proc: the resolved path was checked above
            return handle
        reason = self.file_reason(url, opened, resolve=True)
        if reason:
            handle.close()
            raise PolicyRefusal(reason.message(self))
        return handle

    def check_address(self, url: str, sockaddr: tuple) -> None:
        """PolicyRefusal if ``sockaddr`` (a ``getaddrinfo`` answer for ``url``'s host) is the worker
        itself and not allowed."""
        address = _plain(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
        what = local_kind(address) or (OWN_ADDRESS if own_address(address) else None)
        if what is not None and not self.allows_address(address, sockaddr[1]):
            raise PolicyRefusal(self.address_reason(url, address, sockaddr[1], what).message(self))

    def connect(self, url: str, address: tuple[str, int], timeout: Any = None,
                source_address: tuple | None = None) -> socket.socket:
        """A TCP connection for ``url`` to ``address`` (host, port), as ``socket.create_connection``
        makes one, but only to an address this policy allows: the host is resolved here, each
        address checked before it is tried, and the connection goes to that very address (no second
        lookup: DNS rebinding has nothing to answer). A refused address is never contacted, so
        whether something listens there does not show either."""
        import socket

        host, port = address
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            self.check_address(url, sockaddr)
            sock = socket.socket(family, kind, proto)
            try:
                if isinstance(timeout, int | float):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                error = exc
                sock.close()
        raise error or OSError(f"{host} has no address")

    def resolve_host(self, access: Access) -> list[Address]:
        """The addresses the host of a network ``access`` resolves to now, each checked (as at a
        connection): PolicyRefusal for one that is the worker itself and not allowed. Empty when
        the name does not resolve (the tool that connects says so)."""
        where = host_of(access)
        if where is None or not where[0]:
            return []
        host, port = where
        import socket

        try:
            infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return []
        found: list[Address] = []
        for *_, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            self.check_address(access.location, (str(address), port))
            if address not in found:
                found.append(address)
        return found


def own_address(address: Address) -> bool:
    """Whether ``address`` is one of this host's own: a socket can be bound to it (unless the host
    lets sockets bind any address, ``ip_nonlocal_bind``: then only loopback, link-local and the
    unspecified address are known to be its own)."""
    if _binds_anything(address.version):
        return False
    import socket

    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


@functools.cache
def _binds_anything(version: int) -> bool:
    try:
        with open(f"/proc/sys/net/ipv{version}/ip_nonlocal_bind") as sysctl:
            return sysctl.read().strip() != "0"
    except OSError:
        return False


def _address_entry(entry: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]:
    """``127.0.0.1``, ``127.0.0.0/8``, ``::1``, ``127.0.0.1:8080``, ``[::1]:8080`` -> (network, port)."""
    text, port = entry.strip(), None
    if text.startswith("["):
        text, _, rest = text[1:].partition("]")
        if rest:
            port = rest.removeprefix(":")
    elif text.count(":") == 1:
        text, port = text.split(":")
    try:
        network = ipaddress.ip_network(text, strict=False)
        number = int(port) if port is not None else None
    except ValueError:
        raise ValueError(f"{ADDRESSES_KEY}: {entry!r} is not an address, a network or address:port "
                         "(e.g. 127.0.0.1:8080, '[::1]:8080', 127.0.0.0/8)") from None
    if number is not None and not 0 < number < 65536:
        raise ValueError(f"{ADDRESSES_KEY}: {entry!r}: the port must be 1-65535")
    return network, number


def _entry_text(network: ipaddress.IPv4Network | ipaddress.IPv6Network, port: int | None) -> str:
    single = network.num_addresses == 1
    text = str(network.network_address) if single else str(network)
    if port is None:
        return text
    return f"[{text}]:{port}" if network.version == 6 else f"{text}:{port}"


def inside(folder: os.PathLike | str, relative: str, what: str) -> str:
    """``folder/relative`` with symlinks and ``..`` resolved, if it stays inside ``folder`` (a test
    definition's ``path`` in its repository); PolicyRefusal otherwise."""
    root = os.path.realpath(folder)
    real = os.path.realpath(os.path.join(root, relative))
    if real != root and not real.startswith(root.rstrip("/") + "/"):
        raise PolicyRefusal(f"{REFUSED}: {what} {relative!r} leads out of its repository (to {real})")
    return real
