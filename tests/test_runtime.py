"""ddpmseg.runtime.configure_threads (torch's threads and OpenMP's wait policy, chosen before torch
starts; the CLI calls it for its torch commands) and the CLI's exit code for a bug (3)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ddpmseg.cli.main import INTERNAL_ERROR, main
from ddpmseg.errors import DdpmsegError
from ddpmseg.runtime import configure_threads

CLEAN = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
SHOW = "print(os.environ.get('OMP_NUM_THREADS', 'unset'), os.environ.get('OMP_WAIT_POLICY', 'unset'), 'torch' in sys.modules)"


def _python(code: str, **env: str) -> list[str]:
    """Run ``code`` in a fresh interpreter (torch not imported yet) with ``env`` added; its last line, split."""
    r = subprocess.run([sys.executable, "-c", "import os, sys\n" + code], capture_output=True, text=True,
                       env={**CLEAN, **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1].split()


def test_configure_threads_sets_openmp_before_torch_starts():
    cores = str(len(os.sched_getaffinity(0)))
    busy = "import ddpmseg.runtime as r; r.others_busy = lambda *a: True\n"
    idle = "import ddpmseg.runtime as r; r.others_busy = lambda *a: False\n"
    # through the lazy export of the package: import ddpmseg starts no torch
    assert _python("import ddpmseg; ddpmseg.configure_threads(3)\n" + SHOW)[:1] == ["3"]
    assert _python(idle + "r.configure_threads()\n" + SHOW) == [cores, "unset", "False"]  # alone: OpenMP's spin
    assert _python(busy + "r.configure_threads()\n" + SHOW) == [cores, "PASSIVE", "False"]  # others busy: passive
    assert _python(busy + "r.configure_threads()\n" + SHOW, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="2") \
        == ["2", "ACTIVE", "False"]  # the user's environment stands
    assert _python(busy + "r.configure_threads(5, wait_policy=None)\n" + SHOW, OMP_NUM_THREADS="2") \
        == ["5", "unset", "False"]  # threads given: they win; None: the policy is left alone
    assert _python(idle + "r.configure_threads(wait_policy='passive')\n" + SHOW, OMP_WAIT_POLICY="ACTIVE")[1] == "PASSIVE"
    # torch reads them when it starts
    assert _python(idle + "r.configure_threads(2)\nimport torch\nprint(torch.get_num_threads())") == ["2"]


def test_configure_threads_after_torch_changes_only_the_thread_count():
    out = _python("import torch, ddpmseg.runtime as r\nr.configure_threads(3, wait_policy='auto')\n"
                  "print(torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS', 'unset'), "
                  "os.environ.get('OMP_WAIT_POLICY', 'unset'))")
    assert out == ["3", "unset", "unset"]


def test_configure_threads_refuses_bad_values():
    with pytest.raises(DdpmsegError, match="--threads 0: give at least 1"):
        configure_threads(0)
    with pytest.raises(DdpmsegError, match="wait_policy 'spin'"):
        configure_threads(wait_policy="spin")


def test_the_cli_waits_passively_for_torch_commands_only():
    busy = "import ddpmseg.runtime as r; r.others_busy = lambda *a: True\nfrom ddpmseg.cli.main import main\n"
    # the group's callback runs before the command's --help: what `ddpmseg fit ...` would start torch with
    torch_command = _python(busy + "main(['--threads', '2', 'fit', '--help'], standalone_mode=False)\n" + SHOW)
    other = _python(busy + "main(['presets'], standalone_mode=False)\n" + SHOW)
    assert torch_command == ["2", "PASSIVE", "False"]
    assert other[1] == "unset"  # presets runs no model (its import of the registry loads torch, after)


def test_an_internal_error_exits_3_with_one_line_that_says_it_is_a_bug(monkeypatch):
    import ddpmseg.backbones

    def broken():
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(ddpmseg.backbones, "list_presets", broken)
    r = CliRunner().invoke(main, ["presets"])
    assert r.exit_code == INTERNAL_ERROR == 3  # not 2, click's usage error
    assert r.stderr.strip().splitlines() == [
        "ddpmseg: internal error: ZeroDivisionError: division by zero second line; this is a bug in ddpmseg: "
        "rerun with --debug and report the traceback"]
    debug = CliRunner().invoke(main, ["--debug", "presets"])
    assert debug.exit_code == 3 and "Traceback" in debug.stderr and "ZeroDivisionError" in debug.stderr
    usage = CliRunner().invoke(main, ["presets", "--no-such-option"])
    assert usage.exit_code == 2  # a usage error stays click's 2
