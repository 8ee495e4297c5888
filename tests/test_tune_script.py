"""scripts/tune_attention.py's choice, on any machine: ``--reselect`` picks again from an earlier
run's times (the committed H200 run of the 32 head-dim class, and a ``--tma`` run's report),
keeping the shapes and masks given; and a dry run of the whole script on the CPU (CUDA faked,
the candidates compiled for sm_90 for real, each timing a function of the tile the call ran on),
run by ``python tests/test_tune_script.py --dry-run OUT`` in a child process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "docs" / "results" / "tuning" / "h200_d32" / "tuning.json"


def _reselect_run(run: Path, out: Path, shapes, masks=()) -> tuple[dict, str]:
    """``tune_attention.py --reselect run`` kept to ``shapes`` (and ``masks``, default the script's):
    the report and its markdown."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_attention.py"), "--reselect", str(run),
                             "--shapes", *shapes, *(("--masks", *masks) if masks else ()), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "tuning.json").read_text()), (out / "tuning.md").read_text()


def _reselect(tmp_path, *shapes) -> dict:
    return _reselect_run(RUN, tmp_path / "out", shapes)[0]


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


def test_a_tma_run_chooses_per_entry_and_lists_the_tma_kinds(tmp_path):
    """A ``--tma`` run's report (each entry's current tile timed without and with TMA loads) chosen
    again: TMA where it was faster over the shapes and masks kept, and the markdown lists those
    entries as the set ``_tuning.TMA_KINDS`` would hold."""
    tile = [64, 64, 4, 2]

    def entry(tma, full, causal):
        return dict(tile=tile, tma=tma, shared=0, registers=128, spills=0, problems=[],
                    ms={"8,16,4096,64 full": full, "8,16,4096,64 causal": causal})

    run = dict(device="a GPU", capability=90, table_of=90, dtype="bfloat16", shapes=["8,16,4096,64"],
               masks=["full", "causal"], rep_ms=60, timing="graph", seconds=1.0, tma=True,
               versions=dict(torch="t", triton="t", python="p"), command="python scripts/tune_attention.py --tma",
               results=[dict(kind="backward", head_dim=64, current=tile,
                             candidates=[entry(False, 5.0, 3.0), entry(True, 4.8, 2.9)]),
                        dict(kind="backward_backward", head_dim=64, current=tile,
                             candidates=[entry(False, 13.2, 7.0), entry(True, 13.0, 7.4)])])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    report, text = _reselect_run(path, tmp_path / "out", ["8,16,4096,64"])
    assert [row["chosen_tma"] for row in report["results"]] == [True, False]
    assert "[('backward', 64, 2)]" in text
    # The double backward's TMA wins without the mask and loses more with it: kept to the full
    # times alone, it is chosen.
    report, text = _reselect_run(path, tmp_path / "out", ["8,16,4096,64"], ["full"])
    assert [row["chosen_tma"] for row in report["results"]] == [True, True]
    assert "[('backward', 64, 2), ('backward_backward', 64, 2)]" in text


def test_mask_classes_choose_apart_and_banded_entries_are_listed_where_they_differ(tmp_path):
    """A run's rows of one (kind, head dim) per mask class, chosen again: each class takes its own
    fastest tile; the markdown gives the table entry from the run without a mask and lists the
    banded choice for ``_tuning.BANDED_TILES`` only where it differs; kept to one class's masks,
    the other class's rows go."""
    wide, narrow = [128, 64, 8, 2], [64, 64, 4, 3]

    def entry(tile, mask, ms):
        return dict(tile=tile, tma=None, shared=0, registers=128, spills=0, problems=[],
                    ms={f"8,16,4096,64 {mask}": ms})

    def row(kind, banded, current, wide_ms, narrow_ms):
        mask = "causal" if banded else "full"
        return dict(kind=kind, head_dim=64, banded=banded, masks=[mask], current=current,
                    candidates=[entry(current, mask, wide_ms if current == wide else narrow_ms),
                                entry(narrow if current == wide else wide, mask,
                                      narrow_ms if current == wide else wide_ms)])

    run = dict(device="a GPU", capability=90, table_of=90, dtype="bfloat16", shapes=["8,16,4096,64"],
               masks=["full", "causal"], rep_ms=60, timing="graph", seconds=1.0, tma=False,
               versions=dict(torch="t", triton="t", python="p"), command="python scripts/tune_attention.py",
               results=[row("jvp", False, narrow, 2.44, 2.73), row("jvp", True, narrow, 1.96, 1.52),
                        row("forward", False, wide, 1.2, 1.3), row("forward", True, wide, 0.7, 0.8)])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))

    def reselect(*masks):
        return _reselect_run(path, tmp_path / "-".join(masks), ["8,16,4096,64"], masks)

    report, text = reselect("full", "causal")
    chosen = {(r["kind"], r["banded"]): tuple(r["chosen"]) for r in report["results"]}
    assert chosen == {("jvp", False): tuple(wide), ("jvp", True): tuple(narrow),
                      ("forward", False): tuple(wide), ("forward", True): tuple(wide)}
    assert "'jvp': {64: (128, 64, 8, 2)}," in text and "'forward': {64: (128, 64, 8, 2)}," in text
    assert "{('jvp', 64, 2): (64, 64, 4, 3)}" in text and "('forward', 64, 2)" not in text
    report, text = reselect("full")
    assert [(r["kind"], r["banded"]) for r in report["results"]] == [("jvp", False), ("forward", False)]
    assert "BANDED_TILES" not in text


def test_banded_calls_take_their_own_entry():
    """A causal or windowed call reads ``BANDED_TILES`` where it has the entry, a call without a
    mask the table's, through the plans' own lookup (``AttentionCall.blocks``)."""
    from theria_kernels.attention import AttentionParams, _launch, _tuning

    device = _launch.Device(132, capability=90)
    shape, strides = (8, 16, 4096, 64), (16 * 4096 * 64, 4096 * 64, 64, 1)

    def blocks(**mask):
        call = _launch.AttentionCall(shape, strides, shape, strides, "bfloat16",
                                     AttentionParams(scale=0.125, **mask), device)
        return call.blocks("jvp"), call.blocks("forward")

    # the JVP's 2-byte D64 entry has a banded tile; the forward's has none (its halves take both masks)
    banded, table = _tuning.BANDED_TILES[90][("jvp", 64, 2)], _tuning.SM90["jvp"][64][2]
    assert banded != table and ("forward", 64, 2) not in _tuning.BANDED_TILES[90]
    assert blocks() == (table, _tuning.SM90["forward"][64][2])
    wide_window = (2 * _tuning.SHORT_SWEEP_KEYS, 0)  # narrower ones: test_short_sweeps_take_their_own_entry
    assert blocks(causal=True) == blocks(window_size=wide_window) == (banded, _tuning.SM90["forward"][64][2])


def test_short_sweeps_take_their_own_entry():
    """On sm_90 the 2-byte D64 forward sweeps in halves on the table's tile where its queries see
    ``_tuning.SHORT_SWEEP_KEYS`` keys or more on average, whatever the mask; where they see fewer
    (a short causal sequence, a narrow window) one ``SHORT_SWEEP_TILES`` tile a block."""
    from theria_kernels.attention import AttentionParams, _launch, _tuning

    keys = _tuning.SHORT_SWEEP_KEYS

    def schedule(seq, **mask):
        shape, strides = (8, 16, seq, 64), (16 * seq * 64, seq * 64, 64, 1)
        call = _launch.AttentionCall(shape, strides, shape, strides, "bfloat16",
                                     AttentionParams(scale=0.125, **mask), _launch.Device(132, capability=90))
        (launch,) = _launch.forward_plan(call).launches
        return (launch.arguments["BLOCK_M"], launch.arguments["BLOCK_N"], launch.num_warps,
                launch.num_stages), launch.arguments["HALVES"]

    halves = (_tuning.SM90["forward"][64][2], True)
    one_tile = (_tuning.SHORT_SWEEP_TILES[90][("forward", 64, 2)], False)
    assert halves[0] != one_tile[0]
    # (T, mask): a causal query i sees i + 1 keys, so T causal rows see (T + 1) / 2 on average; a
    # window's first rows see fewer keys than its width
    long = [(keys, {}), (2 * keys + 64, dict(causal=True)), (4096, dict(window_size=(keys + 256, 0))),
            (4096, dict(window_size=(keys // 2 + 128, keys // 2 + 128))),
            (4096, dict(window_size=(keys + 256, 9), causal=True)), (4096, dict(window_size=(-1, 3)))]
    short = [(keys - 1, {}), (2 * keys - 64, dict(causal=True)), (4096, dict(window_size=(keys - 2, 0))),
             (4096, dict(causal=True, window_size=(255, 255))), (4096, dict(window_size=(0, 0))),
             (1024, dict(causal=True))]
    assert [schedule(seq, **mask) for seq, mask in long] == [halves] * len(long)
    assert [schedule(seq, **mask) for seq, mask in short] == [one_tile] * len(short)
    # packed sequences: the longest lengths decide, not the packed total
    packed = (1, 16, 8 * 4096, 64), (16 * 8 * 4096 * 64, 8 * 4096 * 64, 64, 1)
    for longest, expected in ((4096, halves[0]), (keys - 1, one_tile[0])):
        call = _launch.AttentionCall(*packed, *packed, "bfloat16", AttentionParams(scale=0.125),
                                     _launch.Device(132, capability=90), varlen=(longest, longest, 8))
        assert call.blocks("forward") == expected, longest


def _forward_call(seq: int, **mask):
    from theria_kernels.attention import AttentionParams, _launch

    shape, strides = (8, 16, seq, 64), (16 * seq * 64, seq * 64, 64, 1)
    return _launch.AttentionCall(shape, strides, shape, strides, "bfloat16", AttentionParams(scale=0.125, **mask),
                                 _launch.Device(132, capability=90))


def test_a_candidate_reaches_its_own_class_alone(monkeypatch):
    """``tune_attention.with_tile`` puts a candidate into the entry one class of calls reads and
    into no other: a short sweep's ``SHORT_SWEEP_TILES`` entry, or the table's, which long calls
    read. So a row of short sweeps times its candidates on them, and a row of long calls leaves
    the short sweeps on their entry."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import tune_attention
    from theria_kernels.attention import _launch, _tuning

    monkeypatch.setitem(_tuning.SM90["forward"], 64, dict(_tuning.SM90["forward"][64]))
    monkeypatch.setitem(_tuning.SHORT_SWEEP_TILES, 90, dict(_tuning.SHORT_SWEEP_TILES[90]))
    table, short_entry = _tuning.SM90["forward"][64][2], _tuning.SHORT_SWEEP_TILES[90][("forward", 64, 2)]
    candidate = (64, 64, 4, 2)
    assert candidate not in (table, short_entry)
    try:
        short_call, long_call = _forward_call(256), _forward_call(4096)
        assert [tune_attention.short_class("forward", 64, "bfloat16", 90, call) for call in (short_call, long_call)] \
            == [True, False]
        tune_attention.with_tile("forward", 64, "bfloat16", 90, candidate, short=True)
        assert (short_call.blocks("forward"), long_call.blocks("forward")) == (candidate, table)
        tune_attention.with_tile("forward", 64, "bfloat16", 90, short_entry, short=True)
        tune_attention.with_tile("forward", 64, "bfloat16", 90, candidate)
        assert (short_call.blocks("forward"), long_call.blocks("forward")) == (short_entry, candidate)
    finally:
        _launch.forward_plan.cache_clear()


def test_short_sweeps_are_a_row_of_their_own():
    """The tuner's rows: short sweeps of a kind with a ``SHORT_SWEEP_TILES`` entry form a row apart,
    timed against that entry; kinds without one keep their short shapes with the long ones; a
    ``--tma`` run's rows span every class. The report lists the short row's choice for
    ``SHORT_SWEEP_TILES`` and leaves it out of the table's entries."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import tune_attention
    from theria_kernels.attention import _launch, _tuning

    device = _launch.Device(132, capability=90)
    shapes = [(8, 16, 512, 64), (8, 16, 4096, 64)]
    groups = tune_attention.row_groups(["forward", "backward"], shapes, ["full", "causal"], "bfloat16", device)
    rows = {key: (group["shapes"], group["masks"], tuple(group["current"])) for key, group in groups.items()}
    table, short_entry = _tuning.SM90["forward"][64][2], _tuning.SHORT_SWEEP_TILES[90][("forward", 64, 2)]
    backward = _tuning.SM90["backward"][64][2]
    assert rows == {
        ("forward", 64, False, True): ([shapes[0]], ["full"], short_entry),
        ("forward", 64, True, True): ([shapes[0]], ["causal"], short_entry),  # 256.5 keys a query
        ("forward", 64, False, False): ([shapes[1]], ["full"], table),
        ("forward", 64, True, False): ([shapes[1]], ["causal"], table),  # T4096 causal: 2048.5 keys
        ("backward", 64, False, False): (shapes, ["full"], backward),
        ("backward", 64, True, False): (shapes, ["causal"], backward),
    }
    tma = tune_attention.row_groups(["forward"], shapes, ["full", "causal"], "bfloat16", device, tma=True)
    assert list(tma) == [("forward", 64, None, False)]
    faster = (64, 64, 4, 3)

    def row(short, chosen):
        timed = dict(tile=chosen, tma=None, shared=0, registers=0, spills=0, problems=[], ms={"x": 1.0},
                     relative=1.0, chosen=True)
        return dict(kind="forward", head_dim=64, masks=["full"], banded=False, current=table, chosen=chosen,
                    candidates=[timed], **(dict(short=True) if short else {}))

    report = dict(device="d", capability=90, table_of=90, dtype="bfloat16", command="c", seconds=1.0,
                  versions=dict(torch="t", triton="t"), results=[row(False, table), row(True, faster)])
    text = tune_attention.markdown(report)
    assert f"'forward': {{64: {table}}}," in text
    assert f"{{('forward', 64, 2): {faster}}}" in text.split("SHORT_SWEEP_TILES")[1]
    assert "masks: full (short sweeps)" in text


def test_the_backward_sweeps_take_their_own_kinds(monkeypatch):
    """The backward's plan runs its dQ sweep on the ``backward_rows`` tile and its dK/dV sweep on
    the ``backward`` one, and the tuner's compile step compiles each kind's kernel alone
    (``_tuning.takes_tile``), so the two tiles are tuned apart."""
    from theria_kernels.attention import AttentionParams, _launch, _tuning

    rows, columns = (128, 32, 8, 2), (32, 128, 4, 3)
    monkeypatch.setitem(_tuning.SM90["backward_rows"], 64, {**_tuning.SM90["backward_rows"][64], 2: rows})
    monkeypatch.setitem(_tuning.SM90["backward"], 64, {**_tuning.SM90["backward"][64], 2: columns})
    _launch.backward_plan.cache_clear()
    shape, strides = (8, 16, 4096, 64), (16 * 4096 * 64, 4096 * 64, 64, 1)
    call = _launch.AttentionCall(shape, strides, shape, strides, "bfloat16", AttentionParams(scale=0.125),
                                 _launch.Device(132, capability=90))
    try:
        launches = {launch.kernel.__name__: launch for launch in _launch.backward_plan(call, False).launches}
    finally:
        _launch.backward_plan.cache_clear()
    for kernel, (block_m, block_n, warps, stages) in (("_attn_bwd_dq_kernel", rows),
                                                      ("_attn_bwd_dkdv_kernel", columns)):
        launch = launches[kernel]
        assert (launch.arguments["BLOCK_M"], launch.arguments["BLOCK_N"], launch.num_warps,
                launch.num_stages) == (block_m, block_n, warps, stages), kernel
    assert launches["_attn_bwd_dq_kernel"].grid[0] == 4096 // rows[0]
    assert launches["_attn_bwd_dkdv_kernel"].grid[0] == 4096 // columns[1]
    taken = {kind: [name for name in launches if _tuning.takes_tile(kind, name)]
             for kind in ("backward", "backward_rows")}
    assert taken == {"backward": ["_attn_bwd_dkdv_kernel"], "backward_rows": ["_attn_bwd_dq_kernel"]}


def test_each_kind_times_its_own_launcher_and_only_the_double_backward_runs_a_backward(monkeypatch):
    """``tune_attention.workload`` times the launcher of its kind's plan; the double backward's
    kinds take the backward's dq (and the row kind without d_out's cotangent says so), and only
    they run a backward first, so tuning a forward kind compiles no backward kernel."""
    import torch

    from theria_kernels.attention import _tuning
    from theria_kernels.attention import torch_launchers

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import tune_attention

    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *args, device=None, **kwargs: randn(*args, **kwargs))
    calls, dq = [], torch.full((1, 2, 8, 16), 3.0)

    def launcher(name, result):
        def launch(*args, **kwargs):
            calls.append((name, kwargs))
            return result
        return launch

    rows = torch.zeros(1, 2, 8)
    monkeypatch.setattr(torch_launchers, "attention_forward", launcher("forward", (dq, rows)))
    monkeypatch.setattr(torch_launchers, "attention_tangent", launcher("jvp", None))
    monkeypatch.setattr(torch_launchers, "attention_forward_second", launcher("forward_second", None))
    monkeypatch.setattr(torch_launchers, "attention_backward", launcher("backward", (dq, None, None)))
    monkeypatch.setattr(torch_launchers, "attention_backward_backward", launcher("backward_backward", None))
    for kind in tune_attention.KINDS:
        calls.clear()
        run = tune_attention.workload((1, 2, 8, 16), "float32", "causal", kind)
        prepared = [name for name, _ in calls]
        calls.clear()
        run()
        plan = _tuning.PLAN_KIND.get(kind, kind)
        assert [name for name, _ in calls] == [plan], kind
        if plan == "backward_backward":
            assert prepared == ["forward", "backward"], kind
            assert calls[0][1]["dq"] is dq
            assert calls[0][1]["wants_cot_d_out"] == (kind not in _tuning.WITHOUT_COT_D_OUT), kind
        else:
            assert prepared == ["forward"], kind


def test_the_double_backward_columns_take_each_mask_class_tile_and_order(monkeypatch):
    """The double backward's column launch on sm_90 (bf16) takes the tile and the order of dS̄
    (LATE_BAR) that session 27's timing gave each head dim and mask class (docs/design/tuning.md
    §1, docs/results/tuning/h200_bwd_bwd_cols/), through the real plan builder; the other tables,
    where sm_90's 32 × 128 × 8 × 3 does not fit, keep 64 × 32 × 4 × 2 at head dim 128, and
    THERIA_ATTENTION_LATE_BAR's override wins over the table."""
    from theria_kernels.attention import AttentionParams, _launch, _tuning

    def column(capability, head_dim, causal):
        shape = (2, 4, 512, head_dim)
        strides = (4 * 512 * head_dim, 512 * head_dim, head_dim, 1)
        call = _launch.AttentionCall(shape, strides, shape, strides, "bfloat16",
                                     AttentionParams(scale=head_dim ** -0.5, causal=causal),
                                     _launch.Device(132, capability=capability))
        _launch.backward_backward_plan.cache_clear()  # plans are cached with the order they were built with
        plan = _launch.backward_backward_plan(call, frozenset({"cot_dq", "cot_dk", "cot_dv"}), cot_d_out=False)
        (launch,) = [x for x in plan.launches if x.kernel.__name__ == "_attn_bwd_bwd_cols_kernel"]
        tile = (launch.arguments["BLOCK_M"], launch.arguments["BLOCK_N"], launch.num_warps, launch.num_stages)
        return tile, launch.arguments["LATE_BAR"]

    assert column(90, 64, False) == ((64, 64, 4, 2), True)
    assert column(90, 64, True) == ((32, 64, 4, 3), False)
    assert column(90, 128, False) == ((32, 128, 8, 3), True)
    assert column(90, 128, True) == ((32, 128, 8, 3), False)
    for capability in (80, 89, 100):
        assert column(capability, 128, False) == ((64, 32, 4, 2), False)
    try:
        monkeypatch.setattr(_tuning, "LATE_BAR_OVERRIDE", True)  # as THERIA_ATTENTION_LATE_BAR=1 does
        assert column(90, 64, True) == ((32, 64, 4, 3), True)
        monkeypatch.setattr(_tuning, "LATE_BAR_OVERRIDE", False)
        assert column(90, 128, False) == ((32, 128, 8, 3), False)
    finally:
        _launch.backward_backward_plan.cache_clear()  # no plan built on an override outlives the test


def test_sm90_holds_the_jvp_choices_of_each_mask_class():
    """sm_90's JVP entries, for calls without a mask and for banded ones, are the choices of the
    committed H200 run kept to each mask class (docs/results/tuning/h200_jvp_masks/)."""
    from theria_kernels.attention import _tuning

    folder = ROOT / "docs" / "results" / "tuning" / "h200_jvp_masks"
    for mask, banded in (("full", False), ("causal", True)):
        for row in json.loads((folder / mask / "tuning.json").read_text())["results"]:
            assert row["masks"] == [mask] and row["banded"] == banded
            assert _tuning.tile(90, row["kind"], row["head_dim"], "bfloat16", banded) == tuple(row["chosen"]), row


# The dry run's device time of each (tile, mask class): the causal mask prefers the narrow tile.
DRY_TIMES = {(128, 64, 8, 2): (2.4, 1.9), (64, 64, 4, 3): (2.7, 1.5), (64, 64, 4, 2): (2.9, 1.6)}


def _dry_run(out: str) -> None:
    """``tune_attention.main`` for the JVP at head dim 64, both masks, on a faked sm_90 device:
    every candidate (the current tile of each mask class and (64, 64, 4, 2)) compiles for sm_90 on
    the CPU, and a timed run returns ``DRY_TIMES`` for the tile its call took (read through the
    plans' own lookup), so the report shows what each class ran on."""
    import torch
    import triton.testing

    sys.path.insert(0, str(ROOT / "scripts"))
    import tune_attention
    from theria_kernels.attention import _launch, _tuning, torch_launchers

    device = _launch.Device(132, capability=90)
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda *args: (9, 0)
    torch.cuda.get_device_name = lambda *args: "a faked sm_90 device"
    empty = torch.empty
    torch.empty = lambda *args, device=None, **kwargs: empty(*args, **kwargs)
    torch_launchers._device = lambda t: device
    tune_attention.neighbours = lambda current: [current, (64, 64, 4, 2)]
    ran = []

    def workload(shape, dtype, mask, kind):
        call = lambda: tune_attention._call(tuple(shape), dtype, mask, device)  # noqa: E731
        return lambda: ran.append((mask, call().blocks(kind)))

    tune_attention.workload = workload
    triton.testing.do_bench_cudagraph = lambda run, **kwargs: run() or DRY_TIMES[ran[-1][1]][ran[-1][0] == "causal"]
    before = (_tuning.tile(90, "jvp", 64, "bfloat16"), _tuning.tile(90, "jvp", 64, "bfloat16", banded=True))
    sys.argv = ["tune_attention.py", "--kinds", "jvp", "--shapes", "2,2,256,64", "--workers", "2", "--out", out]
    tune_attention.main()
    after = (_tuning.tile(90, "jvp", 64, "bfloat16"), _tuning.tile(90, "jvp", 64, "bfloat16", banded=True))
    Path(out, "ran.json").write_text(json.dumps(dict(ran=sorted(set(ran)), before=before, after=after)))


def test_a_dry_run_times_each_mask_class_on_its_own_tiles(tmp_path):
    """The whole script on the CPU: each mask class is its own row, every timed call ran on the
    candidate of its row (the causal row's on the banded entry), each class takes its fastest
    tile, the report lists the banded entry that differs, and the tables are as they were after."""
    from theria_kernels.attention import _tuning

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__, "--dry-run", str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "tuning.json").read_text())
    rows = {row["masks"][0]: row for row in report["results"]}
    assert [(row["banded"], row["masks"]) for row in report["results"]] == [(False, ["full"]), (True, ["causal"])]
    full, banded = _tuning.SM90["jvp"][64][2], _tuning.BANDED_TILES[90][("jvp", 64, 2)]
    assert tuple(rows["full"]["current"]) == full and tuple(rows["causal"]["current"]) == banded
    ran = json.loads((tmp_path / "ran.json").read_text())
    expected = {("full", tile) for tile in (full, (64, 64, 4, 2))} | {("causal", tile) for tile in (banded, (64, 64, 4, 2))}
    assert {(mask, tuple(tile)) for mask, tile in ran["ran"]} == expected
    fastest = {mask: min((tile for m, tile in expected if m == mask), key=lambda t: DRY_TIMES[t][mask == "causal"])
               for mask in ("full", "causal")}
    assert {mask: tuple(row["chosen"]) for mask, row in rows.items()} == fastest
    assert ran["before"] == ran["after"] == [list(full), list(banded)]
    text = (tmp_path / "tuning.md").read_text()
    assert f"'jvp': {{64: {fastest['full']}}}," in text
    assert (f"{{('jvp', 64, 2): {fastest['causal']}}}" in text) == (fastest["causal"] != fastest["full"])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--dry-run"]:  # the child process of the dry-run test
        _dry_run(sys.argv[2])
