"""Hostile input against a real running master (``pumice-master serve`` with its validator
processes), on SQLite and on PostgreSQL: each class of document an attacker with an ordinary
token could send is refused with a 4xx that says what and where, within the memory budget
(peak growth of the master's whole process tree under 5 MB) and in well under a second; after
each, the master still serves and still accepts a valid job.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.hostile import (
    BUDGET_KB,
    BUDGET_SECONDS,
    Answer,
    MasterProcess,
    alias_bomb,
    bomb_job,
    job_with,
)
from support.master import BACKENDS, LOCAL_IMAGES, database, job_text


@pytest.fixture(scope="module", params=BACKENDS)
def master(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MasterProcess]:
    with database(request.param) as url:
        proc = MasterProcess(tmp_path_factory.mktemp(f"hostile-{request.param}"), url)
        try:
            proc.start()
            # what every later request finds ready: the lab cached, templates compiled, the pool warm
            for n in range(3):
                assert proc.submit(job_text(f"warm-up {n}"), measure=False).status == 201
            yield proc
        finally:
            proc.stop()


def refused(answer: Answer, status: int = 400) -> dict:
    """The JSON error body of a refusal within the budget."""
    assert answer.status == status, answer.text[:2000]
    assert answer.seconds < BUDGET_SECONDS, f"refused in {answer.seconds:.2f} s"
    assert answer.growth_kb < BUDGET_KB, f"the master's tree grew by {answer.growth_kb} kB"
    return answer.json()


def still_serves(master: MasterProcess) -> None:
    """The master answers and still takes a valid job."""
    assert master.serves()
    assert master.submit(job_text("after")).status == 201


def fault(body: dict) -> dict:
    assert body["faults"], body
    return body["faults"][0]


def test_an_alias_bomb_in_a_jobs_context_is_refused_at_parse_time_with_its_line(master: MasterProcess) -> None:
    text = bomb_job("context")
    assert len(text) < 1024
    got = fault(refused(master.submit(text)))
    assert got["path"].startswith("context.") and "limit max_nodes" in got["message"], got
    assert got["line"] == text.splitlines().index("  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]") + 1
    still_serves(master)


def test_an_alias_bomb_in_a_jobs_metadata_is_refused_before_it_is_stored(master: MasterProcess) -> None:
    before = master.request("GET", "/api/v0.2/jobs/?limit=1").json()["count"]
    got = fault(refused(master.submit(bomb_job("metadata"))))
    assert got["path"].startswith("metadata.") and got["line"], got
    assert master.request("GET", "/api/v0.2/jobs/?limit=1").json()["count"] == before
    still_serves(master)


def test_an_alias_bomb_is_refused_by_the_validation_endpoint_and_over_xml_rpc(master: MasterProcess) -> None:
    answer = master.request("POST", "/api/v0.2/jobs/validate/", bomb_job())
    assert answer.status == 200 and answer.growth_kb < BUDGET_KB
    assert not answer.json()["valid"] and "limit max_nodes" in answer.json()["faults"][0]["message"]
    result, answer = master.rpc(master.rpc_body("scheduler.jobs.submit", bomb_job("metadata")))
    assert answer.growth_kb < BUDGET_KB and answer.seconds < BUDGET_SECONDS
    assert result.faultCode == 400 and "metadata." in result.faultString, result
    still_serves(master)


def test_an_alias_bomb_in_an_uploaded_bundle_is_refused(master: MasterProcess) -> None:
    bundle = ("# Pumice results bundle\njob: \"7\"\nsource: {instance: x, url: 'http://x/', "
              f"uuid: {uuid.uuid4()}}}\nbomb:\n{alias_bomb(indent='  ')}results:\n"
              "  \"0\":\n  - {suite: lava, case: job, result: pass, extra: *i}\n")
    body = refused(master.request("POST", "/api/v0.2/bundles/", bundle))
    assert "limit max_nodes" in body["error"] and body["faults"][0]["line"], body
    still_serves(master)


def test_a_bundle_of_a_hundred_thousand_values_on_one_line_is_refused(master: MasterProcess) -> None:
    source = json.dumps({"instance": "x", "url": "http://x/", "uuid": str(uuid.uuid4())})
    header = f'# Pumice results bundle\njob: "7"\nsource: {source}\n'
    for item in (json.dumps([{}] * 100_000),
                 json.dumps({"suite": "s", "case": "c", "result": "pass", "extra": {"x": ["ab"] * 100_000}})):
        body = refused(master.request("POST", "/api/v0.2/bundles/", header + f'results:\n  "1":\n  - {item}\n'))
        assert "limit max_nodes" in body["error"] and len(body["error"]) < 500, body
    still_serves(master)


def test_an_alias_bomb_in_a_device_dictionary_is_refused(master: MasterProcess) -> None:
    dictionary = ("{% extends 'qemu.jinja2' %}\n{% set arch = 'amd64' %}\n{% block vland %}\nbomb:\n"
                  + alias_bomb(indent="  ") + "{% endblock vland %}\n")
    body = refused(master.request("PUT", "/api/v0.2/devices/qemu01/dictionary/", dictionary, user="admin"))
    assert "limit max_nodes" in body["error"], body
    assert "vland" not in master.request("GET", "/api/v0.2/devices/qemu01/dictionary/").json()["dictionary"]
    still_serves(master)


def test_an_alias_bomb_in_a_workers_env_is_refused_with_its_path(master: MasterProcess) -> None:
    body = refused(master.request("PUT", "/api/v0.2/workers/w1/env/", "overrides:\n" + alias_bomb(indent="  "),
                                  user="admin"))
    assert body["faults"][0]["path"].startswith("overrides.") and "limit max_nodes" in body["error"], body
    still_serves(master)


def test_an_alias_to_its_own_ancestor_is_refused(master: MasterProcess) -> None:
    got = fault(refused(master.submit(job_with("metadata:\n  loop: &loop [1, *loop]\n"))))
    assert got["path"] == "metadata.loop" and "nests without end" in got["message"], got
    still_serves(master)


def test_a_json_body_nested_100000_deep_is_a_400(master: MasterProcess) -> None:
    body = '{"hostname": "qemu09", "device_type": ' + "[" * 100_000 + "]" * 100_000 + "}"
    got = refused(master.request("POST", "/api/v0.2/devices/", body, user="admin",
                                 content_type="application/json"))
    assert "limit max_depth" in got["error"], got
    still_serves(master)


def test_a_deeply_nested_xml_rpc_argument_is_a_fault_400(master: MasterProcess) -> None:
    depth = 20_000
    body = ("<?xml version='1.0'?><methodCall><methodName>scheduler.jobs.submit</methodName><params><param>"
            + "<value><array><data>" * depth + "</data></array></value>" * depth + "</param></params></methodCall>")
    result, answer = master.rpc(body.encode())
    assert answer.growth_kb < BUDGET_KB and answer.seconds < BUDGET_SECONDS, answer
    assert result.faultCode == 400 and "limit max_depth" in result.faultString, result
    result, answer = master.rpc(master.rpc_body("scheduler.jobs.submit", [[["a list, not a job"]]]))
    assert result.faultCode == 400 and "argument definition" in result.faultString, result
    still_serves(master)


def test_integers_of_5000_digits_are_a_400_naming_their_field(master: MasterProcess) -> None:
    digits = "9" * 5000
    got = fault(refused(master.submit(job_text().replace("priority: medium", f"priority: {digits}"))))
    assert got["path"] == "priority" and "limit max_int_digits" in got["message"] and got["line"] == 9, got
    body = refused(master.request("POST", "/api/v0.2/workers/", f'{{"hostname": "w9", "job_limit": {digits}}}',
                                  user="admin", content_type="application/json"))
    assert "limit max_int_digits" in body["error"], body
    body = refused(master.request("PUT", "/api/v0.2/workers/w1/", '{"job_limit": "99999999999999999"}',
                                  user="admin", content_type="application/json"))
    assert body["faults"][0]["path"] == "job_limit" and "from 0 to 2147483647" in body["error"], body
    refused(master.request("GET", f"/api/v0.2/jobs/?offset={digits}"))
    refused(master.request("GET", "/api/v0.2/jobs/?offset=99999999999999999999"))
    for value in (f"<int>{digits}</int>", f"<i8>{'9' * 30}</i8>"):
        body = ("<?xml version='1.0'?><methodCall><methodName>scheduler.workers.update</methodName><params>"
                f"<param><value><string>w1</string></value></param><param><value><nil/></value></param>"
                f"<param><value><nil/></value></param><param><value>{value}</value></param></params></methodCall>")
        result, answer = master.rpc(body.encode(), user="admin")
        assert result.faultCode == 400 and answer.growth_kb < BUDGET_KB, result
    body = ("<?xml version='1.0'?><methodCall><methodName>scheduler.jobs.list</methodName><params>"
            f"<param><value><nil/></value></param><param><value><nil/></value></param>"
            f"<param><value><i8>{2**62}</i8></value></param></params></methodCall>")
    result, _ = master.rpc(body.encode())
    assert result.faultCode == 400 and "offset" in result.faultString, result
    assert master.request("GET", "/api/v0.2/workers/w1/").json()["job_limit"] == 0
    still_serves(master)


def test_a_timeout_of_10_to_the_30_minutes_is_refused_with_its_path(master: MasterProcess) -> None:
    text = job_text().replace("  job:\n    minutes: 5", f"  job:\n    minutes: {10**30}")
    got = fault(refused(master.submit(text)))
    assert got["path"] == "timeouts.job" and "limit max_timeout" in got["message"] and got["line"] in (4, 5), got
    text = job_text().replace("    media: tmpfs", "    media: tmpfs\n    timeout:\n      days: 31")
    got = fault(refused(master.submit(text)))
    assert got["path"] == "actions[1].boot.timeout" and "limit max_timeout" in got["message"], got
    still_serves(master)


def test_an_over_long_string_is_refused_with_its_path(master: MasterProcess) -> None:
    got = fault(refused(master.submit(job_with(f"metadata:\n  notes: {'x' * 70_000}\n"))))
    assert got["path"] == "metadata.notes" and "limit max_string" in got["message"], got
    still_serves(master)


def test_too_many_actions_are_refused(master: MasterProcess) -> None:
    boot = "- boot:\n    method: qemu\n    media: tmpfs\n    prompts: ['/ # ']\n"
    got = fault(refused(master.submit(job_text() + boot * 100)))
    assert got["path"] == "actions" and "limit max_actions" in got["message"], got
    still_serves(master)


def test_a_document_of_too_many_values_is_refused_while_it_is_composed(master: MasterProcess) -> None:
    text = job_with("metadata:\n  many: [" + ", ".join(["1"] * 50_000) + "]\n")
    got = fault(refused(master.submit(text)))
    assert got["path"].startswith("metadata.many[") and "limit max_nodes" in got["message"], got
    still_serves(master)


def test_a_valid_job_costs_the_master_a_small_constant_times_its_size(master: MasterProcess) -> None:
    steps = "".join(f"          - lava-test-case step-{n} --shell true\n" for n in range(400))
    text = job_text("large") + (
        "- test:\n    definitions:\n    - repository:\n        metadata:\n          format: Lava-Test Test "
        "Definition 1.0\n          name: large\n        run:\n          steps:\n" + steps
        + "      from: inline\n      name: large\n      path: inline/large.yaml\n")
    growth = [master.submit(text) for _ in range(3)]
    assert all(a.status == 201 for a in growth), growth[0].text
    # the first may fill caches (the pipeline's strategies): the next ones cost what a job costs
    assert min(a.growth_kb for a in growth) * 1024 < 100 * len(text), (len(text), [a.growth_kb for a in growth])


def test_limits_are_settings_of_the_master_and_its_validator_processes(tmp_path: Path) -> None:
    # max_actions is checked by the job schema, which only the validator processes run on a valid job
    proc = MasterProcess(tmp_path, None, "--limit", "max_aliases=2", "--limit", "max_actions=1", "--validators", "1")
    try:
        proc.start()
        got = fault(proc.submit(job_with("metadata:\n  a: &a x\n  b: [*a, *a, *a]\n")).json())
        assert "limit max_aliases" in got["message"], got
        got = fault(proc.submit(job_text()).json())
        assert got["path"] == "actions" and "at most 1 action blocks" in got["message"], got
    finally:
        proc.stop()


# ---- findings of the fuzz tests (tests/test_fuzz_submission.py), one regression test each ----

def test_a_control_character_in_a_job_is_refused_with_its_line(master: MasterProcess) -> None:
    got = fault(refused(master.submit(job_text().replace("job_name: master test", "job_name: a\x1fb"))))
    assert got["line"] == 2 and "control characters" in got["message"], got


def test_a_json_field_of_the_wrong_type_is_a_400_naming_it(master: MasterProcess) -> None:
    body = refused(master.request("PUT", "/api/v0.2/workers/w1/", '{"description": null, "health": false}',
                                  user="admin", content_type="application/json"))
    assert body["faults"][0]["path"] == "health" and "must be text" in body["error"], body
    body = refused(master.request("POST", "/api/v0.2/devices/", '{"hostname": ["qemu09"], "device_type": "qemu"}',
                                  user="admin", content_type="application/json"))
    assert body["faults"][0]["path"] == "hostname", body
    still_serves(master)


def test_a_test_definition_that_is_not_a_mapping_after_a_deploy_is_refused_with_its_path(
        master: MasterProcess) -> None:
    text = job_text() + "- test:\n    definitions:\n    - null\n"
    got = fault(refused(master.submit(text)))
    assert got["path"] == "actions[2].test.definitions[0]", got
    result, _ = master.rpc(master.rpc_body("scheduler.jobs.submit", text))
    assert result.faultCode == 400 and "actions[2].test.definitions[0]" in result.faultString, result
    still_serves(master)


def test_an_xml_rpc_fault_echoing_a_control_character_is_well_formed_xml(master: MasterProcess) -> None:
    text = job_text().replace("  arch: amd64", '  arch: amd64\n  "\\x1F": null')
    result, answer = master.rpc(master.rpc_body("scheduler.jobs.submit", text))
    assert result.faultCode == 400 and "\ufffd" in result.faultString, result


def test_a_test_definition_from_a_list_after_a_deploy_is_refused_with_its_path(master: MasterProcess) -> None:
    text = job_text() + ("- test:\n    definitions:\n    - repository: http://example.org/t.git\n      from: []\n"
                         "      path: t.yaml\n      name: t\n")
    got = fault(refused(master.submit(text)))
    assert got["path"] == "actions[2].test.definitions[0]", got


def test_a_job_id_beyond_what_a_database_holds_is_a_404(master: MasterProcess) -> None:
    for job_id in ("99999999999999999999", "9" * 5000, "%C2%B2"):  # the last: "²", a digit int() refuses
        answer = master.request("GET", f"/api/v0.2/jobs/{job_id}/")
        assert answer.status == 404 and answer.growth_kb < BUDGET_KB, answer.text[:300]
    body = (f"<?xml version='1.0'?><methodCall><methodName>scheduler.jobs.show</methodName><params>"
            f"<param><value><i8>{2**62}</i8></value></param></params></methodCall>")
    result, _ = master.rpc(body.encode())
    assert result.faultCode == 404, result
    still_serves(master)


def test_an_image_url_that_urllib_cannot_split_is_refused_with_its_path(master: MasterProcess) -> None:
    got = fault(refused(master.submit(job_text(images="[[x]]"))))
    assert got["path"] == "actions[0].deploy" and "not a valid URL" in got["message"], got


def test_a_deploy_whose_images_are_a_list_is_refused_with_its_path_not_read_by_the_boot(
        master: MasterProcess) -> None:
    text = job_text().replace(f"    images:\n      rootfs:\n        url: http://{LOCAL_IMAGES}/rootfs.img\n"
                              "        image_arg: -drive format=raw,file={rootfs}\n", "    images:\n    - null\n")
    assert "- null" in text
    got = fault(refused(master.submit(text)))
    assert got["path"] == "actions[0].deploy.images", got


def test_a_boot_of_an_unknown_method_with_odd_prompts_is_refused_by_its_method_only(master: MasterProcess) -> None:
    text = job_text() + "- boot:\n    method: nope\n    prompts: 5\n- boot:\n    method: qemu\n    media: tmpfs\n"
    got = refused(master.submit(text))["faults"]
    assert [f["path"] for f in got] == ["actions[2].boot.method"], got
