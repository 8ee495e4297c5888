"""Launch plans: every kernel call described once, by name, for every launcher.

A :class:`Plan` is what one op call runs: its launches in order, the buffers it reads (named
inputs, each with its declared dtype), the buffers it writes (named outputs the caller receives)
and the temporaries it needs between launches. Each :class:`Launch` names its kernel, its grid
and *every* kernel parameter by name: a :class:`Buffer` (a device buffer of the call), ``None``
(a pointer the specialisation never touches, passed as a constexpr), a scalar, or a constexpr
value. Plans know shapes, strides and dtypes (as names), never tensors, so they import neither
torch nor JAX and every launcher consumes the same object:

* ``theria_kernels._launch_torch``: torch tensors, the compiled kernel launched directly;
* ``theria_jax._launch``: one ``triton_kernel_call_ffi`` custom call per launch inside XLA;
* ``theria_jax._bridge``: JAX buffers as torch tensors (DLPack) through the torch launcher.

One rule makes the XLA launcher possible: in every kernel the pointers it reads come before the
pointers it writes (XLA hands a custom call its operands, then its results), which
:class:`Launch` checks when it is built.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Buffer:
    """A named device buffer of one op call: an input, an output or a temporary."""

    name: str


@dataclass(frozen=True)
class Allocation:
    """How a launcher allocates an output or temporary buffer: ``like`` an input of the plan
    (that input's shape and layout, and its dtype unless ``dtype`` is given), or, without
    ``like``, a contiguous buffer of ``shape`` and ``dtype`` (row statistics, partial sums).
    ``zeroed`` buffers start at zero (counters, absent cotangents); all others start
    uninitialised and the plan writes every element it later reads."""

    like: str | None = None
    shape: tuple[int, ...] = ()
    dtype: str | None = None
    zeroed: bool = False


_KERNEL_PARAMETERS: dict = {}


def kernel_parameters(kernel) -> tuple[tuple[str, bool], ...]:
    """(name, is_constexpr) of each parameter of a ``triton.jit`` kernel (or its interpreter
    stand-in), in declaration order."""
    found = _KERNEL_PARAMETERS.get(kernel)
    if found is None:
        fn = getattr(kernel, "fn", kernel)
        params = getattr(kernel, "params", None)
        if params is not None:
            found = tuple((p.name, bool(p.is_constexpr)) for p in params)
        else:  # the interpreter's InterpretedFunction keeps the Python function only
            found = tuple((name, "constexpr" in str(p.annotation))
                          for name, p in inspect.signature(fn).parameters.items())
        _KERNEL_PARAMETERS[kernel] = found
    return found


@dataclass(eq=False)
class Launch:
    """One kernel launch: every parameter by name, the grid, the launch options.

    Arguments:
        kernel: the ``triton.jit`` function.
        grid: programs along each grid axis (1 to 3 entries).
        arguments: parameter name -> ``Buffer``, ``None`` (an untouched pointer), scalar or
            constexpr value; every parameter of the kernel exactly once.
        writes: names of the pointer parameters the kernel writes; they must follow every
            pointer parameter it reads.
        num_warps, num_stages: Triton's launch options.
    """

    kernel: object
    grid: tuple[int, ...]
    arguments: dict
    writes: tuple[str, ...]
    num_warps: int
    num_stages: int
    # Filled in once: the argument values in parameter order, the buffers read and written, and
    # the launchers' caches of compiled kernels (keyed by what each launcher specialises on).
    values: tuple = field(init=False)
    buffer_slots: tuple[tuple[int, str], ...] = field(init=False)
    reads_buffers: tuple[str, ...] = field(init=False)
    writes_buffers: tuple[str, ...] = field(init=False)
    compiled: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        names = [name for name, _ in kernel_parameters(self.kernel)]
        given = set(self.arguments)
        if given != set(names):
            missing, extra = sorted(set(names) - given), sorted(given - set(names))
            raise TypeError(f"{getattr(self.kernel, '__name__', self.kernel)}: missing arguments {missing}, "
                            f"unknown arguments {extra}")
        self.grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
        self.values = tuple(self.arguments[name] for name in names)
        self.buffer_slots = tuple((i, v.name) for i, v in enumerate(self.values) if isinstance(v, Buffer))
        pointers = [(name, value.name) for name, value in zip(names, self.values) if isinstance(value, Buffer)]
        written = [name in self.writes for name, _ in pointers]
        if written != sorted(written):
            raise TypeError(f"{getattr(self.kernel, '__name__', self.kernel)}: the pointers it writes "
                            f"({', '.join(self.writes)}) must follow the pointers it reads")
        self.reads_buffers = tuple(buffer for (name, buffer), w in zip(pointers, written) if not w)
        self.writes_buffers = tuple(buffer for (name, buffer), w in zip(pointers, written) if w)


@dataclass(eq=False)
class Plan:
    """One op call: ``launches`` run in order on the caller's ``inputs`` (name -> dtype name, as
    the plan's builder declares them: the call's dtype for q-like tensors, the statistic dtype for
    row statistics, int32 for offsets); every buffer in ``allocations`` is written by some launch
    (or starts zeroed), and those named in ``outputs`` are returned (in that order); the rest are
    temporaries. When any input named in ``skip_if_empty`` has no elements nothing is launched and
    every output is zero."""

    inputs: dict[str, str]
    outputs: tuple[str, ...]
    allocations: dict
    launches: tuple[Launch, ...]
    skip_if_empty: tuple[str, ...] = ("q",)
    # What a launcher derives from the plan once and reuses on every call, under the launcher's
    # own key (as ``Launch.compiled``).
    launcher_cache: dict = field(default_factory=dict, repr=False)

    @functools.cached_property
    def buffer_dtypes(self) -> dict[str, str]:
        """The dtype name of every buffer the plan touches: its inputs as declared, each allocation
        its own dtype or that of the input it is ``like``."""
        dtypes = dict(self.inputs)
        dtypes.update((name, spec.dtype or self.inputs[spec.like]) for name, spec in self.allocations.items())
        return dtypes


_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int32": "i32"}


def compile_for_target(launch: Launch, dtypes: dict[str, str], capability: int):
    """``launch``'s kernel compiled by Triton's own compiler for sm_``capability`` (no GPU needed),
    specialised as ``JITFunction.run`` specialises it for 16-byte-aligned buffers (XLA's buffers
    are; the torch launcher keys its own compilations by alignment). ``dtypes`` names the dtype of
    every buffer the launch reads or writes. Returns Triton's ``CompiledKernel`` and the
    specialisation, one ``(kind, value)`` per kernel parameter (kind ``"constexpr"`` for those
    compiled in, else the Triton type the launcher passes); the JAX launcher takes the PTX and the
    specialisation, the tile-table check the cubin.

    Needs the compiled kernels: in a process whose Triton runs the interpreter (TRITON_INTERPRET set
    before triton was imported) the kernels are not ``JITFunction`` s and this raises.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import native_specialize_impl

    kernel = launch.kernel
    if not hasattr(kernel, "params"):
        raise RuntimeError(f"{kernel}: Triton's interpreter is on (TRITON_INTERPRET); compile in a process without it")
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    parameters = kernel_parameters(kernel)
    specialization = []
    for (_, is_constexpr), param, value in zip(parameters, kernel.params, launch.values):
        if is_constexpr or value is None:
            specialization.append(("constexpr", value))
        elif isinstance(value, Buffer):
            specialization.append((f"*{_TRITON_TYPES[dtypes[value.name]]}", "D"))
        elif isinstance(param.annotation_type, str) and param.annotation_type:
            specialization.append((param.annotation_type, None))  # floats are never specialised
        else:
            specialization.append(native_specialize_impl(backend, value, False, True, True))
    bound = dict(zip((name for name, _ in parameters), launch.values))
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, dict(num_warps=launch.num_warps, num_stages=launch.num_stages), bound, specialization, None)
    compiled = triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled, tuple(specialization)
