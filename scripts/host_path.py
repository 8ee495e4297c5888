"""The host cost of theria's torch path, against the floor that torch's autograd sets for it.

At the small shapes of MAML an eager call's time is the host's: Python, the operator entries,
autograd's engine. This script times the host work alone, on any machine (kernel launches are
stubbed out, so the kernels never run and the interpreter is never entered), per call of:

  fwd       out = sdpa_custom(q, k, v)                                  (no grad)
  fwd_bwd   forward, then torch.autograd.grad of out                    (forward + backward)
  hvp       forward, grad with create_graph, grad of a function of it   (+ double backward)

for ``theria``, and for ``floor``: the same three autograd Functions (forward, backward, double
backward) with the same inputs, saved tensors and outputs, applied the way theria applies its
own (``theria_torch._ops.Function``: no per-call signature binding, the forward alone when
nothing differentiates), whose bodies only allocate their outputs. ``floor`` is what an operator
with theria's derivative structure pays in torch's autograd; theria's time above it is its own
(argument checks, plans, launchers). ``floor_cpp`` is the same three Functions written in C++
(``torch::autograd::Function``, built at the first run with torch's C++ extension loader, which
needs a C++ compiler and ninja; "n/a" without them): what the structure costs once the autograd
nodes are out of Python, the route left to issue #16's eager second-order target.

    python scripts/host_path.py
    python scripts/host_path.py --shape 64,4,256,16 --calls 5000

With ``--cuda`` (a GPU) the same modes run on CUDA tensors (bfloat16) with real launches, as a user
calls them eagerly: per-call wall time of rounds of ``--calls`` calls, each round ended by one
device sync, for theria, the floor (on CUDA tensors: autograd runs their backward on its device
thread) and torch SDPA's flash (math for hvp) in the same process; compare within one run.

    python scripts/host_path.py --cuda --shape 64,4,256,16 --calls 300
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Decided before Triton is imported: stubbed launches keep the interpreter (no GPU needed), --cuda
# launches the compiled kernels.
CUDA = "--cuda" in sys.argv
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import theria_kernels._launch_torch as launch_torch  # noqa: E402
from theria_torch import sdpa_custom  # noqa: E402
from theria_torch._ops import Function  # noqa: E402


class _DoubleBackward(Function):
    @staticmethod
    def forward(q, k, v, out, lse, d_out, cot_dq, cot_dk, cot_dv):
        return tuple(torch.empty_like(x) for x in (q, k, v, d_out, lse))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass


class _Backward(Function):
    @staticmethod
    def forward(q, k, v, out, lse, d_out):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, cot_dq, cot_dk, cot_dv):
        cot_q, cot_k, cot_v, cot_d_out, _ = _DoubleBackward.apply(*ctx.saved_tensors, cot_dq, cot_dk, cot_dv)
        return cot_q, cot_k, cot_v, None, None, cot_d_out


class _Forward(Function):
    @staticmethod
    def forward(q, k, v):
        return torch.empty_like(q), q.new_empty(q.shape[:3])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        return _Backward.apply(*ctx.saved_tensors, d_out)


def floor(q, k, v):
    return _Forward.apply(q, k, v)[0]


# The floor's three Functions in C++: same inputs, saved tensors and outputs, bodies that only
# allocate, the double backward a Function of its own as in Python.
_CPP_FLOOR = r"""
#include <torch/extension.h>
using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct DoubleBackward : public torch::autograd::Function<DoubleBackward> {
  static variable_list forward(AutogradContext*, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor d_out,
                               Tensor cot_dq, Tensor cot_dk, Tensor cot_dv) {
    return {torch::empty_like(q), torch::empty_like(k), torch::empty_like(v), torch::empty_like(d_out),
            torch::empty_like(lse)};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "the floor has no third order");
  }
};

struct Backward : public torch::autograd::Function<Backward> {
  static variable_list forward(AutogradContext* ctx, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                               Tensor d_out) {
    ctx->save_for_backward({q, k, v, out, lse, d_out});
    return {torch::empty_like(q), torch::empty_like(k), torch::empty_like(v)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list cot) {
    auto s = ctx->get_saved_variables();
    auto r = DoubleBackward::apply(s[0], s[1], s[2], s[3], s[4], s[5], cot[0], cot[1], cot[2]);
    return {r[0], r[1], r[2], Tensor(), Tensor(), r[3]};
  }
};

struct Forward : public torch::autograd::Function<Forward> {
  static variable_list forward(AutogradContext* ctx, Tensor q, Tensor k, Tensor v) {
    auto out = torch::empty_like(q);
    auto lse = q.new_empty({q.size(0), q.size(1), q.size(2)});
    ctx->save_for_backward({q, k, v, out, lse});
    return {out, lse};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    return Backward::apply(s[0], s[1], s[2], s[3], s[4], grads[0]);
  }
};

Tensor floor_cpp(Tensor q, Tensor k, Tensor v) { return Forward::apply(q, k, v)[0]; }
"""


def cpp_floor():
    """``floor`` in C++, or None where no extension can be built here (the reason printed)."""
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline("theria_host_floor", cpp_sources=_CPP_FLOOR, functions=["floor_cpp"],
                           extra_cflags=["-O2"]).floor_cpp
    except Exception as error:  # no compiler or ninja: the column is left out
        print(f"# floor_cpp: n/a ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
        return None


def modes(attend, q, k, v, d_out):
    q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))

    def fwd():
        attend(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(attend(q_, k_, v_), (q_, k_, v_), d_out)

    def hvp():
        grads = torch.autograd.grad(attend(q_, k_, v_), (q_, k_, v_), d_out, create_graph=True)
        torch.autograd.grad(sum((g * g).sum() for g in grads), (q_, k_, v_))

    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "hvp": hvp}


def per_call_us(fn, calls: int, rounds: int = 5, sync=lambda: None) -> float:
    for _ in range(max(calls // 10, 20)):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def cuda_rows(shape, calls: int) -> None:
    """Every mode on CUDA tensors with real launches, beside the floor and SDPA's flash / math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def attend(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return attend

    q, k, v, d_out = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    impls = {"theria": sdpa_custom, "floor": floor, "floor_cpp": cpp_floor(), "flash": sdpa(SDPBackend.FLASH_ATTENTION),
             "math": sdpa(SDPBackend.MATH)}
    impls = {name: attend for name, attend in impls.items() if attend is not None}
    print(f"# per-call wall time, µs (real launches, one sync a round), B,H,T,D = {shape}, bfloat16, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'mode':8s} " + " ".join(f"{name:>8s}" for name in impls))
    for mode in ("fwd", "fwd_bwd", "hvp"):
        row = [per_call_us(modes(attend, q, k, v, d_out)[mode], calls, sync=torch.cuda.synchronize)
               if not (name == "flash" and mode == "hvp") else float("nan") for name, attend in impls.items()]
        print(f"{mode:8s} " + " ".join(f"{t:8.1f}" for t in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2,2,16,16", help="B,H,T,D (the host cost hardly depends on it)")
    parser.add_argument("--calls", type=int, default=1000, help="calls per timed round (median of 5 rounds)")
    parser.add_argument("--cuda", action="store_true", help="real launches on CUDA tensors (see above)")
    args = parser.parse_args()
    shape = tuple(map(int, args.shape.split(",")))
    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda needs a CUDA GPU")
        cuda_rows(shape, args.calls)
        return
    launch_torch.launch_one = lambda launch, tensors: None  # the host path up to the launch, no kernel
    torch.set_num_threads(1)
    q, k, v, d_out = (torch.randn(shape) for _ in range(4))
    print(f"# host time per call, µs (launches stubbed), B,H,T,D = {shape}, torch {torch.__version__}")
    floor_in_cpp = cpp_floor()
    print(f"{'mode':8s} {'theria':>8s} {'floor':>8s} {'theria/floor':>13s}"
          + (f" {'floor_cpp':>10s}" if floor_in_cpp else ""))
    ours, base = modes(sdpa_custom, q, k, v, d_out), modes(floor, q, k, v, d_out)
    in_cpp = modes(floor_in_cpp, q, k, v, d_out) if floor_in_cpp else {}
    for mode in ours:
        a, b = per_call_us(ours[mode], args.calls), per_call_us(base[mode], args.calls)
        cpp = f" {per_call_us(in_cpp[mode], args.calls):10.1f}" if in_cpp else ""
        print(f"{mode:8s} {a:8.1f} {b:8.1f} {a / b:12.2f}x{cpp}")


if __name__ == "__main__":
    main()
