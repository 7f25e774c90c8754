#!/usr/bin/env python3
"""Build the container images Pumice's tests and lab boxes use, locally, from Debian packages.

No container registry is reachable from the lab's test machines, so every image starts from a
Debian ``minbase`` tree made by debootstrap and imported with ``podman import``; the others are
built on it with ``podman build`` (their ``apt-get`` steps use the host's network, so they reach
the same Debian mirror as the host). Images are tagged with the names real LAVA jobs use, so those
jobs run unchanged (``images: local`` and ``docker.image`` name them):

=============  =====================================================================================
base           a slim Debian 12 (docs, man pages and translations excluded)
               ``localhost/pumice/debian:bookworm``, ``docker.io/library/debian:{bookworm,latest}``
               (LAVA's own download-postprocess sample job and TuxLAVA's usbg jobs say ``debian``)
qemu           qemu-system-x86 and qemu-system-arm (with qemu-system-arm64, the name KernelCI's
               jobs call it by): ``boot: method: qemu`` with ``docker:``;
               ``docker.io/kernelci/qemu:latest`` (KernelCI),
               ``docker.io/linaro/lkft-qemu-should-not-used-for-long:latest`` (lava-test-plans' LKFT
               default)
lava-test      sh, coreutils, ssh client, ip, ping, nc: ``test: docker:`` host-side tests
               ``localhost/pumice/lava-test:bookworm``
mkbootimg      mkbootimg for ``postprocess: docker:`` steps of KernelCI's Qualcomm jobs
               ``ghcr.io/mwasilew/docker-mkbootimage:master``
=============  =====================================================================================

With ``--pumice``, also Pumice's own images, from ``deploy/containers/{agent,master}.Containerfile``
and the wheels of this tree (``localhost/pumice/agent:VERSION``, ``localhost/pumice/master:VERSION``,
both also ``:latest``).

The cache, ``CACHE/containers/``: ``debs/`` (debootstrap's packages: a rebuild of the base works
offline) and ``images.json`` (each image's recipe hash, id, size and build time). When the recipe and
the image in podman's storage match it, a run is a no-op. Concurrent runs wait for each other.

Usage: ``build_container_images.py [--cache DIR] [--pumice] [--only NAME...] [--force]``
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LOG = logging.getLogger("pumice.images")
ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "containers"
#: Bumped when images.json changes shape (the recipe hashes cover the recipes themselves).
STAMP_FORMAT = 1
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE = "localhost/pumice/debian:bookworm"

#: What dpkg never installs in the images (as Debian's "slim" images): documentation but the
#: copyright files, man and info pages, translations.
DPKG_SLIM = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
"""
#: apt in the images: no recommends, no translations, no package caches left behind.
APT_SLIM = """\
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""
#: The last step of every image's apt-get: nothing of apt's downloads stays in a layer.
APT_CLEAN = "apt-get clean && rm -rf /var/lib/apt/lists/*"


def apt_install(*packages: str) -> str:
    """A Containerfile RUN line installing ``packages`` and leaving no apt state in the layer."""
    return (f"RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            f"{' '.join(packages)} && {APT_CLEAN}")


@dataclass(frozen=True)
class ImageSpec:
    """One image: its name, the other names it is tagged with, and its Containerfile (None: the
    debootstrap'd base)."""

    key: str
    name: str
    tags: tuple[str, ...] = ()
    containerfile: str | None = None
    #: extra files of the build context, by name (the Containerfile COPYs them)
    context: dict[str, bytes] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.tags)


TEST_IMAGES: dict[str, ImageSpec] = {spec.key: spec for spec in [
    ImageSpec("base", BASE, ("docker.io/library/debian:bookworm", "docker.io/library/debian:latest")),
    ImageSpec("qemu", "localhost/pumice/qemu:bookworm",
              ("docker.io/kernelci/qemu:latest", "docker.io/linaro/lkft-qemu-should-not-used-for-long:latest"),
              "\n".join([f"FROM {BASE}",
                         apt_install("qemu-system-x86", "qemu-system-arm", "ipxe-qemu"),
                         # KernelCI's arm64 jobs call QEMU by this name
                         "RUN ln -s qemu-system-aarch64 /usr/bin/qemu-system-arm64",
                         'CMD ["qemu-system-x86_64", "-version"]', ""])),
    ImageSpec("lava-test", "localhost/pumice/lava-test:bookworm", (),
              "\n".join([f"FROM {BASE}",
                         apt_install("openssh-client", "iproute2", "iputils-ping", "netcat-openbsd",
                                     "procps"),
                         'CMD ["/bin/sh"]', ""])),
    ImageSpec("mkbootimg", "localhost/pumice/mkbootimg:bookworm", ("ghcr.io/mwasilew/docker-mkbootimage:master",),
              "\n".join([f"FROM {BASE}", apt_install("mkbootimg"), 'CMD ["/bin/sh"]', ""])),
]}


class BuildError(Exception):
    """An image could not be built; the message says which and why."""


def run(cmd: list[str], what: str, *, input: bytes | None = None, timeout: float = 1800,
        **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``; a failure is a BuildError saying ``what`` failed, with the end of its output."""
    LOG.debug("run: %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, **kwargs)
    except FileNotFoundError:
        raise BuildError(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what}: timed out after {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()[-15:]
        raise BuildError(f"{what} failed (exit status {done.returncode}):\n" + "\n".join(tail))
    return done


def podman(*args: str, what: str, **kwargs) -> str:
    return run(["podman", *args], what, **kwargs).stdout.decode().strip()


def recipe(spec: ImageSpec, base_id: str | None) -> str:
    """The hash that says whether ``spec`` must be rebuilt: its recipe and the base it starts from."""
    digest = hashlib.sha256(f"{STAMP_FORMAT}\n{spec.name}\n{spec.tags}\n".encode())
    if spec.containerfile is None:
        digest.update(f"{SUITE} {MIRROR}\n{DPKG_SLIM}{APT_SLIM}".encode())
    else:
        digest.update(f"{base_id}\n{spec.containerfile}".encode())
        for name in sorted(spec.context):
            digest.update(name.encode() + b"\0" + hashlib.sha256(spec.context[name]).digest())
    return digest.hexdigest()


def image_id(name: str) -> str | None:
    done = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", name],
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip() if done.returncode == 0 else None


def image_size(name: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", name, what=f"inspect {name}"))


def stamp_path(cache: Path) -> Path:
    return cache / "containers" / "images.json"


def load_stamp(cache: Path) -> dict:
    try:
        stamp = json.loads(stamp_path(cache).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) and stamp.get("format") == STAMP_FORMAT else {}


@contextlib.contextmanager
def build_lock(cache: Path) -> Iterator[None]:
    """One builder at a time for this cache (the tests of several sessions may start together)."""
    lockfile = cache / "containers" / ".lock"
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    with lockfile.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_base(cache: Path, spec: ImageSpec) -> None:
    """debootstrap a minbase tree, slim it, import it as ``spec.name``."""
    debs = cache / "containers" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pumice-rootfs-", dir=cache / "containers") as tmp:
        tree = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}", SUITE, str(tree), MIRROR],
            f"debootstrap {SUITE} (from {MIRROR})")
        (tree / "etc/dpkg/dpkg.cfg.d/01-pumice-slim").write_text(DPKG_SLIM)
        (tree / "etc/apt/apt.conf.d/01-pumice-slim").write_text(APT_SLIM)
        # what debootstrap installed before the excludes existed
        for doc in (tree / "usr/share/doc").rglob("*"):
            if doc.is_file() and doc.name != "copyright" or doc.is_symlink():
                doc.unlink()
        for name in ("man", "info", "lintian", "linda"):
            shutil.rmtree(tree / "usr/share" / name, ignore_errors=True)
        for locale in (tree / "usr/share/locale").glob("*"):
            if locale.name != "locale.alias":
                shutil.rmtree(locale, ignore_errors=True) if locale.is_dir() else locale.unlink()
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
            for path in (tree / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(tree), "--exclude=./dev/*",
                                "--exclude=./proc/*", "--exclude=./sys/*", "-c", "."], stdout=subprocess.PIPE)
        try:
            podman("import", "--change", 'CMD ["/bin/bash"]', "-", spec.name, what="podman import",
                   stdin=tar.stdout)
        finally:
            tar.stdout.close()
            if tar.wait(60) != 0:
                raise BuildError("tar of the debootstrap tree failed")


def build_derived(spec: ImageSpec) -> None:
    """``podman build`` of ``spec`` on the local base: never pulls, the host's network for apt."""
    with tempfile.TemporaryDirectory(prefix="pumice-build-") as tmp:
        context = Path(tmp)
        (context / "Containerfile").write_text(spec.containerfile or "")
        for name, data in spec.context.items():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            (context / name).write_bytes(data)
        podman("build", "--pull=never", "--network=host", "--layers", "-t", spec.name,
               "-f", str(context / "Containerfile"), str(context), what=f"podman build {spec.name}")


def build_images(cache: Path, specs: list[ImageSpec] | None = None, force: bool = False) -> dict:
    """Build what is missing or stale among ``specs`` (default: the test images); return the stamp:
    ``{"format", "images": {key: {"name", "names", "id", "size", "seconds", "recipe"}}}``."""
    specs = list(TEST_IMAGES.values()) if specs is None else specs
    with build_lock(cache):
        stamp = load_stamp(cache) or {"format": STAMP_FORMAT, "images": {}}
        known = stamp["images"]
        for spec in specs:
            base_id = image_id(BASE) if spec.containerfile else None
            wanted = recipe(spec, base_id)
            entry = known.get(spec.key) or {}
            current = image_id(spec.name)
            if (not force and current and entry.get("recipe") == wanted and entry.get("id") == current
                    and all(image_id(name) == current for name in spec.tags)):
                continue
            LOG.info("building %s", spec.name)
            start = time.monotonic()
            if spec.containerfile is None:
                build_base(cache, spec)
            else:
                build_derived(spec)
            for name in spec.tags:
                podman("tag", spec.name, name, what=f"podman tag {spec.name} {name}")
            known[spec.key] = {"name": spec.name, "names": list(spec.names), "id": image_id(spec.name),
                               "size": image_size(spec.name), "seconds": round(time.monotonic() - start, 1),
                               "recipe": wanted}
            stamp_path(cache).write_text(json.dumps(stamp, indent=1, sort_keys=True))
            LOG.info("built %s in %.0f s: %.1f MB", spec.name, known[spec.key]["seconds"],
                     known[spec.key]["size"] / 1e6)
        return stamp


# --- Pumice's own images ----------------------------------------------------------------------------


def pumice_version() -> str:
    from agent import __version__

    return __version__


def wheels(directory: Path) -> list[Path]:
    """The wheels of this tree and of every dependency of ``pumice[master]`` (built on the host:
    its pip reaches the package index, a container may not), into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(directory), f"{ROOT}[master]"],
        "pip wheel pumice[master]", timeout=900)
    return sorted(directory.glob("*.whl"))


def pumice_specs(cache: Path) -> list[ImageSpec]:
    """The agent's and the master's images, their contexts holding the wheels and deploy files."""
    with tempfile.TemporaryDirectory(prefix="pumice-wheels-") as tmp:
        found = wheels(Path(tmp))
        context = {f"wheels/{path.name}": path.read_bytes() for path in found}
    version = pumice_version()
    extra = {"agent": {}, "master": {"pumice-site.conf": ROOT / "deploy" / "nginx" / "pumice-site.conf",
                                     "entrypoint.sh": DEPLOY / "master-entrypoint.sh"}}
    specs = []
    for role in ("agent", "master"):
        files = dict(context) | {name: path.read_bytes() for name, path in extra[role].items()}
        specs.append(ImageSpec(role, f"localhost/pumice/{role}:{version}", (f"localhost/pumice/{role}:latest",),
                               (DEPLOY / f"{role}.Containerfile").read_text(), files))
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("PUMICE_CACHE") or "~/.cache/pumice").expanduser())
    parser.add_argument("--pumice", action="store_true", help="also Pumice's agent and master images")
    parser.add_argument("--only", nargs="*", metavar="NAME", help=f"only these: {', '.join(TEST_IMAGES)}, "
                        "agent, master")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    specs = list(TEST_IMAGES.values())
    if args.pumice or (args.only and {"agent", "master"} & set(args.only)):
        specs += pumice_specs(args.cache)
    if args.only:
        unknown = set(args.only) - {spec.key for spec in specs}
        if unknown:
            parser.error(f"unknown image {', '.join(sorted(unknown))}; known: {', '.join(s.key for s in specs)}")
        specs = [spec for spec in specs if spec.key in args.only or spec.key == "base"]
    try:
        stamp = build_images(args.cache, specs, force=args.force)
    except BuildError as exc:
        print(f"build_container_images: {exc}", file=sys.stderr)
        return 1
    for spec in specs:
        entry = stamp["images"][spec.key]
        print(f"{entry['name']:45} {entry['size'] / 1e6:7.1f} MB  built in {entry['seconds']:6.1f} s"
              f"  {' '.join(spec.tags)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
