"""``EngineConfig`` validation for ``LLM(**kwargs)``: unknown, ill-typed, out-of-choices, not supported yet."""

from __future__ import annotations

import pickle

import pytest

from ipc.config import NOT_SUPPORTED_YET, EngineConfig, engine_config_from_kwargs


def test_unknown_argument_lists_the_valid_ones():
    with pytest.raises(TypeError, match=r"Unknown engine argument\(s\) \['max_num_seq'\]; known: .*max_num_seqs"):
        engine_config_from_kwargs(max_num_seq=3)


def test_ill_typed_argument_names_the_field():
    with pytest.raises(TypeError, match=r"max_num_seqs='a'.*Expected `int`.*known arguments"):
        engine_config_from_kwargs(max_num_seqs="a")
    with pytest.raises(TypeError, match="enforce_eager"):
        engine_config_from_kwargs(enforce_eager="yes")


def test_choices_are_checked_on_every_construction():
    with pytest.raises(ValueError, match="dtype must be one of auto, .*bf16; got 'int8'"):
        engine_config_from_kwargs(dtype="int8")
    with pytest.raises(ValueError, match="kernel_backend must be one of auto, torch, triton"):
        EngineConfig(kernel_backend="cuda")


def test_not_supported_yet_off_values_are_accepted():
    assert engine_config_from_kwargs(tensor_parallel_size=1, kv_cache_dtype="auto", enable_lora=False) == \
        EngineConfig()
    with pytest.raises(ValueError, match="reasoning-parser.*not supported yet"):
        engine_config_from_kwargs(reasoning_parser="deepseek_r1")
    with pytest.raises(ValueError, match="enable-lora.*not supported yet"):
        engine_config_from_kwargs(enable_lora=True)
    assert "tensor_parallel_size" not in NOT_SUPPORTED_YET and "pipeline_parallel_size" not in NOT_SUPPORTED_YET


def test_served_model_names_and_pickling():
    assert EngineConfig().served_model_names == []
    assert EngineConfig(served_model_name="a").served_model_names == ["a"]
    config = engine_config_from_kwargs(served_model_name=["a", "b"], max_num_seqs=4)
    assert config.served_model_names == ["a", "b"]
    assert pickle.loads(pickle.dumps(config)) == config  # how the frontend hands it to the engine process


def test_config_env_and_model_source_modules_import_no_torch():
    """The frontend imports these (CLI, tokenizer loading): they must stay free of torch and model code."""
    import subprocess
    import sys

    code = ("import sys, ipc.config, core.envs, core.model_source, core.tokenizer, frontend.config_args, "
            "frontend.server_options; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
