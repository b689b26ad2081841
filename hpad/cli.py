"""The ``hpad`` command line.

Library commands (``score``, ``eval``, ...) are defined in this package. Service commands (``serve``,
``camera``, ``tune``, ``prompts``) live with their services in ``consumers/`` and ``tuner/`` and are imported
only when asked for, so the library never imports Kafka or settings code.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from hpad.errors import HpadError

# command -> "module:function"; the function takes the remaining argv and returns an exit code
SERVICE_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("consumers.app:main", "run the Kafka scoring worker"),
    "camera": ("consumers.camera:main", "publish a folder of images as camera frames"),
    "tune": ("tuner.app:main", "run the prompt tuning daemon"),
    "prompts": ("tuner.registry_cli:main", "list / show / publish / roll back prompt versions"),
}

LIBRARY_COMMANDS: dict[str, tuple[str, str]] = {}


def library_command(name: str, help_text: str) -> Callable[[Callable[[Sequence[str]], int]], Callable]:
    """Register ``func(argv) -> exit code`` as ``hpad NAME``."""

    def wrap(func: Callable[[Sequence[str]], int]) -> Callable[[Sequence[str]], int]:
        LIBRARY_COMMANDS[name] = (f"{func.__module__}:{func.__name__}", help_text)
        return func

    return wrap


def _load(target: str) -> Callable[[Sequence[str]], int]:
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def _commands() -> dict[str, tuple[str, str]]:
    importlib.import_module("hpad.commands")  # registers the library commands
    return {**LIBRARY_COMMANDS, **SERVICE_COMMANDS}


def _usage(commands: dict[str, tuple[str, str]]) -> str:
    width = max(len(name) for name in commands)
    lines = ["usage: hpad COMMAND [options]   (hpad COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_text}" for name, (_, help_text) in sorted(commands.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage(commands))
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from hpad import __version__

        print(f"hpad {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in commands:
        print(f"hpad: unknown command {name!r}\n\n{_usage(commands)}", file=sys.stderr)
        return 2
    # open_clip logs chatter at INFO on the root logger: keep the root at WARNING, our packages at INFO
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for package in ("hpad", "consumers", "tuner"):
        logging.getLogger(package).setLevel(logging.INFO)
    try:
        return int(_load(commands[name][0])(rest) or 0)
    except HpadError as exc:
        print(f"hpad {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
