"""Speculative decoding with a draft model: outputs identical to no speculation (greedy) whether the draft agrees
with the target (the same weights: every draft accepted) or not (another random model: almost all rejected), under
preemption, chunked prefill, prefix caching and n = 2; no leaked blocks; the startup checks on the draft."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from ipc.messages import SamplingParams
from tests.core.engine_utils import make_engine, run_engine
from tests.tiny_models import VOCAB, make_tiny_model


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


def draft_config(path, k: int = 3) -> dict:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k}


def random_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (5, 14, 30, 47)]


def assert_no_leak(engine) -> None:
    assert not engine.kv.seq_blocks
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1


STRESS = {
    "plain": {},
    "preemption": dict(num_gpu_blocks_override=12, max_model_len=160),
    "tiny_budget": dict(max_num_batched_tokens=6),
    "no_prefix_caching": dict(enable_prefix_caching=False),
}


@pytest.mark.parametrize("stress", sorted(STRESS))
def test_draft_with_the_target_weights_is_always_accepted(models_dir, stress):
    """Draft = the target's own weights: greedy drafts equal the target's argmax, so every one is accepted, and
    the tokens and logprobs are those without speculation."""
    path = make_tiny_model(models_dir, "llama", 0)
    prompts = random_prompts(1)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    kwargs = STRESS[stress]
    reference = run_engine(make_engine(path, **kwargs), prompts, params)
    engine = make_engine(path, speculative_config=draft_config(path), **kwargs)
    got = run_engine(engine, prompts, params)
    for key in reference:
        assert got[key]["tokens"] == reference[key]["tokens"], key
        assert len(got[key]["logprobs"]) == 40
        for ours, theirs in zip(got[key]["logprobs"], reference[key]["logprobs"]):
            assert ours.keys() == theirs.keys()
            assert all(ours[t] == pytest.approx(theirs[t], abs=1e-4) for t in ours)
    stats = engine.get_stats()
    assert stats["spec_num_draft_tokens"] > 0
    assert stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"]  # acceptance rate 1
    per_pos = stats["spec_num_accepted_tokens_per_pos"]
    assert per_pos[0] == stats["spec_num_drafts"] and all(a >= b for a, b in zip(per_pos, per_pos[1:]))
    assert_no_leak(engine)
    if stress == "preemption":
        assert engine.scheduler.total_preemptions > 0


@pytest.mark.parametrize("stress", ["plain", "preemption", "tiny_budget"])
def test_draft_from_another_model_is_rejected_and_lossless(models_dir, stress):
    """A different random model (another family: other head size and layer shapes, its own KV tensors under the
    same block ids) drafts tokens the target almost never picks: the output is still the target's."""
    path = make_tiny_model(models_dir, "llama", 0)
    draft = make_tiny_model(models_dir, "qwen3", 1)
    prompts = random_prompts(2)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    kwargs = STRESS[stress]
    reference = run_engine(make_engine(path, **kwargs), prompts, params)
    engine = make_engine(path, speculative_config=draft_config(draft, k=2), **kwargs)
    got = run_engine(engine, prompts, params)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    stats = engine.get_stats()
    assert stats["spec_num_draft_tokens"] > 0
    assert stats["spec_num_accepted_tokens"] < 0.2 * stats["spec_num_draft_tokens"]
    assert_no_leak(engine)


def test_n2_prefix_cache_and_seeded_sampling(models_dir):
    """n = 2 greedy with a repeated prompt (prefix-cache hits: the draft's KV of cached blocks is reused too)
    equals no speculation; seeded sampled requests are reproducible whatever the batch order, and emit
    max_tokens tokens each, with a logprob for every token."""
    path = make_tiny_model(models_dir, "qwen3", 0)
    prompts = random_prompts(3)
    prompts = [prompts[2], prompts[2], prompts[3]]
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, n=2)
    reference = run_engine(make_engine(path), prompts, greedy)
    engine = make_engine(path, speculative_config=draft_config(path))
    got = run_engine(engine, prompts, greedy)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    stats = engine.get_stats()
    assert stats["prefix_cache_hits"] > 0 and stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"]
    assert_no_leak(engine)

    seeded = SamplingParams(temperature=0.9, max_tokens=30, ignore_eos=True, n=2, seed=5, top_k=50, logprobs=1)
    spec = draft_config(path)
    first = run_engine(make_engine(path, speculative_config=spec), prompts, seeded)
    engine = make_engine(path, speculative_config=spec)
    again = run_engine(engine, list(reversed(prompts)), seeded)
    for i in range(3):
        for index in range(2):
            assert first[(i, index)]["tokens"] == again[(2 - i, index)]["tokens"]
            assert len(first[(i, index)]["logprobs"]) == 30
    assert engine.get_stats()["spec_num_accepted_tokens"] > 0
    assert_no_leak(engine)


def test_max_tokens_and_stop_token_inside_drafted_runs(models_dir):
    """max_tokens and a stop token that land inside an accepted run end the sequence there, as without drafts."""
    path = make_tiny_model(models_dir, "llama", 0)
    prompts = random_prompts(4)[:2]
    plain = run_engine(make_engine(path), prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    stop = plain[(0, 0)]["tokens"][6]
    cases = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (1, 2, 5, 11)]
    cases.append(SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop], ignore_eos=True))
    all_prompts = [p for p in prompts for _ in cases]
    all_params = [c for _ in prompts for c in cases]
    reference = run_engine(make_engine(path), all_prompts, all_params)
    engine = make_engine(path, speculative_config=draft_config(path, k=4))
    got = run_engine(engine, all_prompts, all_params)
    for key in reference:
        assert (got[key]["tokens"], got[key]["finish_reason"]) == (
            reference[key]["tokens"], reference[key]["finish_reason"]), key
    assert_no_leak(engine)


def test_old_spelling_and_blocks_sized_for_both_models(models_dir):
    """``{"model": PATH}`` implies draft_model; the pool's blocks are sized from target + draft bytes per block."""
    path = make_tiny_model(models_dir, "llama", 0)
    draft = make_tiny_model(models_dir, "qwen3", 1)
    engine = make_engine(path, speculative_config={"model": str(draft), "num_speculative_tokens": 2},
                         num_gpu_blocks_override=None, cpu_kv_cache_gib=0.001)
    runner = engine.runner
    assert runner.draft is not None and runner.draft.model_config.architecture == "Qwen3ForCausalLM"
    plain = make_engine(path, num_gpu_blocks_override=None, cpu_kv_cache_gib=0.001).runner
    assert runner.kv_block_bytes() == plain.kv_block_bytes() + runner.draft.kv_block_bytes()
    assert engine.kv.pool.num_blocks == int(0.001 * 2**30) // runner.kv_block_bytes()
    assert [t.shape[1] for t in runner.draft.kv_caches] == [engine.kv.pool.num_blocks] * 2


def _model_with_config(models_dir, name: str, **overrides):
    """A copy of the tiny llama with some config.json fields changed (the checks run before any weight loads)."""
    src = make_tiny_model(models_dir, "llama", 0)
    dst = models_dir / name
    if not dst.exists():
        shutil.copytree(src, dst)
        config = json.loads((dst / "config.json").read_text())
        config.update(overrides)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_startup_errors_name_the_problem(models_dir):
    path = make_tiny_model(models_dir, "llama", 0)
    other_vocab = _model_with_config(models_dir, "vocab-512", vocab_size=512)
    with pytest.raises(ValueError, match="vocabulary of 512 tokens, the target model 384"):
        make_engine(path, speculative_config=draft_config(other_vocab))
    short = _model_with_config(models_dir, "context-256", max_position_embeddings=256)
    with pytest.raises(ValueError, match="handles 256 tokens of context, fewer than max_model_len=512"):
        make_engine(path, speculative_config=draft_config(short), max_model_len=512)
    make_engine(path, speculative_config=draft_config(short), max_model_len=256)  # fits: fine
    with pytest.raises(ValueError, match="prompt_lookup"):
        make_engine(path, speculative_config={**draft_config(path), "prompt_lookup_max": 3})


@pytest.mark.parametrize("draft_arch", ["llama", "qwen3"])
def test_sequences_near_max_model_len_draft_fewer(models_dir, draft_arch):
    """Sequences that reach max_model_len draft fewer tokens than their batch neighbours (never a position past
    the context), and end exactly where they would without speculation. With a rejected draft (qwen3), the
    sequences advance one token a step, so each passes through every smaller draft count."""
    path = make_tiny_model(models_dir, "llama", 0)
    draft = make_tiny_model(models_dir, draft_arch, 0 if draft_arch == "llama" else 1)
    rng = random.Random(7)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (50, 52, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    reference = run_engine(make_engine(path, max_model_len=64), prompts, params)
    engine = make_engine(path, max_model_len=64, speculative_config=draft_config(draft, k=4))
    got = run_engine(engine, prompts, params)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    assert [len(got[(i, 0)]["tokens"]) for i in range(3)] == [14, 12, 59]
    assert_no_leak(engine)


class _EagerDraftGraphs:
    """``DecodeGraphs``' interface over the draft's graph body, run eagerly: the proposal goes through the static
    padded ``[k, bucket]`` layout exactly as a captured graph would."""

    def __init__(self, draft, max_num_seqs: int, max_blocks: int) -> None:
        from core.cuda_graphs import DecodeGraphs, graph_batch_sizes

        draft._allocate_static(max_num_seqs, max_blocks)
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.bucket = DecodeGraphs.bucket.__get__(self)
        self._body = draft._graph_body
        self.replays: dict[int, int] = {}

    def replay(self, size: int):
        self.replays[size] = self.replays.get(size, 0) + 1
        return self._body(size)


@pytest.mark.parametrize("same_weights", [True, False])
def test_graph_layout_of_the_proposal_steps_is_lossless(models_dir, same_weights):
    """The proposal's graph layout (every sequence runs all k steps, padded to a bucket; fewer wanted drafts repeat
    the last drafted position): the tokens of no speculation, all drafts accepted with the target's own weights."""
    path = make_tiny_model(models_dir, "llama", 0)
    draft = path if same_weights else make_tiny_model(models_dir, "qwen3", 1)
    prompts = random_prompts(3) + random_prompts(4)[:2]
    # Different lengths, so the batch shrinks through several buckets; near max_model_len some draft fewer than k.
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (30, 12, 20, 8, 25, 16)]
    kwargs = dict(max_num_seqs=8, max_model_len=96)
    reference = run_engine(make_engine(path, **kwargs), prompts, params)
    engine = make_engine(path, speculative_config=draft_config(draft, k=3), **kwargs)
    runner = engine.runner
    runner.draft.graphs = graphs = _EagerDraftGraphs(runner.draft, runner.max_num_seqs, runner.max_blocks_per_seq)
    got = run_engine(engine, prompts, params)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    assert sum(graphs.replays.values()) > 5 and len(graphs.replays) > 1
    stats = engine.get_stats()
    if same_weights:
        assert stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"] > 0
    assert_no_leak(engine)


def test_catch_up_runs_inside_the_target_step_graphs(models_dir):
    """On the graph path (decode and verify steps replayed, here through eager stand-ins) the draft's catch-up runs
    inside the target's graph body, not beside it: with the target's own weights every draft is still accepted
    (a missed catch-up leaves the draft's KV stale and its drafts wrong), and the tokens are those without
    speculation."""
    from benchmarks.profile_spec_step import use_graph_stand_ins

    path = make_tiny_model(models_dir, "llama", 0)
    prompts = random_prompts(3) + random_prompts(4)[:2]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (30, 12, 20, 8, 25, 16)]
    kwargs = dict(max_num_seqs=8, max_model_len=96)
    reference = run_engine(make_engine(path, **kwargs), prompts, params)
    engine = make_engine(path, speculative_config=draft_config(path, k=3), **kwargs)
    use_graph_stand_ins(engine)
    runner = engine.runner
    replays, inside, outside = [], [], []  # graph replays; draft forwards inside a replay and beside one

    def counted(replay):
        def run(size):
            replays.append(size)
            inside.append(0)  # a replay's draft forwards, counted in its slot
            try:
                return replay(size)
            finally:
                replays.append(None)

        return run

    runner.graphs.replay = counted(runner.graphs.replay)
    runner.verify_graphs.replay = counted(runner.verify_graphs.replay)
    catch_up = runner.draft.catch_up

    def counted_catch_up(*args):
        if replays and replays[-1] is not None:
            inside[-1] += 1
        else:
            outside.append(1)
        return catch_up(*args)

    runner.draft.catch_up = counted_catch_up
    got = run_engine(engine, prompts, params)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    assert len(inside) > 5 and set(inside) == {1}  # each replay ran the draft's catch-up once, inside the graph
    assert outside  # the prefill step catches up eagerly
    stats = engine.get_stats()
    assert stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"] > 0
    assert_no_leak(engine)


@pytest.mark.gpu
@pytest.mark.parametrize("same_weights", [True, False])
def test_draft_graphs_match_eager_on_gpu(models_dir, same_weights):
    """fp32 on the GPU: captured proposal graphs (and verify graphs) give the tokens and acceptance of eager
    execution."""
    path = make_tiny_model(models_dir, "llama", 0)
    draft = path if same_weights else make_tiny_model(models_dir, "qwen3", 1)
    prompts = random_prompts(3) + random_prompts(4)[:2]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (30, 12, 20, 8, 25, 16)]
    common = dict(max_num_seqs=8, max_model_len=96, dtype="float32", device="cuda",
                  speculative_config=draft_config(draft, k=3))
    eager_engine = make_engine(path, enforce_eager=True, **common)
    eager = run_engine(eager_engine, prompts, params)
    engine = make_engine(path, **common)
    assert engine.runner.draft.graphs is not None
    replays = []
    replay = engine.runner.draft.graphs.replay
    engine.runner.draft.graphs.replay = lambda size: replays.append(size) or replay(size)
    verify_replays = []
    verify_replay = engine.runner.verify_graphs.replay
    engine.runner.verify_graphs.replay = lambda size: verify_replays.append(size) or verify_replay(size)
    graphed = run_engine(engine, prompts, params)
    assert {k: v["tokens"] for k, v in graphed.items()} == {k: v["tokens"] for k, v in eager.items()}
    assert len(replays) > 5 and len(verify_replays) > 5  # the draft catches up inside the verify graphs
    assert engine.get_stats()["spec_num_accepted_tokens"] == eager_engine.get_stats()["spec_num_accepted_tokens"]
    assert_no_leak(engine)
