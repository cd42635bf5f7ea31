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


# ------------------------------------------------------------------------------------------ generated flags

from ipc.config import NOT_SUPPORTED_YET, EngineConfig, config_fields, engine_config_from_kwargs  # noqa: E402

ENGINE_FIELDS = config_fields(EngineConfig)


JSON_SAMPLES = {"speculative_config": '{"method": "ngram", "num_speculative_tokens": 2}'}


def _sample_value(field):
    """A value of the field's type that differs from its default."""
    if field.arg.parse is not None:  # given as JSON on the command line
        return JSON_SAMPLES[field.name]
    if field.value_type is bool:
        return True if field.default is None else not field.default
    if field.arg.choices is not None:
        return next(c for c in field.arg.choices if c != field.default)
    if field.arg.nargs == "+":
        return ["name-a", "name-b"]
    if field.value_type is int:
        return (field.default or 0) + 7
    if field.value_type is float:
        return (field.default or 0.0) + 0.25
    return f"value-of-{field.name}"


def _parsed(field, value):
    return value if field.arg.parse is None else field.arg.parse(value)


def _argv(field, value):
    if field.value_type is bool:
        return [field.flag if value else "--no-" + field.flag[2:]]
    if isinstance(value, list):
        return [field.flag, *value]
    return [field.flag, str(value)]


@pytest.mark.parametrize("name", list(ENGINE_FIELDS))
def test_every_engine_field_is_a_serve_flag(name):
    field = ENGINE_FIELDS[name]
    value = _sample_value(field)
    assert value != field.default
    config = cli.engine_config_from_args(cli.serve_parser().parse_args(_argv(field, value)))
    assert getattr(config, name) == _parsed(field, value)
    defaults = cli.engine_config_from_args(cli.serve_parser().parse_args([]))
    assert getattr(defaults, name) == field.default


@pytest.mark.parametrize("name", list(ENGINE_FIELDS))
def test_every_engine_field_is_an_llm_argument(name):
    """``LLM(**kwargs)`` builds its config with ``engine_config_from_kwargs``: every field passes through it,
    and a value of the wrong type fails naming the field."""
    field = ENGINE_FIELDS[name]
    value = _sample_value(field)
    assert getattr(engine_config_from_kwargs(**{name: value}), name) == _parsed(field, value)
    wrong = 3.5 if field.value_type is not float else "not-a-number"
    with pytest.raises(TypeError, match=name):
        engine_config_from_kwargs(**{name: wrong})


def test_generate_takes_the_engine_flags():
    """``pagedserve generate`` builds its parser with the same generated engine flags."""
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_engine_args(parser)
    config = cli.engine_config_from_args(parser.parse_args(["m", "--max-num-seqs", "3", "--no-async-scheduling"]))
    assert (config.model, config.max_num_seqs, config.async_scheduling) == ("m", 3, False)


def test_choices_come_from_the_config_table():
    from core.config import _DTYPES
    from core.loader import LOAD_FORMATS as LOADER_FORMATS
    from ipc.config import DTYPES, LOAD_FORMATS

    assert set(DTYPES) == {"auto", *_DTYPES}
    assert set(LOAD_FORMATS) == {*LOADER_FORMATS, "dummy"}
    assert not hasattr(cli, "DTYPES") and not hasattr(cli, "LOAD_FORMATS")


PASTED_VLLM_FLAGS = [
    "--enable-chunked-prefill", "--no-async-scheduling", "--trust-remote-code", "--revision", "main",
    "--disable-log-requests", "--max-log-len", "100", "--max-logprobs", "5", "--generation-config", "auto",
    "--allowed-origins", '["http://a.example", "http://b.example"]', "--allowed-methods", "GET", "POST",
    "--allowed-headers", "*", "--allow-credentials", "--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem",
    "--root-path", "/api", "-tp", "1", "--pipeline-parallel-size", "1", "--kv-cache-dtype", "auto",
    "--task", "generate",
]


def test_pasted_vllm_flags_parse():
    args = cli.serve_parser().parse_args(["org/model", *PASTED_VLLM_FLAGS])
    config = cli.engine_config_from_args(args)
    options = cli.server_options_from_args(args)
    assert config.enable_chunked_prefill and config.async_scheduling is False and config.trust_remote_code
    assert (config.revision, config.max_logprobs, config.generation_config) == ("main", 5, "auto")
    assert options.allowed_origins == ["http://a.example", "http://b.example"]
    assert (options.allowed_methods, options.allowed_headers, options.allow_credentials) == (["GET", "POST"],
                                                                                            ["*"], True)
    assert (options.ssl_keyfile, options.ssl_certfile, options.root_path) == ("k.pem", "c.pem", "/api")
    assert not options.enable_log_requests and options.max_log_len == 100
    assert cli.server_options_from_args(cli.serve_parser().parse_args(["--enable-log-requests"])).enable_log_requests


def test_api_key_defaults_to_the_environment(monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert cli.server_options_from_args(cli.serve_parser().parse_args([])).api_key == "from-vllm"
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "ours")
    assert cli.server_options_from_args(cli.serve_parser().parse_args([])).api_key == "ours"
    assert cli.server_options_from_args(cli.serve_parser().parse_args(["--api-key", "flag"])).api_key == "flag"


UNSUPPORTED = [
    ["--enable-lora"], ["--lora-modules", "a=/x"],
    ["--runner", "pooling"], ["--guided-decoding-backend", "outlines"],
    ["--structured-outputs-config", "{}"], ["--reasoning-parser", "deepseek_r1"],
]


@pytest.mark.parametrize("argv", UNSUPPORTED, ids=[a[0] for a in UNSUPPORTED])
def test_unsupported_flags_say_not_supported_yet(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.serve_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    flag = argv[0] if argv[0].startswith("--") else {"-tp": "--tensor-parallel-size",
                                                     "-pp": "--pipeline-parallel-size"}[argv[0]]
    assert "not supported yet" in err and flag in err and "unrecognized" not in err


def test_task_embed_is_a_flag_and_runner_points_to_it(capsys):
    assert cli.engine_config_from_args(cli.serve_parser().parse_args(["--task", "embed"])).task == "embed"
    with pytest.raises(SystemExit):
        cli.serve_parser().parse_args(["--runner", "pooling"])
    assert "--task embed" in capsys.readouterr().err


def test_tool_calling_flags_are_server_options(capsys):
    """Tool calling is the server's (vLLM's serve flags): ServerOptions fields with the parsers as choices; the
    engine never sees them. The structured-output backend flag takes xgrammar, the one there is."""
    args = cli.serve_parser().parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                                          "--guided-decoding-backend", "xgrammar"])
    options = cli.server_options_from_args(args)
    assert options.enable_auto_tool_choice and options.tool_call_parser == "hermes"
    assert not hasattr(cli.engine_config_from_args(args), "tool_call_parser")
    with pytest.raises(SystemExit):
        cli.serve_parser().parse_args(["--tool-call-parser", "nonesuch"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.serve(["--enable-auto-tool-choice"])
    assert info.value.code == 2
    assert "--enable-auto-tool-choice requires --tool-call-parser" in capsys.readouterr().err


def test_every_unsupported_flag_is_tested():
    tested = {a[0] for a in UNSUPPORTED}
    assert {"--" + name.replace("_", "-") for name in NOT_SUPPORTED_YET} <= tested


def test_version_flag_prints_the_version(capsys):
    from frontend.cli import main

    for flag in ("--version", "-V"):
        main([flag])
        out = capsys.readouterr().out
        assert out.startswith("pagedserve ") and len(out.split()) == 2


def test_every_serve_flag_has_help_text():
    """Issue 17: `pagedserve serve --help` explains every flag (hidden ones are the NOT_SUPPORTED_YET table's)."""
    import argparse

    from frontend.cli import serve_parser

    parser = serve_parser()
    missing = [a.option_strings for a in parser._actions
               if a.option_strings and a.help != argparse.SUPPRESS and len((a.help or "").strip()) < 10]
    assert not missing, missing
    text = parser.format_help()
    assert "--max-request-json-values" in text and "--shutdown-timeout" in text


def test_kv_cache_dtype_flag():
    assert cli.engine_config_from_args(cli.serve_parser().parse_args(["--kv-cache-dtype", "fp8"])).kv_cache_dtype == \
        "fp8"
    assert cli.engine_config_from_args(cli.serve_parser().parse_args([])).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        cli.serve_parser().parse_args(["--kv-cache-dtype", "int8"])
