"""The wire messages (agent/messages.py) and the results records the broker turns into results."""

from __future__ import annotations

import json

import pytest

from agent import messages as m
from master.certificates import parse_public_key
from master.errors import Invalid
from master.start import worker_env
from results.log import LogRecord
from results.record import results_in_lines

SAMPLES = [
    m.Hello(hostname="w1", protocol=m.PROTOCOL_VERSION, version="0.1.0", jobs=[3, 4]),
    m.Welcome(protocol=m.PROTOCOL_VERSION, version="0.1.0", heartbeat=5.0),
    m.Refused(reason="no", code="unknown-worker"),
    m.HelloRequired(), m.Ping(), m.Pong(), m.Bye(),
    m.Start(job_id=7, definition="job: 1\n", device="device: é\n", device_name="qemu01",
            env={"purge": False, "overrides": {"http_proxy": "http://proxy:3128"}},
            dispatcher={"dispatcher_ip": "10.0.0.1"}, timeout=240.0),
    m.StartOk(job_id=7),
    m.Log(job_id=7, seq=10, lines=['- {"dt": "x", "lvl": "info", "msg": "ünïcode \\u0007"}', ""]),
    m.LogOk(job_id=7, lines=12, rewind=True),
    m.End(job_id=7, health="Incomplete", lines=12, error_type="Infrastructure", error_msg="lost",
          description="pipeline: []\n"),
    m.EndOk(job_id=7), m.Cancel(job_id=7), m.Status(job_ids=[7, 8]),
    m.StatusReply(jobs=[{"job_id": 7, "state": m.JOB_RUNNING, "lines": 3}]),
]


def test_every_message_type_has_a_sample() -> None:
    assert {type(s).TYPE for s in SAMPLES} == set(m.message_types())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: s.TYPE)
def test_round_trip(msg: m.Message) -> None:
    frames = m.encode(msg)
    assert frames[:3] == [m.PROTOCOL, str(m.PROTOCOL_VERSION).encode(), msg.TYPE.encode()]
    assert json.loads(frames[3]) == msg.body()
    assert m.decode(frames) == msg


def test_optional_fields_have_defaults() -> None:
    msg = m.decode([m.PROTOCOL, b"1", b"END", b'{"job_id": 1, "health": "Complete", "lines": 0}'])
    assert msg == m.End(job_id=1, health="Complete", lines=0)


def test_other_protocol_version_is_refused_with_a_clear_reason() -> None:
    frames = m.encode(m.Ping())
    frames[1] = b"2"
    with pytest.raises(m.VersionMismatch) as info:
        m.decode(frames)
    assert info.value.peer_version == "2"
    assert "this side speaks pumice protocol 1, the peer speaks '2'" in str(info.value)


def test_refused_is_read_whatever_its_version() -> None:
    """A refusal must reach an agent of another version, or it could not log why."""
    frames = m.encode(m.Refused(reason="protocol version mismatch", code="protocol"))
    frames[1] = b"99"
    assert m.decode(frames) == m.Refused(reason="protocol version mismatch", code="protocol")


@pytest.mark.parametrize(("frames", "error"), [
    ([b"pumice", b"1", b"PING"], "a message has 4 frames (protocol, version, type, body), got 3"),
    ([b"lava", b"1", b"PING", b"{}"], "not a pumice message: protocol b'lava'"),
    ([b"pumice", b"1", b"PONGG", b"{}"], "unknown message type 'PONGG'; known: BYE, CANCEL"),
    ([b"pumice", b"1", b"LOG", b"{not json"], "LOG body is not JSON"),
    ([b"pumice", b"1", b"LOG", b"[1]"], "LOG body must be a JSON object, not list"),
    ([b"pumice", b"1", b"LOG", b'{"job_id": 1, "seq": 0}'], "LOG lacks the field 'lines'"),
    ([b"pumice", b"1", b"LOG", b'{"job_id": "1", "seq": 0, "lines": []}'], "LOG.job_id must be int, got str"),
    ([b"pumice", b"1", b"LOG", b'{"job_id": 1, "seq": 0, "lines": [1]}'], "LOG.lines must be list[str]"),
    ([b"pumice", b"1", b"LOG", b'{"job_id": true, "seq": 0, "lines": []}'],
     "LOG.job_id must be int, got bool"),
    ([b"pumice", b"1", b"END", b'{"job_id": 1, "health": "x", "lines": 0, "error_msg": 3}'],
     "END.error_msg must be str | None, got int"),
])
def test_malformed_messages_say_what_is_wrong(frames: list[bytes], error: str) -> None:
    with pytest.raises(m.MessageError) as info:
        m.decode(frames)
    assert error in str(info.value)


def test_unknown_fields_are_ignored() -> None:
    assert m.decode([m.PROTOCOL, b"1", b"CANCEL", b'{"job_id": 4, "reason": "later"}']) == m.Cancel(job_id=4)


def test_float_fields_take_integers() -> None:
    msg = m.decode([m.PROTOCOL, b"1", b"WELCOME", b'{"protocol": 1, "version": "x", "heartbeat": 5}'])
    assert msg.heartbeat == 5


def test_duplicate_message_type_fails_at_import() -> None:
    from dataclasses import dataclass

    with pytest.raises(TypeError, match="message type PING is defined twice"):
        @m.message("PING")
        @dataclass(frozen=True, slots=True)
        class Ping2(m.Message):
            pass


# ---- results records ----

def test_results_in_lines_skips_other_records_and_bad_results(caplog: pytest.LogCaptureFixture) -> None:
    lines = [
        LogRecord("2024-01-01T00:00:00", "info", "results are coming").to_line().rstrip("\n"),
        LogRecord("2024-01-01T00:00:01", "results", {"definition": "d", "case": "c1", "result": "pass",
                                                      "level": "1"}).to_line().rstrip("\n"),
        LogRecord("2024-01-01T00:00:02", "results", {"definition": "d", "case": "c2", "result": "bad",
                                                      "level": "1"}).to_line().rstrip("\n"),
        "- {dt: 2023-01-10, lvl: results, msg: {definition: d, case: c3, result: fail, level: '2'}}",
        "not a record",
    ]
    found = results_in_lines(9, lines)
    assert [(r.case, r.result, r.level) for r in found] == [("c1", "pass", "1"), ("c3", "fail", "2")]
    assert "results record skipped" in caplog.text


def test_worker_env_takes_lava_env_yaml_or_a_plain_mapping() -> None:
    assert worker_env(None) == {}
    assert worker_env("purge: true\noverrides:\n  http_proxy: http://p:3128\nremoves: [LANG]\n") == {
        "purge": True, "removes": ["LANG"], "overrides": {"http_proxy": "http://p:3128"}}
    assert worker_env("http_proxy: http://p:3128\n") == {"purge": False, "removes": [],
                                                        "overrides": {"http_proxy": "http://p:3128"}}


def test_public_keys_are_checked() -> None:
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    assert parse_public_key(key) == key
    assert parse_public_key(f'metadata\ncurve\n    public-key = "{key}"\n') == key
    with pytest.raises(Invalid, match="secret key file"):
        parse_public_key(f'curve\n    public-key = "{key}"\n    secret-key = "{key}"\n')
    with pytest.raises(Invalid, match="not a CURVE public key"):
        parse_public_key("hello")
