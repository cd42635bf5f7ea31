"""The tokens-per-step tool: its replay steps the engine's n-gram proposer as the engine does (drafts capped by
max_tokens, bonus token, draftless steps), and on a tiny model its counts equal the engine's own (``--check``)."""

from __future__ import annotations

import json

from benchmarks import spec_tokens_per_step as tool
from tests.frontend.model_files import tiny_llama_dir


def test_replay_counts_steps_drafts_and_acceptance():
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    rows = [{"id": "a", "prompt_token_ids": prompt, "output_token_ids": list(prompt)}]  # a copy of the prompt
    r = tool.replay(tool.ProposerConfig.parse("k=3,min=1,max=2"), rows, max_tokens=8)
    # step 1: after "... 12 5", the 1-gram "5" proposes 6 7 8 (all accepted) + bonus 9; step 2: "8 9" proposes
    # 10 11 12, cut to 10 11 so the bonus (12) is the 8th token: 2 accepted + bonus.
    assert (r["decode_steps"], r["decode_tokens"], r["num_draft_tokens"], r["num_accepted_tokens"]) == (2, 7, 5, 5)
    assert r["tokens_per_step"] == 3.5 and r["drafted_share"] == 1.0 and r["accepted_per_pos"] == [2, 2, 1]
    r2 = tool.replay(tool.ProposerConfig.parse("k=3,min=2,max=2"), rows, max_tokens=8)
    # no 2-gram "12 5" earlier: the first step decodes one token, then "5 6" proposes 7 8 9 ...
    assert r2["decode_steps"] == 3 and r2["drafted_share"] == 2 / 3 and r2["decode_tokens"] == 7


def test_replay_with_run_ahead():
    """ra=1: while a step without drafts is in flight and the last read proposed nothing, the next step launches
    first (one token), and the read one token behind decides whether to wait before the following launch."""
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    rows = [{"id": "a", "prompt_token_ids": prompt, "output_token_ids": [1, 2] + prompt}]  # 2 new tokens, then a copy
    serial = tool.replay(tool.ProposerConfig.parse("k=3,min=2,max=2"), rows, max_tokens=10)
    ahead = tool.replay(tool.ProposerConfig.parse("k=3,min=2,max=2,ra=1"), rows, max_tokens=10)
    assert serial["run_ahead_steps"] == 0 and ahead["run_ahead_steps"] > 0
    assert serial["decode_tokens"] == ahead["decode_tokens"] == 9
    # the 2-gram "5 6" matches once 6 is out: serial verifies its drafts in the next step, run-ahead one step later
    # (that step ran ahead before 6 was read)
    assert serial["decode_steps"] < ahead["decode_steps"]
    assert ahead["num_accepted_tokens"] <= serial["num_accepted_tokens"]


def test_tool_matches_engine_on_tiny_model(tmp_path, capsys):
    model = tiny_llama_dir(tmp_path / "tiny-llama")
    outputs = tmp_path / "outputs.json"
    out = tmp_path / "rows.jsonl"
    assert tool.main(["--model", str(model), "--outputs", str(outputs), "--subset", "all", "--num-prompts", "2",
                      "--max-tokens", "40", "--max-num-seqs", "2", "--configs", "k=3,min=1,max=3", "k=6,min=2,max=4",
                      "--check", "2", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["config"] for r in rows] == ["k=3,min=1,max=3", "k=6,min=2,max=4"]
    cached = json.loads(outputs.read_text())["rows"]
    assert len(cached) == 2
    # every output token after the prefill's first is emitted by a decode step, whatever the config
    assert rows[0]["decode_tokens"] == rows[1]["decode_tokens"] == sum(len(r["output_token_ids"]) - 1 for r in cached)
    assert rows[0]["num_drafts"] > 0  # 1-gram drafts: the engine's counters were compared on real verifications
    printed = capsys.readouterr().out
    assert "check (k=3,min=1,max=3, 2 prompts, engine vs replay)" in printed
    # the engine's run-ahead (async scheduling forced on, CPU) against the replay's model of it
    assert tool.main(["--model", str(model), "--outputs", str(outputs), "--subset", "all", "--num-prompts", "2",
                      "--max-tokens", "40", "--configs", "k=3,min=1,max=3,ra=1", "--check", "2",
                      "--json", str(out)]) == 0
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["run_ahead_steps"] > 0
