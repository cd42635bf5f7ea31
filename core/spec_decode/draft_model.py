"""Draft-model proposer: a second, smaller model of the same vocabulary drafts ``k`` tokens per decoding sequence.

KV cache: the draft has its own cache tensors (its own layer count, heads and head size) with the SAME number of
blocks and block size as the target's, addressed by the same block tables and slot mapping. One block allocation
(the scheduler's) serves both models; the engine sizes the pool from the combined bytes per block.

Each step:

* **catch-up** (``catch_up``, inside the runner's launch): the draft runs the target's flat inputs (prefill chunks,
  decode tokens, the verified drafts) and writes its KV at the same slots. So the draft's KV at every computed
  position is always its KV for the sequence's true tokens: positions of rejected drafts are rewritten when the
  target computes the real token there (the scheduler rolls those slots back, and they are written again, by both
  models, the next time they are computed). Preemption, chunked prefill and prefix-cache hits need nothing else:
  a cached block holds the draft's KV for its tokens too, since both models always write the same slots.
* **proposal** (``propose``, after the step's tokens are known): ``k`` single-token forwards per sequence, from its
  last (just sampled) token at position ``P``: forward ``P`` -> draft 1, forward draft 1 at ``P + 1`` -> draft 2, ...
  These write KV at ``P .. P + k - 1``: slots the engine reserved beforehand (the ``1 + k`` the verify step needs,
  without registering any block in the prefix cache), so they are never someone else's.

Drafts are greedy (argmax of the draft's logits), so their distribution ``q`` is one-hot at the draft and the
rejection sampler's one-hot path keeps the output exactly the target's, for greedy and sampled requests alike.
Why not sampled drafts (vLLM's choice for sampled requests, with the draft's probabilities as ``q``): greedy drafts
need no ``[S, k, V]`` probability tensor and no second random stream (seeded requests stay reproducible with the
verifier's counters alone), and greedy requests, the common case for latency, are drafted identically either way;
sampled requests at high temperature may accept fewer drafts than with sampled ones.

On CUDA (unless enforce_eager) the ``k`` proposal steps of a batch bucket replay one captured graph
(``capture_graphs``): static ``[k, bucket]`` inputs, each step's argmax feeding the next step's input ids inside the
graph. Every sequence of the bucket runs all ``k`` steps there: a sequence that wants ``n < k`` drafts repeats its
last drafted position ``P + n - 1`` in the later steps (its slot is reserved; whatever those steps write there is
rewritten by the verify step's catch-up before anything reads it, and their outputs are dropped); padding rows have
no context and write no KV. Catch-up has the target step's shapes: it runs inside the target's decode and verify
graphs (``ModelRunner._draft_catch_up``), eagerly for prefill and mixed steps. The drafts reach the host with
one copy after the ``k`` forwards: the scheduler needs them to size the next step.
"""

from __future__ import annotations

import numpy as np
import torch

from core.config import ModelConfig
from core.cuda_graphs import DecodeGraphs
from core.host_copy import to_device
from core.input_batch import InputBatch
from core.kv_cache import KVBlock
from core.layers.attention import AttentionMetadata
from core.loader import load_hf_config
from core.model_source import ModelSource, resolve_model
from core.sequence import Sequence
from ipc.config import SpeculativeConfig
from kernels.paged_attention import decode_order_host


def load_draft_config(spec: SpeculativeConfig, vocab_size: int, max_model_len: int
                      ) -> tuple[ModelSource, ModelConfig]:
    """The draft's files and model config, checked against the target: the same vocabulary size, and a context
    of at least max_model_len."""
    source = resolve_model(spec.model, spec.revision)
    cfg = ModelConfig.from_hf_dict(load_hf_config(source))
    if cfg.vocab_size != vocab_size:
        raise ValueError(f"speculative_config: the draft model {spec.model!r} has a vocabulary of {cfg.vocab_size} "
                         f"tokens, the target model {vocab_size}: the draft must share the target's vocabulary.")
    if cfg.max_position_embeddings < max_model_len:
        raise ValueError(f"speculative_config: the draft model {spec.model!r} handles {cfg.max_position_embeddings} "
                         f"tokens of context, fewer than max_model_len={max_model_len}: lower max_model_len or use "
                         f"another draft.")
    return source, cfg


class DraftModelProposer:
    """The draft model, its KV-cache tensors and its own input buffers for the single-token proposal steps."""

    def __init__(self, spec: SpeculativeConfig, model: torch.nn.Module, model_config: ModelConfig, *,
                 input_batch: InputBatch, block_size: int, kv_cache_dtype: torch.dtype, device: torch.device) -> None:
        """``input_batch``: block-table rows of the sequences it proposes for, synced from the engine's blocks;
        ``kv_cache_dtype``: the target's (an fp8 cache is fp8 for the draft too)."""
        self.k = spec.num_speculative_tokens
        self.name = spec.model
        self.model = model
        self.model_config = model_config
        self.input_batch = input_batch
        self.block_size = block_size
        self.kv_cache_dtype = kv_cache_dtype
        self.device = device
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None  # the k proposal steps per batch bucket (capture_graphs)

    # ------------------------------------------------------------------------------------------------ KV cache
    def kv_block_bytes(self) -> int:
        cfg = self.model_config
        return 2 * self.block_size * cfg.num_kv_heads * cfg.head_dim * self.kv_cache_dtype.itemsize * cfg.num_layers

    def allocate_kv_cache(self, num_blocks: int) -> None:
        cfg = self.model_config
        shape = (2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
                          for _ in range(cfg.num_layers)]

    # ------------------------------------------------------------------------------------------------ graphs
    def capture_graphs(self, max_num_seqs: int, max_blocks_per_seq: int, pool=None) -> None:
        """Static ``[k, max_num_seqs]`` proposal inputs (no context, no KV writes until a step fills them) and a
        graph of the ``k`` steps per batch bucket."""
        self._allocate_static(max_num_seqs, max_blocks_per_seq)
        self.graphs = DecodeGraphs(self._graph_body, max_num_seqs, name="draft proposal")
        self.graphs.capture(pool=pool)

    def _allocate_static(self, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        k, device = self.k, self.device
        self._ids = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self._positions = torch.zeros((k, max_num_seqs), dtype=torch.int64, device=device)
        self._slots = torch.full((k, max_num_seqs), -1, dtype=torch.int64, device=device)
        self._seq_lens = torch.zeros((k, max_num_seqs), dtype=torch.int32, device=device)
        self._orders = torch.arange(max_num_seqs, dtype=torch.int32, device=device).repeat(k, 1)
        self._table = torch.zeros((max_num_seqs, max_blocks_per_seq), dtype=torch.int32, device=device)
        self._qsl = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device)  # one query row per sequence
        self._drafts = torch.zeros((k, max_num_seqs), dtype=torch.int64, device=device)

    def _graph_body(self, size: int) -> torch.Tensor:
        """All ``k`` steps for the first ``size`` rows of the static inputs -> the static ``[k, size]`` drafts."""
        metas = [AttentionMetadata(slot_mapping=self._slots[j, :size], block_tables=self._table[:size],
                                   seq_lens=self._seq_lens[j, :size], query_start_loc=self._qsl[: size + 1],
                                   max_query_len=1, decode_order=self._orders[j, :size]) for j in range(self.k)]
        self._run_steps(self._ids[:size], self._positions[:, :size], metas, self._drafts[:, :size],
                        [size] * self.k)
        return self._drafts[:, :size]

    def _run_steps(self, input_ids: torch.Tensor, positions: torch.Tensor, metas: list[AttentionMetadata],
                   drafts: torch.Tensor, active: list[int]) -> None:
        """Step ``j`` runs the first ``active[j]`` sequences at ``positions[j]``; its argmax is step ``j + 1``'s input
        ids and row ``j`` of ``drafts``."""
        for j, meta in enumerate(metas):
            a = active[j]
            hidden = self.model(input_ids[:a], positions[j, :a], self.kv_caches, meta)
            drafts[j, :a] = self.model.compute_logits(hidden).argmax(-1)
            input_ids = drafts[j]

    # ------------------------------------------------------------------------------------------------ catch-up
    def catch_up(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """The target's step inputs through the draft: its KV at the same slots (no logits needed)."""
        self.model(input_ids, positions, self.kv_caches, meta)

    # ------------------------------------------------------------------------------------------------ proposal
    def _replay(self, bucket: int, last_tokens: np.ndarray, start: np.ndarray, counts: np.ndarray,
                table: np.ndarray) -> torch.Tensor:
        """Fill the static inputs' first ``bucket`` rows (sequences sorted by draft count, then padding) for all
        ``k`` steps, in one upload per dtype, and replay the bucket's graph: the ``[k, bucket]`` drafts."""
        k, n, bs = self.k, len(counts), self.block_size
        positions = np.zeros((k, bucket), dtype=np.int64)
        # A sequence's steps past its drafts repeat its last drafted position (a reserved slot; see the module doc).
        positions[:, :n] = start[None, :] + np.minimum(np.arange(k)[:, None], counts[None, :] - 1)
        slots = np.full((k, bucket), -1, dtype=np.int64)
        slots[:, :n] = (np.take_along_axis(table, positions[:, :n].T // bs, 1).T.astype(np.int64) * bs
                        + positions[:, :n] % bs)
        seq_lens = np.zeros((k, bucket), dtype=np.int32)
        seq_lens[:, :n] = positions[:, :n] + 1
        orders = np.stack([decode_order_host(row) for row in seq_lens])
        ids = np.zeros(bucket, dtype=np.int64)
        ids[:n] = last_tokens
        padded_table = np.zeros((bucket, table.shape[1]), dtype=np.int32)
        padded_table[:n] = table
        wide = to_device(np.concatenate((ids, positions.ravel(), slots.ravel())), torch.int64, self.device)
        narrow = to_device(np.concatenate((padded_table.ravel(), seq_lens.ravel(), orders.ravel())), torch.int32,
                           self.device)
        size = k * bucket
        self._ids[:bucket].copy_(wide[:bucket])
        self._positions[:, :bucket].copy_(wide[bucket : bucket + size].view(k, bucket))
        self._slots[:, :bucket].copy_(wide[bucket + size :].view(k, bucket))
        self._table[:bucket, : table.shape[1]].copy_(narrow[: padded_table.size].view(bucket, -1))
        self._seq_lens[:, :bucket].copy_(narrow[padded_table.size : padded_table.size + size].view(k, bucket))
        self._orders[:, :bucket].copy_(narrow[padded_table.size + size :].view(k, bucket))
        return self.graphs.replay(bucket)

    def remove(self, keys: list[tuple[str, int]]) -> None:
        """Freed sequences' block-table rows go back (the KV itself is addressed by block id, like the target's)."""
        self.input_batch.remove(keys)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_drafts: list[int],
                blocks: dict[tuple[str, int], list[KVBlock]]) -> list[list[int]]:
        """Up to ``num_drafts[i]`` greedy drafts for each sequence whose last token was just sampled; the slots of
        positions ``P .. P + num_drafts[i] - 1`` (``P``: its last token's position) must be reserved.

        The ``k`` steps' inputs are built on the host at once and uploaded in two copies; step ``j`` runs the
        sequences that want more than ``j`` drafts (a prefix, after sorting by count), its input ids being step
        ``j - 1``'s argmax, on the device."""
        out: list[list[int]] = [[] for _ in seqs]
        wanted = np.asarray(num_drafts, dtype=np.int64)
        order = np.flatnonzero(wanted > 0)
        if not len(order):
            return out
        order = order[np.argsort(-wanted[order], kind="stable")]
        counts = wanted[order]
        num_seqs, num_steps = len(order), int(counts[0])
        rows = np.fromiter((self.input_batch.row(seqs[i].key, blocks[seqs[i].key]) for i in order),
                           dtype=np.int64, count=num_seqs)  # synced with the blocks reserved for the drafts
        start = np.fromiter((seqs[i].num_tokens - 1 for i in order), dtype=np.int64, count=num_seqs)
        last_tokens = np.fromiter((seqs[i].all_token_ids[-1] for i in order), dtype=np.int64, count=num_seqs)
        table = self.input_batch.block_table[rows]
        bucket = self.graphs.bucket(num_seqs) if self.graphs is not None else None
        if bucket is not None:
            drafts = self._replay(bucket, last_tokens, start, counts, table)
            host = drafts[:, :num_seqs].T.tolist()  # the drafts' one device -> host copy
            for row, i in enumerate(order):
                out[i] = host[row][: counts[row]]
            return out
        active = (counts[None, :] > np.arange(num_steps)[:, None]).sum(1)  # [num_steps]
        # [num_steps, num_seqs]; a sequence's rows past its drafts (not run) repeat its last position, in range
        positions = start[None, :] + np.minimum(np.arange(num_steps)[:, None], counts[None, :] - 1)
        bs = self.block_size
        slots = np.take_along_axis(table, positions.T // bs, 1).T.astype(np.int64) * bs + positions % bs
        seq_lens = (positions + 1).astype(np.int32)
        orders = np.zeros((num_steps, num_seqs), dtype=np.int32)  # decode attention's launch order: longest first
        for j in range(num_steps):
            orders[j, : active[j]] = np.argsort(-start[: active[j]], kind="stable")
        wide = to_device(np.concatenate((last_tokens, positions.ravel(), slots.ravel().astype(np.int64))),
                         torch.int64, self.device)
        narrow = to_device(np.concatenate((table.ravel(), seq_lens.ravel(), orders.ravel(),
                                           np.arange(num_seqs + 1, dtype=np.int32))), torch.int32, self.device)
        n = num_seqs * num_steps
        input_ids = wide[:num_seqs]
        positions_t = wide[num_seqs : num_seqs + n].view(num_steps, num_seqs)
        slots_t = wide[num_seqs + n :].view(num_steps, num_seqs)
        table_t = narrow[: table.size].view(table.shape)
        seq_lens_t = narrow[table.size : table.size + n].view(num_steps, num_seqs)
        orders_t = narrow[table.size + n : table.size + 2 * n].view(num_steps, num_seqs)
        qsl_t = narrow[table.size + 2 * n :]
        drafts = torch.zeros((num_steps, num_seqs), dtype=torch.int64, device=self.device)  # rows: contiguous inputs
        metas = [AttentionMetadata(slot_mapping=slots_t[j, : active[j]], block_tables=table_t[: active[j]],
                                   seq_lens=seq_lens_t[j, : active[j]], query_start_loc=qsl_t[: active[j] + 1],
                                   max_query_len=1, decode_order=orders_t[j, : active[j]]) for j in range(num_steps)]
        self._run_steps(input_ids, positions_t, metas, drafts, [int(a) for a in active])
        host = drafts.T.tolist()  # the drafts' one device -> host copy
        for row, i in enumerate(order):
            out[i] = host[row][: counts[row]]
        return out
