"""Derived engine settings (``resolve_config``) and the environment variables (``core/envs.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from core import envs
from core.config import ModelConfig, resolve_config
from ipc.config import EngineConfig

REPO = Path(__file__).resolve().parents[2]


def _model(max_positions=4096, dtype="bfloat16") -> ModelConfig:
    return ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": max_positions,
        "torch_dtype": dtype,
    })


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("PAGEDSERVE_KERNEL_BACKEND", "PAGEDSERVE_ATTENTION_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_defaults_on_cpu(clean_env):
    resolved = resolve_config(EngineConfig(), _model(), torch.device("cpu"))
    assert resolved.device == torch.device("cpu") and resolved.dtype == torch.float32
    assert (resolved.max_model_len, resolved.max_num_batched_tokens) == (4096, 8192)
    assert not resolved.async_scheduling
    assert (resolved.kernel_backend, resolved.attention_backend) == ("auto", "auto")


def test_defaults_on_cuda_follow_the_checkpoint(clean_env):
    resolved = resolve_config(EngineConfig(), _model(max_positions=16384), torch.device("cuda"))
    assert resolved.dtype == torch.bfloat16 and resolved.async_scheduling
    assert resolved.max_num_batched_tokens == 16384  # max(8192, max_model_len)


def test_explicit_values_win(clean_env):
    config = EngineConfig(max_model_len=1024, max_num_batched_tokens=256, dtype="half", async_scheduling=True)
    resolved = resolve_config(config, _model(), torch.device("cpu"))
    assert (resolved.max_model_len, resolved.max_num_batched_tokens) == (1024, 256)
    assert resolved.dtype == torch.float16 and resolved.async_scheduling
    assert "max_model_len=1024" in resolved.summary() and "dtype=float16" in resolved.summary()


def test_max_model_len_beyond_the_model_fails(clean_env):
    with pytest.raises(ValueError, match="larger than the model's maximum context of 4096"):
        resolve_config(EngineConfig(max_model_len=5000), _model(), torch.device("cpu"))


def test_backend_env_vars_are_the_defaults(clean_env):
    clean_env.setenv("PAGEDSERVE_ATTENTION_BACKEND", "torch")
    resolved = resolve_config(EngineConfig(), _model(), torch.device("cpu"))
    assert (resolved.kernel_backend, resolved.attention_backend) == ("auto", "torch")
    assert resolve_config(EngineConfig(attention_backend="triton"), _model(),
                          torch.device("cpu")).attention_backend == "triton"
    clean_env.delenv("PAGEDSERVE_ATTENTION_BACKEND")
    clean_env.setenv("PAGEDSERVE_KERNEL_BACKEND", "torch")  # every kernel, attention included
    resolved = resolve_config(EngineConfig(), _model(), torch.device("cpu"))
    assert (resolved.kernel_backend, resolved.attention_backend) == ("torch", "torch")
    clean_env.setenv("PAGEDSERVE_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PAGEDSERVE_KERNEL_BACKEND"):
        resolve_config(EngineConfig(), _model(), torch.device("cpu"))


def test_env_module_reads_lazily(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    assert envs.cache_dir() == tmp_path
    monkeypatch.setenv("PAGEDSERVE_LOG_LEVEL", "debug")
    assert envs.log_level() == "DEBUG"
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert envs.hf_hub_offline()


def test_every_env_var_read_is_documented_in_one_module():
    """No module outside core/envs.py reads a PAGEDSERVE_/VLLM_/HF_ setting, and each one envs reads is listed."""
    documented = {var.name for var in envs.ENV_VARS}
    for path in [*REPO.glob("core/**/*.py"), *REPO.glob("frontend/**/*.py"), *REPO.glob("ipc/**/*.py")]:
        if path.name == "envs.py":
            continue
        assert "os.environ" not in path.read_text(), f"{path} reads the environment; use core/envs.py"
    source = (REPO / "core" / "envs.py").read_text()
    names = {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)
             and isinstance(node.value, str) and node.value.isupper() and "_" in node.value}
    assert names - {"XDG_CACHE_HOME"} <= documented
