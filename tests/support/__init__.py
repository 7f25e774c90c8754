"""Helpers of the tests (no tests, no fixtures: the fixtures are in ``tests/conftest.py``).

- :mod:`support.master`: a master instance with a small lab in a temporary data directory
  (``build_lab``), the test job (``job_text``), the database backends the ``database_url``
  fixture runs on.
- :mod:`support.broker`: a broker in a thread with hand-driven agents (``FakeAgent``,
  ``make_broker_lab``), a master and its agents as processes (``ProcessLab``), ``wait_for``.
- :mod:`support.hostile`: a real master as a process, hostile documents and their budgets.
"""
