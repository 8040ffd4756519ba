"""The ``balancer`` of a pool: the algorithms' names and the options of those that take some.

``BALANCER_NAMES`` and ``BalancerName`` name exactly the keys of
``proxy.balancing.REGISTRY`` (a test checks it); ``BALANCER_OPTIONS`` holds the options
model of each algorithm that takes options, and ``BalancerSpec`` reads either form YAML
allows and validates the options with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from proxy.config.base import ConfigModel, Duration
from proxy.config.keys import parse_key

# The names of ``proxy.balancing.REGISTRY``'s keys, exactly (a test checks it): adding
# an algorithm adds its name here.
BalancerName = Literal[
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "random",
    "power_of_two",
    "ip_hash",
    "consistent_hash",
    "peak_ewma",
]
BALANCER_NAMES: tuple[str, ...] = get_args(BalancerName)


def _option_problems(name: str, exc: ValidationError) -> str:
    found = "; ".join(_option_problem(error) for error in exc.errors())
    return f"invalid options for balancer {name!r}: {found}"


def _option_problem(error: ErrorDetails) -> str:
    key = ".".join(map(str, error["loc"]))
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "extra_forbidden":
        return f"unknown option {key!r}"
    if kind == "missing":
        return f"option {key!r} is required"
    if kind == "greater_than":
        return f"{key}: must be > {ctx['gt']}"
    return f"{key}: {error['msg'].removeprefix('Value error, ')}"


class ConsistentHashOptions(ConfigModel):
    """``consistent_hash``: ``key`` is ``header:NAME``, ``cookie:NAME``, ``query:NAME``,
    ``path`` or ``client_ip`` (see ``proxy.config.keys``)."""

    key: str
    """What to hash: ``header:NAME``, ``cookie:NAME``, ``query:NAME``, ``path`` or
    ``client_ip``."""

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        parse_key(value)  # raises ValueError naming the accepted forms
        return value


#: ``peak_ewma``'s ``decay`` when the options leave it out, in seconds.
DEFAULT_DECAY: Final = 10.0


class PeakEwmaOptions(ConfigModel):
    """``peak_ewma``: ``decay``, how long latencies are remembered (see
    ``proxy.balancing.peak_ewma``)."""

    decay: Annotated[Duration, Field(gt=0)] = DEFAULT_DECAY
    """How long latencies are remembered."""


#: Options model per balancer name; a balancer not listed here takes no options.
#: The pool hands the balancer the validated values (durations in seconds, defaults
#: filled in), not what the YAML said.
BALANCER_OPTIONS: Mapping[str, type[BaseModel]] = MappingProxyType(
    {"consistent_hash": ConsistentHashOptions, "peak_ewma": PeakEwmaOptions}
)


class BalancerSpec(ConfigModel):
    """Which algorithm a pool uses, and its options.

    YAML takes either a name (``balancer: round_robin``) or a mapping whose ``name`` is
    the algorithm and whose other keys are its options (``{name: consistent_hash, key:
    "header:X-User"}``); the dumped form ``{name: ..., options: {...}}`` is accepted too.
    """

    name: BalancerName = "round_robin"
    """The algorithm."""
    options: dict[str, Any] = {}
    """The algorithm's options (in YAML, the mapping's other keys)."""

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        if not isinstance(data, Mapping):
            return data
        if set(data) <= {"name", "options"} and isinstance(data.get("options", {}), Mapping):
            return data
        options = {key: value for key, value in data.items() if key != "name"}
        return {"name": data["name"], "options": options} if "name" in data else data

    @model_validator(mode="after")
    def _check_options(self) -> BalancerSpec:
        model = BALANCER_OPTIONS.get(self.name)
        if model is None and self.options:
            keys = ", ".join(repr(key) for key in self.options)
            raise ValueError(f"balancer {self.name!r} takes no options, got {keys}")
        if model is not None:
            try:
                parsed = model.model_validate(self.options)
            except ValidationError as exc:
                raise ValueError(_option_problems(self.name, exc)) from None
            # frozen: store the validated values once, as the balancer will read them
            object.__setattr__(self, "options", parsed.model_dump())
        return self
