"""``pagedserve`` command line: ``serve [MODEL]`` with vLLM's flag names, ``generate``, and ``bench serve|throughput``.

The engine and server flags are generated from their tables (``frontend/config_args.py``); this module only adds
each command's own flags and runs it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from core import envs
from frontend.config_args import add_config_args, add_engine_args, engine_config_from_args, values_from_args
from frontend.server_options import ServerOptions

__all__ = ["add_engine_args", "engine_config_from_args", "serve_parser", "main"]


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedserve serve", description="Start the OpenAI-compatible server. Engine flags are generated from "
        "EngineConfig (ipc/config.py), server flags from ServerOptions (frontend/server_options.py).")
    add_engine_args(parser)
    add_config_args(parser, ServerOptions, "server (ServerOptions)")
    return parser


def server_options_from_args(args: argparse.Namespace) -> ServerOptions:
    options = ServerOptions(**values_from_args(args, ServerOptions))
    if options.api_key is None:
        options.api_key = envs.api_key()
    return options


def serve(argv: list[str]) -> None:
    from frontend.api_server import run_server

    parser = serve_parser()
    args = parser.parse_args(argv)
    try:
        config = engine_config_from_args(args)
        options = server_options_from_args(args)
    except ValueError as exc:  # a value the flag's type cannot check (a bad --speculative-config), or settings
        parser.error(str(exc))  # that contradict each other (--enable-auto-tool-choice without a parser)
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
    if argv and argv[0] in ("--version", "-V"):
        from importlib import metadata

        try:
            print(f"pagedserve {metadata.version('pagedserve')}")
        except metadata.PackageNotFoundError:
            print("pagedserve (not installed)")
        return
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: pagedserve [--version] {serve,generate,bench} ...\n\n"
              "  serve [MODEL]             start the OpenAI-compatible server (vLLM's flags)\n"
              "  generate [MODEL]          generate offline: --prompt TEXT [--chat] [--max-tokens N]\n"
              "  bench serve|throughput    run a benchmark (see --help of each)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    logging.basicConfig(level=envs.log_level(),
                        format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    try:
        COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
