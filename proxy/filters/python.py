"""``python``: a filter class of the user's own, ``module:Class``.

``load(path, folder)`` imports ``module`` (from the Python path, else from ``folder``,
the config file's folder, so that a filter can sit next to its config, else from the
example configs: ``example_filter`` of ``aiolb example filters``) and finds
``Class`` in it (``Outer.Inner`` works too); it must be a subclass of
``proxy.filters.Filter``. ``options(cls, raw)`` validates the
config's ``options`` with the class's ``Options`` model, when it has one. The
preflight (``aiolb check``, ``run``, reloads) does both and builds the filter once, so
a class that does not import, options it refuses and an ``__init__`` that raises are
``FILE:LINE`` findings, never a failure at start.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from proxy.filters.base import Filter

if TYPE_CHECKING:
    from proxy.config.filters import PythonOptions
    from proxy.filters.context import Site


class LoadError(Exception):
    """The class cannot be used; the message says why, in a line."""


def load(path: str, folder: str | None = None) -> type[Filter]:
    """The class ``module:Class`` names; ``LoadError`` when that is not a filter."""
    module_name, _, attribute = path.partition(":")
    try:
        found: Any = _import(module_name, folder)
    except Exception as exc:  # ImportError, or anything the module raised while importing
        raise LoadError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise LoadError(f"module {module_name} has no {attribute}")
    if not isinstance(found, type) or not issubclass(found, Filter):
        raise LoadError(f"{path} is not a subclass of proxy.filters.Filter")
    return found


def _import(name: str, folder: str | None) -> Any:
    """``import name``, looking in ``folder`` too when the Python path lacks it, and
    last in the example configs' folder (``example_filter``: ``aiolb example filters``
    runs as printed, and a copy next to the config wins)."""
    from proxy.examples import module_folder

    top = name.partition(".")[0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != top:
            raise
        missing = exc
    for extra in (folder, module_folder(top)):
        if extra is None:
            continue
        sys.path.append(extra)
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != top:
                raise
        finally:
            sys.path.remove(extra)
    raise missing


def options(cls: type[Filter], raw: dict[str, Any]) -> Any:
    """``raw`` validated by ``cls.Options`` (pydantic's ``ValidationError`` if refused),
    or ``raw`` itself when the class has no ``Options``."""
    model = cls.Options
    return raw if model is None else model.model_validate(raw)


def build(spec: PythonOptions, site: Site) -> Filter:
    """The user's filter for ``spec`` (the preflight made sure this works)."""
    cls = load(spec.python, site.context.folder)
    return cls(options(cls, spec.options))
