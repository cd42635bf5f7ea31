"""Decode attention over an fp8 (e4m3) KV cache, written in Gluon (Triton's explicit-layout language) so that each
thread loads exactly its own tensor-core fragments of the fp8 tiles and converts them in registers.

Why: the Triton kernel (``kernels/decode_attention.py``, ``f16-vsplit``) converts each fp8 K/V tile to fp16 and then
lets the compiler move it into the MMA operand layout through shared memory (stored, then read back with ldmatrix):
on the H200 that kernel is bound by shared memory (82% busy) and reads the cache at ~65% of HBM bandwidth. Triton
picks the layouts itself and cannot be told that a thread could load exactly its own fragment. Gluon can:

- **Head dim permuted.** The score ``q @ K^T`` sums over the head dim, so any order of it works if q uses the same.
  In the mma.sync B fragment a thread holds dims ``2q + e + 8h + 16s`` (``q`` = lane % 4, ``e``, ``h`` in {0, 1},
  ``s`` < 8) of a key; the kernel reads logical dim ``16s + 8h + 2q + e`` from byte ``32q + 4s + 2h + e``, so each
  thread's 32 bytes of a key are contiguous (two 16-byte loads). q is loaded through the same permutation.
- **The output transposed.** ``out^T += V^T @ p^T``: the head dim is the mma's M (8 tiles of 16) and the query
  rows its N (8, the group padded). ``p @ V`` with the rows as M would pad a group of 4 to 16 rows: twice the mma
  work and a 64-float accumulator per thread instead of 32 (the registers that decide how many programs share an
  SM). In the V^T fragment a thread holds dims ``g + 8j`` (``g`` = lane // 4, ``j`` < 16); dim ``8j + g`` is read
  from byte ``16g + j`` of each V row (16 contiguous bytes) and the result is stored back through the same map.
  The scores ``q @ K^T`` keep the rows as M (16, the mma's least); rows 0-7 of the result are a register apart
  from rows 8-15, and their layout is already ``p^T``'s as the B operand: no data moves.
- The relabellings are reshapes + permutes of the loaded tiles, and ``convert_layout(..., assert_trivial=True)``
  to the MMA operand layouts compiles: no data moves. e4m3 -> fp16 is one packed ``cvt`` per two values (exact),
  in registers.
- **Warps split the keys.** Each of the 4 warps runs its own online softmax over 16 keys of every 64-key tile
  (a batched 3-D ``mma_v2`` with the warp as the batch dimension), so the loop needs no exchange between warps; the
  warps' partial results merge once at the end. A warp's 16 keys lie in one cache block (blocks of 16+ slots): one
  block-table lookup per warp and tile.
- **Loads.** A cp.async ring in shared memory, ``STAGES - 1`` tiles ahead, each thread copying the bytes it reads
  back itself (one 16-byte ``LDS`` per 16 bytes: one trip through shared memory instead of the Triton kernel's
  three; ``benchmarks/gluon_decode_sass.py`` shows the loop). Loading straight to registers, with no shared memory
  in the loop at all, was measured and dropped: each warp then waits for its own loads every tile (55% of
  bandwidth against the ring's 65%, thirteenth session).
- 124 registers and a 32 KB ring (K and V) per program: 4 programs (16 warps) per SM. Measured on the H200 at W2's shape
  (fourteenth session): 152.3 us per layer, 82% of HBM bandwidth; a read-only kernel with the same access pattern
  reaches 85%. The Triton kernel: 192.4 us (65%).

Scope: one query row per sequence (decode), head dim 128, query groups up to 8 heads, fp16/bf16 queries, no
soft-capping / ALiBi / sliding window, no split of the context: :func:`gluon_decode_supported` says when, and the
caller (``paged_decode_attention``) uses the Triton kernel otherwise. Gluon has no interpreter, so on the CPU the
Triton kernel runs; the GPU tests compare this kernel with the float32 reference.
"""

from __future__ import annotations

import functools

import torch

from kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, use_pdl

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

    # cp.async global -> shared: Triton 3.6 calls it async_copy_global_to_shared, later versions async_load
    _cp_async = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared
    HAS_GLUON = True
except ImportError:  # pragma: no cover - a Triton without Gluon
    HAS_GLUON = False

HEAD_DIM = 128
MAX_GROUP = 8
# Keys per warp per tile (16 or 32: a tile is 4x that, KEYS_PER_WARP / 2 KB of K and as much of V), tiles of K/V in
# the cp.async ring in shared memory (2 or more; STAGES - 1 in flight while one is read) and the registers per thread
# the compiler may use (maxnreg; None: its own choice). Programs per SM are the fewest that registers and shared
# memory allow, and they decide the speed more than the ring's depth. Measured on the H200 at W2's shape (fourteenth
# session, RESULTS.md; before the one-lookup-per-warp change): 16 keys x 2 stages 156.0 us per layer (127 registers,
# 4 programs per SM), x 3 stages 156.4, x 4 stages 169.7 (3 programs: shared memory); 32 keys x 2 stages 161.5.
KEYS_PER_WARP = 16
STAGES = 2
MAX_REGISTERS: int | None = None
LOG2E = 1.4426950408889634


def _tile_layout(keys: int, byte_bases: list, lane_bases: list):
    """A K or V tile's load layout ``[warp, key, byte]`` over ``keys`` keys per warp: the given byte (and key)
    register and lane bases, then key bits 8, 16, ... in registers (the mma.sync n-tiles of K, k-steps of V)."""
    key_bases = [[0, 8 << i, 0] for i in range(keys.bit_length() - 4)]
    return gl.DistributedLinearLayout(reg_bases=byte_bases + key_bases, lane_bases=lane_bases,
                                      warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[4, keys, HEAD_DIM])


def _scores_layout(keys: int):
    """The scores' layout ``[warp, row, key]`` (rows 0-7 of the mma's result): rows lane // 4, keys 2 (lane % 4) + e
    and 8, 16, ... in registers."""
    key_bases = [[0, 0, 8 << i] for i in range(keys.bit_length() - 4)]
    return gl.DistributedLinearLayout(reg_bases=[[0, 0, 1]] + key_bases,
                                      lane_bases=[[0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
                                      warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[4, MAX_GROUP, keys])


if HAS_GLUON:
    _W = gl.constexpr(4)  # warps, each with its own keys
    _D = gl.constexpr(HEAD_DIM)
    _ROWS = gl.constexpr(MAX_GROUP)  # query rows of the MMA (the group, padded)
    _MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1, 1], instr_shape=[1, 16, 8]))
    # The K tile [warp, key, byte] as loaded: each thread's 32 contiguous bytes of keys lane // 4 + 8 r
    _K_TILE_BYTES = ([[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [0, 0, 16]],
                     [[0, 0, 32], [0, 0, 64], [0, 1, 0], [0, 2, 0], [0, 4, 0]])
    # The V tile [warp, key, byte]: 16 contiguous bytes at 16 (lane // 4) of keys 2 (lane % 4) + {0, 1, 8, 9, ...}
    _V_TILE_BYTES = ([[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [0, 1, 0]],
                     [[0, 2, 0], [0, 4, 0], [0, 0, 16], [0, 0, 32], [0, 0, 64]])
    _Q_LOAD = gl.constexpr(gl.BlockedLayout(size_per_thread=[1, 1, 8], threads_per_warp=[1, 4, 8],
                                            warps_per_cta=[4, 1, 1], order=[2, 1, 0]))
    # the cp.async ring [stage, warp, key, byte]: 16-byte chunks swizzled across the 8 rows of a 128-byte phase
    _RING = gl.constexpr(gl.SwizzledSharedLayout(vec=16, per_phase=1, max_phase=8, order=[2, 1, 0]))
    _O_STORE = gl.constexpr(gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                             order=[1, 0]))

    @gluon.jit
    def _tile_pages(table, seq_len, start, k_keys, v_keys, BLOCK_SIZE: gl.constexpr, KEYS: gl.constexpr):
        """The cache blocks of keys ``start + k_keys`` / ``start + v_keys`` (0 past the context), each in its load
        layout's key slice. A warp's keys of a tile lie in one block when the block size is a multiple of them: one
        lookup per warp then, broadcast over its keys."""
        if BLOCK_SIZE % KEYS == 0:  # each warp's first key
            k_keys = gl.min(k_keys, axis=1, keep_dims=True)
            v_keys = gl.min(v_keys, axis=1, keep_dims=True)
        key = start + k_keys
        k_page = gl.load(table + key // BLOCK_SIZE, mask=key < seq_len, other=0)
        key = start + v_keys
        v_page = gl.load(table + key // BLOCK_SIZE, mask=key < seq_len, other=0)
        return k_page, v_page

    @gluon.jit
    def _copy_kv_tile(k_slot, v_slot, k_ptr, v_ptr, k_page, v_page, seq_len, start, k_keys, v_keys, k_bytes,
                      v_bytes, head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                      BLOCK_SIZE: gl.constexpr):
        """cp.async of keys ``start + k_keys`` / ``start + v_keys`` (zeros past the context) into a ring slot, each
        thread the bytes it will read back itself (the load layouts), so no barrier is needed between the copy and
        the read."""
        key = start + k_keys
        row = k_page.to(gl.int64) * stride_kb + (key % BLOCK_SIZE) * stride_ks + head * stride_kh
        _cp_async(k_slot, k_ptr + (row[:, :, None] + k_bytes[None, None, :]), mask=(key < seq_len)[:, :, None])
        key = start + v_keys
        row = v_page.to(gl.int64) * stride_vb + (key % BLOCK_SIZE) * stride_vs + head * stride_vh
        _cp_async(v_slot, v_ptr + (row[:, :, None] + v_bytes[None, None, :]), mask=(key < seq_len)[:, :, None])
        async_copy.commit_group()

    @gluon.jit
    def _gluon_decode_kernel(out_ptr, q_ptr, k_ptr, v_ptr, table_ptr, seq_lens_ptr, query_start_ptr, order_ptr,
                             qk_scale, v_scale, num_kv_heads, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb,
                             stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                             GROUP: gl.constexpr, BLOCK_SIZE: gl.constexpr, STAGES: gl.constexpr, KEYS: gl.constexpr,
                             K_TILE: gl.constexpr, V_TILE: gl.constexpr, SCORES: gl.constexpr,
                             USE_PDL: gl.constexpr):  # fmt: skip
        """Program (sequence ``order[pid // Hk]``, KV head ``pid % Hk``): the group's attention over the context."""
        if USE_PDL:  # launched with programmatic dependent launch (kernels/pdl.py): the kernels before have written
            gdc_wait()  # q and the cache
            gdc_launch_dependents()
        pid = gl.program_id(0)
        seq = gl.load(order_ptr + pid // num_kv_heads)
        head = pid % num_kv_heads
        seq_len = gl.load(seq_lens_ptr + seq)
        token = gl.load(query_start_ptr + seq)
        dot_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=_MMA, k_width=2)
        dot_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=_MMA, k_width=2)

        # q [warp, row, d] (every warp holds the whole group; rows past it repeat its last), head dim in the permuted
        # order, scaled to the log2 domain, in fp16: divided by a power of two first if it would overflow (scores
        # rescaled after the dot)
        q_rows = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(0, _Q_LOAD)))
        q_dims = gl.arange(0, _D, layout=gl.SliceLayout(0, gl.SliceLayout(0, _Q_LOAD)))
        q_bytes = 32 * ((q_dims >> 1) & 3) + 4 * (q_dims >> 4) + 2 * ((q_dims >> 3) & 1) + (q_dims & 1)
        q_off = (token * stride_qt + (head * GROUP + gl.minimum(q_rows, GROUP - 1)) * stride_qh)[:, None]
        warps = gl.zeros([_W, 1, 1], gl.int32, layout=_Q_LOAD)
        q = gl.load(q_ptr + (q_off + q_bytes[None, :])[None, :, :] + warps).to(gl.float32) * qk_scale
        q_max = gl.max(gl.max(gl.max(gl.abs(q), 2), 1), 0)
        shift = gl.where(q_max > 32768.0, gl.exp2(gl.ceil(gl.log2(q_max)) - 15.0), 1.0)
        q = gl.convert_layout((q * (1.0 / shift)).to(gl.float16), dot_a)

        k_keys = ((gl.arange(0, _W, layout=gl.SliceLayout(1, gl.SliceLayout(2, K_TILE))) * KEYS)[:, None]
                  + gl.arange(0, KEYS, layout=gl.SliceLayout(0, gl.SliceLayout(2, K_TILE)))[None, :])
        v_keys = ((gl.arange(0, _W, layout=gl.SliceLayout(1, gl.SliceLayout(2, V_TILE))) * KEYS)[:, None]
                  + gl.arange(0, KEYS, layout=gl.SliceLayout(0, gl.SliceLayout(2, V_TILE)))[None, :])
        s_keys = ((gl.arange(0, _W, layout=gl.SliceLayout(1, gl.SliceLayout(1, SCORES))) * KEYS)[:, None]
                  + gl.arange(0, KEYS, layout=gl.SliceLayout(0, gl.SliceLayout(1, SCORES)))[None, :])
        k_bytes = gl.arange(0, _D, layout=gl.SliceLayout(0, gl.SliceLayout(1, K_TILE)))
        v_bytes = gl.arange(0, _D, layout=gl.SliceLayout(0, gl.SliceLayout(1, V_TILE)))
        table = table_ptr + seq * stride_bt

        # softmax state per (warp, query row) in the scores' layout; the output transposed, [warp, d, row]
        m_i = gl.full([_W, _ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(2, SCORES))
        l_i = gl.zeros([_W, _ROWS], gl.float32, layout=gl.SliceLayout(2, SCORES))
        acc = gl.zeros([_W, _D, _ROWS], gl.float32, layout=_MMA)
        TILE: gl.constexpr = _W * KEYS
        # a ring of STAGES tiles in shared memory, filled by cp.async STAGES - 1 tiles ahead; the block-table lookup
        # of the tile after that overlaps the current tile's math
        k_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, _W, KEYS, _D], _RING)
        v_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, _W, KEYS, _D], _RING)
        for i in gl.static_range(STAGES - 1):
            k_page, v_page = _tile_pages(table, seq_len, i * TILE, k_keys, v_keys, BLOCK_SIZE, KEYS)
            _copy_kv_tile(k_ring.index(i), v_ring.index(i), k_ptr, v_ptr, k_page, v_page, seq_len, i * TILE, k_keys,
                          v_keys, k_bytes, v_bytes, head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                          stride_vh, BLOCK_SIZE)
        k_page, v_page = _tile_pages(table, seq_len, (STAGES - 1) * TILE, k_keys, v_keys, BLOCK_SIZE, KEYS)
        tile = 0
        for start in range(0, seq_len, TILE):
            ahead = start + (STAGES - 1) * TILE
            slot = (tile + STAGES - 1) % STAGES
            _copy_kv_tile(k_ring.index(slot), v_ring.index(slot), k_ptr, v_ptr, k_page, v_page, seq_len, ahead,
                          k_keys, v_keys, k_bytes, v_bytes, head, stride_kb, stride_ks, stride_kh, stride_vb,
                          stride_vs, stride_vh, BLOCK_SIZE)
            k_page, v_page = _tile_pages(table, seq_len, ahead + TILE, k_keys, v_keys, BLOCK_SIZE, KEYS)
            async_copy.wait_group(STAGES - 1)
            k8 = k_ring.index(tile % STAGES).load(K_TILE)
            v8 = v_ring.index(tile % STAGES).load(V_TILE)
            tile += 1
            # scores q @ K^T over 16 rows (the mma's least); K: byte 32q + 4s + 2h + e is logical dim 16s + 8h + 2q + e
            k16 = gl.reshape(k8.to(gl.float8e4nv, bitcast=True).to(gl.float16), [_W, KEYS, 4, 8, 2, 2])
            k_t = gl.reshape(gl.permute(k16, [0, 3, 4, 2, 5, 1]), [_W, _D, KEYS])
            s16 = mma_v2(q, gl.convert_layout(k_t, dot_b, assert_trivial=True),
                         gl.zeros([_W, 16, KEYS], gl.float32, layout=_MMA))
            # rows 0-7 (rows 8-15 are a register apart in the mma's result: a free split)
            s, _ = gl.split(gl.permute(gl.reshape(s16, [_W, 2, _ROWS, KEYS]), [0, 2, 3, 1]))
            s = gl.convert_layout(s, SCORES, assert_trivial=True) * shift
            s = gl.where((start + s_keys < seq_len)[:, None, :], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=2))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_safe)
            p = gl.exp2(s - m_safe[:, :, None])
            l_i = l_i * alpha + gl.sum(p, axis=2)
            m_i = m_new
            # out^T += V^T @ p^T: d is the mma's M (8 row tiles of 16), the query rows its N (8): half the mma work
            # and accumulator of p @ V with 16 padded rows. V: byte 16g + j of a key is output column 8j + g
            v16 = gl.reshape(v8.to(gl.float8e4nv, bitcast=True).to(gl.float16), [_W, KEYS, 8, 16])
            v_t = gl.reshape(gl.permute(v16, [0, 3, 2, 1]), [_W, _D, KEYS])
            p_t = gl.convert_layout(gl.permute(p.to(gl.float16), [0, 2, 1]), dot_b, assert_trivial=True)
            alpha_t = gl.convert_layout(alpha, gl.SliceLayout(1, _MMA))
            acc = mma_v2(gl.convert_layout(v_t, dot_a, assert_trivial=True), p_t, acc * alpha_t[:, None, :])
        async_copy.wait_group(0)  # the copies issued past the context (masked) end before the program does

        # merge the warps' online softmaxes; a sequence without context (CUDA-graph padding) gets zeros
        m_all = gl.max(m_i, axis=0)
        weight = gl.exp2(m_i - gl.where(m_all == float("-inf"), 0.0, m_all)[None, :])
        l_all = gl.sum(l_i * weight, axis=0)
        o = gl.sum(acc * gl.convert_layout(weight, gl.SliceLayout(1, _MMA))[:, None, :], axis=0)  # [d, row]
        inv = gl.convert_layout(gl.where(l_all > 0.0, v_scale / l_all, 0.0), gl.SliceLayout(0, gl.SliceLayout(0, _MMA)))
        o = gl.convert_layout(gl.permute(o * inv[None, :], [1, 0]), _O_STORE)
        rows = gl.arange(0, _ROWS, layout=gl.SliceLayout(1, _O_STORE))
        cols = gl.arange(0, _D, layout=gl.SliceLayout(0, _O_STORE))
        out_cols = 16 * (cols % 8) + cols // 8  # output column 8j + g was computed from byte 16g + j of V
        out = out_ptr + (token * stride_ot + (head * GROUP + rows) * stride_oh)[:, None] + out_cols[None, :]
        gl.store(out, o.to(out_ptr.dtype.element_ty), mask=(rows < GROUP)[:, None])


@functools.cache
def tile_layouts(keys: int) -> tuple:
    """The K and V tiles' load layouts and the scores' layout at ``keys`` keys per warp (16 or 32)."""
    return (_tile_layout(keys, *_K_TILE_BYTES), _tile_layout(keys, *_V_TILE_BYTES),
            _scores_layout(keys))


def gluon_decode_supported(q: torch.Tensor, k_cache: torch.Tensor, *, queries: int = 1, softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, sliding_window: int = 0) -> bool:  # fmt: skip
    """Whether :func:`gluon_fp8_decode` serves this call: an NVIDIA GPU of compute capability 8.9+ (packed e4m3 ->
    fp16), an e4m3 cache, fp16/bf16 queries, head dim 128, a query group of at most 8 heads, one query row per
    sequence, and none of soft-capping, ALiBi or a sliding window."""
    if not (HAS_GLUON and q.is_cuda and k_cache.dtype == torch.float8_e4m3fn):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] != HEAD_DIM or k_cache.shape[-1] != HEAD_DIM:
        return False
    group = q.shape[1] // k_cache.shape[2]
    if group > MAX_GROUP or queries != 1 or softcap > 0 or alibi_slopes is not None or sliding_window > 0:
        return False
    return torch.version.hip is None and torch.cuda.get_device_capability(q.device) >= (8, 9)  # NVIDIA mma / cp.async


def gluon_fp8_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, out: torch.Tensor,
                     seq_order: torch.Tensor, *, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """One program per (sequence, KV head), launched in ``seq_order`` (a permutation of the sequences, e.g. longest
    first); q ``[T, Hq, 128]``, caches ``[blocks, block_size, Hk, 128]`` e4m3 holding ``x / scale``; writes ``out``
    rows ``query_start_loc[:-1]``. Callers check :func:`gluon_decode_supported` first."""
    batch, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    k_bits, v_bits = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_tile, v_tile, scores = tile_layouts(KEYS_PER_WARP)
    _gluon_decode_kernel[(batch * num_kv_heads,)](
        out, q, k_bits, v_bits, block_tables, seq_lens, query_start_loc, seq_order, scale * k_scale * LOG2E,
        v_scale, num_kv_heads, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_bits.stride(0), k_bits.stride(1), k_bits.stride(2), v_bits.stride(0), v_bits.stride(1), v_bits.stride(2),
        block_tables.stride(0), GROUP=q.shape[1] // num_kv_heads, BLOCK_SIZE=k_cache.shape[1],
        STAGES=STAGES, KEYS=KEYS_PER_WARP, K_TILE=k_tile, V_TILE=v_tile, SCORES=scores, num_warps=4,
        **launch_options(use_pdl(q)), **({"maxnreg": MAX_REGISTERS} if MAX_REGISTERS else {}),
    )  # fmt: skip
    return out
