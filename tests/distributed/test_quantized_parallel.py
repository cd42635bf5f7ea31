"""Quantized checkpoints split over devices on CPU (gloo, a worker process per extra rank): AWQ, GPTQ (act-order
included) and GGUF kept in its blocks give one device's greedy tokens and logprobs with tp=2 and pp=2 (their weights
are the same numbers, cut); fp8 stays within its error of the dequantized model (dynamic per-token activation scales
are taken over each rank's slice of a row-parallel layer's input, as in vLLM), and rank 0 holds exactly its slice of
one device's fp8 weights and scales. Layouts that cannot be cut fail at startup naming the layer and the unit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from core.config import ModelConfig
from tests.core import test_quantized_checkpoints as qc
from tests.core.engine_utils import make_engine, run_engine
from tests.core.test_gguf_quantized import LAYER_TYPES, T, write_tiny_gguf

INT4_CASES = {
    "awq-32": lambda tmp: qc.write_awq(tmp, 32),
    "gptq-32-sym": lambda tmp: qc.write_gptq(tmp, 32, False, True),
    # act-order: each rank's o_proj / down_proj input rows fall unevenly into the groups (regrouped, padded)
    "gptq-64-act-zp": lambda tmp: qc.write_gptq(tmp, 64, True, False),
    # group 128 over o_proj's 128 inputs: each rank holds half a group
    "gptq-128-act-sym": lambda tmp: qc.write_gptq(tmp, 128, True, True),
    # compressed-tensors W4A16 with group act-order: its [out, in / 8] codes and [out, groups] scales cut too
    "ct-w4a16-64-act": lambda tmp: qc.write_ct_int4(tmp, 64, True),
}


def run(path, **kwargs):
    """Greedy results of ``qc.PROMPTS`` (fp32, CPU) and rank 0's model; the engine is shut down."""
    engine = make_engine(path, dtype="float32", device="cpu", **kwargs)
    try:
        results = run_engine(engine, qc.PROMPTS, qc.GREEDY)
        return [results[(i, 0)] for i in range(len(qc.PROMPTS))], engine.runner.model
    finally:
        engine.shutdown()


def assert_same_run(ours, reference, atol=1e-4):
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in reference]
    assert qc.logprob_error(ours, reference) <= atol


@pytest.mark.parametrize("case", sorted(INT4_CASES))
def test_int4_checkpoint_over_two_ranks_equals_one_device(tmp_path, case):
    quantized, _ = INT4_CASES[case](tmp_path)
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.in_features == 64 and o_proj.qweight.dtype == torch.int32
    if case.endswith("64-act-zp") or case == "ct-w4a16-64-act":  # rows of two groups, each padded to 32-row blocks
        assert o_proj.group_size == 32 and o_proj.perm.numel() > 64


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_bitsandbytes_checkpoint_over_two_devices_equals_one_device(tmp_path, layout, bits):
    """4-bit: double quantization undone at load, each rank's codes and block absmax stand alone, cut by rows or by
    whole blocks of inputs; 8-bit: int8 rows cut like 16-bit ones, each row's scale with it. The same numbers as
    one device."""
    quantized, _ = qc.write_bnb(tmp_path, "nf4", True) if bits == 4 else qc.write_bnb8(tmp_path)
    reference, _ = run(quantized)
    ours, model = run(quantized, **layout)
    assert_same_run(ours, reference)
    if "tensor_parallel_size" in layout:
        down = model.model.layers[0].mlp.down_proj
        if bits == 4:
            assert down.weight.shape == (128, 64) and down.weight_absmax.shape == (128, 2)
        else:  # row-parallel: half of every row's inputs, every row's scale
            assert down.weight.shape == (128, 128) and down.weight_scale.shape == (128,)


def test_act_order_checkpoint_over_two_stages_and_tp2_x_pp2_equals_one_device(tmp_path):
    quantized, _ = INT4_CASES["gptq-64-act-zp"](tmp_path)
    reference, _ = run(quantized)
    assert_same_run(run(quantized, pipeline_parallel_size=2)[0], reference)
    assert_same_run(run(quantized, tensor_parallel_size=2, pipeline_parallel_size=2)[0], reference)


@pytest.mark.parametrize("layout", ["block", "ct-block"])
def test_fp8_block_scaled_checkpoint_over_two_ranks_equals_one_device(tmp_path, layout):
    """Block scales cut by whole blocks of rows (q/k/v, gate/up) or of columns (o, down); the layers run w8a16, so
    the split model computes one device's numbers."""
    quantized, _ = qc.write_fp8(tmp_path, layout)
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.shape == (128, 128) and down.weight_scale.shape == (4, 4)


def _rank0_slice(name: str, full: torch.Tensor, cfg) -> torch.Tensor:
    """Rank 0's part (of 2) of one device's loaded parameter ``name``: half of every merged shard's rows, half of
    a row-parallel layer's input columns; per-channel scales follow the rows."""
    hd = cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    if ".qkv_proj." in name:
        return torch.cat([full[: q // 2], full[q : q + kv // 2], full[q + kv : q + kv + kv // 2]])
    if ".gate_up_proj." in name:
        inter = cfg.intermediate_size
        return torch.cat([full[: inter // 2], full[inter : inter + inter // 2]])
    if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
        return full[:, : full.shape[1] // 2]
    return full  # a row-parallel layer's scales: every output channel


@pytest.mark.parametrize("layout", ["fp8", "ct-channel", "online"])
def test_fp8_over_two_ranks_holds_its_slice_and_stays_within_fp8_error(tmp_path, layout):
    if layout == "online":
        config, state = qc.base_checkpoint()
        quantized = dequantized = qc.save(tmp_path / "plain", config, state)
        kwargs = {"quantization": "fp8"}
    else:
        quantized, dequantized = qc.write_fp8(tmp_path, layout)
        kwargs = {}
    weights_only, _ = run(dequantized)
    one, one_model = run(quantized, **kwargs)
    ours, model = run(quantized, tensor_parallel_size=2, **kwargs)
    assert qc.logprob_error(ours, weights_only, steps=1) <= qc.FP8_FIRST_STEP_ATOL
    full = dict(one_model.named_parameters())
    cfg = ModelConfig.from_hf_dict(json.loads((quantized / "config.json").read_text()))
    checked = 0
    for name, param in model.named_parameters():
        if not name.endswith(("proj.weight", "proj.weight_scale")):
            continue
        row_parallel = ".o_proj." in name or ".down_proj." in name
        if layout == "online" and row_parallel:
            continue  # quantized at load from each rank's columns: per-channel scales of half rows
        assert param.dtype == full[name].dtype
        torch.testing.assert_close(param.float(), _rank0_slice(name, full[name], cfg).float(), rtol=0, atol=0)
        checked += 1
    assert checked == (2 * 4 * 2 if layout != "online" else 2 * 2 * 2)


def _gguf_without_256_blocks_in_o_proj(tmp_path):
    types = copy.deepcopy(LAYER_TYPES)
    types[0]["attn_output"] = T.Q8_0  # 32-element blocks: each rank's 128 inputs are whole blocks (Q5_K's 256 not)
    return write_tiny_gguf(tmp_path / "tiny-tp.gguf", types)


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_gguf_kept_in_blocks_over_two_devices_equals_one_device(tmp_path, layout):
    """Kept weights cut by rows or by whole blocks of inputs, the Q8_0 embedding and Q6_K LM head by vocabulary rows
    (vocabulary-parallel over their own lookup and GEMM), per-layer types matched by the file's layer numbers."""
    path = _gguf_without_256_blocks_in_o_proj(tmp_path)
    kwargs = {"quantization": "gguf", "skip_tokenizer_init": True}
    reference, _ = run(path, **kwargs)
    ours, model = run(path, **kwargs, **layout)
    assert_same_run(ours, reference)
    stage = model.model if "pipeline_parallel_size" in layout else model  # a PipelineStage wraps the model
    assert stage.model.layers[0].mlp.down_proj.weight.dtype == torch.uint8
    assert stage.model.embed_tokens.weight.dtype == torch.uint8


def test_gguf_blocks_a_rank_would_cut_are_dequantized_at_load(tmp_path):
    """Layer 0's o_proj in Q5_K (256-element blocks) over two ranks of 128 inputs each: that layer is dequantized at
    load on every rank (the rest stay in their blocks): one device's tokens and logprobs."""
    path = write_tiny_gguf(tmp_path / "q5k.gguf")
    kwargs = {"quantization": "gguf", "skip_tokenizer_init": True}
    reference, _ = run(path, **kwargs)
    ours, model = run(path, **kwargs, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.weight.dtype == torch.float32 and layer.self_attn.o_proj.weight.shape == (256, 128)
    assert layer.self_attn.qkv_proj.weight.dtype == torch.uint8 and layer.mlp.down_proj.weight.dtype == torch.uint8


def test_layouts_that_cannot_be_cut_fail_at_startup_naming_the_unit(tmp_path):
    awq, _ = qc.write_awq(tmp_path, 128)
    with pytest.raises(ValueError, match=r"input size 64 \(this rank's share of 128\) must be a multiple of the "
                                         r"group size 128"):
        make_engine(awq, dtype="float32", device="cpu", tensor_parallel_size=2)


@pytest.mark.parametrize("layout", ["ct-channel", "online"])
def test_fp8_experts_over_two_ranks_hold_their_slice(tmp_path, layout):
    """A MoE block's fp8 experts split by their intermediate dimension: rank 0 holds its rows of every expert's gate
    and up (with their per-channel scales) and its columns of every down (all of whose scales); the model stays
    within fp8's error of the unquantized one."""
    if layout == "online":
        config, state = qc.base_checkpoint(arch="qwen2_moe")
        quantized = dequantized = qc.save(tmp_path / "plain-moe", config, state)
        kwargs = {"quantization": "fp8"}
    else:
        quantized, dequantized = qc.write_fp8(tmp_path, layout, "qwen2_moe")
        kwargs = {}
    weights_only, _ = run(dequantized)
    _, one_model = run(quantized, **kwargs)
    ours, model = run(quantized, tensor_parallel_size=2, **kwargs)
    assert qc.logprob_error(ours, weights_only, steps=1) <= qc.FP8_FIRST_STEP_ATOL
    one, two = one_model.model.layers[1].mlp, model.model.layers[1].mlp
    inter, half = one.inter, one.inter // 2
    assert two.inter == half and two.w13.dtype == qc.FP8
    # one device's rows of rank 0's w13: for each expert, the first half of its gate rows, then of its up rows
    order = torch.cat([torch.cat([torch.arange(e * 2 * inter, e * 2 * inter + half),
                                  torch.arange(e * 2 * inter + inter, e * 2 * inter + inter + half)])
                       for e in range(one.num_experts)])
    torch.testing.assert_close(two.w13.float(), one.w13.float()[order], rtol=0, atol=0)
    torch.testing.assert_close(two.w13_scale, one.w13_scale[order], rtol=0, atol=0)
    if layout != "online":  # online: quantized at load from each rank's columns
        torch.testing.assert_close(two.w2.float(), one.w2.float()[:, :half], rtol=0, atol=0)
        torch.testing.assert_close(two.w2_scale, one.w2_scale, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_int4_experts_over_two_ranks_equal_one_device(tmp_path, method):
    """AWQ / GPTQ experts cut by their intermediate dimension (gate / up columns, down rows, in whole groups): the
    split Mixtral computes one device's numbers."""
    wide = {"intermediate_size": 64}  # each rank's 32 expert columns: one group of 32
    quantized, _ = (qc.write_awq(tmp_path, 32, "mixtral", **wide) if method == "awq"
                    else qc.write_gptq(tmp_path, 32, False, False, "mixtral", **wide))  # fmt: skip
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    block = model.model.layers[0].mlp
    assert block.inter == 32 and block.w2.shape == (block.num_experts, block.hidden, 32 // 8)


@pytest.mark.parametrize("method", ["gptq", "gptq8"])
def test_act_order_experts_over_two_ranks_equal_one_device(tmp_path, method):
    """GPTQ act-order experts (int4 and 8-bit): each rank's down inputs fall unevenly into the groups, so the rank
    holds every group's scales and each expert's rows are regrouped into padded groups of 32 (one length for all
    experts, padding rows weighing 0): one device's tokens and logprobs."""
    quantized, _ = qc.write_gptq(tmp_path, 32, True, False, "mixtral", bits=8 if method == "gptq8" else 4,
                                 intermediate_size=128)  # fmt: skip
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    block = model.model.layers[0].mlp
    _, _, quant = block.quant_method.experts(block)
    assert block.inter == 64 and quant.w2_group == 32 and quant.w2_perm.shape[1] > 64  # padded runs
    assert quant.w13_perm.shape == (block.num_experts, block.hidden) and quant.w13_group == 32


@pytest.mark.parametrize("bits, layout", [(8, {"tensor_parallel_size": 2}), (8, {"pipeline_parallel_size": 2}),
                                          (3, {"tensor_parallel_size": 2})], ids=["tp2", "pp2", "3bit-tp2"])
def test_gptq_8bit_checkpoint_over_two_devices_equals_one_device(tmp_path, bits, layout):
    """GPTQ 8-bit: packed rows cut by whole int32s of 4 codes, zero points and scales by columns or whole groups;
    3-bit by whole runs of 32 codes in 3 int32s (the merged q / k / v zero points landing by run)."""
    quantized, _ = qc.write_gptq(tmp_path, 32, False, False, bits=bits)
    reference, _ = run(quantized)
    ours, model = run(quantized, **layout)
    assert_same_run(ours, reference)
    if "tensor_parallel_size" in layout:
        down = model.model.layers[0].mlp.down_proj
        assert down.weight.shape == (128, 128) and down.weight_scale.shape == (128, 128 // 32)


def test_gptq_8bit_act_order_over_two_ranks_equals_one_device(tmp_path):
    """A GPTQ 8-bit act-order checkpoint's row-parallel layers: each rank's inputs regrouped into padded groups of
    32 (every group's scales held), as the int4 layers are."""
    quantized, _ = qc.write_gptq8(tmp_path, 64, True, False)
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.group_size == 32 and o_proj.perm.numel() > 64


@pytest.mark.parametrize("case", ["gptq-head", "gptq3-head", "ct-int8-head"])
def test_quantized_lm_head_over_two_ranks_equals_one_device(tmp_path, case):
    """An LM head the checkpoint quantized (GPTQ's ``lm_head: true``; a compressed-tensors scheme that does not
    ignore it) cut by vocabulary rows as a column-parallel layer's outputs (GPTQ's packed zero points by whole
    runs), each rank's logits gathered: one device's tokens and logprobs."""
    quantized, _ = {"gptq-head": lambda: qc.write_gptq(tmp_path, 32, False, True, lm_head=True),
                    "gptq3-head": lambda: qc.write_gptq(tmp_path, 32, False, False, bits=3, lm_head=True),
                    "ct-int8-head": lambda: qc.write_ct_int8(tmp_path, -1, False, lm_head=True)}[case]()
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    assert model.lm_head.quant_method is not None and model.lm_head.out_features == 384 // 2


def test_a_quantized_lm_head_whose_vocabulary_does_not_split_evenly_is_named(tmp_path):
    """A 16-bit head's last rank is padded with zero rows; a quantized head's packed rows are not: startup names it."""
    from core.distributed.tensor_parallel import check_layout

    quantized, _ = qc.write_gptq(tmp_path, 32, False, True, lm_head=True)
    config = json.loads((quantized / "config.json").read_text())
    check_layout(ModelConfig.from_hf_dict(config), 2)  # 384 rows: 192 a rank
    with pytest.raises(ValueError, match="quantized lm_head has vocab_size=385 rows, not divisible by it"):
        check_layout(ModelConfig.from_hf_dict({**config, "vocab_size": 385}), 2)


def test_modelopt_fp8_blocks_over_two_ranks_equal_one_device(tmp_path):
    """ModelOpt FP8_PB_WO's 4-D block scales ``[out / 128, 1, in / 128, 1]`` cut by rows of blocks (column-parallel)
    or by their third dim (o / down: row-parallel); 512 wide, so each rank's k / v rows are a whole block."""
    quantized, _ = qc.write_modelopt_fp8_blocks(tmp_path, hidden=512)
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    assert model.model.layers[0].mlp.down_proj.weight_scale.shape == (512 // 128, 128 // 128)  # 128 of 256 inputs


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_modelopt_mixed_precision_over_two_devices_equals_one_device(tmp_path, layout):
    """A MIXED_PRECISION checkpoint's layers cut each by its own algorithm's method (MXFP8's E8M0 scales by rows or
    whole 32-input blocks, NVFP4's codes and fp8 scales by rows or whole 16-input blocks), the unlisted ones plain;
    over two stages, stage 1's layer 0 is the checkpoint's layer 1 (NVFP4 attention, 16-bit MLP)."""
    quantized, _ = qc.write_modelopt_mixed(tmp_path, qc.MIXED_LAYERS)
    reference, _ = run(quantized)
    ours, model = run(quantized, **layout)
    assert_same_run(ours, reference)
    if "tensor_parallel_size" in layout:
        assert model.model.layers[0].mlp.down_proj.weight_scale.shape == (128, 128 // 32)  # 128 of 256 inputs


def test_bitsandbytes_experts_over_two_ranks_equal_one_device(tmp_path):
    """bitsandbytes 4-bit experts cut by their intermediate dimension (gate / up rows, down's whole 64-weight
    blocks of inputs): the split Mixtral computes one device's numbers."""
    quantized, _ = qc.write_bnb(tmp_path, "nf4", True, "mixtral", hidden_size=128, intermediate_size=128)
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    block = model.model.layers[0].mlp
    assert block.inter == 64 and block.w2.shape == (block.num_experts * block.hidden, 64 // 2)


@pytest.mark.parametrize("method", ["gptq8", "bnb8"])
def test_8bit_experts_over_two_ranks_equal_one_device(tmp_path, method):
    """GPTQ 8-bit experts (codes by columns or whole groups of down's inputs, with their zero points and scales) and
    bitsandbytes 8-bit experts (int8 rows, per-channel scales): each rank's slice of every expert on the 8-bit
    experts' kernel form, one device's tokens and logprobs."""
    quantized, _ = (qc.write_gptq8(tmp_path, 32, False, False, "mixtral", intermediate_size=64) if method == "gptq8"
                    else qc.write_bnb8(tmp_path, "mixtral", routers=True, intermediate_size=64))  # fmt: skip
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    block = model.model.layers[0].mlp
    _, w2, quant = block.quant_method.experts(block)
    assert block.inter == 32 and quant.w2_int8 and w2.shape == (block.num_experts, block.hidden, 32)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_gguf_experts_kept_in_blocks_over_two_ranks_equal_one_device(tmp_path, family):
    """llama.cpp's stacked experts kept in their Q8_0 blocks, ``[E, rows, row_bytes]``: each rank holds every
    expert's rows of gate and up and whole blocks of down's inputs (Qwen2-MoE's shared expert cut as a dense MLP),
    one device's tokens and logprobs."""
    import gguf

    from tests.core.test_gguf_families import FAMILIES, _tiny_hf_model, write_family_gguf

    arch, gguf_arch, overrides = FAMILIES[family]
    wide = {"moe_intermediate_size": 64} | ({"shared_expert_intermediate_size": 64} if family == "qwen2_moe" else {})
    path = tmp_path / f"{family}-q8.gguf"
    write_family_gguf(path, gguf_arch, _tiny_hf_model(arch, overrides | wide), gguf.GGMLQuantizationType.Q8_0)
    kwargs = {"quantization": "gguf", "skip_tokenizer_init": True}
    reference, _ = run(path, **kwargs)
    ours, model = run(path, tensor_parallel_size=2, **kwargs)
    assert_same_run(ours, reference)
    block = model.model.layers[0].mlp
    _, w2, quant = block.quant_method.experts(block)
    assert quant.w2_ggml and block.inter == 32 and w2.shape == (block.num_experts, block.hidden, 32 // 32 * 34)
    assert block.w13.shape[:2] == (block.num_experts, 64)


def test_gguf_experts_whose_split_cuts_a_block_are_dequantized_at_load():
    """K-quant experts 256 wide over two ranks: each rank's 128 of down's inputs would be half a 256-element block,
    so the stack (down, and the gate and up one fused kernel runs with it) is dequantized at load on every rank; a
    config that does not know the widths (built by hand) still refuses the block when it is built, naming it."""
    from core.layers.moe import SparseMoeBlock
    from core.layers.quantization.gguf import GGUFConfig

    prefix = "model.layers.0.mlp"
    kept = {f"{prefix}.experts.{p}_proj.weight": int(T.Q6_K) for p in ("gate", "up", "down")}
    widths = {name: 128 if "gate" in name or "up" in name else 256 for name in kept}
    config = GGUFConfig("tiny.gguf", kept, widths).for_tensor_parallel(2, ("o_proj", "down_proj"))
    assert config.kept == {} and config.moe_method(prefix) is None
    assert GGUFConfig("tiny.gguf", kept, widths).for_tensor_parallel(1, ("o_proj", "down_proj")).kept == kept
    blind = GGUFConfig("tiny.gguf", kept).for_tensor_parallel(2, ("o_proj", "down_proj"))
    with pytest.raises(ValueError, match=r"GGUF Q6_K: input size 128 \(this rank's share of 256; .*leave out "
                                         r"--quantization gguf\) is not a multiple of its 256-element blocks"):
        SparseMoeBlock(256, 128, 4, 2, True, kernel_backend="torch", quant=blind, prefix=prefix)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_compressed_tensors_int8_act_order_over_two_ranks_equals_one_device(tmp_path, arch):
    """compressed-tensors W8A16 with group act-order: packed codes cut by whole int32s, every group's scales held by
    each rank of a row-parallel layer (o / down, and the experts' down), its rows regrouped into padded groups of 32:
    one device's tokens and logprobs."""
    quantized, _ = qc.write_ct_int8(tmp_path, 32, True, arch=arch, **({"intermediate_size": 128} if arch == "mixtral"
                                                                      else {}))  # fmt: skip
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.weight.dtype == torch.int8 and o_proj.group_size == 32 and o_proj.perm.numel() > o_proj.in_features
    if arch == "mixtral":
        block = model.model.layers[0].mlp
        _, w2, quant = block.quant_method.experts(block)
        assert quant.w2_int8 and block.inter == 64 and w2.shape[2] > 64 and quant.w2_perm.shape[1] == w2.shape[2]


def test_gptq_dynamic_rules_over_two_ranks_equal_one_device(tmp_path):
    """GPTQModel's dynamic rules: an 8-bit MLP (groups of 64) and a 16-bit o_proj beside 4-bit layers, each layer's
    tensors cut by its own format."""
    quantized, _ = qc.write_gptq_dynamic(tmp_path)
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    layers = model.model.layers
    assert layers[0].self_attn.o_proj.quant_method is None and layers[1].mlp.down_proj.group_size == 64


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_nvfp4_over_two_ranks_equals_one_device(tmp_path, arch):
    """NVFP4: codes and fp8 block scales cut by rows or whole blocks of 16 inputs, the global scales every rank's
    (the experts' too): one device's tokens and logprobs."""
    quantized, _ = qc.write_nvfp4(tmp_path, "modelopt", arch, **({"intermediate_size": 128} if arch == "mixtral"
                                                                  else {}))  # fmt: skip
    reference, _ = run(quantized)
    ours, model = run(quantized, tensor_parallel_size=2)
    assert_same_run(ours, reference)
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.weight_scale.shape == (o_proj.out_features, o_proj.in_features // 16)

