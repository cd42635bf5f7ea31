"""``pagedserve`` command line: ``serve [MODEL]`` with vLLM's flag names, ``generate``, and ``bench serve|throughput``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ipc.messages import EngineConfig
from ipc.model_source import DEFAULT_MODEL

DTYPES = ["auto", "half", "float16", "bfloat16", "bf16", "float", "float32"]
LOAD_FORMATS = ["auto", "safetensors", "gguf", "pt", "dummy"]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine arguments, named as vLLM names them."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help=f"Hugging Face id, local directory or .gguf file (default: {DEFAULT_MODEL}).")
    parser.add_argument("--model", default=None, help="Same as MODEL.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer to use instead of the model's.")
    parser.add_argument("--skip-tokenizer-init", action="store_true",
                        help="Load no tokenizer: prompts must be token ids and no text is returned.")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    parser.add_argument("--max-model-len", type=int, default=None, help="Context length (default: the model's).")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="Fraction of GPU memory for weights, activations and the KV cache.")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="Most sequences in one batch.")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="Token budget of one step.")
    parser.add_argument("--block-size", type=int, default=16, help="Tokens per KV-cache block.")
    parser.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true", default=True)
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None, help="Fix the number of KV blocks.")
    parser.add_argument("--cpu-kv-cache-gib", type=float, default=1.0, help="KV-cache size when running on CPU.")
    parser.add_argument("--enforce-eager", action="store_true", help="Never capture CUDA graphs.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="Allow tool_choice 'auto': tool calls are parsed from the text by --tool-call-parser.")
    parser.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral", "pythonic"],
                        help="How the model writes tool calls (needed by --enable-auto-tool-choice).")


def engine_config_from_args(args: argparse.Namespace, **extra) -> EngineConfig:
    return EngineConfig(
        model=args.model or args.model_tag,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        load_format=args.load_format,
        seed=args.seed,
        skip_tokenizer_init=args.skip_tokenizer_init,
        enforce_eager=args.enforce_eager,
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        cpu_kv_cache_gib=args.cpu_kv_cache_gib,
        device=args.device,
        attention_backend=args.attention_backend,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        **extra,
    )


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve serve", description="Start the OpenAI-compatible server.")
    add_engine_args(parser)
    parser.add_argument("--host", default=None, help="Address to listen on (default: all interfaces).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY") or os.environ.get("VLLM_API_KEY"),
                        help="Require 'Authorization: Bearer <key>' on every API route.")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="Model name(s) the API answers to (default: MODEL).")
    parser.add_argument("--chat-template", default=None, help="Chat template: a file or an inline Jinja string.")
    parser.add_argument("--max-request-body-mb", type=float, default=32.0,
                        help="Largest request body accepted (larger ones get HTTP 413).")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.add_argument("--disable-uvicorn-access-log", action="store_true")
    return parser


def serve(argv: list[str]) -> None:
    from frontend.api_server import ServerOptions, run_server

    parser = serve_parser()
    args = parser.parse_args(argv)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser.")
    names = args.served_model_name or []
    config = engine_config_from_args(args, served_model_name=names[0] if names else None,
                                     chat_template=args.chat_template)
    options = ServerOptions(
        host=args.host, port=args.port, api_key=args.api_key, served_model_names=list(names),
        max_request_body_bytes=int(args.max_request_body_mb * 1024 * 1024), log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
    )
    run_server(config, options)


def generate(argv: list[str]) -> None:
    """Offline generation from the command line (the ``LLM`` class, no server)."""
    parser = argparse.ArgumentParser(prog="pagedserve generate", description="Generate text offline.")
    add_engine_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="A prompt (repeat for several).")
    parser.add_argument("--chat", action="store_true", help="Apply the chat template to each prompt.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    args = parser.parse_args(argv)
    import msgspec

    from frontend import LLM, SamplingParams

    config = engine_config_from_args(args)
    engine_args = {k: v for k, v in msgspec.structs.asdict(config).items() if k != "model"}
    llm = LLM(model=config.model, **engine_args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k)
    if args.chat:
        outputs = [llm.chat([{"role": "user", "content": p}], params)[0] for p in args.prompt]
    else:
        outputs = llm.generate(args.prompt, params)
    for prompt, out in zip(args.prompt, outputs):
        print(f"### {prompt}\n{out.outputs[0].text}\n")


def bench(argv: list[str]) -> None:
    if not argv or argv[0] not in ("serve", "throughput"):
        print("usage: pagedserve bench {serve,throughput} [args...]", file=sys.stderr)
        sys.exit(2)
    if argv[0] == "serve":
        from benchmarks.serve import main as bench_main
    else:
        from benchmarks.throughput import main as bench_main
    result = bench_main(argv[1:])
    if isinstance(result, int) and result:
        sys.exit(result)


COMMANDS = {"serve": serve, "generate": generate, "bench": bench}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: pagedserve {serve,generate,bench} ...\n\n"
              "  serve [MODEL]             start the OpenAI-compatible server (vLLM's flags)\n"
              "  generate [MODEL]          generate offline: --prompt TEXT [--chat] [--max-tokens N]\n"
              "  bench serve|throughput    run a benchmark (see --help of each)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    logging.basicConfig(level=os.environ.get("PAGEDSERVE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    try:
        COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
