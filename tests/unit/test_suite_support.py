"""The test suite's own helpers: what a machine that lacks a tool is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import REDIS_MISSING, RedisServer


def test_a_missing_redis_server_fails_with_the_line_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on it
    with pytest.raises(pytest.fail.Exception) as failed:
        RedisServer(tmp_path).start()
    assert str(failed.value) == REDIS_MISSING
    assert REDIS_MISSING == "redis-server is not installed: apt-get install redis-server"
