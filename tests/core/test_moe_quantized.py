"""Quantized mixtures of experts (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE). fp8: the experts stay e4m3
with per-channel (or per-block) scales and run w8a16 in the fused MoE kernel (on CPU its reference), the dense
projections W8A8. AWQ / GPTQ: int4 experts repacked into the int4 kernel layout, dequantized in the kernel.
Checkpoints written with per-expert fp8 tensors (per-tensor and per-channel scales) give the dequantized model's
tokens and logprobs when it runs the same quantization (online fp8 of those weights is exact: see
test_quantized_checkpoints.py's docstring); online fp8 stays within fp8's error of the unquantized model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.core import test_quantized_checkpoints as qc

MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def moe_blocks(engine):
    return [m for m in engine.runner.model.modules() if hasattr(m, "w13")]


def experts_int8_checkpoints(tmp: Path, arch: str, **overrides) -> tuple[Path, Path]:
    """A 16-bit MoE for ``--quantization experts_int8``, and the same model with its experts rounded to those int8
    values (the reference)."""
    from kernels.int8_gemm import quantize_int8_rows

    config, state = qc.base_checkpoint(arch=arch, **overrides)
    rounded = {}
    for name, tensor in state.items():
        if ".mlp.experts." in name and name.endswith(".weight"):
            codes, absmax = quantize_int8_rows(tensor)
            rounded[name] = codes.float() * (absmax / 127.0)[:, None]
    assert rounded
    return qc.save(tmp / "plain", config, state), qc.save(tmp / "int8-values", config, state | rounded)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_experts_int8_quantizes_the_experts_at_load(tmp_path, arch):
    """``--quantization experts_int8`` (vLLM's) on a 16-bit MoE checkpoint: the experts int8 per expert and output
    channel on the 8-bit experts' kernel, every other layer (Qwen2-MoE's shared expert too) 16-bit: the model whose
    experts hold those int8 values."""
    path, rounded = experts_int8_checkpoints(tmp_path, arch)
    engine, _ = qc.compare(path, rounded, logprob_atol=1e-4,
                           quantization="experts_int8", dtype="float32")
    for block in moe_blocks(engine):
        w13, _, quant = block.quant_method.experts(block)
        assert w13.dtype == torch.int8 and quant.w13_int8 and quant.w13_group == block.hidden
    assert all(getattr(m, "quant_method", None) is None for m in engine.runner.model.modules()
               if type(m).__name__ == "Linear")  # fmt: skip


def test_experts_int8_on_a_dense_model_fails_naming_it(tmp_path):
    config, state = qc.base_checkpoint()
    with pytest.raises(ValueError, match="'experts_int8' is not supported for LlamaForCausalLM"):
        qc.greedy(qc.save(tmp_path / "dense", config, state), quantization="experts_int8")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("layout", ["modelopt", "ct"])
def test_nvfp4_experts_match_dequantized_model(tmp_path, arch, layout):
    """NVFP4 experts (each expert's codes, fp8 block scales and global scale per projection, stacked): the fused
    MoE kernel's 4-bit codebook experts with the e2m1 values and blocks of 16, the dequantized model's tokens and
    logprobs."""
    wider = {"mixtral": {"intermediate_size": 64},
             "qwen2_moe": {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 64}}[arch]
    engine, _ = qc.compare(*qc.write_nvfp4(tmp_path, layout, arch, **wider), logprob_atol=1e-4, dtype="float32")
    block = moe_blocks(engine)[-1]
    w13, _, quant = block.quant_method.experts(block)
    assert w13.dtype == torch.uint8 and quant.bnb_block == 16 and quant.codebook[7] == 6.0
    assert quant.w2_scale.shape == (block.num_experts, block.hidden, block.inter // 16)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_mxfp8_experts_match_dequantized_model(tmp_path, arch):
    """ModelOpt MXFP8 experts (an E8M0 scale per 32 inputs of each expert's rows): the fused MoE kernel's block fp8
    experts at blocks of one row by 32, the dequantized model's tokens and logprobs."""
    wider = {"mixtral": {"intermediate_size": 64}, "qwen3_moe": {"moe_intermediate_size": 64}}[arch]
    engine, _ = qc.compare(*qc.write_mxfp8(tmp_path, arch, **wider), logprob_atol=1e-4, dtype="float32")
    block = moe_blocks(engine)[-1]
    assert block.w13.dtype == torch.float8_e4m3fn and block.w13_scale.shape[-1] == block.hidden // 32


def test_modelopt_mixed_precision_experts_take_their_own_algorithm(tmp_path):
    """ModelOpt ``MIXED_PRECISION`` with the attention in MXFP8 and every expert in NVFP4 (the router unlisted,
    16-bit): the experts run the codebook experts, the projections the fp8 block kernel; the dequantized model's
    tokens and logprobs."""
    config, state = qc.base_checkpoint(arch="qwen3_moe")
    algos = {name.removesuffix(".weight"): "NVFP4" if ".experts." in name else "MXFP8"
             for name in state if name.endswith("_proj.weight")}
    engine, _ = qc.compare(*qc.write_modelopt_mixed(tmp_path, algos, "qwen3_moe"), logprob_atol=1e-4,
                           dtype="float32")
    block = moe_blocks(engine)[-1]
    assert block.quant_method.experts(block)[2].bnb4
    assert engine.runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn


def test_fp8_weight_only_moe_checkpoint_matches_dequantized_model(tmp_path):
    """compressed-tensors FP8 W8A16 on a mixture of experts: the attention's layers w8a16 by rows, the experts on the
    fused MoE kernel's e4m3 experts (always w8a16): the dequantized model's tokens and logprobs."""
    engine, _ = qc.compare(*qc.write_fp8(tmp_path, "ct-channel-w8a16", "qwen3_moe"), logprob_atol=1e-4,
                           dtype="float32")
    assert all(b.w13.dtype == qc.FP8 for b in moe_blocks(engine))


@pytest.mark.parametrize("layout", ["fp8", "ct-channel"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_fp8_moe_checkpoint_matches_dequantized_model(tmp_path, arch, layout):
    quantized, dequantized = qc.write_fp8(tmp_path, layout, arch)
    engine, _ = qc.compare(quantized, dequantized, logprob_atol=1e-4, reference_kwargs={"quantization": "fp8"},
                           dtype="float32")
    blocks = moe_blocks(engine)
    assert blocks and all(b.w13.dtype == qc.FP8 and b.w2.dtype == qc.FP8 for b in blocks)
    assert all(b.w13_scale.shape == (b.w13.shape[0],) and b.w2_scale.shape == (b.w2.shape[0],) for b in blocks)
    # every expert's scale landed on its own channels: expert e's gate / up / down weights dequantize to the file's
    from safetensors.torch import load_file

    plain = load_file(str(dequantized / "model.safetensors"))
    block, inter, hidden = blocks[-1], blocks[-1].inter, blocks[-1].hidden
    layer = len(engine.runner.model.model.layers) - 1
    w13 = block.w13.float() * block.w13_scale[:, None]
    w2 = block.w2.float() * block.w2_scale[:, None]
    for e in range(block.num_experts):
        prefix = f"model.layers.{layer}.mlp.experts.{e}"
        torch.testing.assert_close(w13[e * 2 * inter: e * 2 * inter + inter], plain[f"{prefix}.gate_proj.weight"],
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(w13[e * 2 * inter + inter: (e + 1) * 2 * inter], plain[f"{prefix}.up_proj.weight"],
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(w2[e * hidden: (e + 1) * hidden], plain[f"{prefix}.down_proj.weight"], rtol=1e-6,
                                   atol=0)


@pytest.mark.parametrize("layout", ["block", "ct-block"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_block_scaled_fp8_moe_checkpoint_matches_dequantized_model(tmp_path, arch, layout):
    """Qwen3-30B-A3B-FP8's layout: each expert's gate, up and down with a scale per block, the dense layers too; all
    run w8a16, so the tokens and logprobs are the dequantized model's."""
    quantized, dequantized = qc.write_fp8(tmp_path, layout, arch)
    engine, _ = qc.compare(quantized, dequantized, logprob_atol=1e-4, dtype="float32")
    block = moe_blocks(engine)[-1]
    assert block.w13.dtype == qc.FP8 and block.w13_scale.shape == (block.w13.shape[0] // 32, block.hidden // 32)


INT4_WRITERS = {"awq": lambda tmp, arch: qc.write_awq(tmp, 32, arch),
                "gptq-sym": lambda tmp, arch: qc.write_gptq(tmp, 32, False, True, arch),
                "gptq-zp": lambda tmp, arch: qc.write_gptq(tmp, 32, False, False, arch),
                "ct-w4a16": lambda tmp, arch: qc.write_ct_int4(tmp, 32, False, arch)}


@pytest.mark.parametrize("method", sorted(INT4_WRITERS))
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_int4_moe_checkpoint_matches_dequantized_model(tmp_path, arch, method):
    """AWQ / GPTQ / compressed-tensors W4A16 experts (Mixtral-AWQ's, Qwen3-30B-A3B-GPTQ-Int4's, RedHatAI's
    quantized.w4a16 layouts): each expert's packed tensors repacked into the int4 kernel layout, the same tokens and
    logprobs as the dequantized model (CPU: the reference)."""
    quantized, dequantized = INT4_WRITERS[method](tmp_path, arch)
    engine, _ = qc.compare(quantized, dequantized, logprob_atol=1e-4, dtype="float32")
    block = moe_blocks(engine)[-1]
    assert block.w13.dtype == torch.int32 and block.w13.shape == (block.num_experts, 2 * block.inter,
                                                                  block.hidden // 8)  # fmt: skip
    assert block.w2_scale.shape == (block.num_experts, block.inter // 32, block.hidden)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("method", ["gptq-act", "ct-w4a16-act"])
def test_act_order_experts_match_dequantized_model(tmp_path, arch, method):
    """GPTQ / compressed-tensors act-order experts (each expert's own ``g_idx``, shared by its gate and up): each
    expert's rows sorted by group at load, its permutation kept, the same tokens and logprobs as the dequantized
    model."""
    wider = {"mixtral": {"intermediate_size": 64}, "qwen3_moe": {"moe_intermediate_size": 64}}[arch]  # 2 groups
    write = {"gptq-act": lambda: qc.write_gptq(tmp_path, 32, True, False, arch, **wider),
             "ct-w4a16-act": lambda: qc.write_ct_int4(tmp_path, 32, True, arch, **wider)}[method]
    quantized, dequantized = write()
    engine, _ = qc.compare(quantized, dequantized, logprob_atol=1e-4, dtype="float32")
    block = moe_blocks(engine)[-1]
    for perm, k in ((block.w13_perm, block.hidden), (block.w2_perm, block.inter)):
        assert perm.shape == (block.num_experts, k) and len({tuple(p.tolist()) for p in perm}) == block.num_experts


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("layout", ["nf4-nested", "fp4"])
def test_bitsandbytes_experts_match_dequantized_model(tmp_path, arch, layout):
    """bitsandbytes 4-bit experts (transformers' load_in_4bit MoE checkpoints, each expert's Linear4bit): codes,
    absmax (double quantization undone) and codebook stacked per block, the dequantized model's tokens and
    logprobs."""
    quant_type = layout.split("-")[0]
    wider = {"mixtral": {"intermediate_size": 64},  # whole 64-weight blocks in every expert's input
             "qwen2_moe": {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 64}}[arch]
    quantized, dequantized = qc.write_bnb(tmp_path, quant_type, layout.endswith("nested"), arch, **wider)
    engine, _ = qc.compare(quantized, dequantized, logprob_atol=1e-4, dtype="float32")
    block = moe_blocks(engine)[-1]
    assert block.w13.dtype == torch.uint8 and block.w13.shape == (block.num_experts * 2 * block.inter,
                                                                  block.hidden // 2)  # fmt: skip
    assert block.w2_weight_absmax.shape == (block.num_experts * block.hidden, block.inter // 64)


def test_bitsandbytes_quantizes_experts_to_nf4_at_load(tmp_path):
    """``--quantization bitsandbytes`` on a 16-bit MoE checkpoint: the experts too, NF4 at load, the model whose
    weights are those NF4 values."""
    from kernels.bnb4_gemm import NF4_CODEBOOK, dequantize_bnb4, quantize_bnb4

    config, state = qc.base_checkpoint(arch="mixtral", intermediate_size=64)
    path = qc.save(tmp_path / "plain", config, state)
    nf4 = {}
    for name, tensor in state.items():
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            flat = tensor.reshape(-1, tensor.shape[-1])
            nf4[name] = dequantize_bnb4(*quantize_bnb4(flat), torch.tensor(NF4_CODEBOOK), 64).reshape(tensor.shape)
        elif name in qc.quantized_layers(state):
            nf4[name] = dequantize_bnb4(*quantize_bnb4(tensor), torch.tensor(NF4_CODEBOOK), 64)
    engine, _ = qc.compare(path, qc.save(tmp_path / "nf4-values", config, state | nf4), logprob_atol=1e-4,
                           quantization="bitsandbytes", dtype="float32")
    assert all(block.w13.dtype == torch.uint8 for block in moe_blocks(engine))


def test_bitsandbytes_experts_of_partial_blocks_fail_naming_them(tmp_path):
    config, state = qc.base_checkpoint(arch="mixtral")  # experts 32 wide: half a 64-weight block
    with pytest.raises(ValueError, match="an expert's input size 32 .* not a multiple of the 64-weight blocks"):
        qc.greedy(qc.save(tmp_path / "plain", config, state), quantization="bitsandbytes")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("group, sym", [(32, True), (32, False), (-1, False)], ids=["g32-sym", "g32-zp", "channel-zp"])
def test_gptq_8bit_experts_match_dequantized_model(tmp_path, arch, group, sym):
    """GPTQ ``bits: 8`` experts (Qwen3-30B-A3B-GPTQ-Int8's layout): each expert's packed codes, zero points and
    scales as the 8-bit experts' uint8 codes ``[E, N, K]`` with scales and offsets ``-z s`` per group, the
    dequantized model's tokens and logprobs (CPU: the reference)."""
    wider = {"mixtral": {"intermediate_size": 64}, "qwen3_moe": {"moe_intermediate_size": 64}}[arch]
    engine, _ = qc.compare(*qc.write_gptq8(tmp_path, group, False, sym, arch, **wider), logprob_atol=1e-4,
                           dtype="float32")
    block = moe_blocks(engine)[-1]
    _, _, quant = block.quant_method.experts(block)
    assert quant.w13_int8 and quant.w2_int8 and quant.w13_offsets is not None
    assert block.w13.dtype == torch.uint8 and block.w13.shape == (block.num_experts, 2 * block.inter, block.hidden)
    groups = 1 if group == -1 else block.inter // group
    assert block.w2_scale.shape == block.w2_offsets.shape == (block.num_experts, groups, block.hidden)


@pytest.mark.parametrize("bits, desc_act", [(3, False), (3, True), (2, False)], ids=["3bit", "3bit-act", "2bit"])
def test_gptq_3_and_2_bit_experts_match_dequantized_model(tmp_path, bits, desc_act):
    """GPTQ 3- and 2-bit experts: each expert's runs of codes (3-bit: 32 in 3 words, the merged experts' zero points
    landing by run) unpacked to the 8-bit experts' uint8 codes, the dequantized model's tokens and logprobs."""
    engine, _ = qc.compare(*qc.write_gptq(tmp_path, 32, desc_act, False, "qwen3_moe", bits=bits,
                                          moe_intermediate_size=64), logprob_atol=1e-4, dtype="float32")  # fmt: skip
    block = moe_blocks(engine)[-1]
    _, _, quant = block.quant_method.experts(block)
    assert quant.w13_int8 and quant.w2_int8 and block.w13.dtype == torch.uint8
    assert int(block.w13.max()) < 2**bits and (quant.w13_perm is not None) == desc_act


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_gptq_8bit_act_order_experts_match_dequantized_model(tmp_path, arch):
    """GPTQ 8-bit act-order experts (each expert's own ``g_idx``, shared by its gate and up): each expert's rows
    sorted by group at load and read through its permutation by the 8-bit experts' kernel, the dequantized model's
    tokens and logprobs."""
    wider = {"mixtral": {"intermediate_size": 64}, "qwen3_moe": {"moe_intermediate_size": 64}}[arch]  # 2 groups
    engine, _ = qc.compare(*qc.write_gptq8(tmp_path, 32, True, False, arch, **wider), logprob_atol=1e-4,
                           dtype="float32")
    block = moe_blocks(engine)[-1]
    _, _, quant = block.quant_method.experts(block)
    assert quant.w13_int8 and quant.w2_int8
    for perm, k in ((quant.w13_perm, block.hidden), (quant.w2_perm, block.inter)):
        assert perm.shape == (block.num_experts, k) and len({tuple(p.tolist()) for p in perm}) == block.num_experts


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("group, actorder, fmt", [(-1, False, "pack-quantized"), (32, True, "pack-quantized"),
                                                  (32, False, "int-quantized")],
                         ids=["w8a16-channel", "w8a16-g32-act", "w8a8-g32"])  # fmt: skip
def test_compressed_tensors_int8_experts_match_dequantized_model(tmp_path, arch, group, actorder, fmt):
    """compressed-tensors 8-bit experts (RedHatAI's Qwen3-30B-A3B quantized.w8a16 / w8a8 layouts): each expert's
    packed or int8 codes and scales as the 8-bit experts' int8 codes ``[E, N, K]`` with scales ``[E, K / group,
    N]`` (act order: each expert's permutation), the dequantized model's tokens and logprobs."""
    wider = {"mixtral": {"intermediate_size": 64}, "qwen3_moe": {"moe_intermediate_size": 64}}[arch]  # 2 groups
    engine, _ = qc.compare(*qc.write_ct_int8(tmp_path, group, actorder, fmt, None if fmt == "pack-quantized"
                                             else "dynamic", arch, **wider), logprob_atol=1e-4, dtype="float32")
    block = moe_blocks(engine)[-1]
    w13, _, quant = block.quant_method.experts(block)
    assert quant.w13_int8 and quant.w2_int8 and quant.w13_offsets is None and (quant.w2_perm is not None) == actorder
    assert w13.dtype == torch.int8 and w13.shape == (block.num_experts, 2 * block.inter, block.hidden)
    groups = 1 if group == -1 else block.inter // group
    assert quant.w2_scale.shape == (block.num_experts, groups, block.hidden)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_bitsandbytes_8bit_experts_match_dequantized_model(tmp_path, arch):
    """bitsandbytes ``load_in_8bit`` experts (each expert's Linear8bitLt: int8 rows, ``SCB``) stacked as the 8-bit
    experts' int8 codes with a scale per output channel; the router (and Qwen2-MoE's shared-expert gate), quantized
    in the file too, dequantized at load: the dequantized model's tokens and logprobs."""
    engine, _ = qc.compare(*qc.write_bnb8(tmp_path, arch, routers=True), logprob_atol=1e-4, dtype="float32")
    block = moe_blocks(engine)[-1]
    w13, _, quant = block.quant_method.experts(block)
    assert quant.w13_int8 and quant.w2_int8 and quant.w13_offsets is None and quant.w2_group == block.inter
    assert w13.dtype == torch.int8 and w13.shape == (block.num_experts, 2 * block.inter, block.hidden)
    assert quant.w13_scale.shape == (block.num_experts, 1, 2 * block.inter)
    assert block.gate.weight.dtype == torch.float32


def test_gptq_dynamic_rules_choose_a_blocks_experts_format_and_refuse_mixed_experts():
    """GPTQModel's ``dynamic`` rules on experts: a rule over a block's experts picks their method (8-bit here), a
    ``-:`` rule leaves them 16-bit, and rules that give one expert of a block another format than the others fail when
    the block is built, naming the expert (its experts are stacked, one format)."""
    from core.layers.moe import SparseMoeBlock
    from core.layers.quantization import quant_config_from_hf
    from core.layers.quantization.gptq_bytes import GPTQBytesMoEMethod

    def block(dynamic):
        qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "dynamic": dynamic}
        return SparseMoeBlock(64, 64, 4, 2, True, kernel_backend="torch", prefix="model.layers.0.mlp",
                              quant=quant_config_from_hf({"quantization_config": qc}))

    assert isinstance(block({r"+:.*\.experts\..*": {"bits": 8}}).quant_method, GPTQBytesMoEMethod)
    assert block({r"-:.*\.experts\..*": {}}).quant_method is None
    with pytest.raises(ValueError, match="give expert 2 of model.layers.0.mlp another format than expert 0"):
        block({r"+:.*\.experts\.2\..*": {"bits": 8}})


def test_act_order_experts_whose_gate_and_up_orders_differ_fail(tmp_path):
    """An expert's gate and up read one input, so GPTQ gives them one act order; a file where they differ is
    refused rather than run with one of them."""
    from safetensors.torch import load_file, save_file

    quantized, _ = qc.write_gptq(tmp_path, 32, True, True, "mixtral")
    (shard,) = quantized.glob("*.safetensors")
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("experts.0.up_proj.g_idx"))
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, shard)
    with pytest.raises(ValueError, match="gate and up projections have different g_idx"):
        qc.greedy(quantized)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_online_fp8_quantizes_the_experts(tmp_path, arch):
    config, state = qc.base_checkpoint(arch=arch)
    path = qc.save(tmp_path / arch, config, state)
    engine, ours = qc.greedy(path, quantization="fp8", dtype="float32")
    _, reference = qc.greedy(path, dtype="float32")
    assert qc.logprob_error(ours, reference, steps=1) <= qc.FP8_FIRST_STEP_ATOL
    blocks = moe_blocks(engine)
    assert blocks and all(b.w13.dtype == qc.FP8 for b in blocks)
    assert all(b.gate.quant_method is None for b in blocks)  # the router stays as it is
    if arch == "qwen2_moe":  # the shared expert's projections are fp8 too
        assert all(b.shared_expert.gate_up_proj.weight.dtype == qc.FP8 for b in blocks)


def test_fp8_moe_checkpoint_with_static_input_scales_loads_and_runs_weight_only(tmp_path):
    """A static ``input_scale`` per expert is read (the checkpoint must load) and unused: the experts run w8a16, so
    they hold exactly the dynamic checkpoint's weights and scales (the dense projections use theirs)."""
    static, _ = qc.write_fp8(tmp_path, "fp8-static", "mixtral")
    dynamic, _ = qc.write_fp8(tmp_path, "fp8", "mixtral")
    engine, ours = qc.greedy(static, dtype="float32")
    assert all(len(r["tokens"]) == qc.GREEDY.max_tokens for r in ours)
    other, _ = qc.greedy(dynamic, dtype="float32")
    for a, b in zip(moe_blocks(engine), moe_blocks(other)):
        assert not hasattr(a, "w13_input_scale") and not hasattr(a, "w2_input_scale")
        for name in ("w13", "w2", "w13_scale", "w2_scale"):
            assert torch.equal(getattr(a, name).float(), getattr(b, name).float())


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_online_fp8_moe_on_gpu_with_cuda_graphs(tmp_path, arch):
    """The Triton fused MoE kernel with e4m3 experts inside the decode graphs (bf16): the same tokens as eager decode,
    first-step logprobs within fp8's error of the unquantized model."""
    config, state = qc.base_checkpoint(arch=arch)
    path = qc.save(tmp_path / arch, config, state)
    engine, graphs = qc.greedy(path, quantization="fp8", dtype="bfloat16", device="cuda")
    assert engine.runner.use_graphs and all(b.w13.dtype == qc.FP8 for b in moe_blocks(engine))
    _, eager = qc.greedy(path, quantization="fp8", dtype="bfloat16", device="cuda", enforce_eager=True)
    assert [r["tokens"] for r in graphs] == [r["tokens"] for r in eager]
    _, reference = qc.greedy(path, dtype="bfloat16", device="cuda")
    assert qc.logprob_error(graphs, reference, steps=1) <= qc.FP8_FIRST_STEP_ATOL


WIDER_EXPERTS = {"qwen2_moe": {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 64}}
GPU_EXPERTS = {"gptq8-g32-zp": lambda tmp: qc.write_gptq8(tmp, 32, False, False, "qwen3_moe", moe_intermediate_size=64),
               "gptq8-g32-act": lambda tmp: qc.write_gptq8(tmp, 32, True, False, "mixtral", intermediate_size=64),
               "gptq8-channel-sym": lambda tmp: qc.write_gptq8(tmp, -1, False, True, "mixtral", intermediate_size=64),
               "bnb8": lambda tmp: qc.write_bnb8(tmp, "qwen2_moe", routers=True),
               "ct-w8a16-g32-act": lambda tmp: qc.write_ct_int8(tmp, 32, True, arch="qwen3_moe",
                                                                moe_intermediate_size=64),
               "experts_int8": lambda tmp: experts_int8_checkpoints(tmp, "mixtral", intermediate_size=64),
               "nvfp4-modelopt": lambda tmp: qc.write_nvfp4(tmp, "modelopt", "qwen2_moe", **WIDER_EXPERTS["qwen2_moe"]),
               "nvfp4-ct": lambda tmp: qc.write_nvfp4(tmp, "ct", "mixtral", intermediate_size=64),
               "bnb-nf4": lambda tmp: qc.write_bnb(tmp, "nf4", True, "qwen2_moe", **WIDER_EXPERTS["qwen2_moe"]),
               "mxfp8": lambda tmp: qc.write_mxfp8(tmp, "mixtral", intermediate_size=64),
               "gptq3-g32-act": lambda tmp: qc.write_gptq(tmp, 32, True, False, "qwen3_moe", bits=3,
                                                          moe_intermediate_size=64)}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_EXPERTS))
def test_quantized_experts_on_gpu_with_cuda_graphs(tmp_path, case):
    """8-bit experts (GPTQ 8-bit and 3-bit, bitsandbytes 8-bit, compressed-tensors W8A16, ``--quantization
    experts_int8``) on the fused MoE kernel's 8-bit experts, 4-bit codebook experts (NVFP4, bitsandbytes NF4) on its
    codebook experts and MXFP8 on its fp8 block experts (bf16), inside the decode graphs: the same tokens as eager
    decode, first-step logprobs within bf16's own error of the fp32 dequantized model."""
    quantized, dequantized = GPU_EXPERTS[case](tmp_path)
    kwargs = {"quantization": "experts_int8"} if case == "experts_int8" else {}
    engine, graphs = qc.greedy(quantized, dtype="bfloat16", device="cuda", **kwargs)
    assert engine.runner.use_graphs
    quant = [b.quant_method.experts(b)[2] for b in moe_blocks(engine)]
    kind = {"nf4": lambda q: q.bnb4, "nvfp4": lambda q: q.bnb4, "mxfp8": lambda q: q.block == (1, 32)}
    held = next((check for name, check in kind.items() if name in case), lambda q: q.w13_int8 and q.w2_int8)
    assert quant and all(held(q) for q in quant)
    _, eager = qc.greedy(quantized, dtype="bfloat16", device="cuda", enforce_eager=True, **kwargs)
    assert [r["tokens"] for r in graphs] == [r["tokens"] for r in eager]
    qc.assert_within_bf16_error(graphs, dequantized)


def test_int4_experts_in_groups_the_kernel_cannot_step_fail_at_build():
    """Groups of 16: the fused MoE kernel steps K 32 rows at a time, one group's scale each step."""
    from core.layers.moe import SparseMoeBlock
    from core.layers.quantization.int4 import AWQConfig

    awq = AWQConfig.from_hf({"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True, "version": "gemm"})
    with pytest.raises(ValueError, match="group size 16, which must be a multiple of 32"):
        SparseMoeBlock(64, 32, 4, 2, True, kernel_backend="torch", quant=awq, prefix="model.layers.0.mlp")
