"""Agents the master must refuse, as real processes on loopback: the refusal is logged with its
reason on both sides and the agent runs nothing. Also the certificate endpoints of the API."""

from __future__ import annotations

import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_broker_support import ProcessLab, wait_for

from agent.worker import main as agent_main

JOB = """device_type: qemu
job_name: never runs
visibility: public
timeouts:
  job:
    minutes: 2
context:
  arch: amd64
actions:
- deploy:
    to: tmpfs
    images:
      kernel:
        url: http://images.invalid/vmlinuz
        image_arg: -kernel {kernel}
- boot:
    method: qemu
    media: tmpfs
    prompts: ['/ # ']
"""


def logged(path_or_text, text: str, timeout: float = 15) -> None:
    read = path_or_text if callable(path_or_text) else (lambda: Path(path_or_text).read_text())
    wait_for(lambda: text in read(), timeout, f"{text!r} in the log")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessLab]:
    lab = ProcessLab(tmp_path_factory.mktemp("plain"))
    lab.start_master()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessLab]:
    lab = ProcessLab(tmp_path_factory.mktemp("curve"), encrypt=True)
    lab.start_master()
    try:
        yield lab
    finally:
        lab.close()


def test_unregistered_hostname_is_refused(plain: ProcessLab) -> None:
    agent = plain.start_agent("stranger")
    logged(plain.master_log, "refused worker stranger: worker stranger is not registered on this master: "
                             "an admin adds it with 'pumice-master workers add stranger'")
    logged(lambda: plain.agent_log(agent), "refused this worker (unknown-worker): worker stranger is not "
                                           "registered")
    assert agent.poll() is None  # it keeps trying: registering the worker is enough to bring it in
    assert [w["hostname"] for w in plain.api("GET", "/workers/")["results"]] == ["w1"]


def test_wrong_protocol_version_is_refused(plain: ProcessLab) -> None:
    patched = [sys.executable, "-c", "import sys, agent.messages as m; m.PROTOCOL_VERSION = 99; "
                                     "import agent.worker as w; sys.exit(w.main(sys.argv[1:]))"]
    agent = plain.start_agent("w1", python=patched, spool=plain.root / "spool-v99")
    logged(plain.master_log,
           "refused worker w1: protocol version mismatch: the master speaks pumice protocol 1")
    logged(plain.master_log, "worker w1 speaks 99: install the same Pumice release on both")
    logged(lambda: plain.agent_log(agent), "refused this worker (protocol): protocol version mismatch")
    assert plain.api("GET", "/workers/w1/")["state"] == "Offline"
    agent.terminate()
    agent.wait(30)


def test_unknown_curve_key_cannot_connect_or_run_anything(encrypted: ProcessLab) -> None:
    lab = encrypted
    keys = lab.root / "keys"
    assert agent_main(["create-certificate", "w1", "--directory", str(keys)]) == 0
    (keys / "master.key").write_text(lab.api("GET", "/system/certificate/", token=None)["certificate"])
    job_id = lab.submit_text(JOB)
    # w1's key is not registered: refused in the handshake, before any message
    agent = lab.start_agent("w1", "--encrypt", "--master-cert", str(keys / "master.key"),
                            "--worker-cert", str(keys / "w1.key_secret"))
    public = (keys / "w1.key").read_text().split('public-key = "')[1].split('"')[0]
    logged(lab.master_log, f"unknown CURVE key {public}")
    logged(lambda: lab.agent_log(agent),
           "the master at " + lab.broker_url + " refused this worker's CURVE key")
    assert lab.job(job_id)["state"] == "Submitted"
    assert lab.api("GET", "/workers/w1/")["state"] == "Offline"
    # an agent claiming w1 with the key of another registered worker is refused too
    lab.cli("workers", "add", "w2")
    assert agent_main(["create-certificate", "w2", "--directory", str(keys)]) == 0
    lab.api("POST", "/workers/w2/certificate/", (keys / "w2.key").read_text())
    thief = lab.start_agent("w1", "--encrypt", "--master-cert", str(keys / "master.key"),
                            "--worker-cert", str(keys / "w2.key_secret"), spool=lab.root / "spool-thief")
    logged(lab.master_log, "refused worker w1: worker w1 connected with the CURVE key of w2")
    logged(lambda: lab.agent_log(thief), "refused this worker (key)")
    thief.terminate()
    thief.wait(30)
    # registering w1's key (the directory is reloaded) lets the same agent in
    lab.api("POST", "/workers/w1/certificate/", (keys / "w1.key").read_text())
    wait_for(lambda: lab.api("GET", "/workers/w1/")["state"] == "Online", 60,
             "w1 online once its key is known")
    wait_for(lambda: lab.job(job_id)["state"] != "Submitted", 30, "the job to be scheduled")
    agent.terminate()
    agent.wait(30)


def test_certificate_endpoints(encrypted: ProcessLab, tmp_path: Path) -> None:
    lab = encrypted
    master = lab.api("GET", "/system/certificate/", token=None)
    assert master["name"] == "master" and len(master["public_key"]) == 40
    assert f'public-key = "{master["public_key"]}"' in master["certificate"]
    assert (lab.data / "certificates" / "master.key_secret").exists()
    lab.cli("workers", "add", "w9")
    assert lab.api("GET", "/workers/w9/certificate/")["public_key"] is None
    assert agent_main(["create-certificate", "w9", "--directory", str(tmp_path)]) == 0
    # a bare Z85 key is accepted too
    key = (tmp_path / "w9.key").read_text().split('public-key = "')[1].split('"')[0]
    assert lab.api("POST", "/workers/w9/certificate/", key)["public_key"] == key
    assert (lab.data / "certificates" / "workers" / "w9.key").read_text().count(key) == 1
    for body, status, text in [
        ((tmp_path / "w9.key_secret").read_text(), 400, "this is a secret key file"),
        ("nonsense", 400, "not a CURVE public key"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as info:
            lab.api("POST", "/workers/w9/certificate/", body)
        assert info.value.code == status and text in info.value.read().decode()
    with pytest.raises(urllib.error.HTTPError) as info:
        lab.api("POST", "/workers/w9/certificate/", key, token=None)
    assert info.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as info:
        lab.api("GET", "/workers/nobody/certificate/")
    assert info.value.code == 404


def test_plain_master_has_no_certificate(plain: ProcessLab) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        plain.api("GET", "/system/certificate/", token=None)
    assert info.value.code == 404
    assert "start it with 'pumice-master serve --encrypt'" in info.value.read().decode()
