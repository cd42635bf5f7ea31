"""The benchmarks' --json files: one record per line, appended."""

import json

from benchmarks.json_lines import append_json_line


def test_records_append_one_per_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_json_line(str(path), {"run": 0, "tok_per_s": 1.5})
    append_json_line(str(path), {"run": 1, "tok_per_s": 2.5})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"run": 0, "tok_per_s": 1.5},
                                                                           {"run": 1, "tok_per_s": 2.5}]


def test_no_path_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    append_json_line(None, {"run": 0})
    assert list(tmp_path.iterdir()) == []
