"""deploy/kubernetes/*.yaml against the Kubernetes API's own schemas.

test_deploy_manifests.py checks that the manifests agree with each other and with the
code; this checks that the API server would accept them at all. kubernetes-validate
(pinned in the ``test`` extra) carries the JSON schemas generated from each Kubernetes
minor version's OpenAPI document, so nothing is fetched: the strict variants
(``additionalProperties: false``) are used, so that a misspelled field or one at the wrong
level is an error rather than something ``kubectl apply`` drops with a warning. Every
version the package carries is checked (1.25 to 1.37 in 1.37.0), and a kind or
apiVersion with no schema counts as an error, not the warning the package's CLI prints.
The broken copies below show that each kind of mistake is caught.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate.utils import all_versions

from tests.unit.test_deploy_manifests import k8s, k8s_documents

VERSIONS = sorted({v.rpartition(".")[0] for v in all_versions()},
                  key=lambda v: tuple(map(int, v.split("."))))  # fmt: skip


def schema_error(doc: dict[str, Any], version: str) -> str | None:
    """What the API server of ``version`` would refuse in ``doc`` (the first problem), or
    None."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(map(str, exc.path))}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        return str(exc.message)
    return None


def test_the_validator_carries_old_and_new_versions() -> None:
    assert VERSIONS[0] == "1.25" and VERSIONS[-1] == "1.37"
    assert len(VERSIONS) == 13


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_matches_the_api_schema(version: str) -> None:
    docs = list(k8s_documents())
    assert len(docs) == 7
    for path, doc in docs:
        error = schema_error(doc, version)
        assert error is None, f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {error}"


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def _set_replicas_to_text(doc: dict[str, Any]) -> None:
    doc["spec"]["replicas"] = "two"


def _misspell_a_probe(doc: dict[str, Any]) -> None:
    container = _pod(doc)["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")


def _read_only_root_at_pod_level(doc: dict[str, Any]) -> None:
    # readOnlyRootFilesystem belongs to the container's securityContext, not the pod's
    _pod(doc)["securityContext"]["readOnlyRootFilesystem"] = True


def _drop_the_container_name(doc: dict[str, Any]) -> None:
    del _pod(doc)["containers"][0]["name"]


def _env_value_from_a_number(doc: dict[str, Any]) -> None:
    _pod(doc)["containers"][0]["env"].append({"name": "AIOLB_X", "value": 5})


def _removed_api_version(doc: dict[str, Any]) -> None:
    doc["apiVersion"] = "apps/v1beta1"  # removed in 1.16


BREAKAGES: list[Callable[[dict[str, Any]], None]] = [
    _set_replicas_to_text, _misspell_a_probe, _read_only_root_at_pod_level,
    _drop_the_container_name, _env_value_from_a_number, _removed_api_version,
]  # fmt: skip


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_a_broken_copy_of_the_deployment_fails(
    breakage: Callable[[dict[str, Any]], None],
) -> None:
    doc = copy.deepcopy(k8s("Deployment", "aiolb"))
    assert schema_error(doc, VERSIONS[-1]) is None
    breakage(doc)
    assert schema_error(doc, VERSIONS[-1]) is not None


def test_a_broken_service_fails() -> None:
    doc = copy.deepcopy(k8s("Service", "aiolb"))
    doc["spec"]["ports"][0]["port"] = "eighty"
    error = schema_error(doc, VERSIONS[-1])
    assert error is not None and error.startswith("spec.ports.0.port:"), error
