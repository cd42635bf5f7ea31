"""Executes one scheduled step on the device: flat inputs from the scheduler's output, the forward pass (a CUDA
graph replay for decode-only steps and for speculative steps whose sequences are all decodes), logits for the rows
that need them, sampling. Owns the model, the KV-cache tensors and the persistent input buffers.

The runner reads only the engine's ``SchedulerOutput`` messages (ipc/scheduler_output.py) and its own persistent batch
built from them (core/worker_batch.py), never the scheduler's objects: with tensor/pipeline parallelism the same
runner runs in every rank's process (core/distributed/), rank 0 (in the engine core) sampling for all.

Inputs are built with numpy in pinned host buffers and copied to persistent device buffers without blocking; the
only device -> host sync of a step is reading the sampled token ids.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from core.config import ModelConfig, log_resolved, resolve_config
from core.cuda_graphs import DecodeGraphs, graph_batch_sizes
from core.distributed.parallel_state import TensorParallelGroup
from core.distributed.pipeline import PendingHidden, PipelineStage, stage_config, stage_layers, stage_weights
from core.distributed.tensor_parallel import check_layout, parallelize, shard_config, shard_weights
from core.host_copy import to_device
from core.input_batch import InputBatch
from core.layers.attention import AttentionMetadata
from core.layers.quantization import weight_bytes
from core.layers.quantization.gguf import resolve_model_quantization
from core.loader import iter_weights, load_hf_config
from core.model_source import ModelSource, resolve_model
from core.models import model_class
from core.sampler import Sampler, SamplerOutput, SamplingBatch, gather_logprobs
from core.sampling_metadata import build_sampling_batch
from core.spec_decode.draft_model import DraftModelProposer, load_draft_config
from core.spec_decode.greedy_verify import GreedyVerifiedStep, is_plain_greedy, launch_greedy_verify
from core.spec_decode.verifier import VerifiedStep, verify_step
from core.step_inputs import StepInputs
from core.worker_batch import BatchSequence, WorkerBatch
from ipc.config import SpeculativeConfig
from ipc.messages import EngineConfig, Logprobs
from ipc.scheduler_output import SchedulerOutput
from kernels import pdl

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sampled_token_ids: list[int]  # one per sampling sequence, in batch order
    logprobs: list[Logprobs | None]  # one per sampling sequence
    prompt_logprobs: dict[tuple[str, int], tuple[int, Logprobs]]  # key -> (first prompt token index, rows)
    # Speculative steps: every token each sampling sequence emits (accepted drafts, then one sampled token);
    # ``sampled_token_ids`` is empty then.
    emitted_token_ids: list[list[int]] | None = None


@dataclass
class StepHandle:
    """A launched step. ``result()`` waits for it: the step's one device -> host sync."""

    seqs: list[BatchSequence]  # the sampling sequences, in batch order
    sample_rows: np.ndarray | None  # by slot: the sequence's row in ``sampled`` (-1: it did not sample)
    sampled: SamplerOutput | None
    host_tokens: torch.Tensor | None  # pinned copy of the sampled ids (CUDA)
    event: torch.cuda.Event | None
    prompt_logprobs: dict[tuple[str, int], tuple[int, Logprobs]]
    # A speculative step's results (``sampled`` is None, except for a greedy step without drafts: its argmax, which
    # a run-ahead step reads on the device).
    verified: VerifiedStep | GreedyVerifiedStep | None = None

    def ready(self) -> bool:
        """True when ``result()`` would not wait for the device (a non-blocking event query; speculative steps:
        False, their results are not polled)."""
        if self.verified is not None:
            return False
        return self.event is None or self.event.query()

    def result(self) -> RunnerOutput:
        if self.verified is not None:
            emitted, logprobs = self.verified.result()
            return RunnerOutput([], logprobs, self.prompt_logprobs, emitted)
        if self.sampled is None:
            return RunnerOutput([], [], self.prompt_logprobs)
        if self.event is not None:
            self.event.synchronize()
            token_ids = self.host_tokens.tolist()
        else:
            token_ids = self.sampled.token_ids.tolist()
        logprobs: list[Logprobs | None] = [None] * len(self.seqs)
        sampled = self.sampled
        if sampled.logprobs is not None:
            ids, lps, ranks = sampled.logprob_token_ids.tolist(), sampled.logprobs.tolist(), sampled.ranks.tolist()
            requested = None if sampled.requested_logprobs is None else sampled.requested_logprobs.tolist()
            for i, seq in enumerate(self.seqs):
                params = seq.sampling_params
                k = params.logprobs
                if params.logprob_token_ids and requested is not None:
                    # The sampled token (column 0), then the requested ids in the order asked.
                    m = len(params.logprob_token_ids)
                    logprobs[i] = Logprobs([[ids[i][0], *params.logprob_token_ids]], [[lps[i][0], *requested[i][:m]]],
                                           [ranks[i]])
                elif k is not None:
                    logprobs[i] = Logprobs([ids[i][: k + 1]], [lps[i][: k + 1]], [ranks[i]])
        return RunnerOutput(token_ids, logprobs, self.prompt_logprobs)


@dataclass
class ForwardedStep:
    """A step whose forward is queued (with pipeline parallelism: possibly still in the later stages), waiting for
    its logits and sampling: what ``ModelRunner._sample`` needs, captured when the step was launched (the runner's
    input buffers and batch move on to the next step meanwhile)."""

    plan: SchedulerOutput
    batch_seqs: list[BatchSequence]
    rows: np.ndarray
    sampling: list[int]  # batch rows that sample
    sampling_seqs: list[BatchSequence]
    drafts_by_row: list[list[int]]
    speculative: bool
    plain_greedy: bool
    prompt_lp: list
    num_tokens: int
    hidden: torch.Tensor | PendingHidden | None  # the final hidden states, or their pending receive
    rows_t: torch.Tensor | None  # rows of ``hidden`` that need logits (None: all)
    logits: torch.Tensor | None  # already computed (a decode graph's replay)


# Verify graphs hold the activations of batch * (1 + k) tokens: captured up to this many tokens; larger speculative
# batches run eagerly (their GPU time dominates the launch overhead a graph saves).
MAX_VERIFY_GRAPH_TOKENS = 1024


def verify_graph_sizes(max_num_seqs: int, k: int, max_num_batched_tokens: int) -> list[int]:
    """The decode graphs' batch sizes whose ``size * (1 + k)`` tokens fit the token budget and the cap."""
    limit = min(max_num_batched_tokens, MAX_VERIFY_GRAPH_TOKENS)
    return [size for size in graph_batch_sizes(max_num_seqs) if size * (1 + k) <= limit]


def _verified_rows(last_rows: np.ndarray, num_drafts: np.ndarray) -> np.ndarray:
    """Flat token rows ``last - d .. last`` for each (last row, drafts d): a sequence's verified positions."""
    widths = num_drafts + 1
    offsets = np.arange(int(widths.sum())) - np.repeat(np.cumsum(widths) - widths, widths)
    return np.repeat(last_rows - num_drafts, widths) + offsets


class ModelRunner:
    def __init__(self, config: EngineConfig, tp_group: TensorParallelGroup | None = None) -> None:
        """``tp_group``: this rank's tensor-parallel group (None: the whole model on one device). Rank 0 samples;
        the other ranks run the same steps and receive its sampled token ids."""
        self.config = config
        self.tp_group = tp_group
        self.is_driver = tp_group is None or tp_group.global_rank == 0
        self.source = resolve_model(config.model, config.revision)
        hf_config = load_hf_config(self.source)
        self.model_config = resolve_model_quantization(ModelConfig.from_hf_dict(hf_config), hf_config, config,
                                                       self.source)
        self.resolved = resolve_config(config, self.model_config)
        if self.is_driver:
            log_resolved(config, self.resolved)
        self.device = self.resolved.device
        self.shard_config = self.model_config  # this rank's part of the model (heads, MLP width, vocabulary rows)
        if tp_group is not None:
            if config.speculative_config is not None and config.speculative_config.method == "draft_model":
                raise ValueError("speculative_config method draft_model is not supported with tensor or "
                                 "pipeline parallelism yet (ngram is).")
            check_layout(self.model_config, tp_group.world_size, tp_group.pp_size)
            self.shard_config = stage_config(shard_config(self.model_config, tp_group.world_size),
                                             tp_group.pp_size, tp_group.pp_rank)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", tp_group.local_rank)
        self.dtype = self.resolved.dtype
        self.kv_cache_dtype = self.resolved.kv_cache_dtype  # the model dtype, or e4m3 (--kv-cache-dtype fp8)
        self.block_size = config.block_size
        self.max_model_len = self.resolved.max_model_len
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = self.resolved.max_num_batched_tokens
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.vocab_size = self.model_config.vocab_size
        torch.manual_seed(config.seed)

        # Memory other engines of this process hold already (an LLM beside another one): gpu_memory_utilization is
        # this engine's share, as in vLLM, so the profile below does not count theirs as its own.
        self._memory_before_load = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        start = time.perf_counter()
        self.model = self._load_model()
        logger.info("Loaded %s (%s, %s) in %.1f s", self.source.name, self.dtype, self.device,
                    time.perf_counter() - start)
        if self.model_config.quantization is not None:
            logger.info("Weights quantized with %s: %.1f MB of weights", self.model_config.quantization.summary(),
                        weight_bytes(self.model) / 1e6)
        self.sampler = Sampler(self.resolved.kernel_backend)
        self.structured_output = None  # the engine's StructuredOutputManager: grammar bitmasks for constrained rows
        self._step_keys = random.Random(config.seed)  # unseeded rows' noise: reproducible for a given engine seed
        self.inputs = StepInputs(self.max_num_batched_tokens, self.max_num_seqs, self.max_blocks_per_seq,
                                 self.block_size, self.device)
        pin = self.device.type == "cuda"
        self._host_tokens = [torch.zeros(self.max_num_seqs, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        # The fast greedy verify's argmax of every verified row (at most a step's tokens), double buffered like
        # ``_host_tokens``.
        self._host_verify_ids = [torch.zeros(self.max_num_batched_tokens, dtype=torch.int64, pin_memory=pin)
                                 for _ in range(2)] if pin else None
        self._step_count = 0
        self.batch = WorkerBatch(self.max_num_seqs, self.max_blocks_per_seq,
                                 frozenset(self.model_config.eos_token_ids))
        self.kv_caches: list[torch.Tensor] = []
        self.num_kv_blocks = 0
        self.graphs: DecodeGraphs | None = None
        pdl.configure(config.enable_pdl and self.device.type == "cuda")
        # Pipeline stages run eagerly: their send/recv between stages is not captured in CUDA graphs.
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager and \
            (tp_group is None or tp_group.pp_size == 1)
        # Pipeline parallelism: steps run as micro-batches (start_step / finish_step), several in flight.
        self.pipelined = tp_group is not None and tp_group.pp_size > 1
        spec = config.speculative_config
        self.num_spec_tokens = spec.num_speculative_tokens if spec is not None else 0
        # Speculative decode steps (every sequence a decode of 1 + up to k tokens) replay these: see _verify_forward.
        self.verify_graphs: DecodeGraphs | None = None
        self._verify_argmax_tokens = 0  # verify graphs of at most this many rows also return the LM head's argmax
        self.draft = self._load_draft(spec) if spec is not None and spec.method == "draft_model" else None

    # ------------------------------------------------------------------------------------------------ setup
    def _load_model(self, model_config: ModelConfig | None = None, source: ModelSource | None = None,
                    load_format: str | None = None) -> torch.nn.Module:
        """The target model, or (arguments given) the draft model: the same dtype, device, backends and seed."""
        split = model_config is None and self.tp_group is not None
        model_config = model_config or self.shard_config
        load_format = load_format or self.config.load_format
        torch.manual_seed(self.config.seed)  # dummy weights drawn on the GPU: the same for the same config and seed
        cls = model_class(model_config)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = cls(model_config, attention_backend=self.resolved.attention_backend,
                            kernel_backend=self.resolved.kernel_backend)
        finally:
            torch.set_default_dtype(default_dtype)
        if split:
            group = self.tp_group
            parallelize(model, self.model_config, group)
            if group.pp_size > 1:
                model = PipelineStage(model, group)
        if load_format == "dummy":
            model.init_dummy_weights(self.config.seed)
        else:
            weights = iter_weights(source or self.source, load_format,
                                   keep_quantized=getattr(model_config.quantization, "kept", None))
            if model_config.quantization is not None:
                weights = model_config.quantization.checkpoint_tensors(weights)
            if split:  # cut by the checkpoint's names (a quantized file's per-tensor types), then renumbered
                weights = shard_weights(weights, self.model_config, group.rank, group.world_size)
                weights = stage_weights(weights, *stage_layers(self.model_config.num_layers, group.pp_size,
                                                               group.pp_rank))
            model.load_weights(weights)
        return model.eval()

    def _load_draft(self, spec: SpeculativeConfig) -> DraftModelProposer:
        """The draft model (speculative_config method draft_model), checked against the target at startup."""
        start = time.perf_counter()
        source, draft_config = load_draft_config(spec, self.vocab_size, self.max_model_len)
        model = self._load_model(draft_config, source, spec.load_format)
        logger.info("Loaded draft model %s (%d layers) in %.1f s", spec.model, draft_config.num_layers,
                    time.perf_counter() - start)
        # The draft proposes from the engine's side (its sequences and blocks): its own block-table rows.
        draft_rows = InputBatch(self.max_num_seqs, self.max_blocks_per_seq, pin_memory=False)
        return DraftModelProposer(spec, model, draft_config, input_batch=draft_rows, block_size=self.block_size,
                                  kv_cache_dtype=self.kv_cache_dtype, device=self.device)

    def kv_block_bytes(self) -> int:
        """Bytes of one block id across every cache it addresses (on this rank): the target's and the draft
        model's."""
        cfg = self.shard_config
        target = 2 * self.block_size * cfg.num_kv_heads * cfg.head_dim * self.kv_cache_dtype.itemsize * cfg.num_layers
        return target + (self.draft.kv_block_bytes() if self.draft is not None else 0)

    def determine_num_blocks(self) -> int:
        """Blocks for the KV cache: the override, a fixed budget on CPU, or what the profiled GPU memory leaves;
        with tensor parallelism, the fewest any rank can hold (every rank addresses the same block ids)."""
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override
        if self.device.type != "cuda":
            num_blocks = max(2, int(self.config.cpu_kv_cache_gib * 2**30) // self.kv_block_bytes())
        else:
            num_blocks = self._profile_num_blocks()
        return num_blocks if self.tp_group is None else self.tp_group.min_int(num_blocks)

    @torch.inference_mode()
    def _profile_num_blocks(self) -> int:
        """Peak memory of a forward pass at the largest batch; what ``gpu_memory_utilization`` leaves goes to KV."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # The largest step the scheduler can build: no sequence holds more than max_model_len tokens.
        num_tokens = min(self.max_num_batched_tokens, self.max_num_seqs * self.max_model_len)
        num_seqs = min(self.max_num_seqs, num_tokens)
        blocks_per_seq = -(-(-(-num_tokens // num_seqs)) // self.block_size)
        self._allocate_kv_cache(num_seqs * blocks_per_seq + 1)
        self._profile_run(num_tokens, num_seqs, blocks_per_seq)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        kv_bytes = sum(t.numel() * t.element_size() for t in self.kv_caches + self._draft_kv_caches())
        free, total = torch.cuda.mem_get_info()
        non_torch = total - free - torch.cuda.memory_reserved()
        self.kv_caches = []
        if self.draft is not None:
            self.draft.kv_caches = []
        torch.cuda.empty_cache()
        # Torch memory this process held before this engine loaded (another engine's weights and KV cache) is counted
        # in the peak but is not this engine's; whatever it left unused is not this engine's budget either.
        own_peak = peak - kv_bytes - self._memory_before_load
        budget = total * self.config.gpu_memory_utilization - own_peak - non_torch
        num_blocks = int(budget // self.kv_block_bytes())
        logger.info("Memory: %.1f GiB total, weights + peak activations %.2f GiB, non-torch %.2f GiB -> %d KV blocks "
                    "(%.1f GiB)", total / 2**30, own_peak / 2**30, non_torch / 2**30, num_blocks,
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
        meta = self.inputs.stage(np.zeros(num_tokens, dtype=np.int64), np.zeros(num_seqs, dtype=np.int64), nums,
                                 table)
        hidden = self.model(self.inputs.input_ids[:num_tokens], self.inputs.positions[:num_tokens],
                            self.kv_caches, meta)
        self._draft_catch_up(num_tokens, meta)
        logits = self.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])
        ones = torch.ones(num_seqs, device=self.device)
        zeros = torch.zeros(num_seqs, dtype=torch.int64, device=self.device)
        self.sampler(logits, SamplingBatch(ones, all_greedy=False, keys=zeros, steps=zeros, max_num_logprobs=0))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._allocate_kv_cache(num_blocks)
        self.num_kv_blocks = num_blocks
        if self.device.type == "cuda":
            self._warmup(num_blocks)
        if self.use_graphs:
            self.graphs = DecodeGraphs(self._decode_forward, self.max_num_seqs)
            self.inputs.prepare_graph_capture(self.graphs.max_size)
            self.graphs.capture()
            if self.num_spec_tokens:
                # In-graph LM head for at most as many rows as the largest decode graph's, or 256: one graph-internal
                # logits buffer of that many rows (the decode graphs already hold max_num_seqs rows of logits).
                self._verify_argmax_tokens = max(self.graphs.max_size, 256)
                self.verify_graphs = DecodeGraphs(self._verify_graph_forward, self.max_num_seqs,
                                                  sizes=verify_graph_sizes(self.max_num_seqs, self.num_spec_tokens,
                                                                           self.max_num_batched_tokens),
                                                  name="verify")
                if self.verify_graphs.sizes:
                    size = self.verify_graphs.max_size
                    self.inputs.prepare_verify_capture(size, size * (1 + self.num_spec_tokens))
                self.verify_graphs.capture(pool=self.graphs.pool)  # never replayed while a decode graph runs
            if self.draft is not None:  # its own pool: its static outputs are read on the host after the replay
                self.draft.capture_graphs(self.max_num_seqs, self.max_blocks_per_seq)

    @torch.inference_mode()
    def _warmup(self, num_blocks: int) -> None:
        """Compile the kernel variants prefill and mixed steps use (chunk lengths, batch sizes) now, not during the
        first requests."""
        start = time.perf_counter()
        shapes = [(1, 100), (1, 1024), (4, 300), (7, 33), (16, 9), (64, 3), (200, 1), (3, 2000)]
        for num_seqs, per_seq in shapes:
            num_tokens = num_seqs * per_seq
            blocks_per_seq = -(-per_seq // self.block_size)
            if num_tokens > self.max_num_batched_tokens or num_seqs > self.max_num_seqs or \
                    num_seqs * blocks_per_seq >= num_blocks or per_seq > self.max_model_len:
                continue
            self._profile_run(num_tokens, num_seqs, blocks_per_seq)
        # The sampler splits the vocabulary more for fewer rows: compile each split count's reduction now.
        for num_rows in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512):
            if num_rows > self.max_num_seqs:
                break
            logits = torch.randn(num_rows, self.vocab_size, device=self.device)
            keys = torch.arange(num_rows, device=self.device)
            self.sampler(logits, SamplingBatch(torch.ones(num_rows, device=self.device), all_greedy=False, keys=keys,
                                               steps=keys))
        torch.cuda.synchronize()
        logger.info("Warmed up prefill and sampling kernels in %.1f s", time.perf_counter() - start)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        cfg = self.shard_config
        shape = (2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
                          for _ in range(cfg.num_layers)]
        if self.draft is not None:
            self.draft.allocate_kv_cache(num_blocks)

    def _draft_kv_caches(self) -> list[torch.Tensor]:
        return self.draft.kv_caches if self.draft is not None else []

    # ------------------------------------------------------------------------------------------------ step
    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput, prev: StepHandle | None = None,
               before_sample: Callable[[list[BatchSequence]], None] | None = None,
               before_forward: Callable[[], None] | None = None) -> StepHandle:
        """Apply the step's diffs to the persistent batch, stage inputs and enqueue the step on the device without
        waiting for it. A sequence whose last input token is still being sampled by ``prev`` (async scheduling)
        gets it on the device, from ``prev``'s output.

        ``before_sample(sampling_seqs)``: called once the forward is queued and before the grammar masks are
        collected, when some sequence has a grammar (the engine finishes ``prev`` there and starts this step's
        masks on the grammar threads, while the device runs this forward); the caller runs it afterwards
        otherwise. ``before_forward()``: called once the inputs are staged, before the forward is queued (the
        engine's last early look at ``prev``)."""
        forwarded = self._forward(plan, prev, before_forward)
        if isinstance(forwarded, StepHandle):
            return forwarded
        return self._sample(forwarded, before_sample)

    @torch.inference_mode()
    def start_step(self, plan: SchedulerOutput) -> ForwardedStep | StepHandle:
        """Pipeline parallelism: run this stage's part of a micro-batch and return without waiting for the later
        stages. On the first stage, ``finish_step`` later receives its final hidden states and samples; the other
        stages are done with it (an empty handle). Every sequence's input tokens are known (the engine never
        schedules a sequence that has a step in flight)."""
        return self._forward(plan, None)

    @torch.inference_mode()
    def finish_step(self, step: ForwardedStep | StepHandle) -> StepHandle:
        """The second half of ``start_step``'s micro-batch: logits and sampling (on the first stage's ranks)."""
        if isinstance(step, StepHandle):
            return step
        return self._sample(step, None)

    def _forward(self, plan: SchedulerOutput, prev: StepHandle | None,
                 before_forward: Callable[[], None] | None = None) -> ForwardedStep | StepHandle:
        """``launch`` up to the logits: the step's inputs staged and its forward queued (with pipeline parallelism,
        this stage's part of it). A ``StepHandle`` when the step is already complete here (a verify graph that
        ran the LM head, or a pipeline stage after the first)."""
        batch_seqs = self.batch.apply(plan)
        num_seqs = plan.num_rows
        rows = self.batch.rows(plan)
        starts = np.asarray(plan.starts, dtype=np.int64)
        nums = np.asarray(plan.num_tokens, dtype=np.int64)
        drafts_by_row = plan.spec_token_ids  # empty unless some row verifies drafts
        speculative = bool(drafts_by_row)
        token_ids: list[int] = []
        fill_dst: list[int] = []
        fill_slots: list[int] = []
        for slot, start, num, b, drafts in zip(plan.slots, plan.starts, plan.num_tokens, batch_seqs,
                                               drafts_by_row if speculative else repeat(None)):
            known = b.all_token_ids
            end = start + num
            if drafts:  # the last known token, then the drafts to verify
                token_ids.extend(known[start:])
                token_ids.extend(drafts)
            elif end > len(known):  # the last input token is in flight
                fill_dst.append(len(token_ids) + num - 1)
                fill_slots.append(slot)
                token_ids.extend(known[start : end - 1])
                token_ids.append(0)
            elif num == 1:
                token_ids.append(known[start])
            else:
                token_ids.extend(known[start:end])
        num_tokens = len(token_ids)
        sampling = [i for i, samples in enumerate(plan.samples) if samples]
        sampling_seqs = [batch_seqs[i] for i in sampling]
        decode_only = num_tokens == num_seqs and len(sampling) == num_seqs

        bucket = self.graphs.bucket(num_seqs) if self.graphs is not None and decode_only else None
        # A uniform verify step: every sequence a decode of its last token and its drafts (at most 1 + k rows).
        verify_layout = speculative and all(num == 1 + len(drafts) for num, drafts in zip(plan.num_tokens,
                                                                                          drafts_by_row))
        verify_bucket = self._verify_bucket(plan, len(sampling)) if verify_layout else None
        pad_tokens = verify_bucket * (1 + self.num_spec_tokens) if verify_bucket is not None else None
        meta = self.inputs.stage(np.asarray(token_ids, dtype=np.int64), starts, nums,
                                 self.batch.block_table[rows], pad_to=bucket or verify_bucket,
                                 pad_tokens_to=pad_tokens, decode_queries=self._verify_queries(verify_layout))
        if fill_dst:
            if prev is None or prev.sample_rows is None:
                raise RuntimeError(f"sequences in slots {fill_slots} were scheduled while their last token is still "
                                   "being sampled by a step this runner cannot read")
            dst = to_device(fill_dst, torch.int64, self.device)
            fill_src = prev.sample_rows[fill_slots]
            if fill_src.min() < 0:
                raise RuntimeError(f"sequences in slots {np.asarray(fill_slots)[fill_src < 0].tolist()} wait for a "
                                   "token the previous step did not sample")
            src = to_device(fill_src, torch.int64, self.device)
            self.inputs.input_ids.index_copy_(0, dst, prev.sampled.token_ids.index_select(0, src))
        if before_forward is not None:
            before_forward()
        prompt_lp: list = []
        plain_greedy = False
        rows_t = None
        hidden = None
        logits = None
        if bucket is None and verify_bucket is None:  # graphed steps run the draft's catch-up inside their graph
            self._draft_catch_up(num_tokens, meta)
        if bucket is not None:
            logits = self.graphs.replay(bucket)[:num_seqs]
        else:
            prompt_lp = self._prompt_logprob_rows(plan, batch_seqs) if verify_bucket is None else []
            plain_greedy = speculative and all(is_plain_greedy(batch_seqs[i], plan.output_indices[i])
                                               for i in sampling)
            graph_argmax = None
            if verify_bucket is not None:
                hidden, graph_argmax = self.verify_graphs.replay(verify_bucket)
                if plain_greedy and graph_argmax is not None:  # the LM head and argmax ran inside the graph
                    if not self.is_driver:
                        return self._follow_driver(sampling_seqs, rows[sampling], speculative)
                    return self._launch_greedy_verify(drafts_by_row, batch_seqs, sampling, graph_argmax[:num_tokens],
                                                      {})
            sample_rows = self.inputs.host.qsl_np[1:][sampling].astype(np.int64) - 1
            if speculative:  # every verified position's logits: 1 + len(drafts) rows per sampling sequence
                sample_rows = _verified_rows(sample_rows, np.fromiter(
                    (len(drafts_by_row[i]) for i in sampling), dtype=np.int64, count=len(sampling)))
            rows_np = np.concatenate([r for _, r, _, _ in prompt_lp] + [sample_rows])
            if len(rows_np) and (rows_np.min() < 0 or rows_np.max() >= num_tokens):
                # On the device this would be an opaque index assert that kills the process: name it here.
                raise RuntimeError(f"logits rows {rows_np.min()}..{rows_np.max()} outside the step's {num_tokens} "
                                   f"tokens ({num_seqs} sequences)")
            # Every row in order (a speculative step of decodes only): a slice, no index upload or gather.
            every_row = len(rows_np) == num_tokens and bool((rows_np == np.arange(num_tokens)).all())
            rows_t = None if every_row else to_device(rows_np, torch.int64, self.device)
            if self.pipelined:
                hidden = self.model.start(self.inputs.input_ids[:num_tokens], self.inputs.positions[:num_tokens],
                                          self.kv_caches, meta)
                if not self.tp_group.is_first_stage:  # sent on: the first stage samples
                    for seq in sampling_seqs:
                        seq.prompt_logprobs_done = True
                    return StepHandle([], None, None, None, None, {})
            elif verify_bucket is None:
                hidden = self.model(self.inputs.input_ids[:num_tokens], self.inputs.positions[:num_tokens],
                                    self.kv_caches, meta)
        return ForwardedStep(plan, batch_seqs, rows, sampling, sampling_seqs, drafts_by_row, speculative,
                             plain_greedy, prompt_lp, num_tokens, hidden, rows_t, logits)

    def _sample(self, step: ForwardedStep, before_sample: Callable[[list[BatchSequence]], None] | None
                ) -> StepHandle:
        """``launch`` from the logits on: prompt logprobs, then sampling or verification (rank 0; the other ranks
        follow it)."""
        plan, batch_seqs, rows, sampling = step.plan, step.batch_seqs, step.rows, step.sampling
        sampling_seqs, drafts_by_row, speculative = step.sampling_seqs, step.drafts_by_row, step.speculative
        plain_greedy, prompt_lp, num_tokens = step.plain_greedy, step.prompt_lp, step.num_tokens
        logits = step.logits
        if logits is None:
            hidden = step.hidden.wait() if isinstance(step.hidden, PendingHidden) else step.hidden
            rows_t = step.rows_t
            logits = self.model.compute_logits(hidden[:num_tokens] if rows_t is None else hidden[rows_t])
        num_prompt_rows = sum(len(r) for _, r, _, _ in prompt_lp)
        for seq in sampling_seqs:  # its first sample: every prompt position has been computed
            seq.prompt_logprobs_done = True
        if not self.is_driver:
            return self._follow_driver(sampling_seqs, rows[sampling], speculative)
        prompt_logprobs = self._compute_prompt_logprobs(prompt_lp, logits[:num_prompt_rows])
        if not sampling_seqs:
            return StepHandle([], None, None, None, None, prompt_logprobs)
        output_indices = [plan.output_indices[i] for i in sampling]
        if before_sample is not None and self.structured_output is not None and self.structured_output.active:
            before_sample(sampling_seqs)
        if speculative:
            drafts = [drafts_by_row[i] for i in sampling]
            if plain_greedy:
                return self._launch_greedy_verify(drafts_by_row, batch_seqs, sampling, logits[num_prompt_rows:].argmax(-1),
                                                  prompt_logprobs)
            grammar = None
            if self.structured_output is not None and self.structured_output.active:
                # Constrained sequences carry no drafts (EngineCore does not propose for them): one verify row each,
                # the first of the sequence's rows.
                if any(d and seq.sampling_params.structured_outputs is not None
                       for seq, d in zip(sampling_seqs, drafts)):
                    raise RuntimeError("a sequence with structured outputs was scheduled with drafts")
                row_starts = np.cumsum([0] + [1 + len(d) for d in drafts[:-1]]).tolist()
                grammar = self.structured_output.bitmask(sampling_seqs, self.device, row_starts)
            verified = verify_step(self.sampler, logits[num_prompt_rows:], sampling_seqs, drafts, output_indices,
                                   self.vocab_size, self._step_keys.getrandbits(32), grammar=grammar)
            return StepHandle(sampling_seqs, None, None, None, None, prompt_logprobs, verified)
        if self.num_spec_tokens and self.tp_group is None and not (
                self.structured_output is not None and self.structured_output.active) and all(
                is_plain_greedy(seq, index) for seq, index in zip(sampling_seqs, output_indices)):
            # A step without drafts while speculating (no n-gram match, say): plain greedy rows need only their
            # argmax, as in the fast verify (no sampling batch to build and upload). With speculative run-ahead the
            # next step may be launched before these tokens are read: it takes them on the device (sample_rows).
            argmax = logits[num_prompt_rows:].argmax(-1)
            handle = self._launch_greedy_verify([[]] * len(batch_seqs), batch_seqs, sampling, argmax, prompt_logprobs)
            handle.sample_rows, handle.sampled = self._sample_rows(rows[sampling]), SamplerOutput(argmax)
            return handle
        batch = build_sampling_batch(sampling_seqs, self.vocab_size, self.device, output_indices,
                                     self._step_keys.getrandbits(32))
        if self.structured_output is not None and self.structured_output.active:
            batch.grammar = self.structured_output.bitmask(sampling_seqs, self.device)
        sampled = self.sampler(logits[num_prompt_rows:], batch)
        if self.tp_group is not None and not self.pipelined:  # the other ranks feed these to their next step
            # (async scheduling; with pipeline parallelism no step needs a token still in flight)
            self.tp_group.broadcast(sampled.token_ids)
        host_tokens, event = None, None
        if self.device.type == "cuda":
            self._step_count += 1
            host_tokens = self._host_tokens[self._step_count % 2][: len(sampling_seqs)]
            host_tokens.copy_(sampled.token_ids, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return StepHandle(sampling_seqs, self._sample_rows(rows[sampling]), sampled, host_tokens, event,
                          prompt_logprobs)

    def _launch_greedy_verify(self, drafts_by_row: list[list[int]], batch_seqs: list[BatchSequence],
                              sampling: list[int], target_ids: torch.Tensor, prompt_logprobs: dict) -> StepHandle:
        """The fast verify path (every verified sequence plain greedy): ``target_ids``, the target's argmax of every
        verified row, on its way to the host."""
        host_ids = None
        if self._host_verify_ids is not None:
            self._step_count += 1
            host_ids = self._host_verify_ids[self._step_count % 2]
        verified = launch_greedy_verify(target_ids, [drafts_by_row[i] for i in sampling], host_ids)
        return StepHandle([batch_seqs[i] for i in sampling], None, None, None, None, prompt_logprobs, verified)

    def _sample_rows(self, sampling_slots: np.ndarray) -> np.ndarray:
        """By slot, the row in the step's sampled ids (-1: none): the next step's in-flight tokens come from there."""
        sample_rows = np.full(self.max_num_seqs, -1, dtype=np.int64)
        sample_rows[sampling_slots] = np.arange(len(sampling_slots))
        return sample_rows

    def _follow_driver(self, sampling_seqs: list[BatchSequence], sampling_slots: np.ndarray,
                       speculative: bool) -> StepHandle:
        """A non-driver rank's step end: no sampling here; rank 0's sampled ids arrive by broadcast, for the next
        step's in-flight tokens. (Speculative steps are never followed by one that needs them on the device.)"""
        if not sampling_seqs or speculative or self.pipelined:
            return StepHandle(sampling_seqs, None, None, None, None, {})
        token_ids = self.tp_group.broadcast(torch.empty(len(sampling_seqs), dtype=torch.int64, device=self.device))
        return StepHandle(sampling_seqs, self._sample_rows(sampling_slots), SamplerOutput(token_ids), None, None, {})

    def _decode_forward(self, batch_size: int) -> torch.Tensor:
        """The graph body: ``batch_size`` one-token sequences from the static buffers -> logits."""
        inputs = self.inputs
        meta = inputs.metadata(batch_size, batch_size, 1)
        self._draft_catch_up(batch_size, meta)
        hidden = self.model(inputs.input_ids[:batch_size], inputs.positions[:batch_size], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def _draft_catch_up(self, num_tokens: int, meta: AttentionMetadata) -> None:
        """A draft model's forward over the step's first ``num_tokens`` inputs (its KV at the target's slots). The
        decode and verify graphs run it inside themselves: eager beside them, it cost more than the target's graphed
        verify step (a 1B draft behind an 8B target: 13.9 ms against a 4.8 ms plain step on the H200)."""
        if self.draft is not None:
            self.draft.catch_up(self.inputs.input_ids[:num_tokens], self.inputs.positions[:num_tokens], meta)

    def _verify_forward(self, batch_size: int) -> torch.Tensor:
        """The verify graph body: ``batch_size`` sequences of up to ``1 + k`` query tokens each over the paged cache
        (the multi-query decode attention kernel, whose grid depends only on the sequence count; sequences with
        fewer drafts have fewer rows, padding sequences none), in the static
        buffers' first ``batch_size * (1 + k)`` token rows -> the hidden states of every row. The LM head runs
        after the replay on the verified rows only (one GEMM): graph-held logits of every padded row would cost
        ``rows x vocab`` floats of graph memory per bucket."""
        inputs = self.inputs
        num_tokens = batch_size * (1 + self.num_spec_tokens)
        meta = inputs.metadata(num_tokens, batch_size, 1 + self.num_spec_tokens, self._verify_queries(True))
        self._draft_catch_up(num_tokens, meta)
        return self.model(inputs.input_ids[:num_tokens], inputs.positions[:num_tokens], self.kv_caches, meta)

    def _verify_graph_forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A verify graph's body: the hidden states of every row, and for graphs of at most
        ``_verify_argmax_tokens`` rows the LM head's argmax of every row too (the fast greedy verify reads only that,
        so a greedy step launches nothing but the replay and one copy). The logits stay a graph-internal buffer,
        reused across the pool's graphs; sampling steps recompute the LM head on their rows after the replay."""
        hidden = self._verify_forward(batch_size)
        if hidden.shape[0] > self._verify_argmax_tokens:
            return hidden, None
        return hidden, self.model.compute_logits(hidden).argmax(-1)

    def _verify_bucket(self, plan: SchedulerOutput, num_sampling: int) -> int | None:
        """The verify graph batch size for a uniform verify step (every sequence a decode of its last token and
        up to k drafts), or None (eager): only steps where every sequence samples replay a graph."""
        if self.verify_graphs is None or num_sampling != plan.num_rows:
            return None
        return self.verify_graphs.bucket(plan.num_rows)

    def _verify_queries(self, verify_layout: bool) -> int:
        """``AttentionMetadata.decode_queries`` of a step: 1 + k for a uniform verify step (attention then takes
        the multi-query decode kernel, captured graphs included), else 0 (the varlen kernel for multi-row steps)."""
        return 1 + self.num_spec_tokens if verify_layout and self.num_spec_tokens else 0

    def _prompt_logprob_rows(self, plan: SchedulerOutput, batch_seqs: list[BatchSequence]
                             ) -> list[tuple[BatchSequence, np.ndarray, np.ndarray, int]]:
        """(sequence, flat rows, target prompt tokens, first target index) for the prompt positions whose
        next-token logprob is owed this step: position p gives the logprob of prompt token p + 1."""
        out = []
        qsl = self.inputs.host.qsl_np
        for i, (start, num, seq) in enumerate(zip(plan.starts, plan.num_tokens, batch_seqs)):
            if seq.prompt_logprobs_done:
                continue
            last = min(start + num, seq.num_prompt_tokens - 1)  # position P-1 has no next prompt token
            if last <= start:
                continue
            positions = np.arange(start, last)
            rows = qsl[i] + (positions - start)
            targets = np.asarray(seq.prompt_token_ids, dtype=np.int64)[positions + 1]
            out.append((seq, rows.astype(np.int64), targets, start + 1))
        return out

    def _compute_prompt_logprobs(
        self, prompt_lp: list[tuple[BatchSequence, np.ndarray, np.ndarray, int]], logits: torch.Tensor
    ) -> dict[tuple[str, int], tuple[int, Logprobs]]:
        result = {}
        offset = 0
        for seq, rows, targets, first_token in prompt_lp:
            chunk = logits[offset : offset + len(rows)]
            offset += len(rows)
            ids, lps, ranks = gather_logprobs(
                chunk.log_softmax(-1), to_device(targets, torch.int64, self.device), seq.sampling_params.prompt_logprobs
            )
            result[seq.key] = (first_token, Logprobs(ids.tolist(), lps.tolist(), ranks.tolist()))
        return result

