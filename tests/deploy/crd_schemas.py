"""JSON schemas of the custom resources the chart renders (kubernetes-validate only knows built-in kinds).

Written by hand from the fields of the CRDs (Prometheus Operator monitoring.coreos.com/v1 ServiceMonitor and
PrometheusRule, KEDA keda.sh/v1alpha1 ScaledObject, Strimzi kafka.strimzi.io/v1 and v1beta2 KafkaTopic). Stricter
than an API server, which silently prunes unknown fields: here an unknown or misspelt field is an error,
and so are wrong types, missing required fields and malformed durations.
"""

from __future__ import annotations

from typing import Any

DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
ANY_OBJECT = {"type": "object"}


def _object(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    metadata = {"type": "object", "required": ["name"],
                "properties": {"name": NAME, "namespace": NAME, "labels": STRING_MAP, "annotations": STRING_MAP}}
    return _object({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": metadata, "spec": spec},
                   ("apiVersion", "kind", "metadata", "spec"))


_label_selector = _object({"matchLabels": STRING_MAP, "matchExpressions": {"type": "array", "items": ANY_OBJECT}})

_endpoint = _object({
    "port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]}, "path": {"type": "string"},
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]}, "interval": DURATION, "scrapeTimeout": DURATION,
    "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
    "relabelings": {"type": "array", "items": ANY_OBJECT}, "metricRelabelings": {"type": "array", "items": ANY_OBJECT},
    "params": ANY_OBJECT, "tlsConfig": ANY_OBJECT, "authorization": ANY_OBJECT, "basicAuth": ANY_OBJECT,
    "oauth2": ANY_OBJECT, "followRedirects": {"type": "boolean"}, "enableHttp2": {"type": "boolean"},
    "filterRunning": {"type": "boolean"}, "proxyUrl": {"type": "string"},
})

SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", _object({
    "selector": _label_selector,
    "namespaceSelector": _object({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}),
    "endpoints": {"type": "array", "minItems": 1, "items": _endpoint},
    "jobLabel": {"type": "string"}, "targetLabels": {"type": "array", "items": {"type": "string"}},
    "podTargetLabels": {"type": "array", "items": {"type": "string"}}, "sampleLimit": {"type": "integer"},
    "targetLimit": {"type": "integer"}, "attachMetadata": ANY_OBJECT,
}, ("selector", "endpoints")))

_rule = {
    "type": "object", "additionalProperties": False, "required": ["expr"],
    "properties": {"alert": {"type": "string", "minLength": 1}, "record": {"type": "string", "minLength": 1},
                   "expr": {"type": ["string", "integer"]}, "for": DURATION, "keep_firing_for": DURATION,
                   "labels": STRING_MAP, "annotations": STRING_MAP},
    "oneOf": [{"required": ["alert"], "not": {"required": ["record"]}},
              {"required": ["record"], "not": {"required": ["alert"]}}],
}

PROMETHEUS_RULE = _resource("monitoring.coreos.com/v1", "PrometheusRule", _object({
    "groups": {"type": "array", "items": _object({
        "name": {"type": "string", "minLength": 1}, "interval": DURATION, "limit": {"type": "integer"},
        "query_offset": DURATION, "labels": STRING_MAP, "rules": {"type": "array", "items": _rule},
    }, ("name",))},
}))

SCALED_OBJECT = _resource("keda.sh/v1alpha1", "ScaledObject", _object({
    "scaleTargetRef": _object({"name": NAME, "kind": {"type": "string"}, "apiVersion": {"type": "string"},
                               "envSourceContainerName": {"type": "string"}}, ("name",)),
    "minReplicaCount": {"type": "integer", "minimum": 0}, "maxReplicaCount": {"type": "integer", "minimum": 1},
    "idleReplicaCount": {"type": "integer", "minimum": 0}, "pollingInterval": {"type": "integer", "minimum": 1},
    "cooldownPeriod": {"type": "integer", "minimum": 0}, "initialCooldownPeriod": {"type": "integer", "minimum": 0},
    "fallback": ANY_OBJECT, "advanced": ANY_OBJECT,
    "triggers": {"type": "array", "minItems": 1, "items": _object({
        "type": {"type": "string", "minLength": 1}, "name": {"type": "string"},
        "metadata": STRING_MAP, "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
        "authenticationRef": _object({"name": NAME, "kind": {"enum": ["TriggerAuthentication",
                                                                        "ClusterTriggerAuthentication"]}}, ("name",)),
    }, ("type", "metadata"))},
}, ("scaleTargetRef", "triggers")))

_KAFKA_TOPIC_SPEC = _object({
    "topicName": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,249}$"},
    "partitions": {"type": "integer", "minimum": 1}, "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
    "config": {"type": "object", "additionalProperties": {"type": ["string", "integer", "number", "boolean"]}},
})

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): _resource("kafka.strimzi.io/v1beta2", "KafkaTopic", _KAFKA_TOPIC_SPEC),
    ("kafka.strimzi.io/v1", "KafkaTopic"): _resource("kafka.strimzi.io/v1", "KafkaTopic", _KAFKA_TOPIC_SPEC),
}
