#!/usr/bin/env python3
"""Collect real LAVA job files for the side-by-side validation suite (tests/data/compat/jobs).

Three generators, each pinned (see tests/data/compat/SOURCES.md):

- ``kernelci``: KernelCI's LAVA job templates (kernelci-core's config/runtime base/boot/tests
  templates, kernelci-pipeline's config/runtime jobs, jobs.yaml, platforms.yaml, scheduler.yaml,
  rootfs.yaml) rendered as kernelci-core's ``kci job generate`` renders them (Runtime.get_params,
  resolve_rootfs_params, format_params, LAVA.generate), for one job of each kind (template, test
  method, boot method, boot commands) on each LAVA device type the scheduler sends it to;
- ``lava-test-plans``: ``lava-test-plans --dry-run`` for every project's QEMU devices and test plans;
- ``tuxlava``: ``tuxlava`` for every QEMU architecture this machine runs, with several tests.

The generators run in a tools venv (``.compat-venv``, made by ``make compat``); the KernelCI
sources are git directories or checkouts named by ``--kernelci-core`` / ``--kernelci-pipeline``
(or $KERNELCI_CORE / $KERNELCI_PIPELINE). A source that is not given keeps its stored jobs.
Artifact URLs are KernelCI's and Linaro's real hosts: lava-run reaches them only through the
loopback server of compat_lava.py (LAVA's ``http_url_format_string``), never the network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compat import DATA  # noqa: E402

JOBS = DATA / "jobs"
VENV = Path(os.environ.get("COMPAT_VENV", Path(__file__).resolve().parent.parent / ".compat-venv")).resolve()


def log(message: str) -> None:
    print(f"compat-collect: {message}", file=sys.stderr)


def write_job(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def checkout(source: Path, into: Path, *paths: str) -> tuple[Path, str]:
    """A work tree of ``source`` (a checkout or a bare git directory) and its commit."""
    git = ["git", "-C", str(source)]
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    if (source / ".git").exists():
        return source, commit
    archive = subprocess.run(git + ["archive", "--format=tar", commit, *paths], capture_output=True, check=True)
    into.mkdir(parents=True, exist_ok=True)
    tar = into / "src.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as handle:
        handle.extractall(into, filter="data")
    tar.unlink()
    return into, commit


# --- KernelCI --------------------------------------------------------------------------------------

#: What a kbuild node of the new KernelCI API carries for each architecture (kernel_type as
#: tuxmake names it, the kernel image's file name).
KERNEL_IMAGES = {
    "x86_64": ("bzimage", "bzImage"), "i386": ("bzimage", "bzImage"), "arm64": ("image", "Image"),
    "arm": ("zimage", "zImage"), "riscv": ("image", "Image"),
}
STORAGE = "https://files.kernelci.org/mainline/master/v6.12-rc3-45-g6c52d4da1c74"


class _Keep(dict):
    """A format map that leaves unknown ``{placeholders}`` as they are (KernelCI's job templates
    carry LAVA's own ``{kernel}``-style placeholders through)."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _format(value, args: dict):
    if isinstance(value, str):
        return value.format_map(_Keep(args))
    if isinstance(value, dict):
        return {k: _format(v, args) for k, v in value.items()}
    if isinstance(value, list):
        return [_format(v, args) for v in value]
    return value


def _system_arch(system: str, arch: str) -> str:
    table = {"brarch": {"arm": "armel", "x86_64": "x86", "riscv64": "riscv"}, "crosarch": {"arm": "armel"},
             "debarch": {"arm": "armhf", "riscv": "riscv64", "x86_64": "amd64"},
             "karch": {"armel": "arm", "x86_64": "x86"}}
    return table[system].get(arch) or arch


def kernelci_node(job_name: str, arch: str, platform: str, dtb: str | None) -> dict:
    """A realistic node of KernelCI's API for a job on ``platform`` (a kbuild's artifacts)."""
    kernel_type, image = KERNEL_IMAGES.get(arch, ("image", "Image"))
    build = f"{STORAGE}/{arch}/defconfig+lab-setup/gcc-14"
    artifacts = {"kernel": f"{build}/kernel/{image}", "modules": f"{build}/modules.tar.xz",
                 "metadata": f"{build}/metadata.json", "kselftest_tar_xz": f"{build}/kselftest.tar.xz"}
    if dtb:
        artifacts["dtb"] = f"{build}/{dtb}"
    return {
        "id": "6710f3a2c9d84a1b7e5f0c21", "name": job_name, "kind": "job", "artifacts": artifacts,
        "data": {"kernel_revision": {"describe": "v6.12-rc3-45-g6c52d4da1c74", "tree": "mainline",
                                     "branch": "master", "version": {"version": 6, "patchlevel": 12}},
                 "kernel_type": kernel_type, "config_full": "defconfig+lab-setup", "arch": arch,
                 "platform": platform},
    }


def collect_kernelci(core: Path, pipeline: Path, corpus_types: set[str], work: Path) -> dict:
    """Render one job of each kind on each LAVA device type it is scheduled on."""
    import jinja2

    core, core_commit = checkout(core, work / "core", "config/runtime")
    pipe, pipe_commit = checkout(pipeline, work / "pipeline", "config")
    config = {name: yaml.safe_load((pipe / "config" / f"{name}.yaml").read_text())
              for name in ("jobs", "platforms", "scheduler", "rootfs")}
    jobs, platforms = config["jobs"]["jobs"], config["platforms"]["platforms"]
    rootfs = config["rootfs"]["rootfs"]
    env = jinja2.Environment(loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(p)) for p in (
        pipe / "config" / "runtime", core / "config" / "runtime")]), extensions=["jinja2.ext.do"])

    def kci_raise(msg):
        raise jinja2.TemplateRuntimeError(msg)

    env.globals.update(kci_raise=kci_raise, kci_yaml_dump=lambda data: yaml.dump(data, indent=2))
    out = JOBS / "kernelci"
    shutil.rmtree(out, ignore_errors=True)
    seen, count = set(), 0
    for entry in config["scheduler"]["scheduler"]:
        runtime = entry.get("runtime") or {}
        job_config = jobs.get(entry.get("job"))
        if runtime.get("type") != "lava" or not job_config or job_config.get("kind") != "job":
            continue
        for platform in entry.get("platforms") or []:
            platform_config = dict(platforms.get(platform) or {})
            device_type = platform_config.get("base_name") or platform
            boot_method = platform_config.get("boot_method")
            params = dict(job_config.get("params") or {})
            kind = (job_config["template"], params.get("test_method"), params.get("boot_commands"), boot_method,
                    device_type)
            if device_type not in corpus_types or not boot_method or kind in seen:
                continue
            arch = platform_config.get("arch", "arm64")
            dtbs = platform_config.get("dtb")
            dtb = (dtbs[0] if isinstance(dtbs, list) else dtbs) or None
            node = kernelci_node(entry["job"], arch, platform, dtb)
            template_params = {
                "api_config": {"name": "production"}, "storage_config": {"name": "kci-storage"},
                "platform_config": {"name": platform, **platform_config}, "instanceid": "prod",
                "instance_callback": "https://kernelci-pipeline.westus3.cloudapp.azure.com",
                "name": entry["job"], "node": node, "runtime": "lava", "runtime_image": None,
                "device_type": device_type, "notify": {"callback": {"token": "kernelci-lab-callback"}},
                "priority": 45,
            }
            template_params.update(platform_config.get("params") or {})
            if dtb:
                template_params["device_dtb"] = dtb
            template_params.update(params)
            for system in ("brarch", "crosarch", "debarch", "karch"):
                template_params[system] = _system_arch(system, arch)
            ref = template_params.pop("rootfs_ref", None)
            for key, value in (rootfs.get(ref) or {}).items():
                template_params.setdefault(key, value)
            fmap = {k: v for k, v in platform_config.items() if k not in ("params", "rules")}
            fmap.update(krev="6.12", **params)
            fmap.update({s: _system_arch(s, arch) for s in ("brarch", "crosarch", "debarch", "karch")})
            template_params = _format(template_params, fmap)
            try:
                rendered = env.get_template(job_config["template"]).render(template_params)
                text = yaml.dump(yaml.safe_load(rendered))
            except (jinja2.TemplateError, yaml.YAMLError) as exc:
                log(f"kernelci: {entry['job']} on {platform}: not rendered: {exc}")
                continue
            seen.add(kind)
            write_job(out / f"{entry['job']}--{device_type}.yaml", text)
            count += 1
    log(f"kernelci: {count} jobs")
    return {"kernelci-core": core_commit, "kernelci-pipeline": pipe_commit, "jobs": count}


# --- lava-test-plans --------------------------------------------------------------------------------

LTP_QEMU_DEVICES = ("qemu_arm", "qemu_arm64", "qemu_i386", "qemu_x86_64")
#: Variables as LKFT's CI sets them for a build (tuxsuite artifacts), one set per architecture.
LTP_BUILD = "https://storage.tuxsuite.com/public/linaro/lkft/builds/2nWzQ8Xr7Kq5vYb3cD1eF9gH0iJ"
LTP_ARCH = {"qemu_arm": ("arm", "zImage", "armhf"), "qemu_arm64": ("arm64", "Image.gz", "arm64"),
            "qemu_i386": ("i386", "bzImage", "i386"), "qemu_x86_64": ("x86_64", "bzImage", "amd64")}


def ltp_variables(project: str, device: str) -> str:
    arch, image, debarch = LTP_ARCH[device]
    rootfs = f"https://storage.lkft.org/rootfs/oe-lkft/scarthgap/{debarch}/lkft-console-image.rootfs.ext4.gz"
    values = {
        "PROJECT_NAME": "linux-mainline-master", "TAGS": "",
        "KERNEL_BRANCH": "master", "KERNEL_REPO": "https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git",
        "KERNEL_COMMIT": "6c52d4da1c7481c8a5cd1d6f1e5b4a7a2b0a1f03", "KERNEL_DESCRIBE": "v6.12-rc3-45-g6c52d4da1c74",
        "MAKE_KERNELVERSION": "6.12.0-rc3", "KERNEL_CONFIG_URL": f"{LTP_BUILD}/config",
        "BUILD_URL": "https://gitlab.com/Linaro/lkft/mirrors/torvalds/linux-mainline/-/pipelines/1514722110",
        "KERNEL_ARCH_ARTIFACTS_PUB_DEST": LTP_BUILD, "BUILD_NUMBER": "v6.12-rc3-45-g6c52d4da1c74",
        "DEVICE_TYPE": device, "SKIPGEN_KERNEL_VERSION": "6.12", "LAVA_JOB_PRIORITY": "25",
        "TDEFINITIONS_REVISION": "2024.09", "ARCH": arch, "KERNEL_URL": f"{LTP_BUILD}/{image}",
        "BOOT_LABEL": "kernel", "BOOT_URL": f"{LTP_BUILD}/{image}", "DEPLOY_TARGET": "downloads",
        "PROJECT": f"projects/{project}/", "ROOTFS_URL": rootfs,
        "OVERLAY_KSELFTEST_URL": f"{LTP_BUILD}/kselftest.tar.xz", "OVERLAY_PERF_URL": f"{LTP_BUILD}/perf.tar.xz",
        "OVERLAY_MODULES_URL": f"{LTP_BUILD}/modules.tar.xz", "TOOLCHAIN": "gcc-13",
        "ROOTFS_URL_FORMAT": "ext4", "ROOTFS_URL_COMP": "gz",
        "OVERLAY_MODULES_URL_FORMAT": "tar", "OVERLAY_MODULES_URL_COMP": "xz",
        "OVERLAY_KSELFTEST_URL_FORMAT": "tar", "OVERLAY_KSELFTEST_URL_COMP": "xz",
        "OVERLAY_PERF_URL_FORMAT": "tar", "OVERLAY_PERF_URL_COMP": "xz",
        "TUXSUITE_BAKE_VENDOR": "", "KSELFTEST_PATH": "/opt/kselftests/default-in-kernel/",
        "QA_SERVER_PROJECT": "linux-mainline-master", "QA_SERVER": "https://qa-reports.linaro.org",
        "QA_SERVER_TEAM": "lkft", "DEPLOY_OS": "oe", "BOOT_OS_PROMPT": "root@(.*):[/~]#",
        "AUTO_LOGIN_PROMPT": "login:", "AUTO_LOGIN_USERNAME": "root", "AUTO_LOGIN_PASSWORD": "",
        "EMAIL_NOTIFICATION": "", "EMAIL": "lkft@linaro.org",
    }
    return "".join(f'{key} = "{value}"\n' for key, value in values.items())


def collect_lava_test_plans(work: Path) -> dict:
    """``lava-test-plans --dry-run`` for every project's QEMU devices and every test plan."""
    package = next((VENV / "lib").glob("python3*/site-packages/lava_test_plans"))
    out_dir = package.parent / "tmp"  # where lava-test-plans writes a dry run
    out = JOBS / "lava-test-plans"
    shutil.rmtree(out, ignore_errors=True)
    plans = sorted(p.name for p in (package / "testplans").iterdir() if p.is_dir())
    count = 0
    # a project runs on QEMU when it has its own qemu.jinja2; its devices are its own, or the
    # package's shared ones
    for project in sorted(p.parent.name for p in (package / "projects").glob("*/qemu.jinja2")):
        devices_path = f"projects/{project}/devices"
        if not (package / devices_path).is_dir():
            devices_path = "devices"
        devices = [d for d in LTP_QEMU_DEVICES if (package / devices_path / d).exists()]
        for device in devices:
            variables = work / f"{project}-{device}.ini"
            variables.write_text(ltp_variables(project, device))
            shutil.rmtree(out_dir, ignore_errors=True)
            cmd = [str(VENV / "bin" / "lava-test-plans"), "--dry-run", "--variables", str(variables),
                   "--device-type", device, "--testplan-device-path", devices_path,
                   "--test-plan", *plans]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
            if not out_dir.exists():
                log(f"lava-test-plans: {project} {device}: nothing generated: {done.stderr[-500:]}")
                continue
            for path in sorted(out_dir.rglob("*.yaml")):
                write_job(out / project / device / path.name, path.read_text())
                count += 1
        shutil.rmtree(out_dir, ignore_errors=True)
    log(f"lava-test-plans: {count} jobs")
    return {"jobs": count}


# --- tuxlava ---------------------------------------------------------------------------------------

def qemu_architectures() -> list[str]:
    """tuxlava's QEMU devices whose emulator is installed here."""
    binaries = {"qemu-arm64": "aarch64", "qemu-arm64be": "aarch64", "qemu-armv5": "arm", "qemu-armv7": "arm",
                "qemu-armv7be": "arm", "qemu-i386": "i386", "qemu-x86_64": "x86_64"}
    return [device for device, arch in binaries.items() if shutil.which(f"qemu-system-{arch}")]


TUX_BUILD = "https://storage.tuxsuite.com/public/linaro/lkft/builds/2nWzQ8Xr7Kq5vYb3cD1eF9gH0iJ"
#: (name, tuxlava arguments): a boot, LTP and kselftest runs with modules and overlays.
TUX_RUNS = (
    ("boot", []),
    ("ltp-smoke", ["--tests", "ltp-smoke"]),
    ("ltp-smoke-modules", ["--tests", "ltp-smoke", "--modules", f"{TUX_BUILD}/modules.tar.xz"]),
    ("kselftest-timers", ["--tests", "kselftest-timers", "--parameters",
                          f"KSELFTEST={TUX_BUILD}/kselftest.tar.xz"]),
    ("overlay-commands", ["--overlay", f"{TUX_BUILD}/perf.tar.xz", "/usr", "--", "uname", "-a"]),
)


def collect_tuxlava() -> dict:
    out = JOBS / "tuxlava"
    shutil.rmtree(out, ignore_errors=True)
    count = 0
    for device in qemu_architectures():
        for name, args in TUX_RUNS:
            cmd = [str(VENV / "bin" / "tuxlava"), "--device", device, *args]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not done.stdout.strip():
                log(f"tuxlava: {device} {name}: failed: {done.stderr[-500:]}")
                continue
            write_job(out / device / f"{name}.yaml", done.stdout)
            count += 1
    log(f"tuxlava: {count} jobs")
    return {"jobs": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernelci-core", type=Path, default=os.environ.get("KERNELCI_CORE"))
    parser.add_argument("--kernelci-pipeline", type=Path, default=os.environ.get("KERNELCI_PIPELINE"))
    parser.add_argument("--corpus", type=Path, default=None, help="the LAVA corpus (its device-types/)")
    parser.add_argument("sources", nargs="*", default=["kernelci", "lava-test-plans", "tuxlava"])
    options = parser.parse_args(argv)
    from compat import corpus_dir

    corpus = options.corpus or corpus_dir()
    if corpus is None:
        log("the LAVA corpus is needed for its device types")
        return 1
    corpus_types = {p.name.removesuffix(".jinja2") for p in (corpus / "device-types").glob("*.jinja2")}
    with tempfile.TemporaryDirectory(prefix="compat-collect-") as tmp:
        work = Path(tmp)
        if "kernelci" in options.sources:
            if options.kernelci_core and options.kernelci_pipeline:
                print(yaml.safe_dump({"kernelci": collect_kernelci(
                    options.kernelci_core, options.kernelci_pipeline, corpus_types, work)}))
            else:
                log("kernelci: no --kernelci-core/--kernelci-pipeline sources: the stored jobs are kept")
        if "lava-test-plans" in options.sources:
            print(yaml.safe_dump({"lava-test-plans": collect_lava_test_plans(work)}))
        if "tuxlava" in options.sources:
            print(yaml.safe_dump({"tuxlava": collect_tuxlava()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
