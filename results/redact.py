"""A job definition as it may be shown or sent: the values under its ``secrets:`` replaced.

A job's ``secrets:`` (LAVA: a mapping of names to values the job uses, e.g. a token for an
artifact server) go to the worker that runs the job and nowhere else. Every other place that shows
or sends the definition (the API, XML-RPC, callbacks, the store and the site) takes it through
:func:`redact_definition`: the text keeps its layout and comments, and each value of the mapping
becomes :data:`REDACTED`. Values are found by their position in the YAML (not by searching for the
text), so a short secret never garbles the rest of the job.
"""

from __future__ import annotations

import yaml

#: what a secret's value reads as wherever a definition is shown
REDACTED = "[redacted]"


def _secret_spans(text: str) -> list[tuple[int, int]] | None:
    """The character spans of the values under the top-level ``secrets:`` mapping; None when the
    text does not parse (nothing can be located, so nothing may be shown: the caller hides it)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    if not isinstance(root, yaml.MappingNode):
        return []
    spans: list[tuple[int, int]] = []
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "secrets":
            nodes = [v for _, v in value.value] if isinstance(value, yaml.MappingNode) else [value]
            for node in nodes:
                if node.value not in ("", None):
                    spans.append((node.start_mark.index, node.end_mark.index))
    return spans


def redact_definition(text: str) -> str:
    """``text`` with every value of its ``secrets:`` mapping replaced by :data:`REDACTED` (the text
    itself when it has no secrets). A definition that does not parse and mentions ``secrets`` is
    replaced whole: its secrets cannot be located."""
    if "secrets" not in text:  # the common case costs a substring search
        return text
    spans = _secret_spans(text)
    if spans is None:
        return f"# {REDACTED}: this job definition has secrets and does not parse\n"
    for start, end in sorted(spans, reverse=True):
        # a block scalar's span (``|``, ``>``) ends after its last line break: keep the breaks
        value = text[start:end]
        end -= len(value) - len(value.rstrip("\r\n"))
        text = text[:start] + f'"{REDACTED}"' + text[end:]
    return text
