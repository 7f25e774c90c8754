"""Drive a real SQUAD (run in SQUAD's own virtualenv): its LAVA backend against a Pumice master.

    python squad_driver.py MASTER_URL USER TOKEN JOB_FILE

SQUAD's settings come from the environment the test sets (its own SQLite database and storage
directory; no Celery broker, so its tasks run eagerly). Prints one JSON line per step:
``{"job_id": N}`` once SQUAD submitted the job and its listener is subscribed, then
``{"status", "tests", "metrics", "log", "failure"}`` once SQUAD fetched the finished job.
"""

import json
import os
import sys
import threading
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "squad.settings")

# SQUAD's web frontend fetches its JavaScript libraries with wget when it is imported (the jinja2
# setup imports it); the test machine has no route to those sites and the LAVA backend needs none of
# it: that download step alone is replaced (nothing of the LAVA backend or the listener is touched)
import types  # noqa: E402

sys.modules["squad.frontend.setup"] = types.SimpleNamespace(setup_staticfiles=lambda: None)

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402

call_command("migrate", verbosity=0)

from squad.ci.models import Backend, TestJob  # noqa: E402
from squad.core.models import Group  # noqa: E402

url, user, token, job_file = sys.argv[1:5]
backend = Backend.objects.create(name="pumice", url=f"{url}/RPC2", username=user, token=token,
                                 implementation_type="lava")
project = Group.objects.create(slug="lab").projects.create(slug="kernel")
build = project.builds.create(version="v1")
with open(job_file) as handle:
    definition = handle.read()
job = TestJob.objects.create(backend=backend, target=project, target_build=build, environment="qemu",
                             definition=definition)
# the listener first (a SUB socket misses what is published before it joined), then the job
threading.Thread(target=backend.get_implementation().listen, daemon=True).start()
time.sleep(3)
backend.submit(job)
print(json.dumps({"job_id": int(job.job_id)}), flush=True)

deadline = time.monotonic() + float(os.environ.get("SQUAD_DRIVER_TIMEOUT", "120"))
while time.monotonic() < deadline:
    job.refresh_from_db()
    if job.fetched and job.job_status not in (None, "Fetching"):
        break
    time.sleep(0.2)
job.refresh_from_db()
testrun = job.testrun
print(json.dumps({
    "status": job.job_status, "fetched": job.fetched, "failure": job.failure,
    "tests": {t.full_name: t.status for t in testrun.tests.all()} if testrun else None,
    "metrics": {m.full_name: [m.result, m.unit] for m in testrun.metrics.all()} if testrun else None,
    "log": testrun.log_file if testrun else None,
    "started_at": str(job.started_at), "ended_at": str(job.ended_at),
}), flush=True)
