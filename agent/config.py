"""The settings of ``pumice-agent``: its command line, then the environment, then its config file
(``/etc/pumice/agent.yaml``), then the defaults (see :mod:`agent.daemon` for the names)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.enrolment import KeyFiles
from agent.transport import CertificateError, CurveKeys

DEFAULT_CONFIG = "/etc/pumice/agent.yaml"
DEFAULT_SPOOL = "/var/lib/pumice-agent"


@dataclass
class AgentConfig:
    """Everything ``pumice-agent`` needs to run."""

    master: str
    hostname: str
    spool: Path
    logger: str | None = None
    #: the master's REST API (http://HOST:8000), for the enrolment
    url: str | None = None
    #: a join token to enrol with before connecting
    join: str | None = None
    #: the master's public key and this worker's key pair (default: SPOOL/keys, from the enrolment)
    master_cert: str | None = None
    worker_cert: str | None = None
    #: connect without CURVE (the master must run --insecure-plain too)
    insecure_plain: bool = False
    #: seconds between SIGTERM and SIGKILL when a job is canceled
    cancel_grace: float = 60.0
    #: finished job directories kept in the spool (the oldest are removed)
    keep_jobs: int = 20
    #: heartbeat interval until the master's WELCOME sets it
    heartbeat: float = 5.0
    #: the command that runs one job (``pumice-run``)
    runner: list[str] = field(default_factory=lambda: [sys.executable, "-m", "agent.run"])

    def key_files(self) -> KeyFiles:
        """Where the enrolment keeps this worker's keys."""
        return KeyFiles(self.spool / "keys", self.hostname)

    def curve_keys(self) -> CurveKeys | None:
        """The CURVE keys to connect with (None: --insecure-plain); CertificateError, saying how to
        enrol, when there are none."""
        if self.insecure_plain:
            return None
        keys = self.key_files()
        master_cert, worker_cert = self.master_cert or keys.master_cert, self.worker_cert or keys.worker_cert
        missing = [str(path) for path in (master_cert, worker_cert) if not os.path.exists(path)]
        if missing:
            raise CertificateError(
                f"no CURVE keys for worker {self.hostname} ({', '.join(missing)} missing): enrol this worker "
                "with 'pumice-agent --join TOKEN --url http://MASTER:8000' (an admin prints TOKEN with "
                f"'pumice-master workers add {self.hostname}' or 'workers rotate {self.hostname}'), or give "
                "--master-cert and --worker-cert; --insecure-plain connects without authentication, to a "
                "master that runs --insecure-plain")
        return CurveKeys.load(master_cert, worker_cert)


_SETTINGS = {
    # name: (environment variables, type)
    "master": (("PUMICE_MASTER_URL", "MASTER_URL"), str),
    "logger": (("PUMICE_LOGGER_URL", "LOGGER_URL"), str),
    "hostname": (("PUMICE_HOSTNAME",), str),
    "spool": (("PUMICE_SPOOL",), str),
    "url": (("PUMICE_URL",), str),
    "join": (("PUMICE_JOIN_TOKEN",), str),
    "master_cert": (("PUMICE_MASTER_CERT",), str),
    "worker_cert": (("PUMICE_WORKER_CERT",), str),
    "insecure_plain": (("PUMICE_INSECURE_PLAIN",), bool),
    # CURVE is the default now: still read (and checked) so that old files and scripts work
    "encrypt": (("PUMICE_ENCRYPT",), bool),
    "cancel_grace": (("PUMICE_CANCEL_GRACE",), float),
    "keep_jobs": (("PUMICE_KEEP_JOBS",), int),
}


def _convert(name: str, value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise SystemExit(f"pumice-agent: {where}: {name} must be true or false, not {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise SystemExit(f"pumice-agent: {where}: {name} must be a {kind.__name__}, not {value!r}") from None


def read_config_file(path: str) -> dict[str, Any]:
    """The settings of an agent config file (YAML mapping); unknown keys are refused."""
    from results.bounded import load_mapping_file  # only when there is a file: the idle daemon stays small

    try:
        data = load_mapping_file(path, "config file")
    except ValueError as exc:
        raise SystemExit(f"pumice-agent: {exc}") from None
    unknown = sorted(set(map(str, data)) - set(_SETTINGS))
    if unknown:
        raise SystemExit(f"pumice-agent: {path}: unknown setting(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(_SETTINGS)}")
    return {key: _convert(key, value, _SETTINGS[key][1], path)
            for key, value in data.items() if value is not None}


def build_config(options: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> AgentConfig:
    """Command line, then environment, then config file, then defaults."""
    config_path = options.config or environ.get("PUMICE_AGENT_CONFIG")
    from_file: dict[str, Any] = {}
    if config_path or os.path.exists(DEFAULT_CONFIG):
        from_file = read_config_file(config_path or DEFAULT_CONFIG)
    values: dict[str, Any] = {}
    for name, (variables, kind) in _SETTINGS.items():
        value = getattr(options, name, None)
        if value is None:
            for variable in variables:
                if environ.get(variable):
                    value = _convert(name, environ[variable], kind, f"${variable}")
                    break
        if value is None:
            value = from_file.get(name)
        if value is not None:
            values[name] = value
    if not values.get("master"):
        raise SystemExit("pumice-agent: no master: give --master tcp://HOST:5556, set MASTER_URL, or set "
                         f"'master:' in {config_path or DEFAULT_CONFIG}")
    values.setdefault("hostname", socket.gethostname())
    values["spool"] = Path(values.get("spool") or DEFAULT_SPOOL)
    encrypt = values.pop("encrypt", None)
    if values.get("insecure_plain") and (encrypt or values.get("join")):
        other = "--join" if values.get("join") else "--encrypt"
        raise SystemExit(f"pumice-agent: --insecure-plain contradicts {other}")
    if values.get("join") and not values.get("url"):
        raise SystemExit("pumice-agent: --join needs --url, the master's REST API (e.g. http://master:8000), "
                         "where the agent checks the master's key and registers its own")
    config = AgentConfig(**values)
    if options.heartbeat:
        config.heartbeat = options.heartbeat
    return config
