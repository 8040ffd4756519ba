"""The container files (Dockerfile, .dockerignore, deploy/docker/, deploy/docker-compose.yml)
and the Kubernetes manifests (deploy/kubernetes/), checked against each other and
against the code.

None of these files is exercised by the rest of the suite, and the mistakes they invite
(a probe on the wrong port, a ConfigMap mounted where the image does not look, a
Service selecting nothing, a headless Service whose name the dns:// upstream does not
resolve) only show up during a rollout. Each test reads the value from the file that
owns it and checks that the others agree: the listener and admin ports come from the
aiolb config, the config path from the Dockerfile, the drain time from the code.
``loadtests/docker_smoke.sh`` builds and runs the image itself (in CI, on an engine it starts);
``test_kubernetes_schemas.py`` validates the manifests against the Kubernetes API schemas.
"""

from __future__ import annotations

import importlib.util
import posixpath
import re
import shlex
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import Config, parse_config
from proxy.config.values import split_host_port

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKER_DIR = ROOT / "deploy" / "docker"
DOCKER_CONFIG = DOCKER_DIR / "aiolb.yaml"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
K8S = ROOT / "deploy" / "kubernetes"

#: what a test substitutes for the admin token wherever a file asks for one
TOKEN = "test-token"


# -- Dockerfile ------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order; continuation lines joined, comments and
    the parser directive dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return [(word.upper(), rest.strip()) for word, _, rest in (ln.partition(" ") for ln in lines)]


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, each list starting with its FROM."""
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            found.append([])
        assert found, f"{instruction[0]} before the first FROM"
        found[-1].append(instruction)
    return found


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def dockerfile_env() -> dict[str, str]:
    """The final stage's ``ENV KEY=VALUE`` pairs (the only ENV form the file uses)."""
    env = {}
    for word, args in final_stage():
        if word == "ENV":
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {args!r}: use KEY=VALUE"
                env[key] = value
    return env


def image_config_path() -> str:
    """Where the image reads its config: ``AIOLB_CONFIG``, the CLI's default for ``-c``."""
    return dockerfile_env()["AIOLB_CONFIG"]


def image_uid() -> int:
    users = [args for word, args in final_stage() if word == "USER"]
    assert len(users) == 1, users
    uid = users[0].partition(":")[0]
    assert uid.isdigit(), f"USER {users[0]!r}: numeric, so that runAsNonRoot can verify it"
    return int(uid)


def copies_into_image() -> dict[str, str]:
    """Final-stage ``COPY`` from the build context: destination -> source."""
    copied = {}
    for word, args in final_stage():
        if word == "COPY" and not args.startswith("--from"):
            *sources, dest = args.split()
            for source in sources:
                # "COPY a b /dir/" puts each file into the directory; "COPY a /path" names it
                if dest.endswith("/"):
                    copied[posixpath.join(dest, posixpath.basename(source))] = source
                else:
                    copied[dest] = source
    return copied


def test_dockerfile_is_two_stages_on_python_slim() -> None:
    froms = [stage[0][1] for stage in stages()]
    assert froms == ["python:3.12-slim AS builder", "python:3.12-slim"]
    # the final stage takes the builder's virtual environment, not its tools or caches
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final_stage()
    for word, args in final_stage():
        if word == "RUN":
            assert not re.search(r"\b(apt-get|apk|pip|gcc|make)\b", args), args
    builder_runs = " ".join(args for word, args in stages()[0] if word == "RUN")
    # with the redis extra: rate_limit's Redis store works in the image
    assert 'pip install --no-cache-dir ".[redis]"' in builder_runs


def test_dockerfile_runtime_settings() -> None:
    env = dockerfile_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert image_uid() > 0
    assert ("STOPSIGNAL", "SIGTERM") in final_stage()
    # exec form: aiolb itself is PID 1 and gets the SIGTERM
    assert ("CMD", '["aiolb", "run"]') in final_stage()


def test_dockerfile_ships_the_default_config_where_aiolb_config_points() -> None:
    copied = copies_into_image()
    assert copied[image_config_path()] == "deploy/docker/aiolb.yaml"
    assert (ROOT / copied[image_config_path()]).is_file()
    for dest, source in copied.items():
        assert (ROOT / source).exists(), f"COPY {source} {dest}: no such file"


def default_config(env: Mapping[str, str] | None = None) -> Config:
    return parse_config(DOCKER_CONFIG.read_text(), str(DOCKER_CONFIG), env or {})


def test_dockerfile_exposes_the_listener_and_admin_ports() -> None:
    config = default_config()
    exposed = {
        int(port.partition("/")[0])
        for word, args in final_stage() if word == "EXPOSE"
        for port in args.split()
    }  # fmt: skip
    assert exposed == {config.listeners[0].port, config.admin.port} == {8080, 9901}


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCKER_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_probes_the_admin_healthz_of_the_default_config() -> None:
    checks = [args for word, args in final_stage() if word == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    assert command.strip() == '["python", "/opt/aiolb/healthcheck.py"]'
    assert copies_into_image()["/opt/aiolb/healthcheck.py"] == "deploy/docker/healthcheck.py"
    assert "--interval=" in options and "--timeout=" in options
    url = urlsplit(load_script("healthcheck").DEFAULT_URL)
    admin = default_config().admin
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", admin.port, "/healthz")


# -- .dockerignore ---------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**`` any number of directories, ``*`` and
    ``?`` within one path element (Go's filepath.Match, which Docker uses)."""
    out = ""
    for part in re.split(r"(\*\*/?|\*|\?)", pattern):
        if part.startswith("**"):
            out += "(?:.*/)?" if part.endswith("/") else ".*"
        elif part == "*":
            out += "[^/]*"
        elif part == "?":
            out += "[^/]"
        else:
            out += re.escape(part)
    return re.compile(out)


def excluded_from_context(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last pattern that
    matches the path or one of its parent directories decides; ``!`` lets it back in."""
    excluded = False
    parents = [path.rsplit("/", n)[0] for n in range(path.count("/"), -1, -1)]
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _pattern(line.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in parents):
            excluded = not negate
    return excluded


def test_dockerignore_checker() -> None:
    """Docker's rules on a few paths, so that the next test means something."""
    assert excluded_from_context(".git/HEAD")
    assert excluded_from_context("proxy/__pycache__/cli.cpython-312.pyc")
    assert not excluded_from_context("proxy/cli.py")


def test_build_context_holds_what_the_build_reads_and_little_else() -> None:
    needed = {"pyproject.toml", "README.md", "proxy/__init__.py", "proxy/admin/dashboard.html"}
    needed |= {source for word, args in instructions() if word == "COPY"
               and not args.startswith("--from") for source in args.split()[:-1]}  # fmt: skip
    for path in sorted(needed):
        assert not excluded_from_context(path), path
    for path in (".git/config", ".venv/bin/python", ".ci-venv/bin/python", "tests/conftest.py",
                 "loadtests/results/bench.json", ".mypy_cache/x", ".hypothesis/x",
                 "proxy/admin/__pycache__/app.cpython-312.pyc", "deploy/kubernetes/service.yaml"):
        assert excluded_from_context(path), path


# -- the image's default config ----------------------------------------------------------


def test_default_config_validates_and_keeps_the_admin_on_loopback() -> None:
    config = default_config()
    assert config.listeners[0].bind == "0.0.0.0:8080"
    assert config.admin.bind == "127.0.0.1:9901"
    assert config.admin.token is None
    assert [u.url for u in config.pools["web"].upstreams] == [
        "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"
    ]


def test_default_config_follows_its_environment_variables() -> None:
    env = {
        "AIOLB_UPSTREAM_1": "http://a:8000", "AIOLB_UPSTREAM_2": "http://b:8000",
        "AIOLB_UPSTREAM_3": "http://c:8000",
        "AIOLB_ADMIN_BIND": "0.0.0.0:9901", "AIOLB_ADMIN_TOKEN": TOKEN,
    }  # fmt: skip
    config = default_config(env)
    assert [u.address for u in config.pools["web"].upstreams] == ["a:8000", "b:8000", "c:8000"]
    assert (config.admin.bind, config.admin.token) == ("0.0.0.0:9901", TOKEN)


# -- docker-compose ------------------------------------------------------------------------

_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` (enough for this file)."""

    def replace(match: re.Match[str]) -> str:
        name, rest = match.group(1), match.group(2)
        if name in env:
            return env[name]
        assert "?" not in match.group(0), f"compose would stop: {name} unset ({rest})"
        return rest or ""

    return _COMPOSE_VAR.sub(replace, value)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def compose_aiolb_env() -> dict[str, str]:
    environment = compose()["services"]["aiolb"]["environment"]
    return {key: interpolate(str(value), {"AIOLB_ADMIN_TOKEN": TOKEN})
            for key, value in environment.items()}  # fmt: skip


def compose_config() -> Config:
    """The image's default config as the compose file's environment makes it."""
    return default_config(compose_aiolb_env())


def published(ports: list[str]) -> dict[int, tuple[str, int]]:
    """``["127.0.0.1:8080:8080"]`` -> ``{8080: ("127.0.0.1", 8080)}`` (container port ->
    host address)."""
    out = {}
    for entry in ports:
        host_ip, host_port, container = str(entry).rsplit(":", 2)
        out[int(container)] = (host_ip, int(host_port))
    return out


def test_compose_has_aiolb_three_upstreams_and_prometheus() -> None:
    services = compose()["services"]
    assert set(services) == {"aiolb", "upstream-1", "upstream-2", "upstream-3", "prometheus"}
    build = services["aiolb"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_upstreams_are_the_ones_aiolb_is_configured_with() -> None:
    services = compose()["services"]
    demo_port = 8000  # demo_upstream.py's default, which the commands below rely on
    assert "or 8000" in (DOCKER_DIR / "demo_upstream.py").read_text()
    addresses = {u.address for u in compose_config().pools["web"].upstreams}
    assert addresses == {f"upstream-{i}:{demo_port}" for i in (1, 2, 3)}
    for i in (1, 2, 3):
        service = services[f"upstream-{i}"]
        assert service["image"] == services["aiolb"]["image"]
        assert service["command"] == ["python", "/opt/aiolb/demo_upstream.py", f"upstream-{i}"]
        health_url = urlsplit(service["environment"]["AIOLB_HEALTHCHECK_URL"])
        assert (health_url.port, health_url.path) == (demo_port, "/healthz")
        assert services["aiolb"]["depends_on"][f"upstream-{i}"] == {"condition": "service_healthy"}
    assert copies_into_image()["/opt/aiolb/demo_upstream.py"] == "deploy/docker/demo_upstream.py"


def test_compose_aiolb_exposes_its_admin_with_a_token_only_on_the_host_loopback() -> None:
    service = compose()["services"]["aiolb"]
    assert "${AIOLB_ADMIN_TOKEN:?" in COMPOSE.read_text(), "no default token in the file"
    config = compose_config()
    assert config.admin.host == "0.0.0.0" and config.admin.token == TOKEN
    ports = published(service["ports"])
    assert set(ports) == {config.listeners[0].port, config.admin.port}
    assert {host for host, _ in ports.values()} == {"127.0.0.1"}
    # long enough for the drain (see test_kubernetes_grace_period_covers_the_drain)
    assert service["stop_grace_period"] == "35s" and drain_seconds(config) < 35


def test_compose_prometheus_scrapes_the_admin_metrics_with_the_token() -> None:
    data = compose()
    service = data["services"]["prometheus"]
    mounts = {}
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = (COMPOSE.parent / source).resolve()
    prometheus = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    for rule_file in prometheus["rule_files"]:
        assert mounts[posixpath.join("/etc/prometheus", rule_file)].is_file(), rule_file

    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "aiolb")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [target] = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = split_host_port(target)
    assert host in data["services"] and host == "aiolb"
    assert port == compose_config().admin.port

    # the bearer token: the compose secret, made from the same variable aiolb reads
    [secret] = service["secrets"]
    assert job["authorization"]["credentials_file"] == secret["target"]
    assert data["secrets"][secret["source"]] == {"environment": "AIOLB_ADMIN_TOKEN"}
    assert secret["mode"] & stat.S_IROTH, "Prometheus runs as nobody: the file must be readable"


# -- Kubernetes --------------------------------------------------------------------------


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_documents()
             if doc["kind"] == kind and doc["metadata"]["name"] == name]  # fmt: skip
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_every_kubernetes_manifest_parses() -> None:
    files = sorted(p.name for p in K8S.glob("*.yaml"))
    assert {"configmap.yaml", "deployment.yaml", "service.yaml", "upstream.yaml",
            "secret.yaml"} <= set(files)  # fmt: skip
    assert not list(K8S.glob("*.yml")), "use .yaml, so that the glob above sees every file"
    seen = set()
    for path, doc in k8s_documents():
        where = f"{path.name}: {doc.get('kind')}"
        assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), where
        assert doc["metadata"]["name"], where
        assert (doc["kind"], doc["metadata"]["name"]) not in seen, f"{where} twice"
        seen.add((doc["kind"], doc["metadata"]["name"]))


def configmap_text() -> str:
    text: str = k8s("ConfigMap", "aiolb-config")["data"][posixpath.basename(image_config_path())]
    return text


def configmap_raw() -> dict[str, Any]:
    """The ConfigMap's aiolb.yaml as plain YAML (no validation: see the next test)."""
    data: dict[str, Any] = yaml.safe_load(configmap_text())
    return data


def listener_port() -> int:
    return split_host_port(configmap_raw()["listeners"][0]["bind"])[1]


def admin_port() -> int:
    return split_host_port(configmap_raw()["admin"]["bind"])[1]


def dns_upstream() -> Any:
    [upstream] = configmap_raw()["pools"]["web"]["upstreams"]
    return urlsplit(upstream["url"])


def test_kubernetes_config_validates_with_the_projects_loader() -> None:
    """What ``aiolb check`` would say in the pod (the token comes from the Secret)."""
    config = parse_config(configmap_text(), "configmap.yaml:aiolb.yaml",
                          {"AIOLB_ADMIN_TOKEN": TOKEN})  # fmt: skip
    assert config.admin.token == TOKEN and config.admin.host == "0.0.0.0"
    assert config.listeners[0].port == listener_port()
    assert config.admin.port == admin_port()


def test_kubernetes_config_needs_the_token_from_the_environment() -> None:
    assert configmap_raw()["admin"]["token"] == "${AIOLB_ADMIN_TOKEN}"


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = k8s("Deployment", name)["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    [first] = pod_spec(name)["containers"]
    c: dict[str, Any] = first
    return c


def container_port(c: Mapping[str, Any], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    [found] = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    number: int = found
    return number


def test_kubernetes_deployment_mounts_the_configmap_where_the_image_reads_it() -> None:
    spec, aiolb = pod_spec("aiolb"), container("aiolb")
    volumes = {v["name"]: v for v in spec["volumes"]}
    configmaps = {name for name, v in volumes.items()
                  if v.get("configMap", {}).get("name") == "aiolb-config"}  # fmt: skip
    [mount] = [m for m in aiolb["volumeMounts"] if m["name"] in configmaps]
    assert mount["mountPath"] == posixpath.dirname(image_config_path()) == "/etc/aiolb"
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    # the image's default (AIOLB_CONFIG) is what the pod reads: nothing overrides it
    assert "command" not in aiolb and "args" not in aiolb
    assert "AIOLB_CONFIG" not in {e["name"] for e in aiolb.get("env", [])}


def test_kubernetes_probes_use_the_admin_port_of_the_config() -> None:
    aiolb = container("aiolb")
    ready, live = aiolb["readinessProbe"]["httpGet"], aiolb["livenessProbe"]["httpGet"]
    assert (ready["path"], live["path"]) == ("/readyz", "/healthz")
    assert container_port(aiolb, ready["port"]) == admin_port()
    assert container_port(aiolb, live["port"]) == admin_port()


def test_kubernetes_traffic_port_is_the_listener_port() -> None:
    aiolb = container("aiolb")
    assert container_port(aiolb, "http") == listener_port()
    service = k8s("Service", "aiolb")["spec"]
    [port] = service["ports"]
    assert container_port(aiolb, port["targetPort"]) == listener_port()
    # the Service selects the aiolb pods, and does not expose the admin port
    labels = k8s("Deployment", "aiolb")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert admin_port() not in {container_port(aiolb, p["targetPort"]) for p in service["ports"]}


def test_kubernetes_admin_token_comes_from_the_secret() -> None:
    [env] = [e for e in container("aiolb")["env"] if e["name"] == "AIOLB_ADMIN_TOKEN"]
    ref = env["valueFrom"]["secretKeyRef"]
    secret = k8s("Secret", ref["name"])
    assert ref["key"] in secret["stringData"]


def test_kubernetes_deployment_runs_two_non_root_replicas() -> None:
    deployment = k8s("Deployment", "aiolb")
    assert deployment["spec"]["replicas"] == 2
    security = pod_spec("aiolb")["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == image_uid()
    assert container("aiolb")["securityContext"]["allowPrivilegeEscalation"] is False
    assert container("aiolb")["resources"]["requests"]


def drain_seconds(config: Config) -> float:
    """How long aiolb drains after SIGTERM with ``config``: its ``shutdown_timeout``."""
    return config.shutdown_timeout


def test_kubernetes_grace_period_covers_the_drain() -> None:
    """preStop sleeps while the endpoint removal reaches the load balancers; then
    SIGTERM drains. The kubelet must not SIGKILL before both are done."""
    command = container("aiolb")["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    assert pre_stop >= 3
    grace = pod_spec("aiolb")["terminationGracePeriodSeconds"]
    config = parse_config(configmap_text(), "configmap.yaml:aiolb.yaml",
                          {"AIOLB_ADMIN_TOKEN": TOKEN})  # fmt: skip
    assert grace > pre_stop + drain_seconds(config)


def test_kubernetes_headless_service_is_what_the_dns_upstream_resolves() -> None:
    url = dns_upstream()
    assert url.scheme == "dns"
    service_name, namespace, *rest = url.hostname.split(".")
    assert rest == ["svc", "cluster", "local"]
    headless = k8s("Service", service_name)
    assert headless["metadata"].get("namespace", "default") == namespace
    spec = headless["spec"]
    assert spec["clusterIP"] == "None"
    [port] = spec["ports"]
    assert port["port"] == url.port

    # ...and it selects the example upstream pods, on the port they listen on
    web = k8s("Deployment", "web")
    assert spec["selector"].items() <= web["spec"]["template"]["metadata"]["labels"].items()
    upstream = container("web")
    assert container_port(upstream, port["targetPort"]) == url.port
    env = {e["name"]: e for e in upstream["env"]}
    assert int(env["DEMO_PORT"]["value"]) == url.port
    assert upstream["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_kubernetes_example_upstream_runs_the_demo_from_the_aiolb_image() -> None:
    upstream = container("web")
    assert upstream["image"] == container("aiolb")["image"]
    assert upstream["command"] == ["python", "/opt/aiolb/demo_upstream.py"]
    assert "/opt/aiolb/demo_upstream.py" in copies_into_image()
    assert pod_spec("web")["securityContext"]["runAsUser"] == image_uid()


@pytest.mark.parametrize("name", ["healthcheck", "demo_upstream"])
def test_image_scripts_do_nothing_on_import(name: str) -> None:
    """The image's scripts only act under ``__main__`` (the tests above import one)."""
    assert callable(load_script(name).main)
