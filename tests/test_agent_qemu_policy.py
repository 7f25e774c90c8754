"""The worker's file policy on QEMU's command line (agent/qemu_policy.py; README, "QEMU's command
line"): what a job writes in an ``image_arg`` or, through its ``context:``, in the device's QEMU
options may not make QEMU (root on the worker) read the worker's files, write them or run commands.

Each hostile variant is refused by ``pumice-run --validate``, by a running master at submission
(test_a_running_master_refuses_each_hostile_qemu_option_at_submission) and again by the agent when
the job runs although validation was bypassed (QEMU never starts, nothing is written). What only the
worker can see (a symlink, what a deployed disk image names) passes the master and is refused by
the agent. LAVA's sample QEMU jobs pass; the device's own options pass whatever they name; a file
under an allowed directory is read by a real QEMU board.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import allowing
from support.broker import BrokerLab, db_wait, make_broker_lab
from support.master import Lab
from test_master_policy import master  # noqa: F401  (the running master fixture)
from test_worker_daemon import Running

from agent.actions.boot.qemu import boots_qemu, command_verdict
from agent.config import AgentConfig
from agent.daemon import AgentDaemon
from agent.errors import JobDefinitionError
from agent.job import load_job
from agent.logger import JobLogger
from agent.policy import DIRS_KEY, REFUSED, FilePolicy, PolicyRefusal
from agent.qemu_policy import (
    BLOCK_DRIVERS,
    FLAGS,
    JUDGES,
    PLACEHOLDER_ROOT,
    REFUSED_FLAGS,
    TEXT,
    groups,
    refusals,
    takes_argument,
)
from agent.timeout import Deadline
from master import inventory, jobs
from master.client import ApiError, Client
from master.db import connection
from master.instance import current
from master.models import Job
from master.scheduler import Scheduler
from master.server import MasterServer
from master.states import JobHealth, JobState
from master.users import SYSTEM

DATA = Path(__file__).parent / "data"
SECRET = "root:$6$pumice-qemu-policy-SECRET$:19000:0:99999:7:::"
#: a device whose arch, memory and options come from the job's context (LAVA's qemu devices)
DICTIONARY = "{% extends 'qemu.jinja2' %}\n{% set no_kvm = True %}\n"


@dataclass
class Case:
    """One way a job could have QEMU reach the worker."""

    name: str
    #: the kernel's image_arg (``{kernel}`` is the deployed kernel)
    image_arg: str = "-kernel {kernel}"
    #: the job's context besides ``arch: amd64``
    context: dict = field(default_factory=dict)
    #: what the refusal says (after @SECRET@, @SECRETS@, @IMAGES@ are filled in)
    words: str = ""
    #: the YAML path the refusal names (None: the kernel's image_arg)
    path: str | None = None
    #: whether the job has a test (so that the overlay's guest disk is attached)
    tests: bool = False


IMAGE_ARG = "actions[0].deploy.images.kernel.image_arg"
HOSTILE = [
    # files read
    Case("initrd", "-kernel {kernel} -initrd @SECRET@", words="reads @SECRET@ on the worker"),
    Case("bios", "-kernel {kernel} -bios @SECRET@", words="reads @SECRET@ on the worker"),
    Case("firmware-dir", "-kernel {kernel} -L @SECRETS@", words="reads @SECRETS@ on the worker"),
    Case("fw_cfg", "-kernel {kernel} -fw_cfg name=opt/pumice,file=@SECRET@", words="reads @SECRET@ on the worker"),
    Case("romfile", "-kernel {kernel} -device virtio-net-pci,romfile=@SECRET@", words="reads @SECRET@ on the"),
    Case("loader", "-kernel {kernel} -device loader,file=@SECRET@,addr=0x1000", words="reads @SECRET@ on the"),
    Case("global-romfile", "-kernel {kernel} -global e1000.romfile=@SECRET@", words="reads @SECRET@ on the"),
    Case("machine-firmware", "-kernel {kernel} -machine q35,firmware=@SECRET@", words="reads @SECRET@ on the"),
    Case("multiboot-initrd", "-kernel {kernel} -initrd {kernel},@SECRET@", words="reads @SECRET@ on the"),
    Case("cdrom", "-kernel {kernel} -cdrom @SECRET@", words="reads @SECRET@ on the worker"),
    Case("read-only-drive", "-kernel {kernel} -drive file=@SECRET@,if=virtio,readonly=on",
         words="reads @SECRET@ on the worker"),
    Case("blockdev-json", '-kernel {kernel} -blockdev \'{"driver":"file","filename":"@SECRET@","node-name":"s"}\'',
         words="writes @SECRET@ on the worker"),
    Case("rng-from-a-file", "-kernel {kernel} -object rng-random,id=r0,filename=@SECRET@",
         words="reads @SECRET@ on the worker"),
    Case("tftp-share", "-kernel {kernel} -netdev user,id=n0,tftp=@SECRETS@", words="reads @SECRETS@ on the"),
    Case("dotdot-from-a-deployed-file", "-kernel {kernel} -initrd {kernel}" + "/.." * 40 + "@SECRET@",
         words="reads @SECRET@ on the worker"),
    Case("relative-path", "-kernel {kernel} -initrd " + "../" * 40 + "@SECRET@", words="reads @SECRET@ on the"),
    # files written
    Case("drive", "-kernel {kernel} -drive file=@SECRET@,if=virtio", words="writes @SECRET@ on the worker"),
    Case("bare-disk-image", "-kernel {kernel} @SECRET@", words="QEMU disk image '@SECRET@' writes @SECRET@"),
    Case("hda", "-kernel {kernel} -hda @SECRET@", words="writes @SECRET@ on the worker"),
    Case("pflash", "-kernel {kernel} -pflash @SECRET@", words="writes @SECRET@ on the worker"),
    Case("pidfile", "-kernel {kernel} -pidfile @SECRETS@/qemu.pid", words="writes @SECRETS@/qemu.pid on the"),
    Case("log-file", "-kernel {kernel} -D @SECRETS@/qemu.log", words="writes @SECRETS@/qemu.log on the"),
    Case("trace-file", "-kernel {kernel} -trace enable=*,file=@SECRETS@/trace", words="writes @SECRETS@/trace"),
    Case("chardev-logfile", "-kernel {kernel} -chardev null,id=c0,logfile=@SECRETS@/console",
         words="writes @SECRETS@/console"),
    Case("dumpdtb", "-kernel {kernel} -machine pc,dumpdtb=@SECRETS@/dtb", words="writes @SECRETS@/dtb on the"),
    Case("memory-file", "-kernel {kernel} -object memory-backend-file,id=m0,size=1M,mem-path=@SECRET@,share=on",
         words="writes @SECRET@ on the worker"),
    Case("smb-share", "-kernel {kernel} -netdev user,id=n0,smb=@SECRETS@", words="writes @SECRETS@ on the"),
    # commands, sockets, devices and the like
    Case("incoming-exec", "-kernel {kernel} -incoming 'exec:cat @SECRET@'", words="from a command it runs"),
    Case("tap-script", "-kernel {kernel} -netdev tap,id=n0,script=@SECRETS@/up", words="network back end 'tap'"),
    Case("bridge-helper", "-kernel {kernel} -netdev bridge,id=n0,br=br0", words="network back end 'bridge'"),
    Case("guestfwd-command", "-kernel {kernel} -netdev 'user,id=n0,guestfwd=tcp:10.0.2.100:80-cmd:cat @SECRET@'",
         words="guestfwd= connects the board"),
    Case("network-socket", "-kernel {kernel} -netdev socket,id=n0,connect=127.0.0.1:6379",
         words="network back end 'socket'"),
    Case("serial-to-a-file", "-kernel {kernel} -serial file:@SECRETS@/serial", words="connects QEMU to a file"),
    Case("monitor-socket", "-kernel {kernel} -monitor unix:@SECRETS@/monitor,server,nowait",
         words="connects QEMU to a file, pipe, socket"),
    Case("qmp-tcp", "-kernel {kernel} -qmp tcp:127.0.0.1:4444,server,nowait", words="connects QEMU to a file"),
    Case("chardev-socket", "-kernel {kernel} -chardev socket,id=c0,path=/run/docker.sock",
         words="the character device 'socket'"),
    Case("chardev-pipe", "-kernel {kernel} -chardev pipe,id=c0,path=@SECRETS@/pipe",
         words="the character device 'pipe'"),
    Case("block-protocol", "-kernel {kernel} -drive file=nbd:127.0.0.1:10809,if=virtio", words="block protocol"),
    Case("json-filename", "-kernel {kernel} -drive 'file=json:{\"driver\":\"file\",\"filename\":\"@SECRET@\"}'",
         words="block protocol"),
    Case("host-device-driver", "-kernel {kernel} -drive driver=host_device,filename=/dev/sda,readonly=on",
         words="block driver 'host_device'"),
    Case("vvfat-directory", "-kernel {kernel} -drive file=fat:rw:@SECRETS@,format=raw", words="block protocol"),
    Case("readconfig", "-kernel {kernel} -readconfig @SECRETS@/qemu.conf", words="obey a configuration file"),
    Case("plugin", "-kernel {kernel} -plugin @SECRETS@/evil.so", words="loads a library into QEMU"),
    Case("daemonize", "-kernel {kernel} -daemonize", words="outlive the job"),
    Case("runas", "-kernel {kernel} -runas nobody", words="the user QEMU runs as"),
    Case("chroot", "-kernel {kernel} -chroot /", words="QEMU's root directory"),
    Case("sandbox-off", "-kernel {kernel} -sandbox off", words="QEMU's sandbox"),
    Case("add-fd", "-kernel {kernel} -add-fd fd=3,set=1", words="file descriptors"),
    Case("virtfs", "-kernel {kernel} -virtfs local,path=/,mount_tag=root,security_model=passthrough",
         words="shares a directory of the worker"),
    Case("semihosting", "-kernel {kernel} -semihosting", words="open, read and write the worker's files"),
    Case("set", "-kernel {kernel} -set drive.d0.file=@SECRET@", words="changes options set elsewhere"),
    Case("qtest", "-kernel {kernel} -qtest unix:@SECRETS@/qtest", words="hands control of QEMU"),
    Case("vfio", "-kernel {kernel} -device vfio-pci,host=0000:00:02.0", words="vfio-pci passes the worker's"),
    Case("usb-host", "-kernel {kernel} -device usb-host,hostbus=1,hostaddr=2", words="usb-host passes the worker"),
    Case("host-input", "-kernel {kernel} -object input-linux,id=i0,evdev=/dev/input/event0",
         words="the object type 'input-linux'"),
    Case("vnc-server", "-kernel {kernel} -vnc :0", words="serves the board's display"),
    Case("sound-system", "-kernel {kernel} -audiodev pa,id=a0", words="the sound back end 'pa'"),
    Case("unknown-option", "-kernel {kernel} -no-such-option", words="is not an option the worker's policy knows"),
    # the same through the job's context, rendered into the device's options on the master
    Case("context-extra_options", context={"extra_options": ["-smp 2", "-drive file=@SECRET@,if=virtio"]},
         words="'-drive file=@SECRET@,if=virtio' writes @SECRET@", path="context"),
    Case("context-extra_options-exec", context={"extra_options": ["-incoming exec:reboot"]},
         words="from a command it runs", path="context"),
    Case("context-extra_options-text", context={"extra_options": "-pidfile @SECRETS@/pid"},
         words="writes @SECRETS@/pid", path="context"),
    Case("context-memory", context={"memory": "512 -kernel @SECRET@"}, words="reads @SECRET@ on the worker",
         path="context"),
    Case("context-machine", context={"arch": "arm64", "machine": "virt,dumpdtb=@SECRETS@/dtb"},
         words="writes @SECRETS@/dtb", path="context"),
    Case("context-cpu", context={"arch": "arm64", "cpu": "cortex-a57 -bios @SECRET@"},
         words="reads @SECRET@ on the worker", path="context"),
    Case("context-serial", context={"arch": "arm64", "serial": "-serial file:@SECRETS@/serial"},
         words="connects QEMU to a file", path="context"),
    Case("context-netdevice", context={"netdevice": "user,smb=@SECRETS@"}, words="writes @SECRETS@ on the",
         path="context"),
    Case("context-netdevice-tap", context={"netdevice": "tap,script=@SECRETS@/up"},
         words="network back end 'tap'", path="context"),
    Case("context-model", context={"model": "model=virtio,romfile=@SECRET@"}, words="reads @SECRET@ on the",
         path="context"),
    Case("context-monitor", context={"monitor": "unix:@SECRETS@/monitor,server,nowait"},
         words="connects QEMU to a file", path="context"),
    Case("context-guest-disk", context={"guestfs_interface": "virtio,file=@SECRET@"}, tests=True,
         words="writes @SECRET@ on the worker", path="context"),
    Case("context-arch", context={"arch": "../../../../bin/sh"}, words="the QEMU program 'qemu-system-../../../",
         path="context"),
]
#: a context value with a line break writes YAML of its own into the device configuration (here,
#: another QEMU program and its options)
INJECTED = Case("context-line-break", context={"memory": "512\n          command: /bin/sh\n          options: "
                                                         "[-c, 'cat @SECRET@']\n          extra:\n          - -m 512"},
                words="the QEMU program '/bin/sh'", path="context")


@dataclass
class World:
    root: Path
    images: Path
    secrets: Path
    secret: Path

    def fill(self, text: str) -> str:
        return (text.replace("@SECRETS@", str(self.secrets)).replace("@SECRET@", str(self.secret))
                .replace("@IMAGES@", str(self.images)))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("qemu-policy")
    images, secrets = root / "images", root / "worker-secrets"
    images.mkdir(), secrets.mkdir()
    (images / "kernel.bin").write_bytes(b"\x7fELF pumice qemu policy kernel\n" * 64)
    secret = secrets / "shadow"
    secret.write_text(SECRET + "\n")
    (images / "escape").symlink_to(secret)  # a symlink under the allowed directory, out of it
    return World(root, images, secrets, secret)


def job_text(world: World, case: Case, url: str = "http://images.example/kernel.bin") -> str:
    """The case's job: a kernel downloaded from ``url``, booted by QEMU, a test when ``case.tests``."""
    image = {"url": url, "image_arg": world.fill(case.image_arg)}
    context = {"arch": "amd64", **{key: [world.fill(v) for v in value] if isinstance(value, list) else
                                   world.fill(value) for key, value in case.context.items()}}
    actions: list = [{"deploy": {"to": "tmpfs", "images": {"kernel": image}}},
                     {"boot": {"method": "qemu", "media": "tmpfs", "prompts": ["/ # "]}}]
    if case.tests:
        actions.append({"test": {"definitions": [{
            "from": "inline", "name": "smoke", "path": "inline/smoke.yaml",
            "repository": {"metadata": {"format": "Lava-Test Test Definition 1.0", "name": "smoke"},
                           "run": {"steps": ["lava-test-case ok --shell true"]}}}]}})
    job = {"device_type": "qemu", "job_name": f"qemu policy: {case.name}", "visibility": "public",
           "timeouts": {"job": {"minutes": 2}, "action": {"seconds": 30}}, "context": context, "actions": actions}
    return yaml.safe_dump(job, sort_keys=False, width=1000)


def configs(context: dict, dictionary: str = DICTIONARY) -> tuple[dict, dict]:
    """The device configuration rendered with ``context``, and without it (but its arch, when the
    device lists it): what the master sends the worker."""
    from master.devicetypes import DeviceTypes

    types = DeviceTypes()
    listed = types.device_config(dictionary).get("available_architectures") or []
    own = {"arch": context["arch"]} if context.get("arch") in listed else {}
    return types.device_config(dictionary, context=context), types.device_config(dictionary, context=own)


def expected_path(case: Case) -> str:
    return case.path or IMAGE_ARG


def validate(world: World, text: str, name: str, dispatcher: dict | None = None,
             dictionary: str = DICTIONARY) -> subprocess.CompletedProcess:
    """``pumice-run --validate`` as the worker runs it: the device YAML with and without the job's context."""
    folder = world.root / "validate" / name
    folder.mkdir(parents=True, exist_ok=True)
    device, own = configs(yaml.safe_load(text)["context"], dictionary)
    (folder / "job.yaml").write_text(text)
    (folder / "device.yaml").write_text(yaml.safe_dump(device))
    (folder / "device-own.yaml").write_text(yaml.safe_dump(own))
    (folder / "dispatcher.yaml").write_text(yaml.safe_dump(dispatcher or {}))
    return subprocess.run([sys.executable, "-m", "agent.run", "--validate", "--device", str(folder / "device.yaml"),
                           "--device-own", str(folder / "device-own.yaml"), "--dispatcher",
                           str(folder / "dispatcher.yaml"), str(folder / "job.yaml")],
                          capture_output=True, text=True, timeout=60)


# ---- pumice-run --validate ----


@pytest.mark.parametrize("case", HOSTILE + [INJECTED], ids=lambda case: case.name)
def test_validation_refuses_each_hostile_qemu_option(world: World, case: Case) -> None:
    done = validate(world, job_text(world, case), case.name)
    assert done.returncode == 1, done.stderr
    refused = [line for line in done.stderr.splitlines() if REFUSED in line]
    assert any(line.startswith(f"pumice-run: {expected_path(case)} (line ") and f"): {REFUSED}: " in line
               and world.fill(case.words) in line for line in refused), done.stderr
    assert SECRET not in done.stderr


def test_validation_resolves_a_symlink_out_of_an_allowed_directory(world: World) -> None:
    case = Case("symlink", "-kernel {kernel} -bios @IMAGES@/escape")
    done = validate(world, job_text(world, case), case.name, allowing([world.images]))
    assert done.returncode == 1 and f"reads {world.secret} on the worker; {DIRS_KEY}" in done.stderr, done.stderr
    assert validate(world, job_text(world, case), case.name, allowing([world.images, world.secrets])).returncode == 0


@pytest.mark.parametrize("name", ["initrd", "read-only-drive", "tftp-share", "context-memory", "context-cpu"])
def test_validation_accepts_a_file_read_under_an_allowed_directory(world: World, name: str) -> None:
    case = next(case for case in HOSTILE if case.name == name)
    done = validate(world, job_text(world, case), name, allowing([world.root]))
    assert done.returncode == 0, done.stderr


def test_a_written_file_is_refused_even_under_an_allowed_directory(world: World) -> None:
    for name in ("drive", "pidfile", "smb-share", "memory-file"):
        case = next(case for case in HOSTILE if case.name == name)
        done = validate(world, job_text(world, case), name, allowing([world.root]))
        assert done.returncode == 1 and "QEMU may write only the job's own files" in done.stderr, done.stderr
        if name == "drive":
            assert "(readonly=on, snapshot=on or -snapshot would only read it)" in done.stderr
    snapshot = Case("snapshot", "-kernel {kernel} -drive file=@SECRET@,if=virtio -snapshot")
    assert validate(world, job_text(world, snapshot), "snapshot", allowing([world.root])).returncode == 0
    # -snapshot protects neither a drive that says snapshot=off nor a -blockdev
    for name, image_arg in (("snapshot-off", "-drive file=@SECRET@,if=virtio,snapshot=off -snapshot"),
                            ("blockdev", "-blockdev driver=file,filename=@SECRET@,node-name=s -snapshot")):
        done = validate(world, job_text(world, Case(name, "-kernel {kernel} " + image_arg)), name,
                        allowing([world.root]))
        assert done.returncode == 1 and f"writes {world.secret} on the worker" in done.stderr, done.stderr


def test_the_device_s_own_options_pass_whatever_they_name(world: World) -> None:
    """What the lab's dictionary writes is the lab's: a firmware path, a monitor socket. The same
    written by the job is refused."""
    dictionary = ("{% extends 'qemu.jinja2' %}\n{% set no_kvm = True %}\n"
                  "{% set extra_options = ['-bios /usr/share/seabios/bios-256k.bin', "
                  "'-chardev socket,id=mon0,path=/run/pumice-qemu.sock,server=on,wait=off'] %}\n")
    plain = Case("own-options", context={"extra_options": ["-smp 2"]})
    assert validate(world, job_text(world, plain), "own", dictionary=dictionary).returncode == 0
    copied = Case("copied", "-kernel {kernel} -bios /usr/share/seabios/bios-256k.bin")
    done = validate(world, job_text(world, copied), "copied", dictionary=dictionary)
    assert done.returncode == 1 and "reads /usr/share/seabios/bios-256k.bin on the worker" in done.stderr


def test_a_standalone_run_without_the_device_s_own_configuration_trusts_the_device_file(world: World,
                                                                                        tmp_path: Path) -> None:
    """pumice-run given only --device (as lava-run is): the device file is its user's; the job's
    image_arg is still judged."""
    case = next(case for case in HOSTILE if case.name == "context-extra_options")
    text = job_text(world, case)
    device, _ = configs(yaml.safe_load(text)["context"])
    (tmp_path / "device.yaml").write_text(yaml.safe_dump(device))
    (tmp_path / "job.yaml").write_text(text)
    args = [sys.executable, "-m", "agent.run", "--validate", "--device", str(tmp_path / "device.yaml")]
    assert subprocess.run([*args, str(tmp_path / "job.yaml")], capture_output=True, timeout=60).returncode == 0
    (tmp_path / "job.yaml").write_text(job_text(world, next(case for case in HOSTILE if case.name == "initrd")))
    done = subprocess.run([*args, str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and REFUSED in done.stderr


# ---- LAVA's own QEMU jobs ----


def corpus_qemu_jobs(corpus: Path) -> Iterator[tuple[str, str, dict]]:
    for folder in ("sample-jobs", "scheduler-sample-jobs"):
        for path in sorted((corpus / folder).glob("*.yaml")):
            text = path.read_text()
            job = yaml.safe_load(text)
            if isinstance(job, dict) and boots_qemu(job):
                yield f"{folder}/{path.name}", text, job


#: the sample jobs the policy refuses: one reads a file of the worker (a file URL, the URL policy's),
#: one names ``-drive format=ext4``, no QEMU block driver (QEMU refuses it too): deny by default
REFUSED_SAMPLES = {"sample-jobs/kvm-overlays.yaml": "uses the block driver 'ext4'",
                   "sample-jobs/kvm-local.yaml": "file:///home/lava/kvm-debian-wheezy.img.bz2 reads"}


def test_lava_s_sample_qemu_jobs_meet_the_policy(lava_corpus: Path) -> None:
    """Every QEMU job of LAVA's corpus, against its kvm01 device rendered with the job's context and
    without, on a worker that allows nothing: as the master judges it and as the worker does."""
    from master.devicetypes import DeviceTypes

    types = DeviceTypes(template_dirs=[lava_corpus / "device-types"])
    dictionary = (lava_corpus / "devices" / "kvm01.jinja2").read_text()
    seen = 0
    for name, text, job in corpus_qemu_jobs(lava_corpus):
        context = job.get("context") or {}
        device = types.device_config(dictionary, context=context)
        own = types.device_config(dictionary, context={"arch": context["arch"]} if "arch" in context else {})
        master_side = [message for _, message in refusals(command_verdict(job, device, own, PLACEHOLDER_ROOT),
                                                          FilePolicy(), resolve=False)]
        try:
            load_job(text, device, device_own=own, dispatcher={})
            worker_side = []
        except JobDefinitionError as exc:
            worker_side = [fault.message for fault in exc.faults if REFUSED in fault.message]
        expected = REFUSED_SAMPLES.get(name)
        for found in (master_side, worker_side):
            if expected is None or "file://" in expected and found is master_side:  # the URL: not QEMU's
                assert found == [], (name, found)
            else:
                assert len(found) == 1 and expected in found[0], (name, found)
        seen += 1
    assert seen >= 30, seen


# ---- the master, at submission ----


@pytest.fixture
def qemu_master(master: tuple[Lab, MasterServer, dict[str, Client]],  # noqa: F811 (the fixture)
                ) -> tuple[Lab, MasterServer, dict[str, Client]]:
    """A running master (test_master_policy's: worker w1 allows nothing of itself) whose qemu devices
    take arch, memory and options from the job's context."""
    with connection():
        for hostname in ("qemu01", "qemu02"):
            inventory.set_dictionary(SYSTEM, hostname, DICTIONARY)
    return master


def line_of(text: str, path: str) -> int:
    """The line a fault at ``path`` names: the image_arg's, or the context's first key's."""
    lines = text.splitlines()
    if path == IMAGE_ARG:
        return next(n for n, line in enumerate(lines, 1) if line.lstrip().startswith("image_arg:"))
    return next(n for n, line in enumerate(lines, 1) if line.startswith("context:")) + 1


def test_a_running_master_refuses_each_hostile_qemu_option_at_submission(world: World, qemu_master) -> None:
    _, _, clients = qemu_master
    for case in HOSTILE:
        text = job_text(world, case)
        with pytest.raises(ApiError) as info:
            clients["alice"].call("POST", "/jobs/", body=text)
        assert info.value.status == 400, (case.name, info.value.describe())
        faults = [f for f in info.value.faults if f["message"].startswith(REFUSED)]
        assert any(f["path"] == expected_path(case) and f["line"] == line_of(text, expected_path(case))
                   and world.fill(case.words) in f["message"] for f in faults), (case.name, info.value.faults)
    # a line break in a context value is refused before anything is rendered with it
    with pytest.raises(ApiError) as info:
        clients["alice"].call("POST", "/jobs/", body=job_text(world, INJECTED))
    [fault] = info.value.faults
    assert fault["path"] == "context.memory" and fault["message"].startswith(f"{REFUSED}: a line break"), fault
    # what only the worker can see passes: a symlink under an allowed directory
    clients["admin"].call("PUT", "/workers/w1/config/", json_body={"config": yaml.safe_dump(allowing([world.images]))})
    escape = Case("symlink", "-kernel {kernel} -bios @IMAGES@/escape")
    [job_id] = clients["alice"].call("POST", "/jobs/", body=job_text(world, escape))["job_ids"]
    with connection():
        assert Job.get_by_id(job_id).local_urls == [["file", f"{world.images}/escape"]]
    # a file read under a directory the worker allows is accepted, and kept for the scheduler
    clients["admin"].call("PUT", "/workers/w1/config/", json_body={"config": yaml.safe_dump(allowing([world.root]))})
    initrd = next(case for case in HOSTILE if case.name == "initrd")
    [job_id] = clients["alice"].call("POST", "/jobs/", body=job_text(world, initrd))["job_ids"]
    with connection():
        assert Job.get_by_id(job_id).local_urls == [["file", str(world.secret)]]
    assert clients["alice"].call("GET", "/system/version/")["version"]


def test_a_running_master_accepts_lava_s_sample_qemu_jobs_without_a_policy_refusal(qemu_master,
                                                                                  lava_corpus: Path) -> None:
    _, _, clients = qemu_master
    for name, text, _ in corpus_qemu_jobs(lava_corpus):
        try:
            clients["alice"].call("POST", "/jobs/", body=text)
        except ApiError as exc:  # other faults (methods Pumice lacks, MultiNode) are not this policy's
            refused = [f["message"] for f in exc.faults if f["message"].startswith(REFUSED)]
            expected = REFUSED_SAMPLES.get(name)
            assert refused == [] if expected is None else (len(refused) == 1 and expected in refused[0]), \
                (name, refused)


# ---- when the job runs ----


def unchecked_job(world: World, case: Case, tmp_path: Path, dispatcher: dict | None = None,
                  url: str | None = None) -> object:
    """The case's job built without the policy's validation (as the master builds it), its kernel a
    file of the allowed images directory: what the agent does if such a job ever reaches it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = job_text(world, case, url or f"file://{world.images}/kernel.bin")
    device, own = configs(yaml.safe_load(text)["context"])
    config = {**(dispatcher or allowing([world.images])), "tmp_dir": str(tmp_path)}
    return load_job(text, device, job_id="7", logger=JobLogger(tmp_path / "output.yaml"), output_dir=tmp_path,
                    dispatcher=config, on_worker=False, device_own=own)


@pytest.mark.parametrize("case", HOSTILE + [INJECTED], ids=lambda case: case.name)
def test_the_agent_refuses_at_run_time_what_validation_let_through(world: World, case: Case, tmp_path: Path) -> None:
    before = sorted(world.secrets.iterdir())
    job = unchecked_job(world, case, tmp_path)
    health = job.run()
    job.logger.close()
    assert health == "Incomplete"
    assert isinstance(job.error, PolicyRefusal) and job.error.error_type == "Job", job.error
    assert str(job.error).startswith(REFUSED) and world.fill(case.words) in str(job.error), job.error
    log = (tmp_path / "output.yaml").read_text()
    assert "boot command:" not in log  # QEMU never started
    assert SECRET not in log
    assert sorted(world.secrets.iterdir()) == before  # nothing written there
    assert not list(tmp_path.glob("pumice-7-*"))  # the scratch directory is gone


@pytest.fixture
def broker_lab(tmp_path: Path, database_url: str | None) -> Iterator[BrokerLab]:
    yield from make_broker_lab(tmp_path, database_url)


def test_a_real_agent_refuses_what_the_job_s_context_adds_when_validation_let_it_through(
        world: World, broker_lab: BrokerLab, tmp_path: Path) -> None:
    """Master, broker, agent daemon and pumice-run: START carries the device YAML with and without
    the job's context, so the agent tells the job's options from the lab's. A job whose stored
    definition and context were changed after its validation (a hole in the master, say) is refused
    when it runs;
    QEMU never starts."""
    with connection():
        inventory.update_worker(SYSTEM, "w1", health="Maintenance")
        inventory.add_worker(SYSTEM, "qp")
        inventory.set_worker_text(SYSTEM, "qp", "config",
                                    yaml.safe_dump({**allowing([world.images]), "tmp_dir": str(tmp_path)}))
        inventory.add_device(SYSTEM, "qp-1", "qemu", worker="qp", health="Good", dictionary=DICTIONARY)
    master_cert, worker_cert = broker_lab.key_files("qp", tmp_path / "keys")
    agent = Running(AgentDaemon(AgentConfig(master=broker_lab.endpoint, hostname="qp", spool=tmp_path / "spool",
                                       heartbeat=0.5, master_cert=master_cert, worker_cert=worker_cert)))
    try:
        db_wait(lambda: inventory.get_worker("qp").state == "Online", 20, "the agent online")
        url = f"file://{world.images}/kernel.bin"
        benign = job_text(world, Case("benign", context={"extra_options": ["-smp 2"]}), url)
        with connection():
            [job_id] = jobs.submit_job(benign, broker_lab.lab.user("alice"))
            hostile = next(case for case in HOSTILE if case.name == "context-extra_options")
            changed = job_text(world, hostile, url)
            # the stored job as a hole would leave it: its definition and the context START renders with
            Job.update(definition=changed, context=yaml.safe_load(changed)["context"]).where(Job.id == job_id).execute()
        Scheduler().loop_once()
        db_wait(lambda: Job.get_by_id(job_id).state == JobState.FINISHED, 60, f"job {job_id} to finish")
        with connection():
            finished = Job.get_by_id(job_id)
            with current().store.log(job_id) as logfile:
                log = "\n".join(logfile.read())
        assert finished.health == JobHealth.INCOMPLETE, log[-3000:]
        comment = finished.failure_comment
        # pumice-run's own validation on the worker refused it, naming the job's context
        assert comment.startswith(f"Job: context (line {line_of(job_text(world, hostile, url), 'context')}): "
                                  f"{REFUSED}: QEMU option '-drive file={world.secret},if=virtio' writes"), comment
        assert "boot command:" not in log and SECRET not in log
    finally:
        agent.close()


def qcow2_over(backing: Path, image: Path) -> Path:
    """A qcow2 image (the job's) whose backing file is ``backing``: what QEMU and qemu-img read."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(image)],
                   check=True, timeout=30)
    return image


def test_the_agent_refuses_a_deployed_image_that_names_a_file_of_the_worker(world: World, tmp_path: Path) -> None:
    """What a disk image names shows only once it is deployed: validation passes it, the agent
    refuses it before QEMU opens it, and allows it where the worker's policy does."""
    image = qcow2_over(world.secret, world.images / "backed.qcow2")
    case = Case("backing-file", "-kernel {kernel} -drive file={kernel},if=virtio,readonly=on")
    text = job_text(world, case, image.as_uri())
    assert validate(world, text, "backing", allowing([world.images])).returncode == 0
    job = unchecked_job(world, case, tmp_path / "refused", url=image.as_uri())
    assert job.run() == "Incomplete"
    assert f"names '{world.secret}') reads {world.secret} on the worker" in str(job.error), job.error
    assert "boot command:" not in (tmp_path / "refused" / "output.yaml").read_text()
    # allowed: QEMU starts (and fails on this kernel, which is no kernel)
    job = unchecked_job(world, case, tmp_path / "allowed", allowing([world.images, world.secrets]), image.as_uri())
    job.run()
    assert "boot command:" in (tmp_path / "allowed" / "output.yaml").read_text()
    assert not isinstance(job.error, PolicyRefusal), job.error


def test_qemu_img_does_not_convert_an_image_whose_backing_file_the_policy_refuses(world: World,
                                                                                  tmp_path: Path) -> None:
    image = qcow2_over(world.secret, world.images / "convert.qcow2")
    text = job_text(world, Case("convert"), image.as_uri()).replace("image_arg:", "format: qcow2\n        image_arg:")
    device, own = configs({"arch": "amd64"})
    job = load_job(text, device, job_id="9", logger=JobLogger(None), on_worker=False, device_own=own,
                   dispatcher={**allowing([world.images]), "tmp_dir": str(tmp_path)})
    try:
        with pytest.raises(PolicyRefusal, match=f"names '{re.escape(str(world.secret))}'"):
            job.pipeline.run(None, Deadline.after(60, "deploy"), job.pipeline.actions[:1])
        assert not list(job.workdir.rglob("*.img"))  # nothing converted
    finally:
        job.pipeline.cleanup(None)
        shutil.rmtree(job.workdir, ignore_errors=True)
    allowed = load_job(text, device, job_id="10", logger=JobLogger(None), on_worker=False, device_own=own,
                       dispatcher={**allowing([world.images, world.secrets]), "tmp_dir": str(tmp_path)})
    try:
        allowed.pipeline.run(None, Deadline.after(60, "deploy"), allowed.pipeline.actions[:1])
        converted = allowed.data.downloads["kernel"].read_bytes()
    finally:
        allowed.pipeline.cleanup(None)
        shutil.rmtree(allowed.workdir, ignore_errors=True)
    assert converted.startswith(SECRET.encode())  # what qemu-img would have copied into the board


# ---- the option table and QEMU itself ----


QEMUS = ("qemu-system-x86_64", "qemu-system-aarch64")


def qemu(binary: str, *args: str) -> subprocess.CompletedProcess:
    """QEMU with a machine that does nothing, and ``args``."""
    return subprocess.run([binary, "-machine", "none", "-display", "none", "-nodefaults", *args],
                          capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)


def test_the_option_table_is_qemu_s_own() -> None:
    """Every option the installed QEMUs list is in the table, and QEMU reads each option of the
    table with the argument count the policy assumes (QEMU's parser and ours cut the command line
    alike: an option's argument is never judged as an option, nor the reverse)."""
    binaries = [shutil.which(name) for name in QEMUS]
    assert all(binaries), "qemu-system-x86 and qemu-system-arm are in the Makefile's APT_PACKAGES"
    table = FLAGS | set(REFUSED_FLAGS) | TEXT | set(JUDGES)
    listed = set()
    for binary in binaries:
        text = subprocess.run([binary, "-help"], capture_output=True, text=True, timeout=20).stdout
        for match in re.finditer(r"^(-{1,2}[\w-]+)((?:/-[\w-]+)*)", text, re.MULTILINE):
            listed |= {("-" + name.lstrip("-")) for name in (match.group(1) + match.group(2)).split("/")}
    assert listed - table == set()
    for option in sorted(table):
        checked = []
        for binary in binaries:
            if takes_argument(option):
                said = qemu(binary, option).stderr
                if "not supported for this target" not in said:
                    checked.append(f"{option}: requires an argument" in said)
            else:
                done = qemu(binary, option, "-version")
                if "not supported for this target" not in done.stderr:
                    checked.append("invalid option" not in done.stderr and "requires an argument" not in done.stderr
                                   and done.returncode == 0)
        assert checked == [True] * len(checked), option
        assert checked or option in ("-xen-attach", "-xen-domid-restrict"), f"{option}: neither QEMU has it"


def test_every_block_driver_of_qemu_is_classified() -> None:
    """The block drivers a job may name are QEMU's image formats and the file protocol; the rest of
    QEMU's list is refused. A QEMU with other drivers changes this list: review them."""
    text = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True, timeout=20).stdout
    drivers = set(re.search(r"Supported formats: (.*)", text).group(1).split())
    assert drivers >= BLOCK_DRIVERS
    assert drivers - BLOCK_DRIVERS == {
        "blkdebug", "blklogwrites", "blkverify", "copy-before-write", "ftp", "ftps", "gluster", "host_cdrom",
        "host_device", "http", "https", "iscsi", "iser", "nbd", "nfs", "nvme", "quorum", "rbd", "replication",
        "snapshot-access", "ssh", "vvfat"}


def test_the_command_line_is_cut_as_qemu_cuts_it() -> None:
    tokens = ["-append", "-kernel", "/x", "--nographic", "-m", "-S", "disk.img", "-no-such", "y"]
    assert [tokens[s:e] for s, e in groups(tokens)] == [
        ["-append", "-kernel"], ["/x"], ["--nographic"], ["-m", "-S"], ["disk.img"], ["-no-such"], ["y"]]


# ---- a real board ----

MARKER = b"PUMICE-ALLOWED-DISK-MARKER"
BOARD_JOB = """\
device_type: qemu
job_name: qemu policy, a disk of an allowed directory
visibility: public
timeouts:
  job: {minutes: 4}
  action: {minutes: 2}
context:
  arch: amd64
  extra_options: ['-smp 1', '-drive file=@DATA@,format=raw,if=virtio@MODE@']
actions:
- deploy:
    to: tmpfs
    images:
      kernel:
        image_arg: -kernel {kernel} -append "console=ttyS0,115200 loglevel=6"
        url: "@KERNEL@"
      ramdisk:
        image_arg: -initrd {ramdisk}
        url: "@RAMDISK@"
        format: cpio.newc
        overlays: {lava: true}
- boot:
    method: qemu
    media: tmpfs
    prompts: ['/ # ']
- test:
    definitions:
    - from: inline
      name: disk
      path: inline/disk.yaml
      repository:
        metadata: {format: Lava-Test Test Definition 1.0, name: disk}
        run:
          steps:
          - lava-test-case allowed-disk --shell grep -q PUMICE-ALLOWED-DISK /dev/vda
"""


@pytest.mark.qemu
def test_a_board_reads_a_disk_image_of_an_allowed_directory(world: World, dut_images, http_server,
                                                            tmp_path: Path) -> None:
    """The job's context attaches a disk image of a directory the worker allows, read-only: QEMU
    (working in the job's scratch directory) opens it and the board reads it. Without the setting,
    or read-write, the job is refused and QEMU never starts."""
    allowed = tmp_path / "lab-images"
    allowed.mkdir()
    (allowed / "data.img").write_bytes(MARKER + b"\0" * ((1 << 20) - len(MARKER)))
    for name, source in (("policy-vmlinuz", dut_images.amd64.kernel), ("policy-initramfs.cpio.gz",
                                                                        dut_images.amd64.ramdisk)):
        shutil.copyfile(source, http_server.root / name)
    (tmp_path / "work").mkdir()

    def run(mode: str, dirs: list[Path], name: str) -> tuple[subprocess.CompletedProcess, Path]:
        text = (BOARD_JOB.replace("@DATA@", str(allowed / "data.img")).replace("@MODE@", mode)
                .replace("@KERNEL@", http_server.url("policy-vmlinuz"))
                .replace("@RAMDISK@", http_server.url("policy-initramfs.cpio.gz")))
        device, own = configs(yaml.safe_load(text)["context"])
        folder = tmp_path / name
        folder.mkdir()
        for file, content in (("job.yaml", text), ("device.yaml", yaml.safe_dump(device)),
                              ("device-own.yaml", yaml.safe_dump(own)),
                              ("dispatcher.yaml", yaml.safe_dump(allowing(dirs, [http_server.address],
                                                                          tmp_dir=str(tmp_path / "work"))))):
            (folder / file).write_text(content)
        done = subprocess.run([sys.executable, "-m", "agent.run", "--device", str(folder / "device.yaml"),
                               "--device-own", str(folder / "device-own.yaml"), "--dispatcher",
                               str(folder / "dispatcher.yaml"), "--output-dir", str(folder / "out"), "--job-id", "43",
                               str(folder / "job.yaml")], capture_output=True, text=True, timeout=240)
        return done, folder / "out" / "output.yaml"

    done, log = run(",readonly=on", [allowed], "allowed")
    assert done.returncode == 0, done.stderr + log.read_text()[-4000:]
    text = log.read_text()
    assert f"file={allowed}/data.img,format=raw,if=virtio,readonly=on" in text  # the boot command
    assert re.search(r'"case": "allowed-disk".*"result": "pass"', text), text[-4000:]
    for mode, dirs, words in ((",readonly=on", [], f"reads {allowed}/data.img on the worker; {DIRS_KEY}"),
                              ("", [allowed], f"writes {allowed}/data.img on the worker")):
        done, log = run(mode, dirs, f"refused{len(dirs)}")
        assert done.returncode == 1 and f"context (line 8): {REFUSED}: " in done.stderr and words in done.stderr, \
            done.stderr
        assert "boot command:" not in log.read_text()
