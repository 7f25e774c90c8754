"""What a compressed archive says of itself before it is read: its compression (the magic its
stream starts with) and, where the format declares it, its uncompressed size (so an extraction
can refuse an archive that cannot fit before it writes a byte)."""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

#: how each compressed stream starts (used when the job gives no ``compression``)
MAGIC: dict[str, bytes] = {
    "gz": b"\x1f\x8b",
    "bz2": b"BZh",
    "xz": b"\xfd7zXZ\x00",
    "zstd": b"\x28\xb5\x2f\xfd",
}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad xz varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return value, pos


def declared_size(head: bytes, source: BinaryIO | None, compression: str | None) -> int | None:
    """The uncompressed size the archive declares, as a lower bound, where the format says it
    before the data (zstd's frame header) or the source is a seekable file (xz's index, gzip's
    ISIZE, read from the end and put back); None when nothing says it."""
    try:
        if compression == "zstd" and len(head) >= 6 and head[:4] == MAGIC["zstd"]:
            fhd = head[4]
            fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
            did = {0: 0, 1: 1, 2: 2, 3: 4}[fhd & 3]
            size_len = {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[fcs_flag]
            if not size_len:
                return None
            offset = 5 + (0 if single else 1) + did
            raw = head[offset : offset + size_len]
            if len(raw) != size_len:
                return None
            value = int.from_bytes(raw, "little")
            return value + 256 if size_len == 2 else value
        if source is None or not _seekable(source):
            return None
        here = source.tell()
        try:
            end = source.seek(0, os.SEEK_END)
            if compression == "gz" and end >= 18:
                source.seek(end - 4)
                return struct.unpack("<I", source.read(4))[0]  # modulo 2**32: a lower bound
            if compression == "xz" and end >= 32:
                source.seek(end - 12)
                footer = source.read(12)
                if footer[10:12] != b"YZ":
                    return None
                index_size = (struct.unpack("<I", footer[4:8])[0] + 1) * 4
                if index_size > min(end, 16 << 20):
                    return None
                source.seek(end - 12 - index_size)
                index = source.read(index_size)
                if index[:1] != b"\0":
                    return None
                records, pos = _varint(index, 1)
                total = 0
                for _ in range(min(records, 1 << 20)):
                    _unpadded, pos = _varint(index, pos)
                    size, pos = _varint(index, pos)
                    total += size
                return total  # of the last stream: a lower bound for concatenated ones
            return None
        finally:
            source.seek(here)
    except (OSError, ValueError, KeyError, struct.error):
        return None


def _seekable(source: BinaryIO) -> bool:
    try:
        return bool(source.seekable())
    except (AttributeError, OSError, ValueError):
        return False
