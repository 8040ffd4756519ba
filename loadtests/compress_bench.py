"""Compression cost: each library per 64 KiB, and aiolb's ``compress`` next to nginx
``gzip`` in front of the same upstream, in the same run.

1. The libraries: CPU µs to compress one 64 KiB text body from a fresh compressor (as
   each response does) at the levels ``compress`` uses by default (gzip 1, br 4, zstd
   3), and at the others people pick (nginx's default gzip level is 1; brotli's own
   default is 11), with the compressed size.
2. The proxies: one nginx serving the body as a static file (the upstream), one nginx
   proxying it with ``gzip on`` (its default ``gzip_comp_level 1``, and 6 on a second
   port), and one aiolb process with a listener per variant (no filter; ``compress``
   gzip at 1 and at 6, br, zstd). Each target in turn gets wrk for ``--duration``
   seconds with the matching ``Accept-Encoding``; what is reported is the proxy's own
   CPU time per request (from /proc: robust on a shared machine, where throughput is
   not) and its requests per second, with ratios to nginx gzip at the same level.

Not a test: a measurement. Run from the repository root (needs nginx and wrk):

    python loadtests/compress_bench.py                 # 5 s per target
    python loadtests/compress_bench.py --duration 2 --size 16384
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def corpus(size: int) -> bytes:
    """``size`` bytes of real text: this repository's documentation and source."""
    parts = [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "proxy").rglob("*.py"))]
    data = b"".join(p.read_bytes() for p in parts)
    return (data * (size // len(data) + 1))[:size]


def compressors() -> dict[str, Callable[[bytes], bytes]]:
    out: dict[str, Callable[[bytes], bytes]] = {}
    for level in (1, 6, 9):

        def gz(data: bytes, level: int = level) -> bytes:
            z = zlib.compressobj(level, zlib.DEFLATED, 31)
            return z.compress(data) + z.flush()

        out[f"gzip-{level}"] = gz
    try:
        import brotli

        for q in (1, 4, 6, 11):
            out[f"br-{q}"] = _br(brotli, q)
    except ImportError:
        print("brotli is not installed: br left out")
    try:
        import zstandard

        for level in (1, 3, 9):
            out[f"zstd-{level}"] = _zstd(zstandard, level)
    except ImportError:
        print("zstandard is not installed: zstd left out")
    return out


def _br(brotli: object, q: int) -> Callable[[bytes], bytes]:
    def run(data: bytes) -> bytes:
        c = brotli.Compressor(quality=q)  # type: ignore[attr-defined]
        return bytes(c.process(data) + c.finish())

    return run


def _zstd(zstandard: object, level: int) -> Callable[[bytes], bytes]:
    def run(data: bytes) -> bytes:
        c = zstandard.ZstdCompressor(level=level).compressobj()  # type: ignore[attr-defined]
        return bytes(c.compress(data) + c.flush())

    return run


def libraries(body: bytes) -> None:
    print(f"\n## The libraries: CPU µs per {len(body) // 1024} KiB body (one compressor each)\n")
    print("| encoding-level | µs per body | MB/s | compressed | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, run in compressors().items():
        run(body)
        n, start = 0, time.process_time()
        while time.process_time() - start < 0.5:
            out = run(body)
            n += 1
        us = (time.process_time() - start) / n * 1e6
        mbs = len(body) / us
        print(f"| {name} | {us:,.0f} | {mbs:,.0f} | {len(out):,} | {len(body) / len(out):.2f} |")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def tree(pid: int) -> list[int]:
    """``pid`` and its children (nginx's workers)."""
    out = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(c) for c in child.read_text().split()]
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


NGINX = """worker_processes 1;
pid {dir}/{name}.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-body; proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fcgi; uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
    keepalive_requests 1000000;
{body}
}}
"""


def start_nginx(dir: Path, name: str, body: str) -> subprocess.Popen[bytes]:
    conf = dir / f"{name}.conf"
    conf.write_text(NGINX.format(dir=dir, name=name, body=body))
    argv = ["nginx", "-e", "stderr", "-p", str(dir), "-c", str(conf), "-g", "daemon off;"]
    return subprocess.Popen(argv, start_new_session=True)


def aiolb_yaml(ports: dict[str, int], upstream: int, admin: int) -> str:
    filters = {
        "aiolb-none": "[]",
        "aiolb-gzip-1": "[{compress: {encodings: [gzip]}}]",
        "aiolb-gzip-6": "[{compress: {encodings: [gzip], levels: {gzip: 6}}}]",
        "aiolb-br-4": "[{compress: {encodings: [br]}}]",
        "aiolb-zstd-3": "[{compress: {encodings: [zstd]}}]",
    }
    listeners = "".join(
        f"""  - name: {name}
    bind: "127.0.0.1:{ports[name]}"
    routes:
      - pool: up
        filters: {filters[name]}
"""
        for name in filters
    )
    return f"""listeners:
{listeners}pools:
  up:
    upstreams: [{{url: "http://127.0.0.1:{upstream}"}}]
admin:
  bind: "127.0.0.1:{admin}"
"""


def wrk(port: int, encoding: str, seconds: float) -> int:
    """Requests wrk completed in ``seconds`` (1 thread, 8 connections)."""
    argv = ["wrk", "-t1", "-c8", f"-d{seconds:g}s", "-H", f"Accept-Encoding: {encoding}",
            f"http://127.0.0.1:{port}/body.txt"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m is None or errors is not None:
        raise RuntimeError(out)
    return int(m.group(1))


def check(port: int, encoding: str, body: bytes) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/body.txt", headers={"Accept-Encoding": encoding}
    )
    with urllib.request.urlopen(req) as r:
        got = r.headers.get("Content-Encoding") or "identity"
        data = r.read()
    if got != encoding:
        raise RuntimeError(f"port {port}: asked {encoding}, got {got}")
    if encoding == "gzip":
        data = zlib.decompress(data, 31)
    elif encoding == "br":
        import brotli

        data = brotli.decompress(data)
    elif encoding == "zstd":
        import zstandard

        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if data != body:
        raise RuntimeError(f"port {port}: the body differs")


def proxies(body: bytes, seconds: float, rounds: int) -> None:
    if not shutil.which("nginx") or not shutil.which("wrk"):
        print("\nnginx and wrk are needed for the proxies' part: skipped")
        return
    children: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        dir = Path(tmp)
        dir.chmod(0o755)  # nginx's workers (nobody, when run as root) read the file
        (dir / "root").mkdir(mode=0o755)
        (dir / "root" / "body.txt").write_bytes(body)
        (dir / "root" / "body.txt").chmod(0o644)
        up = free_port()
        upstream = f"""    server {{ listen 127.0.0.1:{up}; root {dir}/root;
               default_type text/plain; location / {{ }} }}"""
        ports = {name: free_port() for name in (
            "nginx-gzip-1", "nginx-gzip-6", "aiolb-none", "aiolb-gzip-1", "aiolb-gzip-6",
            "aiolb-br-4", "aiolb-zstd-3")}  # fmt: skip
        front = "".join(
            f"""    server {{ listen 127.0.0.1:{ports[f"nginx-gzip-{level}"]};
        gzip on; gzip_types text/plain; gzip_proxied any; gzip_comp_level {level};
        location / {{ proxy_pass http://up; proxy_http_version 1.1;
                     proxy_set_header Connection ""; }} }}
"""
            for level in (1, 6)
        )
        front = f"    upstream up {{ server 127.0.0.1:{up}; keepalive 32; }}\n" + front
        try:
            children.append(start_nginx(dir, "upstream", upstream))
            nginx = start_nginx(dir, "front", front)
            children.append(nginx)
            config = dir / "aiolb.yaml"
            config.write_text(aiolb_yaml(ports, up, free_port()))
            aiolb = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config)],
                                     cwd=REPO, start_new_session=True)  # fmt: skip
            children.append(aiolb)
            for port in ports.values():
                wait_port(port)
            wait_port(up)
            targets = [(name, port, name.split("-")[1]) for name, port in ports.items()]
            targets = [(n, p, "identity" if e == "none" else e) for n, p, e in targets]
            for _, port, encoding in targets:
                check(port, encoding, body)
            results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in targets}
            for _ in range(rounds):
                for name, port, encoding in targets:
                    pid = nginx.pid if name.startswith("nginx") else aiolb.pid
                    wrk(port, encoding, 1)  # warm-up
                    pids = tree(pid)
                    before = cpu_seconds(pids)
                    n = wrk(port, encoding, seconds)
                    used = cpu_seconds(pids) - before
                    results[name].append((used / n * 1e6, n / seconds))
            report(results, len(body), seconds, rounds)
        finally:
            for child in children:
                try:
                    os.killpg(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                child.wait(10)


def report(results: dict[str, list[tuple[float, float]]], size: int, seconds: float,
           rounds: int) -> None:  # fmt: skip
    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    cpu = {name: median([c for c, _ in runs]) for name, runs in results.items()}
    rps = {name: median([r for _, r in runs]) for name, runs in results.items()}
    print(f"\n## The proxies: one {size // 1024} KiB text/plain body, wrk -t1 -c8, "
          f"{rounds} round(s) of {seconds:g} s, medians\n")  # fmt: skip
    print("| target | CPU µs/request | x nginx gzip (same level) | requests/s |")
    print("| --- | ---: | ---: | ---: |")
    for name in results:
        level = "6" if name.endswith("-6") else "1"
        ratio = cpu[name] / cpu[f"nginx-gzip-{level}"]
        print(f"| {name} | {cpu[name]:,.0f} | {ratio:.2f} | {rps[name]:,.0f} |")
    for name in ("aiolb-gzip-1", "aiolb-gzip-6", "aiolb-br-4", "aiolb-zstd-3"):
        extra = cpu[name] - cpu["aiolb-none"]
        print(f"- {name} minus aiolb-none: {extra:,.0f} µs per request")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=65536, help="the body's size in bytes")
    parser.add_argument("--duration", type=int, default=5.0, help="seconds of wrk per target")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over the targets")
    parser.add_argument("--no-proxies", action="store_true", help="the libraries only")
    args = parser.parse_args()
    body = corpus(args.size)
    libraries(body)
    if not args.no_proxies:
        proxies(body, args.duration, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
