"""The worker's file policy on the agent's side (agent/policy.py): what a job may make the agent read
of the worker itself. Each way in (a file URL to a secret, /proc/self/environ, a symlink or ``..``
out of an allowed directory, a local git repository, loopback, IPv6 loopback and link-local URLs, a
host name that resolves to the worker) is refused by ``pumice-run --validate``, refused again when
the job runs even if validation was bypassed (defence in depth: nothing of it reaches the log), and
allowed when the worker's dispatcher configuration allows it. The master's side is in
test_master_policy.py.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import allowing

from agent import policy as policy_module
from agent.fetch import HTTPStatusError, open_url
from agent.job import Job, load_job
from agent.logger import JobLogger
from agent.policy import (
    ADDRESSES_KEY,
    DIRS_KEY,
    REFUSED,
    Access,
    FilePolicy,
    PolicyRefusal,
    accesses,
    git_kind,
    inside,
    literal_addresses,
    local_accesses,
)
from agent.timeout import Deadline

DATA = Path(__file__).parent / "data"
#: what the secret file holds: it must never show in a log
SECRET = "root:$6$pumice-policy-test-SECRET$:19000:0:99999:7:::"
IMAGE = b"\x7fELF pumice test image " * 100

#: a job that only downloads one image (nothing boots)
DEPLOY_JOB = """\
device_type: qemu
job_name: file policy
visibility: public
timeouts:
  job: {minutes: 2}
  action: {seconds: 30}
context: {arch: amd64}
actions:
- deploy:
    to: tmpfs
    images:
      kernel:
        url: '@URL@'
        image_arg: -kernel {kernel}
"""

#: what follows DEPLOY_JOB's deploy in a job whose test definition comes from a git repository
GIT_TEST = """\
- boot:
    method: qemu
    media: tmpfs
    prompts: ['/ # ']
- test:
    definitions:
    - from: git
      repository: '@REPO@'
      name: smoke
      path: '@PATH@'
"""


class Counting(BaseHTTPRequestHandler):
    """Serves ``/kernel.bin`` (IMAGE) and ``/hop`` (a redirect to the server's ``redirect``); counts
    every request it receives."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        if self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", self.server.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE)

    def log_message(self, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), Counting)
        self.requests: list[str] = []
        self.redirect = ""
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@dataclass
class Case:
    """One way a job could read the worker itself."""

    name: str
    job: str
    #: what the refused job names in its fault (the URL or repository)
    location: str
    #: the key that would allow it
    key: str
    #: a dispatcher configuration that allows it (None: no setting is meant to)
    allow: dict | None
    #: a server that must never be asked (refused before any request)
    server: Server | None = None
    #: whether the master, from the job's text alone, can tell (see test_master_policy.py)
    static: bool = True
    extra: dict = field(default_factory=dict)


@dataclass
class World:
    root: Path
    images: Path
    secret: Path
    repo: Path
    servers: dict[str, Server]
    cases: dict[str, Case]


def deploy_job(url: str) -> str:
    return DEPLOY_JOB.replace("@URL@", url)


def git_job(repo: str, images: Path, path: str = "smoke.yaml") -> str:
    """A job whose kernel is ``images/kernel.bin`` and whose test definition is ``path`` in ``repo``."""
    return deploy_job(f"file://{images}/kernel.bin") + GIT_TEST.replace("@REPO@", repo).replace("@PATH@", path)


def make_repo(path: Path) -> Path:
    """A git repository holding a test definition ``smoke.yaml``."""
    path.mkdir(parents=True)
    (path / "smoke.yaml").write_text(yaml.safe_dump({
        "metadata": {"format": "Lava-Test Test Definition 1.0", "name": "smoke"},
        "run": {"steps": ["lava-test-case ok --shell true"]}}))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    for command in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-q", "-m", "tests"]):
        subprocess.run(command, cwd=path, check=True, env=env, timeout=30)
    return path


def own_hostname_address() -> str:
    """This machine's host name resolves to one of its own addresses (Debian's /etc/hosts puts it
    on 127.0.1.1; a container's on its interface): a name the master cannot judge."""
    return socket.gethostbyname(socket.gethostname())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("policy")
    images, secrets = root / "images", root / "worker-secrets"
    images.mkdir(), secrets.mkdir()
    (images / "kernel.bin").write_bytes(IMAGE)
    secret = secrets / "shadow"
    secret.write_text(SECRET + "\n")
    (images / "escape").symlink_to(secret)  # a symlink under the allowed directory, out of it
    (images / "inside").symlink_to(images / "kernel.bin")
    repo = make_repo(root / "repos" / "tests")
    servers = {"v4": Server("127.0.0.1"), "v6": Server("::1")}
    v4, v6 = servers["v4"], servers["v6"]
    hostname = socket.gethostname()
    host_address = own_hostname_address()
    files = allowing([images])
    cases = [
        Case("secret-file", deploy_job(secret.as_uri()), secret.as_uri(), DIRS_KEY, allowing([secrets])),
        Case("proc-environ", deploy_job("file:///proc/self/environ"), "file:///proc/self/environ", DIRS_KEY,
             None),
        Case("symlink-escape", deploy_job(f"file://{images}/escape"), f"file://{images}/escape", DIRS_KEY,
             allowing([images, secrets]), static=False),
        Case("dotdot-escape", deploy_job(f"file://{images}/../worker-secrets/shadow"),
             f"file://{images}/../worker-secrets/shadow", DIRS_KEY, allowing([images, secrets])),
        Case("local-git", git_job(str(repo), images), str(repo), DIRS_KEY, allowing([images, repo.parent]),
             extra=files),
        Case("git-file-url", git_job(repo.as_uri(), images), repo.as_uri(), DIRS_KEY,
             allowing([images, repo.parent]), extra=files),
        Case("loopback", deploy_job(f"http://127.0.0.1:{v4.port}/kernel.bin"),
             f"http://127.0.0.1:{v4.port}/kernel.bin", ADDRESSES_KEY,
             allowing(addresses=[f"127.0.0.1:{v4.port}"]), server=v4),
        Case("ipv6-loopback", deploy_job(f"http://[::1]:{v6.port}/kernel.bin"),
             f"http://[::1]:{v6.port}/kernel.bin", ADDRESSES_KEY, allowing(addresses=[f"[::1]:{v6.port}"]),
             server=v6),
        Case("link-local", deploy_job("http://169.254.169.254/latest/meta-data/"),
             "http://169.254.169.254/latest/meta-data/", ADDRESSES_KEY,
             allowing(addresses=["169.254.0.0/16"])),
        Case("localhost-name", deploy_job(f"http://localhost:{v4.port}/kernel.bin"),
             f"http://localhost:{v4.port}/kernel.bin", ADDRESSES_KEY,
             allowing(addresses=[f"127.0.0.1:{v4.port}"]), server=v4),
        Case("hostname-resolving-to-the-worker", deploy_job(f"http://{hostname}:{v4.port}/kernel.bin"),
             f"http://{hostname}:{v4.port}/kernel.bin", ADDRESSES_KEY,
             allowing(addresses=[f"{host_address}:{v4.port}"]), server=v4, static=False),
        Case("decimal-loopback", deploy_job(f"http://2130706433:{v4.port}/kernel.bin"),
             f"http://2130706433:{v4.port}/kernel.bin", ADDRESSES_KEY,
             allowing(addresses=[f"127.0.0.1:{v4.port}"]), server=v4),
    ]
    try:
        yield World(root, images, secret, repo, servers, {case.name: case for case in cases})
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()


CASES = ["secret-file", "proc-environ", "symlink-escape", "dotdot-escape", "local-git", "git-file-url",
         "loopback", "ipv6-loopback", "link-local", "localhost-name", "hostname-resolving-to-the-worker",
         "decimal-loopback"]
#: what validation cannot see: a host name is not resolved while validating (it touches nothing);
#: the connection tells (test_the_agent_refuses_at_run_time_what_validation_let_through)
SEEN_WHEN_CONNECTING = ["hostname-resolving-to-the-worker"]
ALLOWABLE = [name for name in CASES if name != "proc-environ"]
#: 169.254.169.254 answers nobody here: that one is only validated when allowed
REACHABLE = [name for name in ALLOWABLE if name != "link-local"]


@functools.cache
def device_yaml() -> str:
    from master.devicetypes import DeviceTypes

    config = DeviceTypes().device_config((DATA / "qemu-amd64.jinja2").read_text(), context={"arch": "amd64"})
    return yaml.safe_dump(config)


def validate(world: World, job: str, dispatcher: dict | None, name: str) -> subprocess.CompletedProcess:
    """``pumice-run --validate`` of ``job`` with the worker configuration ``dispatcher``."""
    folder = world.root / "validate" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(job)
    (folder / "device.yaml").write_text(device_yaml())
    args = [sys.executable, "-m", "agent.run", "--validate", "--device", str(folder / "device.yaml")]
    if dispatcher is not None:
        (folder / "dispatcher.yaml").write_text(yaml.safe_dump(dispatcher))
        args += ["--dispatcher", str(folder / "dispatcher.yaml")]
    return subprocess.run([*args, str(folder / "job.yaml")], capture_output=True, text=True, timeout=60)


def unchecked_job(world: World, case: Case, dispatcher: dict, tmp_path: Path) -> Job:
    """The case's job built without the policy's validation (as the master builds it): what the
    agent does if such a job ever reaches it."""
    device = yaml.safe_load(device_yaml())
    config = {**dispatcher, "tmp_dir": str(tmp_path)}
    return load_job(case.job, device, job_id="7", logger=JobLogger(tmp_path / "output.yaml"),
                    output_dir=tmp_path, dispatcher=config, on_worker=False)


def run_deploy(job: Job) -> None:
    """Run the job's deploy action only (it fetches everything; nothing boots), then clean up."""
    try:
        job.pipeline.run(None, Deadline.after(60, "deploy"), job.pipeline.actions[:1])
    finally:
        job.pipeline.cleanup(None)


# ---- pumice-run --validate ----


@pytest.mark.parametrize("name", [name for name in CASES if name not in SEEN_WHEN_CONNECTING])
def test_validation_refuses_each_read_of_the_worker_itself(world: World, name: str) -> None:
    case = world.cases[name]
    done = validate(world, case.job, case.extra or None, name)
    assert done.returncode == 1, done.stderr
    assert REFUSED in done.stderr and case.location in done.stderr and case.key in done.stderr, done.stderr
    assert "none set" in done.stderr or name in ("local-git", "git-file-url"), done.stderr


@pytest.mark.parametrize("name", ALLOWABLE)
def test_validation_accepts_each_when_the_worker_allows_it(world: World, name: str) -> None:
    case = world.cases[name]
    done = validate(world, case.job, case.allow, name)
    assert done.returncode == 0, done.stderr


def test_validation_names_a_bad_policy_setting(world: World) -> None:
    done = validate(world, deploy_job("http://images.example/k"), {DIRS_KEY: "/srv/images"}, "bad-setting")
    assert done.returncode == 1
    assert "dispatcher configuration: allowed_file_dirs: a list of absolute directories" in done.stderr
    done = validate(world, deploy_job("http://images.example/k"), {ADDRESSES_KEY: ["localhost:80"]}, "bad-address")
    assert done.returncode == 1 and "'localhost:80' is not an address" in done.stderr, done.stderr


# ---- when the job runs ----


@pytest.mark.parametrize("name", CASES)
def test_the_agent_refuses_at_run_time_what_validation_let_through(world: World, name: str, tmp_path: Path) -> None:
    case = world.cases[name]
    before = len(case.server.requests) if case.server else 0
    job = unchecked_job(world, case, case.extra, tmp_path)
    health = job.run()
    job.logger.close()
    assert health == "Incomplete"
    assert isinstance(job.error, PolicyRefusal) and job.error.error_type == "Job", job.error
    assert str(job.error).startswith(REFUSED) and case.key in str(job.error), job.error
    log = (tmp_path / "output.yaml").read_text()
    assert REFUSED in log
    assert "pumice-policy-test-SECRET" not in log and "PATH=" not in log  # nothing of it was read
    if case.server is not None:  # refused before a request was sent (the connection was closed)
        assert case.server.requests[before:] == []
    assert not list(tmp_path.glob("pumice-7-*"))  # the scratch directory is gone


@pytest.mark.parametrize("name", REACHABLE)
def test_the_agent_reads_each_when_the_worker_allows_it(world: World, name: str, tmp_path: Path) -> None:
    case = world.cases[name]
    job = load_job(case.job, yaml.safe_load(device_yaml()), job_id="8", logger=JobLogger(None),
                   dispatcher={**case.allow, "tmp_dir": str(tmp_path)})
    try:
        run_deploy(job)
        got = job.data.downloads["kernel"].read_bytes()
    finally:
        shutil.rmtree(job.workdir, ignore_errors=True)
    secret = name in ("secret-file", "symlink-escape", "dotdot-escape")
    assert got == (SECRET.encode() + b"\n" if secret else IMAGE)
    if name in ("local-git", "git-file-url"):
        [(_, definition)] = job.data.testdefs[0]
        assert definition.definition["metadata"]["name"] == "smoke"


# ---- the fetch paths, one by one ----


def test_a_file_swapped_for_a_symlink_after_the_check_is_refused_on_what_was_opened(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is checked again once open (its /proc/self/fd link): a symlink swapped in between
    the check and the open is caught. (The swap is simulated: the first check sees no link.)"""
    policy = FilePolicy.from_dispatcher(allowing([world.images]))
    seen: list[str] = []
    real = os.path.realpath

    def blind_once(path, *args, **kwargs):
        if str(path).endswith("/escape") and not seen:
            seen.append(path)
            return str(path)  # what the check sees: a plain file under the allowed directory
        return real(path, *args, **kwargs)

    monkeypatch.setattr(policy_module.os.path, "realpath", blind_once)
    with pytest.raises(PolicyRefusal, match=f"reads {world.secret} on the worker"):
        policy.open_file(f"file://{world.images}/escape")
    assert seen


def test_a_redirect_to_what_the_policy_does_not_allow_is_refused_before_any_request(world: World) -> None:
    v4 = world.servers["v4"]
    other = Server("127.0.0.1")
    try:
        v4.redirect = f"http://127.0.0.1:{other.port}/kernel.bin"
        policy = FilePolicy.from_dispatcher(allowing(addresses=[f"127.0.0.1:{v4.port}"]))
        with pytest.raises(PolicyRefusal, match=f"127.0.0.1:{other.port}.*a redirect from"):
            open_url(f"http://127.0.0.1:{v4.port}/hop", policy, timeout=10)
        assert other.requests == []
        v4.redirect = f"ftp://127.0.0.1:{other.port}/kernel.bin"  # urllib would follow ftp
        with pytest.raises(PolicyRefusal, match="follows redirects to http and https only"):
            open_url(f"http://127.0.0.1:{v4.port}/hop", policy, timeout=10)
        v4.redirect = world.secret.as_uri()  # urllib itself never follows a redirect to a file
        with pytest.raises(HTTPStatusError, match="is not allowed"):
            open_url(f"http://127.0.0.1:{v4.port}/hop", policy, timeout=10)
        both = FilePolicy.from_dispatcher(allowing(addresses=[f"127.0.0.1:{v4.port}", f"127.0.0.1:{other.port}"]))
        v4.redirect = f"http://127.0.0.1:{other.port}/kernel.bin"
        with open_url(f"http://127.0.0.1:{v4.port}/hop", both, timeout=10) as body:
            assert body.read() == IMAGE
    finally:
        other.shutdown()
        other.server_close()


def own_address() -> str | None:
    """An address of this machine's own interfaces that is neither loopback nor link-local (the
    source address of its default route), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # no packet is sent: the kernel picks a route
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith(("127.", "169.254.", "0.")) else address


def test_an_address_of_the_worker_s_own_interfaces_is_refused_at_the_connection(tmp_path: Path) -> None:
    address = own_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback: nothing to check")
    server = Server("0.0.0.0")
    try:
        url = f"http://{address}:{server.port}/kernel.bin"
        assert FilePolicy().refusal(Access("url", url)) is None  # the master cannot tell
        with pytest.raises(PolicyRefusal, match=f"reaches {address}:{server.port}, an address of the worker"):
            open_url(url, FilePolicy(), timeout=10)
        assert server.requests == []
        allowed = FilePolicy.from_dispatcher(allowing(addresses=[address]))
        with open_url(url, allowed, timeout=10) as body:
            assert body.read() == IMAGE
    finally:
        server.shutdown()
        server.server_close()


def test_a_test_definition_path_cannot_leave_its_repository(world: World, tmp_path: Path) -> None:
    """``path: ../..`` or a symlink in the repository: the definition is never read from the worker."""
    repo = make_repo(tmp_path / "repos" / "tricky")
    (repo / "link.yaml").symlink_to(world.secret)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    subprocess.run(["git", "add", "link.yaml"], cwd=repo, check=True, timeout=30)
    subprocess.run(["git", "commit", "-q", "-m", "link"], cwd=repo, check=True, env=env, timeout=30)
    config = allowing([world.images, repo.parent], tmp_dir=str(tmp_path))
    for path in ("link.yaml", f"../../../../../../..{world.secret}", str(world.secret)):
        log = tmp_path / f"output-{len(list(tmp_path.glob('output-*')))}.yaml"
        job = load_job(git_job(str(repo), world.images, path), yaml.safe_load(device_yaml()), job_id="9",
                       logger=JobLogger(log), dispatcher=config)
        with pytest.raises(PolicyRefusal, match="leads out of its repository"):
            run_deploy(job)
        shutil.rmtree(job.workdir, ignore_errors=True)
        job.logger.close()
        assert "pumice-policy-test-SECRET" not in log.read_text()


def test_a_url_test_definition_cannot_be_written_outside_its_folder(world: World, tmp_path: Path) -> None:
    v4 = world.servers["v4"]
    text = git_job("x", world.images, "../../../../escaped.yaml").replace(
        "from: git\n      repository: 'x'", f"from: url\n      repository: 'http://127.0.0.1:{v4.port}/kernel.bin'")
    assert "from: url" in text
    config = allowing([world.images], [f"127.0.0.1:{v4.port}"], tmp_dir=str(tmp_path / "work"))
    (tmp_path / "work").mkdir()
    job = load_job(text, yaml.safe_load(device_yaml()), job_id="10", logger=JobLogger(None), dispatcher=config)
    with pytest.raises(PolicyRefusal, match="leads out of its repository"):
        run_deploy(job)
    shutil.rmtree(job.workdir, ignore_errors=True)
    assert not list(tmp_path.rglob("escaped.yaml"))


def test_git_remote_helpers_are_refused_whatever_the_directories(world: World) -> None:
    job = git_job("ext::sh -c touch% /tmp/pumice-policy-ext", world.images)
    done = validate(world, job, allowing(["/"]), "ext")
    assert done.returncode == 1
    assert "uses a git remote helper ('transport::address'), which is never allowed" in done.stderr
    assert not Path("/tmp/pumice-policy-ext").exists()


# ---- the policy's own rules ----


def test_how_git_reads_a_repository() -> None:
    assert git_kind("https://github.com/Linaro/test-definitions.git") == "url"
    assert git_kind("file:///srv/git/tests") == "url"
    assert git_kind("git@github.com:Linaro/test-definitions.git") == "scp"
    assert git_kind("[::1]:repo") == "scp"
    assert git_kind("/srv/git/tests") == "path"
    assert git_kind("./a:b") == "path"  # a slash before the colon: a local path
    assert git_kind("ext::sh -c id") == "helper"
    assert git_kind("fd::17") == "helper"


def test_addresses_written_as_numbers_and_localhost_names() -> None:
    loopback = {"127.0.0.1", "::1"}
    assert {str(a) for a in literal_addresses("localhost")} == loopback
    assert {str(a) for a in literal_addresses("Foo.LOCALHOST.")} == loopback
    for written in ("127.1", "2130706433", "0x7f000001", "0177.0.0.1", "[::ffff:127.0.0.1]"):
        assert [str(a) for a in literal_addresses(written)] == ["127.0.0.1"], written
    assert literal_addresses("images.example") is None
    assert literal_addresses("1e3") is None


def test_what_a_job_reads_from_the_worker() -> None:
    job = {"actions": [
        {"deploy": {"to": "tftp", "kernel": {"url": "file:///srv/images/Image"},
                    "ramdisk": {"url": "http://images.example/r.gz"}, "dtb": {"url": "http://127.0.0.1/d"}}},
        {"test": {"definitions": [
            {"from": "git", "repository": "/srv/git/tests", "name": "a", "path": "a.yaml"},
            {"from": "git", "repository": "https://git.example/t.git", "name": "b", "path": "b.yaml"},
            {"from": "inline", "name": "c", "path": "c.yaml",  # runs on the board: not a fetch
             "repository": {"metadata": {"url": "file:///etc/shadow"}}}]}}]}
    assert [(a.kind, a.location) for a in accesses(job)] == [
        ("url", "file:///srv/images/Image"), ("url", "http://images.example/r.gz"), ("url", "http://127.0.0.1/d"),
        ("git", "/srv/git/tests"), ("git", "https://git.example/t.git")]
    local = local_accesses(job)
    assert [a.location for a in local] == ["file:///srv/images/Image", "http://127.0.0.1/d", "/srv/git/tests"]
    assert local[2].path == ("actions", 1, "test", "definitions", 0, "repository")
    assert local_accesses({"actions": "not a list"}) == []


def test_a_policy_setting_is_checked_and_shown_as_written() -> None:
    policy = FilePolicy.from_dispatcher({DIRS_KEY: ["/srv/images"],
                                         ADDRESSES_KEY: ["127.0.0.1:8080", "[::1]:81", "169.254.0.0/16", "::1"]})
    assert policy.values(ADDRESSES_KEY) == "127.0.0.1:8080, [::1]:81, 169.254.0.0/16, ::1"
    assert policy.refusal(Access("url", "http://127.0.0.1:8080/x")) is None
    assert policy.refusal(Access("url", "http://127.0.0.1:8081/x")).startswith(REFUSED)
    assert policy.refusal(Access("url", "http://[::1]:9/x")) is None  # ::1 on any port
    assert policy.refusal(Access("url", "file:///srv/images/a/../b")) is None
    assert "file:///srv/images/../etc" in policy.refusal(Access("url", "file:///srv/images/../etc"))
    assert "names another host" in policy.refusal(Access("url", "file://server/srv/images/a"))
    for bad in ({DIRS_KEY: "/srv"}, {DIRS_KEY: ["relative"]}, {ADDRESSES_KEY: ["127.0.0.1:0"]},
                {ADDRESSES_KEY: [80]}, {ADDRESSES_KEY: ["host.example"]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FilePolicy.from_dispatcher(bad)


def test_inside_resolves_before_comparing(tmp_path: Path) -> None:
    (tmp_path / "repo" / "sub").mkdir(parents=True)
    assert inside(tmp_path / "repo", "sub/../a.yaml", "t") == str(tmp_path / "repo" / "a.yaml")
    with pytest.raises(PolicyRefusal, match="leads out of its repository"):
        inside(tmp_path / "repo", "../x", "t")


def test_a_git_host_is_checked_before_cloning_and_git_uses_the_checked_address(world: World, http_server,
                                                                               tmp_path: Path) -> None:
    """Over http, the repository's host is resolved and checked before git runs, and git is told
    to use the checked address (``http.curloptResolve``): a name that resolves to the worker is
    refused; an allowed address is cloned from."""
    served = http_server.root / f"policy-{tmp_path.name}"
    make_repo(served)
    subprocess.run(["git", "update-server-info"], cwd=served, check=True, timeout=30)  # dumb http
    path = f"{served.name}/.git"
    config = allowing([world.images], tmp_dir=str(tmp_path))
    named = git_job(f"http://{socket.gethostname()}:{http_server.port}/{path}", world.images)
    job = load_job(named, yaml.safe_load(device_yaml()), job_id="11", logger=JobLogger(None), dispatcher=config)
    with pytest.raises(PolicyRefusal, match="of the worker; allowed_local_addresses"):
        run_deploy(job)
    shutil.rmtree(job.workdir, ignore_errors=True)
    allowed = {**config, ADDRESSES_KEY: [http_server.address]}
    job = load_job(git_job(http_server.url(path), world.images), yaml.safe_load(device_yaml()), job_id="12",
                   logger=JobLogger(tmp_path / "output.yaml"), dispatcher=allowed)
    try:
        run_deploy(job)
    finally:
        shutil.rmtree(job.workdir, ignore_errors=True)
        job.logger.close()
    [(_, definition)] = job.data.testdefs[0]
    assert definition.definition["metadata"]["name"] == "smoke"
    assert f"http.curloptResolve=127.0.0.1:{http_server.port}:127.0.0.1 clone" in (tmp_path / "output.yaml").read_text()
