"""The ``ditq`` command line: :mod:`ditq.cli.main` dispatches to one module per subcommand.

Each subcommand module exposes ``add_parser(subparsers)`` (which sets
``func=run`` on its parser) and ``run(args) -> int``; it parses, then calls a
pipeline, so everything the CLI does is also a Python call.
"""
