"""What `serve` counts, in Prometheus' text format at GET /metrics (one registry per process)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no `_created` sample beside every counter
REGISTRY = CollectorRegistry()
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "prism_serve_requests", "HTTP requests answered", ["endpoint", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "prism_serve_request_seconds", "time from a request's arrival to its last byte",
    ["endpoint"], buckets=_SECONDS, registry=REGISTRY,
)  # fmt: skip
FIRST_TOKEN = Histogram(
    "prism_serve_time_to_first_token_seconds", "time from a job's arrival to its first new token",
    buckets=_SECONDS, registry=REGISTRY,
)  # fmt: skip
TOKENS = Counter("prism_serve_generated_tokens", "new tokens generated", registry=REGISTRY)
PROMPT_TOKENS = Counter("prism_serve_prompt_tokens", "prompt tokens read", registry=REGISTRY)
TOKENS_PER_SECOND = Gauge(
    "prism_serve_tokens_per_second", "new tokens per second of the last batch (all its rows)",
    registry=REGISTRY,
)  # fmt: skip
BYTES = Counter(
    "prism_serve_bytes_sent_per_device",
    "bytes each device sent (the plan's closed form, equal to the compiled collectives)",
    registry=REGISTRY,
)
CLUSTER = Counter(
    "prism_serve_cluster_bytes",
    "across nodes: bytes of the batches node 0 published (through the coordinator) and of the "
    "token ids the decoding node broadcast back (a collective), beside the plan's bytes",
    ["what"], registry=REGISTRY,
)  # fmt: skip
QUEUE = Gauge("prism_serve_queue_depth", "jobs waiting for the worker", registry=REGISTRY)
ACTIVE = Gauge(
    "prism_serve_jobs_admitted", "jobs waiting or running (the bounded queue's fill)",
    registry=REGISTRY,
)  # fmt: skip
BATCH = Histogram(
    "prism_serve_batch_rows", "rows (jobs) per batch run", buckets=(1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)  # fmt: skip


def text() -> bytes:
    """Every metric in Prometheus' text exposition format."""
    return generate_latest(REGISTRY)
