"""The lab-now page and the device pages' health history: why a queued job waits (a pure function),
the model the master hands sitegen, and the master republishing the page within a second of a change
made through the API (the browser side is in test_site_browser.py)."""

from __future__ import annotations

import time

import pytest
import yaml
from support.master import job_text, stop_server

from master import inventory, jobs
from master.client import Client
from master.db import connection
from master.labnow import lab_model, why_waiting
from master.publish import LabPublisher
from master.scheduler import Scheduler
from master.server import MasterServer
from master.users import SYSTEM, authenticate
from sitegen import build_site
from sitegen.fixtures import make_store

ONLINE = {"w1": {"state": "Online", "health": "Active"}, "w2": {"state": "Offline", "health": "Active"}}


def device(name: str, health: str = "Good", state: str = "Idle", worker: str = "w1", tags=(), type_="qemu"):
    return {"hostname": name, "device_type": type_, "health": health, "state": state, "worker": worker,
            "tags": list(tags)}


@pytest.mark.parametrize(
    ("job", "devices", "why"),
    [
        ({"device_type": "bbb"}, [device("q1")], "no device of type bbb"),
        ({"device_type": "qemu", "tags": ["usb"]}, [device("q1")], "no device of type qemu has the tags usb"),
        ({"device_type": "qemu"}, [device("q1", "Maintenance"), device("q2", "Bad"), device("q3", worker="w2")],
         "no usable devices of type qemu: 1 Bad, 1 Maintenance, 1 worker offline"),
        ({"device_type": "qemu"}, [device("q1", state="Running"), device("q2", "Retired")],
         "all 1 usable devices of type qemu are busy"),
        ({"device_type": "qemu", "device": "q2", "health_check": True}, [device("q1"), device("q2", "Unknown",
                                                                                            worker="w2")],
         "no usable device q2: 1 worker offline"),
        ({"device_type": "qemu"}, [device("q1")], "an idle device is free"),
    ],
)
def test_why_a_queued_job_waits_is_said_in_the_labs_words(job, devices, why) -> None:
    assert why_waiting(job, devices, ONLINE).startswith(why)


def test_a_device_of_a_checked_type_waits_for_its_health_check() -> None:
    assert why_waiting({"device_type": "qemu"}, [device("q1", "Unknown")], ONLINE, {"qemu"}) == (
        "no usable devices of type qemu: 1 health check pending")


def test_lab_model_names_queue_running_jobs_and_every_health_transition(lab) -> None:
    alice = authenticate(f"Token {lab.tokens['alice']}")
    with connection():
        inventory.update_device(SYSTEM, "qemu02", health="Maintenance")
        first = jobs.submit_job(job_text("runs"), alice)[0]
        [(claimed, device_name)] = Scheduler().loop_once()
        assert claimed == first and device_name == "qemu01"
        queued = jobs.submit_job(job_text("waits"), alice)[0]
        jobs.submit_job(job_text("hidden", visibility="personal"), alice)
        jobs.job_started(first)
        model = lab_model()
        assert [j["id"] for j in model["running"]] == [first]
        assert model["running"][0]["device"] == "qemu01" and model["running"][0]["worker"] == "w1"
        assert [j["id"] for j in model["queued"]] == [queued]  # the personal job is only counted
        assert model["queued_total"] == 2 and model["queued_private"] == 1
        assert model["queued"][0]["why"] == "all 1 usable devices of type qemu are busy (and 1 Maintenance)"
        # an infrastructure error puts the device to Unknown: a transition naming the job
        jobs.job_finished(first, "Incomplete", "tftp timed out", "Infrastructure")
        devices = {d["hostname"]: d for d in lab_model()["devices"]}
    [change] = devices["qemu01"]["transitions"]
    assert (change["old"], change["new"], change["job"]) == ("Good", "Unknown", first)
    assert change["reason"] == f"job {first}: Infrastructure error"
    [change] = devices["qemu02"]["transitions"]
    assert (change["old"], change["new"], change["reason"]) == ("Good", "Maintenance", "set by pumice-master")
    # lab.yaml (what a full site build reads) carries them too
    lab_yaml = yaml.safe_load((lab.instance.store.root / "lab.yaml").read_text())
    assert [t["new"] for d in lab_yaml["devices"] for t in d["transitions"]] == ["Unknown", "Maintenance"]


def test_every_device_type_and_worker_has_a_page_even_without_jobs(lab, tmp_path) -> None:
    with connection():
        inventory.add_worker(SYSTEM, "w-idle")
        inventory.add_device(SYSTEM, "spare01", "qemu", worker="w-idle", tags=[], health="Bad")
        LabPublisher().publish_once()
    site = lab.instance.site_dir
    for page in ("lab/index.html", "devices/spare01.html", "devices/qemu01.html", "workers/w-idle.html",
                 "device-types/qemu.html", "devices/index.html", "data/lab.json", "lab/now.txt"):
        assert (site / page).is_file(), page
    text = (site / "lab/index.html").read_text()
    assert 'data-device="spare01"' in text and "dev-bad" in text and "dev-offline" in text  # w-idle is offline
    device_page = (site / "devices/spare01.html").read_text()
    assert "No health check has run on this device." in device_page
    # a full build keeps the master's lab model and its page
    build_site(lab.instance.store.root, site, processes=1)
    assert 'data-device="spare01"' in (site / "lab/index.html").read_text()
    assert (site / "data/lab.json").is_file()


def test_a_site_built_without_a_master_has_a_lab_page_from_lab_yaml(tmp_path) -> None:
    store = make_store(tmp_path / "store", 3, cases=2, log_lines=20)
    build_site(store.root, tmp_path / "site", processes=1)
    text = (tmp_path / "site/lab/index.html").read_text()
    assert "Lab now" in text and "Nothing is queued." in text


def test_the_master_republishes_lab_now_within_a_second_of_an_api_change(lab) -> None:
    master = MasterServer("127.0.0.1", 0, threads=4, scheduler_interval=3600, validators=0).start()
    admin = Client(master.url, lab.tokens["admin"])
    page = lab.instance.site_dir / "lab/index.html"
    try:
        deadline = time.monotonic() + 20
        while not page.exists() and time.monotonic() < deadline:  # the first publish, at start
            time.sleep(0.02)
        assert page.exists() and 'data-device="qemu02"' not in page.read_text()
        start = time.monotonic()
        admin.call("PATCH", "/devices/qemu02/", json_body={"health": "Maintenance"})
        while 'data-device="qemu02"' not in page.read_text():
            assert time.monotonic() - start < 1.0, "lab/index.html not republished within a second"
            time.sleep(0.01)
        # the device's own page shows the transition too
        device_page = lab.instance.site_dir / "devices/qemu02.html"
        deadline = time.monotonic() + 5
        while "set by admin" not in device_page.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        admin.close()
        stop_server(master)
