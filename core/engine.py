"""EngineCore: requests in, one schedule -> execute -> sample -> update per step, outputs out.

Used in-process by the offline ``LLM`` and inside the engine-core process (core/engine_process.py) by the server.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import msgspec

from core.distributed.mp_executor import make_executor
from core.kv_cache import KVCacheManager, freeable_sliding_window
from core.model_runner import ForwardedStep, ModelRunner, RunnerOutput, StepHandle
from core.sequence import Sequence, SequenceStatus
from core.scheduler import Scheduler, SchedulerOutput
from core.scheduler_output_builder import SchedulerOutputBuilder
from core.spec_decode.draft_model import DraftModelProposer
from core.spec_decode.metrics import SpecDecodeMetrics
from core.spec_decode.proposer import make_proposer
from core.step_recovery import FaultInjector, StepFailureTracker
from core.structured_output.manager import StructuredOutputManager
from core.structured_output.tokenizer_info import load_tokenizer_info
from ipc.scheduler_output import SchedulerOutput as StepPlan
from ipc.messages import (
    EngineConfig,
    EngineOutput,
    EngineOutputs,
    EngineRequest,
    FinishReason,
    Logprobs,
    ReadyMessage,
    RequestError,
    SamplingParamError,
    SamplingParams,
)

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        if config.pipeline_parallel_size == 1 and (config.pipeline_micro_batches or 1) > 1:
            raise ValueError(f"pipeline_micro_batches={config.pipeline_micro_batches} needs pipeline parallelism "
                             "(pipeline_parallel_size > 1): one stage runs one step at a time.")
        # tensor/pipeline parallelism: workers for ranks 1..N-1 (this process is rank 0); None: one device, here.
        self.executor = make_executor(config)
        try:
            self._start(config)
        except BaseException:
            if self.executor is not None:
                self.executor.shutdown()
            raise

    def _start(self, config: EngineConfig) -> None:
        self.config = config
        start = time.perf_counter()
        self.runner = ModelRunner(config, self.executor.group if self.executor is not None else None)
        self.max_model_len = self.runner.max_model_len
        num_blocks = self.runner.determine_num_blocks()
        max_blocks_per_seq = -(-self.max_model_len // config.block_size)
        if num_blocks - 1 < max_blocks_per_seq:
            raise ValueError(
                f"The KV cache holds {(num_blocks - 1) * config.block_size} tokens, fewer than max_model_len="
                f"{self.max_model_len}: lower max_model_len or give the cache more memory."
            )
        self.runner.initialize_kv_cache(num_blocks)
        draft_model = config.speculative_config is not None and config.speculative_config.method == "draft_model"
        window = freeable_sliding_window(self.runner.model_config.sliding_windows, shares_block_tables=draft_model)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, sliding_window=window)
        self.async_scheduling = self.runner.resolved.async_scheduling
        self.overlap_outputs = self.runner.resolved.overlap_outputs  # speculative steps: see _step_overlapped
        self.run_ahead = self.runner.resolved.run_ahead  # draftless speculative steps: see _step_run_ahead
        # Pipeline parallelism: up to this many micro-batches in flight (vLLM's batch queue); 0: one step at a time,
        # or two with async scheduling. The batch queue is how pipelined steps overlap the host's work with the
        # devices', so async scheduling's placeholder tokens are not used then.
        self.micro_batches = 0
        if self.runner.pipelined:
            self.micro_batches = config.pipeline_micro_batches or config.pipeline_parallel_size
            if self.async_scheduling:
                logger.info("Pipeline parallelism: %d micro-batches in flight; steps overlap through them (the "
                            "scheduler skips a request until its previous step's token is in), so async "
                            "scheduling's placeholder tokens are off.", self.micro_batches)
                self.async_scheduling = False
        self.scheduler = Scheduler(
            self.kv,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=self.runner.max_num_batched_tokens,
            async_scheduling=self.async_scheduling,
        )
        self.scheduler.micro_batches = self.micro_batches
        self.scheduler.placeholders_for_draftless = self.run_ahead
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None
        # The step in flight's handle and result once they were read early, its constrained tokens already handed
        # to the grammar job (``_start_grammar_job_early``); ``_finish_inflight`` applies that result.
        self._early_result: tuple[StepHandle, RunnerOutput] | None = None
        # Where the last grammar job was started (``GRAMMAR_LOOKS`` or "before sample"): what the step-phase
        # benchmark reports, to tell how much of a step the job overlapped.
        self.grammar_job_started_at: str | None = None
        # pipeline parallelism: micro-batches started (oldest first), each sampled when it comes back
        self._batch_queue: deque[tuple[SchedulerOutput, ForwardedStep | StepHandle]] = deque()
        # the scheduler's steps as diffs for the runner(s)
        self.plan_builder = SchedulerOutputBuilder(speculative=config.speculative_config is not None)
        spec = config.speculative_config
        self.proposer = make_proposer(spec, self.runner) if spec is not None else None
        self.spec_metrics = SpecDecodeMetrics(spec.num_speculative_tokens) if spec is not None else None
        self.eos_token_ids = frozenset(self.runner.model_config.eos_token_ids)
        self.structured = StructuredOutputManager(
            lambda: load_tokenizer_info(self.runner.source, config.tokenizer, self.runner.vocab_size,
                                        sorted(self.eos_token_ids)),
            self.runner.vocab_size, config.max_num_seqs)
        self._failures = StepFailureTracker()  # a failed step fails its culprit request, not the engine
        self._faults = FaultInjector()  # tests only (PAGEDSERVE_TEST_STEP_FAULT_TOKENS)
        self._involved: list[SchedulerOutput] = []  # the steps being run, for blaming a failure (ids read lazily)
        # constrained requests wait until their grammar compiles; after a failed step, suspects run one at a time
        self.scheduler.holds = self._holds
        self.runner.structured_output = self.structured
        self._pending: list[EngineOutput] = []
        self._children: dict[str, list[Sequence]] = {}  # request id -> its n sequences
        self._prompt_logprobs: dict[tuple[str, int], Logprobs] = {}
        self.total_prompt_tokens = 0
        self.total_generation_tokens = 0
        self.startup_seconds = time.perf_counter() - start
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens; %.1fx concurrency at max_model_len=%d). Ready in %.1f s.",
            num_blocks, config.block_size, (num_blocks - 1) * config.block_size,
            (num_blocks - 1) / max_blocks_per_seq, self.max_model_len, self.startup_seconds,
        )

    def ready_message(self) -> ReadyMessage:
        return ReadyMessage(
            model=self.runner.source.name,
            max_model_len=self.max_model_len,
            num_kv_blocks=self.kv.pool.num_blocks,
            block_size=self.config.block_size,
            vocab_size=self.runner.vocab_size,
            eos_token_ids=sorted(self.eos_token_ids),
            device=str(self.runner.device),
        )

    # ------------------------------------------------------------------------------------------------ intake
    def add_request(self, request: EngineRequest) -> None:
        prompt = request.prompt_token_ids
        if request.request_id in self._children:
            raise ValueError(f"Request id '{request.request_id}' is already in use.")
        if not prompt:
            raise ValueError("The prompt is empty.")
        if len(prompt) > self.max_model_len:
            raise ValueError(f"The prompt has {len(prompt)} tokens, more than max_model_len={self.max_model_len}.")
        vocab = self.runner.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"Prompt token ids must be in [0, {vocab}).")
        params = request.sampling_params
        if params.logprobs == -1 or params.prompt_logprobs == -1:  # vLLM's "the whole vocabulary"
            params = msgspec.structs.replace(
                params, logprobs=vocab if params.logprobs == -1 else params.logprobs,
                prompt_logprobs=vocab if params.prompt_logprobs == -1 else params.prompt_logprobs)
        _check_params_against_vocab(params, vocab)
        if self.proposer is not None and params.logprob_token_ids:
            # The verifier reports each emitted token's top-N, not a requested id set: refuse rather than answer
            # something else.
            raise SamplingParamError("logprob_token_ids", "logprob_token_ids is not supported with speculative "
                                     "decoding yet (the server runs with --speculative-config).")
        sequences: list[Sequence] = []
        for index in range(params.n):
            seq_params = params
            if params.seed is not None and index > 0:
                seq_params = _with_seed(params, params.seed + index)
            sequences.append(Sequence(
                request.request_id, prompt, seq_params, index=index, eos_token_ids=self.eos_token_ids,
                max_model_len=self.max_model_len, cache_salt=request.cache_salt,
                fork_source=sequences[0] if index > 0 else None,
            ))
        self._children[request.request_id] = sequences
        added: list[Sequence] = []
        try:
            for seq in sequences:
                if params.structured_outputs is not None:
                    self.structured.add(seq)
                self.scheduler.add_sequence(seq)
                added.append(seq)
        except Exception:  # leave no half-added request behind: its id must stay reusable
            for seq in added:
                self.scheduler.finish(seq, FinishReason.ABORT)
            for seq in sequences:
                self.structured.remove(seq.key)
            del self._children[request.request_id]
            raise
        self.total_prompt_tokens += len(prompt)

    def abort_requests(self, request_ids: list[str], indices: list[int] | None = None) -> None:
        for i, request_id in enumerate(request_ids):
            sequences = self._children.get(request_id, [])
            for seq in sequences:
                if indices is not None and seq.index != indices[i]:
                    continue
                if seq.status is SequenceStatus.FINISHED:
                    continue
                self.scheduler.finish(seq, FinishReason.ABORT)
                self._pending.append(EngineOutput(request_id, [], index=seq.index, finish_reason=FinishReason.ABORT))
            self._forget_if_done(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_sequences() or bool(self._pending) or self._inflight is not None or \
            bool(self._batch_queue)

    def _holds(self, seq: Sequence) -> bool:
        return self.structured.holds(seq) or self._failures.holds(seq.request_id)

    # ------------------------------------------------------------------------------------------------ step
    def step(self) -> EngineOutputs:
        """Schedule and launch a step, then process the previous one's results (async scheduling: the device
        runs a step while the host prepares the next), or this one's (synchronous).

        A step that raises fails only the request it can be blamed on (core/step_recovery.py); what the step
        produced before it raised is still returned. ``StepFailedFatally`` when the engine must not go on."""
        outputs, self._pending = self._pending, []
        errors: list[RequestError] = []
        self._involved = []
        try:
            sampled = self._step_pipelined(outputs, errors) if self.micro_batches else self._step(outputs, errors)
        except Exception as exc:
            errors.extend(self._recover_from_step_failure(exc, outputs))
        else:
            if sampled is not None:  # the ids are only read while a failure is being isolated
                self._failures.on_success((s.seq.request_id for done in sampled for s in done.scheduled if s.samples),
                                          self._children)
        stats = self.scheduler.stats()
        if self.spec_metrics is not None:
            self.spec_metrics.fill(stats)
        return EngineOutputs(outputs, stats, timestamp=time.time(), errors=errors)

    def _schedule(self, errors: list[RequestError]) -> SchedulerOutput:
        """The next step's schedule. The sequences it freed are forgotten by the plan builder and the proposer;
        requests whose grammar failed are failed (appended to ``errors``)."""
        sched = self.scheduler.schedule()
        self.plan_builder.forget(sched.freed_keys)
        if self.proposer is not None:
            self.proposer.remove(sched.freed_keys)
        errors.extend(self._fail_grammars())
        return sched

    def _plan(self, sched: SchedulerOutput) -> StepPlan:
        """The runner's message for a schedule with work (after the test-only fault injector's check), also sent
        to the worker processes when there are any."""
        if self._faults.enabled:
            self._faults.check((s.seq.request_id, s.seq.prompt_token_ids) for s in sched.scheduled)
        plan = self.plan_builder.build(sched, self.kv.seq_blocks)
        if self.executor is not None:
            self.executor.send(plan)
        return plan

    def _step(self, outputs: list[EngineOutput], errors: list[RequestError]) -> list[SchedulerOutput] | None:
        """One step's work, appending to ``outputs`` as results come; the steps whose sampled tokens were processed
        (with async scheduling, the previous launch), or None when no work ran."""
        if self.overlap_outputs:
            return self._step_overlapped(outputs, errors)
        # The first look, before scheduling: the grammar job then also overlaps the schedule. It fills the masks of
        # the previous step's live sampling sequences (this step's are not known yet); ``bitmask`` picks this
        # step's rows out of them and fills only the rows that were not there (new or resumed sequences).
        early = self._inflight is not None and self._start_grammar_job_early(None, GRAMMAR_LOOKS[0])
        sched = self._schedule(errors)
        if self._inflight is not None:
            self._involved.append(self._inflight[0])
        self._involved.append(sched)
        ran: list[SchedulerOutput] | None = None
        if sched.is_empty and self._inflight is None and not outputs:
            self.structured.wait_for_compile(0.005)  # only grammars compiling: do not spin against the compiler
        if self._inflight is not None and (sched.is_empty or self._needs_sampled_tokens(sched)):
            ran = [self._finish_inflight(outputs)]
            sched.scheduled = [s for s in sched.scheduled if not s.seq.is_finished]
        if sched.scheduled:
            prev = self._inflight[1] if self._inflight is not None else None
            early = early or (prev is not None and self._start_grammar_job_early(sched, GRAMMAR_LOOKS[1]))
            plan = self._plan(sched)
            if prev is not None and not early:
                early = self._start_grammar_job_early(sched, GRAMMAR_LOOKS[2])  # the plan's time later
            ran = ran or []

            def last_early_look() -> None:
                """Inside ``launch`` once the inputs are staged, before the forward is queued: the last look."""
                self._start_grammar_job_early(sched, GRAMMAR_LOOKS[3])

            def finish_previous(sampling_seqs: list | None = None) -> None:
                """Runs inside ``launch`` once this step's forward is queued, before its sampling, when some
                sequence has a grammar: the previous step's tokens go to the grammar threads, which fill this
                step's masks (``sampling_seqs``) while the previous step's outputs are built."""
                if self._inflight is not None:
                    ran.append(self._finish_inflight(outputs, sampling_seqs))

            handle = self.runner.launch(plan, prev, finish_previous,
                                        last_early_look if prev is not None and not early else None)
            finish_previous()  # launch did not call it
            self._inflight = (sched, handle)
            if not self.async_scheduling:
                ran.append(self._finish_inflight(outputs))
        return ran

    def _start_grammar_job_early(self, sched: SchedulerOutput | None, look: str) -> bool:
        """When some sequence has a grammar and the step in flight is done on the device (a non-blocking check: a
        host-bound step always is by now), read its tokens and start the grammar job (accept them, fill the masks of
        ``sched``'s sampling sequences, or, before scheduling (``sched`` None), of the previous step's live ones)
        now, so that it overlaps this step's schedule (when looked before it), plan, input staging and forward
        launch as well as the previous step's bookkeeping, instead of only the bookkeeping (``launch``'s
        ``before_sample``, the fallback when the device is still busy). True when it started."""
        if not self.structured.active or self._early_result is not None:
            return False
        prev_sched, handle = self._inflight
        if not handle.ready():
            return False
        result = handle.result()
        self._early_result = (handle, result)
        seqs, tokens = _constrained_tokens(prev_sched, result)
        self.structured.prepare(seqs, tokens, seqs if sched is None else [s.seq for s in sched.scheduled if s.samples])
        self.grammar_job_started_at = look
        return True

    def _step_overlapped(self, outputs: list[EngineOutput], errors: list[RequestError]
                         ) -> list[SchedulerOutput] | None:
        """A speculative step where async scheduling would be on: the step in flight is finished first (its accepted
        tokens make the next drafts), then the next step is scheduled and launched, and ``step`` returns with it
        running. The engine does exactly what it does without async scheduling, in the same order; only the return
        to the caller moves to after the launch, so the caller's handling of these outputs (detokenising, sending
        them to the API process) runs while the device verifies the next drafts instead of while it idles."""
        if self.run_ahead and self._inflight is not None and self._can_run_ahead(*self._inflight):
            return self._step_run_ahead(outputs, errors)
        ran: list[SchedulerOutput] | None = None
        if self._inflight is not None:
            self._involved.append(self._inflight[0])
            ran = [self._finish_inflight(outputs)]
        sched = self._schedule(errors)
        self._involved.append(sched)
        if sched.is_empty:
            if ran is None and not outputs:
                self.structured.wait_for_compile(0.005)  # only grammars compiling: do not spin against the compiler
            return ran
        self._inflight = (sched, self.runner.launch(self._plan(sched)))
        return ran or []

    def _can_run_ahead(self, sched: SchedulerOutput, handle: StepHandle) -> bool:
        """Whether the next step may be scheduled before the step in flight is read: it verifies no drafts (so each
        of its sequences gains exactly one token, a placeholder), the next step can take its tokens on the device,
        no grammar waits for them, and none of its sequences had a proposal at the last read (a sequence that had
        one is likely to have drafts again: the step after this one is worth waiting for, to verify them)."""
        if handle.sample_rows is None or self.structured.active:
            return False
        for scheduled in sched.scheduled:
            if scheduled.spec_token_ids or (scheduled.samples and scheduled.seq.spec_token_ids
                                            and not scheduled.seq.is_finished):
                return False
        return True

    def _step_run_ahead(self, outputs: list[EngineOutput], errors: list[RequestError]
                        ) -> list[SchedulerOutput] | None:
        """N-gram speculation after a step without drafts (no n-gram match): as with async scheduling, the next step
        is scheduled (each such sequence's in-flight token a placeholder, so it gets no drafts) and launched, taking
        those tokens on the device, before the step in flight is read and applied; its host work then overlaps the
        device instead of following it. The reading proposes again: a sequence with a proposal makes the engine
        read the next step before scheduling (``_can_run_ahead``), so its drafts are verified one step later than
        in the serial order. Greedy outputs are the same either way (drafts never change what is emitted)."""
        prev_sched, prev = self._inflight
        self._involved.append(prev_sched)
        sched = self._schedule(errors)
        self._involved.append(sched)
        ran: list[SchedulerOutput] = []
        if sched.is_empty or self._needs_sampled_tokens(sched):
            ran.append(self._finish_inflight(outputs))
            prev = None
            sched.scheduled = [s for s in sched.scheduled if not s.seq.is_finished]
            if not sched.scheduled:
                return ran
        handle = self.runner.launch(self._plan(sched), prev)
        if prev is not None:
            ran.append(self._finish_inflight(outputs))
        self._inflight = (sched, handle)
        return ran

    def _step_pipelined(self, outputs: list[EngineOutput], errors: list[RequestError]) -> list[SchedulerOutput] | None:
        """One step with pipeline parallelism, as vLLM's batch queue: sample the oldest micro-batch when
        ``micro_batches`` are in flight, then schedule and start a new one from the sequences not in flight (the
        first stage runs it while the later stages work on the older ones). With nothing new to start, wait for
        the oldest. Returns the micro-batches whose results were applied."""
        queue = self._batch_queue
        ran: list[SchedulerOutput] = []
        self._involved.extend(step for step, _ in queue)
        if len(queue) >= self.micro_batches:
            ran.append(self._finish_oldest_batch(outputs))
        sched = self._schedule(errors)
        self._involved.append(sched)
        if sched.is_empty and not queue and not outputs:
            self.structured.wait_for_compile(0.005)  # only grammars compiling: do not spin against the compiler
        if sched.scheduled:
            plan = self._plan(sched)
            for scheduled in sched.scheduled:
                scheduled.seq.in_flight = True
            queue.append((sched, self.runner.start_step(plan)))
        elif queue:
            ran.append(self._finish_oldest_batch(outputs))
        return ran or None

    def _finish_oldest_batch(self, outputs: list[EngineOutput]) -> SchedulerOutput:
        """Sample the oldest micro-batch in flight (its final hidden states come back from the last stage) and
        apply its results; its sequences can be scheduled again."""
        sched, step = self._batch_queue.popleft()
        self.executor.finish_oldest_step()
        result = self.runner.finish_step(step).result()
        for scheduled in sched.scheduled:
            scheduled.seq.in_flight = False
        if self.structured.active:
            self.structured.accept(*_constrained_tokens(sched, result))
        self._update(sched, result, outputs)
        return sched

    def _drain_batch_queue(self) -> None:
        """Drop the micro-batches in flight (after a failed step, at shutdown): every rank still finishes each one
        it started, so the ranks' sends, receives and gathers stay paired; their tokens are never emitted."""
        while self._batch_queue:
            _, step = self._batch_queue.popleft()
            try:
                self.executor.finish_oldest_step()
                self.runner.finish_step(step)
            except Exception:
                logger.exception("finishing a dropped micro-batch failed")

    def _recover_from_step_failure(self, exc: Exception, outputs: list[EngineOutput]) -> list[RequestError]:
        """Drop the failed step (and any step in flight: their sampled tokens were never emitted), put every running
        sequence back to waiting to be recomputed, and fail the culprit alone if the failure names one; otherwise
        the involved requests are run one at a time until it does. Raises ``StepFailedFatally`` to die.

        A step in flight whose tokens already went to the grammar job (read early) is applied instead (appended to
        ``outputs``): it completed, and its constrained sequences' matchers have accepted those tokens."""
        involved = [r for r in dict.fromkeys(s.seq.request_id for step in self._involved for s in step.scheduled)
                    if r in self._children]
        if self._inflight is not None and self._early_result is not None \
                and self._early_result[0] is self._inflight[1]:
            try:
                self._finish_inflight(outputs)
            except Exception:
                logger.exception("applying the step in flight after a failed step failed")
        self._inflight = None
        self._early_result = None
        self._drain_batch_queue()
        culprit = self._failures.attribute(exc, involved)
        for sequences in self._children.values():
            for seq in sequences:
                seq.num_placeholders = 0  # the steps that were sampling them are gone
                seq.in_flight = False
        self.scheduler.preempt_all()
        # The failed step's blocks were registered in the prefix cache when it was scheduled, but their KV was never
        # (or only partly) computed: a recompute must not hit them. Every block is free now.
        if not self.kv.reset_prefix_cache():
            logger.warning("the prefix cache could not be reset after a failed step (blocks still in use)")
        if culprit is None:
            logger.warning("an engine step with %d requests failed (%s: %s); running them one at a time to find "
                           "the culprit", len(involved), type(exc).__name__, exc)
            return []
        logger.error("request %s failed inside an engine step; failing it alone", culprit, exc_info=exc)
        for seq in self._children.get(culprit, []):
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
        self._forget_if_done(culprit)
        return [RequestError(culprit, f"The engine failed while running this request: {type(exc).__name__}: {exc}",
                             internal=True)]

    def _finish_inflight(self, outputs: list[EngineOutput], next_sampling_seqs: list | None = None) -> SchedulerOutput:
        """Wait for the step in flight and apply its results; returns that step. Its
        constrained sequences' tokens advance their matchers first: on the grammar threads, together with the masks
        of ``next_sampling_seqs`` (the step being launched), or now."""
        sched, handle = self._inflight
        self._inflight = None
        early, self._early_result = self._early_result, None
        if early is not None and early[0] is handle:
            result = early[1]  # read by ``_start_grammar_job_early``: its tokens are with the grammar job already
        else:
            result = handle.result()
            if self.structured.active:
                seqs, tokens = _constrained_tokens(sched, result)
                if next_sampling_seqs is not None:
                    self.structured.prepare(seqs, tokens, next_sampling_seqs)
                    self.grammar_job_started_at = "before sample"
                else:
                    self.structured.accept(seqs, tokens)
        self._update(sched, result, outputs)
        return sched

    @staticmethod
    def _needs_sampled_tokens(sched: SchedulerOutput) -> bool:
        """Penalties and multi-token bad words read the output token ids on the host while the step's inputs are
        built: wait for the step in flight before such a step. (A grammar's mask also needs the previous token, but
        only at sampling time: ``launch`` finishes the previous step after queueing the forward.)"""
        return any(s.samples and s.seq.sampling_params.reads_output_tokens for s in sched.scheduled)

    def _fail_grammars(self) -> list[RequestError]:
        """Requests whose grammar did not compile: abort them and tell the frontend why (it answers 400)."""
        errors = []
        for seq, message in self.structured.take_failures():
            if seq.request_id in self._children:
                self.abort_requests([seq.request_id])
                errors.append(RequestError(seq.request_id, message, "structured_outputs"))
        return errors

    def _update(self, sched: SchedulerOutput, result: RunnerOutput, outputs: list[EngineOutput]) -> None:
        """Apply a step's results, appending each sequence's output to ``outputs`` as it is made (a failure part way
        keeps what was already appended: those tokens are in the sequences)."""
        for key, (first_token, rows) in result.prompt_logprobs.items():
            self._add_prompt_logprobs(key, first_token, rows)
        sample_idx = 0
        proposing: list[Sequence] = []
        for scheduled in sched.scheduled:
            if not scheduled.samples:
                continue
            seq = scheduled.seq
            if result.emitted_token_ids is not None:
                tokens = result.emitted_token_ids[sample_idx]
            else:
                tokens = [result.sampled_token_ids[sample_idx]]
            logprobs = result.logprobs[sample_idx]
            sample_idx += 1
            if seq.is_finished:  # finished or aborted while this step was in flight
                continue
            num_accepted = len(tokens) - 1  # drafts accepted by verification (before any truncation)
            finished, tokens = self._append_tokens(seq, tokens)
            if scheduled.spec_token_ids:
                logprobs = _first_positions(logprobs, len(tokens))
                self.spec_metrics.observe(len(scheduled.spec_token_ids), num_accepted)
                if not finished:
                    self.scheduler.rollback_rejected(seq, len(scheduled.spec_token_ids) - num_accepted)
                    num_blocks = len(self.kv.blocks(seq))
                    self.plan_builder.trim_blocks(seq.key, num_blocks)
                    if self.runner.draft is not None:
                        self.runner.draft.input_batch.truncate(seq.key, num_blocks)
            self.total_generation_tokens += len(tokens)
            out = EngineOutput(seq.request_id, tokens, index=seq.index, new_logprobs=logprobs)
            outputs.append(out)  # now: its tokens are in the sequence whatever happens below
            if not seq.first_output_sent:
                seq.first_output_sent = True
                out.num_cached_tokens = seq.num_cached_tokens
                out.queue_time_s = seq.queue_time_s
                if seq.index == 0 and seq.sampling_params.prompt_logprobs is not None:
                    out.prompt_logprobs = self._prompt_logprobs.pop(seq.key, None)
                    seq.prompt_logprobs_done = True
            if finished:
                out.finish_reason = seq.finish_reason
                out.stop_reason = seq.stop_reason
                self.scheduler.finish(seq, seq.finish_reason)
                self._forget_if_done(seq.request_id)
            elif self.proposer is not None and seq.sampling_params.structured_outputs is None:
                # Structured outputs get no drafts: the grammar's mask at a draft position would need the matcher
                # advanced through the drafts before it, so constrained rows always verify as plain decode rows.
                proposing.append(seq)
        if proposing:
            for seq, drafts in zip(proposing, self._propose(proposing)):
                seq.spec_token_ids = drafts

    def _propose(self, seqs: list[Sequence]) -> list[list[int]]:
        """Drafts for the sequences that just sampled. A draft model writes KV at the drafts' positions, so their
        slots (the 1 + k the verify step needs) are reserved first: fewer drafts when blocks are short, never a
        preemption, and none past max_tokens / max_model_len."""
        if not isinstance(self.proposer, DraftModelProposer):
            return self.proposer.propose(seqs)
        k = self.config.speculative_config.num_speculative_tokens
        num_drafts = []
        for seq in seqs:
            n = min(k, seq.max_total_tokens - seq.num_tokens - 1)
            while n > 0 and not self.kv.reserve(seq, 1 + n):
                n -= 1
            num_drafts.append(n)
        return self.proposer.propose(seqs, num_drafts, self.kv.seq_blocks)

    @staticmethod
    def _append_tokens(seq: Sequence, tokens: list[int]) -> tuple[bool, list[int]]:
        """Append one at a time, stopping at the first that finishes the sequence (a stop token or max_tokens inside
        an accepted run): returns (finished, the tokens appended)."""
        for i, token in enumerate(tokens):
            if seq.append_token(token):
                return True, tokens[: i + 1]
        return False, tokens

    def _add_prompt_logprobs(self, key: tuple[str, int], first_token: int, rows: Logprobs) -> None:
        """Append rows for prompt tokens not seen yet (a recompute after preemption repeats some)."""
        have = self._prompt_logprobs.setdefault(key, Logprobs([], [], []))
        skip = len(have.ranks) + 1 - first_token  # rows start at prompt token 1
        if skip >= len(rows.ranks):
            return
        have.token_ids.extend(rows.token_ids[skip:])
        have.logprobs.extend(rows.logprobs[skip:])
        have.ranks.extend(rows.ranks[skip:])

    def _forget_if_done(self, request_id: str) -> None:
        sequences = self._children.get(request_id)
        if sequences and all(s.status is SequenceStatus.FINISHED for s in sequences):
            del self._children[request_id]
            for seq in sequences:
                self.structured.remove(seq.key)
            self._prompt_logprobs.pop((request_id, 0), None)

    # ------------------------------------------------------------------------------------------------ utilities
    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    def get_stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.kv.usage,
            "num_free_blocks": self.kv.num_free_blocks,
            "num_kv_blocks": self.kv.pool.num_blocks,
            "total_preemptions": self.scheduler.total_preemptions,
            "prefix_cache_queries": self.scheduler.total_prefix_queries,
            "prefix_cache_hits": self.scheduler.total_prefix_hits,
            "total_prompt_tokens": self.total_prompt_tokens,
            "total_generation_tokens": self.total_generation_tokens,
            **(self.spec_metrics.totals() if self.spec_metrics is not None else {}),
        }

    def shutdown(self) -> None:
        try:
            if self._inflight is not None:
                self._inflight[1].result()
                self._inflight = None
            self._drain_batch_queue()
            self.structured.shutdown()
            self.runner.kv_caches = []
            if self.runner.draft is not None:
                self.runner.draft.kv_caches = []
        finally:
            if self.executor is not None:
                self.executor.shutdown()


# The engine's looks at the step in flight, in step order: the grammar job starts at the first that finds it done.
GRAMMAR_LOOKS = ("before schedule", "after schedule", "after plan", "before forward")


def _constrained_tokens(sched: SchedulerOutput, result: RunnerOutput) -> tuple[list[Sequence], list[int]]:
    """The sequences that sampled in ``sched`` and are still live, with their sampled token (one: constrained
    sequences get no drafts, see ``EngineCore._update``), for the grammar, which skips those without a matcher
    (unconstrained). Finished ones are left out (an aborted request's id may be reused at once: its token must not
    reach the new request's matcher). Per row, only the two list comprehensions."""
    seqs = [scheduled.seq for scheduled in sched.scheduled if scheduled.samples]
    tokens = result.sampled_token_ids if result.emitted_token_ids is None else \
        [emitted[0] for emitted in result.emitted_token_ids]
    if SequenceStatus.FINISHED in [seq.status for seq in seqs]:
        live = [i for i, seq in enumerate(seqs) if seq.status is not SequenceStatus.FINISHED]
        return [seqs[i] for i in live], [tokens[i] for i in live]
    return seqs, tokens


def _first_positions(logprobs: Logprobs | None, n: int) -> Logprobs | None:
    if logprobs is None or len(logprobs.ranks) <= n:
        return logprobs
    return Logprobs(logprobs.token_ids[:n], logprobs.logprobs[:n], logprobs.ranks[:n])


class RequestParamError(ValueError):
    """A request the core refuses; ``param`` names the offending field for the frontend's HTTP 400."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check_params_against_vocab(params: SamplingParams, vocab: int) -> None:
    """Token ids the sampler indexes with (stop ids banned before min_tokens, logit_bias) must be in the
    vocabulary: one bad id would otherwise fail the whole batch's step."""
    bad_word_ids = [t for word in params.bad_words_token_ids or () for t in word]
    for name, ids in (("stop_token_ids", params.stop_token_ids or ()), ("logit_bias", params.logit_bias or ()),
                      ("logprob_token_ids", params.logprob_token_ids or ()),
                      ("allowed_token_ids", params.allowed_token_ids or ()), ("bad_words", bad_word_ids)):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestParamError(name, f"{name} must be token ids in [0, {vocab}), got {bad[0]}.")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > vocab:
            raise RequestParamError(name, f"{name} must be at most the vocabulary size {vocab}, got {value}.")


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return msgspec.structs.replace(params, seed=seed)
