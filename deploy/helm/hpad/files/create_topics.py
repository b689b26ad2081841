"""Create the Kafka topics hpad uses; topics that exist already are left as they are.

Run by the hpad chart's topics Job (a helm pre-install/pre-upgrade hook) with the hpad image's Python:

    python create_topics.py topics.json

``topics.json`` is a list of ``{"name", "partitions", "replicationFactor", "config": {...}}``. The broker
address and the TLS / SASL options come from the same ``HPAD_*`` variables the services read
(`consumers.settings.KafkaSettings`), so a cluster the scorers can reach is a cluster this can reach.
Existing topics whose partition count or replication differs from the request are reported, not altered
(adding partitions would move cameras to other partitions). Exit codes: 0 done, 1 Kafka error, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from consumers.settings import KafkaSettings, connection_kwargs, load_settings
from hpad.errors import HpadError


def read_spec(path: Path) -> list[dict]:
    spec = json.loads(path.read_text())
    if not isinstance(spec, list) or not all(isinstance(t, dict) and t.get("name") for t in spec):
        raise ValueError(f"{path}: expected a list of topics with a name")
    return spec


def create_topics(admin: KafkaAdminClient, spec: list[dict]) -> list[str]:
    """Create the missing topics; return one line per topic saying what happened."""
    existing = {t["name"]: t for t in admin.describe_topics()}
    report = []
    for topic in spec:
        name, partitions, replicas = topic["name"], int(topic["partitions"]), int(topic["replicationFactor"])
        if name in existing:
            have = existing[name]["partitions"]
            have_replicas = len(have[0]["replica_nodes"]) if have else 0
            note = ""
            if len(have) != partitions or have_replicas != replicas:
                note = (f" (WARNING: asked for {partitions} partitions x {replicas} replicas, it has {len(have)} x "
                        f"{have_replicas}; left unchanged)")
            report.append(f"exists  {name}{note}")
            continue
        configs = {str(k): str(v) for k, v in (topic.get("config") or {}).items()}
        try:
            admin.create_topics([NewTopic(name, partitions, replicas, topic_configs=configs)])
            report.append(f"created {name}: {partitions} partitions x {replicas} replicas {configs}")
        except TopicAlreadyExistsError:  # created by someone else meanwhile
            report.append(f"exists  {name}")
    return report


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        spec = read_spec(Path(argv[0]))
        settings = load_settings(KafkaSettings, {"client_id": "hpad-topics"})
    except (OSError, ValueError, HpadError) as exc:
        print(f"create_topics: {exc}", file=sys.stderr)
        return 2
    try:
        admin = KafkaAdminClient(**connection_kwargs(settings))
        try:
            for line in create_topics(admin, spec):
                print(line, flush=True)
        finally:
            admin.close()
    except KafkaError as exc:
        print(f"create_topics: Kafka error: {exc!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
