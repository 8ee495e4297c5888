"""Benchmark theria's attention in JAX against the same kernels from torch and JAX's own attention
(GPU only; on a CPU only --help runs).

Implementations, all on (B, T, H, D) arrays with the causal mask top-left aligned:
  theria_jax    theria_jax.attention, jitted (kernels launched by XLA: triton_kernel_call_ffi)
  theria_bridge the same, compiled with THERIA_JAX_LAUNCH=bridge (DLPack + buffer_callback)
  theria_torch  theria_torch.flash_attn_func on torch tensors (the same kernels, no bridge)
  jax_xla       jax.nn.dot_product_attention(implementation="xla"), jitted
  jax_cudnn     jax.nn.dot_product_attention(implementation="cudnn"), jitted (fp16/bf16 only)

Modes:
  fwd   out = attention(q, k, v)
  grad  forward + VJP of out with cotangent dO (dq, dk, dv)
  hvp   forward-over-reverse Hessian-vector product: jvp of (q, k, v) ↦ VJP(dO) along random
        tangents (theria: forward, backward, JVP and double-backward kernels)
  grad2 reverse over reverse: the gradient of <VJP(dO), tangents> (theria: forward, backward
        and double-backward kernels), the shape of a full-MAML meta-gradient

Each time is the median over repetitions of a burst of ``--burst`` back-to-back calls followed by
one device sync, divided by the burst (host-timed the same way for both frameworks, since JAX
runs on its own CUDA stream), after warm-up: the steady-state cost per call, in which each
framework's host work overlaps the device's (``--burst 1`` gives the latency of a lone call).

    python scripts/bench_jax.py                       # B8 H16 T4096 D64 bf16
    python scripts/bench_jax.py --preset tiny         # B64 H4 T256 D16: the MAML shape, host-bound
    python scripts/bench_jax.py --shape 8,16,1024,64 --dtype float16 --causal --mode fwd grad
"""

from __future__ import annotations

import argparse
import os

from _timing import median_wall_ms

MODES = ("fwd", "grad", "hvp", "grad2")
PRESETS = {"tiny": "64,4,256,16", "medium": "8,16,1024,64", "large": "8,16,4096,64", "large_d128": "4,16,4096,128"}
# Nominal FLOPs in units of one forward (two T×T GEMMs), as in scripts/bench_sdpa.py.
UNITS = {"fwd": 1.0, "grad": 3.5}


def jax_workloads(attend, chain: int = 1):
    """Jitted programs of (q, k, v, d_out, tangents): the cotangent and tangents are arguments, not
    constants, so XLA cannot fold any part of the work into the program at compile time."""
    import jax

    def grad(q, k, v, d_out):
        return jax.vjp(attend, q, k, v)[1](d_out)

    def grad2(q, k, v, d_out, tangents):
        inner = lambda q, k, v: sum(jax.numpy.vdot(g, t).real for g, t in zip(grad(q, k, v, d_out), tangents))
        return jax.grad(inner, argnums=(0, 1, 2))(q, k, v)

    def chained(q, k, v, d_out, tangents):
        # ``chain`` forwards in one program, each output the next query: JAX's per-call dispatch
        # is paid once, so the time per forward approaches the device's (a CUDA graph's, in torch).
        # Unrolled: a device loop would read its condition back to the host every iteration.
        return jax.lax.fori_loop(0, chain, lambda _, x: attend(x, k, v), q, unroll=True)

    return {
        "fwd": jax.jit(chained if chain > 1 else lambda q, k, v, d_out, tangents: attend(q, k, v)),
        "grad": jax.jit(lambda q, k, v, d_out, tangents: grad(q, k, v, d_out)),
        "hvp": jax.jit(lambda q, k, v, d_out, tangents: jax.jvp(lambda *x: grad(*x, d_out), (q, k, v), tangents)),
        "grad2": jax.jit(grad2),
    }


def torch_workloads(attend, q, k, v, d_out, tangents):
    import torch

    def grad(q, k, v):
        return torch.func.vjp(attend, q, k, v)[1](d_out)

    def grad2(q, k, v):
        primals = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attend(*primals)
        grads = torch.autograd.grad(out, primals, d_out, create_graph=True)
        return torch.autograd.grad(grads, primals, tangents)

    return {
        "fwd": lambda q, k, v: attend(q, k, v),
        "grad": grad,
        "hvp": lambda q, k, v: torch.func.jvp(grad, (q, k, v), tangents),
        "grad2": grad2,
    }


def _compiled_with_bridge(fn, *args):
    """``fn`` compiled now, with the DLPack bridge as the launcher, or the error's first line."""
    os.environ["THERIA_JAX_LAUNCH"] = "bridge"
    try:
        return fn.lower(*args).compile()
    except Exception as err:  # noqa: BLE001 - reported in the table
        message = (str(err).strip().splitlines() or [type(err).__name__])[0]

        def failed(*args):
            raise RuntimeError(message)
        return failed
    finally:
        del os.environ["THERIA_JAX_LAUNCH"]


def measure(call, sync, reps, burst) -> float | str:
    """Median ms, or the first line of the error (unsupported derivative, out of memory)."""
    try:
        return median_wall_ms(call, sync, reps, burst)
    except Exception as err:  # noqa: BLE001 - every failure is a table entry, not a crash
        return (str(err).strip().splitlines() or [type(err).__name__])[0][:70]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="large")
    parser.add_argument("--shape", help="B,H,T,D (overrides --preset)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--skip", nargs="*", default=[], help="implementations to leave out, e.g. jax_xla")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--burst", type=int, default=10, help="calls per timed repetition")
    parser.add_argument("--chain", type=int, default=1,
                        help="fwd only: forwards chained inside one jitted program (JAX rows; time per forward)")
    args = parser.parse_args()

    # JAX and torch share the GPU: let each allocate what it uses instead of JAX taking 75 %.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    import torch

    import theria_jax
    import theria_torch

    if jax.default_backend() != "gpu" or not torch.cuda.is_available():
        raise SystemExit("bench_jax.py needs a CUDA GPU visible to both JAX and torch")

    batch, heads, seq, head_dim = map(int, (args.shape or PRESETS[args.preset]).split(","))
    causal = args.causal
    keys = jax.random.split(jax.random.PRNGKey(0), 7)
    shape = (batch, seq, heads, head_dim)
    q, k, v, d_out, *tangents = (jax.random.normal(key, shape, jnp.float32).astype(args.dtype) for key in keys)
    tq, tk, tv, t_d_out, *t_tangents = (torch.from_dlpack(x).clone() for x in (q, k, v, d_out, *tangents))

    jax_impls = {
        "theria_jax": lambda q, k, v: theria_jax.attention(q, k, v, causal=causal),
        "theria_bridge": lambda q, k, v: theria_jax.attention(q, k, v, causal=causal),
        "jax_xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla"),
        "jax_cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                  implementation="cudnn"),
    }
    # name -> (sync, {mode: call}); a call enqueues one instance, sync(result) waits for the device.
    calls = {}
    for name, attend in jax_impls.items():
        fns = jax_workloads(attend, args.chain)
        operands = (q, k, v, d_out, tuple(tangents))
        if name == "theria_bridge":  # the launcher is chosen when a program is compiled: compile now
            fns = {mode: _compiled_with_bridge(fn, *operands) for mode, fn in fns.items()}
        calls[name] = (lambda result=None: jax.block_until_ready(result),
                       {mode: (lambda fn=fn: fn(*operands)) for mode, fn in fns.items()})
    fns = torch_workloads(lambda q, k, v: theria_torch.flash_attn_func(q, k, v, causal=causal),
                          tq, tk, tv, t_d_out, tuple(t_tangents))
    calls["theria_torch"] = (lambda result=None: torch.cuda.synchronize(),
                             {mode: (lambda fn=fn: fn(tq, tk, tv)) for mode, fn in fns.items()})
    order = [n for n in ("theria_jax", "theria_bridge", "theria_torch", "jax_xla", "jax_cudnn") if n not in args.skip]
    forward_flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)

    print(f"# {torch.cuda.get_device_name()} jax {jax.__version__} torch {torch.__version__} "
          f"B={batch} H={heads} T={seq} D={head_dim} {args.dtype} causal={causal} burst={args.burst} chain={args.chain}")
    print(f"{'mode':5s} {'impl':13s} {'ms':>9s} {'TFLOP/s':>8s} {'torch/this':>11s} {'xla/this':>9s} "
          f"{'cudnn/this':>11s}")
    for mode in args.mode:
        results = {name: measure(calls[name][1][mode], calls[name][0], args.reps, args.burst) for name in order}
        if mode == "fwd" and args.chain > 1:  # the JAX rows timed `chain` forwards per call
            results = {name: ms / args.chain if isinstance(ms, float) and name != "theria_torch" else ms
                       for name, ms in results.items()}
        for name, ms in results.items():
            if isinstance(ms, str):
                print(f"{mode:5s} {name:13s} error: {ms}")
                continue
            tflops = f"{UNITS[mode] * forward_flops / ms / 1e9:8.1f}" if mode in UNITS else f"{'':8s}"
            ratios = [f"{results[other] / ms:{width}.2f}x" if isinstance(results.get(other), float)
                      else f"{'-':>{width + 1}s}"
                      for other, width in (("theria_torch", 10), ("jax_xla", 8), ("jax_cudnn", 10))]
            print(f"{mode:5s} {name:13s} {ms:9.3f} {tflops} {' '.join(ratios)}")


if __name__ == "__main__":
    main()
