"""Serving figures: kept as running totals for `/v1/stats`, and exported to Prometheus through Ray Serve's
metrics API (scraped from Ray's metrics endpoint) when the engine runs inside a Serve replica."""
from __future__ import annotations

import time

LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
COUNT_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


class EngineMetrics:
    """What one engine did. `export=True` (inside a Serve replica) also records into ray.serve.metrics."""

    def __init__(self, export: bool = False):
        self.started = time.monotonic()
        self.steps = 0
        self.busy_s = 0.0
        self.generated_tokens = 0
        self.prefill_tokens = 0
        self.max_batch_rows = 0
        self.max_states_in_step = 0
        self.first_tokens = 0
        self.first_token_s = 0.0
        self.token_gaps = 0
        self.token_gap_s = 0.0
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_bytes = 0
        self.prometheus = ServeMetrics() if export else None

    def step(self, rows: int, states: int, decoded: int, prefilled: int, seconds: float) -> None:
        self.steps += 1
        self.busy_s += seconds
        self.generated_tokens += decoded
        self.prefill_tokens += prefilled
        self.max_batch_rows = max(self.max_batch_rows, rows)
        self.max_states_in_step = max(self.max_states_in_step, states)
        if self.prometheus:
            self.prometheus.step(rows, decoded, prefilled)

    def first_token(self, seconds: float) -> None:
        self.first_tokens += 1
        self.first_token_s += seconds
        if self.prometheus:
            self.prometheus.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.token_gaps += 1
        self.token_gap_s += seconds
        if self.prometheus:
            self.prometheus.itl.observe(seconds)

    def cache_lookup(self, hit: bool, cache_bytes: int) -> None:
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1
        self.cache_bytes = cache_bytes
        if self.prometheus:
            (self.prometheus.hits if hit else self.prometheus.misses).inc()

    def snapshot(self) -> dict:
        mean = lambda total, n: round(total / n, 6) if n else None
        return {"steps": self.steps, "generated_tokens": self.generated_tokens,
                "prefill_tokens": self.prefill_tokens,
                "tokens_per_s": mean(self.generated_tokens, self.busy_s),
                "busy_s": round(self.busy_s, 3), "uptime_s": round(time.monotonic() - self.started, 3),
                "mean_time_to_first_token_s": mean(self.first_token_s, self.first_tokens),
                "mean_inter_token_latency_s": mean(self.token_gap_s, self.token_gaps),
                "max_batch_rows": self.max_batch_rows, "max_states_in_step": self.max_states_in_step,
                "prefix_cache": {"hits": self.cache_hits, "misses": self.cache_misses, "bytes": self.cache_bytes}}


class ServeMetrics:
    """The Prometheus side; `ray.serve.metrics` adds the deployment and replica tags itself."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram
        self.ttft = Histogram("rwkvray_time_to_first_token_s", "Seconds from request to its first token",
                              boundaries=LATENCY_BOUNDARIES_S)
        self.itl = Histogram("rwkvray_inter_token_latency_s", "Seconds between a row's tokens",
                             boundaries=LATENCY_BOUNDARIES_S)
        self.tokens = Counter("rwkvray_generated_tokens", "Tokens generated (rate() gives tokens/s)")
        self.batch = Histogram("rwkvray_batch_rows", "Rows in one engine step", boundaries=COUNT_BOUNDARIES)
        self.prefill = Histogram("rwkvray_prefill_tokens_per_step", "Prompt tokens prefilled in one engine step",
                                 boundaries=COUNT_BOUNDARIES)
        self.hits = Counter("rwkvray_prefix_cache_hits", "Prompts that started from a cached prefix state")
        self.misses = Counter("rwkvray_prefix_cache_misses", "Prompts with no cached prefix state")

    def step(self, rows: int, decoded: int, prefilled: int) -> None:
        self.batch.observe(rows)
        if decoded:
            self.tokens.inc(decoded)
        if prefilled:
            self.prefill.observe(prefilled)


def mounted_states_gauge():
    from ray.serve.metrics import Gauge
    return Gauge("rwkvray_mounted_states", "States mounted in the registry")
