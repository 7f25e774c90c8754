"""Deploy ``to: tftp``: download the kernel, ramdisk, dtb, modules and tee, put the test overlay
(and the modules) into the ramdisk, and place the files for the bootloader under a per-job
directory of the worker's TFTP root.

Kernel types as LAVA handles them (``kernel.type``): ``image`` boots with ``booti``, ``zimage`` with
``bootz``, ``uimage`` with ``bootm``; a kernel whose command the device has no load addresses for
is wrapped in a U-Boot header and booted with ``bootm``. A ramdisk with ``header: u-boot`` loses
its header before the overlay goes in; devices whose deploy parameters say ``add_header: u-boot``
get it (back) at the end, so the ``bootX`` line can name the ramdisk by address alone.

The overlay and the modules are appended to the ramdisk as extra cpio archives (the kernel
unpacks them in turn): the ramdisk is never unpacked or recompressed. NFS roots (``nfsrootfs``,
``persistent_nfs``) and ``preseed`` files are not supported yet.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import voluptuous as v

from agent import scratch
from agent.actions.deploy.download import IMAGE_KEYS, DownloaderAction, download_together
from agent.actions.deploy.overlay import DeployDeviceEnvironment, OverlayAction
from agent.device import DeviceConfig, Needs
from agent.errors import InfrastructureError, JobError
from agent.overlay import append_to_ramdisk
from agent.pipeline import Action, LevelOnly, register
from agent.schema import action_base
from agent.timeout import Deadline

#: LAVA's TFTP_SIZE_LIMIT: a TFTP transfer (16-bit block numbers, rollover) tops out around 4 GiB
TFTP_SIZE_LIMIT = 4 * 1024 * 1024 * 1024
#: the images a tftp deploy may carry, in LAVA's download order (the levels follow it)
TFTP_IMAGES = ("ramdisk", "kernel", "dtb", "modules", "tee")
#: the files placed in the TFTP directory for the bootloader
TFTP_FILES = ("kernel", "ramdisk", "dtb", "tee")
#: kernel type -> the U-Boot command that boots it natively
NATIVE_BOOT = {"image": "booti", "zimage": "bootz", "uimage": "bootm"}

# U-Boot legacy image header (include/image.h): 64 bytes, big endian
UIMAGE_MAGIC = 0x27051956
UIMAGE_HEADER_SIZE = 64
_UIMAGE = struct.Struct(">IIIIIIIBBBB32s")
#: mkimage -A names -> IH_ARCH codes
UIMAGE_ARCH = {"arm": 2, "x86": 3, "i386": 3, "mips": 5, "mips64": 6, "powerpc": 7, "ppc": 7,
               "arm64": 22, "x86_64": 24, "riscv": 26}
UIMAGE_TYPE = {"kernel": 2, "ramdisk": 3}
_IH_OS_LINUX = 5
_IH_COMP_NONE = 0


def uimage_header(data: bytes, image_type: str, arch: str, load: int = 0, entry: int = 0,
                  name: str = "") -> bytes:
    """The U-Boot legacy header ``mkimage -A arch -O linux -T image_type -C none -a load -e entry``
    puts in front of ``data`` (with a zero timestamp, so the same input gives the same bytes)."""
    if arch not in UIMAGE_ARCH:
        raise JobError(f"mkimage_arch {arch!r} is not known; known: {', '.join(sorted(UIMAGE_ARCH))}")
    fields = [UIMAGE_MAGIC, 0, 0, len(data), load, entry, zlib.crc32(data), _IH_OS_LINUX,
              UIMAGE_ARCH[arch], UIMAGE_TYPE[image_type], _IH_COMP_NONE, name.encode()[:31]]
    fields[1] = zlib.crc32(_UIMAGE.pack(*fields))
    return _UIMAGE.pack(*fields)


def has_uimage_header(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4)
    return len(head) == 4 and struct.unpack(">I", head)[0] == UIMAGE_MAGIC


def strip_uimage_header(path: Path) -> None:
    """Remove the 64-byte U-Boot header of the file at ``path`` (in place)."""
    data = path.read_bytes()
    path.write_bytes(data[UIMAGE_HEADER_SIZE:])


def add_uimage_header(source: Path, dest: Path, image_type: str, arch: str, load: int = 0,
                      entry: int = 0) -> None:
    data = source.read_bytes()
    with open(dest, "wb") as out:
        out.write(uimage_header(data, image_type, arch, load, entry, name=source.name))
        out.write(data)


def boot_command(kernel_type: str, device: DeviceConfig) -> str:
    """The ``bootX`` command for a kernel of ``kernel_type`` on ``device`` (LAVA's rule): the native
    command when the device has load addresses for it, else ``bootm`` (after a conversion). As in
    LAVA, only the exact names ``image``, ``zimage`` and ``uimage`` are native: any other type
    (``zImage``, ``bzimage``) is booted with ``bootm`` after a conversion to a uImage."""
    native = NATIVE_BOOT.get(kernel_type, "bootm")
    return native if native in device.parameters else "bootm"


def _image(extra: dict | None = None) -> dict:
    return {**IMAGE_KEYS, **(extra or {})}


@register("deploy", "tftp")
class TftpAction(Action):
    """Download the images, prepare kernel and ramdisk, and place them in a directory of the TFTP
    root for the bootloader; the directory is removed at the end of the job."""

    name = "tftp-deploy"
    description = "download files and deploy using tftp"
    summary = "tftp deployment"
    needs = Needs(deploy_method="tftp",
                  why="the device has no 'tftp' deploy method (it is not booted by a bootloader over TFTP)")

    @classmethod
    def schema(cls) -> dict:
        return {
            **action_base(),
            v.Required("to"): "tftp",
            v.Required("kernel", msg="a tftp deploy needs a kernel"): _image(
                {v.Optional("type"): str}),  # any: see boot_command
            v.Optional("ramdisk"): _image({v.Optional("header"): v.Any("u-boot", msg="expected u-boot")}),
            v.Optional("dtb"): _image(),
            v.Optional("modules"): _image({v.Optional("path"): str}),  # LAVA's jobs carry it; unused
            v.Optional("tee"): _image(),
            v.Optional("preseed"): _image(),
            v.Exclusive("nfsrootfs", "nfs"): _image({v.Optional("prefix"): str, v.Optional("apply-overlay"): bool}),
            v.Exclusive("persistent_nfs", "nfs"): {v.Required("address"): str,
                                                   v.Optional("install_overlay"): bool},
            v.Optional("os"): str,
            v.Optional("authorize"): "ssh",
        }

    def __init__(self) -> None:
        super().__init__()
        #: the per-job directory in the TFTP root, once made
        self.directory: Path | None = None
        self.has_tests = False

    def populate(self, parameters: dict) -> None:
        pipeline = self.child_pipeline(parameters)
        self.has_tests = bool(self.context.tests_after)
        for key in TFTP_IMAGES:
            if key in parameters:
                image = dict(parameters[key])
                if key == "ramdisk":
                    # a ramdisk is used as it comes (compressed): the kernel decompresses it
                    image.pop("compression", None)
                pipeline.add(DownloaderAction(key, image))
        download_together(pipeline)
        pipeline.add(PrepareOverlayTftp(self.has_tests))
        pipeline.add(LxcCreateUdevRule())
        if self.has_tests:
            pipeline.add(DeployDeviceEnvironment())

    def validate(self) -> None:
        super().validate()
        for key, what in (("nfsrootfs", "an NFS root filesystem"), ("persistent_nfs", "a persistent NFS "
                          "root"), ("preseed", "an installer preseed file")):
            if key in self.parameters:
                self.errors.append(f"{key}: not implemented: booting with {what}")
        ramdisk = self.parameters.get("ramdisk")
        nfs = "nfsrootfs" in self.parameters or "persistent_nfs" in self.parameters
        if "modules" in self.parameters and not ramdisk and not nfs:  # with an NFS root: they go there
            self.errors.append("modules: there is no ramdisk to install them into")
        if self.has_tests and not nfs and (not ramdisk or ramdisk.get("install_overlay") is False):
            self.errors.append("the test actions after this deploy need the test overlay in a ramdisk: "
                               "deploy a ramdisk (without install_overlay: false)")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        root = scratch.tftp_root(self.job.dispatcher)
        if not root.is_dir():
            raise InfrastructureError(f"the TFTP root {root} does not exist: create it, or set tftp_root in "
                                      "the worker's dispatcher configuration")
        try:
            self.directory = scratch.make(self.job.job_id, root)
            self.directory.chmod(0o755)  # the TFTP server usually runs as another user
        except OSError as exc:
            raise InfrastructureError(f"cannot write to the TFTP root {root}: {exc.strerror}") from None
        connection = super().run(connection, deadline)
        limit = int(self.job.dispatcher.get("tftp_size_limit") or TFTP_SIZE_LIMIT)
        downloads = self.job.data.downloads
        for key in TFTP_FILES:
            if key not in self.parameters or key not in downloads:
                continue
            source = downloads[key]
            size = source.stat().st_size
            if size >= limit:
                raise JobError(f"cannot send {source.name} ({key}) over TFTP: file too large "
                               f"({size} >= {limit} bytes)")
            folder = self.directory / key
            folder.mkdir(mode=0o755, exist_ok=True)
            dest = folder / source.name
            shutil.move(source, dest)
            dest.chmod(0o644)
            downloads[key] = dest
            self.job.data.tftp_files[key] = str(dest.relative_to(root))
        for key, path in sorted(self.job.data.tftp_files.items()):
            self.logger.debug(f"tftp {key}: {path}")
        self.results["directory"] = str(self.directory)
        return connection

    def cleanup(self, connection: Any) -> None:
        super().cleanup(connection)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


class LxcCreateUdevRule(LevelOnly):
    """LAVA's lxc-create-udev-rule-action: no container here, but the same check of the device's
    ``device_info`` LAVA makes (a placeholder USB id is a device that is not set up)."""

    name = "lxc-create-udev-rule-action"
    description = "create lxc udev rule action"
    summary = "create lxc udev rule"
    reason = "the job uses no lava-lxc protocol"

    def validate(self) -> None:
        super().validate()
        info = self.device.device_info
        if info is None:
            return
        if not isinstance(info, list):
            self.errors.append("the device's device_info is not a list")
            return
        # devices identified by a file system label (mps, recovery) need no board id, as in LAVA
        by_label = any(method in self.device.boot_methods or method in self.device.deploy_methods
                       for method in ("mps", "recovery"))
        for usb in info:
            usb = usb if isinstance(usb, dict) else {}
            if not by_label and str(usb.get("board_id", "")) in ("", "0000000000"):
                self.errors.append("the device's device_info has no board_id (unset or 0000000000)")
            for key in ("usb_vendor_id", "usb_product_id"):
                if str(usb.get(key, "")) == "0000":
                    self.errors.append(f"the device's device_info has {key} 0000 (unset)")


class PrepareOverlayTftp(Action):
    """Put the test overlay and the modules into the ramdisk, and prepare kernel and ramdisk for
    the bootloader."""

    name = "prepare-tftp-overlay"
    description = "extract ramdisk or nfsrootfs in preparation for lava overlay"
    summary = "extract ramdisk or nfsrootfs"

    def __init__(self, has_tests: bool) -> None:
        super().__init__()
        self.has_tests = has_tests

    def populate(self, parameters: dict) -> None:
        # LAVA's children, each always there: one with nothing to do for this job holds its level
        pipeline = self.child_pipeline(parameters)
        ramdisk = parameters.get("ramdisk")
        pipeline.add(LevelOnly("extract-nfsrootfs", "the job has no NFS root"))
        pipeline.add(OverlayAction() if self.has_tests else LevelOnly("lava-overlay", "no test action follows"))
        pipeline.add(ExtractRamdisk(self.has_tests) if ramdisk else
                     LevelOnly("extract-overlay-ramdisk", "the job has no ramdisk"))
        pipeline.add(ExtractModules() if ramdisk and "modules" in parameters else
                     LevelOnly("extract-modules", "no modules to put into a ramdisk"))
        pipeline.add(ApplyOverlayTftp() if ramdisk and self.has_tests else
                     LevelOnly("apply-overlay-tftp", "no overlay to put into a ramdisk"))
        if "u-boot" in self.device.boot_methods:
            pipeline.add(PrepareKernelAction())
        pipeline.add(LevelOnly("configure-preseed-file", "the job has no preseed file"))
        pipeline.add(CompressRamdisk() if ramdisk else LevelOnly("compress-ramdisk", "the job has no ramdisk"))


def _installs(parameters: dict, what: str) -> bool:
    """Whether the ramdisk takes the overlay or the modules (``install_overlay``/``install_modules``)."""
    return (parameters.get("ramdisk") or {}).get(f"install_{what}", True) is not False


class ExtractRamdisk(Action):
    """Make the downloaded ramdisk ready for the overlay: drop its U-Boot header (``header: u-boot``).
    The ramdisk itself stays packed: what goes in is appended to it."""

    name = "extract-overlay-ramdisk"
    description = "extract ramdisk to a temporary directory"
    summary = "extract the ramdisk"
    timeout_exception = InfrastructureError

    def __init__(self, has_tests: bool) -> None:
        super().__init__()
        self.has_tests = has_tests

    def run(self, connection: Any, deadline: Deadline) -> Any:
        ramdisk = self.job.data.downloads["ramdisk"]
        declared = self.parameters["ramdisk"].get("header") == "u-boot"
        found = has_uimage_header(ramdisk)
        receives = (self.has_tests and _installs(self.parameters, "overlay")) or (
            "modules" in self.parameters and _installs(self.parameters, "modules"))
        if not receives:
            return connection  # used as it came, header and all
        if declared and not found:
            raise JobError(f"ramdisk {ramdisk.name}: 'header: u-boot' is set but the file has no U-Boot "
                           "header")
        if found and not declared:
            raise JobError(f"ramdisk {ramdisk.name} has a U-Boot header: add 'header: u-boot' to the ramdisk "
                           "so that it is removed before the overlay goes in")
        if declared:
            strip_uimage_header(ramdisk)
            self.logger.debug(f"ramdisk: U-Boot header removed from {ramdisk.name}")
        return connection


class ExtractModules(Action):
    """Append the modules tarball's contents to the ramdisk (``install_modules: false`` skips it)."""

    name = "extract-modules"
    description = "extract supplied kernel modules"
    summary = "extract kernel modules"
    timeout_exception = InfrastructureError

    def run(self, connection: Any, deadline: Deadline) -> Any:
        import tarfile
        import tempfile

        if not _installs(self.parameters, "modules"):
            self.logger.info("not adding the modules to the ramdisk (install_modules: false)")
            return connection
        modules = self.job.data.downloads["modules"]
        root = Path(tempfile.mkdtemp(prefix="modules-", dir=self.job.workdir))
        try:
            with tarfile.open(modules) as tar:
                tar.extractall(root, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise JobError(f"modules: {modules.name} is not a tar archive: {exc}") from None
        ramdisk = self.job.data.downloads["ramdisk"]
        before = ramdisk.stat().st_size
        try:
            append_to_ramdisk(ramdisk, root)
        except ValueError as exc:
            raise JobError(f"modules: {exc}") from None
        finally:
            shutil.rmtree(root, ignore_errors=True)
        self.logger.info(f"modules: {modules.name} appended to the ramdisk "
                         f"({ramdisk.stat().st_size - before} bytes)")
        return connection


class ApplyOverlayTftp(Action):
    """Append the test overlay to the ramdisk."""

    name = "apply-overlay-tftp"
    description = "unpack the overlay into the nfsrootfs or ramdisk"
    summary = "apply lava overlay test files"
    timeout_exception = InfrastructureError

    def run(self, connection: Any, deadline: Deadline) -> Any:
        root = self.job.data.overlay_root
        if root is None or not _installs(self.parameters, "overlay"):
            return connection
        ramdisk = self.job.data.downloads["ramdisk"]
        before = ramdisk.stat().st_size
        try:
            append_to_ramdisk(ramdisk, root)
        except ValueError as exc:
            raise JobError(f"ramdisk: {exc}") from None
        self.logger.info(f"ramdisk: test overlay appended ({ramdisk.stat().st_size - before} bytes)")
        return connection


class PrepareKernelAction(Action):
    """Holds the kernel conversion for the device's bootloader."""

    name = "prepare-kernel"
    description = "populates the pipeline with a kernel conversion action"
    summary = "add a kernel conversion"

    def populate(self, parameters: dict) -> None:
        self.child_pipeline(parameters).add(UBootPrepareKernelAction())


class UBootPrepareKernelAction(Action):
    """Make the kernel bootable by the device's U-Boot: append the dtb (``append_dtb``), and wrap a
    kernel the device cannot boot natively in a U-Boot header (booted with ``bootm``)."""

    name = "uboot-prepare-kernel"
    description = "convert kernel to uimage"
    summary = "prepare/convert kernel"
    timeout_exception = InfrastructureError

    @property
    def kernel_type(self) -> str | None:
        return (self.parameters.get("kernel") or {}).get("type")

    def validate(self) -> None:
        kernel_type = self.kernel_type
        if not kernel_type:
            return
        params = self.device.parameters
        command = boot_command(kernel_type, self.device)
        if command not in params:
            known = [name for name in ("booti", "bootm", "bootz") if name in params]
            native = f"{NATIVE_BOOT[kernel_type]} (or bootm)" if kernel_type in NATIVE_BOOT else "bootm"
            self.errors.append(f"kernel.type {kernel_type!r} needs the device's {native} load addresses; the "
                               f"device has: {', '.join(known) or 'none'}")
        if command == "bootm" and kernel_type != "uimage":
            arch = self.device.deploy_parameters.get("mkimage_arch")
            if not arch:
                self.errors.append("converting the kernel to a uImage needs mkimage_arch in the device's "
                                   "deploy parameters")
            elif arch not in UIMAGE_ARCH:
                self.errors.append(f"mkimage_arch {arch!r} is not known; known: "
                                   f"{', '.join(sorted(UIMAGE_ARCH))}")
        if self.device.deploy_parameters.get("append_dtb") and "dtb" not in self.parameters:
            self.errors.append("the device appends the dtb to the kernel (append_dtb) but the deploy has "
                               "no dtb")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        kernel_type = self.kernel_type
        if not kernel_type:
            return connection
        downloads = self.job.data.downloads
        kernel = downloads["kernel"]
        options = self.device.deploy_parameters
        if options.get("append_dtb"):
            joined = kernel.with_name("kernel-dtb")
            with open(joined, "wb") as out:
                for part in (kernel, downloads["dtb"]):
                    out.write(part.read_bytes())
            self.logger.info(f"appended {downloads['dtb'].name} to {kernel.name}")
            kernel = downloads["kernel"] = joined
        command = boot_command(kernel_type, self.device)
        if command == "bootm" and kernel_type != "uimage":
            params = self.device.parameters
            load = int(str(params.get("text_offset") or params["bootm"]["kernel"]), 16)
            entry = load + UIMAGE_HEADER_SIZE if options.get("use_xip") else load
            uimage = kernel.with_name("uImage")
            add_uimage_header(kernel, uimage, "kernel", options["mkimage_arch"], load, entry)
            self.logger.info(f"no {NATIVE_BOOT.get(kernel_type, 'native')} load addresses on this device: "
                             f"{kernel.name} "
                             f"converted to a uImage (load 0x{load:x}, entry 0x{entry:x})")
            downloads["kernel"] = uimage
        self.results["bootcommand"] = command
        return connection


class CompressRamdisk(Action):
    """Finish the ramdisk: add a U-Boot header when the device's deploy parameters ask for one
    (``add_header: u-boot``)."""

    name = "compress-ramdisk"
    description = "recreate a ramdisk with the overlay applied."
    summary = "compress ramdisk with overlay"
    timeout_exception = InfrastructureError

    def validate(self) -> None:
        add_header = self.device.deploy_parameters.get("add_header")
        if add_header is None:
            return
        if add_header != "u-boot":
            self.errors.append(f"the device's add_header {add_header!r} is not known; known: u-boot")
        arch = self.device.deploy_parameters.get("mkimage_arch")
        if not arch:
            self.errors.append("add_header: u-boot needs mkimage_arch in the device's deploy parameters")
        elif arch not in UIMAGE_ARCH:
            self.errors.append(f"mkimage_arch {arch!r} is not known; known: {', '.join(sorted(UIMAGE_ARCH))}")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        options = self.device.deploy_parameters
        if options.get("add_header") != "u-boot":
            return connection
        ramdisk = self.job.data.downloads["ramdisk"]
        if has_uimage_header(ramdisk):  # came with one and nothing was added to it
            return connection
        wrapped = ramdisk.with_name(ramdisk.name + ".uboot")
        add_uimage_header(ramdisk, wrapped, "ramdisk", options["mkimage_arch"])
        ramdisk.unlink()
        self.job.data.downloads["ramdisk"] = wrapped
        self.logger.debug(f"ramdisk: U-Boot header added ({wrapped.name})")
        return connection
