"""The worker's file policy on the master's side: a job that reads a worker itself (a file URL, a
local git repository, the worker's loopback or link-local addresses) is refused at submission by a
running master when no worker that could run it allows it, with the URL's path and line, and the
setting that would allow it; it is scheduled only on workers whose policy allows it, and runs there
(real agents, real pumice-run). What only the worker can see (a symlink, a host name that resolves
to itself) passes the master and is refused by the agent. The agent's side: test_agent_policy.py.
"""

from __future__ import annotations

import socket
import threading
import xmlrpc.client
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import allowing
from support.broker import BrokerLab, db_wait, make_broker_lab
from support.master import Lab, stop_server
from test_agent_policy import GIT_TEST
from test_agent_policy import deploy_job as job
from test_worker_daemon import Running

from agent.config import AgentConfig
from agent.daemon import AgentDaemon
from agent.policy import ADDRESSES_KEY, DIRS_KEY, REFUSED, Access, FilePolicy
from master import inventory, jobs
from master.client import ApiError, Client
from master.db import connection
from master.errors import Invalid
from master.instance import current
from master.models import Job
from master.scheduler import IdleDevice, QueuedJob, Scheduler, WorkerSlot, assign
from master.server import MasterServer
from master.states import JobHealth, JobState
from master.users import SYSTEM

SECRET = "root:$6$pumice-master-policy-SECRET$:19000:0:99999:7:::"
IMAGE = b"pumice policy image\n" * 64


def git_job(repo: str) -> str:
    return job("http://images.example/kernel") + GIT_TEST.replace("@REPO@", repo).replace("@PATH@", "smoke.yaml")


@pytest.fixture
def master(lab: Lab) -> Iterator[tuple[Lab, MasterServer, dict]]:
    """A running master (SQLite, and PostgreSQL when PUMICE_TEST_PG is set) whose worker w1 allows
    nothing of itself; clients for admin and alice."""
    server = MasterServer("127.0.0.1", 0, threads=4, scheduler_interval=3600, publish_site=False,
                          validators=0).start()
    clients = {name: Client(server.url, token) for name, token in lab.tokens.items()}
    clients["admin"].call("PUT", "/workers/w1/config/", json_body={"config": ""})
    try:
        yield lab, server, clients
    finally:
        for client in clients.values():
            client.close()
        stop_server(server)


def refusal(client: Client, text: str) -> dict:
    """The one fault of the refused submission of ``text``."""
    with pytest.raises(ApiError) as info:
        client.call("POST", "/jobs/", body=text)
    assert info.value.status == 400, info.value.describe()
    [fault] = info.value.faults
    return fault


SECRETS = "/var/lib/worker-secrets"
IMAGES = "/srv/images"
#: (name, job, location, path of the fault, key): each refused when w1 allows nothing
REFUSED_CASES = [
    ("secret-file", job(f"file://{SECRETS}/shadow"), f"file://{SECRETS}/shadow", DIRS_KEY),
    ("proc-environ", job("file:///proc/self/environ"), "file:///proc/self/environ", DIRS_KEY),
    ("dotdot-escape", job(f"file://{IMAGES}/../..{SECRETS}/shadow"), f"file://{IMAGES}/../..{SECRETS}/shadow",
     DIRS_KEY),
    ("local-git", git_job("/srv/git/tests"), "/srv/git/tests", DIRS_KEY),
    ("git-file-url", git_job("file:///srv/git/tests"), "file:///srv/git/tests", DIRS_KEY),
    ("loopback", job("http://127.0.0.1:8080/kernel"), "http://127.0.0.1:8080/kernel", ADDRESSES_KEY),
    ("ipv6-loopback", job("http://[::1]:8080/kernel"), "http://[::1]:8080/kernel", ADDRESSES_KEY),
    ("link-local", job("http://169.254.169.254/latest/meta-data/"), "http://169.254.169.254/latest/meta-data/",
     ADDRESSES_KEY),
    ("localhost-name", job("http://localhost:8080/kernel"), "http://localhost:8080/kernel", ADDRESSES_KEY),
    ("decimal-loopback", job("http://2130706433:8080/kernel"), "http://2130706433:8080/kernel", ADDRESSES_KEY),
]
#: what allows each (w1's dispatcher configuration)
ALLOWS = {DIRS_KEY: allowing(["/"]), ADDRESSES_KEY: allowing(addresses=["127.0.0.0/8", "::1", "169.254.0.0/16"])}


@pytest.mark.parametrize(("name", "text", "location", "key"), REFUSED_CASES, ids=[c[0] for c in REFUSED_CASES])
def test_submission_refuses_each_read_of_the_worker_itself(master, name: str, text: str, location: str,
                                                           key: str) -> None:
    lab, server, clients = master
    fault = refusal(clients["alice"], text)
    where = "actions[2].test.definitions[0].repository" if "git" in name else "actions[0].deploy.images.kernel.url"
    assert fault["path"] == where and fault["line"] == text.splitlines().index(
        next(line for line in text.splitlines() if location in line)) + 1, fault
    message = fault["message"]
    assert message.startswith(REFUSED) and location in message, message
    assert f"{key} of no worker with a qemu device allows it (w1: none set)" in message, message
    assert "lavacli workers config set" in message
    # the same words over XML-RPC (lavacli), and the master still serves
    proxy = xmlrpc.client.ServerProxy(f"http://alice:{lab.tokens['alice']}@{server.host}:{server.port}/RPC2")
    with pytest.raises(xmlrpc.client.Fault) as info:
        proxy.scheduler.jobs.submit(text)
    assert info.value.faultCode == 400 and REFUSED in info.value.faultString and location in info.value.faultString
    assert clients["alice"].call("GET", "/system/version/")["version"]
    with connection():
        assert Job.select().count() == 0
    # allowed by the worker's setting: accepted, and what it reads is kept for the scheduler
    clients["admin"].call("PUT", "/workers/w1/config/", json_body={"config": yaml.safe_dump(ALLOWS[key])})
    [job_id] = clients["alice"].call("POST", "/jobs/", body=text)["job_ids"]
    kind = "git" if "git" in name else "url"
    with connection():
        assert Job.get_by_id(job_id).local_urls == [[kind, location]]


def test_what_only_the_worker_can_see_passes_the_master(master) -> None:
    """A symlink under an allowed directory and a host name that resolves to the worker: the
    master has neither the worker's files nor its resolver. The agent refuses them when the job
    runs (test_a_job_runs_only_on_a_worker_whose_policy_allows_it, test_agent_policy.py)."""
    _, _, clients = master
    clients["admin"].call("PUT", "/workers/w1/config/", json_body={"config": yaml.safe_dump(allowing([IMAGES]))})
    for url in (f"file://{IMAGES}/a-symlink-to-etc-shadow", f"http://{socket.gethostname()}:8080/kernel"):
        assert clients["alice"].call("POST", "/jobs/", body=job(url))["job_ids"]


def test_what_no_one_worker_allows_whole_is_refused(master) -> None:
    """Each file is allowed on some worker, but no worker allows both: the job could run nowhere."""
    _, _, clients = master
    clients["admin"].call("POST", "/workers/", json_body={"hostname": "w2"})
    clients["admin"].call("POST", "/devices/", json_body={"hostname": "qemu03", "device_type": "qemu",
                                                          "worker": "w2", "health": "Good"})
    clients["admin"].call("PUT", "/workers/w1/config/", json_body={"config": yaml.safe_dump(allowing(["/srv/a"]))})
    clients["admin"].call("PUT", "/workers/w2/config/", json_body={"config": yaml.safe_dump(allowing(["/srv/b"]))})
    text = job("file:///srv/a/kernel") + "      ramdisk:\n        url: 'file:///srv/b/ramdisk'\n" \
                                          "        image_arg: -initrd {ramdisk}\n"
    fault = refusal(clients["alice"], text)
    assert fault["path"] == "actions" and fault["message"] == (
        f"{REFUSED}: no worker with a qemu device allows all of file:///srv/a/kernel, file:///srv/b/ramdisk "
        "(each is allowed on some worker)")
    clients["admin"].call("PUT", "/workers/w2/config/",
                          json_body={"config": yaml.safe_dump(allowing(["/srv/a", "/srv/b"]))})
    assert clients["alice"].call("POST", "/jobs/", body=text)["job_ids"]


def test_a_bad_policy_setting_is_refused_naming_the_key(master) -> None:
    _, _, clients = master
    for config, words in (({DIRS_KEY: "/srv/images"}, "a list of absolute directories"),
                          ({ADDRESSES_KEY: ["lab-box:8080"]}, "'lab-box:8080' is not an address")):
        with pytest.raises(ApiError) as info:
            clients["admin"].call("PUT", "/workers/w1/config/", json_body={"config": yaml.safe_dump(config)})
        assert info.value.status == 400 and f"worker config: {next(iter(config))}: " in info.value.message
        assert words in info.value.message


# ---- scheduling: real agents, real pumice-run ----


@pytest.fixture
def broker_lab(tmp_path: Path, database_url: str | None) -> Iterator[BrokerLab]:
    yield from make_broker_lab(tmp_path, database_url)


@pytest.fixture
def two_workers(broker_lab: BrokerLab, tmp_path: Path) -> Iterator[tuple[BrokerLab, dict[str, Running], Path]]:
    """A lab whose qemu devices are dev-1 on worker deny (nothing allowed) and dev-2 on worker
    allow (``images/`` allowed), each worker a real agent daemon running pumice-run; w1 (of the
    test lab) is in maintenance. Returns the lab, the agents and the images directory."""
    images, secrets = tmp_path / "images", tmp_path / "worker-secrets"
    images.mkdir(), secrets.mkdir()
    (images / "kernel.bin").write_bytes(IMAGE)
    (secrets / "shadow").write_text(SECRET + "\n")
    (images / "escape").symlink_to(secrets / "shadow")
    dictionary = (Path(__file__).parent / "data" / "qemu-amd64.jinja2").read_text()
    with connection():
        inventory.update_worker(SYSTEM, "w1", health="Maintenance")
        for number, (name, config) in enumerate((("deny", {}), ("allow", allowing([images]))), start=1):
            inventory.add_worker(SYSTEM, name)
            inventory.set_worker_text(SYSTEM, name, "config", yaml.safe_dump({**config, "tmp_dir": str(tmp_path)}))
            inventory.add_device(SYSTEM, f"dev-{number}", "qemu", worker=name, health="Good",
                                   dictionary=dictionary)
    agents = {}
    for name in ("deny", "allow"):
        master_cert, worker_cert = broker_lab.key_files(name, tmp_path / f"keys-{name}")
        agents[name] = Running(AgentDaemon(AgentConfig(master=broker_lab.endpoint, hostname=name,
                                                  spool=tmp_path / f"spool-{name}", heartbeat=0.5,
                                                  master_cert=master_cert, worker_cert=worker_cert)))
    try:
        db_wait(lambda: all(inventory.get_worker(n).state == "Online" for n in agents), 20, "both agents online")
        yield broker_lab, agents, images
    finally:
        for running in agents.values():
            running.close()


def submit(broker_lab: BrokerLab, text: str) -> int:
    with connection():
        [job_id] = jobs.submit_job(text, broker_lab.lab.user("alice"))
    return job_id


def ran(job_id: int, timeout: float = 60) -> tuple[Job, str]:
    """Schedule, wait for the job to finish; the job and its stored log."""
    Scheduler().loop_once()
    db_wait(lambda: Job.get_by_id(job_id).state == JobState.FINISHED, timeout, f"job {job_id} to finish")
    with connection():
        job = Job.get_by_id(job_id)
        with current().store.log(job_id) as logfile:
            return job, "\n".join(logfile.read())


def test_a_job_runs_only_on_a_worker_whose_policy_allows_it(two_workers) -> None:
    broker_lab, agents, images = two_workers
    job_id = submit(broker_lab, job(f"file://{images}/kernel.bin"))
    finished, log = ran(job_id)
    assert (finished.health, finished.failure_comment) == (JobHealth.COMPLETE, None), log[-3000:]
    with connection():
        assert finished.actual_device.hostname == "dev-2"  # dev-1 sorts first, but its worker refuses
    assert f"kernel: downloaded {len(IMAGE)} bytes from file://{images}/kernel.bin" in log
    # what the master cannot see, the agent refuses when the job runs: nothing of it is read, and
    # a service of the worker behind a name that resolves to the worker is never contacted
    service = ThreadingHTTPServer(("0.0.0.0", 0), BaseHTTPRequestHandler)
    threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    contacted: list = []
    service.verify_request = lambda request, address: contacted.append(address) or False
    try:
        for url, words in ((f"file://{images}/escape", f"reads {images.parent}/worker-secrets/shadow on the worker"),
                           (f"http://{socket.gethostname()}:{service.server_address[1]}/kernel",
                            "of the worker; allowed_local_addresses (none set)")):
            finished, log = ran(submit(broker_lab, job(url)))
            assert finished.health == JobHealth.INCOMPLETE, log[-3000:]
            comment = finished.failure_comment
            assert comment.startswith("Job: ") and f"{REFUSED}: {url} " in comment and words in comment, comment
            assert "pumice-master-policy-SECRET" not in log
    finally:
        service.shutdown()
        service.server_close()
    assert contacted == []


def test_a_job_waits_for_an_allowing_worker_and_is_refused_when_none_allows_it(two_workers) -> None:
    broker_lab, agents, images = two_workers
    with connection():
        inventory.update_worker(SYSTEM, "allow", health="Maintenance")
    job_id = submit(broker_lab, job(f"file://{images}/kernel.bin"))
    assert Scheduler().loop_once() == []  # dev-1 is idle, but its worker's policy refuses the job
    with connection():
        assert Job.get_by_id(job_id).state == JobState.SUBMITTED
        inventory.update_worker(SYSTEM, "allow", health="Active")
    finished, _ = ran(job_id)
    assert finished.health == JobHealth.COMPLETE
    with connection():
        assert finished.actual_device.hostname == "dev-2"
        inventory.set_worker_text(SYSTEM, "allow", "config", "")
        with pytest.raises(Invalid) as info:
            jobs.submit_job(job(f"file://{images}/kernel.bin"), broker_lab.lab.user("alice"))
    [fault] = info.value.faults
    assert fault.path == "actions[0].deploy.images.kernel.url"
    assert (f"{REFUSED}: file://{images}/kernel.bin reads {images}/kernel.bin on the worker; allowed_file_dirs "
            "of no worker with a qemu device allows it (allow: none set; deny: none set; w1: none set)") \
        in fault.message


def test_assign_gives_a_job_only_to_workers_whose_policy_allows_what_it_reads() -> None:
    local = (Access("url", "file:///srv/images/kernel"),)
    job = QueuedJob(1, "qemu", 50, 0, local_urls=local)
    plain = QueuedJob(2, "qemu", 40, 1)
    devices = [IdleDevice("dev-1", "qemu", "Good", "deny"), IdleDevice("dev-2", "qemu", "Good", "allow")]
    workers = {"deny": WorkerSlot("deny", True, True),
               "allow": WorkerSlot("allow", True, True, policy=FilePolicy.from_dispatcher(allowing(["/srv/images"])))}
    assert [(a.device, a.job_id) for a in assign([job, plain], devices, workers)] == [("dev-2", 1), ("dev-1", 2)]
    busy = {**workers, "allow": WorkerSlot("allow", True, True, limit=1, busy=1, policy=workers["allow"].policy)}
    assert [(a.device, a.job_id) for a in assign([job, plain], devices, busy)] == [("dev-1", 2)]
