"""Executes one scheduled step on the device: flat inputs from the scheduler's output, the forward pass (a CUDA
graph replay for decode-only steps), logits for the rows that need them, sampling. Owns the model, the KV-cache
tensors and the persistent input buffers.

Inputs are built with numpy in pinned host buffers and copied to persistent device buffers without blocking; the
only device -> host sync of a step is reading the sampled token ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

import kernels.backend
from core.config import ModelConfig, resolve_dtype
from core.cuda_graphs import DecodeGraphs
from core.input_batch import InputBatch
from core.kv_cache import KVBlock
from core.layers.attention import AttentionMetadata
from core.loader import iter_weights, load_hf_config
from core.models import model_class
from core.request import Request
from core.sampler import Sampler, SamplerOutput, SamplingBatch, gather_logprobs
from core.sampling_metadata import build_sampling_batch
from core.scheduler import ScheduledSeq, SchedulerOutput
from ipc.messages import EngineConfig, Logprobs
from ipc.model_source import resolve_model

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sampled_token_ids: list[int]  # one per sampling sequence, in batch order
    logprobs: list[Logprobs | None]  # one per sampling sequence
    prompt_logprobs: dict[tuple[str, int], tuple[int, Logprobs]]  # key -> (first prompt token index, rows)


class _Buffers:
    """Persistent device buffers for one step's inputs, and their pinned host staging twins."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device) -> None:
        pin = device.type == "cuda"

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, host.numpy(), torch.zeros(shape, dtype=dtype, device=device)

        self.ids_host, self.ids_np, self.input_ids = pair(max_tokens, torch.int64)
        self.pos_host, self.pos_np, self.positions = pair(max_tokens, torch.int64)
        self.slot_host, self.slot_np, self.slot_mapping = pair(max_tokens, torch.int64)
        self.seq_host, self.seq_np, self.seq_lens = pair(max_seqs, torch.int32)
        self.qsl_host, self.qsl_np, self.query_start_loc = pair(max_seqs + 1, torch.int32)
        self.bt_host, self.bt_np, self.block_tables = pair((max_seqs, max_blocks), torch.int32)

    def upload(self, num_tokens: int, num_seqs: int) -> None:
        for host, dev, n in ((self.ids_host, self.input_ids, num_tokens), (self.pos_host, self.positions, num_tokens),
                             (self.slot_host, self.slot_mapping, num_tokens), (self.seq_host, self.seq_lens, num_seqs),
                             (self.qsl_host, self.query_start_loc, num_seqs + 1),
                             (self.bt_host, self.block_tables, num_seqs)):
            dev[:n].copy_(host[:n], non_blocking=True)

    def metadata(self, num_tokens: int, num_seqs: int, max_query_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            block_tables=self.block_tables[:num_seqs],
            seq_lens=self.seq_lens[:num_seqs],
            query_start_loc=self.query_start_loc[: num_seqs + 1],
            max_query_len=max_query_len,
        )


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = _pick_device(config.device)
        if config.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got '{config.attention_backend}'.")
        if config.attention_backend == "torch":  # process-wide: the engine process runs one engine
            kernels.backend.FORCE_TORCH_ATTENTION = True
        self.source = resolve_model(config.model)
        self.model_config = ModelConfig.from_hf_dict(load_hf_config(self.source))
        self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device)
        self.block_size = config.block_size
        self.max_model_len = self._max_model_len()
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens or max(8192, self.max_model_len)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.vocab_size = self.model_config.vocab_size
        torch.manual_seed(config.seed)

        start = time.perf_counter()
        self.model = self._load_model()
        logger.info("Loaded %s (%s, %s) in %.1f s", self.source.name, self.dtype, self.device,
                    time.perf_counter() - start)
        self.sampler = Sampler(config.seed, self.device)
        self.buffers = _Buffers(self.max_num_batched_tokens, self.max_num_seqs, self.max_blocks_per_seq, self.device)
        self.input_batch = InputBatch(self.max_num_seqs, self.max_blocks_per_seq, pin_memory=False)
        self.kv_caches: list[torch.Tensor] = []
        self.num_kv_blocks = 0
        self.graphs: DecodeGraphs | None = None
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager

    # ------------------------------------------------------------------------------------------------ setup
    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        requested = self.config.max_model_len
        if requested is None:
            return limit
        if requested > limit:
            raise ValueError(f"max_model_len={requested} is larger than the model's maximum context of {limit}.")
        return requested

    def _load_model(self) -> torch.nn.Module:
        cls = model_class(self.model_config)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = cls(self.model_config)
        finally:
            torch.set_default_dtype(default_dtype)
        if self.config.load_format == "dummy":
            model.init_dummy_weights(self.config.seed)
        else:
            model.load_weights(iter_weights(self.source, self.config.load_format))
        return model.eval()

    def kv_block_bytes(self) -> int:
        cfg = self.model_config
        return 2 * self.block_size * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize * cfg.num_layers

    def determine_num_blocks(self) -> int:
        """Blocks for the KV cache: the override, a fixed budget on CPU, or what the profiled GPU memory leaves."""
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override
        if self.device.type != "cuda":
            return max(2, int(self.config.cpu_kv_cache_gib * 2**30) // self.kv_block_bytes())
        return self._profile_num_blocks()

    @torch.inference_mode()
    def _profile_num_blocks(self) -> int:
        """Peak memory of a forward pass at the largest batch; what ``gpu_memory_utilization`` leaves goes to KV."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        num_tokens = self.max_num_batched_tokens
        num_seqs = min(self.max_num_seqs, num_tokens)
        blocks_per_seq = -(-(-(-num_tokens // num_seqs)) // self.block_size)
        self._allocate_kv_cache(num_seqs * blocks_per_seq + 1)
        self._profile_run(num_tokens, num_seqs, blocks_per_seq)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        kv_bytes = sum(t.numel() * t.element_size() for t in self.kv_caches)
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        self.kv_caches = []
        torch.cuda.empty_cache()
        budget = total * self.config.gpu_memory_utilization - (peak - kv_bytes) - non_torch
        num_blocks = int(budget // self.kv_block_bytes())
        logger.info("Memory: %.1f GiB total, weights + peak activations %.2f GiB, non-torch %.2f GiB -> %d KV blocks "
                    "(%.1f GiB)", total / 2**30, (peak - kv_bytes) / 2**30, non_torch / 2**30, num_blocks,
                    num_blocks * self.kv_block_bytes() / 2**30)
        if num_blocks < 2:
            raise RuntimeError("No GPU memory left for the KV cache: raise gpu_memory_utilization or lower "
                               "max_num_batched_tokens.")
        return num_blocks

    def _profile_run(self, num_tokens: int, num_seqs: int, blocks_per_seq: int) -> None:
        """One prefill step of ``num_tokens`` over ``num_seqs`` sequences, with logits and sampling for each."""
        nums = np.full(num_seqs, num_tokens // num_seqs, dtype=np.int64)
        nums[-1] += num_tokens - nums.sum()
        table = 1 + np.arange(num_seqs * blocks_per_seq, dtype=np.int32).reshape(num_seqs, blocks_per_seq)
        meta = self._stage(np.zeros(num_tokens, dtype=np.int64), np.zeros(num_seqs, dtype=np.int64), nums, table)
        hidden = self.model(self.buffers.input_ids[:num_tokens], self.buffers.positions[:num_tokens],
                            self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])
        temperature = torch.ones(num_seqs, device=self.device)
        self.sampler(logits, SamplingBatch(temperature, all_greedy=False, any_greedy=False, max_num_logprobs=0))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._allocate_kv_cache(num_blocks)
        self.num_kv_blocks = num_blocks
        if self.use_graphs:
            self.graphs = DecodeGraphs(self._decode_forward, self.max_num_seqs)
            self._fill_padding(0, self.graphs.max_size)
            self.buffers.upload(self.graphs.max_size, self.graphs.max_size)
            self.graphs.capture()

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        cfg = self.model_config
        shape = (2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]

    # ------------------------------------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, blocks: dict[tuple[str, int], list[KVBlock]]) -> RunnerOutput:
        seqs = sched.scheduled
        rows = np.fromiter((self.input_batch.row(s.request.key, blocks[s.request.key]) for s in seqs),
                           dtype=np.int64, count=len(seqs))
        starts = np.fromiter((s.start for s in seqs), dtype=np.int64, count=len(seqs))
        nums = np.fromiter((s.num_tokens for s in seqs), dtype=np.int64, count=len(seqs))
        token_ids: list[int] = []
        for s in seqs:
            if s.num_tokens == 1:
                token_ids.append(s.request.all_token_ids[s.start])
            else:
                token_ids.extend(s.request.all_token_ids[s.start : s.start + s.num_tokens])
        num_tokens = len(token_ids)
        sampling = [i for i, s in enumerate(seqs) if s.samples]
        requests = [seqs[i].request for i in sampling]
        decode_only = num_tokens == len(seqs) and len(sampling) == len(seqs)

        bucket = self.graphs.bucket(len(seqs)) if self.graphs is not None and decode_only else None
        meta = self._stage(np.asarray(token_ids, dtype=np.int64), starts, nums,
                           self.input_batch.block_table[rows], pad_to=bucket)
        prompt_lp: list = []
        if bucket is not None:
            logits = self.graphs.replay(bucket)[: len(seqs)]
        else:
            prompt_lp = self._prompt_logprob_rows(seqs)
            sample_rows = self.buffers.qsl_np[1:][sampling].astype(np.int64) - 1
            rows_np = np.concatenate([r for _, r, _, _ in prompt_lp] + [sample_rows])
            hidden = self.model(self.buffers.input_ids[:num_tokens], self.buffers.positions[:num_tokens],
                                self.kv_caches, meta)
            logits = self.model.compute_logits(hidden[torch.from_numpy(rows_np).to(self.device)])
        num_prompt_rows = logits.shape[0] - len(sampling)
        sampled = None
        if requests:
            sampled = self.sampler(logits[num_prompt_rows:],
                                   build_sampling_batch(requests, self.vocab_size, self.device))
        prompt_logprobs = self._compute_prompt_logprobs(prompt_lp, logits[:num_prompt_rows])
        return self._to_host(sampled, requests, prompt_logprobs)

    def _stage(
        self, token_ids: np.ndarray, starts: np.ndarray, nums: np.ndarray, table_rows: np.ndarray,
        pad_to: int | None = None,
    ) -> AttentionMetadata:
        """Flat inputs for sequences that compute ``nums[i]`` tokens from position ``starts[i]``: written to the
        pinned staging buffers, copied to the device buffers; padded with empty rows to ``pad_to`` for a graph."""
        buf, bs = self.buffers, self.block_size
        num_seqs, num_tokens = len(nums), len(token_ids)
        qsl = buf.qsl_np[: num_seqs + 1]
        qsl[0] = 0
        np.cumsum(nums, out=qsl[1:])
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(qsl[:-1] - starts, nums)
        seq_of_token = np.repeat(np.arange(num_seqs), nums)
        buf.ids_np[:num_tokens] = token_ids
        buf.pos_np[:num_tokens] = positions
        buf.slot_np[:num_tokens] = table_rows[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        buf.seq_np[:num_seqs] = starts + nums
        width = table_rows.shape[1]
        buf.bt_np[:num_seqs, :width] = table_rows
        if pad_to is not None:
            self._fill_padding(num_seqs, pad_to)
            num_seqs = num_tokens = pad_to
        buf.upload(num_tokens, num_seqs)
        return buf.metadata(num_tokens, num_seqs, int(nums.max()) if len(nums) else 0)

    def _fill_padding(self, start: int, end: int) -> None:
        """Rows ``start..end`` of a decode graph batch: one dummy query each, no context, no cache write."""
        buf = self.buffers
        buf.ids_np[start:end] = 0
        buf.pos_np[start:end] = 0
        buf.slot_np[start:end] = -1
        buf.seq_np[start:end] = 0
        buf.qsl_np[start + 1 : end + 1] = np.arange(start + 1, end + 1)
        buf.bt_np[start:end] = 0

    def _decode_forward(self, batch_size: int) -> torch.Tensor:
        """The graph body: ``batch_size`` one-token sequences from the static buffers -> logits."""
        buf = self.buffers
        meta = buf.metadata(batch_size, batch_size, 1)
        hidden = self.model(buf.input_ids[:batch_size], buf.positions[:batch_size], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def _prompt_logprob_rows(self, seqs: list[ScheduledSeq]) -> list[tuple[Request, np.ndarray, np.ndarray, int]]:
        """(request, flat rows, target prompt tokens, first target index) for the prompt positions whose
        next-token logprob is owed this step: position p gives the logprob of prompt token p + 1."""
        out = []
        qsl = self.buffers.qsl_np
        for i, s in enumerate(seqs):
            req = s.request
            if req.prompt_logprobs_done:
                continue
            last = min(s.start + s.num_tokens, req.num_prompt_tokens - 1)  # position P-1 has no next prompt token
            if last <= s.start:
                continue
            positions = np.arange(s.start, last)
            rows = qsl[i] + (positions - s.start)
            targets = np.asarray(req.prompt_token_ids, dtype=np.int64)[positions + 1]
            out.append((req, rows.astype(np.int64), targets, s.start + 1))
        return out

    def _compute_prompt_logprobs(
        self, prompt_lp: list[tuple[Request, np.ndarray, np.ndarray, int]], logits: torch.Tensor
    ) -> dict[tuple[str, int], tuple[int, Logprobs]]:
        result = {}
        offset = 0
        for req, rows, targets, first_token in prompt_lp:
            chunk = logits[offset : offset + len(rows)]
            offset += len(rows)
            ids, lps, ranks = gather_logprobs(
                chunk.log_softmax(-1), torch.from_numpy(targets).to(self.device), req.sampling_params.prompt_logprobs
            )
            result[req.key] = (first_token, Logprobs(ids.tolist(), lps.tolist(), ranks.tolist()))
        return result

    def _to_host(
        self, sampled: SamplerOutput | None, requests: list[Request], prompt_logprobs: dict
    ) -> RunnerOutput:
        if sampled is None:
            return RunnerOutput([], [], prompt_logprobs)
        token_ids = sampled.token_ids.tolist()  # the step's one device -> host sync
        logprobs: list[Logprobs | None] = [None] * len(requests)
        if sampled.logprobs is not None:
            ids, lps, ranks = sampled.logprob_token_ids.tolist(), sampled.logprobs.tolist(), sampled.ranks.tolist()
            for i, r in enumerate(requests):
                k = r.sampling_params.logprobs
                if k is not None:
                    logprobs[i] = Logprobs([ids[i][: k + 1]], [lps[i][: k + 1]], [ranks[i]])
        return RunnerOutput(token_ids, logprobs, prompt_logprobs)


def _pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but CUDA is not available.")
    return device
