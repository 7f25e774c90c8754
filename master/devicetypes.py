"""Device-type templates: render a device dictionary into the device configuration a job runs with.

A *device dictionary* is a small Jinja2 text, LAVA's format::

    {% extends 'beaglebone-black.jinja2' %}
    {% set connection_command = 'telnet localhost 7001' %}

The *device-type template* it extends (and that template's parents, e.g. base-uboot.jinja2 and
base.jinja2) turn those variables, plus the job's ``context:`` variables, into the device YAML the
agent reads (``actions.deploy.methods``, ``actions.boot.methods``, ``commands``, ``constants``,
``parameters``, ``timeouts``...).

The rendering environment is LAVA 2023.01's (lava_scheduler_app.environment), so a LAVA
dictionary renders to the same text here as on a LAVA server:

- a sandboxed Jinja2 environment (templates come from lab admins and, through the job context,
  from any submitter: no attribute access to Python internals);
- ``autoescape=False`` (the output is YAML, not HTML), ``trim_blocks=True`` (the newline after a
  block tag is dropped, which the templates' indentation relies on), unlimited template cache;
- the default, lenient ``Undefined``: a variable nobody set renders as an empty string and is
  false in tests (templates test ``{% if power_on_command %}`` and use ``| default(...)``);
- the job context passed as the render's variables (``template.render(**context)``), so the
  device dictionary's own ``{% set %}`` lines win over the job's context;
- the loader searches, in order: templates stored by the master (``extra_templates``), the
  site-local directory, then the packaged ``device-types/``.

Deps: jinja2 and pyyaml (master side only; the agent never imports this).
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import jinja2
import yaml
from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment

from results.bounded import DEFAULT_LIMITS, LimitExceeded, Limits, load_data

log = logging.getLogger("pumice.devicetypes")

__all__ = ["DeviceTypeError", "DeviceTypes", "check_name", "packaged_dir", "parse_dictionary"]

SUFFIX = ".jinja2"
NAME_PATTERN = r"^[a-zA-Z0-9_.-]+$"
_NAME_RE = re.compile(NAME_PATTERN)
#: How errors and tracebacks name the device dictionary being rendered (it has no file).
DICTIONARY = "device dictionary"
#: Prefix of the pseudo file names given to templates stored by the master.
DATABASE = "database:"

# The master's templates for the render in progress. Jinja2 caches compiled templates per
# environment; this variable lets one cached environment serve renders with different database
# templates (each loader "uptodate" check compares against the current render's mapping).
_extra_templates: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "pumice_extra_templates", default=MappingProxyType({})
)


class DeviceTypeError(ValueError):
    """A device dictionary or device-type template that cannot be rendered or parsed.

    ``str()`` says what is wrong, where and what is allowed; ``template`` names the template (or
    ``"device dictionary"``) and ``line`` is the 1-based line in it (or in the rendered YAML for
    YAML errors, with ``template`` None), when known.
    """

    def __init__(self, message: str, *, template: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.template = template
        self.line = line


def check_name(name: str) -> str:
    """Return the device-type name of ``name`` (``qemu`` or ``qemu.jinja2`` -> ``qemu``).

    Raises DeviceTypeError unless the name matches ``^[a-zA-Z0-9_.-]+$``: a device-type name never
    contains a path separator, so it cannot reach outside the template directories.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.strip(".") == "":
        raise DeviceTypeError(
            f"invalid device-type name {name!r}: allowed are letters, digits, '_', '.' and '-' ({NAME_PATTERN})"
        )
    base = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if not base:
        raise DeviceTypeError(f"invalid device-type name {name!r}: the name before {SUFFIX} is empty")
    return base


def _filename(name: str) -> str:
    """The template file name of a device type (``qemu`` -> ``qemu.jinja2``), name checked."""
    return check_name(name) + SUFFIX


def packaged_dir() -> Path:
    """The device-types/ directory shipped with Pumice.

    From a checkout (or an editable install) it is next to the packages; an installed Pumice
    has it under ``sys.prefix/share/pumice/device-types`` (setup.py's data_files).
    """
    checkout = Path(__file__).resolve().parent.parent / "device-types"
    if (checkout / "base.jinja2").is_file():
        return checkout
    return Path(sys.prefix) / "share" / "pumice" / "device-types"


class _Loader(jinja2.BaseLoader):
    """The master's stored templates of the current render, then the template directories."""

    def __init__(self, directories: list[Path]) -> None:
        self.directories = directories
        self.files = jinja2.FileSystemLoader([str(d) for d in directories])

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str | None, Callable[[], bool]]:
        check_name(template)
        extra = _extra_templates.get()
        if template in extra:
            source = extra[template]
            return source, DATABASE + template, lambda: _extra_templates.get().get(template) == source
        source, filename, uptodate = self.files.get_source(environment, template)
        # A file template cached earlier is stale as soon as the master stores one of that name.
        return source, filename, lambda: template not in _extra_templates.get() and uptodate()

    def list_templates(self) -> list[str]:
        names = set(_extra_templates.get())
        for directory in self.directories:
            if directory.is_dir():
                names.update(p.name for p in directory.glob("*" + SUFFIX) if _NAME_RE.match(p.name))
        return sorted(names)


def _environment(loader: jinja2.BaseLoader | None = None) -> SandboxedEnvironment:
    """A rendering environment with LAVA 2023.01's settings (see the module docstring)."""
    return SandboxedEnvironment(loader=loader, autoescape=False, trim_blocks=True, cache_size=-1)


# Parses and evaluates device dictionaries on their own (no loader: nothing is extended).
_PARSER = _environment()


def _error_location(tb: TracebackType | None) -> tuple[str | None, int | None]:
    """The template and line a render error happened in, from Jinja2's rewritten traceback."""
    where: tuple[str | None, int | None] = (None, None)
    while tb is not None:
        # Jinja2 rewrites template frames into fake ones whose globals name the template file.
        if "__jinja_exception__" in tb.tb_frame.f_globals:
            where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return where


def _dictionary_template(env: jinja2.Environment, source: str | nodes.Template) -> jinja2.Template:
    """Compile a device dictionary (text or syntax tree) under the name errors will show for it."""
    code = env.compile(source, name=DICTIONARY, filename=DICTIONARY)
    return env.template_class.from_code(env, code, env.make_globals(None), None)


def _describe(filename: str | None, label: str) -> str:
    """Name a template in a message: the dictionary (``label``), a stored template or a file."""
    if filename is None or filename == DICTIONARY:
        return label
    if filename.startswith(DATABASE):
        return f"device-type template {filename[len(DATABASE) :]!r} (stored by the master)"
    return f"device-type template {Path(filename).name!r} ({filename})"


def _plain(value: Any) -> Any:
    """Plain YAML-friendly data from a value set in a dictionary (tuples -> lists, unset -> None)."""
    if isinstance(value, jinja2.Undefined):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def parse_dictionary(text: str) -> tuple[str, dict[str, Any]]:
    """Return the device type a device dictionary extends and the variables it sets.

    ``({% extends 'qemu.jinja2' %} {% set memory = 1024 %})`` -> ``("qemu", {"memory": 1024})``.
    The name is the device type (without ``.jinja2``). The variables are read from the template's
    syntax tree and evaluated in the sandbox, in order (a value may refer to an earlier one), for
    display and export; a value that refers to the job context is None here.
    """
    try:
        tree = _PARSER.parse(text, name=DICTIONARY)
    except jinja2.TemplateSyntaxError as exc:
        raise DeviceTypeError(
            f"device dictionary line {exc.lineno}: {exc.message}", template=DICTIONARY, line=exc.lineno
        ) from None
    extends = list(tree.find_all(nodes.Extends))
    top = [node for node in tree.body if isinstance(node, nodes.Extends)]
    if len(extends) != 1 or len(top) != 1:
        raise DeviceTypeError(
            f"device dictionary: found {len(extends)} {{% extends %}} tags; a device dictionary extends "
            "exactly one device-type template, e.g. {% extends 'qemu.jinja2' %}",
            template=DICTIONARY,
        )
    parent = top[0].template
    if not isinstance(parent, nodes.Const) or not isinstance(parent.value, str):
        raise DeviceTypeError(
            f"device dictionary line {top[0].lineno}: {{% extends %}} must name the template as a "
            "string, e.g. {% extends 'qemu.jinja2' %}",
            template=DICTIONARY,
            line=top[0].lineno,
        )
    device_type = check_name(parent.value)

    # Evaluate the sets without the parent template: drop the extends tag and the block overrides
    # (a set inside a block is local to that block in LAVA too).
    tree.body = [node for node in tree.body if not isinstance(node, (nodes.Extends, nodes.Block))]
    names: list[str] = []
    for node in tree.find_all((nodes.Assign, nodes.AssignBlock)):
        targets = [node.target] if isinstance(node.target, nodes.Name) else node.target.find_all(nodes.Name)
        for target in targets:
            if target.name not in names:
                names.append(target.name)
    try:
        module = _dictionary_template(_PARSER, tree).make_module()
    except jinja2.TemplateError as exc:
        _, line = _error_location(exc.__traceback__)
        where = f" line {line}" if line else ""
        raise DeviceTypeError(f"device dictionary{where}: {exc}", template=DICTIONARY, line=line) from None
    exported = vars(module)  # the top-level sets; a set inside a loop or macro stays local
    values = {name: _plain(exported[name]) for name in names if name in exported}
    return device_type, {name: value for name, value in values.items() if not callable(value)}


class DeviceTypes:
    """The device-type templates of a master: list them, read them, render dictionaries with them.

    ``template_dirs`` are the directories searched for templates (default: the packaged
    device-types/ only); ``site_dir``, when given, is searched before them, so a lab overrides a
    packaged template by dropping a file of the same name there. Templates stored by the master
    (``extra_templates`` arguments: device-type name -> template text) come before both.
    """

    def __init__(self, template_dirs: list[Path] | None = None, site_dir: Path | None = None) -> None:
        dirs = [Path(d) for d in template_dirs] if template_dirs is not None else [packaged_dir()]
        self.search_path: list[Path] = ([Path(site_dir)] if site_dir is not None else []) + dirs
        self._env = _environment(_Loader(self.search_path))
        log.debug("device-type templates from %s", ", ".join(map(str, self.search_path)))

    def _where(self, extras: Mapping[str, str]) -> str:
        places = (["the master's stored templates"] if extras else []) + [str(d) for d in self.search_path]
        return ", ".join(places)

    @staticmethod
    def _extras(extra_templates: Mapping[str, str] | None) -> dict[str, str]:
        extras = {}
        for name, text in (extra_templates or {}).items():
            if not isinstance(text, str):
                raise DeviceTypeError(
                    f"device-type template {name!r}: the template must be text, not {type(text).__name__}"
                )
            extras[_filename(name)] = text
        return extras

    def render(
        self,
        dictionary: str,
        context: Mapping[str, Any] | None = None,
        extra_templates: Mapping[str, str] | None = None,
        *,
        name: str | None = None,
    ) -> str:
        """Render the device dictionary text to device YAML text.

        ``context`` holds the job's ``context:`` variables (``arch``, ``no_kvm``,
        ``extra_options``...). ``extra_templates`` are templates stored by the master
        (device-type name -> text); they override template files of the same name. ``name``
        (e.g. the device's hostname) is only used in error messages.
        Raises DeviceTypeError for a missing template, a syntax error or a failing render.
        """
        if context is None:
            context = {}
        if not isinstance(context, Mapping) or not all(isinstance(k, str) for k in context):
            raise DeviceTypeError(f"the job context must be a mapping of variable names to values, not {context!r}")
        if not isinstance(dictionary, str):
            raise DeviceTypeError(f"the device dictionary must be text, not {type(dictionary).__name__}")
        extras = self._extras(extra_templates)
        label = f"{DICTIONARY} of {name}" if name else DICTIONARY
        token = _extra_templates.set(extras)
        try:
            # LAVA: template.render(**job_ctx)
            return _dictionary_template(self._env, dictionary).render(**context)
        except jinja2.TemplateNotFound as exc:
            raise DeviceTypeError(
                f"{label}: device-type template {exc.name!r} not found; searched: {self._where(extras)}",
                template=exc.name,
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            where = _describe(exc.filename or exc.name, label)
            raise DeviceTypeError(
                f"{where} line {exc.lineno}: syntax error: {exc.message}", template=exc.name, line=exc.lineno
            ) from None
        except DeviceTypeError as exc:  # a bad template name in an extends tag
            raise DeviceTypeError(f"{label}: {exc}", template=exc.template) from None
        except jinja2.TemplateError as exc:
            filename, line = _error_location(exc.__traceback__)
            where = _describe(filename, label) + (f" line {line}" if line else "")
            raise DeviceTypeError(f"{where}: {type(exc).__name__}: {exc}", template=filename, line=line) from None
        finally:
            _extra_templates.reset(token)

    def device_config(
        self,
        dictionary: str,
        context: Mapping[str, Any] | None = None,
        extra_templates: Mapping[str, str] | None = None,
        *,
        name: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> dict[str, Any]:
        """Render the device dictionary and load the YAML (within ``limits``: a job's context is
        rendered into it): the device configuration as a dict.

        Raises DeviceTypeError as render() does, and when the rendered text is not a YAML mapping
        (the message gives the line of the rendered YAML and shows it).
        """
        text = self.render(dictionary, context, extra_templates, name=name)
        label = f"{DICTIONARY} of {name}" if name else DICTIONARY
        try:
            data = load_data(text, limits)
        except LimitExceeded as exc:
            raise DeviceTypeError(f"{label}: the rendered device configuration is over a limit: {exc}",
                                  line=exc.line) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            shown = text.splitlines()[line - 1] if line and line <= len(text.splitlines()) else ""
            raise DeviceTypeError(
                f"{label}: the rendered device configuration is not valid YAML, line {line}: "
                f"{exc.problem or exc}: {shown!r}",
                line=line,
            ) from None
        except yaml.YAMLError as exc:
            raise DeviceTypeError(f"{label}: the rendered device configuration is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise DeviceTypeError(
                f"{label}: renders to {type(data).__name__}, not a mapping: does it extend a device-type "
                "template, e.g. {% extends 'qemu.jinja2' %}?"
            )
        return data

    def names(self, extra_templates: Mapping[str, str] | None = None) -> list[str]:
        """The available device types, sorted: every template but the bases (``base*``), as LAVA lists."""
        token = _extra_templates.set(self._extras(extra_templates))
        try:
            templates = self._env.list_templates()
        finally:
            _extra_templates.reset(token)
        return sorted(t[: -len(SUFFIX)] for t in templates if t.endswith(SUFFIX) and not t.startswith("base"))

    def template_text(self, name: str, extra_templates: Mapping[str, str] | None = None) -> str:
        """The source of the device-type template ``name`` as the renderer would load it."""
        filename = _filename(name)
        extras = self._extras(extra_templates)
        token = _extra_templates.set(extras)
        try:
            source, _, _ = self._env.loader.get_source(self._env, filename)
        except jinja2.TemplateNotFound:
            raise DeviceTypeError(
                f"device-type template {filename!r} not found; searched: {self._where(extras)}", template=filename
            ) from None
        finally:
            _extra_templates.reset(token)
        return source
