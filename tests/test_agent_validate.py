"""`pumice-run --validate` on LAVA's own sample jobs, and the pipeline shape against LAVA's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.job import load_job, validate_job

# sample job -> None when Pumice runs it, else a word the refusal must contain (the unsupported part)
EXPECTED = {
    "kvm-android.yaml": None,
    "kvm-command.yaml": "user_command_to_run",  # kvm01 defines no user commands
    "kvm-context.yaml": None,
    "kvm-inline.yaml": None,
    "kvm-install.yaml": None,
    "kvm-local.yaml": None,
    "kvm-multi.yaml": "need to be unique",  # LAVA refuses it too: smoke-tests twice
    "kvm-noos.yaml": None,
    "kvm-notest-noprompts.yaml": None,
    "kvm-notest.yaml": None,
    "kvm-overlays.yaml": "overlays",
    "kvm-params.yaml": None,
    "kvm-qcow2.yaml": None,
    "kvm-uefi.yaml": "uefi",
    "kvm.yaml": None,
    "kvm-multinode-client.yaml": "lava-multinode",  # a MultiNode sub-job as LAVA's scheduler writes it
    "kvm-multinode-server.yaml": "lava-multinode",
    "qemu-debian-installer.yaml": "iso-installer",
    "qemu-download-postprocess.yaml": "downloads",
    "qemu-monitor.yaml": "monitors",
    "qemu-nfs.yaml": "nfs",
    "qemu-reboot.yaml": None,
}

# device type -> the corpus device dictionary used for it
DEVICES = {"qemu": "kvm01", "beaglebone-black": "bbb-01", "x15": "x15-01", "x15-bl": "x15-bl-01"}


def corpus_device(corpus: Path, device_type: str, context: dict | None) -> dict:
    from master.devicetypes import DeviceTypes

    types = DeviceTypes(template_dirs=[corpus / "device-types"])
    text = (corpus / "devices" / f"{DEVICES[device_type]}.jinja2").read_text()
    return types.device_config(text, context=context)


def job_device_type(job: dict) -> str:
    """The job's device type; a MultiNode sub-job as the scheduler writes it names none: qemu."""
    return job.get("device_type") or "qemu"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_sample_job_validates(lava_corpus: Path, name: str) -> None:
    text = (lava_corpus / "sample-jobs" / name).read_text()
    job = yaml.safe_load(text)
    device = corpus_device(lava_corpus, job_device_type(job), job.get("context"))
    faults = validate_job(text, device)
    expected = EXPECTED[name]
    if expected is None:
        assert faults == [], "\n".join(map(str, faults))
    else:
        assert faults, f"{name} should be refused: it uses {expected}"
        assert all(expected in str(f) or "not implemented" in str(f) or "unknown" in str(f) for f in faults)
        assert any(expected in str(f) for f in faults), "\n".join(map(str, faults))


def test_every_qemu_sample_job_is_classified(lava_corpus: Path) -> None:
    for path in (lava_corpus / "sample-jobs").glob("*.yaml"):
        job = yaml.safe_load(path.read_text())
        if job.get("device_type") == "qemu" or path.name.startswith(("kvm", "qemu")):
            assert path.name in EXPECTED, f"{path.name}: add it to EXPECTED"


def two_levels(pipeline: list[dict]) -> list[tuple[str, str]]:
    found = []
    for action in pipeline:
        found.append((action["level"], action["name"]))
        found.extend((child["level"], child["name"]) for child in action.get("pipeline") or [])
    return found


@pytest.mark.parametrize("name", ["kvm-inline.yaml", "kvm.yaml"])
def test_pipeline_matches_lava_reference(lava_corpus: Path, name: str) -> None:
    text = (lava_corpus / "sample-jobs" / name).read_text()
    job = yaml.safe_load(text)
    device = corpus_device(lava_corpus, "qemu", job.get("context"))
    ours = load_job(text, device).describe()["pipeline"]
    reference = yaml.safe_load((lava_corpus / "pipeline-refs" / name).read_text())
    assert two_levels(ours) == two_levels(reference)


@pytest.mark.parametrize("change", [
    ("    - test:\n", "    - test:\n        name: smoke\n        connection: serial\n"),  # name, connection
    ("username: root}", "username: root, password: secret}"),  # a password without password_prompt
    ("image_arg: -drive format=raw,file={disk2}", "image_arg: -drive format=raw,file={disk1},snapshot=on"),
    ("device_type: qemu\n", "device_type: qemu\ntarget: 1234\n"),  # LAVA's scheduler writes it
])  # fmt: skip
def test_what_lava_accepts_in_a_qemu_job_is_accepted(lava_corpus: Path, change: tuple[str, str]) -> None:
    text = (lava_corpus / "sample-jobs" / "kvm.yaml").read_text()
    changed = text.replace(*change, 1)
    assert changed != text
    device = corpus_device(lava_corpus, "qemu", yaml.safe_load(text).get("context"))
    assert validate_job(changed, device) == []


def test_validate_command_line(lava_corpus: Path, tmp_path: Path) -> None:
    job = lava_corpus / "sample-jobs" / "kvm-inline.yaml"
    device = tmp_path / "kvm01.yaml"
    device.write_text(yaml.safe_dump(corpus_device(lava_corpus, "qemu", {"arch": "amd64"})))
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.run",
            "--validate",
            "--device",
            str(device),
            "--output-dir",
            str(tmp_path / "out"),
            str(job),
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    description = yaml.safe_load((tmp_path / "out" / "description.yaml").read_text())
    assert [a["name"] for a in description["pipeline"]] == [
        "deployimages",
        "boot-image-retry",
        "lava-test-retry",
        "finalize",
    ]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.run",
            "--validate",
            "--device",
            str(device),
            str(lava_corpus / "sample-jobs" / "qemu-nfs.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "not implemented: deploy to 'nfs'" in bad.stderr and "tmpfs" in bad.stderr
