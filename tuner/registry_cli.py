"""``hpad prompts``: look at and manage the prompt registry topic.

    hpad prompts list [--category C]            every version on the topic (invalid ones flagged)
    hpad prompts show --category C [--version V] the manifest of one version (default: the newest valid)
    hpad prompts publish FILE                    publish an artifact file as the category's next version
    hpad prompts rollback --category C --to V    republish version V's content as the newest version

Exit codes: 0 done, 1 the registry refused (version missing, broker error), 2 bad settings or arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from consumers import kafka_io
from consumers.prompt_records import RegistryRecord
from consumers.settings import (
    add_cli_flags,
    cli_overrides,
    load_settings,
    producer_kwargs,
    prompts_consumer_kwargs,
)
from hpad.artifact import read_artifact
from hpad.errors import ArtifactError
from tuner.registry import PromptRegistry, RegistryError
from tuner.settings import RegistrySettings


def registry_from(settings: RegistrySettings) -> PromptRegistry:
    return PromptRegistry(
        settings.prompts_topic, lambda: kafka_io.make_consumer(prompts_consumer_kwargs(settings)),
        lambda: kafka_io.make_producer({**producer_kwargs(settings), "max_request_size": 80 * 1024 * 1024}),
        expected_identity=settings.expected_identity, send_timeout_s=settings.request_timeout_ms / 1000,
    )


def row_summary(row: RegistryRecord) -> dict:
    when = datetime.fromtimestamp(row.timestamp_ms / 1000, UTC).isoformat(timespec="seconds")
    base = {"category": row.category, "version": row.version, "offset": row.offset, "published_at": when}
    if row.artifact is None:
        return {**base, "valid": False, "error": row.error}
    m = row.artifact.manifest
    return {**base, "valid": True, "sha256": row.artifact.sha256[:16], "model_identity": m["model_identity"],
            "threshold": m["threshold"], "source": m.get("source"), "rollback_of": m.get("rollback_of"),
            "random_weights": m.get("random_weights", False)}


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no prompt versions on the topic)"
    cols = ["category", "version", "valid", "sha256", "model_identity", "threshold", "rollback_of", "published_at"]
    cells = [[str(r.get(c, "") if r.get(c) is not None else "") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    errors = [f"  version {r['version']} of {r['category']}: INVALID: {r['error']}" for r in rows if not r["valid"]]
    return "\n".join(lines + errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpad prompts", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    p_list = sub.add_parser("list", help="every version on the topic")
    p_list.add_argument("--category")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_show = sub.add_parser("show", help="the manifest of one version")
    p_show.add_argument("--category", required=True)
    p_show.add_argument("--version", type=int, help="default: the newest valid version")
    p_pub = sub.add_parser("publish", help="publish an artifact file as the next version")
    p_pub.add_argument("file", type=Path)
    p_rb = sub.add_parser("rollback", help="republish an earlier version as the newest")
    p_rb.add_argument("--category", required=True)
    p_rb.add_argument("--to", type=int, required=True, dest="to_version")
    for p in (p_list, p_show, p_pub, p_rb):
        add_cli_flags(p, RegistrySettings)
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    settings = load_settings(RegistrySettings, cli_overrides(ns, RegistrySettings))
    assert isinstance(settings, RegistrySettings)
    registry = registry_from(settings)
    try:
        if ns.action == "list":
            rows = [row_summary(r) for r in registry.history(ns.category)]
            print(json.dumps(rows, indent=1) if ns.json else format_table(rows))
        elif ns.action == "show":
            rows = registry.history(ns.category)
            if ns.version is None:
                row = PromptRegistry.latest_valid(rows, ns.category)
            else:
                row = next((r for r in reversed(rows) if r.version == ns.version), None)
            if row is None:
                raise RegistryError(f"no {'valid ' if ns.version is None else ''}version "
                                    f"{ns.version if ns.version is not None else ''} of {ns.category!r} on "
                                    f"{settings.prompts_topic}".replace("  ", " "))
            if row.artifact is None:
                print(json.dumps(row_summary(row), indent=1))
                return 1
            print(json.dumps(row.artifact.manifest, indent=1, sort_keys=True))
        elif ns.action == "publish":
            try:
                artifact = read_artifact(ns.file, expected_identity=settings.expected_identity)
            except ArtifactError as exc:
                print(f"hpad prompts publish: {ns.file}: {exc}", file=sys.stderr)
                return 2
            published = registry.publish(artifact, published_from=ns.file.name)
            print(f"published {published.prompts.category} version {published.version} "
                  f"(sha256 {published.sha256[:16]}) to {settings.prompts_topic}")
        else:
            published = registry.rollback(ns.category, ns.to_version)
            print(f"rolled back {ns.category} to the content of version {ns.to_version}: now version "
                  f"{published.version} (sha256 {published.sha256[:16]}) on {settings.prompts_topic}")
    except RegistryError as exc:
        print(f"hpad prompts {ns.action}: {exc}", file=sys.stderr)
        return 1
    return 0
