"""scripts/host_path.py, which times the torch host path against autograd's floor, runs on any
machine and reports the three modes: its stand-in Functions (in Python, and in C++ where an extension
can be built) must keep matching the structure of theria's (a forward saving its inputs and outputs,
a backward whose double backward is a Function)."""

import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "host_path.py"


def test_host_path_reports_every_mode():
    result = subprocess.run([sys.executable, str(SCRIPT), "--calls", "20"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if not line.startswith(("#", "mode"))}
    assert set(rows) == {"fwd", "fwd_bwd", "hvp"}, result.stdout
    # floor_cpp, the floor's Functions in C++, is a fourth column where a C++ extension can be built
    columns = {len(values) for values in rows.values()}
    header = next(line for line in result.stdout.splitlines() if line.startswith("mode"))
    assert columns in ({3}, {4}) and (columns == {4}) == header.endswith("floor_cpp"), result.stdout
    for mode, (theria, floor, ratio, *in_cpp) in rows.items():
        assert float(theria) > 0 and float(floor) > 0 and ratio.endswith("x"), (mode, result.stdout)
        assert all(float(value) > 0 for value in in_cpp), (mode, result.stdout)
