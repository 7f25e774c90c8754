"""The test container images (tools/build_container_images.py): built locally from Debian packages,
tagged with the names real jobs use, holding what those jobs call, rebuilt only when their recipe
changes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import load_container_builder


def run_in(image: str, script: str) -> str:
    done = subprocess.run(["podman", "run", "--rm", "--pull=never", image, "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{image}: {script}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.mark.parametrize(("name", "script", "expected"), [
    # KernelCI's and LKFT's boot qemu docker jobs: the binaries they name (binary: qemu-system-arm64)
    # (and an x86 machine with a NIC starts: its BIOS and option ROM are found; -S: it never runs)
    ("docker.io/kernelci/qemu:latest", "qemu-system-arm64 -version; qemu-system-arm -version; "
     "timeout 3 qemu-system-x86_64 -S -display none -monitor none -nic user,model=virtio-net-pci; "
     "test $? = 124", "QEMU emulator version"),
    ("docker.io/linaro/lkft-qemu-should-not-used-for-long:latest", "/usr/bin/qemu-system-aarch64 -version",
     "QEMU emulator version"),
    # KernelCI's Qualcomm postprocess steps: cat, then mkbootimg
    ("ghcr.io/mwasilew/docker-mkbootimage:master", "cd /tmp && printf k > Image && printf d > b.dtb && "
     "cat Image b.dtb > Image+dtb && printf r > rootfs.cpio.gz && mkbootimg --kernel Image+dtb "
     "--cmdline console=ttyMSM0 --ramdisk rootfs.cpio.gz --pagesize 2048 --base 0x80000000 --output boot.img "
     "&& head -c 8 boot.img", "ANDROID!"),
    # LAVA's own download-postprocess sample job: image debian, cp and ls
    ("debian", "cp /etc/hostname /tmp/copy && ls -lhR /tmp | head -3", "copy"),
    # host-side tests: LAVA's test shell needs sh and coreutils; reaching the board needs ssh and ip
    ("localhost/pumice/lava-test:bookworm", "ssh -V 2>&1; ip -V; command -v ping nc sed awk", "OpenSSH"),
])
def test_each_image_holds_what_the_real_jobs_naming_it_call(container_images, name, script, expected):
    assert expected in run_in(name if "/" in name else f"docker.io/library/{name}:latest", script)


def test_the_images_are_slim_and_their_sizes_and_build_times_are_recorded(container_images):
    images = container_images["images"]
    for key in ("base", "qemu", "lava-test", "mkbootimg"):
        assert images[key]["size"] > 0 and images[key]["seconds"] > 0
    assert images["base"]["size"] < 90e6  # Debian's own bookworm-slim is 75 MB
    assert run_in("debian", "ls /usr/share/doc | wc -l; ls /usr/share/man 2>/dev/null | wc -l; "
                  "find /usr/share/doc -type f ! -name copyright | wc -l").split() == [
        run_in("debian", "ls /usr/share/doc | wc -l").strip(), "0", "0"]


def test_a_second_build_is_a_no_op(container_images):
    before = {key: entry["id"] for key, entry in container_images["images"].items()}
    start = time.monotonic()
    stamp = load_container_builder().build_images(Path(os.environ.get("PUMICE_CACHE") or "~/.cache/pumice")
                                                  .expanduser())
    assert time.monotonic() - start < 10
    assert {key: stamp["images"][key]["id"] for key in before} == before
