"""benchmarks/gc_pauses.py on a tiny model: each mode in its own interpreter, one line of pauses and step times."""

from __future__ import annotations

import re

import pytest

from benchmarks import gc_pauses
from tests.frontend.model_files import tiny_llama_dir


@pytest.mark.slow  # two engine startups in fresh interpreters
def test_both_modes_report_pauses_and_only_frozen_freezes(tmp_path, capsys):
    model = tiny_llama_dir(tmp_path / "tiny-llama")
    gc_pauses.main(["--model", str(model), "--num-prompts", "6", "--concurrency", "3", "--input-len", "32",
                    "--output-len", "4", "--max-model-len", "128", "--num-gpu-blocks", "64"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["default", "frozen"]
    frozen_counts = [int(re.search(r"frozen objects (\d+)", line)[1]) for line in lines]
    assert frozen_counts[0] == 0 and frozen_counts[1] > 10_000
    for line in lines:
        assert "6 requests" in line and re.search(r"GC gen0 \d+x .* gen2 \d+x total", line), line
