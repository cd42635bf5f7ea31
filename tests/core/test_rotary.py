"""Every RoPE type's table against transformers' own rotary embedding: row ``p`` of our cos/sin table is what
transformers rotates the token at ``p`` by when ``p`` is the newest position (a decode step)."""

from __future__ import annotations

import pytest
import torch

from core.config import ModelConfig
from core.layers.rotary import RotaryEmbedding

HEAD_DIM = 32
MAX_POSITIONS = 64

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
             "beta_slow": 1.0},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707,
                    "mscale_all_dim": 1.0},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 16,
                 "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
                 "long_factor": [2.0 + 0.5 * i for i in range(HEAD_DIM // 2)]},
}


def _hf(scaling):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": 10000.0} if scaling is None else {**scaling, "rope_theta": 10000.0}
    cfg = transformers.LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, num_hidden_layers=1,
                                   vocab_size=32, intermediate_size=8, max_position_embeddings=MAX_POSITIONS,
                                   rope_parameters=rope)
    return cfg, LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_rope_table_matches_transformers(name):
    hf_cfg, hf_rotary = _hf(SCALINGS[name])
    ours = ModelConfig.from_hf_dict({**hf_cfg.to_dict(), "architectures": ["LlamaForCausalLM"]})
    table = RotaryEmbedding(HEAD_DIM, ours.max_position_embeddings, ours.rope_theta, ours.rope_scaling).cos_sin_cache
    half = HEAD_DIM // 2
    positions = sorted({0, 1, 7, 15, 16, 17, 40, ours.max_position_embeddings - 1})
    x = torch.zeros(1, 1, HEAD_DIM)
    for p in positions:  # increasing: transformers' dynamic types only grow their cached length
        cos, sin = hf_rotary(x, torch.tensor([[p]]))
        if name == "longrope" and p >= 16:  # past the original context: the long half of the table
            p += ours.max_position_embeddings
        torch.testing.assert_close(table[p, :half], cos[0, 0, :half], rtol=1e-5, atol=1e-5, msg=f"{name} cos @{p}")
        torch.testing.assert_close(table[p, half:], sin[0, 0, :half], rtol=1e-5, atol=1e-5, msg=f"{name} sin @{p}")


def test_dynamic_extends_the_context():
    hf_cfg, _ = _hf(SCALINGS["dynamic"])
    ours = ModelConfig.from_hf_dict({**hf_cfg.to_dict(), "architectures": ["LlamaForCausalLM"]})
    assert ours.max_position_embeddings == 2 * MAX_POSITIONS


def test_unknown_rope_type_is_named():
    with pytest.raises(ValueError, match="Unsupported rope_scaling type 'mrope'"):
        RotaryEmbedding(HEAD_DIM, 8, 10000.0, {"rope_type": "mrope"})
