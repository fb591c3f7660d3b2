"""Prometheus metrics for `GET /metrics`: the engine's queue, KV-cache and prefix-cache figures,
read from `engine.stats()` at scrape time (speculative decoding's drafts and acceptance too), and the
server's own counters and latency histograms.

The queue and KV-cache gauges are also given under vLLM's names (`vllm:num_requests_running`,
`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, labelled `model_name` and `engine` as vLLM
labels them), which load-aware routers and the Gateway API Inference Extension's endpoint picker read."""

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.request import EngineStats, RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)

_ENGINE_GAUGES = (
    ("nanoserve_requests_running", "Requests in the running batch", "num_running"),
    ("nanoserve_requests_waiting", "Requests waiting to be scheduled", "num_waiting"),
    ("nanoserve_kv_blocks_used", "KV-cache blocks held by running sequences", "kv_blocks_used"),
    ("nanoserve_kv_blocks_cached", "Free KV-cache blocks that still hold prefix-cached K/V", "kv_blocks_cached"),
    ("nanoserve_kv_blocks_total", "KV-cache blocks in the cache", "kv_blocks_total"),
)
_ENGINE_COUNTERS = (
    ("nanoserve_preemptions", "Sequences preempted (KV blocks freed, recomputed later)", "num_preemptions"),
    ("nanoserve_prefix_cache_queries", "Tokens of admitted sequences looked up in the prefix cache",
     "prefix_cache_queries"),
    ("nanoserve_prefix_cache_hits", "Tokens of admitted sequences found in the prefix cache", "prefix_cache_hits"),
    ("nanoserve_spec_decode_num_drafts", "Speculative decoding: windows of draft tokens verified", "spec_decode_drafts"),
    ("nanoserve_spec_decode_draft_tokens", "Speculative decoding: draft tokens verified", "spec_decode_draft_tokens"),
    ("nanoserve_spec_decode_accepted_tokens", "Speculative decoding: draft tokens accepted",
     "spec_decode_accepted_tokens"),
)


def _kv_cache_usage(stats: EngineStats) -> float:
    """As vLLM counts it: the share of blocks held by running sequences (cached free blocks are free)."""
    return stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0


_VLLM_GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches.", lambda s: s.num_running),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lambda s: s.num_waiting),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", _kv_cache_usage),
)


class _EngineGauges(Collector):
    def __init__(self, engine_stats: Callable[[], EngineStats], model_name: str):
        self._engine_stats = engine_stats
        self._model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._engine_stats()
        for name, documentation, attribute in _ENGINE_GAUGES:
            yield GaugeMetricFamily(name, documentation, value=getattr(stats, attribute))
        for name, documentation, attribute in _ENGINE_COUNTERS:
            yield CounterMetricFamily(name, documentation, value=getattr(stats, attribute))
        per_position = CounterMetricFamily(
            "nanoserve_spec_decode_accepted_tokens_per_position",
            "Speculative decoding: draft tokens accepted, by their place in the window (0 first)", labels=["position"])
        for position, count in enumerate(stats.spec_decode_accepted_per_position):
            per_position.add_metric([str(position)], count)
        yield per_position
        for name, documentation, value in _VLLM_GAUGES:
            gauge = GaugeMetricFamily(name, documentation, labels=["model_name", "engine"])
            gauge.add_metric([self._model_name, "0"], value(stats))
            yield gauge


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], EngineStats], model_name: str):
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "nanoserve_http_requests", "HTTP requests answered, by route and status code",
            ["route", "status"], registry=self.registry,
        )
        self.requests_finished = Counter(
            "nanoserve_requests_finished", "Generated choices finished, by finish reason",
            ["finish_reason"], registry=self.registry,
        )
        self.prompt_tokens = Counter("nanoserve_prompt_tokens", "Prompt tokens admitted", registry=self.registry)
        self.generation_tokens = Counter("nanoserve_generation_tokens", "Tokens generated", registry=self.registry)
        self.time_to_first_token = Histogram(
            "nanoserve_time_to_first_token_seconds", "From request submission to its first generated token",
            buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "nanoserve_inter_token_latency_seconds", "Between consecutive generated tokens of one request",
            buckets=INTER_TOKEN_BUCKETS, registry=self.registry,
        )
        self.registry.register(_EngineGauges(engine_stats, model_name))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Feeds one engine request's outputs into the token counters and latency histograms."""

    def __init__(self, metrics: ServerMetrics, num_choices: int):
        self._metrics = metrics
        self._last = time.monotonic()
        self._seen_output = False
        self._seen_tokens = False
        self._unfinished_choices = num_choices

    def observe(self, output: RequestOutput) -> None:
        now = time.monotonic()
        new_tokens = sum(len(choice.token_ids) for choice in output.choices)
        if not self._seen_output:
            self._metrics.prompt_tokens.inc(output.prompt_tokens)
            self._seen_output = True
        if new_tokens:
            self._metrics.generation_tokens.inc(new_tokens)
            # Each step adds at most one token per choice; a late delivery can carry several steps.
            steps = max(len(choice.token_ids) for choice in output.choices)
            if self._seen_tokens:
                for _ in range(steps):
                    self._metrics.inter_token_latency.observe((now - self._last) / steps)
            else:
                self._metrics.time_to_first_token.observe(now - self._last)
                self._seen_tokens = True
            self._last = now
        for choice in output.choices:
            if choice.finish_reason is not None:
                self._metrics.requests_finished.labels(choice.finish_reason).inc()
                self._unfinished_choices -= 1

    def abandoned(self) -> None:
        """The client went away (or the request failed) before every choice finished."""
        if self._unfinished_choices > 0:
            self._metrics.requests_finished.labels("abort").inc(self._unfinished_choices)
            self._unfinished_choices = 0
