#!/usr/bin/env python3
"""Build the kernels and initramfs images of Pumice's emulated boards (DUTs).

Everything comes from Debian packages, fetched with apt and unpacked with ``dpkg -x`` (nothing is
installed): the cloud kernel (serial console built in, virtio drivers as modules) and
busybox-static. The output, under ``CACHE/dut/``::

    amd64/vmlinuz, amd64/initramfs.cpio.gz          QEMU x86_64: -kernel/-initrd, console ttyS0
    arm64/Image, arm64/initramfs.cpio.gz,           QEMU virt + U-Boot (-bios u-boot.bin), TFTP
    arm64/virt.dtb, arm64/u-boot.bin                boot with booti, console ttyAMA0
    ARCH/initramfs-nfs.cpio.gz                      the same /init, plus the kernel's NFS client
                                                    modules and klibc's nfsmount: root=/dev/nfs
    ARCH/nfsrootfs.tar.xz                           a Debian minbase root for NFS (debootstrap,
                                                    systemd, openssh-server), xz -6
    manifest.json                                   packages, sha256s, command lines, addresses

The NFS roots (``--rootfs``, and ``make images``) have a recipe of their own (:func:`rootfs_recipe`:
the suite, the packages, tools/dut/rootfs-setup.sh, ROOTFS_FORMAT), so a change to the kernels'
recipe does not run debootstrap again. The arm64 root is made by a foreign debootstrap whose
second stage runs through binfmt_misc and qemu-user-static (registered here when missing).
``--rootfs-bench`` makes the larger root of ``make bench nfs`` (``bench-nfsrootfs.tar.xz``).

Each architecture has its own private apt state (``CACHE/dut/apt/ARCH``: the host's Debian
sources, restricted to that architecture), so no multiarch setup and no change to the host's apt
lists is needed. Downloaded packages are kept in ``CACHE/dut/debs/ARCH``: a rebuild after a change
of the /init recipe works offline. When the manifest matches the recipe and the files, a run is a
no-op that touches neither apt nor the network.

Usage: ``build_dut_images.py --cache DIR [--arch amd64|arm64|all] [--force] [--rootfs] [--rootfs-bench]``
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger("pumice.images")

#: Where the /init script and its helpers live (copied into every initramfs).
DUT_FILES = Path(__file__).resolve().parent / "dut"
#: Bumped when the manifest layout changes (the recipe hash covers the build logic itself).
MANIFEST_FORMAT = 1
#: U-Boot for QEMU's arm64 ``virt`` machine, from Debian's u-boot-qemu package.
UBOOT_BIN = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
UBOOT_PACKAGE = "u-boot-qemu"
#: Machine options the arm64 board runs with; the dtb is dumped from exactly this machine.
ARM64_MACHINE = ["-machine", "virt", "-cpu", "cortex-a57", "-m", "512"]


@dataclass(frozen=True)
class ArchSpec:
    """How one emulated board's images are made."""

    arch: str  # Debian architecture name
    kernel_meta: str  # metapackage that depends on the current cloud kernel package
    kernel_file: str  # output name of the kernel
    console: str  # serial console device of the board
    modules: tuple[str, ...]  # modules /init loads (their dependencies are added)
    command_line: str  # kernel command line known to work (see the note above ARCHES)
    qemu_user: str  # qemu-user name of the architecture (a foreign debootstrap's second stage)
    #: what the NFS initramfs adds: the NFS client (v3, what klibc's nfsmount speaks)
    nfs_modules: tuple[str, ...] = ("nfs", "nfsv3")


#: Why the command lines carry loglevel=6 and not ``quiet``: ``quiet`` sets the console loglevel
#: to 4, which hides the KERN_NOTICE (5) banner "Linux version ..." that the agent waits for as
#: the kernel start message. loglevel=6 shows the banner and the few notices and warnings (about
#: 20 lines); /init lowers the level to 1 before the shell starts, so nothing writes over the prompt.

ARCHES: dict[str, ArchSpec] = {
    "amd64": ArchSpec(
        arch="amd64",
        kernel_meta="linux-image-cloud-amd64",
        kernel_file="vmlinuz",
        console="ttyS0",
        modules=("virtio_pci", "virtio_net", "virtio_blk", "virtio_console"),
        command_line="console=ttyS0,115200 loglevel=6",
        qemu_user="x86_64",
    ),
    "arm64": ArchSpec(
        arch="arm64",
        kernel_meta="linux-image-cloud-arm64",
        kernel_file="Image",
        console="ttyAMA0",
        # QEMU virt's virtio-*-device are virtio-mmio transports; -device virtio-*-pci also works.
        modules=("virtio_mmio", "virtio_pci", "virtio_net", "virtio_blk", "virtio_console"),
        command_line="console=ttyAMA0,115200 loglevel=6",
        qemu_user="aarch64",
    ),
}

#: U-Boot (qemu_arm64) load addresses for the emulated arm64 board, from ``printenv`` in the real
#: U-Boot 2023.01: kernel_addr_r and ramdisk_addr_r. It defines no fdt_addr_r: fdt_addr=0x40000000
#: is where QEMU puts its own dtb, and U-Boot works from a relocated copy, so fetching virt.dtb
#: there is safe. 512 MiB of RAM start at 0x40000000; the Image (~27 MiB) ends below 0x44000000.
UBOOT_ADDRESSES = {
    "KERNEL_ADDR": "0x40400000",
    "RAMDISK_ADDR": "0x44000000",
    "DTB_ADDR": "0x40000000",
}
#: What U-Boot says and how the arm64 board is booted by hand (tested by tests/test_dut_images.py).
UBOOT_SESSION = {
    "interrupt_prompt": "Hit any key to stop autoboot",
    "bootloader_prompt": "=>",
    "boot_message": "Starting kernel ...",
    "server_ip": "10.0.2.2",
    "ip": "10.0.2.15",
    "commands": [
        "setenv serverip 10.0.2.2; setenv ipaddr 10.0.2.15; setenv netmask 255.255.255.0",
        "tftp {KERNEL_ADDR} Image",
        "tftp {RAMDISK_ADDR} initramfs.cpio.gz; setenv initrd_size ${filesize}",
        "tftp {DTB_ADDR} virt.dtb",
        "setenv bootargs '{BOOTARGS}'",
        "booti {KERNEL_ADDR} {RAMDISK_ADDR}:${initrd_size} {DTB_ADDR}",
    ],
}


class BuildError(Exception):
    """A DUT image cannot be built (a package cannot be fetched, a tool is missing...)."""


# --- small helpers ------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recipe_hash() -> str:
    """Hash of everything that decides the image contents: this script and tools/dut/."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted(DUT_FILES.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; a failure raises BuildError saying ``what`` failed."""
    LOG.debug("running: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    except FileNotFoundError as exc:
        raise BuildError(f"{what}: command not found: {cmd[0]} (run `make apt` to install it)") from exc
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{what}: {cmd[0]} did not finish in {exc.timeout} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        # The -o options of the private apt state only hide the message.
        shown = " ".join(arg for arg in cmd if not arg.startswith("-o"))
        raise BuildError(f"{what}: `{shown}` exited {proc.returncode}:\n{tail}")
    return proc


def deb_field(deb: Path, field: str) -> str:
    """One control field of a .deb file."""
    return run(["dpkg-deb", "-f", str(deb), field], f"reading {deb.name}").stdout.strip()


# --- apt: a private state per architecture ------------------------------------------------------


class Apt:
    """apt-get/apt-cache on a private state dir restricted to one architecture.

    The sources are the host's Debian ones (from ``apt-get indextargets``), so a lab's mirror or
    proxy settings carry over; the host's lists and dpkg status are never touched.
    """

    def __init__(self, root: Path, arch: str) -> None:
        self.root = root
        self.arch = arch
        self.options = [
            f"-oAPT::Architecture={arch}",
            f"-oAPT::Architectures={arch}",
            f"-oDir::State={root}",
            f"-oDir::State::Lists={root / 'lists'}",
            f"-oDir::State::status={root / 'status'}",
            f"-oDir::Cache={root / 'cache'}",
            f"-oDir::Etc::sourcelist={root / 'sources.list'}",
            f"-oDir::Etc::sourceparts={root / 'sources.list.d'}",
        ]
        if os.geteuid() == 0:
            # Downloads go to our own directories, where apt's _apt sandbox user may not write.
            self.options.append("-oAPT::Sandbox::User=root")

    def prepare(self) -> None:
        """Create the state directories and write the sources from the host's configuration."""
        for sub in ("lists/partial", "cache/archives/partial", "sources.list.d"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        (self.root / "sources.list").write_text(host_debian_sources(self.arch))

    def update(self) -> None:
        """Fetch the package lists of the private state."""
        self.prepare()
        LOG.info("%s: apt-get update (private state in %s)", self.arch, self.root)
        # --error-on=any: a source that cannot be fetched fails here, not later as "no packages".
        run(
            ["apt-get", *self.options, "-q", "--error-on=any", "update"],
            f"cannot fetch the {self.arch} package lists",
        )

    def kernel_package(self, meta: str) -> str:
        """The versioned kernel package a metapackage depends on (linux-image-6.1.0-N-cloud-...)."""
        out = run(["apt-cache", *self.options, "depends", meta], f"resolving {meta}").stdout
        found = re.findall(r"^\s*Depends:\s*(linux-image-\S+)", out, re.MULTILINE)
        if not found:
            raise BuildError(f"{meta} ({self.arch}) depends on no linux-image package:\n{out}")
        return found[0]

    def download(self, packages: list[str], dest: Path) -> None:
        """apt-get download the packages into dest."""
        LOG.info("%s: apt-get download %s", self.arch, " ".join(packages))
        qualified = [f"{name}:{self.arch}" for name in packages]
        run(
            ["apt-get", *self.options, "-q", "download", *qualified],
            f"cannot fetch {', '.join(packages)} for {self.arch}",
            cwd=dest,
        )


def host_debian_sources(arch: str) -> str:
    """sources.list lines for ``arch`` from the host's Debian repositories (deb entries only)."""
    out = run(["apt-get", "indextargets", "Identifier: Packages"], "listing the host's apt sources").stdout
    suites: dict[tuple[str, str], list[str]] = {}
    for record in out.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in record.splitlines() if ": " in line)
        if fields.get("Target-Of") != "deb" or fields.get("Origin", "Debian") != "Debian":
            continue
        components = suites.setdefault((fields["Repo-URI"], fields["Release"]), [])
        if fields["Component"] not in components:
            components.append(fields["Component"])
    if not suites:
        raise BuildError("the host's apt configuration has no Debian 'deb' source to fetch packages from")
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    options = f"arch={arch}" + (f" signed-by={keyring}" if keyring.exists() else "")
    return "".join(
        f"deb [{options}] {uri} {release} {' '.join(comps)}\n" for (uri, release), comps in suites.items()
    )


# --- kernel modules -----------------------------------------------------------------------------


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed when Debian ships it compressed (.ko.xz/.ko.gz)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise BuildError(f"{path}: unsupported module compression (allowed: .ko, .ko.xz, .ko.gz)")


def modinfo(elf: bytes) -> dict[str, str]:
    """The key=value strings of an ELF64 kernel module's .modinfo section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise BuildError("not an ELF64 kernel module")
    endian = "<" if elf[5] == 1 else ">"
    shoff = struct.unpack_from(endian + "Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            endian + "IIQQQQ", elf, shoff + index * shentsize
        )
        return name, offset, size

    names_offset = section(shstrndx)[1]
    for index in range(shnum):
        name, offset, size = section(index)
        start = names_offset + name
        if elf[start : elf.index(b"\0", start)] == b".modinfo":
            info: dict[str, str] = {}
            for item in elf[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    return {}


def module_name(path: Path) -> str:
    """Kernel module name of a file (virtio-rng.ko.xz -> virtio_rng)."""
    return path.name.split(".ko")[0].replace("-", "_")


def resolve_modules(moddir: Path, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """(path relative to moddir, ELF bytes) of the wanted modules and their dependencies,
    dependencies first (the order of modules.dep), skipping modules built into the kernel."""
    files = {module_name(p): p for p in (moddir / "kernel").rglob("*.ko*")}
    builtin_list = moddir / "modules.builtin"
    builtin = (
        {module_name(Path(line)) for line in builtin_list.read_text().split()}
        if builtin_list.exists()
        else set()
    )
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name not in files:
            raise BuildError(
                f"kernel module {name} (needed by {' <- '.join(chain) or 'init'}) is not in {moddir}"
            )
        seen.add(name)
        elf = read_module(files[name])
        for dep in filter(None, modinfo(elf).get("depends", "").split(",")):
            visit(dep, (name, *chain))
        relative = files[name].relative_to(moddir).as_posix()
        ordered.append((relative.split(".ko")[0] + ".ko", elf))

    for name in wanted:
        visit(name, ())
    return ordered


def modules_dep(modules: list[tuple[str, bytes]]) -> str:
    """modules.dep (depmod's format, for busybox modprobe) of modules listed dependencies first:
    ``path: deps`` with every dependency, direct or not, the ones to load first last."""
    by_name = {module_name(Path(relative)): relative for relative, _ in modules}
    needs: dict[str, list[str]] = {}
    lines = []
    for relative, elf in modules:
        deps: list[str] = []
        for dep in filter(None, modinfo(elf).get("depends", "").split(",")):
            if dep in by_name:  # else built into the kernel
                deps += [path for path in (*needs[by_name[dep]], by_name[dep]) if path not in deps]
        needs[relative] = deps
        lines.append(f"{relative}: {' '.join(reversed(deps))}".rstrip() + "\n")
    return "".join(lines)


# --- initramfs ----------------------------------------------------------------------------------


class Cpio:
    """A gzip'd newc cpio archive built in memory: root-owned, fixed timestamps (reproducible)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._inode = 1
        self._paths: set[str] = set()

    def _entry(self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        path = path.strip("/")
        if path in self._paths:
            raise BuildError(f"initramfs: {path} added twice")
        parent = path.rpartition("/")[0]
        if parent and parent not in self._paths:
            self.directory(parent)
        self._paths.add(path)
        name = path.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
        self._inode += 1
        self._write(b"070701" + b"".join(b"%08X" % value for value in fields) + name)
        self._write(data)

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, path: str, mode: int = 0o755) -> None:
        """Add a directory (and its missing parents)."""
        self._entry(path, 0o040000 | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file."""
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(path, 0o120777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (no root needed: it is only a cpio header)."""
        self._entry(path, 0o020000 | mode, rdev=(major, minor))

    def gzipped(self) -> bytes:
        """The finished archive (with its trailer), gzip'd."""
        self._write(b"070701" + b"%08X" * 13 % (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0) + b"TRAILER!!!\0")
        return gzip.compress(self._out.getvalue(), compresslevel=9, mtime=0)


#: Directories of every initramfs (/init mounts proc, sys, devtmpfs and tmpfs on some of them).
INITRAMFS_DIRS = (
    "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root", "mnt", "var/log",
    "etc/pumice",
)  # fmt: skip


def build_initramfs(root: Path, spec: ArchSpec, kernel_version: str, nfs: bool = False) -> tuple[bytes, list[str]]:
    """The initramfs of a board from the unpacked packages in ``root``; returns (cpio.gz, modules).
    ``nfs`` adds the NFS client modules (loaded for root=/dev/nfs only) and klibc's nfsmount, the
    program Debian's initramfs mounts NFS roots with (busybox's mount has no NFS in Debian)."""
    cpio = Cpio()
    for directory in INITRAMFS_DIRS:
        cpio.directory(directory, 0o1777 if directory == "tmp" else 0o755)
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", (root / "bin/busybox").read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", (DUT_FILES / "init").read_bytes(), 0o755)
    cpio.file("etc/pumice/udhcpc.script", (DUT_FILES / "udhcpc.script").read_bytes(), 0o755)
    cpio.file("usr/bin/vmstat", (DUT_FILES / "vmstat").read_bytes(), 0o755)
    cpio.file("etc/hostname", f"pumice-{spec.arch}\n".encode())
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    moddir = root / "lib/modules" / kernel_version
    modules = resolve_modules(moddir, spec.modules)
    for relative, elf in modules:
        cpio.file(f"lib/modules/{kernel_version}/{relative}", elf)
    cpio.file("etc/pumice/modules", "".join(f"{rel}\n" for rel, _ in modules).encode())
    if nfs:
        loaded = {rel for rel, _ in modules}
        nfs_modules = [(rel, elf) for rel, elf in resolve_modules(moddir, spec.nfs_modules) if rel not in loaded]
        for relative, elf in nfs_modules:
            cpio.file(f"lib/modules/{kernel_version}/{relative}", elf)
        modules += nfs_modules
        cpio.file("etc/pumice/nfs-modules", "".join(f"{rel}\n" for rel, _ in nfs_modules).encode())
        libraries = sorted((root / "lib").glob("klibc-*.so")) or sorted((root / "usr/lib").glob("klibc-*.so"))
        nfsmount = root / "usr/lib/klibc/bin/nfsmount"
        if not libraries or not nfsmount.is_file():
            raise BuildError("klibc's nfsmount or its library is missing from klibc-utils/libklibc")
        # nfsmount's ELF interpreter is /lib/klibc-<hash>.so: the same path in the initramfs
        cpio.file(f"lib/{libraries[0].name}", libraries[0].read_bytes(), 0o755)
        cpio.file("usr/lib/klibc/bin/nfsmount", nfsmount.read_bytes(), 0o755)
    cpio.file(f"lib/modules/{kernel_version}/modules.dep", modules_dep(modules).encode())
    return cpio.gzipped(), [rel for rel, _ in modules]


# --- kernels, dtb, U-Boot -----------------------------------------------------------------------


def raw_arm64_image(vmlinuz: Path) -> bytes:
    """The raw arm64 Image U-Boot's booti needs (bookworm ships it raw; older Debian gzip'd it)."""
    data = vmlinuz.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[0x38:0x3C] != b"ARM\x64":
        raise BuildError(f"{vmlinuz}: not an arm64 kernel Image (no ARM\\x64 magic at 0x38)")
    return data


def dump_virt_dtb(dest: Path, uboot: Path) -> None:
    """QEMU's generated device tree of the arm64 board, packed to its used size.

    It is dumped from the very machine the board runs: with firmware (-bios) QEMU 7.2 leaves the
    pl061 GPIO out, and a kernel given the dtb of a machine without -bios dies probing it.
    """
    machine = ARM64_MACHINE.copy()
    machine[1] += f",dumpdtb={dest}"
    run(
        ["qemu-system-aarch64", *machine, "-bios", str(uboot), "-nographic"],
        "dumping the virt dtb",
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    dest.write_bytes(pack_fdt(dest.read_bytes() if dest.exists() else b""))


def pack_fdt(blob: bytes) -> bytes:
    """A flattened device tree cut to the blocks it uses (QEMU pads its dtb to 1 MiB).

    U-Boot grows the tree in place or in a copy when it adds /chosen, so no padding is needed.
    """
    if len(blob) < 40 or blob[:4] != b"\xd0\x0d\xfe\xed":
        raise BuildError("qemu-system-aarch64 wrote no device tree")
    _magic, _total, off_struct, off_strings, off_rsvmap, *_rest, size_strings, size_struct = (
        struct.unpack_from(">10I", blob)
    )
    used = max(off_struct + size_struct, off_strings + size_strings, off_rsvmap + 16)
    return blob[:4] + struct.pack(">I", used) + blob[8:used]


def host_package_version(name: str) -> str:
    """Version of an installed Debian package on the host."""
    return run(
        ["dpkg-query", "-W", "-f=${Version}", name], f"{name} is not installed (run `make apt`)"
    ).stdout


# --- the build ----------------------------------------------------------------------------------


def manifest_path(cache: Path) -> Path:
    """Where the manifest of the DUT images of a cache dir is."""
    return Path(cache) / "dut" / "manifest.json"


def load_manifest(cache: Path) -> dict:
    """The manifest of a cache dir, or an empty one."""
    try:
        return json.loads(manifest_path(cache).read_text())
    except (OSError, ValueError):
        return {}


def arch_is_current(cache: Path, manifest: dict, arch: str) -> bool:
    """True when ``arch``'s images match the manifest (recipe and sha256 of every file)."""
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("recipe") != recipe_hash():
        return False
    entry = manifest.get("arches", {}).get(arch)
    if not entry:
        return False
    outdir = Path(cache) / "dut" / arch
    for name, info in entry["files"].items():
        path = outdir / name
        if not path.is_file() or path.stat().st_size != info["size"] or sha256_file(path) != info["sha256"]:
            return False
    return True


#: the packages of the initramfs besides the kernel (klibc's for the NFS one's nfsmount)
INITRAMFS_PACKAGES = ("busybox-static", "klibc-utils", "libklibc")


def fetch_packages(cache: Path, spec: ArchSpec, previous: dict | None, force: bool) -> dict[str, Path]:
    """The kernel, busybox and klibc .debs of an architecture: reused from the cache, else downloaded."""
    debdir = Path(cache) / "dut" / "debs" / spec.arch
    if previous and not force:
        cached = {
            name: debdir / info["deb"] for name, info in previous.get("packages", {}).items() if "deb" in info
        }
        if cached and set(INITRAMFS_PACKAGES) <= cached.keys() and all(p.is_file() for p in cached.values()):
            LOG.info("%s: reusing cached packages %s", spec.arch, ", ".join(p.name for p in cached.values()))
            return {
                "kernel" if name.startswith("linux-image-") else name: path for name, path in cached.items()
            }
    apt = Apt(Path(cache) / "dut" / "apt" / spec.arch, spec.arch)
    apt.update()
    kernel = apt.kernel_package(spec.kernel_meta)
    LOG.info("%s: %s -> %s", spec.arch, spec.kernel_meta, kernel)
    debdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=debdir) as tmp:
        apt.download([kernel, *INITRAMFS_PACKAGES], Path(tmp))
        fetched: dict[str, Path] = {}
        for deb in sorted(Path(tmp).glob("*.deb")):
            name = deb_field(deb, "Package")
            final = debdir / deb.name
            os.replace(deb, final)
            fetched["kernel" if name == kernel else name] = final
    missing = {"kernel", *INITRAMFS_PACKAGES} - fetched.keys()
    if missing:
        raise BuildError(f"apt-get download gave no package for {', '.join(sorted(missing))} ({spec.arch})")
    for old in set(debdir.glob("*.deb")) - set(fetched.values()):
        LOG.info("%s: removing superseded %s", spec.arch, old.name)
        old.unlink()
    return fetched


def build_arch(cache: Path, spec: ArchSpec, previous: dict | None, force: bool) -> dict:
    """Build one architecture's images into CACHE/dut/ARCH; returns its manifest entry."""
    debs = fetch_packages(cache, spec, previous, force)
    outdir = Path(cache) / "dut" / spec.arch
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=outdir.parent, prefix=f".build-{spec.arch}-") as tmp:
        unpacked, staged = Path(tmp) / "root", Path(tmp) / "out"
        staged.mkdir()
        for deb in debs.values():
            LOG.info("%s: dpkg -x %s", spec.arch, deb.name)
            run(["dpkg", "-x", str(deb), str(unpacked)], f"unpacking {deb.name}")
        vmlinuz = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise BuildError(f"{debs['kernel'].name} has no /boot/vmlinuz-*")
        kernel_version = vmlinuz[0].name.removeprefix("vmlinuz-")
        if spec.arch == "arm64":
            (staged / spec.kernel_file).write_bytes(raw_arm64_image(vmlinuz[0]))
            if not UBOOT_BIN.is_file():
                raise BuildError(f"{UBOOT_BIN} is missing: install {UBOOT_PACKAGE} (run `make apt`)")
            shutil.copyfile(UBOOT_BIN, staged / "u-boot.bin")
            dump_virt_dtb(staged / "virt.dtb", staged / "u-boot.bin")
        else:
            shutil.copyfile(vmlinuz[0], staged / spec.kernel_file)
        initramfs, modules = build_initramfs(unpacked, spec, kernel_version)
        (staged / "initramfs.cpio.gz").write_bytes(initramfs)
        nfs_initramfs, nfs_modules = build_initramfs(unpacked, spec, kernel_version, nfs=True)
        (staged / "initramfs-nfs.cpio.gz").write_bytes(nfs_initramfs)
        files = {}
        for path in sorted(staged.iterdir()):
            files[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
            # Atomic per file: a board booting from the old files keeps its open files.
            os.replace(path, outdir / path.name)
            LOG.info("%s: wrote %s (%d bytes)", spec.arch, outdir / path.name, files[path.name]["size"])
    packages = {
        deb_field(deb, "Package"): {"version": deb_field(deb, "Version"), "deb": deb.name}
        for deb in debs.values()
    }
    entry = {
        "packages": packages,
        "kernel_version": kernel_version,
        "console": spec.console,
        "kernel_command_line": spec.command_line,
        "kernel_start_message": "Linux version [0-9]",
        "shell_prompt": "/ # ",
        "modules": modules,
        "nfs_modules": [rel for rel in nfs_modules if rel not in modules],
        "files": files,
    }
    if spec.arch == "arm64":
        entry["packages"][UBOOT_PACKAGE] = {"version": host_package_version(UBOOT_PACKAGE), "host": True}
        entry["qemu_machine"] = ARM64_MACHINE
        entry["u_boot"] = {**UBOOT_ADDRESSES, **UBOOT_SESSION}
    return entry


# --- NFS root filesystems -----------------------------------------------------------------------

#: bumped when the root filesystem's build logic below changes (its recipe, unlike the kernels',
#: does not hash this whole script: debootstrap takes minutes)
ROOTFS_FORMAT = 1
ROOTFS_SETUP = DUT_FILES / "rootfs-setup.sh"


@dataclass(frozen=True)
class RootfsSpec:
    """One NFS root filesystem: a debootstrap minbase root with ``packages``, as an xz tarball."""

    file: str  # output name in CACHE/dut/ARCH
    packages: tuple[str, ...]
    slim: bool  # documentation, manual pages and translations removed
    xz_preset: str = "-6"


ROOTFS: dict[str, RootfsSpec] = {
    # what the boards boot in the tests: systemd and udev (as a Debian board boots: without udev,
    # systemd's serial getty waits for its tty device in vain) and openssh-server (the container and
    # SSH issues log in with it)
    "test": RootfsSpec("nfsrootfs.tar.xz", ("systemd-sysv", "udev", "openssh-server", "iproute2", "procps"),
                       slim=True),
    # make bench nfs: the size of a developer's test root (KernelCI's and LKFT's roots carry test
    # suites and their tool chains: hundreds of MB), here Debian's compilers, Python, Perl, tracers and
    # benchmarks, documentation kept (gdb is left out: a dependency's postinst fails under
    # debootstrap); >= 50 MB at xz -6
    "bench": RootfsSpec(
        "bench-nfsrootfs.tar.xz",
        ("systemd-sysv", "udev", "openssh-server", "iproute2", "procps", "python3", "build-essential", "git", "curl",
         "strace", "perl", "stress-ng", "iperf3", "fio", "ethtool", "pciutils", "kmod", "less", "vim-tiny"),
        slim=False,
    ),
}


def host_suite() -> str:
    """The Debian release of the host (bookworm): the roots are of the same release."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise BuildError("cannot tell the host's Debian release (no VERSION_CODENAME in /etc/os-release)")


def debian_mirror(suite: str) -> str:
    """The host's Debian mirror of ``suite`` (its apt sources: a lab's proxy or mirror carries over)."""
    out = run(["apt-get", "indextargets", "Identifier: Packages"], "listing the host's apt sources").stdout
    for record in out.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in record.splitlines() if ": " in line)
        if (fields.get("Target-Of") == "deb" and fields.get("Origin", "Debian") == "Debian"
                and fields.get("Release") == suite and fields.get("Component") == "main"):
            return fields["Repo-URI"]
    raise BuildError(f"the host's apt sources have no Debian {suite} main to debootstrap from")


def rootfs_recipe(spec: RootfsSpec, suite: str) -> str:
    """Hash of what decides a root filesystem's contents."""
    recipe = json.dumps({"format": ROOTFS_FORMAT, "suite": suite, "spec": spec.__dict__}, sort_keys=True)
    return hashlib.sha256(recipe.encode() + ROOTFS_SETUP.read_bytes()).hexdigest()


def host_arch() -> str:
    return run(["dpkg", "--print-architecture"], "asking dpkg the host's architecture").stdout.strip()


def ensure_binfmt(spec: ArchSpec) -> None:
    """Let the host run the architecture's programs in a chroot (a foreign debootstrap's second
    stage): binfmt_misc mounted, qemu-user-static registered with the F flag (the interpreter is
    opened at registration, so it works inside the chroot). Root only."""
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)],
            "mounting binfmt_misc (a foreign debootstrap needs it; run as root)")
    entry = misc / f"qemu-{spec.qemu_user}"
    if not entry.exists():
        conf = Path(f"/usr/lib/binfmt.d/qemu-{spec.qemu_user}.conf")
        if not conf.is_file():
            raise BuildError(f"{conf} is missing: install qemu-user-static (run `make apt`)")
        LOG.info("%s: registering %s with binfmt_misc", spec.arch, conf)
        try:
            (misc / "register").write_text(conf.read_text().strip())
        except OSError as exc:
            raise BuildError(f"cannot register qemu-{spec.qemu_user} with binfmt_misc: {exc}") from exc
    text = entry.read_text()
    if "enabled" not in text.split() or "F" not in next(
            (line.split()[1] for line in text.splitlines() if line.startswith("flags:")), ""):
        raise BuildError(f"{entry} is registered without the F flag (or disabled): a chroot cannot run "
                         f"{spec.arch} programs; remove it (echo -1 > {entry}) and build again")


def build_rootfs(cache: Path, spec: ArchSpec, root: RootfsSpec) -> dict:
    """debootstrap a root for ``spec``'s board, set it up (tools/dut/rootfs-setup.sh), pack it with
    numeric owners into CACHE/dut/ARCH/<file>; returns its manifest entry."""
    suite = host_suite()
    mirror = debian_mirror(suite)
    outdir = Path(cache) / "dut" / spec.arch
    outdir.mkdir(parents=True, exist_ok=True)
    debs = Path(cache) / "dut" / "debs" / f"rootfs-{spec.arch}"
    debs.mkdir(parents=True, exist_ok=True)
    foreign = spec.arch != host_arch()
    if foreign:
        ensure_binfmt(spec)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=outdir.parent, prefix=f".rootfs-{spec.arch}-") as tmp:
        tree = Path(tmp) / "root"
        LOG.info("%s: debootstrap %s %s (%s)%s", spec.arch, suite, ",".join(root.packages), mirror,
                 " through qemu-user-static" if foreign else "")
        try:
            run(["debootstrap", f"--arch={spec.arch}", "--variant=minbase", f"--include={','.join(root.packages)}",
                 f"--cache-dir={debs}", suite, str(tree), mirror], f"debootstrap of the {spec.arch} root",
                timeout=3600)
            bootstrapped = time.monotonic()
            setup = tree / "tmp" / "rootfs-setup.sh"
            shutil.copyfile(ROOTFS_SETUP, setup)
            run(["chroot", str(tree), "/bin/sh", "/tmp/rootfs-setup.sh", "1" if root.slim else "0"],
                f"setting the {spec.arch} root up", timeout=600)
            setup.unlink()
            packages = run(["chroot", str(tree), "dpkg-query", "-W", "-f=${Package} ${Version}\n"],
                           "listing the root's packages").stdout.split("\n")
            size = int(run(["du", "-sb", str(tree)], "measuring the root").stdout.split()[0])
            staged = Path(tmp) / root.file
            LOG.info("%s: packing %s (%d MB) with xz %s", spec.arch, root.file, size >> 20, root.xz_preset)
            with staged.open("wb") as out:
                tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(tree), "-cf", "-", "."],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                xz = subprocess.run(["xz", root.xz_preset, "-T0", "-c"], stdin=tar.stdout, stdout=out,
                                    stderr=subprocess.PIPE, check=False)
                tar.stdout.close()
                tar_error = tar.stderr.read().decode(errors="replace")
                if tar.wait() != 0 or xz.returncode != 0:
                    raise BuildError(f"packing the {spec.arch} root failed: {tar_error}{xz.stderr.decode()}")
        finally:
            _unmount_below(tree)
        info = {"sha256": sha256_file(staged), "size": staged.stat().st_size}
        os.replace(staged, outdir / root.file)
    LOG.info("%s: wrote %s (%d bytes) in %.0f s", spec.arch, outdir / root.file, info["size"],
             time.monotonic() - started)
    return {
        "recipe": rootfs_recipe(root, suite),
        "suite": suite,
        "file": root.file,
        "files": {root.file: info},
        "packages": len([line for line in packages if line]),
        "included": list(root.packages),
        "tree_bytes": size,
        "xz_preset": root.xz_preset,
        "debootstrap_seconds": round(bootstrapped - started),
        "build_seconds": round(time.monotonic() - started),
        "foreign": foreign,
        "console_login": {"login_prompt": "login:", "username": "root", "shell_prompt": "root@pumice-nfs:~#"},
    }


def _unmount_below(tree: Path) -> None:
    """Unmount what a failed debootstrap left mounted in its chroot (proc, sys), deepest first."""
    with contextlib.suppress(OSError):
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(f"{tree}/")), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=60)


def rootfs_is_current(cache: Path, manifest: dict, arch: str, name: str) -> bool:
    """True when the root ``name`` of ``arch`` matches its recipe and its file."""
    entry = manifest.get("rootfs", {}).get(name, {}).get(arch)
    if not entry or entry.get("recipe") != rootfs_recipe(ROOTFS[name], host_suite()):
        return False
    path = Path(cache) / "dut" / arch / entry["file"]
    info = entry["files"][entry["file"]]
    return path.is_file() and path.stat().st_size == info["size"] and sha256_file(path) == info["sha256"]


def build_rootfs_images(cache: Path, arches: Iterable[str] = tuple(ARCHES), name: str = "test",
                        force: bool = False) -> dict:
    """Make sure the NFS root ``name`` (:data:`ROOTFS`) of ``arches`` exists in ``cache``/dut;
    returns the manifest (a no-op, touching neither apt nor the network, when it matches)."""
    cache = Path(cache).expanduser()
    arches = list(arches)
    if not force and all(rootfs_is_current(cache, load_manifest(cache), arch, name) for arch in arches):
        return load_manifest(cache)
    with build_lock(cache, ".lock-rootfs"):
        for arch in arches:
            if rootfs_is_current(cache, load_manifest(cache), arch, name) and not force:
                continue  # another session built it while we waited
            entry = build_rootfs(cache, ARCHES[arch], ROOTFS[name])
            with build_lock(cache):  # the kernels' build may have rewritten the manifest meanwhile
                manifest = load_manifest(cache)
                manifest.setdefault("rootfs", {}).setdefault(name, {})[arch] = entry
                _write_manifest(cache, manifest)
    return load_manifest(cache)


def _write_manifest(cache: Path, manifest: dict) -> None:
    tmp = manifest_path(cache).with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path(cache))


@contextlib.contextmanager
def build_lock(cache: Path, name: str = ".lock") -> Iterator[None]:
    """Serialise builds sharing one cache (several test sessions may start at once). The kernels'
    builds and every manifest update take ``.lock`` (briefly); the NFS roots' builds, which take
    minutes, serialise on ``.lock-rootfs`` so that a kernels' build never waits for a debootstrap."""
    lockfile = Path(cache) / "dut" / name
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    with lockfile.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_images(cache: Path, arches: Iterable[str] = tuple(ARCHES), force: bool = False) -> dict:
    """Make sure the DUT images of ``arches`` exist in ``cache``/dut; returns the manifest.

    A no-op (no apt, no network) when the manifest matches; ``force`` fetches the packages
    again and rebuilds everything asked for.
    """
    cache = Path(cache).expanduser()
    arches = list(arches)
    unknown = [arch for arch in arches if arch not in ARCHES]
    if unknown:
        raise BuildError(f"unknown architecture {', '.join(unknown)}; known: {', '.join(ARCHES)}")
    manifest = load_manifest(cache)
    if not force and all(arch_is_current(cache, manifest, arch) for arch in arches):
        LOG.info("DUT images up to date in %s (%s)", cache / "dut", ", ".join(arches))
        return manifest
    with build_lock(cache):
        manifest = load_manifest(cache)  # another build may have finished while we waited
        recipe = recipe_hash()
        previous = manifest.get("arches", {}) if manifest.get("format") == MANIFEST_FORMAT else {}
        current = {arch: entry for arch, entry in previous.items() if arch_is_current(cache, manifest, arch)}
        for arch in arches:
            if arch in current and not force:
                LOG.info("%s: up to date", arch)
                continue
            LOG.info("%s: building DUT images in %s", arch, cache / "dut" / arch)
            current[arch] = build_arch(cache, ARCHES[arch], previous.get(arch), force)
        # Entries of other architectures stay only when still valid under the new recipe.
        manifest = {"format": MANIFEST_FORMAT, "recipe": recipe, "arches": dict(sorted(current.items())),
                    **({"rootfs": manifest["rootfs"]} if "rootfs" in manifest else {})}
        _write_manifest(cache, manifest)
        LOG.info("wrote %s", manifest_path(cache))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``make images``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("PUMICE_CACHE", "~/.cache/pumice")),
        help="cache directory (images go to CACHE/dut; default $PUMICE_CACHE or ~/.cache/pumice)",
    )
    parser.add_argument(
        "--arch", choices=[*ARCHES, "all"], default="all", help="board architecture (default all)"
    )
    parser.add_argument("--force", action="store_true", help="fetch the packages again and rebuild")
    parser.add_argument("--rootfs", action="store_true", help="also the NFS roots (debootstrap: minutes)")
    parser.add_argument("--rootfs-bench", action="store_true", help="also the larger NFS root of make bench nfs")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the commands run")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stdout
    )
    arches = list(ARCHES) if args.arch == "all" else [args.arch]
    try:
        build_images(args.cache, arches, force=args.force)
        if args.rootfs:
            build_rootfs_images(args.cache, arches, "test", force=args.force)
        if args.rootfs_bench:
            build_rootfs_images(args.cache, ["amd64"], "bench", force=args.force)
    except BuildError as exc:
        print(f"build_dut_images: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
