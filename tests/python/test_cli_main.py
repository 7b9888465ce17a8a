"""The ``fourbit`` entry points: ``python -m fourbit``, ``--help`` on every command, ``--version``,
and an unknown command or flag as a usage error (exit 2)."""

import subprocess
import sys

import pytest

from _cli_helpers import run

COMMANDS = ("doctor", "estimate", "quantize", "inspect", "train", "merge")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(command):
    out = run(command, "--help").output
    assert out.startswith("Usage: ") and command in out


def test_group_help_lists_commands_and_exit_codes():
    out = run("--help").output
    assert all(c in out for c in COMMANDS) and "Exit codes" in out
    assert "fourbit" in run("--version").output
    run("no-such-command", expect=2)
    run("inspect", "--no-such-flag", "x", expect=2)


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "fourbit", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "quantize" in result.stdout
