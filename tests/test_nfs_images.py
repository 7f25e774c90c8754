"""The NFS-rootable DUT images (tools/build_dut_images.py): the NFS initramfs (the kernel's NFS
client modules, klibc's nfsmount) and the Debian roots made by debootstrap, cached and rebuilt only
when their own recipe changes."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from test_dut_images import read_cpio


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_nfs_initramfs_carries_the_nfs_client_and_klibc_nfsmount(dut_images, dut_builder, arch):
    entries = read_cpio(gzip.decompress((dut_images.cache / "dut" / arch / "initramfs-nfs.cpio.gz").read_bytes()))
    assert entries["init"]["data"] == (dut_builder.DUT_FILES / "init").read_bytes()
    manifest = dut_images.manifest["arches"][arch]
    kver = manifest["kernel_version"]
    nfs_modules = entries["etc/pumice/nfs-modules"]["data"].decode().split()
    assert nfs_modules == manifest["nfs_modules"]
    names = [Path(path).stem for path in nfs_modules]
    assert {"sunrpc", "lockd", "nfs", "nfsv3"} <= set(names)
    loaded = [Path(path).stem for path in entries["etc/pumice/modules"]["data"].decode().split()]
    for position, path in enumerate(nfs_modules):
        elf = entries[f"lib/modules/{kver}/{path}"]["data"]
        for dep in filter(None, dut_builder.modinfo(elf).get("depends", "").split(",")):
            assert dep in loaded + names[:position], f"{path} needs {dep} loaded first"
    nfsmount = entries["usr/lib/klibc/bin/nfsmount"]["data"]
    interpreter = next(name for name in entries if name.startswith("lib/klibc-") and name.endswith(".so"))
    assert f"/{interpreter}".encode() in nfsmount, "nfsmount's ELF interpreter is where it looks for it"
    assert entries["usr/lib/klibc/bin/nfsmount"]["mode"] == 0o100755
    plain = read_cpio(gzip.decompress((dut_images.cache / "dut" / arch / "initramfs.cpio.gz").read_bytes()))
    assert "etc/pumice/nfs-modules" not in plain, "the ramdisk boards boot stays as small as it was"


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_debian_roots_are_debootstrap_trees_with_numeric_owners(nfs_root_images, arch):
    entry = nfs_root_images.manifest["rootfs"]["test"][arch]
    archive = getattr(nfs_root_images, f"{arch}_rootfs")
    info = entry["files"]["nfsrootfs.tar.xz"]
    assert archive.stat().st_size == info["size"]
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == info["sha256"]
    assert {"systemd-sysv", "openssh-server"} <= set(entry["included"])
    print(f"{arch}: {entry['packages']} packages, {entry['tree_bytes'] >> 20} MiB, {info['size'] >> 20} MiB at xz "
          f"{entry['xz_preset']}, built in {entry['build_seconds']} s (debootstrap {entry['debootstrap_seconds']} s)")
    wanted = {"./usr/sbin/sshd", "./etc/shadow", "./usr/sbin/init", "./dev/null", "./etc/ssh/ssh_host_ed25519_key",
              "./bin", "./etc/hostname"}
    found = {}
    with tarfile.open(archive, "r|xz") as tar:
        for member in tar:
            if member.name in wanted:
                found[member.name] = member
                if member.name in ("./etc/shadow", "./etc/hostname"):
                    found[member.name + ":data"] = tar.extractfile(member).read()
    assert set(wanted) <= set(found), set(wanted) - set(found)
    assert found["./bin"].issym() and found["./bin"].linkname == "usr/bin", "a merged-/usr root"
    assert found["./usr/sbin/init"].issym() and found["./dev/null"].ischr()
    assert found["./etc/hostname:data"] == b"pumice-nfs\n"
    assert b"\nroot::" in b"\n" + found["./etc/shadow:data"], "root logs in on the console without a password"
    assert (found["./etc/shadow"].uname, found["./etc/shadow"].gid) == ("", 42), "numeric owners (shadow: 42)"
    elf = subprocess.run(["tar", "-xJOf", str(archive), "./usr/bin/dpkg"], capture_output=True, check=True).stdout
    assert elf[18:20] == {"amd64": b"\x3e\x00", "arm64": b"\xb7\x00"}[arch], "the root's own architecture"


def test_an_up_to_date_root_is_not_built_again(nfs_root_images, dut_images, dut_builder, monkeypatch):
    def no_debootstrap(*args, **kwargs):
        raise AssertionError(f"an up-to-date root was built again: {args}")

    monkeypatch.setattr(dut_builder, "build_rootfs", no_debootstrap)
    start = time.monotonic()
    dut_builder.build_rootfs_images(dut_images.cache, ("amd64", "arm64"))
    assert time.monotonic() - start < 5


def test_the_roots_recipe_is_their_own(dut_builder, monkeypatch):
    spec = dut_builder.ROOTFS["test"]
    recipe = dut_builder.rootfs_recipe(spec, "bookworm")
    assert recipe == dut_builder.rootfs_recipe(spec, "bookworm")
    monkeypatch.setattr(dut_builder, "recipe_hash", lambda: "the kernels' recipe changed")
    assert dut_builder.rootfs_recipe(spec, "bookworm") == recipe, "a kernel change does not run debootstrap"
    assert dut_builder.rootfs_recipe(spec, "trixie") != recipe
    bigger = dut_builder.RootfsSpec(spec.file, (*spec.packages, "strace"), spec.slim)
    assert dut_builder.rootfs_recipe(bigger, "bookworm") != recipe
