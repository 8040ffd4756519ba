"""Request-target normalisation (RFC 3986 section 6), fed bytes directly.

nginx 1.22's answers, where noted, come from ``location /admin { deny all; }`` and
``location / { proxy_pass http://upstream/; }`` (the form that forwards the
normalised URI): 403 means nginx matched the normalised path to ``/admin``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from proxy.config import MatchSpec
from proxy.http.target import normal_target


@pytest.mark.parametrize(
    "target",
    [b"/", b"*", b"/admin", b"/api/v1/users/12345?page=2&sort=name", b"/a.b/c.d", b"/a-b_c~"],
)
def test_a_common_target_is_returned_as_it_is(target: bytes):
    assert normal_target(target) is target


@pytest.mark.parametrize(
    ("target", "normal"),
    [  # RFC 3986 5.2.4's two examples, and 5.4's dot-segment results
        (b"/a/b/c/./../../g", b"/a/g"),
        (b"/mid/content=5/../6", b"/mid/6"),
        (b"/a/b/c/.", b"/a/b/c/"),
        (b"/a/b/c/./", b"/a/b/c/"),
        (b"/a/b/c/..", b"/a/b/"),
        (b"/a/b/c/../", b"/a/b/"),
        (b"/a/b/c/../g", b"/a/b/g"),
        (b"/a/b/../..", b"/"),
        (b"/a/b/c/g.", b"/a/b/c/g."),
        (b"/a/b/c/.g", b"/a/b/c/.g"),
        (b"/a/b/c/g..", b"/a/b/c/g.."),
        (b"/a/b/c/..g", b"/a/b/c/..g"),
        (b"/a/b/c/./g/.", b"/a/b/c/g/"),
        (b"/a/b/c/g/./h", b"/a/b/c/g/h"),
        (b"/a/b/c/g/../h", b"/a/b/c/h"),
        (b"/.", b"/"),
        (b"/./", b"/"),
    ],
)
def test_dot_segments_are_removed(target: bytes, normal: bytes):
    assert normal_target(target) == normal


@pytest.mark.parametrize(
    "target",  # nginx: 403 for each
    [b"/%61dmin", b"/%61%64%6D%69%6E", b"//admin", b"///admin", b"/./admin", b"/x/../admin",
     b"/a/%2e%2e/admin", b"/a/.%2E/admin", b"/%2e/admin", b"/x//..//admin"],
)  # fmt: skip
def test_the_audits_paths_become_admin(target: bytes):
    assert normal_target(target) == b"/admin"


@pytest.mark.parametrize(
    ("target", "normal"),
    [
        (b"/a%7e%2D%5f%2E", b"/a~-_."),  # unreserved: decoded
        (b"/a%2fb", b"/a%2Fb"),  # an encoded slash stays one (nginx decodes it)
        (b"/a%5cb", b"/a%5Cb"),
        (b"/a%2a%c3%a9", b"/a%2A%C3%A9"),  # others: kept, hex in upper case
        (b"/%2525", b"/%2525"),  # decoded once: never a new escape
        (b"/a%20b//c", b"/a%20b/c"),
        (b"/a//b//", b"/a/b/"),
        (b"/a#b/../c", b"/c"),  # no fragment in a request target: "#" is a character
        (b"/a;b/../c", b"/c"),
    ],
)
def test_escapes_and_slashes(target: bytes, normal: bytes):
    assert normal_target(target) == normal


@pytest.mark.parametrize(
    ("target", "normal"),
    [
        (b"/a/../b?x=/../y&z=%61//", b"/b?x=/../y&z=%61//"),
        (b"/a?b\\c", b"/a?b\\c"),
        (b"/a?x=%zz", b"/a?x=%zz"),
        (b"//a?", b"/a?"),
        (b"/%61?%61", b"/a?%61"),
    ],
)
def test_the_query_is_left_as_it_came(target: bytes, normal: bytes):
    assert normal_target(target) == normal


@pytest.mark.parametrize(
    "target",
    [
        b"/..",  # nginx: 400
        b"/../admin",  # nginx: 400
        b"/x/../../admin",  # nginx: 400
        b"/%2E%2e/admin",  # nginx: 400
        b"/a%zz",  # nginx: 400
        b"/a%4",  # nginx: 400
        b"/a%",
        b"/a%00b",  # nginx: 400
        b"/a\\b",  # nginx: 200, forwarded as it came
        b"/x\\..\\admin",  # nginx: 200, forwarded as it came
        b"/x/..%2Fadmin",  # nginx: 403 (it decodes %2F)
        b"/x/..%5cadmin",
        b"/x/%2F../admin",
        b"/x/%2e%2e%2fadmin",
    ],
)
def test_what_cannot_be_made_safe_is_refused(target: bytes):
    assert normal_target(target) is None


_PATH_CHARS = st.sampled_from(["/", "/", ".", "..", "%", "2e", "2E", "2f", "5C", "61", "00", "zz",
                               "a", "b", "~", "\\", "?", "#", ";", "%41"])  # fmt: skip


@settings(deadline=None)  # a pure function; a busy machine must not fail it
@given(st.lists(_PATH_CHARS, max_size=24).map(lambda parts: ("/" + "".join(parts)).encode()))
def test_normalising_is_idempotent_and_leaves_no_dots_or_empty_segments(target: bytes):
    normal = normal_target(target)
    if normal is None:
        return
    assert normal_target(normal) == normal
    path, _, query = normal.partition(b"?")
    assert query == target.partition(b"?")[2]
    assert path.startswith(b"/") and b"//" not in path
    segments = path.split(b"/")[1:]
    assert all(s not in (b".", b"..") for s in segments)
    assert b"\\" not in path
    for escape in path.split(b"%")[1:]:
        assert escape[:2] == escape[:2].upper() and int(escape[:2], 16) > 0


@pytest.mark.parametrize(
    ("prefix", "written"),
    [
        ("//api", "; write '/api'"),
        ("/a/./b", "; write '/a/b'"),
        ("/x/../admin", "; write '/admin'"),
        ("/%61dmin", "; write '/admin'"),
        ("/caf%c3%a9", "; write '/caf%C3%A9'"),
        ("/a\\b", ""),
    ],
)
def test_a_path_prefix_no_normalised_path_starts_with_is_refused(prefix: str, written: str):
    with pytest.raises(ValidationError) as refused:
        MatchSpec(path_prefix=prefix)
    assert f"can never match a normalised request path{written} [" in str(refused.value)
    assert all(MatchSpec(path_prefix=p) for p in ("/", "/api/", "/a/.well-known", "/a%2F", "/q?x="))
