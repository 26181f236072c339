"""The server's Prometheus metrics: request counts and latencies (histograms and recent quantiles),
batch sizes, queue depth, adapters loaded; for generation: rows per decoding step, step time, time to
first token, tokens generated, requests cancelled (clients gone)."""

from __future__ import annotations

import collections
import math
import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from .service import Service


class _RecentLatency:
    """Latency quantiles over each endpoint's last ``size`` requests, as a Prometheus summary."""

    QUANTILES = (0.5, 0.9, 0.99)

    def __init__(self, size: int = 1024) -> None:
        self.samples: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=size))
        self.totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        self.lock = threading.Lock()
        self.size = size

    def observe(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.samples[endpoint].append(seconds)
            self.totals[endpoint][0] += 1
            self.totals[endpoint][1] += seconds

    def collect(self) -> list[Metric]:
        m = Metric("ptune_request_latency_recent_seconds",
                   f"request latency quantiles over each endpoint's last {self.size} requests", "summary")
        with self.lock:
            for endpoint, window in self.samples.items():
                values = sorted(window)
                for q in self.QUANTILES:
                    k = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
                    m.add_sample(m.name, {"endpoint": endpoint, "quantile": str(q)}, values[k])
                count, total = self.totals[endpoint]
                m.add_sample(m.name + "_count", {"endpoint": endpoint}, count)
                m.add_sample(m.name + "_sum", {"endpoint": endpoint}, total)
        return [m]


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, service: "Service") -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ptune_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("ptune_request_latency_seconds", "HTTP request latency by endpoint", ["endpoint"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.recent = _RecentLatency()
        r.register(self.recent)
        self.batch_rows = Histogram("ptune_batch_rows", "rows per forward pass (dynamic batches)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_adapters = Histogram("ptune_batch_adapters", "distinct adapters per forward pass",
                                        buckets=(1, 2, 3, 4, 8, 16, 32), registry=r)
        self.batch_requests = Histogram("ptune_batch_requests", "requests gathered into one batch",
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_seconds = Histogram("ptune_batch_seconds", "time to score one batch on the worker",
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.queue_wait = Histogram("ptune_queue_wait_seconds", "time a request waited before its batch ran",
                                    buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5), registry=r)
        self.rows = Counter("ptune_rows", "inputs scored or generated, by adapter", ["adapter"], registry=r)
        self.batch_failures = Counter("ptune_batch_failures", "batches that failed as a whole (their requests were "
                                      "retried one by one)", registry=r)
        self.decode_steps = Counter("ptune_decode_steps", "decoding steps of the running generation batch", registry=r)
        self.decode_rows = Histogram("ptune_decode_rows", "rows given a token in one decoding step",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.decode_step_seconds = Histogram("ptune_decode_step_seconds", "time of one decoding step on the worker",
                                             buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.first_token = Histogram("ptune_time_to_first_token_seconds", "from a generation request's arrival to "
                                     "its first token", buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                     registry=r)
        self.tokens = Counter("ptune_generated_tokens", "tokens generated, by adapter ((base): the bare base)",
                              ["adapter"], registry=r)
        self.cancelled = Counter("ptune_generation_cancelled", "generation requests cancelled (the client left)",
                                 registry=r)
        Gauge("ptune_decode_active", "generation requests being decoded or waiting for a slot", registry=r).set_function(
            lambda: service.decode.active if service.decode is not None else 0)
        Gauge("ptune_queue_rows", "rows waiting to be batched", registry=r).set_function(lambda: service.queued_rows)
        Gauge("ptune_queue_requests", "requests waiting to be batched", registry=r).set_function(
            lambda: (service.queue.qsize() if service.queue is not None else 0) + len(service.held))
        Gauge("ptune_adapters", "adapters loaded", registry=r).set_function(lambda: len(service.adapters.names))
