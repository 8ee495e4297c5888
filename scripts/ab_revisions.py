"""Run one command on the kernels of two revisions, alternating, to time a kernel change.

The base revision's ``kernels/`` (``git archive``) is unpacked into a temporary folder and put
first on PYTHONPATH as ``theria_kernels``; the other arm runs the working tree's. Everything else
(the adapters, the scripts, the command itself) is the working tree's in both arms, so the two
revisions' kernels must share their launch interface. Each round runs base then current, each in a
fresh process; ``--grep`` keeps the lines worth reading (a benchmark's rows, its ``--kernels``
lines). Interleaving the arms in rounds on one machine is what makes a few per cent readable: the
same command on separately lent machines differs by more (docs/benchmarks.md).

    python scripts/ab_revisions.py --base 778bc22 --rounds 2 --grep '^#  .*dkdv' -- \\
        python scripts/bench_sdpa.py --preset large --mode fwd_bwd --skip math efficient flash cudnn --kernels
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unpack_kernels(revision: str, into: Path) -> Path:
    """``revision``'s ``kernels/`` under ``into``, importable as ``theria_kernels`` from the folder
    returned."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "kernels"], capture_output=True,
                             check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--base {revision!r}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    path = into / "path"
    path.mkdir()
    (path / "theria_kernels").symlink_to(into / "kernels", target_is_directory=True)
    return path


def arm_env(first: str | None) -> dict:
    """The environment of an arm: ``first`` (the base's kernels) put first on PYTHONPATH, or as is."""
    env = dict(os.environ)
    if first is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [first, env.get("PYTHONPATH")]))
    return env


def kernels_imported(env: dict) -> str:
    """Where ``theria_kernels`` comes from in a Python process with ``env``."""
    probe = [sys.executable, "-c", "import theria_kernels, os; print(os.path.realpath(theria_kernels.__file__))"]
    return subprocess.run(probe, env=env, capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision whose kernels/ the base arm runs")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of base then current")
    parser.add_argument("--grep", default="", help="print only the output lines matching this regex")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run in each arm")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    keep = re.compile(args.grep)
    with tempfile.TemporaryDirectory(prefix="theria_ab_") as folder:
        base_path = unpack_kernels(args.base, Path(folder))
        arms = {f"base {args.base}": arm_env(str(base_path)), "current": arm_env(None)}
        for arm, env in arms.items():  # each arm imports the kernels it names, or nothing is timed
            imported = kernels_imported(env)
            if arm.startswith("base") != imported.startswith(os.path.realpath(folder)):
                raise SystemExit(f"the {arm} arm imports theria_kernels from {imported}: install the project "
                                 "(pip install -e .) or put the working tree's kernels on PYTHONPATH")
            print(f"# {arm}: {imported}")
        worst = 0
        for round_ in range(1, args.rounds + 1):
            for arm, env in arms.items():
                result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
                print(f"## round {round_} {arm}" + (f" (exit {result.returncode})" if result.returncode else ""))
                for line in (result.stdout + result.stderr).splitlines():
                    if keep.search(line):
                        print(line)
                sys.stdout.flush()
                worst = max(worst, result.returncode)
    return worst


if __name__ == "__main__":
    sys.exit(main())
