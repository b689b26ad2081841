"""Generated parts of ``README.md`` about ``hpad alerts``: its settings and metrics tables.

Same markers and machinery as `consumers.docs`; ``python -m consumers.alerts.docs`` rewrites these blocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from consumers import docs
from consumers.alerts.metrics import AlertsMetrics
from consumers.alerts.settings import AlertsSettings
from consumers.settings import KafkaSettings, settings_table


def own_fields() -> list[str]:
    """The settings of ``hpad alerts`` beyond the shared Kafka connection and security ones."""
    return docs.own_fields(AlertsSettings, KafkaSettings)


def generated_blocks() -> dict[str, str]:
    return {
        "alerts-settings": settings_table(AlertsSettings, fields=own_fields()),
        "alerts-metrics": docs.metrics_table(AlertsMetrics()),
    }


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else docs.README
    changed = docs.sync(path, generated_blocks())
    print(f"{path.name}: {'updated' if changed else 'up to date'}")
