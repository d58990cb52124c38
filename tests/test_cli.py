"""The command line itself: every command's --help renders (a click release once broke it for custom types)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from utrexport.cli import main


@pytest.mark.parametrize("command", [[]] + [[name] for name in sorted(main.commands)])
def test_every_help_renders(command):
    result = CliRunner().invoke(main, command + ["--help"])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "Usage: " in result.output and "--help" in result.output
