"""The typed device configuration (agent/device.py): parsed once, malformed shapes named by their
YAML path, what each strategy needs checked when the job is built, and the build context each
block is built with."""

from __future__ import annotations

import pytest

from agent.device import DeviceConfig, Needs
from agent.errors import ConfigurationError
from agent.job import load_job, validate_job

DEVICE = {
    "hostname": "dev-01", "device_type": "fake-uboot",
    "commands": {"connect": " telnet 127.0.0.1 7001 ", "power_on": "pdu on 1", "power_off": ["pdu off 1", "sync"],
                 "users": {"relay": {"do": "relay on", "undo": "relay off"}}},
    "actions": {
        "deploy": {"methods": {"tftp": None}, "parameters": {"mkimage_arch": "arm64"}},
        "boot": {"connections": {"serial": None}, "methods": {"u-boot": {
            "parameters": {"bootloader_prompt": "=>", "interrupt_prompt": "Hit any key"},
            "ramdisk": {"commands": ["bootm"]}, "nfs": {"commands": []}}}},
    },
    "constants": {"u-boot": {"interrupt-newline": False}, "shutdown-message": "reboot: Restarting"},
    "character_delays": {"boot": 5},
    "parameters": {"booti": {"kernel": "0x40480000", "ramdisk": "0x44000000", "dtb": "0x43f00000"}},
}


def test_the_device_configuration_is_parsed_into_typed_parts() -> None:
    device = DeviceConfig.parse(DEVICE)
    assert device.commands.connect == "telnet 127.0.0.1 7001"
    assert (device.commands.power_on, device.commands.power_off, device.commands.hard_reset) == (
        ["pdu on 1"], ["pdu off 1", "sync"], [])
    assert device.commands.users["relay"].undo == "relay off"
    uboot = device.boot_methods["u-boot"]
    assert uboot.parameters["bootloader_prompt"] == "=>"
    assert uboot.command_sets() == ["nfs", "ramdisk"]
    assert (uboot.commands("ramdisk"), uboot.commands("nfs"), uboot.commands("parameters")) == (["bootm"], None, None)
    assert device.deploy_methods == {"tftp": {}} and device.deploy_parameters["mkimage_arch"] == "arm64"
    assert device.method_constant("u-boot", "interrupt-newline", True) is False
    assert device.method_constant("u-boot", "interrupt-prompt", "x") == "x"
    assert device.boot_character_delay == 0.005 and device.test_character_delay == 0.0
    assert device.boot_connections == {"serial"}
    # a method's entry that is no mapping (LAVA's templates write ``fastboot: []``) is a method all the same
    fastboot = DeviceConfig.parse({"actions": {"boot": {"methods": {"fastboot": [], "minimal": None}}}})
    assert sorted(fastboot.boot_methods) == ["fastboot", "minimal"] and fastboot.boot_parameters("fastboot") == {}
    assert DeviceConfig.parse(None) == DeviceConfig()


@pytest.mark.parametrize(("change", "message"), [
    ({"actions": {"boot": {"methods": ["qemu"]}}}, "actions.boot.methods: expected a mapping, got list"),
    ({"actions": {"deploy": {"methods": {"tftp": {"parameters": "x"}}}}},
     "actions.deploy.methods.tftp.parameters: expected a mapping, got str"),
    ({"commands": {"users": {"relay": {"undo": "off"}}}}, "commands.users.relay: has no 'do' command"),
    ({"character_delays": {"boot": "slow"}}, "character_delays.boot: expected milliseconds, got 'slow'"),
    ({"constants": ["a"]}, "constants: expected a mapping, got list"),
])
def test_a_malformed_configuration_says_where(change: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^device configuration {message}$".replace("(", r"\(")):
        DeviceConfig.parse({**DEVICE, **change})


JOB = """\
device_type: fake-uboot
job_name: device
timeouts: {job: {minutes: 5}}
visibility: public
actions:
- deploy:
    to: tftp
    kernel: {url: 'http://images.example/Image', type: image}
    ramdisk: {url: 'http://images.example/initrd.cpio.gz', compression: gz}
- boot:
    method: u-boot
    commands: ramdisk
    prompts: ['/ # ']
- test:
    definitions:
    - {from: inline, name: smoke, path: inline/smoke.yaml,
       repository: {metadata: {format: Lava-Test Test Definition 1.0, name: smoke}, run: {steps: [echo hi]}}}
"""


def test_a_malformed_configuration_is_a_fault_of_the_device() -> None:
    faults = validate_job(JOB, {**DEVICE, "actions": {"boot": {"methods": ["u-boot"]}}})
    assert [(fault.path, fault.message) for fault in faults] == [
        ("device", "device configuration actions.boot.methods: expected a mapping, got list")]


def test_needs_refuse_with_lava_s_words() -> None:
    device = DeviceConfig.parse(DEVICE)
    assert Needs(boot_method="qemu").refusal(device, {}) == "the device has no 'qemu' boot method"
    assert Needs(boot_method_key="bootloader").refusal(device, {"bootloader": "barebox"}) == \
        "the device has no 'barebox' boot method"
    assert Needs(deploy_method="image", why="no image").refusal(device, {}) == "no image"
    assert Needs(boot_method="u-boot", deploy_method="tftp").refusal(device, {}) is None
    assert validate_job(JOB, DEVICE) == []
    faults = validate_job(JOB.replace("method: u-boot\n    commands: ramdisk", "method: qemu"), DEVICE)
    assert [(fault.path, fault.message) for fault in faults] == [
        ("actions[1].boot", "the device has no 'qemu' boot method")]


def test_each_block_is_built_with_what_comes_before_and_after_it() -> None:
    job = load_job(JOB, DEVICE, on_worker=False)
    deploy, boot, test = job.pipeline.actions[:3]
    assert [stage for stage, _ in deploy.context.tests_after] == [0]
    assert deploy.context.deploys_before == ()
    assert boot.context.deploy_before["kernel"]["type"] == "image"
    assert test.context.index == 2 and test.context.tests_after == ()
    # a child action is built with its block's context
    assert all(action.context is deploy.context for action in deploy.pipeline.walk())
