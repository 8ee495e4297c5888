"""How JAX launches theria's kernels: the launcher choice, and on a GPU the XLA-native launch
(``triton_kernel_call_ffi``) against the DLPack bridge, bit for bit, at every derivative order."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl

import _protobuf
import theria_jax
from theria_jax import _launch
from theria_kernels._plan import Buffer, Launch


def test_launcher_choice_and_its_errors(monkeypatch):
    """XLA-native only where JAX runs on a CUDA GPU with jaxlib's Triton target and no
    interpreter; forcing it elsewhere says why; unknown values are refused."""
    monkeypatch.delenv("THERIA_JAX_LAUNCH", raising=False)
    native = (jax.default_backend() == "gpu" and _launch._gpu_triton() is not None
              and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
    assert _launch.launcher() == ("xla" if native else "bridge")
    monkeypatch.setenv("THERIA_JAX_LAUNCH", "bridge")
    assert _launch.launcher() == "bridge"
    monkeypatch.setenv("THERIA_JAX_LAUNCH", "ffi")
    with pytest.raises(ValueError, match="must be 'xla' or 'bridge'"):
        _launch.launcher()
    if not native:
        monkeypatch.setenv("THERIA_JAX_LAUNCH", "xla")
        with pytest.raises(RuntimeError, match="unset THERIA_JAX_LAUNCH"):
            _launch.launcher()


def test_theria_jax_imports_no_torch():
    """Plans and the XLA-native launch are framework-neutral: torch is needed by the bridge only,
    and imported when a bridge launch runs."""
    code = "import sys, theria_jax; assert 'torch' not in sys.modules, 'theria_jax imported torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_launcher_falls_back_without_the_ffi_target(monkeypatch):
    """A jaxlib without the Triton target (no CUDA plugin) gets the bridge."""
    monkeypatch.delenv("THERIA_JAX_LAUNCH", raising=False)
    monkeypatch.setattr(_launch, "_gpu_triton", lambda: None)
    assert _launch.launcher() == "bridge"


@triton.jit
def _axpy(X, Y, Out, alpha, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Out + offs, alpha * tl.load(X + offs, mask=offs < n) + tl.load(Y + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _written_first(Out, X, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Out + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


def test_launch_names_every_argument_and_orders_pointers():
    """A launch takes every kernel parameter by name, and the pointers a kernel writes must follow
    those it reads (XLA passes a custom call its operands before its results)."""
    launch = Launch(_axpy, (2,), dict(X=Buffer("x"), Y=Buffer("y"), Out=Buffer("out"), alpha=2.0, n=9, BLOCK=16),
                    writes=("Out",), num_warps=1, num_stages=1)
    assert launch.reads_buffers == ("x", "y") and launch.writes_buffers == ("out",) and launch.grid == (2, 1, 1)
    with pytest.raises(TypeError, match=r"missing arguments \['n'\]"):
        Launch(_axpy, (1,), dict(X=Buffer("x"), Y=Buffer("y"), Out=Buffer("out"), alpha=2.0, BLOCK=16),
               writes=("Out",), num_warps=1, num_stages=1)
    with pytest.raises(TypeError, match="must follow the pointers it reads"):
        Launch(_written_first, (1,), dict(Out=Buffer("out"), X=Buffer("x"), n=3, BLOCK=16), writes=("Out",),
               num_warps=1, num_stages=1)


def test_one_launch_runs_under_jit_and_eagerly():
    """The launch primitive on its own, through whichever launcher this machine uses."""
    launch = Launch(_axpy, (2,), dict(X=Buffer("x"), Y=Buffer("y"), Out=Buffer("out"), alpha=2.0, n=19, BLOCK=16),
                    writes=("Out",), num_warps=1, num_stages=1)
    x, y = (jax.random.normal(key, (19,), jnp.float32) for key in jax.random.split(jax.random.PRNGKey(0)))

    def run(x, y):
        return _launch.launch_p.bind(x, y, launch=launch, out_avals=(jax.core.ShapedArray((19,), jnp.float32),),
                                     zeroed=(False,))[0]

    np.testing.assert_array_equal(np.asarray(run(x, y)), np.asarray(2 * x + y))
    np.testing.assert_array_equal(np.asarray(jax.jit(run)(x, y)), np.asarray(2 * x + y))


# Every primitive and derivative order, as jitted programs of (q, k, v).
_GPU_CHECK = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    import theria_jax

    def attend(q, k, v):
        return theria_jax.attention(q, k, v, causal=True)

    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    shape = (2, 77, 4, 48)
    q, k, v, d_out, *tangents = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16) for key in keys[:7])
    kv = (q[:, :, :2], k[:, :, :2], v[:, :, :2])

    def grad(q, k, v):
        return jax.vjp(attend, q, k, v)[1](d_out)

    programs = {
        "fwd": attend,
        "lse": lambda q, k, v: theria_jax.attention(q, k, v, return_lse=True, window_size=(9, 3)),
        "grad": grad,
        "grad_of_grad": lambda q, k, v: jax.grad(
            lambda q, k, v: sum(jnp.vdot(g.astype(jnp.float32), t.astype(jnp.float32))
                                for g, t in zip(grad(q, k, v), tangents)), argnums=(0, 1, 2))(q, k, v),
        "jvp_of_grad": lambda q, k, v: jax.jvp(grad, (q, k, v), tuple(tangents)),
        "jvp": lambda q, k, v: jax.jvp(attend, (q, k, v), tuple(tangents)),
        "jvp_of_jvp": lambda q, k, v: jax.jvp(lambda *x: jax.jvp(attend, x, tuple(tangents))[1], (q, k, v),
                                              tuple(tangents[::-1])),
        "grad_of_jvp": lambda q, k, v: jax.grad(lambda q: jnp.sum(
            jax.jvp(attend, (q, k, v), tuple(tangents))[1].astype(jnp.float32) ** 2))(q),
        "vmap_grad": lambda q, k, v: jax.vmap(grad)(q[None].repeat(2, 0), k[None].repeat(2, 0),
                                                    v[None].repeat(2, 0)),
        "gqa_grad": lambda q, k, v: jax.vjp(attend, q, *kv[1:])[1](d_out),
        "rmsnorm_grad_of_grad": lambda q, k, v: jax.grad(lambda x, w: jnp.sum(jax.grad(
            lambda x, w: jnp.sum(theria_jax.rmsnorm(x, w).astype(jnp.float32) * v.astype(jnp.float32)),
            argnums=(0, 1))(x, w)[0].astype(jnp.float32) ** 2), argnums=(0, 1))(q, k[0, 0, 0]),
        "rmsnorm_jvp_of_jvp": lambda q, k, v: jax.jvp(lambda x: jax.jvp(
            lambda x: theria_jax.rmsnorm(x, k[0, 0, 0]), (x,), (v,))[1], (q,), (d_out,)),
    }
    results = {}
    for launcher in ("xla", "bridge"):
        os.environ["THERIA_JAX_LAUNCH"] = launcher
        for name, fn in programs.items():
            results[launcher, name] = jax.tree.leaves(jax.jit(fn)(q, k, v))
    for name in programs:
        for a, b in zip(results["xla", name], results["bridge", name]):
            a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
            assert np.isfinite(a).all(), name
            np.testing.assert_array_equal(a, b, err_msg=name)
    print("identical:", ", ".join(programs))
""")


@pytest.mark.gpu
@pytest.mark.parametrize("command_buffers", [False, True], ids=["plain", "command_buffers"])
def test_xla_native_launch_is_bit_identical_to_the_bridge(command_buffers):
    """Every primitive and derivative order (grad, grad∘grad, jvp∘grad, jvp, jvp∘jvp, grad∘jvp, vmap,
    grouped-query heads, windows; rmsnorm's grad∘grad and jvp∘jvp) gives the same bits through triton_kernel_call_ffi as through the
    bridge; also with XLA's command buffers capturing every custom call (a fresh process: XLA reads
    its flags once)."""
    flags = dict(XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + _COMMAND_BUFFERS).strip()) if command_buffers else {}
    result = _run_child(_GPU_CHECK, **flags)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "identical" in result.stdout


# XLA flags that record every custom call into a command buffer, however small the program.
_COMMAND_BUFFERS = " --xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL"


def _run_child(code: str, **environment) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python process with ``environment`` added to this one's (a fresh process
    holds no kernel image or plan from an earlier compile)."""
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **environment), capture_output=True,
                          text=True, timeout=600)


_ATTEND_ONCE = textwrap.dedent("""
    import jax, jax.numpy as jnp, theria_jax
    q = jnp.ones((1, 32, 2, 16), jnp.bfloat16)
    print(float(jax.jit(lambda q: theria_jax.attention(q, q, q).sum())(q)))
""")


@pytest.mark.gpu
def test_xla_native_launch_loads_tritons_cubin_without_ptxas():
    """With the cubin in the call, jaxlib runs no ptxas: a ptxas flag that does not exist
    (``JAX_TRITON_PTXAS_EXTRA_FLAGS``) breaks the launch only when the cubin is left out
    (``THERIA_JAX_CUBIN=0``). Fresh processes, so no image is cached from an earlier compile."""
    if _launch.launcher() != "xla":
        pytest.skip("jaxlib's Triton target is not available here")
    bad_flag = dict(JAX_TRITON_PTXAS_EXTRA_FLAGS="--no-such-ptxas-flag")
    run = lambda **extra: _run_child(_ATTEND_ONCE, **bad_flag, **extra)  # noqa: E731
    without = run(THERIA_JAX_CUBIN="0")
    if without.returncode == 0:
        pytest.skip("this jaxlib does not pass JAX_TRITON_PTXAS_EXTRA_FLAGS to ptxas: nothing to tell apart")
    with_cubin = run()
    if with_cubin.returncode != 0 and "no-such-ptxas-flag" in with_cubin.stderr:
        pytest.skip(f"jaxlib {jax.lib.__version__} compiles the PTX even when the call carries a module image")
    assert with_cubin.returncode == 0, with_cubin.stderr[-4000:]
    assert float(with_cubin.stdout.split()[-1]) == 1024.0


@pytest.mark.gpu
def test_xla_native_launch_with_a_ptx_stand_in():
    """THERIA_JAX_PTX=0: the call carries the cubin and a one-line stand-in for the PTX; jaxlib
    launches it from the cubin, with the same result as with the PTX, and runs no ptxas."""
    if _launch.launcher() != "xla" or not _launch._launches_from_image():
        pytest.skip("needs jaxlib's Triton target, 0.11.2 or later")
    with_ptx = _run_child(_ATTEND_ONCE)
    stand_in = _run_child(_ATTEND_ONCE, THERIA_JAX_PTX="0", JAX_TRITON_PTXAS_EXTRA_FLAGS="--no-such-ptxas-flag")
    assert with_ptx.returncode == 0 and stand_in.returncode == 0, stand_in.stderr[-4000:]
    assert stand_in.stdout.split()[-1] == with_ptx.stdout.split()[-1] == "1024.0"


# Forward, JVP and gradient of a jitted call (odd length, grouped heads, causal) against the
# reference, in a process whose plans load with TMA or not as THERIA_ATTENTION_TMA says.
_TMA_ATTEND = textwrap.dedent("""
    import jax, jax.numpy as jnp, theria_jax
    from theria_kernels.attention._tuning import TMA_OVERRIDE
    jax.config.update("jax_default_matmul_precision", "highest")  # the reference's dots in IEEE float32 too
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (2, 77, 4, 64), jnp.float32)
    k, v = (jax.random.normal(key, (2, 77, 2, 64), jnp.float32) for key in keys[1:])
    def run(backend):
        attend = lambda q, k, v: theria_jax.attention(q, k, v, causal=True, backend=backend)
        jvp = jax.jit(lambda q, k, v: jax.jvp(attend, (q, k, v), (v[:, :, :1].repeat(4, 2), k, q[:, :, :2])))(q, k, v)
        grads = jax.jit(jax.grad(lambda q, k, v: (attend(q, k, v) * q).sum(), argnums=(0, 1, 2)))(q, k, v)
        return (*jvp, *grads)
    errors = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(run("triton_full_fused"),
                                                                                 run("reference"))]
    print("tma", TMA_OVERRIDE, "errors", max(errors))
""")


@pytest.mark.gpu
@pytest.mark.parametrize("command_buffers", ["on", "off"])
@pytest.mark.parametrize("tma", ["0", "1"], ids=["pointer_loads", "tma_loads"])
def test_xla_native_launch_with_and_without_tma(tma, command_buffers):
    """A kernel that builds tensor descriptors takes its global scratch as one more buffer of its
    call: the forward, JVP and backward with TMA loads (forced) match the reference as those
    without do, with every custom call recorded into XLA's command buffers and with command
    buffers off."""
    if _launch.launcher() != "xla":
        pytest.skip("jaxlib's Triton target is not available here")
    flags = _COMMAND_BUFFERS if command_buffers == "on" else " --xla_gpu_enable_command_buffer="
    result = _run_child(_TMA_ATTEND, THERIA_ATTENTION_TMA=tma, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + flags))
    assert result.returncode == 0, result.stderr[-4000:]
    flag, error = result.stdout.split()[-3], float(result.stdout.split()[-1])
    assert flag == str(tma == "1") and error < 1e-5, result.stdout


@pytest.mark.gpu
def test_jitted_attention_takes_the_xla_native_launch():
    """On a GPU the jitted program holds jaxlib's Triton custom call, and no Python callback."""
    if _launch.launcher() != "xla":
        pytest.skip("jaxlib's Triton target is not available here")
    q = jnp.ones((1, 32, 2, 16), jnp.bfloat16)
    text = jax.jit(lambda q: theria_jax.attention(q, q, q)).lower(q).as_text()
    assert "triton_kernel_call_ffi" in text and "callback" not in text


# A child process without the interpreter builds the XLA-native custom call of a real attention
# launch, with jaxlib's launcher module stood in for by a recorder: no GPU is needed to compile
# for sm_90. The serialized call must carry one parameter per runtime kernel argument, and the
# cubin Triton compiled as the kernel's module image (tests/_protobuf.py reads it back).
_KERNEL_CALL_CHECK = textwrap.dedent("""
    import math
    import os
    import zlib

    import _protobuf
    import jax.numpy as jnp
    from jax.core import ShapedArray
    from theria_jax import _launch
    from theria_kernels._plan import Buffer
    from theria_kernels.attention import AttentionParams
    from theria_kernels.attention._launch import AttentionCall, Device, forward_plan

    class Recorder:
        def __init__(self):
            self.kernels, self.parameters, self.alignments = [], [], []
        def TritonKernel(self, name, num_warps, num_ctas, shared, ptx, ttir, capability):
            assert ".entry" in ptx and capability == 90, (name, capability)
            self.kernels.append(name)
            self.shared, self.tma_loads = shared, ptx.count("cp.async.bulk.tensor")
            return name
        def create_array_parameter(self, zero_bytes, alignment):
            self.parameters.append(("array", zero_bytes))
            self.alignments.append(alignment)
            return self.parameters[-1]
        def create_scalar_parameter(self, value, kind):
            self.parameters.append((kind, value))
            return self.parameters[-1]
        def TritonKernelCall(self, kernel, x, y, z, parameters):
            self.call = (kernel, (x, y, z), parameters)
            return self
        def to_proto(self, name, metadata):
            return _protobuf.kernel_call(self.call[0], self.shared, self.call[1], self.call[2], name)

    recorder = Recorder()
    _launch._gpu_triton = lambda: recorder
    from_image = os.environ.get("THERIA_JAX_PTX") == "0"
    _launch._launches_from_image = lambda: True  # as jaxlib 0.11.2 and later
    shape = (2, 3, 40, 32)
    call = AttentionCall(shape, (3840, 1280, 32, 1), shape, (3840, 1280, 32, 1), "bfloat16",
                         AttentionParams(scale=0.125, causal=True), Device(132, False, False, 90))
    (launch,) = forward_plan(call).launches
    avals = tuple(ShapedArray(shape if n == "out" else shape[:3], jnp.bfloat16 if n == "out" else jnp.float32)
                  for n in launch.writes_buffers)
    serialized, scratch_bytes = _launch._kernel_call(launch, (jnp.dtype(jnp.bfloat16),) * len(launch.reads_buffers),
                                                     avals, (False,) * len(avals), 90)
    kernel, grid, parameters = recorder.call
    arrays = [p for p in parameters if p[0] == "array"]
    # The kernel's buffers, then the global scratch's when it has one: last, where Triton's launchers put it.
    assert len(arrays) == len(launch.reads_buffers) + len(launch.writes_buffers) + bool(scratch_bytes), parameters
    assert not scratch_bytes or parameters[-1] == ("array", 0), parameters
    assert grid == launch.grid and kernel == recorder.kernels[0]
    # The call carries Triton's cubin for sm_90 as the kernel's module image (name and shared
    # memory as the kernel's), with everything to_proto wrote unchanged; THERIA_JAX_CUBIN=0 leaves
    # the serialized call as to_proto wrote it.
    wrote = _protobuf.decode(recorder.to_proto(kernel, b""), _protobuf.ANY_KERNEL_CALL)
    sent = _protobuf.decode(zlib.decompress(serialized), _protobuf.ANY_KERNEL_CALL)
    (call_fields,), (wrote_call,) = [v for n, v in sent if n == 1], [v for n, v in wrote if n == 1]
    kernel_fields = call_fields[0][1]
    image = [v for n, v in kernel_fields if n == 11]
    assert len(image) == 1, kernel_fields
    if from_image:  # the PTX is a stand-in naming the real PTX's digest, and the TTIR is gone
        ptx = [v for n, v in kernel_fields if n == 4]
        assert len(ptx) == 1 and b"sha256" in ptx[0] and len(ptx[0]) < 200 and 5 not in dict(kernel_fields), ptx
        assert [f for f in kernel_fields if f[0] not in (4, 11)] == [f for f in wrote_call[0][1] if f[0] not in (4, 5)]
    else:
        assert [f for f in kernel_fields if f[0] != 11] == wrote_call[0][1], "the kernel's own fields changed"
    assert call_fields[1:] == wrote_call[1:] and [f for f in sent if f[0] != 1] == [f for f in wrote if f[0] != 1]
    cubin, name, shared = (dict(image[0])[n] for n in (1, 2, 3))
    assert cubin[:4] == b"\\x7fELF" and name == kernel.encode() and shared == recorder.shared, (name, shared)
    os.environ["THERIA_JAX_CUBIN"] = "0"
    assert zlib.decompress(_launch._kernel_call(launch, (jnp.dtype(jnp.bfloat16),) * len(launch.reads_buffers),
                                                avals, (False,) * len(avals), 90)[0]) == recorder.to_proto(kernel, b"")
    print("kernel call:", kernel, len(parameters), "parameters,", len(cubin), "bytes of cubin")
    print("scratch:", scratch_bytes, recorder.alignments[-1], math.prod(grid), "tma loads:", recorder.tma_loads)
""")


def test_module_image_joins_the_kernel_and_changes_nothing_else():
    """The cubin goes into TritonAnyKernelCall.kernel_call.kernel.module_image; every other field,
    of every wire type (varints, a negative one, 4- and 8-byte floats, strings, nested parameters),
    reads back as it was."""
    parameters = [("array", 0), ("array", 4096), ("i32", 7), ("fp32", 0.5), ("fp64", 2.0), ("i64", -3)]
    wrote = _protobuf.kernel_call("_attn_fwd_kernel", 50176, (5, 3, 2), parameters, "_attn_fwd_kernel")
    image = _launch.module_image_proto(b"\x7fELF" + bytes(range(256)) * 3, "_attn_fwd_kernel", 50176)
    sent = _protobuf.decode(_launch.with_module_image(wrote, image), _protobuf.ANY_KERNEL_CALL)
    wrote = _protobuf.decode(wrote, _protobuf.ANY_KERNEL_CALL)
    (kernel_number, kernel), *call_rest = sent[0][1]
    assert kernel_number == 1 and kernel[:-1] == wrote[0][1][0][1] and call_rest == wrote[0][1][1:]
    assert sent[1:] == wrote[1:]
    assert (call_rest[-1][1][0][1], call_rest[-2][1][0][1]) == (-3 + (1 << 64), ("fixed64", 2.0))
    assert kernel[-1] == (11, [(1, b"\x7fELF" + bytes(range(256)) * 3), (2, b"_attn_fwd_kernel"), (3, 50176)])


def test_ptx_stand_in_replaces_the_ptx_and_drops_the_ttir():
    """For jaxlibs that launch from the module image, the kernel's PTX (field 4) becomes the given
    stand-in and its TTIR (field 5) goes; every other field, and the rest of the call, stay."""
    parameters = [("array", 0), ("i32", 7), ("fp64", 2.0)]
    serialized = _protobuf.kernel_call("_attn_fwd_kernel", 50176, (5, 3, 2), parameters, "_attn_fwd_kernel")
    image = _launch.module_image_proto(b"\x7fELF" + bytes(64), "_attn_fwd_kernel", 50176)
    sent = _protobuf.decode(_launch.with_module_image(serialized, image, b"// theria: key"),
                            _protobuf.ANY_KERNEL_CALL)
    wrote = _protobuf.decode(serialized, _protobuf.ANY_KERNEL_CALL)
    (_, kernel), *call_rest = sent[0][1]
    (_, wrote_kernel), *wrote_rest = wrote[0][1]
    assert call_rest == wrote_rest and sent[1:] == wrote[1:]
    assert [f for f in kernel if f[0] not in (4, 5, 11)] == [f for f in wrote_kernel if f[0] not in (4, 5)]
    assert [f for f in kernel if f[0] in (4, 5)] == [(4, b"// theria: key")]
    assert [f[0] for f in kernel][-1] == 11


@pytest.mark.parametrize("tma, from_image", [("0", "0"), ("1", "0"), ("0", "1")],
                         ids=["pointer_loads", "tma_loads", "ptx_stand_in"])
def test_xla_native_kernel_call_is_built_for_sm90_without_a_gpu(tma, from_image):
    """The XLA-native lowering's compile-and-serialise step, for a real forward launch compiled
    for sm_90 on any machine (the GPU test above runs it; this one keeps it covered on the CPU).
    With TMA loads (THERIA_ATTENTION_TMA=1) the kernel builds its tensor descriptors in global
    scratch: a buffer of the call's own (one more result of the custom call), passed as the last
    array parameter, 256 bytes a program (two descriptors), aligned as Triton asks. For a
    jaxlib that launches from the module image, THERIA_JAX_PTX=0 makes the PTX a stand-in and
    leaves the TTIR out."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(THERIA_ATTENTION_TMA=tma, THERIA_JAX_PTX="0" if from_image == "1" else "1")
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n" + _KERNEL_CALL_CHECK
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "kernel call: _attn_fwd_kernel" in result.stdout
    scratch_bytes, alignment, programs, _, _, tma_loads = result.stdout.split("scratch:")[1].split()
    if tma == "1":
        assert int(scratch_bytes) == 256 * int(programs) and int(alignment) >= 64 and int(tma_loads) > 0, result.stdout
    else:
        assert int(scratch_bytes) == 0 and int(tma_loads) == 0, result.stdout


def test_tensorfloat32_precision_reaches_the_kernels():
    """``jax.default_matmul_precision("tensorfloat32")`` is JAX's opt-in to TF32 products (torch's
    ``allow_tf32``): the kernels' device says so inside it and not outside, and a float32 call on a
    GPU then compiles its dots as TF32 (in the interpreter they stay IEEE)."""
    import dataclasses

    from theria_jax import _primitives
    from theria_kernels.attention import AttentionParams
    from theria_kernels.attention._launch import AttentionCall

    assert not _primitives._device().allow_tf32
    with jax.default_matmul_precision("tensorfloat32"):
        device = _primitives._device()
    assert device.allow_tf32
    with jax.default_matmul_precision("float32"):
        assert not _primitives._device().allow_tf32
    shape, strides = (1, 2, 40, 32), (2560, 1280, 32, 1)
    params = AttentionParams(scale=0.125, causal=True)
    on_gpu = dataclasses.replace(device, interpreter=False, capability=90)
    in_interpreter = dataclasses.replace(device, interpreter=True)
    precision = lambda device, dtype: AttentionCall(  # noqa: E731
        shape, strides, shape, strides, dtype, params, device).meta("forward")[0]["PRECISION"]
    assert precision(on_gpu, "float32") == "tf32"
    assert precision(on_gpu, "bfloat16") == precision(in_interpreter, "float32") == "ieee"
    assert precision(dataclasses.replace(on_gpu, allow_tf32=False), "float32") == "ieee"


@pytest.mark.gpu
def test_tensorfloat32_attention_on_the_gpu():
    """float32 attention under ``jax.default_matmul_precision("tensorfloat32")`` runs TF32 products:
    against float64 its output's error is well above IEEE float32's and within TF32's rounding
    (10-bit mantissa); its gradient stays close to the IEEE one."""
    rng = np.random.default_rng(3)
    x = [rng.standard_normal((2, 128, 2, 64)) for _ in range(3)]
    logits = np.einsum("bqhd,bkhd->bhqk", x[0], x[1]) / 8.0
    logits = np.where(np.tril(np.ones((128, 128), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), x[2])
    q, k, v = (jnp.asarray(a, jnp.float32) for a in x)
    attend = jax.jit(lambda q, k, v: theria_jax.attention(q, k, v, causal=True))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(theria_jax.attention(q, k, v, causal=True))), (0, 1, 2)))
    ieee, ieee_grads = np.asarray(attend(q, k, v)), grad(q, k, v)
    with jax.default_matmul_precision("tensorfloat32"):
        tf32, tf32_grads = np.asarray(attend(q, k, v)), grad(q, k, v)
    ieee_error, tf32_error = np.max(np.abs(ieee - want)), np.max(np.abs(tf32 - want))
    assert ieee_error < 1e-5 and 10 * ieee_error < tf32_error < 2e-2, (ieee_error, tf32_error)
    for a, b in zip(tf32_grads, ieee_grads):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(a).all() and np.max(np.abs(a - b)) < 5e-2 * np.max(np.abs(b))


def test_jax_plans_follow_the_tma_tables(monkeypatch):
    """On an sm_90 device, the plans JAX's primitives run take TMA loads where the tile table turns
    them on for the sweep (2-byte: the forward, JVP and backward at D64 and D128, the double
    backward only at D64), as the torch launcher's do, and none with THERIA_ATTENTION_TMA=0."""
    import jax.numpy as jnp

    from theria_jax import _primitives
    from theria_kernels.attention import AttentionParams
    from theria_kernels.attention import _tuning as tuning
    from theria_kernels.attention._launch import Device, backward_backward_plan, backward_plan, forward_plan

    ran = []
    monkeypatch.setattr(_primitives, "run_plan", lambda plan, arrays: ran.append(plan) or [None] * len(plan.outputs))
    monkeypatch.setattr(_primitives, "_device", lambda: Device(132, False, False, 90))

    def flags(head_dim):
        for builder in (forward_plan, backward_plan, backward_backward_plan):
            builder.cache_clear()  # plans are cached with the table's choice they were built with
        ran.clear()
        x = jnp.zeros((2, 256, 4, head_dim), jnp.bfloat16)
        arrays = {name: x for name in ("q", "k", "v", "out", "d_out", "q_dot", "k_dot", "v_dot", *_primitives._COT)}
        static = dict(params=AttentionParams(scale=0.125), lengths=None)
        _primitives._forward_impl(arrays, **static)
        _primitives._forward_tangent_impl(arrays, **static)
        _primitives._backward_impl(arrays, **static)
        _primitives._backward_backward_impl(arrays, cot_d_out=True, has_dq=False, **static)
        return [[launch.arguments["TMA"] for launch in plan.launches if "TMA" in launch.arguments] for plan in ran]

    monkeypatch.setattr(tuning, "TMA_OVERRIDE", None)
    assert flags(64) == [[True], [True], [True, True], [True, True]]
    assert flags(128) == [[True], [True], [True, True], [False, False]]
    assert flags(32) == [[False], [False], [False, False], [False, False]]  # the 32 class is not timed with TMA
    monkeypatch.setattr(tuning, "TMA_OVERRIDE", False)
    assert flags(128) == [[False], [False], [False, False], [False, False]]
    for builder in (forward_plan, backward_plan, backward_backward_plan):
        builder.cache_clear()
