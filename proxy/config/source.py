"""YAML text -> plain data, a line number for every key, and ``${VAR}`` expansion.

Theory of operation: ``yaml.compose`` (safe) gives a node tree whose nodes carry their
position. One walk over it builds the plain data (dicts, lists, scalars) that the
models validate, records for every path (``("pools", "web", "upstreams", 1)``) the
1-based line of its key (or of the list item), and expands environment variables in
scalar values, never in keys. Problems found on the way (an unset variable, a
duplicate key, a value YAML cannot construct) are collected with their path, so the
loader reports them together with the validation errors. Syntax errors abort the walk
and surface as ``yaml.YAMLError`` from ``read_source``.

Expansion: ``${VAR}`` is the variable's value and a problem if it is unset (under a
route's ``filters``, the request variables ``${client_ip}``, ``${request_id}`` and
``${host}`` are left for the filters);
``${VAR:-default}`` is the default when the variable is unset or empty (as in sh);
``$${`` is a literal ``${``. An expanded plain (unquoted) scalar is resolved again as
YAML, so ``${W:-2}`` is the int 2 and ``${B:-true}`` the bool true; a quoted one stays
a string.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[Any, ...]

_VAR = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_STR_TAG = "tag:yaml.org,2002:str"
#: ``${NAME}`` under a route's ``filters`` that is a request variable, not the
#: environment's (``proxy.config.filter_values.REQUEST_VARIABLES``)
REQUEST_VARIABLES = ("client_ip", "request_id", "host")
_SKIP = object()  # a key that could not be built: its entry is left out


def expand(
    text: str, env: Mapping[str, str], keep: Collection[str] = ()
) -> tuple[str, list[str]]:
    """``text`` with every ``${VAR}`` / ``${VAR:-default}`` replaced, and the unset names.

    An unset variable without a default is replaced by an empty string and its name is
    returned, so the caller can report every one of them. Names in ``keep`` are left as
    they are (``$${NAME}`` too): a route filter's request variables, not the
    environment's.
    """
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        escaped, name, default = match.groups()
        if name in keep and default is None:
            return match.group(0)
        if escaped:
            return match.group(0)[1:]
        value = env.get(name)
        if default is not None:
            return value or default
        if value is None:
            missing.append(name)
            return ""
        return value

    return _VAR.sub(replace, text), missing


@dataclass
class Source:
    """What the walk produced: ``data``, ``lines`` per path, ``problems`` as
    ``(path, line, text)``, the ``placeholders`` (paths whose value could not be built
    and stands in as None or ""), and whether the document was empty."""

    data: Any = None
    lines: dict[Path, int] = field(default_factory=dict)
    problems: list[tuple[Path, int, str]] = field(default_factory=list)
    placeholders: set[Path] = field(default_factory=set)
    empty: bool = False


def read_source(text: str, env: Mapping[str, str]) -> Source:
    """Walk the single YAML document in ``text``; raises ``yaml.YAMLError`` on bad syntax."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return Source(empty=True)
        return _Walk(loader, env).run(root)
    finally:
        loader.dispose()


class _Walk:
    """One walk over a node tree, filling one ``Source``."""

    def __init__(self, loader: yaml.SafeLoader, env: Mapping[str, str]) -> None:
        self.loader = loader
        self.env = env
        self.source = Source()
        self.active: set[int] = set()  # collection nodes being walked: catches alias loops

    def run(self, root: yaml.Node) -> Source:
        self.source.data = self.node(root, ())
        return self.source

    def problem(self, path: Path, node: yaml.Node, text: str) -> None:
        self.source.problems.append((path, node.start_mark.line + 1, text))

    def node(self, node: yaml.Node, path: Path) -> Any:
        self.source.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.active:
            self.problem(path, node, "recursive alias")
            self.source.placeholders.add(path)
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            return [self.node(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.active.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        self.loader.flatten_mapping(node)  # resolves ``<<`` merge keys
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node, path)
            if key is _SKIP:
                continue
            if key in out:
                self.problem((*path, key), key_node, f"duplicate key {key!r}")
                continue
            self.source.lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = self.node(value_node, (*path, key))
        return out

    def key(self, node: yaml.Node, path: Path) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(path, node, "keys must be plain scalars")
            return _SKIP
        return self.construct(node, path, _SKIP)

    def scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        if node.tag == _STR_TAG and "${" in node.value:
            keep = REQUEST_VARIABLES if _in_filters(path) else ()
            text, missing = expand(node.value, self.env, keep)
            for name in missing:
                self.problem(path, node, f"environment variable {name} is not set")
                self.source.placeholders.add(path)
            if node.style is not None:  # quoted or block scalar: stays a string
                return text
            # the stubs leave Resolver.resolve untyped; it returns the implicit tag
            tag = self.loader.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
            node = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark)
        return self.construct(node, path)

    def construct(self, node: yaml.ScalarNode, path: Path, failed: Any = None) -> Any:
        """The scalar's value, or ``failed`` after recording why YAML could not build it."""
        try:
            return self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError) as exc:
            reason = getattr(exc, "problem", None) or str(exc)
            self.problem(path, node, f"invalid YAML value: {reason}")
            self.source.placeholders.add(path)
            return failed


def _in_filters(path: Path) -> bool:
    """Inside a route's filters: ``listeners[i].routes[j].filters...``."""
    return len(path) > 4 and path[0] == "listeners" and path[2] == "routes" and (
        path[4] == "filters"
    )
