"""``pumice-master``: run the master and manage the lab from the master's host.

    pumice-master serve [--http 127.0.0.1:8000]
    pumice-master db migrate
    pumice-master workers add|update|list|rotate|revoke
    pumice-master devices add|update|list
    pumice-master device-types add|list
    pumice-master device-dictionary --hostname X --import F | --export | --review
    pumice-master tokens create --user U [--admin]
    pumice-master remote-tokens add|delete|list --user U [NAME [TOKEN]]

Every command takes ``--data DIR`` (default ``$PUMICE_DATA`` or ``/var/lib/pumice``) and
``--database URL`` (default ``$PUMICE_DATABASE``, else SQLite in the data directory). Commands act
as the local admin through the same service layer as the REST API.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
import zmq

from agent.transport import CertificateError
from master import certificates, inventory
from master.broker import DEFAULT_ENDPOINT, DEFAULT_HEARTBEAT, Broker
from master.errors import ServiceError
from master.instance import DEFAULT_MAX_BODY, default_data_dir, open_instance
from master.notify import NotifySettings, configure
from master.states import DEFAULT_HEALTH_DENOMINATOR, DEFAULT_HEALTH_FREQUENCY, DeviceHealth
from master.urlpolicy import AddressPolicy, parse_networks
from master.users import SYSTEM
from results.bounded import Limits

log = logging.getLogger("pumice.cli")


def _read(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SystemExit(f"pumice-master: cannot read {path}: {exc.strerror}") from None


def _tags(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [tag.strip() for tag in value.split(",") if tag.strip()]


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned table (what an admin reads in a terminal)."""
    cells = [[", ".join(map(str, v)) if isinstance(v, list) else ("" if v is None else str(v))
              for v in (row.get(c) for c in columns)] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def _show(rows: list[dict[str, Any]], columns: Sequence[str], as_yaml: bool) -> None:
    sys.stdout.write(yaml.safe_dump(rows, sort_keys=False) if as_yaml else _table(rows, columns))


# ---- commands ----

def cmd_serve(args: argparse.Namespace) -> int:
    from master.server import MasterServer

    host, _, port = args.http.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"pumice-master: bad --http {args.http!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    try:
        configure(_notify_settings(args))
    except ValueError as exc:
        raise SystemExit(f"pumice-master: {exc}") from None
    broker = _bound_broker(args)
    server = MasterServer(host, int(port), threads=args.threads, scheduler_interval=args.scheduler_interval,
                          validators=args.validators, broker=broker, event_socket=args.event_socket)
    print(f"pumice master on {server.url} (data {args.data})", flush=True)
    server.serve_forever()
    return 0


# ---- the broker's options of pumice-master serve ----

def _broker_arguments(parser: argparse.ArgumentParser) -> None:
    """The broker's options of ``pumice-master serve``."""
    group = parser.add_argument_group("broker (the ZeroMQ endpoint of pumice-agent workers)")
    group.add_argument("--broker", metavar="ENDPOINT",
                       help=f"run the broker on this ZeroMQ endpoint, e.g. {DEFAULT_ENDPOINT}")
    group.add_argument("--broker-logs", metavar="ENDPOINT",
                       help="a second endpoint for job logs (agents' --logger), e.g. tcp://*:5555")
    group.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT,
                       help="seconds between heartbeats; a worker is offline after 3 silent ones "
                            "(default %(default)s)")
    group.add_argument("--insecure-plain", action="store_true",
                       help="do NOT authenticate the workers (no CURVE): anyone who reaches the broker can "
                            "take a worker's jobs; for a closed test network only, logged as a warning")
    # CURVE is the default now: the old switch is accepted and changes nothing
    group.add_argument("--encrypt", action="store_true", help=argparse.SUPPRESS)
    # the key directory of an older release: its keys are taken into the database at start
    group.add_argument("--workers-certs", metavar="DIR", help=argparse.SUPPRESS)
    group.add_argument("--master-cert", metavar="FILE",
                       help="the master's key pair (default DATA/certificates/master.key_secret, "
                            "created if missing)")


def _notify_arguments(parser: argparse.ArgumentParser) -> None:
    """``serve``'s notification options."""
    parser.add_argument("--notify-allow", action="append", default=[], metavar="CIDR",
                        help="let callbacks reach these addresses although they are loopback, link-local or "
                             "the master's own (repeatable), e.g. 127.0.0.1 for a receiver on this host")
    parser.add_argument("--notify-deny", action="append", default=[], metavar="CIDR",
                        help="refuse callbacks to these addresses too (repeatable), e.g. 10.0.0.0/8")
    parser.add_argument("--callback-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long one callback attempt may take (default %(default)s, as LAVA)")
    parser.add_argument("--notify-retry", type=float, default=24.0, metavar="HOURS",
                        help="retry a failed notification for this long (default %(default)s h)")
    parser.add_argument("--notify-max-log", type=int, default=16 << 20, metavar="BYTES",
                        help="the most of a job's log one callback sends (default %(default)s)")
    parser.add_argument("--notify-senders", type=int, default=8, metavar="N",
                        help="notifications delivered at once (default %(default)s)")
    parser.add_argument("--notify-hold", action="store_true",
                        help="queue notifications but send none (they wait in the outbox until a master "
                             "runs without this flag)")
    parser.add_argument("--smtp", default=os.environ.get("PUMICE_SMTP", ""), metavar="HOST[:PORT]",
                        help="the SMTP server for notification emails (default $PUMICE_SMTP; none: no email)")
    parser.add_argument("--smtp-from", default="pumice@localhost", help="the sender of notification emails")
    parser.add_argument("--smtp-starttls", action="store_true", help="STARTTLS before sending")
    parser.add_argument("--smtp-user", default="", help="SMTP login (its password in $PUMICE_SMTP_PASSWORD)")
    parser.add_argument("--email-rate", type=int, default=30, metavar="N",
                        help="notification emails sent per minute at most (default %(default)s)")


def _notify_settings(args: argparse.Namespace) -> NotifySettings:
    """The settings of ``serve``'s options (ValueError naming a bad one)."""
    host, _, port = (args.smtp or "").partition(":")
    if port and not port.isdigit():
        raise ValueError(f"bad --smtp {args.smtp!r}: expected HOST or HOST:PORT")
    for name in ("callback_timeout", "notify_retry", "notify_max_log", "notify_senders", "email_rate"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    return NotifySettings(
        policy=AddressPolicy(allow=parse_networks(args.notify_allow), deny=parse_networks(args.notify_deny)),
        timeout=args.callback_timeout, retry_period=args.notify_retry * 3600, max_log_bytes=args.notify_max_log,
        senders=args.notify_senders, deliver=not args.notify_hold, smtp_host=host, smtp_port=int(port or 25),
        smtp_from=args.smtp_from, smtp_starttls=args.smtp_starttls, smtp_user=args.smtp_user,
        smtp_password=os.environ.get("PUMICE_SMTP_PASSWORD", ""), email_rate=args.email_rate)


def _event_arguments(parser: argparse.ArgumentParser) -> None:
    """``serve``'s event stream option (master.publisher)."""
    parser.add_argument("--event-socket", default=os.environ.get("PUMICE_EVENT_SOCKET", ""), metavar="ENDPOINT",
                        help="publish LAVA's job/device/worker events (lava-publisher's format, no secrets, "
                             "no authentication) on this ZeroMQ PUB endpoint, e.g. tcp://*:5500 (LAVA's "
                             "default; default: $PUMICE_EVENT_SOCKET, else none)")


def _bound_broker(args: argparse.Namespace) -> Broker | None:
    """The broker of ``--broker``, bound (after the instance is open); the server starts it."""
    endpoint = getattr(args, "broker", None)
    if not endpoint:
        return None
    if args.insecure_plain and args.encrypt:
        raise SystemExit("pumice-master: --insecure-plain and --encrypt contradict each other")
    try:
        broker = Broker(endpoint, log_endpoint=args.broker_logs, heartbeat=args.heartbeat,
                        encrypt=not args.insecure_plain,
                        master_cert=Path(args.master_cert) if args.master_cert else None,
                        old_keys=Path(args.workers_certs) if args.workers_certs else None)
        broker.bind()
    except zmq.ZMQError as exc:
        raise SystemExit(f"pumice-master: cannot bind the broker on {endpoint}: {exc}") from None
    except CertificateError as exc:
        raise SystemExit(f"pumice-master: {exc}") from None
    print(f"pumice broker on {', '.join(broker.bound)} "
          f"({'CURVE' if broker.encrypt else 'WITHOUT worker authentication: --insecure-plain'})", flush=True)
    return broker


def cmd_db_migrate(args: argparse.Namespace) -> int:
    from master.migrations import LATEST, current_version, migrate

    applied = migrate()
    for number, name in applied:
        print(f"applied migration {number}: {name}")
    print(f"schema version {current_version()} (latest {LATEST})")
    return 0


def _print_join_token(issued: dict[str, Any]) -> None:
    """The join token and the command that uses it (the token is shown here only)."""
    hostname = issued["hostname"]
    print(f"join token: {issued['token']}")
    print(f"  single use, valid until {issued['expires']}; master key {issued['master_fingerprint']}")
    print(f"  on {hostname}: pumice-agent --join TOKEN --url http://MASTER:8000 --master tcp://MASTER:5556 "
          f"--hostname {hostname}")


def cmd_workers_add(args: argparse.Namespace) -> int:
    record = inventory.add_worker(SYSTEM, args.hostname, description=args.description, disabled=args.disable,
                            job_limit=args.job_limit)
    print(f"worker {record['hostname']} added ({record['health']})")
    if not args.no_token:
        _print_join_token(certificates.issue_join_token(SYSTEM, args.hostname, args.token_lifetime))
    return 0


def cmd_workers_rotate(args: argparse.Namespace) -> int:
    issued = certificates.issue_join_token(SYSTEM, args.hostname, args.token_lifetime)
    print(f"worker {args.hostname}: new join token; "
          + ("its current key stays valid until a key is enrolled with it" if issued["has_key"]
             else "it has no key: it connects once enrolled"))
    _print_join_token(issued)
    return 0


def cmd_workers_revoke(args: argparse.Namespace) -> int:
    done = certificates.revoke_worker_key(SYSTEM, args.hostname)
    print(f"worker {args.hostname}: " + ("key revoked" if done["revoked"] else "it had no key")
          + (f", {done['join_tokens_voided']} unused join token(s) voided" if done["join_tokens_voided"] else "")
          + f"; it cannot connect until it enrols again ('pumice-master workers rotate {args.hostname}')")
    return 0


def cmd_workers_update(args: argparse.Namespace) -> int:
    record = inventory.update_worker(SYSTEM, args.hostname, description=args.description, health=args.health,
                               job_limit=args.job_limit)
    print(f"worker {record['hostname']}: {record['health']}, job limit {record['job_limit'] or 'none'}")
    return 0


def cmd_workers_list(args: argparse.Namespace) -> int:
    _show(inventory.list_workers(), ("hostname", "state", "health", "last_seen", "version", "job_limit",
                               "description"), args.yaml)
    return 0


def cmd_devices_add(args: argparse.Namespace) -> int:
    record = inventory.add_device(SYSTEM, args.hostname, args.device_type, worker=args.worker,
                            tags=_tags(args.tags), description=args.description,
                            health=args.health, dictionary=_read(args.dictionary) if args.dictionary else None)
    print(f"device {record['hostname']} added ({record['device_type']}, {record['health']})")
    return 0


def cmd_devices_update(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {"health": args.health, "tags": _tags(args.tags), "description": args.description,
                               "device_type": args.device_type}
    if args.no_worker:
        changes["worker"] = None
    elif args.worker:
        changes["worker"] = args.worker
    record = inventory.update_device(SYSTEM, args.hostname, **changes)
    print(f"device {record['hostname']}: {record['health']} on {record['worker'] or 'no worker'}, "
          f"tags: {', '.join(record['tags']) or 'none'}")
    return 0


def cmd_devices_list(args: argparse.Namespace) -> int:
    rows = inventory.list_devices(device_type=args.device_type, worker=args.worker, health=args.health)
    _show(rows, ("hostname", "device_type", "worker", "state", "health", "tags", "current_job"), args.yaml)
    return 0


def cmd_device_types_add(args: argparse.Namespace) -> int:
    record = inventory.add_device_type(
        SYSTEM, args.name, description=args.description,
        template=_read(args.template) if args.template else None,
        health_check=_read(args.health_check) if args.health_check else None,
        health_frequency=args.health_frequency, health_denominator=args.health_denominator)
    print(f"device type {record['name']} added (template from {record['template']}"
          f"{', with a health check' if record['health_check'] else ''})")
    return 0


def cmd_device_types_list(args: argparse.Namespace) -> int:
    _show(inventory.list_device_types(), ("name", "devices", "health_check", "health_frequency",
                                    "health_denominator", "template", "description"), args.yaml)
    return 0


def cmd_device_dictionary(args: argparse.Namespace) -> int:
    if args.import_file:
        inventory.set_dictionary(SYSTEM, args.hostname, _read(args.import_file))
        print(f"device dictionary of {args.hostname} updated")
    elif args.export:
        sys.stdout.write(inventory.get_dictionary(args.hostname))
    else:
        sys.stdout.write(inventory.device_yaml(args.hostname))
    return 0


def cmd_tokens_create(args: argparse.Namespace) -> int:
    from master.users import create_token

    print(create_token(args.user, admin=True if args.admin else None, description=args.description or ""))
    return 0


def cmd_remote_tokens(args: argparse.Namespace) -> int:
    from master import remote_tokens
    from master.users import get_user

    owner = get_user(args.user)
    if args.remote_command == "add":
        value = sys.stdin.readline().strip() if args.token == "-" else args.token
        remote_tokens.add_token(owner, args.name, value)
        print(f"remote token {args.name} of {args.user} set")
    elif args.remote_command == "delete":
        remote_tokens.delete_token(owner, args.name)
        print(f"remote token {args.name} of {args.user} deleted")
    else:  # the values are the user's secrets: the list shows names only
        for row in remote_tokens.list_tokens(owner):
            print(row["name"])
    return 0


# ---- parser ----

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=argparse.SUPPRESS,
                        help="data directory (default: $PUMICE_DATA or /var/lib/pumice)")
    common.add_argument("--database", default=argparse.SUPPRESS,
                        help="postgresql://... URL (default: $PUMICE_DATABASE, else DATA/pumice.db)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging")

    parser = argparse.ArgumentParser(prog="pumice-master", parents=[common],
                                     description="The Pumice master: REST API, scheduler and lab admin.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def leaf(group: Any, name: str, func: Callable[[argparse.Namespace], int], help_text: str):
        p = group.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = leaf(sub, "serve", cmd_serve, "run the REST API (waitress) and the scheduler")
    p.add_argument("--http", default="127.0.0.1:8000", help="listen address HOST:PORT (default %(default)s)")
    p.add_argument("--threads", type=int, default=8, help="HTTP worker threads (default %(default)s)")
    p.add_argument("--validators", type=int, default=None, metavar="N",
                   help="processes that check submitted pipelines (default: one per core, up to 4, none on "
                        "one core; 0: check in the HTTP threads)")
    p.add_argument("--instance", default=os.environ.get("PUMICE_INSTANCE", "pumice"),
                   help="this instance's name, written in results bundles")
    p.add_argument("--url", default=os.environ.get("PUMICE_URL", ""),
                   help="the public URL of the published site (job links in bundles)")
    p.add_argument("--max-body", type=int, default=None,
                   help=f"largest request body in bytes: the limit max_bytes (default {DEFAULT_MAX_BODY})")
    p.add_argument("--context-variable", action="append", default=[], metavar="NAME",
                   help="a context variable jobs may set besides LAVA's list (repeatable), as lava-server's "
                        "EXTRA_CONTEXT_VARIABLES")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="change a limit on what users send (repeatable), e.g. max_aliases=200; names: "
                        + ", ".join(Limits.names()) + " (README: Limits)")
    p.add_argument("--scheduler-interval", type=float, default=20.0,
                   help="seconds between safety-net scheduling passes (events trigger passes at once)")
    _broker_arguments(p)
    _notify_arguments(p)
    _event_arguments(p)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    leaf(db, "migrate", cmd_db_migrate, "apply pending schema migrations")

    workers = sub.add_parser("workers", help="lab boxes running pumice-agent").add_subparsers(
        dest="workers_command", required=True)
    p = leaf(workers, "add", cmd_workers_add, "add a worker")
    p.add_argument("hostname")
    p.add_argument("--description")
    p.add_argument("--disable", action="store_true", help="add it Retired (no jobs until updated)")
    p.add_argument("--job-limit", type=int, default=0, help="most jobs at once (0: no limit)")
    p.add_argument("--no-token", action="store_true", help="print no join token (e.g. for --insecure-plain)")
    lifetime = ("how long the join token is valid: seconds, or 30m, 1h, 2d "
                f"(default {certificates.JOIN_TOKEN_LIFETIME / 3600:.0f}h)")
    p.add_argument("--token-lifetime", metavar="DURATION", help=lifetime)
    p = leaf(workers, "rotate", cmd_workers_rotate,
             "print a new join token for the worker ('pumice-agent --join'); its current key stays valid "
             "until a new key is enrolled with the token, which replaces it")
    p.add_argument("hostname")
    p.add_argument("--token-lifetime", metavar="DURATION", help=lifetime)
    p = leaf(workers, "revoke", cmd_workers_revoke,
             "remove the worker's key at once (its connection is dropped within seconds) and void its "
             "unused join tokens")
    p.add_argument("hostname")
    p = leaf(workers, "update", cmd_workers_update, "change a worker")
    p.add_argument("hostname")
    p.add_argument("--description")
    p.add_argument("--health", help="Active, Maintenance or Retired")
    p.add_argument("--job-limit", type=int)
    p = leaf(workers, "list", cmd_workers_list, "list workers")
    p.add_argument("--yaml", action="store_true")

    devices = sub.add_parser("devices", help="boards").add_subparsers(dest="devices_command", required=True)
    p = leaf(devices, "add", cmd_devices_add, "add a device")
    p.add_argument("hostname")
    p.add_argument("--type", dest="device_type", required=True, help="its device type")
    p.add_argument("--worker", help="the worker it is attached to")
    p.add_argument("--tags", help="comma-separated tags")
    p.add_argument("--health", help=f"initial health (default {DeviceHealth.UNKNOWN})")
    p.add_argument("--description")
    p.add_argument("--dictionary", metavar="FILE", help="its device dictionary")
    p = leaf(devices, "update", cmd_devices_update, "change a device")
    p.add_argument("hostname")
    p.add_argument("--health", help="Good, Unknown, Looping, Bad, Maintenance or Retired")
    p.add_argument("--worker")
    p.add_argument("--no-worker", action="store_true", help="detach it from its worker")
    p.add_argument("--tags", help="comma-separated tags (replaces them; '' removes all)")
    p.add_argument("--description")
    p.add_argument("--type", dest="device_type", help="change its device type")
    p = leaf(devices, "list", cmd_devices_list, "list devices")
    p.add_argument("--type", dest="device_type")
    p.add_argument("--worker")
    p.add_argument("--health")
    p.add_argument("--yaml", action="store_true")

    types = sub.add_parser("device-types", help="kinds of boards").add_subparsers(
        dest="types_command", required=True)
    p = leaf(types, "add", cmd_device_types_add, "add a device type")
    p.add_argument("name")
    p.add_argument("--description")
    p.add_argument("--template", metavar="FILE",
                   help="store this template (default: the packaged or site file NAME.jinja2)")
    p.add_argument("--health-check", metavar="FILE", help="the health-check job definition")
    p.add_argument("--health-frequency", type=int, help=f"default {DEFAULT_HEALTH_FREQUENCY}")
    p.add_argument("--health-denominator", choices=("hours", "jobs"), help=f"default {DEFAULT_HEALTH_DENOMINATOR}")
    p = leaf(types, "list", cmd_device_types_list, "list device types")
    p.add_argument("--yaml", action="store_true")

    p = leaf(sub, "device-dictionary", cmd_device_dictionary, "import, export or review a device dictionary")
    p.add_argument("--hostname", required=True)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--import", dest="import_file", metavar="FILE", help="set it from FILE ('-': stdin)")
    action.add_argument("--export", action="store_true", help="print the dictionary")
    action.add_argument("--review", action="store_true", help="print the rendered device YAML")

    tokens = sub.add_parser("tokens", help="API tokens").add_subparsers(dest="tokens_command", required=True)
    p = leaf(tokens, "create", cmd_tokens_create, "create an API token (printed once; only its hash is kept)")
    p.add_argument("--user", required=True, help="the user (created if missing)")
    p.add_argument("--admin", action="store_true", help="make the user an admin")
    p.add_argument("--description")

    remote = sub.add_parser("remote-tokens", help="users' named tokens for notify callbacks").add_subparsers(
        dest="remote_command", required=True)
    p = leaf(remote, "add", cmd_remote_tokens, "set a user's named remote token (a job's notify callback "
             "'token: NAME' sends it)")
    p.add_argument("--user", required=True)
    p.add_argument("name")
    p.add_argument("token", help="the value ('-': read one line from stdin, kept out of the process list)")
    p = leaf(remote, "delete", cmd_remote_tokens, "delete a user's named remote token")
    p.add_argument("--user", required=True)
    p.add_argument("name")
    p = leaf(remote, "list", cmd_remote_tokens, "list the names of a user's remote tokens")
    p.add_argument("--user", required=True)
    return parser


def _check_schema(command: str) -> None:
    """A fresh database is created by any command; an outdated one is migrated by ``serve`` and
    ``db migrate`` only (an admin command must not change the schema behind the admin's back)."""
    from master.migrations import current_version, migrate, pending

    if command == "db":
        return
    todo = pending()
    if not todo:
        return
    if command == "serve" or current_version() == 0:
        for number, name in migrate():
            log.info("applied migration %d: %s", number, name)
        return
    raise SystemExit(f"pumice-master: the database schema is not up to date ({len(todo)} migration(s) "
                     "pending): run 'pumice-master db migrate'")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.data = getattr(args, "data", None) or str(default_data_dir())
    args.database = getattr(args, "database", None) or os.environ.get("PUMICE_DATABASE") or None
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO if args.command == "serve"
                        else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options: dict[str, Any] = {}
        if args.command == "serve":
            try:
                limits = Limits().parse(args.limit)
                if args.max_body is not None:
                    limits = limits.replace(max_bytes=args.max_body)
            except ValueError as exc:
                raise SystemExit(f"pumice-master: {exc}") from None
            options = {"name": args.instance, "url": args.url, "limits": limits,
                       "context_variables": tuple(args.context_variable)}
        open_instance(args.data, args.database, migrate=False, **options)
        _check_schema(args.command)
        return args.func(args)
    except ServiceError as exc:
        print(f"pumice-master: error: {exc.message}", file=sys.stderr)
        for fault in exc.faults:
            print(f"  {fault}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"pumice-master: {exc}: use --data DIR or set PUMICE_DATA", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
