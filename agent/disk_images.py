"""What a disk image names: the files QEMU opens because an image's header says so (a qcow2 or QED
backing file, a qcow2 external data file, VMDK extents and parents), read from the headers
without QEMU, so that the worker's file policy (:mod:`agent.qemu_policy`) can judge them."""

from __future__ import annotations

import re
import struct

_EXTENT = re.compile(r'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+(?:\s+"([^"]*)")?', re.MULTILINE)
_PARENT = re.compile(r'^\s*parentFileNameHint\s*=\s*"([^"]*)"', re.MULTILINE)
#: how much of a VMDK text descriptor is read
DESCRIPTOR_BYTES = 1 << 20


def image_references(path: str, image_format: str = "") -> list[str]:
    """The files QEMU opens because the disk image at ``path`` names them, as written: a qcow or
    qcow2 image's backing file and external data file, a QED image's backing file, a VMDK's
    extents and parent. ``image_format`` is the format the command line gives (empty: QEMU
    probes, and so does this function by the image's magic). ValueError for a header that
    cannot be read (QEMU refuses it too)."""
    with open(path, "rb") as image:
        head = image.read(512)
        if image_format in ("", "qcow", "qcow2") and head.startswith(b"QFI\xfb"):
            return _qcow_references(image, head)
        if image_format in ("", "qed") and head.startswith(b"QED\x00"):
            features, = struct.unpack_from("<Q", head, 16)
            offset, size = struct.unpack_from("<II", head, 56)
            return [_name(image, offset, size)] if features & 1 else []
        if image_format in ("", "vmdk"):
            if head.startswith(b"KDMV"):
                offset, size = struct.unpack_from("<QQ", head, 28)
                image.seek(offset * 512)
                text = image.read(min(size * 512, DESCRIPTOR_BYTES)).decode("utf-8", "replace")
                return _PARENT.findall(text)  # a sparse VMDK is its own extent
            if head.startswith(b"# Disk DescriptorFile") or image_format == "vmdk" and not head.startswith(b"COWD"):
                image.seek(0)
                text = image.read(DESCRIPTOR_BYTES).decode("utf-8", "replace")
                return [name for name in _EXTENT.findall(text) if name] + _PARENT.findall(text)
    return []


def _qcow_references(image: object, head: bytes) -> list[str]:
    version, backing_offset, backing_size, cluster_bits = struct.unpack_from(">IQII", head, 4)
    found = [_name(image, backing_offset, backing_size)] if backing_offset else []
    if version >= 3:
        header_length, = struct.unpack_from(">I", head, 100)
        offset, end = header_length, 1 << min(max(cluster_bits, 9), 21)
        image.seek(offset)
        extensions = image.read(end - offset)
        position = 0
        while position + 8 <= len(extensions):
            kind, length = struct.unpack_from(">II", extensions, position)
            if kind == 0:
                break
            if kind == 0x44415441:  # "DATA": the external data file
                found.append(extensions[position + 8:position + 8 + length].decode("utf-8", "surrogateescape"))
            position += 8 + (length + 7) // 8 * 8
    return found


def _name(image: object, offset: int, size: int) -> str:
    if size > 4096:
        raise ValueError("a backing file name longer than 4096 bytes")
    image.seek(offset)
    return image.read(size).decode("utf-8", "surrogateescape")
