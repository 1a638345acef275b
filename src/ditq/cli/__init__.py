"""The ``ditq`` command line: :mod:`ditq.cli.main` dispatches to one module per subcommand.

Each subcommand module exposes ``add_parser(subparsers)`` (which sets
``func=run`` on its parser) and ``run(args) -> int``; it parses, then calls a
pipeline, so everything the CLI does is also a Python call.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable


def command_line(args: argparse.Namespace, add_parser: Callable) -> str:
    """The ``ditq`` command line that gives ``args`` to the subcommand ``add_parser`` registers, options
    at their defaults left out: what a stopped run prints to be resumed with. Rebuilt from the parser,
    since ``sys.argv`` is not the command's when it runs as ``main([...])``."""
    parser = add_parser(argparse.ArgumentParser(prog="ditq").add_subparsers())
    parts = parser.prog.split()
    for action in parser._actions:
        value = getattr(args, action.dest, action.default)
        if isinstance(action, argparse._HelpAction) or value == action.default:
            continue
        if not action.option_strings:
            parts.append(str(value))
        else:
            flag = max(action.option_strings, key=len)
            parts += [flag] if action.nargs == 0 else [flag, str(value)]
    return shlex.join(parts)
