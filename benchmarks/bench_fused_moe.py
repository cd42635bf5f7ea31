"""Micro-benchmark of the fused MoE kernel (kernels/fused_moe.py) at the W7 models' shapes: decode (64, 256 tokens)
and prefill (8192 tokens), each against what it must read (the weights of the experts the batch touches, plus the
activations) and the FLOPs it does, with a correctness check against the per-expert torch loop at every shape.

    python -m benchmarks.bench_fused_moe              # Qwen3-30B-A3B and Mixtral-8x7B shapes, bf16 (CUDA)
    python -m benchmarks.bench_fused_moe --fp8        # the experts in e4m3 with per-channel scales (w8a16)
    python -m benchmarks.bench_fused_moe --int4       # the experts in int4, groups of 128 (w4a16, AWQ / GPTQ)
    python -m benchmarks.bench_fused_moe --gguf Q4_K  # GGUF Q4_K experts (a Q4_K_M file's gate / up), repacked
                                                      # for the int4 experts' kernel as loading on CUDA does
    python -m benchmarks.bench_fused_moe --gguf Q4_K --gguf-down Q6_K   # Q4_K_M's mix: int4 gate / up, int8 down
    python -m benchmarks.bench_fused_moe --gguf Q6_K  # Q8_0 / Q6_K / Q5_K: repacked for the 8-bit experts' kernel
    python -m benchmarks.bench_fused_moe --gguf Q4_K --gguf-blocks      # the same kept in their blocks (the old path)
    python -m benchmarks.bench_fused_moe --int8 channel   # int8 per channel (experts_int8, bitsandbytes 8-bit)
    python -m benchmarks.bench_fused_moe --int8 gptq      # uint8 codes, groups of 128 with offsets (GPTQ 8-bit)
    python -m benchmarks.bench_fused_moe --bnb4 nf4       # bitsandbytes NF4 experts (an absmax per 64 weights)
    python -m benchmarks.bench_fused_moe --bnb4 nvfp4     # NVFP4 experts (e2m1, fp8 scales per 16, a row scale)
    python -m benchmarks.bench_fused_moe --smoke      # tiny shapes: checks the script itself, also on CPU (interpreter)

Columns: ms (median of ``triton.testing.do_bench``, eager launches; ``graph ms``: the same call replayed from a CUDA
graph, as decode runs in the engine), GB/s and % of ``--peak-gbps`` (H200 HBM3e: 4800 by default), TFLOP/s and % of
``--peak-tflops`` (H200 dense bf16: 989 by default). Decode shapes should be judged on bandwidth, prefill on FLOPs.
Launch configs come from kernels/fused_moe_configs.json (filled by benchmarks/tune_fused_moe.py) or the untuned
defaults.
Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

from benchmarks.smoke import interpret_smoke_without_cuda  # noqa: E402

interpret_smoke_without_cuda()  # before kernels/ is imported

import torch  # noqa: E402

from gguf import GGMLQuantizationType  # noqa: E402

from kernels.fused_moe import (ExpertQuant, _weight_kind, fused_moe, fused_moe_ref, fused_moe_triton,  # noqa: E402
                               fused_topk, get_config)  # fmt: skip
from kernels.gguf_gemm import GGUF_KERNEL_TYPES, INT4_TYPES, INT8_GROUPS, INT8_TYPES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class MoeShape:
    name: str
    num_experts: int
    hidden: int
    inter: int
    top_k: int


SHAPES = [MoeShape("qwen3-30b-a3b", 128, 2048, 768, 8), MoeShape("mixtral-8x7b", 8, 4096, 14336, 2)]
TOKENS = [64, 256, 8192]
SMOKE_SHAPES = [MoeShape("smoke", 4, 64, 32, 2)]
SMOKE_TOKENS = [4, 40]


def per_rank_shapes(shapes: list[MoeShape], tp: int) -> list[MoeShape]:
    """Each rank's problem under ``--tensor-parallel-size tp``: every expert with ``inter / tp`` of its intermediate
    dimension (core/layers/parallel_moe.py), named ``<model>-tp<tp>``."""
    if tp == 1:
        return shapes
    for shape in shapes:
        if shape.inter % tp:
            raise SystemExit(f"--tp {tp}: {shape.name}'s expert width {shape.inter} is not divisible by it")
    return [dataclasses.replace(s, name=f"{s.name}-tp{tp}", inter=s.inter // tp) for s in shapes]


@dataclass
class MoeProblem:
    x: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    logits: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    quant: ExpertQuant | None = None  # quantized experts (``--fp8``, ``--int4``)

    def bytes_and_flops(self) -> tuple[int, int]:
        """Bytes the kernel must move at least (weights of the touched experts once, x in, the gate|up and activation
        intermediates written and read once, the per-pair down rows, the output) and its FLOPs (2 per MAC)."""
        tokens, hidden = self.x.shape
        num_experts, two_inter, _ = self.w13.shape
        pairs = self.topk_ids.numel()
        touched = int(torch.unique(self.topk_ids).numel())
        elt = self.x.element_size()
        weights = int(touched * (two_inter * hidden * self.bytes_per_weight(0)
                                 + hidden * two_inter // 2 * self.bytes_per_weight(1)))  # fmt: skip
        activations = (2 * tokens * hidden + 2 * pairs * two_inter + 2 * pairs * two_inter // 2
                       + 2 * pairs * hidden) * elt
        flops = 2 * pairs * (two_inter * hidden + hidden * two_inter // 2)
        return weights + activations, flops

    def bytes_per_weight(self, which: int) -> float:
        """Bytes per weight of ``w13`` (0) or ``w2`` (1): GGUF blocks as the file's, int4 codes with their scales
        and zero points or offsets, else the element size."""
        w = self.w13 if which == 0 else self.w2
        if self.quant is not None and self.quant.ggml_type(which):
            block, type_size = GGUF_KERNEL_TYPES[self.quant.ggml_type(which)]
            return type_size / block
        if self.quant is not None and self.quant.int8_stack(which):
            scale, _, group, _ = self.quant.parts(which)
            offsets = self.quant.offsets(which)
            return 1 + scale.element_size() * (1 + (offsets is not None)) / group
        if self.quant is not None and self.quant.bnb4:
            row_scale = self.quant.row_scale(which)
            per_row = 0 if row_scale is None else row_scale.element_size() / (2 * w.shape[2])  # codes: K / 2 bytes
            return 0.5 + self.quant.parts(which)[0].element_size() / self.quant.bnb_block + per_row
        if self.quant is not None and self.quant.parts(which)[2]:
            scale, _, group, _ = self.quant.parts(which)
            return 0.5 + 2 * scale.element_size() / group
        return w.element_size()


def make_problem(shape: MoeShape, tokens: int, dtype: torch.dtype, seed: int = 0, fp8: bool = False,
                 int4_group: int = 0, gguf_type: int = 0, gguf_down_type: int = 0,
                 gguf_blocks: bool = False, int8: str = "", bnb4: str = "") -> MoeProblem:  # fmt: skip
    """Random activations, experts and routing; ``fp8``: the experts quantized per output channel to e4m3;
    ``int4_group``: to int4 codes in the int4 kernel layout with random scales and zero points per group;
    ``gguf_type``: random GGUF blocks of that GGML type (sane scales), as a GGUF file's stacked experts (the down
    stack of ``gguf_down_type`` if given), a Q4_0 / Q4_1 / Q4_K stack repacked for the int4 experts' kernel as
    loading on CUDA does (``experts_as_int4``), a Q8_0 / Q6_K / Q5_K stack for the 8-bit experts'
    (``experts_as_int8``), unless ``gguf_blocks``; ``int8``: random 8-bit codes, ``channel`` int8 with a scale per
    output channel, ``gptq`` uint8 with a scale and offset per 128 inputs; ``bnb4``: random 4-bit codes two a byte,
    ``nf4`` with an fp32 absmax per 64 weights, ``nvfp4`` e2m1 with fp8 scales per 16 and an fp32 scale per row.
    Random codes: the kernels' speed does not depend on the values, and the check dequantizes the same codes."""
    problem = _random_problem(shape, tokens, dtype, seed)
    if int8 or bnb4:
        problem.quant = _random_codes(problem, int8, bnb4, seed)
    if gguf_type:
        from core.layers.quantization.gguf import _random_blocks, experts_as_int4, experts_as_int8

        gen = torch.Generator().manual_seed(seed)
        fields = {}
        for name, ggml_type in (("w13", gguf_type), ("w2", gguf_down_type or gguf_type)):
            block, type_size = GGUF_KERNEL_TYPES[ggml_type]
            e, n, k = getattr(problem, name).shape
            if k % block:
                raise ValueError(f"--gguf: the {name} input size {k} is not whole {block}-element blocks")
            blocks = torch.empty(e, n, k // block * type_size, dtype=torch.uint8)
            _random_blocks(ggml_type)(blocks, gen)
            blocks = blocks.to(DEVICE)
            int4 = None if gguf_blocks or ggml_type not in INT4_TYPES else experts_as_int4(blocks, ggml_type, k, dtype)
            if not gguf_blocks and ggml_type in INT8_TYPES:
                codes, scales, offsets = experts_as_int8(blocks, ggml_type, k)
                setattr(problem, name, codes)
                fields.update({f"{name}_scale": scales, f"{name}_offsets": offsets, f"{name}_int8": True,
                               f"{name}_group": INT8_GROUPS[ggml_type]})
            elif int4 is None:
                setattr(problem, name, blocks)
                fields[f"{name}_ggml"] = ggml_type
            else:
                setattr(problem, name, int4[0])
                fields.update({f"{name}_scale": int4[1], f"{name}_offsets": int4[2], f"{name}_group": 32})
        problem.quant = ExpertQuant(**fields)
    if int4_group:
        gen = torch.Generator().manual_seed(seed)
        parts = []
        for name in ("w13", "w2"):
            e, n, k = getattr(problem, name).shape
            group = min(int4_group, k)
            words = torch.randint(-(2**31), 2**31 - 1, (e, n, k // 8), generator=gen, dtype=torch.int32)
            scales = (torch.rand(e, k // group, n, generator=gen) * 2e-3 + 1e-3).to(dtype)
            zeros = torch.randint(0, 16, (e, k // group, n), generator=gen).to(dtype)
            setattr(problem, name, words.to(DEVICE))
            parts.append((scales.to(DEVICE), zeros.to(DEVICE), group))
        (s13, z13, g13), (s2, z2, g2) = parts
        problem.quant = ExpertQuant(s13, s2, None, z13, z2, g13, g2)
    if fp8:
        from kernels.fp8_linear import quantize_per_channel

        scales = []
        for name in ("w13", "w2"):
            w = getattr(problem, name)
            q, scale = quantize_per_channel(w.reshape(-1, w.shape[-1]))
            setattr(problem, name, q.view(w.shape))
            scales.append(scale.view(w.shape[:2]))
        problem.quant = ExpertQuant(*scales)
    return problem


def _random_codes(problem: MoeProblem, int8: str, bnb4: str, seed: int) -> ExpertQuant:
    """Replace ``problem``'s experts with random 8-bit (``int8``) or 4-bit codebook (``bnb4``) codes and scales sized
    so the products stay near the unquantized experts' magnitude."""
    from kernels.bnb4_gemm import E2M1_CODEBOOK, NF4_CODEBOOK

    gen = torch.Generator().manual_seed(seed)
    fields: dict[str, object] = {}
    block = min(64 if bnb4 == "nf4" else 16, problem.w2.shape[2])  # one block size for both stacks
    for name in ("w13", "w2"):
        e, n, k = getattr(problem, name).shape
        if int8:
            group = k if int8 == "channel" else min(128, k)
            low, high, code_dtype = (-127, 128, torch.int8) if int8 == "channel" else (0, 256, torch.uint8)
            codes = torch.randint(low, high, (e, n, k), generator=gen, dtype=torch.int16).to(code_dtype)
            scale = torch.rand(e, k // group, n, generator=gen) * k**-0.5 / 64
            fields.update({f"{name}_scale": scale.to(DEVICE), f"{name}_group": group, f"{name}_int8": True})
            if int8 == "gptq":
                fields[f"{name}_offsets"] = (-128 * scale).to(DEVICE)
        else:
            codes = torch.randint(0, 256, (e, n, k // 2), generator=gen, dtype=torch.int16).to(torch.uint8)
            absmax = torch.rand(e, n, k // block, generator=gen) * k**-0.5 + k**-0.5 / 2
            if bnb4 == "nvfp4":
                row = absmax.amax(-1) / 448
                fields[f"{name}_row_scale"] = (row / 6).to(DEVICE)  # e2m1's values run to 6
                absmax = (absmax / row[..., None]).to(torch.float8_e4m3fn)
            fields[f"{name}_scale"] = absmax.to(DEVICE)
        setattr(problem, name, codes.to(DEVICE))
    if bnb4:
        codebook = NF4_CODEBOOK if bnb4 == "nf4" else E2M1_CODEBOOK
        fields.update(codebook=torch.tensor(codebook, device=DEVICE), bnb_block=block)
    return ExpertQuant(**fields)


def _random_problem(shape: MoeShape, tokens: int, dtype: torch.dtype, seed: int) -> MoeProblem:
    gen = torch.Generator().manual_seed(seed)

    def rand(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(dtype).to(DEVICE)

    logits = torch.randn(tokens, shape.num_experts, generator=gen).to(DEVICE)
    weights, ids = fused_topk(logits, shape.top_k, renormalize=True)
    return MoeProblem(
        x=rand(tokens, shape.hidden),
        w13=rand(shape.num_experts, 2 * shape.inter, shape.hidden, scale=shape.hidden**-0.5),
        w2=rand(shape.num_experts, shape.hidden, shape.inter, scale=shape.inter**-0.5),
        logits=logits, topk_weights=weights, topk_ids=ids,
    )  # fmt: skip


def bench_ms(fn) -> float:
    if DEVICE == "cpu":  # --smoke without a GPU: one interpreted run, wall clock
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def graph_ms(fn) -> float | None:
    """The call captured in a CUDA graph and replayed (None on CPU): also proves it captures (no host sync)."""
    if DEVICE != "cuda":
        return None
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def check_problem(p: MoeProblem, config: dict[str, int] | None = None) -> float:
    """Relative error of the Triton path against the float32 per-expert loop."""
    out = fused_moe_triton(p.x, p.w13, p.w2, p.topk_weights, p.topk_ids, config=config, quant=p.quant)
    w13, w2 = (p.w13, p.w2) if p.quant is not None else (p.w13.float(), p.w2.float())
    ref = fused_moe_ref(p.x.float(), w13, w2, p.topk_weights, p.topk_ids, p.quant)
    return relative_error(out, ref)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script (CPU: interpreter)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default 64 256 8192)")
    parser.add_argument("--models", nargs="+", default=None, help="shape names (default: all)")
    parser.add_argument("--tp", type=int, default=1, help="one rank's shapes under tensor parallelism of this size")
    parser.add_argument("--fp8", action="store_true", help="experts in e4m3 with per-channel scales (w8a16)")
    parser.add_argument("--int4", action="store_true", help="experts in int4, groups of 128 (w4a16)")
    gguf_types = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
    parser.add_argument("--gguf", choices=gguf_types, default=None,
                        help="GGUF experts of this type (random blocks), repacked as loading on CUDA does: Q4_0 / "
                             "Q4_1 / Q4_K for the int4 experts' kernel, Q8_0 / Q6_K / Q5_K for the 8-bit experts'")
    parser.add_argument("--gguf-down", choices=gguf_types, default=None,
                        help="the down stack's GGUF type where it differs (Q4_K_M: Q4_K gate / up, Q6_K down)")
    parser.add_argument("--gguf-blocks", action="store_true",
                        help="keep the GGUF experts in their blocks (the block-decoding kernel)")
    parser.add_argument("--int8", choices=["channel", "gptq"], default="",
                        help="8-bit experts: int8 per channel (experts_int8, bitsandbytes 8-bit) or GPTQ's uint8 "
                             "codes with a scale and offset per 128 inputs")
    parser.add_argument("--bnb4", choices=["nf4", "nvfp4"], default="",
                        help="4-bit codebook experts: bitsandbytes NF4 or NVFP4 (random codes)")
    parser.add_argument("--peak-gbps", type=float, default=4800.0)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    opts = parser.parse_args(argv)
    if DEVICE != "cuda" and not opts.smoke:
        print("bench_fused_moe needs a CUDA GPU; --smoke runs on CPU (interpreter)", file=sys.stderr)
        return 2
    shapes = SMOKE_SHAPES if opts.smoke else [s for s in SHAPES if not opts.models or s.name in opts.models]
    shapes = per_rank_shapes(shapes, opts.tp)
    token_counts = opts.tokens or (SMOKE_TOKENS if opts.smoke else TOKENS)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if DEVICE == "cpu":
        print(f"# CPU smoke run (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}): timings are meaningless")
    print("model  tokens  experts_touched  config  ms  graph_ms  GB/s  %bw  TFLOP/s  %flops  check")
    failures = []
    for shape in shapes:
        for tokens in token_counts:
            gguf_type = int(GGMLQuantizationType[opts.gguf]) if opts.gguf else 0
            down_type = int(GGMLQuantizationType[opts.gguf_down]) if opts.gguf_down else 0
            p = make_problem(shape, tokens, dtype, seed=tokens, fp8=opts.fp8, int4_group=128 if opts.int4 else 0,
                             gguf_type=gguf_type, gguf_down_type=down_type, gguf_blocks=opts.gguf_blocks,
                             int8=opts.int8, bnb4=opts.bnb4)  # fmt: skip
            config = get_config(tokens, shape.num_experts, shape.hidden, shape.inter, dtype,
                                _weight_kind(p.w13, p.quant))  # fmt: skip
            err = check_problem(p)
            ok = err <= tol
            if not ok:
                failures.append(f"{shape.name} T={tokens}: relative error {err:.2e} > {tol:.0e}")

            def call() -> torch.Tensor:
                return fused_moe(p.x, p.w13, p.w2, p.logits, shape.top_k, True, quant=p.quant)

            ms = bench_ms(call)
            g_ms = graph_ms(call)
            nbytes, flops = p.bytes_and_flops()
            best = g_ms if g_ms is not None else ms
            gbps, tflops = nbytes / best / 1e6, flops / best / 1e9
            cfg = f"M{config['BLOCK_M']}N{config['BLOCK_N']}K{config['BLOCK_K']}G{config['GROUP_M']}" \
                  f"w{config['num_warps']}s{config['num_stages']}"  # fmt: skip
            print(f"{shape.name}  {tokens}  {int(torch.unique(p.topk_ids).numel())}  {cfg}  {ms:.3f}  "
                  f"{'-' if g_ms is None else f'{g_ms:.3f}'}  {gbps:.0f}  {100 * gbps / opts.peak_gbps:.0f}%  "
                  f"{tflops:.1f}  {100 * tflops / opts.peak_tflops:.0f}%  {err:.1e} {'ok' if ok else 'FAIL'}")
            sys.stdout.flush()
    if failures:
        print("# FAILED: " + "; ".join(failures))
        return 1
    print("# all correctness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
