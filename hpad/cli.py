"""The ``hpad`` command line: one command table.

Library commands (``score``, ``eval``, ``train``, ``weights``, ``export``, ``oagm``) are listed in `LIBRARY_COMMANDS`.
Service commands (``serve``, ``camera``, ``tune``, ``prompts``) are declared by the services themselves as
Python entry points of the group ``hpad.commands`` (see pyproject.toml) and discovered here with
`importlib.metadata`, so the library never names or imports Kafka or settings code; they need the
``hpad[service]`` extra. Every command is ``func(argv) -> exit code``, imported only when asked for.
"""

from __future__ import annotations

import importlib
import logging
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from hpad.errors import HpadError

ENTRY_POINT_GROUP = "hpad.commands"
SOURCE_TREE: Path | None = Path(__file__).resolve().parents[1]  # the checkout, when hpad runs from one
SERVICE_EXTRA = "pip install 'hpad[service]'"


@dataclass(frozen=True)
class Command:
    target: str  # "module:function"; the function takes the remaining argv and returns an exit code
    help: str


LIBRARY_COMMANDS: dict[str, Command] = {
    "score": Command("hpad.commands:score_main", "score image files; prints one JSON line per image"),
    "eval": Command("hpad.commands:eval_main",
                    "evaluate on an MVTec-layout category: metrics.json, metrics.md, overlays"),
    "train": Command("hpad.commands:train_main",
                     "learn human-free prompts from k normal images (OAGM + MPTS) -> artifact"),
    "weights": Command("hpad.commands:weights_main",
                       "fetch CLIP weights into a cache dir (run where internet is allowed)"),
    "export": Command("hpad.export_cli:export_main",
                      "export the image tower with LAA (ONNX / OpenVINO IR) + manifest for the CPU runtimes"),
    "oagm": Command("hpad.oagm_cli:oagm_main",
                    "preview OAGM object masks and synthetic anomalies as a PNG contact sheet"),
}


def service_commands() -> dict[str, Command]:
    """The installed service commands: entry points of the group ``hpad.commands`` (none without the services).

    Run from a source checkout (``PYTHONPATH=.``, as on a GPU machine that gets the tree copied, or a git
    worktree beside an older install), the checkout's pyproject.toml table is read too and wins: the commands
    are those of the code being run, not of whatever was installed last.
    """
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if SOURCE_TREE is not None:
        found.update(source_tree_commands(SOURCE_TREE))
    return {name: Command(target, f"service command ({target})") for name, target in found.items()
            if name not in LIBRARY_COMMANDS}


def source_tree_commands(root: Path) -> dict[str, str]:
    """``[project.entry-points."hpad.commands"]`` of the hpad pyproject.toml in ``root`` ({} if there is none)."""
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    if project.get("name") != "hpad":
        return {}
    return dict(project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {}))


def commands() -> dict[str, Command]:
    return {**LIBRARY_COMMANDS, **service_commands()}


def _load(target: str) -> Callable[[Sequence[str]], int]:
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def _usage(table: dict[str, Command]) -> str:
    width = max(len(name) for name in table)
    lines = ["usage: hpad COMMAND [options]   (hpad COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {command.help}" for name, command in sorted(table.items())]
    if not any(name not in LIBRARY_COMMANDS for name in table):
        lines += ["", f"service commands (serve, camera, tune, prompts) are not installed: {SERVICE_EXTRA}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    table = commands()
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage(table))
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from hpad import __version__

        print(f"hpad {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in table:
        print(f"hpad: unknown command {name!r}\n\n{_usage(table)}", file=sys.stderr)
        return 2
    # open_clip logs chatter at INFO on the root logger: keep the root at WARNING, our packages at INFO
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for package in ("hpad", "consumers", "tuner"):
        logging.getLogger(package).setLevel(logging.INFO)
    try:
        func = _load(table[name].target)
    except ModuleNotFoundError as exc:
        if name in LIBRARY_COMMANDS:
            raise
        print(f"hpad {name}: error: this service command needs the service extra ({exc}): {SERVICE_EXTRA}",
              file=sys.stderr)
        return 2
    try:
        return int(func(rest) or 0)
    except HpadError as exc:
        print(f"hpad {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
