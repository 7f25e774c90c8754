"""A minimal ONC RPC client (RFC 5531) for what the agent asks an NFS server: is the portmapper
there, which port serves a program, does NFS answer in version 3 (LAVA's ``rpcinfo -u HOST nfs 3``),
does MOUNT hand out a file handle for a path (an export is mountable), which paths are exported.

No library and no ``rpcinfo``/``showmount`` binary needed: a few XDR words over TCP or UDP, each
call bounded by a timeout. Only the NULL, GETPORT, MNT, UMNT and EXPORT procedures are spoken.
"""

from __future__ import annotations

import os
import socket
import struct
import time

PORTMAPPER, PORTMAPPER_PORT = 100000, 111
NFS, MOUNT = 100003, 100005
_CALL, _REPLY, _ACCEPTED = 0, 1, 0
_AUTH_NONE, _AUTH_SYS = 0, 1
#: MOUNT v3 status names (RFC 1813)
MOUNT_STATUS = {0: "OK", 1: "PERM", 2: "NOENT", 5: "IO", 13: "ACCES", 20: "NOTDIR", 22: "INVAL",
                63: "NAMETOOLONG", 10004: "NOTSUPP", 10006: "SERVERFAULT"}
#: the largest reply read (an export list of a busy server fits many times over)
MAX_REPLY = 1 << 20


class RpcError(OSError):
    """The server did not answer, or answered with an RPC-level error."""


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value + b"\0" * (-len(value) % 4)


def _auth_sys() -> bytes:
    body = struct.pack(">I", int(time.time()) & 0xFFFFFFFF) + _string(b"pumice") + struct.pack(">III", 0, 0, 0)
    return struct.pack(">I", _AUTH_SYS) + _string(body)


def call(host: str, port: int, program: int, version: int, procedure: int, args: bytes = b"",
         proto: str = "tcp", timeout: float = 5.0, auth: bool = False) -> bytes:
    """One RPC call; returns the procedure's result bytes (after the accepted-reply header)."""
    xid = int.from_bytes(os.urandom(4), "big")
    cred = _auth_sys() if auth else struct.pack(">II", _AUTH_NONE, 0)
    message = struct.pack(">IIIIII", xid, _CALL, 2, program, version, procedure) + cred
    message += struct.pack(">II", _AUTH_NONE, 0) + args
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(family, kind) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            if proto == "tcp":
                sock.sendall(struct.pack(">I", 0x80000000 | len(message)) + message)
                reply = _read_record(sock, deadline)
            else:
                sock.send(message)
                reply = sock.recv(65536)
    except OSError as exc:
        raise RpcError(f"{host}:{port}/{proto}: {exc.strerror or exc}") from None
    return _accepted(reply, xid, f"{host}:{port}/{proto}")


def _read_record(sock: socket.socket, deadline: float) -> bytes:
    record = b""
    while True:
        header = _read_exactly(sock, 4, deadline)
        (mark,) = struct.unpack(">I", header)
        size = mark & 0x7FFFFFFF
        if len(record) + size > MAX_REPLY:
            raise RpcError(f"RPC reply larger than {MAX_REPLY} bytes")
        record += _read_exactly(sock, size, deadline)
        if mark & 0x80000000:
            return record


def _read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RpcError("connection closed in the middle of an RPC reply")
        data += chunk
    return data


def _accepted(reply: bytes, xid: int, where: str) -> bytes:
    try:
        rxid, kind, state = struct.unpack_from(">III", reply)
        if rxid != xid or kind != _REPLY:
            raise RpcError(f"{where}: not the reply to our call")
        if state != _ACCEPTED:
            raise RpcError(f"{where}: call rejected (reply state {state})")
        _flavor, length = struct.unpack_from(">II", reply, 12)
        offset = 20 + length + (-length % 4)
        (status,) = struct.unpack_from(">I", reply, offset)
    except struct.error:
        raise RpcError(f"{where}: truncated RPC reply") from None
    if status != 0:
        names = {1: "program unavailable", 2: "program version mismatch", 3: "procedure unavailable",
                 4: "garbage arguments", 5: "system error"}
        raise RpcError(f"{where}: {names.get(status, f'accept status {status}')}")
    return reply[offset + 4:]


def getport(host: str, program: int, version: int, proto: str = "tcp", timeout: float = 5.0) -> int:
    """The port the portmapper (rpcbind) gives for a program; 0 when it is not registered."""
    protocol = 6 if proto == "tcp" else 17
    result = call(host, PORTMAPPER_PORT, PORTMAPPER, 2, 3, struct.pack(">IIII", program, version, protocol, 0),
                  timeout=timeout)
    return struct.unpack(">I", result[:4])[0]


def ping(host: str, program: int, version: int, proto: str = "udp", timeout: float = 5.0) -> None:
    """The NULL procedure of a program through the portmapper, as ``rpcinfo -u|-t HOST PROG VERS``
    does; raises RpcError saying what is missing."""
    port = getport(host, program, version, proto, timeout)
    if not port:
        raise RpcError(f"{host}: program {program} version {version} is not registered over {proto} "
                       "with the portmapper")
    call(host, port, program, version, 0, proto=proto, timeout=timeout)


def mount(host: str, path: str, timeout: float = 5.0) -> bytes:
    """MOUNT v3 MNT of ``path`` (then UMNT): the root file handle the server hands out; raises
    RpcError with the MOUNT status when it refuses (``ACCES``: not exported to us, ``NOENT``...)."""
    port = getport(host, MOUNT, 3, "tcp", timeout)
    if not port:
        raise RpcError(f"{host}: MOUNT version 3 is not registered with the portmapper")
    result = call(host, port, MOUNT, 3, 1, _string(path.encode()), timeout=timeout, auth=True)
    (status,) = struct.unpack_from(">I", result)
    if status != 0:
        raise RpcError(f"{host}:{path}: MOUNT refused: MNT3ERR_{MOUNT_STATUS.get(status, status)}")
    (length,) = struct.unpack_from(">I", result, 4)
    handle = result[8 : 8 + length]
    call(host, port, MOUNT, 3, 3, _string(path.encode()), timeout=timeout, auth=True)  # UMNT
    return handle


def exports(host: str, timeout: float = 5.0) -> list[str]:
    """The paths the server's MOUNT EXPORT procedure lists (``showmount -e``)."""
    port = getport(host, MOUNT, 3, "tcp", timeout)
    if not port:
        raise RpcError(f"{host}: MOUNT version 3 is not registered with the portmapper")
    data = call(host, port, MOUNT, 3, 5, timeout=timeout)
    paths, offset = [], 0
    try:
        while struct.unpack_from(">I", data, offset)[0]:
            (length,) = struct.unpack_from(">I", data, offset + 4)
            paths.append(data[offset + 8 : offset + 8 + length].decode(errors="replace"))
            offset += 8 + length + (-length % 4)
            while struct.unpack_from(">I", data, offset)[0]:  # the groups of this export
                (length,) = struct.unpack_from(">I", data, offset + 4)
                offset += 8 + length + (-length % 4)
            offset += 4
    except struct.error:
        raise RpcError(f"{host}: truncated MOUNT export list") from None
    return paths
