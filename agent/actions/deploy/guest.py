"""The test overlay as a separate disk for QEMU boards whose root file system is an image."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from agent.actions.deploy.overlay import results_dir
from agent.device import DeviceConfig
from agent.errors import InfrastructureError
from agent.overlay import results_path
from agent.pipeline import Action
from agent.timeout import Deadline

GUEST_LABEL = "LAVA"
#: the guest disk's file in the job's scratch directory
GUEST_IMAGE = "lava-guest.img"


def guest_parameters(device: DeviceConfig) -> Mapping:
    """The device's guest disk settings (``actions.deploy.methods.image.parameters.guest``)."""
    guest = device.deploy_methods.get("image", {}).get("guest")
    return guest if isinstance(guest, Mapping) else {}


def guest_drive(device: DeviceConfig, image: str) -> list[str]:
    """The QEMU arguments that attach the guest disk ``image`` as ``device`` configures it."""
    guest = guest_parameters(device)
    interface = guest.get("interface") or "ide"
    driveid = guest.get("driveid") or "lavatest"
    return ["-drive", f"format=raw,file={image},media=disk,if={interface},id={driveid}"]


class ApplyOverlayGuest(Action):
    """Put the overlay on an ext4 disk image attached to QEMU as the device's guest drive."""

    name = "apply-overlay-guest"
    description = "prepare a qcow2 drive containing the overlay"
    summary = "build a guest filesystem with the overlay"
    timeout_exception = InfrastructureError

    def __init__(self, into_ramdisk: bool = False) -> None:
        super().__init__()
        #: the overlay goes into a ramdisk (``overlays: {lava: true}``): no guest disk to build
        self.into_ramdisk = into_ramdisk

    def validate(self) -> None:
        if self.into_ramdisk:
            return
        self.require_tool("mke2fs", "mkfs.ext4", why="e2fsprogs builds the guest disk of the test overlay")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        import subprocess

        root = self.job.data.overlay_root
        if self.into_ramdisk:
            self.logger.debug(f"{self.name}: nothing to do here (the test overlay goes into the ramdisk)")
            return connection
        if root is None:
            return connection
        guest = guest_parameters(self.device)
        size_mb = int(guest.get("size") or 512)
        image = self.job.workdir / GUEST_IMAGE
        # the disk holds what /lava-<job id> holds: the test shell mounts it there
        content = root / PurePosixPath(results_path(self.job.job_id, results_dir(self.job))).name
        command = [shutil.which("mke2fs") or "mkfs.ext4", "-q", "-F", "-t", "ext4", "-L", GUEST_LABEL,
                   "-d", str(content), str(image), f"{size_mb}M"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=deadline.remaining())
        except subprocess.TimeoutExpired:
            raise self.timed_out("mke2fs") from None
        if done.returncode:
            raise InfrastructureError(f"cannot build the guest overlay disk: {done.stderr.strip()}")
        self.job.data.qemu_extra += guest_drive(self.device, str(image))
        self.job.data.guest_label = GUEST_LABEL
        self.logger.info(f"test overlay on a {size_mb} MB guest disk ({guest.get('interface') or 'ide'}, "
                         f"label {GUEST_LABEL})")
        return connection
