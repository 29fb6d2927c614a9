"""Prometheus metrics of a node: queue depth, jobs by status, generation time, steps per second, models."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUEUE_DEPTH = Gauge("sd_node_queue_depth", "Jobs waiting in the queue")
USERS_QUEUED = Gauge("sd_node_users_queued", "Users with at least one queued job")
JOBS = Counter("sd_node_jobs_total", "Jobs finished, by final status", ["status"])
GENERATION_SECONDS = Histogram(
    "sd_node_generation_seconds",
    "Wall time of one generation call (one job or one batch)",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320),
)
STEPS_PER_SECOND = Gauge("sd_node_steps_per_second", "Sampling steps per second of the last generation")
BATCH_SIZE = Histogram("sd_node_batch_jobs", "Jobs run together in one call", buckets=(1, 2, 3, 4, 6, 8, 12, 16))
LOADED_MODELS = Gauge("sd_node_loaded_models", "Models resident on the device or in the RAM cache")
POOL_EVICTIONS = Gauge("sd_node_pool_evictions", "Models moved off the device or freed since start")
POOL_LOADS = Gauge("sd_node_pool_loads", "Model loads since start")
