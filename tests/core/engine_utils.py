"""Drive an EngineCore in-process with token-id prompts and collect what each sequence produced."""

from __future__ import annotations

from ipc.messages import EngineConfig, EngineRequest, SamplingParams


def make_engine(model, **kwargs):
    from core.engine import EngineCore

    kwargs.setdefault("num_gpu_blocks_override", 256)
    kwargs.setdefault("max_model_len", 512)
    return EngineCore(EngineConfig(model=str(model), **kwargs))


def run_engine(engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]):
    """Returns {(request index, sequence index): {"tokens", "logprobs", "finish_reason", ...}}."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params_list)):
        engine.add_request(EngineRequest(str(i), prompt, p))
    results: dict[tuple[int, int], dict] = {}
    while engine.has_work():
        for out in engine.step().outputs:
            record_output(results, (int(out.request_id), out.index), out)
    return results


def record_output(results: dict, key, out) -> None:
    """Fold one engine output into ``results[key]``: {"tokens", "logprobs", "finish_reason", "prompt_logprobs",
    "stop_reason"}."""
    r = results.setdefault(key, {"tokens": [], "logprobs": [], "finish_reason": None, "prompt_logprobs": None})
    r["tokens"].extend(out.new_token_ids)
    if out.new_logprobs is not None:
        for ids, lps in zip(out.new_logprobs.token_ids, out.new_logprobs.logprobs):
            r["logprobs"].append(dict(zip(ids, lps)))
    if out.prompt_logprobs is not None:
        r["prompt_logprobs"] = out.prompt_logprobs
    if out.finish_reason is not None:
        r["finish_reason"] = out.finish_reason
        r["stop_reason"] = out.stop_reason
