"""Worker authentication, on by default: only a worker's registered CURVE key gets its jobs.

In-process first (the broker in a thread, hand-driven agents, SQLite and PostgreSQL): what a
connection without the right key receives (nothing), revocation and rotation as the broker sees
them, and join tokens as the certificates service keeps them. Then real processes on loopback
(``pumice-master serve`` and ``pumice-agent``): enrolment with ``--join``, a forged master key,
a replayed and an expired token, revoke and rotate from the CLI.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import zmq
from support.broker import BrokerLab, FakeAgent, ProcessLab, make_broker_lab, running_process_lab, wait_for
from support.master import job_text

from agent import messages as m
from agent.enrolment import fingerprint, token_digest
from agent.transport import CurveKeys
from master import certificates, inventory, jobs
from master.db import connection
from master.errors import Conflict, Forbidden, Invalid, Unauthorized
from master.models import JoinToken, Worker
from master.scheduler import Scheduler
from master.users import SYSTEM

#: what a worker's connection must never receive before it is admitted
JOB_MESSAGES = (m.Start, m.Cancel, m.Status, m.Welcome)


@pytest.fixture
def broker_lab(tmp_path: Path, database_url: str | None) -> Iterator[BrokerLab]:
    yield from make_broker_lab(tmp_path, database_url)


def scheduled_job(bl: BrokerLab) -> int:
    """A job the scheduler gives to w1 (online in the database): its START waits for w1."""
    with connection():
        [job_id] = jobs.submit_job(job_text("secret job") + "secrets:\n  API_KEY: hunter2\n", bl.lab.user("alice"))
    Scheduler().loop_once()
    return job_id


def received(agent: FakeAgent, hello: bool = True, seconds: float = 1.5) -> list[m.Message]:
    if hello:
        agent.send(m.Hello(hostname=agent.hostname, protocol=m.PROTOCOL_VERSION, version="0.1.0", jobs=[]))
    return agent.drain(seconds)


# ---- the broker: who receives what ----

def test_a_connection_claiming_a_worker_without_its_key_receives_nothing(
        broker_lab: BrokerLab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pumice.broker")
    job_id = scheduled_job(broker_lab)
    # no key at all (an agent --insecure-plain): the handshake fails, not one message passes
    plain = broker_lab.agent("w1", plain=True)
    assert received(plain) == []
    plain.close()
    # a CURVE key nobody registered
    public, secret = zmq.curve_keypair()
    stranger = broker_lab.agent("w1", curve=CurveKeys(broker_lab.curve().master_public, public, secret))
    assert received(stranger) == []
    wait_for(lambda: f"unknown CURVE key {public.decode()} (registered for no worker" in caplog.text,
             what="the master's log of the refusal")
    stranger.close()
    # the key of another registered worker: refused, and told so, but nothing of w1's
    with connection():
        inventory.add_worker(SYSTEM, "w2")
    thief = broker_lab.agent("w1", curve=broker_lab.curve("w2"))
    got = received(thief)
    assert got and all(isinstance(msg, m.Refused) and msg.code == "key" for msg in got), got
    assert "worker w1 presented the CURVE key of worker w2, not its own" in got[0].reason
    thief.send(m.Ping())
    assert not [msg for msg in thief.drain(1.0) if isinstance(msg, JOB_MESSAGES)]
    thief.close()
    # the real w1 gets its job, with its secrets
    agent = broker_lab.agent("w1")
    assert isinstance(agent.hello(), m.Welcome)
    start = agent.recv(m.Start)
    assert start.job_id == job_id and "hunter2" in start.definition
    agent.close()


def test_a_revoked_key_loses_its_session_and_cannot_connect_again(broker_lab: BrokerLab) -> None:
    agent = broker_lab.agent("w1")
    assert isinstance(agent.hello(), m.Welcome)
    with connection():
        done = certificates.revoke_worker_key(broker_lab.lab.user("admin"), "w1")
    assert done == {"hostname": "w1", "revoked": True, "join_tokens_voided": 0}
    job_id = scheduled_job(broker_lab)
    # its next message: the session is gone; its HELLO again is refused with the reason
    wait_for(lambda: "w1" not in broker_lab.broker.sessions, what="the session to be dropped")
    agent.send(m.Ping())
    assert isinstance(agent.recv(), m.HelloRequired)
    got = received(agent)
    assert isinstance(got[0], m.Refused) and not [msg for msg in got if isinstance(msg, JOB_MESSAGES)], got
    assert "has no registered key (never enrolled, or revoked)" in got[0].reason
    agent.close()
    # a new connection with the revoked key is refused in the handshake
    again = broker_lab.agent("w1")
    assert received(again) == []
    again.close()
    with connection():
        assert Worker.get(Worker.hostname == "w1").public_key is None
        assert jobs.show_job(job_id, None)["state"] != "Running"


def test_rotation_keeps_the_old_key_until_a_new_one_is_enrolled(broker_lab: BrokerLab) -> None:
    old = broker_lab.agent("w1")
    assert isinstance(old.hello(), m.Welcome)
    admin = broker_lab.lab.user("admin")
    with connection():
        token = certificates.issue_join_token(admin, "w1")["token"]
    old.send(m.Ping())
    assert isinstance(old.recv(m.Pong), m.Pong)  # still admitted: rotation is not revocation
    public, secret = zmq.curve_keypair()
    with connection():
        certificates.join("w1", token, public.decode())
    wait_for(lambda: "w1" not in broker_lab.broker.sessions, what="the old key's session to be dropped")
    old.send(m.Ping())
    assert isinstance(old.recv(), m.HelloRequired)
    old.close()
    new = broker_lab.agent("w1", curve=CurveKeys(broker_lab.curve().master_public, public, secret))
    assert isinstance(new.hello(), m.Welcome)
    assert broker_lab.broker.sessions["w1"].key == public.decode()
    new.close()


# ---- join tokens in the certificates service ----

def test_join_tokens_are_single_use_expire_and_enrol_one_worker(broker_lab: BrokerLab) -> None:
    admin = broker_lab.lab.user("admin")
    with connection():
        inventory.add_worker(SYSTEM, "w2")
        issued = certificates.issue_join_token(admin, "w2", "30m")
        token = issued["token"]
        master = certificates.master_public_key()
        assert issued["master_fingerprint"] == f"SHA256:{fingerprint(master)}"
        assert token.split(".")[1] == fingerprint(master)
        # only the digest is stored
        row = JoinToken.get(JoinToken.digest == token_digest(token))
        assert token not in repr(row.__data__) and token.split(".")[2] not in repr(row.__data__)
        # not for another worker (and the token is not spent by trying)
        key_a, key_b = (zmq.curve_keypair()[0].decode() for _ in range(2))
        with pytest.raises(Forbidden, match="this join token enrols worker w2, not w1: give --hostname w2"):
            certificates.join("w1", token, key_a)
        # a key that is another worker's already
        with pytest.raises(Conflict, match="this CURVE key is worker w1's already"):
            certificates.join("w2", token, broker_lab.curve("w1").public.decode())
        assert certificates.join("w2", token, key_a)["public_key"] == key_a
        with pytest.raises(Unauthorized, match=r"this join token was used already \(at .*Z\): a token enrols one "
                                               r"key, once; ask an admin for a new one \('pumice-master workers "
                                               r"rotate w2'\)"):
            certificates.join("w2", token, key_b)
        assert certificates.worker_key("w2") == key_a
        # expired
        late = certificates.issue_join_token(admin, "w2", 1)["token"]
        time.sleep(1.1)
        with pytest.raises(Unauthorized, match=r"this join token expired at .*Z; ask an admin for a new one"):
            certificates.join("w2", late, key_b)
        # a newer token voids the unused one before it; revoke voids them all
        first = certificates.issue_join_token(admin, "w2")["token"]
        second = certificates.issue_join_token(admin, "w2")["token"]
        with pytest.raises(Unauthorized, match="this join token is not known to the master"):
            certificates.join("w2", first, key_b)
        assert certificates.revoke_worker_key(admin, "w2")["join_tokens_voided"] == 1
        with pytest.raises(Unauthorized, match="not known"):
            certificates.join("w2", second, key_b)
        with pytest.raises(Invalid, match="not a Pumice join token"):
            certificates.join("w2", "pj1.nope", key_b)
        with pytest.raises(Invalid, match="between 1 s and 30 days"):
            certificates.issue_join_token(admin, "w2", "31d")
        for who in (None, broker_lab.lab.user("alice")):
            with pytest.raises((Unauthorized, Forbidden)):
                certificates.issue_join_token(who, "w2")
    if broker_lab.lab.database_url is None:  # the SQLite file never held the token
        data = (broker_lab.lab.instance.data_dir / "pumice.db").read_bytes()
        assert token.split(".")[2].encode() not in data


# ---- real processes ----

@pytest.fixture
def plab(tmp_path: Path) -> Iterator[ProcessLab]:
    yield from running_process_lab(tmp_path)


def online(lab: ProcessLab, hostname: str = "w1") -> bool:
    return lab.api("GET", f"/workers/{hostname}/")["state"] == "Online"


def run_agent(lab: ProcessLab, *args: str, timeout: float = 60) -> tuple[int, str]:
    """``pumice-agent ARGS`` to its end (an enrolment that fails ends it): exit status and output."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "agent.daemon", "--master", lab.broker_url, *args], env=lab.env,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


class ForgedMaster(BaseHTTPRequestHandler):
    """A man in the middle: answers the master's certificate with a key of its own, and records
    every request (a token sent to it would be stolen)."""

    key = zmq.curve_keypair()[0].decode()
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests.append(f"GET {self.path}")
        body = json.dumps({"name": "master", "public_key": self.key}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        self.requests.append(f"POST {self.path} {self.rfile.read(int(self.headers['Content-Length']))!r}")
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_enrolment_with_a_join_token_end_to_end(plab: ProcessLab) -> None:
    """workers add prints a token; --join enrols; the agent connects with CURVE; a second use of the
    token is refused on both sides, and so is an expired one."""
    printed = plab.cli("workers", "add", "lab-box", "--token-lifetime", "10m")
    token = next(line.split()[-1] for line in printed.splitlines() if line.startswith("join token: "))
    master = plab.api("GET", "/system/certificate/", token=None)
    assert f"master key {master['fingerprint']}" in printed and master["fingerprint"].endswith(token.split(".")[1])
    assert "pumice-agent --join TOKEN --url http://MASTER:8000 --master tcp://MASTER:5556 --hostname lab-box" in printed
    agent = plab.start_agent("lab-box", "--join", token, "--url", plab.url)
    wait_for(lambda: online(plab, "lab-box"), 30, "lab-box online")
    keys = plab.root / "spool-lab-box" / "keys"
    assert (keys / "master.key").read_text().count(master["public_key"]) == 1
    assert (keys / "lab-box.key_secret").stat().st_mode & 0o777 == 0o600
    registered = plab.api("GET", "/workers/lab-box/certificate/")["public_key"]
    assert registered in (keys / "lab-box.key").read_text()
    log = plab.agent_log(agent)
    assert f"enrolled as worker lab-box with the master at {plab.url}" in log
    assert "with CURVE encryption" in log and "online: the master" in log
    assert "CURVE key of worker lab-box set (enrolled with a join token)" in plab.master_log.read_text()
    # the same token from this worker again is a no-op (a unit file that keeps --join)
    agent.terminate()
    agent.wait(30)
    again = plab.start_agent("lab-box", "--join", token, "--url", plab.url)
    wait_for(lambda: "enrolled with this join token already" in plab.agent_log(again), 30, "the no-op")
    # ... but from another box it is a replay: refused on both sides, nothing registered
    status, output = run_agent(plab, "--hostname", "lab-box", "--spool", str(plab.root / "replay"),
                               "--join", token, "--url", plab.url)
    assert status == 1
    assert "enrolment failed: the master refused the enrolment (401): this join token was used already" in output
    assert "enrolment of worker lab-box refused: this join token was used already" in plab.master_log.read_text()
    assert not (plab.root / "replay" / "keys" / "lab-box.key_secret").exists()
    assert plab.api("GET", "/workers/lab-box/certificate/")["public_key"] == registered
    # an expired token
    late = plab.join_token("lab-box", "--token-lifetime", "1s")
    time.sleep(1.5)
    status, output = run_agent(plab, "--hostname", "lab-box", "--spool", str(plab.root / "late"), "--join", late,
                               "--url", plab.url)
    assert status == 1 and "(401): this join token expired at " in output, output
    assert "enrolment of worker lab-box refused: this join token expired at" in plab.master_log.read_text()
    assert online(plab, "lab-box")  # the enrolled agent was never disturbed


def test_a_forged_master_key_is_refused_and_the_token_is_not_sent(plab: ProcessLab) -> None:
    token = plab.join_token("w1")
    ForgedMaster.requests = []
    forged = ThreadingHTTPServer(("127.0.0.1", 0), ForgedMaster)
    threading.Thread(target=forged.serve_forever, daemon=True).start()
    try:
        status, output = run_agent(plab, "--hostname", "w1", "--spool", str(plab.root / "mitm"), "--join", token,
                                   "--url", f"http://127.0.0.1:{forged.server_address[1]}")
    finally:
        forged.shutdown()
    assert status == 1
    assert f"presented the CURVE key {ForgedMaster.key} (fingerprint SHA256:{fingerprint(ForgedMaster.key)})" in output
    assert f"but the join token is for the master key SHA256:{token.split('.')[1]}: refusing it" in output
    assert ForgedMaster.requests == ["GET /api/v0.2/system/certificate/"]  # the token never left the box
    assert not (plab.root / "mitm" / "keys").exists()
    # the token is intact: the real master takes it
    agent = plab.start_agent("w1", "--join", token, "--url", plab.url, spool=plab.root / "mitm")
    wait_for(lambda: online(plab), 30, "w1 online with the real master's key")
    agent.terminate()
    agent.wait(30)


def test_only_the_registered_key_gets_the_jobs_of_a_worker(plab: ProcessLab) -> None:
    """Processes claiming w1 without its key (plain, an unknown key, another worker's key) get no
    START: the job waits; w1 itself then runs it."""
    from agent.daemon import main as agent_main

    job_id = plab.submit_text(job_text("for w1 only", images="images.example"))
    plain = plab.start_agent("w1", "--insecure-plain", spool=plab.root / "spool-plain", enrol=False)
    keys = plab.root / "keys"
    assert agent_main(["create-certificate", "w1", "--directory", str(keys)]) == 0
    (keys / "master.key").write_text(plab.api("GET", "/system/certificate/", token=None)["certificate"])
    unknown = plab.start_agent("w1", "--master-cert", str(keys / "master.key"), "--worker-cert",
                               str(keys / "w1.key_secret"), spool=plab.root / "spool-unknown", enrol=False)
    plab.cli("workers", "add", "w2", "--no-token")
    w2 = plab.start_agent("w2", spool=plab.root / "spool-w2")  # enrols w2: its keys in spool-w2
    wait_for(lambda: online(plab, "w2"), 30, "w2 online")
    w2.terminate()
    w2.wait(30)
    thief = plab.start_agent("w1", "--master-cert", str(plab.root / "spool-w2" / "keys" / "master.key"),
                             "--worker-cert", str(plab.root / "spool-w2" / "keys" / "w2.key_secret"),
                             spool=plab.root / "spool-thief", enrol=False)
    public = (keys / "w1.key").read_text().split('public-key = "')[1].split('"')[0]
    wait_for(lambda: f"unknown CURVE key {public}" in plab.master_log.read_text(), 30, "the unknown key refused")
    wait_for(lambda: "refused worker w1: worker w1 presented the CURVE key of worker w2,"
             in plab.master_log.read_text(), 30, "the thief refused")
    wait_for(lambda: "this agent runs --insecure-plain but the master authenticates its workers"
             in plab.agent_log(plain), 30, "the plain agent's error")
    wait_for(lambda: "refused this worker's CURVE key" in plab.agent_log(unknown), 30, "the unknown key's error")
    wait_for(lambda: "refused this worker (key): worker w1 presented the CURVE key of worker w2"
             in plab.agent_log(thief), 30, "the thief's error")
    time.sleep(2)
    assert plab.job(job_id)["state"] == "Submitted" and not online(plab)
    for spool in ("spool-plain", "spool-unknown", "spool-thief"):
        assert not list((plab.root / spool / "jobs").glob("*")), spool
    for proc in (plain, unknown, thief):
        proc.terminate()
        proc.wait(30)
    plab.start_agent("w1")
    wait_for(lambda: (plab.root / "spool-w1" / "jobs" / str(job_id) / "job.yaml").exists(), 60,
             "the job's START at w1")


def test_revoke_and_rotate_from_the_command_line(plab: ProcessLab) -> None:
    first = plab.start_agent("w1")
    wait_for(lambda: online(plab), 30, "w1 online")
    # rotate: the connected agent keeps working until a key is enrolled with the new token
    token = plab.join_token("w1")
    time.sleep(2)
    assert online(plab)
    second = plab.start_agent("w1", "--join", token, "--url", plab.url, spool=plab.root / "spool-rotated")
    wait_for(lambda: "enrolled as worker w1" in plab.agent_log(second), 30, "the new key enrolled")
    wait_for(lambda: "refused this worker" in plab.agent_log(first) or "refused this worker's CURVE key"
             in plab.agent_log(first), 30, "the old key refused")
    first.terminate()
    first.wait(30)
    wait_for(lambda: online(plab), 30, "w1 online with its new key")
    new_key = plab.api("GET", "/workers/w1/certificate/")["public_key"]
    assert new_key in (plab.root / "spool-rotated" / "keys" / "w1.key").read_text()
    # revoke (another process: the broker sees it within its refresh): the agent is out
    printed = plab.cli("workers", "revoke", "w1")
    assert "worker w1: key revoked; it cannot connect until it enrols again" in printed
    wait_for(lambda: "worker w1: the CURVE key of its session was revoked: session dropped"
             in plab.master_log.read_text(), 30, "the session dropped")
    wait_for(lambda: f"unknown CURVE key {new_key}" in plab.master_log.read_text(), 60, "its reconnection refused")
    wait_for(lambda: not online(plab), 30, "w1 offline")
    with pytest.raises(urllib.error.HTTPError) as info:
        plab.api("GET", "/workers/w1/certificate/")
    assert info.value.code == 404 and "has no certificate" in info.value.read().decode()
    second.terminate()
    second.wait(30)


def test_certificate_endpoints_and_revoke_rotate_over_rest(plab: ProcessLab, tmp_path: Path) -> None:
    from agent.daemon import main as agent_main

    master = plab.api("GET", "/system/certificate/", token=None)
    assert master["name"] == "master" and len(master["public_key"]) == 40
    assert f'public-key = "{master["public_key"]}"' in master["certificate"]
    assert master["fingerprint"] == f"SHA256:{fingerprint(master['public_key'])}"
    assert (plab.data / "certificates" / "master.key_secret").stat().st_mode & 0o777 == 0o600
    plab.cli("workers", "add", "w9", "--no-token")
    with pytest.raises(urllib.error.HTTPError) as info:
        plab.api("GET", "/workers/w9/certificate/")
    assert info.value.code == 404 and "worker 'w9' has no certificate" in info.value.read().decode()
    assert agent_main(["create-certificate", "w9", "--directory", str(tmp_path)]) == 0
    # by hand (a bare Z85 key is accepted too)
    key = (tmp_path / "w9.key").read_text().split('public-key = "')[1].split('"')[0]
    assert plab.api("POST", "/workers/w9/certificate/", key)["public_key"] == key
    assert plab.api("GET", "/workers/w9/certificate/")["certificate"].count(key) == 1
    for body, status, text in [
        ((tmp_path / "w9.key_secret").read_text(), 400, "this is a secret key file"),
        ("nonsense", 400, "not a CURVE public key"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as info:
            plab.api("POST", "/workers/w9/certificate/", body)
        assert info.value.code == status and text in info.value.read().decode()
    for method, path in (("POST", "/workers/w9/certificate/"), ("DELETE", "/workers/w9/certificate/"),
                         ("POST", "/workers/w9/join-token/")):
        with pytest.raises(urllib.error.HTTPError) as info:
            plab.api(method, path, key if method == "POST" else None, token=None)
        assert info.value.code == 401, path
    with pytest.raises(urllib.error.HTTPError) as info:
        plab.api("GET", "/workers/nobody/certificate/")
    assert info.value.code == 404
    issued = plab.api("POST", "/workers/w9/join-token/", json.dumps({"lifetime": "5m"}))
    assert issued["hostname"] == "w9" and issued["has_key"] and issued["token"].startswith("pj1.")
    assert plab.api("DELETE", "/workers/w9/certificate/") == {"hostname": "w9", "revoked": True,
                                                               "join_tokens_voided": 1}
    public = zmq.curve_keypair()[0].decode()
    with pytest.raises(urllib.error.HTTPError) as info:
        plab.api("POST", "/workers/w9/join/", json.dumps({"token": issued["token"], "public_key": public}),
                 token=None)
    assert info.value.code == 401 and "not known to the master" in info.value.read().decode()
    fresh = plab.api("POST", "/workers/w9/join-token/")["token"]
    joined = plab.api("POST", "/workers/w9/join/", json.dumps({"token": fresh, "public_key": public}), token=None)
    assert joined["public_key"] == public and joined["master_public_key"] == master["public_key"]
    # the database holds digests only
    with sqlite3.connect(plab.data / "pumice.db") as db:
        digests = [d for (d,) in db.execute("SELECT digest FROM join_tokens")]
    assert token_digest(fresh) in digests and not any(fresh in d for d in digests)


def test_plain_mode_needs_the_flag_and_is_logged_loudly(tmp_path: Path) -> None:
    lab = ProcessLab(tmp_path, plain=True)
    try:
        lab.start_master()
        agent = lab.start_agent("w1")
        wait_for(lambda: online(lab), 30, "w1 online without authentication")
        log = lab.master_log.read_text()
        assert "WARNING pumice.broker: the broker runs WITHOUT worker authentication (--insecure-plain)" in log
        assert "pumice broker on tcp://127.0.0.1" in log and "(WITHOUT worker authentication" in log
        wait_for(lambda: "worker w1 connected WITHOUT authentication" in lab.master_log.read_text(), 10, "warning")
        assert "WARNING pumice.agent: connecting WITHOUT authentication (--insecure-plain)" in lab.agent_log(agent)
    finally:
        lab.close()


def test_an_older_lab_is_upgraded_with_its_worker_keys(tmp_path: Path, database_url: str | None) -> None:
    """A database of the previous release (no join_tokens, no master_keys) is migrated, and the
    key files of its old key directory are taken into the database when the broker starts."""
    from support.master import build_lab

    from agent.transport import write_certificate
    from master.broker import Broker
    from master.db import db
    from master.migrations import LATEST, MIGRATIONS, current_version, migrate
    from master.models import SchemaVersion

    lab = build_lab(tmp_path / "data", database_url)
    with connection():
        db.obj.execute_sql("DROP TABLE join_tokens")
        db.obj.execute_sql("DROP TABLE master_keys")
        SchemaVersion.delete().where(SchemaVersion.version >= 5).execute()
        assert migrate()[0] == (5, MIGRATIONS[4][1]) and current_version() == LATEST
        assert certificates.master_public_key() is None
    public, _ = zmq.curve_keypair()
    old = lab.instance.data_dir / "certificates" / "workers"
    old.mkdir(parents=True)
    write_certificate(old / "w1.key", public)
    write_certificate(old / "gone.key", zmq.curve_keypair()[0])  # no such worker: left alone
    broker = Broker("tcp://127.0.0.1:*", heartbeat=0.5).bind()
    try:
        with connection():
            assert certificates.worker_key("w1") == public.decode()
            assert certificates.master_public_key() == broker_master_key(lab)
    finally:
        broker.stop()


def broker_master_key(lab) -> str:
    path = lab.instance.data_dir / "certificates" / "master.key"
    return path.read_text().split('public-key = "')[1].split('"')[0]
