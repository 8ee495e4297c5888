"""experiments/phase10/breakdown.py's reading of profiles, on any machine: kernels sorted into kinds
by the names the H200's profiles gave them, and a Perfetto trace's GPU stream lines summed while
XLA's derived lines and the host's are left out; on a machine without a GPU a real jax.profiler
trace, which has no GPU line, is refused with the lines it has."""

import sys
from pathlib import Path

import pytest
from _device import ON_GPU

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # experiments/ is scripts, not an installed package

from experiments.phase10.breakdown import gpu_stream_kernels, kind_of  # noqa: E402


@pytest.mark.parametrize("name, kind", [
    ("_attn_bwd_dkdv_kernel", "attention"), ("_attn_fwd_kernel", "attention"),
    ("_backward_kernel", "rmsnorm"), ("_double_backward_kernel", "rmsnorm"),
    ("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT", "gemm"), ("gemm_fusion_dot_332", "gemm"),
    ("fusion_570", "rest"), ("input_add_reduce_fusion_1", "rest"),
])
def test_kernel_kinds(name, kind):
    assert kind_of(name) == kind


def test_only_gpu_stream_lines_count():
    def meta(what, pid, name, tid=None):
        return dict(ph="M", name=what, pid=pid, tid=tid, args=dict(name=name))

    events = [
        meta("process_name", 1, "/device:GPU:0"), meta("process_name", 2, "/host:CPU"),
        meta("thread_name", 1, "Stream #7(Compute)", 7), meta("thread_name", 1, "XLA Ops", 100),
        meta("thread_name", 2, "python3", 5),
        dict(ph="X", pid=1, tid=7, name="_attn_fwd_kernel", dur=3.0),
        dict(ph="X", pid=1, tid=7, name="_attn_fwd_kernel", dur=2.0),
        dict(ph="X", pid=1, tid=7, name="fusion_1", dur=1.5),
        dict(ph="X", pid=1, tid=100, name="_attn_fwd_kernel", dur=5.0),  # the same time, XLA's op line
        dict(ph="X", pid=2, tid=5, name="_attn_fwd_kernel", dur=9.0),  # the host's call
        dict(ph="i", pid=1, tid=7, name="marker"),
    ]
    assert gpu_stream_kernels(events) == {"_attn_fwd_kernel": 5.0, "fusion_1": 1.5}


@pytest.mark.skipif(ON_GPU, reason="a trace of CPU work alone needs a machine without a GPU")
def test_a_trace_without_gpu_lines_is_refused():
    """A real trace of this process's CPU work: the parser reads its metadata and says which lines
    it found instead of returning nothing."""
    import gzip
    import json
    import tempfile

    import jax
    import jax.numpy as jnp

    square = jax.jit(lambda x: (x @ x).sum())
    x = jnp.ones((8, 8))
    square(x).block_until_ready()
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            square(x).block_until_ready()
        with gzip.open(next(Path(log_dir).rglob("*perfetto_trace.json.gz")), "rt") as handle:
            trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    with pytest.raises(RuntimeError, match="no kernel events on a GPU stream line.*/host:CPU"):
        gpu_stream_kernels(events)
