"""Shared helpers for the attention tests: case generation and float64 references (the accuracy
criterion is tests/_numerics.py; tensors go on tests/_device.py's DEVICE)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from _device import DEVICE
from theria_kernels.attention import AttentionParams
from theria_torch.reference import attention_reference, varlen_attention_reference


def random_inputs(batch, heads, heads_kv, t_q, t_k, head_dim, dtype, device=DEVICE, seed=0):
    """Fresh (q, k, v), (B, H, T, D), drawn in float64 on the host and rounded to ``dtype``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    return (draw(batch, heads, t_q, head_dim), draw(batch, heads_kv, t_k, head_dim),
            draw(batch, heads_kv, t_k, head_dim))


def params_for(head_dim, causal=False, window_size=(-1, -1), bottom_right=False, softcap=0.0, alibi=False):
    return AttentionParams(scale=1 / math.sqrt(head_dim), causal=causal, window_size=window_size,
                           bottom_right=bottom_right, softcap=softcap, alibi=alibi)


# A cap at which scores ~ N(0, 1) (unit inputs at scale 1/sqrt(D)) are far from both tanh's linear
# part and its saturation, so every term of the cap's derivatives (§8) matters.
SOFTCAP = 1.5


def random_slopes(rows, heads, seed=0):
    """flash-attn's ALiBi slopes: float32 (rows, H), positive, distinct per row and head."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(rows, heads, generator=gen, dtype=torch.float32) * 0.5 + 0.1


def row_slopes(slopes: torch.Tensor, t_q: int, cu_seqlens_q=None) -> torch.Tensor:
    """The launchers' ALiBi input from (B, H) slopes: each query row's slope, (B, H, T_q) like lse; for
    a packed batch, (1, H, total_q) from (sequences, H) slopes."""
    if cu_seqlens_q is None:
        return slopes[:, :, None].expand(*slopes.shape, t_q)
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    return slopes.repeat_interleave(lengths, dim=0).T[None]


def reference_fn(params: AttentionParams, alibi_slopes=None):
    """(q, k, v) ↦ (out, lse) of the float64 torch reference with these parameters (and the ALiBi
    slopes when ``params.alibi``), lse's +inf rows (no visible key) replaced by 0 so that it can
    enter a loss."""

    def fn(q, k, v):
        out, lse = attention_reference(q, k, v, causal=params.causal, scale=params.scale,
                                       window_size=params.window_size, bottom_right=params.bottom_right,
                                       return_lse=True, softcap=params.softcap, alibi_slopes=alibi_slopes)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    return fn


@dataclass(frozen=True)
class ApiCase:
    """One attention configuration in the (B, T, H, D) layout of ``flash_attn_func`` and the JAX
    API; ``api`` picks the mask alignment: ``attention`` (like ``sdpa_custom``) top-left,
    ``flash_attn_func`` bottom-right. Test files subclass it with their own ways to run it."""

    api: str
    t_q: int
    t_k: int
    heads: int
    heads_kv: int
    head_dim: int
    causal: bool = False
    window_size: tuple[int, int] = (-1, -1)
    batch: int = 1
    softcap: float = 0.0
    alibi: bool = False  # flash_attn_func only: random (B, H) slopes (random_slopes)

    def __str__(self):
        mask = "causal" if self.causal else "window" if self.window_size != (-1, -1) else "full"
        modifiers = ("-softcap" if self.softcap else "") + ("-alibi" if self.alibi else "")
        return f"{self.api}-{mask}{modifiers}-T{self.t_q}x{self.t_k}-H{self.heads}/{self.heads_kv}-D{self.head_dim}"

    def slopes(self):
        """The case's ALiBi slopes as a float32 torch tensor (B, H) on the host, or None."""
        return random_slopes(self.batch, self.heads) if self.alibi else None

    def shapes(self):
        """(B, T, H, D) shapes of q, k, v."""
        kv = (self.batch, self.t_k, self.heads_kv, self.head_dim)
        return (self.batch, self.t_q, self.heads, self.head_dim), kv, kv


def cu_seqlens(lengths, device=DEVICE) -> torch.Tensor:
    """flash-attn's cumulative sequence lengths (int32, batch + 1 entries) of a list of lengths."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def varlen_reference_fn(params: AttentionParams, cu_seqlens_q, cu_seqlens_k, alibi_slopes=None):
    """:func:`reference_fn` for packed sequences, on the launchers' (1, H, total, D) views:
    the reference run per sequence, lse's +inf rows replaced by 0."""

    def fn(q, k, v):
        out, lse = varlen_attention_reference(
            *(t[0].transpose(0, 1) for t in (q, k, v)), cu_seqlens_q, cu_seqlens_k, causal=params.causal,
            scale=params.scale, window_size=params.window_size, bottom_right=params.bottom_right, return_lse=True,
            softcap=params.softcap, alibi_slopes=alibi_slopes)
        return out.transpose(0, 1)[None], torch.where(torch.isfinite(lse), lse, 0.0)[None]

    return fn


def poisoned(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel fails to write shows up."""
    return torch.full(shape or like.shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


def one_sweep_rows_reading_dq(monkeypatch, framework: str = "torch") -> list[bool]:
    """Force the double backward's row kernel into one sweep (``_tuning.ONE_SWEEP_OVERRIDE``: the
    interpreter's table sweeps twice) and record, for each row launch from then on, whether it was
    handed the backward's dq (its ``Dq`` argument), which it then reads for dS K (theory §4.7).
    Torch's launches are seen as they run (``launch_one``). JAX's are seen in the plans it runs
    (``theria_jax._primitives.run_plan``, at trace time): on a GPU they run as XLA's own custom
    calls, which pass through no Python. Plans are cached with the schedule they were built with:
    the caller clears them around its calls."""
    import theria_kernels.attention._tuning as tuning

    monkeypatch.setattr(tuning, "ONE_SWEEP_OVERRIDE", True)
    rows = []

    def note(launch):
        if launch.kernel.__name__ == "_attn_bwd_bwd_rows_kernel":
            rows.append(launch.arguments["Dq"] is not None)

    if framework == "jax":
        import theria_jax._primitives as primitives

        run_plan = primitives.run_plan

        def record_plan(plan, arrays):
            for launch in plan.launches:
                note(launch)
            return run_plan(plan, arrays)

        monkeypatch.setattr(primitives, "run_plan", record_plan)
        return rows
    import theria_kernels._launch_torch as launch_torch

    launch_one = launch_torch.launch_one

    def record(launch, tensors):
        note(launch)
        launch_one(launch, tensors)

    monkeypatch.setattr(launch_torch, "launch_one", record)
    return rows
