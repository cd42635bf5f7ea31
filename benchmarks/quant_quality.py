"""Quantization quality: mean KL divergence of the next-token distributions of a quantized model against the
unquantized one over a fixed text, with the top-1 agreement beside it, so speed is never bought blindly.

Methods: ``fp8`` (online W8A8: per-channel weight scales, dynamic per-token activation scales), ``fp8-block``
(a block-scaled fp8 checkpoint as Qwen3 / DeepSeek FP8 releases are, ``--fp8-block`` square blocks, written here and
loaded like any other: w8a16), and ``awq-rtn`` (int4 in AutoAWQ's GEMM layout, round-to-nearest with zero points
per group of ``--group-size`` input rows: the weights are quantized here and written as a real AWQ checkpoint, then
loaded like any other; AutoAWQ's activation-aware scaling would only do better), ``bnb-nf4`` (``--quantization
bitsandbytes``: NF4 in blocks of 64 at load), ``bnb-int8`` (a bitsandbytes 8-bit checkpoint written here: int8 rows
and their absmax, run w8a16), ``gptq8-rtn`` / ``gptq3-rtn`` / ``gptq2-rtn`` (a GPTQ 8-, 3- or 2-bit checkpoint,
round-to-nearest codes with zero points per group of ``--group-size``) and ``ct-w8a16`` (compressed-tensors W8A16
``pack-quantized``, symmetric int8 per channel, as llm-compressor's W8A16 scheme; its W8A8 releases hold the same
weights), ``nvfp4`` (a ModelOpt NVFP4 checkpoint: e2m1 weights, an fp8 scale per 16 and a global scale, run
w4a16), ``mxfp8`` (a ModelOpt MXFP8 checkpoint: e4m3 weights, a power-of-two scale per 32 inputs, run w8a16).
For a GGUF model, ``gguf`` keeps its blocks (dequantized per call on CPU, the block GEMM on CUDA), and
``gguf-int4`` also repacks its Q4_0 / Q4_1 / Q4_K linear layers for the int4 kernels and its expert stacks as CUDA
does (``repack_for_int4_kernels``, ``repack_experts``, on any device here: int4 scales and zero points or offsets
rounded to the model dtype, the cost of that form; the 8-bit experts' form is exact). The reference is the model as
it loads by default (the default SmolLM2 GGUF is dequantized at load).

    python -m benchmarks.quant_quality --methods fp8 awq-rtn            # the default SmolLM2, on GPU or CPU
    python -m benchmarks.quant_quality --model .models/llama-3.1-8b --methods fp8 --max-tokens 2048
    python -m benchmarks.quant_quality --methods gguf gguf-int4 --dtype bfloat16   # the default SmolLM2's own blocks
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.json_lines import append_json_line
from core.layers.quantization import weight_bytes

DEFAULT_TEXT = Path(__file__).parent / "data" / "w6_passages.txt"
GPTQ_RTN = {"gptq8-rtn": 8, "gptq3-rtn": 3, "gptq2-rtn": 2}  # method -> bits
METHODS = ("fp8", "fp8-block", "awq-rtn", *GPTQ_RTN, "ct-w8a16", "nvfp4", "mxfp8", "bnb-nf4", "bnb-int8", "gguf",
           "gguf-int4")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_runner(model: str, args: argparse.Namespace, **overrides):
    """A model runner (its model only: the KV cache of the one forward pass is made here)."""
    from core.model_runner import ModelRunner
    from ipc.config import EngineConfig

    return ModelRunner(EngineConfig(model=model, dtype=args.dtype, device=args.device, enforce_eager=True,
                                    max_model_len=args.max_tokens, **overrides))


@torch.inference_mode()
def next_token_logprobs(runner, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """``[T, vocab]`` fp32 log-probabilities of the token after each position: one prefill of the whole text."""
    from core.layers.attention import AttentionMetadata

    cfg, device = runner.model_config, runner.device
    n = len(token_ids)
    num_blocks = -(-n // block_size) + 1  # block 0 unused, as in the engine
    shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [torch.zeros(shape, dtype=runner.dtype, device=device) for _ in range(cfg.num_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(block_size, block_size + n, device=device),
        block_tables=torch.arange(1, num_blocks, dtype=torch.int32, device=device)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        max_query_len=n,
    )
    ids = torch.tensor(token_ids, device=device)
    hidden = runner.model(ids, torch.arange(n, device=device), caches, meta)
    return runner.model.compute_logits(hidden).float().log_softmax(-1)


def write_quantized(source, directory: Path, quantize, quantization_config: dict, dtype: torch.dtype) -> Path:
    """The reference weights as a checkpoint whose linear projections ``quantize(name, weight)`` turns into that
    layer's checkpoint tensors (a dict), the other tensors in ``dtype``, with ``quantization_config``."""
    from safetensors.torch import save_file

    from core.loader import iter_weights, load_hf_config

    tensors = {}
    for name, tensor in iter_weights(source):
        if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
            tensors.update(quantize(name, tensor))
        else:
            tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    config = load_hf_config(source)
    config["quantization_config"] = quantization_config
    config["torch_dtype"] = config.get("torch_dtype") or "bfloat16"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return directory


def write_awq_rtn(source, directory: Path, group_size: int) -> Path:
    """The reference weights as an AutoAWQ GEMM checkpoint (round-to-nearest int4, zero points, fp16 scales)."""
    from kernels.int4_gemm import AWQ_ORDER, pack_int4_columns

    def quantize(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        w_t = tensor.float().t()  # [in, out]
        rows = w_t.reshape(w_t.shape[0] // group_size, group_size, w_t.shape[1])
        lo, hi = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
        scales = ((hi - lo) / 15).clamp(min=1e-8).half()
        zeros = torch.round(-lo / scales.float()).clamp(0, 15)
        codes = torch.clamp(torch.round(rows / scales.float()[:, None]) + zeros[:, None], 0, 15)
        prefix = name.removesuffix(".weight")
        return {f"{prefix}.qweight": pack_int4_columns(codes.reshape(w_t.shape).long(), AWQ_ORDER),
                f"{prefix}.qzeros": pack_int4_columns(zeros.long(), AWQ_ORDER), f"{prefix}.scales": scales}

    config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return write_quantized(source, directory, quantize, config, torch.float16)


def write_fp8_blocks(source, directory: Path, block: int) -> Path:
    """The reference weights as a block-scaled fp8 checkpoint (``weight_block_size`` ``[block, block]``,
    ``weight_scale_inv`` per block: the Qwen3 / DeepSeek FP8 layout)."""
    from kernels.fp8_block_gemm import quantize_fp8_blocks

    def quantize(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        weight, scale = quantize_fp8_blocks(tensor, (block, block))
        return {name: weight, name.removesuffix("weight") + "weight_scale_inv": scale}

    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [block, block]}
    return write_quantized(source, directory, quantize, config, torch.bfloat16)


def pack_codes(codes: torch.Tensor, dim: int, bits: int = 8) -> torch.Tensor:
    """``bits``-bit codes packed along ``dim`` in GPTQ's runs (``PACKINGS``: 8-bit four an int32, index ``4p + i``
    in byte ``i`` of word ``p``, as compressed-tensors' ``pack_to_int32`` too; 3-bit 32 in 3 int32s, 2-bit 16 in
    one), each run's words one little-endian bit stream of its codes."""
    from core.layers.quantization.gptq_bytes import PACKINGS

    count, words = PACKINGS[bits]
    codes = codes.long().movedim(dim, 0)
    runs = codes.reshape(codes.shape[0] // count, count, *codes.shape[1:])
    packed = torch.zeros(runs.shape[0], words, *codes.shape[1:], dtype=torch.int64)
    for j in range(count):
        word, shift = divmod(bits * j, 32)
        packed[:, word] |= (runs[:, j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:
            packed[:, word + 1] |= runs[:, j] >> (32 - shift)
    packed = packed.reshape(-1, *codes.shape[1:])
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same bits as int32
    return packed.movedim(0, dim).contiguous()


def write_gptq_rtn(source, directory: Path, group_size: int, bits: int = 8) -> Path:
    """The reference weights as a GPTQ ``bits``-bit checkpoint (round-to-nearest codes with zero points per group of
    ``group_size`` input rows, fp16 scales; v1's ``zero - 1`` in ``qzeros``)."""
    top = 2**bits - 1

    def quantize(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        w_t = tensor.float().t()  # [in, out]
        rows = w_t.reshape(w_t.shape[0] // group_size, group_size, w_t.shape[1])
        lo, hi = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
        scales = ((hi - lo) / (top - 1)).clamp(min=1e-8).half()
        zeros = (torch.round(-lo / scales.float()) + 1).clamp(1, top)  # from 1: v1's ``zero - 1`` never underflows
        codes = torch.clamp(torch.round(rows / scales.float()[:, None]) + zeros[:, None], 0, top)
        prefix = name.removesuffix(".weight")
        return {f"{prefix}.qweight": pack_codes(codes.reshape(w_t.shape).long(), 0, bits),
                f"{prefix}.qzeros": pack_codes(zeros.long() - 1, 1, bits), f"{prefix}.scales": scales,
                f"{prefix}.g_idx": (torch.arange(w_t.shape[0]) // group_size).to(torch.int32)}

    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": False,
              "checkpoint_format": "gptq"}
    return write_quantized(source, directory, quantize, config, torch.float16)


def write_ct_w8a16(source, directory: Path) -> Path:
    """The reference weights as a compressed-tensors W8A16 checkpoint (``pack-quantized``: symmetric int8 per output
    channel, four codes ``q + 128`` an int32 along the input, bf16 scales ``[out, 1]``)."""

    def quantize(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        w = tensor.float()
        scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-8).to(torch.bfloat16)
        codes = torch.clamp(torch.round(w / scale.float()), -127, 127).long() + 128
        prefix = name.removesuffix(".weight")
        return {f"{prefix}.weight_packed": pack_codes(codes, 1), f"{prefix}.weight_scale": scale,
                f"{prefix}.weight_shape": torch.tensor(list(w.shape))}

    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
                  "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}}}}
    return write_quantized(source, directory, quantize, config, torch.bfloat16)


def nvfp4_tensors(w: torch.Tensor, layout: str = "modelopt") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``[out, in]`` -> (one layer's NVFP4 tensors, named without the layer's prefix; its dequantized fp32 weight):
    e2m1 codes two a byte (low nibble first, the nearest of each value over its block's effective scale), an fp8
    scale per 16 weights (the block's absmax / 6 over the global scale) and the global scale: ModelOpt
    ``weight_scale_2 = amax / (6 * 448)`` multiplies, compressed-tensors ``weight_global_scale = 6 * 448 / amax``
    divides; with the W4A4 exports' activation scales (which the w4a16 layers drop). The tests' checkpoints use it."""
    from kernels.bnb4_gemm import E2M1_CODEBOOK

    table = torch.tensor(E2M1_CODEBOOK)
    blocks = w.float().reshape(w.shape[0], -1, 16)
    amax = w.float().abs().amax().clamp(min=1e-6)
    if layout == "modelopt":
        glob = amax / (6 * 448)
        scale = (blocks.abs().amax(-1) / (6 * glob)).to(torch.float8_e4m3fn)
        effective = scale.float() * glob
        tensors = {"weight_scale_2": glob.reshape(()), "input_scale": torch.tensor(0.01)}
    else:
        glob = 6 * 448 / amax
        scale = (blocks.abs().amax(-1) / 6 * glob).to(torch.float8_e4m3fn)
        effective = scale.float() / glob
        tensors = {"weight_global_scale": glob.reshape(1), "input_global_scale": torch.tensor([100.0])}
    effective = effective.clamp(min=1e-12)
    # each value's nearest code, a row at a time (a whole 8B layer's distances to 16 codes would not fit in memory)
    codes = torch.stack([((blocks[r] / effective[r, :, None])[..., None] - table).abs().argmin(-1)
                         for r in range(blocks.shape[0])]).reshape(w.shape[0], -1)  # fmt: skip
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    tensors |= {"weight" if layout == "modelopt" else "weight_packed": packed, "weight_scale": scale}
    return tensors, (table[codes].reshape(blocks.shape) * effective[..., None]).reshape(w.shape)


def mxfp8_tensors(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``[out, in]`` -> (one layer's ModelOpt MXFP8 tensors: ``weight`` e4m3 and ``weight_scale`` uint8 E8M0
    exponents ``e`` (``2 ** (e - 127)``, the smallest power of two per 32 inputs that keeps the block within e4m3);
    its dequantized fp32 weight). The tests' checkpoints use it."""
    blocks = w.float().reshape(w.shape[0], -1, 32)
    exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=2**-100) / 448))
    q = (blocks / torch.exp2(exponent)[..., None]).to(torch.float8_e4m3fn)
    plain = (q.float() * torch.exp2(exponent)[..., None]).reshape(w.shape)
    return {"weight": q.reshape(w.shape), "weight_scale": (exponent + 127).to(torch.uint8)}, plain


def write_modelopt(source, directory: Path, algo: str) -> Path:
    """The reference weights as a ModelOpt ``NVFP4`` (:func:`nvfp4_tensors`) or ``MXFP8`` (:func:`mxfp8_tensors`)
    checkpoint, every projection quantized."""
    tensors_of = {"NVFP4": nvfp4_tensors, "MXFP8": mxfp8_tensors}[algo]

    def quantize(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        prefix = name.removesuffix(".weight")
        return {f"{prefix}.{suffix}": t for suffix, t in tensors_of(tensor)[0].items()}

    config = {"quant_method": "modelopt", "quant_algo": algo, "group_size": 16, "exclude_modules": ["lm_head"]}
    return write_quantized(source, directory, quantize, config, torch.bfloat16)


def write_bnb_int8(source, directory: Path) -> Path:
    """The reference weights as a bitsandbytes 8-bit checkpoint (``Linear8bitLt``'s state dict: int8 ``weight``,
    ``SCB`` row absmax, ``weight_format`` 0)."""
    from kernels.int8_gemm import quantize_int8_rows

    def quantize(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        prefix = name.removesuffix(".weight")
        codes, absmax = quantize_int8_rows(tensor)
        return {name: codes, f"{prefix}.SCB": absmax, f"{prefix}.weight_format": torch.tensor(0, dtype=torch.uint8)}

    config = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": 6.0}
    return write_quantized(source, directory, quantize, config, torch.bfloat16)


def repack_q4_layers(model: torch.nn.Module) -> int:
    """Repack every GGUF Q4_0 / Q4_1 / Q4_K linear layer still in its blocks for the int4 kernels, and every expert
    stack for its faster kernel, as loading on CUDA does; how many were."""
    from core.layers.quantization.gguf import (BLOCKS, GGUFLinearMethod, GGUFMoEMethod, repack_experts,
                                               repack_for_int4_kernels)  # fmt: skip
    from kernels.gguf_gemm import INT4_TYPES

    count = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, GGUFLinearMethod) and method.ggml_type in INT4_TYPES and hasattr(module, "weight"):
            count += repack_for_int4_kernels(module, method.ggml_type)
        elif isinstance(method, GGUFMoEMethod):
            before = module.stack_kinds.count(BLOCKS)
            count += before - repack_experts(module, method.types).count(BLOCKS)
    return count


def compare(reference: torch.Tensor, quantized: torch.Tensor) -> dict:
    """Mean KL(reference || quantized) in nats per token, and how often the argmax agrees."""
    kl = (reference.exp() * (reference - quantized)).sum(-1)
    return {"mean_kl": kl.mean().item(), "max_kl": kl.max().item(),
            "top1_agreement": (reference.argmax(-1) == quantized.argmax(-1)).float().mean().item()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory, .gguf file or HF id (default: SmolLM2)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["fp8", "awq-rtn"])
    p.add_argument("--text-file", default=str(DEFAULT_TEXT))
    p.add_argument("--tokenizer", default=None, help="tokenizer of the text (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens of the text scored (from its start)")
    p.add_argument("--group-size", type=int, default=64,
                   help="awq-rtn / gptq*-rtn group size (must divide every input size)")
    p.add_argument("--fp8-block", type=int, default=64,
                   help="fp8-block's square block (must divide the merged projections' parts; 128 in Qwen3 FP8)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="append the results (one JSON object) to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    from core.tokenizer import encode, load_tokenizer

    reference_runner = load_runner(args.model, args)
    tokenizer = load_tokenizer(reference_runner.source, args.tokenizer)
    token_ids = encode(tokenizer, Path(args.text_file).read_text())[: args.max_tokens]
    reference = next_token_logprobs(reference_runner, token_ids)
    rows = [{"method": "none", "weight_bytes": weight_bytes(reference_runner.model), "mean_kl": 0.0, "max_kl": 0.0,
             "top1_agreement": 1.0}]
    source = reference_runner.source
    with tempfile.TemporaryDirectory(prefix="pagedserve-quality-") as tmp:
        for method in args.methods:
            start = time.perf_counter()
            if method == "fp8":
                runner = load_runner(args.model, args, quantization="fp8")
            elif method in ("gguf", "gguf-int4"):
                runner = load_runner(args.model, args, quantization="gguf")
                if method == "gguf-int4":
                    print(f"gguf-int4: {repack_q4_layers(runner.model)} Q4_0 / Q4_1 / Q4_K layers and expert "
                          "stacks repacked")
            elif method == "bnb-nf4":
                runner = load_runner(args.model, args, quantization="bitsandbytes")
            elif method == "bnb-int8":
                runner = load_runner(str(write_bnb_int8(source, Path(tmp) / "bnb-int8")), args)
            elif method in GPTQ_RTN:
                path = write_gptq_rtn(source, Path(tmp) / method, args.group_size, GPTQ_RTN[method])
                runner = load_runner(str(path), args)
            elif method in ("nvfp4", "mxfp8"):
                runner = load_runner(str(write_modelopt(source, Path(tmp) / method, method.upper())), args)
            elif method == "ct-w8a16":
                runner = load_runner(str(write_ct_w8a16(source, Path(tmp) / "ct-w8a16")), args)
            elif method == "fp8-block":
                path = write_fp8_blocks(source, Path(tmp) / "fp8-block", args.fp8_block)
                runner = load_runner(str(path), args)
            else:
                path = write_awq_rtn(source, Path(tmp) / "awq-rtn", args.group_size)
                runner = load_runner(str(path), args)
            logprobs = next_token_logprobs(runner, token_ids)
            rows.append({"method": method, "weight_bytes": weight_bytes(runner.model),
                         **compare(reference, logprobs), "seconds": time.perf_counter() - start})
            del runner
    print(f"{len(token_ids)} tokens of {Path(args.text_file).name}, model {source.name} "
          f"({str(reference_runner.dtype).removeprefix('torch.')}, {reference_runner.device})")
    print(f"{'method':>9} {'weights MB':>11} {'mean KL':>10} {'max KL':>9} {'top-1 agree':>12}")
    for r in rows:
        print(f"{r['method']:>9} {r['weight_bytes'] / 1e6:>11.1f} {r['mean_kl']:>10.5f} {r['max_kl']:>9.4f} "
              f"{r['top1_agreement']:>12.4f}")
    append_json_line(args.json, {"model": source.name, "tokens": len(token_ids), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
