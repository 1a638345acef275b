"""ditq's entry point: --version, exit statuses, one-line errors."""

from __future__ import annotations

import pytest

import ditq
from ditq.cli import main as cli_main
from ditq.cli import sample as cli_sample
from ditq.errors import InvalidArgumentError


def test_version(capsys):
    assert cli_main.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ditq {ditq.__version__}"


def test_help_lists_subcommands(capsys):
    assert cli_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("sample", "info", "demo"):
        assert name in out


def test_no_command_is_a_usage_error(capsys):
    assert cli_main.main([]) == 2
    assert "required" in capsys.readouterr().err


def test_every_subcommand_takes_seed():
    parser = cli_main.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        if name == "info":  # reads a file header; nothing random to seed
            continue
        assert any("--seed" in a.option_strings for a in sub._actions), name


def test_ditq_errors_are_one_line_with_status_2(monkeypatch, capsys):
    def boom(args):
        raise InvalidArgumentError("first line\nsecond line")

    monkeypatch.setattr(cli_sample, "run", boom)
    assert cli_main.main(["sample", "--model", "x"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "ditq: error: first line second line\n"


def test_keyboard_interrupt_is_status_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_sample, "run", interrupted)
    assert cli_main.main(["sample", "--model", "x"]) == 130


def test_other_exceptions_are_bugs(monkeypatch):
    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli_sample, "run", bug)
    with pytest.raises(RuntimeError):
        cli_main.main(["sample", "--model", "x"])
