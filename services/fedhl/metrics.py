"""Prometheus metrics of the FedHL services, on a registry of their own.

`REGISTRY` is not prometheus_client's global default: importing this module twice (or
building many apps in one test process) never registers a metric twice, and `/metrics`
exposes exactly these series. Services increment the counters; the two gauges describe the
cluster as a whole and are set by the scrape handler just before it renders `REGISTRY`.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)

UPLOADS = Counter(
    "fedhl_uploads",
    "Agent uploads by result (accepted, rejected, late, duplicate, ...).",
    ["result"],
    registry=REGISTRY,
)
UPLOAD_BYTES = Counter("fedhl_upload_bytes", "Bytes received in agent uploads.", registry=REGISTRY)
DOWNLOAD_BYTES = Counter("fedhl_download_bytes", "Bytes of round artifacts sent to agents.", registry=REGISTRY)
ROUNDS = Counter(
    "fedhl_rounds",
    "Rounds that ended, by outcome (committed, failed).",
    ["outcome"],
    registry=REGISTRY,
)
AGGREGATION_SECONDS = Histogram(
    "fedhl_aggregation_seconds",
    "Wall time of one round's aggregation (load, merge, publish).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
AGENTS_ALIVE = Gauge(
    "fedhl_agents_alive",
    "Active agents whose heartbeat has not expired (set at scrape time).",
    registry=REGISTRY,
)
ACTIVE_ROUNDS = Gauge(
    "fedhl_active_rounds",
    "Rounds not yet ended: open, collecting or aggregating (set at scrape time).",
    registry=REGISTRY,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def exposition() -> bytes:
    """`REGISTRY` in the Prometheus text format."""
    return generate_latest(REGISTRY)


AGGREGATION_JOBS = Counter(
    "fedhl_aggregation_jobs",
    "Aggregation jobs (round shards) a worker finished, by outcome (committed, partial, failed, skipped, error).",
    ["outcome"],
    registry=REGISTRY,
)
RECLAIMED_JOBS = Counter(
    "fedhl_reclaimed_jobs",
    "Aggregation jobs taken over from a worker that did not ack them in time.",
    registry=REGISTRY,
)
AGGREGATOR_DEVICE = Gauge(
    "fedhl_aggregator_device",
    "1 for the device this aggregator merges on.",
    ["device"],
    registry=REGISTRY,
)
DEFENCE_ACTIONS = Counter(
    "fedhl_defence_actions",
    "Uploads bounded by a defence, by action (refused, dropped, clipped, size_bounded) and reason; "
    "one per upload and module (size_bounded: one per upload).",
    ["action", "reason"],
    registry=REGISTRY,
)
QUARANTINES = Counter(
    "fedhl_agent_quarantines",
    "Agents left out of selection after repeated refused, dropped or clipped uploads.",
    registry=REGISTRY,
)
AGENT_CALLS_IN_FLIGHT = Gauge(
    "fedhl_agent_calls_in_flight",
    "Agent calls in progress on this coordinator, by kind (call, wait, transfer).",
    ["kind"],
    registry=REGISTRY,
)
AGENT_CALLS_REFUSED = Counter(
    "fedhl_agent_calls_refused",
    "Agent calls refused with RESOURCE_EXHAUSTED, by cap (call, wait, transfer: global; agent: per agent).",
    ["cap"],
    registry=REGISTRY,
)
AGENTS_WAITING = Gauge(
    "fedhl_agents_waiting",
    "Agents holding an open PullTask wait on this coordinator.",
    registry=REGISTRY,
)
AGENT_WAKEUPS = Counter(
    "fedhl_agent_wakeups",
    "PullTask waits woken by a round event (each wake-up costs one database read).",
    registry=REGISTRY,
)
DB_BATCH_ITEMS = Histogram(
    "fedhl_db_batch_items",
    "Items per group-committed transaction of the agent plane (auth, claim, accept; coordinator/batcher.py).",
    ["batcher"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
UPLOAD_STAGE_SECONDS = Histogram(
    "fedhl_upload_stage_seconds",
    "Time of one upload call per stage: check (header and task), stage (write the received bytes), "
    "verify (sha256, validation, store), accept (the database transaction).",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
