"""The example configs (``config/*.yaml`` in the repository), shipped in the package as
``proxy.example_configs`` so that ``aiolb example`` reaches them after ``pip install``.

``pyproject.toml`` maps that package to the repository's ``config/`` folder, so the
files are not copied in the source tree; a checkout that was never installed reads the
folder itself.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

PACKAGE = "proxy.example_configs"


def _folder() -> Traversable:
    try:
        return resources.files(PACKAGE)
    except ModuleNotFoundError:  # a source checkout that was not installed
        return Path(__file__).resolve().parents[1] / "config"


def examples() -> dict[str, str]:
    """Example name (the file name without ``.yaml``) -> its first comment line."""
    found = {}
    for entry in sorted(_folder().iterdir(), key=lambda entry: entry.name):
        if entry.name.endswith(".yaml"):
            found[entry.name.removesuffix(".yaml")] = _summary(entry.read_text())
    return found


def example_text(name: str) -> str | None:
    """The text of example ``name`` (``aiolb`` or ``aiolb.yaml``), or of a Python module
    an example names (``example_filter.py``), or None."""
    if name.endswith(".py"):
        entry = _folder() / name
        return entry.read_text() if "/" not in name and entry.is_file() else None
    name = name.removesuffix(".yaml")
    if name not in examples():
        return None
    return (_folder() / f"{name}.yaml").read_text()


def module_folder(module: str) -> str | None:
    """The folder holding the examples' own Python module ``module`` (a top-level name,
    ``example_filter``), or None when they have none: the ``python`` filter's last
    place to look, so that ``aiolb example filters`` runs as printed."""
    entry = _folder() / f"{module}.py"
    if isinstance(entry, Path) and entry.is_file():
        return str(entry.parent)
    return None


def _summary(text: str) -> str:
    """The first sentence of the opening comment, without an ``aiolb:`` prefix."""
    words: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#") or not line.strip("# "):
            if words:
                break
            continue
        words += line.lstrip("#").split()
    sentence = " ".join(words).removeprefix("aiolb:").strip()
    for end in re.finditer(r"\.(?= )", sentence):
        if sentence[: end.start()].rpartition(" ")[2].lower() not in _ABBREVIATIONS:
            return sentence[: end.end()]
    return sentence


#: Words whose period does not end a sentence (``e.g.`` in the ``limits`` example).
_ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "cf", "approx"})
