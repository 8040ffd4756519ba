"""``listeners[].proxy_protocol`` and ``pools.NAME.send_proxy_protocol``: what loads, and
the ``FILE:LINE`` errors for what does not."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config

BASE = """\
listeners:
  - name: public
    bind: "127.0.0.1:8080"
    proxy_protocol: {trusted: TRUSTED}
    routes: [{pool: web}]
pools:
  web:
    send_proxy_protocol: SEND
    upstreams: [{url: "http://127.0.0.1:9001"}]
"""


def problems(tmp_path: Path, trusted: str, send: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("TRUSTED", trusted).replace("SEND", send))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    return [p.replace(str(path), "F", 1) for p in info.value.problems]


def test_both_keys_load(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("TRUSTED", '["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]')
                    .replace("SEND", "v2"))  # fmt: skip
    config = load_config(str(path), env={})
    spec = config.listeners[0].proxy_protocol
    assert spec is not None and spec.trusted == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]
    assert ipaddress.ip_network("10.0.0.0/8") in spec.networks()
    assert config.pools["web"].send_proxy_protocol == "v2"


def test_defaults_are_off(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""\
        listeners: [{name: a, bind: "127.0.0.1:8080", routes: [{pool: web}]}]
        pools: {web: {upstreams: [{url: "http://127.0.0.1:9001"}]}}
    """))
    config = load_config(str(path), env={})
    assert config.listeners[0].proxy_protocol is None
    assert config.pools["web"].send_proxy_protocol is None


def test_errors_name_the_file_and_line(tmp_path: Path) -> None:
    assert problems(tmp_path, "[]", "v2") == [
        "F:4: listeners[0].proxy_protocol.trusted: must have at least 1 entry"
    ]
    assert problems(tmp_path, '["10.0.0.0/33"]', "v2") == [
        "F:4: listeners[0].proxy_protocol.trusted[0]: invalid address range '10.0.0.0/33'; "
        "use 10.0.0.0/8, 192.0.2.7 or ::1/128"
    ]
    assert problems(tmp_path, '["10.0.0.0/8"]', "v3") == [
        "F:8: pools.web.send_proxy_protocol: unknown value 'v3'; expected 'v1' or 'v2'"
    ]
    assert problems(tmp_path, '["10.0.0.0/8"], accept: true', "v1") == [
        "F:4: listeners[0].proxy_protocol.accept: unknown key 'accept'"
    ]
