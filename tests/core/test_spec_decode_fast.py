"""The fast greedy verify path (core/spec_decode/greedy_verify.py): the same accepted tokens as the rejection
sampler's greedy path; taken by the engine exactly when every verified sequence is plain greedy; in fp32 the tokens
with speculation (n-gram and draft model) are identical to those without, stops and max_tokens inside accepted runs
included."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import core.model_runner as model_runner
from core.spec_decode.greedy_verify import accept_greedy, draft_layout, launch_greedy_verify
from core.spec_decode.rejection_sampler import verify
from ipc.messages import FinishReason, SamplingParams
from tests.core.engine_utils import make_engine, run_engine
from tests.core.test_spec_decode import repeating_prompts
from tests.tiny_models import VOCAB, make_tiny_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.mark.parametrize("seed", range(4))
def test_accept_greedy_matches_the_rejection_samplers_greedy_path(seed):
    """Random drafts of uneven counts (0..K), some copied from the argmax so that runs of every length occur."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    k, vocab = 4, 11
    num_drafts = rng.integers(0, k + 1, size=9)
    logits = torch.randn(int(num_drafts.sum()) + len(num_drafts), vocab, generator=gen)
    argmax = logits.argmax(-1).numpy()
    drafts, row = [], 0
    for n in num_drafts:
        seq_drafts = []
        for j in range(n):  # the argmax for a random prefix, then random tokens
            seq_drafts.append(int(argmax[row + j]) if rng.random() < 0.7 else int(rng.integers(vocab)))
        drafts.append(seq_drafts)
        row += n + 1
    got = launch_greedy_verify(logits.argmax(-1), drafts, None).result()[0]

    starts, matrix, counts = draft_layout(drafts)
    index = torch.from_numpy(starts[:, None] + np.minimum(np.arange(k + 1)[None, :], counts[:, None]))
    padded = torch.zeros(len(drafts), k, dtype=torch.int64)
    for i, d in enumerate(drafts):
        padded[i, : len(d)] = torch.tensor(d, dtype=torch.int64)
    zeros = torch.zeros(len(drafts), k + 1, dtype=torch.int64)
    tokens, emitted = verify(logits[index], torch.zeros(len(drafts)), zeros, zeros, padded,
                             torch.from_numpy(counts), all_greedy=True)
    want = [tokens[i, : emitted[i]].tolist() for i in range(len(drafts))]
    assert got == want
    assert any(len(g) > 1 for g in got) and any(len(g) == 1 for g in got)  # accepted and rejected runs both occur


@pytest.mark.parametrize("seed", range(6))
def test_acceptance_on_lists_matches_numpy(seed):
    """Acceptance on lists (greedy_verify.accept_greedy_lists, what the fast path runs): the same tokens as the
    numpy layout, for uneven draft counts (none included) and runs of every length."""
    from core.spec_decode.greedy_verify import accept_greedy_lists

    rng = np.random.default_rng(seed)
    for num_seqs in (1, 2, 3, 4, 9, 17):
        num_drafts = rng.integers(0, 6, size=num_seqs)
        argmax = rng.integers(0, 4, size=int(num_drafts.sum()) + num_seqs)
        drafts, row = [], 0
        for n in num_drafts:
            drafts.append([int(argmax[row + j]) if rng.random() < 0.8 else int(rng.integers(4)) for j in range(n)])
            row += n + 1
        want = accept_greedy(argmax, *draft_layout(drafts))
        assert accept_greedy_lists(argmax.tolist(), drafts) == want
        assert launch_greedy_verify(torch.from_numpy(argmax), drafts, None).result()[0] == want


def test_accept_greedy_padding_never_matches():
    """A sequence with fewer drafts than the widest: its padding (-1) never counts as accepted."""
    argmax = np.array([5, 6, 7, 8, 1, 2])  # seq 0: rows 0..3 (3 drafts), seq 1: rows 4..5 (1 draft)
    starts, matrix, counts = draft_layout([[5, 6, 7], [1]])
    assert accept_greedy(argmax, starts, matrix, counts) == [[5, 6, 7, 8], [1, 2]]
    assert accept_greedy(argmax, starts, matrix, counts)[1] == [1, 2]


def _spy_paths(monkeypatch) -> dict[str, int]:
    """Counts of verify steps by path: ``fast`` (greedy_verify) and ``general`` (verify_step)."""
    calls = {"fast": 0, "general": 0}
    fast, general = model_runner.launch_greedy_verify, model_runner.verify_step

    def counted_fast(*args, **kwargs):
        calls["fast"] += 1
        return fast(*args, **kwargs)

    def counted_general(*args, **kwargs):
        calls["general"] += 1
        return general(*args, **kwargs)

    monkeypatch.setattr(model_runner, "launch_greedy_verify", counted_fast)
    monkeypatch.setattr(model_runner, "verify_step", counted_general)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_ngram_fast_path_is_lossless_in_fp32(models_dir, monkeypatch, arch):
    """Plain greedy requests take the fast path only, and give exactly the tokens of decoding without speculation,
    including a stop token and max_tokens landing inside accepted runs; a request with logprobs in the batch sends
    the step down the general path, with the same tokens."""
    path = make_tiny_model(models_dir, arch, 0)
    prompts = repeating_prompts(path, 3)
    plain = SamplingParams(temperature=0.0, max_tokens=37, ignore_eos=True)
    reference = run_engine(make_engine(path, dtype="float32"), prompts, plain)
    stop_token = reference[(1, 0)]["tokens"][20]  # a token the model emits mid-answer (likely inside a run)
    stopping = SamplingParams(temperature=0.0, max_tokens=37, stop_token_ids=[stop_token], ignore_eos=True)
    reference_stop = run_engine(make_engine(path, dtype="float32"), prompts, stopping)

    calls = _spy_paths(monkeypatch)
    engine = make_engine(path, dtype="float32", speculative_config=NGRAM)
    got = run_engine(engine, prompts, plain)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    assert all(len(v["tokens"]) == 37 and v["finish_reason"] is FinishReason.LENGTH for v in got.values())
    stats = engine.get_stats()
    assert stats["spec_num_accepted_tokens"] > 0
    assert calls["fast"] > 0 and calls["general"] == 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1

    got_stop = run_engine(make_engine(path, dtype="float32", speculative_config=NGRAM), prompts, stopping)
    for key, ref in reference_stop.items():
        assert got_stop[key]["tokens"] == ref["tokens"], key
        assert got_stop[key]["finish_reason"] == ref["finish_reason"]
        assert got_stop[key].get("stop_reason") == ref.get("stop_reason")

    mixed = [plain, SamplingParams(temperature=0.0, max_tokens=37, ignore_eos=True, logprobs=1), plain]
    calls["fast"] = calls["general"] = 0
    got_mixed = run_engine(make_engine(path, dtype="float32", speculative_config=NGRAM), prompts, mixed)
    assert {k: v["tokens"] for k, v in got_mixed.items()} == {k: v["tokens"] for k, v in reference.items()}
    assert calls["general"] > 0


def test_draft_model_fast_path_is_lossless_in_fp32(models_dir, monkeypatch):
    """Draft = the target's weights (every draft accepted) and draft = another random model (almost none): both
    through the fast path only, both with exactly the tokens of decoding without speculation."""
    path = make_tiny_model(models_dir, "llama", 0)
    other = make_tiny_model(models_dir, "qwen3", 1)
    rng = random.Random(5)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (6, 19, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=29, ignore_eos=True)
    reference = run_engine(make_engine(path, dtype="float32"), prompts, params)
    calls = _spy_paths(monkeypatch)
    for draft, k in ((path, 3), (other, 2)):
        spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}
        engine = make_engine(path, dtype="float32", speculative_config=spec)
        got = run_engine(engine, prompts, params)
        assert {key: v["tokens"] for key, v in got.items()} == {key: v["tokens"] for key, v in reference.items()}
        stats = engine.get_stats()
        if draft == path:
            assert stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"] > 0
        else:
            assert stats["spec_num_accepted_tokens"] < 0.2 * stats["spec_num_draft_tokens"]
        assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
    assert calls["fast"] > 0 and calls["general"] == 0


def test_steps_without_drafts_skip_the_sampler(models_dir, monkeypatch):
    """While speculating, plain greedy steps that verify no draft (prefills, no n-gram match) take the argmax path
    too: the sampler never runs, and the tokens are those of decoding without speculation; a request with logprobs
    still goes through the sampler."""
    from core.sampler import Sampler

    path = make_tiny_model(models_dir, "llama", 0)
    rng = random.Random(9)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (7, 23)]  # random: few n-gram matches
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    reference = run_engine(make_engine(path, dtype="float32"), prompts, params)
    sampler_calls = {"n": 0}
    original = Sampler.__call__

    def counted(self, *args, **kwargs):
        sampler_calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "__call__", counted)
    strict = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 3}
    engine = make_engine(path, dtype="float32", speculative_config=strict)
    got = run_engine(engine, prompts, params)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    assert sampler_calls["n"] == 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, logprobs=1)
    got = run_engine(make_engine(path, dtype="float32", speculative_config=strict), prompts, with_logprobs)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    assert sampler_calls["n"] > 0


def test_min_tokens_keeps_the_general_path_until_reached(models_dir, monkeypatch):
    """min_tokens bans stop tokens for the first positions: those steps go through the general path, later ones
    through the fast path, with the tokens of decoding without speculation."""
    path = make_tiny_model(models_dir, "llama", 0)
    prompts = repeating_prompts(path, 3)[:2]
    params = SamplingParams(temperature=0.0, max_tokens=30, min_tokens=10)
    reference = run_engine(make_engine(path, dtype="float32"), prompts, params)
    calls = _spy_paths(monkeypatch)
    got = run_engine(make_engine(path, dtype="float32", speculative_config=NGRAM), prompts, params)
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    assert calls["general"] > 0 and calls["fast"] > 0


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_position_batch_equals_the_row_by_row_build(seed):
    """``position_sampling_batch`` without position-dependent parameters (repeated per-sequence arrays) builds the
    same tensors as ``build_sampling_batch`` over one row per verified position."""
    from core.sampling_metadata import build_sampling_batch
    from core.sequence import Sequence
    from core.spec_decode.verifier import position_sampling_batch

    rng = random.Random(seed)
    seqs, drafts, output_indices = [], [], []
    for i in range(7):
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.7, 1.3]), top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.8]),
            min_p=rng.choice([0.0, 0.1]), seed=rng.choice([None, rng.randrange(1 << 40)]),
            logprobs=rng.choice([None, 0, 3]), max_tokens=100, min_tokens=rng.choice([0, 2]))
        seq = Sequence(str(i), [3, 4, 5], params, max_model_len=512)
        seqs.append(seq)
        drafts.append([rng.randrange(VOCAB) for _ in range(rng.randrange(0, 4))])
        output_indices.append(rng.randrange(2, 30))  # past min_tokens: no position-dependent bans
    num_drafts = np.array([len(d) for d in drafts])
    got = position_sampling_batch(seqs, drafts, num_drafts, output_indices, VOCAB, torch.device("cpu"), 1234)
    rows = [seq for seq, d in zip(seqs, drafts) for _ in range(len(d) + 1)]
    row_indices = [index + j for index, d in zip(output_indices, drafts) for j in range(len(d) + 1)]
    want = build_sampling_batch(rows, VOCAB, torch.device("cpu"), row_indices, 1234)
    assert got.all_greedy == want.all_greedy and got.max_num_logprobs == want.max_num_logprobs
    for name in ("temperature", "keys", "steps", "top_k", "top_p", "min_p"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name
    for name in ("logit_bias", "banned", "allowed", "penalties", "requested_token_ids"):
        assert getattr(got, name) is None and getattr(want, name) is None
