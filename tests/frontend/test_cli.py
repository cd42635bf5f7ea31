import importlib

import pytest

from frontend import cli


def test_serve_flags_use_vllm_names():
    args = cli.serve_parser().parse_args([
        "my/model", "--host", "127.0.0.1", "--port", "9000", "--api-key", "k", "--served-model-name", "a", "b",
        "--max-model-len", "4096", "--gpu-memory-utilization", "0.5", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "1024", "--dtype", "float16", "--load-format", "dummy",
        "--chat-template", "t.jinja", "--enforce-eager", "--no-enable-prefix-caching",
        "--num-gpu-blocks-override", "100", "--seed", "7",
    ])
    config = cli.engine_config_from_args(args, served_model_name="a", chat_template=args.chat_template)
    assert (args.host, args.port, args.api_key, args.served_model_name) == ("127.0.0.1", 9000, "k", ["a", "b"])
    assert config.model == "my/model" and config.served_model_name == "a" and config.chat_template == "t.jinja"
    assert (config.max_model_len, config.gpu_memory_utilization, config.max_num_seqs) == (4096, 0.5, 8)
    assert (config.max_num_batched_tokens, config.dtype, config.load_format) == (1024, "float16", "dummy")
    assert config.enforce_eager and not config.enable_prefix_caching
    assert (config.num_gpu_blocks_override, config.seed) == (100, 7)


def test_serve_defaults():
    args = cli.serve_parser().parse_args([])
    config = cli.engine_config_from_args(args)
    assert config.model is None and config.enable_prefix_caching and not config.enforce_eager
    assert args.port == 8000


@pytest.mark.parametrize("command,module", [("serve", "benchmarks.serve"), ("throughput", "benchmarks.throughput")])
def test_bench_dispatch(monkeypatch, command, module):
    seen = []
    monkeypatch.setattr(importlib.import_module(module), "main", lambda argv: seen.append(argv) or 0)
    cli.main(["bench", command, "--num-prompts", "3"])
    assert seen == [["--num-prompts", "3"]]


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "pagedserve" in capsys.readouterr().err
