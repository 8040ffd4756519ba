"""pyproject.toml: every package is listed (the list is explicit so that the example
configs can ship as ``proxy.example_configs``), the extras are what README and CI use."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_is_listed() -> None:
    found = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "proxy").rglob("__init__.py")
    }
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == found | {"proxy.example_configs"}


def test_the_example_configs_ship_with_the_package() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"proxy.example_configs": "config"}
    assert setuptools["package-data"]["proxy.example_configs"] == ["*.yaml"]
    assert sorted((REPO / "config").glob("*.yaml")), "no example configs"


def test_linters_are_a_dev_extra_and_ci_installs_both() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {extra: {req.split(">")[0].split("=")[0] for req in reqs}
             for extra, reqs in extras.items()}  # fmt: skip
    linters = {"ruff", "mypy", "import-linter"}
    assert linters <= names["dev"] and not linters & names["test"]
    assert {"pytest", "pytest-asyncio", "pytest-timeout"} <= names["test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q '.[test,dev]'" in ci
    assert "\nlint-imports\n" in ci and (REPO / ".importlinter").is_file()


def test_classifiers_and_bounds() -> None:
    project = PYPROJECT["project"]
    assert "Topic :: Internet :: Proxy Servers" in project["classifiers"]
    upper = [req for req in project["dependencies"] if "<" in req]
    assert upper == ["pydantic>=2.11,<3"]  # only where the next major is known to break


def test_the_redis_store_is_an_extra_the_tests_install() -> None:
    """The proxy starts without redis-py (it is imported only for a Redis store); the
    ``redis`` extra brings it, and the test extra too (the store's tests use it)."""
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    assert not [req for req in project["dependencies"] if req.startswith("redis")]
    assert "redis>=5.0.1" in extras["redis"] and "redis>=5.0.1" in extras["test"]
