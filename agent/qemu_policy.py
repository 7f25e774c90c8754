"""The worker's file policy on QEMU's command line: what a job may have QEMU read, write or run.

QEMU runs as root on the worker, and its options reach far beyond the board: ``-kernel /etc/shadow``
or ``-drive file=/etc/shadow`` put a file of the worker into the guest, ``-serial file:/etc/passwd``
or ``-pidfile`` overwrite one, ``-netdev tap,script=...``, ``guestfwd=...-cmd:...`` and ``-incoming
exec:...`` run commands, ``-device vfio-pci``/``usb-host`` hand the worker's hardware to the guest,
``-chardev socket`` reaches its local services. LAVA 2023.01 runs whatever a job writes; Pumice
judges the command line it builds against the worker's file policy (:mod:`agent.policy`).

**Who wrote what.** The command line has three authors:

- the device's own configuration: what the lab admin's device-type template and device dictionary
  render to (the qemu boot method's ``command``, ``options`` and ``extra``, the guest disk's
  ``interface`` and ``driveid``);
- the job's ``context:``: the master renders the device configuration with it, so each variable the
  template uses (``machine``, ``cpu``, ``memory``, ``netdevice``, ``model``, ``monitor``,
  ``extra_options``, ``guestfs_*``...) can change or add options, and a line break in a value can
  add whole keys (another ``command``);
- the job's images: each ``image_arg``, its ``{key}`` filled with the file the job deployed.

The master renders the device's dictionary twice: with the job's context, and without it (but for
``arch`` when it is one of the device's ``available_architectures``: the admin's template handles
each of those), and sends both to the worker (``pumice-run --device-own``). The command line is
cut into groups as QEMU reads it (an option and its argument; an argument that is no option is a
disk image). A group of the device's configuration that the configuration without the context
has too is the device's own and passes as written. Every other group is the job's and is judged
here, deny by default:

- an option this module does not know (QEMU 7.2's, Debian 12) is refused;
- a file an option reads (``-kernel``, ``-initrd``, ``-dtb``, ``-bios``, ``-L``, ``-cdrom``,
  ``romfile=``, ``-fw_cfg file=``, ``-machine kernel=``, ``-netdev user,tftp=``...) must be one the
  job deployed (in its scratch directory) or lie under ``allowed_file_dirs``; the master then
  schedules the job only on workers that allow it, as for ``file://`` URLs;
- a file QEMU writes (``-pidfile``, ``-D``, ``-trace file=``, ``logfile=``, a disk image:
  ``-drive``, ``-hda``, ``-pflash``... unless ``readonly=on``, ``snapshot=on`` or ``-snapshot``) must
  be one the job deployed;
- a disk image the job deployed may itself name files QEMU opens (a qcow2 or QED backing file or
  external data file, VMDK extents and parents): when the job runs, each is judged as a file the
  image reads (``..`` and symlinks resolved, relative to the image as QEMU resolves it);
- QEMU runs in the job's scratch directory: a relative path names a file there; a block protocol
  (``nbd:``, ``http:``, ``fat:``, ``json:``...) is refused;
- what runs commands or reaches beyond files (``exec:``, tap and bridge networks with their
  scripts and helpers, ``guestfwd``, sockets, pipes, files and serial ports as character devices,
  ``-incoming``, ``-readconfig``, ``-plugin``, ``-daemonize``, ``-runas``, ``-chroot``,
  ``-sandbox``, ``-add-fd``, ``-set``, semihosting, host devices passed through, vhost, 9p shares,
  VNC and SPICE servers, sound systems...) is refused: no setting allows it; a lab that wants it
  puts it in the device dictionary;
- the QEMU program must be the device's own.

A kernel command line (``-append``) and plain settings (``-m``, ``-smp``, ``-cpu``, a machine type,
``-device`` front ends, ``-nographic``, ``-netdev user``...) pass.

This module only judges (its only I/O: ``realpath`` and the headers of the job's disk images, read
by :mod:`agent.disk_images`); :mod:`agent.actions.boot.qemu` builds the command line and applies
the verdict: the master at submission, ``pumice-run`` when it validates, ``execute-qemu`` before it
starts QEMU. Refusals start with :data:`agent.policy.REFUSED`.
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

from agent.disk_images import image_references
from agent.policy import REFUSED, Access, FilePolicy

#: files any job may have QEMU read (randomness, nothing)
HARMLESS_READS = frozenset({"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"})
#: QEMU's words for "on" (qapi_bool_parse)
ON = frozenset({"on", "yes", "true", "y"})
#: how long an option's text may be in a refusal
SHOWN = 160
#: how many images deep a chain of backing files is followed (QEMU gives up before)
CHAIN_DEPTH = 16
#: the job's scratch directory while nothing is deployed yet (validation): a name no job can
#: guess, so that only the files the job will deploy lie in it
PLACEHOLDER_ROOT = f"/pumice-job-{os.urandom(8).hex()}"


class Use(NamedTuple):
    """What a group makes QEMU do on the worker with ``value``: ``read`` a file, ``write`` one, open a
    disk image (``disk``: read and write unless the command line has ``-snapshot``; ``rw``: read and
    write whatever it has; ``media``: read only), or ``refuse`` (``value`` says why). ``format`` is
    a disk image's, when the option says."""

    kind: str
    value: str
    format: str = ""


class Part(NamedTuple):
    """Arguments of QEMU's command line from one author."""

    tokens: tuple[str, ...]
    #: where the job sets them (a YAML path), named in refusals: an ``image_arg``, or ``context``
    path: tuple
    #: the job's whatever they say (an ``image_arg``); otherwise the job's where the device's own
    #: configuration has no such group
    job: bool = False


class Verdict(NamedTuple):
    """The policy on a QEMU command line: ``refusals`` (YAML path, message) whatever the worker
    allows, and ``reads``: files outside the job's own that QEMU reads (allowed where the worker's
    ``allowed_file_dirs`` allow them)."""

    refusals: list[tuple[tuple, str]]
    reads: list[Access]


# ---- an option's argument as QEMU reads it ----

def items(text: str, implied: str | None = None) -> list[tuple[str, str]] | None:
    """The ``key=value`` items of an option's argument as QEMU reads them (QemuOpts and keyval):
    ``,,`` is a comma in a value; a first item without ``=`` is the value of ``implied``; another
    is a flag (``key`` is ``key=on``, ``nokey`` is ``key=off``). The JSON form (``{...}``) gives
    its keys joined with dots. None when the JSON does not parse (QEMU refuses it too)."""
    if text.lstrip().startswith("{"):
        try:
            return list(_flatten(json.loads(text), ""))
        except (ValueError, RecursionError):
            return None
    found: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in ",=":
            j += 1
        if j < n and text[j] == "=":
            key, k = text[i:j], j + 1
        elif not found and implied:
            key, k = implied, i
        else:
            name = text[i:j]
            if name:
                found.append((name[2:], "off") if name.startswith("no") else (name, "on"))
            i = j + 1
            continue
        value = []
        while k < n and not (text[k] == "," and text[k + 1:k + 2] != ","):
            value.append(text[k])
            k += 2 if text[k] == "," else 1  # ",," is one comma
        found.append((key, "".join(value)))
        i = k + 1
    return found


def _flatten(node: object, prefix: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _flatten(value, f"{prefix}.{index}")
    elif isinstance(node, bool):
        yield prefix, "on" if node else "off"
    else:
        yield prefix, "" if node is None else str(node)


def has_protocol(filename: str) -> bool:
    """Whether QEMU's block layer reads ``filename`` as ``protocol:...`` (nbd:, http:, json:, fat:...;
    block.c, path_has_protocol): a colon before any slash."""
    return ":" in filename.split("/", 1)[0]


# ---- the judges: what the argument of each option does ----

Judge = Callable[[str], Iterable[Use]]
BAD_JSON = Use("refuse", "cannot be read as QEMU reads it (bad JSON)")


def refuse(why: str) -> Judge:
    """A judge that refuses the option whatever its argument."""
    return lambda argument: [Use("refuse", why)]


def path_of(kind: str) -> Judge:
    """A judge for an option whose argument is a file QEMU reads or writes."""
    return lambda argument: [Use(kind, argument)]


def disk_of(kind: str) -> Judge:
    """A judge for an option whose argument is a disk image (``-hda``, ``-cdrom``...): a file, or a
    block protocol (refused)."""
    return lambda argument: [protocol_refusal(argument) if has_protocol(argument) else Use(kind, argument)]


def protocol_refusal(value: str) -> Use:
    return Use("refuse", f"names {value!r}, a QEMU block protocol (json:, nbd:, http:, fat:...), which reaches "
                         "beyond the job's files")


def settings(found: list[tuple[str, str]], kinds: dict[str, str], refused: dict[str, str] | None = None,
             skip: str | None = None) -> Iterator[Use]:
    """The uses of ``key=value`` settings: a key of ``kinds`` (its last dotted part) names a file of
    that kind, a key of ``refused`` is refused (value: why), any other value that is an absolute
    path is a file QEMU reads."""
    for key, value in found:
        last = key.rsplit(".", 1)[-1]
        if key == skip:
            continue
        if refused and last in refused:
            yield Use("refuse", refused[last])
        elif last in kinds:
            yield Use(kinds[last], value)
        elif value.startswith("/"):
            yield Use("read", value)


def keyval(implied: str | None = None, kinds: dict[str, str] | None = None,
           types: dict[str, dict[str, str]] | None = None, refused: dict[str, str] | None = None,
           what: str = "") -> Judge:
    """A judge for ``key=value`` settings (see :func:`settings`). With ``types``, the setting
    ``implied`` names a type (``-netdev user``, ``-object rng-random``) that must be one of them, each
    with its own ``kinds``."""

    def judge(argument: str) -> Iterator[Use]:
        found = items(argument, implied)
        if found is None:
            yield BAD_JSON
            return
        own = dict(kinds or {})
        if types is not None:
            kind = next((value for key, value in found if key == implied), "")
            if kind not in types:
                yield Use("refuse", f"uses {what} {kind or argument.split(',', 1)[0]!r}, which reaches beyond the "
                                    f"board and the job's files (a job may use: {', '.join(sorted(types))})")
                return
            own.update(types[kind])
        yield from settings(found, own, refused, skip=implied if types is not None else None)

    return judge


#: block drivers a job may name: formats, filters and the file protocol. The others reach beyond a
#: file: host devices, network protocols (nbd, http, ssh, iscsi...), vvfat directories, blkdebug's
#: rule files...
BLOCK_DRIVERS = frozenset({
    "raw", "qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc", "parallels", "bochs", "cloop", "dmg",
    "luks", "file", "throttle", "copy-on-read", "preallocate", "compress", "null-co", "null-aio"})
BLOCK_USE = (f"a job may use: {', '.join(sorted(BLOCK_DRIVERS))}; the others reach beyond a file: host devices, "
             "network protocols, directories")


def drive(blockdev: bool) -> Judge:
    """``-drive`` and ``-blockdev``: their block drivers, and the files they open (disk images,
    written unless read-only)."""

    def judge(argument: str) -> Iterator[Use]:
        found = items(argument)
        if found is None:
            yield BAD_JSON
            return
        flags = dict(found)
        said = {key: flags[key] in ON for key in ("read-only", "readonly", "snapshot") if key in flags}
        # a CD-ROM is read-only unless said otherwise; -snapshot protects a -drive that says nothing
        readonly = any(said.values()) or flags.get("media") == "cdrom" and not said
        kind = "media" if readonly else "rw" if blockdev or "snapshot" in said else "disk"
        image_format = flags.get("format") or flags.get("driver", "")
        for key, value in found:
            last = key.rsplit(".", 1)[-1]
            if last in ("driver", "format"):
                if value not in BLOCK_DRIVERS:
                    yield Use("refuse", f"uses the block driver {value!r}, not one a job may use ({BLOCK_USE})")
            elif key == "file" and not blockdev and has_protocol(value):
                yield protocol_refusal(value)
            elif (key == "file" and not blockdev) or last == "filename" or value.startswith("/"):
                yield Use(kind, value, image_format if key in ("file", "filename") else "")

    return judge


#: parts of -device driver names that pass the worker's own hardware or kernel devices to the board
HOST_DEVICES = ("vfio", "vhost", "usb-host", "passthru", "passthrough", "pci-assign", "virtio-input-host",
                "ivshmem", "xen")
#: -device and -global properties that pick a device of the worker
HOST_KEYS = {key: f"{key}= picks a device of the worker" for key in (
    "host", "hostbus", "hostaddr", "hostport", "hostdevice", "sysfsdev", "evdev", "hidraw", "fd", "fds",
    "vhostfd", "vhostfds", "guest-cid")}
#: -device and -global properties that name a file QEMU reads (a ROM, the loader's file)
DEVICE_FILES = {"romfile": "read", "file": "read", "filename": "read"}


def device(argument: str) -> Iterator[Use]:
    """``-device``: a front end, unless it passes the worker's hardware through; its ROM and files."""
    found = items(argument, "driver")
    if found is None:
        yield BAD_JSON
        return
    name = next((value for key, value in found if key == "driver"), "")
    if any(part in name for part in HOST_DEVICES):
        yield Use("refuse", f"{name} passes the worker's own hardware or kernel devices to the board")
    yield from settings(found, DEVICE_FILES, HOST_KEYS, skip="driver")


def global_property(argument: str) -> Iterator[Use]:
    """``-global driver.property=value`` or ``-global driver=D,property=P,value=V``: a default of
    every device of a type, judged as the device's own setting."""
    found = items(argument)
    if found is None:
        yield BAD_JSON
        return
    flags = dict(found)
    pairs = ([(flags.get("property", ""), flags.get("value", ""))] if "property" in flags
             else [(key.split(".", 1)[-1], value) for key, value in found])
    yield from settings(pairs, DEVICE_FILES, HOST_KEYS)


def initrd(argument: str) -> Iterator[Use]:
    """``-initrd``: a ramdisk, or multiboot modules (``path args,path args``: ``,,`` is a comma)."""
    for module in argument.replace(",,", "\0").split(","):
        yield Use("read", module.replace("\0", ",").split(" ", 1)[0])
    if "," in argument or " " in argument:
        yield Use("read", argument)  # a kernel that is not multiboot: one file


def acpi_table(argument: str) -> Iterator[Use]:
    """``-acpitable file=A:B`` or ``data=A:B``: files read into the guest's ACPI tables."""
    found = items(argument)
    if found is None:
        yield BAD_JSON
        return
    for key, value in found:
        if key in ("file", "data"):
            yield from (Use("read", path) for path in value.split(":"))
        elif value.startswith("/"):
            yield Use("read", value)


#: character devices (QEMU's short form) that stay inside QEMU or on its console
CHARDEV_SPECS = frozenset({"none", "null", "stdio", "pty", "vc", "msmouse", "braille", "testdev"})


def chardev_spec(argument: str) -> Iterator[Use]:
    """``-serial``, ``-monitor``, ``-qmp``, ``-gdb``...: a character device in QEMU's short form."""
    spec = argument[4:] if argument.startswith("mon:") else argument
    if spec in CHARDEV_SPECS or spec.startswith(("vc:", "chardev:")):
        return
    yield Use("refuse", "connects QEMU to a file, pipe, socket, terminal or network address of the worker "
                        f"(a job may use: {', '.join(sorted(CHARDEV_SPECS))}, vc:..., chardev:ID)")


def one_of(allowed: Iterable[str], why: str) -> Judge:
    """A judge that allows only the arguments ``allowed``."""
    allowed = frozenset(allowed)
    return lambda argument: [] if argument in allowed else [Use("refuse", why)]


#: options without an argument that do nothing on the worker beyond running the board
FLAGS = frozenset({
    "-nographic", "-enable-kvm", "-no-reboot", "-no-shutdown", "-S", "-s", "-snapshot", "-nodefaults",
    "-no-user-config", "-no-acpi", "-no-hpet", "-no-fd-bootchk", "-usb", "-full-screen", "-portrait",
    "-win2k-hack", "-singlestep", "-mem-prealloc", "-only-migratable", "-enable-sync-profile",
    "-async-teardown", "-old-param", "-preconfig", "-version", "-h", "-help", "-audio-help"})
#: options without an argument that a job may not set, and why
REFUSED_FLAGS = {
    "-daemonize": "would have QEMU leave the job's control (it would outlive the job)",
    "-semihosting": "lets the board open, read and write the worker's files",
    "-xen-attach": "attaches to a Xen domain of the worker",
    "-xen-domid-restrict": "changes Xen privileges on the worker",
}
#: options whose argument is text that names nothing of the worker
TEXT = frozenset({
    "-append", "-name", "-uuid", "-k", "-loadvm", "-rotate", "-seed", "-d", "-dfilter", "-echr", "-g",
    "-prom-env", "-msg", "-watchdog-action", "-vga", "-cpu"})
#: options whose settings name nothing of the worker (an absolute path among them is judged as read)
SETTINGS = ("-m", "-smp", "-accel", "-numa", "-mon", "-overcommit", "-action", "-rtc", "-iscsi", "-compat")
_MACHINE_FILES = {"kernel": "read", "initrd": "read", "dtb": "read", "firmware": "read", "dumpdtb": "write"}
_NETWORKS = {"user": {"smb": "write", "tftp": "read"}, "nic": {}, "hubport": {}, "none": {}}
#: options with an argument: how a job's use is judged
JUDGES: dict[str, Judge] = {
    **{name: keyval() for name in SETTINGS},
    # files QEMU reads
    "-kernel": path_of("read"), "-initrd": initrd, "-dtb": path_of("read"), "-bios": path_of("read"),
    "-L": path_of("read"),
    "-option-rom": keyval("romfile", {"romfile": "read"}),
    "-fw_cfg": keyval("name", {"file": "read"}),
    "-boot": keyval("order", {"splash": "read"}),
    "-smbios": keyval(None, {"file": "read"}),
    "-acpitable": acpi_table,
    "-machine": keyval("type", _MACHINE_FILES), "-M": keyval("type", _MACHINE_FILES),
    # disk images: written unless read-only
    "-cdrom": disk_of("media"),
    **{name: disk_of("disk") for name in ("-hda", "-hdb", "-hdc", "-hdd", "-fda", "-fdb", "-mtdblock", "-sd",
                                          "-pflash")},
    "-drive": drive(blockdev=False), "-blockdev": drive(blockdev=True),
    # files QEMU writes
    "-D": path_of("write"), "-pidfile": path_of("write"), "-dump-vmstate": path_of("write"),
    "-qtest-log": path_of("write"), "-mem-path": path_of("write"),
    "-trace": keyval("enable", {"events": "read", "file": "write"}),
    "-icount": keyval("shift", {"rrfile": "write"}),
    # front ends and back ends
    "-device": device, "-global": global_property,
    **{name: keyval("type", types=_NETWORKS, what="the network back end",
                    refused={"guestfwd": "guestfwd= connects the board to the worker's addresses or to a command "
                                         "it runs"}) for name in ("-netdev", "-net", "-nic")},
    "-chardev": keyval("backend", {"logfile": "write"}, what="the character device", types={
        name: {} for name in ("null", "stdio", "vc", "pty", "ringbuf", "memory", "msmouse", "braille", "wctablet",
                              "testdev")}),
    **{name: chardev_spec for name in ("-serial", "-parallel", "-monitor", "-qmp", "-qmp-pretty", "-debugcon",
                                       "-gdb")},
    "-object": keyval("qom-type", what="the object type", types={
        "rng-builtin": {}, "rng-random": {"filename": "read"}, "rng-egd": {}, "memory-backend-ram": {},
        "memory-backend-memfd": {}, "memory-backend-file": {"mem-path": "write"}, "iothread": {},
        "throttle-group": {}, "secret": {"file": "read"}, "cryptodev-backend-builtin": {}, "can-bus": {},
        "main-loop": {}, "thread-context": {}, "filter-buffer": {}, "filter-dump": {"file": "write"},
        "filter-mirror": {}, "filter-redirector": {}, "filter-rewriter": {}, "authz-simple": {}}),
    **{name: keyval("driver", types={"none": {}, "wav": {"path": "write"}}, what="the sound back end")
       for name in ("-audiodev", "-audio")},
    "-display": keyval("type", what="the display", types={
        name: {} for name in ("none", "sdl", "gtk", "curses", "cocoa")}),
    "-vnc": one_of(["none"], "serves the board's display on the worker's network"),
    "-usbdevice": one_of(["mouse", "tablet", "keyboard", "braille", "wacom-tablet"],
                         "passes a device of the worker to the board"),
    # what no setting allows
    "-add-fd": refuse("hands QEMU file descriptors of the worker"),
    "-chroot": refuse("changes QEMU's root directory on the worker"),
    "-runas": refuse("changes the user QEMU runs as on the worker"),
    "-sandbox": refuse("changes QEMU's sandbox on the worker"),
    "-readconfig": refuse("makes QEMU obey a configuration file (any option, unchecked)"),
    "-plugin": refuse("loads a library into QEMU: it runs code on the worker"),
    "-incoming": refuse("makes QEMU load a migration stream: from a command it runs (exec:), a file or a socket"),
    "-semihosting-config": refuse("lets the board open, read and write the worker's files"),
    "-qtest": refuse("hands control of QEMU to a socket or device of the worker"),
    "-set": refuse("changes options set elsewhere on the command line (the device's own among them)"),
    "-tpmdev": refuse("connects the board to the worker's TPM or to a socket"),
    "-fsdev": refuse("shares a directory of the worker with the board"),
    "-virtfs": refuse("shares a directory of the worker with the board"),
    "-spice": refuse("serves the board's display on the worker's network"),
    "-xen-domid": refuse("attaches to a Xen domain of the worker"),
}
UNKNOWN = "is not an option the worker's policy knows (QEMU 7.2's): only the device's configuration may use it"


def option_name(token: str) -> str | None:
    """The option ``token`` is, as QEMU reads it (``--name`` is ``-name``), or None: not an option."""
    if not token.startswith("-"):
        return None
    return token[1:] if token[1:2] == "-" else token


def takes_argument(option: str) -> bool:
    """Whether QEMU reads the next argument as ``option``'s (an unknown option: no; it is refused)."""
    return option in TEXT or option in JUDGES


def groups(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """(start, end) of each group of ``tokens`` (QEMU's arguments after the program), as QEMU's parser
    cuts them: an option with its argument when it takes one, or one argument alone."""
    spans, i = [], 0
    while i < len(tokens):
        option = option_name(tokens[i])
        end = i + 2 if option is not None and takes_argument(option) and i + 1 < len(tokens) else i + 1
        spans.append((i, end))
        i = end
    return spans


def uses(group: Sequence[str]) -> list[Use]:
    """What one group does: its option judged on its argument; a bare argument is QEMU's first disk."""
    option = option_name(group[0])
    if option is None:
        return list(disk_of("disk")(group[0]))
    if option in FLAGS:
        return []
    if option in REFUSED_FLAGS:
        return [Use("refuse", REFUSED_FLAGS[option])]
    if not takes_argument(option):
        return [Use("refuse", UNKNOWN)]
    if len(group) < 2 or option in TEXT:
        return []  # without its argument QEMU refuses it itself
    return list(JUDGES[option](group[1]))


# ---- the verdict ----

def judge(program: str, parts: Sequence[Part], own_program: str | None, own: Sequence[str] | None,
          root: str, resolve: bool = False) -> Verdict:
    """The policy on the command line ``program`` + ``parts``. ``own`` (with ``own_program``) is what
    the device's own configuration gives (None: all that is not the ``job``'s is the device's own,
    as in a standalone run). ``root`` is the job's scratch directory, QEMU's working directory:
    files in it are the job's own. With ``resolve`` (on the worker), paths are compared with their
    symlinks resolved, and the disk images the job deployed are opened to see what they name."""
    verdict = Verdict([], [])
    context = next((part.path for part in parts if not part.job), ("context",))
    if own_program is not None and program != own_program:
        verdict.refusals.append((context, f"{REFUSED}: the QEMU program {program!r} comes from the job's context, "
                                          f"not from the device's configuration ({own_program!r} without the "
                                          "context; a job's arch must be one of the device's "
                                          "available_architectures)"))
    tokens = [token for part in parts for token in part.tokens]
    origin = [index for index, part in enumerate(parts) for _ in part.tokens]
    device_own = None if own is None else Counter(tuple(own[s:e]) for s, e in groups(own))
    spans = groups(tokens)
    snapshot = any(option_name(tokens[s]) == "-snapshot" for s, _ in spans)
    for start, end in spans:
        group = tuple(tokens[start:end])
        authors = [parts[index] for index in sorted(set(origin[start:end]))]
        jobs = [part for part in authors if part.job]
        if not jobs and (device_own is None or device_own[group] > 0):
            if device_own is not None:
                device_own[group] -= 1
            continue  # the device's own
        text = shlex.join(group)
        text = text if len(text) <= SHOWN else text[:SHOWN] + "..."
        via = f"QEMU option {text!r}" if option_name(group[0]) else f"QEMU disk image {text!r}"
        for use in uses(group):
            if use.kind == "disk" and snapshot:
                use = use._replace(kind="media")
            _apply(verdict, use, via, (jobs or authors)[0].path, root, resolve)
    return verdict


def _apply(verdict: Verdict, use: Use, via: str, path: tuple, root: str, resolve: bool, depth: int = 0) -> None:
    """Add what ``use`` (by ``via``, set at YAML ``path``) means to ``verdict``."""
    if use.kind == "refuse":
        verdict.refusals.append((path, f"{REFUSED}: {via} {use.value}"))
        return
    if not use.value:
        return
    where = posixpath.normpath(posixpath.join(root, use.value))  # QEMU runs in the job's directory
    real = os.path.realpath(where) if resolve else where
    home = os.path.realpath(root) if resolve else posixpath.normpath(root)
    if real == home or real.startswith(home.rstrip("/") + "/"):
        if resolve and use.kind in ("disk", "rw", "media") and use.format != "raw" and os.path.isfile(real):
            _references(verdict, real, use.format, via, path, root, depth)
        return  # the job's own file
    if use.kind in ("read", "media"):
        if real not in HARMLESS_READS:
            verdict.reads.append(Access("file", where, path, via))
    elif real != "/dev/null":
        hint = {"disk": " (readonly=on, snapshot=on or -snapshot would only read it)",
                "rw": " (read-only=on would only read it)"}.get(use.kind, "")
        verdict.refusals.append((path, f"{REFUSED}: {via} writes {real} on the worker: QEMU may write only the "
                                       f"job's own files{hint}"))


def _references(verdict: Verdict, image: str, image_format: str, via: str, path: tuple, root: str,
                depth: int) -> None:
    """Judge the files the job's disk image ``image`` names, as files QEMU reads."""
    name = os.path.basename(image)
    try:
        found = image_references(image, image_format)
    except (OSError, ValueError, struct.error) as exc:
        verdict.refusals.append((path, f"{REFUSED}: {via}: cannot tell which files the disk image {name} names "
                                       f"({exc})"))
        return
    for reference in found:
        what = f"{via} (the disk image {name} names {reference!r})"
        if has_protocol(reference):
            verdict.refusals.append((path, f"{REFUSED}: {what}: a QEMU block protocol, which reaches beyond the "
                                           "job's files"))
        elif depth >= CHAIN_DEPTH:
            verdict.refusals.append((path, f"{REFUSED}: {what}: a chain of more than {CHAIN_DEPTH} images"))
        else:  # QEMU resolves a relative name from the image's directory
            target = posixpath.join(os.path.dirname(image), reference)
            _apply(verdict, Use("media", target), what, path, root, True, depth + 1)


def image_verdict(image: str, image_format: str, root: str, via: str) -> Verdict:
    """The policy on the files that the job's disk image ``image`` (in ``root``) names, as QEMU or
    ``qemu-img`` would open them (``via`` names the image in refusals)."""
    verdict = Verdict([], [])
    _references(verdict, os.path.realpath(image), image_format, via, (), root, 0)
    return verdict


def refusals(verdict: Verdict, policy: FilePolicy, resolve: bool) -> list[tuple[tuple, str]]:
    """(YAML path, refusal) of ``verdict`` on a worker with ``policy``: its refusals, then each file
    read that the policy does not allow."""
    found = list(verdict.refusals)
    for access in verdict.reads:
        refusal = policy.refusal(access, resolve)
        if refusal:
            found.append((access.path, refusal))
    return found
