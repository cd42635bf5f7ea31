"""Quantized checkpoints round trip: tiny Llama checkpoints written in the real on-disk formats (AutoAWQ GEMM, GPTQ
v1 with and without act-order, fp8 and compressed-tensors float8, each packed here with the published bit orders)
load and run, and their logprobs and greedy tokens match the same model saved with the dequantized weights.

int4 runs dequantize-then-matmul on CPU, so it matches the dequantized model to float rounding. fp8 also quantizes
the activations (as the GPU GEMM does): its first-step logprobs are within fp8's error of the dequantized model, and
its greedy tokens and logprobs equal the dequantized model's run with the same activation quantization (online fp8,
exact on these weights: every row of a tensor has the same max, so per-tensor and per-channel scales coincide).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks.quant_quality import mxfp8_tensors, nvfp4_tensors, pack_codes
from ipc.messages import SamplingParams
from kernels.fp8_block_gemm import dequantize_fp8_blocks, quantize_fp8_blocks
from tests.core.engine_utils import make_engine, run_engine

HIDDEN, INTER = 128, 256  # group sizes 32, 64 and 128 all divide both input sizes
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [[5, 17, 33, 2, 99, 140], [7] * 3, list(range(40, 60)), [300, 12, 250, 8, 77]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map


def base_checkpoint(hidden: int = HIDDEN, arch: str = "llama", **overrides) -> tuple[dict, dict[str, torch.Tensor]]:
    """A tiny random Llama (``hidden`` wide), or another family's tiny model (``tests/tiny_models.py``: 64 wide,
    MLP 128, so groups of 32 and 64 divide every input size; ``overrides``: its config fields)."""
    import transformers

    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=hidden, intermediate_size=INTER,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                                       initializer_range=0.1, tie_word_embeddings=False)
    else:
        from tests.tiny_models import hf_config

        cfg = hf_config(arch, **{"vocab_size": 384, "initializer_range": 0.1, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    config = {**cfg.to_dict(), "architectures": [type(model).__name__], "torch_dtype": "float32"}
    return config, per_expert({k: v.detach().clone() for k, v in model.state_dict().items()})


def per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's fused expert tensors (``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) as
    the per-expert ``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`` tensors quantized checkpoints hold."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = name.removesuffix("gate_up_proj"), tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = tensor[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = tensor[e, inter:].clone()
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = tensor[e].clone()
        else:
            out[name] = tensor
    return out


def save(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return directory


def quantized_layers(state: dict[str, torch.Tensor]):
    """The linear layers' weights: Llama's projections, Phi-3's fused ones, StarCoder2's MLP, GPT-2's (Conv1D:
    stored ``[in, out]``), GPT-NeoX's and Falcon's."""
    kinds = (*PROJECTIONS, "qkv_proj", "gate_up_proj", "c_fc", "c_proj", "c_attn", "query_key_value", "dense",
             "dense_h_to_4h", "dense_4h_to_h")
    return [name for name in state if name.endswith(".weight") and name.split(".")[-2] in kinds]


def _tag(arch: str, name: str) -> str:
    return name if arch == "llama" else f"{arch}-{name}"


def as_int32(bits: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns (int64) -> int32 with the same bits, as the packers' uint32 arrays are saved."""
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)


# ---------------------------------------------------------------------------------------------------- packers
def awq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM packing of ``[rows, cols]`` int4 values into ``[rows, cols / 8]`` int32."""
    packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int64)
    for col in range(packed.shape[1]):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]].long() << (i * 4)
    return as_int32(packed)


def gptq_pack_rows(intweight: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's QuantLinear.pack for qweight: ``[in, out]`` -> ``[in / 8, out]``, row ``8r + j`` at bits 4j."""
    packed = torch.zeros(intweight.shape[0] // 8, intweight.shape[1], dtype=torch.int64)
    for row in range(packed.shape[0]):
        for j in range(8):
            packed[row] |= intweight[row * 8 + j].long() << (4 * j)
    return as_int32(packed)


def gptq_pack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's qzeros: ``zeros - 1`` (the v1 format), column ``8c + j`` at bits 4j."""
    zeros = zeros.long() - 1
    packed = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int64)
    for col in range(packed.shape[1]):
        for j in range(8):
            packed[:, col] |= zeros[:, col * 8 + j] << (4 * j)
    return as_int32(packed)


def autogptq_pack(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's QuantLinear.pack loop along the first dim for 2 or 3 bits (3: 32 values in 3 words, values 10 and
    21 split between two words), literally: ``[rows, cols]`` -> ``[rows * bits / 32, cols]`` int32."""
    intweight = intweight.long()
    packed = torch.zeros(intweight.shape[0] * bits // 32, intweight.shape[1], dtype=torch.int64)
    i = row = 0
    while row < packed.shape[0]:
        if bits == 2:
            for j in range(i, i + 16):
                packed[row] |= intweight[j] << (2 * (j - i))
            i += 16
            row += 1
            continue
        for j in range(i, i + 10):
            packed[row] |= intweight[j] << (3 * (j - i))
        i += 10
        packed[row] |= intweight[i] << 30
        row += 1
        packed[row] |= (intweight[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            packed[row] |= intweight[j] << (3 * (j - i) + 1)
        i += 10
        packed[row] |= intweight[i] << 31
        row += 1
        packed[row] |= (intweight[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            packed[row] |= intweight[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return as_int32(packed & 0xFFFFFFFF)


def round_to_nearest(w_t: torch.Tensor, group_of_row: torch.Tensor, groups: int, sym: bool, bits: int = 4):
    """Round-to-nearest ``bits``-bit codes of ``w_t [in, out]`` per (group, column): codes, zero points (from 1, so
    GPTQ's v1 ``zero - 1`` never underflows; symmetric: the middle code), fp16 scales, and the dequantized fp32
    weight."""
    top = 2**bits - 1
    scales = torch.empty(groups, w_t.shape[1])
    zeros = torch.empty(groups, w_t.shape[1], dtype=torch.long)
    for g in range(groups):
        rows = w_t[group_of_row == g]
        if sym:
            scales[g] = rows.abs().amax(0).clamp(min=1e-6) / (top // 2)
            zeros[g] = top // 2 + 1
        else:
            lo, hi = rows.amin(0).clamp(max=0), rows.amax(0).clamp(min=0)
            scales[g] = ((hi - lo) / (top - 1)).clamp(min=1e-6)
            zeros[g] = (torch.round(-lo / scales[g]) + 1).clamp(1, top).long()
    scales = scales.half()
    s, z = scales.float()[group_of_row], zeros[group_of_row]
    codes = torch.clamp(torch.round(w_t / s) + z, 0, top).long()
    return codes, zeros, scales, (codes - z).float() * s


def write_awq(tmp: Path, group: int, arch: str = "llama", **overrides) -> tuple[Path, Path]:
    config, state = base_checkpoint(arch=arch, **overrides)
    quant, plain = dict(state), dict(state)
    for name in quantized_layers(state):
        w_t = state[name].t()
        rows = torch.arange(w_t.shape[0]) // group
        codes, zeros, scales, deq = round_to_nearest(w_t, rows, w_t.shape[0] // group, sym=False)
        prefix = name.removesuffix(".weight")
        del quant[name]
        quant |= {f"{prefix}.qweight": awq_pack(codes), f"{prefix}.qzeros": awq_pack(zeros),
                  f"{prefix}.scales": scales}
        plain[name] = deq.t()
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    tag = _tag(arch, f"awq-{group}")
    return (save(tmp / tag, {**config, "quantization_config": qc}, quant),
            save(tmp / f"{tag}-dequantized", config, plain))


def write_gptq(tmp: Path, group: int, desc_act: bool, sym: bool, arch: str = "llama", bits: int = 4,
               checkpoint_format: str = "gptq", lm_head: bool = False, **overrides) -> tuple[Path, Path]:  # fmt: skip
    """A GPTQ v1 checkpoint (AutoGPTQ's packing: 4-bit codes eight an int32, 8-bit four, 2-bit sixteen, 3-bit
    thirty-two in three; input rows in ``qweight``, output columns in ``qzeros``, which hold ``zero - 1``;
    ``gptq_v2``: the zero points themselves), round-to-nearest per group (-1: one group); ``lm_head``: the LM head
    quantized too (GPTQModel's ``lm_head: true``)."""
    config, state = base_checkpoint(arch=arch, **overrides)
    quant, plain = dict(state), dict(state)
    gen = torch.Generator().manual_seed(group if bits == 4 else group + 8)
    g_idx_of_input: dict[int, torch.Tensor] = {}  # q/k/v (and gate/up) share their input, so their g_idx
    v2 = int(checkpoint_format == "gptq_v2")  # added back before the v1 packers subtract 1
    for name in quantized_layers(state) + (["lm_head.weight"] if lm_head else []):
        w_t = state[name].t()
        k = w_t.shape[0]
        shared = name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
        key = (name.split(".")[2], name.split(".")[-3], k) if shared else name
        size = k if group == -1 else group
        if key not in g_idx_of_input:
            natural = torch.arange(k) // size
            g_idx_of_input[key] = natural[torch.randperm(k, generator=gen)] if desc_act else natural
        g_idx = g_idx_of_input[key]
        codes, zeros, scales, deq = round_to_nearest(w_t, g_idx, k // size, sym=sym, bits=bits)
        prefix = name.removesuffix(".weight")
        del quant[name]
        if bits == 4:
            packed = gptq_pack_rows(codes), gptq_pack_zeros(zeros + v2)
        elif bits == 8:
            packed = pack_codes(codes, 0), pack_codes(zeros - 1 + v2, 1)
        else:
            packed = autogptq_pack(codes, bits), autogptq_pack((zeros - 1 + v2).t(), bits).t()
        quant |= {f"{prefix}.qweight": packed[0], f"{prefix}.qzeros": packed[1], f"{prefix}.scales": scales,
                  f"{prefix}.g_idx": g_idx.to(torch.int32)}
        plain[name] = deq.t()
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
          "checkpoint_format": checkpoint_format, "lm_head": lm_head}
    tag = _tag(arch, f"gptq{'' if bits == 4 else bits}-{group}-{'act' if desc_act else 'seq'}-{'sym' if sym else 'zp'}"
                     f"{'-v2' if v2 else ''}{'-head' if lm_head else ''}")
    return (save(tmp / tag, {**config, "quantization_config": qc}, quant),
            save(tmp / f"{tag}-dequantized", config, plain))


def write_gptq_dynamic(tmp: Path) -> tuple[Path, Path]:
    """A GPTQ checkpoint with GPTQModel's ``dynamic`` rules: layer 1's MLP 8-bit in groups of 64 (``+:``), layer 0's
    o_proj left 16-bit (``-:``), every other layer the config's 4-bit groups of 32 (zero points, no act order)."""
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path / "model.safetensors"))

    (four, four_plain), (eight, eight_plain) = write_gptq(tmp, 32, False, False), write_gptq(tmp, 64, False, False,
                                                                                              bits=8)  # fmt: skip
    quant, plain = tensors(four), tensors(four_plain)
    mlp1 = "model.layers.1.mlp."
    quant = {n: t for n, t in quant.items() if not n.startswith(mlp1)} | {
        n: t for n, t in tensors(eight).items() if n.startswith(mlp1)}
    plain |= {n: t for n, t in tensors(eight_plain).items() if n.startswith(mlp1)}
    o_proj = "model.layers.0.self_attn.o_proj"
    quant = {n: t for n, t in quant.items() if not n.startswith(f"{o_proj}.")}
    quant[f"{o_proj}.weight"] = plain[f"{o_proj}.weight"] = base_checkpoint()[1][f"{o_proj}.weight"]
    config = json.loads((four / "config.json").read_text())
    config["quantization_config"]["dynamic"] = {rf"-:{re.escape(o_proj)}$": {},
                                                rf"+:{re.escape(mlp1)}.*": {"bits": 8, "group_size": 64}}
    plain_config = {k: v for k, v in config.items() if k != "quantization_config"}
    return save(tmp / "gptq-dynamic", config, quant), save(tmp / "gptq-dynamic-dequantized", plain_config, plain)


def write_gptq8(tmp: Path, group: int, desc_act: bool, sym: bool, arch: str = "llama", **overrides
                ) -> tuple[Path, Path]:  # fmt: skip
    return write_gptq(tmp, group, desc_act, sym, arch, bits=8, **overrides)


def ct_pack(codes: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` of unsigned 4-bit codes ``[out, in]`` along the input dim: nibble ``i``
    of word ``j`` holds input ``8j + i``."""
    packed = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64)
    for i in range(8):
        packed |= codes[:, i::8].long() << (4 * i)
    return as_int32(packed)


def write_ct_int4(tmp: Path, group: int, actorder: bool, arch: str = "llama", activations: str | None = None,
                  **overrides) -> tuple[Path, Path]:  # fmt: skip
    """A compressed-tensors W4A16 checkpoint (llm-compressor's ``pack-quantized``: symmetric int4 stored as ``q +
    8``, fp16 scales ``[out, in / group]``, ``weight_shape``; with group act-order a ``weight_g_idx``)."""
    config, state = base_checkpoint(arch=arch, **overrides)
    quant, plain = dict(state), dict(state)
    gen = torch.Generator().manual_seed(group)
    g_idx_of_input: dict = {}  # layers reading one input (q/k/v, gate/up) share its act order, as GPTQ's do
    for name in quantized_layers(state):
        w = state[name]  # [out, in]
        k = w.shape[1]
        natural = torch.arange(k) // group
        key = (name.split(".")[2], name.split(".")[-3], k)
        if key not in g_idx_of_input:
            g_idx_of_input[key] = natural[torch.randperm(k, generator=gen)] if actorder else natural
        g_idx = g_idx_of_input[key]
        scales = torch.stack([w[:, g_idx == g].abs().amax(1) for g in range(k // group)], 1).clamp(min=1e-6) / 7
        scales = scales.half()
        s_per_col = scales.float()[:, g_idx]
        q = torch.clamp(torch.round(w / s_per_col), -8, 7)
        prefix = name.removesuffix(".weight")
        del quant[name]
        quant |= {f"{prefix}.weight_packed": ct_pack((q + 8).long()), f"{prefix}.weight_scale": scales,
                  f"{prefix}.weight_shape": torch.tensor(list(w.shape))}
        if actorder:
            quant[f"{prefix}.weight_g_idx"] = g_idx.to(torch.int32)
        plain[name] = q * s_per_col
    acts = None if activations is None else {"num_bits": 8, "type": activations, "symmetric": True,
                                             "strategy": "token", "dynamic": True}  # W4A8: fp8 or int8 per token
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": acts, "weights": {
              "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
              "actorder": "group" if actorder else None}}}}
    tag = _tag(arch, f"ct-w4a{16 if activations is None else 8}-{group}{'-act' if actorder else ''}")
    return (save(tmp / tag, {**config, "quantization_config": qc}, quant),
            save(tmp / f"{tag}-dequantized", config, plain))


def write_ct_int8(tmp: Path, group: int, actorder: bool, fmt: str = "pack-quantized", activations: str | None = None,
                  arch: str = "llama", lm_head: bool = False, **overrides) -> tuple[Path, Path]:  # fmt: skip
    """A compressed-tensors 8-bit checkpoint: W8A16 ``pack-quantized`` (``pack_to_int32``: four codes ``q + 128`` an
    int32 along the input, ``weight_shape``) or ``int-quantized`` (int8 ``weight`` with all-zero
    ``weight_zero_point``), symmetric scales ``[out, in / group]`` (``group`` -1: per channel), with group act-order a
    ``weight_g_idx``; ``activations`` ``dynamic`` / ``static``: a W8A8 scheme (static: an ``input_scale`` per
    layer); ``lm_head``: the LM head quantized too (not in the scheme's ignore list)."""
    config, state = base_checkpoint(arch=arch, **overrides)
    quant, plain = dict(state), dict(state)
    gen = torch.Generator().manual_seed(group + 100)
    g_idx_of_input: dict = {}  # layers reading one input (q/k/v, gate/up) share its act order
    for name in quantized_layers(state) + (["lm_head.weight"] if lm_head else []):
        w = state[name]  # [out, in]
        k = w.shape[1]
        size = k if group == -1 else group
        natural = torch.arange(k) // size
        key = (name.split(".")[2], name.split(".")[-3], k) if name.count(".") >= 3 else (name, k)  # lm_head's own
        if key not in g_idx_of_input:
            g_idx_of_input[key] = natural[torch.randperm(k, generator=gen)] if actorder else natural
        g_idx = g_idx_of_input[key]
        scales = torch.stack([w[:, g_idx == g].abs().amax(1) for g in range(k // size)], 1).clamp(min=1e-6) / 127
        scales = scales.to(torch.bfloat16)
        s_per_col = scales.float()[:, g_idx]
        q = torch.clamp(torch.round(w / s_per_col), -127, 127)
        prefix = name.removesuffix(".weight")
        del quant[name]
        if fmt == "pack-quantized":
            quant |= {f"{prefix}.weight_packed": pack_codes(q.long() + 128, 1),
                      f"{prefix}.weight_shape": torch.tensor(list(w.shape))}
        else:
            quant |= {f"{prefix}.weight": q.to(torch.int8),
                      f"{prefix}.weight_zero_point": torch.zeros(w.shape[0], k // size, dtype=torch.int8)}
        quant[f"{prefix}.weight_scale"] = scales
        if actorder:
            quant[f"{prefix}.weight_g_idx"] = g_idx.to(torch.int32)
        if activations == "static":
            quant[f"{prefix}.input_scale"] = torch.tensor([0.02], dtype=torch.float32)
        plain[name] = q * s_per_col
    strategy = {"strategy": "channel"} if group == -1 else {"strategy": "group", "group_size": group}
    acts = None if activations is None else {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token"
                                             if activations == "dynamic" else "tensor",
                                             "dynamic": activations == "dynamic"}  # fmt: skip
    qc = {"quant_method": "compressed-tensors", "format": fmt, "ignore": [] if lm_head else ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": acts, "weights": {
              "num_bits": 8, "type": "int", "symmetric": True, **strategy, "actorder": "group" if actorder else None}}}}
    tag = _tag(arch, f"ct-w8a{16 if activations is None else 8}-{group}-{fmt}{'-act' if actorder else ''}"
                     f"{'-head' if lm_head else ''}")
    return (save(tmp / tag, {**config, "quantization_config": qc}, quant),
            save(tmp / f"{tag}-dequantized", config, plain))


def write_nvfp4(tmp: Path, layout: str, arch: str = "llama", **overrides) -> tuple[Path, Path]:
    """An NVFP4 checkpoint: ModelOpt (``quant_method: modelopt``, ``quant_algo: NVFP4``; ``modelopt-w4a16``:
    ``W4A16_NVFP4``, the same tensors) or compressed-tensors ``nvfp4-pack-quantized`` (W4A4: its activation scales
    too), every linear layer but the LM head."""
    config, state = base_checkpoint(arch=arch, **overrides)
    quant, plain = dict(state), dict(state)
    for name in quantized_layers(state):
        tensors, plain[name] = nvfp4_tensors(state[name], layout.removesuffix("-w4a16"))
        prefix = name.removesuffix(".weight")
        del quant[name]
        quant |= {f"{prefix}.{suffix}": t for suffix, t in tensors.items()}
    if layout.startswith("modelopt"):
        algo = "W4A16_NVFP4" if layout == "modelopt-w4a16" else "NVFP4"
        qc = {"quant_method": "modelopt", "quant_algo": algo, "group_size": 16, "exclude_modules": ["lm_head"]}
    else:
        fp4 = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16}
        qc = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": fp4 | {"dynamic": False},
                                            "input_activations": fp4 | {"dynamic": "local"}}}}
    tag = _tag(arch, f"nvfp4-{layout}")
    return (save(tmp / tag, {**config, "quantization_config": qc}, quant),
            save(tmp / f"{tag}-dequantized", config, plain))


def write_bnb(tmp: Path, quant_type: str, nested: bool, arch: str = "llama", **overrides) -> tuple[Path, Path]:
    """A bitsandbytes ``load_in_4bit`` checkpoint as transformers saves it: codes ``[out * in / 2, 1]`` (two a byte,
    high nibble first), ``.absmax`` per 64 weights (``nested``: 8-bit codes into ``.nested_quant_map`` times
    ``.nested_absmax`` per 256 blocks plus the state's offset), ``.quant_map`` and the JSON quant state. A MoE's
    routers are quantized too, as transformers does every Linear but the LM head."""
    from kernels.bnb4_gemm import NF4_CODEBOOK, dequantize_bnb4, quantize_bnb4
    from tests.kernels.test_bnb4_gemm import FP4_CODEBOOK

    codebook = NF4_CODEBOOK if quant_type == "nf4" else FP4_CODEBOOK
    table = torch.tensor(codebook)
    config, state = base_checkpoint(arch=arch, **overrides)
    quant, plain = dict(state), dict(state)
    router_names = (".mlp.gate.weight", ".block_sparse_moe.gate.weight", ".mlp.shared_expert_gate.weight")
    routers = [name for name in state if name.endswith(router_names)]
    for name in quantized_layers(state) + routers:
        w = state[name]
        codes, absmax = quantize_bnb4(w, 64, codebook)
        meta = {"quant_type": quant_type, "blocksize": 64, "dtype": "float32", "shape": list(w.shape)}
        quant[name] = codes.reshape(-1, 1)
        quant[f"{name}.quant_map"] = table.clone()
        if nested:
            flat = absmax.flatten()
            offset = flat.mean().item()
            nested_map = torch.linspace(-1, 1, 256)
            groups = (flat - offset).split(256)
            nested_absmax = torch.stack([g.abs().max() for g in groups])
            scaled = torch.cat([g / m for g, m in zip(groups, nested_absmax)])
            absmax_codes = (scaled[:, None] - nested_map).abs().argmin(1).to(torch.uint8)
            absmax = (nested_map[absmax_codes.long()] * nested_absmax.repeat_interleave(256)[: flat.numel()]
                      + offset).reshape(absmax.shape)  # fmt: skip
            meta |= {"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": offset}
            quant |= {f"{name}.absmax": absmax_codes, f"{name}.nested_absmax": nested_absmax,
                      f"{name}.nested_quant_map": nested_map.clone()}
        else:
            quant[f"{name}.absmax"] = absmax.flatten()
        blob = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        quant[f"{name}.quant_state.bitsandbytes__{quant_type}"] = blob
        plain[name] = dequantize_bnb4(codes, absmax, table, 64)
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
          "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": nested,
          "bnb_4bit_compute_dtype": "float32", "llm_int8_skip_modules": None}
    tag = _tag(arch, f"bnb-{quant_type}{'-nested' if nested else ''}")
    return (save(tmp / tag, {**config, "quantization_config": qc}, quant),
            save(tmp / f"{tag}-dequantized", config, plain))


def write_bnb8(tmp: Path, arch: str = "llama", routers: bool = False, **overrides) -> tuple[Path, Path]:
    """A bitsandbytes ``load_in_8bit`` checkpoint as transformers saves it (``Linear8bitLt``'s state dict): int8
    ``weight`` (``round(127 * W / absmax)`` per row), fp32 ``SCB`` (each row's absmax) and ``weight_format`` 0
    (row-major); ``routers``: MoE routers (and Qwen2-MoE's shared-expert gate) quantized too, as transformers
    does."""
    from kernels.int8_gemm import quantize_int8_rows

    config, state = base_checkpoint(arch=arch, **overrides)
    quant, plain = dict(state), dict(state)
    gates = [name for name in state if routers and name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight",
                                                                     ".mlp.shared_expert_gate.weight"))]
    for name in quantized_layers(state) + gates:
        codes, absmax = quantize_int8_rows(state[name])
        prefix = name.removesuffix(".weight")
        quant |= {name: codes, f"{prefix}.SCB": absmax, f"{prefix}.weight_format": torch.tensor(0, dtype=torch.uint8)}
        plain[name] = codes.float() * absmax[:, None] / 127
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True, "llm_int8_threshold": 6.0,
          "llm_int8_skip_modules": None, "llm_int8_has_fp16_weight": False}
    tag = _tag(arch, "bnb-int8")
    return (save(tmp / tag, {**config, "quantization_config": qc}, quant),
            save(tmp / f"{tag}-dequantized", config, plain))


FP8 = torch.float8_e4m3fn


FP8_BLOCK = (32, 32)  # the tiny models' scale blocks (Qwen3 / DeepSeek checkpoints: 128 x 128)


def write_fp8(tmp: Path, layout: str, arch: str = "llama") -> tuple[Path, Path]:
    """``layout``: ``fp8`` (AutoFP8: per-tensor scales, dynamic activations), ``fp8-static`` (with input_scale),
    ``ct-channel`` (compressed-tensors FP8_DYNAMIC: [out, 1] scales), ``ct-tensor-static``, ``ct-channel-w8a16`` /
    ``ct-tensor-w8a16`` (compressed-tensors FP8 W8A16: no activation scheme), ``block`` (Qwen3 / DeepSeek FP8:
    ``weight_block_size`` and ``weight_scale_inv`` per block) or ``ct-block`` (compressed-tensors FP8_BLOCK)."""
    config, state = base_checkpoint(arch=arch)
    quant, plain = dict(state), dict(state)
    for name in quantized_layers(state):
        if layout.endswith("block"):
            q, scale = quantize_fp8_blocks(state[name], FP8_BLOCK)
            quant[name] = q
            scale_name = "weight_scale" if layout == "ct-block" else "weight_scale_inv"
            quant[name.removesuffix("weight") + scale_name] = scale
            plain[name] = dequantize_fp8_blocks(q, scale, FP8_BLOCK)
            continue
        w = state[name]
        w = w / w.abs().amax(1, keepdim=True) * w.abs().amax()  # rows share their max: see the module docstring
        if layout.startswith("ct-channel"):
            scale = w.abs().amax(1, keepdim=True) / 448
        else:
            scale = w.abs().amax().reshape(() if layout.startswith("fp8") else (1,)) / 448
        q = (w / scale).clamp(-448, 448).to(FP8)
        prefix = name.removesuffix(".weight")
        quant[name] = q
        quant[f"{prefix}.weight_scale"] = scale.float()
        if layout.endswith("static"):
            quant[f"{prefix}.input_scale"] = torch.tensor(0.02).reshape(() if layout.startswith("fp8") else (1,))
        plain[name] = q.float() * scale
    if layout == "block":
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": FP8_BLOCK}
    elif layout == "ct-block":
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {
                  "targets": ["Linear"],
                  "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                              "strategy": "block", "block_structure": list(FP8_BLOCK)},
                  "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                        "strategy": "group", "group_size": FP8_BLOCK[1]}}}}
    elif layout.startswith("fp8"):
        qc = {"quant_method": "fp8", "activation_scheme": "static" if layout.endswith("static") else "dynamic"}
    else:
        static = layout.endswith("static")
        acts = None if layout.endswith("w8a16") else {
            "num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
            "strategy": "tensor" if static else "token"}
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {
                  "targets": ["Linear"],
                  "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                              "strategy": "channel" if layout.startswith("ct-channel") else "tensor"},
                  "input_activations": acts}}}
    tag = _tag(arch, layout)
    return (save(tmp / tag, {**config, "quantization_config": qc}, quant),
            save(tmp / f"{tag}-dequantized", config, plain))


# ---------------------------------------------------------------------------------------------------- checks
def greedy(path: Path, **kwargs):
    """The prompts' greedy results, on the CPU unless the test asks for ``device="cuda"``: the tolerances of the
    CPU tests here are the torch reference path's (on a GPU host the engine would otherwise pick the GPU kernels)."""
    kwargs.setdefault("device", "cpu")
    engine = make_engine(path, **kwargs)
    results = run_engine(engine, PROMPTS, GREEDY)
    return engine, [results[(i, 0)] for i in range(len(PROMPTS))]


def logprob_error(ours: list[dict], reference: list[dict], steps: int | None = None) -> float:
    """Largest |difference| of the logprobs both top-5s hold over the first ``steps`` steps of every prompt (inf
    when our top-5 lacks the reference's top token)."""
    worst = 0.0
    for a, b in zip(ours, reference):
        for step_a, step_b in list(zip(a["logprobs"], b["logprobs"]))[:steps]:
            if max(step_b, key=step_b.get) not in step_a:
                return float("inf")
            for token in step_a.keys() & step_b.keys():
                worst = max(worst, abs(step_a[token] - step_b[token]))
    return worst


def assert_within_bf16_error(ours: list[dict], dequantized: Path, factor: float = 1.5, margin: float = 0.03) -> None:
    """A bf16 GPU run's first-step logprobs no further from the exact (fp32) dequantized model than ``factor`` times
    bf16's own rounding of it is, plus ``margin``. On these tiny random models bf16 alone moves logprobs by 0.02-0.2
    (more on the 256-wide MoEs: a rounding early in the network grows), so two bf16 runs compared with each other
    would double it, and a kernel that rounds differently (the byte-codes GEMV never rounds the weight) lands
    anywhere within it. A wrong scale or layout moves them by whole units, or changes the top token (inf)."""
    _, reference = greedy(dequantized, dtype="bfloat16", device="cuda")
    _, exact = greedy(dequantized, dtype="float32", device="cuda")
    bound = factor * logprob_error(reference, exact, steps=1) + margin
    assert logprob_error(ours, exact, steps=1) <= bound


def compare(quantized: Path, dequantized: Path, logprob_atol: float, reference_kwargs=None, **kwargs):
    """Greedy tokens equal and logprobs within ``logprob_atol`` of the dequantized model's."""
    engine, ours = greedy(quantized, **kwargs)
    _, reference = greedy(dequantized, **(reference_kwargs or {}))
    assert [a["tokens"] for a in ours] == [b["tokens"] for b in reference]
    worst = logprob_error(ours, reference)
    assert worst <= logprob_atol, f"logprobs differ by {worst:.2e} > {logprob_atol:.0e}"
    return engine, ours


def linears(engine):
    return [m for m in engine.runner.model.modules() if getattr(m, "quant_method", None) is not None]


@pytest.mark.parametrize("group", [32, 64, 128])
def test_awq_checkpoint_matches_dequantized_model(tmp_path, group):
    engine, _ = compare(*write_awq(tmp_path, group), logprob_atol=1e-4)
    layers = linears(engine)
    assert len(layers) == 2 * 4 and all(layer.qweight.dtype == torch.int32 for layer in layers)


@pytest.mark.parametrize("case", ["awq", "gptq-act"])
def test_int4_layers_in_the_tiled_layout_match_the_dequantized_model(tmp_path, monkeypatch, case):
    """Where the Gluon GEMV serves decode rows (a GPU) the int4 layers but qkv take the tiled layout (``tile_int4``);
    here it is forced on the CPU, whose reference path reads it too: the same tokens and logprobs as the
    dequantized model, the qkv projections (their GEMV's rotary epilogue reads the plain layout) left as they were."""
    import core.layers.quantization.int4 as int4_method
    from kernels.int4_gemm import tiling_supported

    monkeypatch.setattr(int4_method, "tiled_layout_pays",
                        lambda q, s, g: tiling_supported(q.shape[0], q.shape[1] * 8, g))
    make = {"awq": lambda: write_awq(tmp_path, 128), "gptq-act": lambda: write_gptq(tmp_path, 128, True, False)}
    engine, _ = compare(*make[case](), logprob_atol=1e-4)
    tiled = {name.rsplit(".", 1)[-1]: layer.tiled for name, layer in engine.runner.model.named_modules()
             if getattr(layer, "quant_method", None) is not None}
    assert tiled == {"qkv_proj": False, "o_proj": True, "gate_up_proj": True, "down_proj": True}


@pytest.mark.parametrize("tiled", [False, True])
def test_act_order_rank_whose_rows_are_whole_groups_keeps_only_its_groups(monkeypatch, tiled):
    """A row-parallel act-order layer holds every group's scales; a rank whose rows are whole groups in order (GPTQ
    ``static_groups``, dummy weights) keeps its own groups, so it takes the plain (or tiled) layout, not regrouping:
    rank 1 of 2, 128 of 256 inputs, groups of 128."""
    import core.layers.quantization.int4 as int4_method
    from core.layers.linear import Linear
    from core.layers.quantization.int4 import GPTQConfig
    from kernels.int4_gemm import tiling_supported

    if tiled:  # what loading does where the Gluon GEMV runs (a GPU)
        monkeypatch.setattr(int4_method, "tiled_layout_pays",
                            lambda q, sc, g: tiling_supported(q.shape[0], q.shape[1] * 8, g))
    config = GPTQConfig.from_hf({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
                                 "sym": False}).for_tensor_parallel(2, ("o_proj",))
    layer = Linear(128, 32, quant_method=config.linear_method("model.layers.0.self_attn.o_proj"))
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 32), generator=gen)
    zeros = torch.randint(1, 16, (2, 32), generator=gen)
    scales = torch.rand(2, 32, generator=gen) + 0.5
    g_idx = torch.full((128,), 1, dtype=torch.int32)  # rank 1: every row in group 1
    layer.qweight.data.copy_(gptq_pack_rows(codes))
    layer.qzeros.data.copy_(gptq_pack_zeros(zeros))
    layer.scales.data.copy_(scales)
    layer.g_idx.data.copy_(g_idx)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.perm is None and layer.group_size == 128 and layer.tiled == tiled
    x = torch.randn(3, 128, generator=gen)
    weight = (codes - zeros[1]).float() * scales[1]
    torch.testing.assert_close(layer(x), x @ weight, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group, desc_act, sym", [(32, False, True), (64, True, False), (128, True, True),
                                                  (64, False, False)])
def test_gptq_checkpoint_matches_dequantized_model(tmp_path, group, desc_act, sym):
    engine, _ = compare(*write_gptq(tmp_path, group, desc_act, sym), logprob_atol=1e-4)
    assert any(layer.perm is not None for layer in linears(engine)) == desc_act


@pytest.mark.parametrize("group, actorder, activations", [(32, False, None), (64, True, None), (128, False, None),
                                                           (64, False, "float")])  # fmt: skip
def test_compressed_tensors_w4a16_checkpoint_matches_dequantized_model(tmp_path, group, actorder, activations):
    """llm-compressor's W4A16 (``pack-quantized``) on the GPTQ method's kernels, and W4A8 (the same weights with fp8
    activations, run as W4A16): the dequantized model's tokens."""
    engine, _ = compare(*write_ct_int4(tmp_path, group, actorder, activations=activations), logprob_atol=1e-4)
    assert engine.runner.model_config.quantization.summary().startswith("compressed-tensors int4")
    assert any(layer.perm is not None for layer in linears(engine)) == actorder
    quantized, dequantized = write_ct_int4(tmp_path, group, actorder, activations=activations)
    _, ours = greedy(quantized, quantization="compressed-tensors")
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in greedy(dequantized)[1]]


@pytest.mark.parametrize("group, actorder, fmt, activations", [
    (-1, False, "pack-quantized", None), (32, True, "pack-quantized", None), (64, False, "int-quantized", "dynamic"),
    (-1, False, "int-quantized", "static")], ids=["w8a16-channel", "w8a16-g32-act", "w8a8-g64-dynamic",
                                                   "w8a8-channel-static"])  # fmt: skip
def test_compressed_tensors_int8_checkpoint_matches_dequantized_model(tmp_path, group, actorder, fmt, activations):
    """llm-compressor's W8A16 (``pack-quantized``: four codes ``q + 128`` an int32) and W8A8 (``int-quantized``
    int8 weights, all-zero zero points, a static ``input_scale`` or none) on the 8-bit kernel, activations 16-bit:
    the dequantized model's tokens and logprobs."""
    quantized, dequantized = write_ct_int8(tmp_path, group, actorder, fmt, activations)
    engine, _ = compare(quantized, dequantized, logprob_atol=1e-4)
    summary = engine.runner.model_config.quantization.summary()
    assert summary.startswith("compressed-tensors int8") and ("W8A8 run as W8A16" in summary) == bool(activations)
    layer = linears(engine)[0]
    assert layer.weight.dtype == torch.int8 and (layer.perm is not None) == actorder
    assert layer.weight_scale.shape == ((layer.weight.shape[0],) if group == -1 else
                                        (layer.weight.shape[0], layer.weight.shape[1] // group))  # fmt: skip


@pytest.mark.parametrize("case", ["gptq-head", "gptq8-v2-head", "gptq-v2-act", "ct-int8-head"])
def test_gptq_v2_and_quantized_lm_heads_match_dequantized_model(tmp_path, case):
    """GPTQModel's ``gptq_v2`` format (``qzeros`` hold the zero points, not ``zero - 1``) and LM heads quantized by
    the checkpoint (GPTQ's ``lm_head: true``; a compressed-tensors scheme that does not ignore it), built as a layer
    of the method with fp32 logits: the dequantized model's tokens and logprobs."""
    writers = {"gptq-head": lambda: write_gptq(tmp_path, 32, False, False, lm_head=True),
               "gptq8-v2-head": lambda: write_gptq(tmp_path, 32, False, False, bits=8, checkpoint_format="gptq_v2",
                                                   lm_head=True),
               "gptq-v2-act": lambda: write_gptq(tmp_path, 64, True, False, checkpoint_format="gptq_v2"),
               "ct-int8-head": lambda: write_ct_int8(tmp_path, -1, False, lm_head=True)}
    engine, _ = compare(*writers[case](), logprob_atol=1e-4)
    head = engine.runner.model.lm_head
    assert (head.quant_method is not None) == case.endswith("-head")


def test_gptq_dynamic_rules_give_modules_their_own_format(tmp_path):
    """GPTQModel's ``dynamic`` rules: a ``+:`` rule's modules run 8-bit in groups of 64, a ``-:`` rule's stay 16-bit,
    the rest the config's 4-bit: the dequantized model's tokens and logprobs."""
    from core.layers.quantization.gptq_bytes import GPTQBytesLinearMethod
    from core.layers.quantization.int4 import Int4LinearMethod

    engine, _ = compare(*write_gptq_dynamic(tmp_path), logprob_atol=1e-4)
    layers = engine.runner.model.model.layers
    assert layers[0].self_attn.o_proj.quant_method is None
    assert isinstance(layers[0].mlp.gate_up_proj.quant_method, Int4LinearMethod)
    assert isinstance(layers[1].mlp.down_proj.quant_method, GPTQBytesLinearMethod)
    assert layers[1].mlp.down_proj.group_size == 64
    assert "2 dynamic rules" in engine.runner.model_config.quantization.summary()


@pytest.mark.parametrize("dynamic, message", [
    ({"+:.*": {"bits": 5}}, "5-bit weights are not supported"), ({"+:.*": {"damp": 0.1}}, r"overrides \['damp'\]"),
    ({"+:(": {}}, "not a valid regex")], ids=["bits", "unknown-key", "regex"])  # fmt: skip
def test_gptq_dynamic_rules_that_cannot_run_fail_naming_them(dynamic, message):
    from core.layers.quantization import quant_config_from_hf

    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "dynamic": dynamic}
    with pytest.raises(ValueError, match=message):
        quant_config_from_hf({"quantization_config": qc})


def test_compressed_tensors_sparse_checkpoints_load_dense_or_fail_naming_the_format(tmp_path):
    """A compressed-tensors checkpoint with only a ``sparsity_config`` whose weights are stored dense (2:4 sparse
    Llamas) loads unquantized, its tokens those of the same weights without the config; sparse weights stored
    compressed in a format not read here (``marlin-24``) fail at startup naming it."""
    config, state = base_checkpoint()
    sparse = {"quant_method": "compressed-tensors", "format": "dense",
              "sparsity_config": {"format": "dense", "sparsity_structure": "2:4", "targets": ["Linear"]}}
    path = save(tmp_path / "sparse-dense", config | {"quantization_config": sparse}, state)
    engine, _ = compare(path, save(tmp_path / "plain", config, state), logprob_atol=0)
    assert engine.runner.model_config.quantization is None
    with pytest.raises(ValueError, match="holds no quantization scheme"):
        make_engine(path, device="cpu", quantization="compressed-tensors")
    compressed = sparse | {"sparsity_config": {"format": "marlin-24", "sparsity_structure": "2:4"}}
    with pytest.raises(ValueError, match="sparsity format 'marlin-24' is not supported"):
        make_engine(save(tmp_path / "marlin-24", config | {"quantization_config": compressed}, state), device="cpu")


def compress_24(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors' ``sparse-24-bitmask`` tensors of ``w [rows, columns]`` (the two largest of every four
    kept: ``shape`` ``[[rows], [columns]]``, ``compressed`` the kept values row-major ``[rows, columns / 2]``,
    ``bitmask`` numpy's ``packbits(..., bitorder="little")`` of the kept places), and the pruned dense weight."""
    import numpy

    groups = w.float().reshape(-1, 4).abs()
    kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True).reshape(w.shape)
    values = w.view(torch.uint8)[kept].view(w.dtype) if w.element_size() == 1 else w[kept]
    pruned = torch.zeros_like(w.view(torch.uint8) if w.element_size() == 1 else w)
    pruned[kept] = values.view(torch.uint8) if w.element_size() == 1 else values
    bitmask = torch.from_numpy(numpy.packbits(kept.numpy(), axis=-1, bitorder="little"))
    return ({"shape": torch.tensor(list(w.shape)).reshape(-1, 1), "compressed": values.reshape(w.shape[0], -1),
             "bitmask": bitmask}, pruned.view(w.dtype) if w.element_size() == 1 else pruned)


@pytest.mark.parametrize("scheme", ["sparse-only", "fp8"])
def test_compressed_tensors_2of4_weights_stored_compressed_decompress_at_load(tmp_path, scheme):
    """``sparse-24-bitmask`` checkpoints (2:4 sparse, alone or with FP8_DYNAMIC weights): each weight's ``shape`` /
    ``compressed`` / ``bitmask`` decompressed as the checkpoint streams in: the tokens and logprobs of the same
    pruned weights stored dense."""
    from safetensors.torch import load_file

    if scheme == "fp8":
        quantized, _ = write_fp8(tmp_path, "ct-channel")
        config = json.loads((quantized / "config.json").read_text())
        state = load_file(str(quantized / "model.safetensors"))
        qc = config.pop("quantization_config")
    else:
        config, state = base_checkpoint()
        qc = {"quant_method": "compressed-tensors", "format": "dense"}
    compressed, pruned = dict(state), dict(state)
    for name in quantized_layers(state):
        parts, pruned[name] = compress_24(state[name])
        del compressed[name]
        compressed |= {f"{name.removesuffix('.weight')}.{part}": t for part, t in parts.items()}
    sparsity = {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"]}
    path = save(tmp_path / f"2of4-{scheme}", config | {"quantization_config": qc | {"sparsity_config": sparsity}},
                compressed)
    dense = save(tmp_path / f"2of4-{scheme}-dense", config | {"quantization_config": qc | {
        "sparsity_config": sparsity | {"format": "dense"}}}, pruned)  # fmt: skip
    engine, _ = compare(path, dense, logprob_atol=0)
    layer = engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.weight.dtype == (FP8 if scheme == "fp8" else torch.float32)
    assert int((layer.weight.float().reshape(-1, 4) != 0).sum(1).max()) <= 2  # two of every four kept


def test_compressed_sparse_weight_with_a_part_missing_fails_naming_it():
    from core.compressed_sparsity import decompress_weights

    parts, _ = compress_24(torch.randn(8, 16))
    stream = [("m.layers.0.q_proj.shape", parts["shape"]), ("m.layers.0.q_proj.bitmask", parts["bitmask"])]
    with pytest.raises(ValueError, match="'m.layers.0.q_proj' lacks \\['compressed'\\]"):
        list(decompress_weights(stream))


@pytest.mark.parametrize("layout", ["modelopt", "modelopt-w4a16", "ct"])
def test_nvfp4_checkpoint_matches_dequantized_model(tmp_path, layout):
    """NVFP4 (ModelOpt ``weight_scale_2``, compressed-tensors ``weight_global_scale``; merged q/k/v and gate/up with
    a global scale per shard) on the 4-bit codebook kernel, e2m1 values and blocks of 16: the dequantized model's
    tokens and logprobs."""
    requested = {"modelopt": "modelopt_fp4", "modelopt-w4a16": "modelopt_fp4",
                 "ct": "compressed-tensors"}[layout]  # vLLM's names for the format
    engine, _ = compare(*write_nvfp4(tmp_path, layout), logprob_atol=1e-4, quantization=requested)
    layers = linears(engine)
    assert len(layers) == 2 * 4 and all(layer.weight.dtype == torch.uint8 for layer in layers)
    qkv = engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight_scale.dtype == torch.float8_e4m3fn
    assert qkv.weight_scale.shape == (qkv.out_features, qkv.in_features // 16)
    assert qkv.weight_row_scale.shape == (qkv.out_features,)
    assert engine.runner.model_config.quantization.summary().startswith(f"nvfp4 ({layout.removesuffix('-w4a16')}")


def test_compressed_tensors_int8_zero_points_that_are_not_zero_fail_naming_them(tmp_path):
    """A symmetric scheme whose ``weight_zero_point`` holds non-zero values: refused at load rather than run as if
    they were zero."""
    from safetensors.torch import load_file, save_file

    quantized, _ = write_ct_int8(tmp_path, -1, False, "int-quantized")
    shard = next(quantized.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith(".weight_zero_point"))
    tensors[name] = torch.ones_like(tensors[name])
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=r"weight_zero_point holds non-zero zero points"):
        greedy(quantized)


@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("fp4", False), ("nf4", False)])
def test_bitsandbytes_4bit_checkpoint_matches_dequantized_model(tmp_path, quant_type, nested):
    """transformers' load_in_4bit checkpoints (NF4 / FP4 codebooks, double-quantized or plain absmax): the layers
    keep their codes and the dequantized model's tokens and logprobs come out."""
    engine, _ = compare(*write_bnb(tmp_path, quant_type, nested), logprob_atol=1e-4)
    layers = linears(engine)
    assert len(layers) == 2 * 4 and all(layer.weight.dtype == torch.uint8 for layer in layers)
    qkv = engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.shape == (qkv.out_features, qkv.in_features // 2)


def test_bitsandbytes_quantizes_a_16bit_checkpoint_to_nf4_at_load(tmp_path):
    """``--quantization bitsandbytes`` on a 16-bit checkpoint: NF4 in blocks of 64 at load, the same model as the
    checkpoint whose weights are those NF4 values."""
    from kernels.bnb4_gemm import NF4_CODEBOOK, dequantize_bnb4, quantize_bnb4

    config, state = base_checkpoint()
    path = save(tmp_path / "plain", config, state)
    nf4 = {name: dequantize_bnb4(*quantize_bnb4(state[name]), torch.tensor(NF4_CODEBOOK), 64)
           for name in quantized_layers(state)}  # fmt: skip
    engine, _ = compare(path, save(tmp_path / "nf4-values", config, state | nf4), logprob_atol=1e-4,
                        quantization="bitsandbytes")
    assert all(layer.weight.dtype == torch.uint8 for layer in linears(engine))


@pytest.mark.parametrize("group, desc_act, sym", [(32, False, True), (64, True, False), (-1, False, False)],
                         ids=["g32-sym", "g64-act-zp", "channel-zp"])
def test_gptq_8bit_checkpoint_matches_dequantized_model(tmp_path, group, desc_act, sym):
    """GPTQ ``bits: 8`` checkpoints (Qwen's GPTQ-Int8 releases are group 128, symmetric): the layers keep uint8 codes
    with fp32 group scales and zero points (act order: rows sorted, x gathered), the dequantized model's tokens and
    logprobs."""
    engine, _ = compare(*write_gptq8(tmp_path, group, desc_act, sym), logprob_atol=1e-4)
    layers = linears(engine)
    assert len(layers) == 2 * 4 and all(layer.weight.dtype == torch.uint8 for layer in layers)
    assert any(layer.perm is not None for layer in layers) == desc_act


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_gptq_unpacking_inverts_autogptqs_packing(bits):
    """Every code of a run back from AutoGPTQ's pack loop, the 3-bit codes that straddle two words included, along
    rows (``qweight``) and columns (``qzeros``)."""
    from core.layers.quantization.gptq_bytes import unpack_columns, unpack_rows

    codes = torch.randint(0, 2**bits, (64, 40), generator=torch.Generator().manual_seed(bits))
    packed = autogptq_pack(codes, bits) if bits != 8 else pack_codes(codes, 0)
    assert packed.shape == (64 * bits // 32, 40)
    assert torch.equal(unpack_rows(packed, bits), codes.to(torch.int32))
    assert torch.equal(unpack_columns(packed.t().contiguous(), bits), codes.t().to(torch.int32))


@pytest.mark.parametrize("bits, group, desc_act, sym", [(3, 32, False, True), (3, 64, True, False),
                                                        (2, 32, False, False), (2, -1, False, True)],
                         ids=["3bit-g32-sym", "3bit-g64-act-zp", "2bit-g32-zp", "2bit-channel-sym"])
def test_gptq_3_and_2_bit_checkpoints_match_dequantized_model(tmp_path, bits, group, desc_act, sym):
    """GPTQ ``bits: 3`` and ``2`` checkpoints (vLLM's GPTQ takes 2, 3, 4, 8): the codes unpacked from their runs
    (3-bit: 32 codes in 3 words) and held a byte each on the 8-bit kernel, which the summary says; the dequantized
    model's tokens and logprobs."""
    engine, _ = compare(*write_gptq(tmp_path, group, desc_act, sym, bits=bits), logprob_atol=1e-4)
    assert engine.runner.model_config.quantization.summary().startswith(f"gptq {bits}-bit")
    assert "codes held a byte each" in engine.runner.model_config.quantization.summary()
    layers = linears(engine)
    assert len(layers) == 2 * 4 and all(layer.weight.dtype == torch.uint8 for layer in layers)
    assert all(int(layer.weight.max()) < 2**bits for layer in layers)
    assert any(layer.perm is not None for layer in layers) == desc_act


def test_bitsandbytes_8bit_checkpoint_matches_dequantized_model(tmp_path):
    """transformers' load_in_8bit checkpoints (LLM.int8: int8 rows, ``SCB`` absmax, row-major ``weight_format``):
    the layers keep their int8 rows and the dequantized model's tokens and logprobs come out."""
    engine, _ = compare(*write_bnb8(tmp_path), logprob_atol=1e-4)
    layers = linears(engine)
    assert len(layers) == 2 * 4 and all(layer.weight.dtype == torch.int8 for layer in layers)
    qkv = engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.shape == (qkv.out_features, qkv.in_features) and qkv.weight_scale.shape == (qkv.out_features,)


def test_bitsandbytes_8bit_tiled_layouts_fail_naming_them(tmp_path):
    from safetensors.torch import load_file, save_file

    quantized, _ = write_bnb8(tmp_path)
    (shard,) = quantized.glob("*.safetensors")
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith(".weight_format"))
    tensors[name] = torch.tensor(2, dtype=torch.uint8)  # col_turing
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=r"weight_format is 2, a tiled 8-bit layout .*supported: 0 \(row-major\)"):
        greedy(quantized)


def test_bitsandbytes_config_without_a_bit_width_fails_naming_both():
    from core.layers.quantization.bnb import BitsAndBytesConfig

    with pytest.raises(ValueError, match="without load_in_4bit or load_in_8bit; supported: 4-bit .* and 8-bit"):
        BitsAndBytesConfig.from_hf({"quant_method": "bitsandbytes"})


@pytest.mark.parametrize("change, acts, message", [
    ({"symmetric": False}, None, "asymmetric weights"), ({"num_bits": 3}, None, "3-bit integer weights"),
    ({"num_bits": 8, "symmetric": False}, None, "asymmetric weights"),
    ({"num_bits": 8}, {"num_bits": 8, "type": "float"}, "activations other than 8-bit integers"),
], ids=["asymmetric", "3-bit", "8-bit-asymmetric", "8-bit-fp8-activations"])
def test_compressed_tensors_int_schemes_not_served_fail_naming_them(change, acts, message):
    from core.layers.quantization.compressed_tensors import from_compressed_tensors

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128} | change
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"group_0": {"weights": weights, "input_activations": acts}}}
    with pytest.raises(ValueError, match=f"compressed-tensors scheme .* is not supported: {message}"):
        from_compressed_tensors(qc)


# e4m3 activations (3 mantissa bits: ~2.6% rms error per GEMM input) through 14 GEMMs of this tiny random model move
# its first-step logprobs by up to ~0.33 (measured); a misplaced shard scale moves them by whole units.
FP8_FIRST_STEP_ATOL = 0.5


@pytest.mark.parametrize("layout", ["fp8", "fp8-static", "ct-channel", "ct-tensor-static"])
def test_fp8_checkpoint_matches_dequantized_model(tmp_path, layout):
    quantized, dequantized = write_fp8(tmp_path, layout)
    engine, ours = greedy(quantized)
    _, weights_only = greedy(dequantized)
    assert logprob_error(ours, weights_only, steps=1) <= FP8_FIRST_STEP_ATOL
    layers = linears(engine)
    assert layers and all(layer.weight.dtype == FP8 and layer.weight_scale.shape == (layer.out_features,)
                          for layer in layers)
    static = layout.endswith("static")
    assert all((layer.input_scale is not None) == static for layer in layers)
    # Every shard's scale landed on its own channels: the loaded weights dequantize to the dequantized checkpoint's.
    from safetensors.torch import load_file

    plain = load_file(str(dequantized / "model.safetensors"))
    merged = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, module in engine.runner.model.named_modules():
        if getattr(module, "quant_method", None) is None:
            continue
        parent, leaf = name.rsplit(".", 1)
        parts = merged.get(leaf, (leaf,))
        expected = torch.cat([plain[f"{parent}.{part}.weight"] for part in parts])
        torch.testing.assert_close(module.weight.float() * module.weight_scale[:, None], expected, rtol=1e-6, atol=0)
    if not static:  # the same activation quantization on the dequantized weights: the same model, token for token
        compare(quantized, dequantized, logprob_atol=1e-4, reference_kwargs={"quantization": "fp8"})


@pytest.mark.parametrize("layout", ["block", "ct-block"])
def test_fp8_block_scaled_checkpoint_matches_dequantized_model(tmp_path, layout):
    """Qwen3 / DeepSeek FP8 (``weight_block_size``, ``weight_scale_inv``) and compressed-tensors FP8_BLOCK: each block
    of the merged q/k/v and gate/up weights keeps its own scale, and the layers run w8a16 (16-bit activations), so
    the tokens and logprobs are the dequantized model's."""
    engine, _ = compare(*write_fp8(tmp_path, layout), logprob_atol=1e-4)
    layers = linears(engine)
    assert len(layers) == 2 * 4 and all(layer.weight.dtype == FP8 for layer in layers)
    qkv = engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight_scale.shape == (-(-qkv.out_features // 32), -(-qkv.in_features // 32))
    assert not qkv.takes_fp8_activations()  # w8a16: the norm before it does not quantize


@pytest.mark.parametrize("layout", ["ct-channel-w8a16", "ct-tensor-w8a16"])
def test_fp8_weight_only_checkpoint_matches_dequantized_model(tmp_path, layout):
    """compressed-tensors FP8 W8A16 (float8 weights per channel or per tensor, no activation scheme): each output row
    keeps its scale (a merged projection's per-tensor scales spread over its shards' rows) and the layers run w8a16,
    so the tokens and logprobs are the dequantized model's."""
    engine, _ = compare(*write_fp8(tmp_path, layout), logprob_atol=1e-4)
    assert engine.runner.model_config.quantization.summary().endswith("16-bit activations: W8A16)")
    layers = linears(engine)
    assert len(layers) == 2 * 4 and all(layer.weight.dtype == FP8 for layer in layers)
    assert all(layer.weight_scale.shape == (layer.out_features, 1) and not layer.takes_fp8_activations()
               for layer in layers)  # fmt: skip


@pytest.mark.parametrize("where", ["config.json", "hf_quant_config.json"])
def test_modelopt_fp8_checkpoint_runs_as_the_fp8_static_layout(tmp_path, where):
    """NVIDIA ModelOpt FP8 (``quant_method: modelopt``, ``quant_algo: FP8``; older exports: ``hf_quant_config.json``):
    per-tensor weight scales, static input scales, ``exclude_modules`` with a wildcard left 16-bit and the KV-cache
    scales (``k_proj.k_scale``) of ``kv_cache_quant_algo: FP8``: the same tokens and logprobs as those tensors under
    ``quant_method: fp8`` (static) with the excluded layers listed, both with an fp8 KV cache."""
    from safetensors.torch import load_file

    quantized, dequantized = write_fp8(tmp_path, "fp8-static")
    config = json.loads((quantized / "config.json").read_text())
    tensors, plain = load_file(str(quantized / "model.safetensors")), load_file(str(dequantized / "model.safetensors"))
    excluded = [name for name in tensors if name.startswith("model.layers.1.mlp.") and name.endswith(".weight")]
    for name in excluded:  # layer 1's MLP as 16-bit weights, as ModelOpt leaves an excluded module
        prefix = name.removesuffix(".weight")
        tensors[name] = plain[name]
        del tensors[f"{prefix}.weight_scale"], tensors[f"{prefix}.input_scale"]
    for layer in range(config["num_hidden_layers"]):
        tensors[f"model.layers.{layer}.self_attn.k_proj.k_scale"] = torch.tensor(0.05 + layer / 100)
        tensors[f"model.layers.{layer}.self_attn.v_proj.v_scale"] = torch.tensor(0.07)
    del config["quantization_config"]
    scheme = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head", "model.layers.1.mlp*"]}
    modelopt = save(tmp_path / "modelopt", config | ({"quantization_config": {"quant_method": "modelopt", **scheme}}
                                                    if where == "config.json" else {}), tensors)  # fmt: skip
    if where == "hf_quant_config.json":
        (modelopt / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                                   "quantization": scheme}))
    fp8 = {"quant_method": "fp8", "activation_scheme": "static",
           "ignored_layers": [name.removesuffix(".weight") for name in excluded]}
    reference = save(tmp_path / "fp8-static-excluded", config | {"quantization_config": fp8}, tensors)
    engine, _ = compare(modelopt, reference, logprob_atol=1e-6, reference_kwargs={"kv_cache_dtype": "fp8"},
                        kv_cache_dtype="fp8")
    mlp = engine.runner.model.model.layers[1].mlp
    assert mlp.gate_up_proj.quant_method is None and engine.runner.model.model.layers[0].mlp.gate_up_proj.quant_method
    attention = engine.runner.model.model.layers[1].self_attn.attn
    assert attention.k_scale == pytest.approx(0.06) and attention.v_scale == pytest.approx(0.07)


def test_fbgemm_fp8_checkpoint_runs_as_the_per_channel_dynamic_layout(tmp_path):
    """Meta's FBGEMM fp8 (``quant_method: fbgemm_fp8``: ``[out, 1]`` weight scales, dynamic per-token activations,
    ``modules_to_not_convert``): the same tokens and logprobs as those tensors under compressed-tensors
    FP8_DYNAMIC."""
    from safetensors.torch import load_file

    quantized, _ = write_fp8(tmp_path, "ct-channel")
    config = json.loads((quantized / "config.json").read_text())
    tensors = load_file(str(quantized / "model.safetensors"))
    fbgemm = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
    path = save(tmp_path / "fbgemm", config | {"quantization_config": fbgemm}, tensors)
    engine, _ = compare(path, quantized, logprob_atol=1e-6)
    assert all(layer.weight.dtype == FP8 for layer in linears(engine))
    assert engine.runner.model_config.quantization.summary().startswith("fp8 (checkpoint, channel weight scales")


def test_modelopt_fp8_per_channel_per_token_runs_as_the_per_channel_dynamic_layout(tmp_path):
    """ModelOpt ``FP8_PER_CHANNEL_PER_TOKEN`` (vLLM's too): a ``weight_scale`` ``[out]`` per output channel, no input
    scale: the same tokens and logprobs as those tensors under compressed-tensors FP8_DYNAMIC (``[out, 1]``)."""
    from safetensors.torch import load_file

    quantized, _ = write_fp8(tmp_path, "ct-channel")
    config = json.loads((quantized / "config.json").read_text())
    tensors = load_file(str(quantized / "model.safetensors"))
    tensors = {n: t.reshape(-1) if n.endswith(".weight_scale") else t for n, t in tensors.items()}
    del config["quantization_config"]
    path = save(tmp_path / "modelopt-pcpt", config | {"quantization_config": {
        "quant_method": "modelopt", "quant_algo": "fp8_per_channel_per_token", "exclude_modules": ["lm_head"]}},
        tensors)  # fmt: skip
    engine, _ = compare(path, quantized, logprob_atol=1e-6)
    assert engine.runner.model_config.quantization.summary().startswith("fp8 (checkpoint, channel weight scales, "
                                                                        "dynamic per-token")


def write_modelopt_fp8_blocks(tmp: Path, hidden: int = 256) -> tuple[Path, Path]:
    """A ModelOpt ``FP8_PB_WO`` checkpoint (fp8 weights, a ``weight_scale`` ``[out / 128, 1, in / 128, 1]`` per 128 x
    128 block) of a ``hidden``-wide Llama (256: q / k / v 256 / 128 / 128 rows, whole blocks), and the same weights
    and scales in the Qwen3 / DeepSeek block layout (``weight_block_size``, ``weight_scale_inv`` ``[out / 128, in /
    128]``)."""
    from kernels.fp8_block_gemm import quantize_fp8_blocks

    config, state = base_checkpoint(hidden=hidden)
    modelopt, blocks = dict(state), dict(state)
    for name in quantized_layers(state):
        q, scale = quantize_fp8_blocks(state[name], (128, 128))
        prefix = name.removesuffix(".weight")
        modelopt |= {name: q, f"{prefix}.weight_scale": scale.reshape(scale.shape[0], 1, scale.shape[1], 1)}
        blocks |= {name: q, f"{prefix}.weight_scale_inv": scale}
    return (save(tmp / "modelopt-pbwo", config | {"quantization_config": {
                "quant_method": "modelopt", "quant_algo": "FP8_PB_WO", "exclude_modules": ["lm_head"]}}, modelopt),
            save(tmp / "fp8-blocks-128", config | {"quantization_config": {
                "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}, blocks))


def test_modelopt_fp8_per_block_weight_only_runs_as_the_block_layout(tmp_path):
    """ModelOpt ``FP8_PB_WO`` (vLLM's too), activations 16-bit: the same tokens and logprobs as its weights and
    scales in the Qwen3 / DeepSeek block layout (:func:`write_modelopt_fp8_blocks`)."""
    engine, _ = compare(*write_modelopt_fp8_blocks(tmp_path), logprob_atol=1e-6)
    assert "128x128 block weight scales" in engine.runner.model_config.quantization.summary()
    assert all(layer.weight_scale.dim() == 2 for layer in linears(engine))


def write_mxfp8(tmp: Path, arch: str = "llama", **overrides) -> tuple[Path, Path]:
    """A ModelOpt ``MXFP8`` checkpoint (:func:`mxfp8_tensors`: an E8M0 ``weight_scale``, ``2 ** (e - 127)``, per 32
    inputs of a row), every linear layer (and expert) but the LM head."""
    config, state = base_checkpoint(arch=arch, **overrides)
    quant, plain = dict(state), dict(state)
    experts = [n for n in state if ".experts." in n and n.endswith(".weight")]
    for name in dict.fromkeys(quantized_layers(state) + experts):
        tensors, plain[name] = mxfp8_tensors(state[name])
        quant |= {name.removesuffix("weight") + suffix: t for suffix, t in tensors.items()}
    tag = _tag(arch, "modelopt-mxfp8")
    return (save(tmp / tag, config | {"quantization_config": {
                "quant_method": "modelopt", "quant_algo": "MXFP8", "exclude_modules": ["lm_head"]}}, quant),
            save(tmp / f"{tag}-dequantized", config, plain))


def test_modelopt_mxfp8_checkpoint_matches_dequantized_model(tmp_path):
    """ModelOpt ``MXFP8`` (vLLM's too), run w8a16 as blocks of one row by 32: the dequantized model's tokens and
    logprobs."""
    engine, _ = compare(*write_mxfp8(tmp_path), logprob_atol=1e-4)
    assert engine.runner.model_config.quantization.summary().startswith("fp8 (MXFP8 checkpoint")
    qkv = engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == FP8 and qkv.weight_scale.shape == (qkv.out_features, qkv.in_features // 32)


def write_modelopt_mixed(tmp: Path, algos: dict[str, str], arch: str = "llama",
                         **overrides) -> tuple[Path, Path]:  # fmt: skip
    """A ModelOpt ``MIXED_PRECISION`` checkpoint whose ``quantized_layers`` give each module of ``algos`` (checkpoint
    module name -> ``MXFP8`` or ``NVFP4``) its algorithm; the other modules stay 16-bit."""
    config, state = base_checkpoint(arch=arch, **overrides)
    quant, plain = dict(state), dict(state)
    for module, algo in algos.items():
        w = state[f"{module}.weight"]
        tensors, plain[f"{module}.weight"] = mxfp8_tensors(w) if algo == "MXFP8" else nvfp4_tensors(w, "modelopt")
        del quant[f"{module}.weight"]
        quant |= {f"{module}.{suffix}": t for suffix, t in tensors.items()}
    listed = {module: {"quant_algo": algo} | ({"group_size": 16} if algo == "NVFP4" else {})
              for module, algo in algos.items()}  # fmt: skip
    tag = _tag(arch, "modelopt-mixed")
    return (save(tmp / tag, config | {"quantization_config": {
                "quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "quantized_layers": listed}}, quant),
            save(tmp / f"{tag}-dequantized", config, plain))


MIXED_LAYERS = {**{f"model.layers.0.{p}": "MXFP8" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                             "mlp.down_proj")},
                **{f"model.layers.1.self_attn.{p}": "NVFP4" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}}


def test_modelopt_mixed_precision_runs_each_module_on_its_algorithm(tmp_path):
    """ModelOpt ``MIXED_PRECISION`` (vLLM's too): layer 0 and the LM head in MXFP8, layer 1's attention in NVFP4,
    layer 1's MLP unlisted (16-bit): each layer on its algorithm's method, the dequantized model's tokens and
    logprobs."""
    from core.layers.quantization.fp8 import Fp8LinearMethod
    from core.layers.quantization.nvfp4 import Nvfp4LinearMethod

    engine, _ = compare(*write_modelopt_mixed(tmp_path, {**MIXED_LAYERS, "lm_head": "MXFP8"}), logprob_atol=1e-4)
    layers = engine.runner.model.model.layers
    assert isinstance(layers[0].self_attn.qkv_proj.quant_method, Fp8LinearMethod)
    assert isinstance(layers[0].mlp.down_proj.quant_method, Fp8LinearMethod)
    assert isinstance(layers[1].self_attn.o_proj.quant_method, Nvfp4LinearMethod)
    assert layers[1].mlp.gate_up_proj.quant_method is None
    assert isinstance(engine.runner.model.lm_head.quant_method, Fp8LinearMethod)
    assert engine.runner.model_config.quantization.summary() == ("modelopt mixed precision (MXFP8: 8 modules, NVFP4: "
                                                                 "4 modules; unlisted modules 16-bit)")


def test_modelopt_mixed_precision_that_cannot_run_fails_naming_it(tmp_path):
    from core.layers.quantization import quant_config_from_hf

    def config(listed):
        return {"quantization_config": {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
                                        "quantized_layers": listed}}

    with pytest.raises(ValueError, match="'model.layers.0.mlp.down_proj' has quant_algo 'W4A8_AWQ'"):
        quant_config_from_hf(config({"model.layers.0.mlp.down_proj": {"quant_algo": "W4A8_AWQ"}}))
    with pytest.raises(ValueError, match="non-empty 'quantized_layers'"):
        quant_config_from_hf(config({}))
    split = {**MIXED_LAYERS, "model.layers.0.self_attn.k_proj": "NVFP4"}  # q and v MXFP8, k NVFP4
    quantized, _ = write_modelopt_mixed(tmp_path, split)
    with pytest.raises(ValueError, match="merged parts .*q_proj.*k_proj.*v_proj.* different quant_algo"):
        make_engine(quantized, device="cpu")


def test_modelopt_fp8_lm_head_not_excluded_is_quantized(tmp_path):
    """A ModelOpt FP8 export whose ``exclude_modules`` leaves the LM head out holds it in fp8 too: it loads as a
    quantized head (fp32 logits), within fp8's error of the same head dequantized."""
    from safetensors.torch import load_file

    quantized, _ = write_fp8(tmp_path, "fp8-static")
    config = json.loads((quantized / "config.json").read_text())
    tensors = load_file(str(quantized / "model.safetensors"))
    head = tensors["lm_head.weight"].float()
    scale = head.abs().amax() / 448
    q = (head / scale).to(FP8)
    head_tensors = {"lm_head.weight": q, "lm_head.weight_scale": scale.reshape(()),
                    "lm_head.input_scale": torch.tensor(0.02)}
    del config["quantization_config"]
    fp8_head = save(tmp_path / "modelopt-head", config | {"quantization_config": {
        "quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": []}}, tensors | head_tensors)
    plain_head = save(tmp_path / "modelopt-plain-head", config | {"quantization_config": {
        "quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": ["lm_head"]}},
        tensors | {"lm_head.weight": q.float() * scale})  # fmt: skip
    engine, ours = greedy(fp8_head)
    assert engine.runner.model.lm_head.weight.dtype == FP8
    _, reference = greedy(plain_head)
    assert logprob_error(ours, reference, steps=1) <= FP8_FIRST_STEP_ATOL


def test_modelopt_algorithms_not_served_fail_naming_them():
    from core.layers.quantization import quant_config_from_hf

    with pytest.raises(ValueError, match="ModelOpt quant_algo 'W4A8_AWQ' is not supported; supported: FP8"):
        quant_config_from_hf({"quantization_config": {"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"}})


def test_online_fp8_quantizes_an_unquantized_checkpoint(tmp_path):
    config, state = base_checkpoint()
    path = save(tmp_path / "plain", config, state)
    engine, ours = greedy(path, quantization="fp8")
    _, reference = greedy(path)
    assert logprob_error(ours, reference, steps=1) <= FP8_FIRST_STEP_ATOL
    assert all(layer.weight.dtype == FP8 for layer in linears(engine))
    assert len(linears(engine)) == 2 * 4


FAMILY_WRITERS = {"awq": lambda tmp, arch: write_awq(tmp, 32, arch),
                  "gptq-act": lambda tmp, arch: write_gptq(tmp, 64, True, False, arch),
                  "fp8": lambda tmp, arch: write_fp8(tmp, "fp8", arch)}


@pytest.mark.parametrize("method", sorted(FAMILY_WRITERS))
@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3", "phi3", "starcoder2", "gpt_neox", "falcon",
                                  "falcon_mq"])
def test_other_families_run_quantized_checkpoints(tmp_path, arch, method):
    """Gemma 1/2/3 (Llama's attention, their own MLP), Phi-3 (whose checkpoint fuses qkv and gate_up: one
    per-tensor fp8 scale covers every shard), StarCoder2 (biases, a plain MLP), GPT-NeoX (its per-head interleaved
    qkv one tensor, biases, GELU) and Falcon 40B / 7B style (a fused qkv whose output rows are reordered at load:
    AWQ's and GPTQ's packed columns moved in whole int32s): the same greedy tokens and logprobs as the dequantized
    model (fp8: run with the same activation quantization, see the module docstring)."""
    quantized, dequantized = FAMILY_WRITERS[method](tmp_path, arch)
    reference = {"quantization": "fp8"} if method == "fp8" else None
    engine, _ = compare(quantized, dequantized, logprob_atol=1e-4, reference_kwargs=reference, dtype="float32")
    assert len(linears(engine)) == 2 * 4


@pytest.mark.parametrize("arch", ["gpt2", "falcon", "gpt_neox"])
def test_older_families_quantize_16bit_checkpoints_at_load(tmp_path, arch):
    """GPT-2 (Conv1D weights stored transposed), Falcon (qkv rows reordered at load) and GPT-NeoX with
    ``--quantization bitsandbytes``: NF4 at load, the same model as the checkpoint whose weights are those NF4 values
    (quantized along each layer's input, as the loaded layer is); ``--quantization fp8`` within fp8's error."""
    from kernels.bnb4_gemm import NF4_CODEBOOK, dequantize_bnb4, quantize_bnb4

    config, state = base_checkpoint(arch=arch)
    path = save(tmp_path / "plain", config, state)
    conv1d = arch == "gpt2"  # [in, out]
    nf4 = {}
    for name in quantized_layers(state):
        w = state[name].t().contiguous() if conv1d else state[name]
        values = dequantize_bnb4(*quantize_bnb4(w), torch.tensor(NF4_CODEBOOK), 64)
        nf4[name] = values.t().contiguous() if conv1d else values
    engine, _ = compare(path, save(tmp_path / "nf4-values", config, state | nf4), logprob_atol=1e-4,
                        quantization="bitsandbytes")
    assert len(linears(engine)) == 4 * config.get("num_hidden_layers", config.get("n_layer"))
    assert all(layer.weight.dtype == torch.uint8 for layer in linears(engine))
    engine, ours = greedy(path, quantization="fp8")
    _, reference = greedy(path)
    assert logprob_error(ours, reference, steps=1) <= FP8_FIRST_STEP_ATOL
    assert all(layer.weight.dtype == FP8 for layer in linears(engine))


@pytest.mark.parametrize("arch", ["falcon", "falcon_mq"])
@pytest.mark.parametrize("method", ["bnb-nf4", "nvfp4"])
def test_falcon_codebook_checkpoints_reorder_their_qkv_rows(tmp_path, arch, method):
    """Falcon's fused qkv in bitsandbytes 4-bit (codes and block absmax as output rows once read) and NVFP4 (codes,
    fp8 block scales by row, one global scale): reordered at load with the weight, the dequantized model's tokens."""
    quantized, dequantized = (write_bnb(tmp_path, "nf4", True, arch) if method == "bnb-nf4"
                              else write_nvfp4(tmp_path, "modelopt", arch))  # fmt: skip
    compare(quantized, dequantized, logprob_atol=1e-4, dtype="float32")


def test_quantized_checkpoints_of_families_quantized_only_at_load_fail_naming_the_way(tmp_path):
    """GPT-2 stores its Conv1D weights transposed, which a packed checkpoint's tensors would need per layout: its
    quantized checkpoints are refused at startup, naming the methods its 16-bit checkpoints take."""
    quantized, _ = write_fp8(tmp_path, "fp8", "gpt2")
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel checkpoints quantized with 'fp8' are not supported; its "
                                         r"16-bit checkpoints are, quantized at load with --quantization fp8 or "
                                         r"bitsandbytes"):
        make_engine(quantized, device="cpu")


def test_dummy_weights_in_quantized_layouts_run(tmp_path):
    """--load-format dummy builds random packed int4 (AWQ) weights with valid layouts, then processes them."""
    path, _ = write_gptq(tmp_path, 32, desc_act=False, sym=True)
    for quantized in (path, write_awq(tmp_path, 64)[0]):
        engine, results = greedy(quantized, load_format="dummy")
        assert all(len(r["tokens"]) == GREEDY.max_tokens for r in results)
        assert all(torch.isfinite(layer.scales).all() for layer in linears(engine))


def test_unsupported_checkpoint_method_fails_naming_it(tmp_path):
    config, state = base_checkpoint()
    config["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
    path = save(tmp_path / "hqq", config, state)
    with pytest.raises(ValueError, match="'hqq'.*supported checkpoint quantization methods: awq, bitsandbytes, "
                                         "compressed-tensors, fbgemm_fp8, fp8, gptq, modelopt"):
        make_engine(path)


GPU_CASES = {"awq": lambda tmp: write_awq(tmp, 64), "gptq-act": lambda tmp: write_gptq(tmp, 32, True, False),
             "fp8": lambda tmp: write_fp8(tmp, "fp8"), "fp8-ct-static": lambda tmp: write_fp8(tmp, "ct-tensor-static"),
             "fp8-block": lambda tmp: write_fp8(tmp, "block"), "bnb-nf4": lambda tmp: write_bnb(tmp, "nf4", True),
             "bnb-int8": lambda tmp: write_bnb8(tmp), "gptq8-act": lambda tmp: write_gptq8(tmp, 32, True, False),
             "gptq3-act": lambda tmp: write_gptq(tmp, 32, True, False, bits=3),
             "mxfp8": lambda tmp: write_mxfp8(tmp),
             "modelopt-mixed": lambda tmp: write_modelopt_mixed(tmp, MIXED_LAYERS),
             "ct-w8a16-g32-act": lambda tmp: write_ct_int8(tmp, 32, True),
             "ct-w8a8-channel": lambda tmp: write_ct_int8(tmp, -1, False, "int-quantized", "dynamic"),
             "fp8-ct-w8a16": lambda tmp: write_fp8(tmp, "ct-channel-w8a16"),
             "nvfp4-modelopt": lambda tmp: write_nvfp4(tmp, "modelopt"), "nvfp4-ct": lambda tmp: write_nvfp4(tmp, "ct")}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_quantized_checkpoints_on_gpu_with_cuda_graphs(tmp_path, case):
    """The GPU kernels (Triton int4, fp8 skinny and _scaled_mm, the byte-codes GEMV) in bf16: decode through CUDA
    graphs token-for-token the same as eager decode of the same model, and first-step logprobs near the dequantized
    model's: fp8 within its activation quantization's error of the bf16 model; weight-only formats within bf16's own
    error of the exact (fp32) dequantized model (:func:`assert_within_bf16_error`)."""
    quantized, dequantized = GPU_CASES[case](tmp_path)
    engine, graphs = greedy(quantized, dtype="bfloat16", device="cuda")
    assert engine.runner.use_graphs
    _, eager = greedy(quantized, dtype="bfloat16", device="cuda", enforce_eager=True)
    assert [r["tokens"] for r in graphs] == [r["tokens"] for r in eager]
    if "fp8" in case:
        _, reference = greedy(dequantized, dtype="bfloat16", device="cuda")
        assert logprob_error(graphs, reference, steps=1) <= FP8_FIRST_STEP_ATOL
    else:
        assert_within_bf16_error(graphs, dequantized)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["awq-128", "gptq-128-act"])
@pytest.mark.parametrize("rope_cache", [True, False], ids=["qkv-prep-fused", "qkv-prep-apart"])
def test_int4_gluon_gemv_in_the_engine_on_gpu(tmp_path, monkeypatch, case, rope_cache):
    """Groups of 128: decode runs on the Gluon int4 GEMV (and, fused, the qkv GEMV does the attention prep), CUDA
    graphs included: decode through graphs equals eager decode, and the first-step logprobs stay near the
    dequantized model's."""
    import kernels.int4_gemm as i4

    monkeypatch.setattr(i4, "INT4_ROPE_CACHE_ENABLED", rope_cache)
    calls = []
    for name in ("gluon_int4_gemv", "gluon_int4_gemv_rope_cache"):
        real = getattr(i4, name)
        monkeypatch.setattr(i4, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    make = {"awq-128": lambda: write_awq(tmp_path, 128), "gptq-128-act": lambda: write_gptq(tmp_path, 128, True, False)}
    quantized, dequantized = make[case]()
    engine, graphs = greedy(quantized, dtype="bfloat16", device="cuda")
    assert engine.runner.use_graphs and "gluon_int4_gemv" in calls
    assert ("gluon_int4_gemv_rope_cache" in calls) is rope_cache
    assert sorted(layer.tiled for layer in linears(engine)) == [False] * 2 + [True] * 6  # all but qkv: tiled
    _, eager = greedy(quantized, dtype="bfloat16", device="cuda", enforce_eager=True)
    assert [r["tokens"] for r in graphs] == [r["tokens"] for r in eager]
    _, reference = greedy(dequantized, dtype="bfloat16", device="cuda")
    assert logprob_error(graphs, reference, steps=1) <= 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["mma:64x128:w4:s3", "mms:64x64:w4:s3"])
@pytest.mark.parametrize("case", ["awq", "gptq-act"])
def test_int4_tensor_core_decode_kernel_in_the_engine_on_gpu(tmp_path, monkeypatch, case, config):
    """The w4a16 tensor-core decode kernel (every decode M bucket's default forced to an ``mma`` / ``mms`` config)
    inside the engine, CUDA graphs included: it runs, decode through graphs equals eager decode, and the first-step
    logprobs stay near the dequantized model's."""
    import kernels.int4_gemm as i4
    from kernels.skinny_gemm import SkinnyConfig

    for bucket in (1, 2, 4, 8, 16):
        monkeypatch.setitem(i4.INT4_DEFAULT_CONFIGS, bucket, SkinnyConfig.parse(config))
    calls = []
    real = i4.int4_mma_gemm
    monkeypatch.setattr(i4, "int4_mma_gemm", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    quantized, dequantized = GPU_CASES[case](tmp_path)
    engine, graphs = greedy(quantized, dtype="bfloat16", device="cuda")
    assert engine.runner.use_graphs and calls
    _, eager = greedy(quantized, dtype="bfloat16", device="cuda", enforce_eager=True)
    assert [r["tokens"] for r in graphs] == [r["tokens"] for r in eager]
    _, reference = greedy(dequantized, dtype="bfloat16", device="cuda")
    assert logprob_error(graphs, reference, steps=1) <= 0.05


@pytest.mark.gpu
def test_online_fp8_on_gpu_with_cuda_graphs(tmp_path):
    config, state = base_checkpoint()
    path = save(tmp_path / "plain", config, state)
    engine, graphs = greedy(path, dtype="bfloat16", device="cuda", quantization="fp8")
    _, eager = greedy(path, dtype="bfloat16", device="cuda", quantization="fp8", enforce_eager=True)
    assert [r["tokens"] for r in graphs] == [r["tokens"] for r in eager]
    _, reference = greedy(path, dtype="bfloat16", device="cuda")
    assert logprob_error(graphs, reference, steps=1) <= FP8_FIRST_STEP_ATOL
    assert all(layer.quant_method.use_scaled_mm for layer in linears(engine))


@pytest.mark.gpu
def test_fp8_norms_quantize_for_the_w8a8_projections_on_gpu(tmp_path, monkeypatch):
    """With online fp8, the RMSNorms before qkv_proj and gate_up_proj and the SiLU-and-mul before down_proj quantize
    their outputs in their own launches (``Fp8Activations``), for the Triton decode kernels (forced to a W8A8 ``mma``
    config at every M bucket, the Gluon GEMV off) and prefill's ``_scaled_mm``: the same bits as the projections' own
    quantization, so the same logprobs, with one activation quantization launch per layer (o_proj's) instead of
    four."""
    import kernels.fp8_linear as fp8
    from kernels.skinny_gemm import SkinnyConfig

    monkeypatch.setattr(fp8, "GEMV_ENABLED", False)
    for bucket in (1, 2, 4, 8, 16):
        monkeypatch.setitem(fp8.FP8_DEFAULT_CONFIGS, bucket, SkinnyConfig.parse("mma:64x64:w4:s2"))
    launches, fused_launches = [], []
    real = fp8.quantize_activations_triton
    monkeypatch.setattr(fp8, "quantize_activations_triton", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    _same_bits_with_and_without_upstream_quantization(
        tmp_path, monkeypatch, between=lambda: (fused_launches.append(len(launches)), launches.clear()))
    assert fused_launches[0] > 0 and 4 * fused_launches[0] == len(launches)


def _same_bits_with_and_without_upstream_quantization(tmp_path, monkeypatch, between=lambda: None) -> None:
    """Greedy runs of the online-fp8 model with the RMSNorm / SiLU-and-mul kernels quantizing the projections'
    rows (``Fp8Activations``), then (after ``between()``) with each projection quantizing its own: the same
    tokens and logprobs."""
    from core.layers.linear import Linear

    config, state = base_checkpoint()
    path = save(tmp_path / "plain", config, state)
    _, fused = greedy(path, dtype="bfloat16", device="cuda", quantization="fp8", enforce_eager=True)
    between()
    monkeypatch.setattr(Linear, "takes_fp8_activations", lambda self: False)
    _, unfused = greedy(path, dtype="bfloat16", device="cuda", quantization="fp8", enforce_eager=True)
    assert [r["tokens"] for r in fused] == [r["tokens"] for r in unfused]
    assert logprob_error(fused, unfused) == 0.0


@pytest.mark.gpu
def test_fp8_gluon_gemv_takes_the_norms_quantization_or_makes_the_same_bits_on_gpu(tmp_path, monkeypatch):
    """The Gluon decode GEMV (every shape, unquantized rows too: quantized in the kernel) gives the same logprobs
    whether the RMSNorm / SiLU-and-mul kernels quantize its rows (``Fp8Activations``) or it does: one formula."""
    import kernels.fp8_linear as fp8
    from kernels.fp8_gemv_gluon import GemvConfig

    monkeypatch.setattr(fp8, "FP8_GEMV_CONFIGS", {})
    monkeypatch.setattr(fp8, "FP8_GEMV_DEFAULT", GemvConfig(4, 2, quantize_x=True))
    monkeypatch.setattr(fp8, "ROPE_CACHE_ENABLED", False)  # the qkv GEMV's own epilogue: the next test
    calls = []
    real = fp8.gluon_fp8_gemv
    monkeypatch.setattr(fp8, "gluon_fp8_gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _same_bits_with_and_without_upstream_quantization(tmp_path, monkeypatch)
    assert calls


def _fused_against_unfused(tmp_path, monkeypatch, config, kernel: str, switch: str, enforce_eager: bool,
                           hidden: int = HIDDEN, counted=lambda kwargs: True) -> float:  # fmt: skip
    """Greedy results with every fp8 shape on the Gluon GEMV at ``config``, through the fused launch ``kernel`` of
    ``kernels/fp8_linear.py`` (called, as ``counted`` judges its keywords) and with its ``switch`` off: the same
    tokens; returns the logprobs' largest difference."""
    import kernels.fp8_linear as fp8

    monkeypatch.setattr(fp8, "FP8_GEMV_CONFIGS", {})
    monkeypatch.setattr(fp8, "FP8_GEMV_DEFAULT", config)
    calls = []
    real = getattr(fp8, kernel)
    monkeypatch.setattr(fp8, kernel, lambda *a, **kw: calls.append(counted(kw)) or real(*a, **kw))
    checkpoint, state = base_checkpoint(hidden)
    path = save(tmp_path / "plain", checkpoint, state)
    _, fused = greedy(path, dtype="bfloat16", device="cuda", quantization="fp8", enforce_eager=enforce_eager)
    assert any(calls)
    monkeypatch.setattr(fp8, switch, False)
    _, unfused = greedy(path, dtype="bfloat16", device="cuda", quantization="fp8", enforce_eager=enforce_eager)
    assert [r["tokens"] for r in fused] == [r["tokens"] for r in unfused]
    return logprob_error(fused, unfused)


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_fp8_qkv_gemv_with_the_attention_prep_in_its_epilogue_on_gpu(tmp_path, monkeypatch, enforce_eager):
    """The qkv GEMV that also rotates q and k and writes the cache (``fp8_qkv_rope_cache``) in place of the GEMV
    and the prep kernel: the same greedy tokens, logprobs within rounding (the rotation's multiply-adds may
    contract differently)."""
    from kernels.fp8_gemv_gluon import GemvConfig

    assert _fused_against_unfused(tmp_path, monkeypatch, GemvConfig(4, 2), "gluon_fp8_gemv_rope_cache",
                                  "ROPE_CACHE_ENABLED", enforce_eager) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_fp8_gate_up_gemv_with_silu_and_mul_in_its_epilogue_on_gpu(tmp_path, monkeypatch, enforce_eager):
    """gate_up's GEMV doing ``silu_and_mul`` and down's quantizing those rows once (``fp8_gate_up_silu``) in place of
    the GEMV, the SiLU-and-mul + quantization kernel and the GEMV: the same greedy tokens and logprobs."""
    from kernels.fp8_gemv_gluon import GemvConfig

    assert _fused_against_unfused(tmp_path, monkeypatch, GemvConfig(4, 2, quantize_once=True),
                                  "gluon_fp8_gemv_silu_mul", "SILU_EPILOGUE_ENABLED", enforce_eager) == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_fp8_gemvs_norming_their_rows_on_gpu(tmp_path, monkeypatch, enforce_eager):
    """The qkv and gate_up GEMVs applying the RMSNorms before them (``NormedRows``; 512 wide rows: two loop steps
    of 1 x 2 chunks) in place of the RMSNorm kernels: the same greedy tokens, logprobs within rounding (the sum of
    squares is added in another order)."""
    from kernels.fp8_gemv_gluon import GemvConfig

    assert _fused_against_unfused(tmp_path, monkeypatch, GemvConfig(1, 2, quantize_once=True),
                                  "gluon_fp8_gemv_rope_cache", "NORM_PROLOGUE_ENABLED", enforce_eager, hidden=512,
                                  counted=lambda kwargs: kwargs.get("norm") is not None) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_fp8_mlp_half_in_one_launch_on_gpu(tmp_path, monkeypatch, enforce_eager):
    """o_proj, the post-attention norm, gate_up and down as tasks of one launch (``kernels/fp8_mlp_gluon.py``, on
    for the tiny model's shape) in place of their kernels at the same GEMV configs (o_proj and down quantizing their
    rows once, gate_up norming them): the same greedy tokens and logprobs, bit for bit."""
    import core.layers.quantization.fp8 as fp8_method
    import kernels.fp8_linear as fp8
    import kernels.fp8_mlp_gluon as mlp
    from kernels.fp8_gemv_gluon import GemvConfig

    hidden = 512  # 4 heads of 128: q_size 512; the MLP INTER (256) wide: two steps of one chunk a warp
    gemv = GemvConfig(1, 1, quantize_once=True)
    monkeypatch.setattr(fp8, "FP8_GEMV_CONFIGS", {})
    monkeypatch.setattr(fp8, "FP8_GEMV_DEFAULT", gemv)
    monkeypatch.setattr(mlp, "MLP_HALF_CONFIGS", {(hidden, hidden, INTER): mlp.MlpHalfConfig(gemv, gemv, gemv)})
    calls = []
    real = fp8_method.gluon_fp8_mlp_half
    monkeypatch.setattr(fp8_method, "gluon_fp8_mlp_half", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    checkpoint, state = base_checkpoint(hidden)
    path = save(tmp_path / "plain", checkpoint, state)
    _, fused = greedy(path, dtype="bfloat16", device="cuda", quantization="fp8", enforce_eager=enforce_eager)
    assert calls
    monkeypatch.setattr(mlp, "MLP_HALF_ENABLED", False)
    _, unfused = greedy(path, dtype="bfloat16", device="cuda", quantization="fp8", enforce_eager=enforce_eager)
    assert [r["tokens"] for r in fused] == [r["tokens"] for r in unfused]
    assert logprob_error(fused, unfused) == 0.0


def test_declined_normed_rows_leave_the_decoder_layer_as_it_was(tmp_path, monkeypatch):
    """Where a layer may take ``NormedRows`` but its kernel declines them (here: no such kernel on the CPU), the
    decoder layer norms the rows itself: the same greedy tokens and logprobs as a layer that never offers them."""
    from core.layers.linear import Linear

    config, state = base_checkpoint()
    path = save(tmp_path / "plain", config, state)
    _, plain = greedy(path)
    offered = []
    monkeypatch.setattr(Linear, "takes_fp8_activations", lambda self: True)
    monkeypatch.setattr(Linear, "may_norm_rows", lambda self: offered.append(1) or True)
    _, declined = greedy(path)
    assert offered
    assert [r["tokens"] for r in declined] == [r["tokens"] for r in plain]
    assert logprob_error(declined, plain) < 1e-5



def test_declined_mlp_half_leaves_the_decoder_layer_as_it_was(tmp_path, monkeypatch):
    """Where the one-launch MLP half is configured but its kernel declines the rows, attention's output goes
    through o_proj and the layer goes on as before: the same greedy tokens and logprobs."""
    import core.models.llama as llama

    config, state = base_checkpoint()
    path = save(tmp_path / "plain", config, state)
    _, plain = greedy(path)
    offered = []
    monkeypatch.setattr(llama, "fp8_mlp_half_config", lambda *args: "configured")
    monkeypatch.setattr(llama, "fp8_mlp_half", lambda *args: offered.append(args[-1]) and None)
    _, declined = greedy(path)
    assert offered and set(offered) == {"configured"}
    assert [r["tokens"] for r in declined] == [r["tokens"] for r in plain]
    assert logprob_error(declined, plain) < 1e-5

def test_quantized_model_composes_with_chunked_prefill_preemption_and_speculation(tmp_path):
    """The same greedy tokens from a GPTQ act-order model under chunked prefill, preemption (few blocks), prefix
    caching and n-gram speculative decoding as from a plain run."""
    quantized, _ = write_gptq(tmp_path, 32, desc_act=True, sym=False)
    _, plain = greedy(quantized)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    for kwargs in (dict(max_num_batched_tokens=8, num_gpu_blocks_override=6, max_model_len=64),
                   dict(speculative_config=spec)):
        _, stressed = greedy(quantized, **kwargs)
        assert [r["tokens"] for r in stressed] == [r["tokens"] for r in plain], kwargs
