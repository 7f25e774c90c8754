"""The results bundle: one YAML file with all the results of a job, keyed by level.

Shape (what ``dump_bundle`` writes; ``load_bundle`` also reads any equivalent YAML, e.g. block
style written by hand)::

    # Pumice results bundle
    # instance: lab-a
    # job: https://lab-a.example.org/jobs/12
    # uuid: 4f1c2a9e-...
    job: "12"
    source: {"instance": "lab-a", "url": "https://lab-a.example.org/jobs/12", "uuid": "4f1c2a9e-..."}
    results:
      "0":
      - {"suite": "lava", "case": "job", "result": "pass"}
      "1.1":
      - {"suite": "lava", "case": "http-download", "result": "pass", "duration": 0.12, "extra": {...}}
      "3.1":
      - {"suite": "0_smoke-tests", "case": "pwd", "result": "pass", "set": "basic", "duration": 0.01}

- ``source`` repeats the header comment as data, so it survives an upload to another
  instance; the uuid tells bundles apart there. Without a header there is no ``source``.
- Levels are sorted numerically ("1.2" < "1.10" < "2") and written quoted, so YAML never reads
  them as numbers. Level "0" (``results.record.JOB_LEVEL``) holds the final ``lava``/``job``
  result: no pipeline action has level 0, so the job's outcome is always the first entry.
- Each result is one line of JSON-compatible flow YAML (the log line encoder): fast to write,
  easy to grep and diff. Result fields are those of ``Result.to_dict()`` less job and level.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from results.log import encode_value
from results.record import Result, level_key

if TYPE_CHECKING:
    from results.bounded import Limits

MAGIC = "# Pumice results bundle"


class BundleError(ValueError):
    """A malformed bundle; ``line`` is the 1-based line of the fault (0 if unknown)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


@dataclass(frozen=True)
class BundleHeader:
    """Where a bundle comes from: the source instance's name, the job's URL there, a UUID."""

    instance: str
    url: str
    uuid: str

    @classmethod
    def new(cls, instance: str, url: str) -> BundleHeader:
        """A header with a fresh random UUID (for a bundle being downloaded)."""
        import uuid  # only here: it imports platform, a few ms that writing a job's bundle need not pay

        return cls(instance, url, str(uuid.uuid4()))


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: the job id, its header (None if it has no ``source``) and results."""

    job: str
    header: BundleHeader | None
    results: list[Result] = field(default_factory=list)


def _comment(value: str) -> str:
    return encode_value(value)[1:-1]  # JSON escapes keep a comment on one line


def dump_bundle(job: str, results: Iterable[Result], header: BundleHeader | None = None) -> str:
    """The bundle text for ``results`` of ``job`` (every result must belong to that job)."""
    job = str(job)
    by_level: dict[str, list[Result]] = {}
    for result in results:
        if result.job != job:
            raise ValueError(
                f"result {result.suite}/{result.case} at level {result.level} belongs "
                f"to job {result.job}, not to job {job}"
            )
        by_level.setdefault(result.level, []).append(result)
    out = [MAGIC]
    if header is not None:
        out += [
            f"# instance: {_comment(header.instance)}",
            f"# job: {_comment(header.url)}",
            f"# uuid: {_comment(header.uuid)}",
        ]
    else:
        out.append(f"# job: {_comment(job)}")
    out.append(f"job: {encode_value(job)}")
    if header is not None:
        source = {"instance": header.instance, "url": header.url, "uuid": header.uuid}
        out.append(f"source: {encode_value(source)}")
    if not by_level:
        out.append("results: {}")
    else:
        out.append("results:")
        for level in sorted(by_level, key=level_key):
            out.append(f"  {encode_value(level)}:")
            for result in by_level[level]:
                data = result.to_dict()
                del data["job"], data["level"]
                out.append(f"  - {encode_value(data)}")
    return "\n".join(out) + "\n"


def write_bundle(
    path: str | os.PathLike[str], job: str, results: Iterable[Result], header: BundleHeader | None = None
) -> None:
    """Write the bundle to ``path`` atomically (readers see the old file or the new one)."""
    text = dump_bundle(job, results, header)
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def load_bundle(text: str, limits: Limits | None = None) -> Bundle:
    """Parse a bundle. Raises BundleError saying what is wrong and on which line.

    The layout :func:`dump_bundle` writes is read line by line, each result with ``json`` (it is
    JSON, as a log line is): a bundle of thousands of results costs a few times its size, never
    the hundred times a YAML node graph of it would. Any other layout (block style written by
    hand) is read as YAML within ``limits``, those of any document a user sends (default:
    :data:`results.bounded.DEFAULT_LIMITS`)."""
    from results.bounded import DEFAULT_LIMITS

    limits = limits or DEFAULT_LIMITS
    bundle = _load_lines(text, limits)
    return bundle if bundle is not None else _load_yaml(text, limits)


def _load_lines(text: str, limits: Limits) -> Bundle | None:
    """The bundle in ``text`` if it has :func:`dump_bundle`'s layout, else None."""
    import json

    from results.bounded import LimitExceeded, load_json

    # a line may be as long as the bundle (a result's extra); its nesting and integers are bounded
    limits = limits.replace(max_bytes=max(limits.max_bytes, 4 * len(text)))
    job: Any = None
    header = None
    results: list[Result] | None = None
    level: Any = None
    for number, line in enumerate(text.split("\n"), 1):
        if not line or line.startswith("#"):
            continue
        try:
            if results is None:
                if line.startswith("job: ") and job is None:
                    job = load_json(line[5:], limits)
                elif line.startswith("source: ") and header is None:
                    header = _header_of(load_json(line[8:], limits), number)
                elif line in ("results:", "results: {}") and isinstance(job, str) and job:
                    results = []
                    level = None if line == "results:" else ""
                else:
                    return None
            elif level is not None and level != "" and line.startswith("  - {"):
                # at most max_nodes values on one line, as in a YAML document (a JSON value takes a comma)
                values = line.count(",") + line.count("{") + line.count("[")
                if values > limits.max_nodes:
                    raise LimitExceeded(f"more than {limits.max_nodes} values in one result (limit max_nodes)",
                                        "max_nodes")
                results.append(_result(level, load_json(line[4:], limits), job, number))
            elif level != "" and line.startswith("  ") and line.endswith(":") and not line.startswith("   "):
                level = load_json(line[2:-1], limits)
                if not isinstance(level, str) or not level:
                    return None
            else:
                return None
        except json.JSONDecodeError:
            return None
        except LimitExceeded as exc:
            raise BundleError(str(exc), number) from None
    return Bundle(job, header, results) if results is not None else None


def _load_yaml(text: str, limits: Limits) -> Bundle:
    import yaml  # not needed by the agent's fast paths

    from results.bounded import BoundedLoader, LimitExceeded

    loader = BoundedLoader(text, limits)
    try:
        try:
            root = loader.load_node()
        except LimitExceeded as exc:
            raise BundleError(str(exc), exc.line or 0) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise BundleError(f"not valid YAML: {exc.problem or exc}", mark.line + 1 if mark else 0) from None
        except yaml.YAMLError as exc:
            raise BundleError(f"not valid YAML: {exc}") from None
        return _bundle(loader, root)
    finally:
        loader.dispose()


def _line(node: Any) -> int:
    return node.start_mark.line + 1


def _bundle(loader: Any, root: Any) -> Bundle:
    import yaml

    if not isinstance(root, yaml.MappingNode):
        raise BundleError("a bundle is a mapping with job, source and results", _line(root) if root is not None else 1)
    keys = {}
    for key_node, value_node in root.value:
        if isinstance(key_node, yaml.ScalarNode):
            keys[key_node.value] = value_node
    if "job" not in keys:
        raise BundleError("the bundle has no 'job' (the job id)", _line(root))
    job_node = keys["job"]
    if not isinstance(job_node, yaml.ScalarNode) or not job_node.value:
        raise BundleError("'job' must be the job id", _line(job_node))
    job = job_node.value
    header = _header(loader, keys["source"]) if "source" in keys else None
    if "results" not in keys:
        raise BundleError("the bundle has no 'results' (a mapping of level to results)", _line(root))
    results_node = keys["results"]
    if isinstance(results_node, yaml.ScalarNode) and results_node.tag.endswith(":null"):
        return Bundle(job, header, [])
    if not isinstance(results_node, yaml.MappingNode):
        raise BundleError("'results' must be a mapping of level to a list of results", _line(results_node))
    results = []
    for level_node, items_node in results_node.value:
        if not isinstance(level_node, yaml.ScalarNode):
            raise BundleError("a level must be text like 1.2", _line(level_node))
        level = level_node.value  # the text as written: an unquoted 1.10 stays "1.10"
        if not isinstance(items_node, yaml.SequenceNode):
            raise BundleError(f"level {level}: expected a list of results", _line(items_node))
        for item in items_node.value:
            try:
                data = loader.construct_object(item, deep=True)
            except yaml.YAMLError as exc:
                raise BundleError(f"level {level}: {exc}", _line(item)) from None
            results.append(_result(level, data, job, _line(item)))
    return Bundle(job, header, results)


def _result(level: str, data: Any, job: str, line: int) -> Result:
    """The result ``data`` read at ``level`` on ``line`` (either layout)."""
    if not isinstance(data, dict):
        raise BundleError(f"level {level}: a result must be a mapping, got {_cut(repr(data))}", line)
    if "level" in data and str(data["level"]) != level:
        raise BundleError(f"level {level}: result says level {_cut(repr(data['level']))}", line)
    try:
        return Result.from_dict({**data, "level": level}, job=job)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"level {level}: {_cut(str(exc))}", line) from None


def _cut(text: str, limit: int = 200) -> str:
    """``text`` for an error message, cut short: a hostile bundle's value may be a megabyte."""
    return text if len(text) <= limit else text[:limit] + "..."


def _header(loader: Any, node: Any) -> BundleHeader:
    return _header_of(loader.construct_object(node, deep=True), _line(node))


def _header_of(data: Any, line: int) -> BundleHeader:
    if not isinstance(data, dict):
        raise BundleError("'source' must be a mapping with instance, url and uuid", line)
    missing = [key for key in ("instance", "url", "uuid") if not isinstance(data.get(key), str)]
    if missing:
        raise BundleError(f"'source' lacks {', '.join(missing)} (text)", line)
    return BundleHeader(data["instance"], data["url"], data["uuid"])
