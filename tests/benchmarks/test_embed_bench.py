"""CPU smoke test of the W8 embeddings benchmark: all three runs on a few sentences, same vectors from each."""

from __future__ import annotations

import json

import pytest

from benchmarks import embed_bench


def test_sentences_have_the_documented_token_counts():
    from transformers import AutoTokenizer

    from core.model_source import resolve_model

    sentences = embed_bench.make_sentences(50, seed=1)
    tok = AutoTokenizer.from_pretrained(resolve_model(embed_bench.MODEL).path)
    counts = [len(ids) for ids in tok(sentences)["input_ids"]]
    assert min(counts) >= 16 and max(counts) <= 256 and max(counts) - min(counts) > 100


@pytest.mark.slow
def test_w8_runs_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "w8.jsonl"
    assert embed_bench.main(["--runs", "offline,serve,st", "--num-sentences", "24", "--concurrency", "4",
                             "--device", "cpu", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["run"] for r in rows] == ["offline", "serve", "st"]
    for row in rows:
        assert row["num_sentences"] == 24 and row["embeddings_per_s"] > 0
        assert row["min_cosine_vs_first"] >= 0.9999  # server and sentence-transformers agree with the offline run
    assert "offline / sentence-transformers" in capsys.readouterr().out
