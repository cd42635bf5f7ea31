"""``--kv-cache-dtype fp8`` end to end on a tiny model (CPU: the torch reference path; a GPU variant runs the Triton
kernels): the engine allocates e4m3 caches and twice the blocks, loads checkpoint KV scales, and its outputs are
exactly those of the same model whose keys and values are rounded to e4m3 before they are cached (through chunked
prefill, prefix-cache hits, preemption and speculative decoding), and close to the unquantized cache's."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kernels.attention_prep as attention_prep_module
from core.layers.attention import PagedAttention
from ipc.config import engine_config_from_kwargs
from ipc.messages import SamplingParams
from kernels.attention_common import FP8_KV_DTYPE, dequantize_kv_ref, quantize_kv_ref
from tests.core.engine_utils import make_engine, run_engine
from tests.tiny_models import make_tiny_model

# A shared 32-token prefix (two full blocks: prefix-cache hits for the later prompts), prompts long enough for the
# 32-token step budget to chunk them.
PREFIX = list(range(40, 72))
PROMPTS = [PREFIX + [5, 9, 23, 11], [7] * 33, PREFIX + list(range(100, 130)), [3, 4, 5, 3, 4, 5, 3, 4, 5, 3, 4]]
NUM_TOKENS = 12


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("kvfp8"), "llama", 0)


def _layers(engine) -> list[PagedAttention]:
    return [m for m in engine.runner.model.modules() if isinstance(m, PagedAttention)]


def _e4m3_rounding_write(monkeypatch):
    """Make the reference cache write round keys and values to e4m3 (with the layer's scales) and store them in the
    model dtype: an unquantized cache holding exactly what an fp8 cache would hold."""
    real = attention_prep_module.write_kv_cache_ref

    def write(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        k = dequantize_kv_ref(quantize_kv_ref(k, k_scale, FP8_KV_DTYPE), k_scale, k.dtype)
        v = dequantize_kv_ref(quantize_kv_ref(v, v_scale, FP8_KV_DTYPE), v_scale, v.dtype)
        real(k, v, k_cache, v_cache, slot_mapping)

    monkeypatch.setattr(attention_prep_module, "write_kv_cache_ref", write)


def _assert_same_outputs(ours: dict, expected: dict, atol: float) -> None:
    assert ours.keys() == expected.keys()
    for key in expected:
        assert ours[key]["tokens"] == expected[key]["tokens"], key
        for step, (a, b) in enumerate(zip(ours[key]["logprobs"], expected[key]["logprobs"])):
            assert a.keys() == b.keys(), (key, step)
            assert max(abs(a[t] - b[t]) for t in a) <= atol, (key, step)


# Chunked prefill (32-token steps), prefix-cache hits, and preemption (9 usable blocks cannot hold the four sequences).
STRESS = dict(max_num_batched_tokens=32, num_gpu_blocks_override=10, block_size=16, max_model_len=128)


def test_config_flag_and_llm_argument():
    assert engine_config_from_kwargs(kv_cache_dtype="fp8").kv_cache_dtype == "fp8"
    assert engine_config_from_kwargs(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8_e4m3"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3; got 'int8'"):
        engine_config_from_kwargs(kv_cache_dtype="int8")


def test_fp8_engine_is_the_model_with_e4m3_rounded_kv(model, monkeypatch):
    """The fp8 engine's tokens and logprobs equal (to float32 rounding) those of the auto engine whose cache write
    rounds to e4m3: the cache really holds e4m3 values, every layer reads them back with the right scale, under
    chunked prefill, prefix caching and preemption."""
    fp8 = make_engine(model, kv_cache_dtype="fp8", **STRESS)
    assert all(c.dtype == FP8_KV_DTYPE for c in fp8.runner.kv_caches)
    ours = run_engine(fp8, PROMPTS, greedy())
    assert fp8.scheduler.total_preemptions > 0
    _e4m3_rounding_write(monkeypatch)
    simulated = run_engine(make_engine(model, **STRESS), PROMPTS, greedy())
    _assert_same_outputs(ours, simulated, atol=1e-4)


def test_fp8_logprobs_close_to_the_unquantized_cache(model):
    """vLLM's check_logprobs_close rule against the auto cache (where greedy tokens diverge, each engine's token is in
    the other's top 5, and comparison stops), plus a stated bound while they agree: every top-5 logprob within 0.5
    nats, mean difference under 0.2. This tiny random model is sharp and full of near-ties (top two within 0.1 nats),
    so e4m3's 2^-4 relative rounding shows; measured: max 0.27, mean ~0.1. A cache read without its scales, or with
    garbage, is off by whole nats."""
    auto = run_engine(make_engine(model), PROMPTS, greedy())
    fp8 = run_engine(make_engine(model, kv_cache_dtype="fp8"), PROMPTS, greedy())
    diffs = []
    for key in auto:
        for tok_a, tok_b, lp_a, lp_b in zip(auto[key]["tokens"], fp8[key]["tokens"], auto[key]["logprobs"],
                                            fp8[key]["logprobs"]):  # fmt: skip
            diffs += [abs(lp_a[t] - lp_b[t]) for t in lp_a if t in lp_b]
            if tok_a != tok_b:
                assert tok_b in lp_a and tok_a in lp_b, (key, tok_a, tok_b)
                break
    assert max(diffs) <= 0.5, max(diffs)
    assert sum(diffs) / len(diffs) <= 0.2, sum(diffs) / len(diffs)
    assert max(diffs) > 1e-3, "fp8 changed nothing: the cache is not quantized"


@pytest.mark.parametrize("dtype, factor", [("bfloat16", 2), ("float32", 4)])
def test_fp8_cache_holds_more_blocks(model, dtype, factor):
    """The same KV memory holds twice the blocks of a 16-bit cache (four times a float32 one)."""
    sizes = {}
    for kv in ("auto", "fp8"):
        engine = make_engine(model, dtype=dtype, kv_cache_dtype=kv, num_gpu_blocks_override=None,
                             cpu_kv_cache_gib=1 / 256)
        sizes[kv] = engine.kv.pool.num_blocks
        total = sum(c.numel() * c.element_size() for c in engine.runner.kv_caches)
        assert total <= 2**30 / 256
        assert engine.runner.kv_caches[0].dtype == (FP8_KV_DTYPE if kv == "fp8" else getattr(torch, dtype))
    # tiny llama: 2 layers x (k, v) x 16 tokens x 2 KV heads x head_dim 16 = 2048 elements per block
    assert sizes["auto"] == 2**22 // (2048 * torch.empty((), dtype=getattr(torch, dtype)).element_size())
    assert sizes["fp8"] == factor * sizes["auto"]


def _with_tensors(model, tmp_path, extra: dict[str, torch.Tensor]):
    path = tmp_path / "scaled"
    shutil.copytree(model, path)
    weights = load_file(path / "model.safetensors")
    weights.update(extra)
    save_file(weights, path / "model.safetensors")
    return path


def test_checkpoint_kv_scales_are_loaded_and_used(model, tmp_path, monkeypatch):
    scales = {"model.layers.0.self_attn.k_scale": 0.5, "model.layers.0.self_attn.v_scale": 0.25,
              "model.layers.1.self_attn.kv_scale": 2.0}
    path = _with_tensors(model, tmp_path, {k: torch.tensor(v) for k, v in scales.items()})
    fp8 = make_engine(path, kv_cache_dtype="fp8")
    assert [(a.k_scale, a.v_scale) for a in _layers(fp8)] == [(0.5, 0.25), (2.0, 2.0)]
    ours = run_engine(fp8, PROMPTS[:2], greedy())
    default = run_engine(make_engine(model, kv_cache_dtype="fp8"), PROMPTS[:2], greedy())
    assert any(ours[k]["logprobs"][0] != default[k]["logprobs"][0] for k in ours), "the scales changed nothing"
    _e4m3_rounding_write(monkeypatch)
    simulated = run_engine(make_engine(path), PROMPTS[:2], greedy())  # auto cache: scales loaded, rounding simulated
    _assert_same_outputs(ours, simulated, atol=1e-4)


@pytest.mark.parametrize("name, value, message", [
    ("model.layers.0.self_attn.k_scale", torch.ones(2), "only per-tensor scales"),
    ("model.layers.7.self_attn.v_scale", torch.tensor(1.0), "names no attention layer"),
    ("model.layers.0.self_attn.k_scale", torch.tensor(0.0), "positive finite"),
])
def test_bad_checkpoint_kv_scales_fail_at_load(model, tmp_path, name, value, message):
    path = _with_tensors(model, tmp_path, {name: value})
    with pytest.raises(ValueError, match=message):
        make_engine(path, kv_cache_dtype="fp8")


def test_fp8_with_ngram_speculation_keeps_the_greedy_tokens(model):
    """Speculative decoding verifies drafts against the fp8 cache: greedy tokens as without speculation."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    plain = run_engine(make_engine(model, kv_cache_dtype="fp8"), PROMPTS, greedy())
    speculative = run_engine(make_engine(model, kv_cache_dtype="fp8", speculative_config=spec), PROMPTS, greedy())
    for key in plain:
        assert speculative[key]["tokens"] == plain[key]["tokens"], key


def test_fp8_with_a_draft_model(model):
    """A draft model (the target's own weights) keeps its KV in fp8 too, sized into the same blocks: its greedy
    drafts read the same quantized cache the target verifies with, so every draft is accepted, and the tokens are
    those of the fp8 engine without speculation."""
    spec = {"method": "draft_model", "model": str(model), "num_speculative_tokens": 3}
    plain = run_engine(make_engine(model, kv_cache_dtype="fp8"), PROMPTS, greedy())
    engine = make_engine(model, kv_cache_dtype="fp8", speculative_config=spec)
    assert all(c.dtype == FP8_KV_DTYPE for c in engine.runner.draft.kv_caches)
    assert engine.runner.draft.kv_block_bytes() == 2048  # 2 layers x (k, v) x 16 tokens x 2 heads x 16 dims x 1 B
    assert engine.runner.kv_block_bytes() == 2 * 2048  # one block id addresses the target's and the draft's
    speculative = run_engine(engine, PROMPTS, greedy())
    for key in plain:
        assert speculative[key]["tokens"] == plain[key]["tokens"], key
    stats = engine.get_stats()
    assert stats["spec_num_draft_tokens"] > 0
    assert stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"]


@pytest.mark.gpu
def test_gpu_fp8_engine_matches_the_reference_path(model):
    """On CUDA (Triton prep, decode and prefill kernels, CUDA graphs) the fp8 engine gives the reference fp8 path's
    greedy tokens on the tiny model, and logprobs within bf16 noise of it."""
    common = dict(kv_cache_dtype="fp8", dtype="bfloat16", device="cuda")
    triton_out = run_engine(make_engine(model, **common), PROMPTS, greedy())
    reference = run_engine(make_engine(model, attention_backend="torch", kernel_backend="torch", enforce_eager=True,
                                       **common), PROMPTS, greedy())  # fmt: skip
    for key in reference:
        a, b = triton_out[key], reference[key]
        n = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), NUM_TOKENS)
        for lp_a, lp_b in zip(a["logprobs"][:n], b["logprobs"][:n]):
            assert max(abs(lp_a[t] - lp_b[t]) for t in lp_a if t in lp_b) <= 0.1
        if n < NUM_TOKENS:  # only a bf16 near-tie may flip a token: both choices within 0.1 nats in the reference
            chosen, expected = b["logprobs"][n], b["tokens"][n]
            assert a["tokens"][n] in chosen and chosen[expected] - chosen[a["tokens"][n]] <= 0.1, (key, n, chosen)


def test_embedding_engines_and_the_fp8_cache(model, tmp_path):
    """A decoder embedding (task embed) computes its prompt through an fp8 scratch cache, close to the auto one's
    vector; an encoder (BERT) keeps no KV cache, so asking it for fp8 is a startup error that says so."""
    import numpy as np
    import transformers

    from core.pooling_engine import create_engine_core
    from ipc.config import EngineConfig
    from ipc.messages import EngineRequest

    vectors = {}
    for kv in ("auto", "fp8"):
        engine = create_engine_core(EngineConfig(model=str(model), task="embed", device="cpu", kv_cache_dtype=kv))
        assert engine.runner.kv_caches[0].dtype == (FP8_KV_DTYPE if kv == "fp8" else torch.float32)
        engine.add_request(EngineRequest("0", PROMPTS[2], SamplingParams(max_tokens=1)))
        while engine.has_work():
            for out in engine.step().outputs:
                vectors[kv] = np.frombuffer(out.embedding, dtype=np.float32)
    cosine = float(vectors["auto"] @ vectors["fp8"])  # both normalized
    assert 0.99 < cosine < 1.0 - 1e-7, cosine

    bert = tmp_path / "bert"
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, max_position_embeddings=40, architectures=["BertModel"])
    transformers.BertModel(cfg).save_pretrained(bert)
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' does not apply: encoder models"):
        create_engine_core(EngineConfig(model=str(bert), device="cpu", kv_cache_dtype="fp8"))
