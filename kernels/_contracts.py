"""Contracts both adapters share: attention's parameters, argument checks, error messages and
defaults. Framework-neutral (no torch, no jax): shapes arrive as tuples and dtypes as names
(``"bfloat16"``), so the torch and JAX adapters raise the same words for the same mistake.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from dataclasses import dataclass


# Stands for an unbounded window side: far beyond any sequence length, far from int32 overflow.
UNBOUNDED = 1 << 30
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256


@dataclass(frozen=True)
class AttentionParams:
    """Static description of one attention call (hashable, so JAX can treat it as static).

    ``window_size`` has flash-attn's meaning: key ``j`` is visible to query ``i`` when
    ``-left <= j - i - shift <= right`` (``-1`` = unbounded); ``causal`` sets ``right = 0``.
    ``shift = T_k - T_q`` when ``bottom_right`` (flash-attn ≥ 2.1) else 0 (torch SDPA, JAX).

    Score modifiers (flash-attn's ``flash_attn_func``; docs/theory/attention_derivatives.md §8):
    ``softcap > 0`` replaces the scaled score ``s`` by ``softcap · tanh(s / softcap)`` (0 = off);
    ``alibi`` says the call carries ALiBi slopes (an input buffer, one per sequence and query head),
    which add ``-slope · |i + shift - j|`` to the capped score.
    """

    scale: float
    causal: bool = False
    window_size: tuple[int, int] = (-1, -1)
    bottom_right: bool = False
    softcap: float = 0.0
    alibi: bool = False

    def diagonal_band(self, t_q: int, t_k: int) -> tuple[int, int]:
        """(lo, hi) such that key j is visible to query i iff i + lo <= j <= i + hi."""
        left, right = self.window_size
        if self.causal:
            right = 0
        shift = t_k - t_q if self.bottom_right else 0
        lo = shift - left if left >= 0 else -UNBOUNDED
        hi = shift + right if right >= 0 else UNBOUNDED
        return lo, hi

    @property
    def banded(self) -> bool:
        return self.causal or self.window_size != (-1, -1)


SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")
BACKENDS = ("triton_full_fused", "reference")


def validate_attention_args(q_shape, k_shape, v_shape, dtypes, *, layout: str, backend: str,
                            window_size=(-1, -1)) -> None:
    """Framework-neutral checks shared by the torch and JAX adapters, so both raise the same
    messages. Shapes are tuples in the caller's ``layout`` ("(B, H, T, D)", "(B, T, H, D)", or
    "(total, H, D)" for packed variable-length batches), dtypes are the names of q's, k's and v's
    dtypes."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    axes = layout.strip("()").split(", ")
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != len(axes):
            raise ValueError(f"{name} must have {len(axes)} dimensions {layout}, got shape {tuple(shape)}")
    if tuple(k_shape) != tuple(v_shape):
        raise ValueError(f"k and v must have the same shape, got k {tuple(k_shape)} and v {tuple(v_shape)}")
    head_axis = axes.index("H")
    if "B" in axes and q_shape[0] != k_shape[0]:
        raise ValueError(f"q has batch size {q_shape[0]} but k and v have {k_shape[0]}; they must match")
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(f"q has head dim {q_shape[-1]} but k and v have {k_shape[-1]}; they must match")
    heads, heads_kv = q_shape[head_axis], k_shape[head_axis]
    if heads_kv == 0 or heads % heads_kv:
        raise ValueError(
            f"q has {heads} heads and k, v have {heads_kv}: the query heads must be a multiple of the "
            f"key/value heads (grouped-query attention); check the {layout} layout")
    if len(set(dtypes)) != 1:
        raise TypeError(f"q, k, v must share one dtype, got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}; cast them to one")
    validate_window_size(window_size)
    # Every backend: the reference's matmuls take no other dtype either (integers fail deep inside
    # torch or jax.numpy with a message that names neither the argument nor the fix).
    if dtypes[0] not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {dtypes[0]}; {backend} supports {', '.join(SUPPORTED_DTYPES)}; "
                        "cast q, k and v to one of them (e.g. float32)")
    if backend == "reference":
        return
    head_dim = q_shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {head_dim}; {backend} supports {MIN_HEAD_DIM}–{MAX_HEAD_DIM}; "
                         "use backend='reference'")


def validate_dropout(dropout_p: float) -> None:
    """flash-attn's signatures carry ``dropout_p``; theria has no dropout, so only 0.0 passes."""
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p}: theria's attention has no dropout; pass dropout_p=0.0")


# Raised by both frameworks' batching rules when vmap maps over the cu_seqlens themselves.
VMAP_CU_SEQLENS_ERROR = (
    "vmap over cu_seqlens is not supported: every vmapped instance must share cu_seqlens_q and "
    "cu_seqlens_k; pack the instances' sequences into one batch (concatenate them and their cu_seqlens) instead"
)


def validate_cu_seqlens(cu_q_shape, cu_k_shape, cu_dtypes, max_seqlen_q, max_seqlen_k) -> None:
    """Framework-neutral checks of the varlen arguments that need no host read (shapes, dtypes,
    the max lengths' types), shared by the launchers and both adapters."""
    for name, shape, dtype in (("cu_seqlens_q", cu_q_shape, cu_dtypes[0]), ("cu_seqlens_k", cu_k_shape, cu_dtypes[1])):
        if len(shape) != 1 or shape[0] == 0:
            raise ValueError(f"{name} must be 1-D with batch + 1 entries, got shape {tuple(shape)}")
        if dtype != "int32":
            raise TypeError(f"{name} must be int32 (flash-attn's cu_seqlens), got {dtype}")
    if cu_q_shape[0] != cu_k_shape[0]:
        raise ValueError(f"cu_seqlens_q has {cu_q_shape[0]} entries and cu_seqlens_k has {cu_k_shape[0]}; "
                         "both must have batch + 1")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a Python int >= 0 (it sizes the launch grid), got {value!r}")


def validate_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k) -> None:
    """Checks of the cu_seqlens values, read to the host by the caller (sequences of ints): each
    starts at 0, never decreases and ends at its tensor's token count, and no sequence is longer
    than its max_seqlen (the kernels would silently skip its tail)."""
    for name, values, total, owner, max_seqlen in (
            ("cu_seqlens_q", cu_seqlens_q, total_q, "q has", max_seqlen_q),
            ("cu_seqlens_k", cu_seqlens_k, total_k, "k and v have", max_seqlen_k)):
        values = [int(x) for x in values]
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        lengths = [b - a for a, b in zip(values, values[1:])]
        for index, length in enumerate(lengths):
            if length < 0:
                raise ValueError(f"{name} must be non-decreasing, but entry {index + 1} ({values[index + 1]}) is "
                                 f"less than entry {index} ({values[index]})")
        if values[-1] != total:
            raise ValueError(f"{name} ends at {values[-1]} but {owner} {total} tokens (dimension 0); "
                             "its last entry must be the total")
        longest = max(lengths, default=0)
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen_{name[-1]}={max_seqlen} but sequence {lengths.index(longest)} of {name} "
                             f"has {longest} tokens; pass at least the longest length")



# Programs assumed per launch wave when there is no GPU to ask (the interpreter runs programs one
# after another, so the number only shapes the grouped-query split, alike in both frameworks).
INTERPRETER_MULTIPROCESSORS = 4


def dtype_name(dtype) -> str:
    """``torch.bfloat16``, ``jnp.bfloat16`` and ``np.dtype("bfloat16")`` alike -> ``"bfloat16"``."""
    name = getattr(dtype, "name", None)
    if isinstance(name, str):  # numpy and JAX dtypes
        return name
    if isinstance(dtype, type):  # scalar types such as jnp.bfloat16 or np.float64
        return dtype.__name__
    return str(dtype).removeprefix("torch.")


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_scale(head_dim: int, scale=None) -> float:
    """The softmax scale: ``1 / sqrt(head_dim)`` when ``scale`` is None (torch SDPA, flash-attn,
    jax.nn), else ``scale`` as a float."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def row_stat_dtype_name(dtype_name: str) -> str:
    """dtype of lse and the other per-row statistics: float32, or float64 for float64 inputs."""
    return "float64" if dtype_name == "float64" else "float32"


# Same words in both adapters for the same limit.
THIRD_ORDER_ERROR = (
    "third-order derivatives of attention are not implemented by backend='triton_full_fused' "
    "(it provides forward, backward, JVP, double backward and second-order forward); use backend='reference'"
)


def validate_window_size(window_size) -> tuple[int, int]:
    """``window_size`` as a pair of Python ints, or an error: a bool is an int to Python but never a
    window side here, and a non-int would reach the kernels' integer arithmetic."""
    try:
        pair = tuple(window_size)
    except TypeError:
        pair = ()
    if len(pair) != 2 or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in pair):
        raise TypeError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {window_size!r}; "
                        "pass e.g. (128, 0) or (-1, -1)")
    if any(w < -1 for w in pair):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {window_size!r}")
    return int(pair[0]), int(pair[1])


def validate_scale(scale, name: str = "scale") -> None:
    """``scale`` (``softmax_scale`` in flash-attn's signatures) is None or a finite real number. It is
    static (it specialises the kernels), so arrays and strings are refused rather than converted."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a Python float or None (= 1/sqrt(head dim)), got "
                        f"{type(scale).__name__} {scale!r}; pass a number, e.g. {name}=0.125")
    if not math.isfinite(scale):
        raise ValueError(f"{name} must be finite, got {scale!r}")


def validate_softcap(softcap, name: str = "softcap") -> float:
    """``softcap`` as a float: 0 (off, flash-attn's default) or a finite positive number. Static like
    ``scale`` (it specialises the kernels), so arrays and strings are refused rather than converted;
    a negative cap, which flash-attn silently ignores, is refused rather than read as off."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"{name} must be a Python float (0.0 = off), got {type(softcap).__name__} {softcap!r}; "
                        f"pass a number, e.g. {name}=50.0 (Gemma-2's attn_logit_softcapping)")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0.0 = off), got {softcap!r}")
    return float(softcap)


ALIBI_DTYPES = ("float32", "float64")


def validate_alibi_slopes(shape, dtype: str, batch: int, heads: int, *, batch_name: str = "batch size",
                          name: str = "alibi_slopes") -> None:
    """``alibi_slopes`` (flash-attn's ALiBi) is (H,) or (B, H) of floats, H the query heads and B
    the batch size (the number of sequences for varlen calls)."""
    shape = tuple(shape)
    if shape not in ((heads,), (batch, heads)):
        raise ValueError(f"{name} must have shape (nheads,) = ({heads},) or ({batch_name}, nheads) = ({batch}, {heads}), "
                         f"got {shape}")
    if dtype not in ALIBI_DTYPES:
        raise TypeError(f"{name} must be float32 (flash-attn's ALiBi slopes) or float64, got {dtype}")


def validate_causal(causal) -> None:
    """``causal`` is a bool (or 0, 1, a NumPy bool): anything else (a string, an array) would be read
    by its truth value."""
    numpy_bool = (type(causal).__module__ == "numpy" and str(getattr(causal, "dtype", "")) == "bool"
                  and getattr(causal, "ndim", 1) == 0)
    if not (isinstance(causal, bool) or numpy_bool or (isinstance(causal, numbers.Integral) and causal in (0, 1))):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}; pass causal=True or False")


def array_type_error(name: str, value, framework: str) -> TypeError:
    """The error for an argument that is not an array of ``framework`` (``"torch"`` or ``"jax"``),
    naming the conversion that fits what was passed. Built from type names, so this module
    imports neither framework."""
    kind = type(value)
    got = f"{kind.__module__.split('.')[0]}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__name__
    from_torch = got.startswith("torch.")
    from_jax = got.startswith(("jax.", "jaxlib."))
    if framework == "torch":
        expected = "a torch.Tensor"
        convert = (f"torch.from_dlpack({name})" if from_jax else f"torch.from_numpy({name})"
                   if got.startswith("numpy.") else f"torch.as_tensor({name})")
    else:
        expected = "a jax.Array (or a NumPy array)"
        convert = f"jax.dlpack.from_dlpack({name})" if from_torch else f"jnp.asarray({name})"
    return TypeError(f"{name} must be {expected}, got {got}; convert it first, e.g. {convert}")


def interpreter_compute_dtype(dtype_name: str, backend: str) -> str:
    """The dtype the fused kernels run in for inputs of ``dtype_name``: their own, except bfloat16
    under Triton's interpreter, which runs in float32 (the caller casts the results back).

    Why: the interpreter holds bfloat16 tiles as their raw 16-bit patterns (numpy has no bfloat16)
    and its ``tl.dot`` multiplies those patterns as integers, giving values around 1e9 with no error.
    Every bfloat16 value is exact in float32, so the float32 kernels on the inputs, rounded back to
    bfloat16 by the framework, give the bfloat16 result to within bfloat16's rounding. The bfloat16
    kernels themselves run, and are tested, on the GPU only."""
    if dtype_name == "bfloat16" and backend == "triton_full_fused" and is_interpreter():
        return "float32"
    return dtype_name


INTERPRETER_TOO_LATE_ERROR = (
    "TRITON_INTERPRET=1 was set after triton was imported: Triton reads it once, when it is imported, "
    "so its kernels were built for a GPU and cannot run on the CPU. Set TRITON_INTERPRET=1 before "
    "importing theria or triton (in the shell: TRITON_INTERPRET=1 python ..., or os.environ at the top "
    "of the script), or use backend='reference'"
)


def check_interpreter_in_time() -> None:
    """Raises ``RuntimeError(INTERPRETER_TOO_LATE_ERROR)`` when ``TRITON_INTERPRET`` is on now but
    triton was imported while it was off. ``triton.jit`` picks the interpreter or the compiler when it
    decorates a function, so triton's own library functions, decorated at its import, show which
    was picked; kernels launched on CPU data in that state fail with "0 active drivers". Call it
    only on the CPU path: on the GPU compiled kernels are what is wanted."""
    if not is_interpreter():
        return
    standard = sys.modules.get("triton.language.standard")
    if standard is None:  # triton not imported yet: it will read the variable when it is
        return
    from triton.runtime.interpreter import InterpretedFunction

    probe = getattr(standard, "sigmoid", None)
    if probe is not None and not isinstance(probe, InterpretedFunction):
        raise RuntimeError(INTERPRETER_TOO_LATE_ERROR)
