"""The U-Boot path without a board: LAVA's U-Boot sample jobs against the corpus's bbb-01 rendered
with Pumice's templates, the pipeline against LAVA's reference, placeholders and ``bootX``,
kernel types, U-Boot headers, connection settings and the pyserial console."""

from __future__ import annotations

import os
import shutil
import struct
import tty
import zlib
from pathlib import Path

import pytest
import yaml

from agent.actions.boot.bootloader import BootloaderCommandOverlay, substitute
from agent.actions.deploy.tftp import (
    UIMAGE_HEADER_SIZE,
    UIMAGE_MAGIC,
    boot_command,
    has_uimage_header,
    strip_uimage_header,
    uimage_header,
)
from agent.connections.serial import SerialConsole, connect_command, is_serial_url, serial_settings
from agent.device import DeviceConfig
from agent.errors import InfrastructureError, JobError
from agent.job import Job, load_job, parse_job, validate_job
from agent.logger import JobLogger
from agent.timeout import Deadline

# sample job -> None when it validates, else the words its faults may use (what is unsupported)
EXPECTED = {
    "uboot-ramdisk.yaml": None,
    "bbb-group-vland-alpha.yaml": ("protocol", "NFS"),
    "bbb-group-vland-beta.yaml": ("protocol", "NFS"),
    "bbb-initrd-nbd.yaml": ("protocol", "nbd", "NBD"),
    "bbb-lxc-notest.yaml": ("protocol", "lxc"),
    "bbb-lxc.yaml": ("protocol", "lxc"),
    "bbb-nfs-url.yaml": ("NFS",),
    "bbb-ramdisk-nfs.yaml": ("NFS",),
    "bbb-skip-install.yaml": ("NFS", "kernel.type"),  # no kernel type: {BOOTX} could not be filled
    "bbb-ssh-guest.yaml": ("unknown key",),  # a MultiNode sub-job for an ssh guest
    "bbb-uboot-interactive.yaml": ("interactive",),  # boot method bootloader runs; interactive tests do not
    "bbb-uinitrd-nfs.yaml": ("NFS",),
    "uboot-multiple.yaml": ("NFS", "kernel.type"),
    "uboot-nfs.yaml": ("NFS",),
    "uboot-persistent.yaml": ("NFS",),
    "uboot-ramdisk-inline-commands.yaml": ("transfer_overlay",),
    "uboot.yaml": ("NFS",),
}

#: a device dictionary of the emulated board that needs no running board
DICTIONARY = """\
{% extends 'qemu-arm64-uboot.jinja2' %}
{% set connection_command = 'telnet 127.0.0.1 7001' %}
{% set power_on_command = 'pdu on 1' %}
{% set power_off_command = 'pdu off 1' %}
{% set hard_reset_command = 'pdu reboot 1' %}
"""

JOB = """\
device_type: qemu-arm64-uboot
job_name: unit
timeouts: {job: {minutes: 5}}
visibility: public
actions:
- deploy:
    to: tftp
    kernel: {url: 'file:///images/Image', type: image}
    ramdisk: {url: 'file:///images/initramfs.cpio.gz', compression: gz}
    dtb: {url: 'file:///images/virt.dtb'}
- boot:
    method: u-boot
    commands: ramdisk
    prompts: ['/ # ']
"""


def render(dictionary: str, templates: Path | None = None, context: dict | None = None) -> dict:
    from master.devicetypes import DeviceTypes

    types = DeviceTypes(template_dirs=[templates]) if templates else DeviceTypes()
    return types.device_config(dictionary, context=context)


def bbb01(corpus: Path, context: dict | None = None) -> dict:
    return render((corpus / "devices" / "bbb-01.jinja2").read_text(), context=context)


@pytest.fixture(scope="module")
def device() -> dict:
    return render(DICTIONARY)


# --- LAVA's sample jobs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_uboot_job_validates_on_bbb01(lava_corpus: Path, name: str) -> None:
    text = (lava_corpus / "sample-jobs" / name).read_text()
    faults = validate_job(text, bbb01(lava_corpus, yaml.safe_load(text).get("context")))
    expected = EXPECTED[name]
    if expected is None:
        assert faults == [], "\n".join(map(str, faults))
        return
    assert faults, f"{name} should be refused"
    for fault in faults:
        assert any(word in str(fault) for word in expected + ("not supported", "unknown")), fault


def test_every_uboot_sample_job_is_classified(lava_corpus: Path) -> None:
    for path in (lava_corpus / "sample-jobs").glob("*.yaml"):
        if path.name.startswith(("bbb", "uboot")):
            assert path.name in EXPECTED, f"{path.name}: add it to EXPECTED"


def walk(pipeline: list[dict]) -> list[tuple[str, str]]:
    found = []
    for action in pipeline:
        found.append((action["level"], action["name"]))
        found.extend(walk(action.get("pipeline") or []))
    return found


def build(text: str, device: dict) -> Job:
    """The job of ``text`` as built (validation faults do not matter here)."""
    data, doc = parse_job(text)
    job = Job("1", data, device, doc=doc, on_worker=False)
    job.build()
    return job


def built(text: str, device: dict) -> list[dict]:
    return build(text, device).describe()["pipeline"]


@pytest.mark.parametrize(("name", "section"), [("uboot.yaml", 1), ("bbb-uboot-interactive.yaml", 0)])
def test_boot_pipeline_matches_lava_reference(lava_corpus: Path, name: str, section: int) -> None:
    """Every level and action name of the U-Boot boot, as LAVA builds it."""
    text = (lava_corpus / "sample-jobs" / name).read_text()
    ours = built(text, bbb01(lava_corpus))
    reference = yaml.safe_load((lava_corpus / "pipeline-refs" / name).read_text())
    assert walk([ours[section]]) == walk([reference[section]])


def test_tftp_deploy_matches_lava_reference(lava_corpus: Path) -> None:
    """The deploy's downloads (LAVA's order: ramdisk, kernel, dtb) and its steps at LAVA's levels,
    lxc-create-udev-rule-action and the prepare steps with nothing to do included (they hold
    their levels); Pumice appends to the ramdisk instead of unpacking it."""
    text = (lava_corpus / "sample-jobs" / "uboot-ramdisk-inline-commands.yaml").read_text()
    job = build(text, bbb01(lava_corpus))
    ours = job.describe()["pipeline"]
    reference = yaml.safe_load((lava_corpus / "pipeline-refs" / "uboot-ramdisk-inline-commands.yaml")
                               .read_text())
    names = [(a["level"], a["name"]) for a in ours[0]["pipeline"]]
    lava = [(a["level"], a["name"]) for a in reference[0]["pipeline"]]
    assert names == lava
    assert [a.key for a in job.pipeline.actions[0].pipeline.actions[:3]] == ["ramdisk", "kernel", "dtb"]
    prepare = [(a["level"], a["name"]) for a in ours[0]["pipeline"][3]["pipeline"]]
    assert prepare == [(a["level"], a["name"]) for a in reference[0]["pipeline"][3]["pipeline"]]
    assert [a["name"] for a in ours[1]["pipeline"]] == [a["name"] for a in reference[1]["pipeline"]]


# --- validation on the emulated board's device type ---------------------------------------------


def faults_of(text: str, device: dict) -> list[str]:
    return [str(f) for f in validate_job(text, device)]


def test_ramdisk_job_is_valid(device: dict) -> None:
    assert faults_of(JOB, device) == []


@pytest.mark.parametrize(("change", "fault"), [
    (("commands: ramdisk", "commands: nfs"), "commands 'nfs' boot from an NFS root filesystem"),
    (("commands: ramdisk", "commands: netboot"), "commands 'netboot' are not among the device's u-boot boot "
                                                 "commands; known: nbd, nfs, ramdisk, sata, ums, usb"),
    ((", type: image}", "}"), "the deploy must give the kernel's type (kernel.type: image, zimage or "
                              "uimage)"),
    (("compression: gz}", "compression: gz, header: fit}"), "actions[0].deploy.ramdisk.header"),
    (("    prompts: ['/ # ']", "    prompts: ['/ # ']\n    transfer_overlay: {download_command: wget, "
                                "unpack_command: tar}"), "not implemented: transfer_overlay"),
    (("    dtb: {url: 'file:///images/virt.dtb'}",
      "    dtb: {url: 'file:///images/virt.dtb'}\n    nfsrootfs: {url: 'file:///rootfs.tgz'}"), "NFS root"),
    (("- boot:", "- deploy:\n    to: tftp\n    kernel: {url: 'file:///k'}\n"
                 "    modules: {url: 'file:///m.tgz'}\n- boot:"),
     "modules: there is no ramdisk to install them into"),
    (("    dtb: {url: 'file:///images/virt.dtb'}",
      "    dtb: {url: 'file:///images/virt.dtb'}\n    nfsrootfs: {url: 'file:///rootfs.tgz'}"),
     "nfsrootfs: not implemented: booting with an NFS root filesystem"),
])  # fmt: skip
def test_validation_faults(device: dict, change: tuple[str, str], fault: str) -> None:
    text = JOB.replace(*change)
    assert text != JOB
    faults = faults_of(text, device)
    assert any(fault in f for f in faults), faults


@pytest.mark.parametrize("change", [
    # keys LAVA's jobs carry that LAVA accepts (KernelCI's and LKFT's generators write them)
    ("    dtb: {url: 'file:///images/virt.dtb'}",
     "    dtb: {url: 'file:///images/virt.dtb'}\n    modules: {url: 'file:///m.tgz', compression: gz, path: /}"),
    ("visibility: public", "visibility: public\nmetadata:"),
    ("visibility: public", "visibility: public\nmetadata: {source: kernelci}"),
])  # fmt: skip
def test_what_lava_accepts_is_accepted(device: dict, change: tuple[str, str]) -> None:
    text = JOB.replace(*change)
    assert text != JOB
    assert faults_of(text, device) == []


@pytest.mark.parametrize("kernel_type", ["zImage", "bzimage"])
def test_a_kernel_type_lava_does_not_name_is_converted_for_bootm_as_in_lava(kernel_type: str) -> None:
    text = JOB.replace(", type: image}", f", type: {kernel_type}}}")
    bootm = render(DICTIONARY + "{% set bootm_kernel_addr = '0x40400000' %}{% set bootm_ramdisk_addr = "
                                "'0x45000000' %}{% set bootm_dtb_addr = '0x44000000' %}\n")
    assert faults_of(text, bootm) == []
    # without bootm load addresses LAVA refuses it too ("kernel boot type 'bootm' is not supported")
    only_booti = render(DICTIONARY)
    assert any(f"kernel.type {kernel_type!r} needs the device's bootm load addresses" in f
               for f in faults_of(text, only_booti))


@pytest.mark.parametrize(("kernel_type", "command"), [("image", "booti"), ("zimage", "bootz"), ("uimage", "bootm"),
                                                       ("zImage", "bootm"), ("bzimage", "bootm"), ("Image", "bootm")])
def test_kernel_type_is_compared_as_lava_compares_it(kernel_type: str, command: str) -> None:
    """LAVA maps only the exact lower-case names to a native command; any other is converted to a
    uImage and booted with bootm."""
    addresses = {"kernel": "0x40400000", "ramdisk": "0x45000000", "dtb": "0x44000000"}
    every = DeviceConfig.parse({"parameters": {name: addresses for name in ("booti", "bootm", "bootz")}})
    assert boot_command(kernel_type, every) == command


def test_modules_with_an_nfs_root_do_not_ask_for_a_ramdisk(device: dict) -> None:
    text = JOB.replace("    ramdisk: {url: 'file:///images/initramfs.cpio.gz', compression: gz}\n",
                       "    modules: {url: 'file:///m.tgz', compression: gz}\n"
                       "    nfsrootfs: {url: 'file:///rootfs.tgz', compression: gz, apply-overlay: true}\n")
    faults = faults_of(text, device)
    assert faults and not any("ramdisk" in f for f in faults), faults
    assert any("not implemented: booting with an NFS root filesystem" in f for f in faults), faults


@pytest.mark.parametrize(("usb", "fault"), [
    ({"board_id": "0000000000"}, "device_info has no board_id"), ({}, "device_info has no board_id"),
    ({"board_id": "1a2b", "usb_vendor_id": "0000"}, "device_info has usb_vendor_id 0000"),
    ({"board_id": "1a2b", "usb_product_id": "0000"}, "device_info has usb_product_id 0000"),
    ({"board_id": "1a2b", "usb_vendor_id": "18d1"}, None),
])  # fmt: skip
def test_device_info_is_checked_as_lava_checks_it(device: dict, usb: dict, fault: str | None) -> None:
    """LAVA's lxc-create-udev-rule-action, in every tftp deploy, refuses a device whose USB ids
    are placeholders (KernelCI's meson-sm1-sei610 as rendered)."""
    faults = faults_of(JOB, {**device, "device_info": [usb]})
    assert (faults == []) if fault is None else any(f"lxc-create-udev-rule-action: the device's {fault}" in f
                                                    for f in faults), faults


def test_test_definition_names_are_unique_in_an_overlay_as_in_lava(device: dict) -> None:
    test = ("- test:\n    definitions:\n    - {from: inline, name: same, path: t.yaml, repository: "
            "{metadata: {format: Lava-Test Test Definition 1.0, name: t}, run: {steps: [true]}}}\n")
    assert faults_of(JOB + test, device) == []
    faults = faults_of(JOB + test + test, device)
    assert any("test definition names need to be unique (as in LAVA): same appear" in f for f in faults), faults


def test_tests_need_the_overlay_in_a_ramdisk(device: dict) -> None:
    text = JOB.replace("    ramdisk: {url: 'file:///images/initramfs.cpio.gz', compression: gz}\n", "")
    text += ("- test:\n    definitions:\n    - {from: inline, name: t, path: t.yaml, repository: "
             "{metadata: {format: Lava-Test Test Definition 1.0, name: t}, run: {steps: [true]}}}\n")
    assert any("need the test overlay in a ramdisk" in f for f in faults_of(text, device))


def test_device_without_uboot_or_tftp(device: dict) -> None:
    qemu = render("{% extends 'qemu.jinja2' %}", context={"arch": "amd64"})
    faults = faults_of(JOB, qemu)
    assert any("the device has no 'tftp' deploy method" in f for f in faults), faults
    assert any("the device has no 'u-boot' boot method" in f for f in faults), faults


def test_connection_faults(device: dict) -> None:
    none = {**device, "commands": {k: v for k, v in device["commands"].items() if k != "connect"}}
    faults = faults_of(JOB, none)
    assert any("the device has no console connection: set connection_command" in f for f in faults)
    bad = {**device, "commands": {**device["commands"], "connect": "serial://ttyUSB0"}}
    assert any("a serial URL names a device path" in f for f in faults_of(JOB, bad))


def test_kernel_type_without_load_addresses() -> None:
    no_booti = render(DICTIONARY + "{% set booti_kernel_addr = '' %}\n")
    faults = faults_of(JOB, no_booti)
    assert any("kernel.type 'image' needs the device's booti (or bootm) load addresses; the device has: none"
               in f for f in faults), faults


# --- placeholders and bootX ---------------------------------------------------------------------


def overlay_for(text: str, device: dict, files: dict[str, str]) -> BootloaderCommandOverlay:
    job = load_job(text, device, on_worker=False, dispatcher={"dispatcher_ip": "192.0.2.9"})
    job.data.tftp_files.update(files)
    return next(a for a in job.pipeline.walk() if isinstance(a, BootloaderCommandOverlay))


FILES = {"kernel": "j/kernel/Image", "ramdisk": "j/ramdisk/r.uboot", "dtb": "j/dtb/virt.dtb"}


def test_substitutions_as_lava(device: dict) -> None:
    overlay = overlay_for(JOB, device, FILES)
    values = overlay.substitutions()
    assert values["{BOOTX}"] == "booti 0x40400000 0x44000000 0x40000000"
    commands = substitute(overlay.commands, values)
    assert "tftp 0x40400000 j/kernel/Image" in commands
    assert "tftp 0x44000000 j/ramdisk/r.uboot" in commands
    assert not any("{TEE" in c for c in commands)  # no tee: its line is dropped
    assert commands[-1] == "booti 0x40400000 0x44000000 0x40000000"


def test_bootx_without_ramdisk_or_header_and_with_tee(device: dict) -> None:
    no_ramdisk = {k: v for k, v in FILES.items() if k != "ramdisk"}
    assert overlay_for(JOB, device, no_ramdisk).substitutions()["{BOOTX}"] == "booti 0x40400000 - 0x40000000"
    deploy = device["actions"]["deploy"]
    headerless = {**device, "actions": {**device["actions"], "deploy": {
        **deploy, "parameters": {**deploy["parameters"], "add_header": None}}}}
    assert overlay_for(JOB, headerless, FILES).substitutions()["{BOOTX}"] == "booti 0x40400000 - 0x40000000"
    tee = overlay_for(JOB, device, {**FILES, "tee": "j/tee/tee.bin"}).substitutions()
    assert tee["{BOOTX}"] == "booti 0x83000000 0x44000000 0x40000000"


def test_inline_commands_and_server_ip(device: dict) -> None:
    text = JOB.replace("commands: ramdisk", "commands: ['setenv serverip {SERVER_IP}', 'tftp {KERNEL_ADDR} "
                       "{KERNEL}', 'setenv x {NFSROOTFS}', '{BOOTX}']")
    assert any("NFS root" in f for f in faults_of(text, device))
    text = JOB.replace("commands: ramdisk", "commands: ['setenv serverip {SERVER_IP}', 'tftp {KERNEL_ADDR} "
                       "{KERNEL}', '{BOOTX}']")
    overlay = overlay_for(text, device, FILES)
    assert substitute(overlay.commands, overlay.substitutions()) == [
        "setenv serverip 192.0.2.9", "tftp 0x40400000 j/kernel/Image",
        "booti 0x40400000 0x44000000 0x40000000"]


def test_substitute_drops_lines_without_values() -> None:
    lines = ["tftp {TEE_ADDR} {TEE}", "tftp {KERNEL_ADDR} {KERNEL}", "echo {UNKNOWN}"]
    values = {"{TEE}": None, "{TEE_ADDR}": "0x1", "{KERNEL}": "k", "{KERNEL_ADDR}": "0x2"}
    assert substitute(lines, values) == ["tftp 0x2 k", "echo {UNKNOWN}"]


def test_unfilled_placeholder_is_a_job_error(device: dict) -> None:
    overlay = overlay_for(JOB, device, FILES)
    overlay.commands = ["echo {SERVER_IP} {KERNEL_ADDR}", "echo {PRESEED_CONFIG}"]
    overlay.run(None, Deadline.after(5))
    assert overlay.session.commands == ["echo 192.0.2.9 0x40400000"]  # no preseed: its line dropped
    overlay.deploy = {}  # validation refuses this (no kernel type): the run still does not type it
    overlay.commands = ["bootm {KERNEL_ADDR}"]
    with pytest.raises(JobError, match=r"'bootm \{KERNEL_ADDR\}': nothing to fill \{KERNEL_ADDR\} with"):
        overlay.run(None, Deadline.after(5))


@pytest.mark.parametrize(("kind", "params", "expected"), [
    ("image", {"booti": {}}, "booti"), ("image", {"bootm": {}}, "bootm"), ("zimage", {"bootz": {}}, "bootz"),
    ("zimage", {"booti": {}}, "bootm"), ("uimage", {"bootz": {}}, "bootm"),
])  # fmt: skip
def test_boot_command(kind: str, params: dict, expected: str) -> None:
    assert boot_command(kind, DeviceConfig.parse({"parameters": params})) == expected


# --- U-Boot legacy headers ---------------------------------------------------------------------


def test_uimage_header_fields(tmp_path: Path) -> None:
    data = b"payload" * 100
    header = uimage_header(data, "kernel", "arm", load=0x80008000, entry=0x80008040, name="zImage")
    assert len(header) == UIMAGE_HEADER_SIZE
    fields = struct.unpack(">IIIIIIIBBBB32s", header)
    magic, hcrc, stamp, size, load, entry, dcrc, os_, arch, kind, comp, name = fields
    assert (magic, size, load, entry) == (UIMAGE_MAGIC, 700, 0x80008000, 0x80008040)
    assert (os_, arch, kind, comp) == (5, 2, 2, 0)  # linux, arm, kernel, not compressed
    assert dcrc == zlib.crc32(data) and stamp == 0 and name.rstrip(b"\0") == b"zImage"
    assert hcrc == zlib.crc32(header[:4] + b"\0\0\0\0" + header[8:])
    path = tmp_path / "r.uboot"
    path.write_bytes(header + data)
    assert has_uimage_header(path)
    strip_uimage_header(path)
    assert path.read_bytes() == data and not has_uimage_header(path)
    with pytest.raises(JobError, match="mkimage_arch 'sparc' is not known"):
        uimage_header(data, "ramdisk", "sparc")


# --- connection settings and the pyserial console -----------------------------------------------


def test_connection_settings() -> None:
    assert is_serial_url("serial:///dev/ttyUSB0?baudrate=9600")
    assert is_serial_url("rfc2217://lab:7001") and is_serial_url("socket://127.0.0.1:2000")
    assert not is_serial_url("telnet localhost 7001") and not is_serial_url("/usr/bin/conmux-console b1")
    assert serial_settings("serial:///dev/ttyUSB0?baudrate=9600") == ("/dev/ttyUSB0", 9600)
    assert serial_settings("serial:///dev/ttyUSB0") == ("/dev/ttyUSB0", 115200)
    assert serial_settings("rfc2217://lab:7001") == ("rfc2217://lab:7001", 115200)
    for bad, message in [("serial:///dev/ttyUSB0?baud=9600", "unknown option baud"),
                         ("serial:///dev/ttyUSB0?baudrate=fast", "baudrate must be a number"),
                         ("socket://lab", "needs a host and a port")]:
        with pytest.raises(ValueError, match=message):
            serial_settings(bad)
    tagged = {"commands": {"connections": {"uart0": {"connect": "telnet a 1", "tags": ["primary"]},
                                           "uart1": {"connect": "telnet a 2"}}}}
    assert connect_command(DeviceConfig.parse(tagged)) == "telnet a 1"
    with pytest.raises(InfrastructureError, match="tagged 'primary'; found: uart1"):
        connect_command(DeviceConfig.parse({"commands": {"connections": {"uart1": {"connect": "telnet a 2"}}}}))


def test_pyserial_console_reads_writes_and_sees_the_adaptor_go(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)  # an adaptor does not echo
    path = os.ttyname(slave)
    os.write(master, b"stale bytes from before the job\n")
    logger = JobLogger(tmp_path / "output.yaml")
    console = SerialConsole.open(f"serial://{path}?baudrate=115200", logger)
    try:
        os.write(master, b"U-Boot \xff\xfe garbled\r\nHit any key to stop autoboot\r\n")
        assert console.expect(["Hit any key"], Deadline.after(5)) == 0
        assert "stale" not in console.before  # flushed at open
        console.sendline("version")
        console.sendcontrol("c")
        received = b""
        while b"\x03" not in received:
            received += os.read(master, 100)
        assert received == b"version\n\x03"
        assert console.expect(["never"], Deadline.after(5), timeout=0.2) is None
        os.close(slave)
        os.close(master)  # the adaptor goes away
        with pytest.raises(InfrastructureError, match="the console connection closed"):
            console.expect(["never"], Deadline.after(5))
    finally:
        console.close()
    logger.close()
    lines = (tmp_path / "output.yaml").read_text()
    assert "U-Boot" in lines and "garbled" in lines
    with pytest.raises(InfrastructureError, match="does not exist"):
        SerialConsole.open("serial:///dev/ttyNOPE0", logger)


@pytest.mark.skipif(shutil.which("mkimage") is None, reason="mkimage (u-boot-tools) is not installed")
@pytest.mark.parametrize(("kind", "arch", "load"), [("ramdisk", "arm64", 0), ("kernel", "arm", 0x80008000)])
def test_uimage_header_is_what_mkimage_writes(tmp_path: Path, kind: str, arch: str, load: int) -> None:
    """Byte for byte as mkimage, but for the timestamp (and so the header checksum)."""
    import subprocess

    data = bytes(range(256)) * 40
    source = tmp_path / "data"
    source.write_bytes(data)
    command = ["mkimage", "-A", arch, "-O", "linux", "-T", kind, "-C", "none", "-n", "data"]
    if load:
        command += ["-a", hex(load), "-e", hex(load)]
    subprocess.run(command + ["-d", str(source), str(tmp_path / "out")], check=True, capture_output=True)
    theirs = (tmp_path / "out").read_bytes()
    ours = uimage_header(data, kind, arch, load=load, entry=load, name="data") + data
    assert len(ours) == len(theirs)
    assert ours[:4] == theirs[:4] and ours[12:] == theirs[12:]  # bytes 4-11: header crc and time
