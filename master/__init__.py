"""The Pumice master: keeps the lab's records, schedules jobs on devices, serves the REST API.

Modules, by what they do:

- ``db``, ``models``, ``migrations``: the database (SQLite WAL or PostgreSQL) and its schema.
- ``states``: the state machine of jobs, devices and workers (every legal transition, what a
  cancel does, what a finished job means for its device).
- ``jobs``, ``inventory``, ``users``, ``certificates``, ``bundles``: the service layer, plain functions
  over the models that every front door calls (REST, LAVA XML-RPC, the CLI, the ZeroMQ broker);
  ``errors`` are its refusals.
- ``validation``: job definitions checked at submission with the agent's own pipeline.
- ``scheduler``: the pure ``assign()`` and the loop that claims with conditional UPDATEs.
- ``events``: in-process notifications that wake the scheduler (and the broker).
- ``broker``: the ZeroMQ side (sockets, sessions, timers), with ``start`` (the START message),
  ``joblogs`` (logs and results as they stream in) and ``zap`` (who may connect).
- ``publish``: the job's pages on the site (sitegen), the one way the master calls it.
- ``api``, ``xmlrpc``, ``server``: REST and LAVA XML-RPC on waitress; ``cli`` (``pumice-master``),
  ``client`` (``pumice``).
- ``instance``: the data directory, artifact store (:mod:`results.store`) and device-type renderer
  (``devicetypes``) the service layer uses.
"""
