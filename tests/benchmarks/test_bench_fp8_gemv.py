"""benchmarks/bench_fp8_gemv.py's choice of table entries (from given times: the timing itself needs a GPU)."""

from __future__ import annotations

from benchmarks import bench_fp8_gemv as bench
from kernels.fp8_gemv_gluon import GemvConfig


def test_pick_takes_the_fastest_config_only_where_it_beats_the_table():
    times = {"table": 10.0, "g4x4": 9.8, "g8x2": 10.9, "q8x2": 14.7}
    assert bench.pick(times, prequantized=True) == GemvConfig(4, 4)
    assert bench.pick({**times, "table": 9.5}, prequantized=True) is None
    assert bench.pick({"table": 3.0}, prequantized=True) is None  # every GEMV config failed


def test_pick_gives_unquantized_rows_only_configs_that_quantize_them():
    times = {"table": 8.7, "g8x4": 6.8, "q8x2": 9.4}  # Llama-8B o_proj: the g config does not serve its rows
    assert bench.pick(times, prequantized=False) is None
    assert bench.pick({**times, "q8x4": 8.0}, prequantized=False) == GemvConfig(8, 4, quantize_x=True)


def test_config_block_names_each_shape_its_time_and_the_tables():
    block = bench.config_block({
        (4096, 14336): ("llama-3.1-8b down", GemvConfig(8, 1), {"table": 25.9, "g8x1": 18.7}),
        (1024, 2048): ("qwen3-0.6b o", GemvConfig(8, 2, quantize_x=True), {"table": 3.1, "q8x2": 2.8}),
        (4096, 1024): ("qwen3-0.6b qkv", None, {"table": 2.7, "g4x1": 3.7}),
    })
    assert block.splitlines() == [
        "    (4096, 14336): GemvConfig(8, 1),  # llama-3.1-8b down: 18.7 us, table 25.9",
        "    (1024, 2048): GemvConfig(8, 2, quantize_x=True),  # qwen3-0.6b o: 2.8 us, table 3.1",
        "    (4096, 1024): None,  # qwen3-0.6b qkv: - us, table 2.7",
    ]
