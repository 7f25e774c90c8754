"""The worker's container engine (agent/containers.py) against the real podman of this machine, with
the locally built test images (tools/build_container_images.py): engine and image checks, runs that
see the job's scratch directory only, a container that hangs past its timeout, QEMU in a container
driven through its stdio on a pty, and the sweep of what a killed runner left."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.connections.console import Console
from agent.containers import ContainerSpec, Engine, check_job_images, engine_for, qualified, sweep
from agent.errors import InfrastructureError, JobTimeout
from agent.timeout import Deadline

PODMAN = Engine("podman")
TEST_IMAGE = "localhost/pumice/lava-test:bookworm"
QEMU_IMAGE = "docker.io/kernelci/qemu"  # as KernelCI's jobs name it


class Records:
    """A job logger that keeps the console's lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def target(self, line: str) -> None:
        self.lines.append(line)

    def input(self, text: str) -> None:
        pass


@pytest.fixture
def job_id() -> int:
    """A job id of its own: other sessions' tests use the same podman."""
    return 900000 + secrets.randbelow(99999)


def names(prefix: str) -> list[str]:
    return PODMAN.containers(prefix)


def assert_nothing_left(job_id: int, scratch: Path | None = None) -> None:
    assert names(f"pumice-{job_id}-") == []
    mounts = Path("/proc/self/mounts").read_text()
    assert f"pumice-{job_id}-" not in mounts
    if scratch is not None:
        assert str(scratch) not in mounts


def test_image_names_are_read_as_docker_reads_them():
    assert qualified("debian") == "docker.io/library/debian:latest"
    assert qualified("kernelci/qemu") == "docker.io/kernelci/qemu:latest"
    assert qualified("linaro/lkft-qemu-should-not-used-for-long:latest") == \
        "docker.io/linaro/lkft-qemu-should-not-used-for-long:latest"
    assert qualified("ghcr.io/mwasilew/docker-mkbootimage:master") == "ghcr.io/mwasilew/docker-mkbootimage:master"
    assert qualified("localhost/pumice/qemu:bookworm") == "localhost/pumice/qemu:bookworm"
    assert qualified("registry.example:5000/a/b") == "registry.example:5000/a/b:latest"
    assert qualified("debian@sha256:" + "0" * 64) == "docker.io/library/debian@sha256:" + "0" * 64


def test_the_engine_is_podman_where_no_docker_daemon_answers_and_the_configuration_names_none():
    assert engine_for({}).name == "podman"  # the docker client is installed here, its daemon is not
    assert engine_for({"container_engine": "docker"}).name == "docker"
    with pytest.raises(InfrastructureError, match="'lxc' is not a container engine; known: docker, podman"):
        engine_for({"container_engine": "lxc"})


def test_an_engine_that_is_missing_or_whose_daemon_is_down_is_named_at_validation():
    assert PODMAN.problem() is None
    missing = Engine("docker", program="pumice-no-such-engine").problem()
    assert "container engine docker is not installed" in missing and "container_engine" in missing
    down = Engine("docker").problem()  # the client is here, no daemon runs
    assert down is not None and down.startswith("the worker's container engine docker does not work:")
    assert "daemon" in down.lower()


def test_an_image_must_be_on_the_worker_or_pullable_and_validation_says_which(container_images):
    assert PODMAN.image_problem("debian", local=True) is None  # the local base, tagged as real jobs name it
    assert PODMAN.image_problem(QEMU_IMAGE) is None
    problem = PODMAN.image_problem("pumice-test/absent:1", local=True)
    assert "'pumice-test/absent:1' (docker.io/pumice-test/absent:1) is not on this worker" in problem
    assert "local: true" in problem
    problem = PODMAN.image_problem("pumice-test/absent:1")  # no registry is reachable from here
    assert "cannot be pulled: its registry docker.io is out of reach from the worker" in problem
    assert "not an image name" in PODMAN.image_problem("-v /:/host")


def test_an_image_on_the_worker_is_used_as_it_is_when_its_registry_is_out_of_reach(container_images):
    said: list[str] = []
    PODMAN.prepare("debian", local=False, deadline=Deadline.after(30), log=said.append)
    assert len(said) == 1
    assert said[0].startswith("image debian: not pulled (its registry docker.io is out of reach from the worker")
    assert said[0].endswith("; using the copy on the worker")
    with pytest.raises(InfrastructureError, match="'pumice-test/absent:1' .* cannot be pulled"):
        PODMAN.prepare("pumice-test/absent:1", local=False, deadline=Deadline.after(30))


def test_a_container_sees_the_job_scratch_directory_only_and_is_removed(container_images, job_id, tmp_path):
    scratch = tmp_path / f"pumice-{job_id}-scratch"
    scratch.mkdir()
    (scratch / "kernel").write_text("from the host\n")
    spec = ContainerSpec(TEST_IMAGE, job_id, "postprocess", scratch=scratch, workdir=scratch,
                         environment={"STEP": "1"})
    assert spec.name.startswith(f"pumice-{job_id}-postprocess-")
    lines: list[str] = []
    result = PODMAN.run(spec, ["sh", "-c", "cat kernel; echo made > made; echo step=$STEP; hostname; "
                               f"test -e {Path(__file__).parent} && echo sees-the-host || echo sees-scratch-only; "
                               "exit 3"], Deadline.after(60), on_line=lines.append)
    assert result.returncode == 3
    assert lines[:2] == ["from the host", "step=1"]
    assert lines[-1] == "sees-scratch-only"
    assert (scratch / "made").read_text() == "made\n"
    assert_nothing_left(job_id, scratch)


def test_a_container_that_hangs_past_its_timeout_is_killed_and_named(container_images, job_id, tmp_path):
    spec = ContainerSpec(TEST_IMAGE, job_id, "postprocess", scratch=tmp_path, timeout=2)
    start = time.monotonic()
    with pytest.raises(JobTimeout, match=rf"container pumice-{job_id}-postprocess-\w+ \(image {TEST_IMAGE}\) "
                                         r"timed out after \d+ s running 'sleep 600': killed"):
        PODMAN.run(spec, ["sleep", "600"], Deadline.after(60))
    assert time.monotonic() - start < 20
    assert_nothing_left(job_id, tmp_path)


def test_a_missing_image_fails_the_run_naming_it_and_leaves_nothing(container_images, job_id, tmp_path):
    spec = ContainerSpec("pumice-test/absent:1", job_id, "test", scratch=tmp_path)
    with pytest.raises(InfrastructureError, match=r"\(image pumice-test/absent:1\) did not start: podman: "):
        PODMAN.run(spec, ["true"], Deadline.after(60))
    assert_nothing_left(job_id, tmp_path)


def test_qemu_in_a_container_is_driven_through_its_stdio_on_a_pty(container_images, dut_images, job_id):
    """The console code drives a containerised QEMU as it drives one on the worker; the board's
    bytes never detach the engine's terminal (ctrl-p ctrl-q)."""
    images = dut_images.amd64
    spec = ContainerSpec(QEMU_IMAGE, job_id, "qemu", scratch=images.directory, devices=["/dev/kvm"])
    argv = PODMAN.run_argv(spec, ["qemu-system-x86_64", "-nographic", "-m", "256", "-net", "none",
                                  "-kernel", str(images.kernel), "-initrd", str(images.ramdisk),
                                  "-append", images.command_line])
    records = Records()
    console = Console.spawn_command(argv, records, "qemu", prompts=["/ # "])
    try:
        assert console.wait_for_prompt(Deadline.after(90)), "\n".join(records.lines[-30:])
        assert any("Linux version" in line for line in records.lines)
        console.sendcontrol("p")
        console.sendcontrol("q")
        console.sendline("echo answer-$((6*7))")
        assert console.expect(["answer-42"], Deadline.after(20)) == 0
        assert names(spec.name) == [spec.name]
    finally:
        console.close()
    assert_nothing_left(job_id, images.directory)


def test_the_sweep_removes_the_containers_of_a_killed_runner_only(container_images, job_id, tmp_path):
    """pumice-run killed outright: its engine client dies with it, its container does not."""
    other = job_id + 100000
    clients = []
    for owner in (job_id, other):
        spec = ContainerSpec(TEST_IMAGE, owner, "test", scratch=tmp_path)
        clients.append(subprocess.Popen(PODMAN.run_argv(spec, ["sleep", "600"], console=False),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        deadline = time.monotonic() + 60
        while len(names(f"pumice-{job_id}-") + names(f"pumice-{other}-")) < 2:
            assert time.monotonic() < deadline, "the containers did not start"
            time.sleep(0.2)
        os.kill(clients[0].pid, signal.SIGKILL)
        clients[0].wait(10)
        assert len(names(f"pumice-{job_id}-")) == 1  # still there: the engine keeps it
        removed = sweep(job_id, {"container_engine": "podman"})
        assert len(removed) == 1 and removed[0].startswith(f"pumice-{job_id}-test-")
        assert_nothing_left(job_id)
        assert len(names(f"pumice-{other}-")) == 1  # another job's container is left alone
    finally:
        sweep(other, {})
        for client in clients:
            client.kill()
            client.wait(10)
    assert_nothing_left(other)


def test_a_containerised_qemu_costs_about_half_a_second_over_a_plain_one(container_images, job_id):
    """0.3-0.5 s measured on an idle machine (the target is < 1 s); 2 s leaves room for the other
    tests and sessions that share this machine's two cores."""

    def best(argv: list[str]) -> float:
        times = []
        for _ in range(5):
            start = time.monotonic()
            subprocess.run(argv, check=True, capture_output=True, timeout=60)
            times.append(time.monotonic() - start)
        return min(times)

    plain = best(["qemu-system-x86_64", "-version"])
    spec = ContainerSpec(QEMU_IMAGE, job_id, "qemu")
    contained = best(PODMAN.run_argv(spec, ["qemu-system-x86_64", "-version"], console=False))
    print(f"qemu-system-x86_64 -version: plain {plain:.3f} s, in a container {contained:.3f} s")
    assert contained - plain < 2.0
    assert_nothing_left(job_id)


def test_podman_kills_a_container_past_its_timeout_even_when_its_runner_was_killed(container_images, job_id,
                                                                                    tmp_path):
    spec = ContainerSpec(TEST_IMAGE, job_id, "test", scratch=tmp_path, timeout=3)
    client = subprocess.Popen(PODMAN.run_argv(spec, ["sleep", "600"], console=False), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not names(spec.name):
            assert time.monotonic() < deadline, "the container did not start"
            time.sleep(0.2)
        os.kill(client.pid, signal.SIGKILL)  # the runner (and its engine client) killed outright
        client.wait(10)
        deadline = time.monotonic() + 30
        while names(spec.name):
            assert time.monotonic() < deadline, "podman did not end the container at its timeout"
            time.sleep(0.5)
    finally:
        sweep(job_id, {})
    assert_nothing_left(job_id, tmp_path)


def test_validation_names_the_job_path_and_the_engine_or_image_at_fault(container_images):
    images = [("actions[1].boot.docker.image", QEMU_IMAGE, False),
              ("actions[0].deploy.postprocess.docker.image", "pumice-test/absent:1", True)]
    down = check_job_images(Engine("docker"), images)
    assert len(down) == 1 and down[0].startswith(
        "actions[1].boot.docker.image: the worker's container engine docker does not work: ")
    assert check_job_images(PODMAN, images) == [
        "actions[0].deploy.postprocess.docker.image: image 'pumice-test/absent:1' (docker.io/pumice-test/absent:1) "
        "is not on this worker and the job says local: true; build or load it with podman on the worker"]
