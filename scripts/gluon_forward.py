"""A warp-specialised attention forward for Hopper (sm_90) in Gluon, Triton's lower-level
language: FlashAttention-3's schedule written out, measured against theria's Triton forward by
scripts/ab_forward_hopper.py (docs/perf-notes.md items 42 and 43). Not part of the library: no
launcher takes it, it has no derivatives, and where it was timed it was no faster than theria's
forward.

Triton 3.6 compiles theria's forward (kernels/attention/forward.py) as one instruction stream:
every warp loads, multiplies and runs the softmax in turn, and its warp-specialisation pass does
not take on the online softmax's loop. Gluon states the schedule instead:

- a loader partition (one warp, few registers) brings the query block once and each key block's
  K and V through the tensor memory accelerator into a ring of STAGES shared-memory slots, each
  slot guarded by an mbarrier its consumers release;
- one, two or three consumer partitions (a warpgroup of 64 query rows each, with the registers the
  loader gave up): independent instruction streams, so that one consumer's softmax runs on the
  ALUs while another's products run on the tensor cores; with PINGPONG they take turns issuing
  their products (FlashAttention-3's ping-pong); within a consumer the next key block's Q Kᵀ is
  issued with this block's P V, and the next softmax runs while P V does (FlashAttention-3's
  intra-warpgroup overlap).

The grid is persistent by default: as many programs as the GPU runs at once, each taking work
items (a query block of one head) in turn, with the loader running on into the next item's query
rows and key blocks while the consumers finish this one's last products and stores (one program
per item is the other choice).

It computes theria's forward without tangents: out and the natural-log lse per row, the softmax
in float32, P rounded to the input's 16-bit type for P V. Inputs: bf16 or fp16 (B, H, T, D) views
with any strides and a contiguous head dim (16-byte aligned, as TMA asks), T_q = T_k of any
length, grouped-query heads, no mask or a top-left causal one, head dims 64 and 128. Keys past the
sequence arrive as zeros and are masked; query rows past it are computed and not stored.

    python scripts/gluon_forward.py            # compile for sm_90 on any machine, print resources
    python scripts/gluon_forward.py 64 --json  # the same for head dim 64, one JSON line per mask
"""

from __future__ import annotations

import math
import sys

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)


@gluon.jit
def _tile(tile, t_len, heads, m_blocks, BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """(start_m, batch, head, key blocks) of work item ``tile``: query block tile % m_blocks of
    (batch · heads + head) = tile // m_blocks, so that neighbouring items share a head's K and V in
    L2. Causal items take a head's query blocks last first: the longest key ranges start first, and
    the short ones fill the end (as theria's banded row programs do, docs/perf-notes.md item 32)."""
    block = tile % m_blocks
    if CAUSAL:
        block = m_blocks - 1 - block
    start_m = block * BLOCK
    blocks = gl.cdiv(t_len, BLOCK_N)
    if CAUSAL:
        n_blocks = gl.minimum(gl.cdiv(start_m + BLOCK, BLOCK_N), blocks)
    else:
        n_blocks = blocks
    return start_m, tile // m_blocks // heads, tile // m_blocks % heads, n_blocks


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free, t_len, heads,
            group, n_tiles, m_blocks, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
            CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr):
    """For each work item of this program (``_tile``): each consumer's rows of the query block once
    the consumer has released the previous item's, then each key block's K and V into the ring's
    next slot once every consumer has released the slot's previous occupant (K and V on barriers of
    their own, so that Q Kᵀ may start before V lands). The ring runs on across items, so the next
    item's loads overlap this one's last products and stores. The descriptors are (B, H, T, D):
    rows past the sequence arrive as zeros."""
    it = 0  # key blocks loaded so far: the ring's position
    count = 0  # items loaded so far: the query barriers' phase
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        start_m, batch, head, n_blocks = _tile(tile, t_len, heads, m_blocks, CONSUMERS * ROWS, BLOCK_N, CAUSAL)
        kv_head = head // group
        for c in gl.static_range(CONSUMERS):
            # A new barrier counts as having completed the phase before its first: the first
            # item's waits pass at once, here and for the ring's first lap.
            mbarrier.wait(q_free.index(c), (count & 1) ^ 1)
            mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [batch, head, start_m + c * ROWS, 0], q_ready.index(c),
                                            q_bufs.index(c))
        for j in range(n_blocks):
            slot = (it + j) % STAGES
            mbarrier.wait(kv_free.index(slot), (((it + j) // STAGES) & 1) ^ 1)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [batch, kv_head, j * BLOCK_N, 0], k_ready.index(slot),
                                            k_bufs.index(slot))
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [batch, kv_head, j * BLOCK_N, 0], v_ready.index(slot),
                                            v_bufs.index(slot))
        it += n_blocks
        count += 1


@gluon.jit
def _softmax_step(s, m_i, l_i, row0, start_n, t_len, qk_scale, s_layout: gl.constexpr, ROWS: gl.constexpr,
                  BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """One key block of the online softmax in base 2: (p, alpha, m, l) with P unnormalised, alpha
    the previous rows' rescale, m the running maximum in base-2 units; −∞ past the sequence's keys
    and above the diagonal where CAUSAL and the block reaches it. The scale stays out of the score
    tile: the maximum of the raw scores times the scale is the maximum of the scaled ones (scale >
    0), and each exponent is one fused multiply-add. A row that has seen no key keeps m = −∞ and
    shifts by 0 (exp2 stays finite)."""
    if start_n + BLOCK_N > t_len:  # the last key block, past the sequence's keys (zeros from TMA)
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < t_len, 0), s, float("-inf"))
    if CAUSAL:
        if start_n + BLOCK_N > row0 + 1:
            rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(rows, 1) >= gl.expand_dims(cols, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    shift = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - shift)
    p = gl.exp2(s * qk_scale - gl.expand_dims(shift, 1))
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _take_turn(turns, k, INDEX: gl.constexpr, PINGPONG: gl.constexpr):
    """With PINGPONG, wait until the consumer before this one has issued its products of step k:
    the consumers' products take turns on the tensor cores, so that one consumer's softmax
    overlaps another's products (FlashAttention-3's ping-pong, which the warp scheduler alone
    does not keep to)."""
    if PINGPONG:
        mbarrier.wait(turns.index(INDEX), k & 1)


@gluon.jit
def _pass_turn(turns, INDEX: gl.constexpr, CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turns.index((INDEX + 1) % CONSUMERS))


@gluon.jit
def _consumer(q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free, turns, out_ptr, lse_ptr, stride_ob,
              stride_oh, stride_ot, t_len, heads, n_tiles, m_blocks, qk_scale, INDEX: gl.constexpr,
              ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr):
    """Consumer INDEX's ROWS rows (one warpgroup) of each work item's query block (``_tile``): the
    online softmax over every key block, then out and lse stored (rows past the sequence left
    alone). Per key block j it issues Q K_{j+1}ᵀ and P_j V_j before waiting for the first of them,
    so the tensor cores have the next product while the ALUs run the softmax; the slot of block j
    is released once P_j V_j is done, the query rows once the last Q Kᵀ is."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_bufs.dtype
    # The TMA boxes are (1, 1, rows, D); the products take them as (rows, D).
    q_smem = q_bufs.index(INDEX).reshape([ROWS, HEAD_DIM])
    zeros_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    it = 0  # key blocks consumed so far: the ring's position, as the loader counts it
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        start_m, batch, head, n_blocks = _tile(tile, t_len, heads, m_blocks, CONSUMERS * ROWS, BLOCK_N, CAUSAL)
        count = (tile - gl.program_id(0)) // gl.num_programs(0)  # items before this one: the query barrier's phase
        turn = it + count  # products issued before this item (n_blocks + 1 an item): the ping-pong's phase
        row0 = start_m + INDEX * ROWS
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)

        mbarrier.wait(q_ready.index(INDEX), count & 1)
        mbarrier.wait(k_ready.index(it % STAGES), (it // STAGES) & 1)
        k_smem = k_bufs.index(it % STAGES).reshape([BLOCK_N, HEAD_DIM])
        _take_turn(turns, turn, INDEX, PINGPONG)
        s = warpgroup_mma(q_smem, k_smem.permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        _pass_turn(turns, INDEX, CONSUMERS, PINGPONG)
        s, _, _ = warpgroup_mma_wait(0, deps=(s, q_smem, k_smem))
        # The first block's rescale has nothing to rescale (and `_` would be a loop-carried name).
        p, unused, m_i, l_i = _softmax_step(s, m_i, l_i, row0, 0, t_len, qk_scale, s_layout, ROWS, BLOCK_N, CAUSAL)
        for j in range(n_blocks - 1):
            slot = (it + j) % STAGES
            following = (it + j + 1) % STAGES
            mbarrier.wait(k_ready.index(following), ((it + j + 1) // STAGES) & 1)
            k_smem = k_bufs.index(following).reshape([BLOCK_N, HEAD_DIM])
            mbarrier.wait(v_ready.index(slot), ((it + j) // STAGES) & 1)
            v_smem = v_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM])
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            _take_turn(turns, turn + j + 1, INDEX, PINGPONG)
            s = warpgroup_mma(q_smem, k_smem.permute((1, 0)), zeros_s, use_acc=False, is_async=True)
            acc = warpgroup_mma(p_op, v_smem, acc, is_async=True)
            _pass_turn(turns, INDEX, CONSUMERS, PINGPONG)
            # Groups finish in issue order: one outstanding means the scores are in.
            s, _, _ = warpgroup_mma_wait(1, deps=(s, q_smem, k_smem))
            p, alpha_next, m_i, l_i = _softmax_step(s, m_i, l_i, row0, (j + 1) * BLOCK_N, t_len, qk_scale, s_layout,
                                                    ROWS, BLOCK_N, CAUSAL)
            acc, _ = warpgroup_mma_wait(0, deps=(acc, v_smem))
            mbarrier.arrive(kv_free.index(slot))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha_next, o_rows), 1)
        # Every Q Kᵀ of the item is done: the loader may bring the next item's rows.
        mbarrier.arrive(q_free.index(INDEX))
        last = (it + n_blocks - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((it + n_blocks - 1) // STAGES) & 1)
        v_smem = v_bufs.index(last).reshape([BLOCK_N, HEAD_DIM])
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        _take_turn(turns, turn + n_blocks, INDEX, PINGPONG)
        acc = warpgroup_mma(p_op, v_smem, acc, is_async=True)
        _pass_turn(turns, INDEX, CONSUMERS, PINGPONG)
        acc, _ = warpgroup_mma_wait(0, deps=(acc, v_smem))
        mbarrier.arrive(kv_free.index(last))
        it += n_blocks

        # A row that saw no key stores zeros and lse +∞ (forward.py's rule); no row does here, where
        # every row sees its own key, but rows past the sequence are never stored.
        l_o = gl.convert_layout(l_i, o_rows)
        norm = gl.where(l_o == 0.0, 1.0, l_o)
        out = acc / gl.expand_dims(norm, 1)
        rows = row0 + gl.arange(0, ROWS, layout=o_rows)
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        inside = gl.expand_dims(rows < t_len, 1) & gl.expand_dims(cols < HEAD_DIM, 0)
        out_base = batch.to(gl.int64) * stride_ob + head.to(gl.int64) * stride_oh
        offsets = out_base + gl.expand_dims(rows, 1).to(gl.int64) * stride_ot + gl.expand_dims(cols, 0)
        gl.store(out_ptr + offsets, out.to(dtype), mask=inside)
        m_o = gl.convert_layout(m_i, o_rows)
        lse = gl.where(l_o == 0.0, float("inf"), (m_o + gl.log2(norm)) / 1.4426950408889634)
        lse_base = (batch * heads + head).to(gl.int64) * t_len
        gl.store(lse_ptr + lse_base + rows, lse, mask=rows < t_len)


@gluon.jit
def _default_consumer(q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free, turns, out_ptr, lse_ptr,
                      stride_ob, stride_oh, stride_ot, t_len, heads, n_tiles, m_blocks, qk_scale, ROWS: gl.constexpr,
                      BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                      CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr):
    """The default partition, consumer 0; warp_specialize wants a tuple back from it."""
    _consumer(q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free, turns, out_ptr, lse_ptr, stride_ob,
              stride_oh, stride_ot, t_len, heads, n_tiles, m_blocks, qk_scale, 0, ROWS, BLOCK_N, HEAD_DIM, STAGES,
              CAUSAL, CONSUMERS, PINGPONG)
    return ()


@gluon.jit
def _attn_fwd_hopper_kernel(q_desc, k_desc, v_desc, out_ptr, lse_ptr, stride_ob, stride_oh, stride_ot, t_len, heads,
                            batch_heads, group, sm_scale, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                            HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                            CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                            PINGPONG: gl.constexpr):
    """One-dimensional grid of any size up to the number of work items, cdiv(T, CONSUMERS · ROWS) ·
    B · heads: each program takes items program_id, program_id + grid, ... (``_tile``), so a grid
    of one program per item is the classic launch and a grid the size of the GPU is persistent.
    q_desc, k_desc, v_desc: (B, H, T, D) descriptors (any strides, 16-byte aligned) with boxes
    (1, 1, ROWS, D) and (1, 1, BLOCK_N, D); out strided like q's strides given; lse (B, H, T)
    float32 contiguous. batch_heads = B · heads; group = query heads per key/value head."""
    dtype: gl.constexpr = q_desc.dtype
    m_blocks = gl.cdiv(t_len, CONSUMERS * ROWS)
    n_tiles = m_blocks * batch_heads
    qk_scale = sm_scale * 1.4426950408889634

    q_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS, 1, 1, ROWS, HEAD_DIM], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(CONSUMERS):
        mbarrier.init(q_ready.index(c), count=1)
        mbarrier.init(q_free.index(c), count=1)
        mbarrier.init(turns.index(c), count=1)
    for slot in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(slot), count=1)
        mbarrier.init(v_ready.index(slot), count=1)
        mbarrier.init(kv_free.index(slot), count=CONSUMERS)  # one arrival from each consumer
    fence_async_shared()
    if PINGPONG:  # consumer 0's first products go first
        mbarrier.arrive(turns.index(0))

    # The argument tuples are written out in the calls: a tuple assigned to a name first would
    # turn its constexprs into tensors. Partitions are listed statically, one call per count.
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_default_consumer, (q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free, turns, out_ptr,
                                 lse_ptr, stride_ob, stride_oh, stride_ot, t_len, heads, n_tiles, m_blocks, qk_scale,
                                 ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, CONSUMERS, PINGPONG)),
            (_loader, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free,
                       t_len, heads, group, n_tiles, m_blocks, ROWS, BLOCK_N, STAGES, CONSUMERS, CAUSAL)),
        ], [1], [LOADER_REGS])
    elif CONSUMERS == 2:
        gl.warp_specialize([
            (_default_consumer, (q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free, turns, out_ptr,
                                 lse_ptr, stride_ob, stride_oh, stride_ot, t_len, heads, n_tiles, m_blocks, qk_scale,
                                 ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, CONSUMERS, PINGPONG)),
            (_consumer, (q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free, turns, out_ptr, lse_ptr,
                         stride_ob, stride_oh, stride_ot, t_len, heads, n_tiles, m_blocks, qk_scale, 1, ROWS, BLOCK_N,
                         HEAD_DIM, STAGES, CAUSAL, CONSUMERS, PINGPONG)),
            (_loader, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free,
                       t_len, heads, group, n_tiles, m_blocks, ROWS, BLOCK_N, STAGES, CONSUMERS, CAUSAL)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.static_assert(CONSUMERS == 3, "one, two or three consumers")
        gl.warp_specialize([
            (_default_consumer, (q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free, turns, out_ptr,
                                 lse_ptr, stride_ob, stride_oh, stride_ot, t_len, heads, n_tiles, m_blocks, qk_scale,
                                 ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, CONSUMERS, PINGPONG)),
            (_consumer, (q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free, turns, out_ptr, lse_ptr,
                         stride_ob, stride_oh, stride_ot, t_len, heads, n_tiles, m_blocks, qk_scale, 1, ROWS, BLOCK_N,
                         HEAD_DIM, STAGES, CAUSAL, CONSUMERS, PINGPONG)),
            (_consumer, (q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free, turns, out_ptr, lse_ptr,
                         stride_ob, stride_oh, stride_ot, t_len, heads, n_tiles, m_blocks, qk_scale, 2, ROWS, BLOCK_N,
                         HEAD_DIM, STAGES, CAUSAL, CONSUMERS, PINGPONG)),
            (_loader, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_free, k_ready, v_ready, kv_free,
                       t_len, heads, group, n_tiles, m_blocks, ROWS, BLOCK_N, STAGES, CONSUMERS, CAUSAL)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])


# (ROWS, BLOCK_N, STAGES, CONSUMERS, consumer registers, PINGPONG) per head dim: a consumer is one
# warpgroup's 64 rows. The fastest of scripts/ab_forward_hopper.py's candidates on the H200
# (docs/perf-notes.md items 42 and 43); three consumers (FlashAttention-3's 192-row block at head
# dim 64) were slower, and at 128 keys a block they spill; one consumer, two programs a
# multiprocessor, was level at D64 and slower at D128. At D128 the ping-pong is level without a
# mask (persistent 1.027 / 1.047 ms against 1.022 / 1.028) and 9 % faster causal.
TILES = {64: (64, 128, 3, 2, 240, False), 128: (64, 128, 2, 2, 240, True)}
LOADER_REGS = 24


def programs_per_sm(consumers: int) -> int:
    """Programs a multiprocessor runs at once: two of one consumer (``launch_options``), else one
    (two or three consumers take more than half the shared memory or the registers)."""
    return 2 if consumers == 1 else 1


def launch_options(consumers: int) -> dict:
    """One consumer: a program is 8 warps (its warpgroup, the loader's warp rounded up to one),
    capped at 128 registers a thread so that two programs share a multiprocessor, as theria's
    4-warp forward programs do; setmaxnreg then gives the consumer what the loader does not use."""
    return {"maxnreg": 128} if consumers == 1 else {}


def descriptor_layouts(head_dim: int, block_n: int, rows: int):
    """The shared-memory layouts of a consumer's query rows and of the key/value blocks, boxes
    (1, 1, rows, D) of (B, H, T, D) tensors (what host descriptors and the kernel's signature
    carry)."""
    q_layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], gl.bfloat16)
    kv_layout = gl.NVMMASharedLayout.get_default_for([1, 1, block_n, head_dim], gl.bfloat16)
    return q_layout, kv_layout


def compile_for_hopper(head_dim: int, causal: bool, tile: tuple | None = None, dtype: str = "bf16"):
    """The kernel compiled by Triton's compiler for sm_90 (no GPU needed) as the probe launches it
    (``tile`` = (ROWS, BLOCK_N, STAGES, CONSUMERS, consumer registers, PINGPONG), by default
    ``TILES[head_dim]``; 16-byte-aligned out and lse): Triton's ``CompiledKernel``, whose cubin
    and PTX the compile check reads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    rows, block_n, stages, consumers, registers, pingpong = tile or TILES[head_dim]
    q_layout, kv_layout = descriptor_layouts(head_dim, block_n, rows)
    describe = lambda box, layout: f"tensordesc<{dtype}[1, 1, {box}, {head_dim}],{layout!r}>"  # noqa: E731
    signature = {"q_desc": describe(rows, q_layout), "k_desc": describe(block_n, kv_layout),
                 "v_desc": describe(block_n, kv_layout), "out_ptr": f"*{dtype}", "lse_ptr": "*fp32",
                 "stride_ob": "i32", "stride_oh": "i32", "stride_ot": "i32", "t_len": "i32", "heads": "i32",
                 "batch_heads": "i32", "group": "i32", "sm_scale": "fp32"}
    constexprs = dict(ROWS=rows, BLOCK_N=block_n, HEAD_DIM=head_dim, STAGES=stages, CAUSAL=causal,
                      CONSUMERS=consumers, CONSUMER_REGS=registers, LOADER_REGS=LOADER_REGS, PINGPONG=pingpong)
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    aligned = [["tt.divisibility", 16]]
    source = GluonASTSource(fn=_attn_fwd_hopper_kernel, signature=signature, constexprs=constexprs,
                            attrs={(3,): aligned, (4,): aligned})
    options = {"num_warps": 4, **launch_options(consumers)}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def forward(q, k, v, causal: bool = False, scale: float | None = None, tile: tuple | None = None,
            persistent: bool = True):
    """(out, lse) of bf16/fp16 CUDA tensors q (B, H, T, D) and k, v (B, H_kv, T, D) on the Gluon
    kernel (any strides with a contiguous, 16-byte-aligned head dim); lse (B, H, T) float32.
    ``persistent``: as many programs as the GPU runs at once (``programs_per_sm``), each looping
    over work items; otherwise one program per item."""
    return launch(q, k, v, causal, scale, tile, persistent)[:2]


def launch(q, k, v, causal: bool = False, scale: float | None = None, tile: tuple | None = None,
           persistent: bool = True, **options):
    """``forward``'s (out, lse) and the launch's compiled kernel (its ``asm`` holds the PTX);
    ``options`` go to the launch as Triton's compile options (e.g. ``ir_override``, a PTX file to
    compile in place of the kernel's own)."""
    import torch
    import triton
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    batch, heads, seq, head_dim = q.shape
    if k.shape[2] != seq or head_dim not in TILES or heads % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}: the probe takes T_k = T_q, head dims "
                         f"{sorted(TILES)} and H a multiple of H_kv")
    rows, block_n, stages, consumers, registers, pingpong = tile or TILES[head_dim]
    q_layout, kv_layout = descriptor_layouts(head_dim, block_n, rows)
    describe = lambda t, box, layout: TensorDescriptor(t, list(t.shape), list(t.stride()),  # noqa: E731
                                                       [1, 1, box, head_dim], layout)
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq, device=q.device, dtype=torch.float32)
    items = triton.cdiv(seq, consumers * rows) * batch * heads
    if persistent:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        items = min(items, sms * programs_per_sm(consumers))
    compiled = _attn_fwd_hopper_kernel[(items,)](
        describe(q, rows, q_layout), describe(k, block_n, kv_layout), describe(v, block_n, kv_layout), out, lse,
        out.stride(0), out.stride(1), out.stride(2), seq, heads, batch * heads, heads // k.shape[1],
        scale if scale is not None else 1.0 / math.sqrt(head_dim), rows, block_n, head_dim, stages, causal, consumers,
        registers, LOADER_REGS, pingpong, num_warps=4, **launch_options(consumers), **options)
    return out, lse, compiled


def against_theria(batch: int, heads: int, heads_kv: int, seq: int, head_dim: int, causal: bool,
                   flash_layout: bool = False, tile: tuple | None = None, seed: int = 0, persistent: bool = True):
    """The Gluon forward and theria's on the same random bf16 inputs on the GPU ((B, H, T, D), or
    flash-attn's (B, T, H, D) storage seen so): (error, theria's error, lse, theria's lse), the
    errors of out relative to float32 attention. The A/B script's checks and the GPU test."""
    import torch

    from theria_kernels.attention import AttentionParams, torch_launchers

    torch.manual_seed(seed)

    def tensor(count):
        if flash_layout:
            return torch.randn(batch, seq, count, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        return torch.randn(batch, count, seq, head_dim, device="cuda", dtype=torch.bfloat16)

    q, k, v = tensor(heads), tensor(heads_kv), tensor(heads_kv)
    group = heads // heads_kv
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1), is_causal=causal)
    out, lse = forward(q, k, v, causal, tile=tile, persistent=persistent)
    theria_out, theria_lse = torch_launchers.attention_forward(
        q, k, v, AttentionParams(scale=1.0 / math.sqrt(head_dim), causal=causal))
    error = lambda o: ((o.float() - expected).norm() / expected.norm()).item()  # noqa: E731
    return error(out), error(theria_out), lse, theria_lse


def resources(compiled) -> dict:
    """What the compile check reads off a compiled kernel: shared memory, spilled words a thread
    (cuobjdump, as kernels/attention/_tuning.py reads them), warps, and the PTX's wgmma products,
    16-bit mma.sync products, TMA copies and register reallocations."""
    import re

    from triton import knobs

    from theria_kernels.attention._tuning import _resource_usage

    usage = _resource_usage(compiled.asm["cubin"], knobs.nvidia.cuobjdump.path)
    ptx = compiled.asm["ptx"]
    return dict(shared=compiled.metadata.shared + usage["SHARED"], spills=(usage["STACK"] + usage["LOCAL"]) // 4,
                warps=compiled.metadata.num_warps, wgmma=ptx.count("wgmma.mma_async"),
                mma_sync=len(re.findall(r"mma\.sync[^\n]*\.(?:bf16|f16)", ptx)),
                tensor_loads=ptx.count("cp.async.bulk.tensor"), setmaxnreg=ptx.count("setmaxnreg"))


if __name__ == "__main__":
    # Compiling needs Triton without its interpreter (TRITON_INTERPRET replaces Triton's own jitted
    # helpers, cdiv and minimum among them, by interpreted ones the Gluon frontend rejects).
    import json

    as_json = "--json" in sys.argv
    for head_dim in [int(a) for a in sys.argv[1:] if a != "--json"] or sorted(TILES):
        for causal in (False, True):
            found = resources(compile_for_hopper(head_dim, causal))
            print(json.dumps(dict(head_dim=head_dim, causal=causal, **found)) if as_json
                  else f"D{head_dim} causal={causal} {TILES[head_dim]}: {found}")
