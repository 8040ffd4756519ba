"""Load a YAML config file into a ``Config``, or fail with every problem at once.

Every problem is one line, ``FILE:LINE: dotted.path: message``, for example
``config/x.yaml:14: pools.web.upstreams[1].weight: must be >= 1``, where FILE is the
path as the caller passed it. A missing key is reported at the line and path of the
mapping that lacks it (``listeners[0]: missing required key 'bind'``), an unknown key
at its own line. Problems are sorted by line. Problems that have no line (the file
cannot be read) are ``FILE: message``; YAML syntax errors stop at the first one, since
nothing after it can be trusted. ``ConfigError`` carries the lines in ``.problems``;
``str()`` joins them with newlines, ready for stderr.

``load_document`` also keeps the line of every key (a ``Document``), so that checks
made after validation (``proxy.runtime.preflight``) and failures at start-up (a port
in use) can point at the key to change, in the same ``FILE:LINE: key: message`` form.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from proxy.config.filters import yaml_loc
from proxy.config.models import Config
from proxy.config.source import Path, Source, read_source

_IDENTIFIER = re.compile(r"[A-Za-z0-9_-]+")
_PREFIXES = ("Value error, ", "Assertion failed, ")

# Pydantic's messages, rewritten to read like the rest of the file's errors.
_MESSAGES: Mapping[str, str] = MappingProxyType(
    {
        "greater_than_equal": "must be >= {ge}",
        "greater_than": "must be > {gt}",
        "less_than_equal": "must be <= {le}",
        "less_than": "must be < {lt}",
        "too_short": "must have at least {min_length} entry",
        "string_too_short": "must not be empty",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be a whole number",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "finite_number": "must be a finite number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "dict_type": "must be a mapping",
        "model_type": "must be a mapping",
        "model_attributes_type": "must be a mapping",
        "literal_error": "unknown value {input!r}; expected {expected}",
        "union_tag_invalid": "unknown filter {tag!r}; filters: {expected_tags}",
        "union_tag_not_found": "a filter is a name or a mapping such as "
        "{{rate_limit: {{rate: 100/s}}}}",
    }
)


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one ``FILE:LINE: ...`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Document:
    """A validated config, the name of its file, and the line of every key in it."""

    config: Config
    name: str
    lines: Mapping[Path, int]

    def problem(self, loc: Path, message: str) -> str:
        """``FILE:LINE: key: message`` for ``loc`` (the line of its nearest key that
        appears in the file: a default that was left out points at its section)."""
        return _format(self.name, _line(self.lines, loc), _where(loc), message)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, expand, parse and validate the YAML file at ``path``.

    ``env`` replaces ``os.environ`` for ``${VAR}`` expansion (tests). Raises
    ``ConfigError`` listing every problem found; never another exception for a bad file.
    """
    return load_document(path, env).config


def load_document(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Document:
    """``load_config``, keeping the file's name and lines (a ``Document``)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError([f"{name}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{name}:{line}: not valid UTF-8 text"]) from None
    return parse_document(text, name, env)


def parse_config(text: str, name: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    """Like ``load_config`` for YAML already in memory; ``name`` stands in for FILE."""
    return parse_document(text, name, env).config


def parse_document(
    text: str, name: str = "<config>", env: Mapping[str, str] | None = None
) -> Document:
    """Like ``load_document`` for YAML already in memory."""
    source = _read(text, name, os.environ if env is None else env)
    data = source.data
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else "a single value"
        line = source.lines[()]
        raise ConfigError([f"{name}:{line}: top level must be a mapping of sections, not {kind}"])
    found = [(line, _where(path), text) for path, line, text in source.problems]
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        found += _validation_problems(exc, source)
    if found:
        found.sort(key=lambda problem: problem[0])  # stable: same-line order kept
        raise ConfigError([_format(name, *problem) for problem in found])
    return Document(config, name, MappingProxyType(source.lines))


def _read(text: str, name: str, env: Mapping[str, str]) -> Source:
    try:
        source = read_source(text, env)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f":{mark.line + 1}" if mark is not None else ""
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        raise ConfigError([f"{name}{at}: YAML syntax error: {exc.problem}{context}"]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        message = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        raise ConfigError([f"{name}:{line}: YAML syntax error: {message}"]) from None
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error is one of the above
        raise ConfigError([f"{name}: YAML error: {exc}"]) from None
    if source.empty or source.data is None:
        raise ConfigError([f"{name}:1: the file is empty; expected 'listeners' and 'pools'"])
    return source


def _validation_problems(exc: ValidationError, source: Source) -> list[tuple[int, str, str]]:
    """``(line, where, message)`` per error, except those caused by a placeholder value
    (an unset variable was already reported; its empty stand-in needs no second line)."""
    found = []
    for error in exc.errors():
        loc = yaml_loc(tuple(part for part in error["loc"] if part != "[key]"))
        if any(loc[: len(path)] == path for path in source.placeholders):
            continue
        at, message = explain(error, loc)
        found.append((_line(source.lines, at), _where(at), message))
    return found


def _line(lines: Mapping[Path, int], loc: Path) -> int:
    """The line of ``loc``, or of its nearest ancestor that appears in the file."""
    for end in range(len(loc), -1, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return line
    return 1


def explain(error: ErrorDetails, loc: Path) -> tuple[Path, str]:
    """Where a pydantic error at ``loc`` is reported (a missing key: at the mapping that
    lacks it) and its message in the words of this file's other errors."""
    return (loc[:-1] if error["type"] == "missing" else loc), _message(error)


def _message(error: ErrorDetails) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "missing":
        return f"missing required key {loc[-1]!r}"
    if kind == "extra_forbidden":
        return f"unknown key {loc[-1]!r}"
    template = _MESSAGES.get(kind)
    if template is not None:
        return template.format(input=error["input"], **error.get("ctx", {}))
    message = error["msg"]
    for prefix in _PREFIXES:
        message = message.removeprefix(prefix)
    return message[:1].lower() + message[1:]


def _where(loc: Path) -> str:
    """``("pools", "web", "upstreams", 1, "weight")`` -> ``pools.web.upstreams[1].weight``."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _IDENTIFIER.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{str(part)!r}]"
    return out


def _format(name: str, line: int, where: str, message: str) -> str:
    return f"{name}:{line}: {where}: {message}" if where else f"{name}:{line}: {message}"
