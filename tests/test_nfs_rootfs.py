"""Root filesystem archives for NFS roots (agent/rootfs.py): one streaming pass from the download
to the tree, the board's view of paths, hostile archives refused by member name, a full disk, and
the memory of the whole process tree."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from memory import rss_kb

from agent import compressed, rootfs, scratch
from agent.errors import InfrastructureError, JobError

URL = "http://example.invalid/rootfs.tar"


# --- archives made here --------------------------------------------------------------------------


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, uid: int = 0,
           gid: int = 0, linkname: str = "", major: int = 0, minor: int = 0, mtime: int = 1_600_000_000):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    info.linkname = linkname
    info.devmajor, info.devminor = major, minor
    info.mtime = mtime
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def tar_bytes(*members) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def compress(data: bytes, compression: str | None) -> bytes:
    if compression is None:
        return data
    if compression == "gz":
        return gzip.compress(data)
    if compression == "bz2":
        return bz2.compress(data)
    if compression == "xz":
        return lzma.compress(data, check=lzma.CHECK_CRC32)
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


ROOT_MEMBERS = (
    member("./", tarfile.DIRTYPE, mode=0o755),
    member("./etc/", tarfile.DIRTYPE, mode=0o755),
    member("./etc/hostname", data=b"board\n"),
    member("./usr/", tarfile.DIRTYPE, mode=0o755),
    member("./usr/bin/", tarfile.DIRTYPE, mode=0o755),
    member("./usr/bin/su", data=b"#!/bin/sh\n", mode=0o4755),
    member("./usr/lib/", tarfile.DIRTYPE, mode=0o755),
    member("./bin", tarfile.SYMTYPE, linkname="usr/bin"),
    member("./lib", tarfile.SYMTYPE, linkname="/usr/lib"),  # absolute: resolved inside the root
    member("./home/", tarfile.DIRTYPE, mode=0o755),
    member("./home/user/", tarfile.DIRTYPE, mode=0o700, uid=4321, gid=4321),
    member("./home/user/notes", data=b"mine", mode=0o600, uid=4321, gid=4321),  # no such user here
    member("./usr/bin/sudo-link", tarfile.LNKTYPE, linkname="./usr/bin/su"),
    member("./dev/", tarfile.DIRTYPE, mode=0o755),
    member("./dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
    member("./dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, major=8, minor=0),
    member("./run/", tarfile.DIRTYPE, mode=0o755),
    member("./run/initctl", tarfile.FIFOTYPE, mode=0o600),
    member("./lib/modules/6.1/extra.ko", data=b"\x7fELF module"),  # through the absolute link
    member("./readonly/", tarfile.DIRTYPE, mode=0o555),
    member("./readonly/file", data=b"in a read-only directory", mode=0o444),
)


def extract(archive: bytes, directory: Path, **options) -> rootfs.Extracted:
    directory.mkdir(exist_ok=True)
    return rootfs.extract(io.BytesIO(archive), directory, url=URL, **options)


def leftovers(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# --- what a root filesystem needs ----------------------------------------------------------------


def test_a_root_keeps_numeric_owners_modes_links_and_device_nodes(tmp_path):
    done = extract(tar_bytes(*ROOT_MEMBERS), tmp_path / "root")
    root = done.root
    assert root == tmp_path / "root" and done.members == len(ROOT_MEMBERS)
    su = (root / "usr/bin/su").stat()
    assert stat.S_IMODE(su.st_mode) == 0o4755, "the set-uid bit survives (chown before chmod)"
    notes = (root / "home/user/notes").stat()
    assert (notes.st_uid, notes.st_gid, stat.S_IMODE(notes.st_mode)) == (4321, 4321, 0o600)
    assert os.readlink(root / "bin") == "usr/bin" and os.readlink(root / "lib") == "/usr/lib"
    assert (root / "usr/lib/modules/6.1/extra.ko").read_bytes() == b"\x7fELF module"
    assert not Path("/usr/lib/modules/6.1/extra.ko").exists(), "the absolute link was followed on the worker"
    assert (root / "usr/bin/sudo-link").stat().st_ino == su.st_ino, "a hard link, not a copy"
    null, sda = (root / "dev/null").lstat(), (root / "dev/sda").lstat()
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_ISBLK(sda.st_mode) and sda.st_gid == 6 and stat.S_IMODE(sda.st_mode) == 0o660
    assert stat.S_ISFIFO((root / "run/initctl").lstat().st_mode)
    assert stat.S_IMODE((root / "readonly").stat().st_mode) == 0o555
    assert (root / "etc/hostname").stat().st_mtime == 1_600_000_000
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    scratch.remove_tree(tmp_path / "root")
    assert not (tmp_path / "root").exists(), "a read-only directory does not stop the removal"


def test_an_unprivileged_agent_skips_device_nodes_and_owners_and_counts_them():
    archive = tar_bytes(*ROOT_MEMBERS)
    out = Path(tempfile.mkdtemp(prefix="pumice-test-unprivileged-"))  # pytest's tmp_path is root's only
    try:
        os.chown(out, 65534, 65534)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child drops root, as an agent run by an unprivileged user
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                done = rootfs.extract(io.BytesIO(archive), out, url=URL, reserve=0)
                os.write(write, f"{done.devices_skipped} {done.members}".encode())
            except BaseException as exc:  # noqa: BLE001 (reported to the parent)
                os.write(write, repr(exc).encode())
            finally:
                os._exit(0)
        os.close(write)
        answer = os.read(read, 4096).decode()
        os.waitpid(pid, 0)
        os.close(read)
        assert answer.split() == ["2", str(len(ROOT_MEMBERS))], "/dev/null and /dev/sda skipped, the rest made"
        assert stat.S_ISFIFO((out / "run/initctl").lstat().st_mode), "a fifo needs no privilege"
        assert (out / "home/user/notes").stat().st_uid == 65534, "owners are the agent's own"
        assert stat.S_IMODE((out / "usr/bin/su").stat().st_mode) == 0o755, "no set-uid bit without root"
    finally:
        scratch.remove_tree(out)


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz", "zstd", None])
def test_each_compression_is_read_from_its_magic_when_the_job_names_none(tmp_path, compression):
    archive = compress(tar_bytes(*ROOT_MEMBERS), compression)
    done = extract(archive, tmp_path / "root")
    assert done.compression == compression
    assert (done.root / "etc/hostname").read_bytes() == b"board\n"
    assert done.compressed_bytes == len(archive)


def test_a_wrong_compression_says_to_check_the_compression_key(tmp_path):
    archive = compress(tar_bytes(*ROOT_MEMBERS), "xz")
    with pytest.raises(JobError, match=r"gzip exited 1: .*not in gzip format.*corresponding to the image file type"):
        extract(archive, tmp_path / "root", compression="gz")
    assert leftovers(tmp_path / "root") == []
    with pytest.raises(JobError, match="Unknown 'compression' format 'lz4'"):
        extract(archive, tmp_path / "root", compression="lz4")


def test_checksums_are_computed_on_the_compressed_stream_and_a_mismatch_removes_the_tree(tmp_path):
    archive = compress(tar_bytes(*ROOT_MEMBERS), "xz")
    good = {"md5": hashlib.md5(archive).hexdigest(), "sha256": hashlib.sha256(archive).hexdigest(),
            "sha512": hashlib.sha512(archive).hexdigest()}
    done = extract(archive, tmp_path / "root", checksums=good)
    assert done.digests == good
    scratch.remove_tree(done.directory, keep_top=True)
    bad = {"sha256": "0" * 64}
    with pytest.raises(JobError, match=rf"sha256 for '{URL}' does not match: expected 0{{64}}, "
                                       rf"downloaded {good['sha256']}"):
        extract(archive, tmp_path / "root", checksums=bad)
    assert leftovers(tmp_path / "root") == []
    assert rootfs.checksums_of({"md5sum": "ABC ", "sha512sum": "d", "url": "x"}) == {"md5": "abc", "sha512": "d"}


def test_a_truncated_xz_archive_is_a_job_error_that_quotes_xz(tmp_path):
    archive = compress(tar_bytes(*ROOT_MEMBERS, member("big", data=os.urandom(300_000))), "xz")
    with pytest.raises(JobError, match=r"Unable to unpack .*(xz exited 1: xz: \(stdin\): Unexpected end of input|"
                                       r"unexpected end of data)"):
        extract(archive[: len(archive) * 2 // 3], tmp_path / "root")
    assert leftovers(tmp_path / "root") == []


def test_a_download_shorter_than_announced_is_an_infrastructure_error(tmp_path):
    archive = compress(tar_bytes(*ROOT_MEMBERS), "gz")
    with pytest.raises(InfrastructureError, match=rf"Download finished \({len(archive)} bytes\) but was not "
                                                  rf"expected size \({len(archive) + 10} bytes\)"):
        extract(archive, tmp_path / "root", expected_size=len(archive) + 10)
    assert leftovers(tmp_path / "root") == []


class Streamed(io.BytesIO):
    """A download read as it comes (not seekable: gzip's and xz's sizes at the end are unknown)."""

    def seekable(self) -> bool:
        return False


class Cut(io.BytesIO):
    """A download whose connection breaks after ``after`` bytes."""

    def __init__(self, data: bytes, after: int) -> None:
        super().__init__(data)
        self.after = after

    def read(self, size: int = -1) -> bytes:
        if self.tell() >= self.after:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(min(size, self.after - self.tell()) if size >= 0 else self.after - self.tell())


def test_a_connection_cut_during_the_download_is_an_infrastructure_error(tmp_path):
    archive = compress(tar_bytes(*ROOT_MEMBERS, member("big", data=os.urandom(400_000))), "xz")
    (tmp_path / "root").mkdir()
    with pytest.raises(InfrastructureError, match="download of .* failed: .*Connection reset by peer"):
        rootfs.extract(Cut(archive, 200_000), tmp_path / "root", url=URL)
    assert leftovers(tmp_path / "root") == []


def test_modules_extracted_onto_a_merged_usr_root_land_in_usr_lib(tmp_path):
    """LAVA's install_modules: lib/modules/... of the modules archive, into a root whose /lib is a
    link to usr/lib; the root keeps its mode and files."""
    done = extract(tar_bytes(*ROOT_MEMBERS), tmp_path / "root")
    os.chmod(done.root, 0o750)
    modules = compress(tar_bytes(member("lib/", tarfile.DIRTYPE), member("lib/modules/", tarfile.DIRTYPE),
                                 member("lib/modules/6.1.0/", tarfile.DIRTYPE),
                                 member("lib/modules/6.1.0/kernel/fs/nfs.ko", data=b"\x7fELF nfs")), "gz")
    rootfs.extract(io.BytesIO(modules), done.root, url=URL, onto=True)
    assert (done.root / "usr/lib/modules/6.1.0/kernel/fs/nfs.ko").read_bytes() == b"\x7fELF nfs"
    assert os.readlink(done.root / "lib") == "/usr/lib", "the link stays a link"
    assert stat.S_IMODE(done.root.stat().st_mode) == 0o750 and (done.root / "etc/hostname").exists()
    with pytest.raises(rootfs.MemberRefused):
        rootfs.extract(io.BytesIO(tar_bytes(member("../x", data=b"x"))), done.root, url=URL, onto=True)
    assert (done.root / "etc/hostname").exists(), "a refused overlay does not take the root along"


# --- prefix (LAVA: the board's root is a directory of the archive) ----------------------------


def test_a_prefix_makes_a_directory_of_the_archive_the_root(tmp_path):
    archive = tar_bytes(member("rootfs/", tarfile.DIRTYPE), member("rootfs/etc/", tarfile.DIRTYPE),
                        member("rootfs/etc/os-release", data=b"ID=debian\n"), member("README", data=b"x"))
    done = extract(archive, tmp_path / "root", prefix="rootfs/")
    assert done.root == tmp_path / "root" / "rootfs"
    assert (done.root / "etc/os-release").read_bytes() == b"ID=debian\n"
    scratch.remove_tree(done.directory, keep_top=True)
    with pytest.raises(JobError, match=f"prefix 'missing/' is not a directory of {URL}"):
        extract(archive, tmp_path / "root", prefix="missing/")
    assert leftovers(tmp_path / "root") == []
    assert rootfs.check_prefix("/abs/") == "prefix must not be an absolute path"
    assert rootfs.check_prefix("rootfs") == "prefix must be a directory and end with /"
    assert rootfs.check_prefix("rootfs/") is None


# --- hostile archives ----------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A directory beside the root that no member may touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim").write_text("untouched")
    return path


def refused(tmp_path, outside, *members, match: str) -> None:
    with pytest.raises(rootfs.MemberRefused, match=match):
        extract(tar_bytes(*members), tmp_path / "root")
    assert leftovers(tmp_path / "root") == [], "the partial tree is removed"
    assert leftovers(outside) == ["victim"] and (outside / "victim").read_text() == "untouched"


def test_a_member_climbing_out_with_dot_dot_is_refused_by_name(tmp_path, outside):
    refused(tmp_path, outside, member("./etc/", tarfile.DIRTYPE), member("etc/../../outside/victim", data=b"owned"),
            match=r"archive member 'etc/../../outside/victim' would write outside the root with '\.\.'")


def test_a_dot_dot_that_stays_inside_is_extracted_as_lava_does(tmp_path):
    done = extract(tar_bytes(member("a/", tarfile.DIRTYPE), member("a/../b", data=b"in")), tmp_path / "root")
    assert (done.root / "b").read_bytes() == b"in"


def test_a_write_through_a_symbolic_link_that_leads_out_is_refused(tmp_path, outside):
    refused(tmp_path, outside, member("escape", tarfile.SYMTYPE, linkname="../outside"),
            member("escape/victim", data=b"owned"),
            match=r"archive member 'escape/victim' would write outside the root through the symbolic link "
                  r"/escape -> \.\./outside")


def test_a_write_through_an_absolute_link_stays_in_the_root(tmp_path, outside):
    done = extract(tar_bytes(member("escape", tarfile.SYMTYPE, linkname=str(outside)),
                             member("escape/victim", data=b"inside")), tmp_path / "root")
    assert (done.root / outside.relative_to("/") / "victim").read_bytes() == b"inside"
    assert (outside / "victim").read_text() == "untouched"


def test_a_hard_link_to_a_file_outside_is_refused(tmp_path, outside):
    refused(tmp_path, outside, member("grab", tarfile.LNKTYPE, linkname="../outside/victim"),
            match=r"archive member 'grab' would write outside the root with '\.\.'")


def test_a_hard_link_through_a_link_that_leads_out_is_refused(tmp_path, outside):
    refused(tmp_path, outside, member("up", tarfile.SYMTYPE, linkname=".."),
            member("grab", tarfile.LNKTYPE, linkname="up/outside/victim"),
            match=r"archive member 'grab' would write outside the root through the symbolic link /up -> \.\.")


def test_a_hard_link_to_an_absolute_path_names_the_file_of_the_root(tmp_path, outside):
    archive = tar_bytes(member("etc/", tarfile.DIRTYPE), member("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
                        member("copy", tarfile.LNKTYPE, linkname="/etc/passwd"))
    done = extract(archive, tmp_path / "root")
    assert (done.root / "copy").stat().st_ino == (done.root / "etc/passwd").stat().st_ino


def test_a_member_replacing_a_link_never_writes_through_it(tmp_path, outside):
    done = extract(tar_bytes(member("victim", tarfile.SYMTYPE, linkname=str(outside / "victim")),
                             member("victim", data=b"replaced")), tmp_path / "root")
    assert not (done.root / "victim").is_symlink() and (done.root / "victim").read_bytes() == b"replaced"
    assert (outside / "victim").read_text() == "untouched"


def test_an_absolute_member_name_is_taken_inside_the_root(tmp_path, outside):
    done = extract(tar_bytes(member(str(outside / "victim"), data=b"inside")), tmp_path / "root")
    assert (done.root / outside.relative_to("/") / "victim").read_bytes() == b"inside"
    assert (outside / "victim").read_text() == "untouched"


# --- the disk ------------------------------------------------------------------------------------


def test_an_archive_declaring_more_than_the_disk_holds_is_refused_before_writing(tmp_path, tmpfs):
    disk = tmpfs("disk", 4 << 20)
    archive = compress(tar_bytes(member("zeros", data=b"\0" * (8 << 20))), "xz")
    path = tmp_path / "archive.tar.xz"
    path.write_bytes(archive)
    with path.open("rb") as source, pytest.raises(InfrastructureError, match=(
            r"not enough space on the worker for .*: the archive declares 8396800 bytes, \d+ bytes free in "
            rf"{disk.path}/root, 0 kept in reserve")):
        (disk.path / "root").mkdir()
        rootfs.extract(source, disk.path / "root", url=URL, reserve=0)
    assert leftovers(disk.path / "root") == []


def test_a_disk_that_fills_during_extraction_names_the_member_and_leaves_nothing(tmp_path, tmpfs):
    disk = tmpfs("disk", 4 << 20)
    files = [member(f"data/{n}", data=os.urandom(600_000)) for n in range(10)]
    archive = compress(tar_bytes(member("data/", tarfile.DIRTYPE), *files), "gz")
    (disk.path / "root").mkdir()
    with pytest.raises(InfrastructureError, match=r"no space left on the worker for archive member 'data/\d' "
                                                  r"\(600000 bytes\)"):
        rootfs.extract(Streamed(archive), disk.path / "root", url=URL, reserve=0)  # no size declared
    assert leftovers(disk.path / "root") == []
    assert disk.free() > 3 << 20


def test_enospc_itself_is_reported_with_the_member(tmp_path, tmpfs):
    disk = tmpfs("disk", 2 << 20)
    # many small files: the space check per member passes, the inodes and blocks run out anyway
    files = [member(f"f{n:05d}", data=b"x" * 3000) for n in range(1200)]
    with pytest.raises(InfrastructureError, match=r"no space left on the worker"):
        extract(tar_bytes(*files), disk.path / "root", reserve=0)
    assert leftovers(disk.path / "root") == []


# --- streaming: from HTTP, in bounded memory ----------------------------------------------------


def test_a_download_is_extracted_while_it_streams_from_http_in_bounded_memory(tmp_path, http_server,
                                                                             nfs_root_images):
    """The DUT's Debian root (xz -6) over HTTP: no archive on disk, the tree identical to the archive's
    listing, and the memory of the whole process tree (python and xz) bounded: the extraction adds
    the xz window (8 MiB at -6), xz itself and a few buffers to what the runner holds."""
    archive = nfs_root_images.amd64_rootfs
    served = http_server.root / "nfs-rootfs.tar.xz"
    served.unlink(missing_ok=True)
    served.symlink_to(archive)
    expected = hashlib.sha256(archive.read_bytes()).hexdigest()
    script = tmp_path / "extract.py"
    script.write_text(f"""
import http.client, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from pathlib import Path
from agent import rootfs
connection = http.client.HTTPConnection("127.0.0.1", {http_server.port}, timeout=30)
connection.request("GET", "/nfs-rootfs.tar.xz")
body = connection.getresponse()
print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0], flush=True)
sys.stdin.readline()  # the meter starts
done = rootfs.extract(body, Path({str(tmp_path / 'out')!r}), url="nfs-rootfs.tar.xz", compression="xz",
                      checksums={{"sha256": {expected!r}}}, expected_size=int(body.headers["Content-Length"]))
print(done.members, done.file_bytes, round(done.seconds, 2), flush=True)
""")
    (tmp_path / "out").mkdir()
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        before = int(proc.stdout.readline())
        peak, deadline = 0, time.monotonic() + 300
        proc.stdin.write("go\n")
        proc.stdin.flush()
        while proc.poll() is None and time.monotonic() < deadline:
            peak = max(peak, rss_kb(proc.pid))
            time.sleep(0.005)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    members, size, seconds = out.split()
    assert int(members) > 5000 and int(size) > 100 << 20
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        name.strip("./") for name in subprocess.run(["tar", "-tJf", str(archive), "--exclude=./*/*"], text=True,
                                                     capture_output=True, check=True).stdout.split()
        if name.strip("./")), "the root's top directories, and no intermediate archive"
    grown = peak - before
    print(f"extracting {int(size) >> 20} MiB ({members} members) in {seconds} s: process tree peak {peak >> 10} MiB, "
          f"{grown >> 10} MiB above the python process before the extraction")
    # xz -6 decodes with an 8 MiB window: that, xz itself and the buffers are all the extraction adds;
    # the rest is the interpreter and its imports (here http.client and ssl, as a runner has them)
    assert grown < 12 << 10, f"the extraction grew the process tree by {grown} kB"


def test_the_declared_size_is_read_from_xz_and_gzip_files_and_zstd_headers(tmp_path):
    data = tar_bytes(member("zeros", data=b"\0" * 100_000))
    for compression in ("xz", "gz"):
        path = tmp_path / f"a.{compression}"
        path.write_bytes(compress(data, compression))
        with path.open("rb") as source:
            assert compressed.declared_size(source.read(10), source, compression) == len(data)
            assert source.tell() == 10, "the stream is put back where it was"
    head = subprocess.run(["zstd", "-q", "-c", "-"], input=data, capture_output=True, check=True).stdout[:32]
    assert compressed.declared_size(head, None, "zstd") is None, "zstd reading a pipe writes no size"
    file = tmp_path / "a.tar"
    file.write_bytes(data)
    head = subprocess.run(["zstd", "-q", "-c", str(file)], capture_output=True, check=True).stdout[:32]
    assert compressed.declared_size(head, None, "zstd") == len(data)
    with urllib.request.urlopen(file.as_uri()) as body:
        assert compressed.declared_size(b"", body, None) is None
