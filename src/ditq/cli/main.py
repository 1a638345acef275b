"""``ditq``: the entry point. Parses the command line and runs one subcommand.

Errors a user can cause (:class:`ditq.errors.DitqError`) are printed as one
line, ``ditq: error: <message>``, with exit status 2; Ctrl-C exits with 130.
Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ditq import __version__
from ditq.cli import demo, eval, export, extract, info, ptq, sample, train, train_evaluator
from ditq.errors import DitqError, StoppedBySignal

# One module per subcommand, in the order `ditq --help` lists them. All are imported to build the
# parser, so they import torch, numpy and the rest of ditq inside their `run` only: `ditq --version`
# and `ditq --help` then take ~0.1 s instead of the seconds torch's import costs
# (tests/cli/test_cli_info.py checks that torch stays unimported).
SUBCOMMANDS = (train, export, extract, sample, ptq, eval, train_evaluator, info, demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``ditq`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="ditq",
        description="Diffusion Transformers made small and fast: sample, quantize, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"ditq {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ditq`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        # argparse exits on --help, --version and syntax errors; return its status instead.
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(args.func(args) or 0)
    except StoppedBySignal as e:  # not an error: the run saved its state and says how to resume
        print(f"ditq: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_status
    except DitqError as e:
        print(f"ditq: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("ditq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`ditq info x | head`): not an error of ours. Point
        # stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def entry() -> None:
    """The ``ditq`` executable (and ``python -m ditq``): :func:`main`, then exit with its status.

    Under ``torchrun`` the process leaves with ``os._exit`` once its output is flushed: in about one
    launch in ten, a thread of torch's c10d store was still joinable when the interpreter's teardown
    destroyed it, and the process aborted (SIGABRT) after its work was done and written, which
    torchrun then reports as a failed run (torch 2.13, gloo on CPU; the workers of
    tests/dist_worker.py leave the same way). Every file ditq writes is complete and renamed by then.
    """
    status = main()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
