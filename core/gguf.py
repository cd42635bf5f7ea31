"""GGUF files as Hugging Face models: an HF-style config dict and HF-named float32 weights.

Our own header parser instead of ``gguf.GGUFReader``: the reader builds one numpy array per string of the
tokenizer vocabulary (~100k of them), which costs ~6 s on a small CPU; this one reads the same header in
well under a second. Dequantization is ``gguf.quants.dequantize`` (vectorized numpy, every GGML type it knows).
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from core import gguf_architectures

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SCALAR_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9

# Plain (unquantized) GGML types and the numpy dtype their bytes hold.
_PLAIN_NUMPY = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFTensorInfo(NamedTuple):
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy/PyTorch order (GGUF stores dims fastest-first; this is reversed)
    offset: int  # absolute byte offset in the file
    n_bytes: int


class GGUFFile:
    """A memory-mapped GGUF file: ``metadata`` (key -> value) and ``tensors`` (name -> info), read lazily."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if self._buf[:4] != _MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic {bytes(self._buf[:4])!r}).")
        self._pos = 4
        (self.version,) = self._read("I")
        if self.version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {self.version} is not supported (big-endian file?).")
        n_tensors, n_kv = self._read("QQ")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._read_str()
            (vtype,) = self._read("I")
            self.metadata[key] = self._read_value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._read_str()
            (n_dims,) = self._read("I")
            dims = self._read("Q" * n_dims)
            raw_type, rel_offset = self._read("IQ")
            infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(raw_type), rel_offset))
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, rel_offset in infos:
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            n_bytes = math.prod(shape) * type_size // block_size
            self.tensors[name] = GGUFTensorInfo(name, ggml_type, shape, data_start + rel_offset, n_bytes)
        self._array = np.frombuffer(self._buf, dtype=np.uint8)

    # -- header parsing -------------------------------------------------------------------------------------------
    def _read(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self._buf, self._pos)
        self._pos += struct.calcsize("<" + fmt)
        return values

    def _read_str(self) -> str:
        (length,) = self._read("Q")
        start = self._pos
        self._pos += length
        return self._buf[start : self._pos].decode("utf-8", errors="replace")

    def _read_value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._read_str()
        if vtype == _ARRAY:
            item_type, count = self._read("IQ")
            if item_type in _SCALAR_NUMPY:
                dtype = np.dtype(_SCALAR_NUMPY[item_type]).newbyteorder("<")
                values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos).copy()
                self._pos += dtype.itemsize * count
                return values
            return [self._read_value(item_type) for _ in range(count)]
        (value,) = self._read(_SCALAR_FORMATS[vtype])
        return value

    # -- tensors --------------------------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (read-only view into the map): typed for plain types, uint8 blocks else."""
        info = self.tensors[name]
        data = self._array[info.offset : info.offset + info.n_bytes]
        plain = _PLAIN_NUMPY.get(info.ggml_type)
        if plain is not None:
            return data.view(plain).reshape(info.shape)
        block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
        return data.reshape(*info.shape[:-1], info.shape[-1] // block_size * type_size)

    def to_float32(self, name: str) -> np.ndarray:
        """Dequantized (or converted) float32 array of the tensor, a fresh writable copy."""
        info = self.tensors[name]
        raw = self.raw(name)
        if info.ggml_type in _PLAIN_NUMPY:
            return raw.astype(np.float32)  # always copies: the map is read-only
        out = dequantize(raw, info.ggml_type)
        return out if out.flags.writeable and out.dtype == np.float32 else out.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Config

_ARCHITECTURES = {  # GGUF general.architecture -> (HF model_type, HF architecture)
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

# llama.cpp stores file_type (the dominant tensor type); plain files keep their dtype, quantized ones run in
# bfloat16 (the range of the float32 originals, and what the HF checkpoints of these families use).
_FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}

_LLAMA3_DEFAULT_ORIGINAL_CONTEXT = 8192


def _float32_to_decimal(value: float) -> float:
    """The shortest decimal that round-trips through float32: GGUF stores 1e-6 as 9.99999997e-07."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def supported_gguf_architectures() -> list[str]:
    return sorted({*_ARCHITECTURES, *gguf_architectures.ARCHITECTURES})


def _check_architecture(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if arch not in _ARCHITECTURES and arch not in gguf_architectures.ARCHITECTURES:
        raise ValueError(f"GGUF architecture '{arch}' of {gguf.path} is not supported; "
                         f"supported: {supported_gguf_architectures()}.")  # fmt: skip
    return arch


def hf_config_from_gguf(gguf: GGUFFile) -> dict[str, Any]:
    """Rebuild the HF ``config.json`` dict of a GGUF: llama / qwen2 / qwen3 here (Mistral GGUFs are ``llama``), the
    other families in core/gguf_architectures.py."""
    meta = gguf.metadata
    arch = _check_architecture(gguf)
    if arch in gguf_architectures.ARCHITECTURES:
        return _add_tokens_and_dtype(gguf, gguf_architectures.hf_config(gguf, arch))
    model_type, hf_arch = _ARCHITECTURES[arch]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    tensors = gguf.tensors
    num_heads = int(get("attention.head_count"))
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, np.ndarray):  # per-layer list in some files; these families use one value
        num_kv_heads = int(num_kv_heads.max())
    hidden_size = int(get("embedding_length"))
    head_dim = get("attention.key_length")
    if head_dim is None:
        head_dim = tensors["blk.0.attn_q.weight"].shape[0] // num_heads
    vocab_size = tensors["token_embd.weight"].shape[0]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "rms_norm_eps": _float32_to_decimal(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32_to_decimal(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(gguf, arch, int(head_dim)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
    }
    if get("attention.sliding_window"):  # Mistral with a window
        config["sliding_window"] = int(get("attention.sliding_window"))
    if arch == "llama" and get("expert_count"):  # Mixtral: llama.cpp's llama with stacked experts
        if not get("expert_used_count"):
            raise ValueError(f"GGUF file {gguf.path} has experts but lacks 'llama.expert_used_count'.")
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                      num_local_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")))
    return _add_tokens_and_dtype(gguf, config)


def _add_tokens_and_dtype(gguf: GGUFFile, config: dict[str, Any]) -> dict[str, Any]:
    """BOS / pad / EOS ids and the dtype, read the same way for every architecture."""
    meta = gguf.metadata
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{gguf_key}"])
    eos_ids = [int(meta[f"tokenizer.ggml.{k}"]) for k in ("eos_token_id", "eot_token_id", "eom_token_id")
               if f"tokenizer.ggml.{k}" in meta]
    eos_ids = list(dict.fromkeys(eos_ids))
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    dtype = _FILE_TYPE_DTYPES.get(int(meta.get("general.file_type", -1)), "bfloat16")
    config["torch_dtype"] = config["dtype"] = dtype
    return config


def _rope_scaling(gguf: GGUFFile, arch: str, head_dim: int) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from GGUF: explicit linear/yarn keys, or Llama 3's ``rope_freqs`` tensor."""
    meta = gguf.metadata
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if scaling_type in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": scaling_type, "factor": _float32_to_decimal(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if "rope_freqs.weight" in gguf.tensors:
        theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
        return llama3_rope_scaling_from_factors(
            gguf.to_float32("rope_freqs.weight"), theta, head_dim,
            int(original) if original else _LLAMA3_DEFAULT_ORIGINAL_CONTEXT,
        )
    return None


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for Llama 3 scaling: the divisor of each RoPE frequency."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    factors = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < high_wavelen, 1.0, factors)
    return np.where(wavelen > low_wavelen, factor, factors)


def llama3_rope_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int,
                                     original_max_position_embeddings: int) -> dict[str, Any] | None:
    """Recover HF's llama3 ``rope_scaling`` from llama.cpp's per-frequency factors.

    In the smooth band ``1/f = (1-s)/factor + s`` with ``s = C/wavelen/(h-l) - l/(h-l)``: linear in 1/wavelen,
    so a line fit gives ``C/(h-l)`` and ``-l/(h-l)``. Only those two ratios matter, so ``C`` (the original
    context) is taken from the file or Llama 3's 8192; the result is checked by recomputing the factors.
    """
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    band = (factors > 1.0 + 1e-4) & (factors < factor * (1 - 1e-4))
    if band.sum() < 2:
        raise ValueError(
            "Cannot recover Llama 3 rope scaling from this GGUF's rope_freqs tensor: fewer than two frequencies "
            "in the smooth band. Use the safetensors checkpoint instead."
        )
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[band], smooth, 1)
    span = original_max_position_embeddings / slope
    low = round(float(-intercept * span), 4)
    high = round(float(low + span), 4)
    scaling = {
        "rope_type": "llama3",
        "factor": _float32_to_decimal(factor),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original_max_position_embeddings,
    }
    rebuilt = llama3_rope_factors(theta, head_dim, scaling["factor"], low, high, original_max_position_embeddings)
    if not np.allclose(rebuilt, factors, rtol=1e-4, atol=1e-5):
        raise ValueError("This GGUF's rope_freqs tensor does not follow Llama 3 rope scaling; cannot load it.")
    return scaling


# ---------------------------------------------------------------------------------------------------------------
# Weights

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",  # Mixtral's router
}
_CONSUMED_BY_CONFIG = {"rope_freqs.weight"}
# llama.cpp stacks a layer's experts into one tensor per projection, [experts, out, in]; HF names one per expert
_EXPERT_STACKS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_EXPERT_STACK_RE = re.compile(r"blk\.(\d+)\.(ffn_(?:gate|up|down)_exps)\.weight")


def expert_stack_name(name: str, arch: str) -> str | None:
    """The HF-style name of a stacked expert tensor (``blk.N.ffn_gate_exps.weight`` ->
    ``model.layers.N.mlp.experts.gate_proj.weight``, every expert's in one ``[E, out, ...]`` tensor), or None."""
    match = _EXPERT_STACK_RE.fullmatch(name)
    if match is None:
        return None
    spec = gguf_architectures.ARCHITECTURES.get(arch)
    layer = (spec.layer_prefix if spec is not None else "model.layers.{}").format(match.group(1))
    return f"{layer}.mlp.experts.{_EXPERT_STACKS[match.group(2)]}.weight"


def _split_experts(gguf: GGUFFile, name: str, arch: str, keep_quantized: Collection[str]
                   ) -> Iterator[tuple[str, torch.Tensor]] | None:  # fmt: skip
    """A stacked expert tensor (``blk.N.ffn_gate_exps.weight``): kept (its stack name in ``keep_quantized``), its
    raw blocks ``[E, out, row_bytes]``; else dequantized and cut into HF's per-expert weights
    (``model.layers.N.mlp.experts.{e}.gate_proj.weight``). None for any other tensor."""
    stack = expert_stack_name(name, arch)
    if stack is None:
        return None
    if stack in keep_quantized:
        return iter([(stack, torch.from_numpy(np.array(gguf.raw(name))))])
    prefix, projection = stack.removesuffix(".weight").rsplit(".", 1)
    stacked = gguf.to_float32(name)
    return ((f"{prefix}.{e}.{projection}.weight", torch.from_numpy(np.ascontiguousarray(expert)))
            for e, expert in enumerate(stacked))  # fmt: skip
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str:
    """HF parameter name of a GGUF tensor name (ValueError for tensors these model families do not have)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"GGUF tensor '{gguf_name}' has no counterpart in the llama/qwen2/qwen3 HF models.")


def _unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time Q/K row permutation (HF's rotate-half halves -> interleaved pairs)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def iter_gguf_weights(gguf: GGUFFile, keep_quantized: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 CPU tensor) for every weight of the file, one dequantized tensor at a time; tensors
    whose HF name is in ``keep_quantized`` come as their raw blocks (uint8 ``[rows, row_bytes]``, a copy). Only the
    llama-style architectures keep blocks (the other families run unquantized layers)."""
    arch = _check_architecture(gguf)
    if arch in gguf_architectures.ARCHITECTURES:
        if keep_quantized and not gguf_architectures.ARCHITECTURES[arch].keeps_blocks:
            raise ValueError(f"GGUF architecture '{arch}' cannot keep its weights quantized (llama.cpp reorders its "
                             "linear weights); load it dequantized (leave out --quantization gguf).")
        return _iter_family_weights(gguf, arch, keep_quantized)
    return _iter_llama_weights(gguf, arch, keep_quantized)


def gguf_hf_name(gguf: GGUFFile, name: str) -> str:
    """The HF parameter name of one of the file's tensors, for any supported architecture (ValueError for tensors
    the family has no counterpart of)."""
    arch = _check_architecture(gguf)
    stack = expert_stack_name(name, arch)
    if stack is not None:
        return stack
    if arch in gguf_architectures.ARCHITECTURES:
        return gguf_architectures.hf_tensor_name(gguf, arch, name)
    return hf_name(name)


def _iter_family_weights(gguf: GGUFFile, arch: str, keep_quantized: Collection[str] = ()
                         ) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    consumed = gguf_architectures.ARCHITECTURES[arch].consumed_by_config
    tied = gguf_architectures.hf_config(gguf, arch).get("tie_word_embeddings", False)
    for name in gguf.tensors:
        if name in consumed or (tied and name == "output.weight"):
            continue
        experts = _split_experts(gguf, name, arch, keep_quantized)
        if experts is not None:
            yield from experts
            continue
        target = gguf_architectures.hf_tensor_name(gguf, arch, name)
        if target in keep_quantized:  # its raw blocks, rows reordered where llama.cpp reordered them (keeps_blocks)
            raw = gguf_architectures.convert_tensor(gguf, arch, name, np.array(gguf.raw(name)))
            yield target, torch.from_numpy(np.ascontiguousarray(raw))
            continue
        array = gguf_architectures.convert_tensor(gguf, arch, name, gguf.to_float32(name))
        yield target, torch.from_numpy(np.ascontiguousarray(array))


def _iter_llama_weights(gguf: GGUFFile, arch: str, keep_quantized: Collection[str] = ()
                        ) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    permute_heads = {}
    if arch == "llama":  # only llama.cpp's LlamaModel converter permutes Q/K (qwen2/qwen3 keep HF order)
        n_heads = int(gguf.metadata[f"{arch}.attention.head_count"])
        n_kv_heads = int(gguf.metadata.get(f"{arch}.attention.head_count_kv", n_heads))
        permute_heads = {"attn_q": n_heads, "attn_k": n_kv_heads}
    for name in gguf.tensors:
        if name in _CONSUMED_BY_CONFIG:
            continue
        experts = _split_experts(gguf, name, arch, keep_quantized)
        if experts is not None:
            yield from experts
            continue
        target = hf_name(name)
        array = np.array(gguf.raw(name)) if target in keep_quantized else gguf.to_float32(name)
        kind = name.split(".")[-2]
        if kind in permute_heads:
            array = _unpermute_qk(array, permute_heads[kind])
        yield target, torch.from_numpy(array)
