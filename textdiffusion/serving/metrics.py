"""Prometheus metrics of one server: its own registry, so several servers in one process never collide."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TOKENS_WINDOW_S = 10.0


class ServerMetrics:
    """Requests and errors by endpoint, the queue, batch sizes, model calls, latency, tokens/s."""

    def __init__(self, engine):
        self.started = time.time()
        r = self.registry = CollectorRegistry()
        self.requests = Counter("textdiffusion_requests", "HTTP requests to /v1/ endpoints.", ["endpoint", "code"], registry=r)
        self.errors = Counter("textdiffusion_errors", "Requests answered with a 4xx/5xx status.", ["endpoint", "code"], registry=r)
        Gauge("textdiffusion_queue_depth", "Requests waiting to join the batch.", registry=r).set_function(
            lambda: engine.load()["waiting"])
        Gauge("textdiffusion_active_requests", "Requests denoising now.", registry=r).set_function(
            lambda: engine.load()["active"])
        self.batch_rows = Histogram("textdiffusion_batch_rows", "Rows per model call.", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_requests = Histogram("textdiffusion_batch_requests", "Requests sharing one model call.", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.model_calls = Counter("textdiffusion_model_calls", "Forward passes of the model.", registry=r)
        self.request_steps = Counter("textdiffusion_request_steps",
                                     "Sum over model calls of the requests in the call.", registry=r)
        self.latency = Histogram("textdiffusion_request_latency_seconds", "From submission to the last step.",
                                 registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens = Counter("textdiffusion_generated_tokens", "Generated (formerly masked) tokens.", registry=r)
        Gauge("textdiffusion_tokens_per_second", f"Generated tokens per second over the last {TOKENS_WINDOW_S:g} s.",
              registry=r).set_function(self.tokens_per_second)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        engine.on_call = self.on_call
        engine.on_finish = self.on_finish

    def count(self, endpoint: str, code: int) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        if code >= 400:
            self.errors.labels(endpoint, str(code)).inc()

    def on_call(self, rows: int, requests: int) -> None:  # the engine's thread
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.model_calls.inc()
        self.request_steps.inc(requests)

    def on_finish(self, job) -> None:  # the engine's thread
        now = time.perf_counter()
        self.latency.observe(now - job.submitted)
        tokens = job.result["tokens"]
        self.tokens.inc(tokens)
        with self._lock:
            self._recent.append((now, tokens))

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        with self._lock:
            while self._recent and now - self._recent[0][0] > TOKENS_WINDOW_S:
                self._recent.popleft()
            total = sum(t for _, t in self._recent)
        return total / TOKENS_WINDOW_S

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
