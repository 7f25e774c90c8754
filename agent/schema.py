"""Loading LAVA job YAML with line numbers, and the job schema (voluptuous).

Every fault names its YAML path (``actions[1].boot.method``) and line, so a user can find it.
The top-level schema lives here; each strategy carries the schema of its own action block.
Jobs are parsed within :class:`results.bounded.Limits` (aliases, depth, sizes), and the schema
bounds what the limits name too: the number of action blocks and every timeout.
"""

from __future__ import annotations

import functools

import voluptuous as v
import yaml

from agent.errors import Fault, JobDefinitionError
from agent.timeout import UNIT_SECONDS
from results.bounded import DEFAULT_LIMITS, BoundedLoader, LimitExceeded, Limits, format_path

#: device-type template variables lava-server lets a job's ``context:`` set (LAVA 2023.01's list; a
#: lab adds its own). The master checks them (:func:`context_variable_faults`); the worker, as
#: lava-run, takes any variable: the device templates decide what it does.
CONTEXT_VARIABLES = frozenset((
    "arch", "boot_console", "boot_root", "cpu", "extra_options", "guestfs_driveid", "guestfs_interface",
    "guestfs_size", "machine", "memory", "model", "monitor", "netdevice", "no_kvm", "serial", "vga",
    "booti_dtb_addr", "booti_kernel_addr", "booti_ramdisk_addr", "bootm_dtb_addr", "bootm_kernel_addr",
    "bootm_ramdisk_addr", "bootz_dtb_addr", "bootz_kernel_addr", "bootz_ramdisk_addr", "boot_character_delay",
    "boot_retry", "bootloader_prompt", "console_device", "custom_kernel_args", "extra_kernel_args",
    "extra_nfsroot_args", "failure_retry", "kernel_loglevel", "kernel_start_message", "lava_test_results_dir",
    "menu_interrupt_prompt", "mustang_menu_list", "test_character_delay", "tftp_mac_address",
    "uboot_extra_error_message", "uboot_needs_interrupt", "uboot_altbank",
))


class YamlDocument:
    """A parsed YAML document that can tell the line of any path in it."""

    def __init__(self, text: str, source: str = "job", limits: Limits = DEFAULT_LIMITS) -> None:
        self.source = source
        loader = BoundedLoader(text, limits)
        try:
            self.node = loader.load_node()
            self.data = loader.construct_document(self.node) if self.node is not None else None
        finally:
            loader.dispose()

    def line(self, path: tuple | list) -> int | None:
        """1-based line of the deepest node along ``path`` that exists."""
        node = self.node
        if node is None:
            return None
        line = node.start_mark.line + 1
        for key in path:
            child = None
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if key_node.value == str(key):
                        child = value_node
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                child = node.value[key]
            if child is None:
                break
            node = child
            line = node.start_mark.line + 1
        return line


def load_yaml(text: str, source: str = "job", limits: Limits = DEFAULT_LIMITS) -> YamlDocument:
    """Parse ``text`` within ``limits``; a syntax error becomes a JobDefinitionError with the line
    and column, a document over a limit one with its path, line and the limit's name."""
    if not isinstance(text, str):
        text = text.decode("utf-8", errors="replace")
    try:
        return YamlDocument(text, source, limits)
    except LimitExceeded as exc:
        raise JobDefinitionError([Fault(format_path(exc.path), exc.message, exc.line)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        where = f", column {mark.column + 1}" if mark else ""
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise JobDefinitionError([Fault("", f"invalid YAML{where}: {problem}", line)]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow: it knows its position only
        before = text[:exc.position]
        line, column = before.count("\n") + 1, exc.position - before.rfind("\n")
        raise JobDefinitionError([Fault("", f"invalid YAML, column {column}: {exc.reason}", line)]) from None
    except yaml.YAMLError as exc:
        raise JobDefinitionError([Fault("", f"invalid YAML: {exc}")]) from None


def faults_from(error: v.MultipleInvalid, doc: YamlDocument, prefix: tuple = ()) -> list[Fault]:
    """voluptuous errors as Faults, with paths relative to the document."""
    faults = []
    for err in error.errors:
        path = list(prefix) + [getattr(p, "schema", p) for p in err.path]
        faults.append(Fault(format_path(path), _message(err), doc.line(path)))
    return sorted(faults, key=lambda f: (f.line or 0, f.path))


def _message(err: v.Invalid) -> str:
    msg = err.msg
    if msg == "extra keys not allowed":
        return "unknown key"
    if msg.startswith("required key not provided"):
        return "required key missing"
    return msg


def _positive_duration(value: dict) -> dict:
    if not any(value.get(unit) for unit in ("days", "hours", "minutes", "seconds")):
        raise v.Invalid("a timeout needs days, hours, minutes or seconds greater than 0")
    return value


@functools.cache
def timeout_schema() -> v.Schema:
    """A LAVA duration: ``{minutes: 5}`` (units may be combined), optionally ``skip: true``.

    Compiled once and shared: the job and every action block hold several timeouts."""
    units = {v.Optional(u): v.All(int, v.Range(min=0)) for u in ("days", "hours", "minutes", "seconds")}
    return v.Schema(v.All({**units, v.Optional("skip"): bool}, _positive_duration))


def action_base() -> dict:
    """Keys every action block may carry."""
    return {
        v.Optional("namespace"): str,
        v.Optional("connection-namespace"): str,
        v.Optional("protocols"): object,
        v.Optional("role"): v.Any(str, [str]),
        v.Optional("timeout"): timeout_schema(),
        v.Optional("timeouts"): {str: timeout_schema()},
        v.Optional("repeat"): v.All(int, v.Range(min=1)),
        v.Optional("failure_retry"): v.All(int, v.Range(min=1)),
        v.Optional("failure_retry_interval"): v.All(int, v.Range(min=1)),
    }


_CONTEXT_VALUE = v.Any(int, float, str, bool, [v.Any(int, str)])


@functools.cache
def job_schema(limits: Limits = DEFAULT_LIMITS) -> v.Schema:
    """The top level of a LAVA job (action blocks are checked by their strategies), with at most
    ``limits.max_actions`` action blocks."""
    return v.Schema({
        v.Required("job_name"): v.All(str, v.Length(min=1, max=200)),
        v.Optional("device_type"): v.All(str, v.Length(min=1, max=200)),
        v.Required("timeouts"): {
            v.Required("job"): timeout_schema(),
            v.Optional("action"): timeout_schema(),
            v.Optional("actions"): {str: timeout_schema()},
            v.Optional("connection"): timeout_schema(),
            v.Optional("connections"): {str: timeout_schema()},
            v.Optional("queue"): timeout_schema(),
        },
        v.Required("visibility"): v.Any("public", "personal", {"group": [str]},
                                        msg="expected public, personal or {group: [names]}"),
        v.Optional("context"): {str: _CONTEXT_VALUE},
        v.Optional("metadata"): v.Any(None, {str: object}),  # generators write an empty mapping as null
        v.Optional("target"): object,  # written by LAVA's scheduler into each MultiNode sub-job
        v.Optional("priority"): v.Any("high", "medium", "low", v.All(int, v.Range(min=0, max=100)),
                                      msg="expected high, medium, low or 0-100"),
        v.Optional("tags"): [str],
        v.Optional("secrets"): {str: str},
        v.Optional("environment"): {str: object},
        v.Optional("protocols"): {str: object},
        v.Optional("notify"): dict,
        v.Optional("reboot_to_fastboot"): bool,
        v.Required("actions"): v.All([v.All(dict, v.Length(min=1, max=1, msg="an action is a mapping "
                                                                             "with one key"))],
                                     v.Length(min=1, msg="a job needs at least one action"),
                                     v.Length(max=limits.max_actions,
                                              msg=f"at most {limits.max_actions} action blocks (limit max_actions)")),
    })


def context_variable_faults(context: object, doc: YamlDocument, extra: tuple[str, ...] = ()) -> list[Fault]:
    """A fault for each ``context:`` variable neither LAVA's list nor the lab's ``extra`` ones
    (the master's ``--context-variable`` setting) name: lava-server's check, which lava-run and
    ``pumice-run`` do not make."""
    if not isinstance(context, dict):
        return []
    known = CONTEXT_VARIABLES.union(extra)
    return [Fault(format_path(("context", name)), "not a known context variable; a lab allows its own with "
                                                  "`pumice-master serve --context-variable NAME`",
                  doc.line(("context", name)))
            for name in context if name not in known]


def _seconds(value: object) -> int | None:
    """The seconds of a duration mapping whose units are integers (None for anything else: the
    schema reports that)."""
    if not isinstance(value, dict):
        return None
    total = 0
    for unit, amount in value.items():
        if unit in UNIT_SECONDS:
            if isinstance(amount, bool) or not isinstance(amount, int):
                return None
            total += amount * UNIT_SECONDS[unit]
    return total


def timeout_faults(data: dict, doc: YamlDocument | None, limits: Limits = DEFAULT_LIMITS) -> list[Fault]:
    """A Fault for each timeout of the job longer than ``limits.max_timeout``: the job's
    ``timeouts:`` and each action block's ``timeout``, ``timeouts`` and ``failure_retry_interval``."""
    places: list[tuple[tuple, object]] = []
    timeouts = data.get("timeouts")
    if isinstance(timeouts, dict):
        places += [(("timeouts", key), timeouts.get(key)) for key in ("job", "action", "connection", "queue")]
        for group in ("actions", "connections"):
            if isinstance(timeouts.get(group), dict):
                places += [(("timeouts", group, name), value) for name, value in timeouts[group].items()]
    actions = data.get("actions")
    for index, block in enumerate(actions if isinstance(actions, list) else []):
        for section, params in (block.items() if isinstance(block, dict) else ()):
            if not isinstance(params, dict):
                continue
            path = ("actions", index, section)
            places.append((path + ("timeout",), params.get("timeout")))
            if isinstance(params.get("timeouts"), dict):
                places += [(path + ("timeouts", name), value) for name, value in params["timeouts"].items()]
            places.append((path + ("failure_retry_interval",), {"seconds": params.get("failure_retry_interval")}))
    faults = []
    for path, value in places:
        seconds = _seconds(value)
        if seconds is not None and seconds > limits.max_timeout:
            faults.append(Fault(format_path(path), f"a timeout of {seconds} seconds; at most {limits.max_timeout} "
                                                   f"({limits.max_timeout / 86400:g} days, limit max_timeout)",
                                doc.line(path) if doc else None))
    return faults
