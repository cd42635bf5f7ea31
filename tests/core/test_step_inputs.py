"""StepInputs' double-buffered host staging: a host buffer is rewritten only after the copies last enqueued from it
have run (a non-blocking copy reads pinned memory when the device executes it)."""

from __future__ import annotations

import numpy as np
import torch

from core.step_inputs import StepInputs, _HostStaging


class _FakeEvent:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def synchronize(self) -> None:
        self.log.append(self.name)


def test_stage_waits_for_the_copies_of_the_buffer_it_rewrites():
    inputs = StepInputs(64, 4, 8, 16, torch.device("cpu"))
    inputs._hosts.append(_HostStaging(64, 4, 8, pin=False))  # two turns, as on CUDA
    inputs._copied = [None, None]
    log: list[str] = []
    table = np.arange(8, dtype=np.int32).reshape(1, 8)

    def stage():
        return inputs.stage(np.array([5, 6, 7]), np.array([0]), np.array([3]), table)

    stage()  # turn 1: nothing copied from it yet
    assert log == []
    inputs._copied = [_FakeEvent(log, "buffer 0"), _FakeEvent(log, "buffer 1")]
    stage()  # turn 0 again: its previous copies must have run first
    assert log == ["buffer 0"]
    meta = stage()
    assert log == ["buffer 0", "buffer 1"]
    assert inputs.input_ids[:3].tolist() == [5, 6, 7] and meta.slot_mapping.tolist() == [0, 1, 2]


def test_per_sequence_inputs_share_one_upload_and_stay_aligned():
    """Lengths, offsets, launch order and block tables live in one flat buffer (one copy per step): each view starts
    on a 64-byte boundary, none overlaps another, and a verify step (decode_queries) stages all of them, the launch
    order included (its attention reads it)."""
    inputs = StepInputs(64, 5, 7, 4, torch.device("cpu"))
    views = [inputs.seq_lens, inputs.query_start_loc, inputs.decode_order, inputs.block_tables]
    spans = sorted((v.data_ptr(), v.data_ptr() + v.numel() * 4) for v in views)
    assert all(start % 64 == 0 for start, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    table = np.arange(21, dtype=np.int32).reshape(3, 7)
    starts, nums = np.array([9, 2, 5]), np.array([3, 1, 2])
    meta = inputs.stage(np.arange(6), starts, nums, table, decode_queries=3)
    assert meta.decode_queries == 3 and meta.max_query_len == 3
    assert meta.seq_lens.tolist() == [12, 3, 7]
    assert meta.query_start_loc.tolist() == [0, 3, 4, 6]
    assert meta.block_tables.tolist() == table.tolist()
    assert meta.decode_order.tolist() == [0, 2, 1]  # longest context first
    # slot = table[seq, pos // 4] * 4 + pos % 4: positions 9-11 (block 2), 2 (block 7), 5-6 (block 15)
    assert inputs.slot_mapping[:6].tolist() == [9, 10, 11, 30, 61, 62]


def test_single_copy_upload_stages_every_input():
    """On CUDA a step's inputs go up in one copy (the packed host buffer's prefix through its block-table rows): the
    device views then hold exactly what the four per-part copies would have put there. Forced on here (CPU)."""
    inputs = StepInputs(40, 5, 7, 4, torch.device("cpu"))
    inputs.single_copy = True
    table = np.arange(21, dtype=np.int32).reshape(3, 7)
    starts, nums = np.array([9, 2, 5]), np.array([3, 1, 2])
    meta = inputs.stage(np.arange(100, 106), starts, nums, table, decode_queries=3)
    (dst, src), = inputs._copy_views(6, 3)  # one copy
    assert dst.dtype == torch.uint8 and dst.numel() == src.numel() < inputs._packed.numel()
    assert inputs.input_ids[:6].tolist() == list(range(100, 106))
    assert inputs.positions[:6].tolist() == [9, 10, 11, 2, 5, 6]
    assert inputs.slot_mapping[:6].tolist() == [9, 10, 11, 30, 61, 62]
    assert meta.seq_lens.tolist() == [12, 3, 7] and meta.query_start_loc.tolist() == [0, 3, 4, 6]
    assert meta.block_tables.tolist() == table.tolist() and meta.decode_order.tolist() == [0, 2, 1]
    # the device views are disjoint parts of one buffer, each 64-byte aligned
    views = [inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.seq_lens, inputs.query_start_loc,
             inputs.decode_order, inputs.block_tables]
    spans = sorted((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()) for v in views)
    assert all(start % 64 == 0 for start, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    # a smaller step afterwards: its rows are right (rows past it are never read)
    meta = inputs.stage(np.array([7]), np.array([20]), np.array([1]), table[1:2])
    assert inputs.input_ids[:1].tolist() == [7] and inputs.positions[:1].tolist() == [20]
    assert meta.slot_mapping.tolist() == [12 * 4] and meta.seq_lens.tolist() == [21]  # block 5 of row 7..13: 12


def test_uniform_layouts_stage_as_the_general_one():
    """Decode-only steps, full verify steps and single sequences take the 2-D staging path: the same positions,
    slots, offsets, lengths and launch order as the general layout's formula, padding included."""
    rng = np.random.default_rng(3)
    bs = 4
    for num_seqs, width, pad_to in [(1, 1, None), (1, 6, None), (3, 1, 4), (2, 4, 2), (3, 5, 4), (1, 16, 1)]:
        inputs = StepInputs(128, 8, 16, bs, torch.device("cpu"))
        table = rng.permutation(200)[: num_seqs * 16].reshape(num_seqs, 16).astype(np.int32)
        starts = rng.integers(0, 40, num_seqs)
        nums = np.full(num_seqs, width)
        tokens = rng.integers(0, 1000, num_seqs * width)
        pad_tokens = pad_to * width if pad_to is not None and width > 1 else None
        meta = inputs.stage(tokens, starts, nums, table, pad_to=pad_to, pad_tokens_to=pad_tokens,
                            decode_queries=width if width > 1 else 0)
        positions = np.concatenate([np.arange(s, s + width) for s in starts])
        slots = np.concatenate([table[i, p // bs] * bs + p % bs for i, p in enumerate(positions.reshape(num_seqs, -1))])
        n = num_seqs * width
        assert inputs.input_ids[:n].tolist() == tokens.tolist()
        assert inputs.positions[:n].tolist() == positions.tolist()
        assert inputs.slot_mapping[:n].tolist() == slots.tolist()
        assert meta.query_start_loc[: num_seqs + 1].tolist() == list(range(0, n + 1, width))
        assert meta.seq_lens[:num_seqs].tolist() == (starts + width).tolist()
        assert meta.max_query_len == width
        assert sorted(meta.decode_order.tolist()[:num_seqs]) == list(range(num_seqs))
        lengths = (starts + width).tolist()
        assert [lengths[i] for i in meta.decode_order.tolist()[:num_seqs]] == sorted(lengths, reverse=True)
        if pad_to is not None and pad_to > num_seqs:
            assert meta.seq_lens[num_seqs:pad_to].tolist() == [0] * (pad_to - num_seqs)
