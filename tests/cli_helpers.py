"""Running the CLI in tests: a command that must succeed, or fail with one error line."""

from __future__ import annotations

from click.testing import CliRunner, Result

from ddpmseg.cli.main import main


def cli(*args) -> Result:
    """``ddpmseg -q ARGS`` in this process (arguments may be paths or numbers)."""
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def ok(*args) -> str:
    """Run a command that must succeed quietly; its stdout."""
    result = cli(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stderr.strip() == "", result.stderr
    return result.stdout


def fails(*args, match: str | tuple[str, ...]) -> str:
    """Exit 1, one 'ddpmseg: error:' line on stderr holding every ``match`` string, no traceback."""
    result = cli(*args)
    assert result.exit_code == 1, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ddpmseg: error:"), err
    for m in (match,) if isinstance(match, str) else match:
        assert str(m) in err, (m, err)
    return err
