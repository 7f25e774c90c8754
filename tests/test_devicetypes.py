"""Device-type templates and the rendering environment (master/devicetypes.py, device-types/).

Three claims, each against the real thing:

1. The environment renders LAVA's own corpus (dictionaries + LAVA 2023.01 templates) to exactly
   the text LAVA renders. The reference is LAVA's own environment code when a lava-server tree is
   at hand ($PUMICE_LAVA_SERVER, $PUMICE_CACHE/lava-server or an installed lava-server), else a
   mirror of its settings.
   Golden files: tests/golden/device-types/lava/.
2. Our templates give the dispatcher the same configuration as LAVA's for the same dictionaries
   (corpus devices, job contexts from the corpus jobs, and dictionaries that exercise the other
   variables). Golden files of our renderings: tests/golden/device-types/pumice/.
3. The emulated arm64 board's template holds what its real U-Boot says (printenv, prompts) and
   its ramdisk commands run there, TFTP from QEMU's user network included.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import shutil
import sys
import threading
import types
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from jinja2.sandbox import SandboxedEnvironment

from master.devicetypes import DeviceTypeError, DeviceTypes, check_name, packaged_dir, parse_dictionary

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("PUMICE_LAVA_CORPUS") or ROOT.parent / "shared" / "lava-corpus")
GOLDEN = Path(__file__).parent / "golden" / "device-types"
needs_corpus = pytest.mark.skipif(
    not (CORPUS / "devices").is_dir(), reason=f"LAVA corpus not found at {CORPUS} (set PUMICE_LAVA_CORPUS)"
)


def corpus_devices() -> list[str]:
    return sorted(p.name[: -len(".jinja2")] for p in (CORPUS / "devices").glob("*.jinja2"))


def corpus_contexts() -> dict[str, list[tuple[str, dict]]]:
    """Device type -> the distinct job contexts of the corpus jobs for it, each named by a job."""
    found: dict[str, dict[str, tuple[str, dict]]] = {}
    for path in sorted(CORPUS.glob("*sample-jobs/*.yaml")):
        job = yaml.safe_load(path.read_text())
        if isinstance(job, dict) and job.get("device_type") and job.get("context"):
            key = json.dumps(job["context"], sort_keys=True)
            found.setdefault(job["device_type"], {}).setdefault(key, (path.stem, job["context"]))
    return {device_type: list(contexts.values()) for device_type, contexts in found.items()}


def device_cases() -> list[tuple[str, str, dict]]:
    """(device, context name, context): every corpus device without context and with each job context."""
    if not (CORPUS / "devices").is_dir():
        return []
    contexts = corpus_contexts()
    cases = []
    for device in corpus_devices():
        device_type, _ = parse_dictionary((CORPUS / "devices" / f"{device}.jinja2").read_text())
        cases.append((device, "", {}))
        cases += [(device, name, context) for name, context in contexts.get(device_type, [])]
    return cases


def case_id(case: tuple[str, str, dict]) -> str:
    return f"{case[0]}@{case[1]}" if case[1] else case[0]


def check_golden(path: Path, text: str) -> None:
    """Compare ``text`` with a golden file; PUMICE_GOLDEN=update (make golden) rewrites it."""
    if os.environ.get("PUMICE_GOLDEN") == "update":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"golden file {path.relative_to(ROOT)} is missing: run `make golden` and review it")
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), text.splitlines(True), str(path.relative_to(ROOT)), "rendered"
            )
        )
        pytest.fail(f"rendering differs from the golden file (review, then `make golden`):\n{diff}")


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Every place two configurations differ, one line each: `path: ours=... lava=...`."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in list(theirs) + [k for k in ours if k not in theirs]:
            where = f"{path}.{key}" if path else str(key)
            if key not in ours:
                out.append(f"{where}: missing here; LAVA has {theirs[key]!r}")
            elif key not in theirs:
                out.append(f"{where}: here only: {ours[key]!r}")
            else:
                out += differences(ours[key], theirs[key], where)
        return out
    return [] if ours == theirs else [f"{path}: ours={ours!r} lava={theirs!r}"]


# --- LAVA's own rendering, for reference --------------------------------------------------------


def _lava_server_tree() -> Path | None:
    """A lava-server Python tree: $PUMICE_LAVA_SERVER, an unpacked .deb in the cache, or installed.

    To unpack one: apt-get download lava-server && dpkg -x lava-server_*.deb $PUMICE_CACHE/lava-server
    """
    cache = Path(os.environ.get("PUMICE_CACHE") or Path.home() / ".cache" / "pumice")
    for candidate in (
        os.environ.get("PUMICE_LAVA_SERVER"),
        cache / "lava-server/usr/lib/python3/dist-packages",
        "/usr/lib/python3/dist-packages",
    ):
        if candidate and (Path(candidate) / "lava_scheduler_app" / "environment.py").is_file():
            return Path(candidate)
    return None


def _load_lava_environment(tree: Path) -> types.ModuleType:
    """Import lava_scheduler_app/environment.py (and lava_server/files.py) without Django.

    Both only read three settings from django.conf; a stand-in provides them for the import and
    is removed afterwards. LAVA's code runs as is: it is the reference, not part of Pumice.
    """
    settings = types.SimpleNamespace(
        DEVICES_PATH=str(CORPUS / "devices"),
        DEVICE_TYPES_PATHS=[str(CORPUS / "device-types")],
        HEALTH_CHECKS_PATH=str(CORPUS / "health-checks"),
    )
    django, conf, package = (types.ModuleType(n) for n in ("django", "django.conf", "lava_server"))
    conf.settings, django.conf, package.__path__ = settings, conf, []
    stubs = {"django": django, "django.conf": conf, "lava_server": package}
    saved = {name: sys.modules.get(name) for name in [*stubs, "lava_server.files"]}
    sys.modules.update(stubs)
    try:
        for name, path in (
            ("lava_server.files", tree / "lava_server" / "files.py"),
            ("pumice_lava_environment", tree / "lava_scheduler_app" / "environment.py"),
        ):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return module
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
        sys.modules.pop("pumice_lava_environment", None)


@pytest.fixture(scope="module")
def lava_render():
    """device, context -> text, as LAVA 2023.01's server renders a device's configuration."""
    tree = _lava_server_tree()
    if tree is not None:
        env = _load_lava_environment(tree).devices()
        print(f"reference: LAVA's own lava_scheduler_app.environment from {tree}")
    else:
        # The settings of lava_scheduler_app.environment.devices() in LAVA 2023.01: device
        # dictionaries first on the search path, then the device-type directories.
        env = SandboxedEnvironment(
            loader=jinja2.FileSystemLoader([str(CORPUS / "devices"), str(CORPUS / "device-types")]),
            autoescape=False,
            trim_blocks=True,
            cache_size=-1,
        )
        print("reference: a mirror of LAVA 2023.01's device rendering environment")
    return lambda device, context: env.get_template(f"{device}.jinja2").render(**context)


# --- 1. the environment renders LAVA's corpus as LAVA does ----------------------------------------


@needs_corpus
@pytest.mark.parametrize("case", device_cases(), ids=case_id)
def test_corpus_renders_like_lava(case, lava_render) -> None:
    device, _, context = case
    text = (CORPUS / "devices" / f"{device}.jinja2").read_text()
    rendered = DeviceTypes([CORPUS / "device-types"]).render(text, context)
    assert rendered == lava_render(device, context)
    assert isinstance(yaml.safe_load(rendered), dict)


@needs_corpus
@pytest.mark.parametrize("device", corpus_devices() if (CORPUS / "devices").is_dir() else [])
def test_golden_lava_corpus(device: str) -> None:
    text = (CORPUS / "devices" / f"{device}.jinja2").read_text()
    check_golden(GOLDEN / "lava" / f"{device}.yaml", DeviceTypes([CORPUS / "device-types"]).render(text))


# --- 2. our templates configure the dispatcher as LAVA's do ---------------------------------------

# Where our templates deliberately differ from LAVA 2023.01's output: path -> why.
INTENDED = {
    "actions.boot.methods.u-boot.usb.commands": (
        "LAVA's usb command list has the kernel arguments without 'setenv bootargs' "
        "(U-Boot would reject the line); ours sets them"
    ),
}

# Dictionaries (text after the extends line) that exercise the variables the corpus devices leave
# unset; rendered with both template sets and compared.
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "uboot-everything": (
        "beaglebone-black",
        """
{% set connection_list = ['uart0', 'uart1'] %}
{% set connection_commands = {'uart0': 'telnet localhost 7000', 'uart1': 'ser2net-connect 2'} %}
{% set connection_tags = {'uart0': ['primary', 'telnet'], 'uart1': 'secondary'} %}
{% set must_use_connection = True %}
{% set soft_reboot_command = 'reboot' %}
{% set pre_power_command = '/usr/local/bin/usb-off' %}
{% set pre_os_command = '/usr/local/bin/usb-on' %}
{% set recovery_mode_command = ['relay 1 on'] %}
{% set recovery_exit_command = ['relay 1 off'] %}
{% set user_commands = {'led': {'do': 'led on', 'undo': 'led off'}} %}
{% set device_info = [{'board_id': '1234'}] %}
{% set static_info = [{'probe_channel': 1}] %}
{% set storage_info = [{'SATA': '/dev/disk/by-id/ata-X'}] %}
{% set environment = {'FOO': 'bar'} %}
{% set fastboot_serial_number = 'abc' %}
{% set device_ip = '10.0.0.5' %}
{% set device_mac = '00:11:22:33:44:55' %}
{% set sata_uuid = 'ata-ST160' %}
{% set sd_uuid = 'mmc-SD8GB' %}
{% set sd_label = 'SDCard' %}
{% set sd_device_id = 1 %}
{% set static_ip = '10.0.0.5' %}{% set static_gateway = '10.0.0.1' %}
{% set static_netmask = '255.255.255.0' %}{% set static_dns = '10.0.0.1' %}
{% set extra_nfsroot_args = ',vers=3' %}
{% set extra_kernel_args = 'quiet' %}
{% set text_offset = '0x80000' %}
{% set booti_kernel_addr = '0x80080000' %}
{% set uboot_needs_usb = True %}
{% set uboot_set_mac = True %}
{% set uboot_mac_addr = '00:11:22:33:44:55' %}
{% set uboot_method_fit = True %}
{% set bootm_device_tree_config = 'am335x' %}
{% set uboot_altbank = True %}
{% set uboot_ums_flash = True %}
{% set flasher_deploy_commands = ['flash {IMAGE}'] %}
{% set deploy_dfu_commands = ['dfu 0 mmc 0'] %}
{% set uuu_docker_image = 'uuu:latest' %}
{% set ssh_host = '10.0.0.5' %}
{% set interrupt_char = 'x' %}
{% set boot_character_delay = 5 %}{% set test_character_delay = 7 %}
{% set uboot_extra_error_message = 'Invalid partition' %}
{% set depthcharge_extra_error_message = 'boom' %}
{% set action_timeout_lava_test_shell = 30 %}{% set connection_timeout_feedback = 20 %}
{% set failure_retry = 3 %}{% set boot_retry = 2 %}
""",
        {},
    ),
    "uboot-tftp-overrides": (
        "beaglebone-black",
        """
{% set connection_command = 'telnet localhost 7000' %}
{% set append_dtb = True %}
{% set uboot_bootx_cmd = 'bootm {KERNEL_ADDR}' %}
{% set uboot_ipaddr_cmd = 'setenv ipaddr 10.0.0.5' %}
{% set base_high_limits = False %}
{% set uboot_error_messages = ['oops', 'panic'] %}
{% set depthcharge_error_messages = ['dc'] %}
{% set console_device = 'ttyS2' %}{% set baud_rate = 9600 %}
""",
        {},
    ),
    "uboot-custom-tftp": (
        "beaglebone-black",
        """
{% set connection_command = 'telnet localhost 7000' %}
{% set uboot_tftp_commands = ['tftp {KERNEL_ADDR} {KERNEL}'] %}
{% set uboot_bootcmd = 'run mybootcmd' %}
""",
        {},
    ),
    "uboot-no-console": ("base-uboot", "{% set connection_command = 'telnet localhost 7000' %}\n", {}),
    "rpi4": (
        "bcm2711-rpi-4-b",
        """
{% set connection_command = 'telnet localhost 7002' %}
{% set power_on_command = ['relay 3 on'] %}{% set power_off_command = ['relay 3 off'] %}
""",
        {},
    ),
    "rpi4-rpi-kernel": (
        "bcm2711-rpi-4-b",
        "{% set connection_command = 'telnet localhost 7002' %}\n",
        {"extra_kernel_args": "8250.nr_uarts=1 cma=64M", "console_device": "ttyS0"},
    ),
    **{
        f"qemu-{arch}": ("qemu", "{% set mac_addr = '52:54:00:12:34:61' %}\n", {"arch": arch})
        for arch in (
            "arm64",
            "aarch64",
            "arm",
            "amd64",
            "x86_64",
            "i386",
            "riscv64",
            "mips",
            "mips64",
            "ppc",
            "ppc64",
            "sparc",
            "sparc64",
            "hppa",
            "m68k",
            "nios2",
            "xtensa",
            "s390x",
        )
    },
    "qemu-options": (
        "qemu",
        """
{% set machine = 'q35' %}{% set cpu = 'max' %}{% set memory = 2048 %}{% set monitor = 'stdio' %}
{% set model = 'model=e1000' %}{% set console_device = 'ttyS0' %}
""",
        {
            "arch": "amd64",
            "no_kvm": True,
            "netdevice": "tap",
            "extra_options": ["-smp", 2],
            "guestfs_size": 1024,
            "guestfs_interface": "virtio",
            "guestfs_driveid": "disk0",
            "boot_root": "/dev/vda1",
            "boot_console": "ttyS1,9600",
        },
    ),
    "qemu-arm-display": (
        "qemu",
        "{% set vga = '-vga std' %}{% set serial = '-serial pty' %}\n",
        {"arch": "arm64", "cpu": "cortex-a72", "machine": "virt,gic-version=3"},
    ),
}


def render_pair(device_type: str, body: str, context: dict) -> tuple[dict, dict]:
    text = f"{{% extends '{device_type}.jinja2' %}}\n{body}"
    return DeviceTypes().device_config(text, context), DeviceTypes([CORPUS / "device-types"]).device_config(
        text, context
    )


def assert_same_configuration(ours: dict, lava: dict) -> None:
    found = differences(ours, lava)
    unexpected = [d for d in found if d.split(":")[0] not in INTENDED]
    assert not unexpected, "our templates differ from LAVA's:\n  " + "\n  ".join(unexpected)
    # the keys the dispatcher reads, named so that a failure above cannot hide a missing section
    for key in ("actions", "commands", "constants", "timeouts", "parameters"):
        assert (key in ours) == (key in lava), key


def our_types() -> set[str]:
    return set(DeviceTypes().names())


@needs_corpus
@pytest.mark.parametrize("case", device_cases(), ids=case_id)
def test_our_templates_configure_corpus_devices_like_lava(case) -> None:
    device, _, context = case
    text = (CORPUS / "devices" / f"{device}.jinja2").read_text()
    device_type, _ = parse_dictionary(text)
    if device_type not in our_types():
        pytest.skip(f"Pumice has no '{device_type}' device type (needed by {device})")
    ours = DeviceTypes().device_config(text, context)
    lava = DeviceTypes([CORPUS / "device-types"]).device_config(text, context)
    assert_same_configuration(ours, lava)


@needs_corpus
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_our_templates_read_lava_variables(variant: str) -> None:
    ours, lava = render_pair(*VARIANTS[variant])
    assert_same_configuration(ours, lava)


def test_intended_differences_still_differ() -> None:
    """Each entry of INTENDED names a real difference (so the list cannot hide a regression)."""
    if not (CORPUS / "device-types").is_dir():
        pytest.skip(f"LAVA corpus not found at {CORPUS}")
    ours, lava = render_pair("beaglebone-black", "{% set connection_command = 'telnet localhost 7000' %}\n", {})
    found = {d.split(":")[0] for d in differences(ours, lava)}
    assert found == set(INTENDED)
    assert ours["actions"]["boot"]["methods"]["u-boot"]["usb"]["commands"][-2].startswith("setenv bootargs '")


# Our renderings, reviewed as diffs: the corpus devices of our types, and example dictionaries.
EXAMPLES = {
    "qemu-arm64-uboot-01": (
        "{% extends 'qemu-arm64-uboot.jinja2' %}\n"
        "{% set connection_command = 'qemu-system-aarch64 -machine virt -cpu cortex-a57 -m 512 -nographic"
        " -bios /usr/lib/u-boot/qemu_arm64/u-boot.bin -netdev user,id=net0,tftp=/srv/tftp"
        " -device virtio-net-pci,netdev=net0' %}\n",
        {},
    ),
    "rpi4-01": (
        """{% extends 'bcm2711-rpi-4-b.jinja2' %}
{% set connection_command = 'telnet localhost 7002' %}
{% set power_on_command = 'pduclient --hostname pdu --command on --port 3' %}
{% set power_off_command = 'pduclient --hostname pdu --command off --port 3' %}
{% set hard_reset_command = 'pduclient --hostname pdu --command reboot --port 3' %}
""",
        {},
    ),
    "qemu01@arm64": ((CORPUS / "devices" / "qemu01.jinja2"), {"arch": "arm64"}),
    "kvm01@amd64": ((CORPUS / "devices" / "kvm01.jinja2"), {"arch": "amd64"}),
}


def golden_ours_cases() -> list[str]:
    corpus = [
        d
        for d in (corpus_devices() if (CORPUS / "devices").is_dir() else [])
        if parse_dictionary((CORPUS / "devices" / f"{d}.jinja2").read_text())[0] in our_types()
    ]
    return corpus + sorted(EXAMPLES)


@pytest.mark.parametrize("name", golden_ours_cases())
def test_golden_pumice(name: str) -> None:
    source, context = EXAMPLES.get(name, (CORPUS / "devices" / f"{name}.jinja2", {}))
    if isinstance(source, Path):
        if not source.exists():
            pytest.skip(f"LAVA corpus not found at {CORPUS}")
        source = source.read_text()
    text = DeviceTypes().render(source, context)
    assert isinstance(yaml.safe_load(text), dict)
    check_golden(GOLDEN / "pumice" / f"{name}.yaml", text)


# --- the environment ------------------------------------------------------------------------------

QEMU = "{% extends 'qemu.jinja2' %}\n{% set memory = 1024 %}\n"


def test_packaged_types() -> None:
    assert packaged_dir() == ROOT / "device-types"
    assert DeviceTypes().names() == ["bcm2711-rpi-4-b", "beaglebone-black", "qemu", "qemu-arm64-uboot"]
    assert DeviceTypes().template_text("qemu").startswith("{#- Pumice device type: qemu")
    assert DeviceTypes().template_text("qemu.jinja2") == (ROOT / "device-types" / "qemu.jinja2").read_text()


def test_context_changes_the_render() -> None:
    def command(context: dict) -> dict:
        return DeviceTypes().device_config(QEMU, context)["actions"]["boot"]["methods"]["qemu"]["parameters"]

    assert command({"arch": "arm64"})["command"] == "qemu-system-aarch64"
    assert command({"arch": "amd64"})["command"] == "qemu-system-x86_64"
    assert "-enable-kvm" in command({"arch": "amd64"})["options"]
    amd64 = command({"arch": "amd64", "no_kvm": True, "netdevice": "tap", "extra_options": ["-smp", 2]})
    assert amd64["options"] == [
        "-nographic",
        "-net nic,model=virtio,macaddr=52:54:00:12:34:58 -net tap",
        "-m 1024",
        "-monitor none",
    ]
    assert amd64["extra"] == ["-smp", 2]
    # the dictionary's own settings win over the job context, as in LAVA
    assert command({"arch": "amd64", "memory": 64})["options"][-2] == "-m 1024"


def test_site_directory_overrides_packaged_template(tmp_path: Path) -> None:
    (tmp_path / "qemu.jinja2").write_text(
        "{% extends 'base.jinja2' %}\n{% block body %}site: {{ memory }}\n{% endblock body %}\n"
    )
    (tmp_path / "my-board.jinja2").write_text("{% extends 'base-uboot.jinja2' %}\n")
    types_ = DeviceTypes(site_dir=tmp_path)
    config = types_.device_config(QEMU)
    assert config["site"] == 1024 and "actions" not in config
    assert config["timeouts"]["actions"]["lava-test-shell"] == {"minutes": 3}  # base still packaged
    assert "my-board" in types_.names() and "qemu" in types_.names()
    assert types_.search_path == [tmp_path, ROOT / "device-types"]
    assert "u-boot" in types_.device_config("{% extends 'my-board.jinja2' %}")["actions"]["boot"]["methods"]


def test_stored_templates_override_files_and_cache_follows(tmp_path: Path) -> None:
    types_ = DeviceTypes(site_dir=tmp_path)
    stored = {"qemu": "{% extends 'base.jinja2' %}{% block body %}stored: {{ memory }}{% endblock %}"}
    assert types_.device_config(QEMU, extra_templates=stored)["stored"] == 1024
    # the same environment, without the stored template, falls back to the file (no stale cache)...
    assert "actions" in types_.device_config(QEMU)
    # ...and a changed stored template is picked up at once
    stored = {"qemu.jinja2": stored["qemu"].replace("stored", "changed")}
    assert types_.device_config(QEMU, extra_templates=stored)["changed"] == 1024
    assert types_.template_text("qemu", extra_templates=stored) == stored["qemu.jinja2"]
    assert "only-in-db" in types_.names({"only-in-db": "{% extends 'base.jinja2' %}"})
    # a site file changed on disk is reloaded too
    (tmp_path / "qemu.jinja2").write_text("{% extends 'base.jinja2' %}{% block body %}v1: 1{% endblock %}")
    assert types_.device_config(QEMU)["v1"] == 1
    (tmp_path / "qemu.jinja2").write_text("{% extends 'base.jinja2' %}{% block body %}v2: 2{% endblock %}")
    os.utime(tmp_path / "qemu.jinja2", (1, 1))  # a different mtime even within the same second
    assert types_.device_config(QEMU)["v2"] == 2


def test_concurrent_renders_with_different_stored_templates() -> None:
    """Each render sees its own stored templates, even in threads sharing one environment."""
    types_ = DeviceTypes()
    errors: list[str] = []

    def worker(i: int) -> None:
        stored = {"qemu": f"{{% extends 'base.jinja2' %}}{{% block body %}}who: {i}{{% endblock %}}"}
        for _ in range(20):
            got = types_.device_config(QEMU, extra_templates=stored)["who"]
            if got != i:
                errors.append(f"thread {i} rendered {got}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)


def test_missing_template_names_it_and_the_search_path(tmp_path: Path) -> None:
    types_ = DeviceTypes(site_dir=tmp_path)
    with pytest.raises(DeviceTypeError) as info:
        types_.render("{% extends 'no-such-board.jinja2' %}", name="board-07")
    message = str(info.value)
    assert "'no-such-board.jinja2' not found" in message and "board-07" in message
    assert str(tmp_path) in message and str(ROOT / "device-types") in message
    with pytest.raises(DeviceTypeError, match="'nope.jinja2' not found"):
        types_.template_text("nope")


def test_syntax_errors_name_template_and_line(tmp_path: Path) -> None:
    (tmp_path / "broken.jinja2").write_text("{% extends 'base.jinja2' %}\n\n{% block body %}\n{% if %}\n")
    types_ = DeviceTypes(site_dir=tmp_path)
    with pytest.raises(DeviceTypeError) as info:
        types_.render("{% extends 'broken.jinja2' %}")
    assert info.value.line == 4 and "'broken.jinja2'" in str(info.value) and "line 4" in str(info.value)
    assert str(tmp_path / "broken.jinja2") in str(info.value)
    with pytest.raises(DeviceTypeError, match=r"^device dictionary line 2: syntax error"):
        types_.render("{% extends 'qemu.jinja2' %}\n{% set x = %}\n")
    stored = {"db-board": "{% extends 'base.jinja2' %}\n{{ oops( }}"}
    with pytest.raises(DeviceTypeError, match=r"'db-board.jinja2' \(stored by the master\) line 2"):
        types_.render("{% extends 'db-board.jinja2' %}", extra_templates=stored)


def test_render_errors_name_template_and_line(tmp_path: Path) -> None:
    (tmp_path / "strict.jinja2").write_text(
        "{% extends 'base.jinja2' %}\n{% block body %}\nx: {{ nothing.attribute }}\n{% endblock %}\n"
    )
    with pytest.raises(DeviceTypeError) as info:
        DeviceTypes(site_dir=tmp_path).render("{% extends 'strict.jinja2' %}")
    assert "'strict.jinja2'" in str(info.value) and info.value.line == 3 and "UndefinedError" in str(info.value)


def test_invalid_yaml_gives_the_line() -> None:
    stored = {"bad-yaml": "{% extends 'base.jinja2' %}{% block body %}\nkey: [unclosed\n{% endblock %}"}
    with pytest.raises(DeviceTypeError) as info:
        DeviceTypes().device_config("{% extends 'bad-yaml.jinja2' %}", extra_templates=stored)
    text = DeviceTypes().render("{% extends 'bad-yaml.jinja2' %}", extra_templates=stored)
    assert "not valid YAML, line" in str(info.value)
    assert info.value.line is not None and 0 < info.value.line <= len(text.splitlines()) + 1
    with pytest.raises(DeviceTypeError, match="not a mapping"):
        DeviceTypes().device_config("{% set memory = 1 %}just text")


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", "..", "qemu;rm", "qemu jinja2", ".jinja2"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(DeviceTypeError, match="invalid device-type name"):
        check_name(name)
    with pytest.raises(DeviceTypeError, match="invalid device-type name"):
        DeviceTypes().template_text(name)
    with pytest.raises(DeviceTypeError, match="invalid device-type name"):
        DeviceTypes().render(f"{{% extends '{name}' %}}")
    with pytest.raises(DeviceTypeError, match="invalid device-type name"):
        DeviceTypes().render(QEMU, extra_templates={name: "x"})


def test_lenient_undefined_and_sandbox() -> None:
    body = (
        "{% extends 'base.jinja2' %}{% block body %}\n"
        "empty: '{{ not_set }}'\nfalsy: {{ 'set' if not_set else 'unset' }}\n"
        "default: {{ not_set | default(7) }}\n{% endblock %}"
    )
    config = DeviceTypes().device_config("{% extends 'probe.jinja2' %}", extra_templates={"probe": body})
    assert (config["empty"], config["falsy"], config["default"]) == ("", "unset", 7)
    escape = "{% extends 'base.jinja2' %}{% block body %}x: {{ ''.__class__.__mro__ }}{% endblock %}"
    with pytest.raises(DeviceTypeError, match="SecurityError|UndefinedError"):
        DeviceTypes().render("{% extends 'probe.jinja2' %}", extra_templates={"probe": escape})
    with pytest.raises(DeviceTypeError, match="job context must be a mapping"):
        DeviceTypes().render(QEMU, context=["arch"])  # type: ignore[arg-type]


def test_parse_dictionary() -> None:
    text = (
        "{% extends 'x15.jinja2' %}\n"
        "{% set connection_command = 'telnet localhost 7020' %}\n"
        "{% set fastboot_serial_number = '100040061d1e00e2' %}\n"
        "{% set adb_serial_number = fastboot_serial_number %}\n"
        "{% set device_info = [{'board_id': fastboot_serial_number}] %}\n"
        "{% set hard_reset_command = ('pdu reboot', 'relay') %}\n"
        "{% set sysfs = {'eth0': '/sys/x'} %}\n{% set uses_context = arch | default('amd64') %}\n"
        "{% block body %}{% set inside = 1 %}{% endblock %}\n"
    )
    device_type, values = parse_dictionary(text)
    assert device_type == "x15"
    assert values == {
        "connection_command": "telnet localhost 7020",
        "fastboot_serial_number": "100040061d1e00e2",
        "adb_serial_number": "100040061d1e00e2",
        "device_info": [{"board_id": "100040061d1e00e2"}],
        "hard_reset_command": ["pdu reboot", "relay"],
        "sysfs": {"eth0": "/sys/x"},
        "uses_context": "amd64",
    }
    assert list(values)[0] == "connection_command"  # in the dictionary's order
    with pytest.raises(DeviceTypeError, match="extends exactly one"):
        parse_dictionary("{% set a = 1 %}")
    with pytest.raises(DeviceTypeError, match="line 2"):
        parse_dictionary("{% extends 'qemu.jinja2' %}\n{% set a = %}")
    with pytest.raises(DeviceTypeError, match="invalid device-type name"):
        parse_dictionary("{% extends '../qemu.jinja2' %}")


@needs_corpus
def test_parse_corpus_dictionaries() -> None:
    for device in corpus_devices():
        device_type, values = parse_dictionary((CORPUS / "devices" / f"{device}.jinja2").read_text())
        assert (CORPUS / "device-types" / f"{device_type}.jinja2").exists()
        assert values, device
    assert parse_dictionary((CORPUS / "devices" / "bbb-01.jinja2").read_text())[1]["map"] == {
        "eth0": {"192.168.0.2": 5},
        "eth1": {"192.168.0.2": 7},
    }


# --- 3. the emulated arm64 board and its real U-Boot ----------------------------------------------

UBOOT_BIN = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")


@pytest.mark.qemu
@pytest.mark.timeout(120)
def test_qemu_arm64_uboot_matches_real_uboot(tmp_path: Path) -> None:
    """Boot the real U-Boot: its prompts and load addresses are the template's, its ramdisk
    commands run (TFTP from 10.0.2.2 included) up to the boot command."""
    pexpect = pytest.importorskip("pexpect")
    qemu = shutil.which("qemu-system-aarch64")
    if not qemu or not UBOOT_BIN.exists():
        pytest.skip("needs qemu-system-aarch64 and u-boot-qemu's qemu_arm64 u-boot.bin")
    config = DeviceTypes().device_config("{% extends 'qemu-arm64-uboot.jinja2' %}")
    uboot = config["actions"]["boot"]["methods"]["u-boot"]
    addresses = config["parameters"]["booti"]
    tftp = tmp_path / "tftp"
    (tftp / "job").mkdir(parents=True)
    files = {"KERNEL": "job/Image", "RAMDISK": "job/initramfs.cpio.gz", "DTB": "job/virt.dtb"}
    for size, path in zip((300_000, 200_000, 20_000), files.values(), strict=True):
        (tftp / path).write_bytes(os.urandom(size))
    child = pexpect.spawn(
        qemu,
        [
            "-machine",
            "virt",
            "-cpu",
            "cortex-a57",
            "-m",
            "512",
            "-nographic",
            "-bios",
            str(UBOOT_BIN),
            "-netdev",
            f"user,id=net0,tftp={tftp}",
            "-device",
            "virtio-net-pci,netdev=net0",
        ],
        encoding="utf-8",
        codec_errors="replace",
        timeout=30,
    )
    child.logfile_read = log = open(tmp_path / "console.log", "w")  # noqa: SIM115 - closed below
    prompt = uboot["parameters"]["bootloader_prompt"]
    try:
        child.expect_exact(uboot["parameters"]["interrupt_prompt"])
        child.send(config["constants"]["u-boot"]["interrupt-character"])
        child.expect_exact(prompt)
        child.sendline("printenv kernel_addr_r ramdisk_addr_r fdt_addr")
        child.expect_exact(prompt)
        env = dict(line.strip().split("=", 1) for line in child.before.splitlines() if "=" in line)
        assert env == {
            "kernel_addr_r": addresses["kernel"],
            "ramdisk_addr_r": addresses["ramdisk"],
            "fdt_addr": addresses["dtb"],
        }
        # what the dispatcher does with the command list: fill the placeholders, drop the TEE line
        values = {
            "SERVER_IP": "unused",
            "KERNEL_ADDR": addresses["kernel"],
            "RAMDISK_ADDR": addresses["ramdisk"],
            "DTB_ADDR": addresses["dtb"],
            **files,
        }
        errors = config["constants"]["u-boot"]["error-messages"]
        for command in uboot["ramdisk"]["commands"]:
            if "{TEE" in command or command == "{BOOTX}":
                continue
            for key, value in values.items():
                command = command.replace("{" + key + "}", value)
            child.sendline(command)
            index = child.expect_exact([prompt, *errors])
            assert index == 0, f"U-Boot refused {command!r}: {errors[index - 1]!r}"
            if command.startswith("tftp"):
                assert "Bytes transferred" in child.before, child.before
        child.sendline("printenv serverip bootargs")
        child.expect_exact(prompt)
        assert "serverip=10.0.2.2" in child.before
        assert "bootargs=console=ttyAMA0,115200n8 root=/dev/ram0" in child.before
    finally:
        child.terminate(force=True)
        log.close()
