"""Offline Helm rendering and Kubernetes schema validation for the deploy tests.

Rendering and linting use Helm's own Go code through PyPI ``helm-python-sdk`` (no helm binary, no
cluster). Its public ``Chart.render`` has no ``--api-versions`` / ``--kube-version``; the library's
``helm_render`` call takes them as options (``api_versions``, ``kube_version``), so `render` calls it
directly: that is how the CRD-gated templates (ServiceMonitor, PrometheusRule, ScaledObject, KafkaTopic)
are rendered here, exactly as ``helm template --api-versions ...`` would.

Built-in kinds are validated with PyPI ``kubernetes-validate`` (strict: unknown fields are errors). The
CRD kinds have no schema there; `crd_schemas` holds hand-written ones for the fields of those CRDs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "hpad"
KUBE_VERSION = "v1.31.0"
CRD_APIS = ("monitoring.coreos.com/v1", "keda.sh/v1alpha1", "kafka.strimzi.io/v1beta2")
RELEASE, NAMESPACE = "demo", "factory"


def helm():
    import helm_python

    helm_python.disable_logging()
    return helm_python


@functools.cache
def _chart():
    return helm().Chart.load(str(CHART))


def render(values: dict[str, Any] | None = None, api_versions: tuple[str, ...] = (),
           kube_version: str = KUBE_VERSION) -> dict[str, str]:
    """``helm template demo deploy/helm/hpad -n factory --api-versions ... -f values``: path -> text."""
    from helm_python import _native

    opts = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True, "kube_version": kube_version,
            "api_versions": list(api_versions)}
    chart = _chart()
    rendered = _native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(opts))
    return json.loads(rendered)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render (NOTES.txt left out)."""
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def load_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "examples" / name).read_text())


# ------------------------------------------------------------------------------------------ validation


@functools.cache
def _k8s_validator(kind: str, api_version: str) -> jsonschema.Draft202012Validator | None:
    """kubernetes-validate's strict schema of a built-in kind (cached: its definitions file is large)."""
    import re

    import importlib_resources
    import referencing
    from kubernetes_validate import utils

    version = [v for v in utils.all_versions()
               if utils.major_minor(v) <= utils.major_minor(KUBE_VERSION.lstrip("v"))][-1]
    folder = importlib_resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = folder / f"{kind.lower()}-{group}.json"
    if not path.is_file():
        return None
    schema = json.loads(path.read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = referencing.Resource.from_contents(schema) @ referencing.Registry()
    registry = referencing.Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(obj: dict[str, Any]) -> None:
    """Raise AssertionError naming the object and every schema error."""
    from tests.deploy.crd_schemas import CRD_SCHEMAS

    key = (obj.get("apiVersion"), obj.get("kind"))
    name = f"{key[1]}/{obj.get('metadata', {}).get('name')}"
    if key in CRD_SCHEMAS:
        validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[key])
    else:
        validator = _k8s_validator(key[1], key[0])
        assert validator is not None, f"{name}: no Kubernetes schema for {key} in kubernetes-validate"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    assert not errors, f"{name} does not match its schema:\n" + "\n".join(errors)
