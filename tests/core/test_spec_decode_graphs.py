"""Speculative steps replayed as verify graphs: every sequence a decode of its last token and up to k drafts, padded
to the graph's batch (empty sequences) and token count (dummy rows). On CPU the same layout runs eagerly through a
stand-in for the graphs, so the padding and the row selection are checked here; on a GPU the captured graphs give
the tokens of eager execution."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest
import torch

from core.cuda_graphs import DecodeGraphs
from core.model_runner import _verified_rows, verify_graph_sizes
from ipc.messages import SamplingParams
from tests.core.engine_utils import make_engine, run_engine
from tests.tiny_models import VOCAB, make_tiny_model


class EagerVerifyGraphs:
    """``DecodeGraphs``' interface, run eagerly: the runner stages the padded verify layout and reads the logits
    rows (or, for greedy steps, the in-graph argmax) exactly as with captured graphs."""

    def __init__(self, runner) -> None:
        self.sizes = verify_graph_sizes(runner.max_num_seqs, runner.num_spec_tokens, runner.max_num_batched_tokens)
        runner._verify_argmax_tokens = 256  # as initialize_kv_cache sets it with captured graphs
        self._forward = runner._verify_graph_forward
        self.replays: collections.Counter[int] = collections.Counter()

    bucket = DecodeGraphs.bucket

    def replay(self, size: int) -> torch.Tensor:
        self.replays[size] += 1
        return self._forward(size)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


def _prompts(num: int, seed: int) -> list[list[int]]:
    """Short random chunks repeated: n-gram drafts (min 1) are proposed at almost every step."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        chunk = [rng.randrange(2, 40) for _ in range(rng.randrange(3, 10))]
        prompts.append(chunk * rng.randrange(2, 6))
    return prompts


def test_verify_graph_sizes_and_rows():
    assert verify_graph_sizes(16, 5, 8192) == [1, 2, 4, 8, 16]
    assert verify_graph_sizes(256, 3, 8192)[-1] == 256  # 1024 tokens: the cap
    assert verify_graph_sizes(256, 3, 600)[-1] == 144  # the token budget
    rows = _verified_rows(np.array([3, 4, 10]), np.array([3, 0, 2]))
    assert rows.tolist() == [0, 1, 2, 3, 4, 8, 9, 10]


@pytest.mark.parametrize("k, max_num_seqs, logprobs", [(5, 16, 1), (3, 4, 1), (3, 4, None), (15, 4, None)])
def test_padded_verify_layout_is_lossless(models_dir, k, max_num_seqs, logprobs):
    """Verify steps through the graph layout (padded batch and token rows), mixed with eager steps (prefill chunks
    beside verifies, more sequences than max_num_seqs so requests join as others finish): the tokens and logprobs
    of no speculation. Without logprobs the greedy steps verify from the graph's own argmax (the fast path)."""
    path = make_tiny_model(models_dir, "llama", 0)
    prompts = _prompts(24, k)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=logprobs)
    reference = run_engine(make_engine(path, max_num_seqs=max_num_seqs), prompts, params)
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    engine = make_engine(path, max_num_seqs=max_num_seqs, speculative_config=spec)
    engine.runner.verify_graphs = graphs = EagerVerifyGraphs(engine.runner)
    fast_calls = []
    fast = engine.runner._launch_greedy_verify
    engine.runner._launch_greedy_verify = lambda *args: fast_calls.append(1) or fast(*args)
    got = run_engine(engine, prompts, params)
    assert (len(fast_calls) > 10) if logprobs is None else not fast_calls
    for key in reference:
        assert got[key]["tokens"] == reference[key]["tokens"], key
        for ours, theirs in zip(got[key]["logprobs"], reference[key]["logprobs"]):
            assert all(ours[t] == pytest.approx(theirs[t], abs=1e-4) for t in ours)
    assert sum(graphs.replays.values()) > 10
    assert len(graphs.replays) > 1  # several batch buckets, so padding sequences occurred
    assert engine.get_stats()["spec_num_accepted_tokens"] > 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1


@pytest.mark.gpu
@pytest.mark.parametrize("k", [3, 5, 15])  # 15: 16 query rows, the most a decode-sized GEMM takes (W6's k at c=1)
def test_verify_graphs_match_eager_on_gpu(models_dir, k):
    """fp32 tiny model on the GPU: captured verify graphs (and decode graphs) give the tokens of eager execution."""
    path = make_tiny_model(models_dir, "qwen3", 0)
    prompts = _prompts(20, 7)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    common = dict(max_num_seqs=16, dtype="float32", device="cuda", speculative_config=spec)
    eager = run_engine(make_engine(path, enforce_eager=True, **common), prompts, params)
    engine = make_engine(path, **common)
    assert engine.runner.verify_graphs is not None
    replays = collections.Counter()
    replay = engine.runner.verify_graphs.replay

    def counting(size):
        replays[size] += 1
        return replay(size)

    engine.runner.verify_graphs.replay = counting
    graphed = run_engine(engine, prompts, params)
    assert {key: r["tokens"] for key, r in graphed.items()} == {key: r["tokens"] for key, r in eager.items()}
    assert sum(replays.values()) > 10
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1


@pytest.mark.gpu
def test_run_ahead_matches_read_first_on_gpu(models_dir):
    """fp32 tiny model on the GPU with graphs: speculative run-ahead (asked for: draftless steps let
    the next one launch, its input token taken on the device) gives the tokens of the read-first order and of no
    speculation, one sequence at a time and in a batch."""
    path = make_tiny_model(models_dir, "llama", 0)
    prompts = _prompts(12, 3) + [[(7 * i + 3) % 40 + 2 for i in range(n)] for n in (9, 23)]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    spec = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    for max_num_seqs in (1, 8):
        common = dict(max_num_seqs=max_num_seqs, dtype="float32", device="cuda")
        plain = run_engine(make_engine(path, **common), prompts, params)
        for run_ahead in (True, False):
            engine = make_engine(path, speculative_config=spec, speculative_run_ahead=run_ahead, **common)
            assert engine.run_ahead == run_ahead
            calls = []
            step_run_ahead = engine._step_run_ahead
            engine._step_run_ahead = lambda *a: calls.append(1) or step_run_ahead(*a)
            got = run_engine(engine, prompts, params)
            assert {k: r["tokens"] for k, r in got.items()} == {k: r["tokens"] for k, r in plain.items()}
            assert bool(calls) == run_ahead
            assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1


def test_verify_capture_inputs_write_no_cache(models_dir):
    """The buffers a verify graph is captured on (empty sequences, dummy token rows) run the forward without writing
    any KV: capture must not touch a live block."""
    path = make_tiny_model(models_dir, "llama", 0)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}
    engine = make_engine(path, max_num_seqs=4, speculative_config=spec)
    runner = engine.runner
    for cache in runner.kv_caches:
        cache.normal_()
    before = [cache.clone() for cache in runner.kv_caches]
    runner.inputs.prepare_verify_capture(4, 16)
    with torch.inference_mode():
        hidden = runner._verify_forward(4)
    assert hidden.shape[0] == 16
    assert all(torch.equal(a, b) for a, b in zip(before, runner.kv_caches))


def test_padded_verify_layout_with_a_draft_model(models_dir):
    """The draft model catches up on the padded verify layout (dummy rows write no KV): with another random model as
    the draft the tokens are still the target's, and with the target's own weights as the draft nearly all drafts
    are accepted, so the draft's KV stayed right."""
    path = make_tiny_model(models_dir, "llama", 0)
    other = make_tiny_model(models_dir, "llama", 1)
    prompts = _prompts(10, 3)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    reference = run_engine(make_engine(path, max_num_seqs=8), prompts, params)
    for draft in (path, other):
        spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}
        engine = make_engine(path, max_num_seqs=8, speculative_config=spec)
        engine.runner.verify_graphs = graphs = EagerVerifyGraphs(engine.runner)
        got = run_engine(engine, prompts, params)
        assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
        assert sum(graphs.replays.values()) > 5
        stats = engine.get_stats()
        if draft == path:
            assert stats["spec_num_accepted_tokens"] >= 0.9 * stats["spec_num_draft_tokens"]
        assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_verify_steps_take_the_multi_query_decode_kernel(models_dir, monkeypatch, arch):
    """The attention kernels run in the Triton interpreter on CPU tensors: uniform verify steps (through the verify
    graph layout: padded batch, dummy token rows) go to the decode kernel with 1 + k query rows per sequence, and the
    greedy tokens equal those of no speculation. gemma2: sliding-window and soft-capped layers on that path too."""
    import kernels.paged_attention as dispatch

    path = make_tiny_model(models_dir, arch, 0)
    prompts = _prompts(5, 11)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reference = run_engine(make_engine(path, max_num_seqs=4), prompts, params)
    monkeypatch.setattr(dispatch, "use_triton", lambda tensor, backend: backend != "torch")
    launches: collections.Counter[int] = collections.Counter()
    kernel = dispatch.paged_decode_attention

    def counting(*args, queries: int = 1, **kwargs):
        launches[queries] += 1
        return kernel(*args, queries=queries, **kwargs)

    monkeypatch.setattr(dispatch, "paged_decode_attention", counting)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    engine = make_engine(path, max_num_seqs=4, speculative_config=spec)
    engine.runner.verify_graphs = graphs = EagerVerifyGraphs(engine.runner)
    got = run_engine(engine, prompts, params)
    assert {key: r["tokens"] for key, r in got.items()} == {key: r["tokens"] for key, r in reference.items()}
    layers = len(engine.runner.kv_caches)
    assert launches[4] >= layers * sum(graphs.replays.values()) > 0  # every layer of every verify replay
    assert engine.get_stats()["spec_num_accepted_tokens"] > 0
