"""scripts/tune_attention.py's choice, on any machine: ``--reselect`` picks again from an earlier
run's times (the committed H200 run of the 32 head-dim class), keeping the shapes given."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "docs" / "results" / "tuning" / "h200_d32" / "tuning.json"


def _reselect(tmp_path, *shapes) -> dict:
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_attention.py"), "--reselect", str(RUN),
                             "--shapes", *shapes, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "tuning.json").read_text())


def _chosen(report: dict) -> dict:
    return {row["kind"]: tuple(row["chosen"]) for row in report["results"]}


def test_reselect_keeps_only_the_shapes_given(tmp_path):
    report = _reselect(tmp_path, "64,8,1024,32")
    for row in report["results"]:
        for entry in row["candidates"]:
            assert set(entry["ms"]) <= {"64,8,1024,32 full", "64,8,1024,32 causal"}
    # The fastest non-spilling candidate by the geometric mean of its two times, computed here from
    # the run's own numbers; where every candidate spills (the double backward), the fastest.
    original = json.loads(RUN.read_text())
    for row, before in zip(report["results"], original["results"]):
        timed = [e for e in before["candidates"] if e["ms"]]
        current = next(e for e in timed if tuple(e["tile"]) == tuple(before["current"]))
        keys = ("64,8,1024,32 full", "64,8,1024,32 causal")
        score = {tuple(e["tile"]): math.prod(e["ms"][key] / current["ms"][key] for key in keys) for e in timed}
        clean = [tuple(e["tile"]) for e in timed if not e["spills"]] or list(score)
        assert tuple(row["chosen"]) == min(clean, key=score.__getitem__)
    assert "reselected_from" in report and "Chosen again" in (tmp_path / "out" / "tuning.md").read_text()


def test_reselect_with_every_shape_gives_the_original_choice(tmp_path):
    original = json.loads(RUN.read_text())
    report = _reselect(tmp_path, *original["shapes"])
    assert _chosen(report) == {row["kind"]: tuple(row["chosen"]) for row in original["results"]}


def test_the_table_holds_the_reselected_32_class():
    """The 32 head-dim class of sm_90's table is the choice made from the t1024 times."""
    from theria_kernels.attention import _tuning

    reselected = json.loads((RUN.parent / "reselected" / "tuning.json").read_text())
    for row in reselected["results"]:
        assert _tuning.SM90[row["kind"]][32][2] == tuple(row["chosen"]), row["kind"]
