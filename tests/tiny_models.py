"""Tiny random-weight HF models for parity tests: one per supported architecture, saved as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384


def hf_config(arch: str, **overrides):
    import transformers

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
        initializer_range=0.2, rms_norm_eps=1e-6,
    )
    if arch == "llama":  # llama3 RoPE scaling, untied head
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    elif arch == "qwen2":  # qkv bias, tied embeddings
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    elif arch == "qwen3":  # q/k norm, head_dim != hidden / heads
        cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True, use_sliding_window=False)
    elif arch in FAMILY_CONFIGS:
        cfg = FAMILY_CONFIGS[arch](transformers, common)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


SLIDING_WINDOW = 12  # shorter than most test prompts: tokens past it must not see the start


def _gemma(t, common):
    return t.GemmaConfig(**common, head_dim=16, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)


def _gemma2(t, common):  # alternating sliding/global layers, both soft-caps, query_pre_attn_scalar != head_dim
    return t.Gemma2Config(**common, head_dim=16, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=24,
                          attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=True)


def _gpt2(t, common):
    return t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=0,
                        eos_token_id=1, initializer_range=0.2, activation_function="gelu_new")


def _falcon(**kw):
    def build(t, common):
        return t.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              ffn_hidden_size=128, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
                              initializer_range=0.2, **kw)
    return build


def _phi3(t, common):  # partial rotary, longrope switching from short to long factors while generating, window
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [1.5, 3.0, 6.0, 11.0]}
    return t.Phi3Config(**common, sliding_window=SLIDING_WINDOW, original_max_position_embeddings=LONGROPE_ORIGINAL,
                        rope_parameters=rope, tie_word_embeddings=False, pad_token_id=0)


def _gemma3(t, common):  # local layers with their own base, scaled global RoPE, q/k norm
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
    return t.Gemma3TextConfig(**common, head_dim=16, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=24,
                              layer_types=["sliding_attention", "full_attention"], rope_parameters=rope,
                              tie_word_embeddings=True)


LONGROPE_ORIGINAL = 32  # prompts of 40 and 70 run long from the start, the shorter ones never cross it

# Families added by issue 11: name -> config builder over transformers and the common tiny fields.
FAMILY_CONFIGS = {
    "mistral_sw": lambda t, c: t.MistralConfig(**c, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False),
    "qwen2_sw": lambda t, c: t.Qwen2Config(**c, tie_word_embeddings=True, use_sliding_window=True,
                                           sliding_window=SLIDING_WINDOW, max_window_layers=1),
    "starcoder2": lambda t, c: t.Starcoder2Config(**c, sliding_window=SLIDING_WINDOW, use_bias=True,
                                                  tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"),
    "gpt_neox": lambda t, c: t.GPTNeoXConfig(**{k: v for k, v in c.items() if k != "num_key_value_heads"},
                                             partial_rotary_factor=0.25, use_parallel_residual=True,
                                             tie_word_embeddings=False),
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gpt2": _gpt2,
    "phi3": _phi3,
    "falcon": _falcon(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=True),
    "falcon_mq": _falcon(new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False),
    "falcon_seq": _falcon(new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True),
    "falcon_alibi": _falcon(new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True,
                            alibi=True),
    # issue 12, mixtures of experts
    "mixtral": lambda t, c: t.MixtralConfig(**{**c, "intermediate_size": 32}, num_local_experts=4,
                                            num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen2_moe": lambda t, c: t.Qwen2MoeConfig(**c, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=48, norm_topk_prob=False,
                                               mlp_only_layers=[0], tie_word_embeddings=True),
    "qwen3_moe": lambda t, c: t.Qwen3MoeConfig(**c, head_dim=32, num_experts=8, num_experts_per_tok=3,
                                               moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2,
                                               tie_word_embeddings=False),
}


RANDOMIZED_NORMS = {"gemma", "gemma2", "gemma3", "starcoder2", "gpt_neox", "gpt2", "falcon", "falcon_mq",
                    "falcon_seq", "falcon_alibi"}  # LayerNorm biases too


def make_tiny_model(directory: Path, arch: str, seed: int = 0) -> Path:
    """Save a random model of ``arch`` under ``directory`` (reused if already there) and return its path."""
    import transformers

    path = Path(directory) / f"{arch}-{seed}"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32)
    if arch.startswith("qwen2") or arch in RANDOMIZED_NORMS:  # HF zero-inits biases / (1+w) norms; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or (arch in RANDOMIZED_NORMS and "norm" in name):
                torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(path)
    return path


def hf_greedy(path: Path, prompts: list[list[int]], max_tokens: int, top_logprobs: int = 5):
    """transformers' greedy ``generate`` (EOS disabled): token ids and the top logprobs of each step."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    config = transformers.GenerationConfig(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
        return_dict_in_generate=True,
    )
    results = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), generation_config=config)
            tokens = out.sequences[0, len(prompt):].tolist()
            steps = []
            for logits in out.logits:
                lp = logits[0].float().log_softmax(-1)
                top = lp.topk(top_logprobs)
                steps.append(dict(zip(top.indices.tolist(), top.values.tolist())))
            results.append((tokens, steps))
    return results
