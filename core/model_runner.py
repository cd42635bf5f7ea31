"""Executes one scheduled step on the device: flat inputs from the scheduler's output, the forward pass, logits for
the rows that need them, sampling. Owns the model and the KV-cache tensors."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

import kernels.backend
from core.config import ModelConfig, resolve_dtype
from core.layers.attention import AttentionMetadata
from core.loader import iter_weights, load_hf_config
from core.models import model_class
from core.request import Request
from core.sampler import Penalties, Sampler, SamplerOutput, SamplingBatch, gather_logprobs
from core.scheduler import ScheduledSeq, SchedulerOutput
from ipc.messages import EngineConfig, Logprobs
from ipc.model_source import resolve_model

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sampled_token_ids: list[int]  # one per sampling sequence, in batch order
    logprobs: list[Logprobs | None]  # one per sampling sequence
    prompt_logprobs: dict[tuple[str, int], tuple[int, Logprobs]]  # key -> (first prompt token index, rows)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = _pick_device(config.device)
        if config.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got '{config.attention_backend}'.")
        if config.attention_backend == "torch":  # process-wide: the engine process runs one engine
            kernels.backend.FORCE_TORCH_ATTENTION = True
        self.source = resolve_model(config.model)
        hf_config = load_hf_config(self.source)
        self.model_config = ModelConfig.from_hf_dict(hf_config)
        self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device)
        self.block_size = config.block_size
        self.max_model_len = self._max_model_len()
        self.vocab_size = self.model_config.vocab_size
        torch.manual_seed(config.seed)

        start = time.perf_counter()
        self.model = self._load_model()
        logger.info("Loaded %s (%s, %s) in %.1f s", self.source.name, self.dtype, self.device,
                    time.perf_counter() - start)
        self.sampler = Sampler(config.seed, self.device)
        self.kv_caches: list[torch.Tensor] = []
        self.num_kv_blocks = 0

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
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        num_tokens = self.max_num_batched_tokens
        num_seqs = min(self.config.max_num_seqs, num_tokens)
        self._allocate_kv_cache(-(-num_tokens // self.block_size) + num_seqs + 1)
        self._profile_run(num_tokens, num_seqs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        self.kv_caches = []
        torch.cuda.empty_cache()
        budget = total * self.config.gpu_memory_utilization - peak - non_torch
        num_blocks = int(budget // self.kv_block_bytes())
        logger.info("Memory: total %.1f GiB, weights+activations peak %.2f GiB, non-torch %.2f GiB -> %d KV blocks",
                    total / 2**30, peak / 2**30, non_torch / 2**30, num_blocks)
        if num_blocks < 2:
            raise RuntimeError("No GPU memory left for the KV cache: raise gpu_memory_utilization or use a smaller "
                               "max_num_batched_tokens.")
        return num_blocks

    def _profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """A forward pass at the largest batch (token budget spread over max_num_seqs sequences) plus sampling."""
        lens = [num_tokens // num_seqs] * num_seqs
        lens[-1] += num_tokens - sum(lens)
        block_ids, next_block = [], 1
        for n in lens:
            k = -(-n // self.block_size)
            block_ids.append(list(range(next_block, next_block + k)))
            next_block += k
        starts = [0] * num_seqs
        inputs = self._prepare_arrays([0] * num_tokens, starts, lens, block_ids)
        hidden = self.model(inputs["input_ids"], inputs["positions"], self.kv_caches, inputs["meta"])
        logits = self.model.compute_logits(hidden[inputs["query_start_loc"][1:].long() - 1])
        temperature = torch.ones(num_seqs, device=self.device)
        self.sampler(logits, SamplingBatch(temperature, all_greedy=False, any_greedy=False, max_num_logprobs=0))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._allocate_kv_cache(num_blocks)
        self.num_kv_blocks = num_blocks

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        cfg = self.model_config
        shape = (2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]

    @property
    def max_num_batched_tokens(self) -> int:
        return self.config.max_num_batched_tokens or max(8192, self.max_model_len)

    # ------------------------------------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_ids: list[list[int]]) -> RunnerOutput:
        seqs = sched.scheduled
        token_ids: list[int] = []
        for s in seqs:
            token_ids.extend(s.request.all_token_ids[s.start : s.start + s.num_tokens])
        inputs = self._prepare_arrays(token_ids, [s.start for s in seqs], [s.num_tokens for s in seqs], block_ids)

        sampling = [i for i, s in enumerate(seqs) if s.samples]
        prompt_lp = self._prompt_logprob_rows(seqs, inputs["query_start_cpu"])
        sample_rows = inputs["query_start_cpu"][1:][sampling] - 1
        rows = np.concatenate([r for _, r, _, _ in prompt_lp] + [sample_rows]).astype(np.int64)

        hidden = self.model(inputs["input_ids"], inputs["positions"], self.kv_caches, inputs["meta"])
        logits = self.model.compute_logits(hidden[torch.from_numpy(rows).to(self.device)])

        num_prompt_rows = len(rows) - len(sampling)
        requests = [seqs[i].request for i in sampling]
        sampled = self.sampler(logits[num_prompt_rows:], self._sampling_batch(requests)) if requests else None
        prompt_logprobs = self._compute_prompt_logprobs(prompt_lp, logits[:num_prompt_rows])
        return self._to_host(sampled, requests, prompt_logprobs)

    def _prepare_arrays(
        self, token_ids: list[int], starts: list[int], nums: list[int], block_ids: list[list[int]]
    ) -> dict:
        bs = self.block_size
        starts_np = np.asarray(starts, dtype=np.int64)
        nums_np = np.asarray(nums, dtype=np.int64)
        seq_lens = starts_np + nums_np
        query_start = np.zeros(len(nums) + 1, dtype=np.int64)
        np.cumsum(nums_np, out=query_start[1:])
        num_tokens = int(query_start[-1])
        row_of_token = np.repeat(np.arange(len(nums)), nums_np)
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(query_start[:-1] - starts_np, nums_np)
        width = max(len(ids) for ids in block_ids)
        table = np.zeros((len(nums), width), dtype=np.int32)
        for i, ids in enumerate(block_ids):
            table[i, : len(ids)] = ids
        slots = table[row_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        to = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)  # noqa: E731
        meta = AttentionMetadata(
            slot_mapping=to(slots),
            block_tables=to(table),
            seq_lens=to(seq_lens.astype(np.int32)),
            query_start_loc=to(query_start.astype(np.int32)),
            max_query_len=int(nums_np.max()),
        )
        return {
            "input_ids": to(np.asarray(token_ids, dtype=np.int64)),
            "positions": to(positions),
            "meta": meta,
            "query_start_cpu": query_start,
            "query_start_loc": meta.query_start_loc,
        }

    def _prompt_logprob_rows(
        self, seqs: list[ScheduledSeq], query_start: np.ndarray
    ) -> list[tuple[Request, np.ndarray, np.ndarray, int]]:
        """(request, flat rows, target prompt tokens) for the prompt positions whose next-token logprob is owed
        this step: position p gives the logprob of prompt token p + 1."""
        out = []
        for i, s in enumerate(seqs):
            req = s.request
            if req.prompt_logprobs_done:
                continue
            last = min(s.start + s.num_tokens, req.num_prompt_tokens - 1)  # position P-1 has no next prompt token
            if last <= s.start:
                continue
            positions = np.arange(s.start, last)
            rows = query_start[i] + (positions - s.start)
            targets = np.asarray(req.prompt_token_ids, dtype=np.int64)[positions + 1]
            out.append((req, rows, targets, s.start + 1))
        return out

    def _compute_prompt_logprobs(
        self, prompt_lp: list[tuple[Request, np.ndarray, np.ndarray, int]], logits: torch.Tensor
    ) -> dict[tuple[str, int], tuple[int, Logprobs]]:
        """key -> (index of the first prompt token covered, its rows)."""
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

    def _sampling_batch(self, requests: list[Request]) -> SamplingBatch:
        dev = self.device
        params = [r.sampling_params for r in requests]
        temps = [0.0 if p.greedy else p.temperature for p in params]
        any_greedy = any(t == 0.0 for t in temps)
        batch = SamplingBatch(
            temperature=torch.tensor(temps, dtype=torch.float32, device=dev),
            all_greedy=all(t == 0.0 for t in temps),
            any_greedy=any_greedy,
        )
        if any(p.top_k > 0 for p in params):
            batch.top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev)
        if any(p.top_p < 1.0 for p in params):
            batch.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        if any(p.min_p > 0.0 for p in params):
            batch.min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
        seeded = [i for i, r in enumerate(requests) if r.seed_key is not None and not params[i].greedy]
        if seeded:
            batch.seeded_rows = torch.tensor(seeded, dtype=torch.int64, device=dev)
            batch.seed_keys = torch.tensor([requests[i].seed_key for i in seeded], dtype=torch.int64, device=dev)
            batch.seed_steps = torch.tensor([requests[i].num_output_tokens for i in seeded], dtype=torch.int64,
                                            device=dev)
        bias_rows, bias_cols, bias_vals = [], [], []
        for i, p in enumerate(params):
            for token, value in (p.logit_bias or {}).items():
                if 0 <= token < self.vocab_size:
                    bias_rows.append(i), bias_cols.append(token), bias_vals.append(value)
        if bias_rows:
            batch.logit_bias = (torch.tensor(bias_rows, device=dev), torch.tensor(bias_cols, device=dev),
                                torch.tensor(bias_vals, dtype=torch.float32, device=dev))
        ban_rows, ban_cols = [], []
        for i, r in enumerate(requests):
            if r.num_output_tokens < params[i].min_tokens:
                banned = set(r.stop_token_ids) | (set() if params[i].ignore_eos else set(r.eos_token_ids))
                ban_rows.extend([i] * len(banned)), ban_cols.extend(banned)
        if ban_rows:
            batch.banned = (torch.tensor(ban_rows, device=dev), torch.tensor(ban_cols, device=dev))
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
            batch.penalties = self._penalties(requests)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if wanted:
            batch.max_num_logprobs = max(wanted)
        return batch

    def _penalties(self, requests: list[Request]) -> Penalties:
        dev, vocab = self.device, self.vocab_size
        n = len(requests)

        def padded(lists: list[list[int]]) -> torch.Tensor:
            width = max(1, max(len(x) for x in lists))
            arr = np.full((n, width), vocab, dtype=np.int64)  # pad with an extra column, dropped below
            for i, x in enumerate(lists):
                arr[i, : len(x)] = x
            return torch.from_numpy(arr).to(dev)

        outputs = padded([r.output_token_ids for r in requests])
        counts = torch.zeros(n, vocab + 1, device=dev).scatter_add_(1, outputs, torch.ones_like(outputs, dtype=torch.float32))
        seen = counts > 0
        seen.scatter_(1, padded([r.prompt_token_ids for r in requests]), True)
        col = lambda vals: torch.tensor(vals, dtype=torch.float32, device=dev)[:, None]  # noqa: E731
        params = [r.sampling_params for r in requests]
        return Penalties(
            presence=col([p.presence_penalty for p in params]),
            frequency=col([p.frequency_penalty for p in params]),
            repetition=col([p.repetition_penalty for p in params]),
            output_counts=counts[:, :vocab],
            seen_mask=seen[:, :vocab],
        )

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
