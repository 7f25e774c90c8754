"""Bounded parsing of what users send: YAML and JSON documents that would cost more than a few
times their size are refused while they are parsed, with the line and the path of the fault.

A YAML document of a kilobyte can name a value with an anchor and repeat it with aliases, nine
levels deep: "billion laughs". PyYAML builds it cheaply (an alias is a second reference to the
same object), but anything that walks it later (``json.dumps``, a template, a deep copy) expands
it to gigabytes. So the loader counts what a document holds *as its aliases would expand it*, and
refuses it before anything is built from it:

- while libyaml composes the document (its C composer calls the resolver's ``descend_resolver``
  for every node it makes, a cheap Python hook), the nodes made and the nesting depth: composing
  never makes more than :attr:`Limits.max_nodes` nodes, whatever the document's size;
- once composed, when the text has an alias (a ``*``) or is longer than :attr:`Limits.max_string`,
  one pass over the node graph (each node once, memoized) counts the nodes, the text and the
  depth through aliases, the aliases themselves, and the longest string, and refuses an alias
  that names its own ancestor;
- while the data is constructed, an integer literal longer than :attr:`Limits.max_int_digits`
  (Python refuses past 4300 digits, with a ValueError that is not a YAML error).

What the limits do not see is left to the schema of each document (actions, timeouts, ranges).
Every refusal is a :class:`LimitExceeded`, a ``yaml.MarkedYAMLError``: code that reports YAML
errors with their line reports these too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from results.fastyaml import SafeLoader


class Limits(NamedTuple):
    """The bounds of a document a user sends; each field is a named setting (README: Limits).

    The defaults are far above what a LAVA job needs (the largest in LAVA's own samples has a few
    hundred values, no aliases, a depth of 11) and small enough that a refused document costs the
    master a few megabytes at most. (A named tuple: immutable, hashable, and cheaper than a frozen
    dataclass to build when pumice-run starts.)"""

    #: size of a document (a request body), in bytes
    max_bytes: int = 1 << 20
    #: nesting of mappings and lists, counted through aliases
    max_depth: int = 64
    #: values (mappings, lists, strings, numbers...) with every alias expanded
    max_nodes: int = 10_000
    #: characters of all strings with every alias expanded
    max_expanded_bytes: int = 2 << 20
    #: aliases (``*name``) in a document
    max_aliases: int = 100
    #: characters of one string
    max_string: int = 64 << 10
    #: characters of one integer literal (sign and ``0x`` included)
    max_int_digits: int = 100
    #: action blocks in a job's ``actions:``
    max_actions: int = 100
    #: a timeout, in seconds (30 days)
    max_timeout: int = 30 * 86400

    @classmethod
    def names(cls) -> list[str]:
        return list(cls._fields)

    def replace(self, **changes: int) -> Limits:
        """These limits with ``changes`` (each a positive integer)."""
        for name, value in changes.items():
            if name not in self.names():
                raise ValueError(f"unknown limit {name!r}; known: {', '.join(self.names())}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be a positive integer, not {value!r}")
        return self._replace(**changes)

    def parse(self, settings: Iterable[str]) -> Limits:
        """These limits with ``NAME=VALUE`` settings applied (``pumice-master serve --limit``)."""
        changes: dict[str, int] = {}
        for setting in settings:
            name, sep, value = setting.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or not value.strip().isdigit() or len(value.strip()) > 18:
                raise ValueError(f"bad limit {setting!r}: expected NAME=NUMBER, e.g. max_aliases=200")
            changes[name] = int(value)
        return self.replace(**changes)


#: the limits of a process that was given none (the agent's, and the master's by default)
DEFAULT_LIMITS = Limits()


class LimitExceeded(yaml.MarkedYAMLError):
    """A document over one of its :class:`Limits`: ``limit`` names it, ``path`` is where (keys
    from the document's root), ``line`` the 1-based line (None when unknown)."""

    def __init__(self, message: str, limit: str, *, path: tuple = (), line: int | None = None) -> None:
        mark = yaml.Mark("<document>", 0, line - 1, 0, None, None) if line else None
        super().__init__(problem=message, problem_mark=mark)
        self.message = message
        self.limit = limit
        self.path = tuple(path)
        self.line = line

    def __str__(self) -> str:
        where = format_path(self.path)
        return (f"{where}: " if where else "") + self.message + (f" (line {self.line})" if self.line else "")


def format_path(path: Iterable[Any]) -> str:
    """``['actions', 1, 'boot']`` -> ``actions[1].boot``."""
    out = ""
    for key in path:
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            out += f".{key}" if out else str(key)
    return out


def check_size(text: str | bytes, limits: Limits = DEFAULT_LIMITS, what: str = "the document") -> None:
    """LimitExceeded when ``text`` is over ``max_bytes`` (UTF-8 bytes)."""
    size = len(text)
    if isinstance(text, str) and size * 4 > limits.max_bytes:  # only then can it be over: count bytes
        size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:  # the whole document: where it starts
        raise LimitExceeded(f"{what} is {size} bytes; at most {limits.max_bytes} (limit max_bytes)", "max_bytes",
                            line=1)


# ---- YAML ----

_Scalar, _Sequence, _Mapping = yaml.ScalarNode, yaml.SequenceNode, yaml.MappingNode


class Bounds:
    """What makes a PyYAML safe loader (libyaml's or PyYAML's own) bounded: the composer's hooks,
    :meth:`load_node` and the integer constructor. Mixed into :class:`BoundedLoader`."""

    def __init__(self, text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(text)
        self.limits = limits
        self._text = text
        self._made = 0
        self._max_nodes, self._max_depth = limits.max_nodes, limits.max_depth
        #: the keys (nodes) and indexes from the root to the node being composed: its depth too
        self._path: list[Any] = []
        self._root: Any = None

    # composing: called by the composer (libyaml's or PyYAML's) around every node it makes; the
    # cost of a job's parse is these two calls per node
    def descend_resolver(self, parent: Any, index: Any) -> None:
        path = self._path
        path.append(index)
        self._made += 1
        if self._made > self._max_nodes or len(path) > self._max_depth:
            raise self._composing(parent, index)

    def ascend_resolver(self) -> None:
        self._path.pop()

    def _composing(self, parent: Any, index: Any) -> LimitExceeded:
        if self._made > self._max_nodes:
            message, limit = f"more than {self._max_nodes} values (limit max_nodes)", "max_nodes"
        else:
            message, limit = f"nested deeper than {self._max_depth} levels (limit max_depth)", "max_depth"
        path = tuple(_key(item) for item in self._path[1:-1])
        if index is not None:
            path += (_key(index),)
        at = index if isinstance(index, yaml.Node) else parent
        return LimitExceeded(message, limit, path=path, line=at.start_mark.line + 1 if at is not None else None)

    def load_node(self) -> Any:
        """The document's root node (None for an empty document), every limit checked."""
        check_size(self._text, self.limits)
        try:
            root = self.get_single_node()
        except RecursionError:  # PyYAML's own composer, without libyaml: it recurses per level
            raise LimitExceeded(f"nested deeper than {self.limits.max_depth} levels (limit max_depth)",
                                "max_depth") from None
        self._root = root
        if root is not None and self._may_expand():
            _measure(root, self.limits)
        return root

    def _may_expand(self) -> bool:
        """Whether the composed graph may hold more than the composer counted: aliases (their
        ``*``), or a string over ``max_string`` (only in a text longer than that)."""
        text = self._text
        star = "*" if isinstance(text, str) else b"*"
        return star in text or len(text) > self.limits.max_string

    def construct_yaml_int(self, node: Any) -> int:
        if len(node.value) > self.limits.max_int_digits:
            raise LimitExceeded(f"an integer of {len(node.value)} characters; at most "
                                f"{self.limits.max_int_digits} (limit max_int_digits)", "max_int_digits",
                                path=_path_to(self._root, node), line=node.start_mark.line + 1)
        return super().construct_yaml_int(node)


def bounded_loader(base: type) -> type:
    """A loader class: ``base`` (a PyYAML safe loader) with :class:`Bounds`."""
    loader = type(f"Bounded{base.__name__}", (Bounds, base), {"__doc__": Bounds.__doc__})
    loader.add_constructor("tag:yaml.org,2002:int", Bounds.construct_yaml_int)
    return loader


#: the project's safe loader (libyaml's when present) within :class:`Limits`: ``load_node()`` then
#: ``construct_document(node)``, or :func:`load`
BoundedLoader = bounded_loader(SafeLoader)


def _key(item: Any) -> Any:
    """A path element from what the composer passes as ``index``: a key node or a list index."""
    if isinstance(item, _Scalar):
        return item.value
    return "?" if item is None or isinstance(item, yaml.Node) else item


def _measure(root: Any, limits: Limits) -> None:
    """Count ``root``'s graph as if every alias were expanded (each node visited once, its
    totals memoized); LimitExceeded at the first node over a limit, or an alias to an ancestor."""
    totals: dict[int, tuple[int, int, int]] = {}  # id(node) -> (values, characters, depth)
    active: set[int] = set()  # the nodes from the root to the one being counted
    seen = {id(root)}  # every node reached: reaching one again is an alias
    aliases = 0
    stack = [root]
    while stack:
        node = stack[-1]
        key = id(node)
        if key in totals:
            stack.pop()
            continue
        if node.__class__ is _Scalar:
            size = len(node.value)
            if size > limits.max_string:
                raise _over(root, node, f"a string of {size} characters; at most {limits.max_string} "
                                        "(limit max_string)", "max_string")
            totals[key] = (1, size, 1)
            stack.pop()
            continue
        children = node.value if node.__class__ is _Sequence else [n for pair in node.value for n in pair]
        if key not in active:
            active.add(key)
            for child in children:
                child_key = id(child)
                if child_key in seen:
                    if child_key in active:
                        raise _over(root, node, "an alias to a value that contains it: it nests without end "
                                                "(limit max_depth)", "max_depth")
                    aliases += 1
                    if aliases > limits.max_aliases:
                        raise _over(root, node, f"more than {limits.max_aliases} aliases (limit max_aliases)",
                                    "max_aliases")
                else:
                    seen.add(child_key)
                if child_key not in totals:
                    stack.append(child)
            continue
        active.discard(key)
        stack.pop()
        values, chars, depth = 1, 0, 0
        for child in children:
            c_values, c_chars, c_depth = totals[id(child)]
            values += c_values
            chars += c_chars
            depth = max(depth, c_depth)
        depth += 1
        totals[key] = (values, chars, depth)
        if values > limits.max_nodes:
            raise _over(root, node, f"{values} values once its aliases are expanded; at most {limits.max_nodes} "
                                    "(limit max_nodes)", "max_nodes")
        if chars > limits.max_expanded_bytes:
            raise _over(root, node, f"{chars} characters of text once its aliases are expanded; at most "
                                    f"{limits.max_expanded_bytes} (limit max_expanded_bytes)", "max_expanded_bytes")
        if depth > limits.max_depth:
            raise _over(root, node, f"nested {depth} levels deep through aliases; at most {limits.max_depth} "
                                    "(limit max_depth)", "max_depth")


def _over(root: Any, node: Any, message: str, limit: str) -> LimitExceeded:
    return LimitExceeded(message, limit, path=_path_to(root, node), line=node.start_mark.line + 1)


def _path_to(root: Any, target: Any) -> tuple:
    """The keys from ``root`` to ``target`` (its first occurrence), for an error message."""
    if root is None:
        return ()
    seen = {id(root)}
    stack: list[tuple[Any, tuple]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if node.__class__ is _Sequence:
            items = [(child, path + (index,)) for index, child in enumerate(node.value)]
        elif node.__class__ is _Mapping:
            items = [(value, path + (_key(key),)) for key, value in node.value]
        else:
            continue
        for child, child_path in reversed(items):
            if id(child) not in seen:
                seen.add(id(child))
                stack.append((child, child_path))
    return ()


class Document(NamedTuple):
    """A loaded YAML document: its root node (for lines) and its data."""

    node: Any
    data: Any


def load(text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> Document:
    """Parse one YAML document within ``limits``: yaml.YAMLError (LimitExceeded for a limit)."""
    loader = BoundedLoader(text, limits)
    try:
        node = loader.load_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return Document(node, data)


def load_data(text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """The data of one YAML document within ``limits`` (``yaml.safe_load``, bounded)."""
    return load(text, limits).data


def load_mapping_file(path: str | os.PathLike, what: str, limits: Limits = DEFAULT_LIMITS) -> dict:
    """The YAML mapping in the file ``path`` (``what`` it is, for the messages), within ``limits``:
    ValueError saying what is wrong with which file."""
    import yaml

    try:
        data = load_data(Path(path).read_text(encoding="utf-8"), limits)
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"the {what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"the {what} {path} must be a YAML mapping")
    return data


# ---- JSON ----

def load_json(text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """``json.loads`` within ``limits``: size, depth and integer lengths. A syntax error
    is a ``json.JSONDecodeError`` (with its line and column), a limit a LimitExceeded."""
    check_size(text, limits)

    def parse_int(literal: str) -> int:
        if len(literal) > limits.max_int_digits:
            raise LimitExceeded(f"an integer of {len(literal)} characters; at most {limits.max_int_digits} "
                                "(limit max_int_digits)", "max_int_digits")
        return int(literal)

    try:
        data = json.loads(text, parse_int=parse_int)
    except RecursionError:
        raise LimitExceeded(f"nested deeper than {limits.max_depth} levels (limit max_depth)", "max_depth") from None
    opening = (text.count("[") + text.count("{")) if isinstance(text, str) else (text.count(b"[") + text.count(b"{"))
    if opening > limits.max_depth:
        _check_json_depth(data, limits)
    return data


def _check_json_depth(data: Any, limits: Limits) -> None:
    """LimitExceeded when parsed JSON nests deeper than ``max_depth``. (Its strings are bounded by
    the size alone: a JSON body carries whole documents, a job definition, a bundle, as strings.)"""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Iterable[Any] = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limits.max_depth:
            raise LimitExceeded(f"nested deeper than {limits.max_depth} levels (limit max_depth)", "max_depth")
        stack.extend((child, depth + 1) for child in children)
