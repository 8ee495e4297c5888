"""scripts/ab_revisions.py: each arm runs the kernels it names, in rounds of base then current, and
a failing command fails the script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ab_revisions.py"
PROBE = "import os, theria_kernels; print('from', os.path.realpath(theria_kernels.__file__))"


def _is_checkout() -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _is_checkout(), reason="needs a git checkout of the project")


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_each_round_runs_base_then_current_on_their_own_kernels():
    result = _run("--base", "HEAD", "--rounds", "2", "--grep", "^from ", "--", sys.executable, "-c", PROBE)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    headers = [line for line in lines if line.startswith("## ")]
    assert headers == ["## round 1 base HEAD", "## round 1 current", "## round 2 base HEAD", "## round 2 current"]
    imported = [line.split(" ", 1)[1] for line in lines if line.startswith("from ")]
    assert len(imported) == 4
    working_tree = str((ROOT / "kernels" / "__init__.py").resolve())
    base, current = imported[0::2], imported[1::2]
    assert all(path == working_tree for path in current)
    assert all(path != working_tree and path.endswith("/kernels/__init__.py") for path in base)
    assert base[0] == base[1]  # one unpacked copy for every round


def test_a_failing_command_or_revision_fails_the_script():
    failing = _run("--base", "HEAD", "--rounds", "1", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert failing.returncode == 3 and "## round 1 current (exit 3)" in failing.stdout
    missing = _run("--base", "not-a-revision", "--", sys.executable, "-c", "pass")
    assert missing.returncode != 0 and "--base 'not-a-revision'" in missing.stderr
