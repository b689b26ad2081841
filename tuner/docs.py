"""Generated parts of ``README.md`` about the tuner: its settings and metrics tables.

Same markers and machinery as `consumers.docs`; ``python -m tuner.docs`` rewrites these blocks in place.
"""

from __future__ import annotations

import sys
from pathlib import Path

from consumers import docs
from consumers.settings import ModelSettings, settings_table
from tuner.metrics import TunerMetrics
from tuner.settings import TunerSettings


def generated_blocks() -> dict[str, str]:
    return {
        "tuner-settings": settings_table(TunerSettings, fields=docs.own_fields(TunerSettings, ModelSettings)),
        "tuner-metrics": docs.metrics_table(TunerMetrics()),
    }


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else docs.README
    changed = docs.sync(path, generated_blocks())
    print(f"{path.name}: {'updated' if changed else 'up to date'}")
