"""TLS termination on a listener, as clients see it: real certificates (trustme), the
stdlib ``ssl`` client and curl, SNI, mTLS, session resumption, handshake failures,
``aiolb check`` on the files, reloads that change certificates under load, and the
redirect from plain HTTP."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import shutil
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Config
from proxy.runtime.preflight import validate, warnings
from proxy.runtime.server import ProxyServer
from tests.admin_support import get_json, samples, scrape
from tests.support import (
    HOST,
    CertAuthority,
    CertFiles,
    Recorder,
    make_config,
    raw_exchange,
    tls_request,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]
GET = b"GET /where?q=1 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"


def tls_config(
    upstream: str, certificates: list[CertFiles], **tls: Any
) -> Config:
    return make_config(
        [upstream], listener={"tls": {"certificates": [c.entry for c in certificates], **tls}}
    )


def handshake_errors(text: str) -> dict[str, float]:
    found = samples(text, "aiolb_tls_handshake_errors_total")
    return {dict(labels)["reason"]: value for labels, value in found.items()}


def serial(tls: ssl.SSLObject) -> str:
    cert = tls.getpeercert()
    assert cert
    return str(cert["serialNumber"])


def names_of(tls: ssl.SSLObject) -> list[str]:
    cert = tls.getpeercert()
    assert cert
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


async def test_https_listener_answers_the_stdlib_client_and_curl(
    recorders: MakeRecorder, proxy: MakeProxy, ca: CertAuthority
) -> None:
    up = await recorders("a")
    cert = ca.issue("a.test")
    server = await proxy(tls_config(up.url, [cert]))
    port = server.listeners[0].port
    answer, tls = await tls_request(port, ca.client_context(), "a.test", GET)
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"a")
    assert tls.selected_alpn_protocol() == "http/1.1"
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    seen = up.seen[0]
    assert seen.headers["X-Forwarded-Proto"] == "https" and seen.path == "/where?q=1"
    assert shutil.which("curl"), "curl is needed (apt-get install curl)"
    done = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sS", "--cacert", ca.cert_file, "--resolve", f"a.test:{port}:{HOST}",
         f"https://a.test:{port}/curl"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "a"
    assert up.seen[1].headers["X-Forwarded-Proto"] == "https"


async def test_sni_picks_the_certificate_by_its_names(
    recorders: MakeRecorder, proxy: MakeProxy, ca: CertAuthority
) -> None:
    up = await recorders("a")
    default, api = ca.issue("a.test"), ca.issue("api.test", "*.wild.test")
    server = await proxy(tls_config(up.url, [default, api]))
    port, context = server.listeners[0].port, ca.client_context()
    for name, wanted in (("a.test", ["a.test"]), ("api.test", ["api.test", "*.wild.test"]),
                         ("x.wild.test", ["api.test", "*.wild.test"])):  # fmt: skip
        answer, tls = await tls_request(port, context, name, GET)
        assert answer.startswith(b"HTTP/1.1 200"), name
        assert names_of(tls) == wanted, name
    # a name no certificate has gets the default one (and fails verification for it)
    lax = ca.client_context()
    lax.check_hostname = False
    _, tls = await tls_request(port, lax, "other.test", GET)
    assert names_of(tls) == ["a.test"]
    _, tls = await tls_request(port, lax, "deep.x.wild.test", GET)  # one label deep only
    assert names_of(tls) == ["a.test"]


async def test_sessions_resume_with_tickets(
    recorders: MakeRecorder, proxy: MakeProxy, ca: CertAuthority
) -> None:
    up = await recorders("a")
    server = await proxy(tls_config(up.url, [ca.issue("a.test")]))
    port = server.listeners[0].port
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = ca.client_context()
        context.maximum_version = version
        reader, writer = await asyncio.open_connection(
            HOST, port, ssl=context, server_hostname="a.test"
        )
        writer.write(GET)
        await reader.read()  # the ticket (TLS 1.3) comes after the handshake
        session = writer.get_extra_info("ssl_object").session
        writer.close()
        assert session is not None and session.has_ticket, version

        def again(session: ssl.SSLSession = session, context: ssl.SSLContext = context) -> bool:
            with socket.create_connection((HOST, port), timeout=5) as sock:
                with context.wrap_socket(sock, server_hostname="a.test", session=session) as tls:
                    tls.sendall(GET)
                    assert tls.recv(4096).startswith(b"HTTP/1.1 200")
                    return tls.session_reused

        assert await asyncio.to_thread(again), f"{version}: not resumed"


async def test_mtls_accepts_a_client_certificate_and_refuses_none(
    recorders: MakeRecorder, proxy: MakeProxy, ca: CertAuthority, tmp_path: Path
) -> None:
    up = await recorders("a")
    clients = CertAuthority(tmp_path, "clients")
    server = await proxy(tls_config(up.url, [ca.issue("a.test")], client_ca=clients.cert_file))
    port = server.listeners[0].port
    good = ca.client_context()
    clients.ca.issue_cert("client@a.test").configure_cert(good)
    answer, _ = await tls_request(port, good, "a.test", GET)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    stranger = ca.client_context()  # a certificate from a CA the listener does not trust
    ca.ca.issue_cert("stranger@a.test").configure_cert(stranger)
    for context in (ca.client_context(), stranger):
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            answer, _ = await tls_request(port, context, "a.test", GET)
            assert answer == b""  # TLS 1.3: the refusal comes with the first read
            raise ConnectionResetError("closed without an answer")
    assert len(up.seen) == 1
    await wait_for(lambda: sum(server.listeners[0].handshake_errors.values()) >= 2)
    assert set(server.listeners[0].handshake_errors) <= {"client_certificate", "unknown_ca"}


async def test_handshake_failures_are_counted_and_closed_without_a_traceback(
    recorders: MakeRecorder, proxy: MakeProxy, ca: CertAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    up = await recorders("a")
    config = tls_config(up.url, [ca.issue("a.test")], min_version="TLSv1.3")
    server = await proxy(
        config.model_copy(update={"listeners": [config.listeners[0].model_copy(update={
            "timeouts": config.listeners[0].timeouts.model_copy(update={"header": 0.3})})]})
    )  # fmt: skip
    port = server.listeners[0].port
    caplog.set_level(logging.DEBUG, "aiolb")
    # plaintext HTTP on the TLS port: closed
    assert await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n") == b""
    # a handshake that stalls: closed by timeouts.header
    reader, writer = await asyncio.open_connection(HOST, port)
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert asyncio.get_running_loop().time() - started < 3
    writer.close()
    # a client that resets mid-handshake
    sock = socket.create_connection((HOST, port))
    sock.sendall(b"\x16\x03\x01\x00\x40" + b"\x01" * 10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    # a client that offers only TLS 1.2 (min_version is 1.3 here)
    old = ca.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):  # closed without an alert
        await tls_request(port, old, "a.test", GET)
    want = {"plaintext": 1, "timeout": 1, "reset": 1, "version": 1}
    await wait_for(lambda: handshake_errors_now(server) == want)
    text = await scrape(server)
    assert handshake_errors(text) == want
    assert ("listener", "test") in next(iter(samples(text, "aiolb_tls_handshake_errors_total")))
    lines = [r for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(lines) == 4
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    # and the listener still serves
    answer, _ = await tls_request(port, ca.client_context(), "a.test", GET)
    assert answer.startswith(b"HTTP/1.1 200")


def handshake_errors_now(server: ProxyServer) -> dict[str, int]:
    return dict(server.listeners[0].handshake_errors)


# -- aiolb check and run: the files ----------------------------------------------------------


def write_config(path: Path, upstream: str, certificates: list[dict[str, str]]) -> Path:
    path.write_text(yaml.safe_dump({
        "listeners": [{"name": "public", "bind": f"{HOST}:0", "routes": [{"pool": "web"}],
                       "tls": {"certificates": certificates}}],
        "pools": {"web": {"upstreams": [{"url": upstream}]}},
        "admin": {"bind": f"{HOST}:0"},
    }, sort_keys=False))  # fmt: skip
    return path


def aiolb(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
        timeout=timeout, cwd=REPO,
    )  # fmt: skip


def cert_line(path: Path, index: int, key: str) -> int:
    """The line of ``tls.certificates[index].key`` in a file ``write_config`` wrote."""
    lines = path.read_text().splitlines()
    starts = [n for n, line in enumerate(lines, 1) if line.lstrip().startswith("- cert:")]
    start = starts[index]
    return start if key == "cert" else start + 1


async def test_check_reports_missing_files_and_mismatched_keys(
    ca: CertAuthority, tmp_path: Path
) -> None:
    good, other = ca.issue("a.test"), ca.issue("b.test")
    path = write_config(tmp_path / "bad.yaml", "http://127.0.0.1:9", [
        {"cert": str(tmp_path / "missing.pem"), "key": good.key},
        {"cert": good.cert, "key": other.key},
    ])  # fmt: skip
    for command in ("check", "run"):
        done = await asyncio.to_thread(aiolb, command, "-c", str(path))
        assert done.returncode == 2, (command, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert lines == [
            f"{path}:{cert_line(path, 0, 'cert')}: listeners[0].tls.certificates[0].cert: "
            f"cannot read {tmp_path / 'missing.pem'}: no such file",
            f"{path}:{cert_line(path, 1, 'key')}: listeners[0].tls.certificates[1].key: "
            f"{other.key} is not the private key of {good.cert}",
        ], command


async def test_check_says_in_plain_words_which_tls_file_is_wrong(
    ca: CertAuthority, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    good, other = ca.issue("a.test"), ca.issue("b.test")
    key = serialization.load_pem_private_key(good.leaf.private_key_pem.bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))  # fmt: skip
    text, der, damaged = tmp_path / "notes.txt", tmp_path / "cert.der", tmp_path / "damaged.pem"
    text.write_text("hello\n")
    der.write_bytes(ssl.PEM_cert_to_DER_cert(Path(good.cert).read_text()))
    pem = Path(good.cert).read_text().splitlines()
    damaged.write_text("\n".join([pem[0], pem[1].replace("M", "!"), *pem[2:]]) + "\n")
    path = write_config(tmp_path / "bad.yaml", "http://127.0.0.1:9", [
        {"cert": good.key, "key": good.key},         # the key where the certificate goes
        {"cert": good.cert, "key": good.cert},       # the certificate where the key goes
        {"cert": good.cert, "key": str(encrypted)},
        {"cert": str(text), "key": good.key},
        {"cert": str(der), "key": good.key},
        {"cert": good.cert, "key": str(text)},
        {"cert": str(damaged), "key": good.key},
        {"cert": good.cert, "key": other.key},
    ])  # fmt: skip
    done = await asyncio.to_thread(aiolb, "check", "-c", str(path))
    assert done.returncode == 2, done.stderr

    def at(index: int, field: str) -> str:
        return f"{path}:{cert_line(path, index, field)}: listeners[0].tls.certificates[{index}]"

    decrypt = ("aiolb cannot ask for its passphrase; write it decrypted "
               "(openssl pkey -in KEY -out NEW)")  # fmt: skip
    assert done.stderr.strip().splitlines() == [
        f"{at(0, 'cert')}.cert: {good.key} holds no certificate (it holds: EC PRIVATE KEY): "
        "is it the key?",
        f"{at(1, 'key')}.key: {good.cert} holds no private key (it holds: CERTIFICATE): is it "
        "the certificate?",
        f"{at(2, 'key')}.key: {encrypted} holds an encrypted private key: {decrypt}",
        f"{at(3, 'cert')}.cert: {text} is not a PEM file (text): it should hold a certificate "
        "(-----BEGIN ...-----)",
        f"{at(4, 'cert')}.cert: {der} is not a PEM file (binary (DER?)): it should hold a "
        "certificate (-----BEGIN ...-----)",
        f"{at(5, 'key')}.key: {text} is not a PEM file (text): it should hold a private key "
        "(-----BEGIN ...-----)",
        f"{at(6, 'cert')}.cert: {damaged} is damaged: its PEM data does not decode",
        f"{at(7, 'key')}.key: {other.key} is not the private key of {good.cert}",
    ]
    assert "PEM lib" not in done.stderr and "_ssl.c" not in done.stderr


async def test_an_expired_certificate_is_a_warning_and_still_serves(
    recorders: MakeRecorder, ca: CertAuthority, tmp_path: Path
) -> None:
    up = await recorders("a")
    when = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    expired = ca.issue("a.test", not_before=when - dt.timedelta(days=30), not_after=when)
    path = write_config(tmp_path / "expired.yaml", up.url, [expired.entry])
    done = await asyncio.to_thread(aiolb, "check", "-c", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == (
        f"{path}:{cert_line(path, 0, 'cert')}: listeners[0].tls.certificates[0].cert: "
        f"warning: certificate {expired.cert} expired on 2025-01-02 03:04:05 UTC"
    )
    assert done.stdout.startswith(f"{path}: OK")
    document = validate(str(path))
    assert len(warnings(document)) == 1
    server = ProxyServer(document.config)
    await server.start()
    try:  # the proxy serves it; a client that checks dates refuses it, as it should
        lax = ca.client_context()
        lax.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        lax.check_hostname, lax.verify_mode = False, ssl.CERT_NONE
        answer, tls = await tls_request(server.listeners[0].port, lax, "a.test", GET)
        assert answer.startswith(b"HTTP/1.1 200") and tls.getpeercert(binary_form=True)
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            await tls_request(server.listeners[0].port, ca.client_context(), "a.test", GET)
    finally:
        await server.shutdown(timeout=1)


# -- reload -------------------------------------------------------------------------------------


async def test_reload_changes_the_certificate_under_load_without_a_failed_request(
    recorders: MakeRecorder, ca: CertAuthority, tmp_path: Path
) -> None:
    up = await recorders("a")
    first, second = ca.issue("a.test"), ca.issue("a.test")
    path = write_config(tmp_path / "aiolb.yaml", up.url, [first.entry])
    server = ProxyServer(validate(str(path)).config)
    server.config_path = str(path)
    await server.start()
    port, context = server.listeners[0].port, ca.client_context()
    failures: list[str] = []
    serials: list[str] = []
    ok = [0]
    stop = asyncio.Event()

    async def keep_alive_client() -> None:  # wrk-style: one connection, requests back to back
        reader, writer = await asyncio.open_connection(
            HOST, port, ssl=context, server_hostname="a.test"
        )
        try:
            while not stop.is_set():
                writer.write(b"GET /k HTTP/1.1\r\nHost: a.test\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    failures.append(head.decode(errors="replace"))
                await reader.readexactly(1)
                ok[0] += 1
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            failures.append(f"keep-alive: {exc!r}")
        finally:
            writer.close()

    async def new_connections() -> None:  # a fresh handshake per request
        while not stop.is_set():
            try:
                answer, tls = await tls_request(port, context, "a.test", GET)
            except (TimeoutError, OSError, ssl.SSLError) as exc:
                failures.append(f"new connection: {exc!r}")
                continue
            if not answer.startswith(b"HTTP/1.1 200"):
                failures.append(answer[:40].decode(errors="replace"))
            serials.append(serial(tls))
            ok[0] += 1

    try:
        tasks = [asyncio.create_task(keep_alive_client()) for _ in range(4)]
        tasks += [asyncio.create_task(new_connections()) for _ in range(4)]
        await wait_for(lambda: ok[0] >= 200, timeout=20)
        write_config(path, up.url, [second.entry])
        status, body, _ = await get_json(server, "/api/reload", "POST")
        assert (status, body["applied"], body["errors"]) == (200, True, [])
        assert body["changes"] == ["listener public: tls changed"]
        count = len(serials)
        await wait_for(lambda: len(serials) >= count + 20, timeout=20)
        # a broken certificate: the reload is refused, the second one keeps serving
        write_config(path, up.url, [{"cert": second.cert, "key": first.key}])
        status, body, _ = await get_json(server, "/api/reload", "POST")
        assert (status, body["applied"]) == (400, False)
        assert body["errors"] == [f"{path}:{cert_line(path, 0, 'key')}: "
                                  "listeners[0].tls.certificates[0].key: "
                                  f"{first.key} is not the private key of {second.cert}"]
        count = len(serials)
        await wait_for(lambda: len(serials) >= count + 20, timeout=20)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await server.shutdown(timeout=1)
    assert failures == []
    changed = [i for i in range(1, len(serials)) if serials[i] != serials[i - 1]]
    assert len(changed) == 1 and len(set(serials)) == 2, "one switch, to the new certificate"
    assert ok[0] > 300


# -- redirect_https -------------------------------------------------------------------------------


async def test_plain_http_is_redirected_to_https(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    up = await recorders("a")
    config = make_config([up.url], listener={"redirect_https": 8443}, routes=[
        {"match": {"path_prefix": "/open/"}, "pool": "main", "redirect_https": False},
        {"match": {"path_prefix": "/"}},
    ])  # fmt: skip
    server = await proxy(config)
    port = server.listeners[0].port
    raw = await raw_exchange(port, b"GET /a/b?c=d HTTP/1.1\r\nHost: Shop.Test:8080\r\n"
                                   b"Connection: close\r\n\r\n")  # fmt: skip
    assert raw == (b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://shop.test:8443/a/b?c=d"
                   b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")  # fmt: skip
    raw = await raw_exchange(port, b"GET /open/x HTTP/1.1\r\nHost: shop.test\r\n"
                                   b"Connection: close\r\n\r\n")  # fmt: skip
    assert raw.startswith(b"HTTP/1.1 200") and up.seen[0].path == "/open/x"
    # keep-alive: two redirects on one connection
    two = await raw_exchange(port, b"GET /1 HTTP/1.1\r\nHost: s.test\r\n\r\n"
                                   b"HEAD /2 HTTP/1.1\r\nHost: s.test\r\nConnection: close\r\n\r\n")
    assert two.count(b"308 Permanent Redirect") == 2 and b"https://s.test:8443/2" in two
    listener_wide = make_config([up.url], listener={"redirect_https": True, "routes": []})
    server = await proxy(listener_wide)
    raw = await raw_exchange(server.listeners[0].port,
                             b"GET / HTTP/1.1\r\nHost: s.test\r\nConnection: close\r\n\r\n")
    assert b"\r\nLocation: https://s.test/\r\n" in raw
    counts = samples(await scrape(server), "aiolb_requests_total")
    assert [dict(k)["code"] for k in counts] == ["308"]
