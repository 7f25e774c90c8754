"""Records shared by the agent, the master and sitegen (stdlib + pyyaml only, cheap to import).

- ``results.log``: log records, one LAVA ``output.yaml`` line each
- ``results.logfile``: an append-only log file with a line index
- ``results.record``: result records and the ``lava`` suite conventions
- ``results.signals``: the console signal parser and the test run parser
- ``results.bundle``: the results bundle (YAML keyed by level)
- ``results.export``: JUnit XML, TAP 13 and CSV
"""
