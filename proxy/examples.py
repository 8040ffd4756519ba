"""The example configs (``config/*.yaml`` in the repository), shipped in the package as
``proxy.example_configs`` so that ``aiolb example`` reaches them after ``pip install``.

``pyproject.toml`` maps that package to the repository's ``config/`` folder, so the
files are not copied in the source tree; a checkout that was never installed reads the
folder itself.
"""

from __future__ import annotations

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
    """The text of example ``name`` (``aiolb`` or ``aiolb.yaml``), or None."""
    name = name.removesuffix(".yaml")
    if name not in examples():
        return None
    return (_folder() / f"{name}.yaml").read_text()


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
    end = sentence.find(". ")
    return sentence[: end + 1] if end >= 0 else sentence
