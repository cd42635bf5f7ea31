"""A step's flat inputs: built with numpy in pinned host buffers, copied to persistent device buffers without
blocking. The device buffers never move, so CUDA graphs captured on them stay valid; the host side is double
buffered, so the next step can be staged while the copies of the one in flight may still be pending.

A non-blocking copy reads the pinned buffer when the device gets to it, not when it is enqueued: a host buffer is
only rewritten once the copies last enqueued from it have run (an event per buffer). Without that wait, steps that
never sync (prefill chunks that sample nothing) let the host stage two steps ahead of the device and overwrite a
buffer whose copies were still pending: the device then ran a step with another step's slot mapping, block tables
and query offsets (an intermittent device-side index assert, gone under CUDA_LAUNCH_BLOCKING=1)."""

from __future__ import annotations

import numpy as np
import torch

from core.layers.attention import AttentionMetadata
from kernels.paged_attention import decode_order_host


# One upload per step while the three token arrays take at most this many bytes (max_num_batched_tokens <= 10,922;
# 8,192 by default up to max_model_len 8,192): ~5 us of copy engine at ~50 GB/s.
SINGLE_COPY_MAX_BYTES = 256 * 1024


class _SeqLayout:
    """Where the per-sequence int32 inputs (context lengths, query offsets, launch order, block tables) lie in one
    flat buffer, host and device alike, so a step uploads them with one copy (the prefix up to its last block-table
    row) instead of four: each copy is several microseconds of host time on the step's critical path. Every part
    starts on a 64-byte boundary (the kernels' pointer-alignment specialisation sees the same as separate tensors)."""

    ALIGN = 16  # int32 elements

    def __init__(self, max_seqs: int, max_blocks: int) -> None:
        def up(n: int) -> int:
            return -(-n // self.ALIGN) * self.ALIGN

        self.max_seqs, self.max_blocks = max_seqs, max_blocks
        self.seq = 0
        self.qsl = up(max_seqs)
        self.order = self.qsl + up(max_seqs + 1)
        self.bt = self.order + up(max_seqs)
        self.total = self.bt + max_seqs * max_blocks

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(seq_lens, query_start_loc, order, block_tables) views of a flat buffer."""
        return (flat[self.seq : self.seq + self.max_seqs], flat[self.qsl : self.qsl + self.max_seqs + 1],
                flat[self.order : self.order + self.max_seqs],
                flat[self.bt : self.total].view(self.max_seqs, self.max_blocks))  # fmt: skip

    def used(self, num_seqs: int) -> int:
        """Elements to upload for a step of ``num_seqs`` sequences."""
        return self.bt + num_seqs * self.max_blocks


def _packed_layout(max_tokens: int, layout: _SeqLayout) -> tuple[int, int]:
    """(token capacity, bytes) of the packed staging buffer: token ids, positions and slot mapping (int64, each of the
    capacity, a multiple of 16 so that every part starts on a 128-byte boundary), then the per-sequence block."""
    capacity = -(-max_tokens // 16) * 16
    return capacity, 3 * capacity * 8 + layout.total * 4


def _packed_views(packed: torch.Tensor, capacity: int, layout: _SeqLayout
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, positions, slot mapping, per-sequence block) views of a packed byte buffer."""
    part = capacity * 8
    return (packed[:part].view(torch.int64), packed[part : 2 * part].view(torch.int64),
            packed[2 * part : 3 * part].view(torch.int64), packed[3 * part :].view(torch.int32))  # fmt: skip


class _HostStaging:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, pin: bool) -> None:
        layout = _SeqLayout(max_seqs, max_blocks)
        capacity, num_bytes = _packed_layout(max_tokens, layout)
        # One buffer for every input (see StepInputs._upload: one copy per step on CUDA).
        self.packed = torch.zeros(num_bytes, dtype=torch.uint8, pin_memory=pin)
        self.ids, self.pos, self.slot, self.per_seq = _packed_views(self.packed, capacity, layout)
        self.ids_np, self.pos_np, self.slot_np = self.ids.numpy(), self.pos.numpy(), self.slot.numpy()
        self.seq, self.qsl, self.order, self.bt = layout.views(self.per_seq)
        self.seq_np, self.qsl_np, self.order_np, self.bt_np = (t.numpy() for t in (self.seq, self.qsl, self.order,
                                                                                    self.bt))


class StepInputs:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, block_size: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.block_size = block_size
        self._hosts = [_HostStaging(max_tokens, max_seqs, max_blocks, pin) for _ in range(2 if pin else 1)]
        self._turn = 0
        self.host = self._hosts[0]
        # Per host buffer: recorded after its copies were enqueued; waited on before the buffer is written again.
        self._copied: list[torch.cuda.Event | None] = [None] * len(self._hosts)
        self._views: dict[tuple[int, int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._metas: dict[tuple[int, int, int, int], AttentionMetadata] = {}

        self._arange32 = np.arange(max_tokens + 1, dtype=np.int32)  # query offsets of uniform layouts
        self._arange64 = np.arange(max_tokens, dtype=np.int64)
        self._layout = _SeqLayout(max_seqs, max_blocks)
        self._capacity, num_bytes = _packed_layout(max_tokens, self._layout)
        # The device buffers are views of one packed buffer laid out as the host's, so that on CUDA a step uploads
        # its inputs with a single copy: the packed prefix up to its last block-table row (the token arrays whole,
        # ``3 * 8 * capacity`` bytes, a few microseconds of copy engine) instead of four copies of the parts it uses.
        # Each copy of pinned memory costs the host a copy call and a caching-allocator event record, on a
        # speculative step's critical path. On CPU the four prefix copies stay: copying bytes is all they cost; so do
        # they where the token arrays are large (a long context's token budget: the whole arrays would cost more
        # copy-engine time per decode step than the three calls they save).
        self.single_copy = pin and 3 * 8 * self._capacity <= SINGLE_COPY_MAX_BYTES
        self._packed = torch.zeros(num_bytes, dtype=torch.uint8, device=device)
        self.input_ids, self.positions, self.slot_mapping, self._per_seq = _packed_views(
            self._packed, self._capacity, self._layout)
        # decode_order: decode attention's launch order, longest context first (read by decode and verify steps)
        self.seq_lens, self.query_start_loc, self.decode_order, self.block_tables = self._layout.views(self._per_seq)

    def stage(
        self, token_ids: np.ndarray, starts: np.ndarray, nums: np.ndarray, table_rows: np.ndarray,
        pad_to: int | None = None, pad_tokens_to: int | None = None, decode_queries: int = 0,
    ) -> AttentionMetadata:
        """Inputs for sequences that compute ``nums[i]`` tokens from position ``starts[i]`` with block-table rows
        ``table_rows``; padded with empty rows up to ``pad_to`` (a graph's batch size). ``pad_tokens_to``: a verify
        graph's token count (``pad_to * (1 + k)``): the padding sequences get no tokens, and the token rows past the
        real ones are dummies that belong to no sequence. ``decode_queries``: a speculative verify step (every
        sequence at most that many tokens, see ``AttentionMetadata``); its attention reads the launch order too."""
        self._turn = (self._turn + 1) % len(self._hosts)
        host = self.host = self._hosts[self._turn]
        copied = self._copied[self._turn]
        if copied is not None:
            copied.synchronize()  # its previous step's copies have run (almost always already: no wait)
        bs = self.block_size
        num_seqs, num_tokens = len(nums), len(token_ids)
        qsl = host.qsl_np[: num_seqs + 1]
        host.ids_np[:num_tokens] = token_ids
        max_query_len = int(nums.max()) if num_seqs else 0
        if num_seqs and max_query_len * num_seqs == num_tokens:
            # Every sequence the same width (a decode-only step, a full verify step, one sequence): the 2-D form,
            # half the numpy calls of the general layout (a speculative step at one sequence is on the critical path).
            width = max_query_len
            np.multiply(self._arange32[: num_seqs + 1], width, out=qsl)
            positions = host.pos_np[:num_tokens].reshape(num_seqs, width)
            np.add(starts[:, None], self._arange64[:width], out=positions)
            slots = host.slot_np[:num_tokens].reshape(num_seqs, width)
            np.multiply(table_rows[self._arange64[:num_seqs, None], positions // bs], bs, out=slots)
            slots += positions % bs
        else:
            qsl[0] = 0
            np.cumsum(nums, out=qsl[1:])
            positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(qsl[:-1] - starts, nums)
            seq_of_token = np.repeat(np.arange(num_seqs), nums)
            host.pos_np[:num_tokens] = positions
            host.slot_np[:num_tokens] = table_rows[seq_of_token, positions // bs].astype(np.int64) * bs + \
                positions % bs
        host.seq_np[:num_seqs] = starts + nums
        host.bt_np[:num_seqs, : table_rows.shape[1]] = table_rows
        if pad_tokens_to is not None:
            if pad_tokens_to > num_tokens or pad_to > num_seqs:  # (a full bucket has nothing to pad)
                self.fill_verify_padding(num_seqs, pad_to, num_tokens, pad_tokens_to)
            num_seqs, num_tokens = pad_to, pad_tokens_to
        elif pad_to is not None:
            if pad_to > num_seqs:
                self.fill_padding(num_seqs, pad_to)
            num_seqs = num_tokens = pad_to
        # Decode-only and verify steps: the kinds whose attention (the decode kernel) reads the launch order.
        if num_seqs == 1:
            host.order_np[0] = 0
        elif num_tokens == num_seqs or decode_queries > 1:
            host.order_np[:num_seqs] = decode_order_host(host.seq_np[:num_seqs])
        self._upload(num_tokens, num_seqs)  # other steps upload a stale order, which their attention never reads
        return self.metadata(num_tokens, num_seqs, max_query_len, decode_queries)

    def fill_padding(self, start: int, end: int) -> None:
        """Rows ``start..end`` of a decode graph batch: one dummy query each, no context, no cache write."""
        host = self.host
        host.ids_np[start:end] = 0
        host.pos_np[start:end] = 0
        host.slot_np[start:end] = -1
        host.seq_np[start:end] = 0
        host.qsl_np[start + 1 : end + 1] = np.arange(start + 1, end + 1)
        host.bt_np[start:end] = 0

    def fill_verify_padding(self, num_seqs: int, pad_seqs: int, num_tokens: int, pad_tokens: int) -> None:
        """Sequences ``num_seqs..pad_seqs`` of a verify graph batch: no query tokens, no context. Token rows
        ``num_tokens..pad_tokens``: id 0 at position 0, no cache write; they follow the last sequence's rows and
        belong to none (attention leaves them alone; their logits are never read)."""
        host = self.host
        host.ids_np[num_tokens:pad_tokens] = 0
        host.pos_np[num_tokens:pad_tokens] = 0
        host.slot_np[num_tokens:pad_tokens] = -1
        host.seq_np[num_seqs:pad_seqs] = 0
        host.qsl_np[num_seqs + 1 : pad_seqs + 1] = num_tokens
        host.bt_np[num_seqs:pad_seqs] = 0

    def prepare_graph_capture(self, batch_size: int) -> None:
        self.fill_padding(0, batch_size)
        self.host.qsl_np[0] = 0
        self.host.order_np[:batch_size] = np.arange(batch_size)
        self._upload(batch_size, batch_size)

    def prepare_verify_capture(self, num_seqs: int, num_tokens: int) -> None:
        """Static buffers a verify graph can be captured on: empty sequences, dummy tokens (no cache writes)."""
        self.fill_verify_padding(0, num_seqs, 0, num_tokens)
        self.host.qsl_np[0] = 0
        self.host.order_np[:num_seqs] = np.arange(num_seqs)
        self._upload(num_tokens, num_seqs)

    def _upload(self, num_tokens: int, num_seqs: int) -> None:
        for dst, src in self._copy_views(num_tokens, num_seqs):
            dst.copy_(src, non_blocking=True)
        if self.input_ids.is_cuda:
            event = self._copied[self._turn]
            if event is None:
                event = self._copied[self._turn] = torch.cuda.Event()
            event.record()

    def _copy_views(self, num_tokens: int, num_seqs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(device, host) slice pairs of the current host buffer for a step's sizes, made once per sizes: slicing is
        a dispatcher call per tensor, a dict lookup is not. With ``single_copy``, one: the packed prefix through the
        step's block-table rows; else four: the three token arrays and the per-sequence block (see ``_SeqLayout``)."""
        key = (self._turn, 0 if self.single_copy else num_tokens, num_seqs)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= 4096:  # bounded: token counts of prefill steps vary freely
                self._views.clear()
            h = self.host
            if self.single_copy:
                end = 3 * 8 * self._capacity + 4 * self._layout.used(num_seqs)
                views = self._views[key] = [(self._packed[:end], h.packed[:end])]
                return views
            views = self._views[key] = [
                (dst[:n], src[:n]) for src, dst, n in (
                    (h.ids, self.input_ids, num_tokens), (h.pos, self.positions, num_tokens),
                    (h.slot, self.slot_mapping, num_tokens), (h.per_seq, self._per_seq, self._layout.used(num_seqs)))]
        return views

    def metadata(self, num_tokens: int, num_seqs: int, max_query_len: int, decode_queries: int = 0
                 ) -> AttentionMetadata:  # fmt: skip
        """The step's views of the device buffers, made once per sizes (five slices cost ~10 us of host time per
        step; the buffers never move, so the views stay valid). Shared: never modify a returned metadata."""
        key = (num_tokens, num_seqs, max_query_len, decode_queries)
        meta = self._metas.get(key)
        if meta is None:
            if len(self._metas) >= 4096:  # bounded: token counts of prefill steps vary freely
                self._metas.clear()
            meta = self._metas[key] = self._make_metadata(num_tokens, num_seqs, max_query_len, decode_queries)
        return meta

    def _make_metadata(self, num_tokens: int, num_seqs: int, max_query_len: int, decode_queries: int
                       ) -> AttentionMetadata:  # fmt: skip
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            block_tables=self.block_tables[:num_seqs],
            seq_lens=self.seq_lens[:num_seqs],
            query_start_loc=self.query_start_loc[: num_seqs + 1],
            max_query_len=max_query_len,
            decode_order=self.decode_order[:num_seqs],
            decode_queries=decode_queries,
        )
