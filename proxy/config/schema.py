"""The config's keys as data, read off the models: path, type, default, text, since.

Three users, one walk: the config reference (``docs/config.md``, ``python -m
proxy.docs``), ``aiolb check --print`` (the effective config: every default filled in,
durations and sizes written as ``5s`` and ``64KiB``, secrets hidden) and the test that
keeps ``config/aiolb.yaml`` listing every key.

Paths read as the YAML does: ``listeners[].routes[].pool`` (``[]``: each list item),
``pools.<name>.retries.attempts`` (``<name>``: each key of a mapping the operator
names). ``pools.<name>.balancer`` is one key (a name, or a mapping of the name and its
options; the options are ``BALANCER_OPTIONS``), and so is a route's ``filters`` list;
``filter_keys`` walks each filter's options at the path the YAML gives them
(``listeners[].routes[].filters[].rate_limit.burst``). A field's ``json_schema_extra`` may say
``since`` (the version that added the key; default ``FIRST_VERSION``) and ``secret``
(never printed).
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from proxy.config.balancer import BALANCER_OPTIONS, BalancerSpec
from proxy.config.base import Kind
from proxy.config.filters import FILTER_OPTIONS, FilterOptions, PythonOptions
from proxy.config.models import Config
from proxy.config.values import format_duration, format_size

#: The version of the first release: every key without a ``since`` has been there since.
FIRST_VERSION: Final = "0.1.0"
#: What ``aiolb check --print`` shows instead of a secret.
HIDDEN: Final = "<hidden>"
#: Models written as one key in YAML (a scalar or a mapping of options).
LEAVES: Final = frozenset({BalancerSpec})

_NONE = type(None)
_BOUNDS: Final = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"),
                  (annotated_types.Le, "le", "<="), (annotated_types.Lt, "lt", "<"))  # fmt: skip
_PLAIN: Final = {bool: "boolean", int: "integer", float: "number", str: "string"}


@dataclass(frozen=True)
class Key:
    """One config key."""

    path: str
    field: FieldInfo
    #: the model of the key's value when it is a section (else None)
    section: type[BaseModel] | None = None
    #: where the keys inside a section are: ``listeners[]``, ``pools.<name>``, ``admin``
    inner: str = ""

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def type(self) -> str:
        return describe(self.field)

    @property
    def default(self) -> str:
        """The default as YAML would write it, or ``required``."""
        if self.field.is_required():
            return "required"
        value = self.field.get_default(call_default_factory=True)
        if self.section is not None and isinstance(value, BaseModel | dict | list):
            return "{}"  # on, with the defaults of the keys inside
        return flow(render_value(self.field, value))

    @property
    def text(self) -> str:
        return " ".join((self.field.description or "").split())

    @property
    def since(self) -> str:
        return str(_extra(self.field).get("since", FIRST_VERSION))

    @property
    def secret(self) -> bool:
        return bool(_extra(self.field).get("secret", False))


def keys(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[Key]:
    """Every key of ``model``, sections before the keys inside them, in field order."""
    for name, field in model.model_fields.items():
        name = field.alias or name
        path = f"{prefix}.{name}" if prefix else name
        nested, shape = _nested(field.annotation)
        section = nested if nested is not None and nested not in LEAVES else None
        yield Key(path, field, section, path + shape if section is not None else "")
        if section is not None:
            yield from keys(section, path + shape)


#: Where a route's filters are: ``listeners[].routes[].filters[]``.
FILTERS_AT: Final = "listeners[].routes[].filters[]"


def filter_prefix(name: str) -> str:
    """Where filter ``name``'s options are (a python filter's beside ``python``)."""
    return FILTERS_AT if name == "python" else f"{FILTERS_AT}.{name}"


def filter_keys() -> Iterator[Key]:
    """Every option of every filter (``FILTER_OPTIONS``), at its YAML path."""
    for name, model in FILTER_OPTIONS.items():
        yield from keys(model, filter_prefix(name))


def _nested(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model inside ``annotation`` (through ``| None``, lists and mappings) and how
    the path goes into it: ``""``, ``"[]"`` or ``".<name>"``."""
    for arg in (annotation, *_union_members(annotation)):
        origin = get_origin(arg)
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, ""
        if origin is list and _is_model(get_args(arg)[0]):
            return get_args(arg)[0], "[]"
        if origin is dict and _is_model(get_args(arg)[1]):
            return get_args(arg)[1], ".<name>"
    return None, ""


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(arg for arg in get_args(annotation) if arg is not _NONE)
    return ()


def _extra(field: FieldInfo) -> Mapping[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, Mapping) else {}


# --- types ---------------------------------------------------------------------------


def describe(field: FieldInfo) -> str:
    """The key's type in words: ``duration > 0``, ``integer >= 1 or null``, ``section``."""
    return _describe(field.annotation, list(field.metadata))


def _describe(annotation: Any, metadata: list[Any]) -> str:
    if get_origin(annotation) is Annotated:
        base, *extra = get_args(annotation)
        return _describe(base, [*extra, *metadata])
    members = _union_members(annotation)
    null = " or null" if members and _NONE in get_args(annotation) else ""
    kind = next((meta for meta in _flat(metadata) if isinstance(meta, Kind)), None)
    if kind is not None:
        return kind.label + _bounds(metadata) + null
    if members:
        return " or ".join(_describe(member, metadata) for member in members) + null
    return _word(annotation) + _bounds(metadata)


def _word(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " or ".join(f"`{value}`" for value in get_args(annotation))
    if annotation in LEAVES:
        return "name or mapping"
    if _is_model(annotation):
        return "section"
    if origin is list:
        return "list of sections" if _is_model(get_args(annotation)[0]) else "list"
    if origin is dict:
        return "mapping of names to sections" if _is_model(get_args(annotation)[1]) else "mapping"
    return _PLAIN.get(annotation, str(annotation))


def _flat(metadata: list[Any]) -> Iterator[Any]:
    """Metadata with nested ``Field(...)`` objects opened up."""
    for meta in metadata:
        if isinstance(meta, FieldInfo):
            yield from _flat(list(meta.metadata))
        else:
            yield meta


def _bounds(metadata: list[Any]) -> str:
    """`` >= 1``, `` >= 0, <= 100``: the numeric bounds in ``metadata``."""
    found = [
        f"{sign} {getattr(meta, attribute)}"
        for meta in _flat(metadata)
        for kind, attribute, sign in _BOUNDS
        if isinstance(meta, kind)
    ]
    return " " + ", ".join(found) if found else ""


# --- values ----------------------------------------------------------------------------


def effective(config: Config) -> dict[str, Any]:
    """``config`` as plain YAML data: every key with its value (defaults included),
    durations and sizes in their short forms, secrets replaced by ``HIDDEN``."""
    return _render(config, config.model_dump(mode="json"))


#: Stands for a route's default name in ``effective_yaml`` until it becomes a comment.
_DEFAULT_NAME = "__aiolb_default_name__"


def effective_yaml(config: Config) -> str:
    """``effective(config)`` as YAML (what ``aiolb check --print`` shows); a route
    without a name says which it has: ``name: null  # public/0``. The text loads as
    the same config."""
    data = effective(config)
    for listener, spec in zip(data["listeners"], config.listeners, strict=True):
        for route, name in zip(listener["routes"], spec.route_names(), strict=True):
            if route["name"] is None:
                route["name"] = _DEFAULT_NAME + name
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return re.sub(rf"\bname: {_DEFAULT_NAME}(\S+)", r"name: null  # \1", text)


def _render(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    return {
        field.alias or name: render_value(field, getattr(model, name), dumped[field.alias or name])
        for name, field in type(model).model_fields.items()
    }


def _filter(spec: FilterOptions) -> dict[str, Any]:
    """A filter as YAML writes it: ``{rate_limit: {rate: 100/s, ...}}``."""
    dumped = spec.model_dump(mode="json")
    if isinstance(spec, PythonOptions):
        return dict(dumped)
    return {spec.NAME: _render(spec, dumped[spec.NAME])}


def render_value(field: FieldInfo, value: Any, dumped: Any = None) -> Any:
    """One key's value as YAML data; ``dumped`` is its ``model_dump(mode="json")`` form
    (computed when not given)."""
    if value is None:
        return None
    if _extra(field).get("secret"):
        return HIDDEN
    if dumped is None:
        dumped = _dump(field, value)
    if isinstance(value, BalancerSpec):
        return _balancer(value)
    if isinstance(value, list) and value and isinstance(value[0], FilterOptions):
        return [_filter(item) for item in value]
    if isinstance(value, BaseModel):
        return _render(value, dumped) if isinstance(dumped, dict) else dumped
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return [_render(item, data) for item, data in zip(value, dumped, strict=True)]
    if isinstance(value, dict) and value and isinstance(next(iter(value.values())), BaseModel):
        return {name: _render(item, dumped[name]) for name, item in value.items()}
    label = _kind(field)
    if label == "duration":
        return format_duration(value)
    if label == "size":
        return format_size(value)
    return dumped


def _dump(field: FieldInfo, value: Any) -> Any:
    """``value`` as the field serializes it (``model_dump(mode="json")``)."""
    metadata = tuple(field.metadata)
    annotation: Any = Annotated[(field.annotation, *metadata)] if metadata else field.annotation
    return TypeAdapter(annotation).dump_python(value, mode="json")


def _balancer(spec: BalancerSpec) -> str | dict[str, Any]:
    """``round_robin``, or ``{name: peak_ewma, decay: 10s}``: the YAML short form."""
    model = BALANCER_OPTIONS.get(spec.name)
    if model is None:
        return spec.name
    options = model.model_validate(spec.options)
    return {"name": spec.name, **_render(options, options.model_dump(mode="json"))}


def _kind(field: FieldInfo) -> str | None:
    """The ``Kind`` label of a field's value (through ``| None``), if it has one."""
    metadata = list(field.metadata)
    for member in (field.annotation, *_union_members(field.annotation)):
        if get_origin(member) is Annotated:
            metadata += get_args(member)[1:]
    kinds = [meta.label for meta in _flat(metadata) if isinstance(meta, Kind)]
    return kinds[0] if kinds else None


def flow(value: Any) -> str:
    """A value in YAML flow style, as a config file would write it: ``null``, ``5s``,
    ``[connect_failure, reset_before_response]``, ``{}``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(flow(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and (not value or value[0] in "$[{\"'" or ": " in value):
        return repr(value)
    return str(value)
