"""Generated parts of ``README.md``: settings, metrics and dead-letter reason tables.

The tables sit between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` markers and are produced
from the settings classes and the metrics registry, so the document cannot drift from the code (a test
compares them). ``python -m consumers.docs`` rewrites the scorer's and camera's blocks in place,
``python -m tuner.docs`` the tuner's (each package documents itself: consumers never imports the tuner).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from consumers.camera_metrics import CameraMetrics
from consumers.cameras_file import CameraSpec
from consumers.console.metrics import ConsoleMetrics
from consumers.console.settings import ConsoleSettings
from consumers.console.store import DROP_REASONS as CONSOLE_DROP_REASONS
from consumers.contract import REASONS
from consumers.metrics import WorkerMetrics
from consumers.settings import CameraSettings, KafkaSettings, WorkerSettings, settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def metrics_table(holder: object | None = None) -> str:
    """| metric | type | labels | meaning | for every metric family of the worker (or ``holder``)."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for name, kind, labels, text in (holder or WorkerMetrics()).families():
        escaped = text.replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | {', '.join(labels) or '-'} | {escaped} |")
    return "\n".join(lines)


def spec_table() -> str:
    """| field | default | meaning | of one camera in a cameras file (`CameraSpec`)."""
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for name, info in CameraSpec.model_fields.items():
        default = "required" if info.is_required() else _default(info.default)
        text = (info.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | {default} | {text} |")
    return "\n".join(lines)


def _default(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def reasons_table() -> str:
    lines = ["| `hpad-error-class` | meaning |", "|---|---|"]
    lines += [f"| `{code}` | {text} |" for code, text in REASONS.items()]
    return "\n".join(lines)


def generated_blocks() -> dict[str, str]:
    """The blocks this package documents (the tuner's: `tuner.docs.generated_blocks`)."""
    return {
        "worker-settings": settings_table(WorkerSettings),
        "camera-settings": settings_table(CameraSettings, fields=own_fields(CameraSettings, KafkaSettings)),
        "metrics": metrics_table(),
        "camera-metrics": metrics_table(CameraMetrics()),
        "camera-spec": spec_table(),
        "reasons": reasons_table(),
        "console-settings": settings_table(ConsoleSettings, fields=own_fields(ConsoleSettings, KafkaSettings)),
        "console-metrics": metrics_table(ConsoleMetrics()),
        "console-drops": "\n".join(["| `reason` | meaning |", "|---|---|"]
                                    + [f"| `{k}` | {v} |" for k, v in CONSOLE_DROP_REASONS.items()]),
    }


def own_fields(cls: type[KafkaSettings], base: type[KafkaSettings]) -> list[str]:
    """The settings of ``cls`` that ``base`` does not have (and ``client_id``, which every service sets)."""
    return [n for n in cls.model_fields if n not in base.model_fields or n == "client_id"]


def block(text: str, name: str) -> str | None:
    match = re.search(rf"<!-- generated:{name} -->\n(.*?)<!-- /generated:{name} -->", text, re.S)
    return None if match is None else match.group(1).rstrip("\n")


def sync(path: Path = README, blocks: dict[str, str] | None = None) -> bool:
    """Rewrite the generated blocks of ``path`` (default: this package's); True when something changed."""
    text = path.read_text()
    new = text
    for name, table in (generated_blocks() if blocks is None else blocks).items():
        if block(new, name) is None:
            raise SystemExit(f"{path} has no <!-- generated:{name} --> block")
        new = re.sub(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)",
                     lambda m, t=table: m.group(1) + t + "\n" + m.group(2), new, flags=re.S)
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = sync(Path(sys.argv[1]) if len(sys.argv) > 1 else README)
    print(f"{README.name}: {'updated' if changed else 'up to date'}")
