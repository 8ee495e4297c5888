"""Choose this GPU's attention tile table: time candidate tiles (BLOCK_M, BLOCK_N, num_warps,
num_stages) per sweep kind and head dim, print the table it would choose, and write JSON and
markdown under --out (GPU only; docs/design/tuning.md).

    python scripts/tune_attention.py --out docs/results/tuning/h200

For each sweep kind (forward, jvp, forward_second, backward and backward_rows: the backward's
dK/dV and dQ sweeps, each timed over the whole backward; backward_backward and
backward_backward_rows: the double backward's column and row sweeps, each timed over the whole
double backward; backward_backward_rows_no_cot_d_out: its row sweep where it forms no cotangent
for d_out, timed over the double backward without it), head dim of --shapes and mask class (no
mask, or banded: the causal mask, whose tile banded calls take from ``_tuning.BANDED_TILES`` where
it differs), the candidates are the current entry for this GPU's compute capability
(kernels/attention/_tuning.py), its 13 neighbours (``neighbours``; none with --no-neighbours) and
any tile --candidates names for that kind. The row sweep runs one sweep or two as
``_tuning.ROW_ONE_SWEEP`` says; ``THERIA_ATTENTION_ONE_SWEEP=1`` (``=0``) times the other, and
``THERIA_ATTENTION_LATE_BAR=1`` (``=0``) the column tiles on the order that
``_tuning.COLUMNS_LATE_BAR`` does not give them.
Every candidate's kernels are first compiled for this GPU on all CPU cores at once
(``_tuning.compile_launch``; Triton's disk cache then serves the timed runs), and candidates that
need more shared memory than the GPU gives one program are dropped. The rest are timed through
the torch launchers on every shape and mask of that head dim, as the device's time (``--timing
graph``, the default: ``triton.testing.do_bench_cudagraph``, CUDA-graph replay, median), and the
candidate that spills no registers with the smallest geometric mean of its time relative to the
current entry wins (the fastest of all where every candidate spills, flagged so).
Short sweeps (calls whose queries see fewer than ``_tuning.SHORT_SWEEP_KEYS`` keys on average) are
a class of their own wherever ``_tuning.SHORT_SWEEP_TILES`` has an entry for their kind, since they
run on it: their shapes form a row apart, timed against that entry.
The report lists the table's entries from the runs without a mask, for ``BANDED_TILES`` the
banded choices that differ from them, and the short sweeps' choices for ``SHORT_SWEEP_TILES``.
A tile changes only the device's work, so the host's time must not enter: at small shapes
``--timing events`` (``triton.testing.do_bench``, CUDA events) reads the host path, not the kernel
(docs/perf-notes.md items 17 and 20). Past --budget seconds the remaining candidates are not timed
and the report says so.

``--tma`` times each (kind, head dim)'s current tiles twice instead, loading through tensor
descriptors and not (``THERIA_ATTENTION_TMA=1`` / ``=0`` for that launch alone), over both mask
classes at once (each call on its class's tile; ``TMA_KINDS`` has no mask class), and chooses the
same way: the report ends with the (kind, head dim, dtype class) entries where TMA won, the set
``_tuning.TMA_KINDS`` holds for this GPU's table (docs/design/tuning.md §1):

    python scripts/tune_attention.py --tma --kinds jvp backward backward_backward --out $OUT/tma

``--reselect RUN.json`` chooses again from an earlier run's times (no GPU needed), keeping only
the shapes and masks given:

    python scripts/tune_attention.py --reselect docs/results/tuning/h200_d32/tuning.json \
        --shapes 64,8,1024,32 --out docs/results/tuning/h200_d32/reselected
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from theria_kernels.attention._tuning import KINDS

TIMINGS = {"graph": "`triton.testing.do_bench_cudagraph` (the device's time)",
           "events": "`triton.testing.do_bench` (CUDA events)"}
MASKS = {"full": dict(causal=False), "causal": dict(causal=True)}


# ----------------------------------------------------------------------------------------------
# Candidates and their compiled resources (worker processes: no CUDA, no torch tensors)
# ----------------------------------------------------------------------------------------------


def neighbours(current: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
    """The current tile first, then its neighbours: each setting changed alone (BLOCK_M or BLOCK_N
    halved or doubled within 16 to 256, num_warps 4 ↔ 8, num_stages ± 1 within 1 to 4), and the
    tile's shape (BLOCK_M and BLOCK_N) or its schedule (num_warps and num_stages) changed together."""
    m, n, warps, stages = current
    sizes = lambda x: [y for y in (x // 2, 2 * x) if 16 <= y <= 256]  # noqa: E731
    depths = [y for y in (stages - 1, stages + 1) if 1 <= y <= 4]
    other_warps = 12 - warps
    found = [current]
    found += [(y, n, warps, stages) for y in sizes(m)] + [(m, y, warps, stages) for y in sizes(n)]
    found += [(m, n, other_warps, stages)] + [(m, n, warps, y) for y in depths]
    found += [(a, b, warps, stages) for a in sizes(m) for b in sizes(n)]
    found += [(m, n, other_warps, y) for y in depths]
    return found


def _call(shape, dtype: str, mask: str, device):
    from theria_kernels.attention import AttentionParams, _launch

    batch, heads, seq, head_dim = shape
    shape4 = (batch, heads, seq, head_dim)
    strides = (heads * seq * head_dim, seq * head_dim, head_dim, 1)
    return _launch.AttentionCall(shape4, strides, shape4, strides, dtype,
                                 AttentionParams(scale=head_dim ** -0.5, **MASKS[mask]), device)


def _plan(kind: str, call):
    """The plan the torch launcher of ``kind`` builds for these tensors (no d_lse, the backward's dq,
    every cotangent but d_out's for the kinds of ``_tuning.WITHOUT_COT_D_OUT``). The ``jvp`` tile is
    timed on the tangent kernel, which forward-mode AD runs after the forward (``given_primal``);
    the single-sweep JVP kernel of ``attention_jvp`` takes the same tile."""
    from theria_kernels.attention import _launch, _tuning

    if kind == "jvp":
        return _launch.forward_plan(call, True, given_primal=True)
    if kind in ("forward", "forward_second"):
        return _launch.forward_plan(call, False, kind == "forward_second")
    if kind in ("backward", "backward_rows"):  # the dK/dV sweep's tile, the dQ sweep's
        return _launch.backward_plan(call, False)
    # the double-backward kinds (the column sweep's tile, the row sweep's) time the whole plan, with
    # the backward's dq as the adapters pass it after a backward
    return _launch.backward_backward_plan(call, frozenset({"cot_dq", "cot_dk", "cot_dv", "dq"}),
                                          cot_d_out=kind not in _tuning.WITHOUT_COT_D_OUT)


def short_class(kind: str, block_d: int, dtype: str, capability: int, call) -> bool:
    """Whether ``call`` is a short sweep that takes a ``_tuning.SHORT_SWEEP_TILES`` entry of its own
    for this kind on a device of ``capability`` (a class apart in the tuner's rows)."""
    from theria_kernels.attention import _tuning

    entries = _tuning.SHORT_SWEEP_TILES.get(_tuning.table_capability(capability), {})
    key = (kind, _tuning.head_dim_class(block_d), _tuning.DTYPE_BYTES[dtype])
    return key in entries and _tuning.short_sweep(call.mean_keys)


def with_tile(kind: str, block_d: int, dtype: str, capability: int, candidate, banded: bool = False,
              short: bool = False):
    """Put ``candidate`` into the entry that calls of this kind, padded head dim, dtype and class
    read on a device of ``capability``: ``_tuning.SHORT_SWEEP_TILES``' for ``short`` sweeps (a
    ``short_class``), else ``_tuning.BANDED_TILES``' for ``banded`` calls, else the table's; and
    forget cached plans. Each class's entry alone changes, so a row times its own calls only."""
    from theria_kernels.attention import _launch, _tuning

    table = _tuning.table_capability(capability)
    key = (kind, _tuning.head_dim_class(block_d), _tuning.DTYPE_BYTES[dtype])
    if short:
        _tuning.SHORT_SWEEP_TILES[table][key] = tuple(candidate)
    elif banded:
        _tuning.BANDED_TILES[table][key] = tuple(candidate)
    else:
        _tuning.TILE_TABLES[table][kind][key[1]][key[2]] = tuple(candidate)
    for builder in (_launch.forward_plan, _launch.backward_plan, _launch.backward_backward_plan):
        builder.cache_clear()


def with_tma(tma) -> None:
    """TMA loads on (True) or off (False) for the plans built next; None: the process's choice
    (the tables, unless THERIA_ATTENTION_TMA overrides them)."""
    from theria_kernels.attention import _launch, _tuning

    _tuning.TMA_OVERRIDE = _tuning.TMA_FROM_ENVIRONMENT if tma is None else tma
    for builder in (_launch.forward_plan, _launch.backward_plan, _launch.backward_backward_plan):
        builder.cache_clear()


def _compile_candidate(job) -> dict:
    """Worker: compile every launch of one candidate (a tile, and TMA on, off or as the tables say)
    for one shape and mask; its worst resources, or the compiler's error."""
    from theria_kernels.attention import _launch, _tuning

    kind, shape, dtype, mask, device_facts, candidate, tma = job
    device = _launch.Device(*device_facts)
    call = _call(shape, dtype, mask, device)
    with_tma(tma)
    if tma is None:  # a tile candidate; a TMA run keeps the tables' tiles
        with_tile(kind, call.block_d, dtype, device.capability, candidate, call.params.banded,
                  short_class(kind, call.block_d, dtype, device.capability, call))
    plan = _plan(kind, call)
    used = dict(shared=0, registers=0, spills=0, problems=[])
    try:
        for launch in plan.launches:
            if not _tuning.takes_tile(kind, launch.kernel.__name__):
                continue
            found = _tuning.compile_launch(launch, plan.buffer_dtypes, device.capability)
            used = dict(shared=max(used["shared"], found.shared), registers=max(used["registers"], found.registers),
                        spills=max(used["spills"], found.spills),
                        problems=used["problems"] + [f"{found.kernel}: {p}" for p in found.problems()])
    except Exception as error:  # out of resources at compile time, or a compiler failure
        used["problems"] = used["problems"] + [f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"]
    return used


# ----------------------------------------------------------------------------------------------
# Timing (main process, on the GPU)
# ----------------------------------------------------------------------------------------------


def workload(shape, dtype: str, mask: str, kind: str):
    """The torch launcher of the sweep kind ``kind`` on random inputs of one shape and mask; the
    double backward's kinds with the backward's dq, as the adapters pass it (a backward runs, and
    compiles, only for them)."""
    import torch

    from theria_kernels.attention import AttentionParams, _tuning
    from theria_kernels.attention import torch_launchers as kernels

    torch_dtype = getattr(torch, dtype)
    draw = lambda: torch.randn(shape, device="cuda", dtype=torch_dtype)  # noqa: E731
    q, k, v, *directions = (draw() for _ in range(9))
    params = AttentionParams(scale=shape[-1] ** -0.5, **MASKS[mask])
    out, lse = kernels.attention_forward(q, k, v, params)
    d_out = draw()
    plan = _tuning.PLAN_KIND.get(kind, kind)
    if plan == "forward":
        return lambda: kernels.attention_forward(q, k, v, params)
    if plan == "jvp":
        return lambda: kernels.attention_tangent(q, k, v, out, lse, *directions[:3], params)
    if plan == "forward_second":
        return lambda: kernels.attention_forward_second(q, k, v, *directions, params)
    if plan == "backward":
        return lambda: kernels.attention_backward(q, k, v, out, lse, d_out, None, params)
    dq = kernels.attention_backward(q, k, v, out, lse, d_out, None, params)[0]
    return lambda: kernels.attention_backward_backward(q, k, v, out, lse, d_out, None, *directions[:3], params,
                                                       dq=dq, wants_cot_d_out=kind not in _tuning.WITHOUT_COT_D_OUT)


def row_groups(kinds, shapes, masks, dtype: str, device, tma: bool = False) -> dict:
    """(kind, padded head dim, banded, short) → the shapes and masks of one report row, its current
    tile and (filled in by the caller) its candidates. ``banded`` is None in a ``--tma`` run, whose
    rows span both mask classes (each call on its class's tile); ``short`` marks the short sweeps
    that read a ``SHORT_SWEEP_TILES`` entry of their own (``short_class``)."""
    import triton

    from theria_kernels.attention import _tuning

    groups = {}
    for kind, shape, mask in itertools.product(kinds, shapes, masks):
        block_d = _tuning.head_dim_class(triton.next_power_of_2(shape[-1]))
        banded = None if tma else MASKS[mask]["causal"]
        short = not tma and short_class(kind, block_d, dtype, device.capability, _call(shape, dtype, mask, device))
        group = groups.setdefault((kind, block_d, banded, short), dict(shapes=[], masks=[], current=_tuning.tile(
            device.capability, kind, block_d, dtype, bool(banded), short)))
        if shape not in group["shapes"]:
            group["shapes"].append(shape)
        if mask not in group["masks"]:
            group["masks"].append(mask)
    return groups


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["8,16,4096,64", "4,16,4096,128"], help="B,H,T,D each")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32", "float64"])
    parser.add_argument("--masks", nargs="+", default=["full", "causal"], choices=list(MASKS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--rep", type=float, default=60, help="measuring time per run, ms")
    parser.add_argument("--timing", choices=["graph", "events"], default="graph",
                        help="graph: the device's time by CUDA-graph replay; events: do_bench's CUDA events")
    parser.add_argument("--reselect", metavar="RUN.json", help="choose again from an earlier run's times")
    parser.add_argument("--budget", type=float, default=330, help="seconds; later kinds keep their entries")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", required=True, help="folder for tuning.json and tuning.md")
    parser.add_argument("--candidates", nargs="+", default=[], metavar="KIND:M,N,WARPS,STAGES",
                        help="tiles to time besides the neighbours, e.g. backward_backward:64,64,8,1")
    parser.add_argument("--no-neighbours", action="store_true",
                        help="time the current tile and the --candidates only")
    parser.add_argument("--tma", action="store_true",
                        help="time the current tiles with and without TMA loads instead of tile candidates")
    args = parser.parse_args()
    if args.tma and args.candidates:
        parser.error("--tma times the current tiles only; drop --candidates")
    start = time.perf_counter()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    if args.reselect:
        write_report(reselect(args.reselect, args.shapes, args.masks, " ".join(["python", *sys.argv])), args.out)
        return

    import torch
    import triton
    import triton.testing

    from theria_kernels.attention import _launch, _tuning
    from theria_kernels.attention import torch_launchers as kernels

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("tune_attention.py times kernels on a CUDA GPU (and without TRITON_INTERPRET)")
    major, minor = torch.cuda.get_device_capability()
    capability = 10 * major + minor
    name = torch.cuda.get_device_name()
    device = kernels._device(torch.empty(0, device="cuda", dtype=getattr(torch, args.dtype)))
    device_facts = (device.multiprocessors, device.interpreter, device.allow_tf32, device.capability)
    table_of = _tuning.table_capability(capability)
    print(f"{name}, sm_{capability} (table of sm_{table_of}), {args.dtype}, shapes {args.shapes}, masks {args.masks}")

    groups = row_groups(args.kinds, shapes, args.masks, args.dtype, device, args.tma)
    extra = [(spec.split(":")[0], tuple(int(x) for x in spec.split(":")[1].split(","))) for spec in args.candidates]
    for (kind, *_), group in groups.items():
        if args.tma:  # (tile, TMA) pairs: the current tile without TMA loads first, the baseline
            group["candidates"] = [(group["current"], False), (group["current"], True)]
            continue
        tiles = [group["current"]] if args.no_neighbours else neighbours(group["current"])
        tiles += [tile for of, tile in extra if of == kind and tile not in tiles]
        group["candidates"] = [(tile, None) for tile in tiles]

    # Compile every candidate on every core (resources, and Triton's cache for the timed runs).
    jobs = [(kind, shape, args.dtype, mask, device_facts, tile, tma)
            for (kind, *_), group in groups.items() for shape in group["shapes"] for mask in group["masks"]
            for tile, tma in group["candidates"]]
    import multiprocessing

    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        compiled = dict(zip(jobs, pool.map(_compile_candidate, jobs)))
    print(f"compiled {len(jobs)} candidate launches in {time.perf_counter() - start:.0f} s")

    results = []
    for (kind, block_d, banded, short), group in groups.items():
        row = dict(kind=kind, head_dim=block_d, masks=group["masks"], current=group["current"], candidates=[])
        if banded is not None:
            row["banded"] = banded
        if short:
            row["short"] = True
        results.append(row)
        if time.perf_counter() - start > args.budget:
            row["skipped"] = "over the time budget: keeps its entry"
            continue
        runs = {(shape, mask): workload(shape, args.dtype, mask, kind) for shape in group["shapes"]
                for mask in group["masks"]}
        for candidate, tma in group["candidates"]:
            used = [compiled[(kind, shape, args.dtype, mask, device_facts, candidate, tma)] for shape, mask in runs]
            entry = dict(tile=candidate, tma=tma, shared=max(u["shared"] for u in used),
                         registers=max(u["registers"] for u in used), spills=max(u["spills"] for u in used),
                         problems=sorted({p for u in used for p in u["problems"]}), ms={})
            row["candidates"].append(entry)
            if any("spilled" not in problem and "mma.sync" not in problem for problem in entry["problems"]):
                continue  # cannot launch (shared memory, registers) or did not compile; spills and
                # pre-Hopper MMA are timed (and reported)
            if time.perf_counter() - start > args.budget:
                row["skipped"] = "over the time budget: chosen among the candidates timed"
                break
            with_tma(tma)
            if tma is None:
                with_tile(kind, block_d, args.dtype, capability, candidate, banded, short)
            kernels.clear_plans()
            for (shape, mask), run in runs.items():
                if args.timing == "graph":
                    run()  # compiles outside the capture
                    ms = triton.testing.do_bench_cudagraph(run, rep=args.rep, return_mode="median")
                else:
                    ms = triton.testing.do_bench(run, warmup=10, rep=args.rep, return_mode="median")
                entry["ms"][f"{','.join(map(str, shape))} {mask}"] = ms
        with_tma(None)
        if not args.tma:
            with_tile(kind, block_d, args.dtype, capability, group["current"], banded, short)
        kernels.clear_plans()
        choose(row)

    elapsed = time.perf_counter() - start
    report = dict(device=name, capability=capability, table_of=table_of, dtype=args.dtype, shapes=args.shapes,
                  masks=args.masks, rep_ms=args.rep, timing=args.timing, seconds=round(elapsed, 1),
                  versions=dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version()),
                  command=" ".join(["python", *sys.argv]), tma=args.tma, results=results)
    write_report(report, args.out)


def choose(row: dict) -> None:
    """Set each timed candidate's ``relative`` (the geometric mean over its times of the ratio to
    the current entry's, or to the first candidate timed where the current one does not fit) and
    the row's ``chosen`` tile (and, for ``--tma`` runs, ``chosen_tma``): the fastest candidate that
    does not spill; where every one spills, the fastest (flagged in the report). The chosen
    candidate is marked ``chosen``."""
    baseline = next((e["ms"] for e in row["candidates"] if e["ms"]), None)
    for entry in row["candidates"]:
        entry.pop("relative", None)
        entry.pop("chosen", None)
        if entry["ms"] and baseline:
            entry["relative"] = math.exp(sum(math.log(entry["ms"][key] / baseline[key]) for key in baseline)
                                         / len(baseline))
    timed = [e for e in row["candidates"] if "relative" in e]
    clean = [e for e in timed if not e["spills"]]
    best = min(clean or timed, key=lambda e: e["relative"]) if timed else None
    row["chosen"] = best["tile"] if best else row["current"]
    if best:
        best["chosen"] = True
    if best and best.get("tma") is not None:
        row["chosen_tma"] = best["tma"]
    print(f"{row['kind']:18s} D{row['head_dim']:<4d} {_masks_label(row):8s} current {tuple(row['current'])} "
          + (f"-> {tuple(best['tile'])}{_tma_label(best)} ({best['relative']:.3f}x the current time"
             f"{', spills' if best['spills'] else ''})" if best else "-> kept (nothing timed)"))


def _masks_label(row: dict) -> str:
    """The masks a report row was timed on ('all' for rows of runs that chose over both classes),
    and 'short sweeps' for a row of short sweeps."""
    return ", ".join(row.get("masks", ["all"])) + (" (short sweeps)" if row.get("short") else "")


def _tma_label(entry: dict) -> str:
    """' with TMA' / ' without TMA' for the candidates of a ``--tma`` run, '' otherwise."""
    return {True: " with TMA", False: " without TMA"}.get(entry.get("tma"), "")


def reselect(path: str, shapes: list[str], masks: list[str], command: str) -> dict:
    """An earlier run's report chosen again from its times of ``shapes`` and ``masks`` alone."""
    with open(path) as f:
        report = json.load(f)
    keys = {f"{shape} {mask}" for shape in shapes for mask in masks}
    if not keys & {key for row in report["results"] for e in row["candidates"] for key in e["ms"]}:
        sys.exit(f"{path} holds no times of shapes {shapes} and masks {masks}")
    # Rows of one mask class none of whose masks are kept go. Rows of runs that chose over both
    # classes at once (no "masks") stay, and kept to banded masks alone they become banded rows.
    report["results"] = [row for row in report["results"] if set(row.get("masks", masks)) & set(masks)]
    for row in report["results"]:
        for entry in row["candidates"]:
            entry["ms"] = {key: ms for key, ms in entry["ms"].items() if key in keys}
        if "masks" not in row:
            row["banded"] = all(MASKS[mask]["causal"] for mask in masks)
        row["masks"] = [mask for mask in row.get("masks", masks) if mask in masks]
        choose(row)
    report.update(shapes=shapes, masks=masks, command=command, reselected_from=report["command"])
    return report


def write_report(report: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tuning.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "tuning.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    print(f"{report['seconds']:.0f} s; wrote {out}/tuning.json and tuning.md")


def markdown(report: dict) -> str:
    """The chosen table and, per (kind, head dim), every candidate timed or why it was dropped."""
    lines = [f"# Attention tiles on {report['device']} (sm_{report['capability']}), {report['dtype']}", "",
             f"`{report['command']}` ({report['seconds']} s; torch {report['versions']['torch']}, "
             f"triton {report['versions']['triton']}). Times: median ms of "
             f"{TIMINGS[report.get('timing', 'events')]}; relative: geometric mean over shapes and masks against "
             "the current entry."
             + (f" Chosen again from the times of `{report['reselected_from']}`." if "reselected_from" in report
                else ""), "",
             "| kind | head dim | masks | current | chosen | chosen / current |", "|---|---|---|---|---|---|"]
    for row in report["results"]:
        best = next((e for e in row["candidates"] if e.get("chosen")), None)
        ratio = f"{best['relative']:.3f}" if best and "relative" in best else row.get("skipped", "—")
        if best and best["spills"]:
            ratio += " (every timed candidate spills)"
        lines.append(f"| {row['kind']} | {row['head_dim']} | {_masks_label(row)} | {tuple(row['current'])} | "
                     f"{tuple(row.get('chosen', row['current']))}{_tma_label(best or {})} | {ratio} |")
    from theria_kernels.attention._tuning import DTYPE_BYTES

    if report.get("tma"):
        wins = sorted((row["kind"], row["head_dim"], DTYPE_BYTES[report["dtype"]]) for row in report["results"]
                      if row.get("chosen_tma"))
        lines += ["", f"Entries where TMA won, for `_tuning.TMA_KINDS` of sm_{report['table_of']}:", "", "```",
                  f"{wins}", "```", ""]
    else:
        chosen, banded, short = {}, {}, {}
        for row in report["results"]:
            if not row.get("banded") and not row.get("short"):
                chosen.setdefault(row["kind"], {})[row["head_dim"]] = tuple(row.get("chosen", row["current"]))
        for row in report["results"]:
            tile, key = tuple(row.get("chosen", row["current"])), (row["kind"], row["head_dim"],
                                                                    DTYPE_BYTES[report["dtype"]])
            if row.get("short"):
                short[key] = tile
            elif row.get("banded") and chosen.get(row["kind"], {}).get(row["head_dim"]) != tile:
                banded[key] = tile
        if chosen:
            lines += ["", f"Table entries ({report['dtype']}) for `_tuning.py` (kind: {{head dim: tile}}):", "",
                      "```", *(f"{kind!r}: {entries}," for kind, entries in chosen.items()), "```", ""]
        if banded:
            lines += [""] * (not chosen) + ["Banded calls' entries where they differ, for `_tuning.BANDED_TILES`:",
                                            "", "```", f"{banded}", "```", ""]
        if short:
            lines += [""] * (not chosen and not banded) + [
                "Short sweeps' entries, for `_tuning.SHORT_SWEEP_TILES`:", "", "```", f"{short}", "```", ""]
    for row in report["results"]:
        lines += [f"## {row['kind']}, head dim {row['head_dim']}, masks: {_masks_label(row)}", "",
                  "| tile | shared KB | regs | spills | relative | ms |", "|---|---|---|---|---|---|"]
        for e in sorted(row["candidates"], key=lambda e: e.get("relative", math.inf)):
            times = ", ".join(f"{k}: {v:.3f}" for k, v in e["ms"].items()) or "; ".join(e["problems"]) or "not timed"
            relative = f"{e['relative']:.3f}" if "relative" in e else "—"
            lines.append(f"| {tuple(e['tile'])}{_tma_label(e)} | {e['shared'] / 1024:.1f} | {e['registers']} | "
                         f"{e['spills']} | {relative} | {times} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
