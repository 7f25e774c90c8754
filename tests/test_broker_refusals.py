"""Agents the master must refuse, as real processes on loopback: the refusal is logged with its
reason on both sides and the agent runs nothing. (Refusals of keys and tokens:
test_worker_authentication.py.)"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.broker import ProcessLab, wait_for

from agent.daemon import main as agent_main


def logged(path_or_text, text: str, timeout: float = 15) -> None:
    read = path_or_text if callable(path_or_text) else (lambda: Path(path_or_text).read_text())
    wait_for(lambda: text in read(), timeout, f"{text!r} in the log")


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessLab]:
    lab = ProcessLab(tmp_path_factory.mktemp("lab"))
    lab.start_master()
    try:
        yield lab
    finally:
        lab.close()


def test_unregistered_hostname_is_refused(master: ProcessLab) -> None:
    """Authenticated (the default): a name the master does not know has no key it could present."""
    keys = master.root / "keys"
    assert agent_main(["create-certificate", "stranger", "--directory", str(keys)]) == 0
    (keys / "master.key").write_text(master.api("GET", "/system/certificate/", token=None)["certificate"])
    agent = master.start_agent("stranger", "--master-cert", str(keys / "master.key"), "--worker-cert",
                               str(keys / "stranger.key_secret"), enrol=False)
    public = (keys / "stranger.key").read_text().split('public-key = "')[1].split('"')[0]
    logged(master.master_log, f"unknown CURVE key {public} (registered for no worker")
    logged(lambda: master.agent_log(agent), "refused this worker's CURVE key")
    # and it cannot enrol: no token is issued for an unknown worker
    with pytest.raises(AssertionError, match="no worker 'stranger': add it with 'pumice-master workers add stranger'"):
        master.join_token("stranger")
    assert agent.poll() is None  # it keeps trying: enrolling the worker is enough to bring it in
    assert [w["hostname"] for w in master.api("GET", "/workers/")["results"]] == ["w1"]
    agent.terminate()
    agent.wait(30)


def test_wrong_protocol_version_is_refused(master: ProcessLab) -> None:
    patched = [sys.executable, "-c", "import sys, agent.messages as m; m.PROTOCOL_VERSION = 99; "
                                     "import agent.daemon as w; sys.exit(w.main(sys.argv[1:]))"]
    agent = master.start_agent("w1", python=patched, spool=master.root / "spool-v99")
    logged(master.master_log,
           "refused worker w1: protocol version mismatch: the master speaks pumice protocol 1")
    logged(master.master_log, "worker w1 speaks 99: install the same Pumice release on both")
    logged(lambda: master.agent_log(agent), "refused this worker (protocol): protocol version mismatch")
    assert master.api("GET", "/workers/w1/")["state"] == "Offline"
    agent.terminate()
    agent.wait(30)


def test_unregistered_hostname_is_refused_in_plain_mode(tmp_path: Path) -> None:
    plain = ProcessLab(tmp_path, plain=True)
    try:
        plain.start_master()
        agent = plain.start_agent("stranger")
        logged(plain.master_log, "refused worker stranger: worker stranger is not registered on this master: "
                                 "an admin adds it with 'pumice-master workers add stranger'")
        logged(lambda: plain.agent_log(agent), "refused this worker (unknown-worker): worker stranger is not "
                                               "registered")
        assert agent.poll() is None
    finally:
        plain.close()
