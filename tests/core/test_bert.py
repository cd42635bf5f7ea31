"""BERT / RoBERTa encoders against transformers on tiny random configs, and pooling against direct computations."""

from __future__ import annotations

import json

import pytest
import torch

from core.models.bert import BertConfig, BertModel
from core.pooling import PoolingConfig, PoolingType, load_pooling_config, pool

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")


def _hf_model(family: str):
    import transformers

    if family == "bert":
        cfg = transformers.BertConfig(**TINY, pad_token_id=0)
        cfg.architectures = ["BertModel"]
        model = transformers.BertModel(cfg, add_pooling_layer=True)
    else:
        cfg = transformers.RobertaConfig(**{**TINY, "max_position_embeddings": 66}, pad_token_id=1)
        cfg.architectures = ["RobertaModel"]
        model = transformers.RobertaModel(cfg, add_pooling_layer=True)
    torch.manual_seed(0)
    for p in model.parameters():  # random everything (HF initialises LayerNorms to 1/0)
        p.data.normal_(0, 0.3)
    return cfg, model.eval()


def _ours(cfg, hf_model) -> BertModel:
    model = BertModel(BertConfig.from_hf_dict(cfg.to_dict()))
    model.load_weights(hf_model.state_dict().items())
    return model.eval()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_hidden_states_match_transformers(family):
    cfg, hf = _hf_model(family)
    ours = _ours(cfg, hf)
    assert ours.config.max_model_len == 64
    gen = torch.Generator().manual_seed(1)
    lens = [1, 7, 64, 23]
    prompts = [torch.randint(2, TINY["vocab_size"], (n,), generator=gen) for n in lens]
    ids = torch.cat(prompts)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        packed = ours(ids, positions, cu, max(lens))
        for i, prompt in enumerate(prompts):
            expected = hf(input_ids=prompt[None]).last_hidden_state[0]
            torch.testing.assert_close(packed[cu[i] : cu[i + 1]], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attention_backend, kernel_backend, expected",
                         [("auto", "auto", "auto"), ("torch", "auto", "torch"), ("triton", "torch", "torch")])
def test_model_hands_its_attention_backend_to_every_layer(attention_backend, kernel_backend, expected):
    """As for the decoders: the backend is given at construction (a torch kernel backend puts attention on the
    reference too) and each layer passes it to the encoder attention dispatcher."""
    cfg = BertConfig.from_hf_dict({**TINY, "architectures": ["BertModel"]})
    model = BertModel(cfg, attention_backend=attention_backend, kernel_backend=kernel_backend)
    assert [layer.attention_backend for layer in model.layers] == [expected] * TINY["num_hidden_layers"]
    with pytest.raises(ValueError, match="attention backend"):
        BertModel(cfg, attention_backend="flash")


def test_unknown_and_missing_tensors_are_errors():
    cfg, hf = _hf_model("bert")
    model = BertModel(BertConfig.from_hf_dict(cfg.to_dict()))
    state = dict(hf.state_dict())
    with pytest.raises(ValueError, match="no place"):
        model.load_weights([*state.items(), ("encoder.layer.9.extra.weight", torch.zeros(1))])
    state.pop("encoder.layer.1.output.dense.weight")
    with pytest.raises(ValueError, match="missing"):
        model.load_weights(state.items())


def test_unsupported_position_embedding_is_named():
    with pytest.raises(ValueError, match="relative_key"):
        BertConfig.from_hf_dict({**TINY, "architectures": ["BertModel"], "position_embedding_type": "relative_key"})


# ---------------------------------------------------------------------------------------------------- pooling
def _packed(lens):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(sum(lens), 8, generator=gen)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    return hidden, cu


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kind", list(PoolingType))
def test_pooling_matches_direct_computation(kind, normalize):
    lens = [3, 1, 6]
    hidden, cu = _packed(lens)
    out = pool(hidden, cu, PoolingConfig(kind, normalize))
    for i in range(len(lens)):
        rows = hidden[cu[i] : cu[i + 1]]
        expected = {PoolingType.MEAN: rows.mean(0), PoolingType.CLS: rows[0], PoolingType.LAST: rows[-1]}[kind]
        if normalize:
            expected = expected / expected.norm()
        torch.testing.assert_close(out[i], expected)


def _write_st(tmp_path, pooling_cfg: dict, normalize: bool):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg))


DEFAULT = PoolingConfig(PoolingType.LAST, True)


def test_pooling_config_from_sentence_transformers_files(tmp_path):
    assert load_pooling_config(tmp_path, DEFAULT) == DEFAULT  # no modules.json
    _write_st(tmp_path, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, normalize=False)
    assert load_pooling_config(tmp_path, DEFAULT) == PoolingConfig(PoolingType.CLS, False)


def test_pooling_config_mean_normalized(tmp_path):
    _write_st(tmp_path, {"pooling_mode_mean_tokens": True}, normalize=True)
    assert load_pooling_config(tmp_path, DEFAULT) == PoolingConfig(PoolingType.MEAN, True)


def test_unsupported_pooling_mode_is_named(tmp_path):
    _write_st(tmp_path, {"pooling_mode_max_tokens": True}, normalize=False)
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        load_pooling_config(tmp_path, DEFAULT)
