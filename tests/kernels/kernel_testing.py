"""Shared helpers for the kernel tests: random paged-attention problems, error metric, poisoning.

Small-shape tests run the Triton kernels on ``KERNEL_DEVICE``: the CPU under ``TRITON_INTERPRET=1`` (set by
tests/conftest.py when there is no GPU), the GPU otherwise, so the same tests also run compiled on a GPU machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"

# Relative-error bounds against a float64 reference, by the dtype the kernel computes in: float32 arithmetic (also the
# fp32 caches' "ieee" dots) far under 1e-4; fp16 / bf16 results carry one or two roundings of 2^-11 / 2^-8 each
# (attention also rounds the softmax weights before P @ V, as every flash kernel does), expected near 3e-4 / 2e-3.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ATTENTION_TOLERANCE = TOLERANCE

def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64; NaN anywhere gives inf, so it can never pass."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm()).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    err = relative_error(out, ref)
    nan_count = int((~torch.isfinite(out)).sum())
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({nan_count} non-finite values)"


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


@dataclass
class AttentionProblem:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hk, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    scale: float
    max_query_len: int

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc, self.scale)

    def float64_reference(self, seqs_per_chunk: int = 32) -> torch.Tensor:
        """The torch reference on float64 copies, a few sequences at a time (it materializes K/V per query head)."""
        from kernels.paged_attention import paged_attention_ref

        k64, v64 = self.k_cache.double(), self.v_cache.double()
        out = torch.empty(self.q.shape, dtype=torch.float64, device=self.q.device)
        starts = self.query_start_loc.tolist()
        for s in range(0, len(starts) - 1, seqs_per_chunk):
            e = min(s + seqs_per_chunk, len(starts) - 1)
            rows = slice(starts[s], starts[e])
            out[rows] = paged_attention_ref(
                self.q[rows].double(), k64, v64, self.block_tables[s:e], self.seq_lens[s:e],
                self.query_start_loc[s : e + 1] - starts[s], self.scale,
            )  # fmt: skip
        return out

def make_attention_problem(
    q_lens: list[int],
    seq_lens: list[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    generator: torch.Generator,
    spare_blocks: int = 8,
    extra_table_columns: int = 3,
    strided_q: bool = False,
) -> AttentionProblem:
    """A random problem: every cache slot (also past the lengths) holds random data; blocks are a random permutation,
    so a sequence's blocks are scattered; unused table entries point at other sequences' blocks (reading them gives
    wrong answers, not crashes). ``strided_q`` makes ``q`` a slice of a wider fused-qkv-like tensor."""
    assert all(q <= s for q, s in zip(q_lens, seq_lens))
    batch = len(seq_lens)
    blocks_needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + spare_blocks
    width = max(blocks_needed + [1]) + extra_table_columns
    perm = torch.randperm(num_blocks, generator=generator)
    table = torch.randint(0, num_blocks, (batch, width), generator=generator, dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks_needed):
        table[i, :n] = perm[start : start + n].to(torch.int32)
        start += n
    total = sum(q_lens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype)

    if strided_q:
        q = randn(total, num_q_heads + 2 * num_kv_heads, head_dim).to(device)[:, :num_q_heads]
    else:
        q = randn(total, num_q_heads, head_dim).to(device)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return AttentionProblem(
        q=q,
        k_cache=randn(num_blocks, block_size, num_kv_heads, head_dim).to(device),
        v_cache=randn(num_blocks, block_size, num_kv_heads, head_dim).to(device),
        block_tables=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
        max_query_len=max(q_lens + [0]),
    )


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def seeded_attention_problem(q_lens, seq_lens, heads, head_dim, block_size, dtype, seed, device=KERNEL_DEVICE, **kw):
    """``make_attention_problem`` with ``heads = (query heads, kv heads)`` and its own generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return make_attention_problem(
        q_lens, seq_lens, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, block_size=block_size,
        dtype=dtype, device=device, generator=gen, **kw,
    )  # fmt: skip


def e4m3_grid_activations(m: int, k: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Activations that per-token quantization maps back exactly: e4m3 values (each row's absmax 448) times a power of
    two per row, so x / scale is exact. The interpreter's own fp32 -> e4m3 cast drops the carry when rounding crosses
    a power of two (see the row-quantization test); on this grid nothing rounds, and the kernels' GEMM is compared
    with ``fp8_linear_ref`` exactly as on the GPU."""
    q = (torch.randn(m, k, generator=gen) * 100).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    q[:, 0] = 448.0
    return (q * 2.0 ** -(6 + torch.arange(m, dtype=torch.float32) % 8)[:, None]).to(dtype)  # above FP8_MIN_SCALE


class FakeCudaTensor:
    """The attributes a GEMV's device and shape rule reads, as a contiguous CUDA tensor of ``shape`` would have
    them (a rule test runs on any machine)."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype | None = None) -> None:
        self.is_cuda, self.shape, self.dtype, self.device = True, shape, dtype, "cuda:0"

    def stride(self, dim: int | None = None):
        strides = (self.shape[1], 1)
        return strides if dim is None else strides[dim]

    def data_ptr(self) -> int:
        return 1 << 20


def rope_cache_problem(m: int, num_kv_heads: int, head_dim: int, seed: int) -> tuple:
    """A qkv GEMV's rotary epilogue inputs: the engine's cos / sin table, positions, the batch's cache slots (slot
    -1 on row 1: a padding token) and random k / v caches of 64 blocks of 16."""
    from core.layers.rotary import RotaryEmbedding

    gen = torch.Generator(device="cuda").manual_seed(seed)
    cos_sin = RotaryEmbedding(head_dim, 4096, 10000.0, None).cos_sin_cache.cuda()
    positions = torch.randint(0, 4096, (m,), device="cuda", generator=gen)
    slots = torch.randperm(64 * 16, device="cuda", generator=gen)[:m]
    if m > 1:
        slots[1] = -1
    caches = [torch.randn(64, 16, num_kv_heads, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
              for _ in range(2)]  # fmt: skip
    return cos_sin, positions, slots, caches


def assert_rope_cache_matches(fused_q: torch.Tensor, q: torch.Tensor, fused_caches: list, caches: list,
                              slots: torch.Tensor) -> None:  # fmt: skip
    """The fused qkv + prep kernel's q and caches against the GEMV then the prep kernel's: the same q and the same
    keys and values in the batch's slots; the rest of the cache bit for bit untouched."""
    torch.testing.assert_close(fused_q.view(q.shape), q, rtol=8e-3, atol=1e-5)
    for fused, ref in zip(fused_caches, caches):
        torch.testing.assert_close(fused, ref, rtol=8e-3, atol=1e-5)
        written = torch.zeros(fused.shape[0] * fused.shape[1], dtype=torch.bool, device=fused.device)
        written[slots[slots >= 0]] = True
        flat_fused, flat_ref = fused.view(written.numel(), -1), ref.view(written.numel(), -1)
        assert torch.equal(flat_fused[~written], flat_ref[~written])


def replayed_in_cuda_graph(step) -> torch.Tensor:
    """``step()``'s output from one replay of a CUDA graph captured after an eager call (which compiles what the
    graph launches): a kernel launched with PDL behind the kernel that writes its input must wait for it."""
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    return out


def outputs_with_each_preload(config, step) -> list[torch.Tensor]:
    """``step(config with preload p)`` replayed in a CUDA graph with PDL on, for p = 0, 1, 2 (a GEMV config's steps
    of weight loaded before the PDL wait)."""
    return outputs_with_configs([config._replace(preload=p) for p in (0, 1, 2)], step)


def outputs_with_configs(configs, step) -> list[torch.Tensor]:
    """``step(config)`` replayed in a CUDA graph with PDL on, for each config."""
    from kernels import pdl

    pdl.configure(True)
    try:
        return [replayed_in_cuda_graph(lambda cfg=cfg: step(cfg)) for cfg in configs]
    finally:
        pdl.configure(False)
