"""The documentation generated from the code stays the code's: ``config/aiolb.yaml``
lists every key the models have (and no other), and ``docs/config.md`` and
``docs/metrics.md`` are what ``python -m proxy.docs`` writes today."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from proxy.config.balancer import BALANCER_OPTIONS
from proxy.config.filters import FILTER_OPTIONS
from proxy.config.schema import FILTERS_AT, filter_keys, keys
from proxy.docs import REFERENCES, config_reference
from proxy.docs import main as docs_main

REPO = Path(__file__).parents[2]
DEFAULT_CONFIG = REPO / "config" / "aiolb.yaml"

#: ``  - key: value`` or ``    key:`` (a live key), and ``  #  key: value`` (a key the
#: file shows commented out, under a section that is off by default)
_KEY_LINE = re.compile(r"^\s*(?:#\s+)?(?P<dash>- )?(?P<key>[a-z_0-9]+):(?:\s|$)")


def outline(text: str) -> set[str]:
    """The key paths a YAML file shows, live or commented out, in ``proxy.config.schema``
    form (``pools.<name>.upstreams[].url``): nesting from the column each key starts at
    (a commented-out key sits where it would with its ``#`` turned into a space), keys of
    a flow mapping (``{base: 25ms, max: 250ms}``) under their key."""
    found: set[str] = set()
    stack: list[tuple[int, str]] = []  # (column, path) of the enclosing keys
    for line in text.splitlines():
        match = _KEY_LINE.match(line)
        if match is None or (line.lstrip().startswith("#") and not stack):
            continue
        column = match.end("dash") if match.group("dash") else match.start("key")
        while stack and stack[-1][0] >= column:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        path = _child(parent, match.group("key"))
        if not path.endswith(".<name>"):  # a pool's name is an entry, not a key
            found.add(path)
        stack.append((column, path))
        value = line[match.end() :].split(" #")[0].strip()
        if value.startswith("{") and not line.lstrip().startswith("#"):
            found |= {_child(path, key) for key in yaml.safe_load(value)}
    return found


def _child(parent: str, key: str) -> str:
    """``parent.key``, with list items as ``[]`` and named entries as ``<name>``."""
    if parent in _LISTS:
        parent += "[]"
    if parent in _NAMED:
        return f"{parent}.<name>"
    return f"{parent}.{key}" if parent else key


#: every key, every filter's options, and the filters' names (``filters[].rate_limit``)
_ALL = {key.path for key in (*keys(), *filter_keys())} | {
    f"{FILTERS_AT}.{name}" for name in FILTER_OPTIONS if name != "python"
}
_LISTS = {path[: match.start()] for path in _ALL for match in re.finditer(r"\[\]", path)}
_NAMED = {path.split(".<name>")[0] for path in _ALL if ".<name>" in path}


def test_the_default_config_lists_every_key_and_no_other() -> None:
    shown = outline(DEFAULT_CONFIG.read_text())
    assert sorted(_ALL - shown) == [], "keys config/aiolb.yaml does not show"
    assert sorted(shown - _ALL) == [], "keys config/aiolb.yaml shows that do not exist"


def test_the_outline_reads_live_commented_and_flow_keys() -> None:
    text = (
        "# aiolb: a comment at the top is prose\n"
        "pools:\n"
        "  web:\n"
        "    balancer: round_robin    # a trailing comment\n"
        "    upstreams:\n"
        "      - url: http://a\n"
        "      # name: app     (commented out: the key's column places it)\n"
        "    retries: {attempts: 2, budget: {percent: 5}}\n"
        "workers: 1\n"
    )
    assert outline(text) == {
        "pools", "pools.<name>.balancer", "pools.<name>.upstreams",
        "pools.<name>.upstreams[].url", "pools.<name>.upstreams[].name",
        "pools.<name>.retries", "pools.<name>.retries.attempts",
        "pools.<name>.retries.budget", "workers",
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_the_references_are_what_the_code_says(name: str) -> None:
    committed = (REPO / "docs" / name).read_text()
    assert committed == REFERENCES[name](), f"docs/{name} is stale: run python -m proxy.docs"


def test_the_config_reference_has_every_key() -> None:
    text = config_reference()
    for key in keys():
        parent = key.path.rsplit(".", 1)[0] if "." in key.path else ""
        heading = f"## `{parent}`" if parent else "## Top level"
        section = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
        assert f"| `{key.name}` | {key.type} |" in section, key.path
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    options = [key for key in filter_keys() if key.section is None]
    balancer_options = sum(len(m.model_fields) for m in BALANCER_OPTIONS.values())
    assert len(rows) == len(list(keys())) + balancer_options + len(options)
    for name in (*BALANCER_OPTIONS, *FILTER_OPTIONS):
        assert f"### `{name}`" in text


def test_check_mode_finds_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert docs_main([str(tmp_path)]) == 0 and docs_main(["--check", str(tmp_path)]) == 0
    (tmp_path / "metrics.md").write_text("old\n")
    assert docs_main(["--check", str(tmp_path)]) == 1
    assert "stale (run python -m proxy.docs)" in capsys.readouterr().err
