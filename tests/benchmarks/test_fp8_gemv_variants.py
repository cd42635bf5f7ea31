"""benchmarks/fp8_gemv_variants.py: a variant's changes land in the kernel modules before the throughput run."""

from __future__ import annotations

import pytest

import kernels.decode_attention as attention
import kernels.fp8_gemv_gluon as gemv
import kernels.fp8_linear as fp8
import kernels.fp8_mlp_gluon as mlp
from benchmarks.fp8_gemv_variants import apply_variant
from kernels.fp8_gemv_gluon import GemvConfig


@pytest.fixture
def tables(monkeypatch):
    monkeypatch.setattr(fp8, "FP8_GEMV_CONFIGS", dict(fp8.FP8_GEMV_CONFIGS))
    for name in ("SILU_EPILOGUE_ENABLED", "NORM_PROLOGUE_ENABLED", "ROPE_CACHE_ENABLED"):
        monkeypatch.setattr(fp8, name, True)
    monkeypatch.setattr(gemv, "QUANT_ONCE_SLOTS", gemv.QUANT_ONCE_SLOTS)
    monkeypatch.setattr(attention, "RELEASE_BEFORE_WAIT", False)
    monkeypatch.setattr(mlp, "MLP_HALF_CONFIGS", dict(mlp.MLP_HALF_CONFIGS))
    monkeypatch.setattr(mlp, "TICKETS", True)


def test_projection_names_and_shapes_set_table_entries(tables):
    applied = apply_variant("qkv=GemvConfig(4, 4, preload=1, quantize_once=True); 2048,8192=None")
    assert fp8.FP8_GEMV_CONFIGS[(6144, 4096)] == GemvConfig(4, 4, preload=1, quantize_once=True)
    assert fp8.FP8_GEMV_CONFIGS[(2048, 8192)] is None
    assert len(applied) == 2


def test_switches_and_slots(tables):
    apply_variant("no-silu;no-norm;slots=8")
    assert not fp8.SILU_EPILOGUE_ENABLED and not fp8.NORM_PROLOGUE_ENABLED and fp8.ROPE_CACHE_ENABLED
    assert gemv.QUANT_ONCE_SLOTS == 8
    assert not attention.RELEASE_BEFORE_WAIT
    apply_variant("attn-early")
    assert attention.RELEASE_BEFORE_WAIT


def test_the_table_as_it_is(tables):
    before = dict(fp8.FP8_GEMV_CONFIGS)
    assert apply_variant("table") == [] and fp8.FP8_GEMV_CONFIGS == before


def test_mlp_half_entries(tables):
    apply_variant("mlp-half")
    assert mlp.MLP_HALF_CONFIGS[(4096, 4096, 14336)] == mlp.MlpHalfConfig()
    apply_variant("mlp-half=MlpHalfConfig(GemvConfig(8, 4), GemvConfig(8, 1), GemvConfig(8, 2))")
    assert mlp.MLP_HALF_CONFIGS[(4096, 4096, 14336)].o == GemvConfig(8, 4)
    apply_variant("no-tickets")
    assert not mlp.TICKETS


@pytest.mark.parametrize("variant", ["qkv=4", "up=GemvConfig(4, 2)", "faster", "mlp-half=GemvConfig(8, 2)"])
def test_what_it_cannot_apply_is_refused(tables, variant):
    with pytest.raises(ValueError):
        apply_variant(variant)
