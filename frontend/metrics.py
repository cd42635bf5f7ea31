"""Prometheus metrics under vLLM's names and labels, so existing vLLM dashboards work unchanged.

Gauges mirror the core's latest ``SchedulerStats``; counters add its per-step deltas; latency histograms are
measured here in the frontend, where tokens reach the client (vLLM measures them in its frontend too).
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from core import envs
from ipc.messages import SchedulerStats

prometheus_client.disable_created_metrics()

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]


_PHASE_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                  480.0, 960.0, 1920.0, 7680.0]
# Event-loop lag and GC pauses of an API process: from "nothing" (1 ms) to "every stream stalled" (a second).
_STALL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5]
_ITERATION_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def _token_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's build_1_2_5_buckets)."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(value)
        exponent += 1


def multiprocess_dir() -> str | None:
    """Prometheus' multiprocess directory, set by the ``--api-server-count N`` launcher before the API processes
    start (prometheus_client reads it at import): every process writes its values there, any one renders the sum."""
    return envs.prometheus_multiproc_dir()


class Metrics:
    """One registry per server: ``render()`` is the body of ``GET /metrics``.

    With ``--api-server-count N`` (``api_server`` set, multiprocess mode): counters and histograms are summed over
    the API processes, the core's gauges show the latest value any process saw; the core's own counters (which
    reach every process with the scheduler stats) are counted by process 0 only, so sums stay right.
    ``pagedserve:api_server_requests_total{api_server="i"}`` shows how requests spread over the processes.
    """

    def __init__(self, model_name: str, max_model_len: int, api_server: int | None = None) -> None:
        self.registry = CollectorRegistry()
        self._multiprocess_dir = multiprocess_dir() if api_server is not None else None
        if self._multiprocess_dir is None:
            # The standard process_* and python_gc_* collectors, as vLLM's default registry exports them.
            prometheus_client.ProcessCollector(registry=self.registry)
            prometheus_client.GCCollector(registry=self.registry)
            prometheus_client.PlatformCollector(registry=self.registry)
        self.counts_core_counters = not api_server  # None (one process) or process 0
        labels = ["model_name", "engine"]
        values = (model_name, "0")
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg, multiprocess_mode="mostrecent").labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg).labels(*values)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(*values)

        self.num_requests_running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.num_preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.")
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             _ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             _E2E_BUCKETS)
        token_buckets = _token_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets)
        # Per-request phases, as vLLM's (the queue from the core, the rest where tokens reach the frontend).
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", _PHASE_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.", _PHASE_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", _PHASE_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.", _PHASE_BUCKETS)
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", _ITL_BUCKETS)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                          _ITERATION_BUCKETS)
        self.params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.",
                                  [1, 2, 5, 10, 20])
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.", token_buckets)
        self.max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.",
            token_buckets)
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                labels + ["finished_reason"], registry=reg)
        self.spec_num_drafts = counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.")
        self.spec_num_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.spec_num_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens",
                                                "Number of accepted tokens.")
        self._spec_accepted_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft position.",
            labels + ["position"], registry=reg)
        self.event_loop_lag = histogram(
            "pagedserve:event_loop_lag_seconds", "How late the API process's event loop ran a periodic timer: "
            "a stall of every stream that process serves.", _STALL_BUCKETS)
        self._gc_pause = Histogram("pagedserve:api_gc_pause_seconds",
                                   "Garbage-collector pauses of the API process, by generation.",
                                   labels + ["generation"], buckets=_STALL_BUCKETS, registry=reg)
        for generation in ("0", "1", "2"):
            self._gc_pause.labels(*values, generation)  # export zeros: "no pauses" is a result too
        self.gc_frozen_objects = gauge("pagedserve:api_gc_frozen_objects",
                                       "Objects the API process moved out of the collector's reach once started.")
        self._label_values = values
        self.api_server_requests = None
        if api_server is not None:
            self.api_server_requests = Counter(
                "pagedserve:api_server_requests", "Requests admitted by each API process (--api-server-count).",
                labels + ["api_server"], registry=reg).labels(*values, str(api_server))
        self.latest_stats: SchedulerStats | None = None
        for reason in ("stop", "length", "abort"):
            self._success.labels(*values, reason)  # export zeros so dashboards see the series from the start

    def record_gc_pause(self, generation: int, seconds: float) -> None:
        self._gc_pause.labels(*self._label_values, str(generation)).observe(seconds)

    def record_scheduler_stats(self, stats: SchedulerStats) -> None:
        self.latest_stats = stats  # ORCA load reports read it
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        if not self.counts_core_counters:
            return
        if stats.num_batched_tokens:
            self.iteration_tokens.observe(stats.num_batched_tokens)
        if stats.num_preemptions:
            self.num_preemptions.inc(stats.num_preemptions)
        if stats.prefix_cache_queries:
            self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        if stats.prefix_cache_hits:
            self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        if stats.spec_num_drafts:
            self.spec_num_drafts.inc(stats.spec_num_drafts)
            self.spec_num_draft_tokens.inc(stats.spec_num_draft_tokens)
            self.spec_num_accepted_tokens.inc(stats.spec_num_accepted_tokens)
            for position, accepted in enumerate(stats.spec_num_accepted_tokens_per_pos):
                self._spec_accepted_per_pos.labels(*self._label_values, str(position)).inc(accepted)

    def record_request_phases(self, queue_s: float, prefill_s: float | None, decode_s: float | None,
                              inference_s: float, n: int, max_tokens: int | None, max_generation_tokens: int) -> None:
        """A finished request's phases and parameters (vLLM's per-request histograms)."""
        self.queue_time.observe(queue_s)
        self.inference_time.observe(max(0.0, inference_s))
        if prefill_s is not None:
            self.prefill_time.observe(max(0.0, prefill_s))
        if decode_s is not None:
            self.decode_time.observe(decode_s)
            if max_generation_tokens > 1:
                self.time_per_output_token.observe(decode_s / (max_generation_tokens - 1))
        self.params_n.observe(n)
        if max_tokens is not None:
            self.params_max_tokens.observe(max_tokens)
        self.max_num_generation_tokens.observe(max_generation_tokens)

    def record_cache_config(self, block_size: int, num_gpu_blocks: int, enable_prefix_caching: bool) -> None:
        """vllm:cache_config_info: the KV cache's settings as labels of a constant-1 gauge."""
        info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                     ["block_size", "num_gpu_blocks", "enable_prefix_caching"], registry=self.registry,
                     multiprocess_mode="mostrecent")
        info.labels(str(block_size), str(num_gpu_blocks), str(enable_prefix_caching)).set(1)

    def record_first_token(self, ttft_s: float, num_prompt_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        self.prompt_tokens.inc(num_prompt_tokens)

    def record_tokens(self, num_tokens: int, inter_token_s: float | None) -> None:
        self.generation_tokens.inc(num_tokens)
        if inter_token_s is not None:
            self.itl.observe(inter_token_s)

    def record_finished(self, finished_reason: str, e2e_s: float, num_prompt_tokens: int,
                        num_generation_tokens: int) -> None:
        self._success.labels(*self._label_values, finished_reason).inc()
        self.e2e.observe(e2e_s)
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_generation_tokens)

    def render(self) -> bytes:
        if self._multiprocess_dir is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self._multiprocess_dir)
            return prometheus_client.generate_latest(registry)
        return prometheus_client.generate_latest(self.registry)
