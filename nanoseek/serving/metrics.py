"""/metrics: Prometheus counters, gauges and latency histograms of one server, and its cost per 1M output tokens.

Everything here is updated on the event loop only, so nothing needs a lock.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import Any


class Histogram:
    """A Prometheus histogram: counts per bucket of upper bounds, their sum and count."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)  # the first bucket with value <= upper (none: only +Inf)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for upper, c in zip(self.buckets, self.counts, strict=True):
            total += c
            lines.append(f'{self.name}_bucket{{le="{upper}"}} {total}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}",
                  f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """The server's counters; `render` writes them, with the engine's stats, in Prometheus' text format."""

    def __init__(self, price_per_hour: float):
        self.price_per_hour = price_per_hour
        self.finished = dict.fromkeys(("stop", "length", "cancelled", "error"), 0)  # finish reason -> requests
        self.errors: dict[int, int] = {}  # HTTP status -> rejected requests
        self.prompt_tokens = self.output_tokens = 0
        fast = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds", "Time from request to its first token.", fast)
        self.itl = Histogram("nanoseek_inter_token_latency_seconds", "Time between two tokens of one choice.", fast)
        self.latency = Histogram("nanoseek_request_latency_seconds", "Time from request to its last token.",
                                 (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0))
        # throughput is measured over the time at least one request is in flight (idle time costs nothing here)
        self.in_flight, self.busy_seconds, self.busy_since = 0, 0.0, 0.0

    def begin(self) -> None:
        if self.in_flight == 0:
            self.busy_since = time.perf_counter()
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.busy_seconds += time.perf_counter() - self.busy_since

    def tokens_per_second(self) -> float:
        busy = self.busy_seconds + (time.perf_counter() - self.busy_since if self.in_flight else 0.0)
        return self.output_tokens / busy if busy > 0 else 0.0

    def cost_per_million(self) -> float:
        """USD per 1M output tokens = price_per_hour / (output tokens per hour at the measured rate) * 1e6."""
        tps = self.tokens_per_second()
        return self.price_per_hour / (tps * 3600) * 1e6 if tps > 0 else math.nan

    def render(self, stats: dict[str, Any]) -> str:
        def one(name: str, kind: str, help: str, value: float) -> list[str]:
            text = "NaN" if math.isnan(value) else repr(value)  # Prometheus spells it NaN
            return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {text}"]

        lines = ["# HELP nanoseek_requests_total Finished generation requests (one per choice), by finish reason.",
                 "# TYPE nanoseek_requests_total counter"]
        lines += [f'nanoseek_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.finished.items())]
        lines += ["# HELP nanoseek_rejected_requests_total Requests answered with an HTTP error, by status.",
                  "# TYPE nanoseek_rejected_requests_total counter"]
        lines += [f'nanoseek_rejected_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.errors.items())]
        lines += one("nanoseek_prompt_tokens_total", "counter", "Prompt tokens prefilled.", self.prompt_tokens)
        lines += one("nanoseek_generation_tokens_total", "counter", "Output tokens generated.", self.output_tokens)
        lines += one("nanoseek_generation_tokens_per_second", "gauge",
                     "Output tokens per second over the time requests were in flight.", self.tokens_per_second())
        lines += one("nanoseek_requests_in_flight", "gauge", "HTTP generation requests being served.", self.in_flight)
        lines += one("nanoseek_queue_depth", "gauge", "Engine requests waiting for a batch slot.", stats["waiting"])
        lines += one("nanoseek_active_slots", "gauge", "Batch slots holding a request.", stats["active_slots"])
        lines += one("nanoseek_max_batch_size", "gauge", "Batch slots.", stats["max_batch_size"])
        # the engine's own clock: tokens / decode steps is the mean batch occupancy, seconds / steps the step time
        lines += one("nanoseek_decode_steps_total", "counter", "Engine decode steps (one per batch of tokens).",
                     stats["decode_steps"])
        lines += one("nanoseek_engine_seconds_total", "counter", "Seconds the engine spent in prefill and decode.",
                     stats["prefill_seconds"] + stats["decode_seconds"])
        # the prefix cache (docs/engine.md): prompt tokens read from it instead of prefilled, and what it holds
        lines += one("nanoseek_prompt_tokens_cached_total", "counter",
                     "Prompt tokens read from the prefix cache instead of prefilled.", stats["cached_prompt_tokens"])
        lines += one("nanoseek_prefill_tokens_total", "counter", "Prompt tokens the engine computed in prefill.",
                     stats["prefill_tokens"])
        lines += one("nanoseek_prefix_cache_hit_rate", "gauge",
                     "Prompt tokens read from the prefix cache / prompt tokens prefilled, since the start.",
                     stats["prefix_cache_hit_rate"])
        lines += one("nanoseek_prefix_cache_tokens", "gauge", "Tokens whose latents the prefix cache holds in memory.",
                     stats["prefix_cache_tokens"])
        lines += one("nanoseek_prefix_cache_bytes", "gauge", "Bytes of latents the prefix cache holds in memory.",
                     stats["prefix_cache_bytes"])
        lines += one("nanoseek_prefix_cache_disk_bytes", "gauge", "Bytes of the prefix cache's files (--cache-dir).",
                     stats["prefix_cache_disk_bytes"])
        lines += self.ttft.render() + self.itl.render() + self.latency.render()
        lines += one("nanoseek_price_per_hour_usd", "gauge", "Configured machine price (--price-per-hour).",
                     self.price_per_hour)
        lines += one("nanoseek_cost_per_million_output_tokens_usd", "gauge",
                     "price_per_hour / (output tokens per hour at the measured rate) * 1e6.", self.cost_per_million())
        return "\n".join(lines) + "\n"
